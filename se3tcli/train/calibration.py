"""How well predicted standard deviations match the errors, and the factor that calibrates them.

For errors ``e`` and standard deviations ``sigma`` of one target (numpy arrays ``[n]``), with ``z = |e| /
sigma``: the coverage of ``±k sigma`` is the fraction with ``z <= k`` (68.3 % and 95.4 % for k = 1, 2 if the
errors were normal with that sigma); the miscalibration area is the mean, over probabilities ``p`` in
(0, 1), of the gap between ``p`` and the coverage of the central ``p``-interval of that normal (0 for
perfect calibration, 0.5 at worst); the Spearman correlation between ``|e|`` and ``sigma`` says whether
larger sigmas go with larger errors (ranking, independent of calibration).
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

from se3tcli.targets import TARGETS

_PROBABILITIES = np.linspace(0.01, 0.99, 99)
# z of the central p-interval of a standard normal, for every p above
_Z = np.array([NormalDist().inv_cdf(0.5 + p / 2) for p in _PROBABILITIES])
_FACTORS = np.exp(np.linspace(math.log(1e-3), math.log(1e3), 1201))  # candidate calibration factors


def _z(errors: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """``|errors| / sigma``; 0 where both are 0, infinite where only sigma is. ValueError for no errors."""
    if not len(errors):
        raise ValueError("no errors to compare the sigmas with")
    size = np.abs(errors)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(sigma > 0, size / sigma, np.where(size > 0, np.inf, 0.0))


def miscalibration_area(errors: np.ndarray, sigma: np.ndarray) -> float:
    z = np.sort(_z(errors, sigma))
    coverage = np.searchsorted(z, _Z, side="right") / len(z)  # fraction with z <= _Z[i]
    return float(np.abs(coverage - _PROBABILITIES).mean())


def fit_calibration(errors: np.ndarray, sigma: np.ndarray) -> float:
    """The factor ``c`` for which ``c * sigma`` has the smallest miscalibration area on these errors
    (a search over 1e-3 .. 1e3, 1.2 % steps)."""
    areas = [miscalibration_area(errors, c * sigma) for c in _FACTORS]
    return float(_FACTORS[int(np.argmin(areas))])


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1, ties given their average rank."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman's rank correlation (None where either is constant, not finite, or there are fewer than
    two values)."""
    if len(a) < 2 or not (np.isfinite(a).all() and np.isfinite(b).all()):
        return None
    ra, rb = _ranks(np.asarray(a, float)), _ranks(np.asarray(b, float))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    norm = math.sqrt(float((ra**2).sum() * (rb**2).sum()))
    return float((ra * rb).sum() / norm) if norm > 0 else None


def calibration_metrics(errors: np.ndarray, sigma: np.ndarray) -> dict[str, float | int | None]:
    """Spearman(|e|, sigma), coverage of ±1 and ±2 sigma, miscalibration area, mean sigma and MAE."""
    z = _z(errors, sigma)
    return {
        "n": int(len(errors)),
        "spearman": spearman(np.abs(errors), sigma),
        "within_1_sigma": float((z <= 1).mean()),
        "within_2_sigma": float((z <= 2).mean()),
        "miscalibration_area": miscalibration_area(errors, sigma),
        "mean_sigma": float(sigma.mean()),
        "mae": float(np.abs(errors).mean()),
    }


def per_target_metrics(targets, errors: np.ndarray, sigma: np.ndarray) -> dict[str, dict]:
    """:func:`calibration_metrics` of each target (columns of ``errors`` and ``sigma``, ``[n, T]`` in display
    units), with the mean sigma and the MAE also in the target's error unit (meV for orbital energies)."""
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
