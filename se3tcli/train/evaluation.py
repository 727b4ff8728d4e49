"""Predictions and errors in physical units on a split of a labelled data set."""

from __future__ import annotations

import csv
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from se3tcli.data.dataset import QM9_NAME, LabelledData, load_labelled
from se3tcli.data.qm9 import QM9Data
from se3tcli.files import atomic_write
from se3tcli.graph import collate
from se3tcli.targets import TARGETS, column_name, sigma_key
from se3tcli.train.calibration import per_target_metrics


def batches(data: QM9Data, indices: np.ndarray, batch_size: int, cutoff: float) -> Iterator[tuple]:
    """``(Batch, targets [b, T] float64, indices)`` over ``indices`` in order."""
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        molecules = [data.molecule(int(i)) for i in chunk]
        yield collate(molecules, cutoff), torch.from_numpy(data.targets[chunk]), chunk


@torch.no_grad()
def predict_arrays(
    model: nn.Module, data: QM9Data, indices: np.ndarray, batch_size: int, device: torch.device
) -> dict[str, np.ndarray]:
    """Predictions in display units for molecules ``indices`` of ``data``: ``{target: [n]}``, and each
    target's sigma (``{target_sigma: [n]}``) where the model has an uncertainty head."""
    model.eval()
    names = [*data.target_names]
    if getattr(model, "uncertainty", None) is not None:
        names += [sigma_key(t) for t in data.target_names]
    out: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for batch, _, _ in batches(data, indices, batch_size, model.config.cutoff):
        result = model(batch.to(device))
        for name in out:
            out[name].append(result[name].double().cpu().numpy())
    return {name: np.concatenate(v) if v else np.zeros(0) for name, v in out.items()}


def uncertainty_metrics(
    pred: dict[str, np.ndarray], truth: np.ndarray, targets: Sequence[str]
) -> dict[str, dict] | None:
    """How well the predicted sigmas match the errors, per target
    (:func:`~se3tcli.train.calibration.per_target_metrics`); None without sigmas."""
    if not all(sigma_key(t) in pred for t in targets) or not len(truth):
        return None
    errors = np.stack([pred[t] - truth[:, i] for i, t in enumerate(targets)], axis=1)
    sigma = np.stack([pred[sigma_key(t)] for t in targets], axis=1)
    return per_target_metrics(targets, errors, sigma)


def error_metrics(pred: dict[str, np.ndarray], truth: np.ndarray, targets: Sequence[str]) -> dict[str, dict]:
    """MAE and RMSE per target in its display unit and in its error unit (meV for orbital energies), and
    R² (1 - squared error / variance of the truth; None for fewer than two molecules or constant truth)."""
    metrics = {}
    for column, t in enumerate(targets):
        err = pred[t] - truth[:, column]
        mae, rmse = float(np.abs(err).mean()), float(np.sqrt((err**2).mean()))
        spread = float(truth[:, column].var()) if len(err) > 1 else 0.0
        info = TARGETS[t]
        metrics[t] = {
            "mae": mae,
            "rmse": rmse,
            "r2": 1.0 - rmse**2 / spread if spread > 0 else None,
            "unit": info.unit,
            "mae_error_unit": mae * info.error_factor,
            "rmse_error_unit": rmse * info.error_factor,
            "error_unit": info.error_unit,
            "n": int(len(err)),
        }
    return metrics


def split_predictions(
    model: nn.Module,
    labelled: LabelledData,
    split: str,
    batch_size: int,
    device: torch.device,
    limit: int | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, dict]]:
    """``(predictions, truth [n, T], errors)`` on a split, or ``all`` of the data (its first ``limit``
    molecules if given)."""
    data = labelled.data
    indices = split_indices(labelled, split, limit)
    pred = predict_arrays(model, data, indices, batch_size, device)
    truth = data.targets[indices]
    return pred, truth, error_metrics(pred, truth, data.target_names)


def split_indices(labelled: LabelledData, split: str, limit: int | None = None) -> np.ndarray:
    """The molecules of a split (``all``: every one), its first ``limit`` if given."""
    return (np.arange(len(labelled.data)) if split == "all" else labelled.split[split])[:limit]


def write_predictions(
    path: str | Path,
    labelled: LabelledData,
    split: str,
    pred: dict[str, np.ndarray],
    limit: int | None = None,
) -> None:
    """CSV of each molecule of the split: ``qm9_index`` (QM9's molecule number) or ``record`` (the
    record's 1-based number in a labelled file), then per target the true and the predicted value in its
    display unit, named like predict's columns (``homo_eV``, ``homo_predicted_eV``), and the prediction's
    sigma (``homo_sigma_eV``) where there are sigmas."""
    data = labelled.data
    indices = split_indices(labelled, split, limit)
    truth = data.targets[indices]
    header = ["qm9_index" if labelled.description.get("dataset") == QM9_NAME else "record"]
    with_sigma = all(sigma_key(t) in pred for t in data.target_names)
    for t in data.target_names:
        unit = TARGETS[t].unit
        header += [column_name(t, unit), column_name(f"{t}_predicted", unit)]
        header += [column_name(sigma_key(t), unit)] if with_sigma else []
    with atomic_write(path, newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        for row, i in enumerate(indices):
            cells = [int(data.index[i])]
            for column, t in enumerate(data.target_names):
                cells += [repr(float(truth[row, column])), repr(float(pred[t][row]))]
                cells += [repr(float(pred[sigma_key(t)][row]))] if with_sigma else []
            writer.writerow(cells)


def labelled_for_checkpoint(
    checkpoint: dict[str, Any],
    dataset: str | None = None,
    cache=None,
    targets: Sequence[str] | None = None,
) -> LabelledData:
    """Rebuild the data and split a checkpoint was trained on (``dataset`` overrides the data source,
    ``targets`` the checkpoint's targets: a file needs labels for these only)."""
    data_info = checkpoint.get("training", {}).get("data", {})
    targets = tuple(targets or checkpoint["targets"])
    seed = int(data_info.get("seed", 0))
    name = dataset or data_info.get("dataset", QM9_NAME)
    return load_labelled(name, targets, seed, data_info.get("limit"), cache)
