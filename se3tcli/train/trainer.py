"""The training loop: data, model and optimizer set-up, epochs of steps, validation, checkpoints.

Every checkpoint's model is the averaged (EMA) one where the run averages; ``last.pt`` also keeps the live
training weights and records the position inside the epoch, so a run stopped by ``time_limit`` (or
Ctrl-C) continues with ``resume`` exactly where it stopped.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn

from se3tcli import __version__
from se3tcli.batching import StaticShape, graph_sizes, size_bounded_batches
from se3tcli.checkpoint import (
    LoadedModel,
    checkpoint_dict,
    load_model,
    model_from_checkpoint,
    read_checkpoint,
)
from se3tcli.data.dataset import LabelledData, load_labelled
from se3tcli.graph import Batch
from se3tcli.model.config import ModelConfig
from se3tcli.model.transformer import SE3Transformer
from se3tcli.prefetch import prefetch
from se3tcli.train.device import all_reduce_sum, init_distributed, training_device
from se3tcli.train.ema import WeightAverage
from se3tcli.train.evaluation import batches, predict_arrays, split_predictions, write_predictions
from se3tcli.train.options import TrainOptions
from se3tcli.train.run_directory import RunDirectory
from se3tcli.train.sampling import epoch_pool, heavy_atom_counts
from se3tcli.train.schedule import warmup_cosine
from se3tcli.train.statistics import build_model, checkpoint_statistics, fit_statistics, initial_model
from se3tcli.train.steps import EagerStep, GraphedStep, Update

PREFETCH_BATCHES = 4  # training batches collated ahead in a background thread


class TrainingReporter:
    """Callbacks the CLI implements to show progress; the base class stays silent."""

    def start(self, total_steps: int, done_steps: int, info: dict[str, Any]) -> None: ...

    def step(self, done_steps: int, loss: float, lr: float) -> None: ...

    def epoch(self, row: dict[str, Any]) -> None: ...

    def message(self, text: str) -> None: ...


class Trainer:
    def __init__(
        self,
        options: TrainOptions,
        reporter: TrainingReporter | None = None,
        given: Collection[str] | None = None,  # the options a command line set (for the resume rules)
    ):
        self.opts = options
        self.given = given
        self.reporter = reporter or TrainingReporter()
        self.dist = init_distributed(options.device)
        self.device = training_device(options.device, self.dist)
        if self.device.type == "cuda":  # TF32 matmuls for training (the equivariance checks turn it off)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.run_dir = RunDirectory(options.out)

    # --- set-up
    def setup(self) -> None:
        """Load the data and build (or restore) the model, optimizer and schedule; lock the run directory
        (rank 0, which writes it), as soon as it exists."""
        try:
            self._setup()
        except BaseException:
            self.run_dir.unlock()
            raise

    def _setup(self) -> None:
        saved = self.run_dir.read_last() if self.opts.resume else None
        if saved is not None and self.dist.main:
            self.run_dir.lock()
        if saved is None:
            self.run_dir.refuse_existing_run()
            self.opts = self.opts.for_new_run()
        else:
            self.opts = self.opts.resumed(saved["training"]["options"], self.given)
        opts = self.opts
        torch.manual_seed(opts.seed)
        source = None  # the --init-from model of a new run
        if saved is not None:
            self.statistics = checkpoint_statistics(saved)
            self.model = model_from_checkpoint(saved, self.run_dir.last)
            self.config = self.model.config
        else:  # the config first: it defines the run's new targets, which reading the labels needs
            source = load_model(opts.init_from) if opts.init_from else None
            if source is not None and "targets" not in opts.given_names(self.given):
                self.opts = opts = replace(opts, targets=source.targets)  # the model's own, new ones too
            self.config = self._new_config(source)
        self.labelled: LabelledData = load_labelled(
            opts.dataset, opts.targets, opts.seed, opts.limit, opts.cache
        )
        if saved is None:
            self.statistics, self.model = self._new_model(source)
        self.model.to(self.device)
        # The average starts from the loaded weights: on resume those are the saved average, and the
        # training weights are put back into the model below.
        self.ema = WeightAverage(self.model, opts.ema_decay) if opts.ema_decay else None
        self.scale = torch.tensor(
            [self.statistics["loss_scale"][t] for t in opts.targets], dtype=torch.float64, device=self.device
        )
        self.optimizer = torch.optim.AdamW(
            self._parameter_groups(), lr=opts.lr, weight_decay=opts.weight_decay
        )
        self.heavy_atoms = heavy_atom_counts(self.labelled.data)  # [n_mol], for the rare-size floor
        # An epoch stopped part-way finishes with the molecules it began with, whatever floor a resume gives.
        self.floor_of_epoch: dict[int, float] = {}
        self.pools: dict[float, np.ndarray] = {}  # by floor
        if saved is not None and saved["resume"]["batch_in_epoch"] > 0:
            self.floor_of_epoch[saved["resume"]["epoch"]] = saved["resume"].get("rare_size_floor", 0.0)
        self._setup_batching()
        self.steps_per_epoch = len(self._epoch_batches(0, opts.rare_size_floor))  # at the run's floor
        self.warmup_steps, self.total_steps = self._schedule_steps(saved)
        self.scheduler = warmup_cosine(self.optimizer, self.warmup_steps, self.total_steps)
        self.epoch, self.batch_in_epoch, self.step = 0, 0, 0
        self.best_val, self.bad_epochs, self.elapsed = math.inf, 0, 0.0
        self.epoch_loss_sum = 0.0  # this epoch's batch losses so far, kept across a resume
        micro_batches = 1  # doubled on each GPU out-of-memory error
        if saved is not None:
            r = saved["resume"]
            if self.ema is not None:
                self.model.load_state_dict(r["training_weights"])
                self.ema.restore(r["ema"])
            self.optimizer.load_state_dict(r["optimizer"])
            self.scheduler.load_state_dict(r["scheduler"])
            torch.set_rng_state(r["torch_rng"])
            self.epoch, self.batch_in_epoch, self.step = r["epoch"], r["batch_in_epoch"], r["step"]
            self.best_val, self.bad_epochs, self.elapsed = r["best_val"], r["bad_epochs"], r["elapsed"]
            self.epoch_loss_sum = r.get("epoch_loss_sum", 0.0)
            micro_batches = r.get("micro_batches", 1)
            self._continue_schedule(saved["training"]["options"]["epochs"])
            self._say_floor_change(saved["training"]["options"].get("rare_size_floor") or 0.0)
        elif self.dist.main:
            run_config = {"options": opts.to_dict(), "model": self.config.to_dict()}
            self.run_dir.start(self.labelled.split, opts.seed, run_config)
        self.metric_columns = self.run_dir.metric_columns(opts.targets)
        self.network: nn.Module = self.model  # what the steps call: the model or its DDP wrapper
        if self.dist.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.network = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.train_step = self._make_step(micro_batches)

    def _schedule_steps(self, saved: dict[str, Any] | None) -> tuple[int, int]:
        """Warm-up and total steps of the learning-rate schedule: epochs x steps per epoch for a new run,
        the run's own for a resume. A resume that changes the epochs or the rare-size floor keeps the
        steps done and lays the rest of the cosine over the rest of the stopped epoch and the remaining
        epochs at their new length (runs saved before the totals were kept: as a new run's)."""
        opts = self.opts
        warmup, total = int(opts.warmup_epochs * self.steps_per_epoch), self.steps_per_epoch * opts.epochs
        if saved is None:
            return warmup, total
        r, run = saved["resume"], saved["training"]["options"]
        warmup = r.get("warmup_steps", warmup)
        if opts.epochs == run["epochs"] and opts.rare_size_floor == (run.get("rare_size_floor") or 0.0):
            return warmup, r.get("total_steps", total)
        epoch = r["epoch"]
        if epoch >= opts.epochs:
            return warmup, r["step"]  # the schedule is over
        rest_of_epoch = len(self._epoch_batches(epoch)) - r["batch_in_epoch"]
        return warmup, r["step"] + rest_of_epoch + (opts.epochs - epoch - 1) * self.steps_per_epoch

    def _continue_schedule(self, run_epochs: int) -> None:
        """Give the optimizer the learning rates of this run's schedule at the resumed step (another
        ``--epochs`` recomputes the cosine, so they differ from the saved ones) and say what they are."""
        scheduler, opts = self.scheduler, self.opts
        rates = [
            base * f(self.step) for base, f in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
        ]
        for group, rate in zip(self.optimizer.param_groups, rates, strict=True):
            group["lr"] = rate
        note = f"resuming at epoch {self.epoch}, step {self.step} of {self.total_steps}: "
        note += f"learning rate {rates[0]:.3g}"
        if self.step >= self.total_steps:
            note += f"; its {opts.epochs}-epoch schedule is over (a larger --epochs continues it)"
        elif opts.epochs != run_epochs:
            note += f", on a cosine over {opts.epochs} epochs instead of the run's {run_epochs}"
        if self.dist.main:
            self.reporter.message(note)

    def _say_floor_change(self, run_floor: float) -> None:
        floor = self.opts.rare_size_floor
        if floor != run_floor and self.dist.main:
            first = self.epoch + 1 + (self.epoch in self.floor_of_epoch)
            self.reporter.message(
                f"rare-size floor {floor:g} from epoch {first} (the run's was {run_floor:g}): "
                f"{len(self._pool(floor))} molecules per epoch instead of {len(self._pool(run_floor))}"
            )

    def _new_config(self, source: LoadedModel | None) -> ModelConfig:
        """A new run's model: this run's targets on the ``--init-from`` model (``source``) or the preset."""
        if self.opts.freeze_encoder and source is None:
            raise ValueError("--freeze-encoder needs --init-from (a new encoder would stay random)")
        return self.opts.model_config(source.model.config if source else None, self.given)

    def _new_model(self, source: LoadedModel | None) -> tuple[dict[str, Any], SE3Transformer]:
        """``(statistics, model)`` of a new run: fine-tuned from ``source``, or new."""
        if source is not None:
            return initial_model(source.checkpoint, source.model, self.config, self.labelled)
        statistics = fit_statistics(self.labelled.data, self.labelled.split["train"], self.config.elements)
        return statistics, build_model(self.config, statistics)

    def _parameter_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups: the readout's at ``--lr`` first (the rate the progress shows),
        then the encoder's at ``--encoder-lr-factor`` times it, or none with ``--freeze-encoder``. One
        group where the two rates are equal, as runs saved before the factor existed have."""
        opts = self.opts
        readout = list(self.model.readout.parameters())
        encoder = [p for name, p in self.model.named_parameters() if not name.startswith("readout.")]
        if opts.freeze_encoder:
            for parameter in encoder:
                parameter.requires_grad_(False)
            return [{"params": readout}]
        if opts.encoder_lr_factor == 1.0:
            return [{"params": list(self.model.parameters())}]  # the order a resumed optimizer state has
        return [{"params": readout}, {"params": encoder, "lr": opts.lr * opts.encoder_lr_factor}]

    def _make_step(self, micro_batches: int) -> EagerStep | GraphedStep:
        opts = self.opts
        update = Update(self.model, self.optimizer, self.scheduler, opts.clip_norm, self.ema)
        if self.static_shape is not None:
            return GraphedStep(
                self.model, update, opts.targets, self.scale, self.device, opts.amp, self.static_shape,
                self.reporter.message,
            )  # fmt: skip
        return EagerStep(
            self.network, update, opts.targets, self.scale, self.device, opts.amp, self._collate,
            self.reporter.message, micro_batches,
        )  # fmt: skip

    @property
    def graphed(self):
        """The captured CUDA graphs (``--cuda-graphs``, after the first step), else None."""
        return getattr(self.train_step, "graphed", None)

    def _setup_batching(self) -> None:
        """Molecule sizes for batches bounded by atoms/edges, and the static shape for CUDA graphs."""
        opts = self.opts
        self.sizes: tuple[np.ndarray, np.ndarray] | None = None
        self.static_shape: StaticShape | None = None
        if opts.cuda_graphs and self.device.type != "cuda":
            raise ValueError("--cuda-graphs needs a CUDA device")
        if not (opts.max_atoms or opts.max_edges or opts.cuda_graphs):
            return
        if self.dist.world > 1:
            raise ValueError("--max-atoms/--max-edges/--cuda-graphs work on one device only (no torchrun)")
        data, train = self.labelled.data, self.labelled.split["train"]
        atoms, edges = np.zeros(len(data), np.int64), np.zeros(len(data), np.int64)
        atoms[train], edges[train] = graph_sizes(data.molecule, train, self.config.cutoff)
        if opts.max_atoms or opts.max_edges:  # batches bounded by size
            if opts.cuda_graphs:  # a graph replays one shape: a budget given for one, a default for the other
                mean = opts.batch_size
                opts.max_atoms = opts.max_atoms or max(
                    int(atoms[train].max()), round(mean * atoms[train].mean())
                )
                opts.max_edges = opts.max_edges or max(
                    int(edges[train].max()), round(mean * edges[train].mean())
                )
            self.sizes = (atoms, edges)
            largest = (opts.max_atoms, opts.max_edges)
        else:  # fixed-size batches, with or without graphs: the same batches either way
            largest = self._largest_fixed_batch(atoms, edges)
        if opts.cuda_graphs:
            self.static_shape = StaticShape.for_budget(*largest, opts.batch_size)

    def _largest_fixed_batch(self, atoms: np.ndarray, edges: np.ndarray) -> tuple[int, int]:
        """Most atoms and most edges of any ``batch_size`` batch in the run's epochs (the orders are
        seeded, so they are known in advance): CUDA graphs then replay the very batches an eager run
        takes, and a run may switch between the two when it resumes."""
        most_atoms = most_edges = 0
        for epoch in range(self.opts.epochs):
            order = self._epoch_order(epoch)
            starts = np.arange(0, len(order), self.opts.batch_size)
            most_atoms = max(most_atoms, int(np.add.reduceat(atoms[order], starts).max()))
            most_edges = max(most_edges, int(np.add.reduceat(edges[order], starts).max()))
        return most_atoms, most_edges

    def _floor(self, epoch: int) -> float:
        """The rare-size floor of ``epoch``: the run's, or the one a stopped epoch began with."""
        return self.floor_of_epoch.get(epoch, self.opts.rare_size_floor)

    def _pool(self, floor: float) -> np.ndarray:
        """The training molecules an epoch visits with this rare-size floor (see ``epoch_pool``)."""
        if floor not in self.pools:
            self.pools[floor] = epoch_pool(self.labelled.split["train"], self.heavy_atoms, floor)
        return self.pools[floor]

    def _epoch_order(self, epoch: int, floor: float | None = None) -> np.ndarray:
        """This rank's molecules of ``epoch`` in their seeded order (``floor``: instead of the epoch's)."""
        pool = self._pool(self._floor(epoch) if floor is None else floor)
        order = np.random.default_rng([self.opts.seed, epoch]).permutation(pool)
        per_rank = len(order) // self.dist.world
        return order[self.dist.rank * per_rank : (self.dist.rank + 1) * per_rank]

    def _epoch_batches(self, epoch: int, floor: float | None = None) -> list[np.ndarray]:
        """This rank's batches of the epoch: ``batch_size`` molecules each, or bounded by atoms/edges."""
        order = self._epoch_order(epoch, floor)
        if self.sizes is None:
            size = self.opts.batch_size
            return [order[start : start + size] for start in range(0, len(order), size)]
        atoms, edges = self.sizes
        return size_bounded_batches(
            order, atoms, edges, self.opts.max_atoms, self.opts.max_edges, self.opts.batch_size
        )

    def _collate(self, chunk: np.ndarray) -> tuple[Batch, torch.Tensor]:
        """The molecules ``chunk`` as one batch, and their targets ``[b, T]``."""
        batch, y, _ = next(batches(self.labelled.data, chunk, len(chunk), self.config.cutoff))
        return batch, y

    def _collated(self, chunks: Sequence[np.ndarray]) -> Iterator[tuple[np.ndarray, Batch, torch.Tensor]]:
        for chunk in chunks:
            yield chunk, *self._collate(chunk)

    # --- checkpoints
    @property
    def eval_model(self) -> SE3Transformer:
        """The weights to validate, save and export: the average where there is one."""
        return self.ema.model if self.ema is not None else self.model

    @functools.cached_property
    def domain(self) -> dict[str, Any]:
        """What the data covers, for the domain warnings of predictions (stored in every checkpoint)."""
        data = self.labelled.data
        train_heavy = self.heavy_atoms[self.labelled.split["train"]]
        return {
            "elements": sorted({int(z) for z in np.unique(data.numbers)}),
            "max_atoms": int(data.n_atoms().max()),
            "max_heavy_atoms": int(self.heavy_atoms.max()),
            # Training molecules per heavy-atom count: predictions warn where few were seen.
            "train_molecules_by_heavy_atoms": {
                str(k): int(n) for k, n in zip(*np.unique(train_heavy, return_counts=True), strict=True)
            },
        }

    def _training_summary(self) -> dict[str, Any]:
        return {
            "options": self.opts.to_dict(),
            "command": self.opts.command,
            "data": self.labelled.description,
            "domain": self.domain,
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
            self.eval_model, normalization, stats["atom_refs"], self._training_summary(), metrics
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
                "micro_batches": self.train_step.micro_batches,
                "rare_size_floor": self._floor(self.epoch),  # the one this epoch's order was drawn with
                "warmup_steps": self.warmup_steps,
                "total_steps": self.total_steps,
            }
            if self.ema is not None:  # the checkpoint's model is the average; these are the live weights
                data["resume"]["training_weights"] = {
                    k: v.detach().cpu() for k, v in self.model.state_dict().items()
                }
                data["resume"]["ema"] = self.ema.state()
        return data

    def save_last(self) -> None:
        if self.dist.main:
            self.run_dir.save_last(self._checkpoint(with_resume=True))

    # --- loop
    def validate(self) -> dict[str, dict]:
        """MAE and RMSE per target on the validation split (summed over the ranks of a DDP run)."""
        data = self.labelled.data
        val = self.labelled.split["val"]
        part = np.array_split(val, self.dist.world)[self.dist.rank]
        pred = predict_arrays(self.eval_model, data, part, self.opts.eval_batch_size, self.device)
        truth = data.targets[part]
        targets = self.opts.targets
        abs_sum = np.array([np.abs(pred[t] - truth[:, i]).sum() for i, t in enumerate(targets)])
        sq_sum = np.array([((pred[t] - truth[:, i]) ** 2).sum() for i, t in enumerate(targets)])
        totals = all_reduce_sum(np.concatenate([abs_sum, sq_sum, [len(part)]]), self.dist, self.device)
        n_t = len(targets)
        count = max(totals[-1], 1.0)
        return {
            t: {"mae": float(totals[i] / count), "rmse": math.sqrt(totals[n_t + i] / count)}
            for i, t in enumerate(targets)
        }

    def run(self, should_stop: Callable[[], bool] = lambda: False) -> dict[str, Any]:
        """Train until the epochs, patience or time limit run out; returns a summary. The run directory
        stays locked from :meth:`setup` until this returns."""
        try:
            return self._run(should_stop)
        finally:
            self.run_dir.unlock()

    def _run(self, should_stop: Callable[[], bool]) -> dict[str, Any]:
        opts = self.opts
        started = time.monotonic()
        elapsed_before = self.elapsed
        self.reporter.start(self.total_steps, self.step, {"device": str(self.device), "out": str(opts.out)})
        status = "finished"
        while self.epoch < opts.epochs:
            if self.batch_in_epoch == 0:
                self.epoch_loss_sum = 0.0
            remaining = self._epoch_batches(self.epoch)[self.batch_in_epoch :]
            for chunk, batch, y in prefetch(self._collated(remaining), PREFETCH_BATCHES):
                loss = self.train_step(chunk, batch, y)
                self.epoch_loss_sum += loss
                self.batch_in_epoch += 1
                self.step += 1
                self.elapsed = elapsed_before + time.monotonic() - started
                self.reporter.step(self.step, loss, self.scheduler.get_last_lr()[0])
                out_of_time = (
                    opts.time_limit is not None and time.monotonic() - started > opts.time_limit * 60
                )
                # Every rank must stop after the same step, or the others wait forever in the next one.
                flags = all_reduce_sum(np.array([out_of_time, should_stop()], float), self.dist, self.device)
                out_of_time = bool(flags[0])
                if out_of_time or flags[1]:
                    self.save_last()
                    return {"status": "time limit" if out_of_time else "interrupted", "epoch": self.epoch}
            if self._end_epoch():
                status = "early stop"
                break
        test = self.test() if self.dist.main else {}
        return {"status": status, "epoch": self.epoch, "test": test}

    def _end_epoch(self) -> bool:
        """Validate, record the epoch and save its checkpoints; True when patience has run out."""
        opts = self.opts
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
            **{self.metric_columns[t]: val[t]["mae"] for t in opts.targets},
        }
        if self.dist.main:
            self.run_dir.append_metrics(row)
            if improved:
                self.run_dir.save_best(self._checkpoint({"val": val}))
            self.save_last()
        self.reporter.epoch(row)
        return opts.patience is not None and self.bad_epochs >= opts.patience

    def test(self) -> dict[str, dict]:
        """Test-set errors of ``best.pt`` in physical units, written to ``test_metrics.json``, and its
        predictions, to ``test_predictions.csv``."""
        best = self.run_dir.best
        model = (
            model_from_checkpoint(read_checkpoint(best), best).to(self.device)
            if best.exists()
            else self.eval_model
        )
        pred, _, metrics = split_predictions(
            model, self.labelled, "test", self.opts.eval_batch_size, self.device
        )
        self.run_dir.write_test_metrics(metrics)
        write_predictions(self.run_dir.test_predictions, self.labelled, "test", pred)
        return metrics
