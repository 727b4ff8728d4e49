"""Labels in the user's files (names with units, converted) and `se3t evaluate` on external data."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import SAMPLE_TAGS  # noqa: I001 - the tests folder's shared helpers
from rdkit import Chem
from typer.testing import CliRunner

from se3tcli.checkpoint import load_model
from se3tcli.cli import app
from se3tcli.data.labels import is_own_prediction, label_value
from se3tcli.io import read_molecules
from se3tcli.predict import predict_stream
from se3tcli.targets import HARTREE_TO_EV, TARGETS, column_name

runner = CliRunner()


@pytest.mark.parametrize(
    "properties, target, expected",
    [
        ({"homo": "-6.5"}, "homo", -6.5),
        ({"HOMO": "-6.5"}, "homo", -6.5),
        ({"homo_eV": "-6.5"}, "homo", -6.5),
        ({"homo [eV]": "-6.5"}, "homo", -6.5),
        ({"homo (Ha)": "-0.25"}, "homo", -0.25 * HARTREE_TO_EV),
        ({"gap_meV": "7100"}, "gap", 7.1),
        ({"U0 [kcal/mol]": "-100"}, "U0", -4.33641153),
        ({"alpha [bohr³]": "70"}, "alpha", 70.0),
        ({"alpha_bohr3": "70"}, "alpha", 70.0),
        ({"Cv [cal/(mol·K)]": "30"}, "Cv", 30.0),
        ({"mu_debye": "1.5"}, "mu", 1.5),
        ({"homo_eV": "-6", "homo": "-7"}, "homo", -7.0),  # the exact name wins
        ({"homo": "n/a", "homo_eV": "-6"}, "homo", -6.0),  # an unreadable value is skipped
        ({"Cv_cal_per_mol_K": "30"}, "Cv", 30.0),
        ({"mu_x_D": "9", "mu_D": "1.5"}, "mu", 1.5),  # a dipole component is not mu
    ],
)
def test_a_label_is_read_in_its_display_unit(properties: dict, target: str, expected: float) -> None:
    assert label_value(properties, target) == pytest.approx(expected)


@pytest.mark.parametrize(
    "properties, target",
    [
        ({"alpha [A3]": "70"}, "alpha"),
        ({"homo [furlong]": "1"}, "homo"),
        ({"U0": "1"}, "U"),
        ({}, "homo"),
        ({"mu_x_D": "1", "mu_y_D": "1", "mu_z_D": "1"}, "mu"),
    ],
)
def test_unknown_units_other_targets_and_missing_labels_give_nothing(properties: dict, target: str) -> None:
    assert label_value(properties, target) is None


@pytest.mark.parametrize("target", list(TARGETS))
def test_the_column_names_of_output_files_are_read_as_labels(target: str) -> None:
    assert label_value({column_name(target, TARGETS[target].unit): "1.25"}, target) == 1.25


def test_in_se3t_output_the_inputs_references_win_over_its_predictions() -> None:
    output = {"HOMO [eV]": "-7.0", "homo_eV": "-6.0", "se3t_status": "ok"}  # a reference, a prediction
    assert label_value(output, "homo") == -7.0
    assert label_value({"homo_eV_input": "-7.0", "homo_eV": "-6.0", "se3t_status": "ok"}, "homo") == -7.0
    assert label_value({"homo_eV": "-6.0", "se3t_status": "ok"}, "homo") == -6.0  # no reference
    assert label_value({"homo_input": "-7.0"}, "homo") is None  # not se3t output: an unknown key
    assert not is_own_prediction(output, "homo")  # a reference beside the prediction
    assert is_own_prediction({"homo_eV": "-6.0", "se3t_status": "ok"}, "homo")
    assert not is_own_prediction({"homo_eV": "-6.0"}, "homo")  # anyone's file: a label


def test_predictions_written_as_sdf_evaluate_as_labels(
    tmp_path: Path, samples: Path, tiny_checkpoint
) -> None:
    """se3t predict -o out.sdf, then se3t evaluate --dataset out.sdf with the same model. The input's
    references (homo_eV, ..., kept in out.sdf as homo_eV_input) are the labels where the input had them:
    the scores equal those on the input itself. Targets without references are scored against se3t's
    predictions, so their errors are float32 rounding (positions of labelled data are float32, too)."""
    out = tmp_path / "out.sdf"
    model = ["--model", str(tiny_checkpoint), "--device", "cpu"]
    predicted = runner.invoke(app, ["predict", str(samples / "qm9_sample.sdf"), *model, "-o", str(out)])
    assert predicted.exit_code == 0, predicted.output
    targets = load_model(str(tiny_checkpoint)).targets
    referenced = [t for t in targets if t in SAMPLE_TAGS.values()]
    assert referenced  # homo and gap, whether the tiny model was trained on QM9 or on the samples

    def scores(path: Path, chosen) -> dict:
        args = ["evaluate", "--dataset", str(path), "--targets", ",".join(chosen), "--split", "all"]
        result = runner.invoke(app, [*args, "--json", *model])
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert report["n"] == 10
        return report["metrics"]

    on_output, on_input = scores(out, targets), scores(samples / "qm9_sample.sdf", referenced)
    written = list(Chem.SDMolSupplier(str(out), removeHs=False))
    for target, metrics in on_output.items():
        if target in referenced:
            assert metrics["mae"] == pytest.approx(on_input[target]["mae"], rel=1e-5), target
            continue
        tag = column_name(target, TARGETS[target].unit)
        scale = max(abs(float(mol.GetProp(tag))) for mol in written)
        assert metrics["mae"] <= 1e-6 * max(scale, 1.0), (target, metrics["mae"], scale)
    # the references are labels, not se3t's own predictions
    for target in referenced:
        assert not any(is_own_prediction(mol.GetPropsAsDict(), target) for mol in written)
    # predicted again from its own output: the references stay, the new predictions replace the old ones
    again = tmp_path / "again.sdf"
    assert runner.invoke(app, ["predict", str(out), *model, "-o", str(again)]).exit_code == 0
    rewritten = list(Chem.SDMolSupplier(str(again), removeHs=False))
    for first, second in zip(written, rewritten, strict=True):
        for target in referenced:
            tag = column_name(target, TARGETS[target].unit)
            reference = f"{tag}_input"
            assert second.GetProp(reference) == first.GetProp(reference)
            assert not second.HasProp(f"{reference}_input") and second.HasProp(tag)


def test_evaluate_scores_a_labelled_file_on_the_targets_it_carries(tmp_path: Path, samples: Path) -> None:
    """The sample SDF carries homo_eV, lumo_eV and gap_eV tags only: scored on those, every record, with
    a per-molecule file whose predictions are se3t predict's."""
    sdf = samples / "qm9_sample.sdf"
    out = tmp_path / "per_molecule.csv"
    args = ["evaluate", "--model", "qm9-default", "--dataset", str(sdf), "--targets", "homo,lumo,gap"]
    result = runner.invoke(
        app, [*args, "--split", "all", "--predictions", str(out), "--json", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["n"] == 10 and set(report["metrics"]) == {"homo", "lumo", "gap"}
    assert all(m["r2"] is not None and m["r2"] <= 1 and m["n"] == 10 for m in report["metrics"].values())
    rows = list(csv.DictReader(out.open()))
    assert [int(r["record"]) for r in rows] == list(range(1, 11))
    loaded = load_model("qm9-default")
    expected = [v for _, v in predict_stream(loaded, read_molecules([sdf]), torch.device("cpu"))]
    # Labelled data keeps float32 positions (as the QM9 cache does); predict centres float64 ones. At
    # methane's symmetric geometry the bundled model is that sensitive (0.7 meV here), elsewhere ~1e-6 eV.
    for row, values in zip(rows, expected, strict=True):
        assert float(row["homo_predicted_eV"]) == pytest.approx(values["homo"], abs=1e-3)
    errors = [abs(float(r["homo_eV"]) - float(r["homo_predicted_eV"])) for r in rows]
    assert report["metrics"]["homo"]["mae"] == pytest.approx(sum(errors) / 10)


def test_evaluate_says_which_labels_a_file_lacks(samples: Path) -> None:
    args = [
        "evaluate",
        "--model",
        "qm9-default",
        "--dataset",
        str(samples / "qm9_sample.sdf"),
        "--split",
        "all",
    ]
    result = runner.invoke(app, [*args, "--targets", "homo,alpha"])
    assert result.exit_code == 2, result.output
    assert "carry all of homo, alpha" in result.stderr and "Traceback" not in result.output


@pytest.mark.parametrize("json_output", [False, True])
def test_evaluate_says_where_the_plots_went(tmp_path: Path, samples: Path, json_output: bool) -> None:
    """On standard output after the table; with --json on stderr, so that standard output stays JSON."""
    pytest.importorskip("matplotlib")
    folder = tmp_path / "plots"
    args = ["evaluate", "--model", "qm9-default", "--dataset", str(samples / "qm9_sample.sdf")]
    args += ["--targets", "homo,gap", "--split", "all", "--plots", str(folder), "--device", "cpu"]
    result = runner.invoke(app, [*args, *(["--json"] if json_output else [])])
    assert result.exit_code == 0, result.output
    said = f"parity plots written to {folder}: parity_homo.png, parity_gap.png"
    assert said in (result.stderr if json_output else result.stdout).splitlines()
    if json_output:
        assert json.loads(result.stdout)["n"] == 10
    assert sorted(path.name for path in folder.iterdir()) == ["parity_gap.png", "parity_homo.png"]


def test_labels_given_twice_with_different_values_are_a_conflict() -> None:
    from se3tcli.data.labels import label_conflict
    from se3tcli.targets import HARTREE_TO_EV

    same = {"homo": "-6.0", "HOMO [Ha]": repr(-6.0 / HARTREE_TO_EV)}  # one value in two units
    assert label_conflict(same, "homo") is None and label_value(same, "homo") == -6.0
    differing = {"HOMO [eV]": "-5.9", "homo": "-6.1"}
    assert label_value(differing, "homo") == -6.1  # the exact name wins
    assert label_conflict(differing, "homo") == "homo -6.1, HOMO [eV] -5.9 eV"
    # se3t's own output: its prediction beside the input's reference is no conflict
    assert label_conflict({"homo_eV_input": "-7.0", "homo_eV": "-6.0", "se3t_status": "ok"}, "homo") is None
    assert label_conflict({"gap": "7"}, "homo") is None


def test_reading_a_file_with_conflicting_labels_says_so(tmp_path: Path, caplog) -> None:
    import logging

    from se3tcli.data.dataset import read_labelled_file
    from se3tcli.notices import NOTICES

    frames = "".join(
        f"2\nhomo={-6.0 - i} HOMO_eV={-6.0 - i + (0.5 if i == 1 else 0.0)} name=m{i}\nH 0 0 0\nH 0 0 0.74\n"
        for i in range(4)
    )
    (path := tmp_path / "twice.extxyz").write_text(frames)
    with caplog.at_level(logging.WARNING, logger=NOTICES.name):
        data = read_labelled_file(path, ("homo",))
    assert data.targets[:, 0].tolist() == [-6.0, -7.0, -8.0, -9.0]
    (message,) = [r.getMessage() for r in caplog.records if "several keys" in r.getMessage()]
    assert "1 record(s) give homo" in message and "record 2: homo -7, HOMO_eV -6.5 eV" in message
