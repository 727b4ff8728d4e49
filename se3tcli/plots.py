"""Parity plots for ``se3t evaluate --plots`` (matplotlib is an optional dependency)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from se3tcli.targets import TARGETS


def parity_plots(
    pred: dict[str, np.ndarray], truth: np.ndarray, targets: Sequence[str], folder: Path
) -> list[Path]:
    """One PNG per target: predicted against reference, with the MAE in the title."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
    except ImportError:
        raise RuntimeError('parity plots need matplotlib: pip install "se3tcli[plots]"') from None
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for column, target in enumerate(targets):
        x, y = truth[:, column], pred[target]
        unit = TARGETS[target].unit
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        ax.scatter(x, y, s=3, alpha=0.4)
        low, high = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
        ax.plot([low, high], [low, high], color="black", linewidth=0.8)
        ax.set_xlabel(f"reference {target} [{unit}]")
        ax.set_ylabel(f"predicted {target} [{unit}]")
        ax.set_title(f"{target}: MAE {np.abs(y - x).mean():.4g} {unit}")
        fig.tight_layout()
        path = folder / f"parity_{target}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written
