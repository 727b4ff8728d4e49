"""3D conformers for records without coordinates: hydrogens, ETKDGv3 embedding, then MMFF94 (or UFF)."""

from __future__ import annotations

import numpy as np
from rdkit import Chem
from rdkit.Chem import AllChem

from se3tcli.io.molecule import reason

_MMFF_MAX_ITERS = 2000
FORCE_FIELD_GEOMETRY = (
    "force-field geometry (generated conformer, not DFT-optimised like the training molecules): "
    "errors are larger than the test error"
)
_FRAGMENT_GAP = 3.0  # Å between the bounding spheres of disconnected fragments before optimisation


def generate_conformer(mol: Chem.Mol, seed: int) -> tuple[Chem.Mol | None, list[str], str]:
    """Add hydrogens and a 3D conformer (ETKDGv3, then MMFF94 or UFF).

    Returns (molecule or None, warnings, error reason).
    """
    mol = Chem.AddHs(mol)
    params = AllChem.ETKDGv3()
    params.randomSeed = seed
    if AllChem.EmbedMolecule(mol, params) != 0:
        params.useRandomCoords = True
        if AllChem.EmbedMolecule(mol, params) != 0:
            return None, [], "could not generate a 3D conformer (ETKDGv3)"
    warnings = [FORCE_FIELD_GEOMETRY, *_separate_fragments(mol)]
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


def _separate_fragments(mol: Chem.Mol) -> list[str]:
    """Place disconnected fragments side by side along x (ETKDG may put them on top of each other).

    Returns a warning for molecules with several fragments (salts, solvates), none otherwise.
    """
    fragments = Chem.GetMolFrags(mol)  # tuples of atom indices
    if len(fragments) < 2:
        return []
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
    return [f"{len(fragments)} disconnected fragments placed side by side before optimisation"]
