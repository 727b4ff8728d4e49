"""Tests of se3tcli.graph: radius graphs against a brute-force reference (both neighbour searches: all pairs
and the cell list), chunking, collate and centring."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import random_molecule  # noqa: I001 - the tests folder's shared helpers

from se3tcli import graph
from se3tcli.graph import collate, radius_graph


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP oversubscription on a busy CPU (10-100x faster).
    SE3T_TEST_THREADS overrides, as in conftest.py."""
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("SE3T_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["all_pairs", "cells"])
def search(request, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test with each neighbour search: "cells" makes every molecule use the cell list."""
    if request.param == "cells":
        monkeypatch.setattr(graph, "_ALL_PAIRS_ATOMS", 0)
    return request.param


def brute_force_edges(pos: np.ndarray, mol_index: np.ndarray, cutoff: float) -> set[tuple[int, int]]:
    """O(n²) reference: ordered pairs ``(src, dst)`` of distinct atoms of a molecule closer than cutoff."""
    diff = pos[:, None, :] - pos[None, :, :]
    dist2 = (diff**2).sum(-1)
    same = mol_index[:, None] == mol_index[None, :]
    close = same & (dist2 < cutoff * cutoff) & ~np.eye(len(pos), dtype=bool)
    dst, src = np.nonzero(close)
    return set(zip(src.tolist(), dst.tolist(), strict=True))


def edge_set(src: torch.Tensor, dst: torch.Tensor) -> set[tuple[int, int]]:
    return set(zip(src.tolist(), dst.tolist(), strict=True))


def check_graph(batch: graph.Batch, cutoff: float) -> None:
    src, dst = batch.edge_src, batch.edge_dst
    assert src.dtype == dst.dtype == torch.long and src.shape == dst.shape
    mol = batch.mol_index
    assert not bool((src == dst).any()), "self loops"
    assert bool((mol[src] == mol[dst]).all()), "cross-molecule edges"
    edges = edge_set(src, dst)
    assert len(edges) == src.numel(), "duplicate edges"
    assert edges == {(d, s) for s, d in edges}, "edges must be directed both ways"
    assert edges == brute_force_edges(batch.pos.double().numpy(), mol.numpy(), cutoff)
    # documented order: reverse pairs (higher -> lower atom, then back), sorted by lower, then higher atom
    assert batch.edges_paired and src.numel() % 2 == 0
    assert torch.equal(src[0::2], dst[1::2]) and torch.equal(dst[0::2], src[1::2])
    assert bool((src[0::2] > dst[0::2]).all())
    key = dst[0::2] * max(batch.pos.shape[0], 1) + src[0::2]
    assert bool((key[1:] > key[:-1]).all())


@pytest.mark.parametrize("cutoff", [1.7, 3.0, 5.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_radius_graph_matches_brute_force(seed: int, cutoff: float, search: str) -> None:
    rng = np.random.default_rng(seed)
    sizes = [1, 2, 5, 17, 1, 29, 9, 3]
    molecules = [random_molecule(rng, n) for n in rng.permutation(sizes)]
    batch = collate(molecules, cutoff=cutoff, dtype=torch.float64)
    assert batch.n_mol == len(sizes) and batch.pos.shape == (sum(sizes), 3)
    assert (
        batch.mol_index.tolist() == np.repeat(np.arange(len(sizes)), [len(z) for z, _ in molecules]).tolist()
    )
    check_graph(batch, cutoff)
    # each molecule sees exactly its own brute-force graph when collated on its own
    start = 0
    for z, p in molecules:
        alone = collate([(z, p)], cutoff=cutoff, dtype=torch.float64)
        inside = (batch.edge_dst >= start) & (batch.edge_dst < start + len(z))
        assert edge_set(batch.edge_src[inside] - start, batch.edge_dst[inside] - start) == edge_set(
            alone.edge_src, alone.edge_dst
        )
        start += len(z)


def test_radius_graph_float32_and_direct_call(search: str) -> None:
    rng = np.random.default_rng(5)
    molecules = [random_molecule(rng, n) for n in (12, 4, 20)]
    batch = collate(molecules, dtype=torch.float32)
    assert batch.pos.dtype == torch.float32
    check_graph(batch, graph.DEFAULT_CUTOFF)
    src, dst = radius_graph(batch.pos.double(), batch.mol_index, batch.n_mol, cutoff=2.5)
    assert edge_set(src, dst) == brute_force_edges(batch.pos.double().numpy(), batch.mol_index.numpy(), 2.5)


def test_one_atom_molecules_have_no_edges(search: str) -> None:
    rng = np.random.default_rng(2)
    single = [(np.array([8]), rng.uniform(-50, 50, (1, 3))) for _ in range(3)]
    batch = collate(single, dtype=torch.float64)
    assert batch.n_mol == 3 and batch.edge_src.numel() == 0 and batch.edge_dst.numel() == 0
    assert torch.equal(batch.pos, torch.zeros(3, 3, dtype=torch.float64))  # centred on themselves
    assert batch.n_atoms_per_mol.tolist() == [1, 1, 1]
    # mixed with a larger molecule: edges only inside the larger one
    mixed = collate([single[0], random_molecule(rng, 6), single[1]], dtype=torch.float64)
    check_graph(mixed, graph.DEFAULT_CUTOFF)
    assert mixed.edge_src.numel() == 6 * 5  # the 6-atom molecule is fully connected at 5 Å
    assert bool(((mixed.edge_src >= 1) & (mixed.edge_src <= 6)).all())
    assert mixed.n_atoms_per_mol.tolist() == [1, 6, 1]


def test_empty_batch() -> None:
    batch = collate([], dtype=torch.float32)
    assert batch.n_mol == 0
    assert batch.z.shape == (0,) and batch.pos.shape == (0, 3) and batch.mol_index.shape == (0,)
    assert batch.edge_src.shape == (0,) and batch.edge_dst.shape == (0,)
    assert batch.n_atoms_per_mol.shape == (0,)
    src, dst = radius_graph(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), 0)
    assert src.numel() == dst.numel() == 0


def test_molecule_without_atoms_in_a_batch(search: str) -> None:
    rng = np.random.default_rng(3)
    empty = (np.zeros(0, dtype=np.int64), np.zeros((0, 3)))
    batch = collate([empty, random_molecule(rng, 4), empty], dtype=torch.float64)
    assert batch.n_mol == 3 and batch.n_atoms_per_mol.tolist() == [0, 4, 0]
    check_graph(batch, graph.DEFAULT_CUTOFF)


@pytest.mark.parametrize("chunk", [1, 7, 50, 333])
def test_chunked_radius_graph_is_identical(monkeypatch: pytest.MonkeyPatch, chunk: int, search: str) -> None:
    rng = np.random.default_rng(4)
    molecules = [random_molecule(rng, n) for n in (30, 1, 8, 25, 2)]
    whole = collate(molecules, dtype=torch.float64)
    assert whole.pos.shape[0] ** 2 < graph._PAIR_CHUNK  # the default is a single chunk here
    monkeypatch.setattr(graph, "_PAIR_CHUNK", chunk)
    chunked = collate(molecules, dtype=torch.float64)
    assert torch.equal(chunked.edge_src, whole.edge_src)
    assert torch.equal(chunked.edge_dst, whole.edge_dst)
    check_graph(chunked, graph.DEFAULT_CUTOFF)


def _box(rng: np.random.Generator, n_atoms: int, density: float) -> np.ndarray:
    """``n_atoms`` uniform in a cube at ``density`` atoms/Å³ (liquid water: 0.1), [n, 3] Å."""
    side = (n_atoms / density) ** (1 / 3)
    return rng.uniform(0, side, (n_atoms, 3))


def test_large_molecules_use_cells_and_match_brute_force() -> None:
    """Past _ALL_PAIRS_ATOMS the cell list runs by default; it finds what all pairs find, in the same order,
    for dense and sparse boxes, flat and linear molecules, stacked atoms and cells at negative coordinates."""
    rng = np.random.default_rng(8)
    n = graph._ALL_PAIRS_ATOMS + 100  # about 1,000 atoms in all: the brute-force reference stays small
    line = np.zeros((n, 3))
    line[:, 0] = np.arange(n) * 1.2 - 200  # a chain: 8 neighbours within 5 Å
    flat = _box(rng, n, 0.02) * [1, 1, 0]
    stacked = np.repeat(rng.uniform(-3, 3, (n // 10, 3)), 10, axis=0)  # 10 atoms on every site
    shapes = [_box(rng, n, 0.1), _box(rng, n, 0.005) - 40, line, flat, stacked]
    molecules = [(np.full(len(p), 6), p) for p in shapes]
    batch = collate(molecules, dtype=torch.float64)
    check_graph(batch, graph.DEFAULT_CUTOFF)
    # the same graphs as the all-pairs search gives
    pairs = radius_graph(batch.pos, batch.mol_index, batch.n_mol, graph.DEFAULT_CUTOFF)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(graph, "_ALL_PAIRS_ATOMS", n)
        reference = radius_graph(batch.pos, batch.mol_index, batch.n_mol, graph.DEFAULT_CUTOFF)
    assert all(torch.equal(a, b) for a, b in zip(pairs, reference, strict=True))


def test_cells_of_a_molecule_spread_over_a_vast_volume(search: str) -> None:
    """Clusters 1e12 Å apart (too many cutoff-wide cells to number: the cells widen) and atoms at infinity or
    NaN (never neighbours, as in the brute force) still give the brute-force graph."""
    rng = np.random.default_rng(9)
    clusters = [_box(rng, 40, 0.05) + offset for offset in (-1e12, 0.0, 3e12)]
    pos = torch.from_numpy(np.concatenate(clusters))
    pos[5] = torch.tensor([np.inf, 0.0, 0.0])
    pos[6] = torch.tensor([np.nan, 1.0, 1.0])
    pos[7] = torch.tensor([-np.inf, np.inf, 0.0])
    mol_index = torch.zeros(len(pos), dtype=torch.long)
    src, dst = radius_graph(pos, mol_index, 1)
    with np.errstate(invalid="ignore"):
        assert edge_set(src, dst) == brute_force_edges(pos.numpy(), mol_index.numpy(), graph.DEFAULT_CUTOFF)
    assert src.numel() > 0 and not bool(torch.isin(torch.tensor([5, 6, 7]), src).any())


def test_collate_centres_in_float64_before_the_cast() -> None:
    """Molecules 1e6 Å from the origin keep float32 precision: collate centres them in float64 first."""
    rng = np.random.default_rng(6)
    z, p = random_molecule(rng, 15)
    near = collate([(z, p)], dtype=torch.float32)
    far_offset = np.array([1e6, -1e6, 3e6])
    far = collate([(z, p + far_offset), (z, p - far_offset)], dtype=torch.float32)
    centred = torch.from_numpy(p - p.mean(0))
    for part in (far.pos[:15], far.pos[15:], near.pos):
        # float32 rounding of ~3 Å coordinates (a cast before centring would be off by up to 0.1 Å)
        assert (part.double() - centred).abs().max().item() < 1e-6
    assert far.pos.double().mean(0).abs().max().item() < 1e-6
    assert torch.equal(far.edge_src[: near.edge_src.numel()], near.edge_src)
    naive = (torch.from_numpy(p + far_offset).float().double() - torch.from_numpy(far_offset)).numpy()
    assert np.abs(naive - p).max() > 1e-3  # the precision the centring protects


def test_batch_to_keeps_graph() -> None:
    rng = np.random.default_rng(7)
    batch = collate([random_molecule(rng, 5), random_molecule(rng, 3)], dtype=torch.float64)
    moved = batch.to("cpu", torch.float32)
    assert moved.pos.dtype == torch.float32 and moved.n_mol == 2
    assert torch.equal(moved.edge_src, batch.edge_src) and torch.equal(moved.edge_dst, batch.edge_dst)
