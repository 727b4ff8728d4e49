"""XYZ and extXYZ via ASE's extXYZ parser, frame by frame.

A plain comment line is the molecule's name; a ``key=value`` comment line is extXYZ metadata and becomes
the properties. Atom count lines may have a sign (``+3``, an integer to Python and ASE); a count written as
a decimal (``3.0``) makes its frame an error. Atomic numbers stand for element symbols (``8 0.0 0.0 0.0``,
as Open Babel reads them) unless a ``Properties`` key says what the columns hold.

QM9's own files (``dsgdb9nsd_000001.xyz``, one molecule each, or several concatenated) are recognised by
their comment line, ``gdb N`` and 15 properties: the frame's three trailing lines (harmonic frequencies,
SMILES, InChI) belong to it, Mathematica exponents (``1.2*^-6``) are read as numbers, the fifth column
(Mulliken charges) is dropped, the name is ``gdb_N``, and the properties become labels in QM9's units
(``homo [Ha]``, ``mu [D]``, ...), which ``se3t evaluate`` and ``se3t train`` convert.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import IO

import ase.io
import numpy as np
from ase.data import atomic_masses, chemical_symbols

from se3tcli.io.filereader import FileReader, open_text, text_lines
from se3tcli.io.molecule import Molecule, Record, guarded, isotope_warning, reason

_EOF = object()  # end-of-file marker for next(lines, _EOF)
# An atom count; one with a decimal point ("3.0", group 2) still frames its lines, but is an error.
_COUNT_LINE = re.compile(r"\+?([0-9]+)(\.0*)?")
_ATOMIC_NUMBER = re.compile(r"[0-9]+")
_PROPERTIES_KEY = re.compile(r"(?:^|\s)properties\s*=", re.IGNORECASE)  # extXYZ: the columns are named
_EXTXYZ_KEY = re.compile(r"(?:^|\s)[A-Za-z_][\w.:-]*\s*=\s*\S")  # an extXYZ entry: key=value
_QM9_HEADER = re.compile(r"gdb\s+([0-9]+)((?:\s+\S+){15})")  # QM9's comment line (after strip)
# The 15 properties of a QM9 comment line, in order, with their units (Hartree for the energies).
QM9_PROPERTIES = (
    ("A", "GHz"), ("B", "GHz"), ("C", "GHz"), ("mu", "D"), ("alpha", "bohr3"), ("homo", "Ha"),
    ("lumo", "Ha"), ("gap", "Ha"), ("r2", "bohr2"), ("zpve", "Ha"), ("U0", "Ha"), ("U", "Ha"),
    ("H", "Ha"), ("G", "Ha"), ("Cv", "cal/molK"),
)  # fmt: skip
_QM9_TRAILING_LINES = 3  # frequencies, SMILES, InChI


def _rows(handle: IO[str], source: str, embed: bool, seed: int) -> Iterator[Molecule]:
    """Rows of an XYZ file; frames have coordinates, so ``embed`` and ``seed`` do not apply."""
    for index, (comment, atom_lines, problem) in enumerate(_frames(handle)):
        record = Record(source, index)
        if problem:
            yield record.error(problem)
        else:
            yield guarded(_from_frame, record, comment, atom_lines)


XYZ_READER = FileReader(open=open_text, rows=_rows)


def _frames(handle: IO[str]) -> Iterator[tuple[str, list[str], str]]:
    """Split an XYZ file into frames: (comment line, atom lines, problem); problem is "" for a sound frame.

    Blank lines between frames are skipped. A frame whose atom lines are fewer or more than its count says
    is one problem frame, and so are lines where a count should be; in each case reading goes on at the
    next line that holds only a number (or a line that may be a count, after a frame cut short), so one
    broken frame is one row and never loses the frames after it.
    """
    lines = text_lines(handle)

    def skip_to_a_frame() -> tuple[object, str]:
        """Read up to the next line holding only a number: (that line or _EOF, "N line(s) skipped ...")."""
        skipped = 1
        while (line := next(lines, _EOF)) is not _EOF and not _is_count_line(line):
            skipped += 1
        return line, f"{skipped} line(s) skipped to {'the next frame' if line is not _EOF else 'the end'}"

    line = next(lines, _EOF)
    while True:
        while isinstance(line, str) and not line.strip():
            line = next(lines, _EOF)
        if line is _EOF:
            return
        words = line.split() if isinstance(line, str) else []
        count = _COUNT_LINE.fullmatch(words[0]) if words else None
        if count is None:
            found = _shorten(line) if isinstance(line, str) else "an overlong line"
            line, skipped = skip_to_a_frame()
            yield "", [], f"expected an atom count line, found {found!r}; {skipped}"
            continue
        n_atoms = int(count[1])
        count_problem = f"the atom count {words[0]!r} is not an integer" if count[2] is not None else ""
        comment = next(lines, _EOF)
        if not isinstance(comment, str):
            yield "", [], "file ends (or has an overlong line) where the comment line should be"
            return
        qm9 = _QM9_HEADER.fullmatch(comment.strip()) is not None
        is_atom = _is_qm9_atom_line if qm9 else _is_atom_line  # QM9's frequencies look like atom lines
        atom_lines: list[str] = []
        while len(atom_lines) < n_atoms:
            line = next(lines, _EOF)
            if line is _EOF:
                yield "", [], f"file ends after {len(atom_lines)} of {n_atoms} atom lines"
                return
            if not is_atom(line):
                break
            atom_lines.append(line if line.endswith("\n") else line + "\n")
        else:
            extra = 0
            while is_atom(line := next(lines, _EOF)):
                extra += 1
            if qm9:  # its trailing lines (up to three; fewer where the next frame or the end comes first)
                for _ in range(_QM9_TRAILING_LINES - 1):
                    if line is _EOF or _is_count_line(line):
                        break
                    line = next(lines, _EOF)
                if not (line is _EOF or _is_count_line(line)):
                    line = next(lines, _EOF)
            if extra:
                yield "", [], f"frame declares {n_atoms} atoms but has {n_atoms + extra} atom lines"
            else:
                yield comment, atom_lines, count_problem
            continue
        problem = f"frame declares {n_atoms} atoms but has {len(atom_lines)} atom lines"
        if isinstance(line, str) and (not line.strip() or _COUNT_LINE.fullmatch(line.split()[0])):
            yield "", [], problem  # the line may start the next frame: tried as its count
            continue
        line, skipped = skip_to_a_frame()
        yield "", [], f"{problem}; {skipped}"


def _is_atom_line(line: object) -> bool:
    """Symbol and three coordinates at least, and not a count line."""
    return isinstance(line, str) and len(line.split()) >= 4 and not _is_count_line(line)


def _is_qm9_atom_line(line: object) -> bool:
    """An atom line of QM9's format: an element symbol or atomic number first (a frequency line starts
    with a decimal number)."""
    if not _is_atom_line(line):
        return False
    element = line.split()[0]
    return element.isalpha() or _ATOMIC_NUMBER.fullmatch(element) is not None


def _is_count_line(line: str | None) -> bool:
    """A line with one whole number and nothing else: where a frame can start again after a broken one."""
    words = line.split() if isinstance(line, str) else []
    return len(words) == 1 and _COUNT_LINE.fullmatch(words[0]) is not None


def _shorten(text: str, limit: int = 40) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _from_frame(record: Record, comment: str, atom_lines: list[str]) -> Molecule:
    comment = comment.strip()
    qm9 = _QM9_HEADER.fullmatch(comment)
    if qm9:
        return _from_qm9_frame(record, qm9, atom_lines)
    columns = _PROPERTIES_KEY.search(comment) is not None
    metadata = columns or _EXTXYZ_KEY.search(comment) is not None  # key=value pairs, not a plain title
    title = "" if metadata else comment
    if not columns:  # the default columns: element, x, y, z
        atom_lines, problem = _with_symbols(atom_lines)
        if problem:
            return record.error(problem, title)
    try:
        atoms = _ase_frame(comment if metadata else "", atom_lines)
    except KeyError as exc:
        return record.error(f"unknown element symbol {exc.args[0]!r}", title)
    except Exception as exc:  # ASE raises many exception types for malformed frames
        if columns or not metadata:
            return record.error(f"ASE cannot parse the frame: {reason(exc)}", title)
        # key=value text ASE cannot read ("Lattice=1", an unclosed quote): the frame, named by its comment
        why = f"the comment line is no extXYZ metadata that ASE can read ({reason(exc)}): taken as a title"
        try:
            atoms = _ase_frame("", atom_lines)
        except Exception:  # the atom lines, not the comment: the first reason stands
            return record.error(f"ASE cannot parse the frame: {reason(exc)}", title)
        return molecule_from_atoms(record, atoms, comment, with_info=False, warnings=[why])
    return molecule_from_atoms(record, atoms, title, with_info=metadata)


def _ase_frame(comment: str, atom_lines: list[str]) -> ase.Atoms:
    return ase.io.read(io.StringIO(f"{len(atom_lines)}\n{comment}\n{''.join(atom_lines)}"), format="extxyz")


def _from_qm9_frame(record: Record, header: re.Match, atom_lines: list[str]) -> Molecule:
    """A frame of QM9's own format: element, x, y, z and a Mulliken charge per atom line."""
    name = f"gdb_{header[1]}"
    values = [v.replace("*^", "e") for v in header[2].split()]
    properties = {f"{key} [{unit}]": v for (key, unit), v in zip(QM9_PROPERTIES, values, strict=True)}
    lines = [" ".join(line.replace("*^", "e").split()[:4]) + "\n" for line in atom_lines]
    lines, problem = _with_symbols(lines)
    if problem:
        return record.error(problem, name)
    try:
        atoms = ase.io.read(io.StringIO(f"{len(lines)}\n\n{''.join(lines)}"), format="extxyz", index=0)
    except KeyError as exc:
        return record.error(f"unknown element symbol {exc.args[0]!r}", name)
    except Exception as exc:  # ASE raises many exception types for malformed frames
        return record.error(f"ASE cannot parse the frame: {reason(exc)}", name)
    return replace(molecule_from_atoms(record, atoms, name, with_info=False), properties=properties)


def _with_symbols(atom_lines: list[str]) -> tuple[list[str], str]:
    """The atom lines with atomic numbers in the element column replaced by symbols: (lines, problem)."""
    lines = []
    for atom, line in enumerate(atom_lines, 1):
        element, rest = line.split(None, 1)
        if _ATOMIC_NUMBER.fullmatch(element):
            z = int(element)
            if not 0 < z < len(chemical_symbols):
                return [], f"atomic number {z} is not an element (atom {atom})"
            line = f"{chemical_symbols[z]} {rest}"
        lines.append(line)
    return lines, ""


def molecule_from_atoms(
    record: Record, atoms: ase.Atoms, name: str = "", with_info: bool = True, warnings: Sequence[str] = ()
) -> Molecule:
    """The row of an ASE ``Atoms``: its ``info`` entries (and scalar calculator results) as properties,
    its ``info["name"]`` as the name where there is one; ``warnings`` are the reader's own."""
    properties: dict[str, str] = {}
    if with_info:
        entries = dict(atoms.info)
        if atoms.calc is not None:  # ASE moves energy-like keys (energy, free_energy, ...) to a calculator
            entries.update((k, v) for k, v in atoms.calc.results.items() if np.ndim(v) == 0)
        properties = {str(k): _info_text(v) for k, v in entries.items()}
        name = properties.get("name", "").strip() or name
    numbers = np.asarray(atoms.numbers, dtype=np.int64)  # [n_atoms]
    positions = np.asarray(atoms.positions, dtype=np.float64)  # [n_atoms, 3] Å
    # A crystal or a periodic box is predicted as the isolated atoms it lists: say so.
    warnings = list(warnings)
    if any(atoms.pbc):
        warnings.append("periodic boundary conditions ignored: predicted as an isolated molecule")
    warnings += _isotope_masses(atoms, numbers)
    row = record.molecule(name, numbers, positions, properties, atoms.get_chemical_symbols(), warnings)
    return replace(row, net_charge=_summed_charge(atoms)) if row.ok else row


def _summed_charge(atoms: ase.Atoms) -> int | None:
    """The net charge ASE per-atom charges state (formal charges, as H3O+ given [1, 0, 0, 0]): their sum
    where it is within 0.1 of a whole number; partial charges that sum to none state nothing."""
    if not atoms.has("initial_charges"):
        return None
    total = float(np.sum(atoms.get_initial_charges()))
    return round(total) if abs(total - round(total)) <= 0.1 else None


def _isotope_masses(atoms: ase.Atoms, numbers: np.ndarray) -> list[str]:
    """The isotope warning of atoms whose masses were set (ASE ``masses``) to another isotope's."""
    if not atoms.has("masses") or not len(numbers) or numbers.max() >= len(atomic_masses):
        return []
    masses = atoms.get_masses()  # [n_atoms] u
    other = np.flatnonzero(np.abs(masses - atomic_masses[numbers]) > 0.5)
    if not len(other):
        return []
    return [isotope_warning([f"{round(masses[i])}{chemical_symbols[numbers[i]]}" for i in other])]


def _info_text(value: object) -> str:
    """An extXYZ info value as text (arrays as space-separated numbers)."""
    if isinstance(value, np.ndarray):
        return " ".join(str(x) for x in value.ravel().tolist())
    return str(value.item() if isinstance(value, np.generic) else value)
