"""Tests of cbstore.build.stats.fold_statistics."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import cbstore.build.stats

from cbstore.build.stats import fold_statistics
from cbstore.format.content import STAT_NAMES, TEST, TRAIN, VAL


def tensor(seed=0, n_stays=37, n_time=6, n_features=4):
    rng = np.random.default_rng(seed)
    values = rng.normal(50, 10, (n_stays, n_time, n_features)).astype(np.float32)
    values[rng.random(values.shape) < 0.6] = np.nan
    values[:, :, 3] = np.round(values[:, :, 3] / 10)  # ties, like a coarse lab value
    parts = rng.choice(np.array([TRAIN, VAL, TEST], dtype=np.uint8), (n_stays, 3), p=[0.6, 0.2, 0.2])
    return values, parts


@pytest.mark.parametrize("chunk_stays, gather_cells", [(1, None), (5, 1), (1024, 200), (1024, None)])
def test_matches_numpy_on_training_rows(chunk_stays, gather_cells, monkeypatch):
    if gather_cells is not None:  # gather the features in several groups
        monkeypatch.setattr(cbstore.build.stats, "_GATHER_CELLS", gather_cells)
    values, parts = tensor()
    stats = fold_statistics(values, parts, chunk_stays=chunk_stays)
    assert set(stats) == set(STAT_NAMES)
    for name in STAT_NAMES:
        assert stats[name].shape == (3, 4)
        assert stats[name].dtype == (np.int64 if name == "n_observed" else np.float32)
    for k in range(3):
        train = values[parts[:, k] == TRAIN].reshape(-1, 4)
        q25, q50, q75 = np.nanpercentile(train, [25, 50, 75], axis=0)
        np.testing.assert_allclose(stats["median"][k], np.nanmedian(train, axis=0), rtol=1e-6)
        np.testing.assert_allclose(stats["iqr"][k], q75 - q25, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(stats["mean"][k], np.nanmean(train.astype(float), axis=0), rtol=1e-6)
        np.testing.assert_allclose(stats["std"][k], np.nanstd(train.astype(float), axis=0), rtol=1e-5)
        np.testing.assert_array_equal(stats["min"][k], np.nanmin(train, axis=0))
        np.testing.assert_array_equal(stats["max"][k], np.nanmax(train, axis=0))
        np.testing.assert_array_equal(stats["n_observed"][k], (~np.isnan(train)).sum(axis=0))


def test_val_and_test_values_do_not_matter():
    values, parts = tensor(seed=1)
    before = fold_statistics(values, parts)
    changed = values.copy()
    held_out = parts[:, 0] != TRAIN
    changed[held_out] = 1e6       # wild values in every observed and unobserved cell
    after = fold_statistics(changed, parts)
    for name in STAT_NAMES:
        np.testing.assert_array_equal(after[name][0], before[name][0])
    # Folds where those stays train do change.
    assert not np.array_equal(after["max"][1:], before["max"][1:])


def test_unobserved_feature_is_nan_with_warning():
    values, parts = tensor(seed=2)
    values[:, :, 2] = np.nan
    values[parts[:, 1] == TRAIN, :, 0] = np.nan   # feature 0 unobserved in fold 1's training stays
    with pytest.warns(UserWarning) as record:
        stats = fold_statistics(values, parts, feature_names=["hr", "sbp", "fio2", "gcs"])
    messages = [str(w.message) for w in record]
    assert any("fold 1" in m and "hr, fio2" in m for m in messages)
    assert any("fold 0" in m and "fio2" in m and "hr" not in m for m in messages)
    for name in ("median", "iqr", "mean", "std", "min", "max"):
        assert np.isnan(stats[name][:, 2]).all()
        assert np.isnan(stats[name][1, 0]) and not np.isnan(stats[name][0, 0])
    assert stats["n_observed"][:, 2].tolist() == [0, 0, 0]
    assert stats["n_observed"][1, 0] == 0


def test_no_warning_when_all_observed():
    values, parts = tensor(seed=3)
    values[:, 0, :] = 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fold_statistics(values, parts)


@pytest.mark.parametrize("change, match", [
    (lambda v, p: (v[0], p), r"\[stay, time, feature\]"),
    (lambda v, p: (v, p[:-1]), "parts must be"),
    (lambda v, p: (v, np.where(p == VAL, 7, p).astype(np.uint8)), r"unknown split codes \[7\]"),
    (lambda v, p: (np.where(np.isnan(v), np.inf, v), p), r"feature 0 hold \+/-inf"),
])
def test_invalid_input(change, match):
    values, parts = tensor(seed=4)
    with pytest.raises(ValueError, match=match):
        fold_statistics(*change(values, parts))
