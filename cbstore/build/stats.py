"""Per-fold statistics of the hourly EHR values, from training stays only.

Readers impute with the training median and scale by the training IQR (or standard deviation),
so these statistics must never see validation or test stays of the fold they belong to.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from cbstore.format.content import STAT_NAMES, TEST, TRAIN, VAL


def fold_statistics(
    values: np.ndarray,
    parts: np.ndarray,
    *,
    chunk_stays: int = 1024,
    feature_names: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """Per fold and feature, statistics over all observed values of the training stays.

    Parameters
    ----------
    values : numpy.ndarray or zarr.Array
        float32 [stay, time, feature]; NaN = not observed. Any array that NumPy-style slicing
        reads into memory works (the build passes the store's ``ehr/values``): it is read
        ``chunk_stays`` stays at a time, never whole.
    parts : numpy.ndarray
        uint8 [stay, fold] split codes (0 train, 1 val, 2 test).
    chunk_stays : int, default 1024
        Stays read at a time while gathering observed values. Temporary memory is one chunk
        of ``values`` plus the observed values of one group of features (at most
        :data:`_GATHER_CELLS` cells of ``values`` per group, ~128 MiB); the tensor is never
        copied per fold.
    feature_names : sequence of str, optional
        Names used in warnings (default: ``feature <index>``).

    Returns
    -------
    dict of str to numpy.ndarray
        Keys :data:`cbstore.format.content.STAT_NAMES`: ``median``, ``iqr`` (q75 - q25), ``mean``,
        ``std`` (ddof=0), ``min``, ``max`` as float32 [fold, feature] (NaN where a feature has
        no training observation) and ``n_observed`` int64 [fold, feature]. Quantiles use
        linear interpolation (numpy's default ``method="linear"``); sums are in float64.

    Raises
    ------
    ValueError
        On mismatched shapes, unknown split codes or infinite values.

    Warns
    -----
    UserWarning
        Naming the features with no training observation in a fold.
    """
    if not (hasattr(values, "shape") and hasattr(values, "dtype") and hasattr(values, "__getitem__")):
        values = np.asarray(values)
    parts = np.asarray(parts)
    if values.ndim != 3:
        raise ValueError(f"values must be [stay, time, feature], got shape {values.shape}")
    if parts.ndim != 2 or parts.shape[0] != values.shape[0]:
        raise ValueError(
            f"parts must be [stay, fold] with {values.shape[0]} stays, got shape {parts.shape}"
        )
    unknown = ~np.isin(parts, (TRAIN, VAL, TEST))
    if unknown.any():
        raise ValueError(f"parts holds unknown split codes {np.unique(parts[unknown]).tolist()}")
    if int(chunk_stays) != chunk_stays or chunk_stays < 1:
        raise ValueError(f"chunk_stays must be a positive integer, got {chunk_stays!r}")
    n_features = values.shape[2]
    n_folds = parts.shape[1]
    if feature_names is None:
        feature_names = [f"feature {f}" for f in range(n_features)]
    elif len(feature_names) != n_features:
        raise ValueError(f"{len(feature_names)} feature names for {n_features} features")

    out = {name: np.full((n_folds, n_features), np.nan, dtype=np.float32)
           for name in STAT_NAMES if name != "n_observed"}
    out["n_observed"] = np.zeros((n_folds, n_features), dtype=np.int64)
    is_train = parts == TRAIN
    for group in _feature_groups(values.shape):
        gathered = _gather_features(values, group, int(chunk_stays))
        for f, (observed, per_stay) in zip(group, gathered):
            if not np.isfinite(observed).all():
                raise ValueError(
                    f"values of {feature_names[f]} hold +/-inf; only finite values or NaN are allowed"
                )
            for k in range(n_folds):
                _describe(np.sort(observed[np.repeat(is_train[:, k], per_stay)]), out, k, f)
        del gathered

    for k in range(n_folds):
        empty = np.flatnonzero(out["n_observed"][k] == 0)
        if empty.size:
            names = ", ".join(str(feature_names[f]) for f in empty)
            warnings.warn(
                f"fold {k}: no training observation of {names}; its statistics are NaN",
                stacklevel=2,
            )
    return out


#: Upper bound on the cells of ``values`` whose observed entries are gathered at once, i.e. at
#: most ~128 MiB of gathered float32 values plus one chunk of the tensor.
_GATHER_CELLS = 1 << 25


def _feature_groups(shape: tuple[int, int, int]) -> list[list[int]]:
    """Split the features into groups whose cells fit :data:`_GATHER_CELLS`."""
    n_stays, n_time, n_features = shape
    per_group = max(1, _GATHER_CELLS // max(1, n_stays * n_time))
    return [list(range(g, min(g + per_group, n_features))) for g in range(0, n_features, per_group)]


def _gather_features(
    values: np.ndarray, features: list[int], chunk_stays: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each feature, its observed values in stay order and the count per stay.

    Reads ``chunk_stays`` stays at a time, with the group's features made contiguous per
    chunk, so the whole tensor is traversed once per feature group.
    """
    lo, hi = features[0], features[-1] + 1
    vals = [[] for _ in features]
    counts = [[] for _ in features]
    for start in range(0, values.shape[0], chunk_stays):
        block = np.ascontiguousarray(np.moveaxis(values[start:start + chunk_stays, :, lo:hi], 2, 0))
        observed = ~np.isnan(block)
        for j in range(hi - lo):
            vals[j].append(block[j][observed[j]])
            counts[j].append(observed[j].sum(axis=1))
    return [
        (np.concatenate(v) if v else np.empty(0, values.dtype),
         np.concatenate(c) if c else np.empty(0, np.int64))
        for v, c in zip(vals, counts)
    ]


def _describe(sorted_values: np.ndarray, out: dict[str, np.ndarray], fold: int, feature: int) -> None:
    """Fill the statistics of one fold and feature from its sorted observed training values."""
    n = sorted_values.size
    out["n_observed"][fold, feature] = n
    if n == 0:
        return
    q25, q50, q75 = (_linear_quantile(sorted_values, q) for q in (0.25, 0.5, 0.75))
    as64 = sorted_values.astype(np.float64)
    out["median"][fold, feature] = q50
    out["iqr"][fold, feature] = q75 - q25
    out["mean"][fold, feature] = as64.mean()
    out["std"][fold, feature] = as64.std()
    out["min"][fold, feature] = sorted_values[0]
    out["max"][fold, feature] = sorted_values[-1]


def _linear_quantile(sorted_values: np.ndarray, q: float) -> float:
    """Quantile of sorted data, numpy's ``method="linear"`` (the default), in float64."""
    position = q * (sorted_values.size - 1)
    below = int(np.floor(position))
    above = min(below + 1, sorted_values.size - 1)
    a, b = float(sorted_values[below]), float(sorted_values[above])
    t = position - below
    # Interpolate from the nearer end, as numpy does, so exact data points come back exactly.
    return b - (b - a) * (1 - t) if t >= 0.5 else a + (b - a) * t
