"""Registry of the predictable molecular properties (the 12 standard QM9 targets).

Each target knows its display unit, the factor from the raw QM9 unit to that unit, and whether it is
extensive (grows with molecule size, so it is predicted as a sum of atomic contributions and gets
per-element atom references).
"""

from __future__ import annotations

from dataclasses import dataclass

HARTREE_TO_EV = 27.211386245988
# Dipole of one elementary charge times one ångström, in debye.
E_ANGSTROM_TO_DEBYE = 4.803204544


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    unit: str  # display unit of predictions
    raw_unit: str  # unit of the QM9 source data
    factor: float  # display = raw * factor
    extensive: bool  # predicted as a sum over atoms, with atom references
    error_unit: str  # unit used to report errors (meV for orbital energies)
    error_factor: float  # error_unit = unit * error_factor


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("mu", "dipole moment |μ|", "D", "D", 1.0, False, "D", 1.0),
        Target("alpha", "isotropic polarizability", "bohr³", "bohr³", 1.0, True, "bohr³", 1.0),
        Target("homo", "HOMO energy", "eV", "Ha", HARTREE_TO_EV, False, "meV", 1000.0),
        Target("lumo", "LUMO energy", "eV", "Ha", HARTREE_TO_EV, False, "meV", 1000.0),
        Target("gap", "HOMO-LUMO gap", "eV", "Ha", HARTREE_TO_EV, False, "meV", 1000.0),
        Target("r2", "electronic spatial extent <R²>", "bohr²", "bohr²", 1.0, True, "bohr²", 1.0),
        Target("zpve", "zero-point vibrational energy", "eV", "Ha", HARTREE_TO_EV, True, "meV", 1000.0),
        Target("U0", "internal energy at 0 K", "eV", "Ha", HARTREE_TO_EV, True, "meV", 1000.0),
        Target("U", "internal energy at 298.15 K", "eV", "Ha", HARTREE_TO_EV, True, "meV", 1000.0),
        Target("H", "enthalpy at 298.15 K", "eV", "Ha", HARTREE_TO_EV, True, "meV", 1000.0),
        Target("G", "free energy at 298.15 K", "eV", "Ha", HARTREE_TO_EV, True, "meV", 1000.0),
        Target(
            "Cv", "heat capacity at 298.15 K", "cal/(mol·K)", "cal/(mol·K)", 1.0, True, "cal/(mol·K)", 1.0
        ),
    )
}

QM9_TARGETS: tuple[str, ...] = tuple(TARGETS)

# Targets that get per-element atom references fitted on the training split.
ATOM_REF_TARGETS: tuple[str, ...] = ("U0", "U", "H", "G")

# Test MAE of the SE(3)-Transformer paper (Fuchs et al., 2020), in each target's error unit.
PAPER_MAE: dict[str, float] = {
    "alpha": 0.142,
    "gap": 53.0,
    "homo": 35.0,
    "lumo": 33.0,
    "mu": 0.051,
    "Cv": 0.054,
}


def parse_targets(spec: str | None, available: tuple[str, ...] = QM9_TARGETS) -> tuple[str, ...]:
    """Parse a comma-separated target list (case-insensitive); ``None``/"all" means every available one."""
    if spec is None or spec.strip().lower() in ("", "all"):
        return tuple(available)
    by_lower = {name.lower(): name for name in available}
    chosen: list[str] = []
    for item in spec.split(","):
        key = item.strip().lower()
        if not key:
            continue
        if key not in by_lower:
            raise ValueError(f"unknown target {item.strip()!r}; choose from {', '.join(available)}")
        if by_lower[key] not in chosen:
            chosen.append(by_lower[key])
    if not chosen:
        raise ValueError("no target given")
    return tuple(chosen)
