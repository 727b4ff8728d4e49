"""The uncertainty head: a per-target standard deviation for every prediction, from the atom features.

It predicts the expected absolute error of each target (the scale ``b`` of a Laplace distribution of the
error), as a sum over atoms for extensive targets and a mean for intensive ones, so that the uncertainty of
a large molecule grows with its size. It is fitted after the main training, with the encoder and readout
frozen, on the model's own errors on training molecules (:mod:`se3tcli.train.uncertainty`), and then
calibrated on the validation split: ``sigma = calibration * b``, one factor per target, chosen so that
``±sigma``-intervals of a normal distribution hold as many validation errors as they should. Predictions whose
``sigma`` exceeds ``threshold`` (per target; set when fitted) are flagged as low confidence.

The head reads only invariant features, so ``sigma`` is invariant under rotations, translations,
reflections and permutations of the atoms.
"""

from __future__ import annotations

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
        width = config.uncertainty_hidden
        self.mlp = nn.Sequential(
            nn.Linear(config.channels * (config.lmax + 1), width),
            nn.SiLU(),
            nn.Linear(width, width),
            nn.SiLU(),
            nn.Linear(width, len(self.targets)),
        )
        self.register_buffer("extensive", torch.tensor([TARGETS[t].extensive for t in self.targets]))
        # Set when the head is fitted (se3tcli.train.uncertainty); all [T], in the targets' display units.
        self.register_buffer("loss_scale", torch.ones(len(self.targets)))  # display units per unit of b
        self.register_buffer("calibration", torch.ones(len(self.targets)))  # sigma / (loss_scale * b)
        self.register_buffer("threshold", torch.full((len(self.targets),), float("inf")))  # low confidence

    def error_scale(self, h: torch.Tensor, batch: Batch) -> torch.Tensor:
        """``h [n_atoms, C, D]`` -> ``b [n_mol, T]``: the expected absolute error in loss-scale units (what
        the fit trains; positive)."""
        per_atom = nn.functional.softplus(self.mlp(atom_invariants(h, self.lmax)))  # [n_atoms, T]
        return pool(per_atom, self.extensive, batch) + _MIN_SCALE

    def forward(self, h: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        """``{target_sigma: [n_mol]}`` in the targets' display units."""
        sigma = self.error_scale(h, batch) * (self.loss_scale * self.calibration)  # [n_mol, T]
        return {sigma_key(t): sigma[:, i] for i, t in enumerate(self.targets)}
