"""The options of a training run, and the rules for which of them a resumed run may change.

Each option is defined once, here: ``se3t train`` builds its command-line options from these fields
(their help and bounds in the field metadata). Nothing here imports torch, so the command line starts fast.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from se3tcli.targets import QM9_TARGETS

if TYPE_CHECKING:
    from se3tcli.model.config import ModelConfig

DEFAULT_EPOCHS = 100

# Options a resumed run takes from its command line; everything else (data, split, model, schedule) is the
# run's own. `cuda_graphs` and `amp` say how steps run on a GPU (a CPU-started run may continue there);
# `rare_size_floor` changes which molecules the epochs after the resumed one repeat.
RESUME_MAY_CHANGE = frozenset(
    {
        "epochs",
        "time_limit",
        "device",
        "patience",
        "out",
        "resume",
        "cache",
        "eval_batch_size",
        "cuda_graphs",
        "amp",
        "rare_size_floor",
    }
)


def _option(default: Any, help: str, **cli: Any) -> Any:
    """A field that ``se3t train`` takes from its command line: ``help`` and Typer's option settings
    (``flags``: the option's names where they are not the field's; ``cli_type``: the type the command
    line parses, where it differs)."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass
class TrainOptions:
    dataset: str = _option("qm9", "'qm9' or a labelled .sdf/.extxyz file.")
    targets: tuple[str, ...] = _option(
        QM9_TARGETS,
        "Comma-separated targets (default: all of the data set's); a new one as NAME:UNIT, or "
        "NAME:UNIT:extensive for a sum over atoms.",
        cli_type=str,
    )
    user_targets: dict | None = None  # the new targets' {name: {"unit", "extensive"}} (NAME:UNIT above)
    preset: str = _option("small", "Model size: small or base.")
    model_overrides: dict | None = None  # ModelConfig fields that replace the preset's (the cutoff too)
    epochs: int | None = _option(None, "Epochs (default 100; with --resume, the run's own).", min=1)
    batch_size: int = _option(64, "Molecules per batch (at most, with --max-atoms/--max-edges).", min=1)
    lr: float = _option(5e-4, "Peak learning rate (AdamW).", min=0.0)
    weight_decay: float = _option(1e-5, "AdamW weight decay.", min=0.0)
    warmup_epochs: float = _option(1.0, "Linear warm-up before the cosine decay.", min=0.0)
    clip_norm: float = _option(10.0, "Clip the gradient norm to this.", min=0.0)
    # None: the run's own on resume, 0 (off) for a new run.
    rare_size_floor: float | None = _option(
        None,
        "Repeat, in every epoch, the training molecules of each heavy-atom count held by fewer than F x "
        "the training molecules, up to F x that many visits (e.g. 0.002; 0: off; with --resume, the "
        "run's own).",
        min=0.0,
        max=0.1,
    )
    # Weights averaged over ~1/(1-decay) steps; None (0 on the command line): the raw weights.
    ema_decay: float | None = _option(
        0.999, "Validate and save an average of the weights (0: the raw weights).", min=0.0, max=0.99999
    )
    device: str = _option("auto", "auto, cpu or cuda.")
    amp: bool = _option(True, "bf16 autocast on CUDA (ignored on the CPU).", flags=("--amp/--no-amp",))
    seed: int = _option(0, "Seed of the split, the initial weights and the batch order.")
    out: str = _option("runs/se3t", "Run directory.", cli_type=Path)
    resume: bool = _option(False, "Continue the run in --out from last.pt.", flags=("--resume",))
    limit: int | None = _option(None, "Use only this many molecules.", min=3)
    patience: int | None = _option(None, "Early-stopping patience in epochs.", min=1)
    time_limit: float | None = _option(None, "Stop (resumably) after MIN minutes.", min=0.0)
    cache: str | None = _option(None, "QM9 cache directory.", cli_type=Path)
    init_from: str | None = _option(
        None,
        "Fine-tune a bundled model or checkpoint: its model settings, its encoder and the heads of the "
        "targets it has; new targets get new heads.",
    )
    freeze_encoder: bool = _option(
        False, "With --init-from: train only the readout (the heads).", flags=("--freeze-encoder",)
    )
    encoder_lr_factor: float = _option(
        1.0, "The encoder's learning rate as a fraction of --lr (e.g. 0.1 when fine-tuning).", min=0.0
    )
    eval_batch_size: int = _option(256, "Molecules per batch in validation and test.", min=1)
    max_atoms: int | None = _option(
        None, "Bound each batch by atoms too (--batch-size bounds molecules).", min=1
    )
    max_edges: int | None = _option(None, "Bound each batch by directed edges too.", min=1)
    cuda_graphs: bool = _option(
        False,
        "CUDA: replay one captured forward+backward over batches padded to one shape "
        "(atom/edge budgets default to --batch-size average molecules).",
        flags=("--cuda-graphs",),
    )
    command: str = ""  # the command line that started the run, for the record

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        if self.ema_decay == 0:
            self.ema_decay = None

    def model_config(
        self, base: ModelConfig | None = None, given: Collection[str] | None = None
    ) -> ModelConfig:
        """The model a new run builds, predicting this run's targets: the preset with the overrides or, to
        fine-tune, ``base`` (the ``--init-from`` model's config) with its settings.

        A target must be QM9's, defined in ``user_targets`` or one of ``base``'s own. With ``base``, a
        ``--preset`` among ``given`` (see :meth:`resumed`) and model overrides that differ from its
        settings raise ``ValueError``: the checkpoint's weights fit its own model only.
        """
        from se3tcli.model.config import preset  # torch: not needed to parse a command line

        targets = {"targets": self.targets, "user_targets": self._user_targets(base)}
        if base is None:
            return preset(self.preset, **{**(self.model_overrides or {}), **targets})
        if "preset" in self.given_names(given):
            raise ValueError("--init-from takes its model settings from the checkpoint: drop --preset")
        settings = base.to_dict()
        differing = [
            f"{k} {v} (the checkpoint's: {settings.get(k)})"
            for k, v in (self.model_overrides or {}).items()
            if settings.get(k) != v
        ]
        if differing:
            raise ValueError(
                "--init-from takes its model settings from the checkpoint, and these differ: "
                + "; ".join(differing)
            )
        # The source's uncertainty head measured the source's errors: a fine-tuned model gets its own when
        # exported (se3t export fits it), not a stale one.
        return base.replace(**targets, uncertainty_hidden=0)

    def _user_targets(self, base: ModelConfig | None) -> dict[str, dict]:
        """The definitions of this run's targets that QM9 lacks: new ones, or ``base``'s own."""
        inherited = base.user_targets if base is not None else {}
        mine = self.user_targets or {}
        for name, definition in mine.items():
            if inherited.get(name, definition) != definition:
                unit = inherited[name]["unit"]
                raise ValueError(
                    f"target {name!r} is the --init-from model's, in {unit}: give it without one"
                )
        defined = inherited | mine
        unknown = [t for t in self.targets if t not in QM9_TARGETS and t not in defined]
        if unknown:
            known = ", ".join([*QM9_TARGETS, *defined])
            raise ValueError(
                f"unknown target {unknown[0]!r}; choose from {known}, or define a new one as NAME:UNIT"
            )
        return {t: defined[t] for t in self.targets if t in defined}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d

    def for_new_run(self) -> TrainOptions:
        """A copy of these options with the defaults of epochs and the rare-size floor filled in."""
        return replace(
            self,
            epochs=DEFAULT_EPOCHS if self.epochs is None else self.epochs,
            rare_size_floor=self.rare_size_floor or 0.0,
        )

    def resumed(self, saved: dict[str, Any], given: Collection[str] | None = None) -> TrainOptions:
        """The options of a resumed run: the run's ``saved`` ones, with the budget this command gives.

        ``given``: the options this command line set (None: those that differ from the defaults). Any of
        them that the run fixes (not in :data:`RESUME_MAY_CHANGE`) and that differs from the run's value
        raises ``ValueError``, instead of being silently ignored. An epoch count or patience not given is
        the run's own, so its learning-rate schedule and early stopping are unchanged; so is a rare-size
        floor not given (runs saved before it existed had none). Runs saved before
        the weight average existed have none; runs that saved a ``cutoff`` option keep it in their model
        overrides (the model config holds it).
        """
        known = {f.name for f in fields(self)}
        # What runs saved before an option existed did: no weight average, no new targets, one learning rate.
        merged: dict[str, Any] = {
            "ema_decay": None,
            "user_targets": None,
            "freeze_encoder": False,
            "encoder_lr_factor": 1.0,
        }
        merged |= {k: v for k, v in saved.items() if k in known and k not in RESUME_MAY_CHANGE}
        if "cutoff" in saved:
            merged["model_overrides"] = {**(merged.get("model_overrides") or {}), "cutoff": saved["cutoff"]}
        self._refuse_conflicts(merged, given)
        options = replace(self, **merged)
        if self.epochs is None:
            options.epochs = saved["epochs"]
        if self.patience is None:
            options.patience = saved.get("patience")
        if self.rare_size_floor is None:
            options.rare_size_floor = saved.get("rare_size_floor") or 0.0
        return options

    def given_names(self, given: Collection[str] | None) -> set[str]:
        """The options a command line set: ``given``, or where None those that differ from the defaults."""
        if given is not None:
            return set(given)
        defaults = TrainOptions()
        return {f.name for f in fields(self) if getattr(self, f.name) != getattr(defaults, f.name)}

    def _refuse_conflicts(self, run: dict[str, Any], given: Collection[str] | None) -> None:
        conflicts = []
        for name in sorted(self.given_names(given) & set(run) - {"command"}):
            mine, theirs = _comparable(name, getattr(self, name)), _comparable(name, run[name])
            if mine != theirs:
                flag = "the model settings" if name == "model_overrides" else "--" + name.replace("_", "-")
                conflicts.append(f"{flag} {_shown(mine)} (the run's: {_shown(theirs)})")
        if conflicts:
            may_change = ", ".join("--" + n.replace("_", "-") for n in sorted(RESUME_MAY_CHANGE - {"resume"}))
            raise ValueError(
                "a resumed run keeps its own settings, and these differ: "
                + "; ".join(conflicts)
                + f" (a resume may change only {may_change}; for others, start a new run with --init-from)"
            )


def _comparable(name: str, value: Any) -> Any:
    """An option's value as a resume compares it: QM9 in any case, no model overrides as {}."""
    if name == "targets":
        return tuple(value)
    if name == "dataset" and str(value).lower() == "qm9":
        return "qm9"
    if name in ("model_overrides", "user_targets"):
        return dict(value or {})
    return value


def _shown(value: Any) -> str:
    return ",".join(value) if isinstance(value, tuple) else str(value)
