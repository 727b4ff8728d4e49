"""Predictions and errors in physical units on a split of a labelled data set."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from se3tcli.data.dataset import LabelledData, load_labelled
from se3tcli.data.qm9 import QM9Data
from se3tcli.graph import collate
from se3tcli.targets import TARGETS


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
    """MAE and RMSE per target in its display unit and in its error unit (meV for orbital energies)."""
    metrics = {}
    for column, t in enumerate(targets):
        err = pred[t] - truth[:, column]
        mae, rmse = float(np.abs(err).mean()), float(np.sqrt((err**2).mean()))
        info = TARGETS[t]
        metrics[t] = {
            "mae": mae,
            "rmse": rmse,
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
    """``(predictions, truth [n, T], errors)`` on a split (its first ``limit`` molecules if given)."""
    indices = labelled.split[split][:limit]
    data = labelled.data
    pred = predict_arrays(model, data, indices, batch_size, device)
    truth = data.targets[indices]
    return pred, truth, error_metrics(pred, truth, data.target_names)


def labelled_for_checkpoint(
    checkpoint: dict[str, Any], dataset: str | None = None, cache=None
) -> LabelledData:
    """Rebuild the data and split a checkpoint was trained on (``dataset`` overrides the data source)."""
    data_info = checkpoint.get("training", {}).get("data", {})
    targets = tuple(checkpoint["targets"])
    seed = int(data_info.get("seed", 0))
    name = dataset or data_info.get("dataset", "qm9")
    return load_labelled(name, targets, seed, data_info.get("limit"), cache)
