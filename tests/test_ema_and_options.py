"""The weight average (EMA) and the training options' resume rules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_train_options
from torch import nn

from se3tcli.checkpoint import read_checkpoint
from se3tcli.train import DEFAULT_EPOCHS, Trainer, TrainOptions
from se3tcli.train.ema import WeightAverage
from se3tcli.train.options import RESUME_MAY_CHANGE

# ------------------------------------------------------------------------------------------------ average


def test_the_average_follows_the_ramped_decay() -> None:
    """After n updates: average = d_n * average + (1 - d_n) * weights, d_n = min(decay, (1+n)/(10+n))."""
    model = nn.Linear(3, 2).double()
    average = WeightAverage(model, decay=0.5)
    expected = [p.detach().clone() for p in model.parameters()]
    for n in range(1, 6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        decay = min(0.5, (1 + n) / (10 + n))
        pairs = zip(expected, model.parameters(), strict=True)
        expected = [decay * e + (1 - decay) * p.detach() for e, p in pairs]
        average.update(model)
        assert average.current_decay() == decay
    for e, a in zip(expected, average.model.parameters(), strict=True):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-14)
    assert not any(p.requires_grad for p in average.model.parameters())
    assert average.state() == {"decay": 0.5, "updates": 5}


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.1])
def test_a_decay_outside_0_1_is_refused(decay: float) -> None:
    with pytest.raises(ValueError, match="EMA decay"):
        WeightAverage(nn.Linear(1, 1), decay)


@pytest.mark.usefixtures("require_qm9")
def test_checkpoints_hold_the_average_and_last_pt_the_live_weights_too(tmp_path: Path) -> None:
    trainer = Trainer(tiny_train_options(tmp_path / "run", ema_decay=0.9))
    trainer.setup()
    assert trainer.run()["status"] == "finished"
    last = read_checkpoint(tmp_path / "run" / "last.pt")
    average, live = trainer.ema.model.state_dict(), trainer.model.state_dict()
    for key, value in last["state_dict"].items():
        assert torch.equal(value, average[key]), key
        assert torch.equal(last["resume"]["training_weights"][key], live[key].cpu()), key
    differing = [k for k in average if not torch.equal(average[k], live[k])]
    assert differing, "after 6 steps the average must differ from the live weights"
    assert last["resume"]["ema"] == {"decay": 0.9, "updates": 6}
    by_size = last["training"]["domain"]["train_molecules_by_heavy_atoms"]
    assert sum(by_size.values()) == len(trainer.labelled.split["train"]) == 48


@pytest.mark.usefixtures("require_qm9")
def test_without_an_average_the_checkpoint_holds_the_live_weights(tmp_path: Path) -> None:
    trainer = Trainer(tiny_train_options(tmp_path / "run", ema_decay=0))
    trainer.setup()
    assert trainer.ema is None and trainer.run()["status"] == "finished"
    last = read_checkpoint(tmp_path / "run" / "last.pt")
    live = trainer.model.state_dict()
    assert all(torch.equal(v, live[k]) for k, v in last["state_dict"].items())
    assert "training_weights" not in last["resume"] and "ema" not in last["resume"]


# ------------------------------------------------------------------------------------------------ options


def _saved(**changes) -> dict:
    return TrainOptions(epochs=7, lr=1e-3, targets=("homo",), patience=3, **changes).to_dict()


def test_a_new_run_gets_the_default_epochs_without_changing_the_given_options() -> None:
    given = TrainOptions()
    assert given.for_new_run().epochs == DEFAULT_EPOCHS and given.epochs is None
    assert TrainOptions(epochs=3).for_new_run().epochs == 3


def test_a_resumed_run_keeps_its_own_options_and_takes_only_the_budget() -> None:
    command = TrainOptions(resume=True, time_limit=5.0, device="cpu", out="x")
    resumed = command.resumed(_saved())
    assert (resumed.lr, resumed.targets) == (1e-3, ("homo",))  # the run's own
    assert (resumed.time_limit, resumed.device, resumed.out) == (5.0, "cpu", "x")  # this command's
    assert (resumed.epochs, resumed.patience) == (7, 3)  # not given: the run's own schedule and patience
    assert TrainOptions(epochs=9, patience=1).resumed(_saved()).epochs == 9
    assert {"epochs", "time_limit", "device", "out"} <= RESUME_MAY_CHANGE
    assert not {"lr", "targets", "dataset", "seed", "ema_decay"} & RESUME_MAY_CHANGE


def test_a_resume_refuses_options_that_differ_from_the_run() -> None:
    """Given on the command line and different from the run's: an error naming each, not silence."""
    with pytest.raises(ValueError, match="differ") as refused:
        TrainOptions(resume=True, lr=1e-2, targets=("mu",)).resumed(_saved())
    assert "--lr 0.01 (the run's: 0.001)" in str(refused.value)
    assert "--targets mu (the run's: homo)" in str(refused.value)
    assert TrainOptions(resume=True, lr=1e-3, targets=("homo",)).resumed(_saved()).lr == 1e-3  # the same


def test_options_the_command_line_gave_are_checked_even_at_their_default_values() -> None:
    """--batch-size 64 (the default) on a run of batch 128 is a conflict when the command line gave it."""
    saved = _saved(batch_size=128)
    with pytest.raises(ValueError, match=r"--batch-size 64 \(the run's: 128\)"):
        TrainOptions(resume=True, batch_size=64).resumed(saved, given={"resume", "batch_size"})
    assert TrainOptions(resume=True).resumed(saved, given={"resume"}).batch_size == 128


def test_repeating_the_runs_own_command_on_resume_is_accepted() -> None:
    old = _saved(dataset="qm9", model_overrides={"lmax": 1})
    old["cutoff"] = 4.0  # an older run, which kept the cutoff among its options
    del old["ema_decay"]
    again = TrainOptions(dataset="QM9", model_overrides={"lmax": 1, "cutoff": 4.0}, amp=False, lr=1e-3)
    resumed = again.resumed(old, given={"dataset", "model_overrides", "amp", "lr"})
    assert resumed.amp is False and resumed.dataset == "qm9"  # amp: how a GPU runs the steps
    with pytest.raises(ValueError, match="the model settings"):
        TrainOptions(model_overrides={"lmax": 2}).resumed(old, given={"model_overrides"})


def test_a_run_saved_before_the_average_or_with_a_cutoff_option_resumes_as_it_was() -> None:
    old = _saved()
    del old["ema_decay"]
    old["cutoff"] = 4.0  # older runs kept the cutoff among the options
    old["model_overrides"] = {"lmax": 1}
    resumed = TrainOptions().resumed(old)
    assert resumed.ema_decay is None
    assert resumed.model_overrides == {"lmax": 1, "cutoff": 4.0}
    assert not hasattr(resumed, "cutoff")


def test_a_resume_keeps_the_runs_rare_size_floor_unless_it_gives_one() -> None:
    assert TrainOptions().for_new_run().rare_size_floor == 0.0
    assert TrainOptions(resume=True).resumed(_saved(rare_size_floor=0.002)).rare_size_floor == 0.002
    assert TrainOptions(rare_size_floor=0.001).resumed(_saved(rare_size_floor=0.002)).rare_size_floor == 0.001
    assert TrainOptions(rare_size_floor=0.0).resumed(_saved(rare_size_floor=0.002)).rare_size_floor == 0.0
    older = _saved()
    del older["rare_size_floor"]  # a run saved before the floor existed
    assert TrainOptions(resume=True).resumed(older).rare_size_floor == 0.0


def test_an_ema_decay_of_zero_means_no_average() -> None:
    assert TrainOptions(ema_decay=0).ema_decay is None
    assert TrainOptions().ema_decay == 0.999


# -------------------------------------------------------------------------------------- graph shapes


@pytest.mark.usefixtures("require_qm9")
def test_the_graph_shape_holds_every_fixed_size_batch_of_the_run(tmp_path: Path) -> None:
    """CUDA graphs pad the run's own fixed-size batches (so a run can switch to them on resume): their
    shape must hold the largest batch of every epoch, which the seeded orders give in advance."""
    trainer = Trainer(tiny_train_options(tmp_path / "run", epochs=3, batch_size=5))
    trainer.setup()
    data, train = trainer.labelled.data, trainer.labelled.split["train"]
    atoms = np.zeros(len(data), np.int64)
    edges = np.zeros(len(data), np.int64)
    atoms[train] = np.arange(len(train)) % 7 + 1  # any sizes will do
    edges[train] = (np.arange(len(train)) * 5) % 11
    most = trainer._largest_fixed_batch(atoms, edges)
    batches = [chunk for epoch in range(3) for chunk in trainer._epoch_batches(epoch)]
    assert most == (max(int(atoms[c].sum()) for c in batches), max(int(edges[c].sum()) for c in batches))


# --------------------------------------------------------------------------------------- one run, one folder


@pytest.mark.usefixtures("require_qm9")
def test_a_run_directory_takes_one_training_at_a_time(tmp_path: Path) -> None:
    """Two trainings in one --out used to interleave metrics.csv and mix config and checkpoints."""
    first = Trainer(tiny_train_options(tmp_path / "run"))
    first.setup()
    with pytest.raises(FileExistsError, match="in use by another se3t train"):
        Trainer(tiny_train_options(tmp_path / "run")).setup()  # no last.pt yet: a second new run
    assert first.run()["status"] == "finished"  # the lock goes with the run
    again = Trainer(TrainOptions(out=str(tmp_path / "run"), resume=True, device="cpu", epochs=3))
    again.setup()
    assert again.run()["status"] == "finished"
