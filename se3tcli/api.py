"""se3t from Python: load a model, predict RDKit molecules, ASE Atoms, SMILES strings and files.

    import se3tcli as se3t

    model = se3t.load_model("qm9-default")
    rows = model.predict(["CCO", "c1ccccc1O phenol", "molecules.sdf", rdkit_mol, ase_atoms])
    rows[0].values["homo"], rows[0].units["homo"], rows[0].status, rows[0].message
    frame = model.predict_frame(["CCO"])  # a pandas DataFrame (pandas must be installed)

The rows are the command line's: one per record, in input order, with the same statuses (``ok``,
``warning``, ``error``), messages, units and values (float32 precision, ``None`` where a value cannot be
given), a standard deviation beside each target (``homo_sigma``, in the target's unit) for models with an
uncertainty head, and the dipole vector's components ``mu_x``, ``mu_y``, ``mu_z`` for models with a
dipole head.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import ase
import numpy as np
import torch
from rdkit import Chem

from se3tcli.checkpoint import LoadedModel
from se3tcli.checkpoint import load_model as load_checkpoint
from se3tcli.io import STATUS_ERROR, Molecule
from se3tcli.io.conformers import DEFAULT_TIMEOUT_S, MAX_TIMEOUT_S
from se3tcli.io.csv_layout import BASE_COLUMNS
from se3tcli.io.objects import molecules_from_objects
from se3tcli.io.outputs import base_fields, file_value
from se3tcli.predict import MAX_ATOMS_PER_MOLECULE, output_units, predict_stream
from se3tcli.targets import column_name, parse_targets
from se3tcli.train.device import select_device


@dataclass(frozen=True)
class PredictionRow:
    """One input record and what the model says about it (values in ``units``)."""

    name: str
    source: str  # the file, or <smiles>, <rdkit>, <ase> for objects handed over in Python
    record: int  # 1-based position of the record in its file, or of the object in the list
    formula: str
    smiles: str  # as given for SMILES input, else perceived from the structure; "" where RDKit cannot
    status: str  # ok, warning or error
    message: str  # why a row is a warning or an error, naming file and record
    values: dict[str, float | None] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Whether the row has predictions (status ok or warning)."""
        return self.status != STATUS_ERROR

    def to_dict(self) -> dict[str, Any]:
        """Flat, as a record of ``se3t predict -o FILE.json``: the record's fields, then one entry per
        value named with its unit (``homo_eV``, :func:`~se3tcli.targets.column_name`)."""
        base = {k: getattr(self, k) for k in BASE_COLUMNS}
        return base | {column_name(q, self.units[q]): v for q, v in self.values.items()}


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

    def set_backend(self, name: str) -> None:
        """The implementation of the attention layers: ``auto``, ``torch``, ``fused_cpu`` or ``reference``
        (see :func:`se3tcli.model.backend.resolve`); not saved with the model."""
        self.loaded.model.set_backend(name)

    def predict(
        self,
        inputs: object | Iterable[object],
        targets: Sequence[str] | str | None = None,
        batch_size: int = 64,
        embed: bool = True,
        workers: int = 1,
        conformer_timeout: float = DEFAULT_TIMEOUT_S,
    ) -> list[PredictionRow]:
        """Predict every molecule in ``inputs``: RDKit ``Mol``s, ASE ``Atoms``, SMILES strings ("SMILES
        [name]"), file paths (one row per record), or one of these alone. ``targets``: a subset of the
        model's (names or a comma-separated string; default all). ``embed=False`` turns 2D records and
        records without hydrogens into errors instead of generating conformers. ``workers``: processes that
        generate SMILES conformers (1: this one; more need the ``if __name__ == "__main__":`` guard in a
        script), ``conformer_timeout`` seconds each (0: no limit), a slower one becoming an error row.
        ValueError for a ``batch_size`` or ``workers`` below 1 or a negative or NaN ``conformer_timeout``."""
        _check_options(batch_size, workers, conformer_timeout)
        if _single(inputs):
            inputs = [inputs]
        chosen = parse_targets(_target_spec(targets), self.targets)
        molecules = molecules_from_objects(
            inputs,
            embed,
            workers=workers,
            conformer_timeout=conformer_timeout,
            max_atoms=MAX_ATOMS_PER_MOLECULE,
        )
        rows = predict_stream(self.loaded, molecules, self.device, chosen, batch_size)
        units = output_units(self.loaded, chosen)
        return [_row(molecule, values, units) for molecule, values in rows]

    def predict_frame(self, inputs: object | Iterable[object], **options: Any):
        """:meth:`predict` as a pandas ``DataFrame``: one row per record, with the columns of the CSV
        output (``record``, ``smiles``, ``homo_eV``, ...)."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("predict_frame needs pandas: pip install pandas") from None
        rows = self.predict(inputs, **options)
        units = output_units(self.loaded, parse_targets(_target_spec(options.get("targets")), self.targets))
        values = [column_name(q, unit) for q, unit in units.items()]
        frame = pd.DataFrame.from_records([row.to_dict() for row in rows], columns=[*BASE_COLUMNS, *values])
        return frame.astype({column: float for column in values})  # NaN where a row has no value


def _check_options(batch_size: int, workers: int, conformer_timeout: float) -> None:
    """The limits the command line's options have (``--batch-size``, ``--workers``,
    ``--conformer-timeout``)."""
    for name, value in (("batch_size", batch_size), ("workers", workers)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be a whole number >= 1, not {value!r}")
    if isinstance(conformer_timeout, bool) or not isinstance(conformer_timeout, numbers.Real):
        raise ValueError(f"conformer_timeout must be a number of seconds, not {conformer_timeout!r}")
    if not 0 <= conformer_timeout <= MAX_TIMEOUT_S:  # also NaN
        raise ValueError(
            f"conformer_timeout must be 0 (no limit) to {MAX_TIMEOUT_S:g} seconds, not {conformer_timeout!r}"
        )


def _single(inputs: object) -> bool:
    """Whether ``inputs`` is one molecule (or file), not a collection of them: ASE Atoms and arrays are
    iterable, but are one molecule each; a mapping is one object too (its keys are not molecules)."""
    one = (str, bytes, os.PathLike, Chem.Mol, ase.Atoms, np.ndarray, Mapping)
    return isinstance(inputs, one) or not isinstance(inputs, Iterable)


def _target_spec(targets: Sequence[str] | str | None) -> str | None:
    return targets if targets is None or isinstance(targets, str) else ",".join(targets)


def _row(molecule: Molecule, values: dict[str, float] | None, units: dict[str, str]) -> PredictionRow:
    """The row of a molecule with its values as the output files hold them."""
    in_files = {q: None if values is None else file_value(values[q]) for q in units}
    return PredictionRow(**base_fields(molecule), values=in_files, units=units)


def load_model(name_or_path: str | None = None, device: str = "auto") -> Predictor:
    """A bundled model by name (``qm9-default`` by default; hash-checked against its card) or a checkpoint
    file written by ``se3t train``, on ``device`` (``auto``: a GPU where there is one)."""
    torch_device = select_device(device)
    return Predictor(load_checkpoint(name_or_path, torch_device), torch_device)
