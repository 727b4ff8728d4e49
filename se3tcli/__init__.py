"""se3t: molecular property prediction with an SE(3)-Transformer.

``load_model`` (see :mod:`se3tcli.api`) gives a model that predicts RDKit molecules, ASE Atoms, SMILES
strings and files from Python; it is imported on first use, so the command line starts without torch.
"""

__version__ = "0.1.0"

__all__ = ["PredictionRow", "Predictor", "__version__", "load_model"]


def __getattr__(name: str):
    if name in ("load_model", "Predictor", "PredictionRow"):
        from se3tcli import api

        return getattr(api, name)
    raise AttributeError(f"module 'se3tcli' has no attribute {name!r}")
