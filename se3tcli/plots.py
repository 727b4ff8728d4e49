"""Parity plots for ``se3t evaluate --plots`` (matplotlib is an optional dependency).

One PNG per target: the predictions against the reference values, annotated with N, MAE, RMSE and R², and
beside them the residuals (prediction - reference, in the target's error unit) against the reference. The
residuals show the error where the parity plot cannot: U0, U, H and G span ~10,000 eV, their errors meV.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from se3tcli.files import atomic_write
from se3tcli.targets import TARGETS

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def annotation(metrics: dict) -> str:
    """N, MAE, RMSE (in the error unit, as ``se3t evaluate`` prints them) and R² of one target's
    :func:`~se3tcli.train.evaluation.error_metrics`, one per line."""
    unit = metrics["error_unit"]
    return "\n".join(
        [
            f"N     {metrics['n']:,}",
            f"MAE   {metrics['mae_error_unit']:.4g} {unit}",
            f"RMSE  {metrics['rmse_error_unit']:.4g} {unit}",
            f"R²    {_r2_text(metrics['r2'])}",
        ]
    )


def _r2_text(r2: float | None) -> str:
    """R² to four decimals, or as ``1 - 2.3e-08`` where that would round to 1 (the large energies)."""
    if r2 is None:
        return "n/a"
    return f"1 - {1 - r2:.1e}" if 0 < 1 - r2 < 5e-5 else f"{r2:.4f}"


def parity_figure(reference: np.ndarray, predicted: np.ndarray, target: str, metrics: dict) -> Figure:
    """The parity panel (with :func:`annotation`) and the residual panel of one target."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no backend to choose

    info = TARGETS[target]
    figure = Figure(figsize=(9, 4.5), layout="constrained")
    parity, residual = figure.subplots(1, 2)
    parity.scatter(reference, predicted, s=3, alpha=0.4)
    low = float(min(reference.min(), predicted.min()))
    high = float(max(reference.max(), predicted.max()))
    parity.plot([low, high], [low, high], color="black", linewidth=0.8)
    parity.set_xlabel(f"reference {target} [{info.unit}]")
    parity.set_ylabel(f"predicted {target} [{info.unit}]")
    parity.set_title(f"{target}: {info.description}")
    box = dict(boxstyle="round", facecolor="white", alpha=0.8)
    parity.text(
        0.04, 0.96, annotation(metrics), transform=parity.transAxes, va="top", family="monospace", bbox=box
    )
    residual.scatter(reference, (predicted - reference) * info.error_factor, s=3, alpha=0.4)
    residual.axhline(0.0, color="black", linewidth=0.8)
    residual.set_xlabel(f"reference {target} [{info.unit}]")
    residual.set_ylabel(f"predicted - reference [{info.error_unit}]")
    residual.set_title("residuals")
    return figure


def parity_plots(
    pred: dict[str, np.ndarray],
    truth: np.ndarray,
    targets: Sequence[str],
    metrics: dict[str, dict],
    folder: Path,
) -> list[Path]:
    """Write ``parity_<target>.png`` (:func:`parity_figure`) per target into ``folder``, atomically;
    ``truth [n, T]`` in ``targets`` order, ``metrics`` of :func:`~se3tcli.train.evaluation.error_metrics`.
    Returns the files written."""
    if importlib.util.find_spec("matplotlib") is None:
        raise RuntimeError('parity plots need matplotlib: pip install "se3tcli[plots]"')
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for column, target in enumerate(targets):
        figure = parity_figure(truth[:, column], pred[target], target, metrics[target])
        path = folder / f"parity_{target}.png"
        with atomic_write(path, "wb") as handle:
            figure.savefig(handle, format="png", dpi=120)
        written.append(path)
    return written
