"""Tests of the synthetic MIMIC-shaped source (``cbstore synth``)."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from cbstore.build.phenotypes import load_phenotypes
from cbstore.synth import SynthError, write_synthetic_source
from cbstore.synth._chunks import default_chunk_stays, patient_chunks
from cbstore.synth._draws import STREAMS, UnitDraws
from cbstore.synth._io import GzipCsvWriter
from cbstore.synth.ehr import variable_itemids
from cbstore.synth.images import render_films
from cli.synth_cmd import synth

# Column headers, in order, from the MIMIC schema reference (MIMIC-IV v2.2, MIMIC-CXR-JPG 2.0.0).
EXPECTED_HEADERS = {
    "mimic-iv/hosp/patients.csv.gz":
        "subject_id, gender, anchor_age, anchor_year, anchor_year_group, dod",
    "mimic-iv/hosp/admissions.csv.gz":
        "subject_id, hadm_id, admittime, dischtime, deathtime, admission_type, admit_provider_id, "
        "admission_location, discharge_location, insurance, language, marital_status, race, edregtime, "
        "edouttime, hospital_expire_flag",
    "mimic-iv/hosp/diagnoses_icd.csv.gz": "subject_id, hadm_id, seq_num, icd_code, icd_version",
    "mimic-iv/hosp/labevents.csv.gz":
        "labevent_id, subject_id, hadm_id, specimen_id, itemid, order_provider_id, charttime, storetime, "
        "value, valuenum, valueuom, ref_range_lower, ref_range_upper, flag, priority, comments",
    "mimic-iv/hosp/d_labitems.csv.gz": "itemid, label, fluid, category",
    "mimic-iv/icu/icustays.csv.gz":
        "subject_id, hadm_id, stay_id, first_careunit, last_careunit, intime, outtime, los",
    "mimic-iv/icu/chartevents.csv.gz":
        "subject_id, hadm_id, stay_id, caregiver_id, charttime, storetime, itemid, value, valuenum, "
        "valueuom, warning",
    "mimic-iv/icu/d_items.csv.gz":
        "itemid, label, abbreviation, linksto, category, unitname, param_type, lownormalvalue, highnormalvalue",
    "mimic-iv/icu/outputevents.csv.gz":
        "subject_id, hadm_id, stay_id, caregiver_id, charttime, storetime, itemid, value, valueuom",
    "mimic-cxr-jpg/mimic-cxr-2.0.0-metadata.csv.gz":
        "dicom_id, subject_id, study_id, PerformedProcedureStepDescription, ViewPosition, Rows, Columns, "
        "StudyDate, StudyTime, ProcedureCodeSequence_CodeMeaning, ViewCodeSequence_CodeMeaning, "
        "PatientOrientationCodeSequence_CodeMeaning",
    "mimic-cxr-jpg/mimic-cxr-2.0.0-split.csv.gz": "dicom_id, study_id, subject_id, split",
    "mimic-cxr-jpg/mimic-cxr-2.0.0-chexpert.csv.gz":
        "subject_id, study_id, Atelectasis, Cardiomegaly, Consolidation, Edema, Enlarged Cardiomediastinum, "
        "Fracture, Lung Lesion, Lung Opacity, No Finding, Pleural Effusion, Pleural Other, Pneumonia, "
        "Pneumothorax, Support Devices",
}
DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}$")
DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def read(root: Path, rel: str) -> pd.DataFrame:
    return pd.read_csv(root / rel, dtype=str, keep_default_na=False)


def parse_study_times(date: pd.Series, time: pd.Series) -> pd.Series:
    """StudyDate + StudyTime -> datetime, left-padding the integer part of StudyTime to 6 digits."""
    parts = time.str.partition(".")
    whole, frac = parts[0], parts[2]
    clock = whole.str.zfill(6)
    stamp = date + " " + clock.str[:2] + ":" + clock.str[2:4] + ":" + clock.str[4:6] + "." + frac.str.ljust(3, "0")
    return pd.to_datetime(stamp, format="%Y%m%d %H:%M:%S.%f")


def file_digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth_small")
    summary = write_synthetic_source(out, n_stays=60, seed=7, image_size=32)
    return out, summary


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    """2000 stays without JPEGs: enough for rare quirks and the eligible share."""
    out = tmp_path_factory.mktemp("synth_large")
    summary = write_synthetic_source(out, n_stays=2000, seed=11, images=False)
    return out, summary, json.loads((out / "truth.json").read_text())


# ------------------------------------------------------------------------------------------------
# file format
# ------------------------------------------------------------------------------------------------

def test_every_table_has_the_mimic_header_in_order(small):
    out, _ = small
    for rel, expected in EXPECTED_HEADERS.items():
        with gzip.open(out / rel, "rt", encoding="utf-8", newline="") as fh:
            header = next(csv.reader(fh))
        assert header == expected.split(", "), rel
    written = {str(p.relative_to(out)) for p in out.rglob("*.csv.gz")}
    assert written == set(EXPECTED_HEADERS)


def test_fields_are_quoted_and_null_is_an_empty_unquoted_field(small):
    out, _ = small
    with gzip.open(out / "mimic-iv/hosp/admissions.csv.gz", "rt", encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    assert lines[0].startswith('"subject_id","hadm_id","admittime"')
    survivor = next(ln for ln in lines[1:] if ',"0"' in ln[-4:])
    fields = next(csv.reader(io.StringIO(survivor)))
    assert fields[4] == "" and ',,' in survivor          # deathtime NULL: nothing between the commas
    assert all(part.startswith('"') for part in survivor.split(",") if part)


def test_gzip_header_is_deterministic(small):
    out, _ = small
    raw = (out / "mimic-iv/icu/icustays.csv.gz").read_bytes()
    assert raw[:2] == b"\x1f\x8b" and raw[4:8] == b"\x00\x00\x00\x00"   # mtime 0
    assert raw[3] & 0x08 == 0                                             # no file name stored


def test_datetime_date_and_los_formats(small):
    out, _ = small
    adm = read(out, "mimic-iv/hosp/admissions.csv.gz")
    for col in ("admittime", "dischtime"):
        assert adm[col].str.match(DATETIME).all()
    for col in ("deathtime", "edregtime", "edouttime"):
        values = adm[col][adm[col] != ""]
        assert values.str.match(DATETIME).all()
    pat = read(out, "mimic-iv/hosp/patients.csv.gz")
    dod = pat["dod"][pat["dod"] != ""]
    assert len(dod) > 0 and dod.str.match(DATE).all()
    stays = read(out, "mimic-iv/icu/icustays.csv.gz")
    assert stays["intime"].str.match(DATETIME).all() and stays["outtime"].str.match(DATETIME).all()
    los = stays["los"].astype(float)
    span = (pd.to_datetime(stays["outtime"]) - pd.to_datetime(stays["intime"])).dt.total_seconds() / 86400
    np.testing.assert_allclose(los, span, rtol=0, atol=1e-12)
    assert (stays["los"].str.replace(".", "", regex=False).str.lstrip("0").str.len() >= 15).mean() > 0.9
    years = pd.to_datetime(stays["intime"]).dt.year
    assert years.between(2110, 2210).all()
    chart = read(out, "mimic-iv/icu/chartevents.csv.gz")
    assert chart["charttime"].str.match(DATETIME).all()


def test_study_date_and_unpadded_study_time(small):
    out, _ = small
    meta = read(out, "mimic-cxr-jpg/mimic-cxr-2.0.0-metadata.csv.gz")
    assert meta["StudyDate"].str.fullmatch(r"2\d{7}").all()
    assert meta["StudyTime"].str.fullmatch(r"[1-9]\d{0,5}\.\d{1,3}|0\.\d{1,3}").all()   # never zero-padded
    times = parse_study_times(meta["StudyDate"], meta["StudyTime"])
    assert times.notna().all()
    # the parser's own example: 07:15:02.25 is written 71502.25
    example = parse_study_times(pd.Series(["21500312"]), pd.Series(["71502.25"]))[0]
    assert example == pd.Timestamp("2150-03-12 07:15:02.250")
    assert (meta["StudyTime"].str.partition(".")[0].str.len() < 6).any()


def test_dictionaries_cover_the_variables_file(small):
    out, _ = small
    ids = variable_itemids()
    d_items = read(out, "mimic-iv/icu/d_items.csv.gz")
    d_lab = read(out, "mimic-iv/hosp/d_labitems.csv.gz")
    item_ids = set(d_items["itemid"].astype(int))
    assert set(ids["chartevents"]) | set(ids["outputevents"]) <= item_ids
    assert set(ids["labevents"]) <= set(d_lab["itemid"].astype(int))
    assert len(item_ids - set(ids["chartevents"]) - set(ids["outputevents"])) >= 3   # unrelated items too
    assert len(set(d_lab["itemid"].astype(int)) - set(ids["labevents"])) >= 3
    links = d_items.set_index(d_items["itemid"].astype(int))["linksto"]
    assert (links.loc[ids["outputevents"]] == "outputevents").all()
    assert (links.loc[ids["chartevents"]] == "chartevents").all()


def test_images_are_grayscale_jpegs_at_the_metadata_paths(small):
    out, summary = small
    meta = read(out, "mimic-cxr-jpg/mimic-cxr-2.0.0-metadata.csv.gz")
    assert summary.images_written and summary.n_images == len(meta)
    jpgs = sorted((out / "mimic-cxr-jpg/files").rglob("*.jpg"))
    assert len(jpgs) == len(meta)
    for row in meta.sample(10, random_state=0).itertuples():
        path = (out / "mimic-cxr-jpg/files" / f"p{row.subject_id[:2]}" / f"p{row.subject_id}"
                / f"s{row.study_id}" / f"{row.dicom_id}.jpg")
        with Image.open(path) as im:
            assert im.format == "JPEG" and im.mode == "L"
            assert im.size == (int(row.Columns), int(row.Rows))
    shapes = set(zip(meta["Rows"], meta["Columns"]))
    assert ("32", "32") in shapes and len(shapes) > 1          # some films are not square


def test_explicit_non_square_image_size(tmp_path):
    write_synthetic_source(tmp_path, n_stays=8, seed=2, image_size=(40, 24))
    meta = read(tmp_path, "mimic-cxr-jpg/mimic-cxr-2.0.0-metadata.csv.gz")
    assert set(meta["Rows"]) == {"40"} and set(meta["Columns"]) == {"24"}
    with Image.open(next((tmp_path / "mimic-cxr-jpg/files").rglob("*.jpg"))) as im:
        assert im.size == (24, 40)


def test_markers_say_synthetic_and_truth_is_outside_the_sources(small):
    out, _ = small
    for root, version in (("mimic-iv", "2.2"), ("mimic-cxr-jpg", "2.0.0")):
        marker = json.loads((out / root / "cbstore_synthetic.json").read_text())
        assert marker["synthetic"] is True and marker["version"] == version
        assert "SYNTHETIC" in (out / root / "SYNTHETIC.txt").read_text()
        assert not list((out / root).rglob("truth.json"))
    assert (out / "truth.json").is_file()


# ------------------------------------------------------------------------------------------------
# determinism
# ------------------------------------------------------------------------------------------------

def test_same_seed_same_bytes_other_seed_differs(small, tmp_path):
    out, _ = small
    again = tmp_path / "again"
    write_synthetic_source(again, n_stays=60, seed=7, image_size=32)
    assert file_digests(again) == file_digests(out)
    other = tmp_path / "other"
    write_synthetic_source(other, n_stays=60, seed=8, image_size=32)
    a, b = file_digests(out), file_digests(other)
    for rel in ("mimic-iv/icu/chartevents.csv.gz", "mimic-iv/hosp/admissions.csv.gz", "truth.json"):
        assert a[rel] != b[rel]


def test_tables_do_not_depend_on_writing_images(small, tmp_path):
    out, _ = small
    write_synthetic_source(tmp_path, n_stays=60, seed=7, image_size=32, images=False)
    a, b = file_digests(out), file_digests(tmp_path)
    assert not list((tmp_path / "mimic-cxr-jpg/files").rglob("*.jpg"))
    for rel, digest in b.items():
        if rel.endswith(".csv.gz"):
            assert a[rel] == digest, rel
    truth = json.loads((tmp_path / "truth.json").read_text())
    assert truth["images_written"] is False


# ------------------------------------------------------------------------------------------------
# truth.json agrees with the files
# ------------------------------------------------------------------------------------------------

def _stays_and_truth(out):
    truth = json.loads((out / "truth.json").read_text())
    stays = read(out, "mimic-iv/icu/icustays.csv.gz")
    stays["stay_id"] = stays["stay_id"].astype(int)
    return stays.set_index("stay_id"), truth


def test_truth_films_match_an_independent_selection(small):
    out, _ = small
    stays, truth = _stays_and_truth(out)
    meta = read(out, "mimic-cxr-jpg/mimic-cxr-2.0.0-metadata.csv.gz")
    meta["time"] = parse_study_times(meta["StudyDate"], meta["StudyTime"])
    frontal = meta[meta["ViewPosition"].isin(["AP", "PA"])]
    n_with = 0
    for rec in truth["stays"]:
        stay = stays.loc[rec["stay_id"]]
        lo = pd.Timestamp(stay["intime"])
        films = frontal[(frontal["subject_id"] == stay["subject_id"]) & (frontal["time"] >= lo)
                        & (frontal["time"] <= lo + pd.Timedelta(hours=48))].sort_values("time")
        assert rec["cxr"]["eligible"] == films["dicom_id"].tolist()
        if len(films):
            n_with += 1
            assert rec["cxr"]["latest"] == films["dicom_id"].iloc[-1]
            assert pd.Timestamp(rec["cxr"]["latest_study_time"]) == films["time"].iloc[-1]
            assert rec["cxr"]["latest_view"] in ("AP", "PA")
        else:
            assert rec["cxr"]["latest"] is None
    assert truth["summary"]["n_stays_with_eligible_film"] == n_with > 0
    assert truth["summary"]["n_images"] == len(meta)


def test_truth_labels_match_the_tables(small):
    out, _ = small
    stays, truth = _stays_and_truth(out)
    adm = read(out, "mimic-iv/hosp/admissions.csv.gz").set_index("hadm_id")
    dx = read(out, "mimic-iv/hosp/diagnoses_icd.csv.gz")
    ph = load_phenotypes()
    assert truth["phenotypes"]["names"] == ph.names
    hadm = [int(r["hadm_id"]) for r in truth["stays"]]
    labels = ph.label_matrix(dx, hadm)
    for i, rec in enumerate(truth["stays"]):
        stay = stays.loc[rec["stay_id"]]
        a = adm.loc[stay["hadm_id"]]
        death = pd.Timestamp(a["deathtime"]) if a["deathtime"] else None
        icu = death is not None and pd.Timestamp(stay["intime"]) <= death <= pd.Timestamp(stay["outtime"])
        hosp = death is not None and pd.Timestamp(a["admittime"]) <= death <= pd.Timestamp(a["dischtime"])
        assert rec["labels"]["mortality"] == int(icu)
        assert rec["labels"]["mortality_hosp"] == int(hosp)
        assert rec["labels"]["los_days"] == pytest.approx(float(stay["los"]), abs=1e-6)
        assert rec["labels"]["phenotypes"] == labels[i].tolist()
        assert rec["subject_id"] == int(stay["subject_id"]) and rec["hadm_id"] == int(stay["hadm_id"])
    assert [r["stay_id"] for r in truth["stays"]] == sorted(stays.index)
    assert len(truth["stays"]) == truth["n_stays"] == 60


def test_truth_documents_the_model(large):
    _, _, truth = large
    dep = truth["phenotypes"]["dependence"]
    assert sum(len(v) for v in dep.values()) == 25
    assert "Pneumonia (except that caused by tuberculosis or sexually transmitted disease)" in dep["image"]
    assert "Congestive heart failure; nonhypertensive" in dep["image"]
    assert "Acute and unspecified renal failure" in dep["ehr"]
    assert dep["both"] and dep["none"]
    assert "SpO2" in truth["disparity"]["mechanism"]
    assert truth["build_rules"]["views"] == ["AP", "PA"] and truth["build_rules"]["window_hours"] == 48
    s = truth["summary"]
    assert 0.03 < s["mortality_rate"] < 0.2 and s["mortality_hosp_rate"] >= s["mortality_rate"]
    assert all(0.02 < p < 0.6 for p in s["phenotype_prevalence"].values())


def test_eligible_share_is_near_target_and_sicker_stays_get_more_films(large):
    _, summary, truth = large
    s = truth["summary"]
    assert 0.22 <= s["eligible_share_default_cohort"] <= 0.32
    assert 0.18 <= s["eligible_share"] <= 0.32
    assert summary.eligible_share == s["eligible_share"]
    sev = np.array([r["latent"]["severity"] for r in truth["stays"]])
    has = np.array([r["cxr"]["latest"] is not None for r in truth["stays"]])
    assert sev[has].mean() > sev[~has].mean() + 0.3


# ------------------------------------------------------------------------------------------------
# realistic mess
# ------------------------------------------------------------------------------------------------

def test_the_mess_is_present(large):
    out, _, truth = large
    s = truth["summary"]
    assert s["n_minor_stays"] > 0 and s["n_stays_under_48h"] > 0
    assert s["n_patients_with_several_stays"] > 0 and s["n_icd9_admissions"] > 0 and s["n_icd10_admissions"] > 0
    pat = read(out, "mimic-iv/hosp/patients.csv.gz")
    assert (pat["anchor_age"].astype(int) < 18).any()
    stays = read(out, "mimic-iv/icu/icustays.csv.gz")
    assert (stays["los"].astype(float) < 2).any()
    # chartevents: exact duplicates, trailing spaces, F temperatures, inch heights, rhythm and refill texts
    chart = read(out, "mimic-iv/icu/chartevents.csv.gz")
    assert chart.duplicated().any()
    assert chart["value"].str.endswith(" ").any()
    items = chart["itemid"].astype(int)
    assert (items == 223761).any() and (items == 226707).any()
    values = set(chart["value"].str.strip())
    assert {"SR (Sinus Rhythm)", "AF (Atrial Fibrillation)", "A Paced", "1st AV (First degree AV Block)",
            "Normal <3 Seconds", "Abnormal >3 Seconds"} <= values
    ids = variable_itemids()
    assert set(ids["chartevents"]) <= set(items)
    # labevents: duplicates, empty hadm_id, non-numeric values with empty valuenum, out-of-range values
    lab = read(out, "mimic-iv/hosp/labevents.csv.gz")
    assert lab.duplicated().any()
    assert (lab["hadm_id"] == "").any()
    text = lab[(lab["valuenum"] == "") & (lab["value"] != "")]
    assert len(text) and not pd.to_numeric(text["value"], errors="coerce").notna().any()
    creat = lab[lab["itemid"] == "50912"]["valuenum"].replace("", np.nan).astype(float)
    assert (creat > 30).any()
    assert set(ids["labevents"]) <= set(lab["itemid"].astype(int))
    output = read(out, "mimic-iv/icu/outputevents.csv.gz")
    assert output.duplicated().any()
    # diagnoses: codes valid in both versions written with the version that is not the phenotype one
    dx = read(out, "mimic-iv/hosp/diagnoses_icd.csv.gz")
    pairs = set(zip(dx["icd_code"], dx["icd_version"]))
    assert pairs & {("V420", "10"), ("V9001", "10")} and pairs & {("E870", "9"), ("E871", "9"), ("E860", "9")}
    assert s["n_stays_version_blind_differs"] > 0
    # films: lateral and blank views, films before ICU admission and after the prediction time
    meta = read(out, "mimic-cxr-jpg/mimic-cxr-2.0.0-metadata.csv.gz")
    assert {"AP", "PA", "LATERAL", "LL", ""} <= set(meta["ViewPosition"])
    assert s["n_images_before_intime"] > 0 and s["n_images_after_prediction_time"] > 0


def test_version_blind_matching_gets_some_stays_wrong(large):
    out, _, truth = large
    dx = read(out, "mimic-iv/hosp/diagnoses_icd.csv.gz")
    ph = load_phenotypes()
    hadm = [r["hadm_id"] for r in truth["stays"]]
    right = ph.label_matrix(dx, hadm)
    blind_dx = pd.concat([dx.assign(icd_version="9"), dx.assign(icd_version="10")])
    blind = ph.label_matrix(blind_dx, hadm)
    wrong = (blind != right).any(axis=1)
    assert wrong.sum() == truth["summary"]["n_stays_version_blind_differs"] > 0
    assert [r["version_blind_phenotypes_differ"] for r in truth["stays"]] == wrong.tolist()


def test_disparity_group_reads_higher_spo2(large):
    out, _, truth = large
    chart = read(out, "mimic-iv/icu/chartevents.csv.gz")
    spo2 = chart[chart["itemid"] == "220277"]
    per_stay = spo2.assign(v=spo2["valuenum"].astype(float)).groupby(spo2["stay_id"].astype(int))["v"].mean()
    frame = pd.DataFrame([(r["stay_id"], r["disparity_group"], r["latent"]["hypoxemia"]) for r in truth["stays"]],
                         columns=["stay_id", "group", "hypoxemia"]).set_index("stay_id")
    frame["spo2"] = per_stay
    calm = frame[frame["hypoxemia"].between(-0.5, 0.5)]
    gap = calm.loc[calm["group"], "spo2"].mean() - calm.loc[~calm["group"], "spo2"].mean()
    assert gap > 1.5
    assert frame["group"].sum() == truth["summary"]["n_disparity_stays"] > 0


def test_chartevents_per_stay_option(tmp_path):
    summary = write_synthetic_source(tmp_path, n_stays=40, seed=3, images=False, chartevents_per_stay=1500)
    per_stay = summary.rows["icu/chartevents"] / 40
    assert 1100 < per_stay < 2000


# ------------------------------------------------------------------------------------------------
# images carry the findings
# ------------------------------------------------------------------------------------------------

def test_rendered_findings_change_the_film():
    n = 64

    def films(c, o, e, ap=False):
        factors = np.tile(np.array([[c, o, e]], np.float32), (n, 1))
        draws = UnitDraws(0, STREAMS["images"], range(n))   # the same noise for every finding
        return render_films(factors, np.ones(n, bool), np.full(n, ap), (48, 48), draws).astype(float)

    base = films(0, -2, -2)
    big_heart = films(2.5, -2, -2)
    opaque = films(0, 2.5, -2)
    effusion = films(0, -2, 2.5)
    lungs = (slice(None), slice(10, 30), slice(6, 42))
    bases = (slice(None), slice(28, 36), slice(4, 44))
    heart_band = (slice(None), slice(28, 38), slice(10, 38))
    assert big_heart[heart_band].mean() > base[heart_band].mean() + 8
    assert opaque[lungs].mean() > base[lungs].mean() + 5
    assert effusion[bases].mean() > base[bases].mean() + 8
    lateral = render_films(np.zeros((2, 3), np.float32), np.zeros(2, bool), np.zeros(2, bool), (32, 40),
                           UnitDraws(0, STREAMS["images"], range(2)))
    assert lateral.shape == (2, 32, 40) and lateral.dtype == np.uint8


def test_a_film_does_not_depend_on_the_films_rendered_with_it():
    rng = np.random.default_rng(1)
    factors = rng.normal(size=(70, 3)).astype(np.float32)
    frontal, ap = rng.random(70) < 0.7, rng.random(70) < 0.5
    together = render_films(factors, frontal, ap, (24, 20), UnitDraws(3, STREAMS["images"], range(70)))
    for i in (0, 41, 69):                          # alone, with its own generator (unit i)
        alone = render_films(factors[i:i + 1], frontal[i:i + 1], ap[i:i + 1], (24, 20),
                             UnitDraws(3, STREAMS["images"], [i]))
        np.testing.assert_array_equal(alone[0], together[i])


# ------------------------------------------------------------------------------------------------
# chunks: draws per unit, bytes independent of the chunk size
# ------------------------------------------------------------------------------------------------

def test_unit_draws_depend_only_on_seed_stream_and_unit():
    chunk = UnitDraws(5, STREAMS["chartevents"], [10, 11, 12])
    rows = np.array([2, 0, 2, 1, 2, 0])                 # rows of units 12, 10, 12, 11, 12, 10
    mixed = chunk.normal(rows=rows)
    alone = UnitDraws(5, STREAMS["chartevents"], [12]).normal(rows=np.zeros(3, np.int64))
    np.testing.assert_array_equal(mixed[rows == 2], alone)
    assert not np.array_equal(UnitDraws(6, STREAMS["chartevents"], [12]).normal(rows=np.zeros(3, np.int64)), alone)
    assert not np.array_equal(UnitDraws(5, STREAMS["labevents"], [12]).normal(rows=np.zeros(3, np.int64)), alone)
    # a unit's later draws follow on from its earlier ones, whoever shares the chunk
    again = UnitDraws(5, STREAMS["chartevents"], [11, 12])
    again.normal(rows=np.array([1, 0, 1, 1]))
    later = chunk.random(), again.random()
    assert later[0][2] == later[1][1]
    u = UnitDraws(0, 1, range(500))
    assert set(np.unique(u.integers(2, 5))) == {2, 3, 4}
    assert set(np.unique(u.choice([0.5, 0.0, 0.5]))) == {0, 2}
    assert u.poisson(np.r_[np.zeros(250), np.full(250, 3.0)])[:250].sum() == 0


def test_patient_chunks_keep_patients_whole():
    stays = np.array([1, 3, 1, 1, 2, 1, 4, 1])
    for size in (1, 2, 3, 5, 100):
        chunks = patient_chunks(stays, size)
        assert chunks[0][0] == 0 and chunks[-1][1] == len(stays)
        assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))       # contiguous, nothing skipped
        # a chunk holds the patients starting in its window of `size` stays: at most size + (largest - 1)
        assert all(0 < stays[first:end].sum() <= size + stays.max() - 1 for first, end in chunks)
    assert patient_chunks(stays, 1) == [(i, i + 1) for i in range(len(stays))]
    assert patient_chunks(stays, 100) == [(0, len(stays))]
    assert patient_chunks(stays, 4) == [(0, 2), (2, 5), (5, 7), (7, 8)]
    assert patient_chunks([], 3) == []
    assert default_chunk_stays(None) == 1538 and default_chunk_stays(1100) == 909 and default_chunk_stays(5e6) == 1


def test_gzip_bytes_do_not_depend_on_how_rows_are_written(tmp_path):
    import pyarrow as pa
    table = pa.table({"a": np.arange(3000), "b": [f"text {i % 17}" for i in range(3000)]})
    with GzipCsvWriter(tmp_path / "one.csv.gz", ["a", "b"]) as w:
        w.write(table)
    with GzipCsvWriter(tmp_path / "many.csv.gz", ["a", "b"]) as w:
        for start in (0, 1, 2, 700, 701, 2999):
            w.write(table.slice(start, {0: 1, 1: 1, 2: 698, 700: 1, 701: 2298, 2999: 1}[start]))
        assert w.n_rows == 3000
    assert (tmp_path / "one.csv.gz").read_bytes() == (tmp_path / "many.csv.gz").read_bytes()
    with pytest.raises(ValueError, match="columns"):
        with GzipCsvWriter(tmp_path / "bad.csv.gz", ["a", "c"]) as w:
            w.write(table)


@pytest.mark.parametrize("chunk_stays", [1, 3, 61])
def test_files_do_not_depend_on_the_chunk_size(small, tmp_path, chunk_stays):
    out, summary = small                          # written with the default chunk (all 60 stays at once)
    write_synthetic_source(tmp_path, n_stays=60, seed=7, image_size=32, chunk_stays=chunk_stays)
    reference, chunked = file_digests(out), file_digests(tmp_path)
    assert sum(rel.endswith(".jpg") for rel in chunked) == summary.n_images > 0
    assert chunked == reference


def test_labevent_and_specimen_ids_stay_unique_across_chunks(tmp_path):
    write_synthetic_source(tmp_path, n_stays=40, seed=9, images=False, chunk_stays=4)
    lab = read(tmp_path, "mimic-iv/hosp/labevents.csv.gz")
    ids = lab["labevent_id"].astype(int).to_numpy()
    assert (np.diff(ids) >= 0).all() and ids[0] == 1
    assert np.array_equal(np.unique(ids), np.arange(1, ids.max() + 1))   # consecutive over distinct rows
    assert (lab.drop_duplicates()["labevent_id"].value_counts() == 1).all()  # a repeated id is a repeated row
    panels = lab.groupby("specimen_id")[["subject_id", "charttime"]].nunique()
    assert (panels == 1).all().all()                 # one specimen, one patient and one time
    assert lab["subject_id"].astype(int).is_monotonic_increasing


# ------------------------------------------------------------------------------------------------
# arguments and CLI
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    ({"n_stays": 0}, "n_stays must be a positive integer"),
    ({"seed": -1}, "seed must be a non-negative integer"),
    ({"image_size": 4}, "image_size must be an int >= 8"),
    ({"image_size": (32, 32, 3)}, "image_size must be"),
    ({"eligible_share": 1.5}, "eligible_share must be in"),
    ({"chunk_stays": 0}, "chunk_stays must be a positive integer, got 0"),
    ({"chunk_stays": 2.5}, "chunk_stays must be a positive integer"),
])
def test_invalid_arguments(tmp_path, kwargs, message):
    args = {"n_stays": 5, "seed": 0, "image_size": 16} | kwargs
    with pytest.raises(SynthError, match=message):
        write_synthetic_source(tmp_path / "out", **args)
    assert not (tmp_path / "out").exists()


def test_overwrite_rules(tmp_path):
    out = tmp_path / "src"
    write_synthetic_source(out, 5, 0, 16)
    with pytest.raises(SynthError, match="is not empty; pass --overwrite"):
        write_synthetic_source(out, 5, 1, 16)
    write_synthetic_source(out, 5, 1, 16, overwrite=True)
    assert json.loads((out / "truth.json").read_text())["seed"] == 1
    foreign = tmp_path / "foreign"
    (foreign / "mimic-iv" / "hosp").mkdir(parents=True)
    with pytest.raises(SynthError, match="not a cbstore synthetic source"):
        write_synthetic_source(foreign, 5, 0, 16, overwrite=True)
    assert (foreign / "mimic-iv" / "hosp").is_dir()


def test_cli_writes_summary_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "cli"
    runner = CliRunner()
    result = runner.invoke(synth, [str(out), "--stays", "12", "--seed", "4", "--image-size", "16",
                                   "--chunk-stays", "5"])
    assert result.exit_code == 0, result.output
    assert "12 stays" in result.output and "chartevents rows" in result.output and "eligible film" in result.output
    assert json.loads((out / "truth.json").read_text())["n_stays"] == 12
    again = runner.invoke(synth, [str(out), "--stays", "12"])
    assert again.exit_code != 0 and "pass --overwrite" in again.output
    forced = runner.invoke(synth, [str(out), "--stays", "10", "--no-images", "--overwrite"])
    assert forced.exit_code == 0, forced.output
    assert "metadata only" in forced.output
    assert json.loads((out / "truth.json").read_text())["n_stays"] == 10
    bad = runner.invoke(synth, [str(tmp_path / "x"), "--stays", "0"])
    assert bad.exit_code != 0
    bad_chunk = runner.invoke(synth, [str(tmp_path / "y"), "--stays", "5", "--chunk-stays", "0"])
    assert bad_chunk.exit_code != 0 and "--chunk-stays" in bad_chunk.output
