"""The per-fold training statistics of the store's ``stats/`` group, by definition.

The build computes the same numbers chunk by chunk (:mod:`cbstore.build.stats`); the validator
recomputes them with these functions, and a test holds the two equal.
"""

from __future__ import annotations

import numpy as np

from cbstore.format.content import STAT_NAMES, TRAIN


def training_stats(values: np.ndarray, train: np.ndarray) -> dict[str, np.ndarray]:
    """Per-feature statistics of the observed hourly values of the training stays.

    Parameters
    ----------
    values : numpy.ndarray
        float [n, T, F] raw values, NaN where not observed.
    train : numpy.ndarray
        bool [n], the training stays.

    Returns
    -------
    dict of str to numpy.ndarray
        ``median``, ``iqr`` (q75 - q25), ``mean``, ``std`` (population), ``min``, ``max`` as
        float32 [F] (NaN for a feature never observed in training) and ``n_observed`` int64 [F].
    """
    values = np.asarray(values)
    train = np.asarray(train, dtype=bool)
    n_feat = values.shape[2]
    out = {s: np.full(n_feat, np.nan, dtype=np.float32) for s in STAT_NAMES if s != "n_observed"}
    out["n_observed"] = np.zeros(n_feat, dtype=np.int64)
    sub = values[train]
    for f in range(n_feat):
        x = sub[:, :, f].astype(np.float64).ravel()
        x = x[~np.isnan(x)]
        out["n_observed"][f] = x.size
        if x.size == 0:
            continue
        q25, q50, q75 = np.percentile(x, [25, 50, 75])
        out["median"][f], out["iqr"][f] = q50, q75 - q25
        out["mean"][f], out["std"][f] = x.mean(), x.std()
        out["min"][f], out["max"][f] = x.min(), x.max()
    return out


def fold_stats(values: np.ndarray, splits: np.ndarray) -> dict[str, np.ndarray]:
    """:func:`training_stats` for every fold, stacked to [fold, F] (the store's ``stats/`` arrays).

    Parameters
    ----------
    values : numpy.ndarray
        float [n, T, F] raw values.
    splits : numpy.ndarray
        uint8 [n, fold] split codes; code 0 (train) selects the stays of each fold.
    """
    per_fold = [training_stats(values, splits[:, k] == TRAIN) for k in range(splits.shape[1])]
    return {s: np.stack([p[s] for p in per_fold]) for s in STAT_NAMES}
