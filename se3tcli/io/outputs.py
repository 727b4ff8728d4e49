"""The output formats of :class:`~se3tcli.io.writer.PredictionWriter`: CSV, JSON and SDF.

Each format gets the open text file and the predicted quantities (targets, then any dipole components)
with their units; :meth:`write` adds one molecule with its values (finite, at float32 precision, None
where there is none), :meth:`finish` whatever follows the last one. Values are named alike in every
format: :func:`~se3tcli.targets.column_name` (``homo_eV``).
"""

from __future__ import annotations

import csv
import json
import math
import textwrap
from typing import IO

import numpy as np
from rdkit import Chem

from se3tcli.io.bonds import atoms_mol, perceive_bonds
from se3tcli.io.csv_layout import BASE_COLUMNS, inert_text
from se3tcli.io.molecule import Molecule
from se3tcli.io.rdkit_tools import RDKitLog, sanitize
from se3tcli.targets import INPUT_TAG_SUFFIX, STATUS_TAG, column_name


def file_value(value: float) -> float | None:
    """A value as output files hold it: None unless finite, else rounded to float32 (what the model
    computes in) and given as the float with the shortest decimal that reads back as that float32
    (-6.123, not -6.123000144958496)."""
    with np.errstate(over="ignore"):  # beyond float32's range: inf, so None
        single = np.float32(value)
    return float(str(single)) if math.isfinite(single) else None


def base_fields(molecule: Molecule) -> dict[str, object]:
    """The :data:`BASE_COLUMNS` of one row."""
    m = molecule
    return {
        "name": m.name,
        "source": m.source,
        "record": m.record,
        "formula": m.formula,
        "smiles": smiles_of(m),
        "status": m.status,
        "message": m.message,
    }


class CsvFormat:
    """Columns :data:`BASE_COLUMNS`, then one per quantity (``homo_eV``); empty cells where no value."""

    def __init__(self, handle: IO[str], quantities: tuple[str, ...], units: dict[str, str]):
        self._quantities = quantities
        self._csv = csv.writer(handle, lineterminator="\n")
        self._csv.writerow([*BASE_COLUMNS, *(column_name(q, units[q]) for q in quantities)])

    def write(self, molecule: Molecule, values: dict[str, float | None]) -> None:
        cells = [repr(v) if (v := values.get(q)) is not None else "" for q in self._quantities]
        text = [inert_text(v) if isinstance(v, str) else v for v in base_fields(molecule).values()]
        self._csv.writerow([*text, *cells])

    def finish(self) -> None:
        """Nothing to add after the last row."""


class JsonFormat:
    """A JSON list of flat records written one at a time: the CSV's columns as keys, null where no value."""

    def __init__(self, handle: IO[str], quantities: tuple[str, ...], units: dict[str, str]):
        self._handle = handle
        self._keys = {q: column_name(q, units[q]) for q in quantities}
        self._count = 0
        handle.write("[")

    def write(self, molecule: Molecule, values: dict[str, float | None]) -> None:
        record = base_fields(molecule) | {key: values.get(q) for q, key in self._keys.items()}
        text = json.dumps(record, indent=2, ensure_ascii=False, allow_nan=False)
        self._handle.write(("\n" if self._count == 0 else ",\n") + textwrap.indent(text, "  "))
        self._count += 1

    def finish(self) -> None:
        self._handle.write("\n]\n" if self._count else "]\n")


class SdfFormat:
    """SD records with 3D coordinates, the original tags, one tag per value (``homo_eV``) and
    se3t_status/message. An input tag named like a value tag (reference values) is kept as
    ``<tag>_input``; in se3t's own output read back (records with a status tag) such tags are the earlier
    run's predictions, which the new ones replace (its ``_input`` tags stay as they are).

    Rows without atoms or without finite coordinates cannot be written as SD records and are skipped
    (counted in ``skipped``).
    """

    def __init__(self, handle: IO[str], quantities: tuple[str, ...], units: dict[str, str]):
        self._handle = handle
        self._tags = {q: column_name(q, units[q]) for q in quantities}
        self._tag_names = set(self._tags.values())
        self.skipped = 0

    def write(self, molecule: Molecule, values: dict[str, float | None]) -> None:
        if not _has_coordinates(molecule):
            self.skipped += 1
            return
        if molecule.rdkit_mol is not None:
            mol = Chem.Mol(molecule.rdkit_mol)
        else:
            mol = atoms_mol(molecule.numbers, molecule.positions)
            bonded = perceive_bonds(mol) if molecule.ok else None
            mol = mol if bonded is None else bonded
        mol.SetProp("_Name", " ".join(molecule.name.split()))  # the title line of an SD record
        earlier_run = STATUS_TAG in molecule.properties  # se3t's own output: its values were predictions
        for key, value in molecule.properties.items():
            if key in self._tag_names and earlier_run:
                continue  # an earlier prediction: replaced below, never kept as a reference
            mol.SetProp(f"{key}{INPUT_TAG_SUFFIX}" if key in self._tag_names else key, value)
        for quantity, tag in self._tags.items():
            value = values.get(quantity)
            if value is not None:
                mol.SetProp(tag, repr(value))
            elif mol.HasProp(tag):  # the RDKit molecule's own copy of the input's tag
                mol.ClearProp(tag)
        mol.SetProp(STATUS_TAG, molecule.status)
        mol.SetProp("se3t_message", " ".join(molecule.message.split()))
        with RDKitLog():
            try:
                text = Chem.SDWriter.GetText(mol)
            except Exception:  # e.g. an aromatic system RDKit cannot kekulize
                text = Chem.SDWriter.GetText(mol, kekulize=False)
        self._handle.write(text)

    def finish(self) -> None:
        """Nothing to add after the last record."""


# Output suffix (lower case) -> format, in the order writer_formats() lists them.
FORMAT_BY_SUFFIX: dict[str, type[CsvFormat | JsonFormat | SdfFormat]] = {
    ".csv": CsvFormat,
    ".json": JsonFormat,
    ".sdf": SdfFormat,
}


def _has_coordinates(molecule: Molecule) -> bool:
    return molecule.numbers.size > 0 and bool(np.isfinite(molecule.positions).all())


def smiles_of(molecule: Molecule) -> str:
    """The row's SMILES: as given for SMILES input; otherwise RDKit's canonical SMILES of the record's
    RDKit molecule where it has bonds, else of bonds perceived from the atoms (rows that can be
    predicted); "" where there is no such molecule or RDKit cannot write it."""
    if molecule.smiles:
        return molecule.smiles
    mol = molecule.rdkit_mol
    if mol is None or mol.GetNumBonds() == 0:  # atoms only: bonds from the coordinates, if any
        perceivable = molecule.ok and _has_coordinates(molecule)
        mol = perceive_bonds(atoms_mol(molecule.numbers, molecule.positions)) if perceivable else None
    if mol is None:
        return ""
    with RDKitLog():
        try:
            heavy = Chem.RemoveHs(mol, sanitize=False)
            sanitize(heavy)  # in bounded time, where RemoveHs' own would not be
            return Chem.MolToSmiles(heavy)
        except Exception:  # e.g. a molecule that does not sanitize
            return ""
