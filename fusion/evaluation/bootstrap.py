"""Stratified bootstrap confidence intervals, vectorised over resamples.

A resample is represented by its count vector (how often each stay was drawn); a block of
resamples is a ``[b, n]`` count matrix that the statistics of :mod:`fusion.evaluation.metrics`
consume in one go. Within each stratum, stays are drawn with replacement as many times as the
stratum has members, so every resample keeps the stratum sizes of the data:

* binary tasks: strata = the label (positives and negatives resampled separately, so every
  resample has both classes and AUROC is always defined);
* phenotype: one stratum (stays are resampled; a rare label may lose a class in a resample and is
  then left out of that resample's macro average);
* LoS: strata = the true class.

Each stratum draws from its own child of ``numpy.random.SeedSequence(seed)``, so results depend on
the seed and the data only, not on the block size used to bound memory. The interval is the
percentile interval of the finite resample values.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from fusion.evaluation.metrics import MAX_ELEMENTS, Statistic

__all__ = ["bootstrap", "interval", "resample_counts", "summarise"]


def resample_counts(strata, n_boot: int, seed: int, *,
                    block_elements: int = MAX_ELEMENTS) -> Iterator[np.ndarray]:
    """Yield blocks of stratified bootstrap count matrices.

    Parameters
    ----------
    strata : array-like, shape (n,)
        Stratum of each stay (any hashable values; one value = unstratified).
    n_boot : int
        Total number of resamples.
    seed : int
        Seed of the resampling.
    block_elements : int
        Upper bound on ``b * n`` per yielded block (memory); does not change the resamples.

    Yields
    ------
    numpy.ndarray
        int32 counts of shape (b, n); rows are resamples, together ``n_boot`` rows.
    """
    strata = np.asarray(strata)
    n = strata.size
    _, codes = np.unique(strata, return_inverse=True)
    members = [np.flatnonzero(codes == k) for k in range(codes.max(initial=-1) + 1)]
    generators = [np.random.default_rng(child)
                  for child in np.random.SeedSequence(seed).spawn(len(members))]
    step = max(1, block_elements // max(n, 1))
    for lo in range(0, n_boot, step):
        b = min(step, n_boot - lo)
        counts = np.zeros((b, n), dtype=np.int32)
        for idx, rng in zip(members, generators):
            k = idx.size
            draws = rng.integers(0, k, size=(b, k))
            draws += (np.arange(b) * k)[:, None]
            counts[:, idx] = np.bincount(draws.ravel(), minlength=b * k).reshape(b, k)
        yield counts


def bootstrap(stat: Statistic, strata, n_boot: int, seed: int) -> tuple[dict, dict]:
    """Point estimates and bootstrap replicates of every metric of ``stat``.

    Parameters
    ----------
    stat : callable
        ``stat(W) -> dict[str, ndarray]`` with arrays of shape (b,) or (b, k).
    strata : array-like, shape (n,)
        Stratum of each stay (see :func:`resample_counts`).
    n_boot : int
        Number of resamples (0 gives point estimates only).
    seed : int

    Returns
    -------
    (dict, dict)
        ``point[name]`` (scalar or shape (k,)) and ``replicates[name]`` (shape (n_boot,) or
        (n_boot, k)).
    """
    n = np.asarray(strata).size
    point = {name: values[0] for name, values in stat(np.ones((1, n), dtype=np.int32)).items()}
    if n_boot <= 0:
        return point, {name: np.empty((0,) + np.shape(v)) for name, v in point.items()}
    blocks = [stat(counts) for counts in resample_counts(strata, n_boot, seed)]
    replicates = {name: np.concatenate([blk[name] for blk in blocks]) for name in point}
    return point, replicates


def interval(replicates: np.ndarray, level: float = 0.95) -> tuple[float, float, int]:
    """Percentile interval over the finite replicates.

    Returns
    -------
    (float, float, int)
        Lower and upper bound (NaN when no replicate is finite) and the number of non-finite
        (undefined) replicates.
    """
    values = np.asarray(replicates, dtype=np.float64)
    finite = values[np.isfinite(values)]
    undefined = int(values.size - finite.size)
    if finite.size == 0:
        return float("nan"), float("nan"), undefined
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(finite, [alpha, 1.0 - alpha])
    return float(low), float(high), undefined


def summarise(value, replicates, n_boot: int, seed: int, level: float = 0.95) -> dict:
    """One metric result: ``{"value", "ci_low", "ci_high", "n_boot", "seed"}``.

    Undefined numbers are None (so the dict is strict JSON); ``n_boot_undefined`` is added when
    some replicates were undefined (e.g. a label lost its positives in a resample).
    """
    low, high, undefined = interval(replicates, level)
    value = float(value)
    out = {"value": _clean(value), "ci_low": _clean(low), "ci_high": _clean(high),
           "n_boot": int(n_boot), "seed": int(seed)}
    if not np.isfinite(value):
        out["ci_low"] = out["ci_high"] = None
    elif undefined:
        out["n_boot_undefined"] = undefined
    return out


def _clean(x: float):
    return float(x) if np.isfinite(x) else None
