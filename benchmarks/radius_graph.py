"""Radius graphs of large molecules: the all-pairs neighbour search against the cell list.

Each case is a batch of ``--molecules`` molecules of N atoms, random in a cube at the density of liquid
water (0.1 atoms/Å³), 5 Å cutoff, float32 as in ``collate``. It times ``se3tcli.graph.radius_graph`` with
each neighbour search (the median of ``--repeats``; all pairs only up to ``--all-pairs-max`` atoms in all,
since it grows as N²) and checks that both give the same edges in the same order.

    python benchmarks/radius_graph.py --sizes 5000 20000 100000 --all-pairs-max 20000
    python benchmarks/radius_graph.py --sizes 30 100 300 1000 --molecules 64   # where cells start to pay
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time

import torch

from se3tcli import graph

DENSITY = 0.1  # atoms/Å³, liquid water


def batch(n_atoms: int, n_mol: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    side = (n_atoms / DENSITY) ** (1 / 3)  # Å
    pos = torch.rand(n_mol * n_atoms, 3, generator=generator) * side  # [n_mol * n_atoms, 3] Å
    return pos, torch.arange(n_mol).repeat_interleave(n_atoms)


def timed(search: str, pos: torch.Tensor, mol_index: torch.Tensor, n_mol: int, repeats: int):
    """Median seconds of ``radius_graph`` with ``search`` ("all_pairs" or "cells"), and its edges."""
    saved = graph._ALL_PAIRS_ATOMS
    graph._ALL_PAIRS_ATOMS = pos.shape[0] if search == "all_pairs" else 0
    try:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            edges = graph.radius_graph(pos, mol_index, n_mol)
            times.append(time.perf_counter() - start)
    finally:
        graph._ALL_PAIRS_ATOMS = saved
    return statistics.median(times), edges


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000, 100000], help="atoms/molecule")
    parser.add_argument("--molecules", type=int, default=1, help="molecules per batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--all-pairs-max", type=int, default=20000, help="skip all pairs past this many atoms"
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for n_atoms in args.sizes:
        pos, mol_index = batch(n_atoms, args.molecules)
        row = {"atoms_per_molecule": n_atoms, "molecules": args.molecules}
        row["cells_s"], (src, dst) = timed("cells", pos, mol_index, args.molecules, args.repeats)
        row["directed_edges"] = src.numel()
        if pos.shape[0] <= args.all_pairs_max:
            row["all_pairs_s"], (ref_src, ref_dst) = timed("all_pairs", pos, mol_index, args.molecules, 1)
            row["identical"] = torch.equal(src, ref_src) and torch.equal(dst, ref_dst)
        rows.append(row)
        print(json.dumps(row) if args.json else row, flush=True)
    if args.json:
        meta = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
            "torch": torch.__version__,
            "threads": args.threads,
            "machine": platform.machine(),
        }
        print(json.dumps({"meta": meta, "rows": rows}))


if __name__ == "__main__":
    main()
