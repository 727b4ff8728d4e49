"""Molecules -> batched geometric graphs.

A batch concatenates the atoms of several molecules. Edges are directed ``src -> dst`` (messages flow
from the neighbour ``src = j`` to the receiving atom ``dst = i``), never cross molecules, never loop, and
join atoms closer than the cutoff. Graphs built here list each edge beside its reverse (edge ``2p + 1`` is
edge ``2p`` reversed), so that the model computes what depends on the distance alone once per pair.
Everything is pure torch without Python loops over molecules.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

DEFAULT_CUTOFF = 5.0  # Å
# Candidate pairs examined at once when building a radius graph; bounds memory for huge molecules.
_PAIR_CHUNK = 4_000_000


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
    sorted by their lower, then their higher atom index.
    """
    device = pos.device
    n_atoms = pos.shape[0]
    if n_atoms == 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty
    counts = torch.bincount(mol_index, minlength=n_mol)  # [n_mol]
    starts = torch.cumsum(counts, 0) - counts  # [n_mol] first atom of each molecule
    pairs_per_atom = counts[mol_index]  # [n_atoms] candidate neighbours of each atom (own molecule)
    srcs, dsts = [], []
    # Chunks of receiving atoms so that the candidate pairs of one chunk stay below _PAIR_CHUNK.
    cum_pairs = torch.cumsum(pairs_per_atom, 0)
    first = 0
    while first < n_atoms:
        base = int(cum_pairs[first - 1]) if first > 0 else 0
        last = int(torch.searchsorted(cum_pairs, torch.tensor(base + _PAIR_CHUNK, device=device), right=True))
        last = max(last, first + 1)
        dst_atoms = torch.arange(first, min(last, n_atoms), device=device)
        reps = pairs_per_atom[dst_atoms]
        dst = torch.repeat_interleave(dst_atoms, reps)
        # position of each candidate inside its receiver's run -> neighbour index in the same molecule
        run_start = torch.repeat_interleave(torch.cumsum(reps, 0) - reps, reps)
        within = torch.arange(dst.numel(), device=device) - run_start
        src = starts[mol_index[dst]] + within
        dist2 = (pos[src] - pos[dst]).pow(2).sum(-1)
        keep = (src > dst) & (dist2 < cutoff * cutoff)  # each pair once; its reverse is added below
        high, low = src[keep], dst[keep]
        srcs.append(torch.stack([high, low], dim=1).reshape(-1))
        dsts.append(torch.stack([low, high], dim=1).reshape(-1))
        first = int(dst_atoms[-1]) + 1
    return torch.cat(srcs), torch.cat(dsts)


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
