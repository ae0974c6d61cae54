"""Paired permutation tests between runs, and Benjamini-Hochberg adjustment.

Test: on the test stays the two runs share (inner join on ``stay_id``; their labels must agree),
each permutation swaps the two runs' predictions of every stay with probability 1/2, and the
metric difference (run a - run b) is recomputed. The two-sided p-value is
``(k + 1) / (n_perm + 1)`` where ``k`` counts permutations with ``|difference| >= |observed|``.

Vectorised: the two runs' scores are stacked into one array of ``2n`` entries, sorted once; a
permutation is a 0/1 weight matrix selecting, per stay, which of its two entries belongs to
"run a" (see :mod:`fusion.evaluation.metrics`).

Combined test over several (fold, seed) pairs (:func:`stratified_permutation_test`): each pair is a
stratum holding its common test stays; the statistic is the mean over the strata of the
per-stratum metric difference, and a permutation swaps the two predictions of every
(fold, seed, stay) triple independently with probability 1/2 (swaps never cross strata). When
``2 ** n_triples <= n_perm`` every swap pattern is enumerated and the p-value is exact
(``k / 2 ** n_triples``, the identity pattern included).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from fusion.evaluation.metrics import MAX_ELEMENTS, task_statistic
from fusion.evaluation.predictions import EvaluationError, align_test_parts, as_validated, task_kind

__all__ = ["PERMUTATION_METRICS", "benjamini_hochberg", "permutation_p_value",
           "permutation_test", "stratified_permutation_test"]

#: Metric names accepted by :func:`permutation_test` per task kind (``auroc``/``auprc`` are
#: macro averages for phenotype, with per-label tests, and ``auroc`` is macro one-vs-rest for los).
PERMUTATION_METRICS = {
    "binary": ("auroc", "auprc"),
    "multilabel": ("auroc", "auprc", "macro_auroc", "macro_auprc", "micro_auroc", "micro_auprc",
                  "weighted_auroc", "weighted_auprc"),
    "multiclass": ("accuracy", "macro_f1", "kappa", "kappa_linear", "auroc", "macro_auroc"),
}

_TEST_DESCRIPTION = ("paired permutation test: each common test stay's two predictions swapped "
                     "with probability 1/2; two-sided; p = (k + 1) / (n_perm + 1)")


def benjamini_hochberg(pvalues) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values) controlling the false discovery rate.

    ``q_(i) = min_{j >= i} min(1, m * p_(j) / j)`` over the ``m`` finite p-values sorted
    ascending, computed by :func:`scipy.stats.false_discovery_control`; NaN (and infinite)
    p-values stay NaN and do not count in ``m``.

    Parameters
    ----------
    pvalues : array-like of float in [0, 1]

    Returns
    -------
    numpy.ndarray
        q-values in the order of ``pvalues``.

    Raises
    ------
    EvaluationError
        If a finite p-value lies outside [0, 1] (a ``ValueError``).

    Examples
    --------
    >>> benjamini_hochberg([0.01, 0.04, 0.03, 0.20]).round(4).tolist()
    [0.04, 0.0533, 0.0533, 0.2]
    """
    p = np.asarray(pvalues, dtype=np.float64)
    q = np.full(p.shape, np.nan)
    finite = np.isfinite(p)
    if np.any((p[finite] < 0) | (p[finite] > 1)):
        raise EvaluationError("p-values must lie in [0, 1]")
    if finite.any():
        # scipy refuses NaN; adjusting the finite p-values alone keeps NaN out of m.
        q[finite] = stats.false_discovery_control(p[finite], method="bh")
    return q


def permutation_p_value(observed, permuted) -> np.ndarray:
    """Two-sided permutation p-value ``(k + 1) / (n + 1)``; NaN where ``observed`` is NaN.

    Parameters
    ----------
    observed : float or numpy.ndarray, shape (k,)
        Observed differences.
    permuted : numpy.ndarray, shape (n,) or (n, k)
        Differences under the permutations (NaN entries never count as extreme).
    """
    observed = np.asarray(observed, dtype=np.float64)
    permuted = np.asarray(permuted, dtype=np.float64)
    # a tiny tolerance so that permutations equal to the observed value count as extreme
    tol = 1e-12 * np.maximum(1.0, np.abs(observed))
    with np.errstate(invalid="ignore"):
        extreme = (np.abs(permuted) >= np.abs(observed) - tol).sum(axis=0)
    p = (extreme + 1.0) / (permuted.shape[0] + 1.0)
    return np.where(np.isfinite(observed), p, np.nan)


def _resolve(kind: str, metric: str) -> tuple[str, str | None]:
    """Statistic key of the headline metric and of the per-label metric (phenotype)."""
    if metric not in PERMUTATION_METRICS[kind]:
        raise EvaluationError(f"unknown metric {metric!r} for a {kind} task; valid: "
                         f"{', '.join(PERMUTATION_METRICS[kind])}")
    if kind == "multilabel":
        base = metric.removeprefix("macro_")
        if base in ("auroc", "auprc"):
            return f"macro_{base}", f"label_{base}"
        return metric, None
    if kind == "multiclass" and metric == "auroc":
        return "macro_auroc", None
    return metric, None


def permutation_test(df_a: pd.DataFrame, df_b: pd.DataFrame, metric: str = "auroc",
                     task: str | None = None, *, meta_a: dict | None = None,
                     meta_b: dict | None = None, n_perm: int = 1000, seed: int = 0) -> dict:
    """Paired permutation test of ``metric(a) - metric(b)`` on the common test stays.

    Parameters
    ----------
    df_a, df_b : pandas.DataFrame
        Predictions of the two runs (any parts; the test parts are compared).
    metric : str
        See :data:`PERMUTATION_METRICS`. For phenotype, ``"auroc"``/``"auprc"`` test the macro
        average and also each label, with Benjamini-Hochberg q-values over the labels.
    task : str, optional
        Task; default: from the metas or the ``task`` column.
    meta_a, meta_b : dict, optional
        The runs' metas (labels / class names); inferred from the columns when absent.
    n_perm : int
        Number of permutations.
    seed : int

    Returns
    -------
    dict
        ``task``, ``metric``, ``n_stays``, ``n_only_a``, ``n_only_b``, ``value_a``, ``value_b``,
        ``difference`` (a - b), ``p_value``, ``n_perm``, ``seed``, ``test`` and, for phenotype
        label metrics, ``per_label`` (label, value_a, value_b, difference, p_value, q_value).
        Undefined numbers are NaN.

    Raises
    ------
    PredictionsError
        Different tasks or labels, no common test stay, or labels that disagree.
    ValueError
        Unknown metric or ``n_perm < 1``.
    """
    if n_perm < 1:
        raise EvaluationError("n_perm must be >= 1")
    a = as_validated(df_a, meta_a, task, "run a")
    b = as_validated(df_b, meta_b, task, "run b")
    paired = align_test_parts(a, b, names=("run a", "run b"))
    meta = paired["meta"]
    kind = task_kind(meta["task"])
    key, label_key = _resolve(kind, metric)
    n = paired["stay_id"].size
    y = paired["y"]
    stacked_y = np.concatenate([y, y])
    stacked_scores = np.concatenate([paired["scores_a"], paired["scores_b"]])
    stat = task_statistic(meta["task"], stacked_y, stacked_scores, micro=key.startswith("micro"))
    keys = [k for k in (key, label_key) if k is not None]

    def arms(take_b: np.ndarray) -> tuple[dict, dict]:
        """Metrics of a' and b', where a' takes run b's prediction of stay i if take_b[:, i]."""
        weights_a = np.concatenate([~take_b, take_b], axis=1).astype(np.int32)
        return stat(weights_a), stat(1 - weights_a)

    value_a, value_b = arms(np.zeros((1, n), dtype=bool))
    observed = {k: value_a[k] - value_b[k] for k in keys}
    rng = np.random.default_rng(seed)
    step = max(1, MAX_ELEMENTS // (2 * n))
    blocks = []
    for lo in range(0, n_perm, step):
        take_b = rng.random((min(step, n_perm - lo), n)) < 0.5
        out_a, out_b = arms(take_b)
        blocks.append({k: out_a[k] - out_b[k] for k in keys})
    permuted = {k: np.concatenate([blk[k] for blk in blocks]) for k in keys}

    result = {
        "task": meta["task"], "metric": metric, "statistic": key, "n_stays": int(n),
        "n_only_a": paired["n_only_a"], "n_only_b": paired["n_only_b"],
        "value_a": float(value_a[key][0]), "value_b": float(value_b[key][0]),
        "difference": float(observed[key][0]),
        "p_value": float(permutation_p_value(observed[key][0], permuted[key])),
        "n_perm": int(n_perm), "seed": int(seed), "test": _TEST_DESCRIPTION,
    }
    if not np.isfinite(result["difference"]):
        result["reason"] = "metric undefined on the common stays (one class only?)"
    if label_key is not None:
        p_labels = permutation_p_value(observed[label_key][0], permuted[label_key])
        q_labels = benjamini_hochberg(p_labels)
        result["per_label"] = [
            {"label": label, "value_a": float(value_a[label_key][0, j]),
             "value_b": float(value_b[label_key][0, j]),
             "difference": float(observed[label_key][0, j]), "p_value": float(p_labels[j]),
             "q_value": float(q_labels[j])}
            for j, label in enumerate(meta["labels"])]
        result["multiple_testing"] = "Benjamini-Hochberg over the labels with a defined metric"
    return result



def _stratum(pair, task: str | None, index: int) -> dict:
    """Validate and pair one stratum ``((df_a, meta_a), (df_b, meta_b))`` of the combined test."""
    (df_a, meta_a), (df_b, meta_b) = pair
    names = (f"stratum {index}: run a", f"stratum {index}: run b")
    a = as_validated(df_a, meta_a, task, names[0])
    b = as_validated(df_b, meta_b, task, names[1])
    return align_test_parts(a, b, names=names)


def _swap_patterns(n: int, n_perm: int, rng: np.random.Generator):
    """Blocks of boolean swap matrices ``[b, n]``: all ``2 ** n`` patterns, or ``n_perm`` draws.

    Returns
    -------
    (iterator of numpy.ndarray, int, bool)
        The blocks, the number of patterns and whether they are exhaustive.
    """
    step = max(1, MAX_ELEMENTS // (2 * n))
    if n < 63 and 2 ** n <= n_perm:
        total = 2 ** n
        bits = np.arange(n, dtype=np.int64)

        def exhaustive():
            for lo in range(0, total, step):
                codes = np.arange(lo, min(lo + step, total), dtype=np.int64)
                yield ((codes[:, None] >> bits) & 1).astype(bool)

        return exhaustive(), total, True

    def drawn():
        for lo in range(0, n_perm, step):
            yield rng.random((min(step, n_perm - lo), n)) < 0.5

    return drawn(), n_perm, False


def stratified_permutation_test(strata, metric: str = "auroc", task: str | None = None, *,
                                n_perm: int = 1000, seed: int = 0) -> dict:
    """Paired permutation test of a method against another, combined over several strata.

    Each stratum is one (fold, seed) pair of runs, compared on its common test stays. The
    statistic is the mean over strata of ``metric(a) - metric(b)``; a permutation swaps the two
    predictions of each (stratum, stay) triple with probability 1/2, independently, and never
    moves a prediction to another stratum. With one stratum this is the test of
    :func:`permutation_test` on the headline metric (same draws for the same seed).

    Parameters
    ----------
    strata : sequence of ((pandas.DataFrame, dict), (pandas.DataFrame, dict))
        Per stratum, the predictions and meta (or None) of run a and of run b.
    metric : str
        See :data:`PERMUTATION_METRICS` (phenotype: the macro average only, no per-label tests).
    task : str, optional
        Task; default: from the metas or the ``task`` column.
    n_perm : int
        Number of random swap patterns; when ``2 ** n_triples <= n_perm`` all patterns are
        enumerated instead and the p-value is exact.
    seed : int

    Returns
    -------
    dict
        ``task``, ``metric``, ``statistic``, ``n_strata``, ``n_stays`` (common stays per stratum),
        ``n_triples``, ``value_a``, ``value_b`` (means over strata), ``difference`` (mean of the
        per-stratum differences), ``stratum_differences``, ``p_value``, ``n_perm`` (patterns
        used), ``exact``, ``seed`` and ``test``. Undefined numbers are NaN.

    Raises
    ------
    PredictionsError
        A stratum with different tasks or labels, no common test stay, or disagreeing labels.
    ValueError
        No stratum, strata of different tasks, unknown metric or ``n_perm < 1``.
    """
    if n_perm < 1:
        raise EvaluationError("n_perm must be >= 1")
    strata = list(strata)
    if not strata:
        raise EvaluationError("stratified_permutation_test needs at least one stratum (a pair of runs)")
    paired = [_stratum(pair, task, i) for i, pair in enumerate(strata)]
    tasks = sorted({p["meta"]["task"] for p in paired})
    if len(tasks) > 1:
        raise EvaluationError(f"strata of different tasks {tasks}; combine runs of one task")
    task = tasks[0]
    kind = task_kind(task)
    key, _ = _resolve(kind, metric)
    stats, offsets = [], [0]
    for p in paired:
        y = p["y"]
        stats.append(task_statistic(task, np.concatenate([y, y]),
                                    np.concatenate([p["scores_a"], p["scores_b"]]),
                                    micro=key.startswith("micro")))
        offsets.append(offsets[-1] + p["stay_id"].size)
    n = offsets[-1]

    def differences(take_b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-stratum metric of a', b' and their difference, ``[b, n_strata]`` each."""
        va, vb = [], []
        for k, stat in enumerate(stats):
            cols = take_b[:, offsets[k]:offsets[k + 1]]
            weights_a = np.concatenate([~cols, cols], axis=1).astype(np.int32)
            va.append(stat(weights_a)[key])
            vb.append(stat(1 - weights_a)[key])
        va, vb = np.stack(va, axis=1), np.stack(vb, axis=1)
        return va, vb, va - vb

    value_a, value_b, observed = differences(np.zeros((1, n), dtype=bool))
    observed_mean = float(np.mean(observed[0]))
    blocks, total, exact = _swap_patterns(n, n_perm, np.random.default_rng(seed))
    permuted = np.concatenate([differences(take_b)[2].mean(axis=1) for take_b in blocks])
    if exact:
        tol = 1e-12 * max(1.0, abs(observed_mean))
        p_value = float(np.sum(np.abs(permuted) >= abs(observed_mean) - tol) / total) \
            if np.isfinite(observed_mean) else float("nan")
    else:
        p_value = float(permutation_p_value(observed_mean, permuted))
    result = {
        "task": task, "metric": metric, "statistic": key, "n_strata": len(paired),
        "n_stays": [int(p["stay_id"].size) for p in paired], "n_triples": int(n),
        "value_a": float(np.mean(value_a[0])), "value_b": float(np.mean(value_b[0])),
        "difference": observed_mean,
        "stratum_differences": [float(d) for d in observed[0]],
        "p_value": p_value, "n_perm": int(total), "exact": bool(exact), "seed": int(seed),
        "test": ("stratified paired permutation test: the two predictions of each common "
                 "(fold, seed, stay) triple swapped with probability 1/2 within its stratum; "
                 "statistic: mean over strata of the metric difference; two-sided; "
                 + ("exact enumeration of every swap pattern" if exact
                    else "p = (k + 1) / (n_perm + 1)")),
    }
    if not np.isfinite(observed_mean):
        result["reason"] = "metric undefined in a stratum (one class only?)"
    return result
