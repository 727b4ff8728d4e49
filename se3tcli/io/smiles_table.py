"""CSV tables of SMILES (``.csv``): a header line, then one molecule per line.

The SMILES column is headed ``smiles`` (any case; else ``smi``, ``canonical_smiles``, ``isomeric_smiles``, or
the one header that contains "smiles"), the name column ``name`` (else ``title``, ``id`` and similar; without
one the SMILES names the row). The delimiter is the comma, or the semicolon or tab where the header holds
more of those. Every other non-empty cell is a property named by its header, so that labels (``homo_eV``,
``gap [meV]``) train and evaluate like SD tags. A file whose first line is no header but starts with a valid
SMILES reads as ``SMILES,name`` lines. se3t's own CSV output reads back: its status column becomes the
status tag, so that its predictions are never taken for labels, and the ``'`` it put before text cells that
start like a formula is dropped.
"""

from __future__ import annotations

import csv
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

from rdkit import Chem

from se3tcli.io.conformer_pool import Row
from se3tcli.io.filereader import MAX_LINE_CHARS, FileReader, open_text, text_lines
from se3tcli.io.molecule import Record
from se3tcli.io.outputs import BASE_COLUMNS, text_of_inert
from se3tcli.io.rdkit_tools import RDKitLog
from se3tcli.io.smiles import row_of_smiles
from se3tcli.targets import STATUS_TAG

_SMILES_HEADERS = ("smiles", "smi", "canonical_smiles", "isomeric_smiles")
_NAME_HEADERS = ("name", "title", "id", "mol_id", "molecule", "molecule_id", "molecule_name", "compound",
                 "compound_id", "compound_name")  # fmt: skip
_DELIMITERS = (",", ";", "\t")  # the first wins a tie
_STATUS = BASE_COLUMNS.index("status")


@dataclass(frozen=True)
class _Layout:
    """Which columns hold the SMILES and the names, what the columns are called (() without a header line),
    and whether the table is se3t's own output."""

    header: tuple[str, ...]
    smiles: int
    name: int | None
    own_output: bool = False

    def properties(self, cells: list[str]) -> dict[str, str]:
        """The other columns' non-empty cells by header; of se3t's output only its values and status."""
        first = len(BASE_COLUMNS) if self.own_output else 0
        properties = {
            key: cell
            for i, (key, cell) in enumerate(zip(self.header, cells, strict=False))  # short rows: fewer
            if i >= first and i not in (self.smiles, self.name) and key and cell
        }
        if self.own_output and len(cells) > _STATUS:
            properties[STATUS_TAG] = cells[_STATUS]
        return properties


def _rows(handle: IO[str], source: str, embed: bool, seed: int) -> Iterator[Row]:
    """Rows of a CSV table of SMILES; SMILES are always embedded, whatever ``embed`` says."""
    lines = (line for line in text_lines(handle) if line is None or line.strip())
    first = next(lines, "")
    if first is None:
        yield Record(source, 0).error(f"header line longer than {MAX_LINE_CHARS} characters")
        return
    if not first:
        return  # an empty file: read_file says "no molecules found"
    delimiter = max(_DELIMITERS, key=first.count)
    cells = _cells(first, delimiter)
    layout = _header_layout(cells)
    if layout is None and cells and _is_smiles(cells[0]):
        layout, lines = _Layout((), 0, 1), itertools.chain([first], lines)  # no header: SMILES,name lines
    if layout is None:
        yield Record(source, 0).error(
            "no SMILES column: no header names one 'smiles', and the first cell is no SMILES either"
        )
        return
    yield from _table_rows(lines, layout, delimiter, source, seed)


def _table_rows(
    lines: Iterator[str | None], layout: _Layout, delimiter: str, source: str, seed: int
) -> Iterator[Row]:
    index = 0
    for line in lines:
        record = Record(source, index)
        if line is None:
            yield record.error(f"line longer than {MAX_LINE_CHARS} characters")
            index += 1
            continue
        cells = _cells(line, delimiter, layout.own_output)
        if not any(cells):
            continue  # a spreadsheet's empty row
        index += 1
        name = _cell(cells, layout.name)
        smiles = _cell(cells, layout.smiles)
        if any(ord(c) < 32 and c != "\t" for c in line.rstrip("\r\n")):
            yield record.error("control characters: binary data, not a line of a CSV table", name)
        elif not smiles:
            yield record.error(f"no SMILES in column {layout.smiles + 1}", name)
        else:
            yield row_of_smiles(record, smiles, name, seed, layout.properties(cells))


def _cells(line: str, delimiter: str, own_output: bool = False) -> list[str]:
    """The stripped cells of one line (se3t's ``'`` before formula-like text cells dropped)."""
    cells = [cell.strip() for cell in next(csv.reader([line], delimiter=delimiter), [])]
    return [text_of_inert(cell) for cell in cells] if own_output else cells


def _cell(cells: list[str], column: int | None) -> str:
    return cells[column] if column is not None and column < len(cells) else ""


def _header_layout(cells: list[str]) -> _Layout | None:
    """The layout a header line's cells give, or None if they name no SMILES column (in any case)."""
    header = [cell.lower() for cell in cells]
    smiles = next((header.index(name) for name in _SMILES_HEADERS if name in header), None)
    containing = [i for i, cell in enumerate(header) if "smiles" in cell]
    if smiles is None and len(containing) == 1:
        smiles = containing[0]
    if smiles is None:
        return None
    name = next((header.index(name) for name in _NAME_HEADERS if name in header), None)
    own_output = tuple(header[: len(BASE_COLUMNS)]) == BASE_COLUMNS
    return _Layout(tuple(cells), smiles, name, own_output)


def _is_smiles(text: str) -> bool:
    with RDKitLog():
        return Chem.MolFromSmiles(text) is not None


SMILES_TABLE_READER = FileReader(open=open_text, rows=_rows)
