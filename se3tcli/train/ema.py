"""Exponential moving average (EMA) of a model's weights: the weights se3t validates, saves and exports.

Averaging the weights of the last few thousand optimizer steps smooths out the noise of the steps
themselves (DimeNet++, schnetpack, MACE and nequip train this way). The decay ramps up as
``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so early averages are not dominated by the
random initial weights.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class WeightAverage:
    """An averaged copy of ``model``; call :meth:`update` after every optimizer step."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"the EMA decay must lie in (0, 1), not {decay}")
        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(model).eval()
        self.model.requires_grad_(False)

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s weights; buffers (statistics) are copied as they are."""
        self.updates += 1
        weight = 1.0 - self.current_decay()
        averaged = list(self.model.parameters())
        torch._foreach_lerp_(averaged, [p.detach() for p in model.parameters()], weight)
        for mine, theirs in zip(self.model.buffers(), model.buffers(), strict=True):
            mine.copy_(theirs)

    def state(self) -> dict[str, Any]:
        """What a resume needs besides the averaged weights (which a checkpoint saves as its model)."""
        return {"decay": self.decay, "updates": self.updates}

    def restore(self, state: dict[str, Any]) -> None:
        self.decay, self.updates = float(state["decay"]), int(state["updates"])
