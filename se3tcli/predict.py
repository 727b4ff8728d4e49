"""Streaming inference: molecules in, ``(molecule, predictions)`` out, in input order.

Reading runs in a background thread (bounded queue) while the model works on the previous batch, so
parsing, conformer generation, inference and writing overlap and memory stays flat. Records that cannot
be predicted (read errors, elements the model never saw, more atoms than the limit) pass through with their
reason; records outside the training domain (larger, charged, radicals) get a warning. Batches are bounded
in molecules and in atoms; when memory runs out the batch is retried in parts (see :func:`run_model`), and
a molecule that does not fit alone becomes an error row while the others go on.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import torch

from se3tcli.checkpoint import LoadedModel
from se3tcli.elements import symbol
from se3tcli.graph import collate
from se3tcli.io import STATUS_ERROR, STATUS_WARNING, Molecule, PredictionWriter
from se3tcli.io.molecule import size_limit_reason
from se3tcli.io.structure_checks import electron_count, structure_warnings
from se3tcli.io.writer import STDOUT
from se3tcli.model.heads import MU_VECTOR
from se3tcli.model.transformer import SE3Transformer
from se3tcli.prefetch import prefetch
from se3tcli.targets import DIPOLE_COMPONENTS, DIPOLE_UNIT, sigma_key

MAX_ATOMS_PER_BATCH = 4096
# Larger molecules are error rows (--max-atoms-per-molecule). 10,000 atoms is 300 times the largest training
# molecule (QM9: 29 atoms) and holds a small protein; a 10,000-atom box of liquid water peaks at 2.9 GB in
# the bundled model (BENCHMARKS.md), which a workstation has, where 100,000 atoms would take tens of GB.
MAX_ATOMS_PER_MOLECULE = 10_000
# How torch's allocators say memory ran out where they raise a plain RuntimeError (the CPU allocator:
# "DefaultCPUAllocator: can't allocate memory" or "not enough memory"; CUDA and MPS: "out of memory").
_OUT_OF_MEMORY_MESSAGES = ("can't allocate memory", "not enough memory", "out of memory")
PREFETCH_RECORDS = 256  # records read ahead of the model
# A heavy-atom count shared by less than this fraction of the training molecules gets a warning: in QM9
# (100 of 100,000) that is 1-5 heavy atoms (CH4, H2O, HCN...), where errors are many times the test error.
RARE_SIZE_FRACTION = 1e-3
RARE_SIZE_MIN_TRAINING = 1000  # below this many training molecules, counts per size say little

Prediction = dict[str, float]


def _with_status(molecule: Molecule, status: str, reason: str) -> Molecule:
    where = f"{Path(molecule.source).name} record {molecule.record} ({molecule.name})"
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
    return reasons


def check_domain(molecule: Molecule, loaded: LoadedModel) -> Molecule:
    """Error for elements the model does not know; warnings for molecules outside its training domain and
    for structures whose chemistry looks wrong (:func:`~se3tcli.io.structure_checks.structure_warnings`)."""
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
    electrons = electron_count(molecule)
    if electrons is not None and electrons <= 0:
        reason = f"{electrons} electrons (a bare nucleus?): nothing to predict"
        return _with_status(molecule, STATUS_ERROR, reason)
    domain = _domain_warnings(molecule, loaded.training_domain)
    reasons = ["; ".join(domain) + ": extrapolation"] if domain else []
    reasons += structure_warnings(molecule)
    if reasons:
        return _with_status(molecule, STATUS_WARNING, "; ".join(reasons))
    return molecule


def check_size(molecule: Molecule, max_atoms: int | None) -> Molecule:
    """An error row for a molecule of more than ``max_atoms`` atoms (``None``: no limit)."""
    n_atoms = len(molecule.numbers) if molecule.ok else 0
    if max_atoms is None or n_atoms <= max_atoms:
        return molecule
    return _with_status(molecule, STATUS_ERROR, size_limit_reason(n_atoms, max_atoms))


def _out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc) for text in _OUT_OF_MEMORY_MESSAGES)


def low_confidence_thresholds(model: SE3Transformer) -> dict[str, float]:
    """Per target, the sigma above which a prediction is flagged as low confidence (none without an
    uncertainty head)."""
    head = model.uncertainty
    if head is None:
        return {}
    return {t: float(v) for t, v in zip(head.targets, head.threshold.tolist(), strict=True)}


def _confidence(molecule: Molecule, values: Prediction | None, thresholds: dict[str, float]) -> Molecule:
    """A warning on a row whose sigma exceeds its target's low-confidence threshold."""
    if not values:
        return molecule
    low = [t for t, limit in thresholds.items() if values.get(sigma_key(t), 0.0) > limit]
    if not low:
        return molecule
    reason = f"low confidence in {', '.join(low)}: sigma above the model's threshold (see its card)"
    return _with_status(molecule, STATUS_WARNING, reason)


def _finite_or_error(molecule: Molecule, values: Prediction | None) -> tuple[Molecule, Prediction | None]:
    """An error row instead of predictions that are not finite numbers (never an ``ok`` with blanks)."""
    bad = [t for t, v in (values or {}).items() if not math.isfinite(v)]
    if not bad:
        return molecule, values
    return _with_status(molecule, STATUS_ERROR, f"the prediction of {', '.join(bad)} is not finite"), None


def _per_molecule(out: dict[str, torch.Tensor], targets: tuple[str, ...], n_mol: int) -> list[Prediction]:
    """The model's outputs (``{target: [n_mol]}``, ``mu_vector [n_mol, 3]`` D, ``{target_sigma: [n_mol]}``)
    as one dict per molecule: each target followed by its sigma where the model has an uncertainty head,
    then the dipole vector's components where ``mu`` is a target and the model has a dipole head (see
    :func:`output_units`)."""
    columns = {}
    for t in targets:
        columns[t] = out[t]
        if sigma_key(t) in out:
            columns[sigma_key(t)] = out[sigma_key(t)]
    if "mu" in targets and MU_VECTOR in out:
        columns |= dict(zip(DIPOLE_COMPONENTS, out[MU_VECTOR].unbind(1), strict=True))
    values = {name: column.double().cpu().numpy() for name, column in columns.items()}  # {name: [n_mol]}
    return [{name: float(column[i]) for name, column in values.items()} for i in range(n_mol)]


def run_model(
    model: SE3Transformer,
    molecules: list[Molecule],
    device: torch.device,
    targets: tuple[str, ...],
    on_oom: Callable[[str], None] | None = None,
) -> list[Prediction | str]:
    """Predictions for a list of molecules, in order. When memory runs out the list is retried in parts:
    halves on a GPU (whose memory holds a batch of some size or not), one molecule at a time on the CPU
    (whose memory runs out near the machine's limit, mostly for one large molecule). A molecule that does
    not fit alone gets the reason (``out of memory: N atoms``) instead of its predictions."""
    try:
        batch = collate([(m.numbers, m.positions) for m in molecules], model.config.cutoff)
        with torch.inference_mode():
            out = model(batch.to(device))
        return _per_molecule(out, targets, len(molecules))
    except (MemoryError, RuntimeError) as exc:
        if not _out_of_memory(exc):
            raise
    # past the except block, the failed batch's tensors (held by the traceback) are free again
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if len(molecules) == 1:
        return [f"out of memory: {len(molecules[0].numbers)} atoms"]
    if device.type == "cuda":
        half = len(molecules) // 2
        parts = [molecules[:half], molecules[half:]]
        retry = f"retrying as two batches of <= {len(parts[1])}"
    else:
        parts = [[m] for m in molecules]
        retry = "retrying them one by one"
    if on_oom:
        on_oom(f"out of memory ({device.type}) on {len(molecules)} molecules; {retry}")
    return [result for part in parts for result in run_model(model, part, device, targets, on_oom)]


def predict_stream(
    loaded: LoadedModel,
    molecules: Iterable[Molecule],
    device: torch.device,
    targets: tuple[str, ...] | None = None,
    batch_size: int = 64,
    on_oom: Callable[[str], None] | None = None,
    max_atoms_per_molecule: int | None = MAX_ATOMS_PER_MOLECULE,
) -> Iterator[tuple[Molecule, Prediction | None]]:
    """Yield every input molecule with its predictions (``None`` for error rows), in input order.
    Molecules of more than ``max_atoms_per_molecule`` atoms (``None``: no limit) are error rows."""
    targets = targets or loaded.targets
    model = loaded.model.to(device).eval()
    thresholds = {t: v for t, v in low_confidence_thresholds(model).items() if t in targets}
    pending: list[Molecule] = []  # molecules waiting for their batch, errors included, in order
    n_ready, n_atoms = 0, 0

    def flush() -> Iterator[tuple[Molecule, Prediction | None]]:
        ready = [m for m in pending if m.ok]
        results = iter(run_model(model, ready, device, targets, on_oom) if ready else [])
        for m in pending:
            values = next(results) if m.ok else None
            if isinstance(values, str):  # did not fit in memory, even alone
                m, values = _with_status(m, STATUS_ERROR, values), None
            m, values = _finite_or_error(m, values)
            yield _confidence(m, values, thresholds), values

    for molecule in prefetch(molecules, PREFETCH_RECORDS):
        molecule = check_domain(check_size(molecule, max_atoms_per_molecule), loaded)
        pending.append(molecule)
        if molecule.ok:
            n_ready += 1
            n_atoms += len(molecule.numbers)
        if n_ready >= batch_size or n_atoms >= MAX_ATOMS_PER_BATCH:
            yield from flush()
            pending, n_ready, n_atoms = [], 0, 0
    yield from flush()


def output_units(loaded: LoadedModel, targets: tuple[str, ...]) -> dict[str, str]:
    """The quantities the predictions of ``targets`` carry, in order, with their units: the targets (each
    followed by its sigma, in its unit, where the model has an uncertainty head), then the dipole vector's
    components (D, in the input's axes) where ``mu`` is one of them and the model has a
    dipole head."""
    units = {}
    for t in targets:
        units[t] = loaded.units[t]
        if loaded.model.uncertainty is not None:
            units[sigma_key(t)] = loaded.units[t]
    if "mu" in targets and loaded.model.readout.use_dipole:
        units |= dict.fromkeys(DIPOLE_COMPONENTS, DIPOLE_UNIT)
    return units


class WriteSummary(NamedTuple):
    """What :func:`predict_to_file` did: rows read, rows predicted, rows the output format could not
    hold, and whether an existing output was kept because nothing was predicted."""

    rows: int
    predicted: int
    not_written: int = 0
    kept_existing: bool = False


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
    max_atoms_per_molecule: int | None = MAX_ATOMS_PER_MOLECULE,
) -> WriteSummary:
    """:func:`predict_stream` with every row also written to ``output`` (if given; ``-`` is standard
    output in ``output_format``) and passed to ``on_row``; the file appears complete when all rows are
    in, and not at all if anything fails or the run is interrupted. An existing file is replaced only
    when at least one molecule was predicted (error rows alone are not worth more than it)."""
    n_rows = n_predicted = 0
    existed = output is not None and str(output) != STDOUT and Path(output).exists()
    units = output_units(loaded, targets)
    writer = PredictionWriter(output, tuple(units), units, output_format) if output else None
    with writer or contextlib.nullcontext():
        rows = predict_stream(loaded, molecules, device, targets, batch_size, on_oom, max_atoms_per_molecule)
        for molecule, values in rows:
            if writer is not None:
                writer.write(molecule, values)
            n_rows += 1
            n_predicted += values is not None
            on_row(molecule, values)
        kept = existed and n_predicted == 0
        if kept:
            writer.abort()
    return WriteSummary(n_rows, n_predicted, writer.skipped if writer else 0, kept)
