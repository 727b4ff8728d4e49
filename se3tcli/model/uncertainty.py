"""The uncertainty head: a per-target standard deviation for every prediction, from the atom features.

Two parts, both fitted after the main training with the encoder and readout frozen
(:mod:`se3tcli.train.uncertainty`):

- An error network predicts the expected absolute error of each target (the scale ``b`` of a Laplace
  distribution of the error) as a sum over atoms for extensive targets and a mean for intensive ones, so
  that the uncertainty of a large molecule grows with its size. It learns from the model's own errors on
  training molecules, and one factor per target calibrates it on the validation split, so that
  ``±sigma``-intervals of a normal distribution hold as many validation errors as they should.
- A novelty term covers what the error network cannot know: atoms unlike any it learned from (water's
  oxygen in QM9, distorted geometries), where its output is an extrapolation. Each atom's novelty is the
  Mahalanobis distance of its features from the training atoms of its element, in units of the 99.9th
  percentile of the training atoms' distances; beyond 1, every unit of the molecule's largest novelty adds
  the target's median validation sigma.

``sigma = calibration * loss_scale * b + novelty_sigma * max(0, novelty - 1)``. Predictions whose sigma
exceeds ``threshold`` (per target; set when fitted) are flagged as low confidence. The head reads only
invariant features, so sigma is invariant under rotations, translations, reflections and permutations.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from se3tcli.graph import Batch
from se3tcli.model.config import ModelConfig
from se3tcli.model.heads import atom_invariants, pool
from se3tcli.targets import TARGETS, sigma_key

_MIN_SCALE = 1e-4  # floor of b in loss-scale units: keeps the Laplace likelihood finite


class UncertaintyHead(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.lmax = config.lmax
        self.targets = tuple(config.targets)
        n_features, n_elements, n_targets = (
            config.channels * (config.lmax + 1),
            len(config.elements),
            len(config.targets),
        )
        width = config.uncertainty_hidden
        self.mlp = nn.Sequential(
            nn.Linear(n_features, width),
            nn.SiLU(),
            nn.Linear(width, width),
            nn.SiLU(),
            nn.Linear(width, n_targets),
        )
        self.register_buffer("extensive", torch.tensor([TARGETS[t].extensive for t in self.targets]))
        # Set when the head is fitted (se3tcli.train.uncertainty); [T] in the targets' display units.
        self.register_buffer("loss_scale", torch.ones(n_targets))  # display units per unit of b
        self.register_buffer("calibration", torch.ones(n_targets))  # sigma / (loss_scale * b)
        self.register_buffer("novelty_sigma", torch.zeros(n_targets))  # added per unit of novelty past 1
        self.register_buffer("threshold", torch.full((n_targets,), math.inf))  # low confidence above
        # Per element (the model's element order): the training atoms' mean features [E, F], a whitening
        # matrix [E, F, F] (|(x - mean) @ W|² is the squared Mahalanobis distance) and the 99.9th
        # percentile of their distances / sqrt(F) [E]. Zero whitening (an unfitted head): no novelty.
        self.register_buffer("feature_mean", torch.zeros(n_elements, n_features))
        self.register_buffer("whitening", torch.zeros(n_elements, n_features, n_features))
        self.register_buffer("novelty_scale", torch.ones(n_elements))

    def error_scale(self, invariants: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Atom invariants ``[n_atoms, F]`` -> ``b [n_mol, T]``: the expected absolute error in loss-scale
        units (what the fit trains; positive)."""
        per_atom = nn.functional.softplus(self.mlp(invariants))  # [n_atoms, T]
        return pool(per_atom, self.extensive, batch) + _MIN_SCALE

    def atom_distances(self, invariants: torch.Tensor, element: torch.Tensor) -> torch.Tensor:
        """``[n_atoms]``: each atom's Mahalanobis distance from its element's training atoms / sqrt(F)."""
        distances = invariants.new_zeros(len(element))
        for e in torch.unique(element).tolist():  # the elements present: a few
            mine = element == e
            whitened = (invariants[mine] - self.feature_mean[e]) @ self.whitening[e]  # [n_mine, F]
            distances[mine] = whitened.norm(dim=1)
        return distances / math.sqrt(invariants.shape[1])

    def novelty(self, invariants: torch.Tensor, element: torch.Tensor, batch: Batch) -> torch.Tensor:
        """``[n_mol]``: the largest atom novelty (distance / the element's 99.9th training percentile)."""
        per_atom = self.atom_distances(invariants, element) / self.novelty_scale[element]
        out = per_atom.new_zeros(batch.n_mol)
        return out.scatter_reduce(0, batch.mol_index, per_atom, reduce="amax", include_self=True)

    def forward(self, h: torch.Tensor, element: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        """``{target_sigma: [n_mol]}`` in the targets' display units."""
        invariants = atom_invariants(h, self.lmax)  # [n_atoms, F]
        fitted = self.error_scale(invariants, batch) * (self.loss_scale * self.calibration)  # [n_mol, T]
        beyond = (self.novelty(invariants, element, batch) - 1.0).clamp_min(0.0)  # [n_mol]
        sigma = fitted + beyond[:, None] * self.novelty_sigma
        return {sigma_key(t): sigma[:, i] for i, t in enumerate(self.targets)}
