"""An ASE calculator for what se3t can honestly give about a structure: the dipole vector, and the
scalar QM9 properties of the molecule as it is.

    from se3tcli.calculator import SE3TCalculator
    atoms.calc = SE3TCalculator()          # the bundled model, on the CPU
    atoms.get_dipole_moment()              # e·Å, ASE's unit, in the structure's axes
    atoms.calc.results["se3t"]             # {"homo": (value, "eV"), "homo_sigma": (sigma, "eV"), ...,
                                           #  "status": ..., "message": ...}

Limits: no energy and no forces. The model predicts QM9's properties of molecules at their DFT
equilibrium geometries (U0 is the internal energy at 0 K of the optimised molecule, zero-point energy
included); it never saw a distorted structure, so its U0 is not a potential-energy surface, and its
gradient is not a force field for optimisation or dynamics. The statuses and messages are those of
``se3t predict`` (elements the model does not know are errors; molecules outside its training domain get
warnings).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from ase.calculators.calculator import Calculator, CalculatorError, all_changes

from se3tcli.api import load_model
from se3tcli.io.molecule import Record
from se3tcli.io.objects import ASE_SOURCE
from se3tcli.io.xyz import molecule_from_atoms
from se3tcli.predict import output_units, predict_stream
from se3tcli.targets import DIPOLE_COMPONENTS, E_ANGSTROM_TO_DEBYE


class SE3TCalculator(Calculator):
    """ASE ``Calculator`` with the ``dipole`` property (e·Å) and all scalar predictions (and their sigmas,
    for a model with an uncertainty head) under ``results["se3t"]``; ``model``: a bundled model's name or
    a checkpoint path."""

    implemented_properties = ["dipole"]

    def __init__(self, model: str | None = None, device: str = "cpu", **kwargs: Any):
        super().__init__(**kwargs)
        self.predictor = load_model(model, device)

    def calculate(self, atoms=None, properties=("dipole",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        loaded = self.predictor.loaded
        row = molecule_from_atoms(Record(ASE_SOURCE, 0), self.atoms, with_info=False)
        ((molecule, values),) = predict_stream(loaded, [row], self.predictor.device)  # predict's row
        if values is None:
            raise CalculatorError(molecule.message)
        if DIPOLE_COMPONENTS[0] not in values:
            raise CalculatorError(f"{loaded.path.name} has no dipole head, so it gives no dipole vector")
        debye = np.array([values[c] for c in DIPOLE_COMPONENTS])  # [3] D, in the structure's axes
        self.results["dipole"] = debye / E_ANGSTROM_TO_DEBYE  # [3] e·Å
        units = output_units(loaded, loaded.targets)
        summary: dict[str, Any] = {q: (values[q], u) for q, u in units.items() if q not in DIPOLE_COMPONENTS}
        self.results["se3t"] = summary | {"status": molecule.status, "message": molecule.message}
