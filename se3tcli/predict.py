"""Streaming inference: molecules in, ``(molecule, predictions)`` out, in input order.

Records that cannot be predicted (read errors, elements the model never saw) pass through with their
reason; records larger than anything in the training data get a warning. Batches are bounded both in
molecules and in atoms; a GPU out-of-memory error halves the batch and retries.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace

import torch
from ase.data import chemical_symbols

from se3tcli.checkpoint import LoadedModel
from se3tcli.graph import collate
from se3tcli.io import STATUS_ERROR, STATUS_WARNING, Molecule
from se3tcli.model.transformer import SE3Transformer

MAX_ATOMS_PER_BATCH = 4096

Prediction = dict[str, float]


def _with_status(molecule: Molecule, status: str, reason: str) -> Molecule:
    where = f"{molecule.source} record {molecule.index + 1} ({molecule.name})"
    message = f"{where}: {reason}"
    if molecule.message and status == STATUS_WARNING:
        message = f"{molecule.message}; {reason}"
    return replace(molecule, status=status, message=message)


def check_domain(molecule: Molecule, loaded: LoadedModel) -> Molecule:
    """Error for elements the model does not know; warning for molecules larger than its training data."""
    if not molecule.ok:
        return molecule
    elements = set(loaded.model.config.elements)
    unknown = sorted({int(z) for z in molecule.numbers} - elements)
    if unknown:
        names = ", ".join(chemical_symbols[z] if 0 <= z < len(chemical_symbols) else f"Z{z}" for z in unknown)
        known = " ".join(chemical_symbols[z] for z in sorted(elements))
        return _with_status(
            molecule, STATUS_ERROR, f"element {names} not supported by this model (knows {known})"
        )
    domain = loaded.training_domain
    n_atoms = len(molecule.numbers)
    n_heavy = int((molecule.numbers > 1).sum())
    if domain.get("max_atoms") and n_atoms > domain["max_atoms"]:
        reason = f"{n_atoms} atoms, more than the {domain['max_atoms']} seen in training: extrapolation"
        return _with_status(molecule, STATUS_WARNING, reason)
    if domain.get("max_heavy_atoms") and n_heavy > domain["max_heavy_atoms"]:
        limit = domain["max_heavy_atoms"]
        reason = f"{n_heavy} heavy atoms, more than the {limit} seen in training: extrapolation"
        return _with_status(molecule, STATUS_WARNING, reason)
    return molecule


def run_model(
    model: SE3Transformer, molecules: list[Molecule], device: torch.device, targets: tuple[str, ...]
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
        return run_model(model, molecules[:half], device, targets) + run_model(
            model, molecules[half:], device, targets
        )


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
        results = iter(run_model(model, ready, device, targets) if ready else [])
        for m in pending:
            yield m, (next(results) if m.ok else None)

    for molecule in molecules:
        molecule = check_domain(molecule, loaded)
        pending.append(molecule)
        if molecule.ok:
            n_ready += 1
            n_atoms += len(molecule.numbers)
        if n_ready >= batch_size or n_atoms >= MAX_ATOMS_PER_BATCH:
            yield from flush()
            pending, n_ready, n_atoms = [], 0, 0
    yield from flush()
