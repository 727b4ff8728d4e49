"""Batches bounded by atoms/edges, static padding, and training with them (CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, random_molecule, tiny_train_options

from se3tcli.batching import StaticShape, graph_sizes, pad_batch, size_bounded_batches
from se3tcli.cuda_graphs import _TensorForward, padded_inputs
from se3tcli.graph import Batch, collate
from se3tcli.model.config import preset
from se3tcli.model.heads import MU_VECTOR
from se3tcli.model.transformer import SE3Transformer, UnsupportedElementError
from se3tcli.train import Trainer, TrainOptions


def _molecules(n: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [random_molecule(rng, int(rng.integers(1, 12))) for _ in range(n)]


def test_graph_sizes_count_each_molecules_atoms_and_edges() -> None:
    molecules = _molecules(9)
    atoms, edges = graph_sizes(lambda i: molecules[i], [4, 0, 7], cutoff=3.0)
    for k, i in enumerate([4, 0, 7]):
        alone = collate([molecules[i]], 3.0)
        assert atoms[k] == alone.z.numel() and edges[k] == alone.edge_src.numel()


def test_size_bounded_batches_keep_order_and_budgets() -> None:
    rng = np.random.default_rng(1)
    atoms, edges = rng.integers(3, 30, 500), rng.integers(6, 800, 500)
    order = rng.permutation(500)
    chunks = size_bounded_batches(order, atoms, edges, max_atoms=200, max_edges=4000, max_molecules=16)
    np.testing.assert_array_equal(np.concatenate(chunks), order)
    for chunk in chunks:
        assert atoms[chunk].sum() <= 200 and edges[chunk].sum() <= 4000 and len(chunk) <= 16
    for chunk, following in zip(chunks, chunks[1:], strict=False):  # each batch is as full as allowed
        nxt = following[0]
        assert (
            len(chunk) == 16
            or atoms[chunk].sum() + atoms[nxt] > 200
            or edges[chunk].sum() + edges[nxt] > 4000
        )
    only_molecules = size_bounded_batches(order, atoms, edges, None, None, max_molecules=64)
    assert [len(c) for c in only_molecules] == [64] * 7 + [52]
    with pytest.raises(ValueError, match="does not fit the batch budget"):
        size_bounded_batches(order, atoms, edges, max_atoms=10, max_edges=None, max_molecules=4)


@pytest.mark.parametrize("spare_edges", [11, 12])
def test_padding_leaves_every_real_prediction_unchanged(spare_edges: int) -> None:
    """float64: the padded batch predicts the real molecules exactly as the plain batch does; an even
    number of padding edges keeps the edges paired, an odd one falls back to unpaired edges."""
    torch.manual_seed(0)
    model = SE3Transformer(preset("small", **TINY, targets=("mu", "homo", "U0"))).double().eval()
    batch = collate(_molecules(5, seed=2), 5.0, dtype=torch.float64)
    shape = StaticShape(
        n_atoms=batch.z.numel() + 7, n_edges=batch.edge_src.numel() + spare_edges, n_mol=batch.n_mol + 3
    )
    padded = pad_batch(batch, shape, element=1)
    assert padded.edges_paired == (spare_edges % 2 == 0)
    if padded.edges_paired:
        assert torch.equal(padded.edge_src[0::2], padded.edge_dst[1::2])
        assert torch.equal(padded.edge_dst[0::2], padded.edge_src[1::2])
    assert not bool((padded.edge_src == padded.edge_dst).any())
    assert (padded.z.numel(), padded.edge_src.numel(), padded.n_mol) == (
        shape.n_atoms,
        shape.n_edges,
        shape.n_mol,
    )
    assert padded.mol_index[batch.z.numel() :].eq(shape.n_mol - 1).all()
    assert padded.edge_src[batch.edge_src.numel() :].ge(batch.z.numel()).all()  # padding edges stay apart
    with torch.no_grad():
        plain, through_padding = model(batch), model(padded)
    for name in ("mu", "homo", "U0", MU_VECTOR):
        torch.testing.assert_close(through_padding[name][: batch.n_mol], plain[name], rtol=1e-12, atol=1e-12)
    tensors = (padded.z, padded.pos, padded.mol_index, padded.edge_src, padded.edge_dst)
    with torch.no_grad():
        stacked = _TensorForward(model, shape.n_mol, ("homo", "U0"), padded.edges_paired)(*tensors)
    torch.testing.assert_close(stacked[: batch.n_mol], torch.stack([plain["homo"], plain["U0"]], 1))


def test_static_shapes_for_a_budget_keep_edges_paired() -> None:
    for max_edges in (99, 100):
        shape = StaticShape.for_budget(max_atoms=20, max_edges=max_edges, max_molecules=4)
        assert shape.n_edges % 2 == 0 and shape.n_edges > max_edges


def test_graph_inputs_keep_the_edge_order_of_the_capture() -> None:
    """A graph captured for paired edges computes radial features once per pair: it refuses other batches."""
    model = SE3Transformer(preset("small", **TINY))
    batch = collate(_molecules(4), 5.0)
    shape = StaticShape.for_budget(batch.z.numel(), batch.edge_src.numel(), batch.n_mol)
    src, dst = padded_inputs(model, batch, shape, edges_paired=True)[3:]
    assert torch.equal(src[0::2], dst[1::2]) and torch.equal(dst[0::2], src[1::2])
    unpaired = Batch(batch.z, batch.pos, batch.mol_index, batch.n_mol, batch.edge_src, batch.edge_dst)
    with pytest.raises(ValueError, match="paired edges"):
        padded_inputs(model, unpaired, shape, edges_paired=True)
    assert len(padded_inputs(model, unpaired, shape, edges_paired=False)) == 5


def test_padding_refuses_a_batch_that_does_not_fit() -> None:
    batch = collate(_molecules(3), 5.0)
    too_small = StaticShape(
        n_atoms=batch.z.numel() + 1, n_edges=batch.edge_src.numel(), n_mol=batch.n_mol + 1
    )
    with pytest.raises(ValueError, match="2 spare atoms"):
        pad_batch(batch, too_small, element=1)


def test_graph_inputs_are_checked_for_elements_on_the_cpu() -> None:
    model = SE3Transformer(preset("small", **TINY))
    model.check_elements(torch.tensor([1, 6, 8]))
    with pytest.raises(UnsupportedElementError, match=r"\[26\]"):
        model.check_elements(torch.tensor([1, 26, 6]))


@pytest.mark.usefixtures("require_qm9")
def test_training_with_atom_and_edge_budgets(tmp_path: Path) -> None:
    """Batches bounded by atoms and edges: within budget, more steps than by molecules alone, and a
    resumed run repeats the uninterrupted one exactly."""

    def options(out: Path) -> TrainOptions:
        return tiny_train_options(out, targets=("homo",), epochs=1, max_atoms=150, max_edges=1500)

    whole = Trainer(options(tmp_path / "whole"))
    whole.setup()
    atoms, edges = whole.sizes
    chunks = whole._epoch_batches(0)
    assert all(atoms[c].sum() <= 150 and edges[c].sum() <= 1500 for c in chunks)
    assert whole.steps_per_epoch == len(chunks) > 3  # 48 molecules in batches of 16 would be 3
    assert whole.run()["status"] == "finished"

    parts = Trainer(options(tmp_path / "parts"))
    parts.setup()
    assert parts.run(should_stop=lambda: parts.step == 2)["status"] == "interrupted"
    resumed = Trainer(TrainOptions(out=str(tmp_path / "parts"), resume=True, device="cpu", epochs=None))
    resumed.setup()
    assert resumed.opts.max_atoms == 150 and resumed.run()["status"] == "finished"
    for key, value in whole.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=0, atol=0)


def test_cuda_graphs_need_a_cuda_device(tmp_path: Path, labelled_sdf) -> None:
    data = labelled_sdf(tmp_path / "labelled.sdf")
    trainer = Trainer(
        TrainOptions(
            dataset=str(data),
            targets=("homo",),
            model_overrides=dict(TINY),
            device="cpu",
            cuda_graphs=True,
            out=str(tmp_path / "run"),
        )
    )
    with pytest.raises(ValueError, match="needs a CUDA device"):
        trainer.setup()
