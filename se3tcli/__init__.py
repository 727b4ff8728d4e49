"""se3t: molecular property prediction with an SE(3)-Transformer."""

__version__ = "0.1.0"
