"""Subgroup metrics on the test part, built on fairlearn's ``MetricFrame``.

Per group (of one attribute, or of a pair of attributes for intersections):

* binary tasks: ``n``, ``prevalence``, ``auroc``, ``auprc``, ``tpr``, ``fpr``, ``ppv``,
  ``selection_rate`` (at the threshold chosen on the validation part), ``ece`` (10 equal-width
  bins);
* phenotype: ``n``, ``prevalence`` (mean over labels), ``macro_auroc``, ``macro_auprc`` (over the
  labels with both classes in the group) and ``n_labels`` (how many such labels);
* los: ``n``, ``accuracy``, ``macro_f1``.

A metric that is undefined in a group (one class only, no predicted positive, no threshold) is
NaN, never 0. Groups with fewer than ``min_group_size`` stays are kept in the table with
``small=True`` but left out of the gaps and of the equalized-odds / demographic-parity
differences, which small noisy groups would otherwise dominate. Missing attribute values
(NaN, None, "") form the group ``"Unknown"``.

Gaps: over the non-small groups with a finite value, ``gap = max - min`` and
``ratio = min / max`` (None when max <= 0). The equalized-odds and demographic-parity differences
are fairlearn's definitions (``equalized_odds_difference``: the larger of the between-group TPR
and FPR differences; ``demographic_parity_difference``: the between-group difference of the
selection rate) over the non-small groups (equalized odds: groups that also have both classes),
read from the per-group table instead of calling fairlearn again per attribute (30 more
``MetricFrame`` builds, about half of the evaluator's time on one label); the tests check them
against fairlearn's functions. No confidence intervals are computed for subgroup metrics.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from fusion.evaluation.metrics import RankedScores, expected_calibration_error, youden_threshold
from fusion.evaluation.predictions import (
    is_binary, select_test, task_arrays, task_kind, validate_predictions,
)

__all__ = ["DEFAULT_GROUPS", "GAP_METRICS", "UNKNOWN", "fairness_report", "fairness_table"]

#: Demographic columns the evaluator looks for.
DEFAULT_GROUPS = ("gender", "age_group", "race", "insurance", "admission_type")
#: Group name for missing attribute values.
UNKNOWN = "Unknown"
#: Joins the group values of an intersection ("F & WHITE") and the attribute names.
_GROUP_SEP = " & "
_ATTR_SEP = " x "
#: Metrics whose between-group gap is reported, per task kind.
GAP_METRICS = {
    "binary": ("auroc", "auprc", "tpr", "fpr", "ppv", "selection_rate", "ece"),
    "multilabel": ("macro_auroc", "macro_auprc"),
    "multiclass": ("accuracy", "macro_f1"),
}


def _kind(task: str) -> str:
    return task_kind(task)


def _binary_metrics(threshold: float):
    """Column names and the per-group function of binary tasks."""
    names = ("n", "prevalence", "auroc", "auprc", "tpr", "fpr", "ppv", "selection_rate", "ece")
    have_threshold = bool(np.isfinite(threshold))

    def compute(y, p):
        y = np.asarray(y).astype(bool)
        p = np.asarray(p, dtype=np.float64)
        auroc, auprc = RankedScores(y, p).rank_metrics(np.ones((1, y.size), np.int32))
        flagged = p >= threshold if have_threshold else np.zeros(y.size, bool)
        tpr = flagged[y].mean() if have_threshold and y.any() else np.nan
        fpr = flagged[~y].mean() if have_threshold and (~y).any() else np.nan
        ppv = y[flagged].mean() if have_threshold and flagged.any() else np.nan
        selection = flagged.mean() if have_threshold and y.size else np.nan
        return np.array([y.size, y.mean() if y.size else np.nan, auroc[0], auprc[0], tpr, fpr,
                         ppv, selection, expected_calibration_error(y, p)], dtype=np.float64)

    return names, compute


def _phenotype_metrics():
    """Column names and the per-group function of the phenotype task."""
    names = ("n", "prevalence", "macro_auroc", "macro_auprc", "n_labels")

    def compute(y, p):
        y, p = np.asarray(y), np.asarray(p, dtype=np.float64)
        ones = np.ones((1, len(y)), np.int32)
        pairs = np.array([[m[0] for m in RankedScores(y[:, j], p[:, j]).rank_metrics(ones)]
                          for j in range(y.shape[1])])            # [L, (auroc, auprc)]
        defined = np.isfinite(pairs[:, 0])
        macro = pairs[defined].mean(axis=0) if defined.any() else np.full(2, np.nan)
        return np.array([len(y), y.mean() if len(y) else np.nan, macro[0], macro[1],
                         defined.sum()], dtype=np.float64)

    return names, compute


def _los_metrics():
    """Column names and the per-group function of the LoS task."""
    from sklearn.metrics import f1_score

    names = ("n", "accuracy", "macro_f1")

    def compute(y, p):
        if not len(y):
            return np.array([0.0, np.nan, np.nan])
        pred = np.argmax(p, axis=1)
        return np.array([len(y), np.mean(pred == y),
                         f1_score(y, pred, average="macro", zero_division=0)], dtype=np.float64)

    return names, compute


def _group_labels(df: pd.DataFrame, columns: list[str]) -> np.ndarray:
    """One group label per row ("F" or "F & WHITE"); missing values -> :data:`UNKNOWN`."""
    labels = None
    for col in columns:
        values = df[col].astype(object)
        text = values.astype(str).str.strip()
        text = text.where(~(values.isna() | (text == "")), UNKNOWN)
        labels = text if labels is None else labels + _GROUP_SEP + text
    return labels.to_numpy(dtype=object)


def _attribute_sets(df: pd.DataFrame, groups, intersections) -> tuple[list[list[str]], dict]:
    present = [g for g in groups if g in df.columns]
    skipped = {g: "column not in the predictions" for g in groups if g not in df.columns}
    sets = [[g] for g in present]
    if intersections is True:
        pairs = list(itertools.combinations(present, 2))
    elif intersections:
        pairs = [tuple(p) for p in intersections]
    else:
        pairs = []
    for pair in pairs:
        absent = [c for c in pair if c not in df.columns]
        if absent:
            skipped[_ATTR_SEP.join(pair)] = f"column(s) {', '.join(absent)} not in the predictions"
        else:
            sets.append(list(pair))
    return sets, skipped


def _resolve_threshold(df: pd.DataFrame, meta: dict, threshold) -> float:
    if not is_binary(meta["task"]):
        return float("nan")
    if threshold is not None:
        return float(threshold)
    val = df[df["part"] == "val"]
    y, p = task_arrays(val, meta)
    return youden_threshold(y, p)[0]


def _frames(df: pd.DataFrame, meta: dict, groups, intersections, threshold, min_group_size):
    """Per attribute set: (name, by-group table); and the skipped sets, threshold and meta."""
    from fairlearn.metrics import MetricFrame

    df, meta = validate_predictions(df, meta, source="fairness")
    threshold = _resolve_threshold(df, meta, threshold)
    test = select_test(df)
    y, p = task_arrays(test, meta)
    kind = _kind(meta["task"])
    if kind == "binary":
        names, compute = _binary_metrics(threshold)
    elif kind == "multilabel":
        names, compute = _phenotype_metrics()
    else:
        names, compute = _los_metrics()
    sets, skipped = _attribute_sets(test, groups, intersections)
    out = []
    for columns in sets:
        labels = _group_labels(test, columns)
        # One metric function returning every column keeps fairlearn's per-call overhead low.
        frame = MetricFrame(metrics={"all": compute}, y_true=y, y_pred=p,
                            sensitive_features=labels)
        by_group = pd.DataFrame(np.vstack(frame.by_group["all"].to_numpy()),
                                index=[str(k) for k in frame.by_group.index], columns=names)
        by_group["n"] = by_group["n"].astype(np.int64)
        if "n_labels" in by_group:
            by_group["n_labels"] = by_group["n_labels"].astype(np.int64)
        by_group["small"] = by_group["n"] < min_group_size
        out.append((_ATTR_SEP.join(columns), by_group))
    return out, skipped, threshold, meta


def fairness_table(df: pd.DataFrame, meta: dict, groups=DEFAULT_GROUPS, *, intersections=True,
                   threshold: float | None = None, min_group_size: int = 30) -> pd.DataFrame:
    """Per-group metrics of the test part, one row per (attribute, group).

    Parameters
    ----------
    df : pandas.DataFrame
        Predictions (all parts; the test part is scored, the val part gives the threshold).
    meta : dict
        Predictions meta.
    groups : sequence of str
        Attribute columns; those absent from ``df`` are skipped.
    intersections : bool or sequence of (str, str)
        True: every pair of present attributes; or explicit pairs; False: none.
    threshold : float, optional
        Decision threshold for binary tasks; default: chosen on the val part by Youden's J.
    min_group_size : int
        Groups with fewer stays get ``small=True``.

    Returns
    -------
    pandas.DataFrame
        Columns ``attribute``, ``group``, ``n``, ``small`` and the task's metrics (NaN where
        undefined).
    """
    frames = _frames(df, meta, groups, intersections, threshold, min_group_size)[0]
    tables = []
    for name, by_group in frames:
        table = by_group.reset_index(names="group")
        table.insert(0, "attribute", name)
        tables.append(table)
    if not tables:
        return pd.DataFrame(columns=["attribute", "group", "n", "small"])
    table = pd.concat(tables, ignore_index=True)
    first = ["attribute", "group", "n", "small"]
    return table[first + [c for c in table.columns if c not in first]]


def _gaps(by_group: pd.DataFrame, metrics) -> dict:
    eligible = by_group[~by_group["small"]]
    gaps = {}
    for metric in metrics:
        values = eligible[metric].astype(float)
        values = values[np.isfinite(values)]
        if len(values) < 2:
            gaps[metric] = {"gap": None, "ratio": None, "min_group": None, "max_group": None,
                            "n_groups": int(len(values))}
            continue
        low, high = float(values.min()), float(values.max())
        gaps[metric] = {"gap": high - low, "ratio": low / high if high > 0 else None,
                        "min_group": str(values.idxmin()), "max_group": str(values.idxmax()),
                        "n_groups": int(len(values))}
    return gaps


def _odds_and_parity(by_group: pd.DataFrame, threshold) -> dict:
    """Equalized-odds and demographic-parity differences from the per-group table."""
    out = {"equalized_odds_difference": None, "demographic_parity_difference": None,
           "eo_groups": [], "dp_groups": [], "reason": None}
    if not np.isfinite(threshold):
        out["reason"] = "no decision threshold (none could be chosen on the val part)"
        return out
    large = by_group[~by_group["small"]]
    both = large[(large["prevalence"] > 0) & (large["prevalence"] < 1)]
    reasons = []
    for key, groups_key, table, rates in (
            ("demographic_parity_difference", "dp_groups", large, ("selection_rate",)),
            ("equalized_odds_difference", "eo_groups", both, ("tpr", "fpr"))):
        out[groups_key] = [str(k) for k in table.index]
        if len(table) < 2:
            reasons.append(f"{key}: fewer than 2 eligible groups")
            continue
        out[key] = max(float(table[rate].max() - table[rate].min()) for rate in rates)
    out["reason"] = "; ".join(reasons) or None
    return out


def fairness_report(df: pd.DataFrame, meta: dict, groups=DEFAULT_GROUPS, *, intersections=True,
                    threshold: float | None = None, min_group_size: int = 30) -> dict:
    """Fairness section of the metrics JSON: per-group metrics, gaps, EO and DP differences.

    Parameters are those of :func:`fairness_table`.

    Returns
    -------
    dict
        ``{"min_group_size", "threshold", "unknown_group", "skipped", "attributes": {name:
        {"groups": [row dicts], "gaps": {metric: {...}}, "equalized_odds_difference",
        "demographic_parity_difference", ...}}}``; undefined numbers are NaN in the group rows
        and None in gaps and EO/DP (``evaluate_predictions`` turns NaN into JSON null).
    """
    frames, skipped, threshold, meta = _frames(
        df, meta, groups, intersections, threshold, min_group_size)
    kind = _kind(meta["task"])
    attributes = {}
    for name, by_group in frames:
        entry = {"groups": by_group.reset_index(names="group").to_dict(orient="records"),
                 "gaps": _gaps(by_group, GAP_METRICS[kind])}
        if kind == "binary":
            entry.update(_odds_and_parity(by_group, threshold))
        attributes[name] = entry
    return {"min_group_size": int(min_group_size),
            "threshold": float(threshold) if kind == "binary" else None,
            "unknown_group": UNKNOWN, "skipped": skipped, "attributes": attributes,
            "note": "gaps and EO/DP differences exclude small groups; no CIs for subgroups"}
