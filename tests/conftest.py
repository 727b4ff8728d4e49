"""Shared test fixtures: single-threaded torch, QM9 availability, labelled SD files, a tiny trained run.

The tiny run is trained once per session (a second or two) and is what the CLI, checkpoint and training
tests load, copy and tamper with; tests must treat its directory as read-only.
"""

from __future__ import annotations

import importlib.util
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from se3tcli.data.qm9 import CACHE_FILE, default_cache_dir
from se3tcli.train import Trainer, TrainOptions

# The tests share the CPUs with other work (a background training run, other test files). More than one
# intra-op thread per process then oversubscribes the cores: a 12-forward-pass equivariance check took
# 41 s with 2 threads and 0.6 s with 1 on a loaded 2-core machine. SE3T_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("SE3T_TEST_THREADS", "1")))

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_molecules"
# A model small enough to train in a second: use it unless a test needs capacity.
TINY = dict(channels=8, n_heads=2, lmax=1, n_layers=1, radial_hidden=8, readout_hidden=16, n_radial=8)
ELEMENTS = (1, 6, 7, 8, 9)  # QM9's H C N O F


def random_molecule(rng: np.random.Generator, n_atoms: int, min_dist: float = 0.9, elements=ELEMENTS):
    """QM9-like: elements H C N O F, atoms at least ``min_dist`` Å apart in a ball that grows with size."""
    radius = 0.9 * n_atoms ** (1 / 3) + 0.5
    pos: list[np.ndarray] = []
    while len(pos) < n_atoms:
        p = rng.uniform(-radius, radius, 3)
        if np.linalg.norm(p) <= radius and all(np.linalg.norm(p - q) >= min_dist for q in pos):
            pos.append(p)
    return rng.choice(elements, n_atoms), np.array(pos).reshape(n_atoms, 3)


def tiny_train_options(out: Path, **changes) -> TrainOptions:
    """The tiny model on 60 QM9 molecules (48/6/6), batches of 16: 3 steps per epoch, 2 epochs, CPU."""
    settings = dict(
        targets=("mu", "homo", "U0"),
        model_overrides=dict(TINY),
        epochs=2,
        batch_size=16,
        limit=60,
        device="cpu",
        seed=0,
        out=str(out),
    )
    return TrainOptions(**(settings | changes))


HAVE_QM9 = importlib.util.find_spec("qm9pack") is not None or (default_cache_dir() / CACHE_FILE).exists()
# SD tags of qm9_sample.sdf renamed to the registry target they hold (read_labelled_file matches names).
SAMPLE_TAGS = {"homo_eV": "homo", "lumo_eV": "lumo", "gap_eV": "gap"}


@pytest.fixture(autouse=True)
def _restore_signal_handlers() -> Iterator[None]:
    """`se3t train` and `se3t predict` install SIGINT/SIGTERM handlers; keep them out of other tests."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.fixture(scope="session")
def tiny() -> dict:
    """Model overrides of the tiny test model (a fresh copy per use is not needed: treat as read-only)."""
    return TINY


@pytest.fixture(scope="session")
def samples() -> Path:
    """The repository's sample_molecules folder."""
    return SAMPLES


@pytest.fixture
def require_qm9() -> None:
    """Skip when neither qm9pack nor an existing QM9 cache is available (the pattern of test_qm9.py)."""
    if not HAVE_QM9:
        pytest.skip("needs qm9pack or an existing QM9 cache")


def write_labelled_sdf(path: Path, n_rotated_copies: int = 0, untagged: int = 0, seed: int = 0) -> Path:
    """qm9_sample.sdf with its ``homo_eV``-style tags renamed to registry targets (``homo``, ``lumo``,
    ``gap``), plus rotated copies of the first molecules (same labels) and records without any label."""
    rng = np.random.default_rng(seed)
    from rdkit import Chem  # imported here: the GPU machine's tests (CUDA graphs) run without RDKit

    supplier = Chem.SDMolSupplier(str(SAMPLES / "qm9_sample.sdf"), removeHs=False)
    molecules = [mol for mol in supplier if mol is not None]
    with Chem.SDWriter(str(path)) as writer:
        for i, mol in enumerate(molecules + molecules[:n_rotated_copies]):
            mol = Chem.Mol(mol)
            for old, new in SAMPLE_TAGS.items():
                mol.SetProp(new, mol.GetProp(old))
                mol.ClearProp(old)
            if i >= len(molecules):
                rotation, _ = np.linalg.qr(rng.normal(size=(3, 3)))
                rotation *= np.sign(np.linalg.det(rotation))  # a proper rotation, no reflection
                conformer = mol.GetConformer()
                positions = conformer.GetPositions() @ rotation.T + rng.uniform(-5, 5, size=3)
                for atom, xyz in enumerate(positions.tolist()):
                    conformer.SetAtomPosition(atom, xyz)
                mol.SetProp("_Name", f"{mol.GetProp('_Name')}_rotated")
            writer.write(mol)
        for i in range(untagged):
            mol = Chem.Mol(molecules[i])
            for old in SAMPLE_TAGS:
                mol.ClearProp(old)
            mol.SetProp("_Name", f"{mol.GetProp('_Name')}_unlabelled")
            writer.write(mol)
    return path


@pytest.fixture(scope="session")
def labelled_sdf() -> Callable[..., Path]:
    """``labelled_sdf(path, n_rotated_copies=0, untagged=0)`` writes a labelled SD file (see above)."""
    return write_labelled_sdf


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run directory of a tiny model trained for one epoch (``best.pt``, ``last.pt``, ``metrics.csv``...).

    On 60 QM9 molecules with targets mu (dipole head), homo, gap and U0 (atom references) when QM9 is
    available; otherwise on the labelled sample molecules (homo, lumo, gap), so that the CLI and
    checkpoint tests never depend on QM9.
    """
    folder = tmp_path_factory.mktemp("tiny_run")
    if HAVE_QM9:
        dataset, targets, limit = "qm9", ("mu", "homo", "gap", "U0"), 60
    else:
        sdf = write_labelled_sdf(folder / "labelled.sdf", n_rotated_copies=10)
        dataset, targets, limit = str(sdf), tuple(SAMPLE_TAGS.values()), None
    options = TrainOptions(
        dataset=dataset,
        targets=targets,
        model_overrides=dict(TINY),
        epochs=1,
        batch_size=16,
        limit=limit,
        device="cpu",
        seed=0,
        out=str(folder / "run"),
    )
    trainer = Trainer(options)
    trainer.setup()
    assert trainer.run()["status"] == "finished"
    return folder / "run"


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_run: Path) -> Path:
    """``best.pt`` of the tiny run."""
    return tiny_run / "best.pt"
