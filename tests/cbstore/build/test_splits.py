"""Tests of cbstore.build.splits.assign_folds."""

from __future__ import annotations

import numpy as np
import pytest

from cbstore.build.splits import assign_folds
from cbstore.format.content import TEST, TRAIN, VAL


def cohort(n_patients=400, seed=0):
    """Stays of patients with 1-3 stays each; about 15% of patients positive on one stay."""
    rng = np.random.default_rng(seed)
    subjects = 10_000_000 + rng.choice(10 * n_patients, n_patients, replace=False)
    subject_id = np.repeat(subjects, rng.integers(1, 4, n_patients))
    positive_patient = rng.random(n_patients) < 0.15
    label = np.zeros(subject_id.size, dtype=np.int8)
    for s in subjects[positive_patient]:
        label[np.flatnonzero(subject_id == s)[0]] = 1
    order = rng.permutation(subject_id.size)
    return subject_id[order], label[order]


def per_patient(subject_id, values):
    """One row per patient (sorted ids); checks stays of a patient agree."""
    patients, first, inverse = np.unique(subject_id, return_index=True, return_inverse=True)
    rows = values[first]
    np.testing.assert_array_equal(values, rows[inverse])
    return patients, rows


def test_patient_level_and_each_tested_once():
    subject_id, label = cohort()
    parts = assign_folds(subject_id, label, n_folds=5, seed=3)
    assert parts.shape == (subject_id.size, 5) and parts.dtype == np.uint8
    assert set(np.unique(parts).tolist()) == {TRAIN, VAL, TEST}
    _, by_patient = per_patient(subject_id, parts)  # no subject split across parts in any fold
    np.testing.assert_array_equal((by_patient == TEST).sum(axis=1), 1)


def test_proportions_and_stratification():
    subject_id, label = cohort(n_patients=800, seed=1)
    parts = assign_folds(subject_id, label, n_folds=5)
    patients, by_patient = per_patient(subject_id, parts)
    n = patients.size
    for k in range(5):
        share = [(by_patient[:, k] == code).mean() for code in (TRAIN, VAL, TEST)]
        assert share[TEST] == pytest.approx(0.20, abs=0.005)
        assert share[VAL] == pytest.approx(0.125, abs=2 / n)
        assert share[TRAIN] == pytest.approx(0.675, abs=0.01)
    positive = np.zeros(n, dtype=bool)
    np.logical_or.at(positive, np.searchsorted(patients, subject_id), label.astype(bool))
    overall = positive.mean()
    for k in range(5):
        test_rate = positive[by_patient[:, k] == TEST].mean()
        val_rate = positive[by_patient[:, k] == VAL].mean()
        assert abs(test_rate - overall) < 0.01          # stratified deal: at most one off
        assert abs(val_rate - overall) < 0.02


def test_deterministic_and_row_order_independent():
    subject_id, label = cohort(seed=2)
    a = assign_folds(subject_id, label, seed=7)
    np.testing.assert_array_equal(a, assign_folds(subject_id, label, seed=7))
    order = np.random.default_rng(0).permutation(subject_id.size)
    b = assign_folds(subject_id[order], label[order], seed=7)
    np.testing.assert_array_equal(b, a[order])
    assert not np.array_equal(assign_folds(subject_id, label, seed=8), a)


def test_val_fraction_zero_and_small_cohort():
    subject_id, label = np.arange(10), np.r_[np.zeros(8), np.ones(2)]
    parts = assign_folds(subject_id, label, n_folds=2, val_fraction=0.0)
    assert not (parts == VAL).any()
    np.testing.assert_array_equal((parts == TEST).sum(axis=1), 1)
    parts = assign_folds(subject_id, label, n_folds=2, val_fraction=0.2)
    np.testing.assert_array_equal((parts == VAL).sum(axis=0), [2, 2])


@pytest.mark.parametrize("kwargs, match", [
    ({"subject_id": np.arange(10), "stratify": np.zeros(9)}, "lengths differ: 10 vs 9"),
    ({"n_folds": 1}, "n_folds must be an integer >= 2"),
    ({"val_fraction": 0.8}, r"val_fraction must be in \[0, 0.800\)"),
    ({"stratify": np.r_[np.zeros(9), 2]}, r"only 0/1, got \[2"),
    ({"stratify": np.r_[np.zeros(9), np.nan]}, "only 0/1"),
    ({"subject_id": np.arange(10) % 3, "n_folds": 5}, "3 patient.*5 folds"),
    ({"subject_id": np.arange(10) % 3, "n_folds": 2}, "too few for val_fraction"),
    ({"subject_id": np.arange(10.0)}, "must be integers"),
])
def test_invalid_input(kwargs, match):
    args = {"subject_id": np.arange(10), "stratify": np.zeros(10)} | kwargs
    with pytest.raises(ValueError, match=match):
        assign_folds(args.pop("subject_id"), args.pop("stratify"), **args)
