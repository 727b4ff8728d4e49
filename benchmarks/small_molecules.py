"""How far off is a QM9 model on QM9's smallest molecules (issue 14, item 6)? Errors by heavy-atom count
and split, as multiples of the model's own test MAE, beside models given side by side.

    python benchmarks/small_molecules.py [--model qm9-default] [--model campaign/qm9-multitask/best.pt]
        [--json out.json]

For each model: its test MAE per target (all test molecules); for 1-4, 5 and 6 heavy atoms, the mean
absolute error over the training molecules and over the validation + test molecules, divided by that MAE;
how many of the predictions for QM9's first 12 molecules (CH4 to formamide) are more than 4x the MAE off;
and the errors on CH4, NH3, H2O and HCN. Targets: HOMO, LUMO, gap, mu, alpha, Cv. The models must share
one split (those of one run do).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from se3tcli.checkpoint import load_model
from se3tcli.train import labelled_for_checkpoint
from se3tcli.train.evaluation import predict_arrays
from se3tcli.train.sampling import heavy_atom_counts

TARGETS = ("homo", "lumo", "gap", "mu", "alpha", "Cv")
SIZE_GROUPS = {"1-4": (1, 4), "5": (5, 5), "6": (6, 6)}  # heavy atoms, inclusive
NAMED = {1: "CH4", 2: "NH3", 3: "H2O", 5: "HCN"}  # QM9 index: molecule
FIRST = 12  # QM9's first molecules, CH4 to formamide
OFF_FACTOR = 4.0


def model_report(name: str, labelled, heavy: np.ndarray) -> dict:
    model = load_model(name).model.eval()
    data, split = labelled.data, labelled.split
    columns = {t: labelled.data.target_names.index(t) for t in TARGETS}
    small = np.flatnonzero(heavy <= 6)
    first = np.flatnonzero(data.index <= FIRST)
    wanted = np.unique(np.concatenate([split["test"], small, first]))
    with torch.inference_mode():
        predicted = predict_arrays(model, data, wanted, 256, torch.device("cpu"))
    row_of = {int(i): r for r, i in enumerate(wanted)}

    def errors(idx: np.ndarray, t: str) -> np.ndarray:
        rows = [row_of[int(i)] for i in idx]
        return np.abs(predicted[t][rows] - data.targets[idx, columns[t]])

    mae = {t: float(errors(split["test"], t).mean()) for t in TARGETS}
    groups = {}
    for label, (low, high) in SIZE_GROUPS.items():
        in_size = (heavy >= low) & (heavy <= high)
        for part, idx in (
            ("train", split["train"]),
            ("val+test", np.concatenate([split["val"], split["test"]])),
        ):
            members = idx[in_size[idx]]
            groups[f"{label} heavy, {part}"] = {
                "n": len(members),
                **{t: float(errors(members, t).mean() / mae[t]) for t in TARGETS},
            }
    off = sum(int((errors(first, t) > OFF_FACTOR * mae[t]).sum()) for t in TARGETS)
    named = {}
    for index, formula in NAMED.items():
        i = np.flatnonzero(data.index == index)
        part = next(k for k in ("train", "val", "test") if np.isin(i, split[k]).any())
        named[f"{formula} ({part})"] = {
            t: float(predicted[t][row_of[int(i[0])]] - data.targets[i[0], columns[t]]) for t in TARGETS
        }
    return {
        "test_mae": mae,
        "mae_ratio_by_size": groups,
        "first_12_off": [off, FIRST * len(TARGETS)],
        "named_errors": named,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="bundled name or checkpoint (repeatable)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    names = args.model or ["qm9-default"]
    labelled = labelled_for_checkpoint(load_model(names[0]).checkpoint, targets=TARGETS)
    heavy = heavy_atom_counts(labelled.data)
    reports = {name: model_report(name, labelled, heavy) for name in names}
    for name, report in reports.items():
        off, total = report["first_12_off"]
        print(f"\n{name}: test MAE " + ", ".join(f"{t} {v:.4g}" for t, v in report["test_mae"].items()))
        print(
            f"  QM9's first {FIRST}: {off} of {total} predictions more than {OFF_FACTOR:g}x the test MAE off"
        )
        print("  mean error / test MAE:")
        for group, cells in report["mae_ratio_by_size"].items():
            print(f"    {group:22s} n={cells['n']:4d}  " + "  ".join(f"{t} {cells[t]:5.1f}" for t in TARGETS))
        print("  errors (prediction - label, QM9 units):")
        for molecule, cells in report["named_errors"].items():
            print(f"    {molecule:12s} " + "  ".join(f"{t} {v:+.3f}" for t, v in cells.items()))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(reports, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
