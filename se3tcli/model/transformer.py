"""The SE(3)-Transformer: element embedding -> equivariant attention layers -> readout."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from se3tcli.graph import Batch
from se3tcli.model.attention import EquivariantAttention
from se3tcli.model.backend import resolve
from se3tcli.model.basis import AngularBasis, BesselBasis, EdgeGeometry
from se3tcli.model.config import ModelConfig
from se3tcli.model.heads import Readout
from se3tcli.model.norm import make_activation
from se3tcli.model.uncertainty import UncertaintyHead

_N_ELEMENTS = 119


class UnsupportedElementError(ValueError):
    pass


class TransformerLayer(nn.Module):
    """``h <- h + Attention(Activation(h))``."""

    def __init__(self, config: ModelConfig, angular: AngularBasis, first: bool = False):
        super().__init__()
        # The first layer sees only the element embedding (scalars): its activation needs degree 0 alone.
        self.activation = make_activation(config.nonlinearity, config.channels, 0 if first else config.lmax)
        self.attention = EquivariantAttention(config, angular)

    def forward(self, h: torch.Tensor, geometry: EdgeGeometry) -> torch.Tensor:
        return h + self.attention(self.activation(h), geometry)


class SE3Transformer(nn.Module):
    """Maps a :class:`~se3tcli.graph.Batch` to ``{target: [n_mol]}`` in physical units."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        c = config.channels
        element_index = torch.full((_N_ELEMENTS,), -1, dtype=torch.long)
        element_index[list(config.elements)] = torch.arange(len(config.elements))
        self.register_buffer("element_index", element_index)
        self.embedding = nn.Embedding(len(config.elements), c)
        self.radial_basis = BesselBasis(config.n_radial, config.cutoff)
        # The radial network's hidden layers are shared by all layers; each layer maps them to its weights.
        self.radial_net = nn.Sequential(
            nn.Linear(config.n_radial, config.radial_hidden),
            nn.SiLU(),
            nn.Linear(config.radial_hidden, config.radial_hidden),
            nn.SiLU(),
        )
        self.angular = AngularBasis(config.lmax, config.kernel_jmax)
        self.layers = nn.ModuleList(
            TransformerLayer(config, self.angular, first=i == 0) for i in range(config.n_layers)
        )
        self.final_activation = make_activation(config.nonlinearity, c, config.lmax)
        self.readout = Readout(config)
        self.uncertainty = UncertaintyHead(config) if config.uncertainty_hidden else None

    @classmethod
    def from_config(cls, config: ModelConfig) -> SE3Transformer:
        return cls(config)

    @property
    def targets(self) -> tuple[str, ...]:
        return self.config.targets

    def set_statistics(
        self, mean: dict[str, float], std: dict[str, float], atom_refs: dict[str, np.ndarray]
    ) -> None:
        """Install normalisation (per atom for extensive targets) and atom references (per element)."""
        readout = self.readout
        for i, t in enumerate(readout.scalar_targets):
            readout.mean[i] = float(mean.get(t, 0.0))
            readout.std[i] = float(std.get(t, 1.0))
            if t in atom_refs:
                readout.atom_refs[:, i] = torch.as_tensor(
                    np.asarray(atom_refs[t]), dtype=readout.atom_refs.dtype
                )

    @property
    def backend(self) -> str:
        """The attention layers' implementation, as requested (see :meth:`set_backend`)."""
        return self.layers[0].attention.backend

    def set_backend(self, backend: str) -> None:
        """Run the attention layers with ``backend`` (:data:`~se3tcli.model.backend.BACKENDS`): ``auto`` (the
        default), ``torch``, ``fused_cpu`` or ``reference`` (e3nn's TensorProduct, the oracle); see
        :mod:`se3tcli.model.backend`. A property of this object, not saved with the model. Raises ValueError
        for an unknown name and :class:`~se3tcli.model.backend.BackendUnavailable` for ``fused_cpu`` where
        the kernel cannot be built or loaded (calls it cannot run raise later, in the forward pass)."""
        resolve(backend)
        for layer in self.layers:
            layer.attention.backend = backend

    def geometry(self, batch: Batch) -> EdgeGeometry:
        src, dst = batch.edge_src, batch.edge_dst
        vectors = batch.pos[src] - batch.pos[dst]  # [E, 3] Å, x_j - x_i
        length = vectors.norm(dim=1)  # [E]
        unit = vectors / length.clamp_min(1e-9)[:, None]
        envelope = self.radial_basis.envelope(length)
        # Reverse pairs share their length: the radial features once per pair (edges 2p and 2p + 1).
        pair = slice(None, None, 2) if batch.edges_paired else slice(None)
        radial = self.radial_net(self.radial_basis(length[pair])) * envelope[pair, None]
        sh = self.angular.spherical_harmonics(unit)
        return EdgeGeometry(src, dst, length, envelope, radial, sh, self.angular(sh), batch.edges_paired)

    def check_elements(self, z: torch.Tensor) -> None:
        """Raise :class:`UnsupportedElementError` for atomic numbers ``z`` (any device) the model lacks."""
        bad = sorted({int(v) for v in torch.unique(z).tolist()} - set(self.config.elements))
        if bad:
            raise UnsupportedElementError(f"atomic numbers {bad} are not supported by this model")

    def elements_of(self, z: torch.Tensor) -> torch.Tensor:
        element = self.element_index[z.clamp(0, _N_ELEMENTS - 1)]
        # The check reads the result back (a device sync), which CUDA-graph capture forbids: graphed callers
        # check their inputs before copying them into the graph (see se3tcli.cuda_graphs).
        if z.is_cuda and torch.cuda.is_current_stream_capturing():
            return element
        if z.numel() and (bool((element < 0).any()) or bool((z >= _N_ELEMENTS).any())):
            self.check_elements(z)
        return element

    def features(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h [n_atoms, C, D], element [n_atoms])``: the atom features the readout (and the uncertainty
        heads) read, and each atom's index in the model's element list."""
        element = self.elements_of(batch.z)
        geometry = self.geometry(batch)
        c, dim = self.config.channels, (self.config.lmax + 1) ** 2
        h = self.embedding(element).new_zeros(batch.z.shape[0], c, dim)
        h[:, :, 0] = self.embedding(element)  # [n_atoms, C, D]: scalars only at the start
        for layer in self.layers:
            h = layer(h, geometry)
        return self.final_activation(h), element

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        """``{target: [n_mol]}`` in display units, ``mu_vector [n_mol, 3]`` with a dipole head and
        ``{target_sigma: [n_mol]}`` with an uncertainty head."""
        h, element = self.features(batch)
        out = self.readout(h, element, batch)
        if self.uncertainty is not None:
            out |= self.uncertainty(h, element, batch)
        return out
