"""Conformers of SMILES in worker processes: input order, error rows, the time limit, identical coordinates
with any number of workers, and no process left behind."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from rdkit import Chem
from rdkit.Chem import AllChem
from typer.testing import CliRunner

from se3tcli.api import load_model
from se3tcli.cli import app
from se3tcli.io import conformer_pool, read_molecules
from se3tcli.io.conformer_pool import AHEAD_PER_WORKER, embed_pending
from se3tcli.io.conformers import time_limit_reason
from se3tcli.io.molecule import size_limit_reason
from se3tcli.io.smiles import read_smiles_strings

# Buckminsterfullerene: ETKDG fails on it only after more than a minute, a deterministic slow record.
C60 = (
    "c12c3c4c5c1c1c6c7c2c2c8c3c3c9c4c4c%10c5c5c1c1c6c6c%11c7c2c2c7c8c3c3c8c9c4c4c9c%10c5c5c1c1c6c6c%11"
    "c2c2c7c3c3c8c4c4c9c5c1c1c6c2c3c41"
)
# Valid, salts, stereo, an unparsable SMILES and an unknown element, cycled past the read-ahead window.
SMILES = [
    "CCO ethanol",
    "C1CC",
    "C[C@H](N)C(=O)O alanine",
    "[Na+].[Cl-] salt",
    "* dummy",
    "F/C=C/F",
    "CC(C)(C)c1ccc(O)cc1",
]


def _rows(workers: int, smiles: list[str], timeout: float = 30.0) -> list:
    return list(read_molecules(smiles=smiles, workers=workers, conformer_timeout=timeout))


def _coordinates(molecule) -> np.ndarray | None:
    return None if molecule.rdkit_mol is None else molecule.rdkit_mol.GetConformer().GetPositions()


def test_workers_keep_order_errors_and_coordinates() -> None:
    smiles = [f"{line} {i}" if " " in line else line for i in range(3) for line in SMILES]
    assert len(smiles) > 2 * AHEAD_PER_WORKER
    serial, pooled = _rows(1, smiles), _rows(2, smiles)
    assert [m.index for m in pooled] == list(range(len(smiles)))
    assert [m.status for m in pooled[:7]] == ["warning", "error", "warning", "warning", "error"] + [
        "warning"
    ] * 2
    assert pooled[1].message.startswith("<smiles> record 2 (C1CC): cannot parse SMILES 'C1CC'")
    assert "unsupported element *" in pooled[4].message
    for a, b in zip(serial, pooled, strict=True):
        assert (a.name, a.status, a.message, a.properties) == (b.name, b.status, b.message, b.properties)
        assert np.array_equal(a.numbers, b.numbers)
        assert np.array_equal(a.positions, b.positions, equal_nan=True)
        assert np.array_equal(_coordinates(a), _coordinates(b)) if a.ok else b.rdkit_mol is None
    assert not multiprocessing.active_children()


def test_a_worker_over_the_time_limit_is_replaced_and_its_record_is_an_error_row() -> None:
    rows, pids = [], set()
    smiles = ["CCO", f"{C60} fullerene"] + ["CO"] * 30
    for row in read_molecules(smiles=smiles, workers=2, conformer_timeout=0.5):
        rows.append(row)
        pids |= {process.pid for process in multiprocessing.active_children()}
    assert [m.status for m in rows[:3]] == ["warning", "error", "warning"]
    assert all(m.ok for m in rows[2:])
    assert rows[1].message == f"<smiles> record 2 (fullerene): {time_limit_reason(0.5)}"
    assert len(rows[1].numbers) == 60  # the atoms of the error row, as for a failed embedding
    # Killed at 0.5 s and replaced, before RDKit's own timeout (whole seconds) could stop the embedding.
    assert len(pids) == 3
    assert not multiprocessing.active_children()


def test_2d_sdf_records_are_embedded_in_the_pool_with_its_time_limit(tmp_path: Path) -> None:
    """A 2D record's conformer is generated like a SMILES string's: C60 (no coordinates) is stopped at the
    limit, the 2D ethanol around it keeps its row and its SD tag."""
    records = []
    for smiles, name in (("CCO", "ethanol"), (C60, "fullerene"), ("CCO", "ethanol again")):
        mol = Chem.MolFromSmiles(smiles)
        AllChem.Compute2DCoords(mol)
        mol.SetProp("_Name", name)
        mol.SetProp("source_id", name.upper())
        records.append(Chem.MolToMolBlock(mol) + "> <source_id>\n" + name.upper() + "\n\n$$$$\n")
    path = tmp_path / "flat.sdf"
    path.write_text("".join(records))
    rows = list(read_molecules([path], workers=2, conformer_timeout=0.5))
    assert [m.status for m in rows] == ["warning", "error", "warning"]
    assert rows[1].message == f"flat.sdf record 2 (fullerene): {time_limit_reason(0.5)}"
    assert "2D record: 3D conformer generated" in rows[0].message and rows[0].positions[:, 2].any()
    assert rows[2].properties["source_id"] == "ETHANOL AGAIN"
    assert not multiprocessing.active_children()


def test_read_ahead_is_bounded_while_a_slow_record_holds_up_the_stream() -> None:
    pulled = 0

    def rows():
        nonlocal pulled
        for row in read_smiles_strings([C60] + ["C"] * 100, seed=42):
            pulled += 1
            yield row

    stream = embed_pending(rows(), workers=2, timeout=1.0)
    assert next(stream).message.endswith(time_limit_reason(1.0))
    assert pulled == 2 * AHEAD_PER_WORKER  # the window, not the input
    stream.close()


def test_in_process_the_etkdg_timeout_stops_the_embedding() -> None:
    start = time.monotonic()
    (row,) = _rows(1, [C60], timeout=1.0)
    assert time.monotonic() - start < 10
    assert row.message.endswith(time_limit_reason(1.0))


def test_no_worker_starts_without_smiles(samples: Path) -> None:
    for _ in read_molecules([samples / "qm9_sample.xyz", samples / "qm9_sample.sdf"], workers=4):
        assert not multiprocessing.active_children()


def test_closing_the_stream_stops_the_workers() -> None:
    rows = read_molecules(smiles=["CCO", "CO", "CCN"] * 10, workers=2)
    assert next(rows).ok
    assert len(multiprocessing.active_children()) == 2
    rows.close()
    assert not multiprocessing.active_children()


def test_predict_writes_the_same_molecules_with_one_or_two_workers(tiny_checkpoint: Path, tmp_path: Path):
    outputs = []
    for workers in (1, 2):
        out = tmp_path / f"workers{workers}.sdf"
        args = ["predict", "--model", str(tiny_checkpoint), "-o", str(out), "--workers", str(workers)]
        result = CliRunner().invoke(
            app, [*args, "--conformer-timeout", "30", "--smiles", "CCO", "--smiles", "C1CC"]
        )
        assert result.exit_code == 0, result.output
        outputs.append(out.read_text())
    assert outputs[0] == outputs[1]
    assert outputs[0].count("$$$$") == 1  # the unparsable SMILES has no coordinates to write


def test_the_python_api_passes_the_options_on(tiny_checkpoint: Path) -> None:
    model = load_model(str(tiny_checkpoint), device="cpu")
    inputs = ["CCO ethanol", f"{C60} fullerene", "C1CC"]
    rows = model.predict(inputs, workers=2, conformer_timeout=0.5)
    assert [r.status for r in rows] == ["warning", "error", "error"]
    assert rows[1].message.endswith(time_limit_reason(0.5))
    assert rows[0] == model.predict(inputs[0], workers=1)[0]


def _processes() -> dict[int, tuple[str, int]]:
    """Every process's (state, parent pid), from /proc."""
    table = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        table[int(entry)] = (fields[0], int(fields[1]))
    return table


def _running_below(root: int) -> set[int]:
    """The processes below ``root`` that still run (zombies do not)."""
    table = _processes()
    found, frontier = set(), [root]
    while frontier:
        parent = frontier.pop()
        children = {pid for pid, (state, ppid) in table.items() if ppid == parent and state != "Z"}
        frontier += children - found
        found |= children
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree from /proc")
def test_ctrl_c_stops_predict_and_all_its_workers(tiny_checkpoint: Path, tmp_path: Path) -> None:
    source = tmp_path / "many.smi"
    source.write_text("CCO\n" * 5000)
    args = [sys.executable, "-m", "se3tcli", "predict", str(source), "--model", str(tiny_checkpoint)]
    process = subprocess.Popen(
        [*args, "--device", "cpu", "--workers", "2", "-o", str(tmp_path / "out.csv")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, which a terminal's Ctrl-C reaches as a whole
    )
    deadline = time.monotonic() + 60
    while len(started := _running_below(process.pid)) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)  # the forkserver and two workers (and multiprocessing's resource tracker)
    assert len(started) >= 3
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "interrupted" and "Traceback" not in stderr
    deadline = time.monotonic() + 10
    while (running := started & {p for p, (state, _) in _processes().items() if state != "Z"}) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.05)
    assert not running
    assert not (tmp_path / "out.csv").exists()


def test_a_molecule_over_the_atom_limit_is_an_error_before_its_conformer(monkeypatch) -> None:
    """C400 has 1202 atoms with its hydrogens: refused at once, never embedded (which takes minutes)."""

    def never(*args):
        raise AssertionError("embedded a molecule over the limit")

    monkeypatch.setattr(conformer_pool, "embed_binary", never)
    (row,) = read_molecules(smiles=["C" * 400 + " polyethylene"], workers=1, max_atoms=100)
    assert row.message == "<smiles> record 1 (polyethylene): " + size_limit_reason(1202, 100)


def _signal_masks(pid: int) -> dict[str, int]:
    """The SigBlk and SigIgn masks of a process, from /proc (bit n - 1 is signal n)."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: int(v, 16) for k, v in (line.split(":\t") for line in lines) if k in ("SigBlk", "SigIgn")}


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads signal masks from /proc")
def test_workers_start_with_ctrl_c_ignored_and_other_forkserver_children_keep_it() -> None:
    """A Ctrl-C in the instant a worker starts must not kill it with a traceback: the forkserver's children
    start with SIGINT ignored; every child but se3t's workers gets Ctrl-C back, and se3t's process keeps
    its own handler."""
    context = conformer_pool._context()
    if context.get_start_method() != "forkserver":
        pytest.skip("no forkserver on this platform")
    sigint = 1 << (signal.SIGINT - 1)
    worker = conformer_pool._Worker(context)
    other = context.Process(target=time.sleep, args=(30,), name="someone-else", daemon=True)
    try:
        assert worker.conn.recv() == "ready"
        assert _signal_masks(worker.process.pid)["SigIgn"] & sigint
        other.start()
        deadline = time.monotonic() + 20
        while _signal_masks(other.pid)["SigIgn"] & sigint and time.monotonic() < deadline:
            time.sleep(0.02)  # ignored from the fork until multiprocessing runs the child's after-fork hooks
        assert not _signal_masks(other.pid)["SigIgn"] & sigint
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # this process: unchanged
    finally:
        worker.stop()
        other.kill()
        other.join()
