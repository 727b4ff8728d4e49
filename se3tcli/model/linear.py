"""Per-degree linear maps (the equivariant 1x1 convolution): channels mix, degrees and m never do."""

from __future__ import annotations

import math

import torch
from torch import nn


class DegreeLinear(nn.Module):
    """``out^l[c'] = Σ_c W^l[c', c] x^l[c]`` for every degree l, plus a bias on the scalars."""

    def __init__(self, channels_in: int, channels_out: int, lmax: int, bias: bool = True):
        super().__init__()
        self.lmax = lmax
        self.weight = nn.Parameter(torch.randn(lmax + 1, channels_out, channels_in) / math.sqrt(channels_in))
        self.bias = nn.Parameter(torch.zeros(channels_out)) if bias else None
        degree_of = torch.cat([torch.full((2 * l + 1,), l) for l in range(lmax + 1)])
        self.register_buffer("degree_of", degree_of, persistent=False)  # [D]: the degree of each component

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [n, C_in, D] -> [n, C_out, D]
        # One batched product over the D components: [D, C_out, C_in] @ [D, C_in, n] -> [D, C_out, n].
        out = torch.matmul(self.weight[self.degree_of], x.permute(2, 1, 0)).permute(2, 1, 0)
        if self.bias is not None:
            out = torch.cat([out[:, :, :1] + self.bias[:, None], out[:, :, 1:]], dim=2)
        return out.contiguous()
