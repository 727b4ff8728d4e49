"""Warnings about a structure's chemistry, judged from its atoms and coordinates: bonds far shorter than
covalent radii allow, atoms bonded to more neighbours than their valence allows, several disconnected
fragments, carbon compounds without hydrogens, isotope labels, a declared open-shell multiplicity, and
(in atoms-only input such as XYZ, where charges are unknown) an odd number of electrons or valences that
do not close. Each is a reason the prediction may be far off; none stops it.

Thresholds were set on 30,000 QM9 molecules (2026-12-01): no pair of their atoms is closer than 0.78 of
the sum of its covalent radii (triple bonds), and with bonds up to 1.2x that sum every one is a single
fragment; the thresholds below leave margin on both. Valences are judged by counting bonded neighbours
(connectivity), not bond orders: bond-order perception (rdDetermineBonds) fails on 5 % of QM9's own
geometries, too often to judge by.
"""

from __future__ import annotations

import numpy as np
import torch
from ase.data import covalent_radii
from rdkit import Chem
from rdkit.Chem import rdDetermineBonds

from se3tcli.elements import symbol
from se3tcli.graph import radius_graph
from se3tcli.io.bonds import MAX_ATOMS_BOND_PERCEPTION, atoms_mol
from se3tcli.io.molecule import Molecule, isotope_warning
from se3tcli.io.rdkit_tools import RDKitLog, sanitize

SHORT_BOND_FACTOR = 0.7  # a pair closer than this times its covalent radii sum is unphysical
BOND_FACTOR = 1.25  # a pair closer than this times its covalent radii sum is bonded (fragments)
# Closer than this, a pair surely is bonded (valences): in 30,000 QM9 molecules no atom has more neighbours
# than MAX_NEIGHBOURS allows within 1.14x (within 1.25x, 4 % do, across small rings).
VALENCE_BOND_FACTOR = 1.1
CLOSURE_BOND_FACTORS = (1.1, 1.15, 1.2)  # connectivities tried for closed valence shells, in order
_ALL_PAIRS_ATOMS = 256  # up to this many atoms, all pairs in numpy beat a neighbour search
# Bonds to hydrogen (Å) by the heavy atom: optimised geometries have them in a narrow range. In 30,000 QM9
# molecules (B3LYP) C-H spans 1.061-1.140, N-H 1.003-1.128, O-H 0.959-1.019; 0.03 Å of margin on either
# side leaves room for other levels of theory, while scaled, distorted and X-ray geometries (C-H 0.93-0.98)
# fall outside.
HYDROGEN_BOND_LENGTHS = {6: (1.03, 1.17), 7: (0.97, 1.16), 8: (0.93, 1.05)}
# The most bonded neighbours a main-group atom can have in a molecule, hypervalent ones included (boron
# clusters 6, SF6, ClO4-, BrF5, IF7). Only bonds between these elements count: elements not listed (metals)
# are neither judged nor counted, so coordination (a μ4-oxo, a metal-bound H) is not a valence problem.
MAX_NEIGHBOURS = {1: 1, 5: 6, 6: 4, 7: 4, 8: 3, 9: 1, 14: 6, 15: 6, 16: 6, 17: 4, 35: 5, 53: 7}


def structure_warnings(molecule: Molecule) -> list[str]:
    """The reasons to distrust the structure of a row that can be predicted ([] when there are none)."""
    numbers, positions = molecule.numbers, molecule.positions
    radii = covalent_radii[numbers]  # [n_atoms] Å
    pairs, distances = _close_pairs(positions, BOND_FACTOR * 2 * float(radii.max()))
    ratio = distances / (radii[pairs[:, 0]] + radii[pairs[:, 1]])  # [n_pairs]
    reasons = []
    if (ratio < SHORT_BOND_FACTOR).any():
        k = int(np.argmin(ratio))
        i, j = pairs[k]
        bond = radii[i] + radii[j]
        reasons.append(
            f"atoms {i + 1} and {j + 1} ({symbol(int(numbers[i]))}-{symbol(int(numbers[j]))}) are "
            f"{distances[k]:.2f} Å apart, far shorter than a bond between them (~{bond:.2f} Å): "
            "an unphysical geometry"
        )
    over_bonded = _valence_warnings(numbers, pairs[ratio < VALENCE_BOND_FACTOR])
    reasons += over_bonded
    if not reasons:  # a bond far too short already says the geometry is wrong
        reasons += _hydrogen_bond_warnings(numbers, pairs, distances)
    bonded = pairs[ratio < BOND_FACTOR]
    n_fragments = _count_fragments(len(numbers), bonded)
    if n_fragments > 1:
        reasons.append(
            f"{n_fragments} disconnected fragments, predicted as one molecule (the training molecules "
            "are single fragments)"
        )
    if not (numbers == 1).any() and (numbers == 6).sum() >= 2:  # carbon chemistry without hydrogens
        reasons.append(
            "no hydrogen atoms (files often leave them out, and the model needs every atom; "
            "ignore this if the molecule has none)"
        )
    charge = _charge(molecule)
    even = charge is not None and (int(numbers.sum()) - charge) % 2 == 0  # else the electrons say it
    if molecule.rdkit_mol is None and even and not over_bonded:  # RDKit molecules had their valences checked
        reasons += _closure_warnings(numbers, positions, pairs, ratio, charge)
    return reasons + _electron_warnings(molecule) + _isotope_warnings(molecule)


def _isotope_warnings(molecule: Molecule) -> list[str]:
    """Isotope labels of an RDKit molecule (SDF ``M  ISO``, SMILES ``[2H]``); ASE masses are judged where
    the atoms are read."""
    if molecule.rdkit_mol is None:
        return []
    table = Chem.GetPeriodicTable()
    labels = [
        f"{atom.GetIsotope()}{atom.GetSymbol()}"
        for atom in molecule.rdkit_mol.GetAtoms()
        if atom.GetIsotope() not in (0, table.GetMostCommonIsotope(atom.GetAtomicNum()))
    ]
    return [isotope_warning(labels)] if labels else []


def _closure_warnings(
    numbers: np.ndarray, positions: np.ndarray, pairs: np.ndarray, ratio: np.ndarray, charge: int
) -> list[str]:
    """Atoms-only input: whether bond orders exist that give every atom a closed valence shell, for the
    pairs bonded within 1.1x their covalent radii, or else 1.15x or 1.2x (strained cages have bonds up
    to 1.14x): RDKit's bond-order assignment on that connectivity closes all of QM9's 130,831 molecules,
    where RDKit's own connectivity fails on 5 %; 45 of them (mesoionic rings, carbanion zwitterions)
    only with a charged carbon. Judged for main-group atoms only, up to
    :data:`~se3tcli.io.bonds.MAX_ATOMS_BOND_PERCEPTION` atoms."""
    if len(numbers) > MAX_ATOMS_BOND_PERCEPTION or not all(int(z) in MAX_NEIGHBOURS for z in numbers):
        return []
    verdicts = set()
    for factor in CLOSURE_BOND_FACTORS:
        verdicts.add(_closure(numbers, positions, pairs[ratio < factor], charge))
        if CLOSED in verdicts:
            return []
    if CLOSED_WITH_CHARGED_CARBON in verdicts:
        return [
            "valences close only with a charged carbon or a bare proton (as an ylide would: hydrogens "
            "missing?)"
        ]
    return [
        "valences do not close: no bond orders give every atom a closed shell (a hydrogen missing, or a "
        "radical or an ion?)"
    ]


CLOSED, CLOSED_WITH_CHARGED_CARBON = "closed", "closed with a charged carbon"


def _closure(numbers: np.ndarray, positions: np.ndarray, bonds: np.ndarray, charge: int) -> str | None:
    """Whether bond orders on ``bonds`` give every atom a closed shell: :data:`CLOSED` without formal
    charges or with charges of the kinds closed-shell molecules have (see :func:`_plausible_charges`),
    :data:`CLOSED_WITH_CHARGED_CARBON` only with others, None not at all."""
    verdict = None
    for charged in (False, True):
        mol = Chem.RWMol(atoms_mol(numbers, positions))
        for i, j in bonds.tolist():
            mol.AddBond(i, j, Chem.BondType.SINGLE)
        with RDKitLog():
            try:
                rdDetermineBonds.DetermineBondOrders(
                    mol, charge=charge, allowChargedFragments=charged, embedChiral=False
                )
                sanitize(mol)  # in bounded time, where DetermineBondOrders' own would not be
            except Exception:  # no bond orders fit
                continue
        if not any(atom.GetNumRadicalElectrons() for atom in mol.GetAtoms()):
            if charge or _plausible_charges(mol):  # a declared ion may well be a carbocation
                return CLOSED
            verdict = CLOSED_WITH_CHARGED_CARBON
    return verdict


def _plausible_charges(mol: Chem.Mol) -> bool:
    """Formal charges that closed-shell molecules carry: on any atom but hydrogen (a bare proton) and
    carbon, where only a terminal C- (isocyanides, CO) is. In QM9, 473 of 130,831 molecules close only
    with charges (zwitterions and nitro groups 411, isocyanides 37, CO-like, azides and ozone-like 21,
    mesoionic rings and carbanions 45); a methyl group that lost two hydrogens closes as an ylide."""
    for atom in mol.GetAtoms():
        q, z = atom.GetFormalCharge(), atom.GetAtomicNum()
        if q and (z == 1 or (z == 6 and (q != -1 or atom.GetDegree() != 1))):
            return False
    return True


MULTIPLICITY_KEYS = ("multiplicity", "mult", "spin_multiplicity")  # 2S + 1, as extXYZ files declare it


def _declared(molecule: Molecule, keys: tuple[str, ...] = ("charge",), default: str = "0") -> str:
    return next((v for k, v in molecule.properties.items() if k.lower() in keys), default)


def _whole_number(text: str) -> int | None:
    """``text`` as an integer where it is a whole number (within 0.01: sums of partial charges), else
    None."""
    try:
        value = float(text)
        return round(value) if abs(value - round(value)) <= 0.01 else None
    except (ValueError, OverflowError):
        return None


def _charge(molecule: Molecule) -> int | None:
    """The net charge an atoms-only record declares (extXYZ ``charge=``, else ASE per-atom charges; 0
    without either; None when ``charge=`` is not a whole number)."""
    if any(k.lower() == "charge" for k in molecule.properties):
        return _whole_number(_declared(molecule))
    return molecule.net_charge or 0


def _net_charge(molecule: Molecule) -> int | None:
    """An RDKit molecule's formal charges summed, else what an atoms-only record declares (`_charge`)."""
    mol = molecule.rdkit_mol
    return sum(a.GetFormalCharge() for a in mol.GetAtoms()) if mol is not None else _charge(molecule)


def electron_count(molecule: Molecule) -> int | None:
    """The molecule's electrons: its atomic numbers less its net charge; None where the declared charge is
    not a whole number."""
    charge = _net_charge(molecule)
    return None if charge is None else int(molecule.numbers.sum()) - charge


MULTIPLICITY_WORDS = {"singlet": 1, "doublet": 2, "triplet": 3, "quartet": 4, "quintet": 5}


def _multiplicity(molecule: Molecule) -> int | None:
    """The spin multiplicity a record declares (``multiplicity=3``, ``mult=triplet``), or None."""
    text = _declared(molecule, MULTIPLICITY_KEYS, "")
    return MULTIPLICITY_WORDS.get(text.strip().lower(), _whole_number(text))


def _hydrogen_bond_warnings(numbers: np.ndarray, pairs: np.ndarray, distances: np.ndarray) -> list[str]:
    """Bonds from hydrogens to their nearest atom, where that is C, N or O, outside the lengths of
    :data:`HYDROGEN_BOND_LENGTHS`: the worst one, and how many there are."""
    h = np.concatenate([pairs[:, 0], pairs[:, 1]])  # [2 n_pairs] both directions of each pair
    other = np.concatenate([pairs[:, 1], pairs[:, 0]])
    length = np.concatenate([distances, distances])  # Å
    from_h = numbers[h] == 1
    h, other, length = h[from_h], other[from_h], length[from_h]
    order = np.lexsort((length, h))  # by hydrogen, nearest partner first
    h, other, length = h[order], other[order], length[order]
    nearest = np.r_[True, h[1:] != h[:-1]] if len(h) else np.zeros(0, bool)
    h, other, length = h[nearest], other[nearest], length[nearest]  # [n_h] each hydrogen's nearest atom
    limits = np.array([HYDROGEN_BOND_LENGTHS.get(int(z), (0.0, np.inf)) for z in numbers[other]])
    low, high = limits.reshape(-1, 2).T  # [n_h] Å each; no limits for partners other than C, N, O
    outside = np.maximum(low - length, length - high)  # [n_h] Å beyond the range (> 0: out of it)
    bad = np.flatnonzero(outside > 0)
    if not len(bad):
        return []
    k = int(bad[np.argmax(outside[bad])])
    i, j = int(h[k]), int(other[k])
    more = len(bad) - 1
    others = f" (and {more} more such bond{'s' if more > 1 else ''})" if more else ""
    return [
        f"{symbol(int(numbers[j]))}-H bond of {length[k]:.3f} Å between atoms {j + 1} and {i + 1}{others}, "
        f"outside the {low[k]:.2f}-{high[k]:.2f} Å of optimised geometries: a scaled, distorted or X-ray "
        "geometry?"
    ]


def _valence_warnings(numbers: np.ndarray, bonded: np.ndarray) -> list[str]:
    """The first atom with more bonded neighbours than :data:`MAX_NEIGHBOURS` allows, and how many such
    atoms there are (``bonded``: ``[n_bonds, 2]`` atom pairs)."""
    judged = np.array([int(z) in MAX_NEIGHBOURS for z in numbers])  # [n_atoms]
    covalent = bonded[judged[bonded].all(axis=1)]  # bonds between main-group atoms
    neighbours = np.bincount(covalent.ravel(), minlength=len(numbers))  # [n_atoms]
    allowed = np.array([MAX_NEIGHBOURS.get(int(z), len(numbers)) for z in numbers])
    over = np.flatnonzero(neighbours > allowed)
    if not len(over):
        return []
    i = int(over[0])
    others = f" (and {len(over) - 1} more atoms)" if len(over) > 1 else ""
    return [
        f"atom {i + 1} ({symbol(int(numbers[i]))}) has {neighbours[i]} bonded neighbours, more than its "
        f"valence allows ({allowed[i]}){others}: atoms too close or misplaced"
    ]


def _electron_warnings(molecule: Molecule) -> list[str]:
    """A net charge and unpaired electrons: an RDKit molecule's formal charges and radicals; for atoms
    only, the charge the record declares (extXYZ ``charge=``) and the parity of the electron count."""
    charge, mol = _net_charge(molecule), molecule.rdkit_mol
    if charge is None:  # atoms only
        return [f"charge={_declared(molecule)!r} is not a whole number"]
    if mol is not None:
        radicals = sum(atom.GetNumRadicalElectrons() for atom in mol.GetAtoms())
        unpaired = f"{radicals} radical electron(s)" if radicals else ""
    else:
        odd = electron_count(molecule) % 2
        unpaired = "an odd number of electrons" + ("" if charge else " (a hydrogen missing?)") if odd else ""
        multiplicity = _multiplicity(molecule)
        if not unpaired and multiplicity is not None and multiplicity > 1:
            unpaired = f"multiplicity {multiplicity} declared"
    warnings = [f"net charge {charge:+d}; the model was trained on neutral molecules"] if charge else []
    if unpaired:
        warnings.append(
            f"{unpaired}: an open shell (a radical), while the model was trained on closed shells"
        )
    return warnings


def _close_pairs(positions: np.ndarray, cutoff: float) -> tuple[np.ndarray, np.ndarray]:
    """Every pair of atoms closer than ``cutoff`` Å once (``[n_pairs, 2]``, i < j) and its distance."""
    if len(positions) <= _ALL_PAIRS_ATOMS:
        i, j = np.triu_indices(len(positions), 1)
        distances = np.linalg.norm(positions[i] - positions[j], axis=1)  # [n_atoms (n_atoms - 1) / 2] Å
        close = distances < cutoff
        return np.stack([i[close], j[close]], axis=1), distances[close]
    pos = torch.from_numpy(np.ascontiguousarray(positions, dtype=np.float64))
    src, dst = radius_graph(pos, torch.zeros(len(pos), dtype=torch.long), 1, cutoff)
    keep = src < dst
    pairs = torch.stack([src[keep], dst[keep]], dim=1).numpy()
    distances = np.linalg.norm(positions[pairs[:, 0]] - positions[pairs[:, 1]], axis=1)
    return pairs, distances


def _count_fragments(n_atoms: int, bonds: np.ndarray) -> int:
    """Connected components of the atoms joined by ``bonds`` ([n_bonds, 2]): every atom's label becomes
    the smallest atom index it is connected to (labels hook onto the smaller one across each bond, then
    follow their chains to the end, until nothing changes)."""
    labels = np.arange(n_atoms)
    while True:
        ends = labels[bonds]  # [n_bonds, 2] labels of both ends
        hooked = labels.copy()
        np.minimum.at(hooked, ends.ravel(), np.repeat(ends.min(axis=1), 2))
        while not np.array_equal(hooked, hooked[hooked]):
            hooked = hooked[hooked]
        if np.array_equal(hooked, labels):
            return int((labels == np.arange(n_atoms)).sum())
        labels = hooked
