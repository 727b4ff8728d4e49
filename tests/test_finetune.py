"""Fine-tuning (`se3t train --init-from`): which weights and statistics carry over, new targets with the
units the user gives, a frozen or slower encoder, and that fine-tuning on little data beats both the
pre-trained model and training from scratch.

The data are synthetic QM9-like molecules (H C N O F) with a smooth function of their geometry as label,
written as extXYZ files, so nothing here needs QM9.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_molecule
from typer.testing import CliRunner

from se3tcli.checkpoint import load_model, read_checkpoint
from se3tcli.cli import app
from se3tcli.data.dataset import load_labelled
from se3tcli.data.labels import label_value
from se3tcli.elements import symbol
from se3tcli.model.config import ModelConfig
from se3tcli.targets import TARGETS, parse_train_targets
from se3tcli.train import Trainer, TrainOptions, predict_arrays

runner = CliRunner()
# A new intensive target (a solubility-like number) and a new extensive one (an energy), used by every
# test that defines them: a process knows each name with one unit only.
SOL = {"unit": "log(mol/L)", "extensive": False}
HF = {"unit": "eV", "extensive": True}
_WEIGHT = {1: 0.2, 6: -0.4, 7: 0.1, 8: 0.6, 9: 0.9}  # per element, for the synthetic labels


def _molecules(n: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [random_molecule(rng, int(rng.integers(4, 11))) for _ in range(n)]


def _property(numbers: np.ndarray, positions: np.ndarray) -> float:
    """A smooth invariant of the geometry: the mean over atoms of an element weight plus the weights of
    the neighbours at about 1.2 Å."""
    weight = np.array([_WEIGHT[int(z)] for z in numbers])
    distance = np.linalg.norm(positions[:, None] - positions[None], axis=-1)  # [n, n] Å
    contact = np.exp(-((distance - 1.2) ** 2))
    np.fill_diagonal(contact, 0.0)
    return float(np.mean(weight + contact @ weight))


def _write_extxyz(path: Path, molecules, labels: dict[str, list[float]]) -> Path:
    with open(path, "w") as handle:
        for i, (numbers, positions) in enumerate(molecules):
            info = " ".join(f"{key}={float(values[i])!r}" for key, values in labels.items())
            handle.write(f"{len(numbers)}\nname=m{i} {info} Properties=species:S:1:pos:R:3\n")
            for z, xyz in zip(numbers, positions, strict=True):
                handle.write(f"{symbol(int(z))} {' '.join(repr(float(c)) for c in xyz)}\n")
    return path


def _labelled_file(path: Path, n: int, seed: int, **targets) -> Path:
    """``n`` molecules labelled with ``target=function(property)`` for each keyword."""
    molecules = _molecules(n, seed)
    values = [_property(*m) for m in molecules]
    sizes = [len(m[0]) for m in molecules]
    labels = {
        name: [function(v, size) for v, size in zip(values, sizes, strict=True)]
        for name, function in targets.items()
    }
    return _write_extxyz(path, molecules, labels)


def _options(dataset: Path, out: Path, tiny: dict, **changes) -> TrainOptions:
    settings = dict(
        dataset=str(dataset),
        targets=("homo",),
        model_overrides=dict(tiny),
        batch_size=16,
        lr=5e-3,
        warmup_epochs=0.5,
        device="cpu",
        seed=0,
        out=str(out),
    )
    return TrainOptions(**(settings | changes))


def _trained(options: TrainOptions) -> Trainer:
    trainer = Trainer(options)
    trainer.setup()
    assert trainer.run()["status"] == "finished"
    return trainer


def _mae(model, path: Path, target: str = "homo") -> float:
    """MAE of ``model`` on every molecule of a labelled file."""
    labelled = load_labelled(str(path), (target,), seed=0)
    every = np.arange(len(labelled.data))
    pred = predict_arrays(model, labelled.data, every, 256, torch.device("cpu"))[target]
    return float(np.abs(pred - labelled.data.targets[:, 0]).mean())


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory, tiny: dict) -> Path:
    """``best.pt`` of the tiny model trained on 400 molecules for homo (the synthetic property, in eV)
    and gap (its double plus one)."""
    folder = tmp_path_factory.mktemp("pretrained")
    data = _labelled_file(folder / "pre.extxyz", 400, seed=1, homo=lambda v, n: v, gap=lambda v, n: 2 * v + 1)
    _trained(_options(data, folder / "run", tiny, targets=("homo", "gap"), epochs=40))
    return folder / "run" / "best.pt"


# ------------------------------------------------------------------------------------- the target list


def test_train_targets_parse_known_names_in_any_case_and_new_ones_with_a_unit() -> None:
    names, new = parse_train_targets("HOMO, logS:log(mol/L), hf:kcal/mol:extensive, homo", ("homo", "gap"))
    assert names == ("homo", "logS", "hf")
    assert new == {
        "logS": {"unit": "log(mol/L)", "extensive": False},
        "hf": {"unit": "kcal/mol", "extensive": True},
    }
    assert parse_train_targets("all", ("homo", "gap")) == (("homo", "gap"), {})
    assert parse_train_targets("mine", ("homo",)) == (("mine",), {})  # may be the --init-from model's
    for spec, message in [
        ("logS:", "needs a unit"),
        ("logS:a:b:c", "NAME:UNIT or NAME:UNIT:extensive"),
        ("logS:a:sum", "NAME:UNIT or NAME:UNIT:extensive"),
        ("gap:eV", "QM9's 'gap'"),
        ("log_S:1", "letter followed by letters and digits"),
        ("x:a,x:b", "defined twice"),
        (" , ", "no target given"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_train_targets(spec, ("homo", "gap"))


def test_a_config_records_new_targets_and_the_process_knows_their_units() -> None:
    config = ModelConfig(targets=("homo", "sol"), user_targets={"sol": SOL})
    assert ModelConfig.from_json(config.to_json()) == config
    assert TARGETS["sol"].unit == "log(mol/L)" and not TARGETS["sol"].extensive
    assert TARGETS["sol"].error_unit == "log(mol/L)" and TARGETS["sol"].error_factor == 1.0
    with pytest.raises(ValueError, match="already defined in log"):
        ModelConfig(targets=("sol",), user_targets={"sol": {"unit": "mol/L", "extensive": False}})
    with pytest.raises(ValueError, match="unknown targets"):
        ModelConfig(targets=("homo", "undefined"))
    # A label key may name the new target with its own unit, spelled as defined or as output columns do.
    assert label_value({"sol [log(mol/L)]": "-2.5"}, "sol") == -2.5
    assert label_value({"sol_log_mol_per_L": "-2.5"}, "sol") == -2.5
    assert label_value({"sol [mol/L]": "0.003"}, "sol") is None  # another unit is never read as this one


# ------------------------------------------------------------------------------------- what carries over


def test_fine_tuning_keeps_the_encoder_and_known_heads_and_adds_new_ones(
    tmp_path: Path, pretrained: Path, tiny: dict, samples: Path
) -> None:
    """homo keeps its output row and normalisation; gap, which the run does not ask for, is dropped; sol
    (intensive) and hf (extensive) get new rows normalised on this run's training split, hf with atom
    references. The checkpoint alone then gives their units to a fresh process."""
    data = _labelled_file(
        tmp_path / "mine.extxyz",
        50,
        seed=2,
        homo=lambda v, n: v,
        sol=lambda v, n: 3 * v - 2,
        hf=lambda v, n: v * n,
    )
    options = _options(
        data,
        tmp_path / "ft",
        tiny,
        targets=("homo", "sol", "hf"),
        user_targets={"sol": SOL, "hf": HF},
        init_from=str(pretrained),
        epochs=2,
        model_overrides=None,
    )
    trainer = Trainer(options)
    trainer.setup()
    source = read_checkpoint(pretrained)
    start = trainer.model.state_dict()
    assert trainer.config == ModelConfig.from_dict(source["config"]).replace(
        targets=("homo", "sol", "hf"), user_targets={"sol": SOL, "hf": HF}
    )
    for key, value in source["state_dict"].items():
        if not key.startswith("readout.") or key.startswith("readout.mlp.0"):  # encoder, hidden layer
            assert torch.equal(start[key], value), key
    homo_row = ModelConfig.from_dict(source["config"]).targets.index("homo")  # no dipole head: row order
    assert torch.equal(
        start["readout.mlp.2.weight"][0], source["state_dict"]["readout.mlp.2.weight"][homo_row]
    )
    assert torch.equal(start["readout.mlp.2.bias"][0], source["state_dict"]["readout.mlp.2.bias"][homo_row])
    stats = trainer.statistics
    for part in ("mean", "std", "loss_scale"):
        assert stats[part]["homo"] == source["normalization"][part]["homo"]
        assert "gap" not in stats[part]
    train = trainer.labelled.split["train"]
    sol_column = trainer.labelled.data.target_names.index("sol")
    assert stats["mean"]["sol"] == pytest.approx(trainer.labelled.data.targets[train, sol_column].mean())
    assert "hf" in stats["atom_refs"] and "sol" not in stats["atom_refs"]
    assert trainer.run()["status"] == "finished"

    best = tmp_path / "ft" / "best.pt"
    saved = torch.load(best, map_location="cpu", weights_only=True)
    assert saved["targets"] == {"homo": "eV", "sol": "log(mol/L)", "hf": "eV"}
    assert saved["config"]["user_targets"] == {"sol": SOL, "hf": HF}
    # A new process knows sol and hf from the checkpoint alone.
    evaluated = subprocess.run(
        [sys.executable, "-m", "se3tcli", "evaluate", "--model", str(best), "--json", "--split", "all"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert evaluated.returncode == 0, evaluated.stderr
    metrics = json.loads(evaluated.stdout)["metrics"]
    assert metrics["sol"]["unit"] == metrics["sol"]["error_unit"] == "log(mol/L)"
    assert metrics["hf"]["unit"] == "eV" and metrics["homo"]["error_unit"] == "meV"
    out = tmp_path / "predictions.csv"
    predicted = runner.invoke(
        app, ["predict", str(samples / "qm9_sample.sdf"), "--model", str(best), "-o", str(out)]
    )
    assert predicted.exit_code == 0, predicted.output
    assert out.read_text().splitlines()[0].endswith(",homo_eV,sol_log_mol_per_L,hf_eV")


def test_fine_tuning_without_targets_keeps_the_models_own(
    tmp_path: Path, pretrained: Path, tiny: dict
) -> None:
    """No --targets: the --init-from model's targets (homo and gap here), not all of QM9's."""
    data = _labelled_file(
        tmp_path / "mine.extxyz", 30, seed=3, homo=lambda v, n: v, gap=lambda v, n: 2 * v + 1
    )
    options = _options(data, tmp_path / "ft", tiny, init_from=str(pretrained), epochs=1, model_overrides=None)
    trainer = Trainer(options, given={"dataset", "init_from", "epochs"})
    trainer.setup()
    assert trainer.opts.targets == trainer.config.targets == ("homo", "gap")


def test_a_frozen_encoder_stays_and_a_lower_encoder_rate_is_its_own_group(
    tmp_path: Path, pretrained: Path, tiny: dict
) -> None:
    data = _labelled_file(tmp_path / "mine.extxyz", 30, seed=3, homo=lambda v, n: v + 0.5)
    common = dict(init_from=str(pretrained), model_overrides=None, epochs=1)
    frozen = _trained(_options(data, tmp_path / "frozen", tiny, freeze_encoder=True, **common))
    source = read_checkpoint(pretrained)["state_dict"]
    after = frozen.model.state_dict()
    encoder = [key for key in source if not key.startswith("readout.") and after[key].is_floating_point()]
    assert encoder and all(torch.equal(after[key], source[key]) for key in encoder)
    assert not torch.equal(after["readout.mlp.0.weight"], source["readout.mlp.0.weight"])
    assert [len(group["params"]) for group in frozen.optimizer.param_groups] == [4]  # readout: 2 Linear

    slower = Trainer(_options(data, tmp_path / "slower", tiny, encoder_lr_factor=0.1, **common))
    slower.setup()
    readout, encoder_group = slower.optimizer.param_groups
    assert readout["initial_lr"] == 5e-3 and encoder_group["initial_lr"] == pytest.approx(5e-4)
    assert len(readout["params"]) + len(encoder_group["params"]) == len(list(slower.model.parameters()))
    slower.run_dir.unlock()

    with pytest.raises(ValueError, match="needs --init-from"):
        Trainer(_options(data, tmp_path / "random", tiny, freeze_encoder=True, epochs=1)).setup()


# ------------------------------------------------------------------------------------------ it pays off


def test_fine_tuning_on_little_data_beats_the_pretrained_model_and_training_from_scratch(
    tmp_path: Path, pretrained: Path, tiny: dict
) -> None:
    """The new data's labels are the pre-training property under another "method" (1.2 x + 0.5 eV, as
    one level of theory against another): 48 training molecules, 60 steps. From scratch, the tiny model
    learns little more than the labels' spread; the pre-trained one is off by the shift; fine-tuned, it is
    much better than both on 300 held-out molecules. Measured: MAE 0.13 eV fine-tuned, 0.40 from scratch,
    0.66 pre-trained (its MAE on its own property: 0.10); 0.15, 0.41, 0.67 with the norm nonlinearity."""
    shifted = dict(homo=lambda v, n: 1.2 * v + 0.5)
    data = _labelled_file(tmp_path / "few.extxyz", 60, seed=4, **shifted)
    held_out = _labelled_file(tmp_path / "held_out.extxyz", 300, seed=5, **shifted)
    budget = dict(epochs=20, ema_decay=0.9)
    scratch = _trained(_options(data, tmp_path / "scratch", tiny, **budget))
    tuned = _trained(
        _options(data, tmp_path / "tuned", tiny, init_from=str(pretrained), model_overrides=None, **budget)
    )
    assert tuned.step == scratch.step == 60
    errors = {
        "pretrained": _mae(load_model(str(pretrained)).model, held_out),
        "scratch": _mae(load_model(str(tmp_path / "scratch" / "best.pt")).model, held_out),
        "fine-tuned": _mae(load_model(str(tmp_path / "tuned" / "best.pt")).model, held_out),
    }
    assert errors["fine-tuned"] < 0.6 * min(errors["pretrained"], errors["scratch"]), errors


# --------------------------------------------------------------------------------------- the command line


def test_cli_fine_tunes_the_bundled_model_on_a_labelled_file(tmp_path: Path, labelled_sdf) -> None:
    """The issue's command: `--init-from qm9-default --targets homo,gap` on the user's file keeps the
    bundled model's settings, encoder and those two heads."""
    data = labelled_sdf(tmp_path / "labelled.sdf", n_rotated_copies=10)
    run = tmp_path / "run"
    args = ["train", "--dataset", str(data), "--init-from", "qm9-default", "--targets", "homo,gap"]
    args += ["--epochs", "1", "--batch-size", "8", "--lr", "1e-4", "--device", "cpu", "--out", str(run)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    bundled = load_model("qm9-default").model.config
    config = ModelConfig.from_dict(json.loads((run / "config.json").read_text())["model"])
    assert config == bundled.replace(targets=("homo", "gap"), uncertainty_hidden=0)  # no stale head
    assert read_checkpoint(run / "best.pt")["targets"] == {"homo": "eV", "gap": "eV"}


def _one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    return lines[0]


def test_cli_fine_tuning_usage_errors(tmp_path: Path, labelled_sdf) -> None:
    data = str(labelled_sdf(tmp_path / "labelled.sdf"))
    base = ["train", "--dataset", data, "--out", str(tmp_path / "run"), "--device", "cpu"]
    cases = [
        (["--init-from", "no-such-model", "--targets", "homo"], "no such checkpoint file or bundled model"),
        (
            ["--init-from", "qm9-default", "--targets", "homo", "--channels", "8"],
            "channels 8 (the checkpoint's: 32)",
        ),
        (["--init-from", "qm9-default", "--targets", "homo", "--preset", "base"], "drop --preset"),
        (["--targets", "homo", "--freeze-encoder"], "--freeze-encoder needs --init-from"),
        (["--targets", "homo,logS"], "unknown target 'logS'"),
        (["--targets", "homo,logS:"], "needs a unit"),
    ]
    for extra, message in cases:
        assert message in _one_line_error(runner.invoke(app, [*base, *extra])), extra
    qm9 = ["train", "--targets", "homo,sol:log(mol/L)", "--out", str(tmp_path / "q"), "--device", "cpu"]
    assert "QM9 has no target 'sol'" in _one_line_error(runner.invoke(app, qm9))
    assert not (tmp_path / "run").exists() and not (tmp_path / "q").exists()
