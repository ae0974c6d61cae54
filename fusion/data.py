"""Assemble one task / fold / cohort / feature mode of a store into arrays for the fusion methods.

:func:`load_fusion_data` reads what a method needs from a :class:`cbstore.store.Store` and returns a
:class:`FusionData` with one :class:`FusionPart` per part (train, val, test). Every method sees the
same stays, labels and masks; only the inputs differ with the feature mode:

* ``cached``: ``ehr_emb`` ``[n, d]`` and ``cxr_emb`` ``[n, d]`` (NaN rows where the X-ray is absent),
  read from ``embeddings/<modality>/<encoder-id>`` (per-fold encoders: this fold).
* ``raw``: ``ehr`` ``[n, T, F]`` imputed and normalised with this fold's training statistics,
  ``ehr_mask`` ``[n, T, F]`` (1 = observed), and X-ray images read batch by batch as float
  ``[k, 1, H, W]`` in the torchxrayvision range ``[-1024, 1024]`` (zeros where absent).

Cohorts: ``full`` (every stay with a label for the task), ``matched`` (only stays with a natural
X-ray), and the cross settings ``matched_to_full`` / ``full_to_matched`` (train and val from the
first cohort, test from the second). Simulated missingness (:mod:`cbstore.masks`) is applied on
top, on the parts listed in ``missing_at``; a masked stay keeps its place in the cohort but loses
its X-ray (``cxr_present`` False, ``cxr_masked`` True, NaN embedding, zero image).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from cbstore.errors import StoreError
from cbstore.masks import apply_cxr_mask
from cbstore.preprocess import cxr_to_float, impute_and_normalise
from fusion.config import COHORTS, PARTS
from fusion.registry import FEATURE_MODES, INPUT_KINDS, TASKS, FusionError

__all__ = ["FusionData", "FusionDataError", "FusionPart", "available_encoders", "cohort_of_part",
           "load_fusion_data", "resolve_encoder"]

#: Inputs loaded per feature mode when the caller does not say which.
DEFAULT_INPUTS = {"cached": frozenset({"ehr_emb", "cxr_emb"}), "raw": frozenset({"ehr_ts", "cxr_img"})}


class FusionDataError(FusionError, ValueError):
    """The store cannot provide what a run asks for (labels, encoders, parts, inputs)."""


@dataclasses.dataclass
class FusionPart:
    """The stays of one part (train, val or test) and their inputs.

    Attributes
    ----------
    name : str
        ``train``, ``val`` or ``test``.
    index : numpy.ndarray
        int64 store positions, ascending.
    stay_id : numpy.ndarray
        int64 stay ids.
    y : numpy.ndarray
        Labels: float32 ``[n, C]`` for binary (C=1) and multi-label tasks, int64 ``[n]`` for LoS.
    cxr_present : numpy.ndarray
        bool ``[n]``: the X-ray is available to the method (natural presence minus masks).
    cxr_masked : numpy.ndarray
        bool ``[n]``: the stay has an X-ray that the simulated mask hides.
    ehr_emb, cxr_emb : numpy.ndarray or None
        float32 ``[n, d]`` cached embeddings (cached mode); ``cxr_emb`` rows are NaN where the
        X-ray is not available.
    ehr, ehr_mask : numpy.ndarray or None
        float32 ``[n, T, F]`` imputed + normalised EHR and its observation mask (raw mode).
    image_loader : callable or None
        ``image_loader(store_positions) -> uint8 [k, H, W]`` (raw mode with images).
    image_size : int
        Side of the stored images.
    """

    name: str
    index: np.ndarray
    stay_id: np.ndarray
    y: np.ndarray
    cxr_present: np.ndarray
    cxr_masked: np.ndarray
    ehr_emb: np.ndarray | None = None
    cxr_emb: np.ndarray | None = None
    ehr: np.ndarray | None = None
    ehr_mask: np.ndarray | None = None
    image_loader: Callable | None = dataclasses.field(default=None, repr=False)
    image_size: int = 0

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def images(self, rows) -> np.ndarray:
        """float32 ``[k, 1, H, W]`` images of part rows ``rows`` (zeros where not available).

        Raises
        ------
        FusionDataError
            If the part was loaded without images.
        """
        if self.image_loader is None:
            raise FusionDataError(f"part {self.name!r} was loaded without X-ray images "
                                  "(features 'raw' with input 'cxr_img' loads them)")
        rows = np.asarray(rows, dtype=np.int64)
        shown = self.cxr_present[rows]  # absent or masked films are never read
        out = np.zeros((rows.size, 1, self.image_size, self.image_size), dtype=np.float32)
        if shown.any():
            out[shown, 0] = cxr_to_float(self.image_loader(self.index[rows[shown]]))
        return out


@dataclasses.dataclass
class FusionData:
    """One task / fold / cohort / feature mode of a store, split into parts.

    Attributes
    ----------
    task : str
    fold : int
    cohort : str
    features : str
        ``cached`` or ``raw``.
    inputs : frozenset
        Input kinds loaded.
    label_names : list of str
        Output names: the label (binary), the 25 phenotypes, or the 7 LoS classes.
    ehr_encoder, cxr_encoder : str or None
        Embedding ids used (cached mode).
    cxr_missing_rate : float
    missing_at : tuple of str
    mask_seed : int
    parts : dict of str to FusionPart
    n_features, window_hours, image_size : int
        Raw-input shapes (``n_features``/``window_hours`` also in cached mode).
    ehr_dim, cxr_dim : int or None
        Embedding sizes (cached mode).
    """

    task: str
    fold: int
    cohort: str
    features: str
    inputs: frozenset
    label_names: list
    ehr_encoder: str | None
    cxr_encoder: str | None
    cxr_missing_rate: float
    missing_at: tuple
    mask_seed: int
    parts: dict
    n_features: int
    window_hours: int
    image_size: int
    ehr_dim: int | None = None
    cxr_dim: int | None = None

    @property
    def n_outputs(self) -> int:
        """Number of model outputs C (1 for binary tasks, 25 phenotypes, 7 LoS classes)."""
        return len(self.label_names)

    @property
    def multiclass(self) -> bool:
        """True for LoS (softmax over classes), False for sigmoid tasks."""
        return self.task == "los"

    def part(self, name: str) -> FusionPart:
        """The part ``name``; :class:`FusionDataError` if it was not loaded."""
        try:
            return self.parts[name]
        except KeyError:
            raise FusionDataError(f"part {name!r} not loaded; loaded parts: "
                                  f"{', '.join(self.parts)}") from None


def cohort_of_part(cohort: str, part: str) -> str:
    """``full`` or ``matched``: the cohort the stays of ``part`` are drawn from."""
    if cohort in ("full", "matched"):
        return cohort
    first, second = cohort.split("_to_")
    return second if part == "test" else first


def available_encoders(store, modality: str) -> list[str]:
    """Ids of the complete embeddings of ``modality`` in ``store``."""
    return [e["encoder_id"] for e in store.embeddings() if e["modality"] == modality]


def resolve_encoder(store, modality: str, encoder_id: str | None) -> dict:
    """The embedding description (``store.embeddings()`` entry) to use for ``modality``.

    Parameters
    ----------
    store : cbstore.store.Store
    modality : str
        ``ehr`` or ``cxr``.
    encoder_id : str or None
        None picks the only embedding of the modality.

    Raises
    ------
    FusionDataError
        If the embedding is absent, or ``encoder_id`` is None and there is not exactly one; the
        message lists the available ids and how to add one.
    """
    entries = {e["encoder_id"]: e for e in store.embeddings() if e["modality"] == modality}
    have = ", ".join(sorted(entries)) or "none"
    option = f"--{modality}-encoder"
    if encoder_id is None:
        if len(entries) == 1:
            return next(iter(entries.values()))
        if not entries:
            raise FusionDataError(
                f"store {store.path} holds no complete {modality} embedding; run `cbstore encode` "
                f"for a {modality} encoder, or use --features raw")
        raise FusionDataError(f"store {store.path} holds several {modality} embeddings ({have}); "
                              f"choose one with {option}")
    if encoder_id not in entries:
        raise FusionDataError(f"unknown {modality} encoder {encoder_id!r} ({option}): store "
                              f"{store.path} has {modality} embeddings: {have}")
    return entries[encoder_id]


def _labels(store, task: str) -> tuple[np.ndarray, np.ndarray, list]:
    """(labels as model targets, usable mask, label names); FusionDataError when unavailable."""
    try:
        raw = np.asarray(store.labels(task))
        usable = np.asarray(store.task_mask(task), dtype=bool)
        names = list(store.label_names(task))
    except (StoreError, KeyError) as exc:
        raise FusionDataError(f"store {store.path} has no labels for task {task!r}: {exc}") from exc
    if task == "los":
        y = raw.astype(np.int64)
        usable &= (y >= 0) & (y < len(names))
    else:
        y = raw.astype(np.float32).reshape(raw.shape[0], -1)
        usable &= np.all((raw.reshape(raw.shape[0], -1) == 0) | (raw.reshape(raw.shape[0], -1) == 1),
                         axis=1)
        if y.shape[1] != len(names):
            raise FusionDataError(f"store {store.path}: task {task!r} has {y.shape[1]} label "
                                  f"column(s) but {len(names)} label name(s)")
    if not usable.any():
        raise FusionDataError(f"store {store.path} has no stay with a label for task {task!r}")
    return y, usable, names


def load_fusion_data(store, task: str, fold: int, *, cohort: str = "full",
                     features: str = "cached", inputs=None, ehr_encoder: str | None = None,
                     cxr_encoder: str | None = None, cxr_missing_rate: float = 0.0,
                     missing_at=PARTS, mask_seed: int = 0, parts=PARTS) -> FusionData:
    """Read one task / fold / cohort / feature mode from ``store``.

    Parameters
    ----------
    store : cbstore.store.Store
        An open store.
    task : str
        One of :data:`fusion.registry.TASKS`.
    fold : int
        Fold of the store's splits.
    cohort : str
        One of :data:`fusion.config.COHORTS`.
    features : str
        ``cached`` or ``raw``.
    inputs : iterable of str, optional
        Input kinds to load (a method's ``inputs_for(features)``); default: both modalities of
        the mode.
    ehr_encoder, cxr_encoder : str, optional
        Embedding ids (cached mode); None picks the only one the store holds.
    cxr_missing_rate : float
        Fraction of X-rays hidden by :func:`cbstore.masks.cxr_drop_mask`.
    missing_at : iterable of str
        Parts the mask applies to.
    mask_seed : int
        Seed of the mask.
    parts : iterable of str
        Parts to load.

    Returns
    -------
    FusionData

    Raises
    ------
    FusionDataError
        Unknown task/cohort/feature mode/input, no labels for the task, an empty part, or an
        embedding missing from the store (the message lists the available ones).
    """
    if task not in TASKS:
        raise FusionDataError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    if cohort not in COHORTS:
        raise FusionDataError(f"unknown cohort {cohort!r}; valid cohorts: {', '.join(COHORTS)}")
    if features not in FEATURE_MODES:
        raise FusionDataError(f"unknown feature mode {features!r}; valid: {', '.join(FEATURE_MODES)}")
    inputs = DEFAULT_INPUTS[features] if inputs is None else frozenset(inputs)
    bad = inputs - INPUT_KINDS
    if bad:
        raise FusionDataError(f"unknown input kind(s) {sorted(bad)}; valid: {sorted(INPUT_KINDS)}")
    try:
        fold = int(fold)
        n_folds = store.n_folds
    except (TypeError, ValueError):
        raise FusionDataError(f"fold must be an integer, got {fold!r}") from None
    if not 0 <= fold < n_folds:
        raise FusionDataError(f"fold {fold} out of range: store {store.path} has folds "
                              f"0..{n_folds - 1}")

    y_all, usable, names = _labels(store, task)
    natural = np.asarray(store.cxr_present, dtype=bool)
    stay_ids = np.asarray(store.stay_ids, dtype=np.int64)

    emb = {}
    dims = {}
    encoders = {"ehr": None, "cxr": None}
    for modality, given in (("ehr", ehr_encoder), ("cxr", cxr_encoder)):
        if f"{modality}_emb" not in inputs:
            continue
        entry = resolve_encoder(store, modality, given)
        encoders[modality] = entry["encoder_id"]
        values, present = store.embedding(modality, entry["encoder_id"], fold)
        emb[modality] = (np.asarray(values, dtype=np.float32), np.asarray(present, dtype=bool))
        dims[modality] = int(values.shape[1])

    ehr_all = mask_all = None
    image_loader = None
    if "ehr_ts" in inputs:
        stats = store.fold_stats(fold)
        normalize = store.features["normalize"].to_numpy(dtype=bool)
        binary = (store.features["kind"] == "binary").to_numpy()
    if "cxr_img" in inputs:
        image_loader = store.images

    missing_at = tuple(missing_at)
    loaded = {}
    for part in parts:
        idx = np.asarray(store.indices(fold, part), dtype=np.int64)
        idx = idx[usable[idx]]
        if cohort_of_part(cohort, part) == "matched":
            idx = idx[natural[idx]]
        if idx.size == 0:
            raise FusionDataError(
                f"store {store.path}: fold {fold} part {part!r} has no stay for task {task!r} in "
                f"cohort {cohort_of_part(cohort, part)!r}")
        present = natural[idx].copy()
        masked = np.zeros(idx.size, dtype=bool)
        if part in missing_at and cxr_missing_rate > 0:
            present, masked = apply_cxr_mask(present, stay_ids[idx], cxr_missing_rate, mask_seed)
        item = FusionPart(name=part, index=idx, stay_id=stay_ids[idx], y=y_all[idx],
                          cxr_present=present, cxr_masked=masked, image_loader=image_loader,
                          image_size=int(store.image_size))
        if "ehr" in emb:
            item.ehr_emb = emb["ehr"][0][idx]
        if "cxr" in emb:
            values, emb_present = emb["cxr"]
            keep = present & emb_present[idx]
            if np.any(present & ~emb_present[idx]):
                # an X-ray the encoder could not embed counts as absent for this run
                item.cxr_present = keep
            cxr = values[idx].copy()
            cxr[~keep] = np.nan
            item.cxr_emb = cxr
        if "ehr_ts" in inputs:
            raw = store.ehr_values(idx)
            item.ehr = impute_and_normalise(raw, stats, normalize, binary).astype(np.float32, copy=False)
            item.ehr_mask = np.asarray(store.ehr_observed(idx), dtype=np.float32)
        loaded[part] = item

    return FusionData(
        task=task, fold=fold, cohort=cohort, features=features, inputs=inputs, label_names=names,
        ehr_encoder=encoders["ehr"], cxr_encoder=encoders["cxr"],
        cxr_missing_rate=float(cxr_missing_rate), missing_at=missing_at, mask_seed=int(mask_seed),
        parts=loaded, n_features=int(len(store.features)), window_hours=int(store.window_hours),
        image_size=int(store.image_size), ehr_dim=dims.get("ehr"), cxr_dim=dims.get("cxr"))
