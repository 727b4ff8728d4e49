"""Element symbols of atomic numbers."""

from __future__ import annotations

from ase.data import chemical_symbols


def symbol(z: int) -> str:
    """Element symbol of atomic number ``z``: ``X`` for 0 (as in ASE), ``Z<n>`` for numbers ASE lacks."""
    return chemical_symbols[z] if 0 <= z < len(chemical_symbols) else f"Z{z}"
