"""Checkpoints: what a trained checkpoint holds, and every kind of bad file refused with one line."""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from se3tcli import checkpoint as checkpoint_module
from se3tcli.checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    CheckpointError,
    load_model,
    read_checkpoint,
    sha256_of,
)
from se3tcli.cli import app
from se3tcli.targets import TARGETS

runner = CliRunner()


# ------------------------------------------------------------------------------------- what a file holds


def test_checkpoint_loads_with_weights_only_and_holds_everything(tiny_checkpoint: Path) -> None:
    data = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    assert data["format"] == FORMAT and data["version"] == FORMAT_VERSION
    for key in ("config", "state_dict", "normalization", "atom_refs", "targets", "elements", "training"):
        assert key in data, key
    config = data["config"]
    assert list(data["targets"]) == list(config["targets"])
    assert data["targets"] == {t: TARGETS[t].unit for t in config["targets"]}  # targets with their units
    assert data["elements"] == list(config["elements"]) == [1, 6, 7, 8, 9]
    assert data["state_dict"] and all(isinstance(v, torch.Tensor) for v in data["state_dict"].values())
    assert {"mean", "std", "loss_scale"} <= set(data["normalization"])
    assert set(data["normalization"]["mean"]) == set(config["targets"])
    for target, refs in data["atom_refs"].items():  # per element, for the targets that have them
        assert target in config["targets"] and len(refs) == len(data["elements"])
    training = data["training"]
    assert {"options", "data", "domain", "epochs_done", "se3t_version", "torch_version"} <= set(training)
    assert training["epochs_done"] == 1 and "val" in data["metrics"]
    # The model rebuilt from the file has exactly the stored weights.
    loaded = load_model(str(tiny_checkpoint))
    state = loaded.model.state_dict()
    assert state.keys() == data["state_dict"].keys()
    assert all(torch.equal(state[k], data["state_dict"][k]) for k in state)


def test_last_checkpoint_carries_the_resume_state(tiny_run: Path) -> None:
    data = torch.load(tiny_run / "last.pt", map_location="cpu", weights_only=True)
    resume = data["resume"]
    for key in ("optimizer", "scheduler", "torch_rng", "epoch", "batch_in_epoch", "step", "best_val"):
        assert key in resume, key
    assert resume["epoch"] == 1 and resume["batch_in_epoch"] == 0
    assert "resume" not in torch.load(tiny_run / "best.pt", weights_only=True)


# ----------------------------------------------------------------------------------------- refused files


class _RunsShell:
    """Unpickling this would run a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"echo pwned > '{self.marker}'",)


def _bad_file(kind: str, folder: Path, good: Path) -> Path:
    path = folder / f"{kind}.pt"
    if kind == "foreign_dict":
        torch.save({"a": 1}, path)
    elif kind == "plain_state_dict":  # a torch model's weights, but no se3t checkpoint
        torch.save(torch.nn.Linear(2, 2).state_dict(), path)
    elif kind == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind == "random_bytes":
        path.write_bytes(random.Random(0).randbytes(4096))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "code_pickle_torch":  # torch's zip format whose data.pkl calls os.system
        torch.save({"format": FORMAT, "payload": _RunsShell(folder / "marker")}, path)
    elif kind == "code_pickle_raw":  # a bare pickle (torch's legacy format) calling os.system
        path.write_bytes(pickle.dumps(_RunsShell(folder / "marker"), protocol=2))
    elif kind == "wrong_version":
        data = torch.load(good, weights_only=True)
        torch.save(data | {"version": FORMAT_VERSION + 1}, path)
    elif kind == "missing_state_dict":
        data = torch.load(good, weights_only=True)
        del data["state_dict"]
        torch.save(data, path)
    elif kind == "mismatched_weights":  # the config says one model, the weights belong to another
        data = torch.load(good, weights_only=True)
        data["config"] = data["config"] | {"channels": 2 * data["config"]["channels"]}
        torch.save(data, path)
    elif kind == "string_domain":  # predict reads the training domain of every checkpoint
        data = torch.load(good, weights_only=True)
        torch.save(data | {"training": {"domain": "QM9"}}, path)
    else:
        raise AssertionError(kind)
    return path


BAD_KINDS = (
    "foreign_dict",
    "plain_state_dict",
    "truncated",
    "random_bytes",
    "empty",
    "code_pickle_torch",
    "code_pickle_raw",
    "wrong_version",
    "missing_state_dict",
    "mismatched_weights",
    "string_domain",
)
# What the message must say, where it says more than "not a se3t checkpoint".
EXPECTED_REASON = {
    "truncated": "truncated or corrupt file",
    "string_domain": "'training.domain' is not a mapping",
}


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_checkpoint_is_refused_with_one_line(kind: str, tmp_path: Path, tiny_checkpoint: Path) -> None:
    path = _bad_file(kind, tmp_path, tiny_checkpoint)
    with pytest.raises(CheckpointError) as caught:
        load_model(str(path))
    message = str(caught.value)
    assert "\n" not in message and str(path) in message and len(message) < 400
    assert EXPECTED_REASON.get(kind, "") in message
    assert not (tmp_path / "marker").exists(), "unpickling executed code"


def test_resuming_from_a_model_without_training_state_says_so(tiny_run: Path, tmp_path: Path) -> None:
    run = shutil.copytree(tiny_run, tmp_path / "run")
    shutil.copy(run / "best.pt", run / "last.pt")  # best.pt holds the weights, not the optimizer etc.
    result = runner.invoke(app, ["train", "--out", str(run), "--resume"])
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert "no training state to resume from" in line and "--init-from" in line


@pytest.mark.parametrize("kind", ["foreign_dict", "truncated", "random_bytes", "code_pickle_torch"])
def test_cli_refuses_bad_checkpoint(kind: str, tmp_path: Path, tiny_checkpoint: Path, samples: Path) -> None:
    path = _bad_file(kind, tmp_path, tiny_checkpoint)
    result = runner.invoke(app, ["predict", str(samples / "qm9_sample.sdf"), "--model", str(path)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and path.name in lines[0]
    assert "Traceback" not in result.output and result.stdout == ""
    assert not (tmp_path / "marker").exists()


def test_a_foreign_pickle_is_refused_without_torch_warnings(tmp_path: Path) -> None:
    """torch warns about pickle protocols it does not write; the one-line error says all there is."""
    path = _bad_file("code_pickle_raw", tmp_path, tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(CheckpointError, match="not a loadable se3t checkpoint"):
            read_checkpoint(path)
    assert [str(w.message) for w in caught] == [] and not (tmp_path / "marker").exists()


def test_code_pickle_is_really_dangerous(tmp_path: Path) -> None:
    """The control for the two tests above: loading the crafted file without weights_only runs the command."""
    path = _bad_file("code_pickle_raw", tmp_path, tmp_path)
    with open(path, "rb") as handle:
        pickle.load(handle)  # noqa: S301 - deliberately, on our own file
    assert (tmp_path / "marker").exists()


def test_missing_checkpoint_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint file or bundled model"):
        load_model(str(tmp_path / "absent.pt"))
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        read_checkpoint(tmp_path / "absent.pt")
    for empty in ("", "  "):  # e.g. --model "$UNSET_VARIABLE": never the default model in silence
        with pytest.raises(CheckpointError, match="empty model name"):
            load_model(empty)


# -------------------------------------------------------------------------------------- bundled models


@pytest.fixture
def bundled(tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A bundled-model folder holding ``tiny.pt`` and its model card, installed in place of models/."""
    folder = tmp_path / "models"
    folder.mkdir()
    path = folder / "tiny.pt"
    shutil.copyfile(tiny_checkpoint, path)
    card = {"name": "tiny", "checkpoint": {"file": path.name, "sha256": sha256_of(path)}}
    (folder / "tiny.json").write_text(json.dumps(card))
    monkeypatch.setattr(checkpoint_module, "bundled_models", lambda: {"tiny": path})
    return path


def test_bundled_model_with_matching_hash_loads(bundled: Path) -> None:
    loaded = load_model("tiny")
    assert loaded.path == bundled and loaded.card["name"] == "tiny"


def _flip_byte(path: Path, position: int) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 0x01
    path.write_bytes(bytes(data))


def test_tampered_bundled_model_is_refused(bundled: Path, samples: Path) -> None:
    _flip_byte(bundled, bundled.stat().st_size // 2)
    with pytest.raises(CheckpointError) as caught:
        load_model("tiny")
    message = str(caught.value)
    assert "sha256" in message and str(bundled) in message and "\n" not in message
    result = runner.invoke(app, ["predict", str(samples / "qm9_sample.sdf"), "--model", "tiny"])
    assert result.exit_code == 2
    assert "sha256" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output


def test_bundled_model_without_hash_is_refused(bundled: Path) -> None:
    bundled.with_suffix(".json").write_text(json.dumps({"name": "tiny", "checkpoint": {}}))
    with pytest.raises(CheckpointError, match="no sha256"):
        load_model("tiny")
    bundled.with_suffix(".json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable model card"):
        load_model("tiny")
