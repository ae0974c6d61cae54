"""Tests of cbstore.build.cxr: metadata parsing, film selection, image decoding."""

from __future__ import annotations

import gzip
import os
import warnings

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cbstore.build.cxr import (
    CXR_METADATA,
    SELECTION_COLUMNS,
    decode_film,
    iter_image_batches,
    parse_study_times,
    read_cxr_metadata,
    select_films,
)
from cbstore.errors import SourceError

# Header of mimic-cxr-2.0.0-metadata.csv.gz, in release order.
HEADER = (
    "dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns,"
    "StudyDate,StudyTime,ProcedureCodeSequence_CodeMeaning,ViewCodeSequence_CodeMeaning,"
    "PatientOrientationCodeSequence_CodeMeaning"
)
ROWS = [
    "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014,10000032,50414267,CHEST (PA AND LAT),PA,3056,2544,"
    "21800506,213014.531,CHEST (PA AND LAT),postero-anterior,Erect",
    "174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962,10000032,50414267,CHEST (PA AND LAT),LATERAL,3056,"
    "2544,21800506,213014.531,CHEST (PA AND LAT),lateral,Erect",
    "2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab,10000032,53189527,CHEST (PORTABLE AP),AP,3056,2544,"
    "21800626,71502.25,CHEST (PORTABLE AP),antero-posterior,",
    "68b5c4b1-227d0485-9cc38c3f-7b84ab51-4b472714,10000764,57375967,CHEST (PORTABLE AP),,2705,2539,"
    "21321015,502.0,CHEST (PORTABLE AP),,",
]


def write_metadata(root, rows=ROWS, header=HEADER, *, gz=True):
    root.mkdir(parents=True, exist_ok=True)
    text = "\n".join([header, *rows]) + "\n"
    if gz:
        path = root / CXR_METADATA
        with gzip.open(path, "wt") as fh:
            fh.write(text)
    else:
        path = root / CXR_METADATA.removesuffix(".gz")
        path.write_text(text)
    return path


# ------------------------------------------------------------------ metadata

def test_parse_study_times_unpadded():
    got = parse_study_times([21800626, "21321015", 21500101, 21500101, 21500101],
                            [71502.25, "502.0", 0.0, 235959.999, np.nan])
    assert got.dtype == np.dtype("datetime64[ms]")
    assert got[0] == np.datetime64("2180-06-26T07:15:02.250")
    assert got[1] == np.datetime64("2132-10-15T00:05:02")
    assert got[2] == np.datetime64("2150-01-01T00:00:00")
    assert got[3] == np.datetime64("2150-01-01T23:59:59.999")
    assert np.isnat(got[4])


@pytest.mark.parametrize("date, time, match", [
    (21500101, 246000.0, "StudyTime.*246000"),
    (21500101, 126100.0, "StudyTime"),
    (21501301, 120000.0, "StudyDate.*21501301"),
])
def test_parse_study_times_rejects_invalid(date, time, match):
    with pytest.raises(ValueError, match=match):
        parse_study_times([date], [time])


@pytest.mark.parametrize("gz", [True, False])
def test_read_cxr_metadata(tmp_path, gz):
    root = tmp_path / "mimic-cxr-jpg"
    write_metadata(root, gz=gz)
    before = sorted(os.listdir(root))
    meta = read_cxr_metadata(root)
    assert sorted(os.listdir(root)) == before  # nothing written into the source
    assert list(meta.columns) == ["dicom_id", "subject_id", "study_id", "view_position",
                                  "study_time", "path"]
    assert meta["subject_id"].dtype == np.int64 and meta["study_id"].dtype == np.int64
    assert meta["study_time"].dtype == np.dtype("datetime64[s]")
    assert meta["view_position"].tolist() == ["PA", "LATERAL", "AP", ""]
    # Fractional seconds round up: a film never looks earlier than it was taken.
    assert meta["study_time"][2] == pd.Timestamp("2180-06-26 07:15:03")
    assert meta["study_time"][3] == pd.Timestamp("2132-10-15 00:05:02")
    assert meta["path"][0] == ("files/p10/p10000032/s50414267/"
                               "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg")
    assert meta["dicom_id"][3] == "68b5c4b1-227d0485-9cc38c3f-7b84ab51-4b472714"


def test_read_cxr_metadata_blank_time_warns_and_is_never_eligible(tmp_path):
    write_metadata(tmp_path, [ROWS[0].replace(",213014.531,", ",,"), ROWS[2]])
    with pytest.warns(UserWarning, match="1 image.*blank StudyDate or StudyTime"):
        meta = read_cxr_metadata(tmp_path)
    assert pd.isna(meta["study_time"][0]) and not pd.isna(meta["study_time"][1])
    stays = pd.DataFrame({"subject_id": [10000032], "intime": [pd.Timestamp("2180-01-01")],
                          "prediction_time": [pd.Timestamp("2181-01-01")]})
    sel = select_films(meta, stays, views=("AP", "PA"))
    assert sel["dicom_id"].tolist() == [meta["dicom_id"][1]] and sel["n_eligible"].tolist() == [1]


def test_read_cxr_metadata_missing_file(tmp_path):
    with pytest.raises(SourceError, match=f"MIMIC-CXR-JPG.*{CXR_METADATA}.*{tmp_path}"):
        read_cxr_metadata(tmp_path)


def test_read_cxr_metadata_missing_column(tmp_path):
    header = HEADER.replace("StudyTime,", "").replace("ViewPosition,", "")
    rows = [",".join(r.split(",")[:4] + r.split(",")[5:8] + r.split(",")[9:]) for r in ROWS]
    path = write_metadata(tmp_path, rows, header)
    with pytest.raises(SourceError, match=f"{path}.*ViewPosition, StudyTime"):
        read_cxr_metadata(tmp_path)


def test_read_cxr_metadata_truncated_gzip(tmp_path):
    rows = [ROWS[i % 4].replace("10000032", str(10000032 + i)) for i in range(2000)]
    path = write_metadata(tmp_path, rows)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SourceError, match=f"{path} is truncated or not gzip.*re-download"):
        read_cxr_metadata(tmp_path)


def test_read_cxr_metadata_not_gzip(tmp_path):
    (tmp_path / CXR_METADATA).write_text(HEADER + "\n" + ROWS[0] + "\n")
    with pytest.raises(SourceError, match="truncated or not gzip"):
        read_cxr_metadata(tmp_path)


def test_read_cxr_metadata_bad_values(tmp_path):
    write_metadata(tmp_path, [ROWS[0].replace("213014.531", "256000")])
    with pytest.raises(SourceError, match=f"{CXR_METADATA}.*StudyTime.*256000"):
        read_cxr_metadata(tmp_path)
    write_metadata(tmp_path, [ROWS[0].replace("10000032", "p10000032")])
    with pytest.raises(SourceError, match="subject_id and study_id must be integers"):
        read_cxr_metadata(tmp_path)


def random_metadata_rows(rng, n):
    """``n`` metadata rows of 6 subjects: mixed and padded views, blanks, fractional times, equal times."""
    views = ["AP", "PA", "LATERAL", "LL", "", " AP ", "PA "]
    rows = []
    for i in range(n):
        subject = 10000000 + int(rng.integers(6))
        date = f"2150010{1 + int(rng.integers(4))}"
        time = "" if rng.random() < 0.05 else f"{int(rng.integers(24)) * 10000 + int(rng.integers(60)) * 100}.{int(rng.integers(3)) * 5}"
        dicom = f"{int(rng.integers(3)):08x}-{i:08x}-00000000-00000000-00000000"
        rows.append(f"{dicom},{subject},{50000000 + i // 3},X,{views[int(rng.integers(len(views)))]},1,1,"
                    f"{date},{time},X,x,")
    return rows


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_read_cxr_metadata_in_chunks_equals_one_read(tmp_path, seed):
    write_metadata(tmp_path, random_metadata_rows(np.random.default_rng(seed), 97))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the blank times
        whole = read_cxr_metadata(tmp_path, chunk_rows=10_000)
        for chunk_rows in (1, 7, 96, 97):
            pd.testing.assert_frame_equal(read_cxr_metadata(tmp_path, chunk_rows=chunk_rows), whole)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_read_cxr_metadata_filters_keep_the_selection(tmp_path, seed):
    rng = np.random.default_rng(seed)
    write_metadata(tmp_path, random_metadata_rows(rng, 120))
    stays = pd.DataFrame({
        "subject_id": [10000000, 10000001, 10000001, 10000003],
        "intime": pd.to_datetime(["2150-01-01 06:00", "2150-01-02 00:00", "2150-01-01 00:00", "2150-01-01 00:00"]),
        "prediction_time": pd.to_datetime(["2150-01-03 06:00", "2150-01-04 00:00", "2150-01-03 00:00",
                                           "2150-01-02 12:00"]),
    }, index=pd.Index([4, 3, 2, 1], name="stay_id"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        everything = read_cxr_metadata(tmp_path)
        kept = read_cxr_metadata(tmp_path, views=("AP", "PA"), subjects=stays["subject_id"], chunk_rows=13)
    assert set(kept["view_position"]) <= {"AP", "PA"}
    assert set(kept["subject_id"]) <= set(stays["subject_id"])
    assert len(kept) < len(everything)
    wanted = everything["view_position"].isin(["AP", "PA"]) & everything["subject_id"].isin(stays["subject_id"])
    pd.testing.assert_frame_equal(kept, everything[wanted].reset_index(drop=True))
    for lookback in (0.0, 12.0):
        expected = select_films(everything, stays, views=("AP", "PA"), lookback_hours=lookback)
        assert expected["n_eligible"].sum() > 0
        pd.testing.assert_frame_equal(select_films(kept, stays, views=("AP", "PA"), lookback_hours=lookback),
                                      expected)
    # a single view given as a string
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert set(read_cxr_metadata(tmp_path, views="PA", chunk_rows=13)["view_position"]) == {"PA"}


def test_read_cxr_metadata_blank_dicom_in_a_later_chunk_names_its_line(tmp_path):
    rows = [ROWS[i % 4] for i in range(10)]
    rows[8] = "," + rows[8].split(",", 1)[1]
    write_metadata(tmp_path, rows)
    with pytest.raises(SourceError, match=r"blank dicom_id on line\(s\) \[10\]"):
        read_cxr_metadata(tmp_path, chunk_rows=3)


def test_read_cxr_metadata_checks_every_row_but_parses_times_of_kept_rows(tmp_path):
    bad_lateral = ROWS[1].replace("213014.531", "256000")
    write_metadata(tmp_path, [ROWS[0], bad_lateral, ROWS[2]])
    with pytest.raises(SourceError, match="StudyTime.*256000"):
        read_cxr_metadata(tmp_path, chunk_rows=2)
    # a dropped row is never used, so its time is not parsed
    assert read_cxr_metadata(tmp_path, views=("AP", "PA"), chunk_rows=2)["dicom_id"].tolist() == [
        ROWS[0].split(",")[0], ROWS[2].split(",")[0]]
    # a non-integer id fails on any row, kept or not
    write_metadata(tmp_path, [ROWS[0], ROWS[1].replace("10000032", "p10000032"), ROWS[2]])
    with pytest.raises(SourceError, match="subject_id and study_id must be integers"):
        read_cxr_metadata(tmp_path, views=("AP",), subjects=[10000764], chunk_rows=1)


def test_read_cxr_metadata_without_rows(tmp_path):
    write_metadata(tmp_path, [])
    meta = read_cxr_metadata(tmp_path)
    assert list(meta.columns) == ["dicom_id", "subject_id", "study_id", "view_position", "study_time", "path"]
    assert len(meta) == 0 and meta["study_time"].dtype == np.dtype("datetime64[s]")
    write_metadata(tmp_path, ROWS)
    kept = read_cxr_metadata(tmp_path, subjects=[1])
    assert len(kept) == 0 and kept["subject_id"].dtype == np.int64


# ------------------------------------------------------------------ selection

def films(*rows):
    """Metadata frame from (dicom_id, subject_id, view, study_time) tuples."""
    frame = pd.DataFrame(rows, columns=["dicom_id", "subject_id", "view_position", "study_time"])
    frame["study_time"] = pd.to_datetime(frame["study_time"], format="ISO8601").astype("datetime64[s]")
    frame["study_id"] = np.arange(len(frame), dtype=np.int64) + 50_000_000
    frame["path"] = "files/" + frame["dicom_id"] + ".jpg"
    return frame


STAYS = pd.DataFrame(
    {
        "subject_id": [1, 2, 3],
        "intime": pd.to_datetime(["2150-01-01 10:00", "2150-01-01 10:00", "2150-01-01 10:00"]),
        "prediction_time": pd.to_datetime(["2150-01-03 10:00"] * 3),
    },
    index=pd.Index([300, 100, 200], name="stay_id"),
)


def test_select_films_rules():
    meta = films(
        ("a-ok-early", 1, "AP", "2150-01-01 12:00"),
        ("b-ok-late", 1, "PA", "2150-01-02 09:30"),          # latest eligible -> chosen
        ("c-lateral", 1, "LATERAL", "2150-01-02 12:00"),      # wrong view
        ("d-blank", 1, "", "2150-01-02 13:00"),               # blank view
        ("e-after", 1, "AP", "2150-01-03 10:00:01"),          # after prediction_time
        ("f-other", 2, "AP", "2150-01-02 12:00"),             # subject 2's film
        ("g-before", 3, "AP", "2150-01-01 09:00"),            # before intime
    )
    sel = select_films(meta, STAYS)
    assert list(sel.columns) == list(SELECTION_COLUMNS)
    assert sel.index.equals(STAYS.index)
    assert sel.loc[300, "dicom_id"] == "b-ok-late"
    assert sel.loc[300, "n_eligible"] == 2
    assert sel.loc[300, "view_position"] == "PA"
    assert sel.loc[300, "path"] == "files/b-ok-late.jpg"
    assert sel.loc[300, "study_id"] == 50_000_001
    assert sel.loc[300, "study_time"] == pd.Timestamp("2150-01-02 09:30")
    assert sel.loc[300, "hours_before_prediction"] == pytest.approx(24.5)
    assert sel.loc[100, "dicom_id"] == "f-other" and sel.loc[100, "n_eligible"] == 1
    # Stay 200: its only film precedes intime.
    assert sel.loc[200, "dicom_id"] == "" and sel.loc[200, "n_eligible"] == 0
    assert sel.loc[200, "study_id"] == -1 and sel.loc[200, "path"] == ""
    assert pd.isna(sel.loc[200, "study_time"]) and np.isnan(sel.loc[200, "hours_before_prediction"])
    assert sel["n_eligible"].dtype == np.int16
    assert sel["hours_before_prediction"].dtype == np.float32
    assert sel["study_time"].dtype == np.dtype("datetime64[s]")
    assert (sel["hours_before_prediction"].dropna() >= 0).all()


def test_select_films_lookback_and_boundaries():
    meta = films(
        ("g-before", 3, "AP", "2150-01-01 09:00"),
        ("h-at-prediction", 2, "AP", "2150-01-03 10:00"),
        ("i-lateral", 2, "LL", "2150-01-02 10:00"),
    )
    sel = select_films(meta, STAYS, lookback_hours=1.0)
    assert sel.loc[200, "dicom_id"] == "g-before"
    assert sel.loc[200, "hours_before_prediction"] == pytest.approx(49.0)
    assert sel.loc[100, "dicom_id"] == "h-at-prediction"
    assert sel.loc[100, "hours_before_prediction"] == 0.0
    assert select_films(meta, STAYS, lookback_hours=0.99).loc[200, "dicom_id"] == ""
    assert select_films(meta, STAYS, views=("LL",)).loc[100, "dicom_id"] == "i-lateral"


def test_select_films_ties_and_row_order():
    meta = films(
        ("x-1", 1, "AP", "2150-01-02 10:00"),
        ("x-3", 1, "AP", "2150-01-02 10:00"),
        ("x-2", 1, "PA", "2150-01-02 10:00"),
    )
    sel = select_films(meta, STAYS)
    assert sel.loc[300, "dicom_id"] == "x-3" and sel.loc[300, "n_eligible"] == 3
    shuffled = select_films(meta.iloc[::-1].reset_index(drop=True), STAYS.iloc[::-1])
    pd.testing.assert_frame_equal(shuffled.loc[STAYS.index, ["dicom_id", "n_eligible"]],
                                  sel[["dicom_id", "n_eligible"]])


def test_select_films_two_stays_of_one_subject():
    stays = pd.DataFrame(
        {"subject_id": [1, 1],
         "intime": pd.to_datetime(["2150-01-01 10:00", "2150-02-01 10:00"]),
         "prediction_time": pd.to_datetime(["2150-01-03 10:00", "2150-02-03 10:00"])},
        index=pd.Index([1, 2], name="stay_id"),
    )
    meta = films(("jan", 1, "AP", "2150-01-02"), ("feb", 1, "AP", "2150-02-02"))
    assert select_films(meta, stays)["dicom_id"].tolist() == ["jan", "feb"]
    # With a long look-back the January film is eligible for the February stay too.
    sel = select_films(meta, stays, lookback_hours=24 * 40)
    assert sel["dicom_id"].tolist() == ["jan", "feb"] and sel["n_eligible"].tolist() == [1, 2]


def test_select_films_validates():
    meta = films(("a", 1, "AP", "2150-01-02"))
    with pytest.raises(ValueError, match="lookback_hours"):
        select_films(meta, STAYS, lookback_hours=-1)
    with pytest.raises(ValueError, match="stays lacks column.*prediction_time"):
        select_films(meta, STAYS.drop(columns="prediction_time"))


# ------------------------------------------------------------------ images

def write_jpeg(path, array, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8), mode="L").save(path, quality=95, **kwargs)


def test_decode_film_centre_crop_landscape(tmp_path):
    # 64 x 128: the short side becomes 32, width 64, and the centre 32 columns survive;
    # the bright left strip (columns 0..15 of 128) is cropped away.
    image = np.full((64, 128), 100, dtype=np.uint8)
    image[:, :16] = 255
    write_jpeg(tmp_path / "wide.jpg", image)
    out = decode_film(tmp_path / "wide.jpg", 32)
    assert out.shape == (32, 32) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - 100).max() <= 3


def test_decode_film_centre_crop_portrait_and_rgb(tmp_path):
    # 120 x 40 (portrait): top and bottom thirds go; the kept middle has a left-right ramp.
    ramp = np.tile(np.linspace(0, 240, 40), (120, 1))
    ramp[:40] = 255
    ramp[80:] = 0
    rgb = np.repeat(ramp[:, :, None], 3, axis=2).astype(np.uint8)
    Image.fromarray(rgb, mode="RGB").save(tmp_path / "tall.jpg", quality=95)
    out = decode_film(tmp_path / "tall.jpg", 20).astype(int)
    assert out.shape == (20, 20)
    assert np.all(np.diff(out.mean(axis=0)) > 0)          # ramp preserved left to right
    # The bands sit right at the crop edge: only the outermost output rows (whose filter
    # support reaches half a pixel past the crop) may see them.
    assert np.abs(out[1:-1, 10] - 120).max() <= 10
    assert np.abs(out[[0, -1], 10] - 120).max() <= 30
    assert out[1:-1].std(axis=0).max() < 3                # rows alike: bands cropped away


def test_decode_film_raises_for_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        decode_film(tmp_path / "none.jpg", 16)
    (tmp_path / "junk.jpg").write_bytes(np.random.default_rng(0).bytes(500))
    with pytest.raises(OSError):
        decode_film(tmp_path / "junk.jpg", 16)


@pytest.fixture()
def cxr_tree(tmp_path):
    """A CXR root with 5 good films, a truncated one, a random-bytes one and a missing one."""
    root = tmp_path / "cxr"
    rng = np.random.default_rng(1)
    paths = []
    for i in range(5):
        rel = f"files/p10/p1000000{i}/s5000000{i}/good{i}.jpg"
        write_jpeg(root / rel, rng.integers(0, 255, size=(48 + 8 * i, 64)))
        paths.append(rel)
    truncated = "files/p10/p10000005/s50000005/truncated.jpg"
    write_jpeg(root / truncated, rng.integers(0, 255, size=(64, 64)))
    data = (root / truncated).read_bytes()
    (root / truncated).write_bytes(data[: len(data) // 2])
    junk = "files/p10/p10000006/s50000006/junk.jpg"
    (root / junk).parent.mkdir(parents=True)
    (root / junk).write_bytes(rng.bytes(2000))
    missing = "files/p10/p10000007/s50000007/missing.jpg"
    # selection order: good0, none, truncated, good1, junk, good2, missing, good3, none, good4
    order = [paths[0], "", truncated, paths[1], junk, paths[2], missing, paths[3], "", paths[4]]
    return root, pd.DataFrame({"path": order}, index=pd.RangeIndex(len(order), name="stay_id"))


def collect(root, selection, **kwargs):
    starts, images, present, reasons = [], [], [], []
    for start, img, pres, why in iter_image_batches(root, selection, 24, **kwargs):
        starts.append(start)
        images.append(img)
        present.append(pres)
        reasons += why
    return starts, np.concatenate(images), np.concatenate(present), reasons


def test_iter_image_batches_reasons_and_blocks(cxr_tree):
    root, selection = cxr_tree
    listing = sorted(p.relative_to(root) for p in root.rglob("*"))
    starts, images, present, reasons = collect(root, selection, workers=0, batch_stays=4)
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == listing  # read only
    assert starts == [0, 4, 8]
    assert images.shape == (10, 24, 24) and images.dtype == np.uint8
    assert present.tolist() == [True, False, False, True, False, True, False, True, False, True]
    assert reasons[1] == reasons[8] == "no_eligible_film"
    assert reasons[2].startswith("decode_error: files/p10/p10000005/s50000005/truncated.jpg: ")
    assert "truncated" in reasons[2]
    assert reasons[4].startswith("decode_error: files/p10/p10000006/s50000006/junk.jpg: ")
    assert reasons[6] == "file_missing: files/p10/p10000007/s50000007/missing.jpg"
    assert all(reasons[i] == "" for i in np.flatnonzero(present))
    assert not images[~present].any()
    assert images[present].reshape(5, -1).std(axis=1).min() > 10
    for i, rel in zip([0, 3, 5, 7, 9], selection["path"].iloc[[0, 3, 5, 7, 9]]):
        np.testing.assert_array_equal(images[i], decode_film(root / rel, 24))


def test_iter_image_batches_workers_identical(cxr_tree):
    root, selection = cxr_tree
    serial = collect(root, selection, workers=0, batch_stays=3)
    parallel = collect(root, selection, workers=2, batch_stays=3)
    one = collect(root, selection, workers=1, batch_stays=3)
    for other in (parallel, one):
        assert other[0] == serial[0] and other[3] == serial[3]
        np.testing.assert_array_equal(other[1], serial[1])
        np.testing.assert_array_equal(other[2], serial[2])


def test_iter_image_batches_empty_and_invalid(cxr_tree):
    root, selection = cxr_tree
    assert list(iter_image_batches(root, selection.iloc[:0], 24)) == []
    with pytest.raises(ValueError, match="batch_stays"):
        next(iter_image_batches(root, selection, 24, batch_stays=0))
    with pytest.raises(ValueError, match="selection lacks column.*path"):
        next(iter_image_batches(root, selection.rename(columns={"path": "file"}), 24))
