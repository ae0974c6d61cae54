"""Assemble one task / fold / cohort / feature mode of a store into arrays for the fusion methods.

:func:`load_fusion_data` returns a :class:`FusionData` with one :class:`FusionPart` per part
(train, val, test). It selects the stays and reads them through cbstore's one read path
(:func:`cbstore.inputs.reader.select_stays`, :class:`cbstore.inputs.reader.FoldReader`), the same code the torch
Dataset adaptor and the EHR encoders use. Every method sees the same stays, labels and masks; only
the inputs differ with the feature mode:

* ``cached``: ``ehr_emb`` ``[n, d]`` and ``cxr_emb`` ``[n, d]`` (NaN rows where the X-ray is absent),
  read from ``embeddings/<modality>/<encoder-id>`` (per-fold encoders: this fold), and for the
  methods that ask for it ``cxr_map`` ``[n, C, h, w]``, a stored spatial map (NaN where absent),
  and ``ehr``/``ehr_mask`` (input ``ehr_ts``, as in raw mode) for the methods that fuse along the
  hours: no film is decoded or run through a frozen network in cached mode.
* ``raw``: ``ehr`` ``[n, T, F]`` imputed and normalised with this fold's training statistics,
  ``ehr_mask`` ``[n, T, F]`` (1 = observed), and X-ray images read batch by batch as float
  ``[k, 1, H, W]`` in the torchxrayvision range ``[-1024, 1024]`` (zeros where absent).

Cohorts: ``full`` (every stay with a label for the task), ``matched`` (only stays with a natural
X-ray), and the cross settings ``matched_to_full`` / ``full_to_matched`` (train and val from the
first cohort, test from the second). Simulated missingness (:mod:`cbstore.inputs.masks`) is applied on
top, on the parts listed in ``missing_at``; a masked stay keeps its place in the cohort but loses
its X-ray (``cxr_present`` False, ``cxr_masked`` True, NaN embedding, zero image).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from cbstore.errors import InputsError, UnknownTaskError
from cbstore.format.tasks import TaskSpec, get_task
from cbstore.inputs.masks import apply_cxr_mask
from cbstore.inputs.reader import (
    COHORTS, PARTS, FoldReader, StayInputs, available_encoders, cohort_of_part,
)
from cbstore.inputs.reader import resolve_encoder as _resolve_encoder
from fusion.registry import FEATURE_MODES, FusionError

__all__ = ["FusionData", "FusionDataError", "FusionPart", "available_encoders", "cohort_of_part",
           "load_fusion_data", "resolve_encoder"]

#: Inputs loaded per feature mode when the caller does not say which.
#: Cached mode also offers the hourly EHR tensor (small, no image is read), which cached-mode
#: methods that fuse along time (``mmtm``, ``utde``) read.
DEFAULT_INPUTS = {"cached": frozenset({"ehr_emb", "cxr_emb", "ehr_ts"}),
                  "raw": frozenset({"ehr_ts", "cxr_img"})}


class FusionDataError(FusionError, InputsError):
    """The store cannot provide what a run asks for (labels, encoders, parts, inputs)."""


#: The stays of one part and their inputs: :class:`cbstore.inputs.reader.StayInputs` (``name`` is the
#: part: ``train``, ``val`` or ``test``; ``y`` is always set).
FusionPart = StayInputs


def resolve_encoder(store, modality: str, encoder_id: str | None, kind: str | None = None) -> dict:
    """:func:`cbstore.inputs.reader.resolve_encoder`, raising :class:`FusionDataError`."""
    try:
        return _resolve_encoder(store, modality, encoder_id, kind)
    except InputsError as exc:
        raise FusionDataError(str(exc)) from None


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
    ehr_encoder, cxr_encoder, cxr_map_encoder : str or None
        Embedding ids used (cached mode).
    cxr_missing_rate : float
    missing_at : tuple of str
    mask_seed : int
    parts : dict of str to FusionPart
    n_features, window_hours, image_size : int
        Raw-input shapes (``n_features``/``window_hours`` also in cached mode).
    ehr_dim, cxr_dim : int or None
        Embedding sizes (cached mode).
    cxr_map_shape : tuple of int or None
        ``(C, h, w)`` of the stored spatial maps (input ``cxr_map``).
    cxr_map_attrs : dict or None
        Provenance of the spatial-map embedding (encoder name, weights, seed, stage), from which
        a method rebuilds the stages that follow the map.
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
    cxr_map_shape: tuple | None = None
    cxr_map_attrs: dict | None = None
    cxr_map_encoder: str | None = None

    @property
    def n_outputs(self) -> int:
        """Number of model outputs C (1 for binary tasks, 25 phenotypes, 7 LoS classes)."""
        return len(self.label_names)

    @property
    def task_spec(self) -> TaskSpec:
        """The :class:`cbstore.format.tasks.TaskSpec` of :attr:`task`."""
        return get_task(self.task)

    @property
    def multiclass(self) -> bool:
        """True for a multiclass task (LoS: softmax over classes), False for sigmoid tasks."""
        return self.task_spec.multiclass

    def part(self, name: str) -> FusionPart:
        """The part ``name``; :class:`FusionDataError` if it was not loaded."""
        try:
            return self.parts[name]
        except KeyError:
            raise FusionDataError(f"part {name!r} not loaded; loaded parts: "
                                  f"{', '.join(self.parts)}") from None


def load_fusion_data(store, task: str, fold: int, *, cohort: str = "full",
                     features: str = "cached", inputs=None, ehr_encoder: str | None = None,
                     cxr_encoder: str | None = None, cxr_missing_rate: float = 0.0,
                     missing_at=PARTS, mask_seed: int = 0, parts=PARTS,
                     cxr_map_encoder: str | None = None) -> FusionData:
    """Read one task / fold / cohort / feature mode from ``store``.

    Parameters
    ----------
    store : cbstore.store.reader.Store
        An open store.
    task : str
        One of :data:`cbstore.format.tasks.TASKS`.
    fold : int
        Fold of the store's splits.
    cohort : str
        One of :data:`fusion.config.COHORTS`.
    features : str
        ``cached`` or ``raw``.
    inputs : iterable of str, optional
        Input kinds to load (a method's ``inputs_for(features)``); default: what the mode offers
        (cached: ``ehr_emb``, ``cxr_emb``, ``ehr_ts``; raw: ``ehr_ts``, ``cxr_img``), and in cached
        mode also ``cxr_map`` when the store holds a spatial-map
        embedding (and ``cxr_map_encoder`` is None or one of them).
    ehr_encoder, cxr_encoder : str, optional
        Embedding ids (cached mode); None picks the only one the store holds.
    cxr_map_encoder : str, optional
        Spatial-map embedding id (input ``cxr_map``); None picks the only one.
    cxr_missing_rate : float
        Fraction of X-rays hidden by :func:`cbstore.inputs.masks.cxr_drop_mask`.
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
    try:
        return _load(store, task, fold, cohort=cohort, features=features, inputs=inputs,
                     ehr_encoder=ehr_encoder, cxr_encoder=cxr_encoder,
                     cxr_missing_rate=cxr_missing_rate, missing_at=missing_at,
                     mask_seed=mask_seed, parts=parts, cxr_map_encoder=cxr_map_encoder)
    except (InputsError, UnknownTaskError) as exc:
        if isinstance(exc, FusionDataError):
            raise
        raise FusionDataError(str(exc)) from None


def _load(store, task, fold, *, cohort, features, inputs, ehr_encoder, cxr_encoder,
          cxr_missing_rate, missing_at, mask_seed, parts, cxr_map_encoder) -> FusionData:
    spec = get_task(task)
    if cohort not in COHORTS:
        raise FusionDataError(f"unknown cohort {cohort!r}; valid cohorts: {', '.join(COHORTS)}")
    if features not in FEATURE_MODES:
        raise FusionDataError(f"unknown feature mode {features!r}; valid: {', '.join(FEATURE_MODES)}")
    if inputs is None:
        inputs = DEFAULT_INPUTS[features]
        maps = available_encoders(store, "cxr", "cxr_map") if features == "cached" else []
        if maps and (cxr_map_encoder is None or cxr_map_encoder in maps):
            inputs = inputs | {"cxr_map"}
    inputs = frozenset(inputs)
    reader = FoldReader(store, fold, task=spec, inputs=inputs, ehr_encoder=ehr_encoder,
                        cxr_encoder=cxr_encoder, cxr_map_encoder=cxr_map_encoder)
    if not reader.usable.any():
        raise FusionDataError(f"store {store.path} has no stay with a label for task {task!r}")
    natural = np.asarray(store.cxr_present, dtype=bool)
    stay_ids = np.asarray(store.stay_ids, dtype=np.int64)
    missing_at = tuple(missing_at)
    loaded = {}
    for part in parts:
        idx = reader.select(part, cohort)
        if idx.size == 0:
            raise FusionDataError(
                f"store {store.path}: fold {reader.fold} part {part!r} has no stay for task "
                f"{task!r} in cohort {cohort_of_part(cohort, part)!r}")
        hidden = None
        if part in missing_at and cxr_missing_rate > 0:
            _, hidden = apply_cxr_mask(natural[idx], stay_ids[idx], cxr_missing_rate, mask_seed)
        loaded[part] = reader.read(idx, name=part, cxr_hidden=hidden)

    return FusionData(
        task=spec.name, fold=reader.fold, cohort=cohort, features=features, inputs=inputs,
        label_names=reader.label_names, ehr_encoder=reader.ehr_encoder,
        cxr_encoder=reader.cxr_encoder, cxr_missing_rate=float(cxr_missing_rate),
        missing_at=missing_at, mask_seed=int(mask_seed), parts=loaded,
        n_features=int(len(store.features)), window_hours=int(store.window_hours),
        image_size=int(store.image_size), ehr_dim=reader.ehr_dim, cxr_dim=reader.cxr_dim,
        cxr_map_shape=reader.cxr_map_shape, cxr_map_attrs=reader.cxr_map_attrs,
        cxr_map_encoder=reader.cxr_map_encoder)
