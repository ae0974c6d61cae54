"""Preprocessing shared by store readers: training statistics, imputation, normalisation, image scaling.

Statistics always come from the training part of a fold (``stats/`` in the store); nothing here
computes statistics from the data it transforms, so validation and test stays never leak into
their own preprocessing.
"""

from __future__ import annotations

import numpy as np

from cbstore.content import STAT_NAMES, TRAIN


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


def forward_fill(values: np.ndarray) -> np.ndarray:
    """Carry the last observed value forward along axis 1 (time); leading NaN stay NaN."""
    values = np.asarray(values)
    t = np.arange(values.shape[1]).reshape(1, -1, *([1] * (values.ndim - 2)))
    last = np.where(np.isnan(values), 0, t)
    np.maximum.accumulate(last, axis=1, out=last)
    return np.take_along_axis(values, last, axis=1)


def scale_of(stats: dict[str, np.ndarray]) -> np.ndarray:
    """Scale per feature: IQR, else std where IQR is 0 or NaN, else 1."""
    iqr = np.asarray(stats["iqr"], dtype=np.float64)
    std = np.asarray(stats["std"], dtype=np.float64)
    scale = np.where(np.isfinite(iqr) & (iqr > 0), iqr, std)
    return np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)


def impute_and_normalise(
    values: np.ndarray,
    stats: dict[str, np.ndarray],
    normalize: np.ndarray,
    binary: np.ndarray | None = None,
) -> np.ndarray:
    """Impute and scale hourly EHR values with one fold's training statistics.

    Per stay and feature: binary features (``binary``, by default the features with
    ``normalize`` false) get 0 where not observed and are never forward filled or scaled; other
    features are forward filled over time, remaining (leading) gaps take the training median (0 if
    the feature was never observed in training), and features with ``normalize`` true are scaled
    to ``(x - median) / scale`` with :func:`scale_of`.

    Parameters
    ----------
    values : numpy.ndarray
        float [k, T, F] raw values, NaN where not observed.
    stats : dict
        The fold's training statistics (``Store.fold_stats``): at least median, iqr, std as [F].
    normalize : numpy.ndarray
        bool [F], whether to scale each feature.
    binary : numpy.ndarray, optional
        bool [F], binary features (``ehr/kind == "binary"``).

    Returns
    -------
    numpy.ndarray
        float32 [k, T, F] without NaN.
    """
    values = np.asarray(values, dtype=np.float32)
    normalize = np.asarray(normalize, dtype=bool)
    binary = ~normalize if binary is None else np.asarray(binary, dtype=bool)
    if values.ndim != 3 or normalize.shape != (values.shape[2],) or binary.shape != normalize.shape:
        raise ValueError(
            f"values must be [k, T, F] and normalize/binary [F]; got {values.shape}, "
            f"{normalize.shape}, {binary.shape}"
        )
    median = np.asarray(stats["median"], dtype=np.float32)
    fill = np.where(np.isfinite(median), median, np.float32(0))
    out = np.empty_like(values)
    cont = ~binary
    filled = forward_fill(values[:, :, cont])
    out[:, :, cont] = np.where(np.isnan(filled), fill[cont], filled)
    out[:, :, binary] = np.nan_to_num(values[:, :, binary], nan=0.0)
    scaled = normalize & cont
    scale = scale_of(stats).astype(np.float32)
    out[:, :, scaled] = (out[:, :, scaled] - fill[scaled]) / scale[scaled]
    return out


def cxr_to_float(images: np.ndarray) -> np.ndarray:
    """uint8 films to float32 in torchxrayvision's range: ``(2 * x / 255 - 1) * 1024``."""
    return ((2.0 * np.asarray(images, dtype=np.float32) / 255.0 - 1.0) * 1024.0).astype(np.float32)
