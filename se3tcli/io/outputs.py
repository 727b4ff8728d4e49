"""The output formats of :class:`~se3tcli.io.writer.PredictionWriter`: CSV, JSON and SDF.

Each format gets the open text file and the targets with their units; :meth:`write` adds one molecule with
its finite prediction values (None for NaN), :meth:`finish` whatever follows the last one.
"""

from __future__ import annotations

import csv
import json
import textwrap
from typing import IO

import numpy as np
from rdkit import Chem
from rdkit.Chem import rdDetermineBonds

from se3tcli.io.molecule import Molecule
from se3tcli.io.rdkit_tools import RDKitLog

_BASE_COLUMNS = ("name", "source", "index", "formula", "status", "message")
_MAX_ATOMS_BOND_PERCEPTION = 500  # larger atoms-only molecules are written to SDF without bonds


def _column(target: str, unit: str) -> str:
    return f"{target} [{unit}]" if unit else target


_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # what spreadsheets read as the start of a formula


def inert_text(text: str) -> str:
    """A CSV text cell a spreadsheet shows as text: one starting like a formula gets a leading ``'``
    (OWASP's advice against CSV injection; JSON and SDF keep the text exact)."""
    return "'" + text if text.startswith(_FORMULA_STARTS) else text


class CsvFormat:
    """Columns name, source, index, formula, status, message, then ``<target> [<unit>]`` per target."""

    def __init__(self, handle: IO[str], targets: tuple[str, ...], units: dict[str, str]):
        self._targets = targets
        self._csv = csv.writer(handle, lineterminator="\n")
        self._csv.writerow([*_BASE_COLUMNS, *(_column(t, units[t]) for t in targets)])

    def write(self, molecule: Molecule, values: dict[str, float | None]) -> None:
        cells = [repr(v) if (v := values.get(t)) is not None else "" for t in self._targets]
        m = molecule
        text = [inert_text(cell) for cell in (m.name, m.source)]
        self._csv.writerow([*text, m.index, m.formula, m.status, inert_text(m.message), *cells])

    def finish(self) -> None:
        """Nothing to add after the last row."""


class JsonFormat:
    """A JSON list of records, written one record at a time; non-finite values become null."""

    def __init__(self, handle: IO[str], targets: tuple[str, ...], units: dict[str, str]):
        self._handle = handle
        self._units = units
        self._count = 0
        handle.write("[")

    def write(self, molecule: Molecule, values: dict[str, float | None]) -> None:
        m = molecule
        record = {
            "name": m.name,
            "source": m.source,
            "index": m.index,
            "formula": m.formula,
            "status": m.status,
            "message": m.message,
            "predictions": {t: {"value": v, "unit": self._units[t]} for t, v in values.items()},
        }
        text = json.dumps(record, indent=2, ensure_ascii=False, allow_nan=False)
        self._handle.write(("\n" if self._count == 0 else ",\n") + textwrap.indent(text, "  "))
        self._count += 1

    def finish(self) -> None:
        self._handle.write("\n]\n" if self._count else "]\n")


class SdfFormat:
    """SD records with 3D coordinates, the original tags, ``<target> [<unit>]`` tags and se3t_status/message.

    Rows without atoms or without finite coordinates cannot be written as SD records and are skipped.
    """

    def __init__(self, handle: IO[str], targets: tuple[str, ...], units: dict[str, str]):
        self._handle = handle
        self._tags = {t: _column(t, units[t]) for t in targets}

    def write(self, molecule: Molecule, values: dict[str, float | None]) -> None:
        if molecule.numbers.size == 0 or not np.isfinite(molecule.positions).all():
            return
        if molecule.rdkit_mol is not None:
            mol = Chem.Mol(molecule.rdkit_mol)
        else:
            mol = _mol_from_atoms(molecule.numbers, molecule.positions, perceive_bonds=molecule.ok)
        mol.SetProp("_Name", " ".join(molecule.name.split()))  # the title line of an SD record
        for key, value in molecule.properties.items():
            mol.SetProp(key, value)
        for target, tag in self._tags.items():
            value = values.get(target)
            if value is not None:
                mol.SetProp(tag, repr(value))
            elif mol.HasProp(tag):  # a stale value from an earlier run in the input
                mol.ClearProp(tag)
        mol.SetProp("se3t_status", molecule.status)
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


def _mol_from_atoms(numbers: np.ndarray, positions: np.ndarray, perceive_bonds: bool) -> Chem.Mol:
    """An RDKit molecule from atoms ([n_atoms]) and coordinates ([n_atoms, 3] Å), with bonds from
    rdDetermineBonds when it succeeds."""
    rw = Chem.RWMol()
    for z in numbers:
        atom = Chem.Atom(int(z))
        atom.SetNoImplicit(True)
        rw.AddAtom(atom)
    conformer = Chem.Conformer(len(numbers))
    for i, xyz in enumerate(positions.tolist()):
        conformer.SetAtomPosition(i, xyz)
    conformer.Set3D(True)
    rw.AddConformer(conformer, assignId=True)
    mol = rw.GetMol()
    if perceive_bonds and len(numbers) <= _MAX_ATOMS_BOND_PERCEPTION:
        bonded = Chem.Mol(mol)
        with RDKitLog():
            try:
                rdDetermineBonds.DetermineBonds(bonded, charge=0)
                return bonded
            except Exception:  # no consistent bond orders: atoms only
                pass
    mol.UpdatePropertyCache(strict=False)
    return mol
