"""The equivariant convolution ``W(x_j - x_i) f_j`` over all edges at once.

``W^{l_out l_in}(x) = Σ_J φ_J(|x|) Σ_m C^{l_in J l_out} Y_J,m(x̂)``. The fast path multiplies the
gathered neighbour features by the shared angular basis ``B`` in one batched product, scales each path's
columns by its radial weight and sums the paths into output degrees with one more product.
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

from se3tcli.model.basis import AngularBasis, EdgeGeometry, feature_irreps, from_e3nn, to_e3nn


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

    def path_weights(self, geometry: EdgeGeometry) -> torch.Tensor:
        """Radial weights: depthwise ``[E, K, C, P]``; full ``[E, K, P, C_out, C_in]`` (P = paths)."""
        n_edges, n_paths, c = geometry.radial.shape[0], len(self.angular.paths), self.channels
        w = self.radial(geometry.radial)
        if self.kernel == "depthwise":
            return w.reshape(n_edges, self.n_kernels, c, n_paths) * self.path_norm
        return w.reshape(n_edges, self.n_kernels, n_paths, c, c) * self.path_norm[:, None, None]

    def forward(self, x_src: torch.Tensor, geometry: EdgeGeometry) -> torch.Tensor:
        """Neighbour features ``[E, C, D]`` -> kernel outputs ``[E, K, C, D]``."""
        weights = self.path_weights(geometry)
        coupled = torch.bmm(x_src, geometry.coupling)  # [E, C, cols]: every path before its weight
        n_edges, c = coupled.shape[:2]
        blocks = []
        for group in self.angular.groups:  # one step per output degree
            width = 2 * group.l_out + 1
            paths = coupled[:, :, group.columns].reshape(n_edges, c, group.n_paths, width)
            if self.kernel == "depthwise":
                w = weights[..., group.paths]  # [E, K, C, n]
                blocks.append((paths[:, None] * w[..., None]).sum(3))  # [E, K, C, 2l+1]
            else:
                w = weights[:, :, group.paths]  # [E, K, n, C_out, C_in]
                blocks.append((w @ paths.transpose(1, 2)[:, None]).sum(2))  # [E, K, C_out, 2l+1]
        return torch.cat(blocks, dim=3)

    def reference(self, x_src: torch.Tensor, geometry: EdgeGeometry) -> torch.Tensor:
        """The same convolution through ``e3nn.o3.TensorProduct`` (slow; tests and benchmarks only)."""
        tp = self._reference_tp().to(device=x_src.device, dtype=x_src.dtype)
        weights = self.path_weights(geometry)
        inputs = to_e3nn(x_src, self.lmax)
        outputs = []
        for k in range(self.n_kernels):
            # e3nn's weight order: [E, P, C] for uvu, [E, P, C_in, C_out] for uvw
            w = weights[:, k].transpose(1, 2) if self.kernel == "depthwise" else weights[:, k].transpose(2, 3)
            out = tp(inputs, geometry.sh, w.reshape(w.shape[0], -1))
            outputs.append(from_e3nn(out, self.channels, self.lmax))
        return torch.stack(outputs, dim=1)

    def _reference_tp(self) -> o3.TensorProduct:
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
