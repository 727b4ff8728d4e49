"""CSV tables of SMILES (``.csv`` input) and comma-separated SMILES lines."""

from __future__ import annotations

import csv

import pytest

from se3tcli.data.dataset import read_labelled_file
from se3tcli.data.labels import is_own_prediction, label_value
from se3tcli.io import STATUS_ERROR, STATUS_WARNING, read_molecules
from se3tcli.io.csv_layout import BASE_COLUMNS, inert_text
from se3tcli.targets import STATUS_TAG


def _read(path):
    return list(read_molecules([path], seed=3))


def test_a_table_gives_names_labels_and_error_rows(tmp_path):
    path = tmp_path / "screen.csv"
    path.write_text(
        "ID,Canonical_SMILES,homo [eV],note\n"
        "m1,CCO,-7.1,fine\n"
        ",,,\n"  # a spreadsheet's empty row
        "m2,not_a_smiles,-6.0,\n"
        "m3,,-5.0,no structure\n"
        "m4,c1ccccc1O,-6.3\n"  # a short row
    )
    rows = _read(path)
    assert [m.name for m in rows] == ["m1", "m2", "m3", "m4"]
    assert [m.status for m in rows] == [STATUS_WARNING, STATUS_ERROR, STATUS_ERROR, STATUS_WARNING]
    assert rows[0].smiles == "CCO" and rows[0].formula == "C2H6O"
    assert rows[0].properties == {"homo [eV]": "-7.1", "note": "fine", "smiles": "CCO"}
    assert label_value(rows[0].properties, "homo") == pytest.approx(-7.1)
    assert rows[1].message.startswith("screen.csv record 2 (m2): cannot parse SMILES 'not_a_smiles'")
    assert rows[2].message == "screen.csv record 3 (m3): no SMILES in column 2"
    assert rows[3].properties == {"homo [eV]": "-6.3", "smiles": "c1ccccc1O"}


def test_semicolons_quotes_and_a_table_without_header(tmp_path):
    european = tmp_path / "eu.csv"
    european.write_text('smiles;name;gap\nClCCCl;"1,2-dichloroethane";7,2\n')
    (row,) = _read(european)
    assert (row.name, row.formula, row.properties["gap"]) == ("1,2-dichloroethane", "C2H4Cl2", "7,2")
    bare = tmp_path / "bare.csv"
    bare.write_text("CCO,ethanol\nCC(=O)O,acetic acid,extra\nN\n")
    assert [(m.name, m.formula) for m in _read(bare)] == [("ethanol", "C2H6O"), ("acetic acid", "C2H4O2"),
                                                          ("N", "H3N")]  # fmt: skip


def test_a_table_without_a_smiles_column_is_one_error_row(tmp_path):
    path = tmp_path / "coords.csv"
    path.write_text("name,x,y,z\nwater,0,0,0\n")
    (row,) = _read(path)
    assert row.status == STATUS_ERROR
    assert row.message == (
        "coords.csv record 1: no SMILES column: no header names one 'smiles', and the first cells are no "
        "SMILES either"
    )


def test_quoted_line_breaks_long_cells_and_a_cell_with_its_name(tmp_path):
    path = tmp_path / "notes.csv"
    huge = "C" * 200_000  # over the csv module's cell limit (131,072), within se3t's line limit
    path.write_text(
        'smiles,name,note\nCCO,ethanol,"two\n\nlines"\n'
        f'{huge},big\nCC,ethane\nCCC propane\nN,ammonia,"never closed\n'
    )
    rows = _read(path)
    assert [m.name for m in rows] == ["ethanol", "notes.csv#2", "ethane", "propane", "ammonia"]
    assert rows[0].properties["note"] == "two\n\nlines"
    assert rows[1].message.startswith("notes.csv record 2: cannot split the line into cells: field larger")
    assert (rows[3].smiles, rows[3].formula) == ("CCC", "C3H8")  # a .smi line in one cell
    assert rows[4].properties["note"] == "never closed"  # read as ending with its line


def test_an_unclosed_quote_loses_no_record_and_a_name_keeps_one_line(tmp_path):
    path = tmp_path / "typo.csv"
    path.write_text('smiles,name\nCCO,"ethanol\n(absolute)"\nCC,"ethane\nCCC,propane\nCCCC,butane\n')
    assert [m.name for m in _read(path)] == ["ethanol (absolute)", "ethane", "propane", "butane"]


def test_header_spellings_and_delimiters(tmp_path):
    pubchem = tmp_path / "pubchem.csv"
    pubchem.write_text("cid,cmpdname,canonicalsmiles,isosmiles\n702,ethanol,CCO,OCC\n")
    (row,) = _read(pubchem)
    assert (row.name, row.smiles, row.properties["canonicalsmiles"]) == ("ethanol", "OCC", "CCO")
    spaced = tmp_path / "spaced.csv"
    spaced.write_text("# exported 2026-12-01\nCompound ID;SMILES;gap (eV, B3LYP, def2)\nx1;CCO;7,1\n")
    (row,) = _read(spaced)  # as many commas as semicolons: the semicolon names a SMILES column
    assert (row.name, row.smiles, row.properties["gap (eV, B3LYP, def2)"]) == ("x1", "CCO", "7,1")
    nitrogen = tmp_path / "n.csv"  # a header with a name column, whose first cell is a SMILES
    nitrogen.write_text("N,name\nCCO,ethanol\n")
    assert [m.name for m in _read(nitrogen)] == ["ethanol"]
    bace = tmp_path / "bace.csv"  # MoleculeNet's BACE: the SMILES under "mol"
    bace.write_text("mol,CID,Class,pIC50\nCCO,BACE_1,1,9.15\n")
    (row,) = _read(bace)
    assert (row.name, row.smiles, row.properties["pIC50"]) == ("BACE_1", "CCO", "9.15")
    flags = tmp_path / "flags.csv"  # no SMILES header: the largest SMILES of the next line, not the flag
    flags.write_text("name,active,drug\naspirin,N,CC(=O)Oc1ccccc1C(=O)O\n")
    (row,) = _read(flags)
    assert (row.name, row.formula, row.properties["active"]) == ("aspirin", "C9H8O4", "N")
    commented = tmp_path / "hash.csv"  # a header that starts with '#' is no comment
    commented.write_text("#,SMILES,Name\n1,CCO,ethanol\n")
    assert [m.name for m in _read(commented)] == ["ethanol"]
    wrong_first = tmp_path / "w.csv"
    wrong_first.write_text("C1CC,bad\nCCO,smiles_1\n")
    assert [(m.name, m.status) for m in _read(wrong_first)] == [
        ("bad", STATUS_ERROR),
        ("smiles_1", STATUS_WARNING),
    ]
    utf16 = tmp_path / "excel.csv"
    utf16.write_bytes("smiles\tname\nCCO\tethanol\n".encode("utf-16"))
    (row,) = _read(utf16)
    assert row.message.endswith("UTF-16 text (Excel's 'Unicode text'), not UTF-8: save it as CSV UTF-8")


def test_se3ts_own_csv_output_reads_back_with_its_predictions_marked(tmp_path):
    path = tmp_path / "predictions.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*BASE_COLUMNS, "homo_eV"])
        writer.writerow([inert_text("=evil"), "in.smi", 1, "C2H6O", "CCO", "warning", "a message", -7.2])
        writer.writerow(["broken", "in.smi", 2, "", "", "error", "in.smi record 2: cannot parse", ""])
    first, second = _read(path)
    assert first.name == "=evil"  # the ' that kept a spreadsheet from running it is gone
    assert first.properties == {"homo_eV": "-7.2", STATUS_TAG: "warning", "smiles": "CCO"}
    assert is_own_prediction(first.properties, "homo")
    assert second.status == STATUS_ERROR and second.name == "broken"


def test_a_smiles_file_or_argument_may_separate_the_name_with_a_comma(tmp_path):
    path = tmp_path / "list.smi"
    path.write_text('smiles,name\nCCO,ethanol\nClCCCl,"1,2-dichloroethane"\nC1CC1 cyclopropane\n')
    assert [(m.name, m.smiles) for m in _read(path)] == [
        ("ethanol", "CCO"), ("1,2-dichloroethane", "ClCCCl"), ("cyclopropane", "C1CC1")
    ]  # fmt: skip
    given, radical, nameless = read_molecules(smiles=["c1ccccc1, benzene", "CC |^1:0|,ethyl", ",x"])
    assert (given.name, given.smiles, given.status) == ("benzene", "c1ccccc1", STATUS_WARNING)
    assert (radical.name, radical.smiles) == ("ethyl", "CC |^1:0|")
    assert nameless.message == "<smiles> record 3 (x): no SMILES before the name"


def test_a_table_of_smiles_and_labels_trains(tmp_path):
    path = tmp_path / "labelled.csv"
    path.write_text("smiles,name,homo_eV\nC,methane,-10.9\nCO,methanol,-7.1\nCC,ethane,-8.7\nN,ammonia,\n")
    data = read_labelled_file(path, ["homo"])
    assert data.targets[:, 0].tolist() == pytest.approx([-10.9, -7.1, -8.7])  # ammonia has no label
    assert data.index.tolist() == [1, 2, 3]
