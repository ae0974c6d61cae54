"""Outcome labels of each cohort stay.

* ``mortality`` (ICU mortality): the patient died between ``intime`` and ``outtime``
  (both inclusive). The death time is ``admissions.deathtime`` when recorded; otherwise
  ``patients.dod``, which is a date only, so it counts when
  ``date(intime) <= dod <= date(outtime)``.
* ``mortality_hosp`` (in-hospital mortality): ``admissions.hospital_expire_flag == 1``, or
  ``deathtime`` between ``admittime`` and ``dischtime`` (both inclusive).
* ``phenotype_labels``: 1 for each of the 25 phenotypes with a code among the diagnoses
  (``hosp/diagnoses_icd``, any position) of the stay's hospital admission; codes are compared
  with spaces and dots removed and with their ``icd_version``.
* ``los``: ``icustays.los`` in days (computed as ``(outtime - intime) / 1 day`` where empty).
* ``los_class``: 0..6 for ``[2,3) [3,4) [4,5) [5,6) [6,7) [7,14) [14, inf)`` days, -1 below 2 days.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cbstore.build.extract import Extractor
from cbstore.errors import CbstoreError

#: Left edges of the LoS classes in days; class k covers [edge_k, edge_{k+1}).
LOS_EDGES = (2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 14.0)
#: Display names of the LoS classes.
LOS_CLASS_NAMES = ("2-3d", "3-4d", "4-5d", "5-6d", "6-7d", "7-14d", "14+d")


def mortality_labels(stays: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """ICU and in-hospital mortality (int8 0/1) from the columns of :func:`cbstore.build.cohort.read_candidates`."""
    intime, outtime = stays["intime"], stays["outtime"]
    deathtime = stays["deathtime"]
    dod = pd.to_datetime(stays["dod"])
    has_time = deathtime.notna()
    by_time = has_time & (deathtime >= intime) & (deathtime <= outtime)
    by_date = (~has_time & dod.notna()
               & (dod >= intime.dt.normalize()) & (dod <= outtime.dt.normalize()))
    icu = (by_time | by_date).to_numpy(bool)
    flag = pd.to_numeric(stays["hospital_expire_flag"], errors="coerce").fillna(0).to_numpy() == 1
    in_adm = (has_time & (deathtime >= stays["admittime"]) & (deathtime <= stays["dischtime"])).to_numpy(bool)
    return icu.astype(np.int8), (flag | in_adm).astype(np.int8)


def los_days(stays: pd.DataFrame) -> np.ndarray:
    """ICU length of stay in days (float32): ``icustays.los``, else ``(outtime - intime)`` in days."""
    los = pd.to_numeric(stays["los"], errors="coerce").to_numpy(np.float64)
    computed = ((stays["outtime"] - stays["intime"]) / pd.Timedelta(days=1)).to_numpy(np.float64)
    return np.where(np.isnan(los), computed, los).astype(np.float32)


def los_class(los: np.ndarray) -> np.ndarray:
    """LoS class 0..6 (left-closed bins :data:`LOS_EDGES`), -1 below 2 days or unknown (int8)."""
    los = np.asarray(los, dtype=np.float64)
    cls = np.digitize(los, LOS_EDGES) - 1
    cls[np.isnan(los)] = -1
    return cls.astype(np.int8)


def phenotype_labels(extractor: Extractor, stays: pd.DataFrame, code_table: pd.DataFrame,
                     names: list[str]) -> np.ndarray:
    """int8 ``[stay, phenotype]``: 1 where a diagnosis of the stay's admission is in the phenotype.

    Parameters
    ----------
    extractor : Extractor
        Open DuckDB connection over the source.
    stays : pandas.DataFrame
        The cohort stays in output order, with ``hadm_id``.
    code_table : pandas.DataFrame
        Columns ``name`` (one of ``names``), ``icd_code``, ``icd_version``.
    names : list of str
        Phenotype names in column order.
    """
    unknown = sorted(set(code_table["name"]) - set(names))
    if unknown:
        raise CbstoreError(f"phenotype code table names unknown phenotype {unknown[0]!r}")
    position = {name: k for k, name in enumerate(names)}
    codes = pd.DataFrame({
        "phenotype_idx": code_table["name"].map(position).to_numpy(np.int32),
        "icd_code": code_table["icd_code"].astype(str).str.strip().str.replace(".", "", regex=False)
        .str.upper().to_numpy(dtype=object),
        "icd_version": code_table["icd_version"].to_numpy(np.int64),
    })
    cohort = pd.DataFrame({"stay_idx": np.arange(len(stays), dtype=np.int32),
                           "hadm_id": stays["hadm_id"].to_numpy(np.int64)})
    extractor.register("phenotype_codes", codes)
    extractor.register("label_cohort", cohort)
    matches = extractor.fetch("phenotype_matches", reads=("hosp/diagnoses_icd",))
    labels = np.zeros((len(stays), len(names)), dtype=np.int8)
    labels[matches["stay_idx"].to_numpy(np.int64), matches["phenotype_idx"].to_numpy(np.int64)] = 1
    return labels


def compute_labels(extractor: Extractor, stays: pd.DataFrame, code_table: pd.DataFrame,
                   names: list[str]) -> dict[str, np.ndarray]:
    """All labels of ``stays`` as the dict :class:`cbstore.format.content.StoreContent` expects."""
    mortality, mortality_hosp = mortality_labels(stays)
    los = los_days(stays)
    return {
        "mortality": mortality,
        "mortality_hosp": mortality_hosp,
        "phenotype_labels": phenotype_labels(extractor, stays, code_table, names),
        "los": los,
        "los_class": los_class(los),
    }
