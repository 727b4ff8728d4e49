"""Errors and record statuses shared by the readers, the CLI and its rendering, kept free of heavy imports
(RDKit, ASE) so that commands that need neither (train, evaluate, info) run without them."""

STATUS_OK, STATUS_WARNING, STATUS_ERROR = "ok", "warning", "error"  # of an input record


class InputError(Exception):
    """Usage-level problem (missing file, unsupported suffix); the CLI prints str(e) as one line, exit 2."""
