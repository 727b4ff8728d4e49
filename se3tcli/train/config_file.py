"""The options of ``se3t train --config FILE``: a TOML file, or the ``config.json`` of a run directory.

A TOML file names options as the command line does, with underscores (or dashes)::

    dataset = "my.sdf"
    targets = ["homo", "logS:log(mol/L)"]     # or "homo,logS:log(mol/L)"
    lr = 2e-4
    init_from = "qm9-default"
    [model_overrides]                          # the settings --channels, --lmax, ... override
    channels = 32

A ``config.json`` (``{"options": {...}, "model": {...}}``) gives back the run's options, so a run can be
repeated elsewhere (``--out``) or varied; its ``command`` and ``resume`` are not taken. Options on the
command line override the file's. Nothing here imports torch.
"""

from __future__ import annotations

import json
import os
import stat
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any

from se3tcli.train.options import TrainOptions

NOT_FROM_FILES = frozenset({"command", "resume"})  # how a run was started, not what it is


def options_from_file(path: str | Path) -> dict[str, Any]:
    """The options ``path`` sets, by field name of :class:`TrainOptions` (targets as one comma-separated
    string, which ``se3t train`` parses like ``--targets``). ValueError names the file and the entry."""
    path = Path(path)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block, a device never end
            raise ValueError("a config file must be a regular file")
        text = path.read_text()
        entries = _json_options(text) if path.suffix.lower() == ".json" else _toml(path).loads(text)
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the config file ({exc.strerror or exc})") from None
    except ValueError as exc:  # the decoders' errors (TOMLDecodeError, JSONDecodeError) among them
        raise ValueError(f"{path}: {' '.join(str(exc).split())}") from None
    options = {}
    for key, value in entries.items():
        name = str(key).replace("-", "_")
        if name in NOT_FROM_FILES:
            continue
        problem = _problem(name, value)
        if problem:
            raise ValueError(f"{path}: {key} {problem}")
        options[name] = ",".join(value) if name == "targets" and isinstance(value, list) else value
    return options


def _json_options(text: str) -> dict[str, Any]:
    """A run's options as its config.json records them, less what the run derived rather than was given:
    a fine-tuning run's preset and model settings (they came from its ``--init-from`` checkpoint). Runs
    of older se3t versions recorded the cutoff as an option of its own: it joins the model settings."""
    document = json.loads(text)
    entries = document.get("options") if isinstance(document, dict) else None
    if not isinstance(entries, dict):
        raise ValueError("a JSON config is a run's config.json, with its 'options'")
    entries = dict(entries)
    if "cutoff" in entries:
        cutoff = entries.pop("cutoff")
        entries["model_overrides"] = {**(entries.get("model_overrides") or {}), "cutoff": cutoff}
    if entries.get("init_from"):
        entries.pop("preset", None)
        entries.pop("model_overrides", None)
    return entries


def _toml(path: Path):
    """The TOML parser of the standard library (Python 3.11 on)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        raise ValueError("TOML config files need Python 3.11 or later (a run's config.json works)") from None
    return tomllib


_FIELDS = {f.name: f for f in fields(TrainOptions)}
_HINTS = typing.get_type_hints(TrainOptions)


def _problem(name: str, value: Any) -> str:
    """Why ``value`` cannot be option ``name`` ("" if it can): unknown, of the wrong type, out of bounds."""
    if name not in _FIELDS:
        return "is not an option of se3t train"
    if name == "model_overrides":
        return _model_problem(value)
    if name == "targets":
        ok = isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))
        return "" if ok and value else "must be a list of target names or a comma-separated string"
    if value is None:
        return "" if type(None) in typing.get_args(_HINTS[name]) else "must be given a value"
    kind = _type_mismatch(value, _HINTS[name])
    if kind:
        return f"must be {kind}, not {value!r}"
    low, high = _FIELDS[name].metadata.get("min"), _FIELDS[name].metadata.get("max")
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if number and ((low is not None and value < low) or (high is not None and value > high)):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        return f"must be {bounds}, not {value!r}"
    return ""


def _model_problem(value: Any) -> str:
    """Why ``value`` cannot be the model settings ("" if it can): each a ModelConfig field of its type."""
    from se3tcli.model.config import ModelConfig  # imports torch: only for a file that sets the model

    if not isinstance(value, dict):
        return "must be a table of model settings"
    hints = typing.get_type_hints(ModelConfig)
    for key, setting in value.items():
        if key not in hints:
            return f"has {key!r}, which is not a model setting ({', '.join(sorted(hints))})"
        kind = (
            ""
            if setting is None and type(None) in typing.get_args(hints[key])
            else _type_mismatch(setting, hints[key])
        )
        if kind:
            return f"has {key} = {setting!r}, which must be {kind}"
    return ""


def _type_mismatch(value: Any, hint: Any) -> str:
    """The type(s) ``hint`` allows, where ``value`` (not None) is none of them; "" where it fits. An int
    fits a float; a bool fits only a bool."""
    allowed = typing.get_args(hint) or (hint,)
    numbers = (int, float) if float in allowed else (int,) if int in allowed else ()
    if isinstance(value, bool):
        fits = bool in allowed
    else:
        fits = isinstance(value, (*numbers, *(t for t in allowed if t in (str, dict))))
    return "" if fits else " or ".join(getattr(t, "__name__", str(t)) for t in allowed if t is not type(None))
