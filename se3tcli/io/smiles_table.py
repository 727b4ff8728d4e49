"""CSV tables of SMILES (``.csv``): a header line, then one molecule per record.

Headers are matched in any case and without spaces, ``_`` or ``-``. The SMILES column is headed ``smiles``
(else ``smi``, ``isomeric_smiles``, ``isosmiles``, ``canonical_smiles``, ``mol``, ``structure``, or the first
header that contains "smiles"), the name columns ``name``, ``title``, ``id``, ``Compound ID`` and similar
(the first non-empty one names the row; else the SMILES does). The delimiter is the comma, the semicolon or
the tab: the one that splits the header into a SMILES column (else the most frequent). Every other
non-empty cell is a property named by its header (the first of repeated headers; cells beyond the header
are ignored), so that labels (``homo_eV``, ``gap [meV]``) train and evaluate like SD tags. A quoted cell may
span up to 100 lines; one not closed by then is read as ending with its line. A table whose first line is
no header, as its first cell or the next line's first cell is a valid SMILES, reads as ``SMILES,name``
lines; ``#`` lines before the header are comments. se3t's own CSV output reads back: its status column
becomes the status tag, so that its predictions are never taken for labels, and the ``'`` it put before
text cells that start like a formula is dropped.
"""

from __future__ import annotations

import collections
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
from se3tcli.io.smiles import smiles_row, split_smiles_line
from se3tcli.targets import STATUS_TAG

_SMILES_HEADERS = ("smiles", "smi", "isomericsmiles", "isosmiles", "canonicalsmiles", "mol", "structure")
_NAME_HEADERS = ("name", "title", "id", "molid", "molname", "molecule", "moleculeid", "moleculename",
                 "compound", "compoundid", "compoundname", "cmpdname", "moleculechemblid",
                 "chemblid", "cid")  # fmt: skip
_DELIMITERS = (",", ";", "\t")  # the first wins a tie
_STATUS = BASE_COLUMNS.index("status")
_MAX_RECORD_LINES = 100  # lines a quoted cell may span
_WORD = re.compile(r"[A-Za-z][A-Za-z _.\-]*")  # what a header's first cell looks like, unlike most SMILES


def _normal(header: str) -> str:
    """A header as it is matched: lower case, without spaces, ``_`` and ``-``."""
    return re.sub(r"[\s_\-]", "", header.lower())


@dataclass(frozen=True)
class _Layout:
    """Which columns hold the SMILES and the names (in preference order), what the columns are called (()
    without a header line), and whether the table is se3t's own output."""

    header: tuple[str, ...]
    smiles: int
    names: tuple[int, ...]
    own_output: bool = False

    def name(self, cells: list[str]) -> str:
        """The first non-empty name cell, its line breaks and runs of spaces made single spaces."""
        return next((name for i in self.names if (name := " ".join(_cell(cells, i).split()))), "")

    def properties(self, cells: list[str]) -> dict[str, str]:
        """The other columns' non-empty cells by header; of se3t's output only its values and status."""
        first = len(BASE_COLUMNS) if self.own_output else 0
        properties: dict[str, str] = {}
        for i, (key, cell) in enumerate(zip(self.header, cells, strict=False)):  # short rows: fewer
            if i >= first and i != self.smiles and i not in self.names and key and cell:
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
    first = next((line for line in raw if line is None or not _blank_or_comment(line)), "")
    if first is None:
        yield Record(source, 0).error(f"header line longer than {MAX_LINE_CHARS} characters")
        return
    if not first:
        return  # no lines: read_file says "no molecules found"
    if first.count("\x00") > len(first) // 3:  # every other byte of ASCII text in UTF-16
        yield Record(source, 0).error("UTF-16 text (Excel's 'Unicode text'), not UTF-8: save it as CSV UTF-8")
        return
    delimiter = _smiles_delimiter(first) or max(_DELIMITERS, key=first.count)
    lines = _lines(itertools.chain([first], raw), delimiter)
    header = next(lines)
    layout = _named_layout(header.cells)
    if layout is None:
        second = next(lines, None)
        layout = _unnamed_layout(header.cells, second.cells if second else [])
        data = [second] if second else []
        if layout is not None and not layout.header:  # no header: the first line is the first record
            data.insert(0, header)
        lines = itertools.chain(data, lines)
    if layout is None:
        yield Record(source, 0).error(
            "no SMILES column: no header names one 'smiles', and the first cells are no SMILES either"
        )
        return
    yield from _table_rows(lines, layout, source, seed)


def _blank_or_comment(line: str) -> bool:
    """Whether a line before the header is blank or a ``#`` comment (not a header like ``#,SMILES``)."""
    return not line.strip() or (line.startswith("#") and _smiles_delimiter(line) is None)


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
        smiles, rest = split_smiles_line(_cell(cells, layout.smiles))  # "CCO ethanol" in one cell, too
        name = layout.name(cells) or rest
        if has_control_characters(re.sub(r"[\r\n]", "", line.text)):  # line breaks in quoted cells are text
            yield record.error("control characters: binary data, not a line of a CSV table", name)
        elif not smiles:
            yield record.error(f"no SMILES in column {layout.smiles + 1}", name)
        else:
            yield smiles_row(record, smiles, name, seed, layout.properties(cells))


def _lines(raw: Iterator[str | None], delimiter: str) -> Iterator[_Line]:
    """The table's records: blank lines skipped; a quoted cell's line breaks kept within its record, up to
    :data:`_MAX_RECORD_LINES` lines and ``MAX_LINE_CHARS`` characters, beyond which the record ends with its
    first line and the lines after it are read again as records of their own."""
    again: collections.deque[str | None] = collections.deque()  # lines to read again
    while (line := again.popleft() if again else next(raw, "")) != "":
        if line is None:
            yield _Line([], problem=f"line longer than {MAX_LINE_CHARS} characters")
            continue
        if not line.strip():
            continue
        taken, size = [line], len(line)
        cells = _parse(line, delimiter, strict=True)
        while cells is None and len(taken) < _MAX_RECORD_LINES:  # a quoted cell goes on in the next line
            more = again.popleft() if again else next(raw, "")
            if more is None or not more or size + len(more) > MAX_LINE_CHARS:
                if more != "":
                    again.appendleft(more)
                break
            taken.append(more)
            size += len(more)
            if '"' in more:  # only a quote can close the cell
                cells = _parse("".join(taken), delimiter, strict=True)
        if cells is None:  # never closed: the first line alone, as spreadsheets read it
            again.extendleft(reversed(taken[1:]))
            taken, cells = [line], _parse(line, delimiter, strict=False)
        yield cells if isinstance(cells, _Line) else _Line(cells, "".join(taken))


def _parse(text: str, delimiter: str, strict: bool) -> list[str] | _Line | None:
    """The stripped cells of a record's text; with ``strict`` None while a quoted cell is still open at its
    end; a :class:`_Line` with the problem where the csv module cannot split it."""
    try:
        return [cell.strip() for cell in next(csv.reader([text], delimiter=delimiter, strict=strict), [])]
    except csv.Error as exc:
        if strict and str(exc) == "unexpected end of data":  # within a quoted cell
            return None
        if strict:  # other quoting mistakes ('"a"b'): read as spreadsheets do
            return _parse(text, delimiter, strict=False)
        return _Line([], text, f"cannot split the line into cells: {exc}")  # a cell over the csv size limit


def _cell(cells: list[str], column: int | None) -> str:
    return cells[column] if column is not None and column < len(cells) else ""


def _smiles_delimiter(header: str) -> str | None:
    """The delimiter (most frequent first) that splits a header line into a column named as
    :data:`_SMILES_HEADERS` spell it, else into one that contains "smiles"; None where none does."""
    by_count = sorted(_DELIMITERS, key=header.count, reverse=True)  # stable: the comma first on a tie
    splits = [(d, cells) for d in by_count if isinstance(cells := _parse(header, d, strict=False), list)]
    named = (d for d, cells in splits if _named_layout(cells))
    containing = (d for d, cells in splits if _smiles_containing(cells) is not None)
    return next(named, None) or next(containing, None)


def _smiles_containing(cells: list[str]) -> int | None:
    return next((i for i, cell in enumerate(cells) if "smiles" in cell.lower()), None)


def _named_layout(cells: list[str]) -> _Layout | None:
    """The layout of a header that names a SMILES column as :data:`_SMILES_HEADERS` spell it, or None."""
    header = [_normal(cell) for cell in cells]
    smiles = next((header.index(name) for name in _SMILES_HEADERS if name in header), None)
    return None if smiles is None else _header_layout(cells, smiles)


def _unnamed_layout(first: list[str], second: list[str]) -> _Layout | None:
    """The layout of a table whose first line names no SMILES column as :data:`_SMILES_HEADERS` spell it.

    A first line with a name header (``N,name``) is a header; its SMILES column the first header that
    contains "smiles", else the column of the largest SMILES in the next line. Otherwise, where the first
    cell is a SMILES the table has no header (``SMILES,name`` lines); else a header with a column that
    contains "smiles" is one; else a header whose first cell is a word (``Drug,pIC50``) above a SMILES is
    one, with its SMILES in that column; else the table has none where the next line's first cell is a
    SMILES (the first line is then an error row, not lost). None where nothing holds."""
    containing = _smiles_containing(first)
    if any(_normal(cell) in _NAME_HEADERS for cell in first):
        layout = _header_layout(first, 0)
        if containing is None:
            sizes = {i: _atoms(cell) for i, cell in enumerate(second) if i not in layout.names}
            containing = max(sizes, key=sizes.get) if sizes and max(sizes.values()) > 0 else None
        return None if containing is None else _header_layout(first, containing)
    if first and _atoms(first[0]):
        return _Layout((), 0, (1,))
    if containing is not None:
        return _header_layout(first, containing)
    if first and _WORD.fullmatch(first[0]) and second and _atoms(second[0]):
        return _header_layout(first, 0)
    return _Layout((), 0, (1,)) if second and _atoms(second[0]) else None


def _header_layout(cells: list[str], smiles: int) -> _Layout:
    header = [_normal(cell) for cell in cells]
    names = tuple(i for name in _NAME_HEADERS if name in header and (i := header.index(name)) != smiles)
    own_output = tuple(cell.lower() for cell in cells[: len(BASE_COLUMNS)]) == BASE_COLUMNS
    return _Layout(tuple(cells), smiles, names, own_output)


def _atoms(cell: str) -> int:
    """The atoms of the SMILES a cell holds (0 where it holds none)."""
    smiles, _ = split_smiles_line(cell)
    with RDKitLog():
        mol = Chem.MolFromSmiles(smiles) if smiles else None
    return mol.GetNumAtoms() if mol is not None else 0


SMILES_TABLE_READER = FileReader(open=open_text, rows=_rows)
