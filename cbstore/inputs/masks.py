"""Simulated missing-modality masks for missing-X-ray experiments.

A stay's X-ray is hidden iff a hash of ``(seed, stay_id)`` mapped to ``[0, 1)`` is below the
rate. The mask therefore

* depends only on the seed and the stay id (not on the order, the part or the other stays),
* is nested: every stay dropped at rate ``r`` is also dropped at any rate ``r' > r``, so a
  missing-rate sweep removes X-rays one after the other instead of drawing new sets,
* is exactly empty at rate 0 and full at rate 1.

Masks are applied on top of natural missingness (a stay without an X-ray stays without one).
"""

from __future__ import annotations

import hashlib

import numpy as np

from cbstore.errors import MaskError

__all__ = ["MaskError", "apply_cxr_mask", "cxr_drop_mask", "stay_uniforms"]

_TWO_POW_64 = float(2**64)


def _check_ids(stay_ids) -> np.ndarray:
    ids = np.asarray(stay_ids)
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
        raise MaskError(f"stay_ids must be a 1-D integer array, got dtype {ids.dtype} and "
                        f"shape {ids.shape}")
    return ids


def stay_uniforms(stay_ids, seed: int) -> np.ndarray:
    """One pseudo-random number in ``[0, 1)`` per stay, a pure function of ``(seed, stay_id)``.

    The first 8 bytes of ``blake2b(f"{seed}:{stay_id}")`` read as an unsigned integer,
    divided by 2**64.

    Parameters
    ----------
    stay_ids : array-like of int
        ICU stay ids.
    seed : int
        Mask seed.

    Returns
    -------
    numpy.ndarray
        float64 ``[n]`` in ``[0, 1)``.
    """
    ids = _check_ids(stay_ids)
    seed = int(seed)
    out = np.empty(ids.size, dtype=np.float64)
    for i, stay_id in enumerate(ids.tolist()):
        digest = hashlib.blake2b(f"{seed}:{stay_id}".encode("ascii"), digest_size=8).digest()
        out[i] = int.from_bytes(digest, "big") / _TWO_POW_64
    return out


def cxr_drop_mask(stay_ids, rate: float, seed: int) -> np.ndarray:
    """Which stays lose their X-ray at missing rate ``rate``.

    Parameters
    ----------
    stay_ids : array-like of int
        ICU stay ids.
    rate : float
        Fraction of stays to mask, in ``[0, 1]``; each stay is dropped with probability ``rate``
        (the realised fraction varies around it).
    seed : int
        Mask seed.

    Returns
    -------
    numpy.ndarray
        bool ``[n]``, True where the X-ray is hidden.

    Raises
    ------
    MaskError
        If ``rate`` is not a number in ``[0, 1]``.

    Examples
    --------
    >>> ids = np.arange(1000, 1010)
    >>> low, high = cxr_drop_mask(ids, 0.2, 7), cxr_drop_mask(ids, 0.6, 7)
    >>> bool(np.all(high[low]))   # nested
    True
    >>> bool(cxr_drop_mask(ids, 1.0, 7).all()), bool(cxr_drop_mask(ids, 0.0, 7).any())
    (True, False)
    """
    try:
        rate = float(rate)
    except (TypeError, ValueError):
        raise MaskError(f"cxr missing rate must be a number in [0, 1], got {rate!r}") from None
    if not 0.0 <= rate <= 1.0:  # also rejects NaN
        raise MaskError(f"cxr missing rate must be in [0, 1], got {rate}")
    ids = _check_ids(stay_ids)
    if rate == 0.0:  # uniforms lie in [0, 1): rates 0 and 1 need no hashing
        return np.zeros(ids.size, dtype=bool)
    if rate == 1.0:
        return np.ones(ids.size, dtype=bool)
    return stay_uniforms(ids, seed) < rate


def apply_cxr_mask(present, stay_ids, rate: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hide X-rays on top of natural missingness.

    Parameters
    ----------
    present : array-like of bool
        Natural X-ray presence per stay.
    stay_ids : array-like of int
        Stay ids aligned with ``present``.
    rate, seed
        See :func:`cxr_drop_mask`.

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        ``present_after`` (present and not dropped) and ``masked`` (present but hidden by the mask).
    """
    present = np.asarray(present, dtype=bool)
    drop = cxr_drop_mask(stay_ids, rate, seed)
    if drop.shape != present.shape:
        raise MaskError(f"present has shape {present.shape} but stay_ids has {drop.shape}")
    return present & ~drop, present & drop
