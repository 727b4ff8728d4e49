"""Seeded train/validation/test splits and per-element atom reference energies."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from se3tcli.data.qm9 import write_npz_atomic

QM9_SPLIT_SIZES = (100_000, 17_748, 13_083)  # Cormorant / SE(3)-Transformer paper: train, val, test
SPLIT_NAMES = ("train", "val", "test")


def _split_sizes(n: int, sizes: tuple[int, int, int] | None) -> tuple[int, int, int]:
    """Resolve the requested sizes for ``n`` molecules (80/10/10 by default, scaled down if needed)."""
    if sizes is None:
        n_val = n_test = n // 10
        if n >= 3:
            n_val, n_test = max(n_val, 1), max(n_test, 1)
        return n - n_val - n_test, n_val, n_test
    if len(sizes) != 3 or any(int(s) != s or s < 0 for s in sizes):
        raise ValueError(f"split sizes must be three non-negative integers, got {sizes}")
    requested = sum(sizes)
    if n >= requested:
        return tuple(int(s) for s in sizes)  # type: ignore[return-value]
    # Fewer molecules than requested (e.g. --limit): keep the proportions, every requested part non-empty;
    # the rounding remainder goes to train.
    scaled = [max(1, s * n // requested) if s else 0 for s in sizes]
    if sizes[0]:
        scaled[0] = n - scaled[1] - scaled[2]
    if sum(scaled) > n or (sizes[0] and scaled[0] < 1):
        raise ValueError(f"cannot split {n} molecules in proportion to {sizes}: too few molecules")
    return scaled[0], scaled[1], scaled[2]


def random_split(n: int, sizes: tuple[int, int, int] | None, seed: int) -> dict[str, np.ndarray]:
    """Disjoint random ``train``/``val``/``test`` indices into ``range(n)`` (int64, each sorted).

    ``sizes=None`` splits 80/10/10; if ``n`` is below ``sum(sizes)`` the sizes are scaled proportionally,
    and if ``n`` exceeds it the remaining molecules are left out.
    """
    if n < 0:
        raise ValueError(f"number of molecules must be non-negative, got {n}")
    n_train, n_val, n_test = _split_sizes(n, sizes)
    perm = np.random.default_rng(seed).permutation(n)
    bounds = np.cumsum([0, n_train, n_val, n_test])
    return {
        name: np.sort(perm[start:stop]).astype(np.int64)
        for name, start, stop in zip(SPLIT_NAMES, bounds[:-1], bounds[1:], strict=True)
    }


def save_split(path: str | Path, split: dict[str, np.ndarray], seed: int) -> None:
    """Write a split (and the seed that made it) to ``path`` (``splits.npz``) atomically."""
    missing = [name for name in SPLIT_NAMES if name not in split]
    if missing:
        raise ValueError(f"split lacks {', '.join(missing)}")
    write_npz_atomic(
        Path(path),
        seed=np.int64(seed),
        **{name: np.asarray(split[name], dtype=np.int64) for name in SPLIT_NAMES},
    )


def load_split(path: str | Path) -> dict[str, np.ndarray]:
    """Read a split written by :func:`save_split`: ``train``/``val``/``test`` int64 index arrays."""
    with np.load(Path(path), allow_pickle=False) as npz:
        missing = [name for name in SPLIT_NAMES if name not in npz.files]
        if missing:
            raise ValueError(f"{path} is not a split file: it lacks {', '.join(missing)}")
        return {name: npz[name].astype(np.int64) for name in SPLIT_NAMES}


def element_counts(numbers: np.ndarray, offsets: np.ndarray, elements: Sequence[int]) -> np.ndarray:
    """Count each element per molecule: [n_mol, len(elements)] float64; other elements raise ValueError."""
    numbers = np.asarray(numbers, dtype=np.int64)  # [n_atoms_total]
    offsets = np.asarray(offsets, dtype=np.int64)  # [n_mol + 1]
    elements = np.asarray(elements, dtype=np.int64)  # [n_el]
    n_mol, n_el = len(offsets) - 1, len(elements)
    if offsets[0] != 0 or offsets[-1] != len(numbers) or (np.diff(offsets) < 0).any():
        raise ValueError("offsets must rise from 0 to the number of atoms")
    if numbers.min(initial=1) < 1:
        raise ValueError("atomic numbers must be positive")
    if len(np.unique(elements)) != n_el or (elements < 1).any():
        raise ValueError(f"elements must be distinct atomic numbers, got {elements.tolist()}")
    # Column of each atomic number (-1: not in elements).
    column = np.full(max(int(elements.max(initial=0)), int(numbers.max(initial=0))) + 1, -1, dtype=np.int64)
    column[elements] = np.arange(n_el)
    cols = column[numbers]  # [n_atoms_total]
    if (cols < 0).any():
        raise ValueError(
            f"atoms of elements {np.unique(numbers[cols < 0]).tolist()} not in {elements.tolist()}"
        )
    mol = np.repeat(np.arange(n_mol), np.diff(offsets))  # [n_atoms_total] molecule of each atom
    counts = np.bincount(mol * n_el + cols, minlength=n_mol * n_el)
    return counts.reshape(n_mol, n_el).astype(np.float64)


def fit_atom_refs(
    numbers: np.ndarray, offsets: np.ndarray, y: np.ndarray, elements: Sequence[int]
) -> np.ndarray:
    """Least-squares reference energy per element so that ``y ≈ element_counts @ refs``.

    ``y`` is [n_mol] (or [n_mol, k] for k targets at once); the result is [len(elements)] (or
    [len(elements), k]) float64 in the unit of ``y``. Elements absent from the data get 0.
    """
    counts = element_counts(numbers, offsets, elements)  # [n_mol, n_el]
    y = np.asarray(y, dtype=np.float64)
    if y.ndim not in (1, 2) or len(y) != len(counts):
        raise ValueError(f"y must be [n_mol] or [n_mol, k] with n_mol={len(counts)}, got shape {y.shape}")
    refs, *_ = np.linalg.lstsq(counts, y, rcond=None)
    return refs
