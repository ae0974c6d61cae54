"""In-memory content of a store, handed from the build pipeline to the store writer.

The build (`cbstore.build.pipeline`) assembles one :class:`StoreContent`; the writer
(`cbstore.store.writer.write_store`) turns it into the on-disk layout of ``store_layout.md``.
Keeping this hand-over explicit lets either side be tested on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the tables are DataFrames; the build reads its event tables before it loads pandas
    import pandas as pd

#: Columns of :attr:`StoreContent.stays`, in store order (all per stay).
STAY_COLUMNS = (
    "subject_id", "hadm_id", "intime", "outtime", "prediction_time", "admittime", "dischtime",
    "age", "age_group", "gender", "race", "race_raw", "insurance", "admission_type",
    "marital_status", "language", "first_careunit",
)

#: Columns of :attr:`StoreContent.cxr` (per stay, aligned with ``stays``).
CXR_COLUMNS = (
    "present", "dicom_id", "study_id", "study_time", "hours_before_prediction",
    "view_position", "n_eligible", "absent_reason",
)

#: Columns of :attr:`StoreContent.features` (per EHR variable).
FEATURE_COLUMNS = ("name", "unit", "kind", "normalize")

#: Codes of ``splits/part``.
TRAIN, VAL, TEST = 0, 1, 2
PART_CODES = {"train": TRAIN, "val": VAL, "test": TEST}

#: Names of the statistics stored per fold and feature in ``stats/``.
STAT_NAMES = ("median", "iqr", "mean", "std", "min", "max", "n_observed")


@dataclass
class StoreContent:
    """Everything a store holds, aligned on ``stays.index`` (sorted ``stay_id``).

    Attributes
    ----------
    stays : pandas.DataFrame
        Index ``stay_id`` (int64, ascending); columns :data:`STAY_COLUMNS`. Datetime columns are
        ``datetime64`` (naive); string columns use ``""`` for missing.
    labels : dict of str to numpy.ndarray
        ``mortality``, ``mortality_hosp`` (int8 [stay]); ``phenotype_labels`` (int8 [stay, 25]);
        ``los`` (float32 [stay], days); ``los_class`` (int8 [stay], -1 where los < 2 days).
    phenotype_names : list of str
        The 25 phenotype names, in column order of ``labels["phenotype_labels"]``.
    features : pandas.DataFrame
        One row per EHR variable, columns :data:`FEATURE_COLUMNS`.
    ehr_values : numpy.ndarray
        float32 [stay, time, feature]; NaN where not observed.
    cxr : pandas.DataFrame
        Aligned with ``stays``; columns :data:`CXR_COLUMNS`.
    images : numpy.ndarray or None
        uint8 [stay, y, x]; zeros where ``cxr.present`` is false. ``None`` when the writer is
        given images region by region instead (see ``cbstore.store.writer.StoreWriter``).
    splits : numpy.ndarray
        uint8 [stay, fold] with codes :data:`TRAIN`, :data:`VAL`, :data:`TEST`.
    stats : dict of str to numpy.ndarray
        For each name in :data:`STAT_NAMES`, an array [fold, feature] computed from training stays.
    attrs : dict
        Root metadata (see "Root attributes" in ``store_layout.md``), without ``format_version``,
        ``created_by`` and ``created_at``, which the writer adds.
    """

    stays: pd.DataFrame
    labels: dict[str, np.ndarray]
    phenotype_names: list[str]
    features: pd.DataFrame
    ehr_values: np.ndarray
    cxr: pd.DataFrame
    images: np.ndarray | None
    splits: np.ndarray
    stats: dict[str, np.ndarray]
    attrs: dict = field(default_factory=dict)

    @property
    def n_stays(self) -> int:
        """Number of ICU stays (rows)."""
        return len(self.stays)
