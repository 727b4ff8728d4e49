"""The options of a training run, and the rules for which of them a resumed run may change.

Each option is defined once, here: ``se3t train`` builds its command-line options from these fields
(their help and bounds in the field metadata). Nothing here imports torch, so the command line starts fast.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from se3tcli.targets import TARGETS

if TYPE_CHECKING:
    from se3tcli.model.config import ModelConfig

DEFAULT_EPOCHS = 100

# Options a resumed run takes from its command line; everything else (data, split, model, schedule) is the
# run's own. `cuda_graphs` says how steps run, not what they compute.
RESUME_MAY_CHANGE = frozenset(
    {"epochs", "time_limit", "device", "patience", "out", "resume", "cache", "eval_batch_size", "cuda_graphs"}
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
        tuple(TARGETS), "Comma-separated targets (default: all of the data set's).", cli_type=str
    )
    preset: str = _option("small", "Model size: small or base.")
    model_overrides: dict | None = None  # ModelConfig fields that replace the preset's (the cutoff too)
    epochs: int | None = _option(None, "Epochs (default 100; with --resume, the run's own).", min=1)
    batch_size: int = _option(64, "Molecules per batch (at most, with --max-atoms/--max-edges).", min=1)
    lr: float = _option(5e-4, "Peak learning rate (AdamW).", min=0.0)
    weight_decay: float = _option(1e-5, "AdamW weight decay.", min=0.0)
    warmup_epochs: float = _option(1.0, "Linear warm-up before the cosine decay.", min=0.0)
    clip_norm: float = _option(10.0, "Clip the gradient norm to this.", min=0.0)
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
        None, "Start from this checkpoint's weights and statistics (same model settings).", cli_type=Path
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

    def model_config(self) -> ModelConfig:
        """The model a new run builds: the preset with the overrides, predicting this run's targets."""
        from se3tcli.model.config import preset  # torch: not needed to parse a command line

        return preset(self.preset, **{**(self.model_overrides or {}), "targets": self.targets})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d

    def for_new_run(self) -> TrainOptions:
        """A copy of these options with the default number of epochs filled in."""
        return replace(self, epochs=DEFAULT_EPOCHS if self.epochs is None else self.epochs)

    def resumed(self, saved: dict[str, Any]) -> TrainOptions:
        """The options of a resumed run: the run's ``saved`` ones, with the budget this command gives.

        An epoch count or patience not given on this command line is the run's own, so its learning-rate
        schedule and early stopping are unchanged. Runs saved before the weight average existed have none;
        runs that saved a ``cutoff`` option keep it in their model overrides (the model config holds it).
        """
        known = {f.name for f in fields(self)}
        merged: dict[str, Any] = {"ema_decay": None}
        merged |= {k: v for k, v in saved.items() if k in known and k not in RESUME_MAY_CHANGE}
        self._refuse_conflicts(merged)
        if "cutoff" in saved:
            merged["model_overrides"] = {**(merged.get("model_overrides") or {}), "cutoff": saved["cutoff"]}
        options = replace(self, **merged)
        if self.epochs is None:
            options.epochs = saved["epochs"]
        if self.patience is None:
            options.patience = saved.get("patience")
        return options

    def _refuse_conflicts(self, run: dict[str, Any]) -> None:
        """A resumed run keeps its data, model and schedule: refuse options set here (not left at their
        defaults) that differ from the run's ``run`` values, instead of silently ignoring them."""
        defaults = TrainOptions()
        conflicts = []
        for name, value in run.items():
            mine = getattr(self, name)
            if name == "command" or mine == getattr(defaults, name):
                continue
            theirs = tuple(value) if name == "targets" else value
            if mine != theirs and not (name == "model_overrides" and not mine and not theirs):
                conflicts.append(f"--{name.replace('_', '-')} {_shown(mine)} (the run's: {_shown(theirs)})")
        if conflicts:
            raise ValueError(
                "a resumed run keeps its own settings, and these differ: "
                + "; ".join(conflicts)
                + " (only --epochs, --time-limit, --patience, --device, --eval-batch-size, --cache and "
                "--cuda-graphs may change; start a new run with --init-from for the others)"
            )


def _shown(value: Any) -> str:
    return ",".join(value) if isinstance(value, tuple) else str(value)
