"""The fused CPU attention kernel (se3tcli/model/fused_cpu/, fused_attention.c): its outputs and its
backward's gradients equal the PyTorch backend's (float64, several receiver blocks, both edge orders), its
receiver blocks own their edges, ``auto`` falls back to PyTorch and an explicit ``fused_cpu`` raises where
the kernel cannot run, and the kernel cache never loads code that someone else could have written, or a
library that is cut short, lacks the kernel or was built from another version of the source.

(The contract every backend meets, equivariance included, is in test_model.py.)
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_molecule  # noqa: I001 - the tests folder's shared helpers
from helpers import TINY_MODEL, kernel_calls, make_model, max_rel_diff, needs_compiler, with_edge_order
from typer.testing import CliRunner

from se3tcli.cli import app
from se3tcli.graph import collate
from se3tcli.model import fused_cpu
from se3tcli.model.backend import DISABLE_ENV, BackendUnavailable, LayerCall, resolve
from se3tcli.model.fused_cpu import abi, blocks, cache, library
from se3tcli.paths import CACHE_ENV

CONFIG = TINY_MODEL
LOGGER = "se3tcli.model.fused_cpu.library"
NOTICES = "se3tcli.notices"
COMPILING = "compiling se3t's CPU attention kernel (once"


@pytest.fixture
def fresh_library() -> Iterator[None]:
    """Forget the loaded kernel before and after (the tests below change how it is built)."""
    library.kernel_library.cache_clear()
    yield
    library.kernel_library.cache_clear()


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_library: None) -> Path:
    """A fresh se3t cache directory (not created yet), with ``auto`` allowed to use the kernel."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    return tmp_path / "cache"


def some_molecules(seed: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
    """Molecules of 1-14 atoms; in one, an atom beyond the cutoff of the others (a receiver without edges)."""
    rng = np.random.default_rng(seed)
    molecules = [random_molecule(rng, int(n)) for n in rng.integers(1, 15, size=9)]
    z, pos = random_molecule(rng, 4)
    molecules.append((np.append(z, 6), np.vstack([pos, [40.0, 0.0, 0.0]])))
    return molecules


def finite_predictions(model, batch) -> bool:
    with torch.inference_mode():
        return all(bool(torch.isfinite(v).all()) for v in model(batch).values())


def assert_falls_back_to_pytorch(reason: str) -> None:
    """A model still predicts (finite values, through the PyTorch path), and asking for the kernel
    explicitly raises with ``reason``."""
    model = make_model(CONFIG, dtype=torch.float64)
    assert finite_predictions(model, collate(some_molecules(), CONFIG.cutoff, dtype=torch.float64))
    with pytest.raises(BackendUnavailable, match=reason):
        model.set_backend("fused_cpu")


@needs_compiler
def test_the_kernel_builds_where_a_compiler_exists() -> None:
    """Every test below that needs the kernel would otherwise skip silently on a broken build."""
    assert library.kernel_library().cdll is not None


def outputs(model, batch, backend: str, monkeypatch) -> tuple[dict[str, torch.Tensor], int]:
    """The model's outputs (inference) with ``backend`` and how many kernel calls were made."""
    model.set_backend(backend)
    with kernel_calls(monkeypatch) as calls, torch.inference_mode():
        return model(batch), calls["forward"]


@needs_compiler
@pytest.mark.parametrize("paired", [True, False])
@pytest.mark.parametrize("n_heads, lmax, channels", [(2, 2, 8), (1, 1, 8), (4, 0, 8), (4, 2, 32)])
def test_fused_kernel_matches_the_pytorch_path(
    monkeypatch, paired: bool, n_heads: int, lmax: int, channels: int
) -> None:
    """float64, blocks of ~3 pairs so that a batch spans many blocks; unpaired: shuffled edges. 32
    channels: the presets' width, which the kernel compiles with constant sizes."""
    monkeypatch.setattr(blocks, "BLOCK_COEFFICIENTS", 3 * 5 * 2 * channels)
    model = make_model(CONFIG.replace(n_heads=n_heads, lmax=lmax, channels=channels), dtype=torch.float64)
    batch = with_edge_order(collate(some_molecules(), CONFIG.cutoff, dtype=torch.float64), paired)
    fused, n_calls = outputs(model, batch, "fused_cpu", monkeypatch)
    plain, no_calls = outputs(model, batch, "torch", monkeypatch)
    assert n_calls == CONFIG.n_layers and no_calls == 0
    assert max_rel_diff(fused, plain) < 1e-12


def parameter_gradients(model, batch, backend: str, monkeypatch) -> tuple[dict[str, torch.Tensor], int]:
    """Gradients of a loss over every output for every parameter, and how many kernel backward calls ran."""
    model.set_backend(backend)
    with kernel_calls(monkeypatch) as calls:
        model.zero_grad(set_to_none=True)
        sum((v - 0.3).pow(2).sum() for v in model(batch).values()).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}, calls[
        "backward"
    ]


@needs_compiler
@pytest.mark.parametrize("paired", [True, False])
@pytest.mark.parametrize(
    "n_heads, lmax, channels, dtype, tolerance",
    [(2, 2, 8, torch.float64, 1e-10), (4, 1, 8, torch.float64, 1e-10), (4, 2, 32, torch.float32, 1e-4)],
)
def test_fused_backward_matches_the_pytorch_path(
    monkeypatch, paired: bool, n_heads: int, lmax: int, channels: int, dtype: torch.dtype, tolerance: float
) -> None:
    """Training: the kernel's backward (features, queries, radial coefficients) gives every parameter the
    gradient the PyTorch path gives it, across many receiver blocks; float64, and float32 at the presets'
    32 channels (the kernel's constant-size code, which training runs)."""
    monkeypatch.setattr(blocks, "BLOCK_COEFFICIENTS", 3 * 5 * 2 * channels)
    config = CONFIG.replace(n_heads=n_heads, lmax=lmax, channels=channels)
    model = make_model(config, dtype=dtype).train()
    batch = with_edge_order(collate(some_molecules(5), CONFIG.cutoff, dtype=dtype), paired)
    fused, n_calls = parameter_gradients(model, batch, "fused_cpu", monkeypatch)
    plain, no_calls = parameter_gradients(model, batch, "torch", monkeypatch)
    assert n_calls == CONFIG.n_layers and no_calls == 0
    assert fused.keys() == plain.keys()
    for name, grad in plain.items():
        scale = max(float(grad.abs().max()), 1e-6)
        assert float((fused[name] - grad).abs().max()) / scale < tolerance, name


@needs_compiler
def test_fused_backward_is_deterministic_across_threads(monkeypatch) -> None:
    """Two threads sum their shares of the feature gradients in a fixed order: runs repeat bit for bit
    (resumed training depends on it)."""
    monkeypatch.setattr(blocks, "BLOCK_COEFFICIENTS", 3 * 5 * 2 * CONFIG.channels)
    model = make_model(CONFIG, dtype=torch.float32).train()
    batch = collate(some_molecules(6), CONFIG.cutoff, dtype=torch.float32)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        first, n_calls = parameter_gradients(model, batch, "fused_cpu", monkeypatch)
        again, _ = parameter_gradients(model, batch, "fused_cpu", monkeypatch)
    finally:
        torch.set_num_threads(threads)
    assert n_calls == CONFIG.n_layers
    assert all(torch.equal(first[name], again[name]) for name in first)


@needs_compiler
def test_a_molecule_too_large_for_one_block_takes_the_pytorch_path(monkeypatch) -> None:
    """Blocks hold whole molecules; one whose coefficients exceed MAX_BLOCK_COEFFICIENTS (thousands of
    atoms) goes through the PyTorch path under ``auto``, whose memory is bounded by blocks of edges, and
    makes an explicit ``fused_cpu`` raise."""
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    model = make_model(CONFIG, dtype=torch.float64)
    batch = collate(some_molecules(), CONFIG.cutoff, dtype=torch.float64)
    fused, n_calls = outputs(model, batch, "auto", monkeypatch)
    assert n_calls == CONFIG.n_layers
    monkeypatch.setattr(blocks, "MAX_BLOCK_COEFFICIENTS", 100)
    plain, n_calls = outputs(model, batch, "auto", monkeypatch)
    assert n_calls == 0 and max_rel_diff(fused, plain) < 1e-12
    with pytest.raises(BackendUnavailable, match="exceed the kernel's largest block"):
        outputs(model, batch, "fused_cpu", monkeypatch)


def _layer_call(model, batch, dtype: torch.dtype = torch.float64) -> LayerCall:
    x = torch.zeros(batch.z.shape[0], CONFIG.channels, (CONFIG.lmax + 1) ** 2, dtype=dtype)
    conv = model.layers[0].attention.key_value
    per_row = conv.angular.n_coefficients * conv.n_kernels * conv.channels
    return LayerCall(x, model.geometry(batch), conv.kernel, per_row)


def test_position_gradients_mixed_dtypes_and_autocast_keep_the_kernel_out(monkeypatch) -> None:
    """Forces need gradients through the geometry, which the kernel's backward does not give; the kernel
    reads every array in one type, so a float64 model on a float32 batch must not reach it; nor autocast,
    nor full kernels. ``auto`` then resolves to PyTorch and says why; an explicit ``fused_cpu`` raises."""
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    model = make_model(CONFIG, dtype=torch.float64)
    batch = collate(some_molecules(), CONFIG.cutoff, dtype=torch.float64)
    available = library.kernel_library().cdll is not None
    assert resolve("auto", _layer_call(model, batch)).backend == ("fused_cpu" if available else "torch")
    single = collate(some_molecules(), CONFIG.cutoff, dtype=torch.float32)  # float32 envelope and rotations
    cases = [
        (_layer_call(model, single), "mixed floating-point types"),
        (_layer_call(model, batch), "autocast"),
        (_layer_call(make_model(CONFIG.replace(kernel="full")), batch), "full kernels"),
    ]
    batch.pos.requires_grad_(True)
    cases.append((_layer_call(model, batch), "gradients of the positions"))
    for call, reason in cases:  # "autocast": the call resolved under CPU autocast
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=reason == "autocast"):
            assert resolve("auto", call).backend == "torch" and reason in resolve("auto", call).reason
            with pytest.raises(BackendUnavailable, match=reason):
                resolve("fused_cpu", call)


def test_the_reason_auto_gives_is_what_se3t_info_prints(monkeypatch) -> None:
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    kernel = library.kernel_library()
    expected = (
        f"fused C kernel ({kernel.detail})" if kernel.cdll is not None else f"PyTorch ({kernel.detail})"
    )
    assert fused_cpu.kernel_status() == resolve().line == expected


@needs_compiler
@pytest.mark.parametrize("channels", [8, 32])  # 32: the presets' width, compiled with constant sizes
def test_fused_kernel_in_float32_agrees_with_float64(monkeypatch, channels: int) -> None:
    model = make_model(CONFIG.replace(channels=channels), dtype=torch.float64)
    reference, _ = outputs(
        model, collate(some_molecules(2), CONFIG.cutoff, dtype=torch.float64), "torch", monkeypatch
    )
    batch32 = collate(some_molecules(2), CONFIG.cutoff, dtype=torch.float32)
    single, n_calls = outputs(model.float(), batch32, "fused_cpu", monkeypatch)
    assert n_calls == CONFIG.n_layers
    assert max_rel_diff({k: v.double() for k, v in single.items()}, reference) < 1e-4


@pytest.mark.parametrize("paired", [True, False])
def test_receiver_blocks_own_the_edges_of_their_receivers(paired: bool) -> None:
    batch = with_edge_order(collate(some_molecules(3), CONFIG.cutoff), paired)
    n_nodes, per_row = batch.z.shape[0], 2 if paired else 1
    planned = blocks.receiver_blocks(batch.edge_dst, n_nodes, per_row, target_rows=4)
    assert planned.nodes[0] == 0 and planned.nodes[-1] == n_nodes
    assert planned.rows[0] == 0 and planned.rows[-1] == batch.edge_src.numel() // per_row
    if paired:  # radius graphs cut between molecules: several blocks
        assert len(planned.nodes) > 3
    dst_sorted = batch.edge_dst[planned.order]
    assert torch.equal(dst_sorted, torch.sort(batch.edge_dst).values)
    assert torch.equal(
        planned.offsets[1:] - planned.offsets[:-1], torch.bincount(batch.edge_dst, minlength=n_nodes)
    )
    for b in range(len(planned.nodes) - 1):
        edges = planned.order[planned.offsets[planned.nodes[b]] : planned.offsets[planned.nodes[b + 1]]]
        rows = edges // per_row
        assert edges.numel() == 0 or (
            int(rows.min()) >= planned.rows[b] and int(rows.max()) < planned.rows[b + 1]
        ), f"block {b} reads rows outside its range"


def test_turned_off_auto_uses_pytorch_without_building(monkeypatch, fresh_library: None) -> None:
    """``SE3T_FUSED_CPU=0``: ``auto`` resolves to PyTorch, says why, and never builds or loads the kernel."""
    monkeypatch.setenv(DISABLE_ENV, "0")
    assert resolve().line == f"PyTorch ({DISABLE_ENV}=0)" == fused_cpu.kernel_status()
    model = make_model(CONFIG, dtype=torch.float64)
    batch = collate(some_molecules(), CONFIG.cutoff, dtype=torch.float64)
    _, n_calls = outputs(model, batch, "auto", monkeypatch)
    assert n_calls == 0 and finite_predictions(model, batch)
    assert library.kernel_library.cache_info().misses == 0


def test_a_failing_build_falls_back_to_pytorch(monkeypatch, cache_dir: Path, caplog) -> None:
    """A compiler that fails (here: `false`) leaves a warning, no library file and a working model; an
    explicit ``fused_cpu`` raises with the reason."""
    monkeypatch.setenv("CC", shutil.which("false") or "false")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert library.kernel_library().cdll is None
    assert "could not build the fused CPU kernel" in caplog.text
    assert not list(cache_dir.rglob("*.so"))
    (failed,) = cache_dir.rglob("*.failed")  # remembered: the next run neither rebuilds nor warns
    caplog.clear()
    library.kernel_library.cache_clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert library.kernel_library().cdll is None
    assert not caplog.text and failed.exists()
    assert "did not build before" in resolve().reason
    assert_falls_back_to_pytorch("did not build before")


def test_the_command_line_announces_a_build_on_stderr(monkeypatch, cache_dir: Path) -> None:
    """``se3t info --json`` builds the kernel (with a compiler that fails, here: `false`): the notice goes
    to stderr, once, and standard output stays the JSON alone."""
    monkeypatch.setenv("CC", shutil.which("false") or "false")
    runner = CliRunner()
    first = runner.invoke(app, ["info", "--json"])
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["cpu_attention_kernel"].startswith("PyTorch")
    assert first.stderr.startswith(COMPILING) and first.stderr.count(COMPILING) == 1
    library.kernel_library.cache_clear()
    again = runner.invoke(app, ["info", "--json"])  # the failed build is remembered: no second attempt
    assert again.exit_code == 0 and COMPILING not in again.stderr


@needs_compiler
def test_the_library_is_built_once_into_the_cache(cache_dir: Path, caplog) -> None:
    """Built, with a notice, on first use; loaded from the cache, silently, afterwards."""
    with caplog.at_level(logging.INFO, logger=NOTICES):
        assert library.kernel_library().cdll is not None
    assert [r.getMessage() for r in caplog.records if r.name == NOTICES][0].startswith(COMPILING)
    built = list((cache_dir / "kernels").glob("fused_attention-*.so"))
    assert len(built) == 1 and cache.sidecar(built[0]).exists()
    stamp = built[0].stat().st_mtime_ns
    library.kernel_library.cache_clear()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=NOTICES):
        assert library.kernel_library().cdll is not None
    assert not [r for r in caplog.records if r.name == NOTICES]
    assert built[0].stat().st_mtime_ns == stamp
    assert sorted(p.name for p in (cache_dir / "kernels").iterdir()) == [
        built[0].name,
        built[0].name + ".sha256",
    ]


# ----------------------------------------------------------------------------------------------------------
# the kernel cache: never load code that someone else could have written, or a library that is not the one
# that was built


def build_shared_library(source: str, target: Path) -> None:
    """Compile the C ``source`` into the shared library ``target`` (a library some other party planted)."""
    c_file = target.with_name(target.name + ".c")
    c_file.write_text(source)
    subprocess.run(
        [*library.find_compiler(), "-shared", "-fPIC", str(c_file), "-o", str(target)],
        check=True,
        capture_output=True,
    )
    c_file.unlink()


def planted_library(marker: Path) -> str:
    """C source whose constructor, run as the library is loaded, creates the file ``marker``."""
    return (
        "#include <stdio.h>\n"
        "__attribute__((constructor)) static void planted(void) {\n"
        f'    FILE *f = fopen({json.dumps(str(marker))}, "w");\n'
        "    if (f) fclose(f);\n"
        "}\n"
        "int se3t_unrelated(void) { return 0; }\n"
    )


def plant(entry: library.CacheEntry, source: str, record: bool = True) -> None:
    """Put a library built from ``source`` where the kernel is expected, with a matching SHA-256 record."""
    cache.make_private_folders(entry.folder)
    build_shared_library(source, entry.library)
    os.chmod(entry.library, 0o700)
    if record:
        cache.record(entry.library)


def expected_entry() -> library.CacheEntry:
    return library.cache_entry(library.find_compiler())


def load_warning(caplog) -> str:
    """Load the kernel (which must fail) and return the one warning line it logged."""
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert library.kernel_library().cdll is None
    (record,) = [r for r in caplog.records if r.name == LOGGER]
    assert record.levelno == logging.WARNING and "\n" not in record.getMessage()
    return record.getMessage()


@needs_compiler
@pytest.mark.parametrize(
    "folder, mode",
    [("kernels", 0o777), ("kernels", 0o770), ("root", 0o777)],
    ids=["kernels-others", "kernels-group", "cache-others"],
)
def test_a_library_planted_where_others_can_write_is_never_loaded(
    cache_dir: Path, tmp_path: Path, caplog, folder: str, mode: int
) -> None:
    """A library planted under the expected name (which anyone can derive) in a folder that others can
    write, with a matching record even: its constructor must never run."""
    marker = tmp_path / "constructor-ran"
    entry = expected_entry()
    plant(entry, planted_library(marker))
    os.chmod(entry.folder if folder == "kernels" else cache_dir, mode)
    message = load_warning(caplog)
    assert "refusing to load compiled code" in message and "writable by" in message
    assert not marker.exists()
    assert "writable by" in resolve().reason


@needs_compiler
@pytest.mark.skipif(os.getuid() != 0, reason="giving files to another user needs root")
@pytest.mark.parametrize("owned", ["folder", "library"])
def test_nothing_another_user_owns_is_loaded(cache_dir: Path, tmp_path: Path, caplog, owned: str) -> None:
    marker = tmp_path / "constructor-ran"
    entry = expected_entry()
    plant(entry, planted_library(marker))
    os.chown(entry.folder if owned == "folder" else entry.library, 65534, 65534)
    assert "belongs to another user" in load_warning(caplog)
    assert not marker.exists()


@needs_compiler
def test_a_library_without_a_record_is_rebuilt_not_loaded(cache_dir: Path, tmp_path: Path) -> None:
    """A library in the private folder that se3t did not record (planted, or left by an older se3t) is
    replaced by a fresh build before anything is loaded."""
    marker = tmp_path / "constructor-ran"
    entry = expected_entry()
    plant(entry, planted_library(marker), record=False)
    assert library.kernel_library().cdll is not None
    assert not marker.exists()
    assert hasattr(library.kernel_library().cdll, "se3t_attention_f32")


@needs_compiler
def test_a_library_that_differs_from_its_record_is_not_loaded(
    cache_dir: Path, tmp_path: Path, caplog
) -> None:
    """Changed after it was recorded: a warning, the files deleted, and a fresh build on the next run."""
    marker = tmp_path / "constructor-ran"
    entry = expected_entry()
    plant(entry, planted_library(marker))
    entry.digest.write_text("0" * 64 + "\n")
    assert "does not match the SHA-256 recorded" in load_warning(caplog)
    assert not marker.exists() and not entry.library.exists() and not entry.digest.exists()
    library.kernel_library.cache_clear()
    assert library.kernel_library().cdll is not None


@needs_compiler
def test_a_truncated_library_does_not_kill_se3t_info(cache_dir: Path) -> None:
    """A cached library cut short used to kill every command with a bus error (rc 135), `se3t info` too."""
    assert library.kernel_library().cdll is not None
    so = expected_entry().library
    cut = so.with_name("cut-short")  # a new file: this process keeps the library it mapped intact
    cut.write_bytes(so.read_bytes()[: so.stat().st_size // 2])
    os.chmod(cut, 0o700)
    os.replace(cut, so)
    env = {**os.environ, CACHE_ENV: str(cache_dir)}
    env.pop(DISABLE_ENV, None)
    done = subprocess.run(
        [sys.executable, "-m", "se3tcli", "info", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    kernel = json.loads(done.stdout)["cpu_attention_kernel"]
    assert kernel.startswith("PyTorch (") and "does not match the SHA-256 recorded" in kernel


@needs_compiler
def test_a_library_lacking_the_kernel_falls_back(cache_dir: Path, caplog) -> None:
    """A recorded library without the kernel's functions used to raise AttributeError in every command."""
    plant(expected_entry(), "int se3t_unrelated(void) { return 0; }\n")
    message = load_warning(caplog)
    assert "could not bind the fused CPU kernel" in message and "se3t_attention_f32" in message


@needs_compiler
def test_argument_structures_of_another_size_fall_back(cache_dir: Path, caplog, monkeypatch) -> None:
    """The C structures and their ctypes mirrors must agree byte for byte: here the mirror lacks a field."""

    class Shorter(ctypes.Structure):
        _fields_ = abi.Args._fields_[:-1]

    monkeypatch.setattr(abi, "Args", Shorter)
    message = load_warning(caplog)
    assert "se3t_args_size()" in message and "another version of fused_attention.c" in message


def test_an_unparsable_compiler_variable_falls_back(cache_dir: Path, caplog, monkeypatch) -> None:
    """``CC='"x'`` used to abort every command with ``No closing quotation``."""
    monkeypatch.setenv("CC", '"x')
    assert "No closing quotation" in load_warning(caplog)
    assert_falls_back_to_pytorch("cannot be parsed")


@needs_compiler
def test_under_umask_000_the_cache_stays_private(cache_dir: Path) -> None:
    """se3t itself used to create ``kernels/`` and the library world-writable under ``umask 000``."""
    old = os.umask(0)
    try:
        assert library.kernel_library().cdll is not None
    finally:
        os.umask(old)
    entry = expected_entry()
    for folder in (cache_dir, entry.folder):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    for path in (entry.library, entry.digest):
        assert not path.stat().st_mode & (stat.S_IWGRP | stat.S_IWOTH), path


@needs_compiler
def test_a_cache_below_a_folder_others_can_write_is_never_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_library: None, caplog
) -> None:
    """Private cache folders do not help below a folder that others can write (and that has no sticky
    bit): they could rename the cache away between the checks and the loader's open."""
    shared = tmp_path / "shared"
    shared.mkdir()
    root = shared / "cache"
    monkeypatch.setenv(CACHE_ENV, str(root))
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    marker = tmp_path / "constructor-ran"
    plant(expected_entry(), planted_library(marker))
    shared.chmod(0o777)
    message = load_warning(caplog)
    assert "refusing to load compiled code" in message and "has no sticky bit" in message
    assert not marker.exists()
    shared.chmod(0o777 | stat.S_ISVTX)  # like /tmp: the user's own folders there cannot be swapped
    cache.check_ancestors(root.resolve())


@needs_compiler
def test_a_linked_cache_is_used_by_its_real_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_library: None
) -> None:
    """The link is resolved once: everything is checked, and loaded, under the real folder's path."""
    real = tmp_path / "real-cache"
    link = tmp_path / "link"
    cache.make_private_folders(real)
    link.symlink_to(real)
    monkeypatch.setenv(CACHE_ENV, str(link))
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    loaded = library.kernel_library()
    assert loaded.cdll is not None and loaded.detail.startswith(str(real.resolve()))
