"""Hostile and busy users: odd inputs, fuzzed arguments, interrupts, memory that must stay flat."""

from __future__ import annotations

import errno
import fcntl
import gzip
import inspect
import json
import math
import os
import signal
import stat
import subprocess
import sys
import threading
import time
import tracemalloc
import typing
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from se3tcli import cli
from se3tcli.checkpoint import CheckpointError, checkpoint_dict, load_model, save_checkpoint
from se3tcli.cli import app
from se3tcli.files import atomic_write
from se3tcli.io import read_molecules
from se3tcli.io.conformers import DEFAULT_TIMEOUT_S, MAX_TIMEOUT_S
from se3tcli.io.filereader import read_file
from se3tcli.io.reading import reader_of
from se3tcli.io.smiles import SMILES_READER
from se3tcli.model.config import PRESETS, ModelConfig
from se3tcli.model.transformer import SE3Transformer
from se3tcli.predict import MAX_ATOMS_PER_MOLECULE, predict_stream

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_molecules"
TINY = dict(channels=8, n_heads=2, lmax=1, n_layers=1, radial_hidden=8, readout_hidden=8, n_radial=4)
runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """An untrained but complete checkpoint (QM9-like statistics and domain) for fast CLI runs."""
    torch.manual_seed(0)
    model = SE3Transformer(ModelConfig(targets=("homo", "gap", "U0"), **TINY))
    model.set_statistics({"homo": -6.5, "gap": 6.8, "U0": -76.0}, {"homo": 0.6, "gap": 1.3, "U0": 0.2}, {})
    training = {"domain": {"elements": [1, 6, 7, 8, 9], "max_atoms": 29, "max_heavy_atoms": 9}}
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    save_checkpoint(checkpoint_dict(model, {}, {}, training), path)
    return path


def _xyz_frames(n: int, shift: float = 0.0) -> str:
    frames = []
    for i in range(n):
        frames.append(
            f"5\nmethane_{i}\nC {shift:.3f} 0 0\n"
            f"H {shift + 0.63:.3f} 0.63 0.63\nH {shift - 0.63:.3f} -0.63 0.63\n"
            f"H {shift - 0.63:.3f} 0.63 -0.63\nH {shift + 0.63:.3f} -0.63 -0.63\n"
        )
    return "".join(frames)


def _predict_json(args: list[str], model: Path) -> tuple[int, list[dict], str]:
    out = Path(args[-1]).parent / "out.json" if args else Path("out.json")
    result = runner.invoke(app, ["predict", *args, "--model", str(model), "--device", "cpu", "-o", str(out)])
    rows = json.loads(out.read_text()) if out.exists() else []
    return result.exit_code, rows, result.output


# ----------------------------------------------------------------------------- odd inputs


def test_odd_molecules_get_a_prediction_or_a_clean_error_row(tmp_path, tiny_model):
    big = "\n".join(f"C {i * 1.5:.3f} {(i % 7) * 1.5:.3f} {(i % 3) * 1.5:.3f}" for i in range(500))
    (tmp_path / "big.xyz").write_text(f"500\nchain of 500 carbons\n{big}\n")
    (tmp_path / "far.xyz").write_text(_xyz_frames(1, shift=1e6))
    (tmp_path / "dup.xyz").write_text("3\nduplicated atom\nO 0 0 0\nH 0.96 0 0\nH 0.96 0 0\n")
    (tmp_path / "metal.xyz").write_text("3\niron water\nFe 0 0 0\nO 2.0 0 0\nH 2.9 0 0\n")
    (tmp_path / "crlf.xyz").write_bytes(_xyz_frames(2).replace("\n", "\r\n").encode())
    (tmp_path / "empty.sdf").write_text("")
    (tmp_path / "garbage.xyz").write_bytes(bytes(range(256)) * 4)
    with gzip.open(tmp_path / "sample.sdf.gz", "wb") as handle:
        handle.write((SAMPLES / "qm9_sample.sdf").read_bytes())
    files = [
        "big.xyz",
        "far.xyz",
        "dup.xyz",
        "metal.xyz",
        "crlf.xyz",
        "empty.sdf",
        "garbage.xyz",
        "sample.sdf.gz",
    ]
    smiles = ["C[NH3+]", "[CH3]", "CC(=O)[O-].[Na+]"]
    result = runner.invoke(
        app,
        [
            "predict",
            *[str(tmp_path / f) for f in files],
            *[a for s in smiles for a in ("--smiles", s)],
            "--model",
            str(tiny_model),
            "--device",
            "cpu",
            "-o",
            str(tmp_path / "out.json"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    rows = json.loads((tmp_path / "out.json").read_text())
    by_name = {(Path(r["source"]).name, r["name"]): r for r in rows}
    status = {key: r["status"] for key, r in by_name.items()}
    assert status[("big.xyz", "chain of 500 carbons")] == "warning"  # larger than the training domain
    assert by_name[("big.xyz", "chain of 500 carbons")]["homo_eV"] is not None
    assert status[("far.xyz", "methane_0")] == "ok"
    assert status[("dup.xyz", "duplicated atom")] == "error"
    assert "Fe" in by_name[("metal.xyz", "iron water")]["message"]
    assert [r["status"] for r in rows if r["source"].endswith("crlf.xyz")] == ["ok", "ok"]
    assert [r["status"] for r in rows if r["source"].endswith("empty.sdf")] == ["error"]
    assert all(r["status"] == "error" for r in rows if r["source"].endswith("garbage.xyz"))
    assert sum(r["source"].endswith("sample.sdf.gz") and r["status"] == "ok" for r in rows) == 10
    smiles_rows = [r for r in rows if r["source"] == "<smiles>"]
    # charged and radical: warnings (outside the training domain); the sodium salt: unsupported element
    assert [r["status"] for r in smiles_rows] == ["warning", "warning", "error"]
    assert "Na" in smiles_rows[2]["message"]
    for row in rows:
        assert row["message"] or row["status"] == "ok"
        if row["status"] == "error":
            assert Path(row["source"]).name in row["message"] or row["source"] == "<smiles>"


def test_far_from_origin_predicts_like_at_origin(tmp_path, tiny_model):
    (tmp_path / "near.xyz").write_text(_xyz_frames(1))
    (tmp_path / "far.xyz").write_text(_xyz_frames(1, shift=1e6))
    loaded = load_model(str(tiny_model))
    near, far = (
        next(predict_stream(loaded, read_molecules([tmp_path / f]), torch.device("cpu")))[1]
        for f in ("near.xyz", "far.xyz")
    )
    for target in near:
        assert far[target] == pytest.approx(near[target], abs=1e-4)


# ----------------------------------------------------------------------------- fuzzed arguments

OPTION_VALUES = {
    "--targets": st.one_of(
        st.sampled_from(["homo", "gap,homo", "HOMO", "nope", ",", "homo,,gap", ""]), st.text()
    ),
    "--batch-size": st.one_of(st.integers(-5, 300).map(str), st.text(max_size=4)),
    "--device": st.one_of(st.sampled_from(["cpu", "auto", "cuda", "tpu", ""]), st.text(max_size=6)),
    "--smiles": st.one_of(st.sampled_from(["C", "CCO", "c1ccccc1", "[Xe]", "((", ""]), st.text(max_size=10)),
}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    options=st.lists(st.tuples(st.sampled_from(sorted(OPTION_VALUES)), st.data()), max_size=4),
    use_file=st.sampled_from(["qm9_sample.xyz", "missing.sdf", "README.md", None]),
)
def test_fuzzed_predict_arguments_never_trace_back(tiny_model, options, use_file):
    args = ["predict", "--model", str(tiny_model)]
    for flag, data in options:
        args += [flag, data.draw(OPTION_VALUES[flag])]
    if use_file:
        args.append(str(SAMPLES / use_file) if use_file != "missing.sdf" else "missing.sdf")
    result = runner.invoke(app, args)
    assert result.exit_code in (0, 1, 2), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output


# ----------------------------------------------------------------------------- interrupts


def _wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_atomic_write_replaces_a_file_only_when_complete(tmp_path):
    target = tmp_path / "card.json"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_write(target) as handle:
        handle.write("half")
        raise KeyboardInterrupt
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["card.json"]
    with atomic_write(target, "wb") as handle:
        handle.write(b"new")
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["card.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644 & ~umask


@pytest.mark.parametrize("name", ["p" * 246 + ".csv", "日" * 80 + ".csv"])  # 250 and 244 bytes
def test_atomic_write_to_a_long_name(tmp_path, name):
    target = tmp_path / name  # valid (255 bytes at most), though its temp name was not
    with atomic_write(target) as handle:
        handle.write("ok")
    assert target.read_text() == "ok" and [p.name for p in tmp_path.iterdir()] == [target.name]


def test_a_full_disk_names_the_file(tmp_path, monkeypatch, tiny_model):
    """ENOSPC comes from a write or fsync, which knows no file name; the error names the target."""
    full = OSError(errno.ENOSPC, "No space left on device")
    target = tmp_path / "card.json"
    with pytest.raises(OSError, match="card.json") as raised, atomic_write(target) as handle:
        handle.write("x")
        raise full
    assert raised.value.errno == errno.ENOSPC and not target.exists()

    def no_space(fd: int) -> None:
        raise full

    monkeypatch.setattr(os, "fsync", no_space)
    source = tmp_path / "water.xyz"
    source.write_text(_xyz_frames(2))
    args = [
        "predict",
        str(source),
        "--model",
        str(tiny_model),
        "--device",
        "cpu",
        "-o",
        str(tmp_path / "o.csv"),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert "No space left on device" in result.output and "o.csv" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["water.xyz"]


def test_temporaries_of_a_writer_killed_hard_are_removed_by_the_next_write(tmp_path):
    """``kill -9`` leaves the temporary file; the next write of the same target removes it, and only such
    files: not those of a live writer (its pid, or its lock), another host, another target or old names."""
    target = tmp_path / "out.csv"
    writer = "import sys, time; from se3tcli.files import AtomicFile; print(AtomicFile(sys.argv[1]).tmp.name)"
    process = subprocess.Popen(
        [sys.executable, "-c", writer + "; sys.stdout.flush(); time.sleep(60)", str(target)],
        stdout=subprocess.PIPE,
        text=True,
    )
    left = process.stdout.readline().strip()
    host, _, _ = left.removeprefix(".out.csv.").split("-")
    with atomic_write(target) as handle:  # while its writer lives, its temporary file stays
        handle.write("first")
    assert (tmp_path / left).exists()
    process.kill()
    process.wait()
    process.stdout.close()
    dead = process.pid
    stale = f".out.csv.{host}-{dead}-89abcdef.tmp"
    kept = [
        f".out.csv.{host}-{os.getpid()}-0123abcd.tmp",  # a live pid
        f".out.csv.{host}-{dead}-0123abcd.tmp",  # held by a live process (in another pid namespace, say)
        f".out.csv.{'ffffffff' if host != 'ffffffff' else '00000000'}-{dead}-0123abcd.tmp",  # another host
        f".out.csv.bak.{host}-{dead}-0123abcd.tmp",  # another target's
        ".out.csv.0123456789ab.tmp",  # an older se3t's name, which says nothing about its writer
    ]
    for name in (stale, *kept):
        (tmp_path / name).write_text("partial")
    with open(tmp_path / kept[1]) as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with atomic_write(target) as handle:
            handle.write("second")
    assert target.read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out.csv", *kept])


@pytest.mark.parametrize("suffix", [".xyz", ".sdf"])
def test_an_input_cut_short_while_it_is_read_ends_with_an_error_row(tmp_path, samples, suffix):
    """Truncated between records after the first row: the rows so far and one error row for the rest,
    even for rows already in the reader's buffer; a file that grows is read to its end."""
    path = tmp_path / f"input{suffix}"
    text = _xyz_frames(3) if suffix == ".xyz" else (samples / "qm9_sample.sdf").read_text()
    path.write_text(text)
    rows = read_file(path, reader_of(path), embed=False, seed=0)
    first = next(rows)
    assert first.ok and first.index == 0
    first_record = text.index("methane_1") - 2 if suffix == ".xyz" else text.index("$$$$\n") + 5
    os.truncate(path, first_record)
    (rest,) = list(rows)
    assert rest.status == "error" and rest.index == 1
    assert rest.message == (
        f"input{suffix} record 2: cannot read the rest of the file: "
        "it was cut short while it was read (truncated, or rewritten in place)"
    )


@pytest.mark.slow
def test_interrupted_predict_leaves_no_partial_file(tmp_path, tiny_model):
    source = tmp_path / "many.xyz"
    source.write_text(_xyz_frames(20000))
    out = tmp_path / "out.csv"
    process = subprocess.Popen(
        ["se3t", "predict", str(source), "--model", str(tiny_model), "--device", "cpu", "-o", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # The temporary output appears once predictions start flowing.
    assert _wait_for(lambda: any(tmp_path.glob(".out.csv.*.tmp")), timeout=120)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert not out.exists()
    assert not list(tmp_path.glob(".out.csv*"))


def test_a_ctrl_c_swallowed_by_a_finaliser_still_stops_predict(monkeypatch):
    class Finaliser:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs here, and Python drops its KeyboardInterrupt

    printed = []  # what Python would print as "Exception ignored in ..."
    monkeypatch.setattr(sys, "unraisablehook", printed.append)
    before = signal.getsignal(signal.SIGINT)
    with cli._RememberedInterrupts() as interrupts:
        Finaliser()  # dropped at once: nothing is raised here
        with pytest.raises(KeyboardInterrupt):
            interrupts.raise_if_received()  # what predict's row loop calls
    assert signal.getsignal(signal.SIGINT) is before
    assert not printed


@pytest.mark.slow
def test_interrupted_train_saves_last_and_resumes(tmp_path):
    run = tmp_path / "run"
    pytest.importorskip("se3tcli.data.qm9")
    base = ["se3t", "train", "--dataset", "qm9", "--limit", "60", "--targets", "homo,gap"]
    tiny = ["--channels", "8", "--heads", "2", "--lmax", "1", "--layers", "1", "--device", "cpu"]
    process = subprocess.Popen(
        [*base, *tiny, "--epochs", "100000", "--batch-size", "4", "--out", str(run)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert _wait_for(lambda: (run / "metrics.csv").exists(), timeout=180)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert (run / "last.pt").exists()
    resumed = subprocess.run(
        ["se3t", "train", "--out", str(run), "--resume", "--epochs", "1"], capture_output=True, text=True
    )
    # The saved run is past epoch 1 already: resuming with a smaller budget finishes at once.
    assert resumed.returncode == 0, resumed.stderr


# ----------------------------------------------------------------------------- memory


def _peak_python_memory(path: Path, loaded) -> int:
    tracemalloc.start()
    for _ in predict_stream(loaded, read_molecules([path]), torch.device("cpu"), batch_size=32):
        pass
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak


@pytest.mark.slow
def test_streaming_memory_does_not_grow_with_input(tmp_path, tiny_model):
    loaded = load_model(str(tiny_model))
    small, large = tmp_path / "small.xyz", tmp_path / "large.xyz"
    small.write_text(_xyz_frames(500))
    large.write_text(_xyz_frames(3000))
    peak_small = _peak_python_memory(small, loaded)
    peak_large = _peak_python_memory(large, loaded)
    # Six times the molecules, (nearly) the same peak: nothing accumulates per record.
    assert peak_large < 1.5 * peak_small + 2_000_000, (peak_small, peak_large)


# ------------------------------------------------------------------------------ outputs and their inputs


def _predict_to(inputs: list[Path], out: Path, model: Path, *extra: str):
    args = ["predict", *map(str, inputs), "--model", str(model), "--device", "cpu", "-o", str(out), *extra]
    return runner.invoke(app, args)


def _single_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    return lines[0]


def test_an_output_over_an_input_is_refused_also_through_a_link(tmp_path, tiny_model, samples):
    source = tmp_path / "b.sdf"
    source.write_bytes((samples / "bad.sdf").read_bytes())
    link = tmp_path / "link.sdf"
    link.symlink_to(source)
    for out, extra in ((source, ()), (link, ()), (link, ("--overwrite",))):
        line = _single_error_line(_predict_to([source], out, tiny_model, *extra))
        assert "is also an input" in line
    assert source.read_bytes() == (samples / "bad.sdf").read_bytes()


def test_an_existing_output_is_replaced_only_with_overwrite_and_keeps_its_mode(tmp_path, tiny_model):
    source = tmp_path / "in.xyz"
    source.write_text(_xyz_frames(2))
    out = tmp_path / "out.csv"
    out.write_text("someone's notes\n")
    out.chmod(0o600)
    assert "--overwrite" in _single_error_line(_predict_to([source], out, tiny_model))
    assert out.read_text() == "someone's notes\n"
    result = _predict_to([source], out, tiny_model, "--overwrite")
    assert result.exit_code == 0, result.output
    assert out.read_text().startswith("name,") and stat.S_IMODE(out.stat().st_mode) == 0o600


# --------------------------------------------------------------------------------- non-finite results


def test_a_model_with_nan_weights_is_refused_at_load(tmp_path, tiny_model):
    state = torch.load(tiny_model, weights_only=True)
    name = next(k for k, v in state["state_dict"].items() if v.is_floating_point() and "weight" in k)
    state["state_dict"][name] = torch.full_like(state["state_dict"][name], float("nan"))
    broken = tmp_path / "nan.pt"
    save_checkpoint(state, broken)
    with pytest.raises(CheckpointError, match="non-finite"):
        load_model(str(broken))
    result = runner.invoke(app, ["predict", "--model", str(broken), "--smiles", "CCO"])
    assert result.exit_code == 2 and "non-finite" in result.stderr and "Traceback" not in result.output


def test_predictions_that_are_not_finite_make_an_error_row(tmp_path, tiny_checkpoint):
    """Atoms 1e300 Å apart: finite coordinates, but the dipole (charges times positions) is not finite;
    that row is an error instead of an 'ok' with empty values, and the next one is predicted."""
    source = tmp_path / "far.xyz"
    source.write_text("2\nfar apart\nC 0 0 0\nC 1e300 0 0\n" + _xyz_frames(1))
    code, rows, output = _predict_json([str(source)], tiny_checkpoint)
    assert code == 0, output
    assert [r["status"] for r in rows] == ["error", "ok"]
    assert "not finite" in rows[0]["message"] and rows[0]["message"].startswith("far.xyz record 1")


def test_an_output_link_is_written_through_to_its_file(tmp_path, tiny_model):
    source = tmp_path / "in.xyz"
    source.write_text(_xyz_frames(1))
    target, link = tmp_path / "target.csv", tmp_path / "link.csv"
    target.write_text("old\n")
    link.symlink_to(target)
    assert "--overwrite" in _single_error_line(_predict_to([source], link, tiny_model))
    result = _predict_to([source], link, tiny_model, "--overwrite")
    assert result.exit_code == 0, result.output
    assert link.is_symlink() and target.read_text().startswith("name,")


# ------------------------------------------------------------------------- limits: size, memory, inputs


def _lattice_frame(name: str, n_atoms: int, spacing: float = 1.5) -> str:
    """An XYZ frame of ``n_atoms`` carbons on a cubic lattice ``spacing`` Å apart (a dense cluster)."""
    side = math.ceil(n_atoms ** (1 / 3))
    atoms = [(i % side, i // side % side, i // side**2) for i in range(n_atoms)]
    lines = [f"C {x * spacing:.2f} {y * spacing:.2f} {z * spacing:.2f}" for x, y, z in atoms]
    return f"{n_atoms}\n{name}\n" + "\n".join(lines) + "\n"


def test_a_molecule_over_the_atom_limit_is_its_own_error_row(tmp_path, tiny_model):
    source = tmp_path / "in.xyz"
    source.write_text(_xyz_frames(1) + _lattice_frame("cluster", 30) + _xyz_frames(1))
    code, rows, output = _predict_json(["--max-atoms-per-molecule", "29", str(source)], tiny_model)
    assert code == 0, output
    assert [r["status"] for r in rows] == ["ok", "error", "ok"]
    assert rows[1]["message"] == (
        "in.xyz record 2 (cluster): 30 atoms, more than the limit of 29 (--max-atoms-per-molecule)"
    )
    code, rows, output = _predict_json(
        ["--max-atoms-per-molecule", "30", "--overwrite", str(source)], tiny_model
    )
    assert [r["status"] for r in rows] == ["ok", "warning", "ok"] and rows[1]["homo_eV"] is not None
    assert runner.invoke(app, ["predict", "--max-atoms-per-molecule", "0", "--smiles", "C"]).exit_code == 2
    # the command line's defaults are the library's (spelled out: the CLI imports neither torch nor RDKit)
    defaults = {name: p.default for name, p in inspect.signature(cli.predict).parameters.items()}
    assert defaults["max_atoms_per_molecule"] == MAX_ATOMS_PER_MOLECULE
    assert defaults["conformer_timeout"] == DEFAULT_TIMEOUT_S
    hints = typing.get_type_hints(cli.predict, include_extras=True)
    assert hints["conformer_timeout"].__metadata__[0].max == MAX_TIMEOUT_S


CPU_OUT_OF_MEMORY = (
    "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to "
    "allocate 21474836480 bytes. Error code 12 (Cannot allocate memory)"
)


def _forward_failing_over(monkeypatch, max_atoms: int, error: Exception) -> list[int]:
    """The model raises ``error`` for any batch holding a molecule of more than ``max_atoms`` atoms; returns
    the list that records the molecules of each batch it was given."""
    forward, batches = SE3Transformer.forward, []

    def failing(self, batch):
        batches.append(batch.n_mol)
        if int(batch.n_atoms_per_mol.max()) > max_atoms:
            raise error
        return forward(self, batch)

    monkeypatch.setattr(SE3Transformer, "forward", failing)
    return batches


@pytest.mark.parametrize("error", [MemoryError(), RuntimeError(CPU_OUT_OF_MEMORY)], ids=["python", "torch"])
def test_out_of_memory_in_a_batch_costs_only_the_molecule_that_does_not_fit(
    tmp_path, tiny_model, monkeypatch, error
):
    """Issue 16: waters and one dense frame under `ulimit -v` ended in "can't allocate memory", with no
    output file. The batch is now retried one molecule at a time; the one that fails alone is an error row,
    the others are predicted as in a normal run, and the output is written."""
    source = tmp_path / "in.xyz"
    source.write_text(_xyz_frames(30) + _lattice_frame("dense", 125) + _xyz_frames(30))
    loaded, cpu = load_model(str(tiny_model)), torch.device("cpu")
    expected = [values for _, values in predict_stream(loaded, read_molecules([source]), cpu)]
    batches, messages = _forward_failing_over(monkeypatch, 100, error), []
    rows = list(predict_stream(loaded, read_molecules([source]), cpu, on_oom=messages.append))
    assert messages == ["out of memory (cpu) on 61 molecules; retrying them one by one"]
    assert batches == [61] + [1] * 61  # the whole batch once, then each molecule alone
    errors = [(m.index, m.message) for m, values in rows if values is None]
    assert errors == [(30, "in.xyz record 31 (dense): out of memory: 125 atoms")]
    for (molecule, values), before in zip(rows, expected, strict=True):
        if molecule.index != 30:
            assert values == pytest.approx(before, rel=1e-5)
    # on the command line: the run goes on, says so, and writes every row
    code, written, output = _predict_json([str(source)], tiny_model)
    assert code == 0 and "Traceback" not in output and "retrying them one by one" in output, output
    assert [i for i, row in enumerate(written) if row["status"] == "error"] == [30] and len(written) == 61


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_out_of_memory_halves_the_batch_until_it_fits(tmp_path, tiny_model, monkeypatch):
    source = tmp_path / "in.xyz"
    source.write_text(_xyz_frames(10))
    loaded, messages = load_model(str(tiny_model)), []
    forward, batches = SE3Transformer.forward, []

    def small_batches_only(self, batch):
        batches.append(batch.n_mol)
        if batch.n_mol > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(self, batch)

    monkeypatch.setattr(SE3Transformer, "forward", small_batches_only)
    gpu = torch.device("cuda")
    rows = list(predict_stream(loaded, read_molecules([source]), gpu, on_oom=messages.append))
    assert [m.status for m, values in rows] == ["ok"] * 10 and all(values for _, values in rows)
    assert batches == [10, 5, 2, 3, 5, 2, 3]
    assert messages[0] == "out of memory (cuda) on 10 molecules; retrying as two batches of <= 5"


def test_errors_other_than_memory_are_not_taken_for_it(tmp_path, tiny_model, monkeypatch):
    source = tmp_path / "in.xyz"
    source.write_text(_xyz_frames(3))
    _forward_failing_over(monkeypatch, 0, RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    result = _predict_to([source], tmp_path / "out.csv", tiny_model)
    assert result.exit_code == 1 and "shapes cannot be multiplied" in result.stderr
    assert not (tmp_path / "out.csv").exists()


@pytest.mark.parametrize(
    "changes, bound",
    [
        ({"n_layers": 100_000}, "n_layers <= 64"),
        ({"channels": 4096}, "channels <= 1024"),
        ({"n_heads": 128, "channels": 128}, "n_heads <= 64"),
        ({"lmax": 7}, "lmax <= 6"),
        ({"jmax": 13}, "jmax <= 12"),
        ({"n_radial": 5000}, "n_radial <= 4096"),
        ({"radial_hidden": 10**9}, "radial_hidden <= 4096"),
        ({"readout_hidden": 4097}, "readout_hidden <= 4096"),
        ({"cutoff": 25.0}, "cutoff <= 20 Å"),
        ({"cutoff": math.inf}, "cutoff <= 20 Å"),
    ],
)
def test_model_config_sizes_are_bounded(changes, bound):
    with pytest.raises(ValueError, match=f"invalid model config: {bound} required"):
        ModelConfig(**changes)


def test_the_presets_and_the_bounds_themselves_are_valid():
    for config in PRESETS.values():
        assert config.n_layers <= 64 and config.channels <= 1024 and config.lmax <= 6
    ModelConfig(channels=1024, n_heads=64, n_layers=64, lmax=6, jmax=12, cutoff=20.0, n_radial=4096)


def test_a_checkpoint_with_an_absurd_config_fails_at_once_in_load(tmp_path, tiny_model):
    """Issue 16: `n_layers=100000` in a checkpoint's config took 77 s and 7.4 GB before a MemoryError."""
    state = torch.load(tiny_model, weights_only=True)
    state["config"]["n_layers"] = 100_000
    hostile = tmp_path / "hostile.pt"
    save_checkpoint(state, hostile)
    with pytest.raises(CheckpointError, match="n_layers <= 64"):
        load_model(str(hostile))
    line = _single_error_line(runner.invoke(app, ["predict", "--model", str(hostile), "--smiles", "C"]))
    assert "hostile.pt" in line and "n_layers <= 64" in line


def _within(seconds: float, call):
    """``call()`` in a thread: the test fails, instead of hanging, if it blocks."""
    results = []
    thread = threading.Thread(target=lambda: results.append(call()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s: blocked on an input?"
    return results[0]


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_inputs_that_are_not_regular_files_are_refused_without_blocking(tmp_path, tiny_model):
    """Issue 16: a FIFO named .smi blocked forever, /dev/zero as .smi read forever."""
    fifo, zero, folder = tmp_path / "fifo.smi", tmp_path / "zero.smi", tmp_path / "folder.sdf"
    os.mkfifo(fifo)
    zero.symlink_to("/dev/zero")
    folder.mkdir()
    for path, reason in ((fifo, "not a regular file"), (zero, "not a regular file"), (folder, "directory")):
        result = _within(60, lambda path=path: _predict_to([path], tmp_path / "out.csv", tiny_model))
        line = _single_error_line(result)
        assert reason in line and str(path) in line
    kinds = "(a pipe, device or socket)"
    for path in (fifo, zero):  # the file reader refuses them too (an error row, never an open)
        [row] = _within(60, lambda path=path: list(read_file(path, SMILES_READER, True, 0)))
        assert row.status == "error" and row.source == str(path)
        assert row.message == f"{path.name} record 1: cannot open file: not a regular file " + kinds
