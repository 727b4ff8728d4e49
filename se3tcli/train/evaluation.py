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
from se3tcli.targets import TARGETS, column_name


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
    """Predictions in display units for molecules ``indices`` of ``data``: ``{target: [n]}``."""
    model.eval()
    out: dict[str, list[np.ndarray]] = {t: [] for t in data.target_names}
    for batch, _, _ in batches(data, indices, batch_size, model.config.cutoff):
        result = model(batch.to(device))
        for t in out:
            out[t].append(result[t].double().cpu().numpy())
    return {t: np.concatenate(v) if v else np.zeros(0) for t, v in out.items()}


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
    display unit, named like predict's columns (``homo_eV``, ``homo_predicted_eV``)."""
    data = labelled.data
    indices = split_indices(labelled, split, limit)
    truth = data.targets[indices]
    header = ["qm9_index" if labelled.description.get("dataset") == QM9_NAME else "record"]
    for t in data.target_names:
        unit = TARGETS[t].unit
        header += [column_name(t, unit), column_name(f"{t}_predicted", unit)]
    with atomic_write(path, newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        for row, i in enumerate(indices):
            cells = [int(data.index[i])]
            for column, t in enumerate(data.target_names):
                cells += [repr(float(truth[row, column])), repr(float(pred[t][row]))]
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
