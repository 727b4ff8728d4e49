"""An ASE calculator for what se3t can honestly give about a structure: the dipole vector, and the
scalar QM9 properties of the molecule as it is.

    from se3tcli.calculator import SE3TCalculator
    atoms.calc = SE3TCalculator()          # the bundled model, on the CPU
    atoms.get_dipole_moment()              # e·Å, ASE's unit, in the structure's axes
    atoms.calc.results["se3t"]             # {"homo": (value, "eV"), ..., "status": ..., "message": ...}

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
import torch
from ase.calculators.calculator import Calculator, CalculatorError, all_changes

from se3tcli.api import load_model
from se3tcli.graph import collate
from se3tcli.io import STATUS_ERROR
from se3tcli.io.molecule import Record
from se3tcli.io.objects import ASE_SOURCE
from se3tcli.io.xyz import molecule_from_atoms
from se3tcli.model.heads import MU_VECTOR
from se3tcli.predict import check_domain
from se3tcli.targets import E_ANGSTROM_TO_DEBYE


class SE3TCalculator(Calculator):
    """ASE ``Calculator`` with the ``dipole`` property (e·Å) and all scalar predictions under
    ``results["se3t"]``; ``model``: a bundled model's name or a checkpoint path."""

    implemented_properties = ["dipole"]

    def __init__(self, model: str | None = None, device: str = "cpu", **kwargs: Any):
        super().__init__(**kwargs)
        self.predictor = load_model(model, device)

    def calculate(self, atoms=None, properties=("dipole",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        loaded = self.predictor.loaded
        row = molecule_from_atoms(Record(ASE_SOURCE, 0), self.atoms, with_info=False)
        molecule = check_domain(row, loaded)
        if molecule.status == STATUS_ERROR:
            raise CalculatorError(molecule.message)
        batch = collate([(molecule.numbers, molecule.positions)], loaded.model.config.cutoff)
        with torch.inference_mode():
            out = loaded.model(batch.to(self.predictor.device))
        if MU_VECTOR not in out:
            raise CalculatorError(f"{loaded.path.name} has no dipole head, so it gives no dipole vector")
        debye = out[MU_VECTOR][0].double().cpu().numpy()  # [3] D, in the structure's axes
        self.results["dipole"] = debye / E_ANGSTROM_TO_DEBYE  # [3] e·Å
        summary: dict[str, Any] = {t: (float(out[t][0]), loaded.units[t]) for t in loaded.targets}
        summary |= {"status": molecule.status, "message": molecule.message}
        if not all(np.isfinite(value) for value, _ in (summary[t] for t in loaded.targets)):
            raise CalculatorError("the model's predictions for this structure are not finite")
        self.results["se3t"] = summary
