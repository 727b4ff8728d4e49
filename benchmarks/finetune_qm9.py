"""Fine-tuning on a few hundred labelled molecules (issue 18): the bundled model as it is, fine-tuned on
them, and the same model trained from scratch on them, scored on other held-out molecules.

    python benchmarks/finetune_qm9.py OUT [--target homo] [--train 300] [--held-out 500] [--epochs 20]
        [--splits test] [--containing F]

The molecules come from the test split of the data the bundled model was trained on (QM9, its own seed),
so it has seen none of them (``--splits val,test`` adds the validation split, which chose the bundled
epoch but never trained it; ``--containing F`` keeps only molecules with that element, a chemical series
the bundled model saw less of): the first ``--train`` of a seeded shuffle go to ``OUT/train.extxyz`` (the
run splits them 80/10/10), the next ``--held-out`` to ``OUT/held_out.extxyz``, labelled with ``--target``
in its display unit. Then, each a plain ``se3t`` command (printed as it runs):

1. ``se3t evaluate`` of the bundled model on the held-out file;
2. ``se3t train --init-from BUNDLED`` on the training file, then ``se3t evaluate`` of its ``best.pt``;
3. the same ``se3t train`` from scratch (the bundled model's preset), then ``se3t evaluate``.

Prints the held-out MAE of each (in the target's error unit) and writes them to ``OUT/results.json``.
Needs the QM9 cache or qm9pack (``--cache`` as for ``se3t train``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from se3tcli.checkpoint import DEFAULT_MODEL, load_model
from se3tcli.elements import symbol
from se3tcli.model.config import PRESETS
from se3tcli.targets import TARGETS
from se3tcli.train import labelled_for_checkpoint

# Model settings that se3t train's flags set.
FLAGS = {"channels": "--channels", "lmax": "--lmax", "n_layers": "--layers", "n_heads": "--heads",
         "kernel": "--kernel", "nonlinearity": "--nonlinearity", "cutoff": "--cutoff"}  # fmt: skip


def write_extxyz(path: Path, data, indices: np.ndarray, target: str) -> None:
    """The molecules ``indices`` of ``data`` with their ``target`` label (display unit) as extXYZ."""
    column = data.target_names.index(target)
    with open(path, "w") as handle:
        for i in indices:
            numbers, positions = data.molecule(int(i))
            label = repr(float(data.targets[i, column]))
            handle.write(f"{len(numbers)}\nname=qm9_{int(data.index[i])} {target}={label} ")
            handle.write("Properties=species:S:1:pos:R:3\n")
            for z, xyz in zip(numbers, positions, strict=True):
                handle.write(f"{symbol(int(z))} {' '.join(repr(float(c)) for c in xyz)}\n")


def se3t(*args: str) -> str:
    command = [sys.executable, "-m", "se3tcli", *args]
    print("$ se3t " + " ".join(args), flush=True)
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout


def held_out_mae(model: str, held_out: Path, target: str) -> float:
    """MAE in the target's error unit (meV for orbital energies) on every molecule of ``held_out``."""
    report = json.loads(
        se3t(
            "evaluate",
            "--model",
            model,
            "--dataset",
            str(held_out),
            "--targets",
            target,
            "--split",
            "all",
            "--device",
            "cpu",
            "--json",
        )  # fmt: skip
    )
    return report["metrics"][target]["mae_error_unit"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--target", default="homo")
    parser.add_argument("--train", type=int, default=300)
    parser.add_argument("--held-out", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-4, help="fine-tuning learning rate")
    parser.add_argument("--encoder-lr-factor", type=float, default=0.3)
    parser.add_argument("--scratch-lr", type=float, default=2e-3, help="learning rate from scratch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default=None)
    parser.add_argument("--splits", default="test", help="unseen splits to draw from: test or val,test")
    parser.add_argument("--containing", default=None, help="only molecules with this element (e.g. F)")
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    bundled = load_model(args.model)
    labelled = labelled_for_checkpoint(bundled.checkpoint, cache=args.cache, targets=(args.target,))
    unseen = np.concatenate([labelled.split[name] for name in args.splits.split(",")])
    if args.containing:
        z = next(z for z in range(1, 119) if symbol(z) == args.containing)
        unseen = np.array([i for i in unseen if (labelled.data.molecule(int(i))[0] == z).any()])
    unseen = np.random.default_rng(args.seed).permutation(unseen)
    if len(unseen) < args.train + args.held_out:
        sys.exit(f"only {len(unseen)} molecules to draw from, fewer than --train + --held-out")
    train_file, held_out = args.out / "train.extxyz", args.out / "held_out.extxyz"
    write_extxyz(train_file, labelled.data, unseen[: args.train], args.target)
    write_extxyz(held_out, labelled.data, unseen[args.train : args.train + args.held_out], args.target)

    common = ["--dataset", str(train_file), "--targets", args.target, "--epochs", str(args.epochs)]
    common += ["--batch-size", str(args.batch_size), "--warmup-epochs", "1", "--device", "cpu"]
    common += ["--seed", str(args.seed)]
    preset = bundled.checkpoint["training"]["options"]["preset"]  # and flags where the model differs
    same_model = ["--preset", preset]
    for name, flag in FLAGS.items():
        value = getattr(bundled.model.config, name)
        if value != getattr(PRESETS[preset], name):
            same_model += [flag, str(value)]
    runs = {
        "fine-tuned": ["--init-from", args.model, "--lr", str(args.lr)]
        + ["--encoder-lr-factor", str(args.encoder_lr_factor)],
        "from scratch": [*same_model, "--lr", str(args.scratch_lr)],
    }
    results = {"bundled": {"mae": held_out_mae(args.model, held_out, args.target)}}
    for name, extra in runs.items():
        out = args.out / name.replace(" ", "_")
        started = time.monotonic()
        se3t("train", *common, *extra, "--out", str(out))
        seconds = time.monotonic() - started
        trained = load_model(str(out / "best.pt")).model.config
        same = bundled.model.config.replace(targets=(args.target,), uncertainty_hidden=0)  # no head: trained
        assert trained == same, f"{name}: another model"
        results[name] = {"mae": held_out_mae(str(out / "best.pt"), held_out, args.target), "train_s": seconds}
    record = {"args": vars(args) | {"out": str(args.out)}, "unit": TARGETS[args.target].error_unit, **results}
    (args.out / "results.json").write_text(json.dumps(record, indent=2))
    for name, result in results.items():
        print(f"{name:>12}: held-out {args.target} MAE {result['mae']:.1f} {record['unit']}", flush=True)


if __name__ == "__main__":
    main()
