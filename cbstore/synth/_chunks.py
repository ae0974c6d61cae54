"""How the synthetic source is cut into chunks of stays (what is held in memory at once).

The ICU event tables go by stays in ``stay_id`` order (``range(0, n_stays, chunk_stays)``); the
hospital lab table and the films go by whole patients in ``subject_id`` order, since their rows
are sorted by patient. The cut only bounds memory: every unit draws from its own generator
(:mod:`cbstore.synth._draws`), so the written bytes do not depend on it.
"""

from __future__ import annotations

import numpy as np

#: Chartevents rows per chunk by default: about 0.3 KB of working memory per row.
DEFAULT_CHUNK_ROWS = 1_000_000
#: Mean chartevents rows per stay when charting vital signs hourly (the generator's default).
DEFAULT_CHARTEVENTS_PER_STAY = 650


def default_chunk_stays(chartevents_per_stay: float | None) -> int:
    """Stays per chunk holding about :data:`DEFAULT_CHUNK_ROWS` chartevents rows (at least 1).

    1,538 stays with the default charting, 909 at 1,100 rows per stay, 232 at MIMIC-IV's ~4,300.
    """
    per_stay = DEFAULT_CHARTEVENTS_PER_STAY if chartevents_per_stay is None else float(chartevents_per_stay)
    return max(1, int(DEFAULT_CHUNK_ROWS // per_stay))


def stay_chunks(n_stays: int, chunk_stays: int) -> list[tuple[int, int]]:
    """(first, end) positions of consecutive chunks of ``chunk_stays`` stays."""
    return [(start, min(start + chunk_stays, n_stays)) for start in range(0, n_stays, chunk_stays)]


def patient_chunks(stays_per_patient, chunk_stays: int) -> list[tuple[int, int]]:
    """(first, end) positions of consecutive groups of whole patients.

    A patient goes to chunk ``k`` when the stays of the patients before it number between
    ``k * chunk_stays`` and ``(k + 1) * chunk_stays - 1``, so a chunk holds about ``chunk_stays``
    stays (more when its last patient has several) and never splits a patient.
    """
    counts = np.asarray(stays_per_patient, dtype=np.int64)
    if len(counts) == 0:
        return []
    chunk_of = (np.cumsum(counts) - counts) // int(chunk_stays)
    starts = np.flatnonzero(np.r_[True, chunk_of[1:] != chunk_of[:-1]])
    ends = np.r_[starts[1:], len(counts)]
    return list(zip(starts.tolist(), ends.tolist()))


def patients_by_subject(cohort) -> tuple[np.ndarray, np.ndarray]:
    """The cohort's ``subject_id`` values, sorted, and the number of stays of each patient."""
    subjects = np.sort(cohort.patients["subject_id"].to_numpy())
    counts = np.bincount(np.searchsorted(subjects, cohort.stays["subject_id"].to_numpy()), minlength=len(subjects))
    return subjects, counts
