"""torch views of the one read path (imports torch; load lazily).

* :func:`tensor_batch` -- rows of a :class:`cbstore.inputs.reader.StayInputs` as a dict of tensors;
* :class:`PartBatches` -- whole batches of a ``StayInputs`` (what the fusion trainer iterates);
* :class:`StayDataset` -- one stay per item, for plain ``DataLoader`` use
  (:meth:`cbstore.store.reader.Store.torch_dataset`).

Both read their stays through :class:`cbstore.inputs.reader.FoldReader` (its ``select`` is
:func:`cbstore.inputs.reader.select_stays`), so a stay gets the same EHR values (imputed and normalised with
the fold's *training* statistics), masks, labels and X-ray flags whichever view reads it.

Keys (a batch has a leading batch dimension; a :class:`StayDataset` item has none):

==============  =====================================================================
``y``           float32 ``[C]`` targets (binary: C = 1, phenotype: C = 25) or an int64 class
``cxr_present`` bool: the X-ray is available (natural presence minus a simulated mask)
``cxr_hours``   float32 hours from the film to the prediction time (NaN where not available)
``ehr``         float32 ``[T, F]`` imputed and normalised values (input ``ehr_ts``)
``ehr_mask``    float32 ``[T, F]``, 1 = observed (input ``ehr_ts``)
``cxr``         float32 ``[1, H, W]`` in ``[-1024, 1024]``, zeros where not available (``cxr_img``)
``ehr_emb``     float32 ``[d]`` cached embedding (``ehr_emb``)
``cxr_emb``     float32 ``[d]`` cached embedding, NaN where not available (``cxr_emb``)
``cxr_map``     float32 ``[C, h, w]`` stored spatial map, NaN where not available (``cxr_map``)
==============  =====================================================================

A :class:`StayDataset` item also has ``index`` (store position), ``stay_id`` and ``label``, a
documented alias of ``y`` kept for code written against the first release.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset

from cbstore.errors import StoreError
from cbstore.inputs.reader import FoldReader, StayInputs

if TYPE_CHECKING:  # pragma: no cover
    from cbstore.store.reader import Store

__all__ = ["COHORTS", "PartBatches", "StayDataset", "tensor_batch"]

#: Cohorts a :class:`StayDataset` takes (the cross cohorts only make sense for a whole fold).
COHORTS = ("full", "matched")


def tensor_batch(inputs: StayInputs, rows, kinds) -> dict:
    """Rows ``rows`` of ``inputs`` as a dict of tensors (see the module docstring for the keys).

    Parameters
    ----------
    inputs : StayInputs
    rows : array-like of int
        Rows of ``inputs`` (not store positions).
    kinds : iterable of str
        Input kinds to include (``ehr_ts``, ``cxr_img``, ``ehr_emb``, ``cxr_emb``, ``cxr_map``); ``y`` (when
        the inputs have targets), ``cxr_present`` and ``cxr_hours`` are always included.
    """
    rows = np.asarray(rows, dtype=np.int64)
    kinds = frozenset(kinds)
    batch = {"cxr_present": torch.from_numpy(inputs.cxr_present[rows].copy())}
    if inputs.y is not None:
        batch["y"] = torch.from_numpy(np.ascontiguousarray(inputs.y[rows]))
    if inputs.cxr_hours is not None:
        batch["cxr_hours"] = torch.from_numpy(np.ascontiguousarray(inputs.cxr_hours[rows]))
    if "ehr_ts" in kinds:
        batch["ehr"] = torch.from_numpy(np.ascontiguousarray(inputs.ehr[rows]))
        batch["ehr_mask"] = torch.from_numpy(np.ascontiguousarray(inputs.ehr_mask[rows]))
    if "cxr_img" in kinds:
        batch["cxr"] = torch.from_numpy(inputs.images(rows))
    for kind in ("ehr_emb", "cxr_emb", "cxr_map"):  # NaN kept: methods read cxr_present
        if kind in kinds:
            values = getattr(inputs, kind)[rows]
            batch[kind] = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
    return batch


class PartBatches(Dataset):
    """Batches of a :class:`cbstore.inputs.reader.StayInputs` (a fusion part) as dicts of tensors.

    Indexing with a list of rows returns one batch (used with ``DataLoader(batch_size=None)``).

    Parameters
    ----------
    part : StayInputs
    inputs : iterable of str
        Input kinds to put in the batch (``ehr_ts``, ``cxr_img``, ``ehr_emb``, ``cxr_emb``).
    rows : array-like of int, optional
        Rows of the part to use (default all), e.g. only the stays with an X-ray.
    """

    def __init__(self, part: StayInputs, inputs, rows=None):
        self.part = part
        self.inputs = frozenset(inputs)
        self.rows = np.arange(len(part)) if rows is None else np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def __getitem__(self, batch_rows) -> dict:
        return tensor_batch(self.part, self.rows[np.asarray(batch_rows, dtype=np.int64)], self.inputs)


class _FilmsInMemory:
    """An image loader over films read once: ``loader(store_positions) -> uint8 [k, H, W]``."""

    def __init__(self, positions: np.ndarray, films: np.ndarray):
        self._row = {int(p): i for i, p in enumerate(positions)}
        self._films = films

    def __call__(self, positions) -> np.ndarray:
        return self._films[[self._row[int(p)] for p in np.asarray(positions).reshape(-1)]]


class StayDataset(Dataset):
    """Stays of ``part`` of ``fold`` usable for ``task``, one dict of tensors per stay.

    Parameters
    ----------
    store : Store
        An open store.
    task : {"mortality", "mortality_hosp", "phenotype", "los"}
    fold : int
    part : {"train", "val", "test"}
    cohort : {"full", "matched"}
        "full": every stay of the part with a usable label; "matched": only stays whose film is
        in the store (``cxr/present``; ``cxr_drop`` does not shrink the cohort).
    with_images : bool
        Include the ``cxr`` tensor in items (the shown films are then held in memory as uint8).
    cxr_drop : numpy.ndarray, optional
        bool [n_stays] over the whole store: stays whose film is hidden (missing-modality
        experiments). A hidden film gives a zero image and ``cxr_present`` false.

    Notes
    -----
    Item keys: see the module docstring (``index``, ``stay_id``, ``y`` and its alias ``label``,
    ``cxr_present``, ``cxr_hours``, ``ehr``, ``ehr_mask``, and ``cxr`` with ``with_images``).
    Everything is read at construction, through :class:`cbstore.inputs.reader.FoldReader`;
    ``__getitem__`` only slices memory.
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
        if cxr_drop is None:
            drop = np.zeros(store.n_stays, dtype=bool)
        else:
            drop = np.asarray(cxr_drop)
            if drop.dtype != bool or drop.shape != (store.n_stays,):
                raise StoreError(
                    f"cxr_drop must be a bool mask of shape ({store.n_stays},) over all stays, "
                    f"got {drop.dtype} {drop.shape}"
                )
        self.with_images = with_images
        kinds = {"ehr_ts", "cxr_img"} if with_images else {"ehr_ts"}
        reader = FoldReader(store, fold, task=task, inputs=kinds)
        positions = reader.select(part, cohort)
        self._inputs = reader.read(positions, name=part, cxr_hidden=drop[positions])
        self._kinds = frozenset(kinds)
        self.task, self.fold, self.part, self.cohort = task, reader.fold, part, cohort
        self.positions = positions
        self.stay_ids = self._inputs.stay_id
        self.label_names = reader.label_names
        self.cxr_present = self._inputs.cxr_present
        self.image_size = store.image_size
        if with_images:
            shown = positions[self.cxr_present]
            self._inputs.image_loader = _FilmsInMemory(shown, store.images(shown))

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for a dataset of {len(self)} stays")
        i = int(i) % len(self)
        item: dict[str, Any] = {k: v[0] for k, v in tensor_batch(self._inputs, [i], self._kinds).items()}
        item["cxr_present"] = bool(item["cxr_present"])
        item["label"] = item["y"]
        item["index"] = int(self.positions[i])
        item["stay_id"] = int(self.stay_ids[i])
        return item

    def __repr__(self) -> str:
        return (f"StayDataset(task={self.task!r}, fold={self.fold}, part={self.part!r}, cohort={self.cohort!r}, "
                f"n={len(self)}, cxr_shown={int(self.cxr_present.sum())})")
