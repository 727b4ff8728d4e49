"""Tests of the SE(3)-Transformer (se3tcli.model): equivariance of every block with e3nn's checker, E(3)
invariances of the whole model, the e3nn oracle, one contract over every attention backend (equivariance,
agreement with the reference, gradients), continuity at the cutoff, gradients and the config.

Everything runs on tiny configurations (8 channels, 2 heads, degrees 0-2, 2 layers) so the file stays fast
on a busy CPU; the presets are only built where a test is about them.
"""

from __future__ import annotations

import copy
import itertools
import os
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from conftest import ELEMENTS, random_molecule  # noqa: I001 - the tests folder's shared helpers
from e3nn import o3
from e3nn.util.test import assert_equivariant, equivariance_error
from helpers import TINY_MODEL as TINY
from helpers import (
    InferenceAdapter,
    ModelAdapter,
    kernel_calls,
    make_model,
    max_rel_diff,
    needs_compiler,
    with_edge_order,
)

from se3tcli.graph import Batch, collate, radius_graph
from se3tcli.model.attention import segment_softmax
from se3tcli.model.backend import BACKENDS, BackendUnavailable, resolve
from se3tcli.model.basis import feature_irreps, from_e3nn, to_e3nn
from se3tcli.model.config import NONLINEARITIES, PRESETS, ModelConfig, preset
from se3tcli.model.heads import MU_VECTOR
from se3tcli.model.norm import GateActivation, NormActivation, SigmoidNormActivation
from se3tcli.model.transformer import SE3Transformer, UnsupportedElementError
from se3tcli.targets import QM9_TARGETS

MIRROR = np.diag([-1.0, 1.0, 1.0])  # x -> -x


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny tensors: one intra-op thread avoids OpenMP oversubscription on a busy CPU (10-100x faster).
    SE3T_TEST_THREADS overrides, as in conftest.py."""
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("SE3T_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _deterministic() -> Iterator[None]:
    """Seeded torch RNG (restored afterwards, so e3nn's random rotations are reproducible) and no TF32."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    with torch.random.fork_rng():
        torch.manual_seed(0)
        yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@pytest.fixture
def float64() -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def molecules(seed: int, sizes=(9, 5, 12), elements=ELEMENTS) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [random_molecule(rng, n, elements=elements) for n in sizes]


def predict(model: SE3Transformer, mols, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return model(collate(mols, model.config.cutoff, dtype=dtype))


# ----------------------------------------------------------------------------------------------------------
# adapters: model layout [n, C, (lmax+1)^2] <-> e3nn's flat layout, with irreps_in/irreps_out for
# e3nn.util.test.assert_equivariant


def graph_batch(z: torch.Tensor, positions: torch.Tensor, mol_index: torch.Tensor, n_mol: int, cutoff: float):
    src, dst = radius_graph(positions, mol_index, n_mol, cutoff)
    return Batch(z, positions, mol_index, n_mol, edge_src=src, edge_dst=dst, edges_paired=True)


class _GeometryAdapter(torch.nn.Module):
    """Base of the adapters that take ``(features, positions)``: the radius graph and the edge geometry are
    recomputed from the (rotated, reflected, translated) positions on every call."""

    def __init__(self, model: SE3Transformer, z: torch.Tensor, mol_index: torch.Tensor, n_mol: int):
        super().__init__()
        self.model, self.z, self.mol_index, self.n_mol = model, z, mol_index, n_mol
        self.channels, self.lmax = model.config.channels, model.config.lmax
        self.irreps_features = feature_irreps(self.channels, self.lmax)

    def geometry(self, positions: torch.Tensor):
        batch = graph_batch(self.z, positions, self.mol_index, self.n_mol, self.model.config.cutoff)
        geometry = self.model.geometry(batch)
        assert geometry.src.numel() > 0
        return geometry


class ConvolutionAdapter(_GeometryAdapter):
    """``(node features, positions) -> per-edge output of every kernel`` (keys and values)."""

    def __init__(self, model, z, mol_index, n_mol, layer: int = 1, reference: bool = False):
        super().__init__(model, z, mol_index, n_mol)
        self.conv = model.layers[layer].attention.key_value
        self.reference = reference
        self.irreps_in = [self.irreps_features, "cartesian_points"]
        self.irreps_out = [self.irreps_features] * self.conv.n_kernels

    def forward(self, features: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        geometry = self.geometry(positions)
        x = from_e3nn(features, self.channels, self.lmax).index_select(0, geometry.src)
        out = (self.conv.reference if self.reference else self.conv)(x, geometry)  # [E, K, C, D]
        return tuple(to_e3nn(out[:, k], self.lmax) for k in range(out.shape[1]))


class AttentionAdapter(_GeometryAdapter):
    """``(node features, positions) -> (attention block output, attention weights α [E, H] as scalars)``."""

    def __init__(self, model, z, mol_index, n_mol, layer: int = 1):
        super().__init__(model, z, mol_index, n_mol)
        self.attention = model.layers[layer].attention
        self.irreps_in = [self.irreps_features, "cartesian_points"]
        self.irreps_out = [self.irreps_features, o3.Irreps(f"{self.attention.n_heads}x0e")]

    def forward(self, features: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        geometry = self.geometry(positions)
        x = from_e3nn(features, self.channels, self.lmax)
        alpha, _ = self.attention.attention_weights(x, geometry)
        return to_e3nn(self.attention(x, geometry), self.lmax), alpha


class ActivationAdapter(torch.nn.Module):
    def __init__(self, activation: torch.nn.Module, channels: int, lmax: int):
        super().__init__()
        self.activation, self.channels, self.lmax = activation, channels, lmax
        self.irreps_in = self.irreps_out = feature_irreps(channels, lmax)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return to_e3nn(self.activation(from_e3nn(features, self.channels, self.lmax)), self.lmax)


def check_equivariance(adapter, args_in, name: str, dtype: torch.dtype) -> None:
    """float64: e3nn's assert_equivariant at 1e-9 (rotations, reflections, translations of points).
    float32: the same errors, printed and required below 1e-4 relative to the outputs' magnitude.

    Needs the default dtype float64 (fixture ``float64``) in both cases: e3nn builds the Wigner matrices of
    the check in the default dtype, and float32 ones alone would be off by ~1e-7."""
    assert torch.get_default_dtype() == torch.float64
    if dtype == torch.float64:
        assert_equivariant(adapter, args_in=args_in, tolerance=1e-9)
        return
    with torch.no_grad():
        errors = equivariance_error(
            adapter, args_in=args_in, irreps_in=adapter.irreps_in, irreps_out=adapter.irreps_out
        )
        outputs = adapter(*args_in)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    assert all(o.dtype == torch.float32 for o in outputs)  # the float32 model computes in float32 throughout
    scale = torch.stack([o.detach().double().abs().max().clamp_min(1.0) for o in outputs])
    worst_abs = max(float(e.max()) for e in errors.values())
    worst_rel = max(float((e.double() / scale).max()) for e in errors.values())
    print(f"float32 equivariance error of {name}: max abs {worst_abs:.2e}, max rel {worst_rel:.2e}")
    assert worst_rel < 1e-4, f"{name}: float32 relative equivariance error {worst_rel:.2e}"


def _inputs(config: ModelConfig, dtype: torch.dtype, seed: int = 1):
    mols = molecules(seed, sizes=(7, 5))
    z = torch.from_numpy(np.concatenate([m[0] for m in mols]))
    pos = torch.from_numpy(np.concatenate([m[1] for m in mols])).to(dtype)
    mol_index = torch.repeat_interleave(torch.arange(len(mols)), torch.tensor([len(m[0]) for m in mols]))
    features = feature_irreps(config.channels, config.lmax).randn(len(z), -1, dtype=dtype)
    return z, pos, mol_index, len(mols), features


# ----------------------------------------------------------------------------------------------------------
# equivariance of every block and of the whole model

DTYPES = [pytest.param(torch.float64, id="float64"), pytest.param(torch.float32, id="float32")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", ["depthwise", "full"])
def test_convolution_is_equivariant(dtype: torch.dtype, kernel: str, float64: None) -> None:
    config = TINY.replace(kernel=kernel)
    model = make_model(config, dtype)
    z, pos, mol_index, n_mol, features = _inputs(config, dtype)
    adapter = ConvolutionAdapter(model, z, mol_index, n_mol)
    check_equivariance(adapter, [features, pos], f"convolution ({kernel})", dtype)


def test_reference_convolution_is_equivariant(float64: None) -> None:
    model = make_model(TINY.replace(kernel="full"))
    z, pos, mol_index, n_mol, features = _inputs(TINY, torch.float64)
    adapter = ConvolutionAdapter(model, z, mol_index, n_mol, reference=True)
    assert_equivariant(adapter, args_in=[features, pos], tolerance=1e-9)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("self_interaction", ["linear", "attentive"])
def test_attention_block_is_equivariant(dtype: torch.dtype, self_interaction: str, float64: None) -> None:
    config = TINY.replace(self_interaction=self_interaction)
    model = make_model(config, dtype)
    z, pos, mol_index, n_mol, features = _inputs(config, dtype)
    adapter = AttentionAdapter(model, z, mol_index, n_mol)
    check_equivariance(adapter, [features, pos], f"attention ({self_interaction})", dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", [NormActivation, SigmoidNormActivation, GateActivation])
def test_nonlinearity_is_equivariant(dtype: torch.dtype, activation: type, float64: None) -> None:
    module = activation(TINY.channels, TINY.lmax).to(dtype)
    for p in module.parameters():  # non-trivial LayerNorm affine parameters
        torch.nn.init.normal_(p, mean=0.5, std=0.5)
    adapter = ActivationAdapter(module, TINY.channels, TINY.lmax)
    features = adapter.irreps_in.randn(6, -1, dtype=dtype)
    check_equivariance(adapter, [features], activation.__name__, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nonlinearity", NONLINEARITIES)
def test_model_is_equivariant(dtype: torch.dtype, nonlinearity: str, float64: None) -> None:
    model = make_model(TINY.replace(nonlinearity=nonlinearity), dtype)
    mols = molecules(2, sizes=(9, 6))
    adapter = ModelAdapter(model, [z for z, _ in mols], dtype)
    pos = torch.from_numpy(np.concatenate([p for _, p in mols]))  # float64 points; collate casts
    check_equivariance(adapter, [pos], f"whole model ({nonlinearity})", dtype)


# Methane with exact tetrahedral symmetry: every l > 0 feature of the carbon is zero.
_CH4 = (
    np.array([6, 1, 1, 1, 1]),
    np.array(
        [
            [0.0, 0.0, 0.0],
            [0.63, 0.63, 0.63],
            [-0.63, -0.63, 0.63],
            [-0.63, 0.63, -0.63],
            [0.63, -0.63, -0.63],
        ]
    ),
)


@pytest.mark.parametrize("nonlinearity", ["norm_sigmoid", "gate"])
def test_prediction_is_continuous_at_symmetric_geometries(nonlinearity: str, float64: None) -> None:
    """Moving methane's atoms by 1e-7 Å moves every prediction by a comparably tiny amount. (The legacy
    ``norm`` activation turns a vector that symmetry makes zero into one of length ~1 whose direction is
    set by the perturbation, so its predictions jump.)"""
    model = make_model(TINY.replace(nonlinearity=nonlinearity))
    for p in model.parameters():  # non-trivial LayerNorm affine parameters
        if p.ndim == 1:
            torch.nn.init.normal_(p, mean=0.5, std=0.5)
    z, pos = _CH4
    noise = np.random.default_rng(0).normal(size=pos.shape)
    exact = predict(model, [(z, pos)])
    for step in (1e-7, 1e-5):
        moved = predict(model, [(z, pos + step * noise)])
        assert max_rel_diff(moved, exact) < 1e3 * step, (nonlinearity, step)


def test_legacy_norm_activation_jumps_at_zero_vectors(float64: None) -> None:
    """Why ``norm`` is no longer the default: a zero vector and a 1e-5 one come out ~0.4 apart."""
    module = NormActivation(4, 1).to(torch.float64)
    smooth = SigmoidNormActivation(4, 1).to(torch.float64)
    for norm in (module.norms[1], smooth.norms[1]):  # a learned LayerNorm shift, as in trained models
        torch.nn.init.constant_(norm.bias, 1.0)
    zero = torch.zeros(1, 4, 4, dtype=torch.float64)
    zero[:, :, 0] = torch.tensor([0.3, -1.0, 2.0, 0.1])  # scalars; the l = 1 vectors are zero
    tiny = zero.clone()
    tiny[:, :, 1:] = 1e-5  # above the norm's 1e-6 regularisation, below any meaningful feature
    with torch.no_grad():
        jump = float((module(tiny) - module(zero)).abs().max())
        assert jump > 0.1
        assert float((smooth(tiny) - smooth(zero)).abs().max()) < 1e-4


def test_mirror_image(float64: None) -> None:
    """Reflection: the model is E(3)-, not only SE(3)-equivariant. Every kernel path couples degrees with
    ``l_in + J + l_out`` even, so features of degree l keep the parity ``(-1)^l`` of true tensors (0e, 1o,
    2e) and the edge harmonics ``Y_J(-x) = (-1)^J Y_J(x)`` never mix parities. Hence the mirror image
    (x -> -x) has identical scalar predictions (no chirality is seen) and its dipole vector is the mirrored
    one."""
    model = make_model()
    mols = molecules(3)
    mirrored = [(z, p @ MIRROR.T) for z, p in mols]
    out, out_m = predict(model, mols), predict(model, mirrored)
    for t in QM9_TARGETS:
        assert torch.allclose(out_m[t], out[t], rtol=1e-10, atol=1e-10), t
    expected = out[MU_VECTOR] @ torch.from_numpy(MIRROR).T
    assert torch.allclose(out_m[MU_VECTOR], expected, rtol=1e-10, atol=1e-10)
    assert float(out[MU_VECTOR][:, 0].abs().min()) > 1e-6  # the x component really flips sign


@pytest.mark.parametrize("shift", [1e3, 1e6])
def test_translation_invariance(float64: None, shift: float) -> None:
    model = make_model()
    mols = molecules(4)
    offset = shift * np.array([1.0, -0.6, 0.35])
    out, moved = predict(model, mols), predict(model, [(z, p + offset) for z, p in mols])
    # collate centres in float64: shifting by 1e6 Å only loses the ~1e-10 Å rounding of the input itself
    assert max_rel_diff(moved, out) < (1e-12 if shift < 1e4 else 1e-8)
    # float32 predictions of a molecule 1e6 Å away match the unshifted float32 ones
    model32 = copy.deepcopy(model).float()
    out32, moved32 = (
        predict(model32, mols, torch.float32),
        predict(model32, [(z, p + offset) for z, p in mols], torch.float32),
    )
    assert max_rel_diff(moved32, out32) < 1e-5


def test_permutation_invariance(float64: None) -> None:
    model = make_model()
    rng = np.random.default_rng(5)
    mols = molecules(5)
    permuted = []
    for z, p in mols:
        perm = rng.permutation(len(z))
        while np.array_equal(perm, np.arange(len(z))):
            perm = rng.permutation(len(z))
        permuted.append((z[perm], p[perm]))
    assert max_rel_diff(predict(model, permuted), predict(model, mols)) < 1e-10


def test_batched_equals_per_molecule(float64: None) -> None:
    model = make_model()
    rng = np.random.default_rng(6)
    mols = [random_molecule(rng, n) for n in (9, 1, 4, 14, 1, 2)]
    batched = predict(model, mols)
    for i, mol in enumerate(mols):
        alone = predict(model, [mol])
        assert max_rel_diff({k: v[i : i + 1] for k, v in batched.items()}, alone) < 1e-10, i


def test_one_atom_molecule(float64: None) -> None:
    model = make_model()
    out = predict(model, [(np.array([6]), np.array([[1.0, 2.0, 3.0]]))])
    assert all(bool(torch.isfinite(v).all()) for v in out.values())
    assert set(out) == {*QM9_TARGETS, MU_VECTOR} and out["U0"].shape == (1,)
    assert torch.equal(out[MU_VECTOR], torch.zeros(1, 3))  # no neighbours, no charge: no dipole
    # a lone atom's prediction depends on its element only
    other = predict(model, [(np.array([6]), np.array([[-7.0, 0.5, 1e3]]))])
    assert max_rel_diff(other, out) == 0.0


@pytest.mark.parametrize(
    "kernel, self_interaction, nonlinearity, paired",
    [(*c, True) for c in itertools.product(["depthwise", "full"], ["linear", "attentive"], ["norm", "gate"])]
    + [("depthwise", "linear", "norm", False), ("full", "attentive", "gate", False)],
)
def test_fast_path_matches_e3nn_oracle(
    float64: None, kernel: str, self_interaction: str, nonlinearity: str, paired: bool
):
    config = TINY.replace(kernel=kernel, self_interaction=self_interaction, nonlinearity=nonlinearity)
    model = make_model(config)
    batch = with_edge_order(collate(molecules(7, sizes=(8, 5)), config.cutoff, dtype=torch.float64), paired)
    with torch.no_grad():
        fast = model(batch)
        model.set_backend("reference")
        oracle = model(batch)
        model.set_backend("auto")
        # the convolution alone, on random features of every degree (layer 0 only ever sees scalars)
        geometry = model.geometry(batch)
        x = torch.randn(batch.pos.shape[0], config.channels, (config.lmax + 1) ** 2).index_select(
            0, geometry.src
        )
        conv = model.layers[1].attention.key_value
        conv_fast, conv_oracle = conv(x, geometry), conv.reference(x, geometry)
    assert all(layer.attention.backend == "auto" for layer in model.layers)
    assert max_rel_diff(fast, oracle) < 1e-10
    assert float((conv_fast - conv_oracle).abs().max() / conv_oracle.abs().max()) < 1e-10


def _loss_gradients(model: SE3Transformer, batch: Batch, forces: bool = True) -> dict[str, torch.Tensor]:
    """Gradients of a loss over every output with respect to the parameters and (``forces``) the atom
    positions."""
    model.zero_grad(set_to_none=True)
    positions = batch.pos.clone().requires_grad_(forces)
    moved = Batch(
        batch.z, positions, batch.mol_index, batch.n_mol, batch.edge_src, batch.edge_dst, batch.edges_paired
    )
    sum((v - 0.3).pow(2).sum() for v in model(moved).values()).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return grads | ({"positions": positions.grad} if forces else {})


@pytest.mark.parametrize("kernel, paired", [("depthwise", True), ("depthwise", False), ("full", True)])
def test_fast_path_gradients_match_e3nn_oracle(float64: None, kernel: str, paired: bool) -> None:
    """Training's custom backward (and the shared radial rows of reverse pairs): the gradients of every
    parameter and of the positions (forces) equal the oracle's."""
    model = make_model(TINY.replace(kernel=kernel)).train()
    batch = with_edge_order(collate(molecules(3, sizes=(7, 4)), TINY.cutoff, dtype=torch.float64), paired)
    fast = _loss_gradients(model, batch)
    model.set_backend("reference")
    oracle = _loss_gradients(model, batch)
    assert fast.keys() == oracle.keys() and "positions" in fast
    for name, grad in oracle.items():
        scale = max(float(grad.abs().max()), 1e-6)
        assert float((fast[name] - grad).abs().max()) / scale < 1e-9, name


# ----------------------------------------------------------------------------------------------------------
# one contract over every attention backend (as nequip's model test mixins run theirs over every model)


@pytest.fixture(
    params=[pytest.param(name, marks=needs_compiler if name == "fused_cpu" else ()) for name in BACKENDS]
)
def backend(request: pytest.FixtureRequest) -> str:
    """Every attention backend; fused_cpu where a C compiler exists (where one exists but the kernel cannot
    be built or loaded, ``set_backend`` raises and the test fails)."""
    return request.param


def _oracle(backend: str) -> str:
    """What a backend is checked against: the e3nn reference; the reference itself against PyTorch."""
    return "torch" if backend == "reference" else "reference"


def _kernel_layers(backend: str, model: SE3Transformer) -> int:
    """How many layer calls of a pass (positions without gradients) run the fused kernel under ``backend``."""
    return model.config.n_layers if resolve(backend).backend == "fused_cpu" else 0


def test_backend_is_equivariant(backend: str, float64: None, monkeypatch) -> None:
    """float64 inference, TF32 off: e3nn's check (rotations from ``o3.rand_matrix``, reflections and
    translations) at 1e-9, and one more ``o3.rand_matrix`` rotation, alone and with a reflection, of the
    scalar targets and the dipole vector."""
    model = make_model()
    model.set_backend(backend)
    mols = molecules(2, sizes=(9, 6))
    adapter = InferenceAdapter(model, [z for z, _ in mols], torch.float64)
    positions = torch.from_numpy(np.concatenate([p for _, p in mols]))
    shift = torch.tensor([0.3, -1.2, 2.0])  # Å
    with kernel_calls(monkeypatch) as calls:
        assert_equivariant(adapter, args_in=[positions], tolerance=1e-9)
        scalars, dipoles = adapter(positions)
        rotation = o3.rand_matrix(dtype=torch.float64)
        for transform in (rotation, -rotation):
            moved_scalars, moved_dipoles = adapter(positions @ transform.T + shift)
            assert torch.allclose(moved_scalars, scalars, rtol=1e-9, atol=1e-9)
            assert torch.allclose(moved_dipoles, dipoles @ transform.T, rtol=1e-9, atol=1e-9)
    assert float(dipoles.abs().max()) > 1e-6  # a vector that really turns
    assert bool(calls["forward"]) == bool(_kernel_layers(backend, model))


@pytest.mark.parametrize("paired", [True, False])
def test_backend_agrees_with_the_reference(backend: str, paired: bool, float64: None, monkeypatch) -> None:
    """Inference in float64, both edge orders, a lone atom included: within 1e-10 of the e3nn reference
    (the reference: of PyTorch)."""
    model = make_model()
    mols = molecules(7, sizes=(8, 5, 1))
    batch = with_edge_order(collate(mols, TINY.cutoff, dtype=torch.float64), paired)
    model.set_backend(_oracle(backend))
    with torch.no_grad():
        expected = model(batch)
    model.set_backend(backend)
    with kernel_calls(monkeypatch) as calls, torch.no_grad():
        out = model(batch)
    assert calls["forward"] == _kernel_layers(backend, model)
    assert max_rel_diff(out, expected) < 1e-10


def test_backend_gradients_agree_with_the_reference(backend: str, float64: None, monkeypatch) -> None:
    """Training in float64: every parameter's gradient within 1e-9 of the reference's (through the kernel's
    own backward where it runs), and the positions' (forces) where the backend gives them; fused_cpu refuses
    those with BackendUnavailable rather than running PyTorch under its name."""
    model = make_model().train()
    batch = collate(molecules(3, sizes=(7, 4)), TINY.cutoff, dtype=torch.float64)
    model.set_backend(_oracle(backend))
    expected = _loss_gradients(model, batch)
    model.set_backend(backend)
    with kernel_calls(monkeypatch) as calls:
        grads = _loss_gradients(model, batch, forces=False)
    assert calls["backward"] == _kernel_layers(backend, model)
    if backend == "fused_cpu":
        with pytest.raises(BackendUnavailable, match="gradients of the positions"):
            _loss_gradients(model, batch)
        del expected["positions"]
    else:
        grads["positions"] = _loss_gradients(model, batch)["positions"]
    assert grads.keys() == expected.keys()
    for name, grad in expected.items():
        scale = max(float(grad.abs().max()), 1e-6)
        assert float((grads[name] - grad).abs().max()) / scale < 1e-9, name


def test_the_backend_belongs_to_the_model_object_not_its_config() -> None:
    """Checkpoints keep loading: the choice changes neither the config nor the state dict."""
    model = make_model()
    config, keys = model.config.to_json(), list(model.state_dict())
    assert model.backend == "auto"
    model.set_backend("torch")
    assert model.backend == "torch" and all(layer.attention.backend == "torch" for layer in model.layers)
    assert model.config.to_json() == config and list(model.state_dict()) == keys
    with pytest.raises(ValueError, match="unknown attention backend 'cuda'"):
        model.set_backend("cuda")
    assert model.backend == "torch"


# ----------------------------------------------------------------------------------------------------------
# the cutoff, attention weights and the segment softmax


def _crossing_molecule(distance: float, isolated_pair: bool, rotation: np.ndarray):
    """Atom B at ``distance`` from atom A along x; no other pair of atoms is near the cutoff (5 Å).
    ``isolated_pair``: A and B only (each other's only neighbour); else each has other neighbours too."""
    if isolated_pair:
        z, pos = np.array([6, 8]), np.array([[0.0, 0, 0], [distance, 0, 0]])
    else:
        z = np.array([6, 8, 1, 1, 7])
        pos = np.array([[0.0, 0, 0], [distance, 0, 0], [-1.0, 0, 0], [distance + 1.1, 0, 0], [2.5, 2.0, 0.3]])
    return z, pos @ rotation.T


@pytest.mark.parametrize("isolated_pair", [False, True], ids=["molecule", "isolated-pair"])
def test_continuous_across_the_cutoff(float64: None, isolated_pair: bool) -> None:
    """Moving an atom across the cutoff changes the predictions continuously (the envelope and its first two
    derivatives vanish there): a 1e-6 Å step across it changes them by < 1e-6, and the change across the
    cutoff is no larger than an equal step just inside it (no jump hidden in a small step)."""
    config = TINY.replace(cutoff=5.0)
    model = make_model(config)
    rotation = o3.rand_matrix(dtype=torch.float64).numpy()
    c = config.cutoff

    def f(distance: float) -> dict[str, torch.Tensor]:
        return predict(model, [_crossing_molecule(distance, isolated_pair, rotation)])

    def n_edges(distance: float) -> int:
        return collate([_crossing_molecule(distance, isolated_pair, rotation)], c).edge_src.numel()

    for eps in (1e-3, 1e-5, 5e-7):
        assert n_edges(c - eps) == n_edges(c + eps) + 2  # the pair really crosses the cutoff
        across = max_rel_diff(f(c + eps), f(c - eps))
        inside = max_rel_diff(f(c - eps), f(c - 3 * eps))
        assert across <= 2 * inside + 1e-12, (eps, across, inside)
    assert max_rel_diff(f(c + 5e-7), f(c - 5e-7)) < 1e-6  # a 1e-6 Å step across the cutoff


def test_envelope_is_nonnegative_and_smooth_near_the_cutoff() -> None:
    """Regression: the expanded envelope polynomial cancelled catastrophically near the cutoff and went
    negative (to -6e-6 in float32), which made the envelope-weighted attention produce NaN."""
    model = make_model(TINY.replace(cutoff=5.0), torch.float32)
    for dtype in (torch.float32, torch.float64):
        r = torch.linspace(4.9, 5.1, 20001, dtype=dtype)
        env = model.radial_basis.envelope(r)
        assert bool((env >= 0).all()) and bool((env[r >= 5.0] == 0).all())
        assert bool((env[1:] <= env[:-1]).all())  # monotone
        x = (r / 5.0).double().clamp(max=1)
        exact = (1 - x) ** 3 * (1 + 3 * x + 6 * x**2 + 10 * x**3 + 15 * x**4 + 21 * x**5)
        assert float((env.double() - exact).abs().max()) < 10 * torch.finfo(dtype).eps * 1e-3
    for d in (4.997, 4.998, 4.999, 4.9999):  # an isolated pair just inside the cutoff, in float32
        out = predict(model, [(np.array([6, 8]), np.array([[0.0, 0, 0], [d, 0, 0]]))], torch.float32)
        assert all(bool(torch.isfinite(v).all()) for v in out.values()), d


def test_attention_weights_sum_to_one(float64: None) -> None:
    config = TINY.replace(n_heads=4)
    model = make_model(config)
    rng = np.random.default_rng(8)
    mols = [random_molecule(rng, n) for n in (12, 1, 6)]
    batch = collate(mols, config.cutoff, dtype=torch.float64)
    geometry = model.geometry(batch)
    n_atoms = batch.pos.shape[0]
    x = torch.randn(n_atoms, config.channels, (config.lmax + 1) ** 2)
    for layer in model.layers:
        alpha, values = layer.attention.attention_weights(x, geometry)
        assert alpha.shape == (geometry.src.numel(), config.n_heads)
        assert values.shape == (geometry.src.numel(), config.channels, (config.lmax + 1) ** 2)
        assert bool((alpha >= 0).all())
        totals = torch.zeros(n_atoms, config.n_heads).index_add_(0, geometry.dst, alpha)
        has_edges = torch.bincount(geometry.dst, minlength=n_atoms) > 0
        assert torch.allclose(totals[has_edges], torch.ones(()), atol=1e-12)
        assert bool((totals[~has_edges] == 0).all()) and int((~has_edges).sum()) == 1  # the lone atom


def _softmax_per_segment(logits: torch.Tensor, segment: torch.Tensor, n: int) -> torch.Tensor:
    out = torch.empty_like(logits)
    for s in range(n):
        mask = segment == s
        if mask.any():
            out[mask] = torch.softmax(logits[mask], dim=0)
    return out


def test_segment_softmax_matches_torch_and_is_stable(float64: None) -> None:
    n_segments, n_heads = 9, 3
    sizes = torch.tensor([4, 0, 1, 7, 2, 0, 5, 3, 6])  # including empty segments
    segment = torch.repeat_interleave(torch.arange(n_segments), sizes)
    for scale, offset in ((1.0, 0.0), (1e4, 0.0), (1e4, 1e4), (1e4, -1e4)):
        logits = torch.randn(int(sizes.sum()), n_heads) * scale + offset
        out = segment_softmax(logits, segment, n_segments)
        assert bool(torch.isfinite(out).all())
        assert torch.allclose(out, _softmax_per_segment(logits, segment, n_segments), rtol=1e-12, atol=1e-300)
        totals = torch.zeros(n_segments, n_heads).index_add_(0, segment, out)
        assert torch.allclose(totals[sizes > 0], torch.ones(())) and bool((totals[sizes == 0] == 0).all())
    # float32 with huge logits: still finite and normalised
    logits32 = (torch.randn(int(sizes.sum()), n_heads) * 1e4).float()
    out32 = segment_softmax(logits32, segment, n_segments)
    assert bool(torch.isfinite(out32).all())
    assert torch.allclose(
        out32.double(), _softmax_per_segment(logits32.double(), segment, n_segments), atol=1e-6
    )
    # weights act like adding log(weight) to the logits; an all-zero-weight segment gives zeros
    logits = torch.randn(int(sizes.sum()), n_heads) * 1e4
    weight = torch.rand(int(sizes.sum())) + 0.01
    weight[segment == 4] = 0.0
    out = segment_softmax(logits, segment, n_segments, weight=weight)
    expected = _softmax_per_segment(logits + weight.log()[:, None], segment, n_segments)
    expected[segment == 4] = 0.0
    assert bool(torch.isfinite(out).all()) and torch.allclose(out, expected, rtol=1e-10, atol=1e-300)


# ----------------------------------------------------------------------------------------------------------
# gradients, config, elements


def _dead_parameters(config: ModelConfig) -> set[str]:
    model = make_model(config)
    rng = np.random.default_rng(9)
    mols = [random_molecule(rng, n) for n in (7, 5)]
    mols[0] = (np.array([1, 6, 7, 8, 9, 6, 1]), mols[0][1])  # every element, so every embedding row is used
    out = model.train()(collate(mols, config.cutoff, dtype=torch.float64))
    assert set(out) == {*QM9_TARGETS, MU_VECTOR}
    sum((v - 0.3).pow(2).sum() for v in out.values()).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    scale = max(float(g.abs().max()) for g in grads.values() if g is not None)
    assert model.embedding.weight.grad is not None and bool(
        (model.embedding.weight.grad.abs().sum(1) > 0).all()
    )
    return {n for n, g in grads.items() if g is None or float(g.abs().max()) <= 1e-9 * scale}


# Both presets at their full size (all 12 targets, float64): well under a second each on one thread.
PRESET_CASES = [pytest.param("small", {}, id="small"), pytest.param("base", {}, id="base")]


@pytest.mark.parametrize("name, overrides", PRESET_CASES)
def test_gradients_reach_every_parameter(float64: None, name: str, overrides: dict) -> None:
    config = preset(name, **overrides)
    assert config.targets == QM9_TARGETS and len(QM9_TARGETS) == 12
    assert _dead_parameters(config) == set()


@pytest.mark.parametrize(
    "changes",
    [
        dict(nonlinearity="gate", self_interaction="attentive", kernel="full"),
        dict(nonlinearity="norm", self_interaction="attentive", kernel="depthwise"),
    ],
)
def test_no_dead_parameters_in_other_variants(float64: None, changes: dict) -> None:
    assert _dead_parameters(TINY.replace(**changes)) == set()


@pytest.mark.parametrize(
    "config",
    [
        PRESETS["small"],
        PRESETS["base"],
        TINY,
        ModelConfig(
            targets=("mu", "gap"),
            elements=(1, 6, 8),
            channels=6,
            lmax=1,
            jmax=1,
            n_layers=1,
            n_heads=3,
            kernel="full",
            self_interaction="attentive",
            nonlinearity="gate",
            cutoff=4.25,
            dipole_head=False,
        ),
    ],
)
def test_config_json_round_trip_and_rebuild(config: ModelConfig) -> None:
    text = config.to_json()
    again = ModelConfig.from_json(text)
    assert again == config and again.to_json() == text
    assert isinstance(again.targets, tuple) and isinstance(again.elements, tuple)
    model = SE3Transformer(config)
    rebuilt = SE3Transformer.from_config(again)
    state, state2 = model.state_dict(), rebuilt.state_dict()
    assert list(state) == list(state2)
    assert all(state[k].shape == state2[k].shape and state[k].dtype == state2[k].dtype for k in state)
    rebuilt.load_state_dict(state)  # strict
    mols = molecules(10, sizes=(6, 3), elements=config.elements)
    out, out2 = predict(model, mols, torch.float32), predict(rebuilt, mols, torch.float32)
    assert all(torch.equal(out[k], out2[k]) for k in out)


@pytest.mark.parametrize(
    "changes",
    [
        {"kernel": "sparse"},
        {"self_interaction": "none"},
        {"nonlinearity": "relu"},
        {"channels": 10, "n_heads": 4},
        {"n_heads": 0},
        {"channels": 0},
        {"lmax": -1},
        {"jmax": -1},
        {"n_layers": 0},
        {"n_radial": 0},
        {"radial_hidden": 0},
        {"readout_hidden": 0},
        {"cutoff": 0.0},
        {"cutoff": -1.0},
        {"cutoff": float("nan")},
        {"targets": ("U0", "energy")},
        {"targets": ()},
        {"targets": ("U0", "U0")},
        {"elements": ()},
        {"elements": (1, 6, 6)},
        {"elements": (0, 1)},
        {"elements": (1, 300)},
    ],
    ids=lambda changes: ",".join(f"{k}={v}" for k, v in changes.items()),
)
def test_invalid_configs_raise_value_error(changes: dict) -> None:
    with pytest.raises(ValueError, match="invalid model config"):
        TINY.replace(**changes)


def test_invalid_config_sources_raise_value_error() -> None:
    data = TINY.to_dict()
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({**data, "dropout": 0.1})
    with pytest.raises(ValueError, match="invalid model config"):
        ModelConfig.from_json(TINY.replace(channels=8).to_json().replace('"n_heads": 2', '"n_heads": 3'))
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge")
    with pytest.raises(ValueError):
        preset("small", kernel="nope")


@pytest.mark.parametrize("numbers", [[6, 2, 1], [6, 1, 150], [17]])
def test_unsupported_element_raises(numbers: list[int]) -> None:
    model = make_model(TINY, torch.float32)
    rng = np.random.default_rng(12)
    _, pos = random_molecule(rng, len(numbers))
    bad = [z for z in numbers if z not in ELEMENTS]
    with pytest.raises(UnsupportedElementError, match=str(bad[0])):
        predict(model, [random_molecule(rng, 3), (np.array(numbers), pos)], torch.float32)
    assert issubclass(UnsupportedElementError, ValueError)


@pytest.mark.parametrize("kernel", ["depthwise", "full"])
def test_fast_path_runs_under_bf16_autocast(kernel: str) -> None:
    """GPU training uses bf16 autocast: on the CPU's autocast the fast path (and its custom backward) mixes
    bf16 products with float32 geometry without dtype errors and stays near float32."""
    model = SE3Transformer(TINY.replace(kernel=kernel)).train()
    batch = collate(molecules(4), TINY.cutoff)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model(batch)
    sum(v.float().pow(2).mean() for v in mixed.values()).backward()
    assert all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    with torch.no_grad():
        plain = model(batch)
    for name, value in plain.items():
        error = float((mixed[name].detach().float() - value).abs().max())
        assert error <= 0.2 * max(float(value.abs().max()), 1.0), name
