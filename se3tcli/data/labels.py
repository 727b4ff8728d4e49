"""A target's value in a record's properties (SD tags, extXYZ info keys), in the target's display unit.

A key names the target in any case, with or without a unit: ``homo``, ``HOMO``, ``homo_eV``,
``homo [eV]``, ``homo (Ha)``, ``gap_meV``, ``alpha [bohr3]``, and the names of se3t's own output files
(``Cv_cal_per_mol_K``, :func:`~se3tcli.targets.column_name`). Energies convert from eV, meV, Ha (hartree),
kcal/mol and kJ/mol; the other targets take their own unit (in a few spellings), and a user-defined target
(``logS [log(mol/L)]``) the unit it was defined with. A key with an unknown unit is not used, so a wrong
unit is never read as the right one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping

from se3tcli.targets import HARTREE_TO_EV, INPUT_TAG_SUFFIX, STATUS_TAG, TARGETS, column_name, unit_identifier

_KEY = re.compile(
    r"^\s*(?P<name>[A-Za-z][A-Za-z0-9]*?)\s*"  # the target
    r"(?:\[(?P<square>[^\]]*)\]|\((?P<round>.*)\)|_(?P<suffix>\S+))?\s*$"  # [unit], (unit) or _unit
)

# Factors to each display unit, by unit spelling (lower case, without spaces, "·", "*", "^" and brackets).
_TO_DISPLAY: dict[str, dict[str, float]] = {
    "eV": {"ev": 1.0, "mev": 1e-3, "ha": HARTREE_TO_EV, "hartree": HARTREE_TO_EV, "eh": HARTREE_TO_EV,
           "kcal/mol": 0.0433641153, "kj/mol": 0.0103642688},
    "D": {"d": 1.0, "debye": 1.0},
    "bohr³": {"bohr3": 1.0, "a03": 1.0, "bohr**3": 1.0},
    "bohr²": {"bohr2": 1.0, "a02": 1.0, "bohr**2": 1.0},
    "cal/(mol·K)": {"cal/molk": 1.0, "cal/mol/k": 1.0, "cal/mol.k": 1.0, "cal/k/mol": 1.0},
}  # fmt: skip


def _spelling(unit: str) -> str:
    unit = unit.lower().replace("³", "3").replace("²", "2")
    return re.sub(r"[\s·*^()\[\]]", "", unit)


def unit_factor(target: str, unit: str | None) -> float | None:
    """The factor from ``unit`` to ``target``'s display unit (1 without a unit or in that unit, spelled as
    it was defined or as output columns spell it); None when unknown."""
    display = TARGETS[target].unit
    if unit is None or _spelling(unit) in (_spelling(display), _spelling(unit_identifier(display))):
        return 1.0
    return _TO_DISPLAY.get(display, {}).get(_spelling(unit))


def is_own_prediction(properties: Mapping[str, object], target: str) -> bool:
    """Whether ``target``'s label in a record is se3t's own prediction (its output, without a reference)."""
    if STATUS_TAG not in properties:
        return False
    prediction = column_name(target, TARGETS[target].unit)
    status = {STATUS_TAG: properties[STATUS_TAG]}  # so that a reference's _input suffix is understood
    return prediction in properties and all(
        key == prediction or label_value({key: value} | status, target) is None
        for key, value in properties.items()
    )


def label_value(properties: Mapping[str, object], target: str) -> float | None:
    """``target``'s finite value among ``properties`` in its display unit, or None where none is given.
    The key spelled exactly like the target wins over other spellings. In se3t's own SDF output (records
    with a status tag) the input's values come first, whatever their spelling (``homo_eV_input``,
    ``HOMO [eV]``), and se3t's prediction (``homo_eV``) serves only where the input had none."""
    return next((value for _, value, _ in _labels(properties, target)), None)


def label_conflict(properties: Mapping[str, object], target: str) -> str | None:
    """Where a record gives ``target`` under several keys with values that differ by more than the
    precision they were written with (half a unit of the last digit, converted), which ones:
    ``"homo -6.1, HOMO [eV] -5.9 eV"`` (the first is what :func:`label_value` uses); None otherwise.
    se3t's own prediction in its output files is not a label here."""
    prediction = column_name(target, TARGETS[target].unit) if STATUS_TAG in properties else None
    given = [label for label in _labels(properties, target) if label[0] != prediction]
    first_key, first, first_precision = given[0] if given else ("", 0.0, 0.0)
    if all(abs(value - first) <= first_precision + precision for _, value, precision in given[1:]):
        return None
    values = ", ".join(f"{key} {value:.6g}" for key, value, _ in given)
    return f"{values} {TARGETS[target].unit}".rstrip()


_NUMBER = re.compile(r"\s*[-+]?(?:\d*\.(?P<decimals>\d*)|\d+)(?:[eE](?P<exponent>[-+]?\d+))?\s*")


def _written_precision(text: object) -> float:
    """Half a unit of the last digit a number was written with (``-6.10`` -> 0.005, ``2.5e-3`` ->
    5e-5); 0 for what is not a plain decimal number (an exact value)."""
    match = _NUMBER.fullmatch(str(text))
    if match is None:
        return 0.0
    decimals = len(match["decimals"] or "") - int(match["exponent"] or 0)
    return 0.5 * 10.0**-decimals


def _labels(properties: Mapping[str, object], target: str) -> Iterator[tuple[str, float, float]]:
    """``(key, value, the precision it was written with)`` of every finite label of ``target``, in the
    display unit, the preferred first (see :func:`label_value`)."""
    prediction = column_name(target, TARGETS[target].unit) if STATUS_TAG in properties else None

    def rank(key: str) -> tuple[bool, bool]:
        return key == prediction, key.removesuffix(INPUT_TAG_SUFFIX) != target

    for key in sorted(properties, key=lambda key: rank(str(key))):
        name = str(key).removesuffix(INPUT_TAG_SUFFIX) if prediction else str(key)
        match = _KEY.match(name)
        if match is None or match["name"].lower() != target.lower():
            continue
        factor = unit_factor(target, match["square"] or match["round"] or match["suffix"])
        try:
            value = float(properties[key]) * factor if factor is not None else math.nan
        except (TypeError, ValueError):
            continue
        if math.isfinite(value):
            yield str(key), value, _written_precision(properties[key]) * abs(factor)
