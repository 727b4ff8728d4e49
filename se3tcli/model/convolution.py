"""The equivariant convolution ``W(x_j - x_i) f_j`` over all edges at once.

``W^{l_out l_in}(x) = Σ_J φ_J(|x|) Σ_m C^{l_in J l_out} Y_J,m(x̂)``. The fast path works in each edge's own
frame (see :class:`~se3tcli.model.basis.AngularBasis`): rotate the neighbour features into it
(``rotate_in``, one batched product), scale each of the T frame terms by its coefficient, rotate back and
sum into output degrees (``rotate_out``, one more batched product). The S frame coefficients (terms ``±|m|``
share one) come from one matrix product of the shared radial features with the radial layer's weights
mapped to coefficients (``path weights @ term_weights``, folded into the weights once per call), so path
weights are never materialised; the two edges of a reverse pair share them too.
Features are channels-last inside (``[E, D, C]``), which puts the long dimension last in every product.
Kernel modes:

* ``depthwise``: one radial weight per channel and path (the channel mixing follows the aggregation);
* ``full``: one radial weight per output channel, input channel and path (the paper's kernel).

``reference`` computes the same thing with ``e3nn.o3.TensorProduct`` and the same weights: the oracle
for tests and the baseline for benchmarks.
"""

from __future__ import annotations

import math
from collections import Counter

import torch
from e3nn import o3
from torch import nn
from torch.autograd.function import once_differentiable

from se3tcli.model.basis import AngularBasis, EdgeGeometry, feature_irreps, from_e3nn, to_e3nn


def _frame_terms(coefficients: torch.Tensor, x_frame: torch.Tensor, group: int, n_axial: int) -> torch.Tensor:
    """Frame coefficients ``[R, S, K, C]`` times the rotated input ``x_frame [E, T, C]`` -> terms
    ``[E, T, K*C]``. Term ``t < S`` uses coefficient t and term ``S + i`` (a ``-|m|`` term) coefficient
    ``n_axial + i`` (see :class:`~se3tcli.model.basis.AngularBasis`). ``E = group · R``: the ``group``
    consecutive edges of a row (1, or 2 for a reverse pair) share its coefficients."""
    n_rows, n_coef, k, c = coefficients.shape
    n_terms = x_frame.shape[1]
    x_rows = x_frame.view(n_rows, group, n_terms, 1, c)
    dtype = torch.promote_types(coefficients.dtype, x_frame.dtype)
    terms = x_frame.new_empty(n_rows, group, n_terms, k, c, dtype=dtype)
    torch.mul(coefficients[:, None], x_rows[:, :, :n_coef], out=terms[:, :, :n_coef])  # terms +|m|
    torch.mul(coefficients[:, None, n_axial:], x_rows[:, :, n_coef:], out=terms[:, :, n_coef:])  # -|m|
    return terms.view(-1, n_terms, k * c)


class _DepthwiseFrameProduct(torch.autograd.Function):
    """``rotate_out @ terms``: coefficients ``[R, S, K, C]``, ``x_frame [E, T, C]``, ``rotate_out [E, D, T]``
    -> ``[E, D, K, C]`` (terms as in :func:`_frame_terms`). The backward reuses its buffers where
    autograd's would materialise more ``[E, T, K, C]`` products and broadcast reductions (the largest
    tensors of a training step)."""

    @staticmethod
    def forward(ctx, coefficients, x_frame, rotate_out, group: int, n_axial: int):
        ctx.save_for_backward(coefficients, x_frame, rotate_out)
        ctx.group, ctx.n_axial = group, n_axial
        terms = _frame_terms(coefficients, x_frame, group, n_axial)
        k, c = coefficients.shape[2:]
        return torch.bmm(rotate_out, terms).view(x_frame.shape[0], rotate_out.shape[1], k, c)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        coefficients, x_frame, rotate_out = ctx.saved_tensors
        group, n_axial = ctx.group, ctx.n_axial
        n_rows, n_coef, k, c = coefficients.shape
        n_terms = x_frame.shape[1]
        x_rows = x_frame.view(n_rows, group, n_terms, 1, c)
        grad_out = grad_out.reshape(x_frame.shape[0], -1, k * c)  # [E, D, K*C]
        rotate_back = rotate_out.transpose(1, 2).to(grad_out.dtype)  # [E, T, D]; autocast is off in backward
        grad_terms = torch.bmm(rotate_back, grad_out).view(n_rows, group, n_terms, k, c)
        grad_x = grad_rotate = grad_coefficients = None
        if ctx.needs_input_grad[1]:
            grad_x = x_frame.new_zeros(n_rows, group, n_terms, c)
            for kernel in range(k):
                coefficient = coefficients[:, None, :, kernel]  # [R, 1, S, C]
                grad_x[:, :, :n_coef].addcmul_(grad_terms[:, :, :n_coef, kernel], coefficient)
                grad_x[:, :, n_coef:].addcmul_(grad_terms[:, :, n_coef:, kernel], coefficient[:, :, n_axial:])
            grad_x = grad_x.view_as(x_frame)
        if ctx.needs_input_grad[2]:
            terms = _frame_terms(coefficients, x_frame, group, n_axial)
            grad_rotate = torch.bmm(grad_out, terms.transpose(1, 2))
        if ctx.needs_input_grad[0]:
            per_term = grad_terms.mul_(x_rows)  # [R, group, T, K, C]
            per_term = per_term[:, 0] if group == 1 else per_term.sum(1)  # [R, T, K, C]
            grad_coefficients = per_term[:, :n_coef].clone()
            grad_coefficients[:, n_axial:] += per_term[:, n_coef:]
        return grad_coefficients, grad_x, grad_rotate, None, None


class EdgeConvolution(nn.Module):
    """``n_kernels`` kernels (e.g. keys and values) applied to the same neighbour features."""

    def __init__(
        self, channels: int, angular: AngularBasis, kernel: str, radial_hidden: int, n_kernels: int = 2
    ):
        super().__init__()
        self.channels = channels
        self.lmax = angular.lmax
        self.kernel = kernel
        self.n_kernels = n_kernels
        self.angular = angular
        n_paths = len(angular.paths)
        # Variance-preserving path normalisation: each output degree sums n_into paths (x C inputs if full).
        n_into = Counter(p.l_out for p in angular.paths)
        fan_in = [n_into[p.l_out] * (channels if kernel == "full" else 1) for p in angular.paths]
        self.register_buffer("path_norm", torch.tensor([1 / math.sqrt(f) for f in fan_in]))
        per_kernel = channels * n_paths if kernel == "depthwise" else n_paths * channels * channels
        self.radial = nn.Linear(radial_hidden, n_kernels * per_kernel)
        self._reference_cache: dict = {}  # a plain dict: not a submodule, so never in the state dict

    @property
    def terms_per_edge(self) -> int:  # numbers per edge in the terms of all kernels, [E, T, K, C]
        return self.angular.n_terms * self.n_kernels * self.channels

    def path_weights(self, geometry: EdgeGeometry) -> torch.Tensor:
        """Radial weights: depthwise ``[E, K, C, P]``; full ``[E, K, P, C_out, C_in]`` (P = paths)."""
        radial = geometry.edge_radial
        n_edges, n_paths, c = radial.shape[0], len(self.angular.paths), self.channels
        w = self.radial(radial)
        if self.kernel == "depthwise":
            return w.reshape(n_edges, self.n_kernels, c, n_paths) * self.path_norm
        return w.reshape(n_edges, self.n_kernels, n_paths, c, c) * self.path_norm[:, None, None]

    def term_layer(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The radial layer mapped from path weights to frame coefficients (one per ``(l_in, l_out, |m|)``:
        the terms ``±|m|`` share it): ``(weight [rows, H], bias [rows])`` with rows ordered (coefficient,
        kernel, channel) for depthwise kernels and (coefficient, input channel, kernel, output channel) for
        full ones."""
        k, c, n_paths = self.n_kernels, self.channels, len(self.angular.paths)
        weight, bias = self.radial.weight, self.radial.bias  # [rows, H], [rows] ordered as in path_weights
        to_terms = self.angular.term_weights.to(weight.dtype) * self.path_norm[:, None]  # [P, T]
        to_terms = to_terms[:, : self.angular.n_coefficients]  # [P, S]: terms t < S, one per coefficient
        if self.kernel == "depthwise":
            weight = torch.einsum("kcph,ps->skch", weight.view(k, c, n_paths, -1), to_terms)
            bias = torch.einsum("kcp,ps->skc", bias.view(k, c, n_paths), to_terms)
        else:
            weight = torch.einsum("kpoih,ps->sikoh", weight.view(k, n_paths, c, c, -1), to_terms)
            bias = torch.einsum("kpoi,ps->siko", bias.view(k, n_paths, c, c), to_terms)
        return weight.reshape(-1, weight.shape[-1]), bias.reshape(-1)

    def forward(self, x_src: torch.Tensor, geometry: EdgeGeometry) -> torch.Tensor:
        """Neighbour features ``[E, C, D]`` -> kernel outputs ``[E, K, C, D]`` (a view of
        :meth:`channels_last`)."""
        return self.channels_last(x_src.transpose(1, 2), geometry).permute(0, 2, 3, 1)

    def channels_last(
        self,
        x_src: torch.Tensor,
        geometry: EdgeGeometry,
        layer: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Neighbour features ``[E, D, C]`` -> kernel outputs ``[E, D, K, C]``. ``layer``: this module's
        :meth:`term_layer`, when the caller convolves several blocks of edges with it."""
        frames = geometry.frames
        n_edges, k, c = x_src.shape[0], self.n_kernels, self.channels
        group = geometry.edges_per_row
        n_coef, n_axial = self.angular.n_coefficients, self.angular.n_axial
        weight, bias = self.term_layer() if layer is None else layer  # [rows, H], [rows]
        coefficients = torch.addmm(bias, geometry.radial, weight.t())  # [E / group, rows]
        n_rows = coefficients.shape[0]
        x_frame = torch.bmm(frames.rotate_in, x_src)  # [E, T, C]: the input component of every term
        if self.kernel == "depthwise":
            coefficients = coefficients.view(n_rows, n_coef, k, c)
            if torch.is_grad_enabled():
                return _DepthwiseFrameProduct.apply(coefficients, x_frame, frames.rotate_out, group, n_axial)
            terms = _frame_terms(coefficients, x_frame, group, n_axial)  # [E, T, K*C]
        else:
            # Per coefficient s, the input channels of its term +|m| and (zero for |m| = 0) of its term -|m|.
            minus = torch.cat([x_frame.new_zeros(n_edges, n_axial, c), x_frame[:, n_coef:]], dim=1)
            pairs = torch.stack([x_frame[:, :n_coef], minus], dim=2)  # [E, S, 2, C_in]
            pairs = pairs.view(n_rows, group, n_coef, 2, c)
            per_row = coefficients.view(n_rows, 1, n_coef, c, k * c)
            both = torch.matmul(pairs, per_row).view(n_edges, n_coef, 2, k * c)  # [E, S, 2, K*C_out]
            terms = torch.cat([both[:, :, 0], both[:, n_axial:, 1]], dim=1)  # [E, T, K*C_out]
        out = torch.bmm(frames.rotate_out, terms)  # [E, D, K*C]
        return out.view(n_edges, out.shape[1], k, c)

    def reference(self, x_src: torch.Tensor, geometry: EdgeGeometry) -> torch.Tensor:
        """The same convolution through ``e3nn.o3.TensorProduct`` (slow; tests and benchmarks only)."""
        tp = self._reference_tp(x_src.device, x_src.dtype)
        weights = self.path_weights(geometry)
        inputs = to_e3nn(x_src, self.lmax)
        outputs = []
        for k in range(self.n_kernels):
            # e3nn's weight order: [E, P, C] for uvu, [E, P, C_in, C_out] for uvw
            w = weights[:, k].transpose(1, 2) if self.kernel == "depthwise" else weights[:, k].transpose(2, 3)
            out = tp(inputs, geometry.sh, w.reshape(w.shape[0], -1))
            outputs.append(from_e3nn(out, self.channels, self.lmax))
        return torch.stack(outputs, dim=1)

    def _reference_tp(self, device: torch.device, dtype: torch.dtype) -> o3.TensorProduct:
        """The e3nn module, built (code generation: tens of ms) once per device and dtype and kept outside
        the module's state, so that benchmarks time the products, not their construction."""
        key = (str(device), dtype)
        if self._reference_cache.get("key") != key:
            tp = self._build_reference_tp().to(device=device, dtype=dtype)
            self._reference_cache.update(key=key, tp=tp)
        return self._reference_cache["tp"]

    def _build_reference_tp(self) -> o3.TensorProduct:
        irreps = feature_irreps(self.channels, self.lmax)
        irreps_sh = o3.Irreps.spherical_harmonics(self.angular.jmax)
        mode = "uvu" if self.kernel == "depthwise" else "uvw"
        instructions = [(p.l_in, p.j, p.l_out, mode, True) for p in self.angular.paths]
        return o3.TensorProduct(
            irreps,
            irreps_sh,
            irreps,
            instructions,
            irrep_normalization="none",
            path_normalization="none",
            internal_weights=False,
            shared_weights=False,
        )
