"""Preprocessing shared by store readers: imputation, normalisation, image scaling.

Statistics always come from the training part of a fold (``stats/`` in the store, defined in
:mod:`cbstore.format.stats`); nothing here computes statistics from the data it transforms, so
validation and test stays never leak into their own preprocessing.
"""

from __future__ import annotations

import numpy as np


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
