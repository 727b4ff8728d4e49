"""Packaging a trained checkpoint as a model: ``NAME.pt`` plus its model card ``NAME.json``.

The card records what the model is, how it was trained, its test errors (measured by this export, on the
test split of its own training data) beside the SE(3)-Transformer paper's, its domain and the sha256 of
the checkpoint, which ``load_model`` verifies for bundled models.
"""

from __future__ import annotations

import datetime
import json
import platform
from pathlib import Path
from typing import Any

import e3nn
import torch

from se3tcli import __version__
from se3tcli.checkpoint import model_from_checkpoint, save_checkpoint, sha256_of
from se3tcli.elements import symbol
from se3tcli.files import atomic_write
from se3tcli.targets import NVIDIA_MAE, PAPER_MAE, TARGETS

CARD_LIMITATIONS = (
    "Trained on QM9: small organic molecules (H, C, N, O, F; at most 9 heavy atoms) at B3LYP/6-31G(2df,p) "
    "equilibrium geometries. Predictions for larger molecules, other elements, charged species, radicals or "
    "geometries not optimised at that level are extrapolations and can be far off."
)


def build_card(
    name: str,
    checkpoint: dict[str, Any],
    checkpoint_path: Path,
    n_parameters: int,
    test_metrics: dict[str, dict] | None = None,
    evaluation: dict[str, Any] | None = None,
    training_command: str = "",
    description: str = "",
    uncertainty: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The model card of ``checkpoint`` (saved at ``checkpoint_path``); the test errors and how they were
    measured, and the uncertainty head's calibration, where an export measured them."""
    test_metrics = test_metrics or {}
    training = checkpoint.get("training", {})
    options = training.get("options", {})
    errors = {}
    for target, m in test_metrics.items():
        paper, nvidia = PAPER_MAE.get(target), NVIDIA_MAE.get(target)
        errors[target] = {
            "mae": m["mae_error_unit"],
            "rmse": m["rmse_error_unit"],
            "unit": m["error_unit"],
            "paper_mae": paper,
            "beats_paper": None if paper is None else bool(m["mae_error_unit"] < paper),
            "nvidia_mae": nvidia,
            "beats_nvidia": None if nvidia is None else bool(m["mae_error_unit"] < nvidia),
        }
    domain = training.get("domain", {})
    return {
        "name": name,
        "description": description,
        "checkpoint": {
            "file": checkpoint_path.name,
            "sha256": sha256_of(checkpoint_path),
            "size_bytes": checkpoint_path.stat().st_size,
        },
        "targets": {t: TARGETS[t].unit for t in checkpoint["targets"]},
        "elements": [symbol(z) for z in checkpoint["elements"]],
        "parameters": n_parameters,
        "config": checkpoint["config"],
        "training": {
            "data": training.get("data", {}),
            "command": training_command or options.get("command", ""),
            "options": options,
            "epochs_done": training.get("epochs_done"),
            "steps": training.get("steps"),
            "wall_time_s": training.get("wall_time_s"),
            "device": training.get("device"),
            "torch_version": training.get("torch_version"),
        },
        "domain": {
            "elements": [symbol(z) for z in domain.get("elements", [])],
            "max_atoms": domain.get("max_atoms"),
            "max_heavy_atoms": domain.get("max_heavy_atoms"),
            "train_molecules_by_heavy_atoms": domain.get("train_molecules_by_heavy_atoms"),
        },
        "test_errors": errors,
        "evaluation": evaluation or {},
        "uncertainty": uncertainty or {},
        "limitations": CARD_LIMITATIONS,
        "versions": {"se3t": __version__, "torch": str(torch.__version__), "e3nn": e3nn.__version__},
    }


def write_model(
    name: str,
    checkpoint: dict[str, Any],
    dest: Path,
    test_metrics: dict[str, dict],
    n_parameters: int,
    evaluation_command: str,
    training_command: str,
    device: str,
    description: str = "",
    uncertainty: dict[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Write ``dest/NAME.pt`` (without resume state) and ``dest/NAME.json``; both atomically."""
    dest.mkdir(parents=True, exist_ok=True)
    stripped = {k: v for k, v in checkpoint.items() if k != "resume"}
    pt_path = dest / f"{name}.pt"
    save_checkpoint(stripped, pt_path)
    evaluation = {
        "command": evaluation_command,
        "device": device,
        "host": platform.processor() or platform.machine(),
        "date": datetime.date.today().isoformat(),
        "split": "test",
        "n_molecules": next(iter(test_metrics.values()))["n"] if test_metrics else 0,
    }
    card = build_card(
        name,
        stripped,
        pt_path,
        n_parameters,
        test_metrics,
        evaluation,
        training_command,
        description,
        uncertainty,
    )
    card_path = dest / f"{name}.json"
    with atomic_write(card_path) as handle:
        json.dump(card, handle, indent=2, ensure_ascii=False)
        handle.write("\n")
    return pt_path, card_path


def card_summary(path: Path, checkpoint: dict[str, Any], card: dict[str, Any]) -> dict[str, Any]:
    """The model card of a bundled model, or the card of a plain checkpoint with its validation errors."""
    if card:
        return card
    model = model_from_checkpoint(checkpoint, path)
    summary = build_card(path.stem, checkpoint, path, sum(p.numel() for p in model.parameters()))
    summary["validation"] = checkpoint.get("metrics", {}).get("val", {})
    return summary
