"""Per-degree linear maps (the equivariant 1x1 convolution): channels mix, degrees and m never do."""

from __future__ import annotations

import math

import torch
from torch import nn

from se3tcli.model.basis import degree_slice


class DegreeLinear(nn.Module):
    """``out^l[c'] = Σ_c W^l[c', c] x^l[c]`` for every degree l, plus a bias on the scalars."""

    def __init__(self, channels_in: int, channels_out: int, lmax: int, bias: bool = True):
        super().__init__()
        self.lmax = lmax
        self.weight = nn.Parameter(torch.randn(lmax + 1, channels_out, channels_in) / math.sqrt(channels_in))
        self.bias = nn.Parameter(torch.zeros(channels_out)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [n, C_in, D] -> [n, C_out, D]
        blocks = [
            torch.einsum("kc,ncm->nkm", self.weight[l], x[:, :, degree_slice(l)])
            for l in range(self.lmax + 1)
        ]
        if self.bias is not None:
            blocks[0] = blocks[0] + self.bias[:, None]
        return torch.cat(blocks, dim=2)
