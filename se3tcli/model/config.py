"""The one JSON-serialisable configuration that rebuilds a model."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from se3tcli.graph import DEFAULT_CUTOFF
from se3tcli.targets import QM9_TARGETS, TARGETS

KERNEL_MODES = ("depthwise", "full")
SELF_INTERACTIONS = ("linear", "attentive")
NONLINEARITIES = ("norm", "gate")
QM9_ELEMENTS = (1, 6, 7, 8, 9)  # H C N O F


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of the SE(3)-Transformer; ``SE3Transformer.from_config`` rebuilds the network."""

    targets: tuple[str, ...] = QM9_TARGETS
    elements: tuple[int, ...] = QM9_ELEMENTS  # atomic numbers the model accepts
    channels: int = 32  # multiplicity of every degree
    lmax: int = 2  # features carry degrees 0..lmax
    jmax: int | None = None  # highest kernel degree J; None -> 2 * lmax (every allowed path)
    n_layers: int = 4
    n_heads: int = 4
    kernel: str = "depthwise"
    self_interaction: str = "linear"
    nonlinearity: str = "norm"
    cutoff: float = DEFAULT_CUTOFF  # Å
    n_radial: int = 16  # Bessel functions of |x|
    radial_hidden: int = 32  # width of the radial network, shared by all layers
    readout_hidden: int = 64
    dipole_head: bool = True  # predict mu as |dipole vector| from charges and atomic dipoles

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "elements", tuple(int(z) for z in self.elements))
        problems = []
        if self.kernel not in KERNEL_MODES:
            problems.append(f"kernel must be one of {KERNEL_MODES}")
        if self.self_interaction not in SELF_INTERACTIONS:
            problems.append(f"self_interaction must be one of {SELF_INTERACTIONS}")
        if self.nonlinearity not in NONLINEARITIES:
            problems.append(f"nonlinearity must be one of {NONLINEARITIES}")
        sizes = ("channels", "n_heads", "n_layers", "n_radial", "radial_hidden", "readout_hidden")
        too_small = [name for name in sizes if getattr(self, name) < 1]
        if too_small:
            problems.append(f"{', '.join(too_small)} must be >= 1")
        elif self.channels % self.n_heads:  # n_heads >= 1 here (0 used to raise ZeroDivisionError)
            problems.append("channels must be divisible by n_heads")
        if self.lmax < 0 or (self.jmax is not None and self.jmax < 0):
            problems.append("lmax >= 0 and jmax >= 0 (or None) are required")
        if not self.cutoff > 0:  # also rejects NaN
            problems.append("cutoff > 0 is required")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown:
            problems.append(f"unknown targets {unknown}")
        if not self.targets or len(set(self.targets)) != len(self.targets):
            problems.append("targets must be non-empty and distinct")
        if not self.elements or len(set(self.elements)) != len(self.elements):
            problems.append("elements must be non-empty and distinct")
        elif not all(1 <= z <= 118 for z in self.elements):
            problems.append("elements must be atomic numbers 1..118")
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))

    @property
    def kernel_jmax(self) -> int:
        return 2 * self.lmax if self.jmax is None else self.jmax

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        return cls.from_dict(json.loads(text))


PRESETS: dict[str, ModelConfig] = {
    # CPU-friendly: degrees 0-2, 32 channels, 4 layers.
    "small": ModelConfig(channels=32, lmax=2, n_layers=4, n_heads=4),
    # The paper's size: 7 layers, degrees 0-3, 32 channels, 8 heads.
    "base": ModelConfig(channels=32, lmax=3, n_layers=7, n_heads=8),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides)
