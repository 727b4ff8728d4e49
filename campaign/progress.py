"""The long run's validation curve as the rows of TRAINING.md's progress table, from its metrics.csv.

    python campaign/progress.py              # every epoch
    python campaign/progress.py --from 56    # the rows a session added

Columns: epoch, training hours so far, then the validation MAE of HOMO, LUMO, gap (meV), mu (D),
alpha (bohr^3), Cv (cal/(mol K)), R2 (bohr^2), ZPVE and U0 (meV); metrics.csv keeps eV for the energies.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

METRICS = Path(__file__).resolve().parent / "qm9-multitask" / "metrics.csv"
# (target, factor from metrics.csv's unit to the table's, decimals)
COLUMNS = [
    ("homo", 1000, 1),
    ("lumo", 1000, 1),
    ("gap", 1000, 1),
    ("mu", 1, 3),
    ("alpha", 1, 3),
    ("Cv", 1, 3),
    ("r2", 1, 1),
    ("zpve", 1000, 2),
    ("U0", 1000, 1),
]


def table_rows(metrics: Path, first_epoch: int) -> list[str]:
    rows = []
    with metrics.open() as file:
        for record in csv.DictReader(file):
            epoch = int(record["epoch"])
            if epoch < first_epoch:
                continue
            cells = [str(epoch), f"{float(record['time_s']) / 3600:.2f}"]
            cells += [f"{float(record[f'val_mae_{t}']) * k:.{d}f}" for t, k, d in COLUMNS]
            rows.append("| " + " | ".join(cells) + " |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="first", type=int, default=1, help="first epoch to print")
    parser.add_argument("--metrics", type=Path, default=METRICS)
    args = parser.parse_args()
    print("\n".join(table_rows(args.metrics, args.first)))


if __name__ == "__main__":
    main()
