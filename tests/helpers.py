"""Helpers shared by the model tests (test_model.py, test_fused_cpu.py): a tiny model with non-trivial
output statistics, output comparison, edge orders, an adapter of the whole model for e3nn's equivariance
checks, and counters of the fused kernel's calls."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from e3nn import o3

from se3tcli.graph import Batch, collate
from se3tcli.model.config import ModelConfig
from se3tcli.model.fused_cpu import call
from se3tcli.model.fused_cpu.library import find_compiler
from se3tcli.model.heads import MU_VECTOR
from se3tcli.model.transformer import SE3Transformer

# 8 channels, 2 heads, degrees 0-2, 2 layers: fast on a busy CPU
TINY_MODEL = ModelConfig(
    channels=8, n_heads=2, lmax=2, n_layers=2, n_radial=6, radial_hidden=8, readout_hidden=8, cutoff=3.5
)
HAVE_COMPILER = find_compiler() is not None
needs_compiler = pytest.mark.skipif(
    not HAVE_COMPILER, reason="no C compiler: the fused CPU kernel cannot run"
)


def make_model(config: ModelConfig = TINY_MODEL, dtype: torch.dtype = torch.float64) -> SE3Transformer:
    """A model with non-trivial statistics (mean, std, atom references): outputs in 'physical units'."""
    model = SE3Transformer(config).to(dtype)
    gen = np.random.default_rng(11)
    names = model.readout.scalar_targets
    model.set_statistics(
        mean={t: float(gen.normal()) for t in names},
        std={t: float(gen.uniform(0.5, 2.0)) for t in names},
        atom_refs={
            t: gen.normal(size=len(config.elements)) * 10 for t in ("U0", "U", "H", "G") if t in names
        },
    )
    return model.eval()


def max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest |a - b| over all outputs, relative to each output's magnitude (at least 1)."""
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max() / max(float(b[k].abs().max()), 1.0)) for k in a)


def with_edge_order(batch: Batch, paired: bool, seed: int = 5) -> Batch:
    """``batch`` as built (reverse pairs), or with its edges shuffled and marked unpaired."""
    if paired:
        return batch
    order = torch.from_numpy(np.random.default_rng(seed).permutation(batch.edge_src.numel()))
    src, dst = batch.edge_src[order], batch.edge_dst[order]
    return Batch(batch.z, batch.pos, batch.mol_index, batch.n_mol, edge_src=src, edge_dst=dst)


class ModelAdapter(torch.nn.Module):
    """``positions [n_atoms, 3] -> (scalar targets [n_mol, T] as Tx0e, mu_vector [n_mol, 3] as 1o)``, through
    ``collate`` (the real entry point: float64 centring, radius graph) in the model's dtype."""

    def __init__(self, model: SE3Transformer, numbers: list[np.ndarray], dtype: torch.dtype):
        super().__init__()
        self.model, self.numbers, self.dtype = model, numbers, dtype
        self.scalars = model.readout.scalar_targets
        self.irreps_in = ["cartesian_points"]
        self.irreps_out = [o3.Irreps(f"{len(self.scalars)}x0e"), o3.Irreps("1o")]

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = positions.detach().double().numpy()
        splits = np.cumsum([len(z) for z in self.numbers])[:-1]
        batch = collate(
            list(zip(self.numbers, np.split(pos, splits), strict=True)), self.model.config.cutoff, self.dtype
        )
        out = self.model(batch)
        return torch.stack([out[t] for t in self.scalars], dim=1), out[MU_VECTOR]


class InferenceAdapter(ModelAdapter):
    """The whole model under ``torch.inference_mode()``, where every backend runs (the fused kernel needs
    positions without gradients)."""

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            return tuple(o.clone() for o in super().forward(positions))


@contextmanager
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, int]]:
    """Counts of the fused kernel's forward (``"forward"``: layer calls) and backward passes meanwhile."""
    counts = {"forward": 0, "backward": 0}
    attention, backward = call.attention, call._Plan.backward

    def counted_attention(*args, **kwargs):
        counts["forward"] += 1
        return attention(*args, **kwargs)

    def counted_backward(*args, **kwargs):
        counts["backward"] += 1
        return backward(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(call, "attention", counted_attention)
        patch.setattr(call._Plan, "backward", counted_backward)
        yield counts
