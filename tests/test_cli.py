"""The `se3t` commands through typer's CliRunner (and the installed entry point once, in a subprocess).

Predictions written by the CLI are parsed back and compared with the same checkpoint run in-process.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from rdkit import Chem
from typer.testing import CliRunner

from se3tcli import __version__
from se3tcli import checkpoint as checkpoint_module
from se3tcli.checkpoint import LoadedModel, load_model, sha256_of
from se3tcli.cli import app
from se3tcli.equivariance import TRANSFORMS, check_equivariance
from se3tcli.graph import collate
from se3tcli.io import read_molecules
from se3tcli.io.outputs import file_value
from se3tcli.model import fused_cpu
from se3tcli.model.config import ModelConfig
from se3tcli.model.transformer import SE3Transformer
from se3tcli.predict import output_units, predict_stream
from se3tcli.targets import column_name

runner = CliRunner()
CPU = torch.device("cpu")
BASE_COLUMNS = ["name", "source", "record", "formula", "smiles", "status", "message"]
CHECK_KEYS = {"molecule", "transform", "max_abs_error", "max_rel_error", "tolerance", "passed"}


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint: Path) -> LoadedModel:
    return load_model(str(tiny_checkpoint))


@pytest.fixture(scope="module")
def sample_sdf(samples: Path) -> Path:
    return samples / "qm9_sample.sdf"


@pytest.fixture(scope="module")
def expected(loaded: LoadedModel, sample_sdf: Path) -> dict[str, dict[str, float]]:
    """In-process predictions for the sample molecules: ``{name: {target: value}}``."""
    rows = predict_stream(loaded, read_molecules([sample_sdf]), CPU)
    return {molecule.name: values for molecule, values in rows}


def _invoke(*args: str) -> typer.testing.Result:
    return runner.invoke(app, [str(a) for a in args])


def _one_line_error(result, code: int = 2) -> str:
    """The failure was a single ``error:`` line on stderr, with nothing on stdout and no traceback."""
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.output and result.stdout == ""
    return lines[0]


def _flat(text: str) -> str:
    """Output with Rich's line wrapping (80 columns under CliRunner) undone."""
    return " ".join(text.split())


def _columns(loaded: LoadedModel) -> dict[str, str]:
    """Quantity -> its column in output files: the targets, then the dipole components (``mu_x_D``)."""
    return {q: column_name(q, unit) for q, unit in output_units(loaded, loaded.targets).items()}


# ------------------------------------------------------------------------------------------------ predict


def test_in_process_predictions_match_a_single_batch(loaded, sample_sdf, expected) -> None:
    """The streaming predictor agrees with one direct forward pass over all molecules."""
    molecules = list(read_molecules([sample_sdf]))
    batch = collate([(m.numbers, m.positions) for m in molecules], loaded.model.config.cutoff)
    with torch.inference_mode():
        out = loaded.model(batch)
    for i, molecule in enumerate(molecules):
        for target in loaded.targets:
            assert expected[molecule.name][target] == pytest.approx(float(out[target][i]), rel=1e-5, abs=1e-5)


def test_predict_csv(tmp_path, tiny_checkpoint, sample_sdf, loaded, expected) -> None:
    out = tmp_path / "predictions.csv"
    result = _invoke("predict", sample_sdf, "--model", tiny_checkpoint, "--output", out)
    assert result.exit_code == 0, result.output
    assert "10 of 10 molecules predicted; written to" in _flat(result.stdout)
    with open(out, newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == BASE_COLUMNS + list(_columns(loaded).values())
        assert reader.fieldnames[-4:] == ["U0_eV", "mu_x_D", "mu_y_D", "mu_z_D"]  # the dipole head's vector
        rows = list(reader)
    assert [r["name"] for r in rows] == list(expected)
    assert [int(r["record"]) for r in rows] == list(range(1, 11))
    for row in rows:
        assert row["status"] == "ok" and row["message"] == "" and row["source"] == str(sample_sdf)
        for quantity, column in _columns(loaded).items():
            assert float(row[column]) == file_value(expected[row["name"]][quantity])
    assert rows[0]["formula"] == "CH4" and rows[0]["smiles"] == "C" and rows[3]["smiles"] == "C#N"


def test_predict_json(tmp_path, tiny_checkpoint, sample_sdf, loaded, expected) -> None:
    out = tmp_path / "predictions.json"
    result = _invoke("predict", sample_sdf, "--model", tiny_checkpoint, "-o", out)
    assert result.exit_code == 0, result.output
    records = json.loads(out.read_text())
    assert isinstance(records, list) and len(records) == 10
    for number, record in enumerate(records, start=1):
        assert list(record) == BASE_COLUMNS + list(_columns(loaded).values())
        assert record["record"] == number and record["status"] == "ok"
        for quantity, column in _columns(loaded).items():
            assert record[column] == file_value(expected[record["name"]][quantity])


def test_predict_sdf(tmp_path, tiny_checkpoint, sample_sdf, loaded, expected) -> None:
    out = tmp_path / "predictions.sdf"
    result = _invoke("predict", sample_sdf, "--model", tiny_checkpoint, "-o", out)
    assert result.exit_code == 0, result.output
    written = [m for m in Chem.SDMolSupplier(str(out), removeHs=False)]
    originals = [m for m in Chem.SDMolSupplier(str(sample_sdf), removeHs=False)]
    assert len(written) == 10 and all(m is not None for m in written)
    for mol, original in zip(written, originals, strict=True):
        name = mol.GetProp("_Name")
        assert name == original.GetProp("_Name") and mol.GetProp("se3t_status") == "ok"
        assert mol.GetProp("lumo_eV") == original.GetProp("lumo_eV")  # the input's tags are kept,
        assert mol.GetProp("homo_eV_input") == original.GetProp("homo_eV")  # renamed if named like a value
        np.testing.assert_allclose(
            mol.GetConformer().GetPositions(), original.GetConformer().GetPositions(), atol=1e-4
        )
        for quantity, tag in _columns(loaded).items():
            assert float(mol.GetProp(tag)) == file_value(expected[name][quantity])


def test_predict_table_and_smiles(tiny_checkpoint, sample_sdf) -> None:
    result = _invoke("predict", sample_sdf, "--smiles", "CCO", "--model", tiny_checkpoint)
    assert result.exit_code == 0, result.output
    assert "11 of 11 molecules predicted" in _flat(result.stdout)
    assert "se3t predictions" in result.stdout  # the table (its cells depend on the terminal width)


def _write_xyz(path: Path, molecules, rotation: np.ndarray | None = None, shift=np.zeros(3)) -> Path:
    from ase.data import chemical_symbols

    with open(path, "w") as handle:
        for m in molecules:
            positions = m.positions if rotation is None else m.positions @ rotation.T + shift
            handle.write(f"{len(m.numbers)}\n{m.name}\n")
            for z, (x, y, w) in zip(m.numbers, positions.tolist(), strict=True):
                handle.write(f"{chemical_symbols[z]} {x!r} {y!r} {w!r}\n")
    return path


def _predict_json(tmp_path: Path, model: Path, source: Path, keys: list[str]) -> dict[str, dict[str, float]]:
    """``{name: {key: value}}`` of ``se3t predict source -o FILE.json``."""
    out = tmp_path / f"{source.stem}.json"
    result = _invoke("predict", source, "--model", model, "-o", out)
    assert result.exit_code == 0, result.output
    return {r["name"]: {k: r[k] for k in keys} for r in json.loads(out.read_text())}


def test_same_molecule_as_sdf_xyz_and_rotated_xyz(tmp_path, tiny_checkpoint, sample_sdf, loaded) -> None:
    """The same geometry as SDF, as XYZ, and as XYZ rotated and moved 50 Å: the same predictions to 1e-5
    (relative for values of large magnitude such as U0 ≈ -1e4 eV, whose float32 spacing is ~1e-3 eV)."""
    molecules = list(read_molecules([sample_sdf]))
    torch.manual_seed(1)
    from e3nn import o3

    rotation = o3.rand_matrix(dtype=torch.float64).numpy()
    xyz = _write_xyz(tmp_path / "same.xyz", molecules)
    rotated = _write_xyz(tmp_path / "rotated.xyz", molecules, rotation, np.array([50.0, -20.0, 5.0]))
    invariant = [_columns(loaded)[t] for t in loaded.targets]
    from_sdf = _predict_json(tmp_path, tiny_checkpoint, sample_sdf, invariant)
    for other in (
        _predict_json(tmp_path, tiny_checkpoint, xyz, invariant),
        _predict_json(tmp_path, tiny_checkpoint, rotated, invariant),
    ):
        assert list(other) == list(from_sdf)
        for name, values in other.items():
            for target, value in values.items():
                assert value == pytest.approx(from_sdf[name][target], rel=1e-5, abs=1e-5), (name, target)


def test_bad_records_keep_their_rows(tmp_path, tiny_checkpoint, samples, loaded) -> None:
    out = tmp_path / "bad.json"
    result = _invoke("predict", samples / "bad.sdf", "--model", tiny_checkpoint, "-o", out)
    assert result.exit_code == 0, result.output
    assert "2 of 4 molecules predicted" in _flat(result.stdout)
    records = json.loads(out.read_text())
    assert [r["name"] for r in records] == ["pentavalent_carbon", "dummy_atom", "ethanol_2d", "glycine_3d"]
    assert [r["status"] for r in records] == ["error", "error", "warning", "ok"]
    for number, record in enumerate(records[:2], start=1):
        assert record["message"].startswith(f"bad.sdf record {number} ({record['name']}): ")
        assert record["record"] == number and all(record[c] is None for c in _columns(loaded).values())
    assert "valence" in records[0]["message"] and "unsupported element" in records[1]["message"]
    assert "3D conformer generated" in records[2]["message"]
    for record in records[2:]:
        assert all(isinstance(record[c], float) for c in _columns(loaded).values())
    assert records[3]["smiles"] == "NCC(=O)O"  # glycine, from the SD record's bonds
    assert "bad.sdf record 1 (pentavalent_carbon)" in _flat(result.stdout)  # the reasons are printed too


def test_only_bad_records_exit_1(tmp_path, tiny_checkpoint, samples) -> None:
    text = (samples / "bad.sdf").read_text()
    only_bad = tmp_path / "only_bad.sdf"
    only_bad.write_text("$$$$\n".join(text.split("$$$$\n")[:2]) + "$$$$\n")
    out = tmp_path / "only_bad.csv"
    result = _invoke("predict", only_bad, "--model", tiny_checkpoint, "-o", out)
    assert result.exit_code == 1, result.output
    assert "0 of 2 molecules predicted" in _flat(result.stdout) and "Traceback" not in result.output
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["status"] for r in rows] == ["error", "error"] and all(r["message"] for r in rows)

    # An existing output is worth more than error rows: with nothing predicted, --overwrite keeps it.
    out.write_text("earlier predictions\n")
    result = _invoke("predict", only_bad, "--model", tiny_checkpoint, "-o", out, "--overwrite")
    assert result.exit_code == 1 and out.read_text() == "earlier predictions\n"
    assert f"{out} left as it was (nothing to replace it with)" in _flat(result.stdout)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_sdf_output_says_which_rows_it_cannot_hold(tmp_path, tiny_checkpoint, samples) -> None:
    out = tmp_path / "with_errors.sdf"
    result = _invoke(
        "predict", samples / "bad.sdf", "--smiles", "C1CC", "--model", tiny_checkpoint, "-o", out
    )
    assert result.exit_code == 0, result.output
    assert "(1 error rows without atoms or coordinates left out: SD records need them" in _flat(result.stdout)
    assert out.read_text().count("$$$$") == 4  # bad.sdf's four records; the unparsable SMILES has no atoms


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ([], "give at least one input file or --smiles"),
        (["missing.sdf"], "input file not found: missing.sdf"),
        (["unsupported.pdf"], "unsupported input format"),
        (["SAMPLE", "--targets", "homo,bogus"], "unknown target 'bogus'"),
        (["SAMPLE", "--device", "tpu"], "unknown device"),
        (["SAMPLE", "-o", "predictions.txt"], "unsupported output format"),
        (["SAMPLE", "-o", "a_folder"], "output path is a directory: a_folder"),
        (
            ["SAMPLE", "-o", "p.csv", "--output-format", "sdf"],
            "--output-format is for -o - (standard output)",
        ),
    ],
)
def test_predict_usage_errors(args, fragment, tmp_path, tiny_checkpoint, sample_sdf, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("unsupported.pdf").write_text("%PDF-1.4\n")
    Path("a_folder").mkdir()
    args = [str(sample_sdf) if a == "SAMPLE" else a for a in args]
    line = _one_line_error(_invoke("predict", *args, "--model", tiny_checkpoint))
    assert fragment in line
    assert sorted(tmp_path.iterdir()) == [tmp_path / "a_folder", tmp_path / "unsupported.pdf"]  # no output
    assert list((tmp_path / "a_folder").iterdir()) == []


def test_predict_without_any_model_says_how_to_get_one(sample_sdf, monkeypatch) -> None:
    monkeypatch.setattr(checkpoint_module, "bundled_models", dict)
    line = _one_line_error(_invoke("predict", sample_sdf))
    assert "no bundled model 'qm9-default'" in line and "se3t train" in line


# ------------------------------------------------------------------------------------ check-equivariance


def _equivariance_report(result) -> dict:
    report = json.loads(result.stdout)
    assert set(report) == {"passed", "dtype", "device", "checks"}
    assert report["checks"] and all(set(check) == CHECK_KEYS for check in report["checks"])
    return report


def test_check_equivariance_random_base_network() -> None:
    result = _invoke(
        "check-equivariance", "--json", "--model", "random", "--trials", "1", "--max-molecules", "2"
    )
    assert result.exit_code == 0, result.output
    report = _equivariance_report(result)
    assert report["passed"] is True and report["dtype"] == "float64" and report["device"] == "cpu"
    assert {c["molecule"] for c in report["checks"]} == {"gdb_1", "gdb_2"}
    assert [c["transform"] for c in report["checks"][:5]] == list(TRANSFORMS)
    assert all(c["passed"] and c["max_rel_error"] <= c["tolerance"] == 1e-9 for c in report["checks"])


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_check_equivariance_trained_checkpoint(dtype, tiny_checkpoint) -> None:
    args = [
        "check-equivariance",
        "--json",
        "--model",
        tiny_checkpoint,
        "--trials",
        "2",
        "--max-molecules",
        "3",
    ]
    result = _invoke(*args, "--dtype", dtype)
    assert result.exit_code == 0, result.output
    report = _equivariance_report(result)
    assert (
        report["passed"] is True and report["dtype"] == dtype and len(report["checks"]) == 3 * len(TRANSFORMS)
    )


def test_check_equivariance_table(tiny_checkpoint, samples) -> None:
    result = _invoke(
        "check-equivariance", samples / "qm9_sample.xyz", "--model", tiny_checkpoint, "--trials", "1"
    )
    assert result.exit_code == 0, result.output
    assert "all checks passed" in _flat(result.stdout) and "reflection" in result.stdout


class _XDependent(SE3Transformer):
    """Adds ``Σ_i (i + 1) x_i`` over each molecule's (centred) atoms to every scalar output: translation
    invariant, but not invariant under rotations, permutations or reflections."""

    def forward(self, batch):
        out = super().forward(batch)
        counts = batch.n_atoms_per_mol
        first = torch.cumsum(counts, 0) - counts
        rank = torch.arange(batch.z.shape[0]) - first[batch.mol_index]
        extra = torch.zeros(batch.n_mol, dtype=batch.pos.dtype)
        extra.index_add_(0, batch.mol_index, (rank + 1) * batch.pos[:, 0])
        return {key: value + extra if value.dim() == 1 else value for key, value in out.items()}


def _tiny_network(cls, tiny: dict) -> SE3Transformer:
    torch.manual_seed(0)
    return cls(ModelConfig(targets=("mu", "homo", "U0"), **tiny))


def test_check_equivariance_catches_a_broken_model(tiny, sample_sdf) -> None:
    molecules = [(m.name, m.numbers, m.positions) for m in list(read_molecules([sample_sdf]))[:3]]
    good = check_equivariance(_tiny_network(SE3Transformer, tiny), molecules, trials=1)
    assert all(r.passed for r in good)
    bad = check_equivariance(_tiny_network(_XDependent, tiny), molecules, trials=1)
    verdict = {(r.molecule, r.transform): r.passed for r in bad}
    for name, _, _ in molecules:
        assert verdict[(name, "translation")] is True
        for transform in ("rotation", "permutation", "reflection", "rotation+translation+permutation"):
            assert verdict[(name, transform)] is False, (name, transform)
    assert max(r.max_abs_error for r in bad) > 1e-3


def test_check_equivariance_cli_fails_for_a_broken_model(tiny, monkeypatch) -> None:
    broken = _tiny_network(_XDependent, tiny)

    def fake_load_model(name_or_path=None, device="cpu"):
        return LoadedModel(model=broken.to(device), path=Path("broken.pt"), checkpoint={})

    monkeypatch.setattr(checkpoint_module, "load_model", fake_load_model)
    result = _invoke(
        "check-equivariance", "--json", "--model", "broken.pt", "--trials", "1", "--max-molecules", "2"
    )
    assert result.exit_code == 1, result.output
    report = _equivariance_report(result)
    assert report["passed"] is False
    assert {c["transform"] for c in report["checks"] if not c["passed"]} >= {"rotation", "permutation"}
    table = _invoke("check-equivariance", "--model", "broken.pt", "--trials", "1", "--max-molecules", "1")
    assert table.exit_code == 1 and "some checks failed" in _flat(table.stdout)


def test_check_equivariance_usage_errors(tmp_path) -> None:
    assert "--dtype must be float64 or float32" in _one_line_error(
        _invoke("check-equivariance", "--model", "random", "--dtype", "float16")
    )
    assert "input file not found" in _one_line_error(_invoke("check-equivariance", tmp_path / "none.sdf"))


# ------------------------------------------------------------------------------------------------- info


def test_info_of_a_checkpoint(tiny_checkpoint, loaded) -> None:
    result = _invoke("info", tiny_checkpoint, "--json")
    assert result.exit_code == 0, result.output
    card = json.loads(result.stdout)
    assert card["checkpoint"]["sha256"] == sha256_of(tiny_checkpoint)
    assert card["targets"] == loaded.units
    assert card["elements"] == ["H", "C", "N", "O", "F"]
    assert card["parameters"] == sum(p.numel() for p in loaded.model.parameters())
    assert card["config"]["channels"] == loaded.model.config.channels
    assert card["domain"]["max_atoms"] >= 5
    table = _invoke("info", tiny_checkpoint)
    assert table.exit_code == 0, table.output
    assert "best" in table.stdout and "parameters" in table.stdout


def test_info_lists_bundled_models(tmp_path, tiny_checkpoint, monkeypatch) -> None:
    monkeypatch.setattr(checkpoint_module, "bundled_models", dict)
    lines = _invoke("info").stdout.strip().splitlines()
    assert lines[0] == "no bundled models installed" and lines[1].startswith("CPU attention layers: ")
    listed = json.loads(_invoke("info", "--json").stdout)
    assert listed["bundled_models"] == {} and listed["cpu_attention_kernel"] == fused_cpu.kernel_status()

    path = tmp_path / "tiny.pt"
    shutil.copyfile(tiny_checkpoint, path)
    card = {"name": "tiny", "description": "tiny-test-model", "checkpoint": {"sha256": sha256_of(path)}}
    path.with_suffix(".json").write_text(json.dumps(card))
    monkeypatch.setattr(checkpoint_module, "bundled_models", lambda: {"tiny": path})
    listing = _invoke("info")
    assert listing.exit_code == 0 and listing.stdout.splitlines()[0].split() == ["tiny", str(path)]
    assert json.loads(_invoke("info", "--json").stdout)["bundled_models"] == {"tiny": str(path)}
    shown = _invoke("info", "tiny", "--json")
    assert shown.exit_code == 0 and json.loads(shown.stdout) == card
    assert "tiny-test-model" in _invoke("info", "tiny").stdout


def test_info_of_a_missing_model() -> None:
    assert "no such checkpoint file or bundled model" in _one_line_error(_invoke("info", "no-such-model"))


# ------------------------------------------------------------------------------------- version and help


def test_version() -> None:
    result = _invoke("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"se3t {__version__}"


def _commands() -> list[str]:
    return sorted(typer.main.get_command(app).commands)


def test_every_documented_command_exists() -> None:
    assert {"predict", "train", "evaluate", "check-equivariance", "info"} <= set(_commands())


@pytest.mark.parametrize("command", [None, *_commands()])
def test_help(command) -> None:
    result = _invoke(*([command] if command else []), "--help")
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.stdout and "Traceback" not in result.output
    if command is None:
        assert all(name in result.stdout for name in _commands())


# ---------------------------------------------------------------------------------- installed entry point


def _installed_se3t() -> str:
    beside_python = Path(sys.executable).parent / "se3t"
    found = str(beside_python) if beside_python.exists() else shutil.which("se3t")
    if found is None:
        pytest.fail("the se3t entry point is not installed (pip install -e .)")
    return found


def test_installed_entry_point(tmp_path, tiny_checkpoint, sample_sdf, expected, loaded) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="200")
    se3t = _installed_se3t()
    helped = subprocess.run([se3t, "--help"], capture_output=True, text=True, timeout=120, env=env)
    assert helped.returncode == 0 and "predict" in helped.stdout
    out = tmp_path / "predictions.csv"
    command = [
        se3t,
        "predict",
        str(sample_sdf),
        "--model",
        str(tiny_checkpoint),
        "-o",
        str(out),
        "--device",
        "cpu",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    assert "10 of 10 molecules predicted" in result.stdout
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["name"] for r in rows] == list(expected)
    column = _columns(loaded)["homo"]
    # A fresh process may pick other CPU kernels than this one: equal up to float32 rounding.
    for row in rows:
        assert float(row[column]) == pytest.approx(expected[row["name"]]["homo"], rel=1e-5, abs=1e-5)
