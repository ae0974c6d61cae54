"""The one read path: a method's inputs for given stays of one fold.

Every consumer of a store's model inputs reads them here: the fusion data loader
(:func:`fusion.data.load_fusion_data`) and its batches, the torch Dataset adaptor
(:class:`cbstore.inputs.dataset.StayDataset`, :meth:`cbstore.store.reader.Store.torch_dataset`) and the EHR
encoders of ``cbstore encode``. So EHR preprocessing, X-ray flags and labels are assembled once:

* :func:`select_stays` -- the stays of a part of a fold that a task and a cohort use;
* :func:`read_inputs` (or, to read several sets of stays of one fold, a :class:`FoldReader`) --
  a :class:`StayInputs` for given store positions:

  - ``y``: the task's targets (:meth:`cbstore.format.tasks.TaskSpec.targets`);
  - ``cxr_present`` (the X-ray is available: natural presence minus ``cxr_hidden``),
    ``cxr_masked`` (present but hidden), ``cxr_hours`` (hours from the film to the prediction
    time, NaN where not available);
  - ``ehr`` ``[k, T, F]``: values imputed and normalised with the fold's *training* statistics
    (:class:`EhrPreprocessor`) and ``ehr_mask`` ``[k, T, F]`` (1 = observed);
  - ``ehr_emb`` / ``cxr_emb`` ``[k, d]``: cached embeddings (this fold's for per-fold encoders;
    ``cxr_emb`` rows NaN where the X-ray is not available);
  - ``cxr_map`` ``[k, C, h, w]``: a frozen backbone's stored intermediate spatial map (float32,
    from the float16 ``map`` array of a spatial-map embedding such as
    ``densenet121-res224-all-block3``), NaN where the X-ray is not available;
  - images, read on demand by :meth:`StayInputs.images` as float32 in ``[-1024, 1024]``.

Input kinds (:data:`INPUT_KINDS`): ``ehr_ts`` (``ehr``, ``ehr_mask``), ``cxr_img`` (images),
``ehr_emb``, ``cxr_emb``, ``cxr_map``. Nothing here imports torch.

A missing embedding is an :class:`~cbstore.errors.InputsError` whose message holds the
``cbstore encode STORE --encoder NAME`` command that adds it (:func:`encode_command`).

Examples
--------
>>> from cbstore import open_store
>>> store = open_store("STORE.zarr")                                      # doctest: +SKIP
>>> rows = select_stays(store, "mortality", 0, "train")                   # doctest: +SKIP
>>> x = read_inputs(store, 0, rows, task="mortality", inputs={"ehr_ts"})  # doctest: +SKIP
>>> x.ehr.shape, x.y.shape                                                # doctest: +SKIP
((n, 48, F), (n, 1))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import numpy as np

from cbstore.errors import EmbeddingError, InputsError, StoreError
from cbstore.format.tasks import get_task
from cbstore.inputs.preprocess import cxr_to_float, impute_and_normalise

__all__ = ["COHORTS", "EMBEDDING_KINDS", "INPUT_KINDS", "PARTS", "EhrPreprocessor", "FoldReader",
           "StayInputs", "available_encoders", "cohort_of_part", "encode_command", "read_inputs",
           "resolve_encoder", "select_stays"]

#: Input kinds: raw EHR time series, raw X-ray image, cached EHR / X-ray embeddings, cached X-ray
#: spatial maps.
INPUT_KINDS = frozenset({"ehr_ts", "cxr_img", "ehr_emb", "cxr_emb", "cxr_map"})
#: Embedding input kind -> (modality, encoder suggested when the store holds none).
EMBEDDING_KINDS = {"ehr_emb": ("ehr", "ehr-stats"),
                   "cxr_emb": ("cxr", "densenet121-res224-all"),
                   "cxr_map": ("cxr", "densenet121-res224-all-block3")}
#: Cohorts: all stays, stays with an X-ray, or train/val from one and test from the other.
COHORTS = ("full", "matched", "matched_to_full", "full_to_matched")
#: Parts of a fold.
PARTS = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class EhrPreprocessor:
    """Imputation and normalisation of raw hourly EHR values with one fold's training statistics.

    Attributes
    ----------
    stats : dict
        The fold's training statistics (:meth:`cbstore.store.reader.Store.fold_stats`).
    normalize : numpy.ndarray
        bool ``[F]``: features scaled to ``(x - median) / scale`` (``ehr/normalize``).
    binary : numpy.ndarray or None
        bool ``[F]``: binary features (``ehr/kind == "binary"``; default: not ``normalize``).
    """

    stats: dict
    normalize: np.ndarray
    binary: np.ndarray | None = None

    @classmethod
    def from_store(cls, store, fold: int) -> "EhrPreprocessor":
        """The preprocessor of ``fold`` of ``store`` (statistics from its training part only)."""
        features = store.features
        return cls(store.fold_stats(fold), features["normalize"].to_numpy(dtype=bool),
                   (features["kind"] == "binary").to_numpy())

    def __call__(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Model inputs of raw values.

        Parameters
        ----------
        raw : numpy.ndarray
            float ``[k, T, F]`` raw values, NaN where not observed.

        Returns
        -------
        values : numpy.ndarray
            float32 ``[k, T, F]`` without NaN (:func:`cbstore.inputs.preprocess.impute_and_normalise`).
        mask : numpy.ndarray
            float32 ``[k, T, F]``, 1 where a value was observed (the store guarantees
            ``ehr/observed`` is exactly the non-NaN entries of ``ehr/values``).
        """
        raw = np.asarray(raw, dtype=np.float32)
        values = impute_and_normalise(raw, self.stats, self.normalize, self.binary)
        return values.astype(np.float32, copy=False), (~np.isnan(raw)).astype(np.float32)


@dataclasses.dataclass(kw_only=True)
class StayInputs:
    """The inputs of some stays of one fold (see the module docstring).

    Attributes
    ----------
    index : numpy.ndarray
        int64 store positions.
    stay_id : numpy.ndarray
        int64 stay ids.
    cxr_present : numpy.ndarray
        bool ``[n]``: the X-ray is available to the method (natural presence minus masks).
    cxr_masked : numpy.ndarray
        bool ``[n]``: the stay has an X-ray that a simulated mask hides.
    name : str
        Part name (``train``, ``val``, ``test``) or empty.
    y : numpy.ndarray or None
        Targets of the task read (None without a task): float32 ``[n, C]`` or int64 ``[n]``.
    cxr_hours : numpy.ndarray or None
        float32 ``[n]`` hours from the film to the prediction time, NaN where not available.
    ehr, ehr_mask : numpy.ndarray or None
        float32 ``[n, T, F]`` imputed + normalised EHR and its observation mask (``ehr_ts``).
    ehr_emb, cxr_emb : numpy.ndarray or None
        float32 ``[n, d]`` cached embeddings (``ehr_emb`` / ``cxr_emb``).
    cxr_map : numpy.ndarray or None
        float32 ``[n, C, h, w]`` stored spatial maps (``cxr_map``), NaN where the X-ray is not
        available (absent, hidden by a mask, or not embedded).
    image_loader : callable or None
        ``image_loader(store_positions) -> uint8 [k, H, W]`` (``cxr_img``).
    image_size : int
        Side of the stored images.
    """

    index: np.ndarray
    stay_id: np.ndarray
    cxr_present: np.ndarray
    cxr_masked: np.ndarray
    name: str = ""
    y: np.ndarray | None = None
    cxr_hours: np.ndarray | None = None
    ehr_emb: np.ndarray | None = None
    cxr_emb: np.ndarray | None = None
    cxr_map: np.ndarray | None = None
    ehr: np.ndarray | None = None
    ehr_mask: np.ndarray | None = None
    image_loader: Callable | None = dataclasses.field(default=None, repr=False)
    image_size: int = 0

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def images(self, rows) -> np.ndarray:
        """float32 ``[k, 1, H, W]`` images of rows ``rows`` (zeros where not available).

        Absent and masked films are never read.

        Raises
        ------
        InputsError
            If the inputs were read without images.
        """
        if self.image_loader is None:
            where = f"part {self.name!r}" if self.name else "these inputs"
            raise InputsError(f"{where} was read without X-ray images (input kind 'cxr_img', e.g. "
                              "features 'raw', reads them)")
        rows = np.asarray(rows, dtype=np.int64)
        shown = self.cxr_present[rows]
        out = np.zeros((rows.size, 1, self.image_size, self.image_size), dtype=np.float32)
        if shown.any():
            out[shown, 0] = cxr_to_float(self.image_loader(self.index[rows[shown]]))
        return out


def cohort_of_part(cohort: str, part: str) -> str:
    """``full`` or ``matched``: the cohort the stays of ``part`` are drawn from."""
    if cohort not in COHORTS:
        raise InputsError(f"unknown cohort {cohort!r}; valid cohorts: {', '.join(COHORTS)}")
    if cohort in ("full", "matched"):
        return cohort
    first, second = cohort.split("_to_")
    return second if part == "test" else first


def select_stays(store, task, fold: int, part: str, cohort: str = "full") -> np.ndarray:
    """int64 ascending store positions of the stays of ``part`` of ``fold`` used for ``task``.

    A stay is used when its label for the task is usable (:meth:`TaskSpec.targets`) and, in the
    ``matched`` cohort (or the matched side of a cross cohort), when the store holds its film.
    Simulated masks never shrink a cohort.

    Raises
    ------
    InputsError
        Unknown cohort or part, or a fold out of range.
    UnknownTaskError
        Unknown task (the message lists the tasks).
    """
    spec = get_task(task)
    return _select(store, store.task_mask(spec.name), _check_fold(store, fold), part, cohort)


def _select(store, usable: np.ndarray, fold: int, part: str, cohort: str) -> np.ndarray:
    which = cohort_of_part(cohort, part)
    if part not in PARTS:
        raise InputsError(f"unknown part {part!r}; valid parts: {', '.join(PARTS)}")
    idx = np.asarray(store.indices(fold, part), dtype=np.int64)
    idx = idx[usable[idx]]
    if which == "matched":
        idx = idx[np.asarray(store.cxr_present, dtype=bool)[idx]]
    return idx


def available_encoders(store, modality: str, kind: str | None = None) -> list[str]:
    """Ids of the complete embeddings of ``modality`` in ``store`` (``kind="cxr_map"``: with a map)."""
    return [e["encoder_id"] for e in store.embeddings()
            if e["modality"] == modality and (kind != "cxr_map" or e.get("map_shape"))]


def encode_command(store, encoder_id: str) -> str:
    """The ``cbstore encode`` command that writes embedding ``encoder_id`` into ``store``.

    An id ending in ``-random`` is the encoder of that name with ``--weights random`` (the
    encoder registry's naming); other non-default weights are not guessed from the id.
    """
    base, weights = encoder_id, ""
    if encoder_id.endswith("-random"):
        base, weights = encoder_id[: -len("-random")], " --weights random"
    return f"cbstore encode {store.path} --encoder {base}{weights}"


def resolve_encoder(store, modality: str, encoder_id: str | None, kind: str | None = None) -> dict:
    """The embedding description (a ``store.embeddings()`` entry) to read for ``modality``.

    Parameters
    ----------
    store : cbstore.store.reader.Store
    modality : str
        ``ehr`` or ``cxr``.
    encoder_id : str or None
        None picks the only embedding of the modality (of the kind); for ``cxr_emb`` the only
        one without a spatial map if there is any such, else the only one.
    kind : str, optional
        The input kind the embedding is read for (:data:`EMBEDDING_KINDS`); ``cxr_map`` accepts
        only spatial-map embeddings. Default: ``<modality>_emb``.

    Raises
    ------
    InputsError
        If the embedding is absent, or ``encoder_id`` is None and there is not exactly one; the
        message lists the available ids and gives the ``cbstore encode`` command that adds one.
    """
    kind = kind or f"{modality}_emb"
    if kind not in EMBEDDING_KINDS or EMBEDDING_KINDS[kind][0] != modality:
        raise InputsError(f"input kind {kind!r} is not an embedding of modality {modality!r}; "
                          f"valid: {sorted(k for k, v in EMBEDDING_KINDS.items() if v[0] == modality)}")
    ids = available_encoders(store, modality, kind)
    entries = {e["encoder_id"]: e for e in store.embeddings()
               if e["modality"] == modality and e["encoder_id"] in ids}
    if encoder_id is None and kind == "cxr_emb":
        # a pooled embedding is picked before the pooled values of a spatial-map one
        pooled = {k: e for k, e in entries.items() if not e.get("map_shape")}
        entries = pooled or entries
    have = ", ".join(sorted(entries)) or "none"
    option = "--cxr-map-encoder" if kind == "cxr_map" else f"--{modality}-encoder"
    what = "X-ray spatial-map" if kind == "cxr_map" else modality
    if encoder_id is None:
        if len(entries) == 1:
            return next(iter(entries.values()))
        if not entries:
            raise InputsError(
                f"store {store.path} holds no complete {what} embedding (input {kind!r}); add one "
                f"with `{encode_command(store, EMBEDDING_KINDS[kind][1])}` (or another "
                f"{modality} encoder), or use --features raw")
        raise InputsError(f"store {store.path} holds several {what} embeddings ({have}); "
                          f"choose one with {option}")
    if encoder_id not in entries:
        other = [e for e in store.embeddings()
                 if e["modality"] == modality and e["encoder_id"] == encoder_id]
        reason = (f"embedding {encoder_id!r} stores no spatial map" if other else
                  f"unknown {modality} encoder {encoder_id!r} ({option})")
        fix = (f"choose a spatial-map encoder (ids ending in -layer3 or -block3) with {option}"
               if other else f"add it with `{encode_command(store, encoder_id)}`")
        raise InputsError(f"{reason}: store {store.path} has {what} embeddings: {have}; {fix}")
    return entries[encoder_id]


def _check_fold(store, fold) -> int:
    try:
        fold_int = int(fold)
    except (TypeError, ValueError):
        raise InputsError(f"fold must be an integer, got {fold!r}") from None
    if not 0 <= fold_int < store.n_folds:
        raise InputsError(f"fold {fold_int} out of range: store {store.path} has folds "
                          f"0..{store.n_folds - 1}")
    return fold_int


class FoldReader:
    """Reads :class:`StayInputs` of one fold; what is per fold is read once, at construction.

    Parameters
    ----------
    store : cbstore.store.reader.Store
    fold : int
    task : str or TaskSpec, optional
        Task whose targets fill ``StayInputs.y`` (None: no targets).
    inputs : iterable of str
        Input kinds to read (:data:`INPUT_KINDS`).
    ehr_encoder, cxr_encoder, cxr_map_encoder : str, optional
        Embedding ids for ``ehr_emb`` / ``cxr_emb`` / ``cxr_map``; None picks the only one the
        store holds (see :func:`resolve_encoder`).

    Attributes
    ----------
    label_names : list of str or None
    ehr_encoder, cxr_encoder : str or None
        Embedding ids read.
    ehr_dim, cxr_dim : int or None
        Embedding sizes.
    cxr_map_encoder : str or None
        Spatial-map embedding id read (``cxr_map``).
    cxr_map_shape : tuple of int or None
        ``(C, h, w)`` of the spatial maps (``cxr_map``).
    cxr_map_attrs : dict or None
        The spatial-map embedding's attrs (provenance: encoder name, weights, seed, stage).
    preprocessor : EhrPreprocessor or None
        The fold's EHR preprocessing (``ehr_ts``).

    Raises
    ------
    InputsError
        Unknown input kinds, a fold out of range, no labels for the task, or a missing embedding.
    UnknownTaskError
        Unknown task.
    """

    def __init__(self, store, fold: int, *, task=None, inputs: Iterable[str] = frozenset(),
                 ehr_encoder: str | None = None, cxr_encoder: str | None = None,
                 cxr_map_encoder: str | None = None):
        self.store = store
        self.inputs = frozenset(inputs)
        bad = self.inputs - INPUT_KINDS
        if bad:
            raise InputsError(f"unknown input kind(s) {sorted(bad)}; valid: {sorted(INPUT_KINDS)}")
        self.fold = _check_fold(store, fold)
        self.task = None if task is None else get_task(task)
        self.label_names = None
        self._y = self._usable = None
        if self.task is not None:
            self._y, self.label_names = _targets(store, self.task)
            self._usable = np.asarray(store.task_mask(self.task.name), dtype=bool)
        self._natural = np.asarray(store.cxr_present, dtype=bool)
        self._hours = np.asarray(store.cxr_hours_before_prediction, dtype=np.float32)
        self._stay_ids = np.asarray(store.stay_ids, dtype=np.int64)
        self._emb: dict = {}
        self.ehr_encoder = self.cxr_encoder = None
        self.ehr_dim = self.cxr_dim = None
        self.cxr_map_shape = self.cxr_map_attrs = None
        self.cxr_map_encoder = None
        if "cxr_map" in self.inputs:
            entry = resolve_encoder(store, "cxr", cxr_map_encoder, "cxr_map")
            self.cxr_map_encoder = entry["encoder_id"]
            self.cxr_map_attrs = dict(entry)
            self.cxr_map_shape = tuple(int(v) for v in entry["map_shape"])
            self._map_present = np.asarray(store.embedding("cxr", entry["encoder_id"])[1], dtype=bool)
        for modality, given in (("ehr", ehr_encoder), ("cxr", cxr_encoder)):
            if f"{modality}_emb" not in self.inputs:
                continue
            entry = resolve_encoder(store, modality, given)
            try:
                values, present = store.embedding(modality, entry["encoder_id"], self.fold)
            except (EmbeddingError, StoreError) as exc:
                raise InputsError(str(exc)) from exc
            self._emb[modality] = (np.asarray(values, dtype=np.float32), np.asarray(present, dtype=bool))
            setattr(self, f"{modality}_encoder", entry["encoder_id"])
            setattr(self, f"{modality}_dim", int(values.shape[1]))
        self.preprocessor = EhrPreprocessor.from_store(store, self.fold) if "ehr_ts" in self.inputs else None

    @property
    def usable(self) -> np.ndarray:
        """bool ``[n_stays]``: stays with a usable label for the reader's task."""
        if self._usable is None:
            raise InputsError("this reader was made without a task; pass task= to select stays")
        return self._usable

    def select(self, part: str, cohort: str = "full") -> np.ndarray:
        """:func:`select_stays` for the reader's task and fold, from the labels already read."""
        return _select(self.store, self.usable, self.fold, part, cohort)

    def read(self, positions, *, name: str = "", cxr_hidden=None) -> StayInputs:
        """The inputs of the stays at store ``positions``.

        Parameters
        ----------
        positions : array-like of int
            Store positions (e.g. from :func:`select_stays`).
        name : str
            Part name recorded in the result.
        cxr_hidden : array-like of bool, optional
            ``[k]``, aligned with ``positions``: X-rays hidden by a simulated mask
            (:func:`cbstore.inputs.masks.apply_cxr_mask`). A hidden film counts as absent everywhere: no
            image, NaN embedding, NaN time, ``cxr_present`` False, ``cxr_masked`` True.

        Returns
        -------
        StayInputs
        """
        store = self.store
        idx = np.asarray(positions, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self._natural)):
            raise InputsError(f"positions out of range 0..{len(self._natural) - 1} of store {store.path}")
        natural = self._natural[idx]
        hidden = np.zeros(idx.size, dtype=bool) if cxr_hidden is None else np.asarray(cxr_hidden, dtype=bool)
        if hidden.shape != natural.shape:
            raise InputsError(f"cxr_hidden has shape {hidden.shape}, positions {natural.shape}")
        present = natural & ~hidden
        out = StayInputs(index=idx, stay_id=self._stay_ids[idx], cxr_present=present,
                         cxr_masked=natural & hidden, name=name,
                         image_size=int(store.image_size))
        if self._y is not None:
            out.y = self._y[idx]
        if "ehr" in self._emb:
            out.ehr_emb = self._emb["ehr"][0][idx]
        if "cxr" in self._emb:
            values, emb_present = self._emb["cxr"]
            # an X-ray the encoder could not embed counts as absent for this read
            out.cxr_present = present & emb_present[idx]
            cxr = values[idx].copy()
            cxr[~out.cxr_present] = np.nan
            out.cxr_emb = cxr
        if self.cxr_map_shape is not None:
            out.cxr_present = out.cxr_present & self._map_present[idx]
            out.cxr_map = self._maps(idx, out.cxr_present)
        out.cxr_hours = np.where(out.cxr_present, self._hours[idx], np.float32(np.nan)).astype(np.float32)
        if self.preprocessor is not None:
            out.ehr, out.ehr_mask = self.preprocessor(store.ehr_values(idx))
        if "cxr_img" in self.inputs:
            out.image_loader = store.images
        return out


    def _maps(self, idx: np.ndarray, shown: np.ndarray) -> np.ndarray:
        """float32 ``[k, C, h, w]`` maps of positions ``idx``; only the ``shown`` ones are read."""
        out = np.full((idx.size, *self.cxr_map_shape), np.nan, dtype=np.float32)
        if shown.any():
            try:
                maps = self.store.embedding_map("cxr", self.cxr_map_encoder, idx[shown])
            except (EmbeddingError, StoreError) as exc:
                raise InputsError(str(exc)) from exc
            out[shown] = maps
        return out


def _targets(store, spec) -> tuple[np.ndarray, list]:
    """(targets over the whole store, label names) of a task; InputsError when unavailable."""
    try:
        raw = np.asarray(store.labels(spec.name))
        names = list(store.label_names(spec.name))
    except (StoreError, KeyError) as exc:
        raise InputsError(f"store {store.path} has no labels for task {spec.name!r}: {exc}") from exc
    y, _ = spec.targets(raw, len(names))
    if not spec.multiclass and y.shape[1] != len(names):
        raise InputsError(f"store {store.path}: task {spec.name!r} has {y.shape[1]} label "
                          f"column(s) but {len(names)} label name(s)")
    return y, names


def read_inputs(store, fold: int, positions, *, task=None, inputs: Iterable[str] = frozenset(),
                cxr_hidden=None, ehr_encoder: str | None = None, cxr_encoder: str | None = None,
                cxr_map_encoder: str | None = None, name: str = "") -> StayInputs:
    """A method's inputs for the stays at ``positions`` of ``fold`` (see the module docstring).

    One call of :meth:`FoldReader.read`; build a :class:`FoldReader` to read several sets of stays
    of one fold without reading the fold's statistics and embeddings again.

    Parameters
    ----------
    store : cbstore.store.reader.Store
    fold : int
    positions : array-like of int
        Store positions.
    task : str or TaskSpec, optional
        Fills ``y`` with the task's targets.
    inputs : iterable of str
        Input kinds (:data:`INPUT_KINDS`).
    cxr_hidden : array-like of bool, optional
        X-rays hidden by a simulated mask, aligned with ``positions``.
    ehr_encoder, cxr_encoder, cxr_map_encoder : str, optional
        Embedding ids (``ehr_emb``, ``cxr_emb``, ``cxr_map``); None picks the only one.
    name : str
        Part name recorded in the result.

    Returns
    -------
    StayInputs
    """
    reader = FoldReader(store, fold, task=task, inputs=inputs, ehr_encoder=ehr_encoder,
                        cxr_encoder=cxr_encoder, cxr_map_encoder=cxr_map_encoder)
    return reader.read(positions, name=name, cxr_hidden=cxr_hidden)
