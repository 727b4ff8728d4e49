"""What the uncertainty head costs at prediction time: the model with its head against the same model
without it, on the same batches of QM9 test molecules, interleaved in one run.

    python benchmarks/uncertainty_cost.py [--model qm9-default] [--molecules 2048] [--batch-size 64]

Prints molecules/s of each and the ratio (the head reads the features the readout reads: an MLP per atom
and a Mahalanobis distance per atom).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch

from se3tcli.checkpoint import load_model
from se3tcli.graph import collate
from se3tcli.train import labelled_for_checkpoint


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qm9-default")
    parser.add_argument("--molecules", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    loaded = load_model(args.model)
    with_head = loaded.model.eval()
    if with_head.uncertainty is None:
        sys.exit(f"{args.model} has no uncertainty head")
    without = copy.deepcopy(with_head)
    without.uncertainty = None
    labelled = labelled_for_checkpoint(loaded.checkpoint)
    test = labelled.split["test"][: args.molecules]
    molecules = [labelled.data.molecule(int(i)) for i in test]
    cutoff = with_head.config.cutoff
    batches = [
        collate(molecules[i : i + args.batch_size], cutoff) for i in range(0, len(molecules), args.batch_size)
    ]
    times: dict[str, list[float]] = {"with the head": [], "without": []}
    with torch.inference_mode():
        for model in (with_head, without):  # warm-up (the fused kernel's first call)
            model(batches[0])
        for _ in range(args.repeats):
            for name, model in (("with the head", with_head), ("without", without)):
                started = time.perf_counter()
                for batch in batches:
                    model(batch)
                times[name].append(time.perf_counter() - started)
    rates = {name: len(molecules) / statistics.median(t) for name, t in times.items()}
    for name, rate in rates.items():
        print(f"{name:>14}: {rate:7.1f} molecules/s (median of {args.repeats})")
    print(f"with / without: {rates['with the head'] / rates['without']:.3f} of the throughput")
    return 0


if __name__ == "__main__":
    sys.exit(main())
