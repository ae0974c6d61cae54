"""Tests of the subgroup (fairness) metrics of the evaluator."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from fairlearn.metrics import demographic_parity_difference, equalized_odds_difference
from sklearn.metrics import roc_auc_score

from fusion.evaluation import (
    LOS_CLASS_NAMES, evaluate_predictions, expected_calibration_error, fairness_report,
    fairness_table,
)


def binary_frame(n=400, seed=0):
    """Binary predictions with gender/race/age_group columns; all parts."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(int)
    df = pd.DataFrame({
        "stay_id": np.arange(n), "part": rng.choice(["val", "test"], n, p=[0.3, 0.7]),
        "fold": 0, "task": "mortality", "y_true_mortality": y,
        "y_prob_mortality": 1 / (1 + np.exp(-(2 * (y - 0.5) + rng.normal(0, 1, n)))),
        "gender": rng.choice(["F", "M"], n), "race": rng.choice(["WHITE", "BLACK", "ASIAN"], n),
        "age_group": rng.choice(["18-40", "40-60"], n),
    })
    return df, {"task": "mortality", "labels": ["mortality"]}


def test_single_class_group_metrics_are_nan_not_zero():
    df, meta = binary_frame()
    test = df["part"] == "test"
    # every ASIAN test stay negative: AUROC/AUPRC/TPR undefined there, FPR defined
    df.loc[test & (df["race"] == "ASIAN"), "y_true_mortality"] = 0
    table = fairness_table(df, meta, ["race"], intersections=False, threshold=0.5)
    asian = table[(table["attribute"] == "race") & (table["group"] == "ASIAN")].iloc[0]
    assert np.isnan(asian["auroc"]) and np.isnan(asian["auprc"]) and np.isnan(asian["tpr"])
    assert np.isfinite(asian["fpr"]) and asian["prevalence"] == 0.0
    white = table[table["group"] == "WHITE"].iloc[0]
    sub = df[test & (df["race"] == "WHITE")]
    assert white["auroc"] == pytest.approx(roc_auc_score(sub["y_true_mortality"],
                                                         sub["y_prob_mortality"]), abs=1e-12)
    assert white["n"] == len(sub)
    # the single-class group does not take part in the AUROC gap or the EO difference
    report = fairness_report(df, meta, ["race"], intersections=False, threshold=0.5)
    race = report["attributes"]["race"]
    assert race["gaps"]["auroc"]["n_groups"] == 2
    assert race["eo_groups"] == ["BLACK", "WHITE"]


def test_small_groups_flagged_and_excluded_from_gaps():
    df, meta = binary_frame()
    test = df.index[df["part"] == "test"]
    df.loc[test[:12], "race"] = "OTHER"
    table = fairness_table(df, meta, ["race"], intersections=False, threshold=0.5,
                           min_group_size=20)
    flags = dict(zip(table["group"], table["small"]))
    assert flags["OTHER"] and not flags["WHITE"]
    report = fairness_report(df, meta, ["race"], intersections=False, threshold=0.5,
                             min_group_size=20)
    gap = report["attributes"]["race"]["gaps"]["auroc"]
    large = table[~table["small"]].set_index("group")["auroc"]
    assert gap["gap"] == pytest.approx(large.max() - large.min())
    assert gap["ratio"] == pytest.approx(large.min() / large.max())
    assert "OTHER" not in report["attributes"]["race"]["dp_groups"]
    loose = fairness_table(df, meta, ["race"], intersections=False, threshold=0.5,
                           min_group_size=5)
    assert not loose["small"].any()


def test_eo_and_dp_differences_match_fairlearn():
    df, meta = binary_frame(n=600, seed=3)
    threshold = 0.45
    report = fairness_report(df, meta, ["gender", "race"], intersections=[("gender", "race")],
                             threshold=threshold, min_group_size=10)
    test = df[df["part"] == "test"]
    y = test["y_true_mortality"].to_numpy()
    y_hat = (test["y_prob_mortality"].to_numpy() >= threshold).astype(int)
    for attr in ("gender", "race"):
        entry = report["attributes"][attr]
        assert entry["equalized_odds_difference"] == pytest.approx(
            equalized_odds_difference(y, y_hat, sensitive_features=test[attr]), abs=1e-12)
        assert entry["demographic_parity_difference"] == pytest.approx(
            demographic_parity_difference(y, y_hat, sensitive_features=test[attr]), abs=1e-12)
    both = report["attributes"]["gender x race"]
    assert both["demographic_parity_difference"] == pytest.approx(
        demographic_parity_difference(y, y_hat, sensitive_features=test[["gender", "race"]]),
        abs=1e-12)
    groups = {g["group"]: g for g in both["groups"]}
    assert "F & WHITE" in groups and sum(g["n"] for g in groups.values()) == len(test)
    sub = test[(test["gender"] == "F") & (test["race"] == "WHITE")]
    assert groups["F & WHITE"]["tpr"] == pytest.approx(
        (sub["y_prob_mortality"][sub["y_true_mortality"] == 1] >= threshold).mean())


def test_default_threshold_comes_from_val_and_missing_threshold_gives_reason():
    df, meta = binary_frame()
    report = fairness_report(df, meta, ["gender"], intersections=False)
    from fusion.evaluation import youden_threshold
    val = df[df["part"] == "val"]
    assert report["threshold"] == youden_threshold(val["y_true_mortality"],
                                                   val["y_prob_mortality"])[0]
    no_val = df[df["part"] == "test"]
    report = fairness_report(no_val, meta, ["gender"], intersections=False)
    entry = report["attributes"]["gender"]
    assert entry["equalized_odds_difference"] is None
    assert "no decision threshold" in entry["reason"]
    assert all(np.isnan(g["tpr"]) for g in entry["groups"])


def test_missing_values_and_missing_columns():
    df, meta = binary_frame()
    df["gender"] = df["gender"].astype(object)
    df.loc[df.index[:40], "gender"] = ""
    df.loc[df.index[40:60], "gender"] = None
    report = fairness_report(df, meta, ["gender", "insurance"], intersections=True,
                             threshold=0.5)
    groups = {g["group"] for g in report["attributes"]["gender"]["groups"]}
    assert groups == {"F", "M", "Unknown"}
    assert report["skipped"] == {"insurance": "column not in the predictions"}
    assert list(report["attributes"]) == ["gender"]


def test_evaluate_predictions_fairness_section_is_strict_json():
    import json
    df, meta = binary_frame()
    result = evaluate_predictions(df, meta, n_boot=10, groups=("gender", "race"),
                                  min_group_size=10)
    text = json.dumps(result["fairness"], allow_nan=False)
    assert "gender x race" in result["fairness"]["attributes"]
    assert result["fairness"]["threshold"] == result["threshold"]["value"]
    assert "NaN" not in text


def test_phenotype_and_los_group_metrics():
    rng = np.random.default_rng(5)
    n = 300
    y = (rng.random((n, 3)) < 0.3).astype(int)
    df = pd.DataFrame({"stay_id": np.arange(n), "part": "test", "fold": 0, "task": "phenotype",
                       "gender": rng.choice(["F", "M"], n)})
    for j in range(3):
        df[f"y_true_l{j}"] = y[:, j]
        df[f"y_prob_l{j}"] = np.clip(0.4 * y[:, j] + rng.random(n) * 0.6, 0, 1)
    df.loc[df["gender"] == "F", "y_true_l2"] = 0
    table = fairness_table(df, {"task": "phenotype"}, ["gender"], intersections=False)
    female = table[table["group"] == "F"].iloc[0]
    sub = df[df["gender"] == "F"]
    expected = np.mean([roc_auc_score(sub[f"y_true_l{j}"], sub[f"y_prob_l{j}"])
                        for j in range(2)])
    assert female["macro_auroc"] == pytest.approx(expected, abs=1e-12)
    assert female["n_labels"] == 2

    classes = rng.integers(0, 7, n)
    probs = rng.dirichlet(np.ones(7), n)
    los = pd.DataFrame({"stay_id": np.arange(n), "part": "test", "fold": 0, "task": "los",
                        "y_true_los": classes, "gender": rng.choice(["F", "M"], n)})
    for c, name in enumerate(LOS_CLASS_NAMES):
        los[f"y_prob_{name}"] = probs[:, c]
    table = fairness_table(los, {"task": "los"}, ["gender"], intersections=False)
    male = table[table["group"] == "M"].iloc[0]
    mask = (los["gender"] == "M").to_numpy()
    assert male["accuracy"] == pytest.approx(np.mean(probs[mask].argmax(1) == classes[mask]))
    assert set(table.columns) == {"attribute", "group", "n", "small", "accuracy", "macro_f1"}


def test_expected_calibration_error_by_hand():
    # bins: [0.0,0.1) holds 0.05 (y 0); [0.9,1.0] holds 0.95 and 1.0 (y 1, 0)
    ece = expected_calibration_error([0, 1, 0], [0.05, 0.95, 1.0])
    assert ece == pytest.approx((abs(0.05 - 0) + abs(1.95 - 1)) / 3)
    assert expected_calibration_error([1, 0], [1.0, 0.0]) == 0.0
    assert np.isnan(expected_calibration_error([], []))
