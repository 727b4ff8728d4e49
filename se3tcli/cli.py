"""The ``se3t`` command line: parse options, call the library, render. No science here."""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import shlex
import signal
import sys
import typing
from collections.abc import Callable
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.text import Text

from se3tcli import __version__
from se3tcli.notices import NOTICES
from se3tcli.train.options import TrainOptions

if typing.TYPE_CHECKING:
    from se3tcli.predict import WriteSummary

app = typer.Typer(
    name="se3t",
    help="Molecular property prediction with an SE(3)-Transformer.",
    rich_markup_mode="rich",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports a command whose reader went away
PREVIEW_ROWS = 20  # most rows printed as a table when predictions also go to a file


class UsageError(Exception):
    """A problem with the command line or its inputs: one line on stderr, exit code 2."""


def _fail(message: str, code: int) -> None:
    err_console.print(Text.assemble(("error:", "bold red"), " ", message), highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def guarded(command):
    """Turn expected failures into one-line errors (exit 2 for usage, 1 otherwise); ``--debug`` re-raises."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from se3tcli.checkpoint import CheckpointError
        from se3tcli.data.qm9 import QM9Unavailable
        from se3tcli.errors import InputError

        debug = kwargs.get("debug", False)
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except BrokenPipeError:  # `se3t predict ... -o - | head`: the reader has all it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error when Python flushes
            raise typer.Exit(EXIT_BROKEN_PIPE) from None
        except (
            UsageError,
            InputError,
            CheckpointError,
            QM9Unavailable,
            FileNotFoundError,
            FileExistsError,
        ) as exc:
            if debug:
                raise
            _fail(str(exc), EXIT_USAGE)
        except Exception as exc:  # noqa: BLE001 - last line of defence: no traceback reaches the user
            if debug:
                raise
            _fail(f"{type(exc).__name__}: {exc} (run with --debug for the traceback)", 1)

    return wrapper


class _NoticesOnStderr(logging.Handler):
    """se3t's notices (:mod:`se3tcli.notices`) as lines on stderr, printed above any progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            text = Text(f"warning: {self.format(record)}", style="yellow")
        else:
            text = Text(self.format(record), style="dim")
        err_console.print(text, highlight=False, soft_wrap=True)


_NOTICE_HANDLER = _NoticesOnStderr()


def _version(value: bool) -> None:
    if value:
        console.print(f"se3t {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Predict quantum-chemical properties of molecules, train models on QM9, check equivariance."""
    NOTICES.setLevel(logging.INFO)
    NOTICES.addHandler(_NOTICE_HANDLER)  # once: a handler already there is not added again


class _RememberedInterrupts:
    """SIGINT and SIGTERM as KeyboardInterrupt, remembered. Python drops an exception raised while a
    finaliser runs (``__del__``, a weakref callback, a generator closed by the garbage collector), so a
    Ctrl-C landing there would be lost (and printed as a traceback) and the run would finish as if nothing
    had happened; the row loop calls :meth:`raise_if_received` to raise it again, and the dropped one is not
    printed. Installed for the block, restored after it."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: list[int] = []

    def _handler(self, signum: int, frame: object) -> None:  # noqa: ARG002
        self.received.append(signum)
        raise KeyboardInterrupt

    def raise_if_received(self) -> None:
        if self.received:
            raise KeyboardInterrupt

    def _unraisable(self, unraisable: Any) -> None:
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):
            self._previous_hook(unraisable)

    def __enter__(self) -> _RememberedInterrupts:
        self._previous = {s: signal.signal(s, self._handler) for s in self.SIGNALS}
        self._previous_hook, sys.unraisablehook = sys.unraisablehook, self._unraisable
        return self

    def __exit__(self, *exc: object) -> None:
        for s, previous in self._previous.items():
            if previous is not None:  # None: a handler installed from C, which Python cannot reinstate
                signal.signal(s, previous)
        sys.unraisablehook = self._previous_hook


def _device(name: str):
    from se3tcli.train import select_device

    try:
        return select_device(name)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _as_usage(parse: Callable[..., Any], *args: Any) -> Any:
    """``parse(*args)``, its ValueError (a bad option value) a usage error (exit 2, one line)."""
    try:
        return parse(*args)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _targets(spec: str | None, available: tuple[str, ...]) -> tuple[str, ...]:
    from se3tcli.targets import parse_targets

    return _as_usage(parse_targets, spec, available)


# ----------------------------------------------------------------------------- predict

DebugOption = Annotated[bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")]
DeviceOption = Annotated[str, typer.Option(help="auto, cpu or cuda.")]


@app.command()
@guarded
def predict(
    inputs: Annotated[
        list[Path] | None,
        typer.Argument(help="SDF/MOL(.gz), XYZ/extXYZ, SMILES (.smi/.txt) or CSV tables of SMILES (.csv)."),
    ] = None,
    smiles: Annotated[
        list[str] | None, typer.Option("--smiles", help="A SMILES string (repeatable).")
    ] = None,
    model: Annotated[str | None, typer.Option(help="Bundled model name or checkpoint path.")] = None,
    targets: Annotated[str | None, typer.Option(help="Comma-separated targets (default: all).")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write .csv, .json or .sdf.")] = None,
    device: DeviceOption = "auto",
    batch_size: Annotated[int, typer.Option(min=1, help="Molecules per batch.")] = 64,
    max_atoms_per_molecule: Annotated[
        int, typer.Option(min=1, help="Larger molecules become error rows (their memory grows with size).")
    ] = 10_000,
    no_embed: Annotated[
        bool, typer.Option("--no-embed", help="Reject 2D/H-less records instead of embedding.")
    ] = False,
    workers: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Processes generating SMILES conformers (default: one per core, 2 to 4; 1: this one).",
            show_default=False,
        ),
    ] = None,
    conformer_timeout: Annotated[
        float,
        typer.Option(
            min=0, max=86_400, help="Seconds per SMILES conformer; slower ones become error rows (0: none)."
        ),
    ] = 60.0,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing --output file (never an input).")
    ] = False,
    input_format: Annotated[
        str | None, typer.Option("--format", help="What standard input (-) holds: sdf, xyz, smi or csv.")
    ] = None,
    output_format: Annotated[
        str | None,
        typer.Option("--output-format", help="With -o - (standard output): csv (default), json or sdf."),
    ] = None,
    debug: DebugOption = False,
) -> None:
    """Predict properties of the molecules in INPUTS (and --smiles) with a trained model. An input or an
    --output of - is standard input or output (the table and messages then go to standard error)."""
    from se3tcli.checkpoint import load_model
    from se3tcli.io import STDIN, STDOUT, check_inputs, check_output, read_molecules
    from se3tcli.io.conformer_pool import default_workers
    from se3tcli.predict import predict_to_file
    from se3tcli.render import predictions_table, progress_bar, status_messages, table_order

    inputs, smiles = list(inputs or []), list(smiles or [])
    if not inputs and not smiles:
        raise UsageError("give at least one input file or --smiles")
    inputs = [STDIN if str(path) == STDIN else path for path in inputs]
    check_inputs(inputs, input_format)
    to_stdout = output is not None and str(output) == STDOUT
    if output_format is not None and not to_stdout:
        raise UsageError("--output-format is for -o - (standard output); a file's suffix sets its format")
    screen = err_console if to_stdout else console  # standard output carries the predictions then
    if output:
        check_output(output, inputs, overwrite)
    torch_device = _device(device)
    loaded = load_model(model, torch_device)
    chosen = _targets(targets, loaded.targets)
    shown: list = []
    with _RememberedInterrupts() as interrupts, progress_bar(err_console, "molecules") as progress:
        task = progress.add_task("predicting", total=None)

        def on_row(molecule, values) -> None:
            interrupts.raise_if_received()
            if output is None or len(shown) < PREVIEW_ROWS:
                shown.append((replace(molecule, rdkit_mol=None), values))  # keep the table light
            progress.advance(task)

        molecules = read_molecules(
            inputs,
            smiles,
            embed=not no_embed,
            stdin_format=input_format,
            workers=workers or default_workers(),
            conformer_timeout=conformer_timeout,
            max_atoms=max_atoms_per_molecule,  # also before a conformer is generated
        )
        report_oom = functools.partial(err_console.print, style="yellow")
        summary = predict_to_file(
            loaded,
            molecules,
            torch_device,
            chosen,
            output,
            on_row,
            batch_size,
            report_oom,
            output_format,
            max_atoms_per_molecule,
        )
    in_table = chosen if targets else table_order(chosen)  # --targets: the user's order
    table, hidden = predictions_table(shown, in_table, loaded.typical_errors, screen.width)
    screen.print(table)
    if hidden:
        where = f"in {output}" if output else "with -o FILE"
        screen.print(
            f"({len(hidden)} more targets did not fit this terminal: {', '.join(hidden)}; "
            f"all of them {where}, or --targets to choose)",
            markup=False,
        )
    for line in status_messages(shown):
        screen.print(line, highlight=False, soft_wrap=True)
    if output and summary.rows > len(shown):
        screen.print(f"(first {len(shown)} of {summary.rows} rows shown)", markup=False)
    screen.print(_write_summary(summary, output, to_stdout), markup=False)
    if summary.predicted == 0:
        raise typer.Exit(1)


def _write_summary(summary: WriteSummary, output: Path | None, to_stdout: bool) -> str:
    """The last line of ``se3t predict``: how many molecules were predicted, and where they went."""
    text = f"{summary.predicted} of {summary.rows} molecules predicted"
    if output is None:
        return text
    if summary.kept_existing:
        return text + f"; {output} left as it was (nothing to replace it with)"
    text += f"; written to {'standard output' if to_stdout else output}"
    if summary.not_written:
        text += (
            f" ({summary.not_written} error rows without atoms or coordinates left out: SD records need "
            "them; CSV and JSON keep every row)"
        )
    return text


# ----------------------------------------------------------------------------- train


def _with_options_of(options_class):
    """Add the fields of ``options_class`` that carry command-line metadata as keyword options of a
    command (default None: not given, so the dataclass default or, on resume, the run's own applies)."""
    from dataclasses import MISSING, fields

    def decorate(command):
        signature = inspect.signature(command, eval_str=True)
        hints = typing.get_type_hints(options_class)
        extra = []
        for f in fields(options_class):
            if "help" not in f.metadata:
                continue
            meta = dict(f.metadata)
            help_text, cli_type = meta.pop("help"), meta.pop("cli_type", None)
            flags = meta.pop("flags", ())
            default = f.default if f.default is not MISSING else None
            annotation = cli_type or _option_type(hints[f.name])
            option = typer.Option(*flags, help=help_text, show_default=_shown_default(default), **meta)
            extra.append(
                inspect.Parameter(
                    f.name,
                    inspect.Parameter.KEYWORD_ONLY,
                    default=None,
                    annotation=Annotated[annotation | None, option],
                )
            )
        parameters = [
            p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
            for p in signature.parameters.values()
            if p.kind != inspect.Parameter.VAR_KEYWORD
        ]
        command.__signature__ = signature.replace(parameters=[*extra, *parameters])
        command.__annotations__ = {p.name: p.annotation for p in command.__signature__.parameters.values()}
        return command

    return decorate


def _option_type(annotation: Any) -> type:
    """The command-line type of a field annotated ``int | None``, ``float``, ``bool``, ``str``..."""
    optional = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    return optional[0] if optional else annotation


def _shown_default(default: Any) -> str | bool:
    if default is None:
        return False
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, tuple):
        return "all"
    return str(default)


@app.command()
@guarded
@_with_options_of(TrainOptions)
def train(
    channels: Annotated[
        int | None, typer.Option(min=1, help="Override the preset's channels per degree.")
    ] = None,
    lmax: Annotated[
        int | None, typer.Option(min=0, help="Override the preset's highest feature degree.")
    ] = None,
    layers: Annotated[int | None, typer.Option(min=1, help="Override the preset's number of layers.")] = None,
    heads: Annotated[int | None, typer.Option(min=1, help="Override the preset's attention heads.")] = None,
    kernel: Annotated[str | None, typer.Option(help="depthwise or full.")] = None,
    nonlinearity: Annotated[
        str | None, typer.Option(help="norm_sigmoid, gate or norm (discontinuous at zero vectors).")
    ] = None,
    cutoff: Annotated[
        float | None, typer.Option(min=0.1, help="Neighbour cutoff in Å (default: the preset's).")
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(help="Options from a TOML file or a run's config.json (the command line overrides)."),
    ] = None,
    debug: DebugOption = False,
    **given: Any,
) -> None:
    """Train (or --resume) a model; writes config, split, metrics, best.pt, last.pt, test metrics and
    test predictions."""
    from se3tcli.render import RichTrainingReporter, metrics_table
    from se3tcli.targets import QM9_TARGETS, parse_train_targets
    from se3tcli.train import Trainer
    from se3tcli.train.config_file import options_from_file

    options = {name: value for name, value in given.items() if value is not None}
    if config is not None:
        options = _as_usage(options_from_file, config) | options
    if "targets" in options:  # not given: the data set's (or, on resume, the run's) targets
        # the names, and the new targets' definitions (NAME:UNIT[:extensive])
        names, new = _as_usage(parse_train_targets, options["targets"], QM9_TARGETS)
        options["targets"], options["user_targets"] = names, (options.get("user_targets") or {}) | new
    for name in ("out", "cache"):  # paths on the command line, strings in the record
        if options.get(name) is not None:
            options[name] = str(options[name])
    model = dict(
        channels=channels,
        lmax=lmax,
        n_layers=layers,
        n_heads=heads,
        kernel=kernel,
        nonlinearity=nonlinearity,
        cutoff=cutoff,
    )
    if any(v is not None for v in model.values()):  # over a config file's
        overrides = {k: v for k, v in model.items() if v is not None}
        options["model_overrides"] = (options.get("model_overrides") or {}) | overrides
    options["command"] = shlex.join(["se3t", *sys.argv[1:]])
    run_options = TrainOptions(**options)
    _device(run_options.device)
    reporter = RichTrainingReporter(err_console)
    trainer = Trainer(run_options, reporter, given=set(options) - {"command"})
    try:
        trainer.setup()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    stop_requested = []

    def request_stop(signum, frame):  # noqa: ARG001
        stop_requested.append(signum)

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        result = trainer.run(should_stop=lambda: bool(stop_requested))
    finally:
        reporter.stop()
    out = trainer.opts.out
    if result["status"] in ("time limit", "interrupted"):
        console.print(
            f"stopped ({result['status']}); last.pt saved in {out}; continue with --resume", markup=False
        )
        if result["status"] == "interrupted":
            raise typer.Exit(EXIT_INTERRUPTED)
        return
    console.print(
        metrics_table(result["test"], f"test set ({result['status']} after {result['epoch']} epochs)")
    )
    console.print(f"run directory: {out}", markup=False)


# ----------------------------------------------------------------------------- evaluate


@app.command()
@guarded
def evaluate(
    model: Annotated[str | None, typer.Option(help="Bundled model name or checkpoint path.")] = None,
    dataset: Annotated[
        str | None, typer.Option(help="'qm9' or a labelled .sdf/.extxyz file (default: the model's data).")
    ] = None,
    targets: Annotated[
        str | None, typer.Option(help="Comma-separated targets to score (default: all the model's).")
    ] = None,
    split: Annotated[
        str, typer.Option(help="train, val, test, or all (every molecule of --dataset).")
    ] = "test",
    limit: Annotated[
        int | None, typer.Option(min=1, help="Evaluate the first N molecules of the split.")
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    plots: Annotated[
        Path | None,
        typer.Option(help="Write a PNG per target here: parity (N, MAE, RMSE, R²) and residuals."),
    ] = None,
    predictions: Annotated[
        Path | None, typer.Option(help="Write every molecule's true and predicted values to this CSV.")
    ] = None,
    device: DeviceOption = "auto",
    batch_size: Annotated[int, typer.Option(min=1)] = 256,
    cache: Annotated[Path | None, typer.Option(help="QM9 cache directory.")] = None,
    debug: DebugOption = False,
) -> None:
    """MAE, RMSE and R² per target, in physical units, on a split of the model's data or on a labelled file
    (SD tags, extXYZ keys or CSV columns such as homo, homo_eV or "homo [Ha]", converted); for a model with an
    uncertainty head also how well its sigmas match the errors."""
    from se3tcli.checkpoint import load_model
    from se3tcli.render import calibration_table, metrics_table
    from se3tcli.train import labelled_for_checkpoint, split_predictions, write_predictions
    from se3tcli.train.evaluation import uncertainty_metrics

    if split not in ("train", "val", "test", "all"):
        raise UsageError(f"--split must be train, val, test or all, not {split!r}")
    torch_device = _device(device)
    loaded = load_model(model, torch_device)
    chosen = _targets(targets, loaded.targets)
    try:
        labelled = labelled_for_checkpoint(loaded.checkpoint, dataset, str(cache) if cache else None, chosen)
    except ValueError as exc:  # e.g. a file without the labels
        raise UsageError(str(exc)) from None
    pred, truth, metrics = split_predictions(loaded.model, labelled, split, batch_size, torch_device, limit)
    if predictions:
        write_predictions(predictions, labelled, split, pred, limit)
    written = []
    if plots:
        from se3tcli.plots import parity_plots

        written = parity_plots(pred, truth, labelled.data.target_names, metrics, plots)
    n = len(truth)
    calibration = uncertainty_metrics(pred, truth, labelled.data.target_names)
    if json_output:
        report = {"model": str(loaded.path), "split": split, "n": n, "metrics": metrics}
        print(json.dumps(report | ({"uncertainty": calibration} if calibration else {})))
    else:
        console.print(metrics_table(metrics, f"{loaded.path.name}: {split} split, {n} molecules"))
        if calibration:
            scored = {"split": split, "molecules": n}
            console.print(calibration_table({"scored_on": scored, "targets": calibration}))
    screen = err_console if json_output else console  # with --json, standard output is the JSON alone
    lines = [f"predictions written to {predictions}"] if predictions else []
    if written:
        lines.append(f"parity plots written to {plots}: {', '.join(path.name for path in written)}")
    for line in lines:
        screen.print(line, markup=False, highlight=False, soft_wrap=True)


# ----------------------------------------------------------------------------- check-equivariance


def _sample_file() -> Path:
    return Path(str(resources.files("se3tcli.samples") / "qm9_sample.sdf"))


@app.command("check-equivariance")
@guarded
def check_equivariance_command(
    inputs: Annotated[
        list[Path] | None, typer.Argument(help="Molecule files (default: the sample molecules).")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(help="Bundled model, checkpoint path, or 'random' (an untrained base network)."),
    ] = None,
    trials: Annotated[int, typer.Option(min=1, help="Random transforms per molecule and kind.")] = 3,
    dtype: Annotated[str, typer.Option(help="float64 or float32.")] = "float64",
    device: DeviceOption = "cpu",
    seed: Annotated[int, typer.Option()] = 0,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    max_molecules: Annotated[int, typer.Option(min=1, help="Check at most this many molecules.")] = 10,
    debug: DebugOption = False,
) -> None:
    """Prove on real molecules that predictions are invariant (and the dipole equivariant) under rotations,
    translations, permutations and reflection."""
    from se3tcli.checkpoint import load_model
    from se3tcli.equivariance import TOLERANCE, check_equivariance, random_model
    from se3tcli.io import check_inputs, read_molecules
    from se3tcli.render import equivariance_table

    if dtype not in TOLERANCE:
        raise UsageError(f"--dtype must be float64 or float32, not {dtype!r}")
    files = list(inputs or [_sample_file()])
    check_inputs(files)
    torch_device = _device(device)
    network = random_model(seed) if model == "random" else load_model(model, torch_device).model
    elements = set(network.config.elements)
    molecules = []
    for molecule in read_molecules(files):
        if molecule.ok and set(molecule.numbers.tolist()) <= elements:
            molecules.append((molecule.name, molecule.numbers, molecule.positions))
        if len(molecules) >= max_molecules:
            break
    if not molecules:
        raise UsageError("no readable molecule with elements the model supports in the inputs")
    results = check_equivariance(network, molecules, trials, dtype, torch_device, seed)
    passed = all(r.passed for r in results)
    if json_output:
        report = {
            "passed": passed,
            "dtype": dtype,
            "device": str(torch_device),
            "checks": [r.to_dict() for r in results],
        }
        print(json.dumps(report))
    else:
        console.print(equivariance_table(results, dtype, str(torch_device)))
        console.print("[green]all checks passed[/]" if passed else "[red]some checks failed[/]")
    if not passed:
        raise typer.Exit(1)


# ----------------------------------------------------------------------------- info


@app.command()
@guarded
def info(
    model: Annotated[str | None, typer.Argument(help="Bundled model name or checkpoint path.")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    debug: DebugOption = False,
) -> None:
    """Show a model card (targets, units, data, test MAE, limits, hash), or list the bundled models."""
    from se3tcli.card import card_summary
    from se3tcli.checkpoint import bundled_models, load_model
    from se3tcli.render import card_tables

    if model is None:
        from se3tcli.model.fused_cpu import kernel_status

        found = {name: str(path) for name, path in bundled_models().items()}
        kernel = kernel_status()
        if json_output:
            print(json.dumps({"bundled_models": found, "cpu_attention_kernel": kernel}))
            return
        for name, path in found.items():
            console.print(f"{name}\t{path}", highlight=False, soft_wrap=True, markup=False)
        if not found:
            console.print("no bundled models installed")
        console.print(f"CPU attention layers: {kernel}", highlight=False, soft_wrap=True, markup=False)
        return
    loaded = load_model(model)
    summary = card_summary(loaded.path, loaded.checkpoint, loaded.card)
    if json_output:
        print(json.dumps(summary, default=str))
    else:
        for table in card_tables(summary):
            console.print(table)


# ----------------------------------------------------------------------------- export


@app.command()
@guarded
def export(
    checkpoint: Annotated[
        Path, typer.Argument(help="A checkpoint written by 'se3t train' (e.g. RUN/best.pt).")
    ],
    name: Annotated[str, typer.Option(help="Model name (file stem).")],
    dest: Annotated[Path, typer.Option(help="Folder for NAME.pt and NAME.json.")] = Path("models"),
    description: Annotated[str, typer.Option(help="One sentence for the model card.")] = "",
    training_command: Annotated[
        str, typer.Option(help="How the model was trained (default: as recorded).")
    ] = "",
    device: DeviceOption = "auto",
    batch_size: Annotated[int, typer.Option(min=1)] = 256,
    cache: Annotated[Path | None, typer.Option(help="QM9 cache directory.")] = None,
    uncertainty: Annotated[
        bool, typer.Option(help="Fit and calibrate the uncertainty head (a sigma per prediction).")
    ] = True,
    uncertainty_molecules: Annotated[
        int, typer.Option(min=1, help="Training molecules the uncertainty head learns from.")
    ] = 50_000,
    uncertainty_epochs: Annotated[int, typer.Option(min=1, help="Epochs of the uncertainty head.")] = 20,
    debug: DebugOption = False,
) -> None:
    """Package a checkpoint as a model: test-split errors, a calibrated uncertainty head, NAME.pt and its
    model card NAME.json."""
    from se3tcli.card import write_model
    from se3tcli.checkpoint import cpu_state_dict, model_from_checkpoint, read_checkpoint
    from se3tcli.render import calibration_table, metrics_table
    from se3tcli.train import labelled_for_checkpoint, split_predictions

    torch_device = _device(device)
    data = read_checkpoint(checkpoint)
    model = model_from_checkpoint(data, checkpoint).to(torch_device)
    labelled = labelled_for_checkpoint(data, cache=str(cache) if cache else None)
    _, _, metrics = split_predictions(model, labelled, "test", batch_size, torch_device)
    own = [p for name, p in model.named_parameters() if not name.startswith("uncertainty.")]
    n_parameters = sum(p.numel() for p in own)  # the network's; its uncertainty head's are in the report
    report = None
    if uncertainty:
        from se3tcli.train.uncertainty import fit_uncertainty

        with console.status("fitting the uncertainty head") as status:
            report = fit_uncertainty(
                model,
                labelled,
                data["normalization"]["loss_scale"],
                torch_device,
                molecules=uncertainty_molecules,
                epochs=uncertainty_epochs,
                on_epoch=lambda e, loss: status.update(f"uncertainty head: epoch {e}, loss {loss:.4f}"),
            )
    elif model.uncertainty is not None:  # no head rather than one the card says nothing about
        model.config, model.uncertainty = model.config.replace(uncertainty_hidden=0), None
    data = data | {"config": model.config.to_dict(), "state_dict": cpu_state_dict(model)}
    evaluation_command = f"se3t evaluate --model {name} --split test"
    pt_path, card_path = write_model(
        name,
        data,
        dest,
        metrics,
        n_parameters,
        evaluation_command,
        training_command,
        str(torch_device),
        description,
        report,
    )
    console.print(metrics_table(metrics, f"{name}: test split, {len(labelled.split['test'])} molecules"))
    if report:
        console.print(calibration_table(report))
    console.print(f"wrote {pt_path} and {card_path}", markup=False)


def run() -> None:  # pragma: no cover - `python -m se3tcli`
    app(prog_name="se3t")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run())
