"""Rows outside the training domain: the warnings `se3t predict` attaches to them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from se3tcli.checkpoint import LoadedModel
from se3tcli.io import STATUS_ERROR, STATUS_OK, STATUS_WARNING, Molecule
from se3tcli.model.config import ModelConfig
from se3tcli.model.transformer import SE3Transformer
from se3tcli.predict import RARE_SIZE_FRACTION, check_domain

# Training molecules per heavy-atom count, as QM9's training split has them (roughly).
QM9_LIKE = {"1": 2, "2": 4, "3": 7, "4": 24, "5": 97, "6": 465, "7": 2400, "8": 13700, "9": 83300}


def _loaded(domain: dict) -> LoadedModel:
    model = SE3Transformer.from_config(ModelConfig(channels=4, n_heads=1, lmax=0, n_layers=1))
    return LoadedModel(model=model, path=Path("m.pt"), checkpoint={"training": {"domain": domain}})


def _molecule(n_carbons: int) -> Molecule:
    """The n-alkane of ``n_carbons`` carbons with an ETKDG geometry: one sound molecule of any size."""
    from rdkit import Chem
    from rdkit.Chem import AllChem

    mol = Chem.AddHs(Chem.MolFromSmiles("C" * n_carbons))
    AllChem.EmbedMolecule(mol, randomSeed=7)
    numbers = np.array([atom.GetAtomicNum() for atom in mol.GetAtoms()], dtype=np.int64)
    positions = mol.GetConformer().GetPositions()
    return Molecule("m", "in.sdf", 0, numbers, positions, {}, STATUS_OK, rdkit_mol=mol)


@pytest.mark.parametrize("n_heavy", [1, 3, 5])
def test_rarely_seen_small_molecules_get_a_warning(n_heavy: int) -> None:
    checked = check_domain(_molecule(n_heavy), _loaded({"train_molecules_by_heavy_atoms": QM9_LIKE}))
    assert checked.status == STATUS_WARNING
    assert f"only {QM9_LIKE[str(n_heavy)]} training molecules are that small" in checked.message
    assert checked.message.startswith("in.sdf record 1 (m): ")


def test_often_seen_sizes_stay_ok() -> None:
    assert QM9_LIKE["6"] >= RARE_SIZE_FRACTION * sum(QM9_LIKE.values())
    for n_heavy in (6, 9):
        loaded = _loaded({"train_molecules_by_heavy_atoms": QM9_LIKE, "max_heavy_atoms": 9})
        assert check_domain(_molecule(n_heavy), loaded).status == STATUS_OK


def test_larger_than_seen_says_so_once() -> None:
    domain = {"train_molecules_by_heavy_atoms": QM9_LIKE, "max_heavy_atoms": 9}
    checked = check_domain(_molecule(12), _loaded(domain))
    assert checked.status == STATUS_WARNING
    assert "more than the 9 seen in training" in checked.message and "that small" not in checked.message


def test_checkpoints_without_the_counts_or_with_few_training_molecules_give_no_size_warning() -> None:
    assert check_domain(_molecule(1), _loaded({})).status == STATUS_OK
    tiny = {"train_molecules_by_heavy_atoms": {"5": 20, "9": 28}}  # 48 molecules: no statistics of sizes
    assert check_domain(_molecule(1), _loaded(tiny)).status == STATUS_OK


def test_a_bare_proton_is_an_error_and_a_hydride_is_predicted() -> None:
    proton, hydride = (
        Molecule("m", "in.xyz", 0, np.array([1]), np.zeros((1, 3)), {"charge": q}, STATUS_OK)
        for q in ("1", "-1")
    )
    checked = check_domain(proton, _loaded({}))
    assert checked.status == STATUS_ERROR
    assert checked.message.endswith("0 electrons (a bare nucleus?): nothing to predict")
    assert check_domain(hydride, _loaded({})).status == STATUS_WARNING  # a charge, but two electrons
