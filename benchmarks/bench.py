"""Throughput of the se3t model: the fast path against the e3nn reference, measured in the same run.

On real QM9 geometries (the QM9 cache; without it the bundled sample molecules), a few batches are collated
once up front, then for each implementation of ``--impls`` and mode it measures molecules/s. The
implementations are the attention backends of ``se3tcli.model.backend`` (``model.set_backend``), all in one
process on the same model and batches: ``fast`` (``auto``: on the CPU the fused C kernel of
``se3tcli.model.fused_cpu`` wherever it can run, else PyTorch; ``cpu_attention_kernel`` in the JSON says
which; ``SE3T_FUSED_CPU=0`` turns the kernel off), ``torch`` (PyTorch only), ``fused_cpu`` (the fused kernel
only, CPU) and ``reference`` (every convolution through ``e3nn.o3.TensorProduct``). The modes:

* ``train``: forward, L1 loss on all targets, backward and an AdamW step;
* ``infer``: forward under ``torch.inference_mode``;

after warm-up steps, as the median of interleaved repeats (``torch.cuda.synchronize`` around every timed
block on GPU), and the peak memory (CUDA: ``torch.cuda.max_memory_allocated`` over the warm-up and one step,
so that a CUDA graph's capture counts; CPU: growth of the resident set over the first step in a fresh
process, from ``VmHWM`` after resetting it, else ``getrusage``).

With ``--cuda-graphs`` (CUDA) a third implementation, ``graphs``, runs the fast path as captured CUDA
graphs (``se3tcli.cuda_graphs``) over the same batches padded to one static shape; its timings include the
padding and the host-to-device copy of every batch, which the eager cases (batches already on the GPU) skip.

    python benchmarks/bench.py --device cpu --preset small --json
    python benchmarks/bench.py --device cpu --preset small --lmax 1 --layers 3   # the bundled model's config
    python benchmarks/bench.py --device cpu --preset small --impls torch,fused_cpu  # kernel against PyTorch
    python benchmarks/bench.py --device cuda --preset base --batch-size 128 --amp --json
    python benchmarks/bench.py --device cuda --preset small --lmax 1 --layers 3 --batch-size 512 --cuda-graphs

Needs torch, e3nn and numpy only (RDKit only for the sample-SDF fallback, which falls back to the sample XYZ).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # measure the checkout this file belongs to, installed or not

from se3tcli.batching import StaticShape  # noqa: E402
from se3tcli.data.qm9 import QM9Unavailable, load_qm9  # noqa: E402
from se3tcli.graph import Batch, collate  # noqa: E402
from se3tcli.model.backend import resolve  # noqa: E402
from se3tcli.model.basis import AngularBasis  # noqa: E402
from se3tcli.model.config import PRESETS, ModelConfig, preset  # noqa: E402
from se3tcli.model.transformer import SE3Transformer  # noqa: E402

SAMPLE_SDF = ROOT / "sample_molecules" / "qm9_sample.sdf"
SAMPLE_XYZ = ROOT / "sample_molecules" / "qm9_sample.xyz"
_ELEMENTS = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9}
# implementation -> the attention backend it runs (graphs: the fast path captured as CUDA graphs)
BACKEND_OF = {
    "fast": "auto",
    "torch": "torch",
    "fused_cpu": "fused_cpu",
    "reference": "reference",
    "graphs": "auto",
}
MODES = ("train", "infer")

Molecule = tuple[np.ndarray, np.ndarray]  # atomic numbers [n], positions [n, 3] Å


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--preset", choices=tuple(PRESETS), default="small")
    p.add_argument("--config-json", type=Path, help="a ModelConfig JSON file (instead of --preset)")
    p.add_argument("--lmax", type=int, help="override the highest feature degree")
    p.add_argument("--channels", type=int, help="override the channels per degree")
    p.add_argument("--layers", type=int, help="override the number of attention layers")
    p.add_argument("--kernel", choices=("depthwise", "full"), help="override the kernel mode")
    p.add_argument("--batch-size", type=int, help="molecules per batch (default: 64 on CPU, 128 on CUDA)")
    p.add_argument("--n-batches", type=int, default=4, help="distinct pre-collated batches, cycled")
    p.add_argument("--steps", type=int, help="timed steps per repeat (default: 5 on CPU, 20 on CUDA)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved timed repeats; the median is reported")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before the first repeat")
    p.add_argument("--modes", default="train,infer", help="comma-separated subset of: train,infer")
    p.add_argument(
        "--impls",
        default="fast,reference",
        help="comma-separated subset of: fast,torch,fused_cpu,reference (attention backends, one process)",
    )
    p.add_argument("--skip-reference", action="store_true", help="leave out the reference")
    p.add_argument("--amp", action="store_true", help="CUDA: bf16 autocast (TF32 is always on)")
    p.add_argument("--cuda-graphs", action="store_true", help="CUDA: also time the fast path as CUDA graphs")
    p.add_argument("--threads", type=int, help="CPU intra-op threads (default: torch's choice)")
    p.add_argument("--cache-dir", type=Path, help="QM9 cache directory (default: se3t's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--profile", action="store_true", help="also print a torch.profiler table of the fast path"
    )
    p.add_argument("--ceilings", action="store_true", help="also measure GEMM GFLOP/s and copy GB/s")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--memory-probe", help=argparse.SUPPRESS)  # internal: "impl:mode", see cpu_peak_mb
    args = p.parse_args(argv)
    on_cuda = args.device == "cuda"
    args.batch_size = args.batch_size or (128 if on_cuda else 64)
    args.steps = args.steps or (20 if on_cuda else 5)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or any(m not in MODES for m in args.modes):
        p.error(f"--modes takes a comma-separated subset of {','.join(MODES)}")
    eager = [name for name in BACKEND_OF if name != "graphs"]
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    args.impls = [i for i in impls if not (args.skip_reference and i == "reference")]
    if not args.impls or any(i not in eager for i in args.impls):
        p.error(f"--impls takes a comma-separated subset of {','.join(eager)}")
    if "fused_cpu" in args.impls and on_cuda:
        p.error("--impls fused_cpu is for --device cpu")
    if on_cuda and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if (args.amp or args.cuda_graphs) and not on_cuda:
        p.error("--amp and --cuda-graphs are for --device cuda")
    return args


def model_config(args: argparse.Namespace) -> tuple[str, ModelConfig]:
    if args.config_json:
        name, config = args.config_json.stem, ModelConfig.from_json(args.config_json.read_text())
    else:
        name, config = args.preset, preset(args.preset)
    overrides = {"lmax": args.lmax, "channels": args.channels, "n_layers": args.layers, "kernel": args.kernel}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides:
        name += "".join(f" {k}={v}" for k, v in overrides.items())
    return name, config.replace(**overrides)


def read_xyz(path: Path) -> list[Molecule]:
    """Plain multi-frame XYZ (H, C, N, O, F) without RDKit."""
    lines, molecules, i = path.read_text().splitlines(), [], 0
    while i < len(lines) and lines[i].strip():
        n = int(lines[i])
        rows = [line.split() for line in lines[i + 2 : i + 2 + n]]
        numbers = np.array([_ELEMENTS[row[0]] for row in rows])
        molecules.append((numbers, np.array([[float(v) for v in row[1:4]] for row in rows])))
        i += 2 + n
    return molecules


def load_geometries(n: int, seed: int, cache_dir: Path | None) -> tuple[list[Molecule], str]:
    """``n`` molecules: a seeded random subset of QM9, else the sample molecules cycled."""
    try:
        data = load_qm9(cache_dir)
        index = np.random.default_rng(seed).choice(len(data), size=min(n, len(data)), replace=False)
        return [data.molecule(int(i)) for i in index], f"QM9 ({len(data)} molecules), random subset"
    except QM9Unavailable as err:
        print(f"bench: no QM9 ({err}); using the sample molecules", file=sys.stderr)
    try:
        from se3tcli.io import read_molecules  # needs RDKit: imported only here

        sample = [(m.numbers, m.positions) for m in read_molecules([SAMPLE_SDF]) if m.ok]
        source = SAMPLE_SDF.relative_to(ROOT).as_posix()
    except ImportError:
        sample, source = read_xyz(SAMPLE_XYZ), SAMPLE_XYZ.relative_to(ROOT).as_posix()
    return [sample[i % len(sample)] for i in range(n)], f"{source} (cycled)"


def forward_flops(config: ModelConfig, edges_per_mol: float, atoms_per_mol: float) -> dict[str, float]:
    """FLOPs of one fast-path forward pass per molecule (2 per multiply-add, 1 per elementwise product;
    gathers, softmax, activations and the readout left out), from the shapes of the implementation."""
    angular = AngularBasis(config.lmax, config.kernel_jmax)
    t, s, d = angular.n_terms, angular.n_coefficients, (config.lmax + 1) ** 2
    c, h, k = config.channels, config.radial_hidden, 2  # k: keys and values
    # radial features -> frame coefficients (one GEMM, once per reverse pair of edges: halved per edge)
    if config.kernel == "depthwise":
        coefficients = h * s * k * c
        products = t * k * c  # coefficients x rotated inputs
    else:
        coefficients = h * s * c * k * c
        products = 2 * s * 2 * c * k * c  # [2, C_in] @ [C_in, K*C_out] per coefficient
    rotations = 2 * t * d * c + 2 * d * t * k * c  # into the edge frame, and back
    attention = 2 * d * c + 2 * d * c  # q·k, α-weighted messages
    per_edge_layer = coefficients + products + rotations + attention
    per_node_layer = 3 * 2 * c * c * d  # query, self-interaction and value-mix linears (per degree)
    radial = config.n_radial * h + h * h  # shared radial network, once per reverse pair of edges
    per_mol = config.n_layers * (edges_per_mol * per_edge_layer + atoms_per_mol * per_node_layer)
    per_mol += edges_per_mol * radial
    return {
        "terms": t,
        "per_edge_layer": per_edge_layer,
        "coefficient_gemm_share": round(coefficients / per_edge_layer, 3),
        "mflop_per_mol": round(per_mol / 1e6, 1),
    }


def ceilings(device: torch.device, config: ModelConfig) -> dict[str, float]:
    """Measured ceilings of the device: float32 GEMM GFLOP/s (a large square one, and the shape of the
    coefficient GEMM of a 4096-edge block) and copy bandwidth GB/s (read + write, 64 MB or 256 MB)."""
    rows = AngularBasis(config.lmax, config.kernel_jmax).n_coefficients * 2 * config.channels

    def best(fn: Callable[[], object], work: float) -> float:
        fn()
        synchronize(device)
        times = []
        for _ in range(5):
            start = time.perf_counter()
            fn()
            synchronize(device)
            times.append(time.perf_counter() - start)
        return work / min(times) / 1e9

    n = 2048 if device.type == "cpu" else 8192
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    r, w = (
        torch.randn(4096, config.radial_hidden, device=device),
        torch.randn(rows, config.radial_hidden, device=device),
    )
    big = torch.randn(2**26 if device.type == "cuda" else 2**24, device=device)
    copy = torch.empty_like(big)
    return {
        "gemm_gflops": round(best(lambda: a @ b, 2 * n**3), 1),
        "coefficient_gemm_gflops": round(best(lambda: r @ w.t(), 2 * r.shape[0] * r.shape[1] * rows), 1),
        "copy_gb_s": round(best(lambda: copy.copy_(big), 2 * big.numel() * 4), 1),
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status(field: str) -> int | None:  # bytes
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _max_rss() -> int:  # bytes
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def cuda_peak_mb(step: Callable[[], None], device: torch.device, warmup: int) -> float:
    """``torch.cuda.max_memory_allocated`` over the warm-up steps and one more (model, optimizer state and
    batches included)."""
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup + 1):
        step()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def rss_growth_mb(step: Callable[[], None]) -> float:
    """Growth of the resident set over one step; meant for the first step in a fresh process (later
    steps reuse memory the allocator kept)."""
    try:  # Linux: writing 5 to clear_refs resets the high-water mark VmHWM to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
        before = _proc_status("VmRSS")
    except OSError:
        before = None
    if before is None:  # getrusage: the all-time peak, which the first step sets in a fresh process
        before = _max_rss()
        step()
        return max(0, _max_rss() - before) / 2**20
    step()
    return max(0, (_proc_status("VmHWM") or before) - before) / 2**20


def cpu_peak_mb(argv: list[str], impl: str, mode: str) -> float:
    """:func:`rss_growth_mb` of one step of ``impl``/``mode``, in a fresh process with the same options."""
    args = [a for a in argv if a not in ("--json", "--profile")] + ["--memory-probe", f"{impl}:{mode}"]
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


class Runner:
    """One model, a few pre-collated batches and an optimizer; steps of every (impl, mode)."""

    def __init__(self, config: ModelConfig, cpu_batches: list[Batch], device: torch.device, amp: bool):
        self.model = SE3Transformer(config).to(device)
        self.cpu_batches = cpu_batches  # the graphs pad and copy these themselves
        self.batches = [b.to(device) for b in cpu_batches]
        self.device = device
        self.amp = amp
        self.graphed: dict[str, object] = {}  # mode -> GraphedTraining / GraphedInference, made on first use
        self.targets = config.targets
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if amp else nullcontext()
        self.zeros = [torch.zeros(b.n_mol, len(self.targets), device=device) for b in cpu_batches]
        self.count = 0

    def step(self, impl: str, mode: str) -> int:
        """One step on the next batch; returns its number of molecules."""
        i = self.count % len(self.batches)
        self.count += 1
        batch = self.batches[i]
        self.model.set_backend(BACKEND_OF[impl])
        if impl == "graphs":
            return self._graphed_step(i, mode)
        if mode == "infer":
            with torch.inference_mode(), self.autocast:
                self.model(batch)
            return batch.n_mol
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast:
            out = self.model(batch)
            loss = F.l1_loss(torch.stack([out[t] for t in self.targets], dim=1).float(), self.zeros[i])
        loss.backward()
        self.optimizer.step()
        return batch.n_mol

    def _graphed_step(self, i: int, mode: str) -> int:
        from se3tcli.cuda_graphs import GraphedInference, GraphedTraining

        batch = self.cpu_batches[i]
        if mode not in self.graphed:
            shape = StaticShape.for_budget(
                max_atoms=max(b.z.numel() for b in self.cpu_batches),
                max_edges=max(b.edge_src.numel() for b in self.cpu_batches),
                max_molecules=max(b.n_mol for b in self.cpu_batches),
            )
            if mode == "infer":
                self.graphed[mode] = GraphedInference(self.model, shape, self.amp)
            else:
                self.graphed[mode] = GraphedTraining(self.model, shape, self.targets, self.amp)
        if mode == "infer":
            self.graphed[mode](batch)
            return batch.n_mol
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        pred = self.graphed[mode].predict(batch)[: batch.n_mol]
        F.l1_loss(pred.float(), self.zeros[i]).backward()
        self.optimizer.step()
        return batch.n_mol

    def rate(self, impl: str, mode: str, steps: int) -> float:
        """Molecules/s over ``steps`` steps."""
        self.model.train(mode == "train")
        synchronize(self.device)
        start, n_mol = time.perf_counter(), 0
        for _ in range(steps):
            n_mol += self.step(impl, mode)
        synchronize(self.device)
        return n_mol / (time.perf_counter() - start)


def profile_table(runner: Runner, mode: str, steps: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if runner.device.type == "cuda" else [])
    runner.model.train(mode == "train")
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(steps):
            runner.step("fast", mode)
        synchronize(runner.device)
    sort = "self_cuda_time_total" if runner.device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=20)
    return f"--- profile: fast {mode}, {steps} steps ---\n{table}"


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)
    name, config = model_config(args)
    molecules, source = load_geometries(args.batch_size * args.n_batches, args.seed, args.cache_dir)
    size = args.batch_size
    batches = [collate(molecules[i : i + size], config.cutoff) for i in range(0, len(molecules), size)]
    n_mol = sum(b.n_mol for b in batches)
    runner = Runner(config, batches, device, args.amp)
    impls = [*args.impls, *(["graphs"] if args.cuda_graphs else [])]
    cases = [(impl, mode) for impl in impls for mode in args.modes]

    if args.memory_probe:
        impl, mode = args.memory_probe.split(":")
        runner.model.train(mode == "train")
        print(rss_growth_mb(lambda: runner.step(impl, mode)))
        return {}

    peaks = {}
    for impl, mode in cases:  # warm-up, then the peak memory of one step
        runner.model.train(mode == "train")
        if device.type == "cuda":
            # Over the warm-up too: a CUDA graph is captured there, and its private memory pool, which
            # replays reuse without allocating, is only seen being filled then.
            step = lambda impl=impl, mode=mode: runner.step(impl, mode)  # noqa: E731
            peaks[impl, mode] = cuda_peak_mb(step, device, args.warmup)
            continue
        for _ in range(args.warmup):
            runner.step(impl, mode)
        peaks[impl, mode] = cpu_peak_mb(argv, impl, mode)
    rates: dict[tuple[str, str], list[float]] = {case: [] for case in cases}
    for _ in range(args.repeats):  # interleaved, so that slow drifts of the machine hit every case alike
        for case in cases:
            rates[case].append(runner.rate(*case, args.steps))
    if args.profile:
        for mode in args.modes:
            print(profile_table(runner, mode, max(1, args.steps // 2)), file=sys.stderr)

    median = {case: statistics.median(values) for case, values in rates.items()}

    def ratio(mode: str, impl: str = "fast", baseline: str = "reference") -> float | None:
        if (baseline, mode) not in median or (impl, mode) not in median:
            return None
        return round(median[impl, mode] / median[baseline, mode], 2)

    report = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.machine()})",
        "preset": name,
        "results": [
            {
                "impl": impl,
                "mode": mode,
                "mol_per_s": round(median[impl, mode], 1),
                "peak_mem_mb": round(peaks[impl, mode], 1),
            }
            for impl, mode in cases
        ],
        "ratio_train": ratio("train"),
        "ratio_infer": ratio("infer"),
        "ratio_train_graphs": ratio("train", "graphs"),
        "ratio_infer_graphs": ratio("infer", "graphs"),
        "ratio_train_fused_cpu_torch": ratio("train", "fused_cpu", "torch"),
        "ratio_infer_fused_cpu_torch": ratio("infer", "fused_cpu", "torch"),
        "peak_mem": "cuda max_memory_allocated over warm-up and one step"
        if device.type == "cuda"
        else "resident-set growth over a first step (fresh process)",
        "config": config.to_dict(),
        "batch_size": size,
        "n_batches": len(batches),
        "steps": args.steps,
        "repeats": args.repeats,
        "repeat_mol_per_s": {f"{i} {m}": [round(v, 1) for v in rates[i, m]] for i, m in cases},
        "edges_per_mol": round(sum(b.edge_src.numel() for b in batches) / n_mol, 1),
        "atoms_per_mol": round(sum(b.z.numel() for b in batches) / n_mol, 2),
        "fast_forward_flops": forward_flops(
            config,
            sum(b.edge_src.numel() for b in batches) / n_mol,
            sum(b.z.numel() for b in batches) / n_mol,
        ),
        "data": source,
        "amp": args.amp,
        "tf32": device.type == "cuda",
        "threads": torch.get_num_threads(),
        # the fast path on the CPU: the fused C kernel where it can run, else PyTorch
        "cpu_attention_kernel": "fused C" if resolve().backend == "fused_cpu" else "PyTorch",
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "e3nn": _version("e3nn"),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if args.ceilings:
        report["ceilings"] = ceilings(device, config)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    return report


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


def print_table(report: dict) -> None:
    print(
        f"{report['device']} | {report['preset']} | batch {report['batch_size']} | "
        f"{report['edges_per_mol']} edges/mol | {report['threads']} threads | {report['date']}"
    )
    print(f"{'impl':<10} {'mode':<6} {'mol/s':>10} {'peak MB':>9}")
    for row in report["results"]:
        print(f"{row['impl']:<10} {row['mode']:<6} {row['mol_per_s']:>10.1f} {row['peak_mem_mb']:>9.1f}")
    for mode in MODES:
        if report[f"ratio_{mode}"] is not None:
            print(f"fast / reference, {mode}: {report[f'ratio_{mode}']:.2f}x")
        if report[f"ratio_{mode}_fused_cpu_torch"] is not None:
            print(f"fused_cpu / torch, {mode}: {report[f'ratio_{mode}_fused_cpu_torch']:.2f}x")


if __name__ == "__main__":
    main()
