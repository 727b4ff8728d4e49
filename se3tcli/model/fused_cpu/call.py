"""Calling the fused CPU kernel on one attention layer, with its own autograd backward.

Per receiver block (:mod:`.blocks`), one matrix product makes the frame coefficients of the block's edges,
then one kernel call shares the block's receivers between ``torch.get_num_threads()`` OpenMP threads.
Training saves only the softmax's running maximum and sum per receiver and head: the backward recomputes
each edge's frame quantities from them, so no per-edge tensor is kept between forward and backward.
"""

from __future__ import annotations

import ctypes
import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from se3tcli.model.fused_cpu.abi import Args, Grads
from se3tcli.model.fused_cpu.blocks import ReceiverBlocks
from se3tcli.model.fused_cpu.library import kernel_library


@dataclass(frozen=True)
class TermTables:
    """The angular basis's frame terms as the kernel reads them (see ``AngularBasis``): term t reads row
    ``rows_in[t]`` of the rotated features and writes row ``rows_out[t]``, with coefficient t for the first
    ``n_coefficients`` terms and ``n_axial + t - n_coefficients`` for the -|m| terms after them."""

    rows_in: torch.Tensor  # [T] int64
    rows_out: torch.Tensor  # [T] int64
    n_coefficients: int  # S
    n_axial: int  # the coefficients with m = 0

    @classmethod
    def of(cls, angular) -> TermTables:
        """The tables of an :class:`~se3tcli.model.basis.AngularBasis`."""
        return cls(angular.term_rows_in, angular.term_rows_out, angular.n_coefficients, angular.n_axial)


@dataclass
class _Plan:
    """What one layer's kernel calls share: the library, the geometry's tensors and the blocks."""

    library: ctypes.CDLL
    src: torch.Tensor  # [E] int64
    envelope: torch.Tensor  # [E]
    wigner: torch.Tensor  # [E, D, D]
    edges_per_row: int
    blocks: ReceiverBlocks
    n_heads: int
    tables: TermTables

    def args(self, features: torch.Tensor, queries: torch.Tensor, out: torch.Tensor, stats) -> dict:
        """The fields of ``se3t_attention_args`` common to every block (keep the tensors alive while used)."""
        _, dim, channels = features.shape
        return dict(
            lmax=int(round(dim**0.5)) - 1,
            channels=channels,
            n_heads=self.n_heads,
            n_terms=self.tables.rows_in.shape[0],
            n_coef=self.tables.n_coefficients,
            n_axial=self.tables.n_axial,
            term_row_in=self.tables.rows_in.data_ptr(),
            term_row_out=self.tables.rows_out.data_ptr(),
            src=self.src.data_ptr(),
            order=self.blocks.order.data_ptr(),
            offsets=self.blocks.offsets.data_ptr(),
            envelope=self.envelope.data_ptr(),
            wigner=self.wigner.data_ptr(),
            edges_per_row=self.edges_per_row,
            features=features.data_ptr(),
            queries=queries.data_ptr(),
            out=out.data_ptr(),
            scale=(channels // self.n_heads * dim) ** -0.5,
            stats=None if stats is None else stats.data_ptr(),
            n_threads=torch.get_num_threads(),
        )

    def kernel(self, name: str, dtype: torch.dtype):
        return getattr(self.library, f"{name}_{'f64' if dtype == torch.float64 else 'f32'}")

    def block_calls(self, base: dict, radial, weight, bias) -> Iterator[tuple[slice, torch.Tensor, Args]]:
        """Per block: its coefficient rows, their frame coefficients ``[rows, S·2·C]`` (one matrix product)
        and the kernel's arguments (``base`` from :meth:`args`; keep the coefficients alive while used)."""
        for block, (first_row, last_row) in enumerate(itertools.pairwise(self.blocks.rows)):
            rows = slice(first_row, last_row)
            coefficients = torch.addmm(bias, radial[rows], weight.t())
            args = Args(
                **base,
                coefficients=coefficients.data_ptr(),
                first_row=first_row,
                node_begin=self.blocks.nodes[block],
                node_end=self.blocks.nodes[block + 1],
            )
            yield rows, coefficients, args

    def forward(self, features, queries, radial, weight, bias, stats=None) -> torch.Tensor:
        """``[n, D, C]`` softmax-weighted values; ``stats [n, 2, H]`` (training) gets the softmax's running
        maximum and sum per receiver and head."""
        out = features.new_zeros(features.shape)
        base = self.args(features, queries, out, stats)
        kernel = self.kernel("se3t_attention", features.dtype)
        # _coefficients stays referenced while the kernel reads it through args
        for _rows, _coefficients, args in self.block_calls(base, radial, weight, bias):
            if kernel(ctypes.byref(args)):
                raise MemoryError("the fused attention kernel could not allocate its scratch memory")
        return out

    def backward(
        self, grad_out, out, stats, features, queries, radial, weight, bias
    ) -> tuple[torch.Tensor, ...]:
        """Gradients of the features, queries, radial features, and the term layer's weight and bias."""
        per_row = self.edges_per_row
        grad_out = grad_out.contiguous()
        base = self.args(features, queries, out, stats)
        grad_parts = features.new_zeros(base["n_threads"], *features.shape)  # one share per OpenMP thread
        grad_queries = torch.empty_like(queries)
        grad_radial = torch.empty_like(radial)
        grad_weight, grad_bias = torch.zeros_like(weight), torch.zeros_like(bias)
        kernel = self.kernel("se3t_attention_backward", features.dtype)
        for rows, coefficients, args in self.block_calls(base, radial, weight, bias):
            grad_edges = coefficients.new_empty(coefficients.shape[0], per_row, weight.shape[0])  # per edge
            grads = Grads(
                grad_out=grad_out.data_ptr(),
                out=out.data_ptr(),
                stats=stats.data_ptr(),
                grad_features=grad_parts.data_ptr(),
                grad_queries=grad_queries.data_ptr(),
                grad_coefficients=grad_edges.data_ptr(),
                n_nodes=features.shape[0],
            )
            if kernel(ctypes.byref(args), ctypes.byref(grads)):
                raise MemoryError("the fused attention kernel could not allocate its scratch memory")
            # [rows, S·2·C]: the edges of a reverse pair share their row (an add of two views, several times
            # faster than a sum over the middle axis of size 2)
            grad_rows = grad_edges[:, 0] + grad_edges[:, 1] if per_row == 2 else grad_edges[:, 0]
            grad_weight.addmm_(grad_rows.t(), radial[rows])
            grad_bias += grad_rows.sum(0)
            torch.mm(grad_rows, weight, out=grad_radial[rows])
        return grad_parts.sum(0), grad_queries, grad_radial, grad_weight, grad_bias


class _FusedAttention(torch.autograd.Function):
    """The kernel with its own backward (no per-edge tensor is kept between forward and backward)."""

    @staticmethod
    def forward(ctx, features, queries, radial, weight, bias, plan: _Plan):
        stats = features.new_empty(features.shape[0], 2, plan.n_heads)
        out = plan.forward(features, queries, radial, weight, bias, stats)
        ctx.save_for_backward(features, queries, radial, weight, bias, out, stats)
        ctx.plan = plan
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        features, queries, radial, weight, bias, out, stats = ctx.saved_tensors
        grads = ctx.plan.backward(grad_out, out, stats, features, queries, radial, weight, bias)
        return (*grads, None)


def attention(
    coefficient_layer: tuple[torch.Tensor, torch.Tensor],
    features: torch.Tensor,
    queries: torch.Tensor,
    geometry,
    blocks: ReceiverBlocks,
    n_heads: int,
    tables: TermTables,
) -> torch.Tensor:
    """Channels-last ``features``/``queries [n, D, C]`` -> the softmax-weighted values ``[n, D, C]`` (before
    the neighbourhood gate and the value mix), differentiable in the features, queries, the geometry's radial
    features and ``coefficient_layer``: ``(weight [S·2·C, H], bias)`` of
    :meth:`~se3tcli.model.convolution.EdgeConvolution.term_layer`. Call only where
    :func:`se3tcli.model.backend.resolve` chose ``fused_cpu`` (it gives the ``blocks``)."""
    weight, bias = coefficient_layer
    plan = _Plan(
        kernel_library().cdll,
        geometry.src.contiguous(),
        geometry.envelope.contiguous(),
        geometry.frames.wigner.contiguous(),
        geometry.edges_per_row,
        blocks,
        n_heads,
        tables,
    )
    inputs = (features, queries, geometry.radial.contiguous(), weight, bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return _FusedAttention.apply(*inputs, plan)
    return plan.forward(*inputs)
