"""Fitting a trained model's uncertainty head (:mod:`se3tcli.model.uncertainty`) and measuring it.

The encoder and readout stay frozen. Their atom features and errors on training molecules are computed
once; the error network learns the expected absolute error of each target from them (Laplace negative
log-likelihood of the errors, in loss-scale units), and the same atoms give each element's feature
distribution for the novelty term. The validation split then fixes one calibration factor per target
(:func:`~se3tcli.train.calibration.fit_calibration`), the novelty term's sigma per unit (the median
calibrated sigma) and the low-confidence threshold (the 99th percentile of sigma), and the test split
measures the result (:func:`~se3tcli.train.calibration.calibration_metrics`). It costs one pass over the
data and a small network's training, not a second model: a bundled model is re-fitted whenever it is
exported.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from se3tcli.data.dataset import LabelledData
from se3tcli.graph import Batch
from se3tcli.model.heads import atom_invariants
from se3tcli.model.transformer import SE3Transformer
from se3tcli.model.uncertainty import UncertaintyHead
from se3tcli.notices import NOTICES
from se3tcli.train.calibration import fit_calibration, per_target_metrics
from se3tcli.train.evaluation import batches

METHOD = (
    "error head: an MLP on the frozen model's invariant atom features predicts each target's expected "
    "absolute error (Laplace likelihood of its errors on training molecules; sums over atoms for extensive "
    "targets, means for intensive ones), scaled by one factor per target that minimises the "
    "miscalibration area on the validation split; plus a novelty term: beyond the 99.9th percentile of the "
    "training atoms' Mahalanobis distances (per element), each unit of the molecule's largest atom novelty "
    "adds the target's median validation sigma"
)
LOW_CONFIDENCE_QUANTILE = 0.99  # sigma above this quantile of the validation sigmas: low confidence
NOVELTY_QUANTILE = 0.999  # of the training atoms' distances: novelty 1
_SHRINKAGE = 1e-3  # covariance + this x its mean variance x I: invertible for few or collinear atoms
FEW_CALIBRATION_MOLECULES = 100  # calibrating on fewer validation molecules than this gets a warning
DEFAULT_MOLECULES = 50_000  # training molecules the head learns from
DEFAULT_EPOCHS = 20
DEFAULT_WIDTH = 128

Cached = list[tuple[torch.Tensor, torch.Tensor, Batch, torch.Tensor]]  # invariants, element, batch, errors


def _features_only(batch: Batch) -> Batch:
    """The batch without its edges: what the head reads besides the features (atoms per molecule)."""
    none = batch.edge_src[:0]
    return Batch(batch.z, batch.pos, batch.mol_index, batch.n_mol, none, none)


@torch.no_grad()
def _features_and_errors(
    model: SE3Transformer, labelled: LabelledData, indices: np.ndarray, batch_size: int, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor, Batch, torch.Tensor]]:
    """Per batch of molecules ``indices``: ``(invariants [n_atoms, F], element [n_atoms], batch, errors
    [b, T] in display units)``, one batch at a time (the fit keeps them; scoring does not need to)."""
    model.eval()
    targets = model.config.targets
    for batch, truth, _ in batches(labelled.data, indices, batch_size, model.config.cutoff):
        batch = batch.to(device)
        h, element = model.features(batch)
        out = model.readout(h, element, batch)
        pred = torch.stack([out[t] for t in targets], dim=1).double()
        invariants = atom_invariants(h, model.config.lmax)
        yield invariants, element, _features_only(batch), pred - truth.to(device)


def _train(
    head: UncertaintyHead,
    cached: Cached,
    epochs: int,
    lr: float,
    seed: int,
    on_epoch: Callable[[int, float], None] | None,
) -> None:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(head.mlp.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, epochs * len(cached)))
    head.train()
    for epoch in range(epochs):
        total = 0.0
        for k in torch.randperm(len(cached), generator=generator).tolist():
            invariants, _, batch, errors = cached[k]
            b = head.error_scale(invariants, batch).double()  # [b, T] loss-scale units
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


def _moments(count: float, total: torch.Tensor, outer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean [F], covariance [F, F])`` of ``count`` vectors from their sum and sum of outer products."""
    mean = total / count
    return mean, outer / count - torch.outer(mean, mean)


def _shrunk(covariance: torch.Tensor, towards: torch.Tensor, count: float | torch.Tensor) -> torch.Tensor:
    """``covariance`` of ``count`` vectors moved towards ``towards`` by F / (count + F) (at least
    :data:`_SHRINKAGE`): few vectors borrow the shape of many, instead of giving huge distances off the
    span of their own (two symmetry-equivalent atoms span nothing)."""
    shrink = _shrinkage(float(count), len(covariance))
    return (1 - shrink) * covariance + shrink * towards


def _shrinkage(count: float, n_features: int) -> float:
    """How far the statistics of ``count`` feature vectors move towards those of all atoms."""
    return max(_SHRINKAGE, n_features / (count + n_features))


@torch.no_grad()
def _fit_novelty(head: UncertaintyHead, cached: Cached) -> None:
    """Each element's feature mean, whitening and distance scale (the 99.9th percentile) from the training
    atoms in ``cached``. An element's covariance is shrunk towards that of all atoms (which is shrunk
    towards its mean variance); an element with fewer than two atoms takes all atoms' statistics."""
    n_elements, n_features = head.feature_mean.shape
    count = torch.zeros(n_elements + 1, dtype=torch.float64)  # the last row: all atoms
    total = torch.zeros(n_elements + 1, n_features, dtype=torch.float64)
    outer = torch.zeros(n_elements + 1, n_features, n_features, dtype=torch.float64)
    for invariants, element, _, _ in cached:
        x, e = invariants.double().cpu(), element.cpu()
        for k, mine in [*((k, x[e == k]) for k in torch.unique(e).tolist()), (n_elements, x)]:
            count[k] += len(mine)
            total[k] += mine.sum(0)
            outer[k] += mine.T @ mine
    all_mean, all_covariance = _moments(float(count[-1]), total[-1], outer[-1])
    spread = all_covariance.diagonal().mean().clamp_min(1e-12) * torch.eye(n_features, dtype=torch.float64)
    all_covariance = _shrunk(all_covariance, spread, float(count[-1]))
    all_whitening = torch.linalg.cholesky(torch.linalg.inv(all_covariance))
    own = [bool(count[e] >= 2) for e in range(n_elements)]
    for e in range(n_elements):
        mean, whitening = all_mean, all_whitening
        if own[e]:
            mean, covariance = _moments(float(count[e]), total[e], outer[e])
            whitening = torch.linalg.cholesky(torch.linalg.inv(_shrunk(covariance, all_covariance, count[e])))
        head.feature_mean[e], head.whitening[e] = mean.to(head.feature_mean), whitening.to(head.whitening)
    distances: list[list[np.ndarray]] = [[] for _ in range(n_elements + 1)]  # the last: all atoms'
    for invariants, element, _, _ in cached:
        d = head.atom_distances(invariants.to(head.whitening), element.to(head.whitening.device)).cpu()
        e = element.cpu()
        for k in torch.unique(e).tolist():
            distances[k].append(d[e == k].numpy())
        pooled = (invariants.double().cpu() - all_mean) @ all_whitening  # on all atoms' statistics
        distances[-1].append((pooled.norm(dim=1) / n_features**0.5).numpy())
    everyone = float(np.quantile(np.concatenate(distances[-1]), NOVELTY_QUANTILE))
    for e in range(n_elements):  # an element's percentile, shrunk like its covariance: a few atoms say little
        mine = float(np.quantile(np.concatenate(distances[e]), NOVELTY_QUANTILE)) if own[e] else everyone
        shrink = _shrinkage(float(count[e]), n_features)
        scale = (1 - shrink) * mine + shrink * everyone
        head.novelty_scale[e] = scale if scale > 0 else 1.0


@torch.no_grad()
def _split_scores(
    model: SE3Transformer, labelled: LabelledData, indices: np.ndarray, batch_size: int, device: torch.device
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(loss_scale * b [n, T] in display units, novelty [n], errors [n, T])`` on molecules ``indices``."""
    head = model.uncertainty
    fitted, novelty, errors = [], [], []
    for invariants, element, batch, error in _features_and_errors(
        model, labelled, indices, batch_size, device
    ):
        fitted.append((head.error_scale(invariants, batch) * head.loss_scale).double().cpu().numpy())
        novelty.append(head.novelty(invariants, element, batch).double().cpu().numpy())
        errors.append(error.cpu().numpy())
    return np.concatenate(fitted), np.concatenate(novelty), np.concatenate(errors)


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
    the calibration factor, the novelty term, the low-confidence threshold and the calibration metrics on
    the test split (on the validation split where a data set has no test molecules)."""
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
    cached = list(_features_and_errors(model, labelled, train, batch_size, device))  # read every epoch
    _train(head, cached, epochs, lr, seed, on_epoch)
    _fit_novelty(head, cached)
    del cached

    if len(splits["val"]) < FEW_CALIBRATION_MOLECULES:
        NOTICES.warning(
            f"calibrating the uncertainty on only {len(splits['val'])} validation molecules: its scale and "
            "the low-confidence thresholds are rough"
        )
    fitted_val, novelty_val, errors_val = _split_scores(model, labelled, splits["val"], batch_size, device)
    factors = np.array([fit_calibration(errors_val[:, i], fitted_val[:, i]) for i in range(len(targets))])
    per_unit = np.median(fitted_val * factors, axis=0)  # the novelty term's sigma per unit past 1

    def sigma(fitted: np.ndarray, novelty: np.ndarray) -> np.ndarray:
        return fitted * factors + np.clip(novelty - 1.0, 0.0, None)[:, None] * per_unit

    thresholds = np.quantile(sigma(fitted_val, novelty_val), LOW_CONFIDENCE_QUANTILE, axis=0)
    head.calibration.copy_(torch.from_numpy(factors))
    head.novelty_sigma.copy_(torch.from_numpy(per_unit))
    head.threshold.copy_(torch.from_numpy(thresholds))

    scored = "test" if len(splits["test"]) else "val"
    fitted, novelty, errors = fitted_val, novelty_val, errors_val
    if scored == "test":
        fitted, novelty, errors = _split_scores(model, labelled, splits["test"], batch_size, device)
    metrics = per_target_metrics(targets, errors, sigma(fitted, novelty))
    for i, t in enumerate(targets):
        metrics[t] |= {
            "calibration": float(factors[i]),
            "novelty_sigma": float(per_unit[i]),
            "low_confidence_sigma": float(thresholds[i]),
        }
    return {
        "method": METHOD,
        "fitted_on": {"train_molecules": int(len(train)), "epochs": epochs, "width": width, "seed": seed},
        "parameters": sum(p.numel() for p in head.parameters()),  # beside the model's own
        "calibrated_on": {"split": "val", "molecules": int(len(splits["val"]))},
        "low_confidence": f"sigma above the {LOW_CONFIDENCE_QUANTILE:.0%} quantile of validation sigmas",
        "scored_on": {
            "split": scored,
            "molecules": int(len(errors)),
            "novel_fraction": float((novelty > 1.0).mean()),  # molecules the novelty term widens
        },
        "targets": metrics,
        "fit_seconds": round(time.perf_counter() - started, 1),
    }
