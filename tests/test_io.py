"""Tests of se3tcli.io: reading SDF/XYZ/SMILES into Molecule records and writing predictions."""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rdkit import Chem
from rdkit.Chem import AllChem

from se3tcli.io import (
    STATUS_ERROR,
    STATUS_OK,
    STATUS_WARNING,
    SUPPORTED_SUFFIXES,
    InputError,
    Molecule,
    PredictionWriter,
    check_inputs,
    read_molecules,
    writer_formats,
)
from se3tcli.io.conformers import FORCE_FIELD_GEOMETRY
from se3tcli.io.filereader import MAX_LINE_CHARS, read_stream
from se3tcli.io.molecule import close_pair
from se3tcli.io.outputs import smiles_of
from se3tcli.io.reading import reader_of
from se3tcli.io.structure_checks import structure_warnings

SAMPLES = Path(__file__).resolve().parents[1] / "sample_molecules"
QM9_NAMES = [f"gdb_{i}" for i in (1, 2, 3, 5, 20, 829, 1000, 4208, 20000, 100000)]


def _molblock(smiles: str, name: str, hydrogens: bool = True, seed: int = 3) -> str:
    """One SD record of `smiles` with an ETKDG 3D conformer (hydrogens removed if not `hydrogens`)."""
    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    AllChem.EmbedMolecule(mol, randomSeed=seed)
    if not hydrogens:
        mol = Chem.RemoveHs(mol)
    mol.SetProp("_Name", name)
    return Chem.MolToMolBlock(mol) + "$$$$\n"


def _xyz_frame(symbols: str, positions: list[tuple[float, float, float]], comment: str) -> str:
    atoms = "".join(f"{s} {x} {y} {z}\n" for s, (x, y, z) in zip(symbols.split(), positions, strict=True))
    return f"{len(positions)}\n{comment}\n{atoms}"


WATER = [(0.0, 0.0, 0.0), (0.96, 0.0, 0.0), (-0.24, 0.93, 0.0)]


def _read(path: Path, **kwargs) -> list[Molecule]:
    return list(read_molecules([path], **kwargs))


def _assert_well_formed(rows: list[Molecule], filename: str) -> None:
    """Every row is a consistent Molecule; error rows name the file and a record."""
    for row in rows:
        assert isinstance(row, Molecule)
        assert row.status in (STATUS_OK, STATUS_WARNING, STATUS_ERROR)
        assert row.numbers.dtype == np.int64
        assert row.positions.shape == (len(row.numbers), 3)
        if row.status == STATUS_ERROR:
            assert row.message.startswith(f"{filename} record ")
        else:
            assert len(row.numbers) > 0 and np.isfinite(row.positions).all()
            assert (row.numbers > 0).all()


# ----------------------------------------------------------------------------------------- sample files


def test_qm9_sample_sdf():
    rows = _read(SAMPLES / "qm9_sample.sdf")
    assert [m.name for m in rows] == QM9_NAMES
    assert all(m.status == STATUS_OK and m.message == "" for m in rows)
    assert [m.index for m in rows] == list(range(10))
    assert {1, 6, 7, 8, 9} == {int(z) for m in rows for z in m.numbers}  # H, C, N, O, F
    methane = rows[0]
    assert methane.formula == "CH4"
    assert methane.numbers.tolist() == [6, 1, 1, 1, 1]
    assert methane.properties["qm9_index"] == "1"
    assert float(methane.properties["homo_eV"]) == pytest.approx(-0.3877 * 27.211386245988, abs=1e-5)
    assert methane.rdkit_mol is not None and methane.rdkit_mol.GetNumAtoms() == 5
    # C-H bond length of QM9's methane, Å
    assert np.linalg.norm(methane.positions[1] - methane.positions[0]) == pytest.approx(1.0919, abs=1e-3)


def test_qm9_sample_xyz_matches_sdf():
    sdf = _read(SAMPLES / "qm9_sample.sdf")
    xyz = _read(SAMPLES / "qm9_sample.xyz")
    assert [m.name for m in xyz] == QM9_NAMES
    assert all(m.status == STATUS_OK and m.rdkit_mol is None for m in xyz)
    for a, b in zip(sdf, xyz, strict=True):
        assert a.numbers.tolist() == b.numbers.tolist()
        np.testing.assert_allclose(a.positions, b.positions, atol=1e-4)  # SDF keeps 4 decimals


def test_drugs_smi_embeds_3d_with_hydrogens():
    rows = _read(SAMPLES / "drugs.smi")
    assert [m.name for m in rows] == ["aspirin", "caffeine", "paracetamol", "ibuprofen", "nicotine"]
    # A force-field conformer is not the DFT geometry the model learned: every row says so.
    assert all(m.status == STATUS_WARNING and "force-field geometry" in m.message for m in rows)
    aspirin = rows[0]
    assert aspirin.formula == "C9H8O4"
    assert (aspirin.numbers == 1).sum() == 8
    assert np.ptp(aspirin.positions, axis=0).min() > 0.5  # really 3D, Å
    assert aspirin.rdkit_mol.GetNumConformers() == 1
    assert aspirin.properties == {"smiles": "CC(=O)Oc1ccccc1C(=O)O"}


def test_bad_sdf_rows():
    rows = _read(SAMPLES / "bad.sdf")
    assert [m.status for m in rows] == [STATUS_ERROR, STATUS_ERROR, STATUS_WARNING, STATUS_OK]
    assert [m.name for m in rows] == ["pentavalent_carbon", "dummy_atom", "ethanol_2d", "glycine_3d"]
    assert rows[0].message.startswith("bad.sdf record 1 (pentavalent_carbon): RDKit sanitization failed")
    assert "valence" in rows[0].message
    assert rows[1].message == "bad.sdf record 2 (dummy_atom): unsupported element * (atom 1)"
    assert rows[2].message.startswith("bad.sdf record 3 (ethanol_2d): 2D record: 3D conformer generated")
    assert "hydrogens added" in rows[2].message
    ethanol = rows[2]
    assert ethanol.formula == "C2H6O" and ethanol.positions[:, 2].any()
    assert rows[3].formula == "C2H5NO2" and rows[3].message == ""
    assert not rows[0].ok and rows[2].ok


def test_bad_sdf_without_embedding():
    rows = _read(SAMPLES / "bad.sdf", embed=False)
    assert [m.status for m in rows] == [STATUS_ERROR, STATUS_ERROR, STATUS_ERROR, STATUS_OK]
    assert rows[2].message == (
        "bad.sdf record 3 (ethanol_2d): no 3D coordinates (2D record) and embedding is off"
    )


# ----------------------------------------------------------------------------------------------- SDF


def test_missing_hydrogens_are_added_or_rejected(tmp_path):
    path = tmp_path / "noh.sdf"
    path.write_text(_molblock("CC(=O)O", "acetic acid", hydrogens=False))
    (row,) = _read(path)
    assert row.status == STATUS_WARNING
    assert row.message == "noh.sdf record 1 (acetic acid): hydrogens added"
    assert row.formula == "C2H4O2"
    (row,) = _read(path, embed=False)
    assert row.status == STATUS_ERROR and "no explicit hydrogens" in row.message


def test_unparsable_record_is_reported_and_reading_goes_on(tmp_path):
    good = _molblock("O", "water")
    broken = good.replace("water", "broken", 1).replace(" O ", " Xx", 1)  # unknown element symbol
    counts = good.replace("water", "counts", 1).replace("  3  2  0", "  x  y  0", 1)  # broken counts line
    path = tmp_path / "mixed.sdf"
    path.write_text(good + broken + counts + good)
    rows = _read(path)
    assert [m.status for m in rows] == [STATUS_OK, STATUS_ERROR, STATUS_ERROR, STATUS_OK]
    assert rows[1].message.startswith("mixed.sdf record 2 (broken): cannot parse record: ")
    assert rows[2].message.startswith("mixed.sdf record 3 (counts): cannot parse record: ")
    assert rows[1].name == "broken" and rows[2].name == "counts"  # the title line, though RDKit failed
    assert rows[3].name == "water" and rows[3].index == 3
    if hasattr(Chem.rdBase, "CaptureErrorLog"):  # RDKit's own reason is captured (RDKit >= 2026.03)
        assert "Xx" in rows[1].message


def test_sdf_without_name_gets_file_and_record(tmp_path):
    path = tmp_path / "anon.sdf"
    path.write_text(_molblock("N", "") * 2)
    assert [m.name for m in _read(path)] == ["anon.sdf#1", "anon.sdf#2"]


def test_sdf_is_read_lazily(tmp_path):
    """The first record arrives before the file is read to its end: a record appended after the first
    ``next()`` is still seen, which an eager reader (whole file read up front) would miss."""
    path = tmp_path / "big.sdf"
    path.write_text(_molblock("O", "water") * 10_000)
    reader = read_molecules([path])
    first = next(reader)
    assert first.name == "water" and first.status == STATUS_OK
    with path.open("a") as handle:
        handle.write(_molblock("N", "appended"))
    rest = list(reader)
    assert len(rest) == 10_000
    assert rest[-1].name == "appended" and rest[-1].index == 10_000
    assert all(m.status == STATUS_OK for m in rest)


def test_gzip_sdf(tmp_path):
    text = (SAMPLES / "qm9_sample.sdf").read_bytes()
    path = tmp_path / "qm9.SDF.GZ"
    path.write_bytes(gzip.compress(text))
    rows = _read(path)
    assert [m.name for m in rows] == QM9_NAMES


def test_broken_gzip_gives_error_rows(tmp_path):
    not_gzip = tmp_path / "plain.sdf.gz"
    not_gzip.write_bytes((SAMPLES / "qm9_sample.sdf").read_bytes())
    (row,) = _read(not_gzip)
    assert row.status == STATUS_ERROR and row.message.startswith("plain.sdf.gz record 1: cannot read")
    assert "not gzip-compressed" in row.message
    truncated = tmp_path / "truncated.sdf.gz"
    data = gzip.compress((SAMPLES / "qm9_sample.sdf").read_bytes() * 20)
    truncated.write_bytes(data[: len(data) // 2])
    rows = _read(truncated)
    assert rows[0].name == "gdb_1" and rows[0].ok
    assert rows[-1].status == STATUS_ERROR and "cannot read the rest of the file" in rows[-1].message
    assert "cut short" in rows[-1].message
    corrupt = tmp_path / "corrupt.sdf.gz"
    corrupt.write_bytes(data[:-8] + bytes(8))  # the trailer's checksum and length no longer match
    assert "the compressed data is corrupt" in _read(corrupt)[-1].message


# ----------------------------------------------------------------------------------------------- XYZ


def test_xyz_names_and_extxyz_properties(tmp_path):
    path = tmp_path / "frames.extxyz"
    path.write_text(
        _xyz_frame("O H H", WATER, "water molecule")
        + _xyz_frame("O H H", WATER, "")
        + _xyz_frame("O H H", WATER, 'name=w3 energy=-76.4 tag="a b" Properties=species:S:1:pos:R:3')
    )
    rows = _read(path)
    assert [m.name for m in rows] == ["water molecule", "frames.extxyz#2", "w3"]
    assert rows[0].properties == {}
    assert rows[2].properties == {"name": "w3", "tag": "a b", "energy": "-76.4"}
    assert all(m.status == STATUS_OK and m.formula == "H2O" for m in rows)


def test_xyz_titles_with_an_equals_sign_keep_the_frame(tmp_path):
    """A comment line is extXYZ metadata only where it has a key=value entry; one that ASE cannot read
    as metadata names the frame instead of losing it."""
    path = tmp_path / "titles.xyz"
    path.write_text(
        _xyz_frame("O H H", WATER, "=")
        + _xyz_frame("O H H", WATER, "SCF Done:  E(RB3LYP) =  -76.40 A.U.")
        + _xyz_frame("O H H", WATER, "Lattice=1")
        + _xyz_frame("O H H", WATER, " i = 1, time = 0.500, E = -17.1")  # CP2K's: metadata, spaced
    )
    rows = _read(path)
    assert [m.name for m in rows] == ["=", "SCF Done:  E(RB3LYP) =  -76.40 A.U.", "Lattice=1", "titles.xyz#4"]
    assert [m.status for m in rows] == [STATUS_OK, STATUS_OK, STATUS_WARNING, STATUS_OK]
    assert rows[3].properties["E"] == "-17.1"
    assert "the comment line is no extXYZ metadata that ASE can read" in rows[2].message
    assert all(m.formula == "H2O" for m in rows)


def test_xyz_bad_frames(tmp_path):
    path = tmp_path / "bad.xyz"
    path.write_text(
        _xyz_frame("O H H", WATER, "good")
        + _xyz_frame("O H X", WATER, "dummy")
        + _xyz_frame("O H Xx", WATER, "unknown")
        + _xyz_frame("O H H", [(0, 0, 0), (0.05, 0, 0), (1, 0, 0)], "clash")
        + _xyz_frame("O H H", [(0, 0, 0), (math.nan, 0, 0), (1, 0, 0)], "nan")
        + "0\nempty\n"
        + "5\ntoo many\nO 0 0 0\nH 1 0 0\n"  # declares 5 atoms, the next frame starts after 2
        + _xyz_frame("O H H", WATER, "after")
    )
    rows = _read(path)
    _assert_well_formed(rows, "bad.xyz")
    assert [m.status for m in rows] == [STATUS_OK] + [STATUS_ERROR] * 6 + [STATUS_OK]
    messages = [m.message for m in rows]
    assert messages[1] == "bad.xyz record 2 (dummy): unsupported element X (atom 3)"
    assert messages[2] == "bad.xyz record 3 (unknown): unknown element symbol 'Xx'"
    assert messages[3] == "bad.xyz record 4 (clash): atoms 1 and 2 are 0.050 Å apart (< 0.1 Å)"
    assert messages[4] == "bad.xyz record 5 (nan): non-finite coordinates (atom 2)"
    assert messages[5] == "bad.xyz record 6 (empty): empty molecule"
    assert messages[6] == "bad.xyz record 7: frame declares 5 atoms but has 2 atom lines"
    assert rows[7].name == "after"


def test_xyz_garbage_where_a_count_line_should_be_is_one_error_row(tmp_path):
    """Reading goes on at the next line that holds only a number: the frames after it are not lost."""
    path = tmp_path / "garbage.xyz"
    path.write_text(_xyz_frame("O H H", WATER, "good") + "not a count\n" + _xyz_frame("O H H", WATER, "kept"))
    rows = _read(path)
    assert [m.status for m in rows] == [STATUS_OK, STATUS_ERROR, STATUS_OK]
    assert rows[1].message == (
        "garbage.xyz record 2: expected an atom count line, found 'not a count'; "
        "1 line(s) skipped to the next frame"
    )
    assert rows[2].name == "kept"


def test_xyz_frame_with_more_or_fewer_atom_lines_is_one_error_row(tmp_path):
    """A count that does not match the atom lines makes that frame (not a phantom one) the error, once;
    the frames after it keep their rows and record numbers."""
    extra = _xyz_frame("O H H", WATER, "extra") + "H 0.0 0.0 1.5\n"  # one atom line more than declared
    short = "3\nshort\nO 0 0 0\nH 0.96 0.0\nH -0.24 0.93 0.0\n"  # a broken atom line, then one more
    path = tmp_path / "miscounted.xyz"
    path.write_text(extra + short + _xyz_frame("O H H", WATER, "next") + "3\ncut short\nO 0 0 0\n")
    rows = _read(path)
    assert [m.status for m in rows] == [STATUS_ERROR, STATUS_ERROR, STATUS_OK, STATUS_ERROR]
    assert rows[0].message.endswith("record 1: frame declares 3 atoms but has 4 atom lines")
    assert rows[1].message.endswith(
        "record 2: frame declares 3 atoms but has 1 atom lines; 2 line(s) skipped to the next frame"
    )
    assert rows[2].name == "next" and rows[2].index == 2
    assert rows[3].message.endswith("file ends after 1 of 3 atom lines")


def test_xyz_signed_counts_and_atomic_numbers_are_read_decimal_counts_are_errors(tmp_path):
    """``+3`` is a count to Python and ASE, ``8 0.0 0.0 0.0`` oxygen as Open Babel reads it; a count of
    ``3.0`` (which ASE refuses) is its frame's error, and every frame after it keeps its row."""
    numbers = "3\nnumbers\n8 0.0 0.0 0.0\n1 0.96 0.0 0.0\n 1 -0.24 0.93 0.0\n"
    path = tmp_path / "odd.xyz"
    path.write_text(
        _xyz_frame("O H H", WATER, "signed").replace("3", "+3", 1)
        + _xyz_frame("O H H", WATER, "decimal").replace("3", "3.0", 1)
        + numbers
        + numbers.replace("numbers", "no element").replace("\n1 0.96", "\n200 0.96")
        + numbers.replace("numbers", "Properties=species:S:1:pos:R:3")  # named columns: taken as given
        + _xyz_frame("O H H", WATER, "decimal again").replace("3", "3.", 1)
        + _xyz_frame("O H H", WATER, "last")
    )  # fmt: skip
    rows = _read(path)
    assert [(m.name, m.status) for m in rows] == [
        ("signed", STATUS_OK),
        ("odd.xyz#2", STATUS_ERROR),
        ("numbers", STATUS_OK),
        ("no element", STATUS_ERROR),
        ("odd.xyz#5", STATUS_ERROR),
        ("odd.xyz#6", STATUS_ERROR),
        ("last", STATUS_OK),
    ]
    assert rows[0].formula == rows[2].formula == "H2O"
    np.testing.assert_allclose(rows[2].positions, WATER)
    assert rows[1].message == "odd.xyz record 2: the atom count '3.0' is not an integer"
    assert rows[3].message == "odd.xyz record 4 (no element): atomic number 200 is not an element (atom 2)"
    assert rows[4].message == "odd.xyz record 5: unknown element symbol '8'"
    assert rows[5].message == "odd.xyz record 6: the atom count '3.' is not an integer"


# -------------------------------------------------------------------------------------------- SMILES


def test_smiles_arguments_are_embedded():
    rows = list(read_molecules(smiles=["CCO ethanol", "C1CC", "c1ccccc1"], seed=7))
    assert [m.name for m in rows] == ["ethanol", "C1CC", "c1ccccc1"]
    assert [m.source for m in rows] == ["<smiles>"] * 3
    assert [m.status for m in rows] == [STATUS_WARNING, STATUS_ERROR, STATUS_WARNING]
    assert rows[0].message == "<smiles> record 1 (ethanol): " + FORCE_FIELD_GEOMETRY
    assert rows[1].message.startswith("<smiles> record 2 (C1CC): cannot parse SMILES 'C1CC'")
    ethanol = rows[0]
    assert ethanol.numbers.tolist() == [6, 6, 8, 1, 1, 1, 1, 1, 1]
    assert np.linalg.norm(ethanol.positions[0] - ethanol.positions[1]) == pytest.approx(1.51, abs=0.05)  # Å
    again = next(read_molecules(smiles=["CCO"], seed=7))
    np.testing.assert_allclose(again.positions, ethanol.positions)  # seeded: reproducible


def test_cxsmiles_extensions_stay_with_the_smiles():
    """``CC |^1:0|`` is the ethyl radical: its extension is not the start of the name, and the radical is
    flagged as one."""
    radical, stereo, barred = read_molecules(
        smiles=["CC |^1:0| ethyl", "C[C@H](O)CC |&1:1| racemic butanol", "CCO |not an extension"], seed=7
    )
    assert (radical.name, radical.smiles, radical.formula) == ("ethyl", "CC |^1:0|", "C2H5")
    assert any("radical" in warning for warning in structure_warnings(radical))
    assert (stereo.name, stereo.smiles) == ("racemic butanol", "C[C@H](O)CC |&1:1|")
    assert (barred.name, barred.smiles) == ("|not an extension", "CCO")


def test_an_sd_query_bond_is_an_error_row_naming_it(tmp_path, samples):
    methane = (samples / "qm9_sample.sdf").read_text().split("$$$$\n")[0]
    lines = methane.splitlines()
    first_bond = 4 + 5  # header, counts line, five atom lines
    assert lines[first_bond].startswith("  2  1  1")
    query = "\n".join(lines[:first_bond] + ["  2  1  8  0"] + lines[first_bond + 1 :])  # type 8: any
    in_a_chain = "\n".join(lines[:first_bond] + ["  2  1  1  0  0  2"] + lines[first_bond + 1 :])  # topology
    path = tmp_path / "query.sdf"
    path.write_text(f"{query}\n$$$$\n{methane}$$$$\n{in_a_chain}\n$$$$\n")
    rows = _read(path)
    assert [m.status for m in rows] == [STATUS_ERROR, STATUS_OK, STATUS_OK]
    assert rows[0].message.endswith(
        "the bond between atoms 2 and 1 is a query bond (SD types 5-8 leave its order open): a pattern"
    )


def test_gzip_data_under_another_name_is_named_and_on_standard_input_is_read(tmp_path, samples):
    compressed = gzip.compress((samples / "qm9_sample.xyz").read_bytes())
    misnamed = tmp_path / "frames.xyz"
    misnamed.write_bytes(compressed)
    (row,) = _read(misnamed)
    assert row.status == STATUS_ERROR
    assert "gzip-compressed, although its name does not end in .gz" in row.message
    piped = io.BufferedReader(io.BytesIO(compressed))  # as standard input is
    rows = list(read_stream(piped, reader_of("x.xyz"), embed=False, seed=0))
    assert [m.name for m in rows] == [m.name for m in _read(samples / "qm9_sample.xyz")]
    assert all(m.ok for m in rows)


def test_an_sd_title_that_is_not_utf8_keeps_the_row_named(tmp_path, samples):
    methane = (samples / "qm9_sample.sdf").read_bytes().split(b"$$$$\n")[0]
    path = tmp_path / "latin1.sdf"
    path.write_bytes(b"\xc9thane" + methane[methane.index(b"\n") :] + b"$$$$\n")  # cp1252, as ChemDraw
    (row,) = _read(path)
    assert (row.name, row.status) == ("\ufffdthane", STATUS_OK)  # as SMILES and XYZ names are decoded


def test_smiles_file_header_comments_and_errors(tmp_path):
    path = tmp_path / "list.smiles"
    path.write_text("SMILES Name\n# a comment\n\nCCO\tethanol\nnot_a_smiles bad one\n[Na+].[Cl-] salt\n")
    rows = _read(path)
    assert [m.name for m in rows] == ["ethanol", "bad one", "salt"]
    assert [m.status for m in rows] == [STATUS_WARNING, STATUS_ERROR, STATUS_WARNING]
    assert rows[1].message.startswith("list.smiles record 2 (bad one): cannot parse SMILES")
    assert rows[2].formula == "ClNa"  # the ions side by side, not on top of each other
    assert np.linalg.norm(rows[2].positions[0] - rows[2].positions[1]) > 2.0


def test_an_xyz_or_binary_file_named_smi_gives_error_rows_not_predictions(tmp_path):
    """XYZ atom lines would read as the SMILES ``C`` named by its coordinates, binary bytes as stray
    atoms: each such line is an error row naming what it looks like."""
    path = tmp_path / "misnamed.smi"
    path.write_bytes(
        b"3\nwater\nO 0.0 0.0 0.0\nH 0.96 0.0 0.0\nC\t-0.01\t1.08\t0.008\t-0.53\nP\x00\x07\x1b junk\n"
        b"CCO ethanol\nCC(=O)O\t-0.31\t46.07\t20.23\n"  # a SMILES and three numbers: a table of properties
    )
    rows = _read(path)
    assert [m.status for m in rows] == [STATUS_ERROR] * 6 + [STATUS_WARNING] * 2
    assert all("as in an XYZ file" in m.message for m in rows[2:5])  # QM9's five columns too
    assert "binary data" in rows[5].message and rows[6].name == "ethanol"
    assert rows[7].name.split() == ["-0.31", "46.07", "20.23"] and rows[7].formula == "C2H4O2"


# ---------------------------------------------------------------------------------- robustness, inputs


@pytest.mark.parametrize("suffix", [".sdf", ".xyz", ".smi"])
def test_crlf_line_endings(tmp_path, suffix):
    source = {".sdf": "qm9_sample.sdf", ".xyz": "qm9_sample.xyz", ".smi": "drugs.smi"}[suffix]
    text = (SAMPLES / source).read_text()
    path = tmp_path / f"crlf{suffix}"
    path.write_bytes(text.replace("\n", "\r\n").encode())
    crlf, lf = _read(path), _read(SAMPLES / source)
    assert [m.name for m in crlf] == [m.name for m in lf]
    assert all(m.ok for m in crlf)
    for a, b in zip(crlf, lf, strict=True):
        np.testing.assert_allclose(a.positions, b.positions)


@pytest.mark.parametrize("suffix", SUPPORTED_SUFFIXES)
def test_empty_file_gives_one_error_row(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    path.write_bytes(gzip.compress(b"") if suffix.endswith(".gz") else b"")
    (row,) = _read(path)
    assert row.status == STATUS_ERROR
    assert row.message == f"empty{suffix} record 1: no molecules found"


@pytest.mark.parametrize("suffix", SUPPORTED_SUFFIXES)
def test_random_bytes_never_raise(tmp_path, suffix):
    path = tmp_path / f"noise{suffix}"
    path.write_bytes(random.Random(suffix).randbytes(20_000))
    rows = _read(path)
    assert rows
    _assert_well_formed(rows, path.name)


def test_check_inputs(tmp_path):
    good = tmp_path / "ok.SDF"  # suffixes are case-insensitive
    good.write_text(_molblock("O", "water"))
    check_inputs([good])
    for bad, words in [
        (tmp_path / "missing.sdf", "not found"),
        (tmp_path, "directory"),
        (tmp_path / "mol.pdb", "unsupported input format"),
    ]:
        if bad.suffix == ".pdb":
            bad.write_text("HETATM")
        with pytest.raises(InputError, match=words):
            check_inputs([good, bad])
        with pytest.raises(InputError):  # raised by the call itself, before any record
            read_molecules([good, bad])


def test_formula_is_hill_notation():
    def formula(numbers):
        n = len(numbers)
        return Molecule("m", "x", 0, np.array(numbers), np.zeros((n, 3)), {}, STATUS_OK).formula

    assert formula([8, 1, 1]) == "H2O"
    assert formula([6, 8, 6, 1, 1, 1, 1, 1, 1, 17]) == "C2H6ClO"
    assert formula([17, 11]) == "ClNa"
    assert formula([]) == ""


def test_close_pair_matches_brute_force():
    rng = np.random.default_rng(0)
    for n in (2, 3, 10, 200):
        for scale in (0.3, 3.0):
            pos = rng.uniform(0, scale * n ** (1 / 3), size=(n, 3))
            d = np.linalg.norm(pos[:, None] - pos[None], axis=-1) + np.eye(n) * 1e9
            found = close_pair(pos, 0.1)
            assert (found is not None) == bool((d < 0.1).any())
            if found is not None:
                i, j, dist = found
                assert dist == pytest.approx(d[i, j]) and dist < 0.1
    line = np.zeros((1000, 3))
    line[:, 0] = np.arange(1000) * 0.2  # Å
    assert close_pair(line, 0.1) is None


# ------------------------------------------------------------------------------------------- fuzzing


def _mutated(valid: bytes) -> st.SearchStrategy[bytes]:
    """Valid file content with a few byte-level and line-level edits."""
    byte_edit = st.tuples(st.integers(0, len(valid)), st.integers(0, 40), st.binary(max_size=40))
    byte_edits = st.lists(byte_edit, min_size=1, max_size=5)

    def apply(edits):
        data = valid
        for pos, cut, insert in edits:
            data = data[:pos] + insert + data[pos + cut :]
        return data

    lines = valid.splitlines(keepends=True)
    line_edit = st.tuples(st.integers(0, len(lines) - 1), st.sampled_from(["drop", "dup", "junk"]), st.text())

    def apply_lines(edits):
        out = list(lines)
        for i, kind, junk in edits:
            i = min(i, len(out) - 1)
            if kind == "drop":
                del out[i]
            elif kind == "dup":
                out.insert(i, out[i])
            else:
                out[i] = junk.encode() + b"\n"
        return b"".join(out)

    line_edits = st.lists(line_edit, min_size=1, max_size=5).map(apply_lines)
    return st.one_of(byte_edits.map(apply), line_edits)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


_VALID_XYZ = (SAMPLES / "qm9_sample.xyz").read_bytes()
_VALID_SDF = (SAMPLES / "qm9_sample.sdf").read_bytes()[:4000] + (SAMPLES / "bad.sdf").read_bytes()
_FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_FUZZ
@given(data=st.one_of(st.binary(max_size=3000), _mutated(_VALID_XYZ)))
def test_fuzz_xyz_reader(fuzz_dir, data):
    path = fuzz_dir / "fuzz.xyz"
    path.write_bytes(data)
    _assert_well_formed(_read(path), "fuzz.xyz")


@_FUZZ
@given(data=st.one_of(st.binary(max_size=3000), _mutated(_VALID_SDF)))
def test_fuzz_sdf_reader(fuzz_dir, data):
    path = fuzz_dir / "fuzz.sdf"
    path.write_bytes(data)
    _assert_well_formed(_read(path), "fuzz.sdf")


# ------------------------------------------------------------------------------------------- writers

TARGETS = ("homo", "gap")
UNITS = {"homo": "eV", "gap": "eV"}


def _rows_for_writing() -> tuple[list[Molecule], list[dict[str, float] | None]]:
    """QM9 molecules from SDF and XYZ, a SMILES error row without atoms, and matching predictions."""
    sdf = _read(SAMPLES / "qm9_sample.sdf")[:3]
    xyz = _read(SAMPLES / "qm9_sample.xyz")[3:5]
    error = next(read_molecules(smiles=["C1CC"]))
    rows = [*sdf, *xyz, error]
    predictions = [{"homo": -7.123456789012345 - i, "gap": 10.5 + i} for i in range(5)] + [None]
    predictions[1]["gap"] = math.nan
    return rows, predictions


def _write(path: Path) -> tuple[list[Molecule], list[dict[str, float] | None]]:
    rows, predictions = _rows_for_writing()
    with PredictionWriter(path, TARGETS, UNITS) as writer:
        for row, prediction in zip(rows, predictions, strict=True):
            writer.write(row, prediction)
    return rows, predictions


BASE_COLUMNS = ["name", "source", "record", "formula", "smiles", "status", "message"]


def _float32_text(value: float) -> str:
    """The shortest decimal that reads back as the float32 nearest to ``value``."""
    return str(np.float32(value))


def test_csv_round_trip(tmp_path):
    path = tmp_path / "out.csv"
    rows, predictions = _write(path)
    with path.open(newline="") as handle:
        table = list(csv.DictReader(handle))
    assert list(table[0]) == [*BASE_COLUMNS, "homo_eV", "gap_eV"]
    assert [r["name"] for r in table] == [m.name for m in rows]
    assert [r["formula"] for r in table] == [m.formula for m in rows]
    assert [r["record"] for r in table] == ["1", "2", "3", "4", "5", "1"]  # 1-based, as in the messages
    assert table[5]["message"].startswith("<smiles> record 1")
    for record, prediction in zip(table[:5], predictions[:5], strict=True):
        assert record["homo_eV"] == _float32_text(prediction["homo"])  # float32 precision, no noise
        assert np.float32(float(record["homo_eV"])) == np.float32(prediction["homo"])
    assert table[1]["gap_eV"] == ""  # NaN
    assert table[5]["status"] == "error" and table[5]["homo_eV"] == "" and "C1CC" in table[5]["message"]


def test_the_smiles_column(tmp_path):
    """SD records: from their bonds; XYZ frames: perceived from the atoms; the SMILES error row: empty."""
    path = tmp_path / "out.csv"
    rows, _ = _write(path)
    table = list(csv.DictReader(path.open(newline="")))
    by_name = {m.name: m for m in _read(SAMPLES / "qm9_sample.sdf")}
    for record in table[:5]:  # the same QM9 molecules, read from SDF or from XYZ
        assert record["smiles"] == Chem.CanonSmiles(by_name[record["name"]].properties["smiles"])
    assert [r["smiles"] for r in table[:5]] == ["C", "N", "O", "C#N", "NC(N)=O"]
    assert table[5]["smiles"] == ""


def test_smiles_input_keeps_its_smiles_and_odd_atoms_give_none():
    given = next(read_molecules(smiles=["OCC ethanol"]))
    assert given.smiles == "OCC" and smiles_of(given) == "OCC"  # as given, not canonicalised
    apart = np.arange(501 * 3, dtype=float).reshape(501, 3) * 2.0
    odd = [
        Molecule("large", "in.xyz", 0, np.ones(501, dtype=np.int64), apart, {}, STATUS_OK),  # over the cap
        Molecule("no radii", "in.xyz", 1, np.array([118, 118]), np.eye(2, 3) * 3, {}, STATUS_OK),
        Molecule("odd electrons", "in.xyz", 2, np.array([6, 1, 1, 1]), np.eye(4, 3), {}, STATUS_OK),
        Molecule("error", "in.xyz", 3, np.array([6]), np.full((1, 3), np.nan), {}, STATUS_ERROR),
    ]
    assert [smiles_of(m) for m in odd] == ["", "", "", ""]


def test_values_are_written_at_float32_precision(tmp_path):
    values = [float(np.float32(-6.123)), 1 / 3, 1.0e-7, -11778.5323, 1.0e20, 1.0e39, 2.0]
    path = tmp_path / "out.csv"
    quantities = tuple(f"v{i}" for i in range(len(values)))
    with PredictionWriter(path, quantities, {}) as writer:
        writer.write(_read(SAMPLES / "qm9_sample.sdf")[0], dict(zip(quantities, values, strict=True)))
    (row,) = csv.DictReader(path.open(newline=""))
    cells = [row[q] for q in quantities]
    assert cells == ["-6.123", "0.33333334", "1e-07", "-11778.532", "1e+20", "", "2.0"]  # 1e39: not a float32


def test_json_round_trip(tmp_path):
    path = tmp_path / "out.json"
    rows, predictions = _write(path)
    records = json.loads(path.read_text())
    assert [r["name"] for r in records] == [m.name for m in rows]
    assert list(records[0]) == [*BASE_COLUMNS, "homo_eV", "gap_eV"]  # flat, named like the CSV columns
    assert [r["record"] for r in records] == [1, 2, 3, 4, 5, 1]
    assert records[0]["homo_eV"] == float(_float32_text(predictions[0]["homo"]))
    assert json.dumps(records[0]["homo_eV"]) == _float32_text(predictions[0]["homo"])
    assert records[1]["gap_eV"] is None  # NaN -> null
    assert records[5]["homo_eV"] is None and records[5]["gap_eV"] is None and records[5]["status"] == "error"
    assert records[0]["smiles"] == "C" and records[5]["smiles"] == ""
    empty = tmp_path / "empty.json"
    PredictionWriter(empty, TARGETS, UNITS).close()
    assert json.loads(empty.read_text()) == []


def test_sdf_round_trip(tmp_path):
    path = tmp_path / "out.sdf"
    rows, predictions = _write(path)
    back = list(Chem.SDMolSupplier(str(path), removeHs=False))
    assert len(back) == 5  # the error row without atoms is skipped
    assert all(mol is not None for mol in back)  # XYZ molecules got bonds: they sanitize
    for mol, row, prediction in zip(back, rows, predictions, strict=False):
        assert mol.GetProp("_Name") == row.name
        assert mol.GetProp("homo_eV") == _float32_text(prediction["homo"])
        assert mol.GetProp("se3t_status") == "ok"
        assert [a.GetAtomicNum() for a in mol.GetAtoms()] == row.numbers.tolist()
        np.testing.assert_allclose(mol.GetConformer().GetPositions(), row.positions, atol=1e-4)
    assert back[0].GetProp("lumo_eV") == rows[0].properties["lumo_eV"]  # original tags kept
    assert back[0].GetProp("homo_eV_input") == rows[0].properties["homo_eV"]  # renamed: same name as a value
    assert not back[1].HasProp("gap_eV") and back[1].GetProp("gap_eV_input")  # NaN: no value, input kept
    assert Chem.MolToSmiles(Chem.RemoveHs(back[3])) == "C#N"


def test_sdf_output_of_bad_records(tmp_path):
    rows = list(read_molecules(str(SAMPLES / "bad.sdf")))  # a single path is accepted as well
    path = tmp_path / "bad_out.sdf"
    with PredictionWriter(path, TARGETS, UNITS) as writer:
        for row in rows:
            writer.write(row, {"homo": -6.5, "gap": 8.0})
    back = list(Chem.SDMolSupplier(str(path), sanitize=False, removeHs=False))
    assert [m.GetProp("_Name") for m in back] == [r.name for r in rows]
    assert [m.GetProp("se3t_status") for m in back] == ["error", "error", "warning", "ok"]
    assert back[0].GetNumBonds() == 0  # error rows keep their atoms, without bonds or predictions
    assert not back[0].HasProp("homo_eV") and back[3].GetProp("homo_eV") == "-6.5"
    assert back[2].GetProp("se3t_message") == rows[2].message


def test_writer_is_atomic(tmp_path):
    rows, predictions = _rows_for_writing()
    path = tmp_path / "out.csv"
    writer = PredictionWriter(path, TARGETS, UNITS)
    writer.write(rows[0], predictions[0])
    assert not path.exists()  # only the temporary file so far
    writer.abort()
    assert list(tmp_path.iterdir()) == []

    path.write_text("previous results\n")
    with pytest.raises(RuntimeError), PredictionWriter(path, TARGETS, UNITS) as writer:
        writer.write(rows[0], predictions[0])
        raise RuntimeError("interrupted")
    assert path.read_text() == "previous results\n"  # untouched
    assert list(tmp_path.iterdir()) == [path]

    with PredictionWriter(path, TARGETS, UNITS) as writer:
        writer.write(rows[0], predictions[0])
    assert path.read_text().startswith("name,source,record,formula,smiles,status,message,homo_eV,gap_eV\n")
    with pytest.raises(ValueError):
        writer.write(rows[0], predictions[0])
    assert list(tmp_path.iterdir()) == [path]


def test_unsupported_output_suffix(tmp_path):
    assert writer_formats() == (".csv", ".json", ".sdf")
    with pytest.raises(InputError, match="unsupported output format"):
        PredictionWriter(tmp_path / "out.xlsx", TARGETS, UNITS)
    with pytest.raises(InputError):
        PredictionWriter(tmp_path / "missing_dir" / "out.csv", TARGETS, UNITS)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- broken SDF records


def _sdf_record(name: str, smiles: str = "CO") -> str:
    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    AllChem.EmbedMolecule(mol, randomSeed=1)
    block = Chem.MolToMolBlock(mol)
    return name + block[block.index("\n") :] + "> <homo>\n-7.0\n\n$$$$\n"


def test_sdf_records_without_dollars_or_m_end_lose_no_other_record(tmp_path):
    """A record missing its $$$$ used to swallow the next one; one missing M  END the rest of the file."""
    no_dollars = _sdf_record("b").replace("$$$$\n", "")
    no_end = _sdf_record("c").replace("M  END\n", "")
    path = tmp_path / "broken.sdf"
    path.write_text(_sdf_record("a") + no_dollars + _sdf_record("d") + no_end + _sdf_record("e"))
    rows = _read(path)
    assert [m.index for m in rows] == [0, 1, 2, 3, 4]
    assert [m.name for m in rows if m.ok] == ["a", "b", "d", "e"]
    assert all(m.properties.get("homo") == "-7.0" for m in rows if m.ok)
    assert rows[3].status == STATUS_ERROR
    expected = "broken.sdf record 4 (c): cannot parse record (it has no 'M  END' line)"
    assert rows[3].message.startswith(expected)


def test_sdf_line_longer_than_the_limit_is_that_records_error(tmp_path):
    path = tmp_path / "long.sdf.gz"
    huge = "> <note>\n" + "x" * (MAX_LINE_CHARS + 10) + "\n\n$$$$\n"
    with gzip.open(path, "wt") as handle:
        handle.write(_sdf_record("a") + _sdf_record("b").replace("$$$$\n", huge) + _sdf_record("c"))
    rows = _read(path)
    assert [(m.name, m.status) for m in rows] == [
        ("a", STATUS_OK),
        ("long.sdf.gz#2", STATUS_ERROR),
        ("c", STATUS_OK),
    ]
    assert rows[1].message.endswith(f"a line longer than {MAX_LINE_CHARS} bytes")


def test_sdf_overlong_header_line_after_a_record_without_dollars_is_its_own_records_error(tmp_path):
    """A name (or program, or comment) line over the limit belongs to the record it heads: that record is
    the error, the one before it (which lacks its $$$$) and the ones after keep their rows."""
    long_name, long_program = "n" * (MAX_LINE_CHARS + 10), "p" * (MAX_LINE_CHARS + 10)
    no_dollars = _sdf_record("b").replace("$$$$\n", "")
    lines = _sdf_record("d").split("\n")
    with_long_program = "\n".join([lines[0], long_program, *lines[2:]])
    path = tmp_path / "names.sdf"
    path.write_text(_sdf_record("a") + no_dollars + _sdf_record(long_name) + no_dollars + with_long_program)
    rows = _read(path)
    assert [(m.name, m.status) for m in rows] == [
        ("a", STATUS_OK),
        ("b", STATUS_OK),
        ("names.sdf#3", STATUS_ERROR),
        ("b", STATUS_OK),
        ("names.sdf#5", STATUS_ERROR),
    ]
    assert rows[2].message == f"names.sdf record 3: a line longer than {MAX_LINE_CHARS} bytes"
    assert rows[4].message == f"names.sdf record 5: a line longer than {MAX_LINE_CHARS} bytes"


def test_sdf_data_values_that_look_like_counts_lines_do_not_split_a_record(tmp_path):
    """A data item ending in V3000 (or holding a V2000 block) is data, not the start of a new record."""
    path = tmp_path / "notes.sdf"
    note = _sdf_record("a").replace("$$$$\n", ">  <note>\nconverted from V3000\n\n$$$$\n")
    path.write_text(note + _sdf_record("b"))
    rows = _read(path)
    assert [(m.name, m.status) for m in rows] == [("a", STATUS_OK), ("b", STATUS_OK)]
    assert rows[0].properties["note"] == "converted from V3000" and rows[0].properties["homo"] == "-7.0"


def test_a_utf8_byte_order_mark_is_ignored(tmp_path):
    sdf, xyz = tmp_path / "bom.sdf", tmp_path / "bom.xyz"
    sdf.write_bytes(b"\xef\xbb\xbf" + _sdf_record("a").encode())
    xyz.write_bytes(b"\xef\xbb\xbf" + _xyz_frame("O H H", WATER, "water").encode())
    assert [(m.name, m.status) for m in _read(sdf)] == [("a", STATUS_OK)]
    assert [(m.name, m.status) for m in _read(xyz)] == [("water", STATUS_OK)]


def test_csv_text_cells_cannot_start_a_spreadsheet_formula(tmp_path):
    """Names such as '=HYPERLINK(...)' are written with a leading quote in CSV (OWASP), exact in JSON."""
    names = ["=cmd|' /C calc'!A0", "+1", "-x", "@SUM(A1)", "\tTab", "ok-name"]
    rows = [
        Molecule(name, "in.sdf", i, np.array([6]), np.zeros((1, 3)), {}, STATUS_OK)
        for i, name in enumerate(names)
    ]
    out_csv, out_json = tmp_path / "p.csv", tmp_path / "p.json"
    for path in (out_csv, out_json):
        with PredictionWriter(path, TARGETS, UNITS) as writer:
            for molecule in rows:
                writer.write(molecule, {t: -1.5 for t in TARGETS})
    written = list(csv.DictReader(out_csv.open()))
    assert [r["name"] for r in written] == ["'" + n for n in names[:5]] + ["ok-name"]
    assert all(r["homo_eV"] == "-1.5" for r in written)  # numbers stay numbers
    assert [r["name"] for r in json.loads(out_json.read_text())] == names


# QM9's own format: "gdb N" and 15 properties, a charge column, Mathematica exponents, three trailing lines
def _qm9_header(index: int, properties: str) -> str:
    return f"gdb {index}\t" + "\t".join(properties.split()) + "\t"


METHANE_PROPERTIES = "157.7118 157.70997 157.70699 0. 13.21 -0.3877 0.1171 0.5048 35.3641 0.044749 -40.47893 "
METHANE_PROPERTIES += "-40.476062 -40.475117 -40.498597 6.469"
WATER_PROPERTIES = (
    "799.58812 437.90386 282.94545 1.8511 6.31 -0.2928 0.0687 0.3615 19.0002 0.021375 -76.404702 "
)
WATER_PROPERTIES += "-76.401867 -76.400922 -76.422349 6.002"
QM9_METHANE = f"""5
{_qm9_header(1, METHANE_PROPERTIES)}
C\t-0.0126981359\t 1.0858041578\t 0.0080009958\t-0.535689
H\t 0.002150416\t-0.0060313176\t 1.9761204*^-3\t 0.133921
H\t 1.0117308433\t 1.4637511618\t 0.0002765748\t 0.133922
H\t-0.540815069\t 1.4475266138\t-0.8766437152\t 0.133923
H\t-0.5238136345\t 1.4379326443\t 0.9063972942\t 0.133923
1341.307\t1341.3284\t1341.365\t1562.6731\t1562.7453\t3038.3205\t3151.6034\t3151.6788\t3151.7078
C\tC\t
InChI=1S/CH4/h1H4\tInChI=1S/CH4/h1H4
"""
QM9_WATER = f"""3
{_qm9_header(3, WATER_PROPERTIES)}
O\t-0.0343604951\t 0.9775395708\t 0.0076015923\t-0.589706
H\t 0.0647664923\t 0.0205721989\t 0.0015346341\t 0.294853
H\t 0.8717903737\t 1.3007924048\t 0.0006931336\t 0.294853
1591.0326\t3710.5696\t3814.1582
O\tO\t
InChI=1S/H2O/h1H2\tInChI=1S/H2O/h1H2
"""


def test_qm9_raw_files_are_read_with_their_labels(tmp_path: Path) -> None:
    from se3tcli.data.labels import label_value
    from se3tcli.targets import HARTREE_TO_EV

    path = tmp_path / "dsgdb9nsd.xyz"
    broken = "4" + QM9_WATER[1:]  # declares 4 atoms, has 3: one error row
    path.write_text(QM9_METHANE + QM9_WATER + broken + "2\nH2\nH 0 0 0\nH 0 0 0.74\n")
    rows = list(read_molecules([path]))
    assert [(m.name, m.status) for m in rows[:2]] == [("gdb_1", "ok"), ("gdb_3", "ok")]
    assert rows[2].status == "error" and "declares 4 atoms but has 3" in rows[2].message
    assert rows[-1].name == "H2" and rows[-1].ok  # reading recovers after the broken frame
    methane = rows[0]
    assert methane.formula == "CH4" and methane.positions[1, 2] == pytest.approx(1.9761204e-3)
    assert label_value(methane.properties, "homo") == pytest.approx(-0.3877 * HARTREE_TO_EV)
    assert label_value(methane.properties, "U0") == pytest.approx(-40.47893 * HARTREE_TO_EV)
    assert label_value(rows[1].properties, "mu") == pytest.approx(1.8511)
    assert label_value(rows[1].properties, "Cv") == pytest.approx(6.002)
    assert label_value(rows[1].properties, "alpha") == pytest.approx(6.31)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("4" + QM9_METHANE[1:] + QM9_WATER, [("error", "declares 4 atoms but has 5"), ("ok", "gdb_3")]),
        ("6" + QM9_METHANE[1:] + QM9_WATER, [("error", "declares 6 atoms but has 5"), ("ok", "gdb_3")]),
        # trailing lines missing before the next frame, or at the end
        ("".join(QM9_METHANE.splitlines(True)[:-3]) + QM9_WATER, [("ok", "gdb_1"), ("ok", "gdb_3")]),
        (
            "".join(QM9_METHANE.splitlines(True)[:-3]) + "2\nH2\nH 0 0 0\nH 0 0 0.74\n",
            [("ok", "gdb_1"), ("ok", "H2")],
        ),
        (QM9_WATER + "".join(QM9_METHANE.splitlines(True)[:-2]), [("ok", "gdb_3"), ("ok", "gdb_1")]),
        ((QM9_METHANE + QM9_WATER).replace("\n", "\r\n"), [("ok", "gdb_1"), ("ok", "gdb_3")]),
        # atomic numbers for the symbols, as in plain XYZ
        (
            QM9_METHANE.replace("\nC\t", "\n6\t").replace("\nH\t", "\n1\t") + QM9_WATER,
            [("ok", "gdb_1"), ("ok", "gdb_3")],
        ),
    ],
)
def test_broken_qm9_frames_are_one_row_and_never_lose_the_next(tmp_path: Path, text: str, expected) -> None:
    path = tmp_path / "qm9.xyz"
    path.write_bytes(text.encode())
    rows = list(read_molecules([path]))
    assert len(rows) == len(expected)
    for row, (status, what) in zip(rows, expected, strict=True):
        assert row.status == status and (what in row.message if status == "error" else row.name == what)
