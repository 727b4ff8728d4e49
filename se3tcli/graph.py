"""Molecules -> batched geometric graphs.

A batch concatenates the atoms of several molecules. Edges are directed ``src -> dst`` (messages flow
from the neighbour ``src = j`` to the receiving atom ``dst = i``), never cross molecules, never loop, and
join atoms closer than the cutoff. Graphs built here list each edge beside its reverse (edge ``2p + 1`` is
edge ``2p`` reversed), so that the model computes what depends on the distance alone once per pair.
Everything is pure torch without Python loops over molecules.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

DEFAULT_CUTOFF = 5.0  # Å
# Candidate pairs examined at once when building a radius graph; bounds memory for huge molecules.
_PAIR_CHUNK = 4_000_000
# Batches whose molecules have at most this many atoms test all pairs of each molecule, which is faster than
# the cell list up to about this size at liquid density (BENCHMARKS.md); larger ones use the cell list.
_ALL_PAIRS_ATOMS = 128
# Cells are this much wider than the cutoff, so that rounding never puts two neighbours two cells apart.
_CELL_MARGIN = 1.001


TENSOR_FIELDS = ("z", "pos", "mol_index", "edge_src", "edge_dst")  # Batch's tensors, in this order


@dataclass
class Batch:
    """A batch of molecules as one disconnected graph."""

    z: torch.Tensor  # [n_atoms] int64 atomic numbers
    pos: torch.Tensor  # [n_atoms, 3] Å, each molecule centred on its centroid
    mol_index: torch.Tensor  # [n_atoms] int64 molecule of each atom
    n_mol: int
    edge_src: torch.Tensor  # [n_edges] int64 neighbour j
    edge_dst: torch.Tensor  # [n_edges] int64 receiver i
    edges_paired: bool = False  # True: edge 2p + 1 is edge 2p reversed (every graph built by collate)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The tensor fields in :data:`TENSOR_FIELDS` order (what a CUDA graph takes as inputs)."""
        return tuple(getattr(self, name) for name in TENSOR_FIELDS)

    @classmethod
    def from_tensors(cls, tensors: Sequence[torch.Tensor], n_mol: int, edges_paired: bool) -> Batch:
        return cls(**dict(zip(TENSOR_FIELDS, tensors, strict=True)), n_mol=n_mol, edges_paired=edges_paired)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Batch:
        """On ``device``; positions also in ``dtype`` if given (the index tensors stay int64)."""
        moved = [t.to(device) for t in self.tensors()]
        moved[TENSOR_FIELDS.index("pos")] = self.pos.to(device=device, dtype=dtype or self.pos.dtype)
        return Batch.from_tensors(moved, self.n_mol, self.edges_paired)

    @property
    def n_atoms_per_mol(self) -> torch.Tensor:  # [n_mol] int64
        # index_add_, not bincount: bincount's output size depends on the data (a device sync on CUDA,
        # which CUDA-graph capture forbids)
        counts = torch.zeros(self.n_mol, dtype=torch.long, device=self.mol_index.device)
        return counts.index_add_(0, self.mol_index, torch.ones_like(self.mol_index))


def radius_graph(
    pos: torch.Tensor, mol_index: torch.Tensor, n_mol: int, cutoff: float = DEFAULT_CUTOFF
) -> tuple[torch.Tensor, torch.Tensor]:
    """Directed edges between distinct atoms of the same molecule closer than ``cutoff`` (Å).

    ``mol_index`` must be sorted (atoms of a molecule contiguous). Returns ``(src, dst)`` in reverse pairs:
    edge ``2p`` goes from the higher to the lower atom index of pair p, edge ``2p + 1`` back; pairs are
    sorted by their lower, then their higher atom index. Where no molecule has more than
    ``_ALL_PAIRS_ATOMS`` atoms, all pairs of each molecule are tested; otherwise only the atoms of adjacent
    cells (:func:`_cell_runs`), so time and memory grow about linearly with the atoms at a given density.
    """
    device = pos.device
    n_atoms = pos.shape[0]
    if n_atoms == 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty
    counts = torch.bincount(mol_index, minlength=n_mol)  # [n_mol]
    by_cells = int(counts.max()) > _ALL_PAIRS_ATOMS
    if by_cells:
        order, run_start, run_len = _cell_runs(pos, mol_index, n_mol, cutoff)
    else:
        order, run_start, run_len = _molecule_runs(mol_index, counts)
    pairs_per_atom = run_len.sum(1)  # [n_atoms] candidate neighbours of each atom
    srcs, dsts = [], []
    # Chunks of receiving atoms so that the candidate pairs of one chunk stay below _PAIR_CHUNK.
    cum_pairs = torch.cumsum(pairs_per_atom, 0)
    first = 0
    while first < n_atoms:
        base = int(cum_pairs[first - 1]) if first > 0 else 0
        last = int(torch.searchsorted(cum_pairs, torch.tensor(base + _PAIR_CHUNK, device=device), right=True))
        dst_atoms = torch.arange(first, min(max(last, first + 1), n_atoms), device=device)
        lens = run_len[dst_atoms].reshape(-1)  # [chunk * runs] candidates in each run
        dst = torch.repeat_interleave(dst_atoms, pairs_per_atom[dst_atoms])
        # position of each candidate inside its run -> its place in `order` -> the neighbour atom
        within = torch.arange(dst.numel(), device=device) - torch.repeat_interleave(
            torch.cumsum(lens, 0) - lens, lens
        )
        src = order[torch.repeat_interleave(run_start[dst_atoms].reshape(-1), lens) + within]
        dist2 = (pos[src] - pos[dst]).pow(2).sum(-1)
        keep = (src > dst) & (dist2 < cutoff * cutoff)  # each pair once; its reverse is added below
        high, low = src[keep], dst[keep]
        if by_cells:  # all pairs come out sorted; cells visit neighbours out of order
            # the receivers of a chunk ascend, and chunks follow each other: sorting inside a chunk suffices
            pair_order = torch.argsort(low * n_atoms + high)
            high, low = high[pair_order], low[pair_order]
        srcs.append(torch.stack([high, low], dim=1).reshape(-1))
        dsts.append(torch.stack([low, high], dim=1).reshape(-1))
        first = int(dst_atoms[-1]) + 1
    return torch.cat(srcs), torch.cat(dsts)


def _molecule_runs(mol_index: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Candidates of every atom: its whole molecule, as one run of atom indices.

    Returns ``(order [n_atoms], run_start [n_atoms, 1], run_len [n_atoms, 1])``: the candidates of atom i
    are ``order[run_start[i, r] : run_start[i, r] + run_len[i, r]]`` for each run r.
    """
    starts = torch.cumsum(counts, 0) - counts  # [n_mol] first atom of each molecule
    order = torch.arange(mol_index.numel(), device=mol_index.device)
    return order, starts[mol_index][:, None], counts[mol_index][:, None]


def _cell_runs(
    pos: torch.Tensor, mol_index: torch.Tensor, n_mol: int, cutoff: float
) -> tuple[torch.Tensor, ...]:
    """Candidates of every atom: the atoms of its own and the 26 adjacent cells of its molecule's grid.

    Each molecule gets a grid of cubic cells at least ``cutoff`` wide (wider where the molecule spans more
    cells than an int64 key can number), so every neighbour lies in an adjacent cell. Atoms are sorted by
    the key of their (molecule, cell); each adjacent cell is one run of that order (empty if unoccupied).
    Returns ``(order [n_atoms], run_start [n_atoms, 27], run_len [n_atoms, 27])`` as
    :func:`_molecule_runs`.
    """
    device = pos.device
    # float64 keeps the cells exact. Non-finite coordinates count as 0 here and absurd ones as ±1e300 Å, so
    # every atom has a cell; the distance test, on the true positions, still rejects such atoms.
    p = torch.nan_to_num(pos.double(), nan=0.0, posinf=0.0, neginf=0.0).clamp(-1e300, 1e300)  # [n, 3] Å
    by_atom = mol_index[:, None].expand(-1, 3)
    lo = torch.full((n_mol, 3), math.inf, dtype=p.dtype, device=device).scatter_reduce(0, by_atom, p, "amin")
    hi = torch.full((n_mol, 3), -math.inf, dtype=p.dtype, device=device).scatter_reduce(0, by_atom, p, "amax")
    # key = ((molecule * B + x) * B + y) * B + z < 2**62, with cell coordinates x, y, z in 1 .. B - 2 so
    # that the adjacent cells' coordinates (-1 / +1) stay in 0 .. B - 1
    axis_bits = (62 - n_mol.bit_length()) // 3
    width = 1 << axis_bits  # B
    cells = width - 2  # cells per axis at most
    side = torch.clamp((hi - lo).amax(1) / (cells - 1), min=cutoff * _CELL_MARGIN)  # [n_mol] Å
    cell = ((p - lo[mol_index]) / side[mol_index, None]).floor().long().clamp_(0, cells - 1) + 1  # [n, 3]
    key = ((mol_index * width + cell[:, 0]) * width + cell[:, 1]) * width + cell[:, 2]  # [n_atoms]
    order = torch.argsort(key)
    cell_keys, cell_atoms = torch.unique_consecutive(key[order], return_counts=True)  # [n_cells]
    cell_first = torch.cumsum(cell_atoms, 0) - cell_atoms  # [n_cells] first place of each cell in order
    shifts = torch.tensor(
        [(dx * width + dy) * width + dz for dx, dy, dz in itertools.product((-1, 0, 1), repeat=3)],
        device=device,
    )  # [27] key differences of the adjacent cells
    wanted = key[:, None] + shifts  # [n_atoms, 27]
    at = torch.searchsorted(cell_keys, wanted).clamp_(max=cell_keys.numel() - 1)
    occupied = cell_keys[at] == wanted
    return order, cell_first[at], torch.where(occupied, cell_atoms[at], 0)


def collate(
    molecules: Sequence[tuple[np.ndarray, np.ndarray]],
    cutoff: float = DEFAULT_CUTOFF,
    dtype: torch.dtype = torch.float32,
) -> Batch:
    """Batch ``(numbers [n], positions [n, 3] Å)`` pairs into one graph.

    Each molecule is centred on its centroid in float64 before the cast to ``dtype``, so coordinates far
    from the origin (1e6 Å) keep their precision; predictions are translation invariant.
    """
    n_mol = len(molecules)
    counts = np.fromiter((len(numbers) for numbers, _ in molecules), dtype=np.int64, count=n_mol)
    if n_mol and counts.sum() > 0:
        z = np.concatenate([np.asarray(numbers, dtype=np.int64) for numbers, _ in molecules])
        pos64 = np.concatenate(
            [np.asarray(p, dtype=np.float64).reshape(-1, 3) for _, p in molecules], axis=0
        )  # [n_atoms, 3] Å
    else:
        z = np.zeros(0, dtype=np.int64)
        pos64 = np.zeros((0, 3))
    mol_index_np = np.repeat(np.arange(n_mol), counts)
    centroids = np.zeros((n_mol, 3))
    np.add.at(centroids, mol_index_np, pos64)
    centroids /= np.maximum(counts, 1)[:, None]
    pos = torch.from_numpy(pos64 - centroids[mol_index_np]).to(dtype)
    mol_index = torch.from_numpy(mol_index_np)
    src, dst = radius_graph(pos, mol_index, n_mol, cutoff)
    return Batch(
        z=torch.from_numpy(z),
        pos=pos,
        mol_index=mol_index,
        n_mol=n_mol,
        edge_src=src,
        edge_dst=dst,
        edges_paired=True,
    )
