"""What the terminal shows: user text (names, file names, messages) and units are printed as they are,
never read as Rich markup, and control characters in names cannot reach the terminal."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from rich.console import Console
from typer.testing import CliRunner

from se3tcli.cli import app
from se3tcli.io import STATUS_OK, Molecule
from se3tcli.render import decimals_for, plain, predictions_table, table_order

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


# ------------------------------------------------------------------------------------------- the table


def _rows(n: int = 3):
    rows = []
    for i in range(n):
        molecule = Molecule(
            f"molecule-{i}", "in.sdf", i, np.array([6, 1, 1, 1, 1]), np.zeros((5, 3)), {}, STATUS_OK
        )
        values = {"homo": -6.123456789 - i, "lumo": 0.98765, "gap": 7.1, "mu": 1.23456, "U0": -11778.5323417}
        values |= {
            "alpha": 42.4567,
            "r2": 1243.4567,
            "zpve": 1.24244,
            "U": -1.0,
            "H": -1.0,
            "G": -1.0,
            "Cv": 20.8,
        }
        rows.append((molecule, values))
    return rows


def _render(table, width: int) -> str:
    console = Console(width=width, record=True, file=io.StringIO())
    console.print(table)
    return console.export_text()


def test_at_80_columns_no_value_is_cut_and_the_rest_is_named() -> None:
    targets = table_order(["mu", "alpha", "homo", "lumo", "gap", "r2", "zpve", "U0", "U", "H", "G", "Cv"])
    table, hidden = predictions_table(_rows(), targets, {"homo": 0.133, "mu": 0.103}, width=80)
    text = _render(table, 80)
    assert "…" not in text and max(map(len, text.splitlines())) <= 80
    assert "homo [eV]" in text and "mu [D]" in text and hidden and "U0" in hidden
    assert "-6.12" in text and "-6.1235" not in text  # two decimals for a 0.133 eV error
    assert "1.23" in text and "1.2346" not in text


def test_a_wide_terminal_shows_every_target_with_its_precision() -> None:
    errors = {"U0": 0.0548, "r2": 22.8, "zpve": 0.0055}
    targets = ["U0", "r2", "zpve", "homo"]
    table, hidden = predictions_table(_rows(1), targets, errors, width=200)
    text = _render(table, 200)
    assert hidden == []
    assert "-11778.532" in text and "-11778.5323" not in text  # 3 decimals for 55 meV
    assert " 1243 " in text and "1.2424" in text and "-6.1235" in text  # unknown error: 4 decimals
    assert [decimals_for(e) for e in (0.133, 0.618, 22.8, 0.0055, None)] == [2, 2, 0, 4, 4]
