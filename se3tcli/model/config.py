"""The one JSON-serialisable configuration that rebuilds a model."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from se3tcli.graph import DEFAULT_CUTOFF
from se3tcli.targets import QM9_TARGETS, define_targets

KERNEL_MODES = ("depthwise", "full")
SELF_INTERACTIONS = ("linear", "attentive")
NONLINEARITIES = ("norm", "norm_sigmoid", "gate")
QM9_ELEMENTS = (1, 6, 7, 8, 9)  # H C N O F
# Upper bounds on the sizes, far above the presets (base: 32 channels, lmax 3, 7 layers, 8 heads), so that
# an absurd config (a hostile or corrupt checkpoint's) fails at once instead of allocating for minutes.
MAX_SIZES = {
    "channels": 1024,
    "n_heads": 64,
    "n_layers": 64,
    "lmax": 6,
    "jmax": 12,  # 2 * lmax, the highest degree a kernel path can reach
    "n_radial": 4096,
    "radial_hidden": 4096,
    "readout_hidden": 4096,
    "uncertainty_hidden": 4096,
}
MAX_CUTOFF = 20.0  # Å


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
    nonlinearity: str = "norm_sigmoid"  # "norm" only for checkpoints that use it (see norm.py)
    cutoff: float = DEFAULT_CUTOFF  # Å
    n_radial: int = 16  # Bessel functions of |x|
    radial_hidden: int = 32  # width of the radial network, shared by all layers
    readout_hidden: int = 64
    dipole_head: bool = True  # predict mu as |dipole vector| from charges and atomic dipoles
    uncertainty_hidden: int = 0  # width of the uncertainty head (model/uncertainty.py); 0: no head
    # Targets QM9 lacks, defined by the user: {name: {"unit": str, "extensive": bool}}.
    user_targets: dict = dataclasses.field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "elements", tuple(int(z) for z in self.elements))
        object.__setattr__(self, "user_targets", dict(self.user_targets))
        problems = []
        if self.kernel not in KERNEL_MODES:
            problems.append(f"kernel must be one of {KERNEL_MODES}")
        if self.self_interaction not in SELF_INTERACTIONS:
            problems.append(f"self_interaction must be one of {SELF_INTERACTIONS}")
        if self.nonlinearity not in NONLINEARITIES:
            problems.append(f"nonlinearity must be one of {NONLINEARITIES}")
        sizes = ("channels", "n_heads", "n_layers", "n_radial", "radial_hidden", "readout_hidden")
        too_small = [name for name in sizes if getattr(self, name) < 1]
        if self.uncertainty_hidden < 0:
            problems.append("uncertainty_hidden must be >= 0 (0: no uncertainty head)")
        if too_small:
            problems.append(f"{', '.join(too_small)} must be >= 1")
        elif self.channels % self.n_heads:  # n_heads >= 1 here (0 used to raise ZeroDivisionError)
            problems.append("channels must be divisible by n_heads")
        if self.lmax < 0 or (self.jmax is not None and self.jmax < 0):
            problems.append("lmax >= 0 and jmax >= 0 (or None) are required")
        if not self.cutoff > 0:  # also rejects NaN
            problems.append("cutoff > 0 is required")
        too_large = [
            f"{name} <= {limit}" for name, limit in MAX_SIZES.items() if (getattr(self, name) or 0) > limit
        ]
        if self.cutoff > MAX_CUTOFF:
            too_large.append(f"cutoff <= {MAX_CUTOFF:g} Å")
        if too_large:
            problems.append(f"{', '.join(too_large)} required")
        unknown = [t for t in self.targets if t not in QM9_TARGETS and t not in self.user_targets]
        if unknown:
            problems.append(f"unknown targets {unknown}")
        if set(self.user_targets) - set(self.targets):
            problems.append("user_targets must define targets of the model")
        if not self.targets or len(set(self.targets)) != len(self.targets):
            problems.append("targets must be non-empty and distinct")
        if not self.elements or len(set(self.elements)) != len(self.elements):
            problems.append("elements must be non-empty and distinct")
        elif not all(1 <= z <= 118 for z in self.elements):
            problems.append("elements must be atomic numbers 1..118")
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))
        try:  # only a valid config registers its targets (by name in this process: units, kinds)
            define_targets(self.user_targets)
        except ValueError as exc:
            raise ValueError(f"invalid model config: {exc}") from None

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
