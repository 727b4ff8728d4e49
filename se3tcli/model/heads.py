"""Readout: invariant atom features -> molecular properties in physical units.

Extensive targets are sums of atomic contributions plus per-element atom references; intensive targets
are means. Mean/std and atom references are buffers, so a loaded model predicts physical units by itself.
The dipole head predicts the dipole *vector* ``μ = Σ_i q_i r_i + Σ_i μ_i`` from atomic charges (shifted to
sum to zero per molecule, so μ does not depend on the origin) and atomic dipoles, and exposes |μ| as ``mu``.
"""

from __future__ import annotations

import torch
from torch import nn

from se3tcli.graph import Batch
from se3tcli.model.basis import degree_slice
from se3tcli.model.config import ModelConfig
from se3tcli.targets import E_ANGSTROM_TO_DEBYE, TARGETS

MU_VECTOR = "mu_vector"  # extra output: the dipole vector [n_mol, 3] in debye


def scatter_sum(values: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    return values.new_zeros((n, *values.shape[1:])).index_add_(0, index, values)


def atom_invariants(h: torch.Tensor, lmax: int) -> torch.Tensor:
    """``h [n_atoms, C, D]`` -> ``[n_atoms, C * (lmax + 1)]``: the scalar channels and the norms of every
    higher degree (all invariant)."""
    norms = [torch.sqrt(h[:, :, degree_slice(l)].pow(2).sum(-1) + 1e-12) for l in range(1, lmax + 1)]
    return torch.cat([h[:, :, 0], *norms], dim=1)


def pool(per_atom: torch.Tensor, extensive: torch.Tensor, batch: Batch) -> torch.Tensor:
    """``[n_atoms, T]`` -> ``[n_mol, T]``: sums for extensive targets, means for intensive ones."""
    counts = batch.n_atoms_per_mol.clamp_min(1).to(per_atom.dtype)  # [n_mol]
    summed = scatter_sum(per_atom, batch.mol_index, batch.n_mol)
    return torch.where(extensive, summed, summed / counts[:, None])


class Readout(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config.channels
        self.lmax = config.lmax
        self.use_dipole = config.dipole_head and "mu" in config.targets
        self.scalar_targets = tuple(t for t in config.targets if not (self.use_dipole and t == "mu"))
        n = len(self.scalar_targets)
        # Input: the scalar channels and the norms of every higher degree (all invariant).
        n_invariants = c * (config.lmax + 1)
        self.mlp = nn.Sequential(
            nn.Linear(n_invariants, config.readout_hidden), nn.SiLU(), nn.Linear(config.readout_hidden, n)
        )
        self.register_buffer("extensive", torch.tensor([TARGETS[t].extensive for t in self.scalar_targets]))
        # Set from the training data (Model.set_statistics); identity until then.
        self.register_buffer("mean", torch.zeros(n))  # per atom for extensive targets
        self.register_buffer("std", torch.ones(n))  # per atom for extensive targets
        self.register_buffer("atom_refs", torch.zeros(len(config.elements), n))  # per element
        if self.use_dipole:
            self.charge = nn.Linear(c, 1, bias=False)  # a bias would cancel in the neutrality shift
            # Atomic dipoles mix the l=1 channels (no bias: equivariant); without them (lmax 0) the dipole
            # comes from the partial charges alone.
            self.atomic_dipole = nn.Linear(c, 1, bias=False) if config.lmax >= 1 else None

    def forward(self, h: torch.Tensor, element: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        """``h [n_atoms, C, D]`` -> ``{target: [n_mol]}`` (and ``mu_vector [n_mol, 3]``)."""
        scalars = h[:, :, 0]  # [n_atoms, C], invariant
        per_atom = self.mlp(atom_invariants(h, self.lmax)) * self.std + self.mean  # [n_atoms, T]
        ext = self.extensive
        per_atom = per_atom + torch.where(ext, self.atom_refs[element], torch.zeros_like(per_atom))
        pooled = pool(per_atom, ext, batch)  # [n_mol, T]
        out = {t: pooled[:, i] for i, t in enumerate(self.scalar_targets)}
        if self.use_dipole:
            n_mol, mol = batch.n_mol, batch.mol_index
            counts = batch.n_atoms_per_mol.clamp_min(1).to(h.dtype)  # [n_mol]
            charges = self.charge(scalars).squeeze(1)  # [n_atoms] e
            charges = charges - (scatter_sum(charges, mol, n_mol) / counts)[mol]  # neutral molecules
            dipoles = E_ANGSTROM_TO_DEBYE * charges[:, None] * batch.pos  # [n_atoms, 3] D
            if self.atomic_dipole is not None:
                dipoles = dipoles + self.atomic_dipole(h[:, :, degree_slice(1)].transpose(1, 2)).squeeze(2)
            dipole = scatter_sum(dipoles, mol, n_mol)
            out[MU_VECTOR] = dipole  # [n_mol, 3] D
            out["mu"] = torch.sqrt(dipole.pow(2).sum(-1) + 1e-12)
        return out
