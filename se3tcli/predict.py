"""Streaming inference: molecules in, ``(molecule, predictions)`` out, in input order.

Reading runs in a background thread (bounded queue) while the model works on the previous batch, so
parsing, conformer generation, inference and writing overlap and memory stays flat. Records that cannot
be predicted (read errors, elements the model never saw) pass through with their reason; records outside
the training domain (larger, charged, radicals) get a warning. Batches are bounded in molecules and in
atoms; a GPU out-of-memory error halves the batch, says so, and retries.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path

import torch

from se3tcli.checkpoint import LoadedModel
from se3tcli.elements import symbol
from se3tcli.graph import collate
from se3tcli.io import STATUS_ERROR, STATUS_WARNING, Molecule, PredictionWriter
from se3tcli.model.transformer import SE3Transformer
from se3tcli.prefetch import prefetch

MAX_ATOMS_PER_BATCH = 4096
PREFETCH_RECORDS = 256  # records read ahead of the model
# A heavy-atom count shared by less than this fraction of the training molecules gets a warning: in QM9
# (100 of 100,000) that is 1-5 heavy atoms (CH4, H2O, HCN...), where errors are many times the test error.
RARE_SIZE_FRACTION = 1e-3
RARE_SIZE_MIN_TRAINING = 1000  # below this many training molecules, counts per size say little

Prediction = dict[str, float]


def _with_status(molecule: Molecule, status: str, reason: str) -> Molecule:
    where = f"{Path(molecule.source).name} record {molecule.index + 1} ({molecule.name})"
    if status == STATUS_WARNING and molecule.message:
        return replace(molecule, status=status, message=f"{molecule.message}; {reason}")
    return replace(molecule, status=status, message=f"{where}: {reason}")


def _domain_warnings(molecule: Molecule, domain: dict) -> list[str]:
    reasons = []
    unseen = sorted({int(z) for z in molecule.numbers} - set(domain.get("elements") or molecule.numbers))
    if unseen:
        names = ", ".join(symbol(z) for z in unseen)
        reasons.append(f"element {names} absent from the training data (its atom reference is untrained)")
    n_atoms, n_heavy = len(molecule.numbers), int((molecule.numbers > 1).sum())
    if domain.get("max_atoms") and n_atoms > domain["max_atoms"]:
        reasons.append(f"{n_atoms} atoms, more than the {domain['max_atoms']} seen in training")
    if domain.get("max_heavy_atoms") and n_heavy > domain["max_heavy_atoms"]:
        reasons.append(f"{n_heavy} heavy atoms, more than the {domain['max_heavy_atoms']} seen in training")
    seen = domain.get("train_molecules_by_heavy_atoms") or {}
    n_train, n_same = sum(seen.values()), seen.get(str(n_heavy), 0)
    small = seen and n_heavy <= max(map(int, seen))
    if small and n_train >= RARE_SIZE_MIN_TRAINING and n_same < RARE_SIZE_FRACTION * n_train:
        reasons.append(
            f"{n_heavy} heavy atom(s): only {n_same} training molecules are that small, "
            "so errors can be several times the test error"
        )
    mol = molecule.rdkit_mol
    if mol is not None:
        charge = sum(atom.GetFormalCharge() for atom in mol.GetAtoms())
        radicals = sum(atom.GetNumRadicalElectrons() for atom in mol.GetAtoms())
        if charge:
            reasons.append(f"net charge {charge:+d}; the model was trained on neutral molecules")
        if radicals:
            reasons.append(f"{radicals} radical electron(s); the model was trained on closed shells")
    return reasons


def check_domain(molecule: Molecule, loaded: LoadedModel) -> Molecule:
    """Error for elements the model does not know; warnings for molecules outside its training domain."""
    if not molecule.ok:
        return molecule
    elements = set(loaded.model.config.elements)
    unknown = sorted({int(z) for z in molecule.numbers} - elements)
    if unknown:
        names = ", ".join(symbol(z) for z in unknown)
        known = " ".join(symbol(z) for z in sorted(elements))
        return _with_status(
            molecule, STATUS_ERROR, f"element {names} not supported by this model (knows {known})"
        )
    reasons = _domain_warnings(molecule, loaded.training_domain)
    if reasons:
        return _with_status(molecule, STATUS_WARNING, "; ".join(reasons) + ": extrapolation")
    return molecule


def _finite_or_error(molecule: Molecule, values: Prediction | None) -> tuple[Molecule, Prediction | None]:
    """An error row instead of predictions that are not finite numbers (never an ``ok`` with blanks)."""
    bad = [t for t, v in (values or {}).items() if not math.isfinite(v)]
    if not bad:
        return molecule, values
    return _with_status(molecule, STATUS_ERROR, f"the prediction of {', '.join(bad)} is not finite"), None


def run_model(
    model: SE3Transformer,
    molecules: list[Molecule],
    device: torch.device,
    targets: tuple[str, ...],
    on_oom: Callable[[str], None] | None = None,
) -> list[Prediction]:
    """Predictions for a list of molecules; on GPU out-of-memory the list is split in halves and retried."""
    try:
        batch = collate([(m.numbers, m.positions) for m in molecules], model.config.cutoff)
        with torch.inference_mode():
            out = model(batch.to(device))
        values = {t: out[t].double().cpu().numpy() for t in targets}
        return [{t: float(values[t][i]) for t in targets} for i in range(len(molecules))]
    except torch.cuda.OutOfMemoryError:
        if len(molecules) == 1:
            raise
        torch.cuda.empty_cache()
        half = len(molecules) // 2
        if on_oom:
            on_oom(
                f"GPU out of memory on {len(molecules)} molecules; retrying as two batches of <= {half + 1}"
            )
        first = run_model(model, molecules[:half], device, targets, on_oom)
        return first + run_model(model, molecules[half:], device, targets, on_oom)


def predict_stream(
    loaded: LoadedModel,
    molecules: Iterable[Molecule],
    device: torch.device,
    targets: tuple[str, ...] | None = None,
    batch_size: int = 64,
    on_oom: Callable[[str], None] | None = None,
) -> Iterator[tuple[Molecule, Prediction | None]]:
    """Yield every input molecule with its predictions (``None`` for error rows), in input order."""
    targets = targets or loaded.targets
    model = loaded.model.to(device).eval()
    pending: list[Molecule] = []  # molecules waiting for their batch, errors included, in order
    n_ready, n_atoms = 0, 0

    def flush() -> Iterator[tuple[Molecule, Prediction | None]]:
        ready = [m for m in pending if m.ok]
        results = iter(run_model(model, ready, device, targets, on_oom) if ready else [])
        for m in pending:
            yield _finite_or_error(m, next(results) if m.ok else None)

    for molecule in prefetch(molecules, PREFETCH_RECORDS):
        molecule = check_domain(molecule, loaded)
        pending.append(molecule)
        if molecule.ok:
            n_ready += 1
            n_atoms += len(molecule.numbers)
        if n_ready >= batch_size or n_atoms >= MAX_ATOMS_PER_BATCH:
            yield from flush()
            pending, n_ready, n_atoms = [], 0, 0
    yield from flush()


def predict_to_file(
    loaded: LoadedModel,
    molecules: Iterable[Molecule],
    device: torch.device,
    targets: tuple[str, ...],
    output: str | Path | None,
    on_row: Callable[[Molecule, Prediction | None], None],
    batch_size: int = 64,
    on_oom: Callable[[str], None] | None = None,
    output_format: str | None = None,
) -> tuple[int, int]:
    """:func:`predict_stream` with every row also written to ``output`` (if given; ``-`` is standard
    output in ``output_format``) and passed to
    ``on_row``; the file appears complete when all rows are in, and not at all if anything fails or the
    run is interrupted. Returns ``(rows, rows predicted)``."""
    n_rows = n_predicted = 0
    writer = PredictionWriter(output, targets, loaded.units, output_format) if output else None
    with writer or contextlib.nullcontext():
        for molecule, values in predict_stream(loaded, molecules, device, targets, batch_size, on_oom):
            if writer is not None:
                writer.write(molecule, values)
            n_rows += 1
            n_predicted += values is not None
            on_row(molecule, values)
    return n_rows, n_predicted
