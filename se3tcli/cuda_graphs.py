"""CUDA graphs over padded batches of one static shape: the forward pass (inference) or the forward and
backward passes (training) captured once and replayed for every batch.

A layer launches dozens of small kernels, so on a GPU a model of this size is bound by launch overhead
rather than arithmetic. A replayed graph launches them all at once, but it replays fixed shapes and
addresses: every batch is padded to one :class:`~se3tcli.batching.StaticShape` and copied into the graph's
input tensors. A replay runs no Python, so the model's element check runs here, on the CPU copy of the
atomic numbers, before the copy to the GPU.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch
from torch import nn

from se3tcli.batching import StaticShape, pad_batch
from se3tcli.graph import TENSOR_FIELDS, Batch
from se3tcli.model.transformer import SE3Transformer

_WARMUP_PASSES = 3  # eager passes on a side stream before capture (cuBLAS handles, allocator pools)


def autocast(enabled: bool) -> AbstractContextManager:
    """bf16 autocast as graphs need it: no weight-cast cache (cached casts would outlive the capture)."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=enabled, cache_enabled=False)


def padded_inputs(
    model: SE3Transformer, batch: Batch, shape: StaticShape, edges_paired: bool
) -> tuple[torch.Tensor, ...]:
    """The tensors (``Batch.tensors()``) of a CPU ``batch`` padded to ``shape``, its elements
    and edge order checked first (a replay cannot raise). ``edges_paired``: the edge order the graph was
    captured with; a paired capture computes radial features once per pair, so it needs paired edges."""
    model.check_elements(batch.z)
    padded = pad_batch(batch, shape, model.config.elements[0])
    if edges_paired and not padded.edges_paired:
        raise ValueError("this CUDA graph was captured for paired edges (batches built by collate)")
    return padded.tensors()


def empty_batch(dtype: torch.dtype = torch.float32) -> Batch:
    """No molecules; its (no) edges count as paired, like those of every batch built by collate."""
    empty = [torch.zeros(0, dtype=torch.long)] * len(TENSOR_FIELDS)
    empty[TENSOR_FIELDS.index("pos")] = torch.zeros(0, 3, dtype=dtype)
    return Batch.from_tensors(empty, n_mol=0, edges_paired=True)


class _TensorForward(nn.Module):
    """The model as a function of plain tensors (what ``make_graphed_callables`` takes): a batch's
    ``Batch.tensors()`` -> predictions ``[n_mol, T]`` of ``targets``."""

    def __init__(self, model: SE3Transformer, n_mol: int, targets: tuple[str, ...], edges_paired: bool):
        super().__init__()
        self.model = model
        self.n_mol = n_mol
        self.targets = targets
        self.edges_paired = edges_paired

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        out = self.model(Batch.from_tensors(tensors, self.n_mol, self.edges_paired))
        return torch.stack([out[t] for t in self.targets], dim=1)


class GraphedTraining:
    """Forward and backward of ``model`` for one static shape (``torch.cuda.make_graphed_callables``).

    ``predict(batch)`` pads a CPU batch, runs the captured forward and returns ``[shape.n_mol, T]``
    predictions whose backward replays the captured backward; rows past ``batch.n_mol`` are padding. The
    optimizer step stays eager (a handful of fused kernels).
    """

    def __init__(self, model: SE3Transformer, shape: StaticShape, targets: tuple[str, ...], amp: bool):
        self.model, self.shape, self.amp = model, shape, amp
        self.device = next(model.parameters()).device
        self.edges_paired = pad_batch(empty_batch(), shape, model.config.elements[0]).edges_paired
        sample = self._inputs(empty_batch())
        with autocast(amp):
            self.forward = torch.cuda.make_graphed_callables(
                _TensorForward(model, shape.n_mol, targets, self.edges_paired),
                sample,
                num_warmup_iters=_WARMUP_PASSES,
                allow_unused_input=True,
            )

    def _inputs(self, batch: Batch) -> tuple[torch.Tensor, ...]:
        tensors = padded_inputs(self.model, batch, self.shape, self.edges_paired)
        return tuple(t.pin_memory().to(self.device, non_blocking=True) for t in tensors)

    def predict(self, batch: Batch) -> torch.Tensor:
        with autocast(self.amp):
            return self.forward(*self._inputs(batch))


class GraphedInference:
    """One captured forward pass of ``model`` (eval mode, no gradients) for one static shape; calling it
    with a CPU batch that fits the shape returns the eager model's outputs ``{name: [n_mol, ...]}``."""

    def __init__(self, model: SE3Transformer, shape: StaticShape, amp: bool = False):
        self.model, self.shape, self.amp = model.eval(), shape, amp
        self.device = next(model.parameters()).device
        self.static = pad_batch(empty_batch(), shape, model.config.elements[0]).to(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), torch.no_grad(), autocast(amp):
            for _ in range(_WARMUP_PASSES):
                model(self.static)
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad(), autocast(amp):
            self.outputs = model(self.static)

    def __call__(self, batch: Batch) -> dict[str, torch.Tensor]:
        static = self.static
        inputs = padded_inputs(self.model, batch, self.shape, static.edges_paired)
        for target, value in zip(static.tensors(), inputs, strict=True):
            target.copy_(value.pin_memory(), non_blocking=True)
        self.graph.replay()
        return {name: value[: batch.n_mol].clone() for name, value in self.outputs.items()}
