"""Receiver blocks of the fused CPU kernel: edges sorted by receiver, cut between whole molecules.

Per block, one matrix product makes the frame coefficients of its edges (rows x S·2·C numbers, kept near
``BLOCK_COEFFICIENTS`` so that they stay in cache), then one kernel call shares the block's receivers
between the OpenMP threads. Blocks hold whole molecules, so one molecule above ``MAX_BLOCK_COEFFICIENTS``
(64 MB in float32; ~18,000 pairs of atoms at 32 channels and lmax 2) cannot run in the kernel: the PyTorch
path bounds its memory by blocks of edges instead.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

BLOCK_COEFFICIENTS = 500_000
MAX_BLOCK_COEFFICIENTS = 16_000_000


@dataclass(frozen=True)
class ReceiverBlocks:
    """Edges sorted by receiver, cut into blocks that own all the edges of their receivers.

    ``order[offsets[i]:offsets[i + 1]]`` are the edges into node i; block b covers the receivers
    ``nodes[b]:nodes[b + 1]`` and the coefficient rows ``rows[b]:rows[b + 1]`` (one row per reverse pair of
    edges, or per edge), and every edge into those receivers reads a row inside that range.
    """

    order: torch.Tensor  # [E] int64
    offsets: torch.Tensor  # [n + 1] int64
    nodes: list[int]
    rows: list[int]

    @property
    def largest_rows(self) -> int:
        return max(last - first for first, last in itertools.pairwise(self.rows))


def receiver_blocks(dst: torch.Tensor, n_nodes: int, edges_per_row: int, target_rows: int) -> ReceiverBlocks:
    """Blocks of about ``target_rows`` coefficient rows (edge e reads row ``e // edges_per_row``). A cut
    between receivers is valid where every edge before it (in receiver order) reads an earlier row than
    every edge after it: between molecules for radius graphs, whose reverse pairs are sorted by atom; an
    edge list in any other order gets fewer blocks, at worst one."""
    order = torch.argsort(dst, stable=True)
    offsets = torch.zeros(n_nodes + 1, dtype=torch.long)
    torch.cumsum(torch.bincount(dst, minlength=n_nodes), 0, out=offsets[1:])
    rows = order // edges_per_row  # [E], in receiver order
    n_rows = (dst.shape[0] + edges_per_row - 1) // edges_per_row
    node_cuts, row_cuts = [0], [0]
    if n_rows > target_rows:
        before = torch.cummax(rows, 0).values  # the last row read up to each position
        after = torch.cummin(rows.flip(0), 0).values.flip(0)  # the first row read from each position on
        node = torch.arange(1, n_nodes)
        at = offsets[1:-1]  # position in receiver order where node n starts
        inside = (at > 0) & (at < rows.shape[0])
        node, at = node[inside], at[inside]
        valid = before[at - 1] < after[at]
        node, first_row = node[valid], after[at[valid]]
        chosen = torch.searchsorted(first_row, torch.arange(target_rows, n_rows, target_rows))
        for i in torch.unique(chosen[chosen < first_row.shape[0]]).tolist():
            node_cuts.append(int(node[i]))
            row_cuts.append(int(first_row[i]))
    node_cuts.append(n_nodes)
    row_cuts.append(n_rows)
    # The backward gives every edge of a block one gradient slot: a block's edges must fill its rows.
    edges = offsets[torch.tensor(node_cuts)].diff()
    if not torch.equal(edges, torch.tensor(row_cuts).diff() * edges_per_row):
        raise ValueError(f"{dst.shape[0]} edges do not form whole rows of {edges_per_row} (reverse pairs)")
    return ReceiverBlocks(order, offsets, node_cuts, row_cuts)


def layer_blocks(geometry, n_nodes: int, coefficients_per_row: int) -> ReceiverBlocks | None:
    """The receiver blocks of a layer whose edges have ``coefficients_per_row`` frame coefficients per row
    (S·2·C), planned once per forward pass (kept in ``geometry.derived``), or None where one molecule's
    rows exceed ``MAX_BLOCK_COEFFICIENTS``."""
    rows_per_block = max(1, BLOCK_COEFFICIENTS // coefficients_per_row)
    key = ("receiver_blocks", rows_per_block)
    if key not in geometry.derived:  # the same for every layer of a forward pass
        geometry.derived[key] = receiver_blocks(geometry.dst, n_nodes, geometry.edges_per_row, rows_per_block)
    blocks = geometry.derived[key]
    return None if blocks.largest_rows * coefficients_per_row > MAX_BLOCK_COEFFICIENTS else blocks
