"""What se3t's CSV output looks like, shared by its writer and by the reader that reads it back: the
columns before the values, and text cells kept inert for spreadsheets."""

from __future__ import annotations

# The fields of every CSV row and JSON record before the values; record is 1-based, as in the messages.
BASE_COLUMNS = ("name", "source", "record", "formula", "smiles", "status", "message")

_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # what spreadsheets read as the start of a formula


def inert_text(text: str) -> str:
    """A CSV text cell a spreadsheet shows as text: one starting like a formula gets a leading ``'``
    (OWASP's advice against CSV injection; JSON and SDF keep the text exact)."""
    return "'" + text if text.startswith(_FORMULA_STARTS) else text


def text_of_inert(cell: str) -> str:
    """The text that :func:`inert_text` made ``cell`` from (se3t's CSV output read back)."""
    return cell[1:] if cell.startswith("'") and cell[1:].startswith(_FORMULA_STARTS) else cell
