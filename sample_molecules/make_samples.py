"""Regenerate the sample molecule files in this folder.

Usage: ``python sample_molecules/make_samples.py`` (needs rdkit and the ``qm9pack`` wheel; run from anywhere).

- ``qm9_sample.sdf`` / ``qm9_sample.xyz``: ten QM9 molecules with their DFT coordinates (Å) and HOMO/LUMO/gap
  (eV) taken from the CSV files shipped in ``qm9pack``. Bonds come from the coordinates
  (``rdDetermineBonds.DetermineBonds``, charge 0); a molecule whose perceived bonds do not reproduce the
  QM9 SMILES is replaced by the next QM9 index.
- ``drugs.smi``: five drug molecules as SMILES with names.
- ``bad.sdf``: four records that exercise the reader's error handling (see README.md).
"""

from __future__ import annotations

import csv
import importlib.util
import re
from pathlib import Path

from rdkit import Chem
from rdkit.Chem import AllChem, rdDetermineBonds
from rdkit.Geometry import Point3D

HERE = Path(__file__).resolve().parent
HARTREE_TO_EV = 27.211386245988
QM9_INDICES = (1, 2, 3, 5, 20, 829, 1000, 4208, 20000, 100000)
MAX_REPLACEMENT_TRIES = 20
NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
SYMBOL = re.compile(r"'([A-Za-z]+)'")

DRUGS = (
    ("CC(=O)Oc1ccccc1C(=O)O", "aspirin"),
    ("Cn1c(=O)c2c(ncn2C)n(C)c1=O", "caffeine"),
    ("CC(=O)Nc1ccc(O)cc1", "paracetamol"),
    ("CC(C)Cc1ccc(cc1)C(C)C(=O)O", "ibuprofen"),
    ("CN1CCC[C@H]1c1cccnc1", "nicotine"),
)

# Methane with five hydrogens: parses, but RDKit's sanitization rejects the pentavalent carbon.
PENTAVALENT_CARBON = """pentavalent_carbon
  handmade        3D

  6  5  0  0  0  0  0  0  0  0999 V2000
    0.0000    0.0000    0.0000 C   0  0  0  0  0  0  0  0  0  0  0  0
    0.0000    0.0000    1.0900 H   0  0  0  0  0  0  0  0  0  0  0  0
    0.0000    0.0000   -1.0900 H   0  0  0  0  0  0  0  0  0  0  0  0
    1.0900    0.0000    0.0000 H   0  0  0  0  0  0  0  0  0  0  0  0
   -0.5450    0.9440    0.0000 H   0  0  0  0  0  0  0  0  0  0  0  0
   -0.5450   -0.9440    0.0000 H   0  0  0  0  0  0  0  0  0  0  0  0
  1  2  1  0
  1  3  1  0
  1  4  1  0
  1  5  1  0
  1  6  1  0
M  END
$$$$
"""

# Methane with one hydrogen replaced by a dummy atom "*" (atomic number 0): valid RDKit, not chemistry.
DUMMY_ATOM = """dummy_atom
  handmade        3D

  5  4  0  0  0  0  0  0  0  0999 V2000
   -0.1246   -0.1825    0.8180 *   0  0  0  0  0  0  0  0  0  0  0  0
    0.0223    0.0041    0.0708 C   0  0  0  0  0  0  0  0  0  0  0  0
    0.0486    1.0831   -0.1652 H   0  0  0  0  0  0  0  0  0  0  0  0
    0.9424   -0.4980   -0.2934 H   0  0  0  0  0  0  0  0  0  0  0  0
   -0.8887   -0.4067   -0.4302 H   0  0  0  0  0  0  0  0  0  0  0  0
  1  2  1  0
  2  3  1  0
  2  4  1  0
  2  5  1  0
M  END
$$$$
"""


def qm9_rows(indices: set[int]) -> dict[int, dict[str, str]]:
    """CSV rows (column -> text) of the wanted QM9 indices, read from the qm9pack data files."""
    spec = importlib.util.find_spec("qm9pack")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("qm9pack is not installed: pip install qm9pack")
    data = Path(spec.submodule_search_locations[0]) / "data"
    rows: dict[int, dict[str, str]] = {}
    for part in sorted(data.glob("qm9_part*.csv")):
        with part.open(newline="") as handle:
            header = next(csv.reader([handle.readline()]))
            for line in handle:
                index = int(line.split(",", 2)[1])
                if index in indices:
                    rows[index] = dict(zip(header, next(csv.reader([line])), strict=True))
    return rows


def qm9_molecule(row: dict[str, str]) -> Chem.Mol | None:
    """The QM9 molecule with bonds perceived from its coordinates, or None if they miss the QM9 SMILES."""
    symbols = SYMBOL.findall(row["Elements"])
    coords = [float(x) for x in NUMBER.findall(row["XYZ_Ang"])]  # flat [n_atoms * 3] Å
    if len(coords) != 3 * len(symbols):
        return None
    rw = Chem.RWMol()
    for symbol in symbols:
        rw.AddAtom(Chem.Atom(symbol))
    conformer = Chem.Conformer(len(symbols))
    for i in range(len(symbols)):
        conformer.SetAtomPosition(i, Point3D(*coords[3 * i : 3 * i + 3]))
    conformer.Set3D(True)
    rw.AddConformer(conformer, assignId=True)
    mol = rw.GetMol()
    try:
        rdDetermineBonds.DetermineBonds(mol, charge=0)
    except ValueError:
        return None
    reference = Chem.MolFromSmiles(row["SMILES"])
    if reference is None or canonical(mol) != canonical(reference):
        return None
    index = int(row["Index"])
    mol.SetProp("_Name", f"gdb_{index}")
    mol.SetProp("qm9_index", str(index))
    mol.SetProp("smiles", row["SMILES"])
    for tag, column in (("homo_eV", "HOMO_au"), ("lumo_eV", "LUMO_au"), ("gap_eV", "HOMO_LUMO_gap_au")):
        mol.SetProp(tag, f"{float(row[column]) * HARTREE_TO_EV:.6f}")
    return mol


def canonical(mol: Chem.Mol) -> str:
    """Canonical SMILES without stereochemistry or explicit hydrogens."""
    return Chem.MolToSmiles(Chem.RemoveHs(mol), isomericSmiles=False)


def pick_qm9() -> list[Chem.Mol]:
    """One molecule per wanted index (or the next index whose bonds can be perceived)."""
    candidates = {i + k for i in QM9_INDICES for k in range(MAX_REPLACEMENT_TRIES)}
    rows = qm9_rows(candidates)
    picked = []
    for wanted in QM9_INDICES:
        for index in range(wanted, wanted + MAX_REPLACEMENT_TRIES):
            mol = qm9_molecule(rows[index]) if index in rows else None
            if mol is not None:
                picked.append(mol)
                break
        else:
            raise SystemExit(f"no usable QM9 molecule near index {wanted}")
    return picked


def write_qm9(molecules: list[Chem.Mol]) -> None:
    with Chem.SDWriter(str(HERE / "qm9_sample.sdf")) as writer:
        for mol in molecules:
            writer.write(mol)
    with (HERE / "qm9_sample.xyz").open("w") as handle:
        for mol in molecules:
            handle.write(f"{mol.GetNumAtoms()}\n{mol.GetProp('_Name')}\n")
            for atom, (x, y, z) in zip(mol.GetAtoms(), mol.GetConformer().GetPositions(), strict=True):
                handle.write(f"{atom.GetSymbol():<2} {x:14.10f} {y:14.10f} {z:14.10f}\n")


def write_drugs() -> None:
    lines = ["# SMILES name: drug molecules (no coordinates; se3t generates conformers)"]
    lines += [f"{smiles} {name}" for smiles, name in DRUGS]
    (HERE / "drugs.smi").write_text("\n".join(lines) + "\n")


def write_bad() -> None:
    ethanol_2d = Chem.MolFromSmiles("CCO")  # heavy atoms only, flat drawing coordinates
    AllChem.Compute2DCoords(ethanol_2d)
    ethanol_2d.SetProp("_Name", "ethanol_2d")
    glycine = Chem.AddHs(Chem.MolFromSmiles("NCC(=O)O"))
    params = AllChem.ETKDGv3()
    params.randomSeed = 7
    AllChem.EmbedMolecule(glycine, params)
    AllChem.MMFFOptimizeMolecule(glycine)
    glycine.SetProp("_Name", "glycine_3d")
    records = [PENTAVALENT_CARBON, DUMMY_ATOM]
    records += [Chem.MolToMolBlock(m) + "$$$$\n" for m in (ethanol_2d, glycine)]
    (HERE / "bad.sdf").write_text("".join(records))


def main() -> None:
    write_qm9(pick_qm9())
    write_drugs()
    write_bad()


if __name__ == "__main__":
    main()
