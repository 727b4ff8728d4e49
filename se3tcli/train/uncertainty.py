"""Fitting a trained model's uncertainty head (:mod:`se3tcli.model.uncertainty`) and measuring it.

The encoder and readout stay frozen. Their atom features and errors on training molecules are computed
once; the head learns the expected absolute error of each target from them (Laplace negative
log-likelihood of the errors, in loss-scale units). The validation split then fixes one calibration factor
per target (:func:`~se3tcli.train.calibration.fit_calibration`) and the low-confidence threshold (the 99th
percentile of sigma on validation molecules), and the test split measures the result
(:func:`~se3tcli.train.calibration.calibration_metrics`). It costs one pass over the data and a small
network's training, not a second model: a bundled model is re-fitted whenever it is exported.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from se3tcli.data.dataset import LabelledData
from se3tcli.graph import Batch
from se3tcli.model.transformer import SE3Transformer
from se3tcli.model.uncertainty import UncertaintyHead
from se3tcli.targets import TARGETS
from se3tcli.train.calibration import calibration_metrics, fit_calibration
from se3tcli.train.evaluation import batches

METHOD = (
    "error head: an MLP on the frozen model's invariant atom features predicts each target's expected "
    "absolute error (Laplace likelihood of its errors on training molecules; sums over atoms for extensive "
    "targets, means for intensive ones), scaled by one factor per target that minimises the "
    "miscalibration area on the validation split"
)
LOW_CONFIDENCE_QUANTILE = 0.99  # sigma above this quantile of the validation sigmas: low confidence
DEFAULT_MOLECULES = 50_000  # training molecules the head learns from
DEFAULT_EPOCHS = 20
DEFAULT_WIDTH = 128


def _features_only(batch: Batch) -> Batch:
    """The batch without its edges: what the head reads besides the features (atoms per molecule)."""
    none = batch.edge_src[:0]
    return Batch(batch.z, batch.pos, batch.mol_index, batch.n_mol, none, none)


@torch.no_grad()
def _features_and_errors(
    model: SE3Transformer, labelled: LabelledData, indices: np.ndarray, batch_size: int, device: torch.device
) -> list[tuple[torch.Tensor, Batch, torch.Tensor]]:
    """Per batch: ``(h [n_atoms, C, D], batch, errors [b, T] in display units)`` of molecules ``indices``."""
    model.eval()
    targets = model.config.targets
    cached = []
    for batch, truth, _ in batches(labelled.data, indices, batch_size, model.config.cutoff):
        batch = batch.to(device)
        h, element = model.features(batch)
        out = model.readout(h, element, batch)
        pred = torch.stack([out[t] for t in targets], dim=1).double()
        cached.append((h, _features_only(batch), pred - truth.to(device)))
    return cached


def _train(
    head: UncertaintyHead,
    cached: list[tuple[torch.Tensor, Batch, torch.Tensor]],
    epochs: int,
    lr: float,
    seed: int,
    on_epoch: Callable[[int, float], None] | None,
) -> None:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, epochs * len(cached)))
    head.train()
    for epoch in range(epochs):
        total = 0.0
        for k in torch.randperm(len(cached), generator=generator).tolist():
            h, batch, errors = cached[k]
            b = head.error_scale(h, batch).double()  # [b, T] loss-scale units
            r = errors.abs() / head.loss_scale.double()  # [b, T]
            loss = (torch.log(b) + r / b).mean()  # Laplace negative log-likelihood, up to a constant
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += float(loss.detach())
        if on_epoch:
            on_epoch(epoch + 1, total / max(1, len(cached)))
    head.eval()


@torch.no_grad()
def _sigma_and_errors(
    model: SE3Transformer, labelled: LabelledData, indices: np.ndarray, batch_size: int, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """``(sigma / calibration, errors)``, both ``[n, T]`` in display units, on molecules ``indices``."""
    sigmas, errors = [], []
    head = model.uncertainty
    for h, batch, error in _features_and_errors(model, labelled, indices, batch_size, device):
        sigmas.append((head.error_scale(h, batch) * head.loss_scale).double().cpu().numpy())
        errors.append(error.cpu().numpy())
    return np.concatenate(sigmas), np.concatenate(errors)


def _per_target(targets, errors: np.ndarray, sigma: np.ndarray) -> dict[str, dict]:
    """:func:`calibration_metrics` per target; mean sigma and MAE also in the target's error unit."""
    report = {}
    for i, t in enumerate(targets):
        m = calibration_metrics(errors[:, i], sigma[:, i])
        factor = TARGETS[t].error_factor
        m |= {
            "unit": TARGETS[t].unit,
            "mean_sigma_error_unit": m["mean_sigma"] * factor,
            "mae_error_unit": m["mae"] * factor,
            "error_unit": TARGETS[t].error_unit,
        }
        report[t] = m
    return report


def fit_uncertainty(
    model: SE3Transformer,
    labelled: LabelledData,
    loss_scale: dict[str, float],
    device: torch.device,
    molecules: int = DEFAULT_MOLECULES,
    epochs: int = DEFAULT_EPOCHS,
    width: int = DEFAULT_WIDTH,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    on_epoch: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Give ``model`` a fitted, calibrated uncertainty head (its config gets ``uncertainty_hidden =
    width``) and return the report for the model card: the method, what it was fitted on, and per target
    the calibration factor, the low-confidence threshold and the calibration metrics on the test split
    (on the validation split where a data set has no test molecules)."""
    splits = labelled.split
    if not len(splits["train"]) or not len(splits["val"]):
        raise ValueError("fitting the uncertainty needs training and validation molecules")
    started = time.perf_counter()
    targets = model.config.targets
    model.config = model.config.replace(uncertainty_hidden=width)
    torch.manual_seed(seed)
    head = UncertaintyHead(model.config).to(device)
    head.loss_scale.copy_(torch.tensor([float(loss_scale[t]) for t in targets]))
    model.uncertainty = head
    rng = np.random.default_rng(seed)
    train = np.sort(rng.permutation(splits["train"])[:molecules])
    _train(head, _features_and_errors(model, labelled, train, batch_size, device), epochs, lr, seed, on_epoch)

    raw_val, errors_val = _sigma_and_errors(model, labelled, splits["val"], batch_size, device)
    factors = np.array([fit_calibration(errors_val[:, i], raw_val[:, i]) for i in range(len(targets))])
    thresholds = np.quantile(raw_val * factors, LOW_CONFIDENCE_QUANTILE, axis=0)
    head.calibration.copy_(torch.from_numpy(factors))
    head.threshold.copy_(torch.from_numpy(thresholds))

    scored = "test" if len(splits["test"]) else "val"
    raw, errors = raw_val, errors_val
    if scored == "test":
        raw, errors = _sigma_and_errors(model, labelled, splits["test"], batch_size, device)
    metrics = _per_target(targets, errors, raw * factors)
    for i, t in enumerate(targets):
        metrics[t] |= {"calibration": float(factors[i]), "low_confidence_sigma": float(thresholds[i])}
    return {
        "method": METHOD,
        "fitted_on": {"train_molecules": int(len(train)), "epochs": epochs, "width": width, "seed": seed},
        "calibrated_on": {"split": "val", "molecules": int(len(splits["val"]))},
        "low_confidence": f"sigma above the {LOW_CONFIDENCE_QUANTILE:.0%} quantile of validation sigmas",
        "scored_on": {"split": scored, "molecules": int(len(errors))},
        "targets": metrics,
        "fit_seconds": round(time.perf_counter() - started, 1),
    }
