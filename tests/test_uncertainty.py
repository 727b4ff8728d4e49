"""The uncertainty head: calibration arithmetic, the head's invariance, its fit and calibration on tiny
data, and its plumbing through export, predict (table, files, low-confidence warnings) and fine-tuning."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, random_molecule, tiny_train_options
from e3nn import o3
from typer.testing import CliRunner

from se3tcli.checkpoint import load_model, model_from_checkpoint, read_checkpoint
from se3tcli.cli import app
from se3tcli.data.labels import label_value
from se3tcli.equivariance import _predict, check_equivariance
from se3tcli.graph import collate
from se3tcli.model.config import ModelConfig
from se3tcli.model.heads import atom_invariants
from se3tcli.model.transformer import SE3Transformer
from se3tcli.predict import low_confidence_thresholds
from se3tcli.render import predictions_table
from se3tcli.targets import sigma_key
from se3tcli.train import labelled_for_checkpoint
from se3tcli.train.calibration import calibration_metrics, fit_calibration, miscalibration_area, spearman
from se3tcli.train.uncertainty import fit_uncertainty

runner = CliRunner()


# ----------------------------------------------------------------------------- calibration arithmetic


def test_normal_errors_with_their_true_sigma_are_calibrated():
    rng = np.random.default_rng(0)
    sigma = rng.uniform(0.1, 2.0, 40_000)
    errors = rng.normal(0.0, sigma)
    m = calibration_metrics(errors, sigma)
    assert m["within_1_sigma"] == pytest.approx(0.683, abs=0.01)
    assert m["within_2_sigma"] == pytest.approx(0.954, abs=0.01)
    assert m["miscalibration_area"] < 0.01
    assert m["spearman"] > 0.3  # larger sigmas do go with larger errors
    # sigmas twice too large: the fitted factor halves them, and the area was large before
    assert fit_calibration(errors, 2 * sigma) == pytest.approx(0.5, rel=0.03)
    assert miscalibration_area(errors, 2 * sigma) > 0.15
    assert miscalibration_area(errors, 10 * sigma) > 0.4


def test_miscalibration_area_by_hand():
    # every |error| exactly 1 sigma: coverage 0 below z = 1 (p < 0.683), 1 from there on
    errors, sigma = np.ones(10), np.ones(10)
    p = np.linspace(0.01, 0.99, 99)
    expected = np.where(p < 0.6827, p, 1 - p).mean()
    assert miscalibration_area(errors, sigma) == pytest.approx(expected, abs=0.006)


def test_zero_sigmas_empty_and_not_finite_inputs():
    m = calibration_metrics(np.array([0.0, 0.5, 1.0]), np.array([0.0, 0.0, 2.0]))
    assert m["within_1_sigma"] == pytest.approx(2 / 3)  # 0/0: inside; 0.5/0: outside
    with pytest.raises(ValueError, match="no errors"):
        calibration_metrics(np.zeros(0), np.zeros(0))
    assert spearman(np.array([1.0, np.nan, 3.0]), np.array([1.0, 2.0, 3.0])) is None


def test_spearman_by_hand():
    assert spearman(np.array([1, 2, 3, 4.0]), np.array([10, 20, 30, 40.0])) == pytest.approx(1.0)
    assert spearman(np.array([1, 2, 3, 4.0]), np.array([4, 3, 2, 1.0])) == pytest.approx(-1.0)
    # ties get their average rank: ranks (0.5, 0.5, 2, 3) against (0, 1, 2, 3)
    a, b = np.array([1, 1, 2, 3.0]), np.array([1, 2, 3, 4.0])
    ra, rb = np.array([0.5, 0.5, 2, 3]), np.arange(4.0)
    expected = np.corrcoef(ra, rb)[0, 1]
    assert spearman(a, b) == pytest.approx(expected)
    assert spearman(np.ones(5), np.arange(5.0)) is None
    assert spearman(np.ones(1), np.ones(1)) is None


# ----------------------------------------------------------------------------- the head


def _model_with_head(targets=("mu", "homo", "U0"), dtype=torch.float64) -> SE3Transformer:
    config = ModelConfig(targets=targets, uncertainty_hidden=16, **TINY)
    model = SE3Transformer(config).to(dtype).eval()
    torch.manual_seed(3)
    for p in model.uncertainty.parameters():
        torch.nn.init.normal_(p, std=0.5)
    model.uncertainty.loss_scale.copy_(torch.tensor([0.5, 0.2, 1.5]))
    model.uncertainty.calibration.copy_(torch.tensor([1.2, 0.8, 2.0]))
    return model


def test_head_gives_a_positive_sigma_per_target_that_grows_with_size_for_extensive_ones():
    model = _model_with_head()
    rng = np.random.default_rng(1)
    small = random_molecule(rng, 4)
    large = (np.tile(small[0], 4), np.concatenate([small[1] + [8.0 * k, 0, 0] for k in range(4)]))
    with torch.no_grad():
        out = model(collate([small, large], model.config.cutoff).to("cpu", torch.float64))
    for t in ("mu", "homo", "U0"):
        assert bool((out[sigma_key(t)] > 0).all())
    # four far-apart copies: the extensive U0's sigma adds up (but for the floor added once per molecule),
    # the intensive homo's stays
    assert float(out["U0_sigma"][1]) == pytest.approx(4 * float(out["U0_sigma"][0]), rel=1e-4)
    assert float(out["homo_sigma"][1]) == pytest.approx(float(out["homo_sigma"][0]), rel=1e-6)


def test_novelty_adds_its_sigma_per_unit_beyond_the_training_percentile():
    model = _model_with_head()
    head = model.uncertainty
    n_features = head.feature_mean.shape[1]
    batch = collate([random_molecule(np.random.default_rng(5), 5)], model.config.cutoff).to(
        "cpu", torch.float64
    )
    with torch.no_grad():
        plain = model(batch)
        head.whitening.copy_(torch.eye(n_features).expand_as(head.whitening))  # distance = |x| / sqrt(F)
        h, element = model.features(batch)
        invariants = atom_invariants(h, model.config.lmax)  # what the head reads
        largest = float((invariants.norm(dim=1) / n_features**0.5).max())
        head.novelty_scale.fill_(largest / 3.0)  # the molecule's novelty: 3
        assert float(head.novelty(invariants, element, batch)[0]) == pytest.approx(3.0, rel=1e-6)
        unchanged = model(batch)  # no novelty_sigma yet: sigma as before
        assert all(torch.equal(unchanged[k], plain[k]) for k in plain)
        head.novelty_sigma.copy_(torch.tensor([0.1, 0.2, 0.3]))
        widened = model(batch)
    for i, t in enumerate(("mu", "homo", "U0")):
        extra = float(widened[sigma_key(t)][0] - plain[sigma_key(t)][0])
        assert extra == pytest.approx(2.0 * [0.1, 0.2, 0.3][i], rel=1e-6)  # (3 - 1) units past 1


def test_sigma_is_invariant_and_checked_by_check_equivariance():
    torch.backends.cuda.matmul.allow_tf32 = False
    model = _model_with_head()
    model.uncertainty.whitening.copy_(torch.eye(model.uncertainty.whitening.shape[1]))
    model.uncertainty.novelty_scale.fill_(0.05)  # every atom novel: the novelty term counts too
    model.uncertainty.novelty_sigma.fill_(0.1)
    rng = np.random.default_rng(2)
    numbers, positions = random_molecule(rng, 7)
    outputs = _predict(model, numbers, positions, torch.float64, "cpu")
    assert {"mu_sigma", "homo_sigma", "U0_sigma"} <= set(outputs)
    rotation = o3.rand_matrix(dtype=torch.float64).numpy()
    perm = rng.permutation(len(numbers))
    moved = _predict(model, numbers[perm], (positions @ rotation.T + 3.0)[perm], torch.float64, "cpu")
    for t in ("mu", "homo", "U0"):
        np.testing.assert_allclose(moved[sigma_key(t)], outputs[sigma_key(t)], rtol=1e-10)
    mirrored = _predict(model, numbers, -positions, torch.float64, "cpu")
    np.testing.assert_allclose(mirrored["homo_sigma"], outputs["homo_sigma"], rtol=1e-10)
    results = check_equivariance(model, [("m", numbers, positions)], trials=1)
    assert all(r.passed for r in results)


def test_check_equivariance_fails_a_sigma_that_is_not_invariant():
    model = _model_with_head()
    head_forward = model.uncertainty.forward

    def tilted(h, element, batch):  # depends on the absolute x coordinates: not invariant
        out = head_forward(h, element, batch)
        out["homo_sigma"] = out["homo_sigma"] + batch.pos[:, 0].abs().sum()
        return out

    model.uncertainty.forward = tilted
    numbers, positions = random_molecule(np.random.default_rng(4), 6)
    results = check_equivariance(model, [("m", numbers, positions)], trials=1)
    assert not all(r.passed for r in results if r.transform == "rotation")


# ----------------------------------------------------------------------------- fit, export, predict


@pytest.fixture(scope="module")
def exported(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint exported with a fitted uncertainty head (``dest/tiny.pt``)."""
    dest = tmp_path_factory.mktemp("exported")
    args = ["export", str(tiny_checkpoint), "--name", "tiny", "--dest", str(dest), "--device", "cpu"]
    result = runner.invoke(app, [*args, "--uncertainty-epochs", "3"])
    assert result.exit_code == 0, result.output
    assert "uncertainty" in result.output
    return dest / "tiny.pt"


def test_fit_calibrates_every_target_and_reports_on_the_test_split(tiny_checkpoint: Path, caplog):
    data = read_checkpoint(tiny_checkpoint)
    model = model_from_checkpoint(data, tiny_checkpoint)
    labelled = labelled_for_checkpoint(data)
    epochs = []
    with caplog.at_level("WARNING", logger="se3tcli.notices"):
        report = fit_uncertainty(
            model,
            labelled,
            data["normalization"]["loss_scale"],
            torch.device("cpu"),
            epochs=2,
            width=8,
            on_epoch=lambda e, loss: epochs.append((e, loss)),
        )
    assert any("only" in r.getMessage() and "validation molecules" in r.getMessage() for r in caplog.records)
    assert [e for e, _ in epochs] == [1, 2] and all(np.isfinite(loss) for _, loss in epochs)
    assert model.config.uncertainty_hidden == 8 and model.uncertainty is not None
    assert set(report["targets"]) == set(model.targets)
    assert report["scored_on"]["split"] == "test"
    assert report["scored_on"]["molecules"] == len(labelled.split["test"])
    assert report["fitted_on"]["train_molecules"] == len(labelled.split["train"])
    for m in report["targets"].values():
        assert m["calibration"] > 0 and np.isfinite(m["low_confidence_sigma"]) and m["novelty_sigma"] > 0
        assert 0 <= m["within_1_sigma"] <= m["within_2_sigma"] <= 1
        assert 0 <= m["miscalibration_area"] <= 0.5
    assert 0 <= report["scored_on"]["novel_fraction"] <= 1
    head = model.uncertainty  # every element has a distribution: its atoms', or all atoms' if it has none
    seen = {int(z) for i in labelled.split["train"] for z in labelled.data.molecule(int(i))[0]}
    assert bool((head.whitening.flatten(1).abs().sum(1) > 0).all()) and bool((head.novelty_scale > 0).all())
    unseen = [k for k, z in enumerate(model.config.elements) if z not in seen]
    for k in unseen[1:]:  # all on the same (all atoms') statistics
        assert torch.equal(head.whitening[k], head.whitening[unseen[0]])
    thresholds = low_confidence_thresholds(model)
    assert thresholds == pytest.approx({t: m["low_confidence_sigma"] for t, m in report["targets"].items()})


def test_export_writes_the_head_and_its_calibration_to_checkpoint_and_card(exported: Path):
    checkpoint = torch.load(exported, map_location="cpu", weights_only=True)
    assert checkpoint["config"]["uncertainty_hidden"] > 0
    assert any(k.startswith("uncertainty.") for k in checkpoint["state_dict"])
    card = json.loads(exported.with_suffix(".json").read_text())
    homo = card["test_errors"]["homo"]  # beside the published MAEs: the paper's and NVIDIA's
    assert (homo["paper_mae"], homo["nvidia_mae"]) == (35.0, 29.9)
    assert homo["beats_nvidia"] == (homo["mae"] < 29.9) and card["test_errors"]["gap"]["nvidia_mae"] is None
    shown = runner.invoke(app, ["info", str(exported)])
    assert shown.exit_code == 0 and "NVIDIA MAE" in shown.output and "29.9" in shown.output
    unc = card["uncertainty"]
    assert set(unc["targets"]) == set(checkpoint["targets"]) and unc["scored_on"]["split"] == "test"
    loaded = load_model(str(exported))
    head = loaded.model.uncertainty
    for i, t in enumerate(head.targets):
        assert float(head.calibration[i]) == pytest.approx(unc["targets"][t]["calibration"])
        assert float(head.threshold[i]) == pytest.approx(unc["targets"][t]["low_confidence_sigma"])


@pytest.mark.parametrize("source", ["trained", "exported"])
def test_export_without_uncertainty_has_no_head(tiny_checkpoint: Path, exported: Path, tmp_path, source):
    checkpoint = tiny_checkpoint if source == "trained" else exported  # exported: it had a head
    args = ["export", str(checkpoint), "--name", "plain", "--dest", str(tmp_path), "--no-uncertainty"]
    assert runner.invoke(app, [*args, "--device", "cpu"]).exit_code == 0
    loaded = load_model(str(tmp_path / "plain.pt"))
    assert loaded.model.uncertainty is None and loaded.model.config.uncertainty_hidden == 0
    assert json.loads((tmp_path / "plain.json").read_text())["uncertainty"] == {}


def test_predict_writes_a_sigma_beside_each_target_and_shows_it(exported: Path, samples: Path, tmp_path):
    out = tmp_path / "p.csv"
    result = runner.invoke(
        app, ["predict", str(samples / "qm9_sample.sdf"), "--model", str(exported), "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    with open(out) as handle:
        rows = list(csv.DictReader(handle))
    header = list(rows[0])
    targets = load_model(str(exported)).targets
    for t in targets:
        unit_column = next(c for c in header if c.startswith(f"{t}_") and "sigma" not in c)
        assert header[header.index(unit_column) + 1] == unit_column.replace(f"{t}_", f"{t}_sigma_", 1)
    sigmas = [float(r[c]) for r in rows for c in header if "_sigma_" in c]
    assert sigmas and all(s > 0 for s in sigmas)
    assert "±" in result.output
    # read back as labels, a sigma column never counts as the target's value
    row = rows[0]
    homo = next(c for c in header if c.startswith("homo_") and "sigma" not in c)
    assert label_value({k: row[k] for k in (homo, homo.replace("homo_", "homo_sigma_"))}, "homo") == float(
        row[homo]
    )
    assert label_value({homo.replace("homo_", "homo_sigma_"): row[homo]}, "homo") is None


def test_sigma_above_the_threshold_makes_a_low_confidence_warning(exported: Path, samples: Path, tmp_path):
    loaded = load_model(str(exported))
    loaded.model.uncertainty.threshold.zero_()  # every sigma is above it
    from se3tcli.io import read_molecules
    from se3tcli.predict import predict_stream

    rows = list(predict_stream(loaded, read_molecules([samples / "qm9_sample.xyz"]), torch.device("cpu")))
    assert rows and all(m.status == "warning" and "low confidence in" in m.message for m, _ in rows)
    loaded.model.uncertainty.threshold.fill_(float("inf"))
    rows = list(predict_stream(loaded, read_molecules([samples / "qm9_sample.xyz"]), torch.device("cpu")))
    assert not any("low confidence" in m.message for m, _ in rows)


def test_table_rounds_value_and_sigma_to_the_sigma_precision():
    from se3tcli.io import Molecule

    molecule = Molecule("m", "x", 0, np.array([6, 1]), np.zeros((2, 3)), {}, "ok")
    values = {"homo": -6.123456, "homo_sigma": 0.0834, "lumo": 1.5, "lumo_sigma": 1.26}
    table, _ = predictions_table([(molecule, values)], ["homo", "lumo"], {"homo": 0.1, "lumo": 0.1})
    cells = [list(column.cells)[0] for column in table.columns[3:]]
    assert cells == ["-6.123±0.083", "1.5±1.3"]
    from se3tcli.render import _cell

    cases = {
        (322.0, 1234.0): "300±1200",
        (-6.85, 0.0996): "-6.85±0.10",
        (-0.1, 20.0): "0±20",
        (-123456.789, 0.15): "-123456.79±0.15",
        (1.0, 1e-9): "1.000000±1e-09",
        (5.0, 0.0): "5.000",
    }
    for (value, sigma), text in cases.items():
        assert _cell({"homo": value, "homo_sigma": sigma}, "homo", 3) == text


def test_fine_tuning_drops_the_source_head(exported: Path, tmp_path: Path):
    from se3tcli.train import Trainer

    trained_on = read_checkpoint(exported)["training"]["data"]
    options = tiny_train_options(
        tmp_path / "ft",
        init_from=str(exported),
        targets=tuple(load_model(str(exported)).targets),
        model_overrides=None,
        dataset=trained_on["dataset"],
        limit=trained_on["limit"],
    )
    trainer = Trainer(options)
    trainer.setup()
    assert trainer.model.uncertainty is None and trainer.model.config.uncertainty_hidden == 0


def test_api_rows_carry_the_sigmas(exported: Path):
    import se3tcli as se3t

    model = se3t.load_model(str(exported), device="cpu")
    row = model.predict("CCO ethanol")[0]
    for t in model.targets:
        assert row.values[sigma_key(t)] > 0 and row.units[sigma_key(t)] == row.units[t]
    assert "homo_sigma_eV" in row.to_dict()


def test_info_shows_the_calibration_and_thresholds(exported: Path):
    result = runner.invoke(app, ["info", str(exported)], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    assert "uncertainty: test split" in result.output and "warn σ >" in result.output


def test_evaluate_scores_the_sigmas_and_writes_them(exported: Path, tmp_path: Path):
    out = tmp_path / "per_molecule.csv"
    args = ["evaluate", "--model", str(exported), "--split", "test", "--device", "cpu", "--predictions"]
    result = runner.invoke(app, [*args, str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    model = load_model(str(exported))
    assert set(report["uncertainty"]) == set(model.targets)
    card = json.loads(exported.with_suffix(".json").read_text())["uncertainty"]["targets"]
    for t, m in report["uncertainty"].items():  # the card's test-split numbers, reproduced
        assert m["within_1_sigma"] == pytest.approx(card[t]["within_1_sigma"])
        assert m["miscalibration_area"] == pytest.approx(card[t]["miscalibration_area"], abs=1e-9)
    with open(out) as handle:
        header = next(csv.reader(handle))
    homo = next(c for c in header if c.startswith("homo_") and "predicted" not in c and "sigma" not in c)
    assert header[header.index(homo) + 2] == homo.replace("homo_", "homo_sigma_", 1)
    table = runner.invoke(app, args[:-1], env={"COLUMNS": "120"})
    assert table.exit_code == 0 and "uncertainty: test split" in table.output and "warn" not in table.output


def test_novelty_of_an_element_with_few_atoms_stays_moderate():
    """Three training atoms span a plane of the 16 features: an atom off it, as far from their mean as they
    are, must not look a thousand times novel (the covariance is shrunk by F / (n + F))."""
    from se3tcli.train.uncertainty import _fit_novelty

    model = _model_with_head()
    head = model.uncertainty
    n_features = head.feature_mean.shape[1]
    rng = np.random.default_rng(0)
    plane = torch.from_numpy(rng.normal(size=(2, n_features)))
    few = torch.from_numpy(rng.normal(size=(3, 2))) @ plane  # element 0: 3 atoms in a plane
    many = torch.from_numpy(rng.normal(size=(400, n_features)))  # element 1: 400 atoms
    invariants = torch.cat([few, many]).to(head.whitening)
    element = torch.cat([torch.zeros(3), torch.ones(400)]).long()
    _fit_novelty(head, [(invariants, element, None, None)])
    off = torch.from_numpy(rng.normal(size=n_features)).to(head.whitening)
    off = off - (off @ plane.T.to(off)) @ torch.linalg.pinv(plane.T.to(off))  # off the plane
    off = few.mean(0).to(off) + off / off.norm() * (few - few.mean(0)).norm(dim=1).mean().to(off)
    novelty = head.atom_distances(off[None], torch.zeros(1, dtype=torch.long)) / head.novelty_scale[0]
    assert 0.1 < float(novelty) < 10
    # an element without training atoms takes the statistics of all atoms
    assert torch.allclose(head.feature_mean[2], invariants.mean(0).to(head.feature_mean), atol=1e-6)


def test_the_ase_calculator_gives_the_sigmas_and_predicts_status(exported: Path):
    from ase.build import molecule

    from se3tcli.calculator import SE3TCalculator

    atoms = molecule("CH3CH2OH")
    atoms.calc = SE3TCalculator(model=str(exported))
    atoms.get_dipole_moment()
    results = atoms.calc.results["se3t"]
    (row,) = load_model_api(exported).predict(atoms)
    for t in load_model(str(exported)).targets:
        value, unit = results[sigma_key(t)]
        assert value == pytest.approx(row.values[sigma_key(t)], rel=1e-6) and unit == results[t][1]
    assert (results["status"], results["message"]) == (row.status, row.message)


def load_model_api(path: Path):
    import se3tcli as se3t

    return se3t.load_model(str(path), device="cpu")


def test_two_symmetry_equivalent_training_atoms_do_not_make_everything_novel():
    """Two identical atoms of an element (the two N of one pyrazine): a nearby atom is not novel."""
    from se3tcli.train.uncertainty import _fit_novelty

    model = _model_with_head()
    head = model.uncertainty
    n_features = head.feature_mean.shape[1]
    rng = np.random.default_rng(1)
    twin = torch.from_numpy(rng.normal(size=n_features))
    many = torch.from_numpy(rng.normal(size=(400, n_features)))
    invariants = torch.cat([twin[None], twin[None] + 1e-6, many]).to(head.whitening)
    element = torch.cat([torch.zeros(2), torch.ones(400)]).long()
    _fit_novelty(head, [(invariants, element, None, None)])
    near = (twin + 0.1 * torch.from_numpy(rng.normal(size=n_features)) / n_features**0.5).to(head.whitening)
    novelty = head.atom_distances(near[None], torch.zeros(1, dtype=torch.long)) / head.novelty_scale[0]
    assert float(novelty) < 1
