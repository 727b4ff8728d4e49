"""Everything a short GPU session does, in one time-boxed run: CUDA tests, throughput benchmarks and a
segment of the long training run (``campaign/qm9-multitask``, see TRAINING.md).

    SE3T_CACHE_DIR=<folder with qm9_v1.npz> python benchmarks/gpu_session.py RESULTS --budget 540

Stages, each under its own time limit (what does not fit in the remaining budget is skipped):

1. ``tests/test_cuda_graphs.py`` (graph replays equal the eager model);
2. ``bench.py`` on the campaign run's model (its ``config.json``), batch 512, fast / reference / CUDA
   graphs, with the device ceilings;
3. ``se3t train --resume`` of a copy of the campaign run, on the GPU, with CUDA graphs if stage 2 showed
   them working, until the budget less ``--reserve`` is spent (never a fresh run: the schedule, split and
   optimizer state are the campaign's);
4. ``bench.py`` on ``base`` (batch 128), then on the campaign's model with bf16 autocast.

RESULTS receives ``session.log``, one JSON per benchmark and ``run.tar`` (the continued run directory:
unpack it over ``campaign/qm9-multitask`` and commit it).
Needs torch, e3nn, numpy, typer and rich only: the QM9 cache stands in for qm9pack.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CAMPAIGN = ROOT / "campaign" / "qm9-multitask"
TRAIN_SETUP_S = 40.0  # data, molecule sizes, capture, and the last checkpoint


class Session:
    def __init__(self, results: Path, budget: float, dry_run: bool):
        self.results = results
        self.deadline = time.monotonic() + budget
        self.dry_run = dry_run
        self.log = (results / "session.log").open("a")
        self.env = os.environ | {"PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def say(self, text: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')} {self.left():6.0f}s left] {text}"
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()

    def run(self, name: str, argv: list[str], limit: float, stdout: Path | None = None) -> int | None:
        """Run ``argv`` (stderr, and stdout unless ``stdout``, to the log) for at most ``limit`` seconds;
        ``None`` when skipped for lack of time."""
        limit = min(limit, self.left() - 5)
        if limit < 10:
            self.say(f"{name}: skipped ({self.left():.0f}s left)")
            return None
        self.say(f"{name}: {' '.join(argv)} (limit {limit:.0f}s)")
        started = time.monotonic()
        sink = stdout.open("w") if stdout else self.log
        try:
            code = subprocess.run(
                argv, cwd=ROOT, env=self.env, stdout=sink, stderr=self.log, timeout=limit
            ).returncode
        except subprocess.TimeoutExpired:
            code = 124
        except OSError as exc:  # e.g. the program is missing
            self.say(f"{name}: {exc}")
            code = 127
        finally:
            if stdout:
                sink.close()
        self.say(f"{name}: exit {code} after {time.monotonic() - started:.0f}s")
        return code

    def bench(self, name: str, extra: list[str], limit: float) -> dict | None:
        path = self.results / f"bench-{name}.json"
        device = (
            ["--device", "cpu", "--steps", "1", "--repeats", "1"] if self.dry_run else ["--device", "cuda"]
        )
        code = self.run(
            f"bench {name}", [sys.executable, "benchmarks/bench.py", *device, *extra, "--json"], limit, path
        )
        if code != 0:
            return None
        report = json.loads(path.read_text())
        for row in report["results"]:
            self.say(
                f"  {row['impl']:>9} {row['mode']:<5} {row['mol_per_s']:>10.1f} mol/s "
                f"{row['peak_mem_mb']:>8.1f} MB"
            )
        return report


def campaign_model(results: Path) -> list[str]:
    """bench.py's options for the campaign run's model (what stage 3 trains), from its config.json."""
    path = results / "campaign_model.json"
    path.write_text(json.dumps(json.loads((CAMPAIGN / "config.json").read_text())["model"]))
    return ["--config-json", str(path)]


def train_rate(report: dict | None) -> tuple[float, bool]:
    """Training molecules/s of the fastest working fast-path variant, and whether that is CUDA graphs."""
    rates = {r["impl"]: r["mol_per_s"] for r in (report or {}).get("results", []) if r["mode"] == "train"}
    if not rates:
        return 0.0, False
    graphs = rates.get("graphs", 0.0) > rates.get("fast", 0.0)
    return max(rates.get("graphs", 0.0), rates.get("fast", 0.0)), graphs


def continue_campaign(s: Session, args: argparse.Namespace, use_graphs: bool) -> None:
    """Resume a copy of the campaign run in RESULTS/run on the GPU and pack it as RESULTS/run.tar."""
    run_dir = args.results / "run"
    train_s = s.left() - args.reserve - TRAIN_SETUP_S
    if not (CAMPAIGN / "last.pt").is_file() or train_s < 60:
        s.say(f"training: skipped (campaign state present: {CAMPAIGN.exists()}, {train_s:.0f}s available)")
        return
    shutil.copytree(CAMPAIGN, run_dir, dirs_exist_ok=True)
    argv = [sys.executable, "-m", "se3tcli", "train", "--out", str(run_dir), "--resume"]
    argv += ["--time-limit", f"{train_s / 60:.2f}"]
    if args.epochs:  # a longer cosine: the learning rate rises to that schedule's value (a warm restart)
        argv += ["--epochs", str(args.epochs)]
    if args.dry_run:
        argv += ["--device", "cpu"]
    elif use_graphs:
        argv += ["--device", "cuda", "--cuda-graphs"]
    else:
        argv += ["--device", "cuda"]
    code = s.run("train", argv, train_s + TRAIN_SETUP_S)
    if code not in (0, None) and "--cuda-graphs" in argv:
        s.say("training with CUDA graphs failed; again without them, from the same state")
        shutil.rmtree(run_dir)
        shutil.copytree(CAMPAIGN, run_dir)
        argv.remove("--cuda-graphs")
        s.run("train eager", argv, s.left() - args.reserve + 30)
    with tarfile.open(args.results / "run.tar", "w") as tar:
        tar.add(run_dir, arcname="run")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", type=Path)
    p.add_argument("--budget", type=float, default=540.0, help="seconds for the whole session")
    p.add_argument(
        "--reserve", type=float, default=110.0, help="seconds kept for the benchmarks after training"
    )
    p.add_argument("--epochs", type=int, help="re-lay the campaign's cosine over this many epochs on resume")
    p.add_argument("--no-final-benchmarks", action="store_true", help="skip stage 4")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: check the flow, not the numbers")
    args = p.parse_args()
    args.results.mkdir(parents=True, exist_ok=True)
    s = Session(args.results, args.budget, args.dry_run)
    python = sys.executable

    s.run("gpu", ["nvidia-smi"], 15)
    s.run(
        "versions",
        [
            python,
            "-c",
            "import torch, e3nn; print(torch.__version__, e3nn.__version__, "
            "torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda')",
        ],
        60,
    )
    s.run(
        "cuda tests",
        [python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "tests/test_cuda_graphs.py"],
        120,
    )

    graphs = [] if args.dry_run else ["--cuda-graphs"]
    small_batches = (
        ["--batch-size", "8", "--n-batches", "2"]
        if args.dry_run
        else ["--batch-size", "512", "--steps", "10"]
    )
    model = campaign_model(args.results)
    bundled = s.bench("campaign-model", [*model, *small_batches, *graphs, "--ceilings"], 120)

    _, use_graphs = train_rate(bundled)
    continue_campaign(s, args, use_graphs)

    if args.no_final_benchmarks:
        s.say("done")
        return
    base_batches = (
        ["--batch-size", "4", "--n-batches", "2"]
        if args.dry_run
        else ["--batch-size", "128", "--steps", "10"]
    )
    s.bench("base", ["--preset", "base", *base_batches, *graphs], 75)
    if not args.dry_run:
        s.bench("campaign-model-amp", [*model, *small_batches, *graphs, "--amp", "--skip-reference"], 45)
    s.say("done")


if __name__ == "__main__":
    main()
