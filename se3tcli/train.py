"""Training and evaluation: L1 on normalised targets, AdamW, warmup + cosine, clipping, exact resume, DDP.

A run directory holds ``config.json``, ``splits.npz``, ``metrics.csv``, ``best.pt``, ``last.pt`` and
``test_metrics.json``. ``last.pt`` records the position inside the epoch, so a run stopped by
``time_limit`` (or Ctrl-C) continues with ``resume`` exactly where it stopped.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from se3tcli import __version__
from se3tcli.batching import StaticShape, graph_sizes, size_bounded_batches
from se3tcli.checkpoint import checkpoint_dict, model_from_checkpoint, read_checkpoint, save_checkpoint
from se3tcli.data.dataset import LabelledData, load_labelled
from se3tcli.data.qm9 import QM9Data
from se3tcli.data.splits import element_counts, fit_atom_refs, save_split
from se3tcli.graph import Batch, collate
from se3tcli.model.config import ModelConfig, preset
from se3tcli.model.transformer import SE3Transformer
from se3tcli.prefetch import prefetch
from se3tcli.targets import ATOM_REF_TARGETS, TARGETS

DEFAULT_EPOCHS = 100
PREFETCH_BATCHES = 4  # training batches collated ahead in a background thread


@dataclass
class TrainOptions:
    dataset: str = "qm9"
    targets: tuple[str, ...] = tuple(TARGETS)
    preset: str = "small"
    model_overrides: dict | None = None  # ModelConfig fields that replace the preset's
    epochs: int | None = 100  # None: 100 for a new run, the run's own number on resume
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 1e-5
    warmup_epochs: float = 1.0
    clip_norm: float = 10.0
    cutoff: float = 5.0
    device: str = "auto"
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU
    seed: int = 0
    out: str = "runs/se3t"
    resume: bool = False
    limit: int | None = None
    patience: int | None = None  # epochs without validation improvement before stopping
    time_limit: float | None = None  # minutes of wall-clock time for this invocation
    cache: str | None = None
    init_from: str | None = None  # start from this checkpoint's weights and statistics (fine-tuning)
    eval_batch_size: int = 256
    max_atoms: int | None = None  # batches bounded by atoms (batch_size still bounds molecules)
    max_edges: int | None = None  # batches bounded by directed edges
    cuda_graphs: bool = False  # replay one captured forward+backward over batches padded to one shape
    command: str = ""  # the command line that started the run, for the record


class TrainingReporter:
    """Callbacks the CLI implements to show progress; the base class stays silent."""

    def start(self, total_steps: int, done_steps: int, info: dict[str, Any]) -> None: ...

    def step(self, done_steps: int, loss: float, lr: float) -> None: ...

    def epoch(self, row: dict[str, Any]) -> None: ...

    def message(self, text: str) -> None: ...


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but no CUDA device is available")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise ValueError(f"unknown device {name!r}; use auto, cpu or cuda")
    return torch.device(name)


# ----------------------------------------------------------------------------- statistics


def fit_statistics(data: QM9Data, train_idx: np.ndarray, elements: Sequence[int]) -> dict[str, Any]:
    """Normalisation and atom references from the training split (display units).

    Extensive targets: ``y ≈ Σ_atoms ref[z] + n * mean``; ``mean``/``std`` are per atom.
    ``loss_scale`` is the std of what the network must learn, so the loss is a normalised L1.
    """
    train = data.subset(train_idx)
    n_atoms = train.n_atoms().astype(np.float64)
    counts = element_counts(train.numbers, train.offsets, elements)  # [n_train, n_elements]
    mean, std, scale, refs = {}, {}, {}, {}
    for column, target in enumerate(data.target_names):
        y = train.targets[:, column]
        if TARGETS[target].extensive:
            if target in ATOM_REF_TARGETS:
                ref = fit_atom_refs(train.numbers, train.offsets, y, elements)
                refs[target] = [float(v) for v in ref]
                y = y - counts @ ref
            per_atom = y / n_atoms
            mean[target] = float(per_atom.mean())
            std[target] = float(per_atom.std() or 1.0)
            scale[target] = float((y - n_atoms * mean[target]).std() or 1.0)
        else:
            mean[target] = float(y.mean())
            std[target] = float(y.std() or 1.0)
            scale[target] = std[target]
    return {"mean": mean, "std": std, "loss_scale": scale, "atom_refs": refs}


def _initial_model(
    path: str, config: ModelConfig, data: dict[str, Any]
) -> tuple[dict[str, Any], SE3Transformer]:
    """Weights and statistics of a checkpoint whose model matches ``config`` (for ``--init-from``).

    On the same data set the split must be the checkpoint's own (``data``: this run's data description):
    another seed or limit draws another split, whose validation and test molecules the checkpoint may
    have been trained on, so its errors would look better than they are.
    """
    state = read_checkpoint(path)
    model = model_from_checkpoint(state, path)
    if model.config != config:
        differing = sorted(k for k, v in config.to_dict().items() if model.config.to_dict()[k] != v)
        raise ValueError(
            f"{path}: --init-from model differs from the requested one in {', '.join(differing)}"
        )
    trained_on = state.get("training", {}).get("data", {})
    if trained_on.get("dataset") == data["dataset"] and any(
        trained_on.get(key) != data[key] for key in ("seed", "limit")
    ):
        raise ValueError(
            f"{path} was trained on the {data['dataset']} split of --seed {trained_on.get('seed')} "
            f"(--limit {trained_on.get('limit')}); --seed {data['seed']} (--limit {data['limit']}) would "
            "draw another split, whose validation and test molecules it may have been trained on: use the "
            "checkpoint's --seed and --limit"
        )
    return state["normalization"] | {"atom_refs": state["atom_refs"]}, model


def build_model(config: ModelConfig, statistics: dict[str, Any]) -> SE3Transformer:
    model = SE3Transformer.from_config(config)
    refs = {t: np.asarray(v) for t, v in statistics["atom_refs"].items()}
    model.set_statistics(statistics["mean"], statistics["std"], refs)
    return model


# ----------------------------------------------------------------------------- batching


def batches(data: QM9Data, indices: np.ndarray, batch_size: int, cutoff: float) -> Iterator[tuple]:
    """``(Batch, targets [b, T] float64, indices)`` over ``indices`` in order."""
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        molecules = [data.molecule(int(i)) for i in chunk]
        yield collate(molecules, cutoff), torch.from_numpy(data.targets[chunk]), chunk


def loss_fn(outputs: dict[str, torch.Tensor], y: torch.Tensor, targets: Sequence[str], scale: torch.Tensor):
    """Mean over targets of the L1 error divided by each target's scale (a normalised L1)."""
    return stacked_loss(torch.stack([outputs[t] for t in targets], dim=1), y, scale)


def stacked_loss(pred: torch.Tensor, y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """:func:`loss_fn` of predictions ``[b, T]`` (columns in target order)."""
    return ((pred.to(torch.float64) - y).abs() / scale).mean()


@torch.no_grad()
def predict_arrays(
    model: nn.Module, data: QM9Data, indices: np.ndarray, batch_size: int, device: torch.device, cutoff: float
) -> dict[str, np.ndarray]:
    """Predictions in display units for molecules ``indices`` of ``data``: ``{target: [n]}``."""
    model.eval()
    out: dict[str, list[np.ndarray]] = {t: [] for t in data.target_names}
    for batch, _, _ in batches(data, indices, batch_size, cutoff):
        result = model(batch.to(device))
        for t in out:
            out[t].append(result[t].double().cpu().numpy())
    return {t: np.concatenate(v) if v else np.zeros(0) for t, v in out.items()}


def error_metrics(pred: dict[str, np.ndarray], truth: np.ndarray, targets: Sequence[str]) -> dict[str, dict]:
    """MAE and RMSE per target in its display unit and in its error unit (meV for orbital energies)."""
    metrics = {}
    for column, t in enumerate(targets):
        err = pred[t] - truth[:, column]
        mae, rmse = float(np.abs(err).mean()), float(np.sqrt((err**2).mean()))
        info = TARGETS[t]
        metrics[t] = {
            "mae": mae,
            "rmse": rmse,
            "unit": info.unit,
            "mae_error_unit": mae * info.error_factor,
            "rmse_error_unit": rmse * info.error_factor,
            "error_unit": info.error_unit,
            "n": int(len(err)),
        }
    return metrics


# ----------------------------------------------------------------------------- distributed


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> Distributed:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    import torch.distributed as dist

    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return Distributed(rank=dist.get_rank(), world=dist.get_world_size())


def _all_reduce_sum(values: np.ndarray, dist_info: Distributed, device: torch.device) -> np.ndarray:
    if dist_info.world == 1:
        return values
    import torch.distributed as dist

    tensor = torch.as_tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.cpu().numpy()


# ----------------------------------------------------------------------------- the run


class Trainer:
    def __init__(self, options: TrainOptions, reporter: TrainingReporter | None = None):
        self.opts = options
        self.reporter = reporter or TrainingReporter()
        self.dist = init_distributed(options.device)
        if self.dist.world > 1 and options.device != "cpu" and torch.cuda.is_available():
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = select_device(options.device)
        if self.device.type == "cuda":  # TF32 matmuls for training (the equivariance checks turn it off)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.out = Path(options.out)

    # --- set-up
    def _model_config(self) -> ModelConfig:
        overrides = dict(self.opts.model_overrides or {})
        overrides.update(targets=tuple(self.opts.targets), cutoff=self.opts.cutoff)
        return preset(self.opts.preset, **overrides)

    def setup(self) -> None:
        opts = self.opts
        resume_path = self.out / "last.pt"
        if opts.resume:
            if not resume_path.is_file():
                raise FileNotFoundError(f"{resume_path}: nothing to resume (no last.pt in {self.out})")
            state = read_checkpoint(resume_path)
            saved = state["training"]["options"]
            # The data, split, model and schedule come from the run; only the budget may change.
            keep = {"epochs", "time_limit", "device", "patience", "out", "resume", "cache", "eval_batch_size"}
            keep.add("cuda_graphs")  # how steps run, not what they compute
            for key, value in saved.items():
                if key not in keep:
                    setattr(opts, key, tuple(value) if key == "targets" else value)
            if opts.epochs is None:  # not given: the run's own budget, so its LR schedule is unchanged
                opts.epochs = saved["epochs"]
            if opts.patience is None:  # not given: the run's own early stopping
                opts.patience = saved.get("patience")
        elif resume_path.exists():
            raise FileExistsError(f"{self.out} already holds a run; use --resume or another --out")
        if opts.epochs is None:
            opts.epochs = DEFAULT_EPOCHS
        torch.manual_seed(opts.seed)
        self.labelled: LabelledData = load_labelled(
            opts.dataset, opts.targets, opts.seed, opts.limit, opts.cache
        )
        config = self._model_config()
        if opts.resume:
            self.statistics = state["normalization"] | {"atom_refs": state["atom_refs"]}
            self.model = model_from_checkpoint(state, resume_path)
        elif opts.init_from:
            self.statistics, self.model = _initial_model(opts.init_from, config, self.labelled.description)
        else:
            train_idx = self.labelled.split["train"]
            self.statistics = fit_statistics(self.labelled.data, train_idx, config.elements)
            self.model = build_model(config, self.statistics)
        self.model.to(self.device)
        self.config = self.model.config
        self.scale = torch.tensor(
            [self.statistics["loss_scale"][t] for t in opts.targets], dtype=torch.float64
        )
        self.scale = self.scale.to(self.device)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay
        )
        self._setup_batching()
        self.steps_per_epoch = len(self._epoch_batches(0))
        self.total_steps = self.steps_per_epoch * opts.epochs
        warmup = max(1, int(opts.warmup_epochs * self.steps_per_epoch))
        total = self.total_steps

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.epoch, self.batch_in_epoch, self.step = 0, 0, 0
        self.micro_batches = 1  # doubled on each GPU out-of-memory error
        self.best_val, self.bad_epochs, self.elapsed = math.inf, 0, 0.0
        self.epoch_loss_sum = 0.0  # this epoch's batch losses so far, kept across a resume
        if opts.resume:
            r = state["resume"]
            self.optimizer.load_state_dict(r["optimizer"])
            self.scheduler.load_state_dict(r["scheduler"])
            torch.set_rng_state(r["torch_rng"])
            self.epoch, self.batch_in_epoch, self.step = r["epoch"], r["batch_in_epoch"], r["step"]
            self.best_val, self.bad_epochs, self.elapsed = r["best_val"], r["bad_epochs"], r["elapsed"]
            self.epoch_loss_sum = r.get("epoch_loss_sum", 0.0)
            self.micro_batches = r.get("micro_batches", 1)
        elif self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_split(self.out / "splits.npz", self.labelled.split, opts.seed)
            (self.out / "config.json").write_text(
                json.dumps({"options": self._options_dict(), "model": self.config.to_dict()}, indent=2)
            )
        self.ddp_model: nn.Module = self.model
        if self.dist.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)

    def _setup_batching(self) -> None:
        """Molecule sizes for batches bounded by atoms/edges, and the static shape for CUDA graphs."""
        opts = self.opts
        self.sizes: tuple[np.ndarray, np.ndarray] | None = None
        self.static_shape: StaticShape | None = None
        self.graphed = None  # GraphedTraining, captured at the first step
        if opts.cuda_graphs and self.device.type != "cuda":
            raise ValueError("--cuda-graphs needs a CUDA device")
        if not (opts.max_atoms or opts.max_edges or opts.cuda_graphs):
            return
        if self.dist.world > 1:
            raise ValueError("--max-atoms/--max-edges/--cuda-graphs work on one device only (no torchrun)")
        data, train = self.labelled.data, self.labelled.split["train"]
        atoms, edges = np.zeros(len(data), np.int64), np.zeros(len(data), np.int64)
        atoms[train], edges[train] = graph_sizes(data.molecule, train, opts.cutoff)
        self.sizes = (atoms, edges)
        if opts.cuda_graphs:  # a graph replays one shape: every batch needs an atom and an edge budget
            if not opts.max_atoms:
                opts.max_atoms = max(int(atoms[train].max()), round(opts.batch_size * atoms[train].mean()))
            if not opts.max_edges:
                opts.max_edges = max(int(edges[train].max()), round(opts.batch_size * edges[train].mean()))
            self.static_shape = StaticShape.for_budget(opts.max_atoms, opts.max_edges, opts.batch_size)

    def _epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """This rank's batches of the epoch: ``batch_size`` molecules each, or bounded by atoms/edges."""
        order = self._epoch_order(epoch)
        if self.sizes is None:
            size = self.opts.batch_size
            return [order[start : start + size] for start in range(0, len(order), size)]
        atoms, edges = self.sizes
        return size_bounded_batches(
            order, atoms, edges, self.opts.max_atoms, self.opts.max_edges, self.opts.batch_size
        )

    def _collated(self, chunks: Sequence[np.ndarray]) -> Iterator[tuple[np.ndarray, Batch, torch.Tensor]]:
        for chunk in chunks:
            batch, y, _ = next(batches(self.labelled.data, chunk, len(chunk), self.opts.cutoff))
            yield chunk, batch, y

    def _options_dict(self) -> dict[str, Any]:
        d = asdict(self.opts)
        d["targets"] = list(self.opts.targets)
        return d

    # --- checkpoints
    def _training_summary(self) -> dict[str, Any]:
        data = self.labelled.data
        n_atoms = data.n_atoms()
        heavy = np.add.reduceat((data.numbers > 1).astype(np.int64), data.offsets[:-1]) if len(data) else [0]
        return {
            "options": self._options_dict(),
            "command": self.opts.command,
            "data": self.labelled.description,
            "domain": {
                "elements": sorted({int(z) for z in np.unique(data.numbers)}),
                "max_atoms": int(n_atoms.max()),
                "max_heavy_atoms": int(np.max(heavy)),
            },
            "epochs_done": self.epoch,
            "steps": self.step,
            "wall_time_s": round(self.elapsed, 1),
            "device": str(self.device)
            if self.device.type == "cpu"
            else torch.cuda.get_device_name(self.device),
            "world_size": self.dist.world,
            "se3t_version": __version__,
            "torch_version": str(torch.__version__),
        }

    def _checkpoint(self, metrics: dict | None = None, with_resume: bool = False) -> dict[str, Any]:
        stats = self.statistics
        normalization = {k: stats[k] for k in ("mean", "std", "loss_scale")}
        data = checkpoint_dict(
            self.model, normalization, stats["atom_refs"], self._training_summary(), metrics
        )
        if with_resume:
            data["resume"] = {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch,
                "step": self.step,
                "best_val": self.best_val,
                "epoch_loss_sum": self.epoch_loss_sum,
                "bad_epochs": self.bad_epochs,
                "elapsed": self.elapsed,
                "micro_batches": self.micro_batches,
            }
        return data

    def save_last(self) -> None:
        if self.dist.main:
            save_checkpoint(self._checkpoint(with_resume=True), self.out / "last.pt")

    # --- loop
    def _epoch_order(self, epoch: int) -> np.ndarray:
        train = self.labelled.split["train"]
        order = np.random.default_rng([self.opts.seed, epoch]).permutation(train)
        per_rank = len(order) // self.dist.world
        return order[self.dist.rank * per_rank : (self.dist.rank + 1) * per_rank]

    def _train_step(self, chunk: np.ndarray, batch: Batch, y: torch.Tensor) -> float:
        """One optimizer step on the molecules ``chunk`` (collated: ``batch``, targets ``y``); on GPU
        out-of-memory the batch is split into micro-batches whose gradients add up to the same step (and
        stays split for the rest of the run)."""
        if self.static_shape is not None:
            return self._graphed_step(batch, y)
        while True:
            try:
                return self._accumulated_step(chunk, batch, y)
            except torch.cuda.OutOfMemoryError:
                if self.micro_batches >= len(chunk):
                    raise
                self.optimizer.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                self.micro_batches *= 2
                self.reporter.message(
                    f"GPU out of memory: each batch now runs as {self.micro_batches} micro-batches"
                )

    def _accumulated_step(self, chunk: np.ndarray, whole: Batch, whole_y: torch.Tensor) -> float:
        self.ddp_model.train()
        self.optimizer.zero_grad(set_to_none=True)
        use_amp = self.opts.amp and self.device.type == "cuda"
        total = 0.0
        for part in np.array_split(chunk, min(self.micro_batches, len(chunk))):
            if len(part) == len(chunk):
                batch, y = whole, whole_y
            else:
                batch, y, _ = next(batches(self.labelled.data, part, len(part), self.opts.cutoff))
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                outputs = self.ddp_model(batch.to(self.device))
            loss = loss_fn(outputs, y.to(self.device), self.opts.targets, self.scale) * (
                len(part) / len(chunk)
            )
            loss.backward()
            total += float(loss.detach())
        self._optimizer_step()
        return total

    def _graphed_step(self, batch: Batch, y: torch.Tensor) -> float:
        """:meth:`_accumulated_step` through the captured graphs (padding rows excluded from the loss)."""
        from se3tcli.cuda_graphs import GraphedTraining  # CUDA only

        self.model.train()
        if self.graphed is None:
            self.graphed = GraphedTraining(self.model, self.static_shape, self.opts.targets, self.opts.amp)
            self.reporter.message(f"CUDA graphs captured for batches padded to {self.static_shape}")
        self.optimizer.zero_grad(set_to_none=True)
        pred = self.graphed.predict(batch)[: batch.n_mol]  # [b, T]
        loss = stacked_loss(pred, y.to(self.device, non_blocking=True), self.scale)
        loss.backward()
        self._optimizer_step()
        return float(loss.detach())

    def _optimizer_step(self) -> None:
        nn.utils.clip_grad_norm_(self.model.parameters(), self.opts.clip_norm)
        self.optimizer.step()
        self.scheduler.step()

    def validate(self) -> dict[str, dict]:
        data = self.labelled.data
        val = self.labelled.split["val"]
        part = np.array_split(val, self.dist.world)[self.dist.rank]
        pred = predict_arrays(
            self.model, data, part, self.opts.eval_batch_size, self.device, self.opts.cutoff
        )
        truth = data.targets[part]
        abs_sum = np.array([np.abs(pred[t] - truth[:, i]).sum() for i, t in enumerate(self.opts.targets)])
        sq_sum = np.array([((pred[t] - truth[:, i]) ** 2).sum() for i, t in enumerate(self.opts.targets)])
        totals = _all_reduce_sum(np.concatenate([abs_sum, sq_sum, [len(part)]]), self.dist, self.device)
        n_t = len(self.opts.targets)
        count = max(totals[-1], 1.0)
        return {
            t: {"mae": float(totals[i] / count), "rmse": math.sqrt(totals[n_t + i] / count)}
            for i, t in enumerate(self.opts.targets)
        }

    def run(self, should_stop: Callable[[], bool] = lambda: False) -> dict[str, Any]:
        """Train until the epochs, patience or time limit run out; returns a summary."""
        opts = self.opts
        started = time.monotonic()
        elapsed_before = self.elapsed
        self.reporter.start(self.total_steps, self.step, {"device": str(self.device), "out": str(self.out)})
        status = "finished"
        while self.epoch < opts.epochs:
            if self.batch_in_epoch == 0:
                self.epoch_loss_sum = 0.0
            remaining = self._epoch_batches(self.epoch)[self.batch_in_epoch :]
            for chunk, batch, y in prefetch(self._collated(remaining), PREFETCH_BATCHES):
                loss = self._train_step(chunk, batch, y)
                self.epoch_loss_sum += loss
                self.batch_in_epoch += 1
                self.step += 1
                self.elapsed = elapsed_before + time.monotonic() - started
                self.reporter.step(self.step, loss, self.scheduler.get_last_lr()[0])
                out_of_time = (
                    opts.time_limit is not None and time.monotonic() - started > opts.time_limit * 60
                )
                # Every rank must stop after the same step, or the others wait forever in the next one.
                flags = _all_reduce_sum(np.array([out_of_time, should_stop()], float), self.dist, self.device)
                out_of_time = bool(flags[0])
                if out_of_time or flags[1]:
                    self.save_last()
                    return {"status": "time limit" if out_of_time else "interrupted", "epoch": self.epoch}
            val = self.validate()
            train_loss = self.epoch_loss_sum / max(self.batch_in_epoch, 1)
            self.epoch += 1
            self.batch_in_epoch, self.epoch_loss_sum = 0, 0.0
            score = float(np.mean([val[t]["mae"] / self.statistics["loss_scale"][t] for t in opts.targets]))
            improved = score < self.best_val
            if improved:
                self.best_val, self.bad_epochs = score, 0
            else:
                self.bad_epochs += 1
            row = {
                "epoch": self.epoch,
                "time_s": round(self.elapsed, 1),
                "lr": self.scheduler.get_last_lr()[0],
                "train_loss": train_loss,
                "val_score": score,
                **{f"val_mae_{t}": val[t]["mae"] for t in opts.targets},
            }
            if self.dist.main:
                self._append_metrics(row)
                if improved:
                    save_checkpoint(self._checkpoint({"val": val}), self.out / "best.pt")
                self.save_last()
            self.reporter.epoch(row)
            if opts.patience is not None and self.bad_epochs >= opts.patience:
                status = "early stop"
                break
        test = self.test() if self.dist.main else {}
        return {"status": status, "epoch": self.epoch, "test": test}

    def _append_metrics(self, row: dict[str, Any]) -> None:
        path = self.out / "metrics.csv"
        new = not path.exists()
        with open(path, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)

    def test(self) -> dict[str, dict]:
        """Test-set errors of ``best.pt`` in physical units, written to ``test_metrics.json``."""
        best = self.out / "best.pt"
        model = (
            model_from_checkpoint(read_checkpoint(best), best).to(self.device)
            if best.exists()
            else self.model
        )
        metrics = evaluate_split(model, self.labelled, "test", self.opts.eval_batch_size, self.device)
        (self.out / "test_metrics.json").write_text(json.dumps(metrics, indent=2))
        return metrics


def evaluate_split(
    model: nn.Module,
    labelled: LabelledData,
    split: str,
    batch_size: int,
    device: torch.device,
    limit: int | None = None,
) -> dict[str, dict]:
    """Errors per target on a split (its first ``limit`` molecules if given)."""
    indices = labelled.split[split][:limit]
    data = labelled.data
    cutoff = model.config.cutoff
    pred = predict_arrays(model, data, indices, batch_size, device, cutoff)
    return error_metrics(pred, data.targets[indices], data.target_names)


def labelled_for_checkpoint(
    checkpoint: dict[str, Any], dataset: str | None = None, cache=None
) -> LabelledData:
    """Rebuild the data and split a checkpoint was trained on (``dataset`` overrides the data source)."""
    data_info = checkpoint.get("training", {}).get("data", {})
    targets = tuple(checkpoint["targets"])
    seed = int(data_info.get("seed", 0))
    name = dataset or data_info.get("dataset", "qm9")
    return load_labelled(name, targets, seed, data_info.get("limit"), cache)
