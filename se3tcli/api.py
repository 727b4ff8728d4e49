"""se3t from Python: load a model, predict RDKit molecules, ASE Atoms, SMILES strings and files.

    import se3tcli as se3t

    model = se3t.load_model("qm9-default")
    rows = model.predict(["CCO", "c1ccccc1O phenol", "molecules.sdf", rdkit_mol, ase_atoms])
    rows[0].values["homo"], rows[0].units["homo"], rows[0].status, rows[0].message
    frame = model.predict_frame(["CCO"])  # a pandas DataFrame (pandas must be installed)

The rows are the command line's: one per record, in input order, with the same statuses (``ok``,
``warning``, ``error``), messages and units, and ``None`` for values that cannot be given.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import ase
import numpy as np
import torch
from rdkit import Chem

from se3tcli.checkpoint import LoadedModel
from se3tcli.checkpoint import load_model as load_checkpoint
from se3tcli.io import STATUS_ERROR, Molecule
from se3tcli.io.objects import molecules_from_objects
from se3tcli.predict import predict_stream
from se3tcli.targets import parse_targets
from se3tcli.train.device import select_device


@dataclass(frozen=True)
class PredictionRow:
    """One input record and what the model says about it (values in ``units``)."""

    name: str
    source: str  # the file, or <smiles>, <rdkit>, <ase> for objects handed over in Python
    index: int  # 0-based position of the record in its file, or of the object in the list
    formula: str
    status: str  # ok, warning or error
    message: str  # why a row is a warning or an error, naming file and record
    values: dict[str, float | None] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Whether the row has predictions (status ok or warning)."""
        return self.status != STATUS_ERROR

    def to_dict(self) -> dict[str, Any]:
        """Flat: the record's fields, then one ``<target>`` entry per value (units in ``units``)."""
        base = {k: getattr(self, k) for k in ("name", "source", "index", "formula", "status", "message")}
        return base | self.values


class Predictor:
    """A loaded model ready to predict; see :func:`load_model`."""

    def __init__(self, loaded: LoadedModel, device: torch.device):
        self.loaded = loaded
        self.device = device

    @property
    def targets(self) -> tuple[str, ...]:
        return self.loaded.targets

    @property
    def units(self) -> dict[str, str]:
        return self.loaded.units

    @property
    def card(self) -> dict[str, Any]:
        """The model card (bundled models), else {}."""
        return self.loaded.card

    def predict(
        self,
        inputs: object | Iterable[object],
        targets: Sequence[str] | str | None = None,
        batch_size: int = 64,
        embed: bool = True,
    ) -> list[PredictionRow]:
        """Predict every molecule in ``inputs``: RDKit ``Mol``s, ASE ``Atoms``, SMILES strings ("SMILES
        [name]"), file paths (one row per record), or one of these alone. ``targets``: a subset of the
        model's (names or a comma-separated string; default all). ``embed=False`` turns 2D records and
        records without hydrogens into errors instead of generating conformers."""
        if _single(inputs):
            inputs = [inputs]
        chosen = parse_targets(_target_spec(targets), self.targets)
        molecules = molecules_from_objects(inputs, embed=embed)
        rows = predict_stream(self.loaded, molecules, self.device, chosen, batch_size)
        units = {t: self.units[t] for t in chosen}
        return [_row(molecule, values, units) for molecule, values in rows]

    def predict_frame(self, inputs: object | Iterable[object], **options: Any):
        """:meth:`predict` as a pandas ``DataFrame``: one row per record, value columns named like the CSV
        output's (``homo [eV]``)."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("predict_frame needs pandas: pip install pandas") from None
        rows = self.predict(inputs, **options)
        targets = parse_targets(_target_spec(options.get("targets")), self.targets)
        values = [f"{t} [{self.units[t]}]" for t in targets]
        columns = ["name", "source", "index", "formula", "status", "message", *values]
        frame = pd.DataFrame.from_records([_flat_with_units(row) for row in rows], columns=columns)
        return frame.astype({column: float for column in values})  # NaN where a row has no value


def _single(inputs: object) -> bool:
    """Whether ``inputs`` is one molecule (or file), not a collection of them: ASE Atoms and arrays are
    iterable, but are one molecule each."""
    one = (str, bytes, os.PathLike, Chem.Mol, ase.Atoms, np.ndarray)
    return isinstance(inputs, one) or not isinstance(inputs, Iterable)


def _target_spec(targets: Sequence[str] | str | None) -> str | None:
    return targets if targets is None or isinstance(targets, str) else ",".join(targets)


def _row(molecule: Molecule, values: dict[str, float] | None, units: dict[str, str]) -> PredictionRow:
    return PredictionRow(
        molecule.name,
        molecule.source,
        molecule.index,
        molecule.formula,
        molecule.status,
        molecule.message,
        {t: None if values is None else values[t] for t in units},
        units,
    )


def _flat_with_units(row: PredictionRow) -> dict[str, Any]:
    base = {k: v for k, v in row.to_dict().items() if k not in row.values}
    return base | {f"{t} [{row.units[t]}]": v for t, v in row.values.items()}


def load_model(name_or_path: str | None = None, device: str = "auto") -> Predictor:
    """A bundled model by name (``qm9-default`` by default; hash-checked against its card) or a checkpoint
    file written by ``se3t train``, on ``device`` (``auto``: a GPU where there is one)."""
    torch_device = select_device(device)
    return Predictor(load_checkpoint(name_or_path, torch_device), torch_device)
