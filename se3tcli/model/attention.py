"""Multi-head equivariant graph attention (the SE(3)-Transformer layer).

``q_i = W_Q f_i``, ``k_ij, v_ij = W_K(x_j - x_i) f_j, W_V(x_j - x_i) f_j`` (one fused convolution),
``α_ij = softmax_j(q_i · k_ij / sqrt(d))`` per head over the neighbours j of i, and
``f_out,i = W_self f_i + Σ_j α_ij v_ij``. The dot product sums over m inside every degree, so the logits
are invariant. Each edge's unnormalised weight is multiplied by the smooth cutoff envelope, so an atom
crossing the cutoff changes the output continuously.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from se3tcli.model.basis import AngularBasis, EdgeGeometry, degree_slice
from se3tcli.model.config import ModelConfig
from se3tcli.model.convolution import EdgeConvolution
from se3tcli.model.linear import DegreeLinear


def segment_softmax(
    logits: torch.Tensor, segment: torch.Tensor, n_segments: int, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Softmax of ``logits [E, H]`` over the entries sharing a ``segment`` id, max subtracted per segment.

    ``weight [E]`` (>= 0) multiplies each entry before normalisation. Empty segments are never read;
    segments whose weights are all zero get all-zero outputs.
    """
    index = segment[:, None].expand_as(logits)
    seg_max = logits.new_full((n_segments, logits.shape[1]), -torch.inf)
    seg_max = seg_max.scatter_reduce(0, index, logits, reduce="amax", include_self=True)
    shifted = torch.exp(logits - seg_max[segment].detach())  # the shift cancels; no gradient needed
    if weight is not None:
        shifted = shifted * weight[:, None]
    total = logits.new_zeros(n_segments, logits.shape[1]).index_add_(0, segment, shifted)
    return shifted / total[segment].clamp_min(torch.finfo(logits.dtype).tiny)


class AttentiveSelfInteraction(nn.Module):
    """``out^l_c' = Σ_c w^l_{c'c} f^l_c`` with weights from an MLP over the invariant inner products
    ``<f^l_c', f^l_c>`` of every channel pair (all degrees together)."""

    def __init__(self, channels: int, lmax: int, hidden: int = 16):
        super().__init__()
        self.lmax = lmax
        self.mlp = nn.Sequential(nn.Linear(lmax + 1, hidden), nn.SiLU(), nn.Linear(hidden, lmax + 1))
        self.scale = 1 / math.sqrt(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [n, C, D] -> [n, C, D]
        blocks = [x[:, :, degree_slice(l)] for l in range(self.lmax + 1)]
        inner = torch.stack([b @ b.transpose(1, 2) for b in blocks], dim=-1)  # [n, C', C, L], invariant
        weights = self.mlp(inner) * self.scale  # [n, C', C, L]
        return torch.cat([weights[..., l] @ b for l, b in enumerate(blocks)], dim=2)


class EquivariantAttention(nn.Module):
    def __init__(self, config: ModelConfig, angular: AngularBasis):
        super().__init__()
        c, lmax = config.channels, config.lmax
        self.n_heads = config.n_heads
        self.query = DegreeLinear(c, c, lmax, bias=False)
        self.key_value = EdgeConvolution(c, angular, config.kernel, config.radial_hidden, n_kernels=2)
        # Depthwise kernels mix no channels: values are mixed after aggregation (the same linear map per
        # edge or after the sum is identical); for keys W_Q already mixes, since q·(M k) = (Mᵀq)·k.
        self.value_mix = DegreeLinear(c, c, lmax, bias=False) if config.kernel == "depthwise" else None
        if config.self_interaction == "linear":
            self.self_interaction: nn.Module = DegreeLinear(c, c, lmax)
        else:
            self.self_interaction = AttentiveSelfInteraction(c, lmax)
        self.use_reference = False  # True: convolution through e3nn's TensorProduct (oracle)

    def attention_weights(self, x: torch.Tensor, geometry: EdgeGeometry) -> tuple[torch.Tensor, torch.Tensor]:
        """``α [E, H]`` and the values ``v [E, C, D]``."""
        conv = self.key_value.reference if self.use_reference else self.key_value
        key_value = conv(x.index_select(0, geometry.src), geometry)  # [E, 2, C, D]
        keys, values = key_value[:, 0], key_value[:, 1]
        queries = self.query(x).index_select(0, geometry.dst)  # [E, C, D]
        n_edges, c, dim = keys.shape
        head_size = (c // self.n_heads) * dim
        logits = (queries * keys).reshape(n_edges, self.n_heads, head_size).sum(-1) / math.sqrt(head_size)
        alpha = segment_softmax(logits, geometry.dst, x.shape[0], weight=geometry.envelope)
        return alpha, values

    def forward(self, x: torch.Tensor, geometry: EdgeGeometry) -> torch.Tensor:  # [n, C, D] -> [n, C, D]
        alpha, values = self.attention_weights(x, geometry)
        n_edges, c, dim = values.shape
        messages = values.reshape(n_edges, self.n_heads, c // self.n_heads, dim) * alpha[:, :, None, None]
        aggregated = x.new_zeros(x.shape[0], c, dim).index_add_(
            0, geometry.dst, messages.reshape(n_edges, c, dim)
        )
        if self.value_mix is not None:
            aggregated = self.value_mix(aggregated)
        return self.self_interaction(x) + aggregated
