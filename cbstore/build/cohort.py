"""The ICU-stay cohort: selection steps, their counts, and the per-stay demographics table.

Cohort steps (each recorded as ``{step, n, note}`` in ``attrs["cbstore"]["cohort_flow"]``):

1. ``icu_stays`` - every row of ``icu/icustays``.
2. ``hospital_admission`` - the stay's ``hadm_id`` names a row of ``hosp/admissions`` of the same
   ``subject_id``, and the patient has a row in ``hosp/patients``.
3. ``adult`` - age at ICU admission ``>= min_age`` years, where
   age = ``anchor_age + year(intime) - anchor_year`` (MIMIC-IV's anchor convention).
4. ``min_length`` - ``outtime - intime >= window_hours`` (stays with a missing ``intime`` or
   ``outtime`` fail this step). Every input hour therefore lies inside the ICU stay, so no
   trailing "discharged or dead" gap can leak the outcome into the inputs.
5. ``ehr_in_window`` - at least one valid EHR measurement (any variable, after range checks) in
   ``[intime, prediction_time)``; a stay without any is a charting gap, not a patient state.

Every stay of a patient is kept (no first-stay-only rule): splits are assigned per patient, so
all stays of one patient fall in the same part of a fold.

Steps 1-4 run in DuckDB (:func:`select_cohort`), before the build loads pandas, so that the
extraction of the events can start at once; the candidates' rows come as a DataFrame afterwards
(:func:`read_candidates`). The store's per-stay table is made in :mod:`cbstore.build.stays`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from cbstore.build.extract import Extractor, load_sql
from cbstore.errors import SourceError

if TYPE_CHECKING:
    import pandas as pd

#: The table of every ICU stay (``stays.sql``) with a ``candidate`` flag (steps 1-4 passed); not
#: temporary, so that another connection (:meth:`Extractor.cursor`) can read it.
COHORT_TABLE = "cohort_stays"


def select_cohort(extractor: Extractor, *, min_age: float, window_hours: int) -> list[dict]:
    """Apply cohort steps 1-4 in DuckDB and count the stays after each.

    Creates :data:`COHORT_TABLE`: one row per row of ``icu/icustays`` joined to its admission and
    patient (``stays.sql``), with ``prediction_time`` (``intime + window_hours``) and
    ``candidate`` (steps 1-4 passed).

    Parameters
    ----------
    extractor : Extractor
        Open DuckDB connection over the source.
    min_age : float
        Minimum age at ICU admission.
    window_hours : int
        Minimum ICU length of stay in hours (the observation window).

    Returns
    -------
    list of dict
        ``{step, n, note}`` after each step.

    Raises
    ------
    SourceError
        If a ``stay_id`` occurs twice in ``icu/icustays``, or a ``hadm_id`` twice in
        ``hosp/admissions`` / a ``subject_id`` twice in ``hosp/patients`` for a stay, or a row
        of ``icu/icustays`` has no ``stay_id``.
    """
    stays = load_sql("stays").strip().rstrip(";")
    hours = int(window_hours)
    # each step's condition: the stay passes it and every step before (steps 2-4; NULL fails)
    passed = {"hospital_admission": "has_admission AND has_patient"}
    passed["adult"] = f"{passed['hospital_admission']} AND age >= {float(min_age)!r}"
    passed["min_length"] = f"{passed['adult']} AND epoch_us(outtime) - epoch_us(intime) >= {hours} * 3600000000"
    extractor.execute("stays", f"""
        CREATE OR REPLACE TABLE {COHORT_TABLE} AS
        SELECT *, intime + to_hours(CAST({hours} AS BIGINT)) AS prediction_time,
               coalesce({passed['min_length']}, false) AS candidate
        FROM ({stays})""", reads=("icu/icustays", "hosp/admissions", "hosp/patients"))
    _check_keys(extractor)
    counts = ", ".join(f"count(*) FILTER (WHERE {condition})" for condition in passed.values())
    n = extractor.con.execute(f"SELECT count(*), {counts} FROM {COHORT_TABLE}").fetchone()
    notes = ("rows of icu/icustays",
             "hadm_id found in hosp/admissions for the same subject_id, patient in hosp/patients",
             f"age at ICU admission >= {min_age:g} years (anchor_age + year(intime) - anchor_year)",
             f"outtime - intime >= {window_hours} h (the observation window)")
    steps = ("icu_stays", *passed)
    return [{"step": step, "n": int(count), "note": note} for step, count, note in zip(steps, n, notes)]


def _check_keys(extractor: Extractor) -> None:
    """The SourceError of a stay on several rows of :data:`COHORT_TABLE`, or of a row without a stay_id."""
    row = extractor.con.execute(f"SELECT stay_id FROM {COHORT_TABLE} WHERE stay_id IS NOT NULL GROUP BY stay_id "
                                f"HAVING count(*) > 1 ORDER BY stay_id LIMIT 1").fetchone()
    if row is not None:
        stay = int(row[0])
        raw = int(extractor.con.execute(
            "SELECT count(*) FROM mimiciv_icu.icustays WHERE stay_id = ?", [stay]).fetchone()[0])
        if raw > 1:
            raise SourceError(f"icu/icustays ({extractor.source.table('icu/icustays').path}) has stay_id {stay} "
                              f"on {raw} rows; stay_id must be unique")
        raise SourceError(f"stay {stay} matches several rows of hosp/admissions (hadm_id) or hosp/patients "
                          f"(subject_id); these keys must be unique")
    if extractor.con.execute(f"SELECT count(*) FROM {COHORT_TABLE} WHERE stay_id IS NULL").fetchone()[0]:
        raise SourceError(f"icu/icustays ({extractor.source.table('icu/icustays').path}) has rows with an empty "
                          f"stay_id")


def read_candidates(extractor: Extractor) -> pd.DataFrame:
    """The stays that passed steps 1-4 (:func:`select_cohort`), sorted by ``stay_id``: row ``i`` is ``stay_idx`` ``i``.

    Columns: those of ``stays.sql`` and ``prediction_time``.
    """
    frame = extractor.execute("cohort_candidates", f"SELECT * EXCLUDE (candidate) FROM {COHORT_TABLE} "
                                                   f"WHERE candidate ORDER BY stay_id", fetch="frame")
    return frame.reset_index(drop=True)


def keep_with_ehr(stays: pd.DataFrame, with_ehr: np.ndarray, flow: list[dict]) -> pd.DataFrame:
    """Cohort step 5: keep the stays at positions ``with_ehr`` (those with an EHR value); appends to ``flow``.

    ``with_ehr`` holds sorted row positions of ``stays`` (see :func:`cbstore.build.ehr.stays_with_ehr`).
    """
    kept = stays.iloc[np.asarray(with_ehr, dtype=np.int64)].reset_index(drop=True)
    flow.append({"step": "ehr_in_window", "n": int(len(kept)),
                 "note": "at least one EHR measurement in [intime, prediction_time)"})
    return kept
