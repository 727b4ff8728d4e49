"""Registry of the predictable molecular properties: the 12 standard QM9 targets, and the ones a user
defines to fine-tune a model (:func:`user_target`; a model config's ``user_targets`` adds them here).

Each target knows its display unit, the factor from the raw QM9 unit to that unit, and whether it is
extensive (grows with molecule size, so it is predicted as a sum of atomic contributions and gets
per-element atom references).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

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

# A model with a dipole head also gives the dipole vector whose norm is mu: its components, in debye, in
# the axes of the input coordinates (molecules are centred, never rotated, before the model sees them).
DIPOLE_COMPONENTS: tuple[str, ...] = ("mu_x", "mu_y", "mu_z")
DIPOLE_UNIT = "D"

# Each display unit spelled as an identifier, for the value columns of output files (see column_name).
UNIT_IDENTIFIERS: dict[str, str] = {
    "eV": "eV",
    "D": "D",
    "bohr³": "bohr3",
    "bohr²": "bohr2",
    "cal/(mol·K)": "cal_per_mol_K",
}


# se3t's SDF output: the tag of each record's status, and the suffix that keeps an input tag named like
# one of the predicted values (``homo_eV`` -> ``homo_eV_input``).
STATUS_TAG = "se3t_status"
INPUT_TAG_SUFFIX = "_input"


def sigma_key(target: str) -> str:
    """The name of a target's standard deviation in a model's outputs and in predictions (``homo_sigma``;
    in files ``homo_sigma_eV``). User targets' names have no underscore, so it never names a target."""
    return f"{target}_sigma"


def column_name(quantity: str, unit: str) -> str:
    """The name of a value in output files and DataFrames (CSV column, SD tag, JSON key):
    ``<quantity>_<unit>`` with the unit as an identifier (``homo_eV``, ``alpha_bohr3``, ``mu_x_D``,
    ``Cv_cal_per_mol_K``); the bare quantity without a unit."""
    return f"{quantity}_{unit_identifier(unit)}" if unit else quantity


def unit_identifier(unit: str) -> str:
    """:data:`UNIT_IDENTIFIERS`' spelling, or for a user target's unit its letters and digits with ``/`` as
    ``per`` (``log(mol/L)`` -> ``log_mol_per_L``)."""
    known = UNIT_IDENTIFIERS.get(unit)
    return known or re.sub(r"\W+", "_", unit.replace("/", "_per_")).strip("_") or "unit"


# QM9 targets that get per-element atom references fitted on the training split (see has_atom_refs).
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

# Test MAE of NVIDIA's optimised SE(3)-Transformer (HOMO only; one A100, AMP, 100 epochs), in meV.
NVIDIA_MAE: dict[str, float] = {"homo": 29.9}


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


def has_atom_refs(name: str) -> bool:
    """Whether per-element references are fitted for a target: QM9's energies U0, U, H and G, and every
    extensive target a user defines (a sum of atomic contributions, whose per-element part they fit)."""
    return name in ATOM_REF_TARGETS or (name not in QM9_TARGETS and TARGETS[name].extensive)


# ----------------------------------------------------------------------------- targets the user defines

# How label keys name a target (see data/labels.py): a letter, then letters and digits.
_USER_NAME = re.compile(r"[A-Za-z][A-Za-z0-9]*")
KINDS = {"intensive": False, "extensive": True}  # the optional third part of NAME:UNIT:KIND


def user_target(name: str, unit: str, extensive: bool = False) -> Target:
    """A property QM9 lacks (``logS`` in ``log(mol/L)``): values and errors in ``unit``; intensive (a mean
    over atoms) unless ``extensive`` (a sum over atoms, with per-element references). ValueError for a
    name that is not a letter followed by letters and digits or that is QM9's, or an empty unit, or one
    with a comma, colon or line break (the separators of ``--targets``)."""
    if not isinstance(name, str) or not _USER_NAME.fullmatch(name):
        raise ValueError(f"a new target's name is a letter followed by letters and digits, not {name!r}")
    builtin = {t.lower(): t for t in QM9_TARGETS}.get(name.lower())
    if builtin:
        raise ValueError(
            f"{name!r} is QM9's {builtin!r} (in {TARGETS[builtin].unit}): give it without a unit"
        )
    if not isinstance(unit, str) or not unit.strip() or any(c in unit for c in ",:\n\r"):
        raise ValueError(f"target {name!r} needs a unit without commas, colons or line breaks, not {unit!r}")
    if not isinstance(extensive, bool):
        raise ValueError(f"target {name!r}: 'extensive' must be true or false, not {extensive!r}")
    return Target(name, f"user-defined, in {unit}", unit, unit, 1.0, extensive, unit, 1.0)


def user_definition(target: Target) -> dict[str, Any]:
    """How a model config records a user target: ``{"unit": str, "extensive": bool}``."""
    return {"unit": target.unit, "extensive": target.extensive}


def define_targets(definitions: Mapping[str, Any]) -> None:
    """Add user targets ``{name: {"unit": str, "extensive": bool}}`` (a model config's ``user_targets``)
    to :data:`TARGETS`, so that whatever looks a target up by name (tables, label keys, model cards,
    errors) finds its unit. ValueError for a bad definition or one that contradicts a target this
    process already knows by that name (two models that define one name differently)."""
    targets = {}
    for name, definition in definitions.items():
        if not isinstance(definition, Mapping) or set(definition) - {"unit", "extensive"}:
            raise ValueError(f"target {name!r}: a definition is {{'unit': ..., 'extensive': ...}}")
        target = user_target(name, definition.get("unit", ""), definition.get("extensive", False))
        known = TARGETS.get(name, target)
        if known != target:
            raise ValueError(
                f"target {name!r} is already defined in {known.unit} ({_kind(known)}) here, "
                f"not in {target.unit} ({_kind(target)})"
            )
        targets[name] = target
    TARGETS.update(targets)  # all or none


def _kind(target: Target) -> str:
    return "extensive" if target.extensive else "intensive"


def parse_train_targets(
    spec: str, available: tuple[str, ...]
) -> tuple[tuple[str, ...], dict[str, dict[str, Any]]]:
    """``se3t train --targets``: ``(names, the new ones' definitions)``. ``available`` targets by name in
    any case ("all": every one); a new target as ``NAME:UNIT``, or ``NAME:UNIT:extensive`` for a sum over
    atoms (default ``intensive``: a mean). Other names are kept as written, for the run to look up among
    the ``--init-from`` model's own targets."""
    if spec.strip().lower() in ("", "all"):
        return tuple(available), {}
    by_lower = {name.lower(): name for name in available}
    names: list[str] = []
    defined: dict[str, dict[str, Any]] = {}
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        name, *rest = (part.strip() for part in item.split(":"))
        if rest:
            kind = rest[1].lower() if len(rest) == 2 else "intensive"
            if len(rest) > 2 or kind not in KINDS:
                raise ValueError(f"{item!r}: give a new target as NAME:UNIT or NAME:UNIT:extensive")
            definition = user_definition(user_target(name, rest[0], KINDS[kind]))
            if defined.setdefault(name, definition) != definition:
                raise ValueError(f"target {name!r} is defined twice, differently")
        else:
            name = by_lower.get(name.lower(), name)
        if name not in names:
            names.append(name)
    if not names:
        raise ValueError("no target given")
    return tuple(names), defined
