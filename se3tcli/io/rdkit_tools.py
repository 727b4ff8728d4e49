"""RDKit helpers shared by the readers and the SDF writer: quiet logging that keeps RDKit's error
messages as reasons, sanitization in bounded time, and the atoms and coordinates of an RDKit molecule."""

from __future__ import annotations

import functools
import operator
import re
from contextlib import ExitStack

import numpy as np
from rdkit import Chem, rdBase

from se3tcli.io.molecule import reason

# RDKit >= 2026.03 can capture its error log; older versions only get it silenced (generic reasons then).
_CaptureErrorLog = getattr(rdBase, "CaptureErrorLog", None)
_RDKIT_LOG_LINE = re.compile(r"^\[\d{2}:\d{2}:\d{2}\] (?:ERROR: )?(.+)$", re.MULTILINE)
# RDKit's default aromaticity model also tries unions of a fused ring system's rings, which grows
# combinatorially with the system: on hydrogen-capped graphene flakes it took 19 s for one of 54 rings and
# did not finish in 10 minutes for one of 140 (3 ms for another of 78), in C++ that Ctrl-C cannot stop.
# Larger fused systems get the simple model (each 5- or 6-membered ring on its own), which is fast.
MAX_FUSED_RINGS_DEFAULT_AROMATICITY = 20


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


def sanitize(mol: Chem.Mol) -> None:
    """``Chem.SanitizeMol`` (raising as it does), with the aromaticity perceived in bounded time: RDKit's
    default model where no fused ring system has more than :data:`MAX_FUSED_RINGS_DEFAULT_AROMATICITY`
    rings, else the simple model (5- and 6-membered rings only: an azulene-like 7-ring stays Kekulé)."""
    mol.UpdatePropertyCache(strict=False)
    Chem.GetSymmSSSR(mol)  # the ring set, for the count below
    if largest_fused_ring_system(mol) <= MAX_FUSED_RINGS_DEFAULT_AROMATICITY:
        Chem.SanitizeMol(mol)
        return
    flags = Chem.SanitizeFlags
    Chem.SanitizeMol(mol, flags.SANITIZE_ALL ^ flags.SANITIZE_SETAROMATICITY)
    Chem.SetAromaticity(mol, Chem.AromaticityModel.AROMATICITY_SIMPLE)
    for atom in mol.GetAtoms():  # keep the Kekulé form's H on aromatic N (pyrrole's), which a recount drops
        if atom.GetIsAromatic() and atom.GetAtomicNum() != 6 and atom.GetNumImplicitHs():
            atom.SetNumExplicitHs(atom.GetTotalNumHs())
            atom.SetNoImplicit(True)
    # the steps SanitizeMol takes after the aromaticity (and the ring set again: each sanitization resets it)
    after = [flags.SANITIZE_SYMMRINGS, flags.SANITIZE_SETCONJUGATION, flags.SANITIZE_SETHYBRIDIZATION]
    after += [flags.SANITIZE_CLEANUPCHIRALITY, flags.SANITIZE_ADJUSTHS]
    Chem.SanitizeMol(mol, functools.reduce(operator.or_, after))


def largest_fused_ring_system(mol: Chem.Mol) -> int:
    """The number of rings (of RDKit's ring set) in the largest system of rings that share bonds."""
    rings = [set(ring) for ring in mol.GetRingInfo().BondRings()]
    system = list(range(len(rings)))  # union-find: each ring's representative

    def root(i: int) -> int:
        while system[i] != i:
            system[i] = system[system[i]]
            i = system[i]
        return i

    owner: dict[int, int] = {}  # bond index: a ring holding it
    for i, ring in enumerate(rings):
        for bond in ring:
            if bond in owner:
                system[root(i)] = root(owner[bond])
            else:
                owner[bond] = i
    sizes: dict[int, int] = {}
    for i in range(len(rings)):
        sizes[root(i)] = sizes.get(root(i), 0) + 1
    return max(sizes.values(), default=0)


def atoms_of(mol: Chem.Mol) -> tuple[np.ndarray, list[str]]:
    """Atomic numbers ([n_atoms] int64) and element symbols of the atoms."""
    atoms = list(mol.GetAtoms())
    return np.array([a.GetAtomicNum() for a in atoms], dtype=np.int64), [a.GetSymbol() for a in atoms]


def positions_of(mol: Chem.Mol) -> np.ndarray:
    """Coordinates of the (first) conformer."""
    return np.asarray(mol.GetConformer().GetPositions(), dtype=np.float64).reshape(-1, 3)  # [n_atoms, 3] Å
