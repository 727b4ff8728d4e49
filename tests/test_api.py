"""se3t from Python: ``se3tcli.load_model(...).predict(...)`` on every kind of input, the DataFrame, the
ASE calculator, and the README's example."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import ase
import numpy as np
import pytest
import torch
from ase.build import molecule
from e3nn import o3
from rdkit import Chem
from rdkit.Chem import AllChem

import se3tcli as se3t
from se3tcli.calculator import SE3TCalculator
from se3tcli.checkpoint import load_model as load_checkpoint
from se3tcli.io import read_molecules
from se3tcli.io.outputs import file_value
from se3tcli.predict import predict_stream, predict_to_file

DIPOLE = ("mu_x", "mu_y", "mu_z")

ROOT = Path(__file__).resolve().parents[1]
WATER = [(0.0, 0.0, 0.0), (0.96, 0.0, 0.0), (-0.24, 0.93, 0.0)]  # Å


def _embedded(smiles: str) -> Chem.Mol:
    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    AllChem.EmbedMolecule(mol, randomSeed=3)
    return mol


def test_every_kind_of_input_gives_the_command_lines_rows(tiny_checkpoint: Path, samples: Path) -> None:
    model = se3t.load_model(str(tiny_checkpoint), device="cpu")
    sdf = samples / "qm9_sample.sdf"
    water = molecule("H2O")
    rows = model.predict(["CCO ethanol", _embedded("CO"), water, str(sdf), 7, "not a smiles"])
    n_sdf = len(list(read_molecules([sdf])))
    assert len(rows) == 3 + n_sdf + 2
    assert [r.source for r in rows[:3]] == ["<smiles>", "<rdkit>", "<ase>"]
    assert [r.record for r in rows[:3]] == [1, 2, 3] and rows[0].name == "ethanol" and rows[2].name == "H2O"
    assert [r.smiles for r in rows[:3]] == ["CCO", "CO", "O"]  # as given; from the RDKit bonds; perceived
    assert rows[0].status == "warning" and "force-field geometry" in rows[0].message
    assert rows[1].formula == "CH4O" and rows[1].ok and rows[2].ok
    assert rows[-2].status == "error" and "cannot predict a int" in rows[-2].message
    assert rows[-1].status == "error" and all(v is None for v in rows[-1].values.values())
    assert rows[0].units == model.units | dict.fromkeys(DIPOLE, "D")  # the tiny model has a dipole head
    assert list(rows[0].values) == [*model.targets, *DIPOLE]

    # The file's rows are exactly what se3t predict computes for it.
    loaded = load_checkpoint(str(tiny_checkpoint))
    expected = list(predict_stream(loaded, read_molecules([sdf]), torch.device("cpu")))
    for row, (m, values) in zip(rows[3 : 3 + n_sdf], expected, strict=True):
        assert (row.name, row.record, row.status, row.message) == (m.name, m.record, m.status, m.message)
        assert row.values == pytest.approx(values, rel=1e-5, abs=1e-6)  # other batches: float32 rounding
        assert all(v == file_value(v) for v in row.values.values())  # as the files hold them


def test_targets_a_single_input_and_the_data_frame(tiny_checkpoint: Path) -> None:
    pd = pytest.importorskip("pandas")
    model = se3t.load_model(str(tiny_checkpoint), device="cpu")
    (row,) = model.predict("CCO", targets=["homo"])
    assert list(row.values) == ["homo"] and row.to_dict()["homo_eV"] == row.values["homo"]
    frame = model.predict_frame(["CCO", "CC"], targets="homo,mu")
    assert isinstance(frame, pd.DataFrame) and len(frame) == 2
    assert list(frame.columns)[-5:] == ["homo_eV", "mu_D", "mu_x_D", "mu_y_D", "mu_z_D"]
    assert list(frame["record"]) == [1, 2] and list(frame["smiles"]) == ["CCO", "CC"]
    with pytest.raises(ValueError, match="unknown target"):
        model.predict("CCO", targets="nope")


def test_the_dipole_vector_turns_with_the_molecule(tiny_checkpoint: Path) -> None:
    """mu_x, mu_y, mu_z are in the input's axes: a rotated (and moved) copy gets the rotated vector, whose
    norm is mu; to float32 precision."""
    model = se3t.load_model(str(tiny_checkpoint), device="cpu")
    atoms = molecule("CH3CH2OH")
    torch.manual_seed(4)
    rotation = o3.rand_matrix(dtype=torch.float64).numpy()
    turned = atoms.copy()
    turned.positions = atoms.positions @ rotation.T + np.array([30.0, -12.0, 7.0])
    rows = model.predict([atoms, turned], targets="mu,homo")
    vector, turned_vector = (np.array([row.values[c] for c in DIPOLE]) for row in rows)  # [3] D
    assert np.linalg.norm(vector) > 0.05  # a vector with a direction to test
    np.testing.assert_allclose(turned_vector, rotation @ vector, rtol=1e-4, atol=1e-5)
    for row in rows:
        assert np.linalg.norm([row.values[c] for c in DIPOLE]) == pytest.approx(row.values["mu"], rel=1e-5)
        assert row.units["mu_x"] == "D"


def test_the_data_frame_is_the_csv_file(tiny_checkpoint: Path, samples: Path, tmp_path: Path) -> None:
    """predict_frame and pandas reading se3t predict's CSV give the same columns and values."""
    pd = pytest.importorskip("pandas")
    model = se3t.load_model(str(tiny_checkpoint), device="cpu")
    frame = model.predict_frame(samples / "bad.sdf")  # errors, a generated conformer, a 3D record
    out = tmp_path / "out.csv"
    molecules = read_molecules([samples / "bad.sdf"])
    predict_to_file(model.loaded, molecules, torch.device("cpu"), model.targets, out, lambda *row: None)
    from_file = pd.read_csv(out, keep_default_na=False, na_values=[""])
    assert list(frame.columns) == list(from_file.columns)
    values = list(frame.columns[7:])
    pd.testing.assert_frame_equal(frame[values], from_file[values])
    text = ["name", "source", "formula", "smiles", "status", "message"]
    pd.testing.assert_frame_equal(frame[text].fillna(""), from_file[text].fillna(""))
    assert list(frame["record"]) == list(from_file["record"]) == [1, 2, 3, 4]


def test_the_calculator_gives_an_equivariant_dipole_and_no_energy(tiny_checkpoint: Path) -> None:
    atoms = molecule("CH3CH2OH")
    atoms.calc = SE3TCalculator(str(tiny_checkpoint))
    dipole = atoms.get_dipole_moment()  # e·Å
    summary = atoms.calc.results["se3t"]
    assert np.linalg.norm(dipole) * 4.803204544 == pytest.approx(summary["mu"][0], rel=1e-4)
    assert summary["homo"][1] == "eV" and summary["status"] in ("ok", "warning")
    rotation = o3.rand_matrix().double().numpy()
    turned = atoms.copy()
    turned.positions = atoms.positions @ rotation.T
    turned.calc = SE3TCalculator(str(tiny_checkpoint))
    np.testing.assert_allclose(turned.get_dipole_moment(), rotation @ dipole, atol=1e-5)
    assert "energy" not in SE3TCalculator.implemented_properties
    with pytest.raises(Exception, match="energy"):
        atoms.get_potential_energy()


def test_the_readme_example_runs(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    text = (ROOT / "README.md").read_text()
    (example,) = re.findall(r"### From Python\n\n```python\n(.*?)```", text, re.S)
    monkeypatch.chdir(ROOT)
    exec(compile(example, "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 4 and printed[0].startswith("ethanol warning -")
    assert "force-field geometry" in printed[0] and " eV " in printed[0]


def test_one_molecule_alone_and_paths_that_are_not_files(tiny_checkpoint: Path, tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas")
    model = se3t.load_model(str(tiny_checkpoint), device="cpu")
    (methane,) = model.predict(molecule("CH4"))  # Atoms are iterable, but one molecule
    assert methane.name == "CH4" and methane.ok
    (empty,) = model.predict(ase.Atoms())
    assert empty.status == "error" and empty.message.endswith("empty molecule")
    (crystal,) = model.predict(ase.Atoms("H2O", positions=WATER, cell=[3, 3, 3], pbc=True))
    assert crystal.status == "warning" and "periodic boundary conditions ignored" in crystal.message
    missing, folder, as_path = model.predict([str(tmp_path / "mols.sdf"), str(tmp_path), tmp_path / "x.xyz"])
    assert missing.message.endswith("no such file") and missing.source.endswith("mols.sdf")
    assert folder.status == "error" and as_path.message.endswith("no such file")
    fifo = tmp_path / "pipe.smi"
    os.mkfifo(fifo)
    pipe, directory = model.predict([fifo, tmp_path])
    assert pipe.message.endswith("not a regular file (a pipe or a device?)")
    assert directory.message.endswith("is a directory, not a file")
    (mapping,) = model.predict({"smiles": "CCO"})  # one object, not its keys
    assert mapping.status == "error" and "cannot predict a dict" in mapping.message
    (query,) = model.predict(Chem.MolFromSmarts("[#6]-[#8]"))
    assert query.status == "error" and query.message.endswith(
        "a query molecule (a SMARTS pattern), not a structure"
    )
    frame = model.predict_frame([], targets="homo")
    columns = ["name", "source", "record", "formula", "smiles", "status", "message", "homo_eV"]
    assert list(frame.columns) == columns
    assert model.predict_frame([None], targets="homo")["homo_eV"].dtype == np.float64  # NaN, not None
    assert pd.isna(model.predict_frame([None], targets="homo")["homo_eV"][0])


def test_a_molecule_with_several_conformers_gives_one_row_per_conformer(tiny_checkpoint: Path) -> None:
    model = se3t.load_model(str(tiny_checkpoint), device="cpu")
    ethanol = Chem.AddHs(Chem.MolFromSmiles("CCO"))
    ids = list(AllChem.EmbedMultipleConfs(ethanol, 3, randomSeed=1))
    ethanol.SetProp("_Name", "ethanol")
    unnamed = Chem.Mol(ethanol)
    unnamed.ClearProp("_Name")
    rows = model.predict([_embedded("CO"), ethanol, unnamed])
    assert [r.name for r in rows] == [
        "<rdkit>#1",  # one conformer: one row, no suffix
        *(f"ethanol#conf{i}" for i in ids),
        *(f"<rdkit>#3#conf{i}" for i in ids),
    ]
    assert [r.record for r in rows] == [1, 2, 2, 2, 3, 3, 3] and all(r.ok for r in rows)
    assert len({r.values["homo"] for r in rows[1:4]}) == 3  # each conformer's own geometry
    assert [r.values for r in rows[1:4]] == [r.values for r in rows[4:]]


@pytest.mark.parametrize(
    "options",
    [
        {"batch_size": 0},
        {"workers": 0},
        {"workers": -2},
        {"conformer_timeout": -1.0},
        {"conformer_timeout": math.nan},
        {"conformer_timeout": math.inf},
        {"conformer_timeout": "5"},
        {"batch_size": True},
    ],
)
def test_options_out_of_range_are_refused(tiny_checkpoint: Path, options: dict) -> None:
    model = se3t.load_model(str(tiny_checkpoint), device="cpu")
    with pytest.raises(ValueError, match=next(iter(options))):
        model.predict("CCO", **options)


def test_numpy_numbers_are_fine_options(tiny_checkpoint: Path) -> None:
    model = se3t.load_model(str(tiny_checkpoint), device="cpu")
    options = {"batch_size": np.int64(8), "workers": np.int64(1), "conformer_timeout": np.float64(30)}
    (row,) = model.predict("CCO", **options)
    assert row.ok
