"""Multi-head equivariant graph attention (the SE(3)-Transformer layer).

``q_i = W_Q f_i``, ``k_ij, v_ij = W_K(x_j - x_i) f_j, W_V(x_j - x_i) f_j`` (one fused convolution),
``α_ij = softmax_j(q_i · k_ij / sqrt(d))`` per head over the neighbours j of i, and
``f_out,i = W_self f_i + Σ_j α_ij v_ij``. The dot product sums over m inside every degree, so the logits
are invariant. Each edge's unnormalised weight is multiplied by the smooth cutoff envelope, so an atom
crossing the cutoff changes the output continuously. The normalisation alone cannot achieve that for a
receiver whose neighbours all sit near the cutoff (an isolated pair: its one weight is 1 just inside the
cutoff and 0 outside), so the aggregated messages are also scaled by :func:`neighbourhood_gate`, which is
exactly 1 whenever the envelopes of a receiver's edges sum to at least 1 (every atom of QM9).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from se3tcli.model.backend import LayerCall, resolve
from se3tcli.model.basis import AngularBasis, EdgeGeometry, degree_slice, polynomial_envelope
from se3tcli.model.config import ModelConfig
from se3tcli.model.convolution import EdgeConvolution
from se3tcli.model.fused_cpu import call as fused_call
from se3tcli.model.fused_cpu.blocks import ReceiverBlocks
from se3tcli.model.linear import DegreeLinear

# CPU inference convolves blocks of edges whose largest intermediate holds about this many numbers
# (~2 MB in float32), so that it stays in a core's cache (A/B runs: 0.25-1 M alike, 2.5 M ~20 % slower).
_CPU_BLOCK_ELEMENTS = 500_000
_MIN_EDGE_BLOCK = 64


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


def neighbourhood_gate(envelope: torch.Tensor, dst: torch.Tensor, n_nodes: int) -> torch.Tensor:
    """``[n_nodes]`` factor in [0, 1] for the aggregated messages: ``1 - envelope(W_i)`` of the total edge
    weight ``W_i = Σ_j envelope(r_ij)``. It is exactly 1 for ``W_i >= 1``, goes smoothly (like ``W_i^6``)
    to 0 with ``W_i`` and is 0 for nodes without edges, so messages vanish continuously as a receiver's
    last neighbour leaves the cutoff."""
    total = envelope.new_zeros(n_nodes).index_add_(0, dst, envelope)
    return 1 - polynomial_envelope(total)


class AttentiveSelfInteraction(nn.Module):
    """``out^l_c' = Σ_c w^l_{c'c} f^l_c`` with weights from an MLP over the invariant inner products
    ``<f^l_c', f^l_c>`` of every channel pair (all degrees together)."""

    def __init__(self, channels: int, lmax: int, hidden: int = 16):
        super().__init__()
        self.lmax = lmax
        # No bias in the last layer: a constant weight for all channel pairs adds the same value to every
        # scalar channel, which the next LayerNorm removes (and in the first layer it would be dead).
        self.mlp = nn.Sequential(
            nn.Linear(lmax + 1, hidden), nn.SiLU(), nn.Linear(hidden, lmax + 1, bias=False)
        )
        self.scale = 1 / math.sqrt(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [n, D, C] -> [n, D, C], channels last
        blocks = [x[:, degree_slice(l)] for l in range(self.lmax + 1)]  # [n, 2l+1, C]
        inner = torch.stack([b.transpose(1, 2) @ b for b in blocks], dim=-1)  # [n, C', C, L], invariant
        weights = self.mlp(inner) * self.scale  # [n, C', C, L]
        return torch.cat([b @ weights[..., l].transpose(1, 2) for l, b in enumerate(blocks)], dim=1)


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
        self.backend = "auto"  # see se3tcli.model.backend; set by SE3Transformer.set_backend

    def attention_weights(self, x: torch.Tensor, geometry: EdgeGeometry) -> tuple[torch.Tensor, torch.Tensor]:
        """``α [E, H]`` and the values ``v [E, C, D]``, with PyTorch operations (the fused kernel never
        writes per-edge weights), through e3nn's convolution under the ``reference`` backend."""
        x_last = x.transpose(1, 2).contiguous()  # [n, D, C]
        alpha, values = self._attend(x_last, self.query(x_last), geometry, self.backend == "reference")
        return alpha, torch.cat(values).transpose(1, 2)

    def _attend(
        self, x_last: torch.Tensor, queries: torch.Tensor, geometry: EdgeGeometry, reference: bool
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Features and queries ``[n, D, C]`` -> ``α [E, H]`` and the channels-last values ``[B, D, C]`` of
        each block of edges; ``reference``: keys and values through e3nn's TensorProduct.

        One block, except in CPU inference: there blocks of edges keep the per-edge intermediates in cache
        and on pages the allocator reuses (a large tensor is mapped, and page-faulted in, anew every time).
        """
        n_edges, dim, c = geometry.src.shape[0], x_last.shape[1], x_last.shape[2]
        head_channels = c // self.n_heads
        layer = None if reference else self.key_value.term_layer()
        block = max(n_edges, 1)
        if layer is not None and x_last.device.type == "cpu" and not torch.is_grad_enabled():
            per_edge = max(layer[0].shape[0], self.key_value.terms_per_edge)  # the largest intermediate's
            block = max(_MIN_EDGE_BLOCK, _CPU_BLOCK_ELEMENTS // per_edge // 2 * 2)  # whole reverse pairs
        logits, values = [], []
        for first in range(0, max(n_edges, 1), block):
            part = geometry if block >= n_edges else geometry[first : first + block]  # frames made once
            x_src = x_last.index_select(0, part.src)  # [B, D, C]
            if layer is None:
                key_value = self.key_value.reference(x_src.transpose(1, 2), part).permute(0, 3, 1, 2)
            else:
                key_value = self.key_value.channels_last(x_src, part, layer)  # [B, D, 2, C]
            keys, block_values = key_value.unbind(2)  # [B, D, C] each
            dots = (queries.index_select(0, part.dst) * keys).sum(1)  # [B, C]: q·k per channel
            logits.append(dots.view(-1, self.n_heads, head_channels).sum(2))  # [B, H]
            values.append(block_values)
        logits = torch.cat(logits) / math.sqrt(head_channels * dim)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # autocast: softmax in float32
        return segment_softmax(logits, geometry.dst, x_last.shape[0], weight=geometry.envelope), values

    def forward(self, x: torch.Tensor, geometry: EdgeGeometry) -> torch.Tensor:  # [n, C, D] -> [n, C, D]
        x_last = x.transpose(1, 2).contiguous()  # [n, D, C]: channels last inside the layer
        queries = self.query(x_last)  # [n, D, C]
        conv = self.key_value
        per_row = conv.angular.n_coefficients * conv.n_kernels * conv.channels  # [S, K, C] per row
        choice = resolve(self.backend, LayerCall(x, geometry, conv.kernel, per_row))
        # aggregated: [n, D, C]
        if choice.backend == "fused_cpu":
            aggregated = self._aggregate_fused(x_last, queries, geometry, choice.blocks)
        else:
            aggregated = self._aggregate(x_last, queries, geometry, reference=choice.backend == "reference")
        gate = neighbourhood_gate(geometry.envelope, geometry.dst, x.shape[0])  # [n], 1 unless isolated
        aggregated = aggregated * gate[:, None, None]
        if self.value_mix is not None:
            aggregated = self.value_mix(aggregated)
        return (self.self_interaction(x_last) + aggregated).transpose(1, 2)

    def _aggregate(
        self, x_last: torch.Tensor, queries: torch.Tensor, geometry: EdgeGeometry, reference: bool
    ) -> torch.Tensor:
        """``Σ_j α_ij v_ij``, channels last ``[n, D, C]``, with PyTorch operations."""
        alpha, values = self._attend(x_last, queries, geometry, reference)
        n_nodes, dim, c = x_last.shape
        alpha = alpha.repeat_interleave(c // self.n_heads, dim=1)  # [E, C]: each channel's head weight
        aggregated = x_last.new_zeros(
            n_nodes, dim, c, dtype=torch.promote_types(values[0].dtype, alpha.dtype)
        )
        first = 0
        for block in values:
            edges = slice(first, first + block.shape[0])
            first = edges.stop
            messages = block * alpha[edges, None]  # [B, D, C] contiguous: index_add_ is slow on strided input
            aggregated.index_add_(0, geometry.dst[edges], messages)
        return aggregated

    def _aggregate_fused(
        self,
        x_last: torch.Tensor,
        queries: torch.Tensor,
        geometry: EdgeGeometry,
        blocks: ReceiverBlocks,
    ) -> torch.Tensor:
        """The same as :meth:`_aggregate` through the fused CPU kernel."""
        return fused_call.attention(
            self.key_value.term_layer(),  # (weight [S·2·C, H], bias)
            features=x_last,
            queries=queries,
            geometry=geometry,
            blocks=blocks,
            n_heads=self.n_heads,
            tables=fused_call.TermTables.of(self.key_value.angular),
        )
