"""The shared evaluator: metrics with bootstrap CIs, fairness and comparisons of predictions.

Scoring rules (recorded in every result):

* metrics are computed on the **test part only**;
* the decision threshold of binary tasks comes from the validation part
  (:data:`fusion.evaluation.metrics.THRESHOLD_RULE`); with no usable validation rows the
  threshold metrics are null with a reason, never computed on test;
* 95% percentile CIs from a stratified bootstrap (:mod:`fusion.evaluation.bootstrap`);
* undefined numbers (one class only, no threshold) are JSON ``null``, never 0.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib

import numpy as np
import pandas as pd

from fusion.evaluation.bootstrap import bootstrap, summarise
from fusion.evaluation.fairness import DEFAULT_GROUPS, fairness_report
from fusion.evaluation.metrics import (
    STRATA_DESCRIPTION, THRESHOLD_RULE, bootstrap_strata, task_statistic, youden_threshold,
)
from fusion.evaluation.predictions import (
    PARTS, EvaluationError, load_predictions, select_test, task_arrays,
    task_kind, temporary_sibling, validate_predictions,
)
from fusion.evaluation.significance import permutation_test

__all__ = [
    "COMPARE_METRICS", "EVALUATOR_VERSION", "HEADLINE_METRICS", "compare_files",
    "compare_predictions", "evaluate_file", "evaluate_predictions", "file_sha256", "json_ready",
    "write_json",
]

#: Version of the metrics JSON layout.
EVALUATOR_VERSION = "1.0.0"

#: Metrics reported with CIs, per task kind.
HEADLINE_METRICS = {
    "binary": ("auroc", "auprc", "sensitivity", "specificity", "ppv", "f1"),
    "multilabel": ("macro_auroc", "macro_auprc", "micro_auroc", "micro_auprc", "weighted_auroc",
                   "weighted_auprc"),
    "multiclass": ("accuracy", "macro_f1", "kappa", "kappa_linear", "macro_auroc"),
}
#: Metrics tested by :func:`compare_predictions` by default.
COMPARE_METRICS = {
    "binary": ("auroc", "auprc"),
    "multilabel": ("auroc", "auprc"),
    "multiclass": ("accuracy", "macro_f1", "kappa_linear", "auroc"),
}


def _kind(task: str) -> str:
    return task_kind(task)


def evaluate_predictions(df: pd.DataFrame, meta: dict, *, n_boot: int = 1000, seed: int = 0,
                         threshold_part: str = "val", groups=DEFAULT_GROUPS, intersections=True,
                         min_group_size: int = 30, fairness: bool = True) -> dict:
    """Score a run's predictions.

    Parameters
    ----------
    df : pandas.DataFrame
        Predictions (format of :mod:`fusion.evaluation.predictions`).
    meta : dict
        Predictions meta.
    n_boot : int
        Bootstrap resamples for the CIs (0: point estimates only).
    seed : int
        Seed of the bootstrap.
    threshold_part : {"val", "train"}
        Part on which the binary decision threshold is chosen; ``"test"`` is refused.
    groups : sequence of str
        Demographic columns for the fairness section.
    intersections : bool or sequence of (str, str)
        Pairs of attributes for intersectional groups (True: every pair).
    min_group_size : int
        Groups smaller than this are flagged ``small`` and left out of gaps.
    fairness : bool
        Compute the fairness section.

    Returns
    -------
    dict
        Strict-JSON-ready result (NaN -> None): ``evaluator``, ``task``, ``fold``, ``method``,
        ``run_id``, ``meta``, ``n`` (rows per part), ``threshold``, ``metrics`` (name ->
        ``{"value", "ci_low", "ci_high", "n_boot", "seed"}``), ``per_label`` (phenotype) or
        ``per_class`` (los), ``bootstrap``, ``notes`` and ``fairness``.

    Raises
    ------
    PredictionsError
        Invalid predictions.
    ValueError
        ``threshold_part`` is ``"test"`` or unknown.
    """
    if threshold_part == "test":
        raise EvaluationError("the decision threshold is never chosen on the test part; use 'val'")
    if threshold_part not in PARTS:
        raise EvaluationError(f"unknown threshold_part {threshold_part!r}; use 'val' (or 'train')")
    source = str(meta.get("run_id") or "predictions") if isinstance(meta, dict) else "predictions"
    df, meta = validate_predictions(df, meta, source=source)
    task = meta["task"]
    kind = _kind(task)
    test = select_test(df)
    y, scores = task_arrays(test, meta)
    counts = df["part"].value_counts()
    result = {
        "evaluator": {"name": "fusion.evaluation", "version": EVALUATOR_VERSION},
        "task": task, "fold": int(df["fold"].iloc[0]), "method": meta.get("method"),
        "run_id": meta.get("run_id"), "meta": meta,
        "n": {part: int(counts.get(part, 0)) for part in PARTS},
        "notes": [],
    }

    threshold = float("nan")
    if kind == "binary":
        chosen = df[df["part"] == threshold_part]
        threshold, info = youden_threshold(*task_arrays(chosen, meta))
        if info["reason"]:
            info["reason"] = f"{threshold_part} part: {info['reason']}; threshold metrics are null"
            result["notes"].append(info["reason"])
        result["threshold"] = {"value": threshold, "part": threshold_part, "rule": THRESHOLD_RULE,
                               "youden_j": info["youden_j"], "reason": info["reason"]}
        result["n_test_positive"] = int(y.sum())
        if y.min() == y.max():
            result["notes"].append("the test part has one class only: AUROC/AUPRC are null")
    elif kind == "multiclass":
        result["threshold"] = None
        result["decision_rule"] = "predicted class = arg-max probability (first class on ties)"
    else:
        result["threshold"] = None

    stat = task_statistic(task, y, scores, threshold=threshold)
    point, replicates = bootstrap(stat, bootstrap_strata(task, y), n_boot, seed)
    result["metrics"] = {name: summarise(point[name], replicates[name], n_boot, seed)
                         for name in HEADLINE_METRICS[kind]}
    if kind == "multilabel":
        _per_label(result, meta, y, point, replicates, n_boot, seed)
    elif kind == "multiclass":
        _per_class(result, meta, y, point, replicates, n_boot, seed)
    result["bootstrap"] = {"n_boot": int(n_boot), "seed": int(seed), "interval": "percentile 95%",
                           "strata": STRATA_DESCRIPTION[task],
                           "rng": "numpy default_rng, one SeedSequence(seed) child per stratum"}
    if kind == "binary":
        result["bootstrap"]["threshold"] = "held at the val-chosen value in every resample"
    if fairness:
        result["fairness"] = fairness_report(
            df, meta, groups, intersections=intersections,
            threshold=threshold if kind == "binary" else None, min_group_size=min_group_size)
    else:
        result["fairness"] = None
    return json_ready(result)


def _per_label(result, meta, y, point, replicates, n_boot, seed) -> None:
    n_pos = y.sum(axis=0)
    per_label = {}
    single = []
    for j, label in enumerate(meta["labels"]):
        per_label[label] = {
            "n_pos": int(n_pos[j]), "prevalence": float(n_pos[j] / len(y)),
            "auroc": summarise(point["label_auroc"][j], replicates["label_auroc"][:, j],
                               n_boot, seed),
            "auprc": summarise(point["label_auprc"][j], replicates["label_auprc"][:, j],
                               n_boot, seed)}
        if not 0 < n_pos[j] < len(y):
            single.append(label)
    result["per_label"] = per_label
    result["labels_single_class"] = single
    if single:
        result["notes"].append(
            f"{len(single)} label(s) have one class in the test part; their AUROC/AUPRC are null "
            "and they are excluded from the macro and weighted averages")


def _per_class(result, meta, y, point, replicates, n_boot, seed) -> None:
    support = np.bincount(y, minlength=len(meta["class_names"]))
    per_class = {}
    absent = []
    for c, name in enumerate(meta["class_names"]):
        per_class[name] = {"n": int(support[c]),
                           "auroc": summarise(point["class_auroc"][c],
                                              replicates["class_auroc"][:, c], n_boot, seed)}
        if not 0 < support[c] < len(y):
            absent.append(name)
    result["per_class"] = per_class
    result["classes_skipped_auroc"] = absent
    if absent:
        result["notes"].append(
            f"class(es) {', '.join(absent)} absent from (or alone in) the test part: skipped in "
            "the macro one-vs-rest AUROC")


def compare_predictions(a: tuple[pd.DataFrame, dict], b: tuple[pd.DataFrame, dict], *,
                        metrics=None, n_perm: int = 1000, seed: int = 0) -> dict:
    """Paired permutation tests of run ``a`` against run ``b`` for several metrics.

    Parameters
    ----------
    a, b : (pandas.DataFrame, dict)
        Predictions and metas of the two runs (same task and labels).
    metrics : sequence of str, optional
        Default :data:`COMPARE_METRICS` of the task.
    n_perm : int
    seed : int

    Returns
    -------
    dict
        ``{"method_a", "method_b", "run_id_a", "run_id_b", "tests": {metric: result}}`` where each
        result is that of :func:`fusion.evaluation.significance.permutation_test`; p-values are
        not adjusted across metrics.
    """
    (df_a, meta_a), (df_b, meta_b) = a, b
    metrics = metrics or COMPARE_METRICS[_kind(meta_a["task"])]
    tests = {m: permutation_test(df_a, df_b, m, meta_a=meta_a, meta_b=meta_b, n_perm=n_perm,
                                 seed=seed) for m in metrics}
    return json_ready({"method_a": meta_a.get("method"), "method_b": meta_b.get("method"),
                       "run_id_a": meta_a.get("run_id"), "run_id_b": meta_b.get("run_id"),
                       "tests": tests})


def file_sha256(path) -> str:
    """SHA-256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def evaluate_file(path, **kwargs) -> dict:
    """Load a predictions file, evaluate it, and record its path and SHA-256.

    Keyword arguments are those of :func:`evaluate_predictions`.
    """
    df, meta = load_predictions(path)
    result = evaluate_predictions(df, meta, **kwargs)
    result["source"] = {"path": str(pathlib.Path(path).resolve()), "sha256": file_sha256(path)}
    return result


def compare_files(path_a, path_b, **kwargs) -> dict:
    """Load two predictions files and compare them (see :func:`compare_predictions`)."""
    result = compare_predictions(load_predictions(path_a), load_predictions(path_b), **kwargs)
    result["source_a"] = {"path": str(pathlib.Path(path_a).resolve()),
                          "sha256": file_sha256(path_a)}
    result["source_b"] = {"path": str(pathlib.Path(path_b).resolve()),
                          "sha256": file_sha256(path_b)}
    return result


def json_ready(obj):
    """Turn numpy scalars/arrays into Python values and NaN/inf into None (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [json_ready(v) for v in obj.tolist()]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if obj is pd.NA or obj is pd.NaT:
        return None
    return obj


def write_json(obj, path) -> pathlib.Path:
    """Write strict JSON (no NaN) atomically: temporary sibling, then rename."""
    path = pathlib.Path(path)
    text = json.dumps(json_ready(obj), indent=2, allow_nan=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temporary_sibling(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    return path
