"""What the terminal shows: user text (names, file names, messages) and units are printed as they are,
never read as Rich markup, and control characters in names cannot reach the terminal."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from se3tcli.cli import app
from se3tcli.render import plain

runner = CliRunner()


def _predict(checkpoint: Path, *args: str):
    return runner.invoke(app, ["predict", "--model", str(checkpoint), "--targets", "homo", *args])


def test_markup_in_a_molecule_name_is_shown_literally(tiny_checkpoint: Path) -> None:
    result = _predict(tiny_checkpoint, "--smiles", "CCO a[/]b", "--smiles", "CO [bold red]loud[/]")
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output and "MarkupError" not in result.output
    assert "a[/]b" in result.stdout and "[bold red]loud[/]" in result.stdout


def test_units_in_the_table_header_survive(tiny_checkpoint: Path) -> None:
    result = _predict(tiny_checkpoint, "--smiles", "CCO")
    assert result.exit_code == 0, result.output
    assert "homo [eV]" in result.stdout


def test_control_characters_in_names_do_not_reach_the_terminal(tiny_checkpoint: Path) -> None:
    result = _predict(tiny_checkpoint, "--smiles", "CCO red\x1b[31mname\x07\x00")
    assert result.exit_code == 0, result.output
    assert "\x1b[31m" not in result.stdout and "\x07" not in result.stdout and "\x00" not in result.stdout
    assert "red[31mname" in result.stdout
    assert plain("a\tb\nc\x1bd") == "a b cd"


def test_markup_in_a_file_name_gives_the_one_line_error(tmp_path: Path, tiny_checkpoint: Path) -> None:
    missing = tmp_path / "x[/].sdf"
    result = _predict(tiny_checkpoint, str(missing))
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "x[/].sdf" in lines[0], result.stderr


def test_markup_in_an_output_file_name_is_reported_literally(tmp_path: Path, tiny_checkpoint: Path) -> None:
    out = tmp_path / "p[bold]q.csv"
    result = _predict(tiny_checkpoint, "--smiles", "CCO", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert out.is_file() and "p[bold]q.csv" in " ".join(result.stdout.split())
