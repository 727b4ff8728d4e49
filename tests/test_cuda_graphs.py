"""CUDA graphs: replays agree with the eager model (skipped without a CUDA device)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, random_molecule

from se3tcli.batching import StaticShape
from se3tcli.graph import collate
from se3tcli.model.config import preset
from se3tcli.model.transformer import SE3Transformer, UnsupportedElementError
from se3tcli.train import Trainer, TrainOptions, loss_fn, stacked_loss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
TARGETS = ("mu", "homo", "U0")


@pytest.fixture(autouse=True)
def _no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


def _batches(n_batches: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [
        collate([random_molecule(rng, int(rng.integers(2, 15))) for _ in range(int(rng.integers(1, 9)))], 5.0)
        for _ in range(n_batches)
    ]


def _model() -> SE3Transformer:
    torch.manual_seed(0)
    return SE3Transformer(preset("small", lmax=2, n_layers=2, targets=TARGETS)).cuda()


SHAPE = StaticShape(n_atoms=130, n_edges=1600, n_mol=9)


def test_graphed_inference_matches_the_eager_model() -> None:
    from se3tcli.cuda_graphs import GraphedInference

    model = _model().eval()
    graphed = GraphedInference(model, SHAPE)
    for batch in _batches(5):
        with torch.no_grad():
            eager = model(batch.to("cuda"))
        replayed = graphed(batch)
        assert set(replayed) == set(eager)
        for name, value in eager.items():
            torch.testing.assert_close(replayed[name], value, rtol=1e-5, atol=1e-5)
    bad = collate([(np.array([26, 1]), np.array([[0.0, 0, 0], [1.6, 0, 0]]))], 5.0)
    with pytest.raises(UnsupportedElementError):
        graphed(bad)


def test_graphed_training_gives_the_eager_loss_and_gradients() -> None:
    from se3tcli.cuda_graphs import GraphedTraining

    model = _model().train()
    graphed = GraphedTraining(model, SHAPE, TARGETS, amp=False)
    scale = torch.ones(len(TARGETS), dtype=torch.float64, device="cuda")
    for batch in _batches(4, seed=1):
        y = torch.randn(batch.n_mol, len(TARGETS), dtype=torch.float64, device="cuda")
        model.zero_grad(set_to_none=True)
        eager_loss = loss_fn(model(batch.to("cuda")), y, TARGETS, scale)
        eager_loss.backward()
        eager = {k: p.grad.clone() for k, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        loss = stacked_loss(graphed.predict(batch)[: batch.n_mol], y, scale)
        loss.backward()
        torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
        for key, grad in eager.items():
            torch.testing.assert_close(dict(model.named_parameters())[key].grad, grad, rtol=1e-4, atol=1e-5)


@pytest.mark.usefixtures("require_qm9")
def test_trainer_runs_with_cuda_graphs(tmp_path: Path) -> None:
    trainer = Trainer(
        TrainOptions(
            targets=TARGETS,
            model_overrides=dict(TINY),
            epochs=2,
            batch_size=16,
            limit=200,
            device="cuda",
            cuda_graphs=True,
            out=str(tmp_path / "run"),
        )
    )
    trainer.setup()
    result = trainer.run()
    assert result["status"] == "finished" and trainer.graphed is not None
    assert all(np.isfinite(v["mae"]) for v in result["test"].values())


@pytest.mark.usefixtures("require_qm9")
def test_cuda_graphs_keep_the_runs_fixed_size_batches(tmp_path: Path) -> None:
    """A run started eagerly (on the CPU, say) and resumed with --cuda-graphs takes the same batches:
    same steps per epoch and schedule, and no budgets written into its options."""
    options = dict(targets=TARGETS, model_overrides=dict(TINY), epochs=1, batch_size=16, limit=200)
    eager = Trainer(TrainOptions(**options, device="cuda", out=str(tmp_path / "eager")))
    eager.setup()
    graphed = Trainer(TrainOptions(**options, device="cuda", cuda_graphs=True, out=str(tmp_path / "graphs")))
    graphed.setup()
    assert graphed.steps_per_epoch == eager.steps_per_epoch and graphed.total_steps == eager.total_steps
    assert graphed.opts.max_atoms is None and graphed.opts.max_edges is None
    assert [c.tolist() for c in graphed._epoch_batches(0)] == [c.tolist() for c in eager._epoch_batches(0)]
