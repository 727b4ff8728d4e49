"""Parity plots (``se3t evaluate --plots``): annotated with N, MAE, RMSE and R², with a residual panel in
which the meV errors of U0 (values of thousands of eV) show, written atomically, one PNG per target."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from se3tcli.plots import annotation, parity_figure, parity_plots
from se3tcli.train.evaluation import error_metrics

pytest.importorskip("matplotlib")


def u0_and_homo(n: int = 200) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, dict]]:
    """QM9-like references (U0 from -11,000 to -1,000 eV, homo around -7 eV) and predictions ~20 meV off."""
    rng = np.random.default_rng(0)
    truth = np.stack([rng.uniform(-11_000, -1_000, n), rng.normal(-7.0, 0.6, n)], axis=1)
    pred = {"U0": truth[:, 0] + rng.normal(0, 0.02, n), "homo": truth[:, 1] + rng.normal(0, 0.1, n)}
    return pred, truth, error_metrics(pred, truth, ("U0", "homo"))


def test_the_annotation_gives_n_mae_rmse_and_r2_in_the_error_unit() -> None:
    _, _, metrics = u0_and_homo()
    m = metrics["homo"]
    lines = annotation(m).splitlines()
    assert [line.split()[0] for line in lines] == ["N", "MAE", "RMSE", "R²"]
    assert lines[0].split()[1] == "200"
    assert lines[1].split()[1:] == [f"{m['mae'] * 1000:.4g}", "meV"]
    assert lines[2].split()[1:] == [f"{m['rmse'] * 1000:.4g}", "meV"]
    assert float(lines[3].split()[1]) == pytest.approx(m["r2"], abs=1e-4)
    # U0's R² rounds to 1 at four decimals: what it lacks to 1 is shown instead
    r2 = metrics["U0"]["r2"]
    assert annotation(metrics["U0"]).splitlines()[3].split()[1:] == ["1", "-", f"{1 - r2:.1e}"]
    assert annotation({**m, "r2": None}).endswith("R²    n/a")


def test_the_u0_figure_shows_its_errors_as_residuals_in_mev() -> None:
    pred, truth, metrics = u0_and_homo()
    figure = parity_figure(truth[:, 0], pred["U0"], "U0", metrics["U0"])
    parity, residual = figure.axes
    assert [text.get_text() for text in parity.texts] == [annotation(metrics["U0"])]
    assert residual.get_ylabel() == "predicted - reference [meV]"
    (points,) = residual.collections
    expected = np.stack([truth[:, 0], (pred["U0"] - truth[:, 0]) * 1000], axis=1)
    np.testing.assert_allclose(points.get_offsets(), expected)
    low, high = residual.get_ylim()
    assert high - low < 1000  # a scale of meV, not the thousands of eV of the parity panel


def test_one_png_per_target_is_written_and_nothing_else(tmp_path: Path) -> None:
    pred, truth, metrics = u0_and_homo()
    folder = tmp_path / "new" / "plots"
    written = parity_plots(pred, truth, ("U0", "homo"), metrics, folder)
    assert written == [folder / "parity_U0.png", folder / "parity_homo.png"]
    assert sorted(folder.iterdir()) == sorted(written)  # no temporary file left behind
    assert all(path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") for path in written)
