"""Batches bounded by atoms and edges, and padding to one static shape (for CUDA graphs).

QM9 molecules have 3 to 29 atoms and about 6 to 800 directed 5 Å edges, so batches of a fixed number of
molecules vary several-fold in cost and memory. :func:`size_bounded_batches` fills each batch, in the
given order, until the next molecule would exceed an atom, edge or molecule budget. :func:`pad_batch` fills
a batch up to a :class:`StaticShape` with a *padding molecule* in the last molecule slot: its atoms sit on
a line 1.5 Å apart and its edges join consecutive padding atoms, so it never touches a real molecule and
its prediction is simply dropped. Every batch of a run then has the same tensor shapes, which is what a
captured CUDA graph needs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from se3tcli.graph import Batch, collate

Geometry = tuple[np.ndarray, np.ndarray]  # atomic numbers [n], positions [n, 3] Å
PADDING_SPACING = 1.5  # Å between consecutive padding atoms
_SIZE_CHUNK = 4096  # molecules collated at once when counting edges


@dataclass(frozen=True)
class StaticShape:
    """Tensor sizes of a padded batch; the last molecule slot belongs to the padding molecule."""

    n_atoms: int
    n_edges: int
    n_mol: int

    @classmethod
    def for_budget(cls, max_atoms: int, max_edges: int, max_molecules: int) -> StaticShape:
        """Room for any batch within the budgets, plus two padding atoms, at least one pair of padding
        edges and the padding molecule. The edge count is even, so that paired edges stay paired."""
        n_edges = max_edges + 2 - max_edges % 2
        return cls(n_atoms=max_atoms + 2, n_edges=n_edges, n_mol=max_molecules + 1)


def graph_sizes(
    molecule: Callable[[int], Geometry], indices: Sequence[int], cutoff: float
) -> tuple[np.ndarray, np.ndarray]:
    """Atoms and directed edges (within ``cutoff`` Å) of each molecule ``molecule(i)`` for ``indices``."""
    indices = np.asarray(indices, dtype=np.int64)
    atoms = np.zeros(len(indices), dtype=np.int64)
    edges = np.zeros(len(indices), dtype=np.int64)
    for start in range(0, len(indices), _SIZE_CHUNK):
        part = slice(start, start + _SIZE_CHUNK)
        batch = collate([molecule(int(i)) for i in indices[part]], cutoff)
        atoms[part] = batch.n_atoms_per_mol.numpy()
        per_mol = torch.zeros(batch.n_mol, dtype=torch.long).index_add_(
            0, batch.mol_index[batch.edge_dst], torch.ones_like(batch.edge_dst)
        )
        edges[part] = per_mol.numpy()
    return atoms, edges


def size_bounded_batches(
    order: np.ndarray,
    atoms: np.ndarray,
    edges: np.ndarray,
    max_atoms: int | None,
    max_edges: int | None,
    max_molecules: int,
) -> list[np.ndarray]:
    """Consecutive runs of ``order`` whose atoms, edges and molecule count stay within the budgets.

    ``atoms``/``edges`` are indexed like the values of ``order``. A molecule that alone exceeds a budget
    raises ``ValueError`` (a batch must hold at least one molecule).
    """
    max_atoms = max_atoms or np.iinfo(np.int64).max
    max_edges = max_edges or np.iinfo(np.int64).max
    too_big = (atoms[order] > max_atoms) | (edges[order] > max_edges)
    if too_big.any():
        i = int(order[np.argmax(too_big)])
        raise ValueError(
            f"molecule {i} ({atoms[i]} atoms, {edges[i]} edges) does not fit the batch budget of "
            f"{max_atoms} atoms and {max_edges} edges; raise --max-atoms/--max-edges"
        )
    batches, start, n_atoms, n_edges = [], 0, 0, 0
    for position, i in enumerate(order.tolist()):
        full = position - start >= max_molecules
        if full or n_atoms + atoms[i] > max_atoms or n_edges + edges[i] > max_edges:
            batches.append(order[start:position])
            start, n_atoms, n_edges = position, 0, 0
        n_atoms += atoms[i]
        n_edges += edges[i]
    if start < len(order):
        batches.append(order[start:])
    return batches


def pad_batch(batch: Batch, shape: StaticShape, element: int) -> Batch:
    """``batch`` filled up to ``shape`` with a padding molecule of atoms of atomic number ``element``.

    The real molecules keep their indices ``0 .. batch.n_mol - 1``; the padding molecule is molecule
    ``shape.n_mol - 1``. Needs at least two spare atoms (so padding edges have a length) and one spare
    molecule slot. Padding edges come in reverse pairs when the batch's edges do and their number is even,
    so the result stays paired.
    """
    n_atoms, n_edges = batch.z.shape[0], batch.edge_src.shape[0]
    pad_atoms, pad_edges = shape.n_atoms - n_atoms, shape.n_edges - n_edges
    if pad_atoms < 2 or pad_edges < 0 or batch.n_mol >= shape.n_mol:
        raise ValueError(
            f"a batch of {batch.n_mol} molecules, {n_atoms} atoms and {n_edges} edges does not fit "
            f"the static shape {shape} (it needs 2 spare atoms and 1 spare molecule)"
        )
    device, dtype = batch.pos.device, batch.pos.dtype
    first_pad = torch.arange(pad_atoms, device=device)
    pad_pos = torch.zeros(pad_atoms, 3, dtype=dtype, device=device)
    pad_pos[:, 0] = first_pad.to(dtype) * PADDING_SPACING
    paired = batch.edges_paired and pad_edges % 2 == 0
    edge = torch.arange(pad_edges, device=device)
    if paired:  # padding atom p -> p + 1, then back (pair p), for p = 0, 1, ... (cyclic)
        step, step_to = (edge // 2 + edge % 2) % pad_atoms, (edge // 2 + 1 - edge % 2) % pad_atoms
    else:  # a ring p -> p + 1
        step, step_to = edge % pad_atoms, (edge + 1) % pad_atoms
    return Batch(
        z=torch.cat([batch.z, torch.full((pad_atoms,), element, dtype=batch.z.dtype, device=device)]),
        pos=torch.cat([batch.pos, pad_pos]),
        mol_index=torch.cat(
            [batch.mol_index, torch.full((pad_atoms,), shape.n_mol - 1, dtype=torch.long, device=device)]
        ),
        n_mol=shape.n_mol,
        edge_src=torch.cat([batch.edge_src, n_atoms + step]),
        edge_dst=torch.cat([batch.edge_dst, n_atoms + step_to]),
        edges_paired=paired,
    )
