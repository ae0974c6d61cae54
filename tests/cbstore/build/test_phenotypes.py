"""Tests of the packaged phenotype definitions and their loader."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from cbstore.build.phenotypes import (
    PhenotypeDefinitionError,
    derive_definitions,
    load_phenotypes,
    render_definitions_yaml,
)

SHARED = Path("/work/shared/data/phenotypes")
CCS = SHARED / "hcup_ccs_2015_definitions.yaml"
MIXED = SHARED / "icd_9_10_definitions_2.yaml"
needs_sources = pytest.mark.skipif(not (CCS.exists() and MIXED.exists()),
                                   reason="public phenotype fact files not present")


@pytest.fixture(scope="module")
def ph():
    return load_phenotypes()


def test_packaged_definitions_shape(ph):
    assert len(ph.names) == 25
    assert ph.types.count("acute") == 15 and ph.types.count("chronic") == 10
    assert ph.names[0] == "Septicemia (except in labor)" and ph.ids[0] == 2
    assert ph.names[-1] == "Shock" and ph.ids[-1] == 249
    assert len(ph.sha256) == 64


def test_code_table_has_unique_version_tagged_codes(ph):
    table = ph.code_table()
    assert list(table.columns) == ["phenotype", "name", "icd_code", "icd_version"]
    assert set(table["icd_version"]) == {9, 10}
    assert not table.duplicated(["phenotype", "icd_code", "icd_version"]).any()
    assert table["icd_code"].str.fullmatch(r"[A-Z0-9]+").all()
    # within one group a code is never tagged with both versions
    per_group = table.groupby(["phenotype", "icd_code"])["icd_version"].nunique()
    assert (per_group == 1).all()


@pytest.mark.parametrize("code,group,version", [
    ("V420", "Chronic kidney disease", 9),
    ("V9001", "Complications of surgical procedures or medical care", 9),
    ("E870", "Fluid and electrolyte disorders", 10),
    ("4019", "Essential hypertension", 9),
    ("I10", "Essential hypertension", 10),
])
def test_codes_valid_in_both_versions_carry_only_the_rule_version(ph, code, group, version):
    table = ph.code_table()
    rows = table[table["icd_code"] == code]
    assert rows["name"].tolist() == [group]
    assert rows["icd_version"].tolist() == [version]


def test_label_matrix_matches_on_code_and_version(ph):
    ckd = ph.names.index("Chronic kidney disease")
    fluid = ph.names.index("Fluid and electrolyte disorders")
    htn = ph.names.index("Essential hypertension")
    dx = pd.DataFrame({
        "hadm_id": [1, 2, 3, 3, 4],
        "icd_code": ["V420", "V420", "E870", "I10", "401.9"],
        "icd_version": [9, 10, 9, 10, 9],
    })
    labels = ph.label_matrix(dx, [1, 2, 3, 4, 5])
    assert labels.dtype == np.int8 and labels.shape == (5, 25)
    assert labels[0, ckd] == 1 and labels[0].sum() == 1
    assert labels[1].sum() == 0          # V420 as ICD-10 is a transport-accident code
    assert labels[2, fluid] == 0 and labels[2, htn] == 1 and labels[2].sum() == 1
    assert labels[3, htn] == 1           # dotted code is normalised
    assert labels[4].sum() == 0          # admission without rows


@needs_sources
def test_shipped_file_equals_derivation_from_sources(ph):
    derived = derive_definitions(CCS, MIXED)
    shipped = yaml.safe_load(Path(ph.path).read_text())
    assert shipped == derived
    ccs = yaml.safe_load(CCS.read_text())
    mixed = yaml.safe_load(MIXED.read_text())
    for entry in derived["phenotypes"]:
        assert set(entry["icd9"]) == set(ccs[entry["name"]]["codes"])
        assert set(entry["icd9"]) | set(entry["icd10"]) == set(mixed[entry["name"]]["codes"])
        assert not set(entry["icd9"]) & set(entry["icd10"])


def test_derive_definitions_rule_and_disagreement(tmp_path):
    ccs = {"A": {"use_in_benchmark": True, "type": "acute", "id": 7, "codes": ["V420", "4019", "4019"]},
           "B": {"use_in_benchmark": False, "type": "unknown", "id": 8, "codes": ["1"]}}
    mixed = {"A": {"use_in_benchmark": True, "type": "acute", "id": 7,
                   "codes": ["V420", "4019", "I10", "I10", "I16.9"]},
             "B": {"use_in_benchmark": False, "type": "unknown", "id": 8, "codes": ["1"]}}
    (tmp_path / "ccs.yaml").write_text(yaml.safe_dump(ccs))
    (tmp_path / "mixed.yaml").write_text(yaml.safe_dump(mixed))
    d = derive_definitions(tmp_path / "ccs.yaml", tmp_path / "mixed.yaml")
    assert d == {"phenotypes": [{"name": "A", "id": 7, "type": "acute",
                                 "icd9": ["4019", "V420"], "icd10": ["I10", "I169"]}]}
    out = tmp_path / "out.yaml"
    out.write_text(render_definitions_yaml(d, header="test header"))
    assert out.read_text().startswith("# test header\n")
    loaded = load_phenotypes(out)
    assert loaded.names == ["A"] and loaded.icd9 == [("4019", "V420")]

    mixed["A"]["type"] = "chronic"
    (tmp_path / "mixed.yaml").write_text(yaml.safe_dump(mixed))
    with pytest.raises(PhenotypeDefinitionError, match=r"group 'A': type is 'acute'.*'chronic'"):
        derive_definitions(tmp_path / "ccs.yaml", tmp_path / "mixed.yaml")


@pytest.mark.parametrize("entry,message", [
    ({"name": "X", "id": 1, "type": "acute", "icd9": ["4019", "4019"], "icd10": []},
     r"phenotypes\[0\] \('X'\): duplicate icd9 code\(s\) \['4019'\]"),
    ({"name": "X", "id": 1, "type": "sometimes", "icd9": [], "icd10": []}, r"'type' must be one of"),
    ({"name": "X", "id": 1, "type": "acute", "icd9": [4019], "icd10": []}, r"icd9 code 4019 must be a quoted"),
    ({"name": "X", "id": 1, "type": "acute", "icd9": [], "icd10": ["I10.0"]}, r"icd10 code 'I10.0'"),
    ({"name": "X", "type": "acute", "icd9": [], "icd10": []}, r"\('X'\): missing key\(s\) \['id'\]"),
    ({"name": "", "id": 1, "type": "acute", "icd9": [], "icd10": []}, r"'name' must be a non-empty"),
])
def test_load_rejects_malformed_entries(tmp_path, entry, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"phenotypes": [entry]}))
    with pytest.raises(PhenotypeDefinitionError, match=message) as info:
        load_phenotypes(path)
    assert str(path) in str(info.value)


def test_load_rejects_non_mapping_and_bad_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("- just a list\n")
    with pytest.raises(PhenotypeDefinitionError, match="expected a mapping with a list 'phenotypes'"):
        load_phenotypes(path)
    path.write_text("phenotypes: [\n")
    with pytest.raises(PhenotypeDefinitionError, match="not valid YAML"):
        load_phenotypes(path)
