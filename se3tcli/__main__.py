"""``python -m se3tcli`` (used by ``torchrun --nproc-per-node N -m se3tcli train ...``)."""

from se3tcli.cli import app

app(prog_name="se3t")
