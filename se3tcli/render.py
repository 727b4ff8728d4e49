"""Rich tables and progress displays (no science here)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from se3tcli.errors import STATUS_ERROR, STATUS_WARNING
from se3tcli.targets import NVIDIA_MAE, PAPER_MAE, TARGETS, sigma_key
from se3tcli.train import TrainingReporter

if TYPE_CHECKING:
    from se3tcli.io import Molecule

_STATUS_STYLE = {"ok": "green", STATUS_WARNING: "yellow", STATUS_ERROR: "red"}


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None or not math.isfinite(value):
        return ""
    return f"{value:.{digits}f}" if abs(value) < 1e5 else f"{value:.6g}"


def _reference(mae: float | None) -> str:
    """A published MAE as a table shows it; empty where the publication has none."""
    return "" if mae is None else f"{mae:g}"


DEFAULT_DECIMALS = 4  # for targets whose typical error is unknown
MAX_DECIMALS = 6  # for values with a sigma: even a tiny one
NAME_WIDTH = 18  # widest name column before names fold onto more lines


def decimals_for(typical_error: float | None) -> int:
    """Decimals that keep one digit below the leading digit of the typical error (0.133 eV -> 2,
    22.8 bohr² -> 0, 0.0055 eV -> 4): more would print noise the model cannot resolve."""
    if not typical_error or not math.isfinite(typical_error):
        return DEFAULT_DECIMALS
    return max(0, math.floor(-math.log10(typical_error)) + 2)


# The order of the default table: the orbital energies and μ first, the large energies last.
TABLE_ORDER = ("homo", "lumo", "gap", "mu", "alpha", "Cv", "zpve", "r2", "U0", "U", "H", "G")


def table_order(targets: Sequence[str]) -> list[str]:
    """``targets`` in :data:`TABLE_ORDER` (others after, as given)."""
    rank = {t: i for i, t in enumerate(TABLE_ORDER)}
    return sorted(targets, key=lambda t: rank.get(t, len(rank)))


def _header(target: str) -> str:
    return f"{target} [{TARGETS[target].unit}]"


def _cell(values: dict | None, target: str, decimals: int) -> str:
    """A target's value in the table: with ``decimals``, or with its sigma where the model gives one,
    both rounded to the sigma's second significant digit (``-6.85±0.11``, ``300±1200``)."""
    if not values:
        return ""
    value, sigma = values.get(target), values.get(sigma_key(target))
    if sigma is not None and math.isfinite(sigma):
        sigma = float(f"{sigma:.2g}")  # 0.0996 -> 0.1: its own leading digit may move up
    if value is None or sigma is None or not (math.isfinite(value) and math.isfinite(sigma) and sigma > 0):
        return _unsigned_zero(_fmt(value, decimals))
    step = math.floor(math.log10(sigma)) - 1  # the second significant digit's decimal exponent
    if step < -MAX_DECIMALS:  # a tiny sigma: the value at the most decimals, the sigma as it is
        return f"{_unsigned_zero(f'{value:.{MAX_DECIMALS}f}')}±{sigma:.2g}"
    places = max(0, -step)
    value = round(value, -step) if step > 0 else value
    return f"{_unsigned_zero(f'{value:.{places}f}')}±{sigma:.{places}f}"


def _unsigned_zero(text: str) -> str:
    """``-0.00`` -> ``0.00``: a rounded value without a meaningless sign."""
    return text[1:] if text.startswith("-") and not text.strip("-0.") else text


def predictions_table(
    rows: Sequence[tuple[Molecule, dict | None]],
    targets: Sequence[str],
    typical_errors: dict[str, float] | None = None,
    width: int | None = None,
) -> tuple[Table, list[str]]:
    """The predictions as a table no wider than ``width`` characters (no limit if None), each value
    rounded to the model's precision (:func:`decimals_for` its typical error), with ``±sigma`` where the
    model gives one. Returns the table and the
    targets left out because they did not fit, which keep their order."""
    decimals = {t: decimals_for((typical_errors or {}).get(t)) for t in targets}
    cells = {t: [_cell(v, t, decimals[t]) for _, v in rows] for t in targets}
    name_width = min(NAME_WIDTH, max([4, *(len(plain(m.name)) for m, _ in rows)]))
    formula_width = max([7, *(len(m.formula) for m, _ in rows)])
    used = 1 + (name_width + 3) + (formula_width + 3) + (7 + 3)  # borders and padding: 3 per column
    shown, hidden = [], []
    for t in targets:
        column = max([len(_header(t)), *map(len, cells[t])]) + 3
        if width is not None and used + column > width:
            hidden.append(t)
            continue
        shown.append(t)
        used += column
    table = Table(title="se3t predictions", show_lines=False)
    table.add_column("name", overflow="fold", max_width=NAME_WIDTH)
    table.add_column("formula", no_wrap=True)
    table.add_column("status", no_wrap=True)
    for t in shown:  # Text, not markup: "[eV]" would be read as a style
        table.add_column(Text(_header(t)), justify="right", no_wrap=True)
    for i, (molecule, _) in enumerate(rows):
        style = _STATUS_STYLE.get(molecule.status, "")
        status = Text(molecule.status, style)
        table.add_row(Text(plain(molecule.name)), molecule.formula, status, *(cells[t][i] for t in shown))
    return table, hidden


def status_messages(rows: Sequence[tuple[Molecule, dict | None]]) -> list[Text]:
    """One line per warning/error row (the messages name file, record and reason)."""
    return [
        Text.assemble((m.status, _STATUS_STYLE[m.status]), ": ", plain(m.message))
        for m, _ in rows
        if m.status != "ok" and m.message
    ]


def plain(text: str) -> str:
    """``text`` without control characters (escape sequences, bells, NUL), which would act on the
    terminal instead of being shown; tabs and newlines become spaces."""
    return "".join(" " if c in "\t\n\r" else c for c in text if c in "\t\n\r" or c.isprintable())


def metrics_table(metrics: dict[str, dict], title: str) -> Table:
    """MAE/RMSE per target in error units and R², beside the SE(3)-Transformer paper's and NVIDIA's MAE
    (where they report one)."""
    table = Table(title=Text(title))
    columns = (("target", "left"), ("MAE", "right"), ("RMSE", "right"), ("R²", "right"), ("unit", "left"))
    for name, justify in columns:
        table.add_column(name, justify=justify)
    table.add_column("paper MAE", justify="right", style="dim")
    table.add_column("NVIDIA MAE", justify="right", style="dim")
    for t, m in metrics.items():
        table.add_row(
            t,
            _fmt(m["mae_error_unit"]),
            _fmt(m["rmse_error_unit"]),
            _fmt(m.get("r2")),
            m["error_unit"],
            _reference(PAPER_MAE.get(t)),
            _reference(NVIDIA_MAE.get(t)),
        )
    return table


def calibration_table(report: dict[str, Any]) -> Table:
    """The uncertainty head's calibration per target (an export's report, see se3tcli.train.uncertainty):
    Spearman(|error|, sigma), coverage of ±1 and ±2 sigma (ideal 68 % and 95 %), miscalibration area,
    mean sigma and MAE, and (in an export's report) the sigma above which predict warns of low confidence;
    in error units."""
    scored = report["scored_on"]
    table = Table(title=Text(f"uncertainty: {scored['split']} split, {scored['molecules']} molecules"))
    thresholds = all("low_confidence_sigma" in m for m in report["targets"].values())  # an export's report
    columns = ("target", "Spearman", "within 1σ", "within 2σ", "miscal. area", "mean σ", "MAE")
    for name in (*columns, *(["warn σ >"] if thresholds else []), "unit"):
        table.add_column(name, justify="left" if name in ("target", "unit") else "right")
    for t, m in report["targets"].items():
        cells = [
            _fmt(m["spearman"], 2),
            f"{m['within_1_sigma']:.0%}",
            f"{m['within_2_sigma']:.0%}",
            f"{m['miscalibration_area']:.3f}",
            f"{m['mean_sigma_error_unit']:.3g}",
            f"{m['mae_error_unit']:.3g}",
        ]
        if thresholds:
            factor = TARGETS[t].error_factor if t in TARGETS else 1.0
            cells.append(f"{m['low_confidence_sigma'] * factor:.3g}")
        table.add_row(t, *cells, m["error_unit"])
    return table


def equivariance_table(results: Sequence[Any], dtype: str, device: str) -> Table:
    table = Table(title=f"equivariance checks ({dtype}, {device})")
    for name in ("molecule", "transform", "max abs error", "max rel error", "tolerance", "result"):
        table.add_column(name, justify="right" if "error" in name or name == "tolerance" else "left")
    for r in results:
        verdict = "[green]pass[/]" if r.passed else "[red]FAIL[/]"
        table.add_row(
            Text(plain(r.molecule)),
            r.transform,
            f"{r.max_abs_error:.2e}",
            f"{r.max_rel_error:.2e}",
            f"{r.tolerance:.0e}",
            verdict,
        )
    return table


def _flat(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_flat(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_flat(v) for v in value)
    return str(value)


def card_tables(card: dict[str, Any]) -> list[Table]:
    """A model card as a summary table plus, when it has them, the test errors beside the paper's and the
    uncertainty's calibration."""
    summary = Table(title=Text(f"model {card.get('name', '')}"), show_header=False)
    summary.add_column("field", style="bold")
    summary.add_column("value", overflow="fold")
    training = card.get("training", {})
    rows = {
        "description": card.get("description"),
        "targets": card.get("targets"),
        "elements": card.get("elements"),
        "parameters": card.get("parameters"),
        "data": training.get("data"),
        "trained with": training.get("command"),
        "epochs": training.get("epochs_done"),
        "wall time (s)": training.get("wall_time_s"),
        "device": training.get("device"),
        "domain": card.get("domain"),
        "checkpoint": card.get("checkpoint"),
        "evaluation": card.get("evaluation"),
        "uncertainty": (card.get("uncertainty") or {}).get("method"),
        "versions": card.get("versions"),
        "limitations": card.get("limitations"),
    }
    for key, value in rows.items():
        if value not in (None, "", {}, []):
            summary.add_row(key, Text(plain(_flat(value))))
    tables = [summary]
    errors = card.get("test_errors")
    if errors:
        table = Table(title="test-set errors")
        for name in ("target", "MAE", "RMSE", "unit", "paper MAE", "NVIDIA MAE"):
            table.add_column(name, justify="left" if name in ("target", "unit") else "right")
        for target, e in errors.items():
            references = (_reference(e.get("paper_mae")), _reference(e.get("nvidia_mae")))
            table.add_row(target, _fmt(e["mae"]), _fmt(e["rmse"]), e["unit"], *references)
        tables.append(table)
    if (card.get("uncertainty") or {}).get("targets"):
        tables.append(calibration_table(card["uncertainty"]))
    return tables


class RateColumn(ProgressColumn):
    """Items per second, once Rich has measured it."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        return Text(
            "" if task.speed is None else f"{task.speed:,.0f} {self.unit}/s", style="progress.data.speed"
        )


def progress_bar(console: Console, unit: str = "it") -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(unit),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


class RichTrainingReporter(TrainingReporter):
    """Progress bar with ETA and live loss; one line per epoch."""

    def __init__(self, console: Console):
        self.console = console
        self.progress = progress_bar(console, "steps")
        self.task = None

    def start(self, total_steps: int, done_steps: int, info: dict[str, Any]) -> None:
        self.console.print(f"training on {info['device']} -> {info['out']}", markup=False)
        self.progress.start()
        self.task = self.progress.add_task("train", total=total_steps, completed=done_steps)

    def step(self, done_steps: int, loss: float, lr: float) -> None:
        self.progress.update(self.task, completed=done_steps, description=f"loss {loss:.4f} lr {lr:.2e}")

    def epoch(self, row: dict[str, Any]) -> None:
        self.progress.console.print(
            f"epoch {row['epoch']}: train loss {row['train_loss']:.4f}, val score {row['val_score']:.4f} "
            f"({row['time_s']:.0f} s)"
        )

    def message(self, text: str) -> None:
        self.progress.console.print(text, markup=False)

    def stop(self) -> None:
        self.progress.stop()
