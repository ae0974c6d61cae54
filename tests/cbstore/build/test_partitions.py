"""Partitioned build: the same store whatever the partitioning, and resuming an interrupted build.

The store's chunk size is lowered to 4 stays here (``CHUNK_STAYS``), so that a 60-stay synthetic
source really is cut into many partitions (a partition is a run of whole chunks).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from cbstore.build.config import BuildConfig, ConfigError
from cbstore.build.pipeline import build_store, partition_rows
import cbstore.build.pipeline as build_module
from cbstore.build.resume import why_different
from cbstore.store.reader import open_store
import cbstore.store.writer as store_write
from cbstore.synth import write_synthetic_source
from cli.build_cmd import build as build_command
from support import assert_same_build

CONFIG = BuildConfig(image_size=16, n_folds=2, val_fraction=0.0, workers=0, threads=1)
CHUNK = 4


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A small synthetic source and the store of an unpartitioned build (one partition)."""
    root = tmp_path_factory.mktemp("partitions")
    summary = write_synthetic_source(root / "source", n_stays=60, seed=5, image_size=24)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(build_module, "CHUNK_STAYS", CHUNK)
        reference = build_store(summary.mimic_iv, summary.mimic_cxr, root / "one.zarr",
                                CONFIG.replace(partitions=1), progress=False)
    return summary, reference


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(build_module, "CHUNK_STAYS", CHUNK)


def _recording(monkeypatch, fail_at: int | None = None) -> list[int]:
    """Record the first row of every partition processed; raise on the ``fail_at``-th (0-based)."""
    starts: list[int] = []
    real = build_module._process_partition

    def process(*args):
        if fail_at is not None and len(starts) == fail_at:
            raise RuntimeError("power cut")
        starts.append(args[-1])
        return real(*args)

    monkeypatch.setattr(build_module, "_process_partition", process)
    return starts


@pytest.mark.parametrize("partitions", [3, 7, 1000])
def test_same_store_whatever_the_partitioning(source, tmp_path, small_chunks, monkeypatch, partitions):
    summary, reference = source
    starts = _recording(monkeypatch)
    path = build_store(summary.mimic_iv, summary.mimic_cxr, tmp_path / "p.zarr", CONFIG.replace(partitions=partitions),
                       progress=False)
    n_chunks = -(-open_store(path).n_stays // CHUNK)
    assert len(starts) == min(partitions, n_chunks) > 1  # 1000 partitions: one per chunk, more than stays
    assert starts == sorted(starts) and all(s % CHUNK == 0 for s in starts)
    assert_same_build(reference, path)


def test_partition_rows_are_whole_chunks_in_order():
    assert partition_rows(10, 4, 1) == [(0, 10)]
    assert partition_rows(10, 4, 2) == [(0, 4), (4, 10)]
    assert partition_rows(10, 4, 99) == [(0, 4), (4, 8), (8, 10)]
    assert partition_rows(3, 4, 5) == [(0, 3)]
    rows = partition_rows(1000, 7, 9)
    assert rows[0][0] == 0 and rows[-1][1] == 1000 and len(rows) == 9
    assert all(a[1] == b[0] and b[0] % 7 == 0 for a, b in zip(rows, rows[1:]))


def test_interrupted_build_resumes_after_the_finished_partitions(source, tmp_path, small_chunks, monkeypatch,
                                                                  caplog):
    summary, reference = source
    out = tmp_path / "r.zarr"
    config = CONFIG.replace(partitions=5)
    first = _recording(monkeypatch, fail_at=2)
    with pytest.raises(RuntimeError, match="power cut"):
        build_store(summary.mimic_iv, summary.mimic_cxr, out, config, progress=False)
    assert not out.exists() and len(first) == 2
    assert len(list((tmp_path / "r.zarr.build" / "partitions").glob("*.json"))) == 2

    monkeypatch.undo()
    monkeypatch.setattr(build_module, "CHUNK_STAYS", CHUNK)
    second = _recording(monkeypatch)
    caplog.set_level(logging.DEBUG, logger="cbstore")
    path = build_store(summary.mimic_iv, summary.mimic_cxr, out, config, progress=False)
    assert len(second) == 3 and not set(first) & set(second)  # only the remaining partitions
    assert "resuming: 2 of 5 partitions already finished" in caplog.text
    done = [int(m) for m in re.findall(r"partition (\d+)/5 \(stays", caplog.text)]
    assert done == [3, 4, 5]
    assert "EHR events: extracted by an earlier run" in caplog.text
    assert not (tmp_path / "r.zarr.build").exists()
    assert_same_build(reference, path)


def test_changed_source_file_starts_over_and_says_why(source, tmp_path, small_chunks, monkeypatch, caplog):
    summary, reference = source
    out = tmp_path / "c.zarr"
    config = CONFIG.replace(partitions=4)
    _recording(monkeypatch, fail_at=2)
    with pytest.raises(RuntimeError, match="power cut"):
        build_store(summary.mimic_iv, summary.mimic_cxr, out, config, progress=False)

    chartevents = next(Path(summary.mimic_iv).rglob("chartevents.csv*"))
    stat = chartevents.stat()
    try:
        os.utime(chartevents, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        monkeypatch.undo()
        monkeypatch.setattr(build_module, "CHUNK_STAYS", CHUNK)
        again = _recording(monkeypatch, fail_at=1)
        caplog.set_level(logging.DEBUG, logger="cbstore")
        with pytest.raises(RuntimeError, match="power cut"):
            build_store(summary.mimic_iv, summary.mimic_cxr, out, config, progress=False)
        assert again == [0]  # started over: partition 0 again
        warning = [r for r in caplog.records if r.levelno == logging.WARNING and "starting the build over" in r.message]
        assert len(warning) == 1 and f"{chartevents} changed (size or modification time)" in warning[0].message

        caplog.clear()
        monkeypatch.undo()
        monkeypatch.setattr(build_module, "CHUNK_STAYS", CHUNK)
        fresh = _recording(monkeypatch)
        path = build_store(summary.mimic_iv, summary.mimic_cxr, out, config, overwrite=True, progress=False)
        assert fresh[0] == 0 and len(fresh) == 4  # --overwrite starts over too
        assert "--overwrite was given" in caplog.text
    finally:
        os.utime(chartevents, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert_same_build(reference, path)


@pytest.mark.parametrize("n_candidates, expected", [(1, 1), (1000, 1), (2303, 1), (2304, 2), (3080, 2), (24362, 16)])
def test_the_default_count_makes_partitions_closest_to_1536_stays(n_candidates, expected):
    assert build_module._partition_count(BuildConfig(), n_candidates) == expected
    assert build_module._partition_count(BuildConfig(partitions=3), n_candidates) == min(3, -(-n_candidates // 256))


@pytest.mark.parametrize("n_stays", [5000, 12219, 24362, 73181])
def test_default_partitions_of_a_large_source_hold_about_the_same_stays(n_stays):
    plan = partition_rows(n_stays, 256, build_module._partition_count(BuildConfig(), n_stays))
    sizes = [stop - start for start, stop in plan]
    assert all(1024 <= size <= 1792 for size in sizes[:-1]) and max(sizes) <= 1792


def test_partitions_setting_is_validated():
    with pytest.raises(ConfigError, match="'partitions' = 0"):
        BuildConfig(partitions=0)
    assert BuildConfig().partitions is None and "partitions" in BuildConfig().runtime_dict()


def test_build_interrupted_while_finishing_resumes(source, tmp_path, small_chunks, monkeypatch):
    summary, reference = source
    out = tmp_path / "f.zarr"
    config = CONFIG.replace(partitions=2)

    def fail(*args):
        raise RuntimeError("killed while finishing")

    monkeypatch.setattr(store_write, "_write_manifest", fail)  # after the other arrays were written
    with pytest.raises(RuntimeError, match="killed while finishing"):
        build_store(summary.mimic_iv, summary.mimic_cxr, out, config, progress=False)
    assert not out.exists() and (tmp_path / "f.zarr.build" / "partial.zarr" / "stays").is_dir()
    monkeypatch.undo()
    monkeypatch.setattr(build_module, "CHUNK_STAYS", CHUNK)
    again = _recording(monkeypatch)
    path = build_store(summary.mimic_iv, summary.mimic_cxr, out, config, progress=False)
    assert again == []  # every partition was finished
    assert_same_build(reference, path)


def test_cli_partitions_option(source, tmp_path):
    summary, _ = source
    args = ["--mimic-iv", str(summary.mimic_iv), "--mimic-cxr", str(summary.mimic_cxr), "--out",
            str(tmp_path / "cli.zarr"), "--image-size", "16", "--workers", "0", "--quiet"]
    result = CliRunner().invoke(build_command, [*args, "--partitions", "0"])
    assert result.exit_code == 1 and "'partitions' = 0" in result.output
    result = CliRunner().invoke(build_command, [*args, "--partitions", "2"])
    assert result.exit_code == 0, result.output
    assert open_store(tmp_path / "cli.zarr").attrs["runtime"]["partitions"] == 2


def test_resume_key_differences_are_named():
    files = {"mimic-iv/icu/chartevents": {"path": "/m/icu/chartevents.csv.gz", "size": 10, "mtime_ns": 1}}
    key = {"cbstore_version": "1", "config_sha256": "a", "variables_sha256": "v", "phenotypes_sha256": "p",
           "partitions": 3, "chunk_stays": 256, "sources": files}
    assert why_different(key, dict(key)) is None
    assert why_different(key, {**key, "partitions": 7}) == "the partition count changed (3 -> 7)"
    assert "build settings (config hash)" in why_different(key, {**key, "config_sha256": "b"})
    grown = {"mimic-iv/icu/chartevents": {**files["mimic-iv/icu/chartevents"], "size": 11}}
    assert why_different(key, {**key, "sources": grown}) == \
        "the source file /m/icu/chartevents.csv.gz changed (size or modification time)"
    assert "disappeared" in why_different(key, {**key, "sources": {}})
