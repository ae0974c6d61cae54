"""The store's ``stays`` table: one row per stay of the cohort, with its demographics.

Demographics: ``age`` (years, float), ``age_group`` (left-closed bins ``<min_age>-40``,
``40-60``, ``60-80``, ``80+``), ``gender`` (``M``/``F`` as recorded), ``race`` (five groups,
see :data:`RACE_GROUPS`; unknown or empty strings are ``OTHER``) and ``race_raw`` (as recorded),
``insurance``, ``admission_type``, ``marital_status``, ``language``, ``first_careunit`` (as
recorded, ``""`` when missing).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

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
