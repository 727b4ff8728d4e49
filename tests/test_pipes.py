"""Pipes: `-` as an input reads standard input (with --format), `-o -` writes the predictions to standard
output, and everything meant for a person then goes to standard error."""

from __future__ import annotations

import csv
import io
import json
import subprocess
from pathlib import Path

from typer.testing import CliRunner

from se3tcli.cli import app

runner = CliRunner()
SMILES_PIPE = ["predict", "-", "--format", "smi", "-o", "-"]  # SMILES in on stdin, CSV out on stdout


def test_smiles_from_standard_input_to_csv_on_standard_output(tiny_checkpoint: Path) -> None:
    args = [*SMILES_PIPE, "--model", str(tiny_checkpoint), "--targets", "homo"]
    result = runner.invoke(app, args, input="CCO ethanol\nnot-a-smiles\n")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [(r["name"], r["source"], r["status"]) for r in rows] == [
        ("ethanol", "<stdin>", "warning"),
        ("not-a-smiles", "<stdin>", "error"),
    ]
    assert rows[0]["homo_eV"] and rows[1]["message"].startswith("<stdin> record 2 (not-a-smiles)")
    assert list(rows[0])[-1] == "homo_eV" and rows[0]["smiles"] == "CCO"  # no dipole without mu
    assert "se3t predictions" in result.stderr and "1 of 2 molecules predicted" in result.stderr


def test_sdf_from_standard_input_as_json(tiny_checkpoint: Path, samples: Path) -> None:
    args = [
        "predict",
        "-",
        "--format",
        "sdf",
        "-o",
        "-",
        "--output-format",
        "json",
        "--model",
        str(tiny_checkpoint),
    ]
    result = runner.invoke(app, args, input=(samples / "qm9_sample.sdf").read_bytes())
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert len(rows) == 10 and rows[0]["source"] == "<stdin>" and rows[0]["name"] == "gdb_1"


def test_standard_input_needs_a_format_and_is_read_once(tiny_checkpoint: Path) -> None:
    for args in (["-"], ["-", "-", "--format", "smi"]):
        result = runner.invoke(app, ["predict", *args, "--model", str(tiny_checkpoint)], input="CCO\n")
        assert (
            result.exit_code == 2 and result.stderr.startswith("error:") and "standard input" in result.stderr
        )


def test_a_real_pipe(tiny_checkpoint: Path) -> None:
    """The installed command between two pipes: predictions alone on standard output."""
    done = subprocess.run(
        ["se3t", *SMILES_PIPE, "--model", str(tiny_checkpoint), "--device", "cpu"],
        input="CCO\nCCN\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].startswith("name,source,record") and len(done.stdout.splitlines()) == 3


def test_a_reader_that_stops_early_ends_the_run_quietly(tiny_checkpoint: Path, samples: Path) -> None:
    """`se3t predict ... -o - | head -1`: exit 141 (128 + SIGPIPE, as a shell says) and no error."""
    xyz = samples / "qm9_sample.xyz"
    args = [
        "se3t",
        "predict",
        *[str(xyz)] * 200,
        "-o",
        "-",
        "--model",
        str(tiny_checkpoint),
        "--device",
        "cpu",
    ]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline().startswith("name,source,record")
    process.stdout.close()  # the reader goes away while rows keep coming
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 141, stderr
    assert "error" not in stderr.lower() and "Traceback" not in stderr
