"""The run directory: one place for the names and formats of the files a training run writes."""

from __future__ import annotations

import csv
import fcntl
import json
from pathlib import Path
from typing import IO, Any

import numpy as np

from se3tcli.checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from se3tcli.data.splits import save_split
from se3tcli.targets import TARGETS, column_name


class RunDirectory:
    """``config.json``, ``splits.npz``, ``metrics.csv``, ``best.pt``, ``last.pt``, ``test_metrics.json``,
    ``test_predictions.csv``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock: IO | None = None

    def lock(self) -> None:
        """Hold ``.lock`` in the folder for this process, or raise ``FileExistsError`` when another
        training holds it: two runs writing one folder would interleave their metrics and checkpoints."""
        self.path.mkdir(parents=True, exist_ok=True)
        handle = open(self.path / ".lock", "a")  # noqa: SIM115 - held until unlock()
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise FileExistsError(f"{self.path} is in use by another se3t train (it holds .lock)") from None
        self._lock = handle

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the file releases the lock
            self._lock = None

    @property
    def last(self) -> Path:
        """The latest state, with everything a resume needs."""
        return self.path / "last.pt"

    @property
    def best(self) -> Path:
        """The checkpoint of the best validation score so far."""
        return self.path / "best.pt"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.csv"

    @property
    def test_predictions(self) -> Path:
        """Each test molecule's true and predicted values, written with the test metrics."""
        return self.path / "test_predictions.csv"

    def metric_columns(self, targets: tuple[str, ...]) -> dict[str, str]:
        """The column of each target's validation MAE in ``metrics.csv``: ``val_<target>_mae_<unit>``
        (``val_homo_mae_eV``), or ``val_mae_<target>`` where an older se3t began the file, which a resumed
        run goes on appending to under its own header."""
        header: list[str] = []
        if self.metrics.exists():
            with open(self.metrics, newline="") as handle:
                header = next(csv.reader(handle), [])
        if targets and all(f"val_mae_{t}" in header for t in targets):
            return {t: f"val_mae_{t}" for t in targets}
        return {t: column_name(f"val_{t}_mae", TARGETS[t].unit) for t in targets}

    def read_last(self) -> dict[str, Any]:
        if not self.last.is_file():
            raise FileNotFoundError(f"{self.last}: nothing to resume (no last.pt in {self.path})")
        saved = read_checkpoint(self.last)
        if not isinstance(saved.get("resume"), dict):  # e.g. best.pt or an exported model copied over it
            raise CheckpointError(
                f"{self.last}: holds a model but no training state to resume from (a best.pt or an "
                "exported model?); start a new run with --init-from it instead"
            )
        return saved

    def refuse_existing_run(self) -> None:
        if self.last.exists():
            raise FileExistsError(f"{self.path} already holds a run; use --resume or another --out")

    def start(self, split: dict[str, np.ndarray], seed: int, config: dict[str, Any]) -> None:
        """Create the folder (locked, see :meth:`lock`) with the split and the run's configuration."""
        self.lock()
        save_split(self.path / "splits.npz", split, seed)
        (self.path / "config.json").write_text(json.dumps(config, indent=2))

    def save_last(self, checkpoint: dict[str, Any]) -> None:
        save_checkpoint(checkpoint, self.last)

    def save_best(self, checkpoint: dict[str, Any]) -> None:
        save_checkpoint(checkpoint, self.best)

    def append_metrics(self, row: dict[str, Any]) -> None:
        """One row per epoch; the header is written with the first row."""
        new = not self.metrics.exists()
        with open(self.metrics, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)

    def write_test_metrics(self, metrics: dict[str, Any]) -> None:
        (self.path / "test_metrics.json").write_text(json.dumps(metrics, indent=2))
