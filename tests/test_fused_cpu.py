"""The fused CPU attention kernel (se3tcli/model/fused_cpu.py, fused_attention.c): its outputs and its
backward's gradients equal the PyTorch path's (float64, several receiver blocks, both edge orders), its
receiver blocks own their edges, and the model falls back to PyTorch where the kernel is turned off, cannot
be built, or gradients of the positions are wanted."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from conftest import random_molecule  # noqa: I001 - the tests folder's shared helpers
from e3nn.util.test import assert_equivariant
from test_model import ModelAdapter, make_model, max_rel_diff, with_edge_order

from se3tcli.graph import collate
from se3tcli.model import fused_cpu
from se3tcli.model.config import ModelConfig

CONFIG = ModelConfig(
    channels=8, n_heads=2, lmax=2, n_layers=2, n_radial=6, radial_hidden=8, readout_hidden=8, cutoff=3.5
)
HAVE_COMPILER = fused_cpu._compiler() is not None
TURNED_OFF = os.environ.get(fused_cpu.DISABLE_ENV) == "0"
needs_kernel = pytest.mark.skipif(
    not HAVE_COMPILER or TURNED_OFF, reason="no C compiler, or SE3T_FUSED_CPU=0"
)


@pytest.fixture
def fresh_library() -> Iterator[None]:
    """Forget the loaded kernel before and after (the tests below change how it is built)."""
    fused_cpu.kernel_library.cache_clear()
    yield
    fused_cpu.kernel_library.cache_clear()


def some_molecules(seed: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
    """Molecules of 1-14 atoms; in one, an atom beyond the cutoff of the others (a receiver without edges)."""
    rng = np.random.default_rng(seed)
    molecules = [random_molecule(rng, int(n)) for n in rng.integers(1, 15, size=9)]
    z, pos = random_molecule(rng, 4)
    molecules.append((np.append(z, 6), np.vstack([pos, [40.0, 0.0, 0.0]])))
    return molecules


@needs_kernel
def test_the_kernel_builds_where_a_compiler_exists() -> None:
    """Every test below that needs the kernel would otherwise skip silently on a broken build."""
    assert fused_cpu.kernel_library() is not None


def outputs(model, batch, fused: bool, monkeypatch) -> tuple[dict[str, torch.Tensor], int]:
    """The model's outputs (inference) with or without the kernel, and how many kernel calls were made."""
    calls = []
    attention = fused_cpu.attention

    def counted(*args, **kwargs):
        calls.append(1)
        return attention(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(fused_cpu, "attention", counted)
        if not fused:
            patch.setattr(fused_cpu, "applies", lambda *args: False)
        with torch.inference_mode():
            return model(batch), len(calls)


@needs_kernel
@pytest.mark.parametrize("paired", [True, False])
@pytest.mark.parametrize("n_heads, lmax, channels", [(2, 2, 8), (1, 1, 8), (4, 0, 8), (4, 2, 32)])
def test_fused_kernel_matches_the_pytorch_path(
    monkeypatch, paired: bool, n_heads: int, lmax: int, channels: int
) -> None:
    """float64, blocks of ~3 pairs so that a batch spans many blocks; unpaired: shuffled edges. 32
    channels: the presets' width, which the kernel compiles with constant sizes."""
    monkeypatch.setattr(fused_cpu, "BLOCK_COEFFICIENTS", 3 * 5 * 2 * channels)
    model = make_model(CONFIG.replace(n_heads=n_heads, lmax=lmax, channels=channels), dtype=torch.float64)
    batch = with_edge_order(collate(some_molecules(), CONFIG.cutoff, dtype=torch.float64), paired)
    fused, n_calls = outputs(model, batch, True, monkeypatch)
    plain, no_calls = outputs(model, batch, False, monkeypatch)
    assert n_calls == CONFIG.n_layers and no_calls == 0
    assert max_rel_diff(fused, plain) < 1e-12


def parameter_gradients(model, batch, fused: bool, monkeypatch) -> tuple[dict[str, torch.Tensor], int]:
    """Gradients of a loss over every output for every parameter, and how many kernel backward calls ran."""
    calls = []
    backward = fused_cpu._Plan.backward

    def counted(*args, **kwargs):
        calls.append(1)
        return backward(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(fused_cpu._Plan, "backward", counted)
        if not fused:
            patch.setattr(fused_cpu, "applies", lambda *args: False)
        model.zero_grad(set_to_none=True)
        sum((v - 0.3).pow(2).sum() for v in model(batch).values()).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}, len(calls)


@needs_kernel
@pytest.mark.parametrize("paired", [True, False])
@pytest.mark.parametrize(
    "n_heads, lmax, channels, dtype, tolerance",
    [(2, 2, 8, torch.float64, 1e-10), (4, 1, 8, torch.float64, 1e-10), (4, 2, 32, torch.float32, 1e-4)],
)
def test_fused_backward_matches_the_pytorch_path(
    monkeypatch, paired: bool, n_heads: int, lmax: int, channels: int, dtype: torch.dtype, tolerance: float
) -> None:
    """Training: the kernel's backward (features, queries, radial coefficients) gives every parameter the
    gradient the PyTorch path gives it, across many receiver blocks; float64, and float32 at the presets'
    32 channels (the kernel's constant-size code, which training runs)."""
    monkeypatch.setattr(fused_cpu, "BLOCK_COEFFICIENTS", 3 * 5 * 2 * channels)
    config = CONFIG.replace(n_heads=n_heads, lmax=lmax, channels=channels)
    model = make_model(config, dtype=dtype).train()
    batch = with_edge_order(collate(some_molecules(5), CONFIG.cutoff, dtype=dtype), paired)
    fused, n_calls = parameter_gradients(model, batch, True, monkeypatch)
    plain, no_calls = parameter_gradients(model, batch, False, monkeypatch)
    assert n_calls == CONFIG.n_layers and no_calls == 0
    assert fused.keys() == plain.keys()
    for name, grad in plain.items():
        scale = max(float(grad.abs().max()), 1e-6)
        assert float((fused[name] - grad).abs().max()) / scale < tolerance, name


@needs_kernel
def test_fused_backward_is_deterministic_across_threads(monkeypatch) -> None:
    """Two threads sum their shares of the feature gradients in a fixed order: runs repeat bit for bit
    (resumed training depends on it)."""
    monkeypatch.setattr(fused_cpu, "BLOCK_COEFFICIENTS", 3 * 5 * 2 * CONFIG.channels)
    model = make_model(CONFIG, dtype=torch.float32).train()
    batch = collate(some_molecules(6), CONFIG.cutoff, dtype=torch.float32)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        first, n_calls = parameter_gradients(model, batch, True, monkeypatch)
        again, _ = parameter_gradients(model, batch, True, monkeypatch)
    finally:
        torch.set_num_threads(threads)
    assert n_calls == CONFIG.n_layers
    assert all(torch.equal(first[name], again[name]) for name in first)


@needs_kernel
def test_a_molecule_too_large_for_one_block_takes_the_pytorch_path(monkeypatch) -> None:
    """Blocks hold whole molecules; one whose coefficients exceed MAX_BLOCK_COEFFICIENTS (thousands of
    atoms) goes through the PyTorch path, whose memory is bounded by blocks of edges."""
    model = make_model(CONFIG, dtype=torch.float64)
    batch = collate(some_molecules(), CONFIG.cutoff, dtype=torch.float64)
    fused, n_calls = outputs(model, batch, True, monkeypatch)
    assert n_calls == CONFIG.n_layers
    monkeypatch.setattr(fused_cpu, "MAX_BLOCK_COEFFICIENTS", 100)
    plain, n_calls = outputs(model, batch, True, monkeypatch)
    assert n_calls == 0 and max_rel_diff(fused, plain) < 1e-12


def test_position_gradients_and_mixed_dtypes_take_the_pytorch_path() -> None:
    """Forces need gradients through the geometry, which the kernel's backward does not give; and the
    kernel reads every array in one type, so a float64 model on a float32 batch must not reach it."""
    model = make_model(CONFIG, dtype=torch.float64)
    batch = collate(some_molecules(), CONFIG.cutoff, dtype=torch.float64)
    x = torch.zeros(batch.z.shape[0], CONFIG.channels, (CONFIG.lmax + 1) ** 2, dtype=torch.float64)
    assert fused_cpu.applies(x, model.geometry(batch)) == (fused_cpu.kernel_library() is not None)
    single = collate(some_molecules(), CONFIG.cutoff, dtype=torch.float32)
    assert not fused_cpu.applies(x, model.geometry(single))  # float32 envelope and rotations
    batch.pos.requires_grad_(True)
    assert not fused_cpu.applies(x, model.geometry(batch))


@needs_kernel
@pytest.mark.parametrize("channels", [8, 32])  # 32: the presets' width, compiled with constant sizes
def test_fused_kernel_in_float32_agrees_with_float64(monkeypatch, channels: int) -> None:
    model = make_model(CONFIG.replace(channels=channels), dtype=torch.float64)
    reference, _ = outputs(
        model, collate(some_molecules(2), CONFIG.cutoff, dtype=torch.float64), False, monkeypatch
    )
    batch32 = collate(some_molecules(2), CONFIG.cutoff, dtype=torch.float32)
    single, n_calls = outputs(model.float(), batch32, True, monkeypatch)
    assert n_calls == CONFIG.n_layers
    assert max_rel_diff({k: v.double() for k, v in single.items()}, reference) < 1e-4


class _InferenceAdapter(ModelAdapter):
    """The whole model under ``torch.inference_mode()``, where the kernel runs (the equivariance tests of
    test_model.py run with gradients, through PyTorch)."""

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            return tuple(o.clone() for o in super().forward(positions))


@needs_kernel
def test_fused_inference_is_equivariant(monkeypatch) -> None:
    """float64, e3nn's random rotations, reflections and translations, tolerance 1e-9."""
    calls = []
    attention = fused_cpu.attention
    monkeypatch.setattr(
        fused_cpu, "attention", lambda *args, **kwargs: calls.append(1) or attention(*args, **kwargs)
    )
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # e3nn builds the check's Wigner matrices in the default dtype
    try:
        model = make_model(CONFIG, dtype=torch.float64)
        molecules = some_molecules(4)[:4]
        adapter = _InferenceAdapter(model, [z for z, _ in molecules], torch.float64)
        positions = torch.from_numpy(np.concatenate([p for _, p in molecules]))
        assert_equivariant(adapter, args_in=[positions], tolerance=1e-9)
    finally:
        torch.set_default_dtype(default)
    assert calls, "the kernel did not run"


@pytest.mark.parametrize("paired", [True, False])
def test_receiver_blocks_own_the_edges_of_their_receivers(paired: bool) -> None:
    batch = with_edge_order(collate(some_molecules(3), CONFIG.cutoff), paired)
    n_nodes, per_row = batch.z.shape[0], 2 if paired else 1
    blocks = fused_cpu.receiver_blocks(batch.edge_dst, n_nodes, per_row, target_rows=4)
    assert blocks.nodes[0] == 0 and blocks.nodes[-1] == n_nodes
    assert blocks.rows[0] == 0 and blocks.rows[-1] == batch.edge_src.numel() // per_row
    if paired:  # radius graphs cut between molecules: several blocks
        assert len(blocks.nodes) > 3
    dst_sorted = batch.edge_dst[blocks.order]
    assert torch.equal(dst_sorted, torch.sort(batch.edge_dst).values)
    assert torch.equal(
        blocks.offsets[1:] - blocks.offsets[:-1], torch.bincount(batch.edge_dst, minlength=n_nodes)
    )
    for b in range(len(blocks.nodes) - 1):
        edges = blocks.order[blocks.offsets[blocks.nodes[b]] : blocks.offsets[blocks.nodes[b + 1]]]
        rows = edges // per_row
        assert edges.numel() == 0 or (
            int(rows.min()) >= blocks.rows[b] and int(rows.max()) < blocks.rows[b + 1]
        ), f"block {b} reads rows outside its range"


def test_turned_off_the_model_uses_pytorch(monkeypatch, fresh_library: None) -> None:
    monkeypatch.setenv(fused_cpu.DISABLE_ENV, "0")
    assert fused_cpu.kernel_library() is None
    model = make_model(CONFIG, dtype=torch.float64)
    with torch.inference_mode():
        out = model(collate(some_molecules(), CONFIG.cutoff, dtype=torch.float64))
    assert all(bool(torch.isfinite(v).all()) for v in out.values())


def test_a_failing_build_falls_back_to_pytorch(monkeypatch, tmp_path, caplog, fresh_library: None) -> None:
    """A compiler that fails (here: `false`) leaves a warning, no library file and a working model."""
    monkeypatch.setenv("SE3T_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", shutil.which("false") or "false")
    monkeypatch.delenv(fused_cpu.DISABLE_ENV, raising=False)
    with caplog.at_level(logging.WARNING, logger="se3tcli.model.fused_cpu"):
        assert fused_cpu.kernel_library() is None
    assert "could not build the fused CPU kernel" in caplog.text
    assert not list(tmp_path.rglob("*.so"))
    (failed,) = tmp_path.rglob("*.failed")  # remembered: the next run neither rebuilds nor warns
    caplog.clear()
    fused_cpu.kernel_library.cache_clear()
    with caplog.at_level(logging.WARNING, logger="se3tcli.model.fused_cpu"):
        assert fused_cpu.kernel_library() is None
    assert not caplog.text and failed.exists()
    model = make_model(CONFIG, dtype=torch.float64)
    with torch.inference_mode():
        out = model(collate(some_molecules(), CONFIG.cutoff, dtype=torch.float64))
    assert all(bool(torch.isfinite(v).all()) for v in out.values())


@needs_kernel
def test_the_library_is_built_once_into_the_cache(monkeypatch, tmp_path, fresh_library: None) -> None:
    monkeypatch.setenv("SE3T_CACHE_DIR", str(tmp_path))
    assert fused_cpu.kernel_library() is not None
    built = list((tmp_path / "kernels").glob("fused_attention-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    fused_cpu.kernel_library.cache_clear()
    assert fused_cpu.kernel_library() is not None
    assert built[0].stat().st_mtime_ns == stamp and not list((tmp_path / "kernels").glob("tmp*"))
