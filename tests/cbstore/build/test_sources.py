"""Locating and checking the raw MIMIC folders, and read errors inside the data."""

from __future__ import annotations

import gzip
import shutil

import pytest
from support import HEADERS, write_tiny_source

from cbstore.build.extract import Extractor
from cbstore.build.sources import locate_mimic_cxr, locate_mimic_iv, read_header
from cbstore.errors import SourceError


@pytest.fixture()
def source(tmp_path):
    iv, cxr = write_tiny_source(tmp_path / "src")
    return iv, cxr


def test_locates_release_and_reads_headers(source):
    iv, _ = source
    found = locate_mimic_iv(iv)
    assert found.root == iv.resolve()
    assert found.version == "2.2"
    assert found.synthetic is False
    assert found.table("icu/chartevents").columns == tuple(HEADERS["icu/chartevents"])
    assert found.describe() == {"path": str(iv.resolve()), "version": "2.2", "synthetic": False}


def test_finds_the_single_release_below_the_given_folder(source):
    iv, _ = source
    found = locate_mimic_iv(iv.parent)  # .../mimic-iv holding 2.2/
    assert found.root == iv.resolve()


def test_several_releases_are_refused(source):
    iv, _ = source
    shutil.copytree(iv, iv.parent / "3.1")
    with pytest.raises(SourceError, match="several MIMIC-IV releases"):
        locate_mimic_iv(iv.parent)


def test_plain_csv_and_upper_case_headers_are_accepted(tmp_path):
    iv, _ = write_tiny_source(tmp_path, compress=False)
    path = iv / "icu" / "icustays.csv"
    text = path.read_text()
    header, rest = text.split("\n", 1)
    path.write_text(header.upper() + "\n" + rest)
    found = locate_mimic_iv(iv)
    assert found.table("icu/icustays").path == path
    assert not found.table("icu/icustays").compressed
    assert "stay_id" in found.table("icu/icustays").columns
    with Extractor(found, tmp_path / "work") as ex:
        stays = ex.fetch("stays")
    assert stays["stay_id"].tolist()[:2] == [30000001, 30000002]
    assert str(stays["intime"].dtype).startswith("datetime64")


def test_extractor_settings_and_spill_folder(tmp_path, source):
    iv, _ = source
    work = tmp_path / "work"
    with Extractor(locate_mimic_iv(iv), work, memory_limit="300MB", threads=1) as ex:
        limit, threads, temp = ex.con.execute(
            "SELECT current_setting('memory_limit'), current_setting('threads'), "
            "current_setting('temp_directory')").fetchone()
        types = dict(ex.con.execute("SELECT column_name, data_type FROM information_schema.columns "
                                    "WHERE table_schema = 'mimiciv_icu' AND table_name = 'chartevents'").fetchall())
    assert threads == 1 and limit.replace(" ", "").upper().startswith(("286", "300")) and temp == str(work / "duckdb_tmp")
    assert (types["stay_id"], types["charttime"], types["valuenum"], types["value"]) == (
        "BIGINT", "TIMESTAMP", "DOUBLE", "VARCHAR")


def test_missing_table_names_the_file_and_what_it_is(source):
    iv, _ = source
    (iv / "icu" / "outputevents.csv.gz").unlink()
    with pytest.raises(SourceError) as err:
        locate_mimic_iv(iv)
    assert "outputevents.csv.gz" in str(err.value)
    assert "urine" in str(err.value)


def test_missing_column_names_table_and_column(source):
    iv, _ = source
    path = iv / "hosp" / "admissions.csv.gz"
    header = ",".join(c for c in HEADERS["hosp/admissions"] if c != "deathtime")
    path.write_bytes(gzip.compress((header + "\n").encode()))
    with pytest.raises(SourceError) as err:
        locate_mimic_iv(iv)
    assert "hosp/admissions" in str(err.value)
    assert "'deathtime'" in str(err.value)


def test_missing_module_and_v1_layout(tmp_path, source):
    iv, _ = source
    shutil.rmtree(iv / "icu")
    with pytest.raises(SourceError, match="icu/ is missing"):
        locate_mimic_iv(iv)
    old = tmp_path / "mimic-iv-1.0"
    (old / "core").mkdir(parents=True)
    (old / "hosp").mkdir()
    with pytest.raises(SourceError, match="v1.0"):
        locate_mimic_iv(old)
    with pytest.raises(SourceError, match="does not exist"):
        locate_mimic_iv(tmp_path / "nowhere")


def test_not_gzip_and_empty_files(source):
    iv, _ = source
    path = iv / "hosp" / "patients.csv.gz"
    path.write_bytes(b"subject_id,gender\n")
    with pytest.raises(SourceError, match="not a gzip file"):
        read_header(path)
    path.write_bytes(gzip.compress(b""))
    with pytest.raises(SourceError, match="empty"):
        read_header(path)


def test_truncated_gzip_is_a_source_error_naming_the_file(tmp_path, source):
    iv, _ = source
    path = iv / "icu" / "icustays.csv.gz"
    rows = "\n".join(f'"1","2","{30000000 + i}","MICU","MICU","2150-01-01 08:00:00","2150-01-04 08:00:00","3.0"'
                     for i in range(20000))
    data = gzip.compress((",".join(HEADERS["icu/icustays"]) + "\n" + rows + "\n").encode())
    path.write_bytes(data[: len(data) // 2])
    found = locate_mimic_iv(iv)  # the header is intact, so locating succeeds
    with Extractor(found, tmp_path / "work") as ex, pytest.raises(SourceError) as err:
        ex.fetch("stays", reads=("icu/icustays", "hosp/admissions", "hosp/patients"))
    assert str(path) in str(err.value)
    assert "re-download" in str(err.value)


def test_bad_value_in_a_typed_column_names_the_file(tmp_path, source):
    iv, _ = source
    path = iv / "hosp" / "patients.csv.gz"
    header = ",".join(HEADERS["hosp/patients"])
    path.write_bytes(gzip.compress((header + '\n"10000001","M","sixty","2150","x",\n').encode()))
    with Extractor(locate_mimic_iv(iv), tmp_path / "work") as ex, pytest.raises(SourceError) as err:
        ex.fetch("stays", reads=("icu/icustays", "hosp/admissions", "hosp/patients"))
    assert "patients.csv.gz" in str(err.value)


def test_work_folder_inside_the_source_is_refused(source):
    iv, _ = source
    with pytest.raises(SourceError, match="inside the MIMIC-IV source"):
        Extractor(locate_mimic_iv(iv), iv / "tmp")
    assert not (iv / "tmp").exists()


def test_cxr_source_checks(source):
    _, cxr = source
    found = locate_mimic_cxr(cxr)
    assert found.version == "2.0.0"
    assert found.metadata.name == "mimic-cxr-2.0.0-metadata.csv.gz"
    shutil.rmtree(cxr / "files")
    with pytest.raises(SourceError, match="files"):
        locate_mimic_cxr(cxr)
    (cxr / "files").mkdir()
    meta = cxr / "mimic-cxr-2.0.0-metadata.csv.gz"
    meta.write_bytes(gzip.compress(b"dicom_id,subject_id,study_id,StudyDate,StudyTime\n"))
    with pytest.raises(SourceError, match="'ViewPosition'"):
        locate_mimic_cxr(cxr)
    meta.unlink()
    with pytest.raises(SourceError, match="metadata.csv.gz"):
        locate_mimic_cxr(cxr)
