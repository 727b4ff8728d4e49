"""End-to-end ``se3t predict`` on SMILES with 1, 2, ... conformer workers: molecules/s and peak memory.

Takes N QM9 SMILES, evenly spaced through the data set (read from the CSV files of the ``qm9pack`` wheel;
without it, the repository's sample molecules written as SMILES and cycled), writes them as one ``.smi``
file, and runs ``se3t predict input.smi -o out.csv --device cpu --workers W`` in a subprocess for each W,
one after the other in the same run, so that the ratios compare like with like on a shared machine. Wall
time covers start-up, parsing, conformer generation (ETKDGv3 + MMFF94), inference and writing. Memory is
the peak over time of the sum of RSS (and of PSS) over se3t and all its processes, and CPU their user +
system seconds, sampled every 0.2 s from /proc (Linux).

    python benchmarks/smiles_throughput.py --n 5000 --workers 1 2 --json
"""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
_TICKS = os.sysconf("SC_CLK_TCK")


def qm9_smiles(n: int) -> list[str]:
    """``n`` QM9 SMILES (named by their QM9 index), evenly spaced through the data set."""
    spec = importlib.util.find_spec("qm9pack")
    if spec is None or not spec.submodule_search_locations:
        return []
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    csv.field_size_limit(1 << 24)
    every: list[str] = []
    for path in sorted(data.glob("qm9_part*.csv")):
        with open(path, newline="", encoding="utf-8") as handle:
            every += [f"{row['SMILES']} qm9_{row['Index']}" for row in csv.DictReader(handle)]
    return [every[i * len(every) // n] for i in range(n)] if len(every) >= n else []


def sample_smiles(n: int) -> list[str]:
    """The sample molecules as SMILES, cycled to ``n``."""
    from rdkit import Chem

    supplier = Chem.SDMolSupplier(str(ROOT / "sample_molecules" / "qm9_sample.sdf"))
    unique = [Chem.MolToSmiles(Chem.RemoveHs(m)) for m in supplier if m is not None]
    return [f"{unique[i % len(unique)]} sample_{i}" for i in range(n)]


def sample_tree(root: int) -> tuple[int, int, dict[int, float]]:
    """RSS and PSS (KiB) of process ``root`` and all its descendants, and the CPU seconds of each so far.

    PSS shares a page among the processes that map it: forked workers share most of theirs with their
    server, so the sum of RSS counts those pages several times and the sum of PSS once.
    """
    stats: dict[int, list[str]] = {}  # the /proc/PID/stat fields after the command name
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stats[int(entry)] = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process has gone meanwhile
            continue
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = {pid for pid, fields in stats.items() if int(fields[1]) == parent} - tree
        tree |= children
        frontier += children
    rss = pss = 0
    cpu: dict[int, float] = {}
    for pid in tree & stats.keys():
        fields = stats[pid]
        cpu[pid] = (int(fields[11]) + int(fields[12])) / _TICKS  # utime + stime
        rss += int(fields[21]) * _PAGE_KB
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
        except OSError:
            continue
        pss += next((int(line.split()[1]) for line in rollup if line.startswith("Pss:")), 0)
    return rss, pss, cpu


def run_one(smi: Path, workers: int, model: str | None, timeout: float) -> dict:
    out = smi.with_name(f"out_{workers}.csv")
    command = ["se3t", "predict", str(smi), "-o", str(out), "--overwrite", "--device", "cpu"]
    command += ["--workers", str(workers)]
    command += ["--conformer-timeout", f"{timeout:g}"] + (["--model", model] if model else [])
    peak_rss = peak_pss = 0
    cpu: dict[int, float] = {}  # the last CPU seconds seen of each process
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    done = threading.Event()

    def sample() -> None:
        nonlocal peak_rss, peak_pss
        while not done.wait(0.2):
            rss, pss, seconds = sample_tree(child.pid)
            peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
            cpu.update(seconds)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stderr = child.communicate()[1]
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({child.returncode}): {stderr[-500:]}")
    with open(out, newline="") as handle:
        statuses = Counter(row["status"] for row in csv.DictReader(handle))
    n = sum(statuses.values())
    shown = ["se3t", "predict", "input.smi", "-o", "out.csv", *command[6:]]
    result = {
        "workers": workers,
        "molecules": n,
        "statuses": dict(statuses),
        "wall_s": round(wall, 1),
        "mol_per_s": round(n / wall, 1),
        "cpu_s": round(sum(cpu.values()), 1),  # se3t and its workers, to the last sample
        "peak_rss_mb": round(peak_rss / 1024, 1),
        "peak_pss_mb": round(peak_pss / 1024, 1),
        "command": " ".join(shown),
    }
    print(json.dumps(result), file=sys.stderr, flush=True)  # each run as it ends
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000, help="SMILES to predict")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--model", default=None, help="model name or checkpoint (default: bundled)")
    parser.add_argument("--conformer-timeout", type=float, default=60.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    smiles = qm9_smiles(args.n)
    source = "QM9 (qm9pack), evenly spaced"
    if len(smiles) < args.n:
        smiles, source = sample_smiles(args.n), "sample molecules, cycled"
    with tempfile.TemporaryDirectory() as tmp:
        smi = Path(tmp) / "input.smi"
        smi.write_text("".join(line + "\n" for line in smiles))
        results = [run_one(smi, w, args.model, args.conformer_timeout) for w in args.workers]
    base = results[0]["mol_per_s"]
    for r in results:
        r["speedup"] = round(r["mol_per_s"] / base, 2)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host": f"{platform.machine()} {os.cpu_count()} CPUs",
        "python": sys.version.split()[0],
        "smiles": source,
        "results": results,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for r in results:
            print(
                f"{r['workers']} worker(s): {r['mol_per_s']:>6} mol/s ({r['speedup']}x), "
                f"peak RSS {r['peak_rss_mb']} MB, {r['statuses']}"
            )


if __name__ == "__main__":
    main()
