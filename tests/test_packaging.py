"""The wheel carries the bundled models, the sample molecules and the kernel source; the entry point runs."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
        ],
        check=True,
        capture_output=True,
    )
    (built,) = out.glob("se3tcli-*.whl")
    return built


def test_wheel_carries_models_and_samples(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    bundled = [p.name for p in (ROOT / "models").iterdir() if p.suffix in (".pt", ".json")]
    for name in bundled:
        assert f"se3tcli/models/{name}" in names
    for name in ("qm9_sample.sdf", "qm9_sample.xyz", "drugs.smi", "bad.sdf"):
        assert f"se3tcli/samples/{name}" in names
    assert "se3tcli/cli.py" in names
    assert "se3tcli/model/fused_attention.c" in names  # the CPU kernel is compiled from it on first use


def test_installed_entry_point_help():
    result = subprocess.run(["se3t", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for command in ("predict", "train", "evaluate", "check-equivariance", "info"):
        assert command in result.stdout
