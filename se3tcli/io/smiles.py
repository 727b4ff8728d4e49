"""SMILES files and strings: one SMILES per line with an optional name after it.

In files, blank lines and ``#`` comments are skipped, and so is a header line whose first word is
``smiles`` or ``smi`` (any case). SMILES get hydrogens and an ETKDGv3 + MMFF94 conformer (UFF when MMFF94
has no parameters): the row of a valid SMILES is a :class:`PendingConformer`, which
:func:`se3tcli.io.conformer_pool.embed_pending` finishes.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Iterator
from dataclasses import replace
from functools import partial
from typing import IO

from ase.data import chemical_symbols
from rdkit import Chem

from se3tcli.io.conformer_pool import Row
from se3tcli.io.conformers import PendingConformer, to_binary
from se3tcli.io.filereader import MAX_LINE_CHARS, FileReader, has_control_characters, open_text, text_lines
from se3tcli.io.molecule import SMILES_SOURCE, Molecule, Record, element_problem, guarded, reason
from se3tcli.io.rdkit_tools import RDKitLog, atoms_of, positions_of, sanitize

_HEADER_WORDS = {"smiles", "smi"}


def _rows(handle: IO[str], source: str, embed: bool, seed: int) -> Iterator[Row]:
    """Rows of a SMILES file; SMILES are always embedded, whatever ``embed`` says."""
    index = 0
    for line in text_lines(handle):
        record = Record(source, index)
        if line is None:
            yield record.error(f"line longer than {MAX_LINE_CHARS} characters")
            index += 1
            continue
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        smiles, name = split_smiles_line(text)
        if index == 0 and smiles.lower() in _HEADER_WORDS:
            continue
        problem = _not_a_smiles_line(text, smiles, name)
        yield record.error(problem) if problem else smiles_row(record, smiles, name, seed)
        index += 1


def _not_a_smiles_line(text: str, smiles: str, name: str) -> str | None:
    """Why a line of a SMILES file is something else (binary data, an XYZ atom line: an element symbol or
    number, then three or more numbers), or None."""
    if has_control_characters(text):
        return "control characters: binary data, not a line of SMILES"
    numbers = name.split()
    element = smiles in chemical_symbols[1:] or smiles.isdigit()
    if element and len(numbers) >= 3 and all(_is_number(x) for x in numbers):
        return "an element and its coordinates, as in an XYZ file, not a SMILES and its name"
    return None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


SMILES_READER = FileReader(open=open_text, rows=_rows)


def read_smiles_strings(lines: Iterable[str], seed: int) -> Iterator[Row]:
    """One row per string "SMILES [name ...]", with source ``SMILES_SOURCE``."""
    for index, line in enumerate(lines):
        yield row_of_smiles_string(line, index, seed)


def row_of_smiles_string(line: str, index: int, seed: int) -> Row:
    """The row of one string "SMILES [name ...]": record ``index`` of ``SMILES_SOURCE``."""
    smiles, name = split_smiles_line(line)
    return smiles_row(Record(SMILES_SOURCE, index), smiles, name, seed)


def smiles_row(
    record: Record, smiles: str, name: str, seed: int, properties: dict[str, str] | None = None
) -> Row:
    """The row of one SMILES (pending its conformer), with the record's other ``properties`` (a CSV
    table's other columns); its name is the SMILES itself where ``name`` is empty."""
    return guarded(_from_smiles, record, smiles, name, seed, properties or {})


def split_smiles_line(line: str) -> tuple[str, str]:
    """(SMILES, name) from "SMILES [|extensions|] [name ...]" or "SMILES,name[,...]": CXSMILES extensions
    (radicals, enhanced stereo, coordinates; after a space) stay with the SMILES, which RDKit reads with
    them; a comma in the SMILES itself, which holds none, ends it as in a CSV line, whose second cell is
    then the name; the name is "" when absent."""
    text = line.strip()
    first = text.split(None, 1)[0] if text else ""
    if "," in first:
        try:
            cells = next(csv.reader([text]))
        except csv.Error:  # a cell over the csv module's size limit: split at the comma
            cells = text.split(",", 2)
        return cells[0].strip(), cells[1].strip() if len(cells) > 1 else ""
    parts = text.split(None, 1)
    if len(parts) < 2:
        return "".join(parts), ""
    smiles, rest = parts
    end = rest.find("|", 1) if rest.startswith("|") else -1
    if end > 0:
        smiles, rest = f"{smiles} {rest[: end + 1]}", rest[end + 1 :].lstrip().removeprefix(",")
    return smiles, rest.strip()


def _from_smiles(record: Record, smiles: str, name: str, seed: int, properties: dict[str, str]) -> Row:
    name = name.strip() or smiles
    if not smiles:
        return record.error("no SMILES before the name" if name else "no SMILES", name)
    with RDKitLog() as log:
        mol = Chem.MolFromSmiles(smiles, sanitize=False)
        if mol is None:
            return record.error(f"cannot parse SMILES {smiles!r}: {log.reason('invalid SMILES')}", name)
        try:
            sanitize(mol)
        except Exception as exc:  # RDKit raises several sanitization exception types
            return record.error(f"cannot parse SMILES {smiles!r}: {reason(exc)}", name)
    numbers, symbols = atoms_of(mol)
    problem = element_problem(numbers, symbols)
    if problem:
        return record.error(problem, name, numbers)
    finish = partial(_embedded_row, record, smiles, name, properties)
    return PendingConformer(record, name, numbers, to_binary(mol), seed, finish)


def _embedded_row(
    record: Record, smiles: str, name: str, properties: dict[str, str], mol: Chem.Mol, warnings: list[str]
) -> Molecule:
    mol.SetProp("_Name", name)
    properties = {**properties, "smiles": smiles}
    numbers, symbols = atoms_of(mol)
    molecule = record.molecule(name, numbers, positions_of(mol), properties, symbols, warnings, mol)
    return replace(molecule, smiles=smiles)
