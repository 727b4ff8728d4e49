"""Equivariant nonlinearities: norm-based (with layer norm on the norms) or gated.

``norm`` (``SiLU(LN(|v|)) / |v|``) is discontinuous at ``|v| = 0``: a vector that symmetry makes zero
(methane's carbon) comes out with a length of order one and a direction set by rounding noise. It is
kept for the checkpoints that use it; ``norm_sigmoid`` and ``gate`` are continuous everywhere.

Both act on degrees ``0..lmax`` and pass any higher degree through unchanged; the first layer, whose input
holds only scalars, uses ``lmax = 0`` (its higher degrees are zero, and would stay zero either way).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from se3tcli.model.basis import degree_slice

_NORM_EPS = 1e-12  # keeps the norm's gradient finite at zero features


class NormActivation(nn.Module):
    """Scalars: LayerNorm then SiLU. Degree l > 0: each channel's vector is multiplied by an invariant
    factor of its length, :meth:`scale` of ``LayerNorm(|v|)``, so directions never change and the map
    commutes with rotations. Here the factor is ``SiLU(LayerNorm(|v|)) / |v|`` (the new length is the
    SiLU), which is discontinuous at ``|v| = 0``."""

    def __init__(self, channels: int, lmax: int):
        super().__init__()
        self.lmax = lmax
        self.norms = nn.ModuleList(nn.LayerNorm(channels) for _ in range(lmax + 1))

    @staticmethod
    def scale(normed: torch.Tensor, length: torch.Tensor) -> torch.Tensor:  # [n, C] each -> [n, C]
        return F.silu(normed) / length

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [n, C, D] -> [n, C, D]
        blocks = [F.silu(self.norms[0](x[:, :, 0])).unsqueeze(2)]
        for l in range(1, self.lmax + 1):
            v = x[:, :, degree_slice(l)]  # [n, C, 2l+1]
            length = torch.sqrt(v.pow(2).sum(-1) + _NORM_EPS)  # [n, C], invariant
            blocks.append(v * self.scale(self.norms[l](length), length).unsqueeze(2))
        blocks.append(x[:, :, (self.lmax + 1) ** 2 :])
        return torch.cat(blocks, dim=2)


class SigmoidNormActivation(NormActivation):
    """:class:`NormActivation` with the factor ``sigmoid(LayerNorm(|v|))``, in (0, 1): the output is
    continuous everywhere (zero at zero)."""

    @staticmethod
    def scale(normed: torch.Tensor, length: torch.Tensor) -> torch.Tensor:  # [n, C] each -> [n, C]
        return torch.sigmoid(normed)


class GateActivation(nn.Module):
    """e3nn-style gate: scalars go through LayerNorm + SiLU; every channel of degree l > 0 is multiplied by
    a sigmoid gate computed from the scalars."""

    def __init__(self, channels: int, lmax: int):
        super().__init__()
        self.lmax = lmax
        self.norm = nn.LayerNorm(channels)
        self.gates = nn.Linear(channels, channels * lmax) if lmax > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [n, C, D] -> [n, C, D]
        scalars = self.norm(x[:, :, 0])  # [n, C]
        blocks = [F.silu(scalars).unsqueeze(2)]
        if self.gates is not None:
            gates = torch.sigmoid(self.gates(scalars)).reshape(x.shape[0], self.lmax, -1)  # [n, lmax, C]
            for l in range(1, self.lmax + 1):
                blocks.append(x[:, :, degree_slice(l)] * gates[:, l - 1].unsqueeze(2))
        blocks.append(x[:, :, (self.lmax + 1) ** 2 :])
        return torch.cat(blocks, dim=2)


ACTIVATIONS = {"norm": NormActivation, "norm_sigmoid": SigmoidNormActivation, "gate": GateActivation}


def make_activation(kind: str, channels: int, lmax: int) -> nn.Module:
    return ACTIVATIONS[kind](channels, lmax)
