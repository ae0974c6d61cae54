"""Patient-level, stratified cross-validation splits.

Every fold partitions the *patients* (``subject_id``) into train, validation and test, so no
patient's stays are ever on both sides of a split. Each patient is in the test part of exactly
one fold. Assignment is stratified by a per-stay 0/1 outcome (a patient counts as positive if
any of their stays is), seeded, and independent of the order of the input rows.
"""

from __future__ import annotations

import numpy as np

from cbstore.format.content import TEST, TRAIN, VAL


def assign_folds(
    subject_id: np.ndarray,
    stratify: np.ndarray,
    *,
    n_folds: int = 5,
    val_fraction: float = 0.125,
    seed: int = 0,
) -> np.ndarray:
    """Assign every stay to train / val / test in each of ``n_folds`` folds, by patient.

    Patients are sorted by ``subject_id``, shuffled within each stratum with a seeded
    generator, and dealt round-robin into ``n_folds`` test groups (so group sizes, and the
    number of positive patients per group, differ by at most one). In fold ``k`` the test
    part is group ``k``; from the other patients, ``round(val_fraction * n_patients)`` are
    drawn for validation (stratified, a fresh seeded draw per fold) and the rest train.

    Parameters
    ----------
    subject_id : numpy.ndarray
        int [n_stays]: patient of each stay.
    stratify : numpy.ndarray
        [n_stays] of 0/1 (or bool), e.g. mortality. A patient is positive if any stay is.
    n_folds : int, default 5
        Number of folds (>= 2).
    val_fraction : float, default 0.125
        Fraction of *all* patients in the validation part of each fold,
        ``0 <= val_fraction < (n_folds - 1) / n_folds``.
    seed : int, default 0
        Seed of the shuffle.

    Returns
    -------
    numpy.ndarray
        uint8 [n_stays, n_folds] with codes ``TRAIN`` (0), ``VAL`` (1), ``TEST`` (2).

    Raises
    ------
    ValueError
        On a length mismatch, non 0/1 ``stratify``, ``n_folds < 2``, a ``val_fraction``
        outside its range, or too few patients for the folds and validation part asked for.

    Examples
    --------
    >>> parts = assign_folds(np.arange(10) // 2, np.zeros(10), n_folds=2, val_fraction=0.2)
    >>> parts.shape, sorted(set(parts.ravel().tolist()))
    ((10, 2), [0, 1, 2])
    """
    subject_id = np.asarray(subject_id)
    stratify = np.asarray(stratify)
    if subject_id.ndim != 1 or stratify.ndim != 1:
        raise ValueError("subject_id and stratify must be 1-D arrays (one value per stay)")
    if subject_id.shape != stratify.shape:
        raise ValueError(
            f"subject_id and stratify lengths differ: {subject_id.shape[0]} vs {stratify.shape[0]}"
        )
    if not np.issubdtype(subject_id.dtype, np.integer):
        raise ValueError(f"subject_id must be integers, got dtype {subject_id.dtype}")
    if int(n_folds) != n_folds or n_folds < 2:
        raise ValueError(f"n_folds must be an integer >= 2, got {n_folds!r}")
    n_folds = int(n_folds)
    max_val = (n_folds - 1) / n_folds
    if not 0 <= val_fraction < max_val:
        raise ValueError(
            f"val_fraction must be in [0, {max_val:.3f}) for {n_folds} folds, got {val_fraction!r}"
        )
    bad = ~np.isin(stratify, (0, 1))
    if bad.any():
        raise ValueError(
            f"stratify must hold only 0/1, got {np.unique(stratify[bad])[:5].tolist()} "
            f"({int(bad.sum())} stays); fill missing outcomes before splitting"
        )

    patients, inverse = np.unique(subject_id, return_inverse=True)
    n_patients = patients.size
    positive = np.zeros(n_patients, dtype=bool)
    np.logical_or.at(positive, inverse, stratify.astype(bool))
    n_val = round(val_fraction * n_patients)
    if n_patients < n_folds:
        raise ValueError(f"{n_patients} patient(s) cannot fill {n_folds} folds; need at least {n_folds}")
    if val_fraction > 0 and n_val == 0:
        raise ValueError(
            f"{n_patients} patients are too few for val_fraction={val_fraction}: "
            "the validation part would be empty"
        )

    seeds = np.random.SeedSequence(seed).spawn(n_folds + 1)
    group = _deal_into_groups(positive, n_folds, np.random.default_rng(seeds[0]))
    n_val_pos = round(n_val * positive.sum() / n_patients)
    patient_parts = np.empty((n_patients, n_folds), dtype=np.uint8)
    for k in range(n_folds):
        rng = np.random.default_rng(seeds[k + 1])
        part = np.full(n_patients, TRAIN, dtype=np.uint8)
        part[group == k] = TEST
        for is_pos, count in ((True, n_val_pos), (False, n_val - n_val_pos)):
            candidates = np.flatnonzero((group != k) & (positive == is_pos))
            count = min(count, candidates.size)
            part[rng.permutation(candidates)[:count]] = VAL
        if not (part == TRAIN).any():
            raise ValueError(
                f"{n_patients} patients are too few: fold {k} has no training patient"
            )
        patient_parts[:, k] = part
    return patient_parts[inverse]


def _deal_into_groups(positive: np.ndarray, n_groups: int, rng: np.random.Generator) -> np.ndarray:
    """Shuffle patients within each stratum and deal them round-robin into groups."""
    order = np.concatenate([
        rng.permutation(np.flatnonzero(~positive)),
        rng.permutation(np.flatnonzero(positive)),
    ])
    group = np.empty(positive.size, dtype=np.int64)
    # Continuing the deal across strata keeps total group sizes within one of each other.
    group[order] = np.arange(order.size) % n_groups
    return group
