"""The encoding pass: what it writes, provenance, resume after a crash, Dask, guards and errors."""

from __future__ import annotations

import os
import shutil
import stat

import numpy as np
import pandas as pd
import pytest
import torch

from cbstore.errors import StoreError, StoreReadOnlyError
from cbstore.store.embeddings import EmbeddingWriter
from cbstore.store.reader import open_store
from cbstore.store.writer import write_store
from cbstore.testing import random_content
from encoders.cxr import CxrEncoder
from encoders.errors import (
    EncoderError, EncodingInputError, NonFiniteEmbeddingError, UnknownEncoderError, WeightsError,
)
from encoders.pass_ import ALREADY_COMPLETE, run_encoding_pass

DN = "densenet121-res224-chex"
DN_RANDOM = f"{DN}-random"
FAST = dict(weights="random", input_size=32, region_stays=8, progress=False, threads=1)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def base_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "store.zarr"
    write_store(path, random_content(n_stays=40, image_size=32, seed=3))
    return path


@pytest.fixture
def store_path(base_store, tmp_path):
    path = tmp_path / "store.zarr"
    shutil.copytree(base_store, path)
    yield path
    os.chmod(path, 0o755)


@pytest.fixture
def forward_calls(monkeypatch):
    """Count films run through any CXR encoder."""
    calls = []
    original = CxrEncoder.embed

    def counting(self, x):
        calls.append(len(x))
        return original(self, x)

    monkeypatch.setattr(CxrEncoder, "embed", counting)
    return calls


def _reference_embedding(store, seed=0):
    """DenseNet features2 called directly on the stored films, region by region (batch <= 32)."""
    import torchxrayvision as xrv

    torch.manual_seed(seed)
    model = xrv.models.DenseNet(weights=None).eval()
    present = store.cxr_present
    out = np.full((store.n_stays, 1024), np.nan, dtype=np.float32)
    for start in range(0, store.n_stays, 8):
        pos = np.flatnonzero(present[start:start + 8]) + start
        if len(pos):
            x = torch.from_numpy(xrv.utils.normalize(store.images(pos), 255))[:, None]
            with torch.inference_mode():
                out[pos] = model.features2(x).numpy()
    return out


# ------------------------------------------------------------------------------------ CXR pass

def test_cxr_pass_equals_direct_forward_and_skips_absent_films(store_path, forward_calls):
    summary = run_encoding_pass(store_path, DN, **FAST)
    store = open_store(store_path)
    present_films = int(store.cxr_present.sum())
    assert summary["status"] == "complete" and summary["encoder_id"] == DN_RANDOM
    assert summary["items"] == present_films == sum(forward_calls)   # absent films never run
    values, present = store.embedding("cxr", DN_RANDOM)
    assert np.array_equal(present, store.cxr_present)
    assert np.isnan(values[~present]).all() and np.isfinite(values[present]).all()
    assert np.array_equal(values, _reference_embedding(store), equal_nan=True)


def test_cxr_pass_records_provenance(store_path):
    run_encoding_pass(store_path, DN, **FAST)
    (entry,) = [e for e in open_store(store_path).embeddings() if e["encoder_id"] == DN_RANDOM]
    assert entry["modality"] == "cxr" and entry["dim"] == 1024 and entry["per_fold"] is False
    assert entry["complete"] is True and entry["created_at"]
    assert entry["weights"] == "random" and entry["seed"] == 0 and entry["weights_sha256"] is None
    assert entry["image_size"] == 32 and entry["input_resolution"] == 32 and entry["native_resolution"] == 224
    assert {"torch", "torchvision", "torchxrayvision"} <= set(entry["library_versions"])
    assert "1024" in entry["preprocessing"]["scaling"]
    assert entry["encoder_name"] == DN and entry["leakage_note"] == ""


def test_random_weights_carry_no_mimic_leakage_note(store_path):
    """The caveat is about weights trained on MIMIC-CXR; random weights were trained on nothing."""
    run_encoding_pass(store_path, "densenet121-res224-mimic_ch", **FAST)
    (entry,) = [e for e in open_store(store_path).embeddings()
                if e["encoder_id"] == "densenet121-res224-mimic_ch-random"]
    assert entry["leakage_note"] == ""


def test_rerun_is_a_no_op_unless_overwrite(store_path, forward_calls):
    run_encoding_pass(store_path, DN, **FAST)
    n_first = len(forward_calls)
    again = run_encoding_pass(store_path, DN, **FAST)
    assert again["status"] == ALREADY_COMPLETE and len(forward_calls) == n_first
    with pytest.raises(EncoderError, match="other settings"):
        run_encoding_pass(store_path, DN, **{**FAST, "seed": 9})
    redo = run_encoding_pass(store_path, DN, overwrite=True, **FAST)
    assert redo["status"] == "complete" and len(forward_calls) == 2 * n_first


def test_dataloader_workers_give_the_same_bytes(store_path, base_store, tmp_path):
    other = tmp_path / "other.zarr"
    shutil.copytree(base_store, other)
    run_encoding_pass(store_path, DN, workers=0, **FAST)
    run_encoding_pass(other, DN, workers=2, **FAST)
    a = open_store(store_path).embedding("cxr", DN_RANDOM)[0]
    b = open_store(other).embedding("cxr", DN_RANDOM)[0]
    assert a.tobytes() == b.tobytes()


def test_crash_then_resume_computes_only_the_remaining_regions(store_path, base_store, tmp_path,
                                                              monkeypatch, forward_calls):
    original_write = EmbeddingWriter.write
    written = []

    def crashing_write(self, r, *args, **kwargs):
        if len(written) == 2:
            raise KeyboardInterrupt("simulated crash")
        original_write(self, r, *args, **kwargs)
        written.append(r)

    monkeypatch.setattr(EmbeddingWriter, "write", crashing_write)
    with pytest.raises(KeyboardInterrupt):
        run_encoding_pass(store_path, DN, **FAST)
    monkeypatch.setattr(EmbeddingWriter, "write", original_write)

    store = open_store(store_path)
    assert DN_RANDOM not in [e["encoder_id"] for e in store.embeddings()]   # not visible as complete
    with pytest.raises(StoreError):
        store.embedding("cxr", DN_RANDOM)
    present = store.cxr_present
    films_in_done = int(sum(present[r * 8:(r + 1) * 8].sum() for r in written))
    remaining = int(present.sum()) - films_in_done
    assert films_in_done > 0, "the fixture should have films in the first regions"

    forward_calls.clear()
    summary = run_encoding_pass(store_path, DN, **FAST)
    assert summary["regions_computed"] == 5 - len(written)
    assert sum(forward_calls) == summary["items"] == remaining

    uninterrupted = tmp_path / "clean.zarr"
    shutil.copytree(base_store, uninterrupted)
    run_encoding_pass(uninterrupted, DN, **FAST)
    a = open_store(store_path).embedding("cxr", DN_RANDOM)
    b = open_store(uninterrupted).embedding("cxr", DN_RANDOM)
    assert a[0].tobytes() == b[0].tobytes() and np.array_equal(a[1], b[1])


def test_resume_with_other_weights_is_refused(store_path, monkeypatch):
    def crash(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(EmbeddingWriter, "write", crash)
    with pytest.raises(KeyboardInterrupt):
        run_encoding_pass(store_path, DN, **FAST)
    monkeypatch.undo()
    with pytest.raises(EncoderError, match="seed"):
        run_encoding_pass(store_path, DN, **{**FAST, "seed": 1})


def test_nan_output_stops_the_pass_naming_the_stays(store_path, monkeypatch):
    store = open_store(store_path)
    first = int(np.flatnonzero(store.cxr_present)[0])
    original = CxrEncoder.embed

    def poisoned(self, x):
        out = original(self, x).clone()
        out[0, 3] = float("nan")
        return out

    monkeypatch.setattr(CxrEncoder, "embed", poisoned)
    with pytest.raises(NonFiniteEmbeddingError) as err:
        run_encoding_pass(store_path, DN, **FAST)
    assert str(store.stay_ids[first]) in str(err.value)
    assert open_store(store_path).embeddings() == []


# ------------------------------------------------------------------------------------ EHR passes

def test_ehr_stats_pass_keeps_nan_and_equals_the_encoder(store_path):
    from encoders.ehr_stats import EhrStatsEncoder

    summary = run_encoding_pass(store_path, "ehr-stats", region_stays=8, progress=False)
    store = open_store(store_path)
    values, present = store.embedding("ehr", "ehr-stats")
    expected = EhrStatsEncoder(store.features["name"], store.window_hours)(store.ehr_values())
    assert summary["dim"] == values.shape[1] == expected.shape[1] and present.all()
    assert values.tobytes() == expected.tobytes()
    assert np.isnan(values).any()           # NaN by design where nothing was observed
    (entry,) = store.embeddings()
    assert entry["nan_allowed"] is True and len(entry["dim_names"]) == entry["dim"]


def test_ehr_lstm_pass_writes_per_fold_values_and_sequences(store_path):
    from encoders.ehr_seq import LstmConfig

    config = LstmConfig(hidden=8, epochs=1, batch_size=16)
    run_encoding_pass(store_path, "ehr-lstm", region_stays=8, progress=False, lstm_config=config)
    store = open_store(store_path)
    folds = [store.embedding("ehr", "ehr-lstm", fold=k)[0] for k in range(store.n_folds)]
    assert all(v.shape == (store.n_stays, 8) and np.isfinite(v).all() for v in folds)
    assert not np.array_equal(folds[0], folds[1])        # one model per fold
    seq = store.embedding_sequence("ehr", "ehr-lstm", 0)
    assert seq.shape == (store.n_stays, store.window_hours, 8)
    assert np.array_equal(seq[:, -1], folds[0])
    (entry,) = store.embeddings()
    assert entry["per_fold"] is True and entry["hyperparameters"]["hidden"] == 8
    assert set(entry["training"]) == {str(k) for k in range(store.n_folds)}


def test_ehr_lstm_resume_skips_finished_folds(store_path, base_store, tmp_path, monkeypatch):
    from encoders.ehr_seq import EhrLstmEncoder, LstmConfig

    config = LstmConfig(hidden=8, epochs=1, batch_size=16)
    kwargs = dict(region_stays=8, progress=False, lstm_config=config, threads=1)
    original_write = EmbeddingWriter.write
    writes = []

    def crashing_write(self, r, *args, **kwargs):
        if len(writes) == 7:      # fold 0 (5 regions) done, fold 1 half written
            raise KeyboardInterrupt("simulated crash")
        original_write(self, r, *args, **kwargs)
        writes.append((kwargs.get("fold"), r))

    monkeypatch.setattr(EmbeddingWriter, "write", crashing_write)
    with pytest.raises(KeyboardInterrupt):
        run_encoding_pass(store_path, "ehr-lstm", **kwargs)
    monkeypatch.setattr(EmbeddingWriter, "write", original_write)
    fits = []
    original_fit = EhrLstmEncoder.fit
    monkeypatch.setattr(EhrLstmEncoder, "fit", lambda self, *a, **k: fits.append(1) or original_fit(self, *a, **k))
    summary = run_encoding_pass(store_path, "ehr-lstm", **kwargs)
    assert len(fits) == 4 and summary["regions_computed"] == 25 - 7   # fold 0 is not retrained

    clean = tmp_path / "clean.zarr"
    shutil.copytree(base_store, clean)
    run_encoding_pass(clean, "ehr-lstm", **kwargs)
    for fold in range(5):
        assert (open_store(store_path).embedding_sequence("ehr", "ehr-lstm", fold).tobytes()
                == open_store(clean).embedding_sequence("ehr", "ehr-lstm", fold).tobytes())


def test_ehr_lstm_trains_only_on_the_folds_training_stays(store_path, monkeypatch):
    """Spy on every EHR read during fitting: only train (fit) and val (early stopping) stays."""
    from cbstore.store.reader import Store
    from encoders.ehr_seq import EhrLstmEncoder, LstmConfig
    from encoders.pass_ import fit_fold

    store = open_store(store_path)
    reads = []
    original = Store.ehr_values

    def spy(self, index=None):
        reads.append(np.arange(self.n_stays) if index is None else np.asarray(index))
        return original(self, index)

    monkeypatch.setattr(Store, "ehr_values", spy)
    encoder = EhrLstmEncoder(len(store.features), store.window_hours, LstmConfig(hidden=4, epochs=1))
    fit_fold(store, encoder, 2)
    train, val = set(store.indices(2, "train")), set(store.indices(2, "val"))
    assert [set(r.tolist()) for r in reads] == [train, val]
    assert encoder.history_["n_train"] == len(train)


def test_ehr_lstm_fold_model_ignores_test_stays(tmp_path):
    """Changing the test stays of fold 0 leaves fold 0's model (and its train embeddings) unchanged."""
    from encoders.ehr_seq import LstmConfig

    config = LstmConfig(hidden=8, epochs=2, batch_size=8)
    content = random_content(n_stays=40, image_size=32, seed=5)
    altered = random_content(n_stays=40, image_size=32, seed=5)
    test0 = altered.splits[:, 0] == 2
    altered.ehr_values[test0] = altered.ehr_values[test0] * 1.5 + 7.0
    paths = []
    for name, c in (("a", content), ("b", altered)):
        path = write_store(tmp_path / f"{name}.zarr", c)
        run_encoding_pass(path, "ehr-lstm", region_stays=8, progress=False, lstm_config=config, threads=1)
        paths.append(path)
    a = open_store(paths[0]).embedding("ehr", "ehr-lstm", fold=0)[0]
    b = open_store(paths[1]).embedding("ehr", "ehr-lstm", fold=0)[0]
    assert test0.any()
    assert a[~test0].tobytes() == b[~test0].tobytes()
    assert not np.array_equal(a[test0], b[test0])


# ---------------------------------------------------------------------------------------- Dask

@pytest.mark.slow  # two spawned worker processes each import torch (~20-90 s on 2 busy cores)
def test_dask_pass_is_bit_identical_to_single_process(store_path, base_store, tmp_path):
    from distributed import LocalCluster

    from encoders.ehr_seq import LstmConfig

    config = LstmConfig(hidden=8, epochs=1, batch_size=16)
    single = tmp_path / "single.zarr"
    shutil.copytree(base_store, single)
    run_encoding_pass(single, DN, **FAST)
    run_encoding_pass(single, "ehr-lstm", region_stays=8, progress=False, lstm_config=config, threads=1)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        summary = run_encoding_pass(store_path, DN, dask_scheduler=cluster.scheduler_address, **FAST)
        run_encoding_pass(store_path, "ehr-lstm", region_stays=8, progress=False, lstm_config=config,
                          threads=1, dask_scheduler=cluster.scheduler_address)
    assert summary["dask"] and summary["regions_computed"] == 5
    a, b = open_store(single), open_store(store_path)
    assert a.embedding("cxr", DN_RANDOM)[0].tobytes() == b.embedding("cxr", DN_RANDOM)[0].tobytes()
    assert np.array_equal(a.embedding("cxr", DN_RANDOM)[1], b.embedding("cxr", DN_RANDOM)[1])
    for fold in (0, 4):
        assert (a.embedding_sequence("ehr", "ehr-lstm", fold).tobytes()
                == b.embedding_sequence("ehr", "ehr-lstm", fold).tobytes())


# -------------------------------------------------------------------------------------- errors

def test_unknown_encoder_and_weights_errors(store_path):
    with pytest.raises(UnknownEncoderError, match="ehr-stats"):
        run_encoding_pass(store_path, "vit-huge", progress=False)
    with pytest.raises(WeightsError, match="no pretrained weights"):
        run_encoding_pass(store_path, "ehr-stats", weights="random", progress=False)


def test_missing_named_weights_fail_before_writing(store_path, tmp_path, monkeypatch):
    from encoders import weights as W

    monkeypatch.setattr(W, "library_cache_dir", lambda library: tmp_path)
    monkeypatch.delenv(W.WEIGHTS_DIR_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match=W.weights_source(DN).filename):
        run_encoding_pass(store_path, DN, weights_dir=tmp_path, progress=False)
    assert not (store_path / "embeddings").exists()


def test_read_only_store_is_refused(store_path):
    os.chmod(store_path, stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP)
    with pytest.raises(StoreReadOnlyError, match="read-only"):
        run_encoding_pass(store_path, "ehr-stats", progress=False)


def test_store_without_films_or_not_a_store(tmp_path):
    content = random_content(n_stays=12, image_size=32, seed=1)
    content.cxr["present"] = False
    content.cxr["dicom_id"] = ""
    content.cxr["study_id"] = -1
    content.cxr["study_time"] = pd.NaT
    content.cxr["hours_before_prediction"] = np.nan
    content.cxr["view_position"] = ""
    content.cxr["absent_reason"] = "no_eligible_film"
    content.cxr["n_eligible"] = 0
    content.images[:] = 0
    path = write_store(tmp_path / "nofilm.zarr", content)
    with pytest.raises(EncodingInputError, match="no stay with an X-ray"):
        run_encoding_pass(path, DN, **FAST)
    with pytest.raises(StoreError, match="no store"):
        run_encoding_pass(tmp_path / "missing.zarr", "ehr-stats", progress=False)


def test_cli_encode(store_path):
    from click.testing import CliRunner

    from cli.encode_cmd import encode

    runner = CliRunner()
    args = [str(store_path), "--encoder", "ehr-stats", "--region-stays", "8", "--quiet"]
    first = runner.invoke(encode, args)
    assert first.exit_code == 0, first.output
    assert "wrote embeddings/ehr/ehr-stats" in first.output
    second = runner.invoke(encode, args)
    assert second.exit_code == 0 and "already complete" in second.output
    bad = runner.invoke(encode, [str(store_path), "--encoder", "nope", "--quiet"])
    assert bad.exit_code != 0 and "valid encoders" in bad.output and "ehr-lstm" in bad.output
