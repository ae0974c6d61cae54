"""``cbstore build``: configuration, cohort, labels, hourly EHR, X-ray selection, failure handling.

Exact expectations come from the hand-written source of ``tests/support.py``; the synthetic source
(``cbstore.synth``) checks the build against its planted truth on ~80 stays.
"""

from __future__ import annotations

import gzip
import json
import shutil
import stat
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from support import CXR_HEADER, HEADERS, assert_same_build, write_table, write_tiny_source

from cbstore.build.config import DEFAULTS_FILE, BuildConfig, ConfigError, config_sha256, load_config
from cbstore.build.pipeline import build_store, format_cohort_flow
import cbstore.build.labels as labels_module
import cbstore.build.pipeline as pipeline_module
from cbstore.build.sources import SYNTHETIC_MARKER_JSON, SYNTHETIC_MARKER_TEXT
from cbstore.build.stats import fold_statistics
from cbstore.errors import SourceError, StoreExistsError
from cbstore.format.content import TRAIN
from cbstore.store.reader import open_store
from cbstore.store.writer import PartitionedStoreWriter
from cbstore.synth import MARKER_JSON, MARKER_TEXT, write_synthetic_source
from cli.build_cmd import build as build_command

TINY = BuildConfig(image_size=32, n_folds=2, val_fraction=0.0, workers=0, threads=1)

# The hand-written source is too small to observe every variable in every training part.
pytestmark = pytest.mark.filterwarnings("ignore:fold .* no training observation:UserWarning")


# ------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------

def test_packaged_defaults_equal_the_dataclass():
    assert load_config(DEFAULTS_FILE) == BuildConfig()


def test_config_from_yaml_and_toml_with_overrides(tmp_path):
    (tmp_path / "c.yaml").write_text("window_hours: 24\nviews: [ap]\nseed: 3\n")
    (tmp_path / "c.toml").write_text('window_hours = 24\nviews = ["AP"]\nseed = 3\n')
    a = load_config(tmp_path / "c.yaml", image_size=64, workers=None)
    b = load_config(tmp_path / "c.toml", image_size=64)
    assert a == b
    assert (a.window_hours, a.views, a.seed, a.image_size, a.workers) == (24, ("AP",), 3, 64, 2)


@pytest.mark.parametrize("text, words", [
    ("window_hour: 48\n", ["unknown setting 'window_hour'", "window_hours"]),
    ("window_hours: -1\n", ["'window_hours'", "-1"]),
    ("views: AP\n", ["'views'", "'AP'"]),
    ("memory_limit: lots\n", ["'memory_limit'", "'lots'"]),
    ("val_fraction: 1.5\n", ["'val_fraction'", "1.5"]),
    ("- a\n- b\n", ["must hold a mapping"]),
    ("window_hours: [\n", ["could not be parsed"]),
])
def test_invalid_config_names_key_and_value(tmp_path, text, words):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    for word in words:
        assert word in str(err.value)
    assert str(path) in str(err.value)


def test_config_hash_and_canonical_values_are_stable():
    # the hash of the defaults identifies every store built with them; it must not change
    assert config_sha256(BuildConfig()) == "70a95db446a662a3bec576e4ee66530a74b4ec35b6dba3c67dceb1b1bfbd5cda"
    config = BuildConfig(min_age=16, views=[" ap", "pa "], memory_limit=" 8 GB ", variables=Path("v.yaml"))
    assert (config.min_age, config.views, config.memory_limit, config.variables) == (16.0, ("AP", "PA"), "8GB", "v.yaml")
    assert isinstance(config.to_dict()["min_age"], float) and config.to_dict()["views"] == ["AP", "PA"]
    assert config_sha256(config) == "15028588d31ac01e6915481b65f5e30960267e69b43739642767918ccff9ae2e"


@pytest.mark.parametrize("values, key, value, allowed", [
    ({"window_hours": 0}, "window_hours", "0", "an integer in [1, 720]"),
    ({"window_hours": 2.0}, "window_hours", "2.0", "an integer in [1, 720]"),
    ({"threads": True}, "threads", "True", "an integer in [1, 1024]"),
    ({"min_age": "18"}, "min_age", "'18'", "a number in [0, 120]"),
    ({"val_fraction": 1}, "val_fraction", "1", "a number in [0, 1)"),
    ({"views": []}, "views", "[]", "a non-empty list of view positions"),
    ({"views": ["AP", "ap"]}, "views", "['AP', 'ap']", "a list without repeated views"),
    ({"work_dir": " "}, "work_dir", "' '", "a path"),
    ({"partitions": 0}, "partitions", "0", "an integer in [1, 1000000]"),
    ({"colour": 1}, "colour", "1", "one of the keys window_hours, min_age"),
])
def test_build_config_error_names_key_value_and_allowed(values, key, value, allowed):
    with pytest.raises(ConfigError) as err:
        BuildConfig(**values)
    assert str(err.value).startswith(f"setting {key!r} = {value} is invalid: expected {allowed}")


def test_config_hash_ignores_runtime_settings():
    base = BuildConfig()
    assert config_sha256(base) == config_sha256(base.replace(threads=8, workers=1, memory_limit="8GB"))
    assert config_sha256(base) != config_sha256(base.replace(window_hours=24))
    assert "threads" not in base.content_dict() and base.runtime_dict()["threads"] == 2


# ------------------------------------------------------------------------------------------
# exact results on the hand-written source
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    iv, cxr = write_tiny_source(root / "src")
    path = build_store(iv, cxr, root / "store.zarr", TINY, progress=False)
    return open_store(path), iv, cxr


def _hourly(store, position):
    values = store.ehr_values([position])[0]
    names = list(store.features["name"])
    out = {}
    for f, name in enumerate(names):
        hours = np.flatnonzero(~np.isnan(values[:, f]))
        if hours.size:
            out[name] = {int(h): round(float(values[h, f]), 4) for h in hours}
    return out


def test_cohort_steps_and_counts(tiny):
    store, _, _ = tiny
    flow = store.attrs["cohort_flow"]
    assert [(r["step"], r["n"]) for r in flow] == [
        ("icu_stays", 8), ("hospital_admission", 7), ("adult", 6), ("min_length", 5), ("ehr_in_window", 4)]
    # minor (30000002), 24 h stay (30000005), no admission row (30000007), no EHR in window (30000006)
    assert store.stay_ids.tolist() == [30000001, 30000003, 30000004, 30000008]
    assert store.attrs["n_stays"] == 4
    table = format_cohort_flow(flow)
    assert "min_length" in table and table.splitlines()[4].split()[1:3] == ["5", "1"]


def test_hourly_values_follow_the_variable_semantics(tiny):
    store, _, _ = tiny
    assert _hourly(store, 0) == {
        "heart_rate": {0: 85.0, 47: 100.0},          # duplicates dropped, out of range/outside window ignored
        "temperature": {2: 37.0},                     # 98.6 F -> C
        "fio2": {3: 45.0},                            # 0.5 -> 50 (below 1), mean with 40
        "weight": {4: 82.0},                          # last
        "gcs_eye": {5: 4.0, 6: 3.0}, "gcs_motor": {5: 6.0}, "gcs_verbal": {5: 5.0},
        "gcs_total": {5: 15.0},                       # only where all parts are observed
        "rhythm_sinus": {7: 0.0, 8: 0.0, 9: 0.0},
        "rhythm_afib": {7: 1.0, 8: 0.0, 9: 0.0},      # last value of the hour wins, padded value stripped
        "rhythm_aflutter": {7: 0.0, 8: 0.0, 9: 0.0},
        "rhythm_paced": {7: 0.0, 8: 0.0, 9: 1.0},     # case-insensitive prefix
        "rhythm_other": {7: 0.0, 8: 1.0, 9: 0.0},     # catch-all
        "capillary_refill": {10: 1.0, 11: 0.0},       # max over the hour
        "glucose": {13: 120.0},                       # chart 100 pooled with a lab of empty hadm_id 140
        "creatinine": {14: 1.2},                      # pre-ICU and non-numeric labs ignored
        "urine_output": {16: 150.0},                  # summed, exact duplicate ignored
    }
    assert _hourly(store, 3) == {"heart_rate": {2: 95.0}}
    observed = store.ehr_observed()
    assert np.array_equal(observed, ~np.isnan(store.ehr_values()))
    features = store.features
    assert features.loc[features.name == "rhythm_afib", "kind"].item() == "binary"
    assert features["normalize"].tolist() == (features["kind"] == "continuous").tolist()


def test_labels(tiny):
    store, _, _ = tiny
    assert store.labels("mortality").tolist() == [0, 1, 1, 0]        # dod date in stay; deathtime == outtime
    assert store.labels("mortality_hosp").tolist() == [0, 0, 1, 0]   # dod alone is not an in-hospital death
    ds = store.dataset("labels")
    assert np.allclose(ds["los"].values, [3.0, 4.5, 2.9166667, 3.0])  # empty los computed from the times
    assert store.labels("los").tolist() == [1, 2, 0, 1]
    names = store.phenotype_names
    pheno = store.labels("phenotype")
    on = {(i, names[k]) for i, k in zip(*np.nonzero(pheno))}
    assert on == {(0, "Essential hypertension"), (0, "Shock"), (3, "Essential hypertension"), (3, "Shock"),
                  (2, "Cardiac dysrhythmias")}  # "4019" with icd_version 10 matches nothing


def test_demographics(tiny):
    store, _, _ = tiny
    stays = store.stays
    assert stays["race"].tolist() == ["WHITE", "OTHER", "HISPANIC", "WHITE"]
    assert stays["race_raw"].tolist() == ["WHITE - RUSSIAN", "PORTUGUESE", "HISPANIC/LATINO - CUBAN",
                                          "WHITE - RUSSIAN"]
    assert stays["age"].tolist() == [60.0, 82.0, 45.0, 60.0]
    assert stays["age_group"].tolist() == ["60-80", "80+", "40-60", "60-80"]
    assert stays["marital_status"].tolist() == ["MARRIED", "", "WIDOWED", "MARRIED"]
    assert (stays["prediction_time"] - stays["intime"]).dt.total_seconds().eq(48 * 3600).all()
    assert str(stays.loc[30000004, "admittime"]) == "2150-01-01 02:00:00"


def test_xray_selection_and_skips(tiny):
    store, _, _ = tiny
    cxr = store.cxr
    assert cxr["dicom_id"].tolist() == ["d-late", "", "", ""]  # lateral and post-prediction films not eligible
    assert cxr["n_eligible"].tolist() == [2, 0, 1, 0]
    assert cxr["absent_reason"].tolist()[0] == ""
    assert cxr["absent_reason"].tolist()[2].startswith("file_missing: files/p10/p10000004/")
    assert store.attrs["cxr_skips"] == {"decode_error": 0, "file_missing": 1}
    assert (cxr["hours_before_prediction"].dropna() >= 0).all()
    images = store.images()
    assert images.shape == (4, 32, 32) and images[0].any() and not images[1:].any()


def test_root_attributes(tiny):
    store, iv, cxr = tiny
    attrs = store.attrs
    assert attrs["sources"]["mimic-iv"] == {"path": str(iv.resolve()), "version": "2.2", "synthetic": False}
    assert attrs["sources"]["mimic-cxr-jpg"]["version"] == "2.0.0"
    assert attrs["config"] == TINY.content_dict()
    assert attrs["config_sha256"] == config_sha256(TINY)
    assert (attrs["window_hours"], attrs["n_folds"], attrs["image_size"]) == (48, 2, 32)
    assert len(attrs["variables_sha256"]) == 64 and len(attrs["phenotypes_sha256"]) == 64


# ------------------------------------------------------------------------------------------
# sources are read only; work folder; failures; overwrite
# ------------------------------------------------------------------------------------------

def _listing(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def _set_read_only(root: Path, read_only: bool) -> None:
    for p in [root, *root.rglob("*")]:
        mode = p.stat().st_mode
        if read_only:
            p.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
        else:
            p.chmod(mode | stat.S_IWUSR)


def test_sources_untouched_and_work_folder_removed(tmp_path):
    iv, cxr = write_tiny_source(tmp_path / "src")
    before = _listing(tmp_path / "src")
    work = tmp_path / "work"
    _set_read_only(tmp_path / "src", True)
    try:
        build_store(iv, cxr, tmp_path / "out.zarr", TINY.replace(work_dir=str(work)), progress=False)
    finally:
        _set_read_only(tmp_path / "src", False)
    assert _listing(tmp_path / "src") == before
    assert list(work.iterdir()) == []
    assert not (tmp_path / "out.zarr.build").exists()
    with pytest.raises(ConfigError, match="inside the source folder"):
        build_store(iv, cxr, tmp_path / "out2.zarr", TINY.replace(work_dir=str(iv / "work")), progress=False)
    with pytest.raises(ConfigError, match="inside the source folder"):
        build_store(iv, cxr, iv / "store.zarr", TINY, progress=False)
    assert _listing(tmp_path / "src") == before


def test_interrupted_build_leaves_no_store_only_its_resume_state(tmp_path, monkeypatch):
    iv, cxr = write_tiny_source(tmp_path / "src")
    work = tmp_path / "work"
    reached = []

    def fail(*args, **kwargs):
        reached.append(True)
        raise RuntimeError("power cut")

    monkeypatch.setattr(labels_module, "compute_labels", fail)  # runs after the EHR extraction
    with pytest.raises(RuntimeError, match="power cut"):
        build_store(iv, cxr, tmp_path / "out.zarr", TINY.replace(work_dir=str(work)), progress=False)
    assert reached
    # no store; the resume state beside it; the DuckDB work folder removed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.zarr.build", "src", "work"]
    assert list(work.iterdir()) == []
    assert (tmp_path / "out.zarr.build" / "events").is_dir()

    def fail_in_writer(self, start, images, present):
        raise RuntimeError("disk full")

    monkeypatch.undo()
    monkeypatch.setattr(PartitionedStoreWriter, "write_images", fail_in_writer)
    with pytest.raises(RuntimeError, match="disk full"):
        build_store(iv, cxr, tmp_path / "out.zarr", TINY.replace(work_dir=str(work)), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.zarr.build", "src", "work"]  # no out.zarr
    assert not list((tmp_path / "out.zarr.build" / "partitions").iterdir())  # no partition finished

    monkeypatch.undo()
    build_store(iv, cxr, tmp_path / "out.zarr", TINY.replace(work_dir=str(work)), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.zarr", "src", "work"]  # state removed


def test_overwrite_refused_then_replaced(tmp_path):
    iv, cxr = write_tiny_source(tmp_path / "src")
    out = tmp_path / "out.zarr"
    build_store(iv, cxr, out, TINY, progress=False)
    first = open_store(out).attrs["created_at"]
    with pytest.raises(StoreExistsError, match="--overwrite"):
        build_store(iv, cxr, out, TINY, progress=False)
    build_store(iv, cxr, out, TINY.replace(image_size=16), overwrite=True, progress=False)
    store = open_store(out)
    assert store.attrs["image_size"] == 16 and store.images().shape[1:] == (16, 16)
    assert store.attrs["created_at"] >= first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.zarr", "src"]


def test_truncated_chartevents_fails_with_the_file_name(tmp_path):
    iv, cxr = write_tiny_source(tmp_path / "src")
    path = iv / "icu" / "chartevents.csv.gz"
    raw = gzip_rows(40000)
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(SourceError) as err:
        build_store(iv, cxr, tmp_path / "out.zarr", TINY, progress=False)
    assert str(path) in str(err.value)
    assert not (tmp_path / "out.zarr").exists()


def gzip_rows(n: int) -> bytes:
    """A chartevents file of ``n`` heart-rate rows (gzip bytes)."""
    header = ",".join(HEADERS["icu/chartevents"])
    rows = "\n".join(f'"10000001","20000001","30000001","1","2150-01-01 09:00:00","2150-01-01 09:00:00",'
                     f'"220045","{60 + i % 50}","{60 + i % 50}","bpm","0"' for i in range(n))
    return gzip.compress((header + "\n" + rows + "\n").encode(), mtime=0)


def _append_row(path: Path, row: list) -> None:
    """Append one row to a written ``.csv.gz`` table (values quoted as write_table quotes them)."""
    text = gzip.decompress(path.read_bytes()).decode()
    line = ",".join("" if v is None else f'"{v}"' for v in row)
    path.write_bytes(gzip.compress((text + line + "\n").encode(), mtime=0))


@pytest.mark.parametrize("table, row, message", [
    ("icu/icustays", [10000001, 20000001, 30000001, "MICU", "MICU", "2150-01-01 08:00:00", "2150-01-04 08:00:00",
                      "3.0"], r"icu/icustays \(.*icustays\.csv\.gz\) has stay_id 30000001 on 2 rows"),
    ("hosp/patients", [10000003, "M", 70, 2150, "2014 - 2016", None],
     r"stay 30000003 matches several rows of hosp/admissions \(hadm_id\) or hosp/patients"),
])
def test_a_stay_on_two_rows_is_refused_before_any_event_is_read(tmp_path, table, row, message):
    iv, cxr = write_tiny_source(tmp_path / "src")
    _append_row(iv / f"{table}.csv.gz", row)
    with pytest.raises(SourceError, match=message):
        build_store(iv, cxr, tmp_path / "out.zarr", TINY, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_a_failure_alongside_the_extraction_stops_the_build(tmp_path):
    # the films are chosen in a thread while DuckDB extracts the events: its error is the build's
    iv, cxr = write_tiny_source(tmp_path / "src")
    write_table(cxr / "mimic-cxr-2.0.0-metadata.csv.gz", CXR_HEADER,  # a readable header, an impossible time
                [["d-x", 10000001, 50000001, "CHEST", "AP", 3056, 2544, 21500101, 256000.0, "CHEST", "ap", "Erect"]])
    with pytest.raises(SourceError, match=r"mimic-cxr-2\.0\.0-metadata\.csv\.gz.*StudyTime.*256000"):
        build_store(iv, cxr, tmp_path / "out.zarr", TINY, progress=False)
    assert not (tmp_path / "out.zarr").exists()


def test_the_thread_alongside_hands_back_what_the_film_selection_freed(tmp_path, monkeypatch):
    # the build's peak is DuckDB's extraction: the MIMIC-CXR metadata table must not stay held through it
    threads = []
    monkeypatch.setattr(pipeline_module, "release_free_memory", lambda: threads.append(threading.current_thread().name))
    iv, cxr = write_tiny_source(tmp_path / "src")
    build_store(iv, cxr, tmp_path / "out.zarr", TINY, progress=False)
    assert sum(name.startswith("cbstore-build-side") for name in threads) == 1


def test_the_thread_alongside_reads_only_the_metadata_rows_a_film_selection_can_use(tmp_path, monkeypatch):
    # the whole MIMIC-CXR metadata table is never held: only the cohort's subjects, in the accepted views
    import cbstore.build.cxr as cxr_module

    read = cxr_module.read_cxr_metadata
    calls = []

    def recording(root, **kwargs):
        calls.append(kwargs)
        return read(root, **kwargs)

    monkeypatch.setattr(cxr_module, "read_cxr_metadata", recording)
    iv, cxr = write_tiny_source(tmp_path / "src")
    config = TINY.replace(views=("AP",))
    store = open_store(build_store(iv, cxr, tmp_path / "out.zarr", config, progress=False))
    (kwargs,) = calls
    assert kwargs["views"] == ("AP",)
    assert set(kwargs["subjects"]) >= set(store.stays["subject_id"]) and len(kwargs["subjects"]) >= len(store.stays)


def test_empty_cohort_is_explained(tmp_path):
    iv, cxr = write_tiny_source(tmp_path / "src")
    with pytest.raises(SourceError) as err:
        build_store(iv, cxr, tmp_path / "out.zarr", TINY.replace(window_hours=24 * 20), progress=False)
    assert "no ICU stay is left" in str(err.value) and "min_length" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_cli_prints_flow_and_refuses_existing_store(tmp_path):
    iv, cxr = write_tiny_source(tmp_path / "src")
    out = tmp_path / "cli.zarr"
    args = ["--mimic-iv", str(iv), "--mimic-cxr", str(cxr), "--out", str(out), "--image-size", "16",
            "--workers", "0", "--quiet"]
    config = tmp_path / "c.yaml"
    config.write_text("n_folds: 2\nval_fraction: 0.0\n")
    result = CliRunner().invoke(build_command, [*args, "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "ehr_in_window" in result.output and "4 stays" in result.output
    result = CliRunner().invoke(build_command, [*args, "--config", str(config)])
    assert result.exit_code == 1 and "--overwrite" in result.output
    result = CliRunner().invoke(build_command, [*args, "--config", str(config), "--window-hours", "0",
                                                "--overwrite"])
    assert result.exit_code == 1 and "'window_hours'" in result.output


# ------------------------------------------------------------------------------------------
# synthetic source with planted truth
# ------------------------------------------------------------------------------------------

SYNTH = BuildConfig(image_size=32, workers=2, threads=2)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """An 80-stay synthetic source, its truth and a store built from it with default rules."""
    root = tmp_path_factory.mktemp("synthetic")
    summary = write_synthetic_source(root / "source", n_stays=80, seed=11, image_size=48)
    path = build_store(summary.mimic_iv, summary.mimic_cxr, root / "store.zarr", SYNTH, progress=False)
    truth = json.loads(Path(summary.truth).read_text())
    return open_store(path), {s["stay_id"]: s for s in truth["stays"]}, summary


def test_synthetic_cohort_is_the_planted_default_cohort(synthetic):
    store, truth, _ = synthetic
    expected = sorted(i for i, s in truth.items() if s["in_default_cohort"])
    flow = {r["step"]: r["n"] for r in store.attrs["cohort_flow"]}
    assert flow["icu_stays"] == len(truth)
    assert flow["min_length"] == len(expected)
    kept = store.stay_ids.tolist()
    assert set(kept) <= set(expected) and len(kept) == flow["ehr_in_window"]
    assert not any(truth[i]["minor"] or truth[i]["los_hours"] < 48 for i in kept)
    assert any(s["minor"] for s in truth.values()) and any(s["los_hours"] < 48 for s in truth.values())
    assert store.attrs["sources"]["mimic-iv"]["synthetic"] is True


def test_synthetic_labels_equal_the_planted_labels(synthetic):
    store, truth, _ = synthetic
    ids = store.stay_ids
    want = [truth[i]["labels"] for i in ids]
    assert store.labels("mortality").tolist() == [w["mortality"] for w in want]
    assert store.labels("mortality_hosp").tolist() == [w["mortality_hosp"] for w in want]
    assert store.labels("phenotype").tolist() == [w["phenotypes"] for w in want]
    los = np.array([w["los_days"] for w in want])
    assert np.allclose(store.dataset("labels")["los"].values, los, atol=1e-5)
    expected_class = np.digitize(los, [2, 3, 4, 5, 6, 7, 14]) - 1
    assert store.labels("los").tolist() == expected_class.tolist()
    assert store.labels("mortality_hosp").sum() > 0 and store.labels("phenotype").sum() > 0


def test_synthetic_race_groups(synthetic):
    store, truth, _ = synthetic
    groups = ("WHITE", "BLACK", "HISPANIC", "ASIAN")
    for i in store.stay_ids:
        raw = truth[i]["race_raw"]
        want = next((g for g in groups if raw.startswith(g)), "OTHER")  # PORTUGUESE, UNKNOWN, ... -> OTHER
        assert (store.stays.loc[i, "race"], store.stays.loc[i, "race_raw"]) == (want, raw)
        assert (want == "BLACK") == truth[i]["disparity_group"]


def test_synthetic_film_is_the_latest_eligible_and_never_after_prediction(synthetic):
    store, truth, _ = synthetic
    cxr, stays = store.cxr, store.stays
    for i in store.stay_ids:
        latest = truth[i]["cxr"]["latest"] or ""
        assert cxr.loc[i, "dicom_id"] == latest, i
        assert cxr.loc[i, "n_eligible"] == len(truth[i]["cxr"]["eligible"])
    present = cxr["present"].to_numpy()
    assert present.sum() > 0 and (cxr["dicom_id"] != "").sum() == present.sum()
    assert (cxr.loc[present, "study_time"] <= stays.loc[present, "prediction_time"]).all()
    assert (cxr.loc[present, "hours_before_prediction"] >= 0).all()
    images = store.images()
    assert images[present].reshape(present.sum(), -1).any(axis=1).all() and not images[~present].any()


def test_synthetic_splits_are_by_patient_and_stats_from_training_stays(synthetic):
    store, _, _ = synthetic
    subjects = store.stays["subject_id"].to_numpy()
    values = store.ehr_values()
    n_test = np.zeros(len(np.unique(subjects)), dtype=int)
    _, inverse = np.unique(subjects, return_inverse=True)
    for fold in range(store.n_folds):
        part = store.part(fold)
        for subject in np.unique(subjects):
            assert len(set(part[subjects == subject].tolist())) == 1, (fold, subject)
        np.add.at(n_test, inverse, part == 2)
        train_only = fold_statistics(values[part == TRAIN], np.zeros(((part == TRAIN).sum(), 1), np.uint8))
        stats = store.fold_stats(fold)
        for name in ("median", "mean", "std", "n_observed"):
            assert np.array_equal(stats[name], train_only[name][0], equal_nan=True), name
        everyone = fold_statistics(values, np.zeros((len(values), 1), np.uint8))
        assert not np.array_equal(stats["n_observed"], everyone["n_observed"][0])
    counts = np.bincount(inverse)
    assert (n_test == counts).all()  # every patient's stays are test stays in exactly one fold


def test_synthetic_builds_are_byte_identical(synthetic, tmp_path):
    store, _, summary = synthetic
    again = build_store(summary.mimic_iv, summary.mimic_cxr, tmp_path / "again.zarr",
                        SYNTH.replace(threads=1, workers=0), progress=False)
    assert_same_build(store.path, again)


def test_corrupt_selected_film_is_absent_with_reason_and_counted(synthetic, tmp_path):
    store, _, summary = synthetic
    source = tmp_path / "source"
    shutil.copytree(Path(summary.out_dir), source)
    position = int(np.flatnonzero(store.cxr_present)[0])
    rel = store.cxr["dicom_id"].iloc[position]
    film = next((source / "mimic-cxr-jpg" / "files").rglob(f"{rel}.jpg"))
    film.write_bytes(b"\xff\xd8\xff" + b"garbage" * 50)
    built = open_store(build_store(source / "mimic-iv", source / "mimic-cxr-jpg", tmp_path / "s.zarr", SYNTH,
                                   progress=False))
    assert not built.cxr_present[position]
    assert built.cxr["absent_reason"].iloc[position].startswith("decode_error: files/")
    assert built.attrs["cxr_skips"]["decode_error"] == 1
    assert built.cxr_present.sum() == store.cxr_present.sum() - 1
    assert not built.images([position]).any()


def test_synthetic_markers_match_the_generator():
    assert (SYNTHETIC_MARKER_JSON, SYNTHETIC_MARKER_TEXT) == (MARKER_JSON, MARKER_TEXT)
