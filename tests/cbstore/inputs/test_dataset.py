"""The torch Dataset over a store and the preprocessing it uses."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from cbstore.errors import StoreError
from cbstore.format.content import TRAIN, VAL
from cbstore.format.stats import fold_stats, training_stats
from cbstore.inputs.dataset import StayDataset
from cbstore.inputs.preprocess import cxr_to_float, forward_fill, impute_and_normalise, scale_of
from cbstore.store.reader import open_store
from cbstore.store.writer import write_store
from cbstore.testing import random_content

pytestmark = pytest.mark.filterwarnings("error")

torch.set_num_threads(1)


def _content(seed=4):
    c = random_content(n_stays=48, n_folds=3, window=8, n_features=6, image_size=16, seed=seed)
    c.labels["los_class"][:6] = -1  # a few stays too short for the LoS task
    return c


@pytest.fixture(scope="module")
def content():
    return _content()


@pytest.fixture(scope="module")
def store(content, tmp_path_factory):
    return open_store(write_store(tmp_path_factory.mktemp("ds") / "s.zarr", content))


def test_items_shapes_and_types(store, content):
    ds = StayDataset(store, "mortality", 0, "train")
    train = np.flatnonzero(content.splits[:, 0] == TRAIN)
    assert len(ds) == len(train)
    item = ds[0]
    # the first release's keys stay; "label" is a documented alias of "y"
    assert set(item) == {"index", "stay_id", "ehr", "ehr_mask", "cxr", "cxr_present", "label",
                         "y", "cxr_hours"}
    assert item["label"] is item["y"]
    hours = content.cxr["hours_before_prediction"].to_numpy()[item["index"]]
    if item["cxr_present"]:
        assert float(item["cxr_hours"]) == pytest.approx(float(hours))
    else:
        assert torch.isnan(item["cxr_hours"])
    assert item["ehr"].shape == (8, 6) and item["ehr"].dtype == torch.float32
    assert item["ehr_mask"].shape == (8, 6) and item["ehr_mask"].dtype == torch.float32
    assert item["cxr"].shape == (1, 16, 16) and item["cxr"].dtype == torch.float32
    assert item["label"].shape == (1,) and item["label"].dtype == torch.float32
    assert item["stay_id"] == int(content.stays.index[item["index"]])
    batch = next(iter(DataLoader(ds, batch_size=5)))
    assert batch["ehr"].shape == (5, 8, 6) and batch["cxr"].shape == (5, 1, 16, 16)
    assert batch["cxr_present"].dtype == torch.bool
    for i in range(len(ds)):
        assert not torch.isnan(ds[i]["ehr"]).any()
    pheno = StayDataset(store, "phenotype", 0, "val")[0]["label"]
    assert pheno.shape == (25,) and pheno.dtype == torch.float32
    los = StayDataset(store, "los", 1, "test")
    assert los[0]["label"].dtype == torch.int64 and los[0]["label"].ndim == 0
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_los_task_excludes_short_stays(store, content):
    ds = StayDataset(store, "los", 0, "train", with_images=False)
    want = np.flatnonzero((content.splits[:, 0] == TRAIN) & (content.labels["los_class"] >= 0))
    np.testing.assert_array_equal(ds.positions, want)
    assert "cxr" not in ds[0]
    assert {int(ds[i]["label"]) for i in range(len(ds))} <= set(range(7))


def test_ehr_values_are_imputed_with_training_stats(store, content):
    ds = StayDataset(store, "mortality", 1, "val", with_images=False)
    stats = content.stats
    median, scale = stats["median"][1], scale_of({k: v[1] for k, v in stats.items()})
    for j, pos in enumerate(ds.positions):
        raw = content.ehr_values[pos]
        got = ds[j]["ehr"].numpy()
        np.testing.assert_array_equal(ds[j]["ehr_mask"].numpy(), (~np.isnan(raw)).astype(np.float32))
        # binary feature 0: NaN -> 0, unscaled
        np.testing.assert_array_equal(got[:, 0], np.nan_to_num(raw[:, 0], nan=0.0))
        for f in range(1, 6):
            x = raw[:, f].astype(np.float64)
            filled = np.empty_like(x)
            last = np.nan
            for t in range(len(x)):
                last = x[t] if not np.isnan(x[t]) else last
                filled[t] = median[f] if np.isnan(last) else last
            np.testing.assert_allclose(got[:, f], (filled - median[f]) / scale[f], rtol=1e-5, atol=1e-5)


def test_train_part_does_not_depend_on_other_parts(tmp_path):
    """Wildly different val/test values change neither the stats nor the normalised train part."""
    a = _content(seed=6)
    b = _content(seed=6)
    not_train = b.splits[:, 0] != TRAIN
    b.ehr_values[not_train] = b.ehr_values[not_train] * 1000 + 5000
    b.stats = fold_stats(b.ehr_values, b.splits)
    for name in a.stats:
        np.testing.assert_array_equal(a.stats[name][0], b.stats[name][0])
    sa = open_store(write_store(tmp_path / "a.zarr", a))
    sb = open_store(write_store(tmp_path / "b.zarr", b))
    ta = StayDataset(sa, "mortality", 0, "train", with_images=False)
    tb = StayDataset(sb, "mortality", 0, "train", with_images=False)
    for i in range(len(ta)):
        assert torch.equal(ta[i]["ehr"], tb[i]["ehr"])
    # the val part is scaled with the training statistics, so its shift shows in full
    va = StayDataset(sa, "mortality", 0, "val", with_images=False)
    vb = StayDataset(sb, "mortality", 0, "val", with_images=False)
    assert (torch.stack([vb[i]["ehr"][:, 1:] for i in range(len(vb))]).abs().max()
            > 100 * torch.stack([va[i]["ehr"][:, 1:] for i in range(len(va))]).abs().max())


def test_images_and_cxr_drop(store, content):
    present = content.cxr["present"].to_numpy()
    ds = StayDataset(store, "mortality", 0, "test")
    for j, pos in enumerate(ds.positions):
        item = ds[j]
        assert item["cxr_present"] == bool(present[pos])
        if present[pos]:
            want = (2 * content.images[pos].astype(np.float32) / 255 - 1) * 1024
            np.testing.assert_array_equal(item["cxr"][0].numpy(), want)
        else:
            assert not item["cxr"].any()
        assert float(item["cxr"].min()) >= -1024 and float(item["cxr"].max()) <= 1024
    drop = present.copy()  # hide every film
    dropped = StayDataset(store, "mortality", 0, "test", cxr_drop=drop)
    assert len(dropped) == len(ds)
    assert not any(dropped[j]["cxr_present"] or dropped[j]["cxr"].any() for j in range(len(dropped)))
    with pytest.raises(StoreError, match=r"cxr_drop must be a bool mask of shape \(48,\)"):
        StayDataset(store, "mortality", 0, "test", cxr_drop=np.zeros(5, bool))


def test_matched_cohort(store, content):
    present = content.cxr["present"].to_numpy()
    ds = StayDataset(store, "mortality", 0, "train", cohort="matched")
    want = np.flatnonzero((content.splits[:, 0] == TRAIN) & present)
    np.testing.assert_array_equal(ds.positions, want)
    assert all(ds[j]["cxr_present"] for j in range(len(ds)))
    # dropping films inside the matched cohort keeps the stays but hides their films
    dropped = StayDataset(store, "mortality", 0, "train", cohort="matched", cxr_drop=present)
    assert len(dropped) == len(ds) and not dropped.cxr_present.any()
    with pytest.raises(StoreError, match="unknown cohort 'paired'"):
        StayDataset(store, "mortality", 0, "train", cohort="paired")


def test_import_cbstore_does_not_import_torch():
    code = ("import sys, cbstore; from cbstore import open_store, FORMAT_VERSION, __version__; "
            "import cbstore.store.reader, cbstore.inputs.preprocess, cbstore.testing; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------------------ preprocess


def test_forward_fill_keeps_leading_gaps():
    x = np.array([[[np.nan], [1.0], [np.nan], [3.0], [np.nan]]], dtype=np.float32)
    np.testing.assert_array_equal(forward_fill(x)[0, :, 0], [np.nan, 1, 1, 3, 3])


def test_impute_and_normalise_fallbacks():
    values = np.array([[[np.nan, np.nan, 2.0, np.nan, 1.0],
                        [4.0, 5.0, np.nan, np.nan, np.nan]]], dtype=np.float32)  # [1, T=2, F=5]
    stats = {
        "median": np.array([1.0, 3.0, 2.0, np.nan, 0.0], dtype=np.float32),
        "iqr": np.array([2.0, 0.0, 0.0, np.nan, 1.0], dtype=np.float32),
        "std": np.array([9.0, 4.0, 0.0, np.nan, 1.0], dtype=np.float32),
    }
    normalize = np.array([True, True, True, True, False])
    out = impute_and_normalise(values, stats, normalize)
    # f0: median fill then /iqr; f1: iqr 0 -> std; f2: iqr and std 0 -> scale 1;
    # f3: never observed in training -> 0; f4: binary (normalize False) -> NaN to 0, unscaled
    np.testing.assert_allclose(out[0], [[0.0, 0.0, 0.0, 0.0, 1.0], [1.5, 0.5, 0.0, 0.0, 0.0]])
    assert out.dtype == np.float32
    # a continuous feature that is not scaled is still forward filled and median filled
    out2 = impute_and_normalise(values, stats, normalize=np.zeros(5, bool), binary=np.zeros(5, bool))
    np.testing.assert_allclose(out2[0, :, 1], [3.0, 5.0])
    with pytest.raises(ValueError, match="values must be"):
        impute_and_normalise(values[0], stats, normalize)


def test_training_stats_use_only_training_stays():
    values = np.full((4, 2, 2), np.nan, dtype=np.float32)
    values[0, :, 0] = [1.0, 2.0]
    values[1, :, 0] = [3.0, 4.0]
    values[2, :, 0] = [1000.0, 1000.0]  # not a training stay
    stats = training_stats(values, np.array([True, True, False, False]))
    assert stats["median"][0] == 2.5 and stats["min"][0] == 1 and stats["max"][0] == 4
    assert stats["iqr"][0] == pytest.approx(1.5) and stats["n_observed"].tolist() == [4, 0]
    assert np.isnan(stats["median"][1])
    splits = np.array([[TRAIN, VAL], [TRAIN, TRAIN], [VAL, TRAIN], [VAL, VAL]], dtype=np.uint8)
    both = fold_stats(values, splits)
    assert both["median"].shape == (2, 2) and both["max"][1, 0] == 1000


def test_cxr_to_float_range():
    out = cxr_to_float(np.array([[0, 255]], dtype=np.uint8))
    np.testing.assert_array_equal(out, [[-1024.0, 1024.0]])
