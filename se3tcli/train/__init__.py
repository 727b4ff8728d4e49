"""Training and evaluation: L1 on normalised targets, AdamW, warm-up + cosine, clipping, an average of the
weights (EMA) for validation and checkpoints, exact resume, DDP.

``options`` (what a run is and what a resume may change), ``config_file`` (options from ``--config``),
``run_directory`` (its files), ``statistics`` (normalisation, atom references, the starting model, new or
fine-tuned), ``steps`` (loss and optimizer step, eager or CUDA-graphed), ``schedule``, ``ema``,
``evaluation`` (predictions and errors on a split), ``device`` (device and DDP group) and ``trainer`` (the
loop that ties them together).
"""

from importlib import import_module

# Public names and the modules that define them, imported on first use: the command line reads the
# options without importing torch.
_EXPORTS = {
    "select_device": "device",
    "error_metrics": "evaluation",
    "labelled_for_checkpoint": "evaluation",
    "predict_arrays": "evaluation",
    "split_predictions": "evaluation",
    "write_predictions": "evaluation",
    "DEFAULT_EPOCHS": "options",
    "TrainOptions": "options",
    "build_model": "statistics",
    "fit_statistics": "statistics",
    "loss_fn": "steps",
    "stacked_loss": "steps",
    "Trainer": "trainer",
    "TrainingReporter": "trainer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
