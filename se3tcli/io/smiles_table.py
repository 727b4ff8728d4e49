"""CSV tables of SMILES (``.csv``): a header line, then one molecule per record.

Headers are matched in any case and without spaces, ``_`` or ``-``. The SMILES column is headed ``smiles``
(else ``smi``, ``isomeric_smiles``, ``isosmiles``, ``canonical_smiles``, or the first header that contains
"smiles"), the name column ``name`` (else ``title``, ``id``, ``Compound ID`` and similar; without one the
SMILES names the row). The delimiter is the comma, the semicolon or the tab: the one that splits the header
into a SMILES column (else the most frequent). Every other non-empty cell is a property named by its
header (the first of repeated headers; cells beyond the header are ignored), so that labels (``homo_eV``,
``gap [meV]``) train and evaluate like SD tags. Quoted cells may span lines. A table whose first line is no
header, as its first cell or the next line's is a valid SMILES, reads as ``SMILES,name`` lines; ``#``
lines before the header are comments. se3t's own CSV output reads back: its status column becomes the
status tag, so that its predictions are never taken for labels, and the ``'`` it put before text cells
that start like a formula is dropped.
"""

from __future__ import annotations

import csv
import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

from rdkit import Chem

from se3tcli.io.conformer_pool import Row
from se3tcli.io.csv_layout import BASE_COLUMNS, text_of_inert
from se3tcli.io.filereader import MAX_LINE_CHARS, FileReader, has_control_characters, open_text, text_lines
from se3tcli.io.molecule import Record
from se3tcli.io.rdkit_tools import RDKitLog
from se3tcli.io.smiles import row_of_smiles, split_smiles_line
from se3tcli.targets import STATUS_TAG

_SMILES_HEADERS = ("smiles", "smi", "isomericsmiles", "isosmiles", "canonicalsmiles")  # preferred first
_NAME_HEADERS = ("name", "title", "id", "molid", "molname", "molecule", "moleculeid", "moleculename",
                 "compound", "compoundid", "compoundname", "cmpdname")  # fmt: skip
_DELIMITERS = (",", ";", "\t")  # the first wins a tie
_STATUS = BASE_COLUMNS.index("status")


def _normal(header: str) -> str:
    """A header as it is matched: lower case, without spaces, ``_`` and ``-``."""
    return re.sub(r"[\s_\-]", "", header.lower())


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
        properties: dict[str, str] = {}
        for i, (key, cell) in enumerate(zip(self.header, cells, strict=False)):  # short rows: fewer
            if i >= first and i not in (self.smiles, self.name) and key and cell:
                properties.setdefault(key, cell)
        if self.own_output and len(cells) > _STATUS and cells[_STATUS]:
            properties[STATUS_TAG] = cells[_STATUS]
        return properties


@dataclass(frozen=True)
class _Line:
    """One record of the table: its cells, or why it has none (``problem``), and its text."""

    cells: list[str]
    text: str = ""
    problem: str = ""


def _rows(handle: IO[str], source: str, embed: bool, seed: int) -> Iterator[Row]:
    """Rows of a CSV table of SMILES; SMILES are always embedded, whatever ``embed`` says."""
    raw = text_lines(handle)
    first = next((line for line in raw if line is None or (line.strip() and not line.startswith("#"))), "")
    if first is None:
        yield Record(source, 0).error(f"header line longer than {MAX_LINE_CHARS} characters")
        return
    if not first:
        return  # no lines: read_file says "no molecules found"
    if first.count("\x00") > len(first) // 3:  # every other byte of ASCII text in UTF-16
        yield Record(source, 0).error("UTF-16 text (Excel's 'Unicode text'), not UTF-8: save it as CSV UTF-8")
        return
    delimiter = _delimiter(first)
    lines = _lines(itertools.chain([first], raw), delimiter)
    header = next(lines)
    layout = _named_layout(header.cells)
    if layout is None:
        second = next(lines, None)
        layout = _unnamed_layout(header.cells, second.cells if second else [])
        lines = itertools.chain([header, *([second] if second else [])], lines)
        if layout is not None and layout.header:
            next(lines)  # the header itself
    if layout is None:
        yield Record(source, 0).error(
            "no SMILES column: no header names one 'smiles', and the first cells are no SMILES either"
        )
        return
    yield from _table_rows(lines, layout, source, seed)


def _table_rows(lines: Iterator[_Line], layout: _Layout, source: str, seed: int) -> Iterator[Row]:
    index = 0
    for line in lines:
        record = Record(source, index)
        if line.problem:
            yield record.error(line.problem)
            index += 1
            continue
        cells = [text_of_inert(cell) for cell in line.cells] if layout.own_output else line.cells
        if not any(cells):
            continue  # a spreadsheet's empty row
        index += 1
        name = _cell(cells, layout.name)
        smiles, rest = split_smiles_line(_cell(cells, layout.smiles))  # "CCO ethanol" in one cell, too
        name = name or rest
        if has_control_characters(re.sub(r"[\r\n]", "", line.text)):  # line breaks in quoted cells are text
            yield record.error("control characters: binary data, not a line of a CSV table", name)
        elif not smiles:
            yield record.error(f"no SMILES in column {layout.smiles + 1}", name)
        else:
            yield row_of_smiles(record, smiles, name, seed, layout.properties(cells))


def _lines(raw: Iterator[str | None], delimiter: str) -> Iterator[_Line]:
    """The table's records: blank lines skipped, a quoted cell's line breaks kept within its record."""
    for line in raw:
        if line is None:
            yield _Line([], problem=f"line longer than {MAX_LINE_CHARS} characters")
            continue
        if not line.strip():
            continue
        text = line
        while (parsed := _parse(text, delimiter)) is None:  # a quoted cell goes on in the next line
            more = next(raw, "")
            if not more or len(text) + len(more) > MAX_LINE_CHARS:
                where = "by the end of the file" if more == "" else f"within {MAX_LINE_CHARS} characters"
                yield _Line([], text, f"a quoted cell is not closed {where}")
                if more is None:
                    yield _Line([], problem=f"line longer than {MAX_LINE_CHARS} characters")
                break
            text += more
        else:
            yield parsed if isinstance(parsed, _Line) else _Line(parsed, text)


def _parse(text: str, delimiter: str) -> list[str] | _Line | None:
    """The stripped cells of a record's text; None while a quoted cell is still open at its end; a
    :class:`_Line` with the problem where the csv module cannot split it."""
    try:
        return [cell.strip() for cell in next(csv.reader([text], delimiter=delimiter, strict=True), [])]
    except csv.Error as exc:
        if str(exc) == "unexpected end of data":  # within a quoted cell
            return None
    try:  # other quoting mistakes ('"a"b'): read as spreadsheets do
        return [cell.strip() for cell in next(csv.reader([text], delimiter=delimiter), [])]
    except csv.Error as exc:  # a cell over the csv module's size limit
        return _Line([], text, f"cannot split the line into cells: {exc}")


def _cell(cells: list[str], column: int | None) -> str:
    return cells[column] if column is not None and column < len(cells) else ""


def _delimiter(header: str) -> str:
    """The delimiter that splits the header line into a named SMILES column, else the most frequent."""
    by_count = sorted(_DELIMITERS, key=header.count, reverse=True)  # stable: the comma first on a tie
    for delimiter in by_count:
        cells = _parse(header, delimiter)
        if isinstance(cells, list) and _named_layout(cells) is not None:
            return delimiter
    return by_count[0]


def _named_layout(cells: list[str]) -> _Layout | None:
    """The layout of a header that names a SMILES column as :data:`_SMILES_HEADERS` spell it, or None."""
    header = [_normal(cell) for cell in cells]
    smiles = next((header.index(name) for name in _SMILES_HEADERS if name in header), None)
    return None if smiles is None else _header_layout(cells, smiles)


def _unnamed_layout(first: list[str], second: list[str]) -> _Layout | None:
    """The layout of a table whose first line names no SMILES column as :data:`_SMILES_HEADERS` spell it.
    A first line with a name header (``N,name``) is a header, its SMILES column the first header that
    contains "smiles", else the first that holds a SMILES in the next line. Otherwise the table has no
    header (``SMILES,name`` lines) where its first cell is a SMILES, else a header whose column contains
    "smiles" where one does, else none where the next line's first cell is a SMILES (the first line is then
    an error row, not lost). None where nothing holds."""
    containing = next((i for i, cell in enumerate(first) if "smiles" in cell.lower()), None)
    if any(_normal(cell) in _NAME_HEADERS for cell in first):
        holding = next((i for i, cell in enumerate(second) if _is_smiles(cell)), None)
        column = containing if containing is not None else holding
        return None if column is None else _header_layout(first, column)
    if first and _is_smiles(first[0]):
        return _Layout((), 0, 1)
    if containing is not None:
        return _header_layout(first, containing)
    return _Layout((), 0, 1) if second and _is_smiles(second[0]) else None


def _header_layout(cells: list[str], smiles: int) -> _Layout:
    header = [_normal(cell) for cell in cells]
    name = next((header.index(name) for name in _NAME_HEADERS if name in header), None)
    own_output = tuple(cell.lower() for cell in cells[: len(BASE_COLUMNS)]) == BASE_COLUMNS
    return _Layout(tuple(cells), smiles, name, own_output)


def _is_smiles(cell: str) -> bool:
    smiles, _ = split_smiles_line(cell)
    with RDKitLog():
        return bool(smiles) and Chem.MolFromSmiles(smiles) is not None


SMILES_TABLE_READER = FileReader(open=open_text, rows=_rows)
