"""Which implementation runs the attention layers: one choice per model, resolved in one place.

* ``torch``: the PyTorch implementation (any device, dtype and autocast; gradients of everything, forces
  included);
* ``fused_cpu``: the fused C kernel (:mod:`se3tcli.model.fused_cpu`): the CPU, depthwise kernels, float32
  or float64 throughout, no autocast, no gradient of the positions, molecules whose frame coefficients fit
  its blocks;
* ``reference``: every convolution through ``e3nn.o3.TensorProduct`` (the oracle of the tests; slow);
* ``auto`` (the default): ``fused_cpu`` for every layer call it can run, else ``torch``; ``SE3T_FUSED_CPU=0``
  makes it always ``torch`` (and never builds the kernel).

An explicit ``fused_cpu`` never falls back: where it cannot run a call (or the kernel cannot be built or
loaded), :func:`resolve` raises :class:`BackendUnavailable` with the reason, so that a benchmark or a test
never times or checks the PyTorch path under the kernel's name. The choice belongs to the model object
(:meth:`~se3tcli.model.transformer.SE3Transformer.set_backend`), not to its saved config.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from se3tcli.model.fused_cpu.blocks import ReceiverBlocks, layer_blocks
from se3tcli.model.fused_cpu.library import kernel_library

BACKENDS = ("auto", "torch", "fused_cpu", "reference")
DISABLE_ENV = "SE3T_FUSED_CPU"  # "0": ``auto`` never uses the fused kernel
_LABELS = {"torch": "PyTorch", "fused_cpu": "fused C kernel", "reference": "e3nn reference"}


class BackendUnavailable(RuntimeError):
    """The ``fused_cpu`` backend was requested where it cannot run."""


@dataclass(frozen=True)
class LayerCall:
    """One call of an attention layer, as far as the choice of its implementation depends on it."""

    features: torch.Tensor  # [n, C, D]
    geometry: object  # the forward pass's EdgeGeometry
    kernel: str  # the layer's convolution kernel: "depthwise" or "full"
    coefficients_per_row: int  # frame coefficients per coefficient row (S·2·C)


@dataclass(frozen=True)
class Resolution:
    backend: str  # what runs: "torch", "fused_cpu" or "reference"
    reason: str  # why: "requested", the kernel's file, or what keeps the kernel from this call
    blocks: ReceiverBlocks | None = None  # fused_cpu for a call: its receiver blocks

    @property
    def line(self) -> str:
        """One line for users, e.g. ``PyTorch (SE3T_FUSED_CPU=0)``."""
        return f"{_LABELS[self.backend]} ({self.reason})"


def check(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def _obstacle(call: LayerCall) -> str | None:
    """What keeps the fused kernel from ``call`` before its library is needed, or None."""
    x, geometry = call.features, call.geometry
    if call.kernel != "depthwise":
        return f"{call.kernel} kernels (the fused kernel runs depthwise ones)"
    if x.device.type != "cpu":
        return f"features on {x.device.type}"
    if x.dtype not in (torch.float32, torch.float64):
        return f"features in {x.dtype}"
    # the kernel reads every array in one type (a float64 model on a float32 batch: no)
    if any(t.dtype != x.dtype for t in (geometry.envelope, geometry.frames.wigner, geometry.radial)):
        return f"mixed floating-point types (features in {x.dtype}, geometry in {geometry.envelope.dtype})"
    if geometry.src.dtype != torch.int64:
        return f"edge indices in {geometry.src.dtype}"
    # the kernel's backward covers the features, queries and radial coefficients (training), not the geometry
    if torch.is_grad_enabled() and (geometry.envelope.requires_grad or geometry.frames.wigner.requires_grad):
        return "gradients of the positions are wanted"
    if torch.is_autocast_enabled("cpu"):
        return "CPU autocast is on"
    return None


def resolve(requested: str = "auto", call: LayerCall | None = None) -> Resolution:
    """Which implementation runs ``requested`` for ``call``, and why.

    Without ``call``: the answer for CPU inference in general, which ``se3t info`` prints for ``auto``.
    Raises ValueError for an unknown name and :class:`BackendUnavailable` where ``fused_cpu`` was requested
    and cannot run (for ``auto`` the same reason means ``torch``).
    """
    check(requested)
    if requested in ("torch", "reference"):
        return Resolution(requested, "requested")
    if requested == "auto" and os.environ.get(DISABLE_ENV, "1") == "0":
        return Resolution("torch", f"{DISABLE_ENV}=0")
    obstacle = None if call is None else _obstacle(call)
    blocks = None
    if obstacle is None:
        library = kernel_library()  # built on first use
        obstacle = None if library.cdll is not None else library.detail
    if obstacle is None and call is not None:
        blocks = layer_blocks(call.geometry, call.features.shape[0], call.coefficients_per_row)
        if blocks is None:
            obstacle = "a molecule whose frame coefficients exceed the kernel's largest block"
    if obstacle is None:
        return Resolution("fused_cpu", library.detail, blocks)
    if requested == "fused_cpu":
        raise BackendUnavailable(f"the fused_cpu attention backend cannot run here: {obstacle}")
    return Resolution("torch", obstacle)
