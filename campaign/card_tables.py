"""README.md's tables for a newly exported bundled model, from its card and the benchmarks' JSON output.

    cp models/qm9-default.json /tmp/before.json      # before `se3t export` replaces it
    python campaign/card_tables.py models/qm9-default.json --before /tmp/before.json \\
        --ood ood.json --small small.json

prints the test-MAE table (beside the model it replaces and the paper), the sigma calibration table, and,
where their JSON is given, the out-of-domain table (benchmarks/uncertainty_ood.py --json) and the
smallest molecules' columns (benchmarks/small_molecules.py --json) for TRAINING.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# (target, label, unit written after the MAE) in the MAE table's two halves
LEFT = [
    ("homo", "HOMO", "meV"),
    ("lumo", "LUMO", "meV"),
    ("gap", "gap", "meV"),
    ("mu", "μ", "D"),
    ("alpha", "α", "bohr³"),
    ("Cv", "Cv", "cal/(mol·K)"),
]
RIGHT = [("U0", "U0", "meV"), ("U/H/G", "U / H / G", "meV"), ("zpve", "ZPVE", "meV"), ("r2", "R²", "bohr²")]
DECIMALS = {"homo": 1, "lumo": 1, "gap": 1, "mu": 3, "alpha": 3, "Cv": 3, "U0": 1, "zpve": 1, "r2": 1}
SIGMA_ORDER = ["homo", "lumo", "gap", "mu", "alpha", "Cv", "zpve", "r2", "U0", "U", "H", "G"]
LABELS = {"homo": "HOMO", "lumo": "LUMO", "mu": "μ", "alpha": "α", "zpve": "ZPVE", "r2": "R²"}
OOD_TARGETS = ["homo", "lumo", "gap", "mu", "alpha", "U0"]
SMALL_TARGETS = ["homo", "lumo", "gap", "mu", "alpha", "Cv"]


def _mae(card: dict, target: str) -> str:
    """The test MAE of ``target`` (or of U, H and G together) in the card's unit, rounded as in README."""
    errors = card["test_errors"]
    if target == "U/H/G":
        return " / ".join(f"{errors[t]['mae']:.1f}" for t in ("U", "H", "G"))
    return f"{errors[target]['mae']:.{DECIMALS[target]}f}"


def mae_table(card: dict, before: dict) -> list[str]:
    rows = [
        "| target | MAE | before | paper | target | MAE | before |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, (target, label, unit) in enumerate(LEFT):
        paper = card["test_errors"][target]["paper_mae"]
        cells = [label, f"{_mae(card, target)} {unit}", _mae(before, target), f"{paper:g}"]
        if i < len(RIGHT):
            right, right_label, right_unit = RIGHT[i]
            cells += [right_label, f"{_mae(card, right)} {right_unit}", _mae(before, right)]
            rows.append("| " + " | ".join(cells) + " |")
        else:
            rows.append("| " + " | ".join(cells) + " | | | |")
    return rows


def sigma_table(card: dict) -> list[str]:
    rows = [
        "| target | Spearman | within 1σ | within 2σ | miscal. area | mean σ | MAE | unit |",
        "|---|---|---|---|---|---|---|---|",
    ]
    scores = card["uncertainty"]["targets"]
    for target in SIGMA_ORDER:
        s = scores[target]
        cells = [
            LABELS.get(target, target),
            f"{s['spearman']:.2f}",
            f"{s['within_1_sigma']:.0%}",
            f"{s['within_2_sigma']:.0%}",
            f"{s['miscalibration_area']:.3f}",
            f"{s['mean_sigma_error_unit']:.3g}",
            f"{s['mae_error_unit']:.3g}",
            s["error_unit"],
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def ood_table(ood: dict) -> list[str]:
    header = " | ".join(f"σ {LABELS.get(t, t)} (MAE)" for t in OOD_TARGETS)
    rows = [f"| molecules | n | flagged low confidence | {header} |", "|---" * (3 + len(OOD_TARGETS)) + "|"]
    for name, group in ood["groups"].items():
        cells = [name, str(group["homo"]["n"]), f"{ood['low_confidence_fraction'][name]:.0%}"]
        for t in OOD_TARGETS:
            c = group[t]
            cells.append(f"{c['mean_sigma']:.3g}" + (f" ({c['mae']:.3g})" if "mae" in c else ""))
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def small_columns(small: dict) -> list[str]:
    """Each model's cells of TRAINING.md's smallest-molecules table, one line per row of that table."""
    lines = []
    for model, report in small.items():
        mae = report["test_mae"]
        lines.append(f"{model}:")
        lines.append(" / ".join(f"{mae[t] * 1000:.1f}" for t in ("homo", "lumo", "gap")) + "  (test MAE meV)")
        off, total = report["first_12_off"]
        lines.append(f"{off}  (of {total}: QM9's first molecules far off, benchmarks/small_molecules.py)")
        for group, cells in report["mae_ratio_by_size"].items():
            lines.append(" ".join(f"{cells[t]:.1f}" for t in SMALL_TARGETS) + f"  ({group}, n={cells['n']})")
        for molecule, cells in report["named_errors"].items():
            lines.append(f"{cells['homo']:+.2f}  ({molecule}: HOMO error eV)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("card", type=Path)
    parser.add_argument("--before", type=Path, required=True, help="the card of the model it replaces")
    parser.add_argument("--ood", type=Path, help="benchmarks/uncertainty_ood.py --json output")
    parser.add_argument("--small", type=Path, help="benchmarks/small_molecules.py --json output")
    args = parser.parse_args()
    card, before = json.loads(args.card.read_text()), json.loads(args.before.read_text())
    sections = [mae_table(card, before), sigma_table(card)]
    if args.ood:
        sections.append(ood_table(json.loads(args.ood.read_text())))
    if args.small:
        sections.append(small_columns(json.loads(args.small.read_text())))
    print("\n\n".join("\n".join(rows) for rows in sections))


if __name__ == "__main__":
    main()
