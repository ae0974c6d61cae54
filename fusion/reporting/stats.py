"""Statistics of a report across runs: t-intervals, ranks, Friedman and Nemenyi, curve areas.

* Across runs (folds x seeds) a metric is summarised by its mean, its sample standard deviation
  and a 95% Student t-interval ``mean +/- t_{0.975, n-1} * sd / sqrt(n)``.
* Methods are ranked within each block (one task x cohort x fold x seed), rank 1 the best and
  ties sharing the mean of their ranks. The Friedman test (:func:`scipy.stats.friedmanchisquare`)
  asks whether the mean ranks differ; the Nemenyi critical difference (Demsar, JMLR 2006) is
  ``CD = q_alpha * sqrt(k (k + 1) / (6 N))`` for ``k`` methods and ``N`` blocks, where
  ``q_alpha`` is the upper-alpha quantile of the studentized range of ``k`` means with infinite
  degrees of freedom divided by ``sqrt(2)`` (:data:`scipy.stats.studentized_range`; for
  ``alpha = 0.05`` and ``k = 2..10``: 1.960, 2.344, 2.569, 2.728, 2.850, 2.948, 3.031, 3.102,
  3.164, Demsar's Table 5a to within 0.001).
* A robustness curve (metric against X-ray missing rate) is summarised by its normalised area:
  the trapezoid area over the rates run divided by the rate range.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

__all__ = ["critical_difference", "friedman_test", "mean_ranks", "nemenyi_q", "normalised_auc",
           "reliability_curve", "t_interval", "cliques"]


def t_interval(values, level: float = 0.95) -> dict:
    """Mean, sample sd and Student t-interval of finite ``values``.

    Returns
    -------
    dict
        ``{"n", "mean", "sd", "ci_low", "ci_high"}``; sd and the interval are NaN for fewer than
        two values, everything NaN for none.

    Examples
    --------
    >>> out = t_interval([0.70, 0.72, 0.74])
    >>> round(out["mean"], 3), round(out["sd"], 3), round(out["ci_low"], 4)
    (0.72, 0.02, 0.6703)
    """
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    n = int(x.size)
    out = {"n": n, "mean": float("nan"), "sd": float("nan"), "ci_low": float("nan"),
           "ci_high": float("nan")}
    if n == 0:
        return out
    out["mean"] = float(x.mean())
    if n < 2:
        return out
    sd = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2.0, n - 1)) * sd / math.sqrt(n)
    out.update(sd=sd, ci_low=out["mean"] - half, ci_high=out["mean"] + half)
    return out


def mean_ranks(scores) -> np.ndarray:
    """Mean rank of each method over blocks; rank 1 is the highest score, ties share ranks.

    Parameters
    ----------
    scores : array-like, shape (n_blocks, k)
        Metric of each method (column) in each block (row); higher is better.
    """
    scores = np.asarray(scores, dtype=np.float64)
    ranks = np.vstack([stats.rankdata(-row) for row in scores])
    return ranks.mean(axis=0)


def friedman_test(scores) -> dict:
    """Friedman test on ``scores`` ``[n_blocks, k]`` (needs ``k >= 3`` methods, ``n >= 2``).

    Returns
    -------
    dict
        ``{"statistic", "p_value", "k", "n_blocks", "reason"}``; statistic and p NaN with a reason
        when the test cannot be run.
    """
    scores = np.asarray(scores, dtype=np.float64)
    n, k = scores.shape if scores.ndim == 2 else (0, 0)
    out = {"statistic": float("nan"), "p_value": float("nan"), "k": int(k), "n_blocks": int(n),
           "reason": None}
    if k < 3 or n < 2:
        out["reason"] = f"needs at least 3 methods and 2 blocks (have {k} and {n})"
        return out
    if np.all(scores == scores[:, :1]):
        out["reason"] = "every method scores the same in every block"
        return out
    result = stats.friedmanchisquare(*scores.T)
    out.update(statistic=float(result.statistic), p_value=float(result.pvalue))
    return out


def nemenyi_q(k: int, alpha: float = 0.05) -> float:
    """``q_alpha`` of the Nemenyi test for ``k`` methods (studentized range / sqrt(2))."""
    if k < 2:
        raise ValueError(f"the Nemenyi test needs at least 2 methods, got {k}")
    return float(stats.studentized_range.ppf(1.0 - alpha, k, np.inf) / math.sqrt(2.0))


def critical_difference(k: int, n_blocks: int, alpha: float = 0.05) -> float:
    """Nemenyi critical difference of mean ranks: ``q_alpha * sqrt(k (k + 1) / (6 N))``.

    Examples
    --------
    Demsar (2006), section 3.2.2: four methods on fourteen data sets.

    >>> round(critical_difference(4, 14), 2)
    1.25
    """
    if n_blocks < 1:
        raise ValueError("the critical difference needs at least one block")
    return nemenyi_q(k, alpha) * math.sqrt(k * (k + 1) / (6.0 * n_blocks))


def cliques(ranks, cd: float) -> list[tuple[int, int]]:
    """Maximal runs of methods (sorted by rank) whose ranks differ by less than ``cd``.

    Parameters
    ----------
    ranks : array-like of float
        Mean ranks, sorted ascending.
    cd : float

    Returns
    -------
    list of (int, int)
        ``(first, last)`` positions (inclusive) of each maximal group of two or more methods
        that are not significantly different; groups contained in another are left out.
    """
    ranks = np.asarray(ranks, dtype=np.float64)
    groups = []
    for i in range(ranks.size):
        j = i
        while j + 1 < ranks.size and ranks[j + 1] - ranks[i] < cd:
            j += 1
        if j > i and not any(a <= i and j <= b for a, b in groups):
            groups.append((i, j))
    return groups


def normalised_auc(rates, values) -> float:
    """Trapezoid area under ``values`` over ``rates`` divided by the rate range.

    NaN with fewer than two distinct rates or any non-finite value.

    Examples
    --------
    >>> normalised_auc([0.0, 0.5, 1.0], [0.8, 0.7, 0.5])
    0.675
    """
    r = np.asarray(rates, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    order = np.argsort(r, kind="stable")
    r, v = r[order], v[order]
    if np.unique(r).size < 2 or not np.all(np.isfinite(v)):
        return float("nan")
    area = float(np.sum((r[1:] - r[:-1]) * (v[1:] + v[:-1]) / 2.0))
    return area / float(r[-1] - r[0])


def reliability_curve(y_true, scores, n_bins: int = 10) -> dict:
    """Reliability diagram points with ``n_bins`` equal-width bins on [0, 1].

    The bins are those of :func:`fusion.evaluation.expected_calibration_error` (bin ``k`` holds
    ``[k/n_bins, (k+1)/n_bins)``, the last one also 1.0).

    Returns
    -------
    dict
        ``{"mean_score", "observed", "count"}``, arrays over the non-empty bins.
    """
    y = np.asarray(y_true, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    bins = np.minimum((s * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    filled = count > 0
    return {"mean_score": np.bincount(bins, weights=s, minlength=n_bins)[filled] / count[filled],
            "observed": np.bincount(bins, weights=y, minlength=n_bins)[filled] / count[filled],
            "count": count[filled]}
