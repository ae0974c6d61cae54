"""A torch Dataset over one part of one fold of a store (imports torch; load lazily).

Everything a dataset needs is read from the store once, at construction, for its own stays only:
EHR values (imputed and normalised with the fold's *training* statistics from ``stats/``), the
observed masks, labels, and the films of the stays whose X-ray is shown. ``__getitem__`` then only
slices memory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset

from cbstore.errors import StoreError
from cbstore.preprocess import cxr_to_float, impute_and_normalise

if TYPE_CHECKING:  # pragma: no cover
    from cbstore.store import Store

COHORTS = ("full", "matched")


class StayDataset(Dataset):
    """Stays of ``part`` of ``fold`` usable for ``task``, as dicts of tensors.

    Parameters
    ----------
    store : Store
        An open store.
    task : {"mortality", "mortality_hosp", "phenotype", "los"}
    fold : int
    part : {"train", "val", "test"}
    cohort : {"full", "matched"}
        "full": every stay of the part eligible for the task; "matched": only stays whose film is
        in the store (``cxr/present``; ``cxr_drop`` does not shrink the cohort).
    with_images : bool
        Include the ``cxr`` tensor in items (films are then held in memory as uint8).
    cxr_drop : numpy.ndarray, optional
        bool [n_stays] over the whole store: stays whose film is hidden (missing-modality
        experiments). A hidden film gives a zero image and ``cxr_present`` false.

    Notes
    -----
    Item keys: ``index`` (position in the store), ``stay_id``, ``ehr`` float32 [T, F] (imputed and
    normalised), ``ehr_mask`` float32 [T, F] (1 = observed), ``cxr`` float32 [1, H, W] in
    [-1024, 1024] (zeros when absent or dropped; only with ``with_images``), ``cxr_present`` bool,
    ``label`` float32 [C] (mortality*: C = 1, phenotype: C = 25) or an int64 class (los).
    """

    def __init__(
        self,
        store: "Store",
        task: str,
        fold: int,
        part: str,
        *,
        cohort: str = "full",
        with_images: bool = True,
        cxr_drop: np.ndarray | None = None,
    ) -> None:
        if cohort not in COHORTS:
            raise StoreError(f"unknown cohort {cohort!r}; choose one of {list(COHORTS)}")
        positions = store.indices(fold, part)
        keep = store.task_mask(task)[positions]
        if cohort == "matched":
            keep &= store.cxr_present[positions]
        positions = positions[keep]
        if cxr_drop is None:
            drop = np.zeros(store.n_stays, dtype=bool)
        else:
            drop = np.asarray(cxr_drop)
            if drop.dtype != bool or drop.shape != (store.n_stays,):
                raise StoreError(
                    f"cxr_drop must be a bool mask of shape ({store.n_stays},) over all stays, "
                    f"got {drop.dtype} {drop.shape}"
                )

        self.task, self.fold, self.part, self.cohort = task, int(fold), part, cohort
        self.positions = positions
        self.stay_ids = store.stay_ids[positions]
        self.label_names = store.label_names(task)
        features = store.features
        ehr = impute_and_normalise(
            store.ehr_values(positions),
            store.fold_stats(fold),
            features["normalize"].to_numpy(dtype=bool),
            binary=(features["kind"] == "binary").to_numpy(),
        )
        self._ehr = torch.from_numpy(ehr)
        self._mask = torch.from_numpy(store.ehr_observed(positions).astype(np.float32))
        labels = store.labels(task)[positions]
        if task == "los":
            self._labels = torch.from_numpy(labels.astype(np.int64))
        else:
            self._labels = torch.from_numpy(labels.reshape(len(positions), -1).astype(np.float32))
        self.cxr_present = store.cxr_present[positions] & ~drop[positions]
        self.with_images = with_images
        self.image_size = store.image_size
        if with_images:
            shown = np.flatnonzero(self.cxr_present)
            self._films = store.images(positions[shown])  # uint8, only the films that are shown
            self._film_row = np.full(len(positions), -1, dtype=np.int64)
            self._film_row[shown] = np.arange(len(shown))

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for a dataset of {len(self)} stays")
        i = int(i) % len(self)
        item: dict[str, Any] = {
            "index": int(self.positions[i]),
            "stay_id": int(self.stay_ids[i]),
            "ehr": self._ehr[i],
            "ehr_mask": self._mask[i],
            "cxr_present": bool(self.cxr_present[i]),
            "label": self._labels[i],
        }
        if self.with_images:
            row = self._film_row[i]
            if row >= 0:
                item["cxr"] = torch.from_numpy(cxr_to_float(self._films[row])[None])
            else:
                item["cxr"] = torch.zeros((1, self.image_size, self.image_size), dtype=torch.float32)
        return item

    def __repr__(self) -> str:
        return (f"StayDataset(task={self.task!r}, fold={self.fold}, part={self.part!r}, cohort={self.cohort!r}, "
                f"n={len(self)}, cxr_shown={int(self.cxr_present.sum())})")
