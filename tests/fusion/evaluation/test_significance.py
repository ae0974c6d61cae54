"""Tests of the paired permutation test and the Benjamini-Hochberg adjustment."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from fusion.evaluation import PredictionsError, benjamini_hochberg, permutation_test
from fusion.evaluation.significance import permutation_p_value


def run(y, scores, *, stay_ids=None, task="mortality"):
    """A test-only binary predictions frame."""
    n = len(y)
    return pd.DataFrame({"stay_id": np.arange(n) if stay_ids is None else stay_ids,
                         "part": "test", "fold": 0, "task": task,
                         "y_true_mortality": y, "y_prob_mortality": scores})


def noisy(y, rng, signal):
    return 1 / (1 + np.exp(-(signal * (y - 0.5) + rng.normal(0, 1, len(y)))))


def test_benjamini_hochberg_hand_example():
    # sorted p: 0.01, 0.03, 0.04, 0.20 (m = 4) -> m p / rank: 0.04, 0.06, 0.0533.., 0.20
    # cumulative minimum from the top: 0.04, 0.0533.., 0.0533.., 0.20
    q = benjamini_hochberg([0.01, 0.04, 0.03, 0.20])
    np.testing.assert_allclose(q, [0.04, 0.16 / 3, 0.16 / 3, 0.20], rtol=0, atol=1e-15)
    q = benjamini_hochberg([0.5, np.nan, 0.9, 0.001])
    np.testing.assert_allclose(q, [0.75, np.nan, 0.9, 0.003], atol=1e-15)
    assert benjamini_hochberg([0.6, 0.7])[0] == 0.7           # capped by the larger rank
    assert np.isnan(benjamini_hochberg([np.nan])).all()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        benjamini_hochberg([0.2, 1.5])


@pytest.mark.parametrize("p, expected", [
    # ties: m p / rank = 0.06, 0.03, 0.02 -> cumulative minimum from the top 0.02 everywhere
    ([0.02, 0.02, 0.02], [0.02, 0.02, 0.02]),
    # ten p-values, m = 10: m p / rank = .01 .04 .13 .1025 .084 .1 .10571.. .25625 .23556.. .216
    ([0.001, 0.008, 0.039, 0.041, 0.042, 0.06, 0.074, 0.205, 0.212, 0.216],
     [0.01, 0.04, 0.084, 0.084, 0.084, 0.1, 0.74 / 7, 0.216, 0.216, 0.216]),
    ([0.0, 1.0], [0.0, 1.0]),
    ([0.3], [0.3]),
    ([], []),
])
def test_benjamini_hochberg_hand_computed(p, expected):
    np.testing.assert_allclose(benjamini_hochberg(p), expected, rtol=1e-15, atol=0)


def test_benjamini_hochberg_non_finite_p_values_stay_nan_and_leave_m():
    # only 0.01 and 0.02 count (m = 2): 0.01 * 2 / 1 = 0.02, 0.02 * 2 / 2 = 0.02
    q = benjamini_hochberg([np.nan, 0.01, np.inf, 0.02, -np.inf])
    np.testing.assert_allclose(q, [np.nan, 0.02, np.nan, 0.02, np.nan], rtol=1e-15, atol=0)
    # the shape is kept; m counts the finite values of the whole array
    q = benjamini_hochberg([[0.01, 0.5], [np.nan, 0.02]])
    np.testing.assert_allclose(q, [[0.03, 0.5], [np.nan, 0.03]], rtol=1e-15, atol=0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        benjamini_hochberg([np.nan, -0.1])


def test_permutation_p_value_formula():
    assert permutation_p_value(0.5, np.array([0.1, -0.6, 0.5, 0.2])) == pytest.approx(3 / 5)
    assert np.isnan(permutation_p_value(np.nan, np.zeros(3)))


def test_vectorised_test_equals_naive_loop():
    rng = np.random.default_rng(0)
    n, n_perm = 60, 40
    y = (rng.random(n) < 0.4).astype(int)
    a, b = noisy(y, rng, 2.0), noisy(y, rng, 1.0)
    out = permutation_test(run(y, a), run(y, b), "auroc", n_perm=n_perm, seed=11)
    # the same swaps, drawn as the implementation does (one block), scored with sklearn
    swaps = np.random.default_rng(11).random((n_perm, n)) < 0.5
    observed = roc_auc_score(y, a) - roc_auc_score(y, b)
    diffs = np.array([roc_auc_score(y, np.where(s, b, a)) - roc_auc_score(y, np.where(s, a, b))
                      for s in swaps])
    assert out["difference"] == pytest.approx(observed, abs=1e-12)
    expected_p = (1 + np.sum(np.abs(diffs) >= abs(observed) - 1e-12)) / (n_perm + 1)
    assert out["p_value"] == pytest.approx(expected_p)
    assert out["value_a"] == pytest.approx(roc_auc_score(y, a), abs=1e-12)


def test_p_values_roughly_uniform_under_the_null():
    rng = np.random.default_rng(1)
    pvalues = []
    for rep in range(100):
        y = (rng.random(80) < 0.4).astype(int)
        out = permutation_test(run(y, noisy(y, rng, 1.5)), run(y, noisy(y, rng, 1.5)), "auroc",
                               n_perm=49, seed=rep)
        pvalues.append(out["p_value"])
    pvalues = np.array(pvalues)
    assert 0.35 < pvalues.mean() < 0.65
    assert np.mean(pvalues < 0.05) < 0.15
    assert np.mean(pvalues < 0.5) == pytest.approx(0.5, abs=0.15)


def test_clearly_better_model_has_small_p_and_identical_runs_p_one():
    rng = np.random.default_rng(2)
    y = (rng.random(300) < 0.3).astype(int)
    good, bad = noisy(y, rng, 4.0), noisy(y, rng, 0.3)
    out = permutation_test(run(y, good), run(y, bad), "auprc", n_perm=199)
    assert out["difference"] > 0.3 and out["p_value"] == pytest.approx(1 / 200)
    same = permutation_test(run(y, good), run(y, good), "auroc", n_perm=50)
    assert same["difference"] == 0.0 and same["p_value"] == 1.0


def test_inner_join_and_label_checks():
    rng = np.random.default_rng(3)
    y = (rng.random(50) < 0.4).astype(int)
    a = run(y, noisy(y, rng, 2.0))
    b = run(y[5:], noisy(y[5:], rng, 2.0), stay_ids=np.arange(5, 50))
    out = permutation_test(a, b, "auroc", n_perm=20)
    assert (out["n_stays"], out["n_only_a"], out["n_only_b"]) == (45, 5, 0)
    flipped = a.copy()
    flipped.loc[[2, 4], "y_true_mortality"] ^= 1
    with pytest.raises(PredictionsError, match=r"disagree on y_true_mortality for 2 .*2, 4"):
        permutation_test(a, flipped, "auroc", n_perm=10)
    disjoint = run(y, noisy(y, rng, 1.0), stay_ids=np.arange(100, 150))
    with pytest.raises(PredictionsError, match="no test stay in common"):
        permutation_test(a, disjoint, "auroc", n_perm=10)
    with pytest.raises(PredictionsError, match="task"):
        permutation_test(a, run(y, a["y_prob_mortality"], task="mortality_hosp"), "auroc")
    with pytest.raises(ValueError, match="unknown metric 'kappa'"):
        permutation_test(a, a, "kappa", n_perm=10)


def test_phenotype_per_label_p_and_q_values():
    rng = np.random.default_rng(4)
    n, labels = 200, ["a", "b", "c", "d"]
    signals = {"a": (4.0, 0.2), "b": (4.0, 4.0), "c": (1.0, 1.0), "d": (1.0, 1.0)}
    frames = [pd.DataFrame({"stay_id": np.arange(n), "part": "test", "fold": 0,
                            "task": "phenotype"}) for _ in range(2)]
    for label in labels:
        y = (rng.random(n) < 0.3).astype(int)
        for df, signal in zip(frames, signals[label]):
            df[f"y_true_{label}"] = y
            df[f"y_prob_{label}"] = noisy(y, rng, signal)
    out = permutation_test(frames[0], frames[1], "auroc", n_perm=199, seed=0)
    assert out["statistic"] == "macro_auroc"
    per = {x["label"]: x for x in out["per_label"]}
    assert per["a"]["p_value"] == pytest.approx(1 / 200) and per["a"]["q_value"] < 0.05
    assert per["b"]["p_value"] > 0.05
    q = benjamini_hochberg([per[k]["p_value"] for k in labels])
    assert [per[k]["q_value"] for k in labels] == pytest.approx(list(q))
    assert out["value_a"] == pytest.approx(np.mean([per[k]["value_a"] for k in labels]))


def test_los_metrics_are_testable():
    rng = np.random.default_rng(5)
    n = 150
    classes = rng.integers(0, 7, n)
    names = ["2-3d", "3-4d", "4-5d", "5-6d", "6-7d", "7-14d", "14+d"]

    def frame(signal):
        logits = rng.normal(0, 1, (n, 7))
        logits[np.arange(n), classes] += signal
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        df = pd.DataFrame({"stay_id": np.arange(n), "part": "test", "fold": 0, "task": "los",
                           "y_true_los": classes})
        for c, name in enumerate(names):
            df[f"y_prob_{name}"] = probs[:, c]
        return df

    good, bad = frame(3.0), frame(0.0)
    for metric in ("accuracy", "macro_f1", "kappa_linear", "auroc"):
        out = permutation_test(good, bad, metric, task="los", n_perm=99)
        assert out["difference"] > 0 and out["p_value"] <= 0.02, metric
