"""One optimizer step on a batch: the loss, the update, and the two ways of running forward and backward
(eager, with micro-batches after a GPU out-of-memory error, or through captured CUDA graphs)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from se3tcli.batching import StaticShape
from se3tcli.graph import Batch
from se3tcli.train.ema import WeightAverage


def loss_fn(outputs: dict[str, torch.Tensor], y: torch.Tensor, targets: Sequence[str], scale: torch.Tensor):
    """Mean over targets of the L1 error divided by each target's scale (a normalised L1)."""
    return stacked_loss(torch.stack([outputs[t] for t in targets], dim=1), y, scale)


def stacked_loss(pred: torch.Tensor, y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """:func:`loss_fn` of predictions ``[b, T]`` (columns in target order)."""
    return ((pred.to(torch.float64) - y).abs() / scale).mean()


class Update:
    """What follows the gradients: clipping, the optimizer and schedule steps, the weight average."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        clip_norm: float,
        ema: WeightAverage | None,
    ):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.clip_norm, self.ema = clip_norm, ema

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_norm)
        self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)


class EagerStep:
    """Forward and backward as PyTorch runs them. On a GPU out-of-memory error the batch is split into
    micro-batches whose gradients add up to the same step, and stays split for the rest of the run."""

    def __init__(
        self,
        network: nn.Module,  # the model, or its DistributedDataParallel wrapper
        update: Update,
        targets: Sequence[str],
        scale: torch.Tensor,  # [T] loss scale per target
        device: torch.device,
        amp: bool,
        collate_part: Callable[[np.ndarray], tuple[Batch, torch.Tensor]],  # molecules -> (batch, targets)
        message: Callable[[str], None],
        micro_batches: int = 1,
    ):
        self.network, self.update, self.targets, self.scale = network, update, tuple(targets), scale
        self.device, self.collate_part, self.message = device, collate_part, message
        self.use_amp = amp and device.type == "cuda"
        self.micro_batches = micro_batches

    def __call__(self, chunk: np.ndarray, batch: Batch, y: torch.Tensor) -> float:
        while True:
            try:
                return self._accumulated(chunk, batch, y)
            except torch.cuda.OutOfMemoryError:
                if self.micro_batches >= len(chunk):
                    raise
                self.update.zero_grad()
                torch.cuda.empty_cache()
                self.micro_batches *= 2
                self.message(f"GPU out of memory: each batch now runs as {self.micro_batches} micro-batches")

    def _accumulated(self, chunk: np.ndarray, whole: Batch, whole_y: torch.Tensor) -> float:
        self.network.train()
        self.update.zero_grad()
        total = 0.0
        for part in np.array_split(chunk, min(self.micro_batches, len(chunk))):
            batch, y = (whole, whole_y) if len(part) == len(chunk) else self.collate_part(part)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.use_amp):
                outputs = self.network(batch.to(self.device))
            loss = loss_fn(outputs, y.to(self.device), self.targets, self.scale) * (len(part) / len(chunk))
            loss.backward()
            total += float(loss.detach())
        self.update.step()
        return total


class GraphedStep:
    """The step through captured CUDA graphs (captured at the first call; padding rows excluded from the
    loss). Batches must be padded to ``shape``."""

    micro_batches = 1  # a graph replays one shape: no out-of-memory fallback

    def __init__(
        self,
        model: nn.Module,
        update: Update,
        targets: Sequence[str],
        scale: torch.Tensor,
        device: torch.device,
        amp: bool,
        shape: StaticShape,
        message: Callable[[str], None],
    ):
        self.model, self.update, self.targets, self.scale = model, update, tuple(targets), scale
        self.device, self.amp, self.shape, self.message = device, amp, shape, message
        self.graphed = None  # GraphedTraining, captured at the first step

    def __call__(self, chunk: np.ndarray, batch: Batch, y: torch.Tensor) -> float:  # noqa: ARG002
        from se3tcli.cuda_graphs import GraphedTraining  # CUDA only

        self.model.train()
        if self.graphed is None:
            self.graphed = GraphedTraining(self.model, self.shape, self.targets, self.amp)
            self.message(f"CUDA graphs captured for batches padded to {self.shape}")
        self.update.zero_grad()
        pred = self.graphed.predict(batch)[: batch.n_mol]  # [b, T]
        loss = stacked_loss(pred, y.to(self.device, non_blocking=True), self.scale)
        loss.backward()
        self.update.step()
        return float(loss.detach())
