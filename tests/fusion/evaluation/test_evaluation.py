"""Tests of the shared evaluator: predictions format, metrics, bootstrap, reliance, CLI."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from sklearn.metrics import (
    accuracy_score, average_precision_score, cohen_kappa_score, f1_score, roc_auc_score,
)

from cli.evaluate_cmd import evaluate as evaluate_cli
from fusion.evaluation import (
    LOS_CLASS_NAMES, PredictionsError, RankedScores, evaluate_file, evaluate_predictions,
    format_table, load_predictions, modality_reliance, resample_counts, write_predictions,
    youden_threshold,
)
from fusion.evaluation.bootstrap import bootstrap
from fusion.evaluation.metrics import (
    binary_statistic, multiclass_statistic, multilabel_statistic,
)

PHENOTYPES = [f"pheno_{j}" for j in range(5)]


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def make_predictions(task="mortality", n=300, *, seed=0, signal=2.0, parts=(0.5, 0.2, 0.3)):
    """A small synthetic predictions frame + meta (scores informative with strength ``signal``)."""
    rng = np.random.default_rng(seed)
    part = rng.choice(["train", "val", "test"], n, p=list(parts))
    df = pd.DataFrame({"stay_id": np.arange(10_000, 10_000 + n, dtype=np.int64), "part": part,
                       "fold": 0, "task": task})
    if task in ("mortality", "mortality_hosp"):
        y = (rng.random(n) < 0.25).astype(int)
        df["y_true_mortality"] = y
        df["y_prob_mortality"] = _sigmoid(signal * (y - 0.5) + rng.normal(0, 1, n))
        meta = {"task": task, "labels": ["mortality"], "method": "toy", "run_id": "run-1"}
    elif task == "phenotype":
        for j, label in enumerate(PHENOTYPES):
            y = (rng.random(n) < 0.1 + 0.08 * j).astype(int)
            df[f"y_true_{label}"] = y
            df[f"y_prob_{label}"] = _sigmoid(signal * (y - 0.5) + rng.normal(0, 1, n))
        meta = {"task": task, "labels": list(PHENOTYPES), "method": "toy", "run_id": "run-1"}
    else:
        y = rng.integers(0, len(LOS_CLASS_NAMES), n)
        logits = rng.normal(0, 1, (n, len(LOS_CLASS_NAMES)))
        logits[np.arange(n), y] += signal
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        df["y_true_los"] = y
        for c, name in enumerate(LOS_CLASS_NAMES):
            df[f"y_prob_{name}"] = probs[:, c]
        meta = {"task": task, "class_names": list(LOS_CLASS_NAMES), "method": "toy",
                "run_id": "run-1"}
    df["gender"] = rng.choice(["F", "M"], n)
    df["race"] = rng.choice(["WHITE", "BLACK"], n)
    return df, meta


# --------------------------------------------------------------------------- metrics

def _point(y, s):
    auroc, auprc = RankedScores(y, s).rank_metrics(np.ones((1, len(y)), dtype=np.int32))
    return auroc[0], auprc[0]


def test_hand_checkable_aurocs():
    y = np.array([0, 0, 1, 1, 0, 1])
    s = np.array([0.1, 0.2, 0.8, 0.9, 0.3, 0.7])
    assert _point(y, s) == (1.0, 1.0)
    assert _point(y, 1 - s)[0] == 0.0
    auroc, auprc = _point(y, np.full(6, 0.4))
    assert auroc == 0.5
    assert auprc == pytest.approx(0.5)            # constant score: AP = prevalence
    # one tie between a positive and a negative counts 1/2: (8 + 0.5) / 9
    assert _point(np.array([0, 1, 0, 1, 0, 1]), np.array([0.1, 0.5, 0.5, 0.9, 0.2, 0.6]))[0] \
        == pytest.approx(8.5 / 9, abs=1e-15)


def test_single_class_is_nan_not_zero():
    auroc, auprc = _point(np.zeros(5, int), np.linspace(0, 1, 5))
    assert np.isnan(auroc) and np.isnan(auprc)


def test_vectorised_auroc_auprc_equal_sklearn_on_resamples():
    rng = np.random.default_rng(1)
    n = 257
    y = (rng.random(n) < 0.3).astype(int)
    s = np.round(rng.random(n) * 0.6 + 0.3 * y, 2)           # many ties
    counts = next(resample_counts(np.zeros(n), 200, seed=5))
    auroc, auprc = RankedScores(y, s).rank_metrics(counts)
    for r in range(200):
        idx = np.repeat(np.arange(n), counts[r])
        if y[idx].min() == y[idx].max():
            assert np.isnan(auroc[r])
            continue
        assert abs(auroc[r] - roc_auc_score(y[idx], s[idx])) < 1e-12
        assert abs(auprc[r] - average_precision_score(y[idx], s[idx])) < 1e-12


def test_multilabel_statistic_equals_sklearn():
    rng = np.random.default_rng(2)
    n, n_labels = 150, 6
    y = (rng.random((n, n_labels)) < 0.3).astype(int)
    s = np.round(_sigmoid(2 * (y - 0.5) + rng.normal(0, 1, (n, n_labels))), 3)
    stat = multilabel_statistic(y, s)
    counts = next(resample_counts(np.zeros(n), 20, seed=0))
    out = stat(counts)
    for r in range(20):
        idx = np.repeat(np.arange(n), counts[r])
        for avg in ("macro", "micro", "weighted"):
            assert abs(out[f"{avg}_auroc"][r] - roc_auc_score(y[idx], s[idx], average=avg)) \
                < 1e-12
            assert abs(out[f"{avg}_auprc"][r]
                       - average_precision_score(y[idx], s[idx], average=avg)) < 1e-12


def test_multiclass_statistic_equals_sklearn():
    rng = np.random.default_rng(3)
    n, k = 200, 7
    y = rng.integers(0, k, n)
    logits = rng.normal(0, 1, (n, k))
    logits[np.arange(n), y] += 1.0
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    counts = next(resample_counts(y, 15, seed=1))
    out = multiclass_statistic(y, p)(counts)
    for r in range(15):
        idx = np.repeat(np.arange(n), counts[r])
        yt, pr = y[idx], np.argmax(p[idx], axis=1)
        assert abs(out["accuracy"][r] - accuracy_score(yt, pr)) < 1e-12
        assert abs(out["macro_f1"][r] - f1_score(yt, pr, average="macro", zero_division=0)) \
            < 1e-12
        assert abs(out["kappa"][r] - cohen_kappa_score(yt, pr, labels=np.arange(k))) < 1e-12
        assert abs(out["kappa_linear"][r]
                   - cohen_kappa_score(yt, pr, labels=np.arange(k), weights="linear")) < 1e-12
        assert abs(out["macro_auroc"][r]
                   - roc_auc_score(yt, p[idx], multi_class="ovr", average="macro")) < 1e-12


def test_weights_must_be_integer_counts():
    with pytest.raises(TypeError, match="integer counts"):
        RankedScores([0, 1], [0.1, 0.9]).rank_metrics(np.array([[0.5, 1.0]]))


def test_youden_threshold_rule_and_ties():
    # J at 0.4: 2/2 - 2/3 = 1/3; at 0.6: 2/2 - 1/3 = 2/3; at 0.7: 1/2 - 1/3; at 0.8: 1/2 - 0
    y = np.array([0, 0, 1, 0, 1])
    s = np.array([0.2, 0.4, 0.6, 0.7, 0.8])
    threshold, info = youden_threshold(y, s)
    assert threshold == 0.6 and info["youden_j"] == pytest.approx(2 / 3)
    # two thresholds with the same J (0.3 and 0.5 both give J = 1/2): smallest wins
    threshold, _ = youden_threshold(np.array([0, 1, 0, 1]), np.array([0.1, 0.3, 0.4, 0.5]))
    assert threshold == 0.3
    assert np.isnan(youden_threshold([], [])[0])
    assert "one class" in youden_threshold([1, 1], [0.2, 0.3])[1]["reason"]


# --------------------------------------------------------------------------- bootstrap

def test_resample_counts_stratified_deterministic_and_block_invariant():
    strata = np.array([0] * 30 + [1] * 10)
    blocks = list(resample_counts(strata, 50, seed=7, block_elements=40 * 7))
    assert len(blocks) > 1
    counts = np.concatenate(blocks)
    assert counts.shape == (50, 40)
    assert (counts[:, :30].sum(axis=1) == 30).all() and (counts[:, 30:].sum(axis=1) == 10).all()
    single = next(resample_counts(strata, 50, seed=7))
    np.testing.assert_array_equal(counts, single)
    other = next(resample_counts(strata, 50, seed=8))
    assert not np.array_equal(single, other)


def test_bootstrap_ci_contains_point_and_narrows_with_n():
    widths = []
    for n in (200, 2000):
        df, meta = make_predictions(n=n, seed=4, parts=(0.0, 0.0, 1.0))
        y = df["y_true_mortality"].to_numpy()
        point, reps = bootstrap(binary_statistic(y, df["y_prob_mortality"].to_numpy()), y,
                                300, seed=0)
        low, high = np.quantile(reps["auroc"], [0.025, 0.975])
        assert low <= point["auroc"] <= high
        widths.append(high - low)
    assert widths[1] < widths[0] * 0.6


# --------------------------------------------------------------------------- evaluate

def test_threshold_is_chosen_on_val_not_test():
    # val: positives at 0.3/0.35, negatives at 0.1/0.2 -> Youden threshold 0.3.
    # test: positives at 0.75/0.8, negatives at 0.4/0.5/0.7 -> a test-tuned threshold would be 0.75.
    val_y, val_s = [0, 0, 1, 1], [0.1, 0.2, 0.3, 0.35]
    test_y, test_s = [0, 0, 0, 1, 1], [0.4, 0.5, 0.7, 0.75, 0.8]
    df = pd.DataFrame({"stay_id": np.arange(9), "part": ["val"] * 4 + ["test"] * 5, "fold": 1,
                       "task": "mortality", "y_true_mortality": val_y + test_y,
                       "y_prob_mortality": val_s + test_s})
    result = evaluate_predictions(df, {"task": "mortality"}, n_boot=50, fairness=False)
    assert result["threshold"]["value"] == 0.3
    assert result["threshold"]["part"] == "val"
    assert "never chosen on the test part" in result["threshold"]["rule"]
    # at 0.3 every test stay is flagged: sensitivity 1, specificity 0
    assert result["metrics"]["sensitivity"]["value"] == 1.0
    assert result["metrics"]["specificity"]["value"] == 0.0
    assert result["metrics"]["auroc"]["value"] == 1.0
    with pytest.raises(ValueError, match="never chosen on the test part"):
        evaluate_predictions(df, {"task": "mortality"}, threshold_part="test")


def test_no_val_rows_gives_null_threshold_metrics_with_reason():
    df, meta = make_predictions(n=200, parts=(0.7, 0.0, 0.3))
    result = evaluate_predictions(df, meta, n_boot=20, fairness=False)
    assert result["threshold"]["value"] is None
    assert "no rows" in result["threshold"]["reason"]
    for name in ("sensitivity", "specificity", "ppv", "f1"):
        assert result["metrics"][name]["value"] is None
    assert result["metrics"]["auroc"]["value"] > 0.5
    assert any("threshold metrics are null" in note for note in result["notes"])


def test_binary_result_layout_and_traceability(tmp_path):
    df, meta = make_predictions(n=400)
    path = write_predictions(df, meta, tmp_path / "preds.parquet")
    result = evaluate_file(path, n_boot=100, seed=3, fairness=False)
    json.dumps(result, allow_nan=False)
    assert result["source"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert result["n"] == {p: int((df["part"] == p).sum()) for p in ("train", "val", "test")}
    assert result["meta"]["run_id"] == "run-1" and result["fold"] == 0
    auroc = result["metrics"]["auroc"]
    assert set(auroc) >= {"value", "ci_low", "ci_high", "n_boot", "seed"}
    assert auroc["n_boot"] == 100 and auroc["seed"] == 3
    assert auroc["ci_low"] <= auroc["value"] <= auroc["ci_high"]
    test = df[df["part"] == "test"]
    assert auroc["value"] == pytest.approx(
        roc_auc_score(test["y_true_mortality"], test["y_prob_mortality"]), abs=1e-12)
    assert result["bootstrap"]["strata"].startswith("label")


def test_result_ignores_row_order():
    df, meta = make_predictions(n=300)
    a = evaluate_predictions(df, meta, n_boot=50, fairness=False)
    b = evaluate_predictions(df.sample(frac=1.0, random_state=1), meta, n_boot=50,
                             fairness=False)
    assert a["metrics"] == b["metrics"]


def test_phenotype_single_class_label_excluded_from_macro():
    df, meta = make_predictions("phenotype", n=300)
    df.loc[df["part"] == "test", "y_true_pheno_0"] = 0
    result = evaluate_predictions(df, meta, n_boot=30, fairness=False)
    assert result["per_label"]["pheno_0"]["auroc"]["value"] is None
    assert result["labels_single_class"] == ["pheno_0"]
    others = [result["per_label"][lab]["auroc"]["value"] for lab in PHENOTYPES[1:]]
    assert result["metrics"]["macro_auroc"]["value"] == pytest.approx(np.mean(others))
    test = df[df["part"] == "test"]
    y = test[[f"y_true_{lab}" for lab in PHENOTYPES[1:]]].to_numpy()
    s = test[[f"y_prob_{lab}" for lab in PHENOTYPES[1:]]].to_numpy()
    assert result["metrics"]["weighted_auroc"]["value"] == pytest.approx(
        roc_auc_score(y, s, average="weighted"), abs=1e-12)
    assert any("1 label(s)" in note for note in result["notes"])


def test_los_metrics_and_absent_class():
    df, meta = make_predictions("los", n=400)
    test = df["part"] == "test"
    df.loc[test & (df["y_true_los"] == 6), "y_true_los"] = 5
    result = evaluate_predictions(df, meta, n_boot=30, fairness=False)
    assert result["classes_skipped_auroc"] == ["14+d"]
    assert result["per_class"]["14+d"]["auroc"]["value"] is None
    t = df[test]
    pred = np.argmax(t[[f"y_prob_{c}" for c in LOS_CLASS_NAMES]].to_numpy(), axis=1)
    assert result["metrics"]["accuracy"]["value"] == pytest.approx(
        accuracy_score(t["y_true_los"], pred))
    assert result["metrics"]["kappa_linear"]["value"] == pytest.approx(cohen_kappa_score(
        t["y_true_los"], pred, labels=np.arange(7), weights="linear"))
    assert result["decision_rule"].startswith("predicted class = arg-max")


# --------------------------------------------------------------------------- predictions file

def test_write_load_roundtrip(tmp_path):
    df, meta = make_predictions("los", n=50)
    path = write_predictions(df, meta, tmp_path / "sub" / "p.parquet")
    loaded, loaded_meta = load_predictions(path)
    assert loaded_meta["class_names"] == list(LOS_CLASS_NAMES)
    assert loaded_meta["method"] == "toy"
    pd.testing.assert_frame_equal(loaded, df, check_dtype=False)
    assert not list(path.parent.glob("*.partial"))


def _error(df, meta, match):
    with pytest.raises(PredictionsError, match=match):
        write_predictions(df, meta, "/nonexistent/never-written.parquet")


def test_error_missing_columns():
    df, meta = make_predictions(n=20)
    _error(df.drop(columns=["y_prob_mortality", "fold"]), meta,
           r"missing required column\(s\) fold, y_prob_mortality")


def test_error_unknown_task_lists_valid():
    df, meta = make_predictions(n=20)
    _error(df, {**meta, "task": "ihm"},
           "unknown task 'ihm'.*mortality, mortality_hosp, phenotype, los")


def test_error_nan_and_inf_probabilities():
    df, meta = make_predictions(n=20)
    df.loc[[3, 7], "y_prob_mortality"] = [np.nan, np.inf]
    _error(df, meta, r"y_prob_mortality has 2 NaN/inf value\(s\) \(stay ids 10003, 10007\)")


def test_error_probabilities_outside_unit_interval():
    df, meta = make_predictions(n=20)
    df.loc[2, "y_prob_mortality"] = 2.5
    _error(df, meta, r"y_prob_mortality has 1 value\(s\) outside \[0, 1\].*10002.*logits")


def test_error_los_rows_not_summing_to_one():
    df, meta = make_predictions("los", n=20)
    df.loc[4, "y_prob_2-3d"] += 0.01
    _error(df, meta, r"1 row\(s\) of the LoS probabilities .* do not sum to 1.*10004")


def test_error_duplicate_stay_part():
    df, meta = make_predictions(n=20)
    _error(pd.concat([df, df.iloc[[0]]]), meta, r"2 row\(s\) share a \(stay_id, part\) pair")


def test_error_labels_not_binary():
    df, meta = make_predictions(n=20)
    df.loc[5, "y_true_mortality"] = 2
    _error(df, meta, r"y_true_mortality has 1 label\(s\) that are not 0/1.*10005")
    df, meta = make_predictions("los", n=20)
    df.loc[1, "y_true_los"] = 7
    _error(df, meta, r"y_true_los has 1 label\(s\) that are not class indices 0..6")


def test_error_empty_test_part():
    df, meta = make_predictions(n=20)
    _error(df[df["part"] != "test"], meta, "the test part is empty")


def test_error_several_folds_and_bad_part():
    df, meta = make_predictions(n=20)
    df.loc[0, "fold"] = 1
    _error(df, meta, r"several folds \[0, 1\]")
    df, meta = make_predictions(n=20)
    df.loc[0, "part"] = "valid"
    _error(df, meta, r"invalid values \['valid'\].*valid parts: train, val, test")


def test_error_file_without_meta_or_not_parquet(tmp_path):
    df, _ = make_predictions(n=20)
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.Table.from_pandas(df), plain)
    with pytest.raises(PredictionsError, match="no 'cbstore' key in the parquet metadata"):
        load_predictions(plain)
    junk = tmp_path / "junk.parquet"
    junk.write_text("not parquet")
    with pytest.raises(PredictionsError, match="not a readable parquet file"):
        load_predictions(junk)
    with pytest.raises(PredictionsError, match="not found"):
        load_predictions(tmp_path / "missing.parquet")


# --------------------------------------------------------------------------- reliance

def test_modality_reliance_drop_and_identity():
    df, meta = make_predictions(n=600, signal=3.0)
    rng = np.random.default_rng(0)
    permuted = df.copy()
    test = permuted["part"] == "test"
    permuted.loc[test, "y_prob_mortality"] = rng.permutation(
        permuted.loc[test, "y_prob_mortality"].to_numpy())
    out = modality_reliance(df, permuted, meta_full=meta, meta_permuted=meta, modality="cxr",
                            n_boot=200)
    assert out["modality"] == "cxr" and out["metric"] == "auroc"
    assert out["drop"]["value"] == pytest.approx(
        out["full"]["value"] - out["permuted"]["value"])
    assert out["drop"]["ci_low"] > 0.2
    same = modality_reliance(df, df, meta_full=meta, meta_permuted=meta, n_boot=50)
    assert same["drop"] == {"value": 0.0, "ci_low": 0.0, "ci_high": 0.0, "n_boot": 50, "seed": 0}
    other = df.copy()
    other.loc[other.index[other["part"] == "test"][0], "y_true_mortality"] ^= 1
    with pytest.raises(PredictionsError, match="disagree on y_true_mortality"):
        modality_reliance(df, other, meta_full=meta, meta_permuted=meta, n_boot=10)


def test_modality_reliance_phenotype_uses_macro():
    df, meta = make_predictions("phenotype", n=200)
    out = modality_reliance(df, df, meta_full=meta, meta_permuted=meta, n_boot=20)
    assert out["metric"] == "macro_auroc" and out["drop"]["value"] == 0.0


# --------------------------------------------------------------------------- report, CLI, imports

def test_format_table():
    text = format_table([{"metric": "auroc", "value": {"value": 0.9, "ci_low": 0.85,
                                                        "ci_high": 0.94}},
                         {"metric": "ppv", "value": {"value": None, "ci_low": None,
                                                     "ci_high": None}, "n": 3}])
    lines = text.splitlines()
    assert lines[0].split("|")[1:-1] == [" metric ", " value                ", " n   "]
    assert "0.900 [0.850, 0.940]" in lines[2] and "n/a" in lines[3] and "| 3" in lines[3]
    assert format_table([]) == ""


def test_cli_evaluate_writes_json(tmp_path):
    df, meta = make_predictions(n=300)
    path = write_predictions(df, meta, tmp_path / "preds.parquet")
    out = tmp_path / "m.json"
    result = CliRunner().invoke(evaluate_cli, [str(path), "--n-boot", "50", "--seed", "1",
                                               "--out", str(out), "--min-group-size", "10"])
    assert result.exit_code == 0, result.output
    assert "task: mortality" in result.output
    assert "| auroc " in result.output and "threshold:" in result.output
    assert "gender x race" in result.output
    data = json.loads(out.read_text())
    assert data["metrics"]["auroc"]["n_boot"] == 50 and data["bootstrap"]["seed"] == 1
    assert data["source"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert data["fairness"]["min_group_size"] == 10


def test_cli_compare_and_default_out(tmp_path):
    df, meta = make_predictions(n=300, signal=3.0)
    worse, _ = make_predictions(n=300, signal=0.5)
    a = write_predictions(df, meta, tmp_path / "a.parquet")
    b = write_predictions(worse, {**meta, "method": "worse"}, tmp_path / "b.parquet")
    result = CliRunner().invoke(evaluate_cli, [str(a), "--n-boot", "20", "--no-fairness",
                                               "--compare", str(b), "--n-perm", "99"])
    assert result.exit_code == 0, result.output
    assert "Paired permutation tests, toy vs worse" in result.output
    data = json.loads((tmp_path / "a.metrics.json").read_text())
    assert data["fairness"] is None
    tests = data["comparison"]["tests"]
    assert set(tests) == {"auroc", "auprc"}
    assert tests["auroc"]["p_value"] == pytest.approx(1 / 100)
    assert data["comparison"]["source_b"]["sha256"] == hashlib.sha256(b.read_bytes()).hexdigest()


def test_cli_bad_file_fails_with_message(tmp_path):
    df, meta = make_predictions(n=20)
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.Table.from_pandas(df), plain)
    result = CliRunner().invoke(evaluate_cli, [str(plain)])
    assert result.exit_code == 1
    assert "no 'cbstore' key" in result.output
    assert not (tmp_path / "plain.metrics.json").exists()


def test_evaluation_package_imports_without_torch():
    code = ("import sys, fusion.evaluation, cli.evaluate_cmd; "
            "bad = [m for m in ('torch', 'torchvision', 'torchxrayvision') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
