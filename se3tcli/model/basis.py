"""Geometry-only parts of the kernels, computed once per forward pass and shared by all layers.

Feature layout everywhere in the model: ``[n, channels, (lmax + 1)**2]``; degree l occupies the columns
``l**2 : (l + 1)**2`` (e3nn's real spherical-harmonic order, (x, y, z) for l = 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from e3nn import o3
from torch import nn


def degree_slice(l: int) -> slice:  # noqa: E741 - l is the standard name of a degree
    return slice(l * l, (l + 1) * (l + 1))


@dataclass(frozen=True)
class Path:
    """One kernel path: input degree ``l_in`` times the edge's harmonic of degree ``j`` -> ``l_out``."""

    l_in: int
    j: int
    l_out: int


def kernel_paths(lmax_in: int, lmax_out: int, jmax: int) -> list[Path]:
    """Every path allowed by the triangle rule and parity (l_in + j + l_out even), sorted by ``l_out``.

    The parity rule keeps features as true tensors (0e, 1o, 2e, ...), so the network is E(3)-equivariant:
    scalar predictions of mirror images are identical and vector outputs reflect with the molecule.
    """
    return [
        Path(l_in, j, l_out)
        for l_out in range(lmax_out + 1)
        for l_in in range(lmax_in + 1)
        for j in range(abs(l_in - l_out), min(l_in + l_out, jmax) + 1)
        if (l_in + j + l_out) % 2 == 0
    ]


@dataclass(frozen=True)
class OutputGroup:
    """The paths (and their columns in the angular basis) that end in output degree ``l_out``."""

    l_out: int
    paths: slice
    columns: slice

    @property
    def n_paths(self) -> int:
        return self.paths.stop - self.paths.start


def feature_irreps(channels: int, lmax: int) -> o3.Irreps:
    return o3.Irreps([(channels, (l, (-1) ** l)) for l in range(lmax + 1)])


def to_e3nn(x: torch.Tensor, lmax: int) -> torch.Tensor:
    """``[n, C, (lmax+1)**2]`` -> e3nn layout ``[n, C*1 + C*3 + ...]`` (per degree: channel-major)."""
    return torch.cat([x[:, :, degree_slice(l)].reshape(x.shape[0], -1) for l in range(lmax + 1)], dim=1)


def from_e3nn(x: torch.Tensor, channels: int, lmax: int) -> torch.Tensor:
    blocks, start = [], 0
    for l in range(lmax + 1):
        size = channels * (2 * l + 1)
        blocks.append(x[:, start : start + size].reshape(x.shape[0], channels, 2 * l + 1))
        start += size
    return torch.cat(blocks, dim=2)


class BesselBasis(nn.Module):
    """``sqrt(2/c) sin(n π r / c) / r`` for n = 1..N, times a smooth polynomial envelope (p = 6).

    The envelope and its first two derivatives vanish at the cutoff, so predictions change continuously
    when an atom crosses it.
    """

    def __init__(self, n_radial: int, cutoff: float):
        super().__init__()
        self.cutoff = cutoff
        self.register_buffer("frequencies", torch.arange(1, n_radial + 1) * math.pi / cutoff)

    def envelope(self, r: torch.Tensor) -> torch.Tensor:  # [E] -> [E], 1 at r=0, 0 from the cutoff on
        x = (r / self.cutoff).clamp(max=1.0)
        p = 6
        return 1 - (p + 1) * (p + 2) / 2 * x**p + p * (p + 2) * x ** (p + 1) - p * (p + 1) / 2 * x ** (p + 2)

    def forward(self, r: torch.Tensor) -> torch.Tensor:  # [E] Å -> [E, N]
        r = r.clamp_min(1e-9)[:, None]
        return math.sqrt(2 / self.cutoff) * torch.sin(self.frequencies * r) / r


class AngularBasis(nn.Module):
    """Per-edge coupling matrices ``B[e, m_in, col] = Σ_mJ C^{l_in J l_out}[m_in, mJ, m_out] Y_J,mJ(x̂_e)``.

    Columns are the concatenated outputs of all paths (``sum(2 l_out + 1)``). A kernel applied to an input
    feature ``f [C, (lmax+1)**2]`` is then one batched product ``f @ B`` followed by path weights.
    Built with one matrix product from the spherical harmonics and a constant Clebsch-Gordan tensor.
    """

    def __init__(self, lmax: int, jmax: int):
        super().__init__()
        self.lmax = lmax
        self.jmax = jmax
        self.paths = kernel_paths(lmax, lmax, jmax)
        dim = (lmax + 1) ** 2
        n_cols = sum(2 * p.l_out + 1 for p in self.paths)
        coupling = torch.zeros((jmax + 1) ** 2, dim, n_cols, dtype=torch.float64)
        col = 0
        for path in self.paths:
            cg = o3.wigner_3j(path.l_in, path.j, path.l_out, dtype=torch.float64)  # [m_in, mJ, m_out]
            width = 2 * path.l_out + 1
            coupling[degree_slice(path.j), degree_slice(path.l_in), col : col + width] = cg.permute(1, 0, 2)
            col += width
        self.n_cols = n_cols
        self.register_buffer("coupling", coupling.reshape((jmax + 1) ** 2, dim * n_cols))
        # Paths are sorted by l_out, so each output degree owns a contiguous run of paths and columns.
        self.groups: list[OutputGroup] = []
        first_path, first_col = 0, 0
        for l_out in range(lmax + 1):
            count = sum(1 for p in self.paths if p.l_out == l_out)
            width = count * (2 * l_out + 1)
            self.groups.append(
                OutputGroup(l_out, slice(first_path, first_path + count), slice(first_col, first_col + width))
            )
            first_path, first_col = first_path + count, first_col + width

    def spherical_harmonics(self, unit: torch.Tensor) -> torch.Tensor:  # [E, 3] -> [E, (jmax+1)**2]
        return o3.spherical_harmonics(
            list(range(self.jmax + 1)), unit, normalize=False, normalization="component"
        )

    def forward(self, sh: torch.Tensor) -> torch.Tensor:  # [E, (jmax+1)**2] -> [E, dim, n_cols]
        dim = (self.lmax + 1) ** 2
        return (sh @ self.coupling.to(sh.dtype)).reshape(sh.shape[0], dim, self.n_cols)


@dataclass
class EdgeGeometry:
    """Everything about the edges that the layers share in one forward pass."""

    src: torch.Tensor  # [E] neighbour j
    dst: torch.Tensor  # [E] receiver i
    length: torch.Tensor  # [E] Å
    envelope: torch.Tensor  # [E] in [0, 1], smooth cutoff
    radial: torch.Tensor  # [E, radial_hidden] output of the shared radial network (envelope applied)
    sh: torch.Tensor  # [E, (jmax+1)**2] spherical harmonics of x̂ = (x_j - x_i)/|x_j - x_i|
    coupling: torch.Tensor  # [E, dim, n_cols] angular basis B
