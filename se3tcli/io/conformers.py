"""3D conformers for records without coordinates: hydrogens, ETKDGv3 embedding, then MMFF94 (or UFF).

A reader that needs a conformer yields a :class:`PendingConformer` instead of the row; the conformer
pool (:mod:`se3tcli.io.conformer_pool`) runs :func:`embed_binary` on it, in this process or in a worker
process, and :meth:`PendingConformer.row` turns the result into the row. The molecule travels as RDKit's
binary form (properties and double-precision coordinates included), in and out, in both cases, so the
coordinates are the same with any number of workers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from rdkit import Chem
from rdkit.Chem import AllChem, rdDistGeom

from se3tcli.io.molecule import Molecule, Record, reason
from se3tcli.io.rdkit_tools import RDKitLog

_MMFF_MAX_ITERS = 2000
DEFAULT_TIMEOUT_S = 60.0  # wall-clock seconds per molecule for its conformer
MAX_TIMEOUT_S = 86_400.0  # the longest limit one may set (a day); 0 means none
FORCE_FIELD_GEOMETRY = (
    "force-field geometry (generated conformer, not DFT-optimised like the training molecules): "
    "errors are larger than the test error"
)
_EMBEDDING_FAILED = "could not generate a 3D conformer (ETKDGv3)"
_FRAGMENT_GAP = 3.0  # Å between the bounding spheres of disconnected fragments before optimisation
_BINARY_OPTIONS = Chem.PropertyPickleOptions.AllProps | Chem.PropertyPickleOptions.CoordsAsDouble
_EXCEEDED_TIMEOUT = rdDistGeom.EmbedFailureCauses.EXCEEDED_TIMEOUT

# What :func:`embed_binary` returns: (RDKit binary of the molecule with its conformer or None, warnings,
# error reason).
EmbedResult = tuple[bytes | None, list[str], str]


def time_limit_reason(timeout: float) -> str:
    """The error of a record whose conformer took longer than ``timeout`` seconds."""
    return f"conformer generation exceeded {timeout:g} s"


def to_binary(mol: Chem.Mol) -> bytes:
    """RDKit's binary form of ``mol`` with all its properties and double-precision coordinates."""
    return mol.ToBinary(_BINARY_OPTIONS)


@dataclass(frozen=True, eq=False)
class PendingConformer:
    """A record whose row needs a generated conformer: the molecule to embed and how to finish the row."""

    record: Record
    name: str
    numbers: np.ndarray  # [n_atoms] the atoms before embedding, which an error row keeps
    mol: bytes  # to_binary() of the molecule to embed
    seed: int
    finish: Callable[[Chem.Mol, list[str]], Molecule]  # the row of the embedded molecule, given its warnings

    @property
    def n_atoms(self) -> int:
        """Atoms once hydrogens are added (the conformer's size)."""
        mol = Chem.Mol(self.mol)
        return mol.GetNumAtoms() + sum(atom.GetTotalNumHs() for atom in mol.GetAtoms())

    def row(self, result: EmbedResult) -> Molecule:
        """The record's row from :func:`embed_binary`'s result."""
        binary, warnings, why = result
        if binary is None:
            return self.error(why)
        try:
            return self.finish(Chem.Mol(binary), warnings)
        except Exception as exc:  # one record's failure must not stop the others
            return self.error(f"cannot read record: {reason(exc)}")

    def error(self, why: str) -> Molecule:
        return self.record.error(why, self.name, self.numbers)


def embed_binary(mol: bytes, seed: int, timeout: float) -> EmbedResult:
    """:func:`generate_conformer` of a molecule in RDKit's binary form, with RDKit's logging silenced and
    any exception as the reason; what a worker process runs."""
    try:
        with RDKitLog():
            embedded, warnings, why = generate_conformer(Chem.Mol(mol), seed, timeout)
    except Exception as exc:  # a bug in one record's chemistry must not stop the others
        return None, [], f"conformer generation failed: {reason(exc)}"
    return (None if embedded is None else to_binary(embedded)), warnings, why


def generate_conformer(
    mol: Chem.Mol, seed: int, timeout: float = 0.0
) -> tuple[Chem.Mol | None, list[str], str]:
    """Add hydrogens and a 3D conformer (ETKDGv3, then MMFF94 or UFF).

    ``timeout``: seconds after which RDKit stops each of the (at most two) ETKDG attempts (whole seconds,
    rounded up; 0: no limit); the force-field step is not covered (a worker process of the conformer pool
    is stopped at the limit whatever it does).

    Returns (molecule or None, warnings, error reason).
    """
    mol = Chem.AddHs(mol)
    params = AllChem.ETKDGv3()
    params.randomSeed = seed
    if timeout > 0:
        params.timeout = math.ceil(timeout)
        params.trackFailures = True
    status = AllChem.EmbedMolecule(mol, params)
    if status != 0 and not _timed_out(params):
        params.useRandomCoords = True
        status = AllChem.EmbedMolecule(mol, params)
    if status != 0:
        return None, [], time_limit_reason(timeout) if _timed_out(params) else _EMBEDDING_FAILED
    _separate_fragments(mol)  # predict warns of several fragments (io/structure_checks.py)
    warnings = [FORCE_FIELD_GEOMETRY]
    try:
        if AllChem.MMFFHasAllMoleculeParams(mol):
            AllChem.MMFFOptimizeMolecule(mol, maxIters=_MMFF_MAX_ITERS)
        elif AllChem.UFFHasAllMoleculeParams(mol):
            AllChem.UFFOptimizeMolecule(mol, maxIters=_MMFF_MAX_ITERS)
            warnings.append("no MMFF94 parameters: conformer optimised with UFF")
        else:
            warnings.append("no MMFF94/UFF parameters: conformer not optimised")
    except Exception as exc:  # a failed optimisation still leaves the ETKDG conformer
        warnings.append(f"force-field optimisation failed ({reason(exc)}): conformer not optimised")
    return mol, warnings, ""


def _timed_out(params: rdDistGeom.EmbedParameters) -> bool:
    """Whether an embedding with ``params`` ran out of time (known where failures are tracked)."""
    return params.trackFailures and params.GetFailureCounts()[_EXCEEDED_TIMEOUT] > 0


def _separate_fragments(mol: Chem.Mol) -> None:
    """Place disconnected fragments (salts, solvates) side by side along x (ETKDG may put them on top of
    each other)."""
    fragments = Chem.GetMolFrags(mol)  # tuples of atom indices
    if len(fragments) < 2:
        return
    conformer = mol.GetConformer()
    positions = conformer.GetPositions()  # [n_atoms, 3] Å
    start = 0.0  # Å, x where the next fragment's bounding sphere begins
    for atoms in fragments:
        index = list(atoms)
        centred = positions[index] - positions[index].mean(axis=0)
        radius = float(np.linalg.norm(centred, axis=1).max())
        positions[index] = centred + np.array([start + radius, 0.0, 0.0])
        start += 2 * radius + _FRAGMENT_GAP
    for i, xyz in enumerate(positions.tolist()):
        conformer.SetAtomPosition(i, xyz)
