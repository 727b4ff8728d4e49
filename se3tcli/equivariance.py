"""The checks behind ``se3t check-equivariance``: transform real molecules and compare predictions.

Rotations come from ``e3nn.o3.rand_matrix``; translations are random shifts of up to 10 Å; permutations
are random non-identity reorderings of the atoms; the reflection mirrors x. Scalar targets must not
change; the dipole vector must rotate (and reflect) with the molecule. TF32 is off during the checks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from e3nn import o3

from se3tcli.graph import collate
from se3tcli.model.config import preset
from se3tcli.model.heads import MU_VECTOR
from se3tcli.model.transformer import SE3Transformer

TOLERANCE = {"float64": 1e-9, "float32": 1e-4}  # relative error bound per dtype
TRANSFORMS = ("rotation", "translation", "permutation", "reflection", "rotation+translation+permutation")


@dataclass
class CheckResult:
    molecule: str
    transform: str
    max_abs_error: float
    max_rel_error: float
    tolerance: float
    passed: bool

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@contextlib.contextmanager
def tf32_disabled() -> Iterator[None]:
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def _predict(model, numbers: np.ndarray, positions: np.ndarray, dtype, device) -> dict[str, np.ndarray]:
    batch = collate([(numbers, positions)], model.config.cutoff, dtype=dtype).to(device, dtype)
    with torch.inference_mode():
        out = model(batch)
    return {k: v.double().cpu().numpy().reshape(-1) for k, v in out.items()}


def _compare(reference: dict[str, np.ndarray], transformed: dict[str, np.ndarray], rotation: np.ndarray):
    """Largest absolute and relative (to the output's magnitude, at least 1) error over all outputs."""
    worst_abs, worst_rel = 0.0, 0.0
    for key, ref in reference.items():
        expected = rotation @ ref if key == MU_VECTOR else ref
        err = float(np.abs(transformed[key] - expected).max())
        worst_abs = max(worst_abs, err)
        worst_rel = max(worst_rel, err / max(float(np.abs(expected).max()), 1.0))
    return worst_abs, worst_rel


def _transforms(n_atoms: int, rng: np.random.Generator):
    """Yield ``(name, matrix R, shift, permutation)``: new positions are ``(R @ x + shift)[perm]``."""
    identity, no_shift, same = np.eye(3), np.zeros(3), np.arange(n_atoms)

    def rotation() -> np.ndarray:
        # rand_matrix draws from torch's global generator (it takes no generator argument): seed it
        # from ``rng`` inside a forked RNG state, so checks are reproducible and the caller's RNG is kept.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(rng.integers(2**62)))
            return o3.rand_matrix(dtype=torch.float64).numpy()

    def shift() -> np.ndarray:
        return rng.uniform(-10.0, 10.0, size=3)

    def permutation() -> np.ndarray:
        if n_atoms < 2:
            return same
        perm = rng.permutation(n_atoms)
        while np.array_equal(perm, same):
            perm = rng.permutation(n_atoms)
        return perm

    yield "rotation", rotation(), no_shift, same
    yield "translation", identity, shift(), same
    yield "permutation", identity, no_shift, permutation()
    yield "reflection", np.diag([-1.0, 1.0, 1.0]), no_shift, same
    yield "rotation+translation+permutation", rotation(), shift(), permutation()


def check_equivariance(
    model,
    molecules: Sequence[tuple[str, np.ndarray, np.ndarray]],
    trials: int = 3,
    dtype: str = "float64",
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> list[CheckResult]:
    """Run every transform ``trials`` times on each ``(name, numbers, positions)``; one result per
    molecule and transform (the worst trial)."""
    torch_dtype = torch.float64 if dtype == "float64" else torch.float32
    tolerance = TOLERANCE[dtype]
    model = model.to(device=device, dtype=torch_dtype).eval()
    rng = np.random.default_rng(seed)
    results = []
    with tf32_disabled():
        for name, numbers, positions in molecules:
            reference = _predict(model, numbers, positions, torch_dtype, device)
            worst: dict[str, tuple[float, float]] = {}
            for _ in range(trials):
                for transform, matrix, shift, perm in _transforms(len(numbers), rng):
                    moved = (positions @ matrix.T + shift)[perm]
                    out = _predict(model, numbers[perm], moved, torch_dtype, device)
                    err = _compare(reference, out, matrix)
                    previous = worst.get(transform, (0.0, 0.0))
                    worst[transform] = (max(previous[0], err[0]), max(previous[1], err[1]))
            for transform in TRANSFORMS:
                abs_err, rel_err = worst[transform]
                results.append(
                    CheckResult(name, transform, abs_err, rel_err, tolerance, rel_err <= tolerance)
                )
    return results


def random_model(seed: int = 0) -> SE3Transformer:
    """An untrained network of the paper's size (the ``base`` preset), its weights drawn with ``seed``, with
    an uncertainty head whose novelty term is on (identity whitening, every atom novel), so that its sigma
    is checked too."""
    torch.manual_seed(seed)
    model = SE3Transformer.from_config(preset("base", uncertainty_hidden=32))
    head = model.uncertainty
    with torch.no_grad():
        head.whitening.copy_(torch.eye(head.whitening.shape[1]).expand_as(head.whitening))
        head.novelty_scale.fill_(1e-3)
        head.novelty_sigma.fill_(1.0)
    return model
