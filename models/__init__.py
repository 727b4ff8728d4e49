"""Bundled trained checkpoints and their model cards (installed as the package ``se3tcli.models``)."""
