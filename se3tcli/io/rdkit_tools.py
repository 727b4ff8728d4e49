"""RDKit helpers shared by the readers and the SDF writer: quiet logging that keeps RDKit's error
messages as reasons, and the atoms and coordinates of an RDKit molecule."""

from __future__ import annotations

import re
from contextlib import ExitStack

import numpy as np
from rdkit import Chem, rdBase

from se3tcli.io.molecule import reason

# RDKit >= 2026.03 can capture its error log; older versions only get it silenced (generic reasons then).
_CaptureErrorLog = getattr(rdBase, "CaptureErrorLog", None)
_RDKIT_LOG_LINE = re.compile(r"^\[\d{2}:\d{2}:\d{2}\] (?:ERROR: )?(.+)$", re.MULTILINE)


class RDKitLog:
    """Silence RDKit's logging to stderr and collect its error messages (where RDKit can capture them)."""

    def __enter__(self) -> RDKitLog:
        self._stack = ExitStack()
        self._stack.enter_context(rdBase.BlockLogs())
        self._capture = self._stack.enter_context(_CaptureErrorLog()) if _CaptureErrorLog else None
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stack.close()

    def reason(self, default: str) -> str:
        """RDKit's error messages so far as one line, or ``default`` if there are none."""
        try:
            text = self._capture.messages if self._capture is not None else ""
        except UnicodeDecodeError as exc:  # RDKit quotes the bad input, which need not be UTF-8
            text = exc.object.decode("utf-8", errors="replace")
        lines = [line.strip() for line in _RDKIT_LOG_LINE.findall(text)]
        lines = [line for line in lines if not line.startswith("moving to the beginning of the next")]
        return reason(ValueError("; ".join(dict.fromkeys(lines)))) if lines else default


def atoms_of(mol: Chem.Mol) -> tuple[np.ndarray, list[str]]:
    """Atomic numbers ([n_atoms] int64) and element symbols of the atoms."""
    atoms = list(mol.GetAtoms())
    return np.array([a.GetAtomicNum() for a in atoms], dtype=np.int64), [a.GetSymbol() for a in atoms]


def positions_of(mol: Chem.Mol) -> np.ndarray:
    """Coordinates of the (first) conformer."""
    return np.asarray(mol.GetConformer().GetPositions(), dtype=np.float64).reshape(-1, 3)  # [n_atoms, 3] Å
