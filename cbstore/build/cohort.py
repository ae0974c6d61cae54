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

Demographics: ``age`` (years, float), ``age_group`` (left-closed bins ``<min_age>-40``,
``40-60``, ``60-80``, ``80+``), ``gender`` (``M``/``F`` as recorded), ``race`` (five groups,
see :data:`RACE_GROUPS`; unknown or empty strings are ``OTHER``) and ``race_raw`` (as recorded),
``insurance``, ``admission_type``, ``marital_status``, ``language``, ``first_careunit`` (as
recorded, ``""`` when missing).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cbstore.build.extract import Extractor
from cbstore.errors import SourceError
from cbstore.format.content import STAY_COLUMNS

#: MIMIC-IV ``admissions.race`` strings -> five groups (the reference toolkit's table; strings are
#: compared upper-cased with spaces stripped; anything else, and empty, is OTHER).
RACE_GROUPS: dict[str, str] = {
    **{s: "WHITE" for s in ("WHITE", "WHITE - OTHER EUROPEAN", "WHITE - RUSSIAN", "WHITE - EASTERN EUROPEAN",
                            "WHITE - BRAZILIAN")},
    **{s: "BLACK" for s in ("BLACK/AFRICAN AMERICAN", "BLACK/CAPE VERDEAN", "BLACK/CARIBBEAN ISLAND",
                            "BLACK/AFRICAN")},
    **{s: "HISPANIC" for s in ("HISPANIC OR LATINO", "HISPANIC/LATINO - PUERTO RICAN", "HISPANIC/LATINO - DOMINICAN",
                               "HISPANIC/LATINO - GUATEMALAN", "HISPANIC/LATINO - SALVADORAN",
                               "HISPANIC/LATINO - MEXICAN", "HISPANIC/LATINO - CUBAN", "HISPANIC/LATINO - COLUMBIAN",
                               "HISPANIC/LATINO - HONDURAN", "HISPANIC/LATINO - CENTRAL AMERICAN")},
    **{s: "ASIAN" for s in ("ASIAN", "ASIAN - CHINESE", "ASIAN - SOUTH EAST ASIAN", "ASIAN - ASIAN INDIAN",
                            "ASIAN - KOREAN")},
    **{s: "OTHER" for s in ("OTHER", "AMERICAN INDIAN/ALASKA NATIVE", "NATIVE HAWAIIAN OR OTHER PACIFIC ISLANDER",
                            "SOUTH AMERICAN", "MULTIPLE RACE/ETHNICITY", "UNKNOWN", "UNABLE TO OBTAIN",
                            "PATIENT DECLINED TO ANSWER")},
}
#: The five race groups, in display order.
RACE_NAMES = ("WHITE", "BLACK", "HISPANIC", "ASIAN", "OTHER")

_TEXT_COLUMNS = ("gender", "race_raw", "insurance", "admission_type", "marital_status", "language", "first_careunit")


def read_stays(extractor: Extractor) -> pd.DataFrame:
    """Every ICU stay joined to its admission and patient (``stays.sql``), one row per stay.

    Raises
    ------
    SourceError
        If a ``stay_id`` occurs twice in ``icu/icustays``, or a ``hadm_id`` twice in
        ``hosp/admissions`` / a ``subject_id`` twice in ``hosp/patients`` for a stay.
    """
    frame = extractor.fetch("stays", reads=("icu/icustays", "hosp/admissions", "hosp/patients"))
    dup = frame["stay_id"].duplicated(keep=False)
    if dup.any():
        stay = int(frame.loc[dup, "stay_id"].iloc[0])
        raw = int(extractor.con.execute(
            "SELECT count(*) FROM mimiciv_icu.icustays WHERE stay_id = ?", [stay]).fetchone()[0])
        if raw > 1:
            raise SourceError(f"icu/icustays ({extractor.source.table('icu/icustays').path}) has stay_id {stay} "
                              f"on {raw} rows; stay_id must be unique")
        raise SourceError(f"stay {stay} matches several rows of hosp/admissions (hadm_id) or hosp/patients "
                          f"(subject_id); these keys must be unique")
    if frame["stay_id"].isna().any():
        raise SourceError(f"icu/icustays ({extractor.source.table('icu/icustays').path}) has rows with an empty "
                          f"stay_id")
    return frame.reset_index(drop=True)


def select_cohort(all_stays: pd.DataFrame, *, min_age: float, window_hours: int) -> tuple[pd.DataFrame, list[dict]]:
    """Apply cohort steps 1-4 and count the stays after each.

    Parameters
    ----------
    all_stays : pandas.DataFrame
        Output of :func:`read_stays`.
    min_age : float
        Minimum age at ICU admission.
    window_hours : int
        Minimum ICU length of stay in hours (the observation window).

    Returns
    -------
    stays : pandas.DataFrame
        The selected stays, sorted by ``stay_id``, with ``prediction_time`` added.
    flow : list of dict
        ``{step, n, note}`` after each step.
    """
    flow = [_step("icu_stays", all_stays, "rows of icu/icustays")]
    stays = all_stays[all_stays["has_admission"].astype(bool) & all_stays["has_patient"].astype(bool)]
    flow.append(_step("hospital_admission", stays,
                      "hadm_id found in hosp/admissions for the same subject_id, patient in hosp/patients"))
    stays = stays[stays["age"].notna() & (stays["age"].astype(float) >= min_age)]
    flow.append(_step("adult", stays, f"age at ICU admission >= {min_age:g} years "
                                      f"(anchor_age + year(intime) - anchor_year)"))
    length = stays["outtime"] - stays["intime"]
    stays = stays[length.notna() & (length >= pd.Timedelta(hours=window_hours))]
    flow.append(_step("min_length", stays, f"outtime - intime >= {window_hours} h (the observation window)"))
    stays = stays.sort_values("stay_id").reset_index(drop=True).copy()
    stays["prediction_time"] = stays["intime"] + pd.Timedelta(hours=window_hours)
    return stays, flow


def keep_with_ehr(stays: pd.DataFrame, with_ehr: np.ndarray, flow: list[dict]) -> pd.DataFrame:
    """Cohort step 5: keep the stays at positions ``with_ehr`` (those with an EHR value); appends to ``flow``.

    ``with_ehr`` holds sorted row positions of ``stays`` (see :func:`cbstore.build.ehr.stays_with_ehr`).
    """
    kept = stays.iloc[np.asarray(with_ehr, dtype=np.int64)].reset_index(drop=True)
    flow.append(_step("ehr_in_window", kept, "at least one EHR measurement in [intime, prediction_time)"))
    return kept


def _step(step: str, stays: pd.DataFrame, note: str) -> dict:
    return {"step": step, "n": int(len(stays)), "note": note}


def map_race(raw: pd.Series) -> np.ndarray:
    """Five race groups (:data:`RACE_GROUPS`) from ``admissions.race``; unknown and empty -> OTHER."""
    keys = raw.fillna("").astype(str).str.strip().str.upper()
    return np.array([RACE_GROUPS.get(k, "OTHER") for k in keys], dtype=object)


def age_groups(age: np.ndarray, min_age: float = 18) -> np.ndarray:
    """Left-closed age bins ``<min_age>-40``, ``40-60``, ``60-80``, ``80+`` (``"18-40"`` by default)."""
    age = np.asarray(age, dtype=float)
    labels = np.array([f"{min_age:g}-40", "40-60", "60-80", "80+"], dtype=object)
    return labels[np.digitize(age, [40.0, 60.0, 80.0])]


def stays_table(stays: pd.DataFrame, min_age: float = 18) -> pd.DataFrame:
    """The store's ``stays`` table (index ``stay_id``; columns :data:`cbstore.format.content.STAY_COLUMNS`)."""
    out = pd.DataFrame(index=pd.Index(stays["stay_id"].to_numpy(np.int64), name="stay_id"))
    out["subject_id"] = stays["subject_id"].to_numpy(np.int64)
    out["hadm_id"] = stays["hadm_id"].to_numpy(np.int64)
    for col in ("intime", "outtime", "prediction_time", "admittime", "dischtime"):
        out[col] = pd.to_datetime(stays[col].to_numpy()).astype("datetime64[s]")
    out["age"] = stays["age"].to_numpy(np.float32)
    out["age_group"] = age_groups(out["age"].to_numpy(), min_age)
    out["race"] = map_race(stays["race"])
    out["race_raw"] = stays["race"].to_numpy()
    for col in _TEXT_COLUMNS:
        src = stays[col] if col != "race_raw" else stays["race"]
        out[col] = src.fillna("").astype(str).str.strip().to_numpy(dtype=object)
    return out[list(STAY_COLUMNS)]
