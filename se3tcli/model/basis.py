"""Geometry-only parts of the kernels, computed once per forward pass and shared by all layers.

Feature layout between the model's blocks: ``[n, channels, (lmax + 1)**2]``; degree l occupies the columns
``l**2 : (l + 1)**2`` (e3nn's real spherical-harmonic order, (x, y, z) for l = 1). Inside an attention layer
features are channels last, ``[n, (lmax + 1)**2, channels]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import torch
from e3nn import o3
from torch import nn
from torch.nn import functional as F


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


def frame_terms(paths: list[Path], jmax: int) -> tuple[list[tuple[tuple[int, int, int], int]], torch.Tensor]:
    """The terms ``((l_in, l_out, |m|), m)`` of the edge-frame kernels and the map ``[P, T]`` from path
    weights to term coefficients, ``K_p[m, m] = Σ_mJ C^{l_in J l_out}[m, mJ, m] Y_J,mJ(ŷ)``.

    Coefficients with ``|m| = 0`` come first, then those with ``|m| > 0`` (terms ``+|m|``), then the terms
    ``-|m|`` of the latter in the same order. Coefficients no path reaches (small ``jmax``) are left out.
    """
    y_axis = torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64)
    sh_axis = o3.spherical_harmonics(list(range(jmax + 1)), y_axis, False, normalization="component")[0]
    kernels = []  # K_p [2 l_in + 1, 2 l_out + 1]
    for path in paths:
        cg = o3.wigner_3j(path.l_in, path.j, path.l_out, dtype=torch.float64)
        kernel = torch.einsum("ajb,j->ab", cg, sh_axis[degree_slice(path.j)])
        m_in = torch.arange(-path.l_in, path.l_in + 1)[:, None]
        m_out = torch.arange(-path.l_out, path.l_out + 1)[None, :]
        assert torch.all(kernel[m_in != m_out].abs() < 1e-12), "frame kernel not diagonal in m"
        kernels.append(kernel)

    def value(p: int, m: int) -> float:  # K_p[m, m]
        path = paths[p]
        inside = abs(m) <= min(path.l_in, path.l_out)
        return float(kernels[p][path.l_in + m, path.l_out + m]) if inside else 0.0

    def reached(li: int, lo: int, m: int) -> bool:
        return any(abs(value(p, m)) > 1e-12 for p, q in enumerate(paths) if (q.l_in, q.l_out) == (li, lo))

    pairs = sorted({(p.l_in, p.l_out) for p in paths})
    candidates = [(li, lo, m) for li, lo in pairs for m in range(min(li, lo) + 1)]
    coefficients = [s for s in sorted(candidates, key=lambda s: (s[2] > 0, s)) if reached(*s)]
    terms = [(s, s[2]) for s in coefficients] + [(s, -s[2]) for s in coefficients if s[2] > 0]
    weights = torch.zeros(len(paths), len(terms), dtype=torch.float64)
    for t, ((li, lo, _), m) in enumerate(terms):
        for p, path in enumerate(paths):
            if (path.l_in, path.l_out) == (li, lo):
                assert abs(value(p, m) - value(p, -m)) < 1e-12, "frame kernel differs between +m and -m"
                weights[p, t] = value(p, m)
    return terms, weights


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


def polynomial_envelope(x: torch.Tensor) -> torch.Tensor:
    """``1 - 28 x^6 + 48 x^7 - 21 x^8`` (p = 6) on [0, 1], 0 from 1 on: 1 at 0, and it and its first two
    derivatives vanish at 1.

    Evaluated in the factored form ``(1 - x)^3 (1 + 3x + 6x^2 + 10x^3 + 15x^4 + 21x^5)``: the expanded
    polynomial cancels catastrophically near x = 1 and went negative there (down to -6e-6 in float32),
    which broke the envelope-weighted attention (negative or zero weights, NaN predictions).
    """
    x = x.clamp(0.0, 1.0)
    return (1 - x) ** 3 * (1 + x * (3 + x * (6 + x * (10 + x * (15 + 21 * x)))))


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
        return polynomial_envelope(r / self.cutoff)

    def forward(self, r: torch.Tensor) -> torch.Tensor:  # [E] Å -> [E, N]
        r = r.clamp_min(1e-9)[:, None]
        return math.sqrt(2 / self.cutoff) * torch.sin(self.frequencies * r) / r


class AngularBasis(nn.Module):
    """The angular part of every kernel path, applied through per-edge rotations (the eSCN factorisation).

    A path ``(l_in, J, l_out)`` maps ``f^{l_in}`` to ``Σ C^{l_in J l_out}[m_in, mJ, m_out] f_m_in Y_J,mJ(x̂)``.
    With ``R`` a rotation taking the edge direction x̂ to ŷ (the polar axis of e3nn's harmonics) and ``D^l``
    its Wigner matrices, ``Y_J(x̂) = D^Jᵀ Y_J(ŷ)`` and ``Y_J(ŷ)`` is non-zero at ``mJ = 0`` only, so

        ``Σ_J φ_J W_J(x̂) f = D^{l_out}ᵀ K D^{l_in} f``,
        ``K[m, m] = Σ_J φ_J C^{l_in J l_out}[m, 0, m] Y_J,0(ŷ)``

    exactly: in the edge frame every kernel is diagonal in m, with one value per ``|m|``. Each degree pair
    thus has ``min(l_in, l_out) + 1`` *frame coefficients* ``s = (l_in, l_out, |m|)``, fixed linear maps of
    the path weights, acting on ``2 min(l_in, l_out) + 1`` *terms* ``t = (s, ±|m|)``. The S coefficients are
    ordered ``|m| = 0`` first (``n_axial`` of them); term t < S is ``(s=t, +|m|)`` and term ``S + i`` is
    ``(s=n_axial + i, -|m|)``. A kernel applied to features ``f [D, C]`` of one edge is then
    ``rotate_out @ (a ⊙ (rotate_in @ f))`` with ``a [T]`` the term coefficients (``path weights @
    term_weights``): O(T) work per channel instead of O(D · Σ(2 l_out + 1)).

    A zero-length edge (coincident atoms, which the readers reject) has no direction: its rotation is zero,
    so only its scalar-to-scalar term survives, where e3nn's kernel (``Y_J(0) = 0`` for J > 0) would also keep
    the ``J = 0`` paths of higher degrees.
    """

    def __init__(self, lmax: int, jmax: int):
        super().__init__()
        self.lmax = lmax
        self.jmax = jmax
        self.paths = kernel_paths(lmax, lmax, jmax)
        # [P, T]: path weights @ term_weights = term coefficients (the |m| symmetry repeats columns).
        terms, term_weights = frame_terms(self.paths, jmax)
        self.n_terms = len(terms)
        self.n_coefficients = len({s for s, _ in terms})
        self.n_axial = sum(1 for (_, _, m_abs), _ in terms if m_abs == 0)
        self.register_buffer("term_weights", term_weights, persistent=False)
        # Row of the block-diagonal Wigner matrix that each term reads (input) and writes (output).
        row_in = [li * li + li + m for (li, _, _), m in terms]
        row_out = [lo * lo + lo + m for (_, lo, _), m in terms]
        self.register_buffer("term_rows_in", torch.tensor(row_in), persistent=False)  # [T]
        self.register_buffer("term_rows_out", torch.tensor(row_out), persistent=False)  # [T]
        helper_axes = torch.eye(3, dtype=torch.float64)[[2, 0]]  # ẑ, x̂
        self.register_buffer("helper_axes", helper_axes, persistent=False)
        # D^l = Uᵀ (D^{l-1} ⊗ D^1) U with U = sqrt(2l+1) C^{l-1,1,l} (orthonormal columns), as one product of
        # the outer product of the flattened D^{l-1} and D^1: [E, 9 (2l-1)²] @ [9 (2l-1)², (2l+1)²].
        for l in range(2, lmax + 1):
            lower = 2 * l - 1
            up = o3.wigner_3j(l - 1, 1, l, dtype=torch.float64).reshape(lower, 3, 2 * l + 1)
            up = up * math.sqrt(2 * l + 1)
            step = torch.einsum("abx,cdy->acbdxy", up, up).reshape(lower * lower * 9, (2 * l + 1) ** 2)
            self.register_buffer(f"wigner_step{l}", step, persistent=False)

    def spherical_harmonics(self, unit: torch.Tensor) -> torch.Tensor:  # [E, 3] -> [E, (jmax+1)**2]
        return o3.spherical_harmonics(
            list(range(self.jmax + 1)), unit, normalize=False, normalization="component"
        )

    def wigner(self, rotation: torch.Tensor) -> torch.Tensor:
        """Rotations ``[E, 3, 3]`` -> block-diagonal Wigner matrices ``[E, D, D]`` (degrees 0..lmax)."""
        n = rotation.shape[0]
        blocks = [rotation.new_ones(n, 1, 1), rotation][: self.lmax + 1]  # D^1 = R in e3nn's (x, y, z) order
        for l in range(2, self.lmax + 1):
            step = getattr(self, f"wigner_step{l}").to(rotation.dtype)
            lower = (2 * l - 1) ** 2
            outer = blocks[-1].reshape(n, lower, 1) * rotation.reshape(n, 1, 9)  # [E, (a a'), (b b')]
            blocks.append((outer.reshape(n, lower * 9) @ step).view(n, 2 * l + 1, 2 * l + 1))
        dim = (self.lmax + 1) ** 2
        wigner = rotation.new_zeros(n, dim, dim)
        for l, block in enumerate(blocks):
            wigner[:, degree_slice(l), degree_slice(l)] = block
        return wigner

    def forward(self, sh: torch.Tensor) -> EdgeFrames:  # [E, (jmax+1)**2] -> rotations into the edge frames
        with torch.autocast(sh.device.type, enabled=False):  # geometry stays in the model's dtype
            n = sh.shape[0]
            if self.jmax == 0:  # only J = 0 paths: every frame is as good as the lab frame
                rotation = torch.eye(3, dtype=sh.dtype, device=sh.device).expand(n, 3, 3)
            else:
                axis = F.normalize(sh[:, 1:4], dim=1)  # x̂ (Y_1 = sqrt(3) x̂); 0 for coincident atoms
                e_z, e_x = self.helper_axes.to(sh.dtype)  # buffers: no host copy (CUDA graphs forbid it)
                helper = torch.where(axis[:, 2:3].abs() < 0.9, e_z, e_x)  # any vector not along x̂
                first = F.normalize(torch.cross(helper, axis, dim=1), dim=1)
                rotation = torch.stack([first, axis, torch.cross(first, axis, dim=1)], dim=1)  # R x̂ = ŷ
            return EdgeFrames(self.wigner(rotation), self.term_rows_in, self.term_rows_out)


@dataclass
class EdgeFrames:
    """Per-edge rotations into the frame where the edge points along ŷ; restricted to the kernel terms on
    first use (the fused CPU kernel reads the Wigner matrices alone)."""

    wigner: torch.Tensor  # [E, D, D]: D(R_e), block diagonal by degree
    term_rows_in: torch.Tensor  # [T]: the row of D(R_e) that term t reads
    term_rows_out: torch.Tensor  # [T]: the row of D(R_e) that term t writes

    @cached_property
    def rotate_in(self) -> torch.Tensor:  # [E, T, D]
        return self.wigner.index_select(1, self.term_rows_in)

    @cached_property
    def rotate_out(self) -> torch.Tensor:  # [E, D, T]
        return self.wigner.index_select(1, self.term_rows_out).transpose(1, 2).contiguous()

    def __getitem__(self, edges: slice) -> EdgeFrames:
        return EdgeFrames(self.wigner[edges], self.term_rows_in, self.term_rows_out)


@dataclass
class EdgeGeometry:
    """Everything about the edges that the layers share in one forward pass.

    With ``paired`` edges (edge ``2p + 1`` is edge ``2p`` reversed) the radial features, a function of
    the length alone, have one row per pair: ``radial[p]`` belongs to edges ``2p`` and ``2p + 1``.
    """

    src: torch.Tensor  # [E] neighbour j
    dst: torch.Tensor  # [E] receiver i
    length: torch.Tensor  # [E] Å
    envelope: torch.Tensor  # [E] in [0, 1], smooth cutoff
    radial: torch.Tensor  # [E, radial_hidden] ([E/2, ...] if paired): shared radial network, envelope applied
    sh: torch.Tensor  # [E, (jmax+1)**2] spherical harmonics of x̂ = (x_j - x_i)/|x_j - x_i|
    frames: EdgeFrames  # the edge frames of the angular basis
    paired: bool = False
    derived: dict = field(default_factory=dict, repr=False, compare=False)  # what layers share, made once

    @property
    def edges_per_row(self) -> int:  # consecutive edges sharing a row of ``radial``: 2 for reverse pairs
        return 2 if self.paired else 1

    @property
    def edge_radial(self) -> torch.Tensor:  # [E, radial_hidden]: one row per edge, paired or not
        return self.radial.repeat_interleave(self.edges_per_row, dim=0) if self.paired else self.radial

    def __getitem__(self, edges: slice) -> EdgeGeometry:
        """The geometry of a contiguous block of edges; paired edges split between pairs only."""
        start, stop, step = edges.indices(self.src.shape[0])
        rows = edges
        if self.paired:
            if step != 1 or start % 2 or stop % 2:
                raise ValueError(f"a block of paired edges must hold whole pairs, not {edges}")
            rows = slice(start // 2, stop // 2)
        return EdgeGeometry(
            self.src[edges],
            self.dst[edges],
            self.length[edges],
            self.envelope[edges],
            self.radial[rows],
            self.sh[edges],
            self.frames[edges],
            self.paired,
        )
