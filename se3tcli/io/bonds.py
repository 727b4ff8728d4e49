"""Bonds of atoms-only structures (XYZ frames, ASE Atoms): RDKit molecules built from atoms and
coordinates, and their bonds perceived with rdDetermineBonds."""

from __future__ import annotations

import numpy as np
from rdkit import Chem
from rdkit.Chem import rdDetermineBonds

from se3tcli.io.rdkit_tools import RDKitLog, sanitize

# Larger atoms-only molecules get no perceived bonds (bond orders scale badly with size).
MAX_ATOMS_BOND_PERCEPTION = 500


def atoms_mol(numbers: np.ndarray, positions: np.ndarray) -> Chem.Mol:
    """An RDKit molecule of the atoms ([n_atoms]) and coordinates ([n_atoms, 3] Å), without bonds."""
    rw = Chem.RWMol()
    for z in numbers:
        atom = Chem.Atom(int(z))
        atom.SetNoImplicit(True)
        rw.AddAtom(atom)
    conformer = Chem.Conformer(len(numbers))
    for i, xyz in enumerate(positions.tolist()):
        conformer.SetAtomPosition(i, xyz)
    conformer.Set3D(True)
    rw.AddConformer(conformer, assignId=True)
    mol = rw.GetMol()
    mol.UpdatePropertyCache(strict=False)
    return mol


def perceive_bonds(mol: Chem.Mol) -> Chem.Mol | None:
    """A copy of an atoms-only molecule with bonds and bond orders from rdDetermineBonds (neutral), and
    stereochemistry from its coordinates; None for more than ``MAX_ATOMS_BOND_PERCEPTION`` atoms or when
    no consistent bond orders exist (valences that do not close: missing hydrogens, ions, radicals)."""
    if mol.GetNumAtoms() > MAX_ATOMS_BOND_PERCEPTION:
        return None
    bonded = Chem.Mol(mol)
    with RDKitLog():
        try:
            rdDetermineBonds.DetermineBonds(bonded, charge=0, embedChiral=False)  # its sanitization: below
            sanitize(bonded)
            Chem.SetDoubleBondNeighborDirections(bonded, bonded.GetConformer())
            Chem.AssignStereochemistryFrom3D(bonded)
        except Exception:  # no consistent bond orders, or elements RDKit has no radii for
            return None
    return bonded
