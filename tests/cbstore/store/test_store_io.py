"""Writing, reading and extending stores: round trip, build safety, versions, embeddings."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import zarr

from cbstore import FORMAT_VERSION
from cbstore.errors import (
    EmbeddingError,
    StoreContentError,
    StoreError,
    StoreExistsError,
    StoreReadOnlyError,
    StoreVersionError,
)
from cbstore.format.content import CXR_COLUMNS, STAT_NAMES, STAY_COLUMNS
from cbstore.format.schema import ARRAYS, DATETIME_COLUMNS, MANIFEST_NAME
from cbstore.store.embeddings import EmbeddingWriter
from cbstore.store.reader import open_store
import cbstore.store.reader as store_mod
from cbstore.store.writer import StoreWriter, write_store
import cbstore.store.writer as write_mod
from cbstore.testing import random_content

# every warning is an error here: the store code must stay warning-clean (it silences the zarr
# "consolidated metadata is not in the v3 spec" warning itself, at the single call site)
pytestmark = pytest.mark.filterwarnings("error")

ATTRS = {"weights": "random-init", "preprocessing": {"note": "test"}}


@pytest.fixture(scope="module")
def content():
    return random_content(n_stays=40, n_folds=3, window=12, n_features=5, image_size=16, seed=3)


@pytest.fixture(scope="module")
def store_path(content, tmp_path_factory):
    return write_store(tmp_path_factory.mktemp("io") / "s.zarr", content, chunk_stays=16)


@pytest.fixture
def fresh(content, tmp_path):
    """A store of its own for tests that modify it."""
    return write_store(tmp_path / "f.zarr", content, chunk_stays=16)


# ---------------------------------------------------------------------------------- round trip


def test_round_trip_every_column(content, store_path):
    s = open_store(store_path)
    assert s.n_stays == 40 and s.n_folds == 3 and s.window_hours == 12 and s.image_size == 16
    np.testing.assert_array_equal(s.stay_ids, content.stays.index.to_numpy())
    for col in STAY_COLUMNS:
        got, want = s.stays[col], content.stays[col]
        if col in DATETIME_COLUMNS:
            assert str(got.dtype).startswith("datetime64")
            np.testing.assert_array_equal(got.to_numpy().astype("datetime64[s]"), want.to_numpy().astype("datetime64[s]"))
        else:
            assert got.tolist() == want.tolist(), col
    for col in CXR_COLUMNS:
        got, want = s.cxr[col], content.cxr[col]
        if col == "study_time":
            np.testing.assert_array_equal(got.to_numpy().astype("datetime64[s]"), want.to_numpy().astype("datetime64[s]"))
            assert got.isna().tolist() == (~content.cxr["present"]).tolist()
        elif col == "hours_before_prediction":
            np.testing.assert_array_equal(got.to_numpy(), want.to_numpy())
        else:
            assert got.tolist() == want.tolist(), col
    np.testing.assert_array_equal(s.ehr_values(), content.ehr_values)
    np.testing.assert_array_equal(s.ehr_observed(), ~np.isnan(content.ehr_values))
    np.testing.assert_array_equal(s.images(), content.images)
    np.testing.assert_array_equal(s.cxr_present, content.cxr["present"].to_numpy())
    assert s.phenotype_names == content.phenotype_names
    pd.testing.assert_frame_equal(s.features, content.features)
    np.testing.assert_array_equal(s.labels("mortality"), content.labels["mortality"])
    np.testing.assert_array_equal(s.labels("mortality_hosp"), content.labels["mortality_hosp"])
    np.testing.assert_array_equal(s.labels("phenotype"), content.labels["phenotype_labels"])
    np.testing.assert_array_equal(s.labels("los"), content.labels["los_class"])
    np.testing.assert_array_equal(np.asarray(s._array("labels/los")[:]), content.labels["los"])
    for k in range(3):
        np.testing.assert_array_equal(s.part(k), content.splits[:, k])
        for name in STAT_NAMES:
            np.testing.assert_array_equal(s.fold_stats(k)[name], content.stats[name][k])
    assert s.attrs["cohort_flow"] == content.attrs["cohort_flow"]
    assert s.attrs["format_version"] == FORMAT_VERSION
    assert s.attrs["n_stays"] == 40 and s.attrs["chunks"]["ehr/values"] == [16, 12, 5]
    assert s.attrs["shards"]["cxr/images"] == [16, 16, 16]
    assert s.attrs["created_by"].startswith("cbstore ")


def test_indexed_reads_and_accessors(content, store_path):
    s = open_store(store_path)
    idx = np.array([7, 2, 2, 39])
    np.testing.assert_array_equal(s.ehr_values(idx), content.ehr_values[idx])
    np.testing.assert_array_equal(s.images(idx), content.images[idx])
    mask = np.zeros(40, bool)
    mask[[1, 5]] = True
    np.testing.assert_array_equal(s.ehr_observed(mask), ~np.isnan(content.ehr_values[[1, 5]]))
    assert s.images(np.array([], dtype=int)).shape == (0, 16, 16)
    train = s.indices(0, "train")
    np.testing.assert_array_equal(train, np.flatnonzero(content.splits[:, 0] == 0))
    assert s.label_names("los")[0] == "2-3d" and len(s.label_names("phenotype")) == 25
    assert s.label_names("mortality") == ["mortality"]
    assert s.task_mask("los").tolist() == (content.labels["los_class"] >= 0).tolist()
    with pytest.raises(StoreError, match="unknown task 'ihm'"):
        s.labels("ihm")
    with pytest.raises(StoreError, match="fold 3 out of range"):
        s.part(3)
    with pytest.raises(StoreError, match="unknown part 'dev'"):
        s.indices(0, "dev")
    with pytest.raises(StoreError, match="out of range"):
        s.ehr_values([40])


def test_xarray_views_through_store(content, store_path):
    s = open_store(store_path)
    stays = s.dataset("stays")
    assert stays["intime"].dtype.kind == "M"
    np.testing.assert_array_equal(stays["stay"].values, content.stays.index.to_numpy())
    cxr = s.dataset("cxr")
    assert bool(np.isnat(cxr["study_time"].values[~content.cxr["present"].to_numpy()]).all())
    ehr = s.dataset("ehr")
    assert ehr["values"].dims == ("stay", "time", "feature")
    assert list(ehr["feature"].values) == content.features["name"].tolist()
    tree = s.datatree()
    assert set(tree.children) >= {"stays", "labels", "ehr", "cxr", "splits", "stats"}
    with pytest.raises(StoreError, match="unknown group"):
        s.dataset("nope")


def test_on_disk_encoding(store_path):
    root = zarr.open_group(str(store_path), mode="r")
    for key, spec in ARRAYS.items():
        arr = root[key]
        assert arr.metadata.zarr_format == 3
        assert tuple(arr.metadata.dimension_names) == spec.dims, key
        assert any(type(c).__name__ == "BloscCodec" for c in arr.compressors), key
    assert root["cxr/images"].chunks == (1, 16, 16) and root["cxr/images"].shards == (16, 16, 16)
    assert root["stays/intime"].attrs["units"] == "seconds since 1970-01-01"
    for g in ("stays", "labels", "ehr", "cxr", "splits", "stats"):
        assert "encoding-type" in root[g].attrs and "encoding-version" in root[g].attrs
    manifest = json.loads((store_path / MANIFEST_NAME).read_text())
    assert manifest["complete"] is True and manifest["n_stays"] == 40
    assert manifest["arrays"]["ehr/values"]["shape"] == [40, 12, 5]


def test_plain_zarr_and_xarray_read_without_cbstore(content, fresh):
    """A project without cbstore reads the store with zarr and xarray alone (store_layout.md snippets)."""
    s = open_store(fresh)
    w = s.create_embedding("cxr", "densenet121-res224-all", 4, attrs=ATTRS)
    w.write(0, np.ones((40, 4)), s.cxr_present)
    w.finish()
    code = textwrap.dedent(f"""
        import sys
        sys.modules["cbstore"] = None          # importing cbstore would now fail
        import warnings
        warnings.simplefilter("error")
        import numpy as np, zarr, xarray as xr
        path = {str(fresh)!r}
        root = zarr.open_group(path, mode="r")
        meta = root.attrs["cbstore"]
        assert meta["format_version"] == {FORMAT_VERSION!r}
        train = np.flatnonzero(root["splits/part"][:, 0] == 0)
        x = root["ehr/values"].oindex[train]
        present = root["cxr/present"][:]
        film = root["cxr/images"][int(np.flatnonzero(present)[0])]
        intime = root["stays/intime"][:].astype("datetime64[s]")
        print(x.shape[0], film.shape, str(intime.dtype), list(root["ehr/feature"][:])[1])
        ehr = xr.open_zarr(path, group="ehr")
        np.testing.assert_array_equal(ehr["values"].values, root["ehr/values"][:])
        stays = xr.open_zarr(path, group="stays")
        cxr = xr.open_zarr(path, group="cxr")
        hr = ehr["values"].sel(feature="dbp")
        table = xr.merge([stays[["subject_id", "gender"]],
                          xr.open_zarr(path, group="labels")[["mortality"]]]).to_dataframe()
        print(stays["intime"].dtype.kind, int(stays.sizes["stay"]), hr.dims, len(table),
              int(cxr["study_time"].isnull().sum()))
        tree = xr.open_datatree(path, engine="zarr")
        emb = tree["embeddings/cxr/densenet121-res224-all"]
        print(sorted(tree.children), emb.attrs["complete"], emb["values"].shape)
        assert sys.modules["cbstore"] is None
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")
    n_train = int((content.splits[:, 0] == 0).sum())
    assert lines[0] == f"{n_train} (16, 16) datetime64[s] dbp"
    n_absent = int((~content.cxr["present"]).sum())
    assert lines[1] == f"M 40 ('stay', 'time') 40 {n_absent}"
    assert "embeddings" in lines[2] and "stays" in lines[2] and lines[2].endswith("True (40, 4)")


# ----------------------------------------------------------------------------- build safety


def test_crash_before_manifest_leaves_nothing(content, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(write_mod, "_write_manifest", boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_store(tmp_path / "s.zarr", content)
    assert list(tmp_path.iterdir()) == []  # no final path, and the partial folder was removed


def test_missing_store_names_an_interrupted_build(tmp_path):
    (tmp_path / "s.zarr.build").mkdir()
    with pytest.raises(StoreError, match=r"no store at .*s\.zarr .*interrupted `cbstore build` left "
                                         r"s\.zarr\.build/: run the same build command again"):
        open_store(tmp_path / "s.zarr")


def test_killed_build_leaves_only_partial(content, tmp_path):
    writer = StoreWriter(tmp_path / "s.zarr", content, image_size=16)
    writer.write_images(0, content.images)
    # the process "dies" here: no finish(), no abort()
    (partial,) = tmp_path.iterdir()
    assert partial.name.startswith("s.zarr.partial-")
    with pytest.raises(StoreError, match=r"no store at .*s\.zarr .*unfinished build left s\.zarr\.partial-"):
        open_store(tmp_path / "s.zarr")
    with pytest.raises(StoreError, match=r"incomplete store at .*no cbstore_manifest\.json.*rebuild with --overwrite"):
        open_store(partial)


def test_open_store_errors(tmp_path, store_path):
    with pytest.raises(StoreError, match="no store at"):
        open_store(tmp_path / "missing.zarr")
    (tmp_path / "file.zarr").write_text("x")
    with pytest.raises(StoreError, match="is a file"):
        open_store(tmp_path / "file.zarr")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="not a Zarr v3 group"):
        open_store(tmp_path / "empty")
    copy = tmp_path / "nomanifest.zarr"
    shutil.copytree(store_path, copy)
    (copy / MANIFEST_NAME).unlink()
    with pytest.raises(StoreError, match="incomplete store"):
        open_store(copy)


def test_existing_target_needs_overwrite(content, fresh):
    with pytest.raises(StoreExistsError, match="exists; pass --overwrite"):
        write_store(fresh, content)
    other = random_content(n_stays=12, n_folds=2, window=12, n_features=5, image_size=16, seed=9)
    write_store(fresh, other, overwrite=True)
    s = open_store(fresh)
    assert s.n_stays == 12
    assert [p.name for p in fresh.parent.iterdir()] == [fresh.name]  # no .old or .partial left


def test_overwrite_refuses_foreign_directory(content, tmp_path):
    target = tmp_path / "precious"
    target.mkdir()
    (target / "thesis.tex").write_text("do not delete")
    with pytest.raises(StoreExistsError, match="not a cbstore store; refusing"):
        write_store(target, content, overwrite=True)
    assert (target / "thesis.tex").exists()


def test_version_refusal(fresh):
    meta_path = fresh / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["cbstore"]["format_version"] = "2.1.0"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(StoreVersionError, match=r"format version 2\.1\.0.*reads format 1\.1\.0.*upgrade cbstore"):
        open_store(fresh)
    meta["attributes"]["cbstore"]["format_version"] = "1.7.2"  # minor differences are readable
    meta_path.write_text(json.dumps(meta))
    assert open_store(fresh).attrs["format_version"] == "1.7.2"


def test_streaming_writer_alignment(content, tmp_path):
    with StoreWriter(tmp_path / "s.zarr", content, image_size=16, chunk_stays=16) as w:
        with pytest.raises(StoreContentError, match="not aligned to shards of 16"):
            w.write_images(8, content.images[8:24])
        bad = content.images[:16].copy()
        absent = int(np.flatnonzero(~content.cxr["present"].to_numpy()[:16])[0])
        bad[absent] = 7
        with pytest.raises(StoreContentError, match=f"stay position {absent} has no film"):
            w.write_images(0, bad)
        w.write_images(0, content.images[:16])
        with pytest.raises(StoreError, match="were never written"):
            w.finish()
        w.write_images(16, content.images[16:32])
        w.write_images(32, content.images[32:])
        path = w.finish()
    np.testing.assert_array_equal(open_store(path).images(), content.images)


def _shard_index(path, shard_stays):
    """(offset, nbytes) per inner chunk of a shard file (index at the end, then a CRC32C)."""
    raw = path.read_bytes()
    index = np.frombuffer(raw[-(16 * shard_stays + 4):-4], dtype="<u8").reshape(shard_stays, 2)
    return raw, index


def test_image_shards_hold_only_present_films(tmp_path):
    c = random_content(n_stays=40, n_folds=2, window=6, n_features=4, image_size=8, seed=4)
    present = c.cxr["present"].to_numpy().copy()
    present[16:32] = False  # shard 1 has no film at all
    c.cxr.loc[c.cxr.index[16:32], ["present", "absent_reason"]] = [False, "no_eligible_film"]
    c.images[16:32] = 0
    with StoreWriter(tmp_path / "s.zarr", c, image_size=8, chunk_stays=16) as writer:
        writer.write_images(0, c.images)  # one block of three shards
        path = writer.finish()
    shard_dir = path / "cxr" / "images" / "c"
    assert sorted(p.name for p in shard_dir.iterdir()) == ["0", "2"]  # no file for the empty shard
    empty = np.iinfo(np.uint64).max
    for shard in (0, 2):
        raw, index = _shard_index(shard_dir / str(shard) / "0" / "0", 16)
        rows = present[shard * 16:(shard + 1) * 16]
        rows = np.pad(rows, (0, 16 - rows.size))  # the last shard is partial (40 = 2 x 16 + 8)
        assert (index[~rows] == empty).all(), "an absent stay's chunk was written"
        assert (index[rows] != empty).all()
        assert index[rows, 0].tolist() == sorted(index[rows, 0].tolist())  # films in stay order
    np.testing.assert_array_equal(open_store(path).images(), c.images)


def test_image_shards_are_those_zarr_writes(tmp_path):
    """The shard writer's files are byte-identical to zarr's own writes of the same films."""
    c = random_content(n_stays=40, n_folds=2, window=6, n_features=4, image_size=8, seed=6)
    path = write_store(tmp_path / "s.zarr", c, chunk_stays=16)
    ours = zarr.open_array(str(path / "cxr" / "images"), mode="r")
    theirs = zarr.create_array(str(tmp_path / "zarr.zarr"), shape=ours.shape, dtype="uint8", chunks=ours.chunks,
                               shards=ours.shards, fill_value=0, compressors=ours.compressors,
                               dimension_names=ours.metadata.dimension_names)
    theirs[...] = c.images
    assert theirs.metadata.to_dict()["codecs"] == ours.metadata.to_dict()["codecs"]
    for shard in range(3):
        key = f"c/{shard}/0/0"
        assert (path / "cxr" / "images" / key).read_bytes() == (tmp_path / "zarr.zarr" / key).read_bytes(), key


def test_shard_writer_refuses_other_codecs(tmp_path):
    from cbstore.store.image_shards import ShardWriter

    plain = zarr.create_array(str(tmp_path / "a.zarr"), shape=(4, 8, 8), dtype="uint8", chunks=(1, 8, 8),
                              shards=(2, 8, 8), compressors=(zarr.codecs.ZstdCodec(level=1),))
    with pytest.raises(StoreError, match=r"cannot write image shards of .*a\.zarr: its layout or codecs"):
        ShardWriter(plain, tmp_path / "a.zarr")
    unsharded = zarr.create_array(str(tmp_path / "b.zarr"), shape=(4, 8, 8), dtype="uint8", chunks=(1, 8, 8))
    with pytest.raises(StoreError, match="cannot write image shards"):
        ShardWriter(unsharded, tmp_path / "b.zarr")


def test_codecs_per_array(store_path):
    root = zarr.open_group(str(store_path), mode="r")

    def blosc(key):
        (codec,) = root[key].compressors
        return codec.cname.value, codec.clevel, codec.shuffle.value

    assert blosc("cxr/images") == ("zstd", 1, "bitshuffle")
    assert blosc("ehr/observed") == ("zstd", 1, "bitshuffle")
    assert blosc("ehr/values") == ("zstd", 1, "shuffle")
    assert blosc("stays/intime") == ("zstd", 1, "shuffle")
    assert blosc("stays/race") == ("zstd", 1, "noshuffle")


def test_failure_while_writing_tables_leaves_nothing(content, tmp_path, monkeypatch):
    real = zarr.AsyncArray.setitem

    async def fail_on_ehr(self, selection, value, **kwargs):
        if self.path == "ehr/values":
            raise OSError("simulated full disk")
        return await real(self, selection, value, **kwargs)

    monkeypatch.setattr(zarr.AsyncArray, "setitem", fail_on_ehr)
    with pytest.raises(OSError, match="simulated full disk"):
        write_store(tmp_path / "s.zarr", content)
    assert list(tmp_path.iterdir()) == []


def test_writer_works_inside_a_running_event_loop(content, tmp_path):
    """As in a Jupyter cell: the writer runs zarr's async API on a loop of its own."""
    import asyncio

    async def inside():
        return write_store(tmp_path / "s.zarr", content, chunk_stays=16)

    path = asyncio.run(inside())
    np.testing.assert_array_equal(open_store(path).images(), content.images)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: setattr(c, "stays", c.stays.iloc[::-1]), "sorted ascending"),
        (lambda c: c.splits.__setitem__((0, 0), 5), r"codes must be 0 \(train\)"),
        (lambda c: setattr(c, "ehr_values", c.ehr_values[:, :, :3]), r"content.ehr_values: expected shape"),
        (lambda c: c.attrs.pop("cohort_flow"), "content.attrs: 'cohort_flow' is a required property"),
        (lambda c: c.labels.__setitem__("mortality", (c.labels["mortality"] + 2).astype("int8")), "values must be 0/1"),
        (lambda c: c.stays.__setitem__("intime", c.stays["intime"].where(c.stays.index != c.stays.index[3])),
         r"content.stays\['intime'\]: missing datetimes at rows \[3\]"),
        (lambda c: c.labels.__setitem__("mortality", c.labels["mortality"] + 0.5),
         r"content.labels\['mortality'\]: values do not fit int8"),
        (lambda c: c.stays.__setitem__("subject_id", c.stays["subject_id"].astype("str")),
         r"content.stays\['subject_id'\]: expected int64 values"),
    ],
)
def test_bad_content_is_refused(edit, message, tmp_path):
    c = random_content(n_stays=12, n_folds=2, window=6, n_features=4, image_size=8, seed=1)
    edit(c)
    with pytest.raises(StoreContentError, match=message):
        write_store(tmp_path / "s.zarr", c)
    assert list(tmp_path.iterdir()) == []


def test_random_content_is_deterministic():
    a = random_content(n_stays=20, seed=5)
    b = random_content(n_stays=20, seed=5)
    pd.testing.assert_frame_equal(a.stays, b.stays)
    np.testing.assert_array_equal(a.ehr_values, b.ehr_values)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.splits, b.splits)
    assert 0.1 < a.cxr["present"].mean() < 0.6


# -------------------------------------------------------------------------------- embeddings


def _fill(writer, rng, folds=(None,), seq=False, skip=()):
    for r in range(writer.n_regions):
        sl = writer.region(r)
        k = sl.stop - sl.start
        present = rng.random(k) < 0.7
        for f in folds:
            if (r, f) in skip:
                continue
            values = rng.normal(size=(k, writer.dim)).astype(np.float32)
            sequence = rng.normal(size=(k, 12, writer.sequence_dim)) if seq else None
            writer.write(r, values, present, fold=f, sequence=sequence)


def test_embedding_write_finish_read(fresh):
    s = open_store(fresh)
    w = s.create_embedding("cxr", "densenet-test", 8, attrs=ATTRS, region_stays=16)
    assert w.n_regions == 3 and w.region(2) == slice(32, 40)
    assert s.embeddings() == []  # not complete yet
    _fill(w, np.random.default_rng(0))
    w.finish()
    s = open_store(fresh)
    (info,) = s.embeddings()
    assert info["encoder_id"] == "densenet-test" and info["modality"] == "cxr"
    assert info["dim"] == 8 and info["per_fold"] is False and info["complete"] is True
    assert info["weights"] == "random-init" and "zarr" in info["library_versions"]
    values, present = s.embedding("cxr", "densenet-test")
    assert values.shape == (40, 8) and values.dtype == np.float32
    assert np.isnan(values[~present]).all() and np.isfinite(values[present]).all()
    # the store (and its embedding) still reads with plain xarray
    import xarray as xr

    tree = xr.open_datatree(str(fresh), engine="zarr")
    assert tree["embeddings/cxr/densenet-test"]["values"].shape == (40, 8)


def test_embedding_resume_and_complete_refusal(fresh):
    s = open_store(fresh)
    rng = np.random.default_rng(1)
    w = s.create_embedding("ehr", "ehr-stats", 4, attrs=ATTRS, region_stays=16)
    sl = w.region(1)
    w.write(1, np.ones((16, 4)), np.ones(16, bool))
    w.write(1, np.ones((16, 4)), np.ones(16, bool))  # idempotent
    with pytest.raises(EmbeddingError, match=r"2 region\(s\) not written yet \(region 0, region 2\)"):
        w.finish()
    resumed = open_store(fresh).create_embedding("ehr", "ehr-stats", 4, attrs=ATTRS, region_stays=16)
    assert resumed.done_regions().tolist() == [False, True, False]
    with pytest.raises(EmbeddingError, match="was started with"):
        open_store(fresh).create_embedding("ehr", "ehr-stats", 5, attrs=ATTRS, region_stays=16)
    for r in (0, 2):
        k = resumed.region(r).stop - resumed.region(r).start
        resumed.write(r, rng.normal(size=(k, 4)), np.ones(k, bool))
    resumed.finish()
    values, present = open_store(fresh).embedding("ehr", "ehr-stats")
    np.testing.assert_array_equal(values[sl], np.ones((16, 4)))
    with pytest.raises(EmbeddingError, match="already complete; pass --overwrite"):
        open_store(fresh).create_embedding("ehr", "ehr-stats", 4, attrs=ATTRS, region_stays=16)
    # overwrite starts again; the old complete group disappears from readers at once
    again = open_store(fresh).create_embedding("ehr", "ehr-stats", 4, attrs=ATTRS, overwrite=True, region_stays=16)
    assert not again.done_regions().any()
    assert open_store(fresh).embeddings() == []


def test_embedding_nan_refusal_names_stays(fresh):
    s = open_store(fresh)
    w = s.create_embedding("cxr", "nan-test", 3, attrs=ATTRS, region_stays=16)
    values = np.zeros((16, 3))
    values[5, 1] = np.nan
    present = np.ones(16, bool)
    with pytest.raises(EmbeddingError, match=rf"NaN/inf values for present stays \[{s.stay_ids[5]}\]"):
        w.write(0, values, present)
    present[5] = False  # NaN for an absent stay is fine
    w.write(0, values, present)
    # a present stay whose value is NaN on disk (e.g. a worker wrote garbage) is caught by finish
    for r in (1, 2):
        k = w.region(r).stop - w.region(r).start
        w.write(r, np.zeros((k, 3)), np.ones(k, bool))
    zarr.open_group(str(fresh), mode="r+", use_consolidated=False)["embeddings/cxr/nan-test/values"][20, 0] = np.nan
    with pytest.raises(EmbeddingError, match=rf"present stays \[{s.stay_ids[20]}\]"):
        w.finish()


def test_embedding_per_fold_with_sequence(fresh):
    s = open_store(fresh)
    w = s.create_embedding("ehr", "ehr-lstm", 6, per_fold=True, sequence_dim=2, attrs=ATTRS, region_stays=32)
    rng = np.random.default_rng(2)
    _fill(w, rng, folds=(0, 1, 2), seq=True, skip={(1, 2)})
    assert w.done_regions().tolist() == [True, False]  # region 1 misses fold 2
    with pytest.raises(EmbeddingError, match="region 1 fold 2"):
        w.finish()
    with pytest.raises(EmbeddingError, match="needs fold="):
        w.write(1, np.zeros((8, 6)), np.ones(8, bool))
    with pytest.raises(EmbeddingError, match="present differs from the folds already written"):
        w.write(1, np.zeros((8, 6)), np.ones(8, bool), fold=2, sequence=np.zeros((8, 12, 2)))
    present = np.asarray(zarr.open_group(str(fresh), mode="r")["embeddings/ehr/ehr-lstm/present"][32:])
    w.write(1, np.zeros((8, 6)), present, fold=2, sequence=np.zeros((8, 12, 2)))
    w.finish()
    s = open_store(fresh)
    with pytest.raises(EmbeddingError, match="trained per fold; pass fold="):
        s.embedding("ehr", "ehr-lstm")
    values, present_all = s.embedding("ehr", "ehr-lstm", fold=2)
    assert values.shape == (40, 6)
    np.testing.assert_array_equal(present_all[32:], present)
    np.testing.assert_array_equal(values[32:][present], np.zeros((int(present.sum()), 6)))
    assert np.isnan(values[32:][~present]).all()
    assert s.embedding_sequence("ehr", "ehr-lstm", fold=0).shape == (40, 12, 2)


def test_embedding_lookup_errors_list_available(fresh):
    s = open_store(fresh)
    w = s.create_embedding("cxr", "enc-a", 2, attrs=ATTRS)
    w.write(0, np.zeros((40, 2)), np.ones(40, bool))
    w.finish()
    s = open_store(fresh)
    with pytest.raises(EmbeddingError, match=r"no complete embedding cxr/enc-b .*available: cxr/enc-a"):
        s.embedding("cxr", "enc-b")
    with pytest.raises(EmbeddingError, match="stores no per-hour sequence"):
        s.embedding_sequence("cxr", "enc-a")
    with pytest.raises(EmbeddingError, match=r"lack \['preprocessing'\]"):
        s.create_embedding("cxr", "enc-c", 2, attrs={"weights": None})
    with pytest.raises(EmbeddingError, match="unknown modality"):
        s.create_embedding("text", "enc-c", 2, attrs=ATTRS)


def test_embedding_read_only_store(fresh, monkeypatch):
    s = open_store(fresh)
    mode = fresh.stat().st_mode
    os.chmod(fresh, mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        with pytest.raises(StoreReadOnlyError, match=r"store .* is read-only"):
            s.create_embedding("cxr", "enc", 2, attrs=ATTRS)
    finally:
        os.chmod(fresh, mode)
    monkeypatch.setattr(store_mod.os, "access", lambda *a, **k: False)
    with pytest.raises(StoreReadOnlyError, match="is read-only"):
        s.create_embedding("cxr", "enc", 2, attrs=ATTRS)


def test_embedding_regions_from_separate_processes(fresh):
    """Two processes write disjoint regions of one embedding (the dask path); the flags survive."""
    s = open_store(fresh)
    w = s.create_embedding("cxr", "parallel", 3, attrs=ATTRS, region_stays=8)
    assert w.n_regions == 5
    code = textwrap.dedent("""
        import sys, numpy as np
        from cbstore.store.embeddings import EmbeddingWriter
        w = EmbeddingWriter.open(sys.argv[1], "cxr", "parallel")
        for r in map(int, sys.argv[2].split(",")):
            k = w.region(r).stop - w.region(r).start
            w.write(r, np.full((k, 3), r, dtype=np.float32), np.ones(k, bool))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(fresh), regions])
             for regions in ("0,2,4", "1,3")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert w.done_regions().all()
    w.finish()
    values, _ = open_store(fresh).embedding("cxr", "parallel")
    np.testing.assert_array_equal(values[:, 0], np.repeat(np.arange(5), 8).astype(np.float32))
    assert isinstance(EmbeddingWriter.open(fresh, "cxr", "parallel"), EmbeddingWriter)


def test_float64_content_is_stored_as_float32(tmp_path):
    c = random_content(n_stays=12, n_folds=2, window=6, n_features=4, image_size=8, seed=2)
    c.ehr_values = c.ehr_values.astype(np.float64) + 1e-9
    c.labels["los"] = c.labels["los"].astype(np.float64)
    s = open_store(write_store(tmp_path / "s.zarr", c))
    assert s.ehr_values().dtype == np.float32
    np.testing.assert_array_equal(s.ehr_values(), c.ehr_values.astype(np.float32))
