"""End-to-end ``se3t predict`` on large generated inputs: wall time and peak resident memory.

Writes N QM9 molecules (cycled from the QM9 cache, or from the sample SDF when the cache is absent) as one
multi-frame XYZ file, runs the installed ``se3t predict FILE -o out.csv`` in a subprocess and reports
molecules/s (parsing, inference and writing included) and the child's peak RSS. Flat memory means the
peak does not grow with N.

    python benchmarks/predict_scale.py --sizes 10000 100000 --json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SYMBOLS = {1: "H", 6: "C", 7: "N", 8: "O", 9: "F"}


def source_molecules(limit: int = 5000) -> list[tuple[np.ndarray, np.ndarray]]:
    try:
        from se3tcli.data.qm9 import load_qm9

        data = load_qm9()
        return [data.molecule(i) for i in range(min(limit, len(data)))]
    except Exception:  # noqa: BLE001 - no QM9: fall back to the sample molecules
        from se3tcli.io import read_molecules

        sample = Path(__file__).resolve().parents[1] / "sample_molecules" / "qm9_sample.sdf"
        return [(m.numbers, m.positions) for m in read_molecules([sample]) if m.ok]


def write_xyz(path: Path, n: int, molecules: list[tuple[np.ndarray, np.ndarray]]) -> None:
    with open(path, "w") as handle:
        for i in range(n):
            numbers, positions = molecules[i % len(molecules)]
            handle.write(f"{len(numbers)}\nmol_{i}\n")
            for z, (x, y, zc) in zip(numbers, positions, strict=True):
                handle.write(f"{SYMBOLS[int(z)]} {x:.6f} {y:.6f} {zc:.6f}\n")


def run_one(n: int, molecules, model: str | None, batch_size: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        xyz, out = Path(tmp) / "input.xyz", Path(tmp) / "out.csv"
        write_xyz(xyz, n, molecules)
        command = [
            "se3t",
            "predict",
            str(xyz),
            "-o",
            str(out),
            "--device",
            "cpu",
            "--batch-size",
            str(batch_size),
        ]
        if model:
            command += ["--model", model]
        start = time.perf_counter()
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own resource usage
        wall = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed")
        with open(out) as handle:
            rows = sum(1 for _ in handle) - 1
    return {
        "molecules": n,
        "rows_written": rows,
        "wall_s": round(wall, 1),
        "mol_per_s": round(n / wall, 1),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # ru_maxrss is in KiB on Linux
        "command": " ".join(["se3t", "predict", "input.xyz", "-o", "out.csv", *command[5:]]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--model", default=None, help="model name or checkpoint (default: bundled)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    molecules = source_molecules()
    results = [run_one(n, molecules, args.model, args.batch_size) for n in sorted(args.sizes)]
    report = {
        "date": datetime.date.today().isoformat(),
        "host": f"{platform.machine()} {platform.processor()}".strip(),
        "python": sys.version.split()[0],
        "results": results,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for r in results:
            print(f"{r['molecules']:>8} molecules: {r['mol_per_s']:>7} mol/s, peak RSS {r['peak_rss_mb']} MB")


if __name__ == "__main__":
    main()
