"""Task metrics computed for many sample weightings at once, and the decision-threshold rule.

Every metric here is a function of a weight matrix ``W`` of shape ``[b, n]``: row ``r`` gives each
of the ``n`` stays a weight (an integer count for a bootstrap resample, 1 for the plain estimate,
0/1 for one arm of a paired permutation). Scores are sorted **once**; each weighting then costs a
few vectorised passes over ``[b, n]`` arrays, so 1000 bootstrap resamples need no Python loop.

With integer weights the results equal scikit-learn's ``roc_auc_score`` (Mann-Whitney with ties
counted 1/2), ``average_precision_score`` (step-wise precision-recall sum, one threshold per
distinct score), ``f1_score(average="macro")`` (classes in the truth or the predictions; 0 when
undefined) and ``cohen_kappa_score(labels=range(K))`` on the sample repeated by its weights.

Decision threshold (binary tasks)
---------------------------------
:data:`THRESHOLD_RULE`: the threshold maximises Youden's J (sensitivity + specificity - 1) over the
distinct predicted probabilities of the **validation** part; a stay is predicted positive when
``y_prob >= threshold``; ties in J go to the smallest threshold. The test part is never used.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np

from cbstore.format.tasks import get_task

__all__ = [
    "RankedScores", "STRATA_DESCRIPTION", "THRESHOLD_RULE", "binary_statistic", "bootstrap_strata",
    "expected_calibration_error", "multiclass_statistic", "multilabel_statistic",
    "task_statistic", "youden_threshold",
]

#: Human-readable statement of the threshold rule, copied into every metrics JSON.
THRESHOLD_RULE = (
    "maximise Youden's J (sensitivity + specificity - 1) over the distinct y_prob values of the "
    "validation part; predict positive when y_prob >= threshold; ties in J -> smallest threshold; "
    "never chosen on the test part")

#: Upper bound on the elements of one temporary [b, n] array (memory ~ 8 bytes each).
MAX_ELEMENTS = 2_000_000

Statistic = Callable[[np.ndarray], dict]


class RankedScores:
    """Scores of one binary problem, sorted once, for weighted AUROC and AUPRC.

    Parameters
    ----------
    y_true : array-like of {0, 1}, shape (m,)
        Labels.
    scores : array-like of float, shape (m,)
        Scores (probabilities); ties are handled exactly.
    rows : array-like of int, shape (m,), optional
        Column of the weight matrix that weights each element (default: element ``i`` -> ``i``).
        Micro-averaging over a label matrix flattens it and maps each entry to its stay.
    """

    def __init__(self, y_true, scores, rows=None):
        scores = np.asarray(scores, dtype=np.float64)
        y_true = np.asarray(y_true).astype(bool)
        order = np.argsort(scores, kind="stable")
        self.rows = order if rows is None else np.asarray(rows)[order]
        self.positive = y_true[order].astype(np.int8)
        s = scores[order]
        # last element of each group of tied scores
        self.ends = np.flatnonzero(np.r_[s[1:] != s[:-1], True]) if s.size else np.zeros(0, int)
        self.has_ties = self.ends.size < s.size
        self.size = s.size

    def rank_metrics(self, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """AUROC and AUPRC (average precision) for each row of ``weights``.

        Parameters
        ----------
        weights : numpy.ndarray of int, shape (b, n)
            Non-negative integer weights per stay (column index as given by ``rows``), e.g.
            bootstrap counts; float arrays must hold integral values.

        Returns
        -------
        (numpy.ndarray, numpy.ndarray)
            Two float arrays of shape (b,); NaN where a row has no positive or no negative weight.
        """
        weights = _integer_weights(weights)
        b = weights.shape[0]
        auroc = np.full(b, np.nan)
        auprc = np.full(b, np.nan)
        if self.size == 0:
            return auroc, auprc
        # int32 cumulative sums are several times faster than float64 ones; use them when the
        # largest possible total fits.
        total = int(weights.sum(axis=1).max(initial=0)) * max(1, self.size // weights.shape[1])
        dtype = np.int32 if total < 2**31 - 1 else np.int64
        step = max(1, MAX_ELEMENTS // self.size)
        for lo in range(0, b, step):
            auroc[lo:lo + step], auprc[lo:lo + step] = self._block(
                weights[lo:lo + step], dtype)
        return auroc, auprc

    def _block(self, weights, dtype):
        # np.take keeps C order (fancy indexing on axis 1 returns F order: slow row cumsums)
        w = np.take(weights, self.rows, axis=1).astype(dtype, copy=False)
        # Cumulative sums at the last element of each tie group give the group sums exactly.
        cum_all = np.cumsum(w, axis=1, dtype=dtype)
        w *= self.positive
        cum_pos = np.cumsum(w, axis=1, dtype=dtype)
        del w
        if self.has_ties:
            cum_all = cum_all[:, self.ends]
            cum_pos = cum_pos[:, self.ends]
        cum_pos = cum_pos.astype(np.float64)
        cum_all = cum_all.astype(np.float64)
        n_pos = cum_pos[:, -1].copy()
        n_all = cum_all[:, -1].copy()
        n_neg = n_all - n_pos
        pos = np.empty_like(cum_pos)              # positive weight of each group
        pos[:, 0] = cum_pos[:, 0]
        np.subtract(cum_pos[:, 1:], cum_pos[:, :-1], out=pos[:, 1:])
        cum_neg = np.subtract(cum_all, cum_pos, out=cum_all)
        with np.errstate(divide="ignore", invalid="ignore"):
            # Mann-Whitney: a positive in group g beats the negatives of groups < g and ties
            # half of group g: sum_g pos_g * (cum_neg_{g-1} + cum_neg_g) / 2.
            pairs = (np.einsum("ij,ij->i", pos, cum_neg)
                     + np.einsum("ij,ij->i", pos[:, 1:], cum_neg[:, :-1]))
            auroc = 0.5 * pairs / (n_pos * n_neg)
            # Average precision, one threshold per group g (flagged = score >= its score): the
            # flagged stays are those above group g-1, so precision_g = above_pos / above_all at
            # g-1 (and n_pos / n_all at g = 0). Written in place to limit passes over memory.
            above_all = np.add(cum_neg, cum_pos, out=cum_neg)
            np.subtract(n_all[:, None], above_all, out=above_all)
            above_pos = np.subtract(n_pos[:, None], cum_pos, out=cum_pos)
            # above_all == 0 only where above_pos == 0 too; max(., 1) turns 0/0 into 0.
            np.maximum(above_all, 1.0, out=above_all)
            precision = np.divide(above_pos[:, :-1], above_all[:, :-1], out=above_pos[:, :-1])
            ap_sum = pos[:, 0] * n_pos / n_all + np.einsum("ij,ij->i", pos[:, 1:], precision)
            auprc = ap_sum / n_pos
        undefined = (n_pos <= 0) | (n_neg <= 0)
        auroc[undefined] = np.nan
        auprc[undefined] = np.nan
        return auroc, auprc


def _integer_weights(weights) -> np.ndarray:
    """Weights as a 2-D integer array; TypeError for non-integral or negative values."""
    weights = np.atleast_2d(np.asarray(weights))
    if weights.dtype.kind == "b":
        return weights.astype(np.int32)
    if weights.dtype.kind == "f":
        as_int = weights.astype(np.int64)
        if not np.array_equal(as_int, weights):
            raise TypeError("weights must be integer counts (bootstrap or permutation weights)")
        weights = as_int
    elif weights.dtype.kind not in "iu":
        raise TypeError(f"weights must be integer counts, got dtype {weights.dtype}")
    if weights.size and weights.min() < 0:
        raise TypeError("weights must be non-negative")
    return weights


def _ratio(num, den):
    """num / den with NaN where den == 0 (no warning)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.full(np.broadcast(num, den).shape, np.nan), where=den != 0)


def _nanmean(values: np.ndarray, axis: int) -> np.ndarray:
    """Mean over finite entries; NaN (without a warning) where there are none."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=axis)


def youden_threshold(y_true, scores) -> tuple[float, dict]:
    """Choose the decision threshold by :data:`THRESHOLD_RULE` on (validation) data.

    Parameters
    ----------
    y_true : array-like of {0, 1}
        Validation labels.
    scores : array-like of float
        Validation probabilities.

    Returns
    -------
    (float, dict)
        The threshold (NaN when undefined) and ``{"youden_j", "n", "n_pos", "reason"}``;
        ``reason`` is None unless the threshold is undefined (no rows or one class).
    """
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    info = {"youden_j": None, "n": int(y.size), "n_pos": n_pos, "reason": None}
    if y.size == 0:
        info["reason"] = "no rows to choose the threshold on"
        return float("nan"), info
    if n_pos == 0 or n_neg == 0:
        info["reason"] = f"only one class (n_pos={n_pos}, n_neg={n_neg}); Youden's J is undefined"
        return float("nan"), info
    candidates = np.unique(s)
    pos_sorted = np.sort(s[y])
    neg_sorted = np.sort(s[~y])
    tp = n_pos - np.searchsorted(pos_sorted, candidates, side="left")
    fp = n_neg - np.searchsorted(neg_sorted, candidates, side="left")
    # J * n_pos * n_neg in exact integers, so ties are exact.
    j_scaled = tp.astype(np.int64) * n_neg - fp.astype(np.int64) * n_pos
    best = int(np.flatnonzero(j_scaled == j_scaled.max())[0])
    info["youden_j"] = float(j_scaled[best] / (n_pos * n_neg))
    return float(candidates[best]), info


def binary_statistic(y_true, scores, threshold: float = float("nan")) -> Statistic:
    """Metrics of a binary task as a function of a weight matrix.

    Parameters
    ----------
    y_true : array-like of {0, 1}, shape (n,)
    scores : array-like of float, shape (n,)
    threshold : float
        Decision threshold (from :func:`youden_threshold` on validation data); NaN gives NaN
        threshold metrics.

    Returns
    -------
    callable
        ``stat(W) -> {"auroc", "auprc", "sensitivity", "specificity", "ppv", "f1"}``, each an
        array of shape (b,) for ``W`` of shape (b, n).
    """
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    ranked = RankedScores(y, s)
    have_threshold = bool(np.isfinite(threshold))
    flagged = s >= threshold if have_threshold else np.zeros_like(y)
    masks = np.stack([y, ~y, y & flagged, ~y & flagged]).astype(np.float64).T  # [n, 4]

    def stat(weights: np.ndarray) -> dict:
        weights = np.atleast_2d(weights)
        auroc, auprc = ranked.rank_metrics(weights)
        out = {"auroc": auroc, "auprc": auprc}
        if not have_threshold:
            nan = np.full(weights.shape[0], np.nan)
            out.update(sensitivity=nan, specificity=nan.copy(), ppv=nan.copy(), f1=nan.copy())
            return out
        n_pos, n_neg, tp, fp = (weights @ masks).T
        out["sensitivity"] = _ratio(tp, n_pos)
        out["specificity"] = _ratio(n_neg - fp, n_neg)
        out["ppv"] = _ratio(tp, tp + fp)
        out["f1"] = _ratio(2 * tp, tp + fp + n_pos)
        return out

    return stat


def multilabel_statistic(y_true, scores, *, micro: bool = True) -> Statistic:
    """Metrics of a multi-label task (phenotype) as a function of a weight matrix.

    Per label AUROC/AUPRC; ``macro_*`` = mean over labels with both classes under the weighting;
    ``weighted_*`` = mean weighted by each label's (weighted) number of positives (scikit-learn's
    ``average="weighted"``); ``micro_*`` = on the flattened label matrix.

    Parameters
    ----------
    y_true : array-like of {0, 1}, shape (n, L)
    scores : array-like of float, shape (n, L)
    micro : bool
        Also compute the micro averages (the costliest part: one pass over ``n * L`` entries).

    Returns
    -------
    callable
        ``stat(W)`` -> dict with ``label_auroc``, ``label_auprc`` ([b, L]) and ``macro_auroc``,
        ``macro_auprc``, ``weighted_auroc``, ``weighted_auprc`` and, with ``micro``,
        ``micro_auroc``, ``micro_auprc`` ([b]).
    """
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    n, n_labels = y.shape
    per_label = [RankedScores(y[:, j], s[:, j]) for j in range(n_labels)]
    pooled = (RankedScores(y.ravel(), s.ravel(), rows=np.repeat(np.arange(n), n_labels))
              if micro else None)
    y_float = y.astype(np.float64)

    def stat(weights: np.ndarray) -> dict:
        weights = np.atleast_2d(weights)
        b = weights.shape[0]
        auroc = np.empty((b, n_labels))
        auprc = np.empty((b, n_labels))
        for j, ranked in enumerate(per_label):
            auroc[:, j], auprc[:, j] = ranked.rank_metrics(weights)
        n_pos = weights @ y_float
        out = {"label_auroc": auroc, "label_auprc": auprc}
        for name, values in (("auroc", auroc), ("auprc", auprc)):
            valid = np.isfinite(values)
            out[f"macro_{name}"] = _nanmean(values, axis=1)
            support = np.where(valid, n_pos, 0.0)
            out[f"weighted_{name}"] = _ratio(np.where(valid, values * n_pos, 0.0).sum(axis=1),
                                             support.sum(axis=1))
        if pooled is not None:
            out["micro_auroc"], out["micro_auprc"] = pooled.rank_metrics(weights)
        return out

    return stat


def multiclass_statistic(y_true, probabilities) -> Statistic:
    """Metrics of a multi-class task (LoS) as a function of a weight matrix.

    The predicted class is the arg-max probability (first class on ties).

    Parameters
    ----------
    y_true : array-like of int, shape (n,)
        Class indices 0..K-1.
    probabilities : array-like of float, shape (n, K)

    Returns
    -------
    callable
        ``stat(W)`` -> dict with ``accuracy``, ``macro_f1``, ``kappa`` (unweighted Cohen's kappa),
        ``kappa_linear`` (linear weights on the class index), ``macro_auroc`` (mean one-vs-rest
        AUROC over classes with both outcomes present) ([b]) and ``class_auroc`` ([b, K]).
    """
    y = np.asarray(y_true).astype(np.int64)
    p = np.asarray(probabilities, dtype=np.float64)
    n_classes = p.shape[1]
    pred = np.argmax(p, axis=1)
    cells = np.zeros((y.size, n_classes * n_classes))
    cells[np.arange(y.size), y * n_classes + pred] = 1.0
    ovr = {c: RankedScores(y == c, p[:, c]) for c in range(n_classes)
           if 0 < np.count_nonzero(y == c) < y.size}
    index = np.arange(n_classes)
    disagreement = {"kappa": 1.0 - np.eye(n_classes),
                    "kappa_linear": np.abs(index[:, None] - index[None, :]).astype(np.float64)}

    def stat(weights: np.ndarray) -> dict:
        weights = np.atleast_2d(weights)
        b = weights.shape[0]
        conf = (weights @ cells).reshape(b, n_classes, n_classes)  # [b, true, predicted]
        total = conf.sum(axis=(1, 2))
        true_n = conf.sum(axis=2)
        pred_n = conf.sum(axis=1)
        tp = np.einsum("bkk->bk", conf)
        out = {"accuracy": _ratio(tp.sum(axis=1), total)}
        seen = (true_n + pred_n) > 0
        f1 = np.divide(2 * tp, true_n + pred_n, out=np.zeros_like(tp), where=seen)
        out["macro_f1"] = _ratio((f1 * seen).sum(axis=1), seen.sum(axis=1))
        expected = true_n[:, :, None] * pred_n[:, None, :]
        expected = np.divide(expected, total[:, None, None], out=np.zeros_like(expected),
                             where=total[:, None, None] > 0)
        for name, w in disagreement.items():
            observed = (conf * w).sum(axis=(1, 2))
            chance = (expected * w).sum(axis=(1, 2))
            out[name] = 1.0 - _ratio(observed, chance)
        class_auroc = np.full((b, n_classes), np.nan)
        for c, ranked in ovr.items():
            class_auroc[:, c] = ranked.rank_metrics(weights)[0]
        out["class_auroc"] = class_auroc
        out["macro_auroc"] = _nanmean(class_auroc, axis=1)
        return out

    return stat


def task_statistic(task: str, y_true, scores, *, threshold: float = float("nan"),
                   micro: bool = True) -> Statistic:
    """The statistic of a task: binary, multi-label (phenotype) or multi-class (los)."""
    kind = get_task(task).kind
    if kind == "multilabel":
        return multilabel_statistic(y_true, scores, micro=micro)
    if kind == "multiclass":
        return multiclass_statistic(y_true, scores)
    return binary_statistic(y_true, scores, threshold)


def bootstrap_strata(task: str, y_true) -> np.ndarray:
    """Bootstrap strata of a task: the label (binary), none (phenotype), the class (los)."""
    if get_task(task).kind == "multilabel":
        return np.zeros(len(y_true), dtype=np.int64)
    return np.asarray(y_true).astype(np.int64)


#: How each task's bootstrap is stratified (recorded in the metrics JSON).
STRATA_DESCRIPTION = {
    "mortality": "label (positives and negatives resampled separately)",
    "mortality_hosp": "label (positives and negatives resampled separately)",
    "phenotype": "none (stays resampled with replacement)",
    "los": "true class (each class resampled separately)",
}


def expected_calibration_error(y_true, scores, n_bins: int = 10) -> float:
    """Expected calibration error with ``n_bins`` equal-width bins on [0, 1].

    ECE = sum over bins of (n_bin / n) * |mean score - mean label|; bin ``k`` holds scores in
    ``[k/n_bins, (k+1)/n_bins)`` and the last bin also holds 1.0.

    Parameters
    ----------
    y_true : array-like of {0, 1}
    scores : array-like of float in [0, 1]
    n_bins : int

    Returns
    -------
    float
        NaN for empty input.
    """
    y = np.asarray(y_true, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    if s.size == 0:
        return float("nan")
    bins = np.minimum((s * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    gap = np.abs(np.bincount(bins, weights=s, minlength=n_bins)
                 - np.bincount(bins, weights=y, minlength=n_bins))
    # sum_k (n_k / n) * |sum_s / n_k - sum_y / n_k| = sum_k |sum_s - sum_y| / n
    return float(gap[count > 0].sum() / s.size)
