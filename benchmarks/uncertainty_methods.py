"""How the uncertainty method was chosen (issue 19): cheap alternatives on a trained model's frozen
features, scored alike.

    python benchmarks/uncertainty_methods.py [--model qm9-default] [--train 20000] [--val 3000] [--test 3000]

Candidates, none of which trains the encoder again:
- ``readout ensemble, random init``: K copies of the readout, re-initialised, trained on the frozen atom
  features with bootstrap weights; sigma = the members' spread.
- ``readout ensemble, from the model's readout``: the same, each member starting from the trained readout.
- ``error head, Gaussian`` / ``error head, Laplace``: an MLP predicting each target's error scale, trained
  on the model's own errors with a Gaussian or Laplace likelihood (the Laplace one is what se3t ships,
  without its novelty term here).

Each sigma is calibrated on the validation molecules with one factor per target
(``se3tcli.train.calibration.fit_calibration``) and scored on the test molecules: Spearman(|error|,
sigma), coverage of ±1 and ±2 sigma, miscalibration area; the table gives the mean over the 12 targets and
the range.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import numpy as np
import torch
from torch import nn

from se3tcli.checkpoint import load_model
from se3tcli.graph import Batch
from se3tcli.model.heads import atom_invariants, pool
from se3tcli.targets import TARGETS
from se3tcli.train import labelled_for_checkpoint
from se3tcli.train.calibration import calibration_metrics, fit_calibration
from se3tcli.train.evaluation import batches


def cache(model, labelled, indices):
    """Per batch: (h, element, edge-less batch, predictions [b, T], truth [b, T])."""
    out = []
    with torch.no_grad():
        for batch, truth, _ in batches(labelled.data, indices, 128, model.config.cutoff):
            h, element = model.features(batch)
            pred = model.readout(h, element, batch)
            none = batch.edge_src[:0]
            light = Batch(batch.z, batch.pos, batch.mol_index, batch.n_mol, none, none)
            out.append((h, element, light, torch.stack([pred[t] for t in model.targets], 1).double(), truth))
    return out


def stacked(outputs, targets):
    return torch.stack([outputs[t] for t in targets], 1).double()


def readout_ensemble(model, train, scale, members, epochs, random_init):
    trained = []
    for seed in range(members):
        generator = torch.Generator().manual_seed(seed)
        readout = copy.deepcopy(model.readout).requires_grad_(True)
        if random_init:
            for layer in readout.modules():
                if isinstance(layer, nn.Linear):
                    layer.reset_parameters()
        optimizer = torch.optim.Adam(readout.parameters(), lr=1e-3 if random_init else 3e-4)
        for _ in range(epochs):
            for k in torch.randperm(len(train), generator=generator).tolist():
                h, element, batch, _, truth = train[k]
                weights = torch.poisson(torch.ones(batch.n_mol, dtype=torch.float64), generator=generator)
                loss = ((stacked(readout(h, element, batch), model.targets) - truth).abs() / scale).mean(1)
                loss = (loss * weights).sum() / weights.sum().clamp_min(1)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        trained.append(readout.eval())

    def sigma(chunks):
        with torch.no_grad():
            per_member = [
                torch.cat([stacked(r(h, e, b), model.targets) for h, e, b, _, _ in chunks]) for r in trained
            ]
        return torch.stack(per_member).std(0).numpy()

    return sigma


def error_head(model, train, scale, epochs, likelihood, width=128):
    torch.manual_seed(0)
    n_features = model.config.channels * (model.config.lmax + 1)
    mlp = nn.Sequential(
        nn.Linear(n_features, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
        nn.Linear(width, len(model.targets)),
    )  # fmt: skip
    extensive = torch.tensor([TARGETS[t].extensive for t in model.targets])

    def scale_of(h, batch):
        per_atom = nn.functional.softplus(mlp(atom_invariants(h, model.config.lmax)))
        return pool(per_atom, extensive, batch).double() + 1e-4

    optimizer = torch.optim.Adam(mlp.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * len(train))
    for _ in range(epochs):
        for k in torch.randperm(len(train)).tolist():
            h, _, batch, pred, truth = train[k]
            s, r = scale_of(h, batch), (pred - truth) / scale
            nll = torch.log(s) + (r.abs() / s if likelihood == "laplace" else 0.5 * (r / s) ** 2)
            optimizer.zero_grad()
            nll.mean().backward()
            optimizer.step()
            schedule.step()

    def sigma(chunks):
        with torch.no_grad():
            return torch.cat([scale_of(h, b) for h, _, b, _, _ in chunks]).numpy()

    return sigma


def score(name, sigma, val, test, targets, seconds):
    def errors(chunks):
        return torch.cat([p - t for _, _, _, p, t in chunks]).numpy()

    # an ensemble whose members agree exactly gives 0
    sigma_val, sigma_test = np.maximum(sigma(val), 1e-12), np.maximum(sigma(test), 1e-12)
    e_val, e_test = errors(val), errors(test)
    rows = []
    for i in range(len(targets)):
        factor = fit_calibration(e_val[:, i], sigma_val[:, i])
        rows.append(calibration_metrics(e_test[:, i], factor * sigma_test[:, i]))

    def summary(key: str, digits: int) -> str:
        values = np.array([r[key] if r[key] is not None else np.nan for r in rows])
        mean, low, high = np.nanmean(values), np.nanmin(values), np.nanmax(values)
        return f"{mean:.{digits}f} ({low:.{digits}f} to {high:.{digits}f})"

    cells = [summary("spearman", 2), summary("within_1_sigma", 2), summary("within_2_sigma", 2)]
    cells.append(summary("miscalibration_area", 3))
    print(f"| {name} | {seconds:.0f} s | " + " | ".join(cells) + " |", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qm9-default")
    parser.add_argument("--train", type=int, default=20_000)
    parser.add_argument("--val", type=int, default=3_000)
    parser.add_argument("--test", type=int, default=3_000)
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()
    loaded = load_model(args.model)
    model = loaded.model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    labelled = labelled_for_checkpoint(loaded.checkpoint)
    scale = torch.tensor([loaded.checkpoint["normalization"]["loss_scale"][t] for t in model.targets])
    rng = np.random.default_rng(0)

    def draw(split, n):
        return np.sort(rng.permutation(labelled.split[split])[:n])

    train, val, test = (cache(model, labelled, draw(s, n)) for s, n in
                        (("train", args.train), ("val", args.val), ("test", args.test)))  # fmt: skip
    print(f"{args.model}: {args.train} training, {args.val} validation, {args.test} test molecules, "
          f"{args.epochs} epochs each")  # fmt: skip
    print("| method | fit time | Spearman | within 1σ | within 2σ | miscal. area |")
    print("|---|---|---|---|---|---|")
    loss_scale, k, epochs = scale.double(), args.members, args.epochs
    candidates = {
        f"readout ensemble of {k}, random init": lambda: readout_ensemble(
            model, train, loss_scale, k, args.epochs, True
        ),
        f"readout ensemble of {k}, from the model's readout": lambda: readout_ensemble(
            model, train, loss_scale, k, args.epochs, False
        ),
        "error head, Gaussian likelihood": lambda: error_head(model, train, loss_scale, epochs, "gauss"),
        "error head, Laplace likelihood": lambda: error_head(model, train, loss_scale, epochs, "laplace"),
    }
    for name, build in candidates.items():
        started = time.perf_counter()
        sigma = build()
        score(name, sigma, val, test, model.targets, time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
