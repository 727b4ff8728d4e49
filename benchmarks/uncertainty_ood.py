"""Does sigma grow out of domain? Mean sigma per target of a model with an uncertainty head on QM9 test
molecules, on the same molecules with distorted geometries, on QM9's smallest molecules (with their
errors), and on drug-like CHONF molecules with force-field conformers (issue 19, item 3).

    python benchmarks/uncertainty_ood.py [--model qm9-default] [--molecules 1000] [--json out.json]

Prints one table: rows are the groups, columns the targets, cells the mean sigma in the target's error
unit (meV for energies) and, for QM9 groups, the MAE beside it; and the fraction of each group's molecules
that predict flags as low confidence.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from se3tcli.checkpoint import load_model
from se3tcli.graph import collate
from se3tcli.io import read_molecules
from se3tcli.predict import low_confidence_thresholds
from se3tcli.targets import TARGETS, sigma_key
from se3tcli.train import labelled_for_checkpoint
from se3tcli.train.sampling import heavy_atom_counts

# Drugs and metabolites made of H, C, N, O, F only (10-33 heavy atoms), as SMILES.
DRUG_LIKE = {
    "aspirin": "CC(=O)Oc1ccccc1C(=O)O",
    "caffeine": "Cn1c(=O)c2c(ncn2C)n(C)c1=O",
    "paracetamol": "CC(=O)Nc1ccc(O)cc1",
    "ibuprofen": "CC(C)Cc1ccc(cc1)C(C)C(=O)O",
    "nicotine": "CN1CCC[C@H]1c1cccnc1",
    "fluoxetine": "CNCCC(Oc1ccc(cc1)C(F)(F)F)c1ccccc1",
    "ciprofloxacin": "OC(=O)C1=CN(C2CC2)c2cc(N3CCNCC3)c(F)cc2C1=O",
    "fluconazole": "OC(Cn1cncn1)(Cn1cncn1)c1ccc(F)cc1F",
    "naproxen": "COc1ccc2cc(ccc2c1)[C@H](C)C(=O)O",
    "atenolol": "CC(C)NCC(O)COc1ccc(CC(N)=O)cc1",
    "propranolol": "CC(C)NCC(O)COc1cccc2ccccc12",
    "lidocaine": "CCN(CC)CC(=O)Nc1c(C)cccc1C",
    "melatonin": "COc1ccc2[nH]cc(CCNC(C)=O)c2c1",
    "morphine": "CN1CC[C@]23c4c5ccc(O)c4O[C@H]2[C@@H](O)C=C[C@H]3[C@H]1C5",
    "testosterone": "C[C@]12CC[C@H]3[C@@H](CCC4=CC(=O)CC[C@]34C)[C@@H]1CC[C@@H]2O",
    "oseltamivir": "CCOC(=O)C1=C[C@@H](OC(CC)CC)[C@H](NC(C)=O)[C@@H](N)C1",
    "zidovudine": "Cc1cn([C@H]2C[C@H](N=[N+]=[N-])[C@@H](CO)O2)c(=O)[nH]c1=O",
    "5-fluorouracil": "O=c1[nH]cc(F)c(=O)[nH]1",
    "sucrose": "OC[C@H]1O[C@@](CO)(O[C@H]2O[C@H](CO)[C@@H](O)[C@H](O)[C@H]2O)[C@@H](O)[C@@H]1O",
    "efavirenz-like (no Cl)": "OC1(C#CC2CC2)c2cc(F)ccc2NC(=O)O1",
}


def _predict(model, molecules, batch_size=64) -> dict[str, np.ndarray]:
    """Model outputs ``{name: [n]}`` for ``(numbers, positions)`` pairs."""
    out: dict[str, list] = {}
    with torch.inference_mode():
        for start in range(0, len(molecules), batch_size):
            batch = collate(molecules[start : start + batch_size], model.config.cutoff)
            for k, v in model(batch).items():
                if v.dim() == 1:
                    out.setdefault(k, []).append(v.double().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qm9-default")
    parser.add_argument("--molecules", type=int, default=1000, help="QM9 test molecules per group")
    parser.add_argument("--json", help="also write the table here")
    args = parser.parse_args()
    loaded = load_model(args.model)
    model = loaded.model.eval()
    if model.uncertainty is None:
        sys.exit(f"{args.model}: the model has no uncertainty head (se3t export fits one)")
    targets = model.targets
    labelled = labelled_for_checkpoint(loaded.checkpoint)
    data, rng = labelled.data, np.random.default_rng(0)
    test = np.sort(rng.permutation(labelled.split["test"])[: args.molecules])
    originals = [data.molecule(int(i)) for i in test]
    truth = data.targets[test]
    groups: dict[str, tuple[list, np.ndarray | None]] = {"QM9 test": (originals, truth)}
    for noise in (0.05, 0.1, 0.2):  # Å, Gaussian per coordinate
        moved = [(z, pos + rng.normal(0, noise, pos.shape)) for z, pos in originals]
        groups[f"QM9 test, atoms moved by N(0, {noise} Å)"] = (moved, None)
    smallest = np.flatnonzero(heavy_atom_counts(data) <= 3)
    groups["QM9, 1-3 heavy atoms (all splits)"] = (
        [data.molecule(int(i)) for i in smallest],
        data.targets[smallest],
    )
    drugs = [m for m in read_molecules([], [f"{s} {n}" for n, s in DRUG_LIKE.items()]) if m.ok]
    groups[f"drug-like CHONF, force-field conformers ({len(drugs)})"] = (
        [(m.numbers, m.positions) for m in drugs],
        None,
    )
    thresholds = low_confidence_thresholds(model)
    table, flagged = {}, {}
    for name, (molecules, labels) in groups.items():
        out = _predict(model, molecules)
        low = np.zeros(len(molecules), bool)
        for t, limit in thresholds.items():
            low |= out[sigma_key(t)] > limit
        flagged[name] = float(low.mean())
        row = {}
        for column, t in enumerate(targets):
            factor = TARGETS[t].error_factor
            cell = {"mean_sigma": float(out[sigma_key(t)].mean() * factor), "n": len(molecules)}
            if labels is not None:
                cell["mae"] = float(np.abs(out[t] - labels[:, column]).mean() * factor)
            row[t] = cell
        table[name] = row
    units = {t: TARGETS[t].error_unit for t in targets}
    print("mean sigma (MAE where labels exist), in " + ", ".join(f"{t} {u}" for t, u in units.items()))
    for name, row in table.items():
        cells = [
            f"{c['mean_sigma']:.3g}" + (f" ({c['mae']:.3g})" if "mae" in c else "") for c in row.values()
        ]
        print(
            f"{name:50s} low confidence {flagged[name]:4.0%}  "
            + "  ".join(f"{t}={c}" for t, c in zip(targets, cells, strict=True))
        )
    if args.json:
        result = {"model": args.model, "units": units, "groups": table, "low_confidence_fraction": flagged}
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
