"""Reading cbstore stores (the layout of ``store_layout.md``).

:func:`open_store` returns a :class:`Store` with numpy/pandas accessors and lazy xarray views.
Embeddings are added to an existing store through :meth:`Store.create_embedding` and the
:class:`~cbstore.store.embeddings.EmbeddingWriter` it returns; writing a new store is
:func:`cbstore.store.writer.write_store`. A torch Dataset of a store is
:class:`cbstore.inputs.dataset.StayDataset` (the model-input layer sits above this one).
"""

from __future__ import annotations

import json
import os
import stat
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import zarr

from cbstore.errors import EmbeddingError, StoreError, StoreVersionError, UnknownTaskError
from cbstore.format.content import CXR_COLUMNS, PART_CODES, STAT_NAMES, STAY_COLUMNS
from cbstore.format.schema import (
    ARRAYS,
    DATETIME_COLUMNS,
    EMBEDDINGS_GROUP,
    FORMAT_VERSION,
    GROUPS,
    MANIFEST_NAME,
    MODALITIES,
    ROOT_ATTRS_KEY,
    TASKS,
    major,
)
from cbstore.format.tasks import TaskSpec, get_task
from cbstore.store.embeddings import EmbeddingWriter, create_embedding
from cbstore.store.zarr_io import package_version

if TYPE_CHECKING:  # pragma: no cover
    import xarray as xr

__all__ = ["Store", "open_store"]


def _take_sharded(arr: zarr.Array, uniq: np.ndarray) -> np.ndarray:
    """Rows ``uniq`` (sorted, unique) of a sharded array, read shard by shard.

    zarr 3.1's orthogonal selection on a sharded array costs about 3x a single-chunk read per
    row; per shard, reading the span of wanted rows is cheaper when they are dense (about 1.4 ms
    per inner chunk against 5 ms per single read, measured on 224 x 224 films), single reads
    when they are sparse.
    """
    out = np.empty((uniq.size, *arr.shape[1:]), dtype=arr.dtype)
    block = arr.shards[0]
    shard_of = uniq // block
    for shard in np.unique(shard_of):
        rows = np.flatnonzero(shard_of == shard)
        wanted = uniq[rows]
        lo, hi = int(wanted[0]), int(wanted[-1]) + 1
        if hi - lo <= 4 * wanted.size:
            out[rows] = np.asarray(arr[lo:hi])[wanted - lo]
        else:
            for row, i in zip(rows, wanted):
                out[row] = arr[int(i)]
    return out


def _missing_store_message(path: Path) -> str:
    partials = sorted(path.parent.glob(f"{path.name}.partial-*")) if path.parent.is_dir() else []
    msg = f"no store at {path}"
    if partials:
        msg += (f" (an unfinished build left {partials[0].name}: the build did not finish; "
                "rebuild with --overwrite and remove the .partial folder)")
    resume = path.parent / f"{path.name}.build"
    if resume.is_dir():
        msg += (f" (an interrupted `cbstore build` left {resume.name}/: run the same build command "
                "again to resume it, or pass --overwrite to start over)")
    return msg


def open_store(path: str | os.PathLike) -> "Store":
    """Open a complete store for reading.

    Parameters
    ----------
    path : str or os.PathLike
        Store folder.

    Returns
    -------
    Store

    Raises
    ------
    StoreError
        The path is missing, not a Zarr v3 group, has no manifest (an unfinished build), or its
        metadata is damaged.
    StoreVersionError
        The store's major format version differs from :data:`FORMAT_VERSION`.
    """
    return Store(path)


class Store:
    """A complete cbstore store opened for reading (see :func:`open_store`).

    Attributes
    ----------
    path : pathlib.Path
        Absolute store path.
    attrs : dict
        Root metadata ``attrs["cbstore"]``.
    manifest : dict
        Content of ``cbstore_manifest.json``.
    """

    TASKS = TASKS

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path).absolute()
        p = self.path
        if not p.exists():
            raise StoreError(_missing_store_message(p))
        if not p.is_dir():
            raise StoreError(f"{p} is not a store: it is a file, a store is a folder")
        if not (p / "zarr.json").is_file():
            hint = " (it looks like Zarr format 2; cbstore stores are Zarr v3)" if (p / ".zgroup").exists() else ""
            raise StoreError(f"{p} is not a Zarr v3 group (no zarr.json){hint}; is this a cbstore store?")
        if not (p / MANIFEST_NAME).is_file():
            raise StoreError(
                f"incomplete store at {p} (no {MANIFEST_NAME}): the build did not finish; "
                "rebuild with --overwrite"
            )
        try:
            self.manifest = json.loads((p / MANIFEST_NAME).read_text())
        except ValueError as exc:
            raise StoreError(f"{p / MANIFEST_NAME} is not valid JSON ({exc}); rebuild with --overwrite") from exc
        self._open_root()
        attrs = self._root.attrs.get(ROOT_ATTRS_KEY)
        if not isinstance(attrs, dict) or "format_version" not in attrs:
            raise StoreError(f"{p} has no attrs['{ROOT_ATTRS_KEY}']['format_version']: not a cbstore store")
        self.attrs: dict = attrs
        version = str(attrs["format_version"])
        try:
            store_major = major(version)
        except ValueError as exc:
            raise StoreError(f"{p}: format_version {version!r} is not a semver string") from exc
        if store_major != major(FORMAT_VERSION):
            raise StoreVersionError(
                f"store {p} has format version {version}, but this cbstore ({package_version()}) "
                f"reads format {FORMAT_VERSION} (major {major(FORMAT_VERSION)}): upgrade cbstore to a "
                f"release that reads format {store_major}.x (or rebuild the store with this cbstore)"
            )

    def _open_root(self) -> None:
        try:
            self._root = zarr.open_group(str(self.path), mode="r", use_consolidated=True)
        except ValueError as exc:
            raise StoreError(
                f"cannot open {self.path} with consolidated metadata ({exc}); the store is damaged "
                "or was not written by cbstore: rebuild with --overwrite"
            ) from exc
        except FileNotFoundError as exc:
            raise StoreError(_missing_store_message(self.path)) from exc

    def refresh(self) -> None:
        """Re-read the consolidated metadata (to see embeddings finished by another process)."""
        self._open_root()
        self.__dict__.pop("_embedding_groups", None)

    def __repr__(self) -> str:
        return (f"Store({str(self.path)!r}, n_stays={self.n_stays}, window_hours={self.window_hours}, "
                f"n_folds={self.n_folds}, format {self.attrs['format_version']})")

    # -- basic metadata ------------------------------------------------------------------------

    def _array(self, key: str) -> zarr.Array:
        try:
            return self._root[key]
        except KeyError as exc:
            raise StoreError(f"{self.path} has no array {key!r}; run `cbstore validate {self.path}`") from exc

    @cached_property
    def stay_ids(self) -> np.ndarray:
        """int64 [stay] stay ids, ascending."""
        return np.asarray(self._array("stays/stay")[:], dtype=np.int64)

    @property
    def n_stays(self) -> int:
        """Number of stays."""
        return int(self._array("stays/stay").shape[0])

    @property
    def n_folds(self) -> int:
        """Number of split folds."""
        return int(self._array("splits/fold").shape[0])

    @property
    def window_hours(self) -> int:
        """Hours of the EHR observation window (length of the ``time`` axis)."""
        return int(self._array("ehr/time").shape[0])

    @property
    def image_size(self) -> int:
        """Side of the stored square images."""
        return int(self._array("cxr/images").shape[1])

    @cached_property
    def phenotype_names(self) -> list[str]:
        """The phenotype names, in column order of the phenotype labels."""
        return [str(s) for s in self._array("labels/phenotype")[:]]

    @cached_property
    def features(self) -> pd.DataFrame:
        """EHR variables: columns name, unit, kind, normalize (index 0..F-1)."""
        return pd.DataFrame({
            "name": [str(s) for s in self._array("ehr/feature")[:]],
            "unit": [str(s) for s in self._array("ehr/unit")[:]],
            "kind": [str(s) for s in self._array("ehr/kind")[:]],
            "normalize": np.asarray(self._array("ehr/normalize")[:], dtype=bool),
        })

    @cached_property
    def stays(self) -> pd.DataFrame:
        """Cohort table: index ``stay_id``, columns STAY_COLUMNS; datetimes as ``datetime64[s]``."""
        data: dict[str, Any] = {}
        for col in STAY_COLUMNS:
            raw = self._array(f"stays/{col}")[:]
            if col in DATETIME_COLUMNS:
                data[col] = np.asarray(raw, dtype=np.int64).astype("datetime64[s]")
            elif ARRAYS[f"stays/{col}"].is_string:
                data[col] = [str(s) for s in raw]
            else:
                data[col] = np.asarray(raw)
        return pd.DataFrame(data, index=pd.Index(self.stay_ids, name="stay_id"))

    @cached_property
    def cxr(self) -> pd.DataFrame:
        """Film metadata per stay: index ``stay_id``, columns CXR_COLUMNS (study_time NaT where no film)."""
        data: dict[str, Any] = {}
        for col in CXR_COLUMNS:
            raw = self._array(f"cxr/{col}")[:]
            if col == "study_time":
                secs = np.asarray(raw, dtype=np.int64)
                times = secs.astype("datetime64[s]")
                times[secs == -1] = np.datetime64("NaT")
                data[col] = times
            elif ARRAYS[f"cxr/{col}"].is_string:
                data[col] = [str(s) for s in raw]
            else:
                data[col] = np.asarray(raw)
        return pd.DataFrame(data, index=pd.Index(self.stay_ids, name="stay_id"))

    @cached_property
    def cxr_present(self) -> np.ndarray:
        """bool [stay]: a film was selected and decoded."""
        return np.asarray(self._array("cxr/present")[:], dtype=bool)

    @cached_property
    def cxr_hours_before_prediction(self) -> np.ndarray:
        """float32 [stay]: hours from the film to the prediction time (NaN where no film)."""
        hours = np.asarray(self._array("cxr/hours_before_prediction")[:], dtype=np.float32)
        return np.where(self.cxr_present, hours, np.float32(np.nan))

    # -- labels and splits ---------------------------------------------------------------------

    def _check_task(self, task: str) -> "TaskSpec":
        try:
            return get_task(task)
        except UnknownTaskError as exc:
            raise StoreError(str(exc)) from None

    def labels(self, task: str) -> np.ndarray:
        """Labels of ``task`` as stored: int8 [n] (binary, multiclass) or [n, P] (multilabel).

        The array is ``labels/<TaskSpec.labels_array>`` (:mod:`cbstore.format.tasks`).
        """
        spec = self._check_task(task)
        return np.asarray(self._array(f"labels/{spec.labels_array}")[:], dtype=np.int8)

    def label_names(self, task: str) -> list[str]:
        """Output names: ``[task]`` (binary), the phenotype names, or the LoS class names."""
        return self._check_task(task).label_names(self.phenotype_names)

    def task_mask(self, task: str) -> np.ndarray:
        """bool [n]: stays with a usable label for ``task`` (LoS needs a stay of at least 2 days)."""
        spec = self._check_task(task)
        return spec.targets(self.labels(task), len(self.label_names(task)))[1]

    def _check_fold(self, fold: int) -> int:
        if not isinstance(fold, (int, np.integer)) or not 0 <= int(fold) < self.n_folds:
            raise StoreError(f"fold {fold!r} out of range: the store has folds 0..{self.n_folds - 1}")
        return int(fold)

    def part(self, fold: int) -> np.ndarray:
        """uint8 [n] split codes of ``fold`` (0 train, 1 val, 2 test)."""
        fold = self._check_fold(fold)
        return np.asarray(self._array("splits/part")[:, fold], dtype=np.uint8)

    def indices(self, fold: int, part: str) -> np.ndarray:
        """int64 positions (not stay ids) of the stays in ``part`` ("train"|"val"|"test") of ``fold``."""
        if part not in PART_CODES:
            raise StoreError(f"unknown part {part!r}; choose one of {list(PART_CODES)}")
        return np.flatnonzero(self.part(fold) == PART_CODES[part]).astype(np.int64)

    # -- bulk arrays ---------------------------------------------------------------------------

    def _take(self, key: str, index: Any) -> np.ndarray:
        return self._take_rows(self._array(key), index)

    def _take_rows(self, arr: zarr.Array, index: Any) -> np.ndarray:
        if index is None:
            return np.asarray(arr[...])
        idx = np.asarray(index)
        if idx.dtype == bool:
            if idx.shape != (self.n_stays,):
                raise StoreError(f"boolean index must have shape ({self.n_stays},), got {idx.shape}")
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_stays):
            raise StoreError(f"index out of range 0..{self.n_stays - 1}")
        if idx.size == 0:
            return np.empty((0, *arr.shape[1:]), dtype=arr.dtype)
        uniq, inverse = np.unique(idx, return_inverse=True)
        if uniq.size == uniq[-1] - uniq[0] + 1:  # contiguous: a slice reads whole chunks
            data = arr[int(uniq[0]):int(uniq[-1]) + 1]
        elif arr.shards is not None:
            data = _take_sharded(arr, uniq)
        else:
            data = arr.oindex[(uniq,) + (slice(None),) * (arr.ndim - 1)]
        return np.asarray(data)[inverse]

    def ehr_values(self, index: Any = None) -> np.ndarray:
        """float32 [k, T, F] raw hourly values (NaN = not observed) of stay positions ``index``."""
        return self._take("ehr/values", index)

    def ehr_observed(self, index: Any = None) -> np.ndarray:
        """bool [k, T, F]: at least one valid measurement in the hour."""
        return self._take("ehr/observed", index)

    def images(self, index: Any = None) -> np.ndarray:
        """uint8 [k, H, W] stored films (zeros where absent)."""
        return self._take("cxr/images", index)

    def fold_stats(self, fold: int) -> dict[str, np.ndarray]:
        """Training statistics of ``fold``: median, iqr, mean, std, min, max, n_observed -> [F]."""
        fold = self._check_fold(fold)
        return {s: np.asarray(self._array(f"stats/{s}")[fold]) for s in STAT_NAMES}

    # -- xarray views --------------------------------------------------------------------------

    def dataset(self, group: str) -> "xr.Dataset":
        """Lazy xarray view of a build group ("stays", "labels", "ehr", "cxr", "splits", "stats")."""
        import xarray as xr

        if group not in GROUPS:
            raise StoreError(f"unknown group {group!r}; choose one of {list(GROUPS)}")
        return xr.open_zarr(str(self.path), group=group, consolidated=True, zarr_format=3)

    def datatree(self) -> "xr.DataTree":
        """Lazy xarray DataTree of the whole store."""
        import xarray as xr

        return xr.open_datatree(str(self.path), engine="zarr", consolidated=True, zarr_format=3)

    # -- embeddings ----------------------------------------------------------------------------

    @cached_property
    def _embedding_groups(self) -> dict[tuple[str, str], zarr.Group]:
        found: dict[tuple[str, str], zarr.Group] = {}
        if EMBEDDINGS_GROUP not in self._root:
            return found
        for modality in MODALITIES:
            if modality not in self._root[EMBEDDINGS_GROUP]:
                continue
            for name, grp in self._root[f"{EMBEDDINGS_GROUP}/{modality}"].groups():
                if grp.attrs.get("complete") is True:
                    found[(modality, name)] = grp
        return found

    def embeddings(self) -> list[dict]:
        """Complete embeddings: dicts with modality, encoder_id, per_fold, dim and all group attrs."""
        out = []
        for (modality, name), grp in sorted(self._embedding_groups.items()):
            attrs = dict(grp.attrs)
            out.append({**attrs, "modality": modality, "encoder_id": name,
                        "per_fold": bool(attrs.get("per_fold")), "dim": int(attrs.get("dim", 0))})
        return out

    def _embedding_group(self, modality: str, encoder_id: str) -> zarr.Group:
        try:
            return self._embedding_groups[(modality, encoder_id)]
        except KeyError:
            have = [f"{m}/{e}" for m, e in sorted(self._embedding_groups)] or ["none"]
            raise EmbeddingError(
                f"no complete embedding {modality}/{encoder_id} in {self.path}; available: "
                f"{', '.join(have)} (run `cbstore encode` to add it)"
            ) from None

    def _embedding_fold(self, grp: zarr.Group, fold: int | None, what: str) -> int | None:
        if grp.attrs.get("per_fold"):
            if fold is None:
                raise EmbeddingError(f"{what} is trained per fold; pass fold=0..{self.n_folds - 1}")
            return self._check_fold(fold)
        return None

    def embedding(self, modality: str, encoder_id: str, fold: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Cached embedding: (values float32 [n, dim], NaN where absent; present bool [n]).

        ``fold`` is required for per-fold encoders and ignored otherwise.
        """
        grp = self._embedding_group(modality, encoder_id)
        f = self._embedding_fold(grp, fold, f"embedding {modality}/{encoder_id}")
        values = grp["values"][...] if f is None else grp["values"][f]
        return np.asarray(values, dtype=np.float32), np.asarray(grp["present"][...], dtype=bool)

    def embedding_sequence(self, modality: str, encoder_id: str, fold: int | None = None) -> np.ndarray:
        """Per-hour embedding float32 [n, T, dim_seq] (``fold`` required for per-fold encoders)."""
        grp = self._embedding_group(modality, encoder_id)
        if "sequence" not in grp:
            raise EmbeddingError(f"embedding {modality}/{encoder_id} in {self.path} stores no per-hour sequence")
        f = self._embedding_fold(grp, fold, f"embedding {modality}/{encoder_id}")
        seq = grp["sequence"][...] if f is None else grp["sequence"][f]
        return np.asarray(seq, dtype=np.float32)

    def embedding_map(self, modality: str, encoder_id: str, index: Any = None) -> np.ndarray:
        """Stored spatial maps float16 ``[k, C, h, w]`` of stay positions ``index`` (NaN where absent).

        Raises
        ------
        EmbeddingError
            The embedding is missing or stores no spatial map.
        """
        grp = self._embedding_group(modality, encoder_id)
        if "map" not in grp:
            raise EmbeddingError(f"embedding {modality}/{encoder_id} in {self.path} stores no spatial "
                                 "map (a spatial-map encoder such as densenet121-res224-all-block3 does)")
        return self._take_rows(grp["map"], index)

    def is_writable(self) -> bool:
        """Whether new embeddings can be written (write permission bits and access for this user)."""
        try:
            mode = self.path.stat().st_mode
        except OSError:
            return False
        return bool(mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)) and os.access(self.path, os.W_OK)

    def create_embedding(
        self,
        modality: str,
        encoder_id: str,
        dim: int,
        *,
        per_fold: bool = False,
        sequence_dim: int | None = None,
        attrs: dict,
        overwrite: bool = False,
        region_stays: int = 1024,
        map_shape: tuple | None = None,
    ) -> "EmbeddingWriter":
        """Create (or resume) the embedding group ``embeddings/<modality>/<encoder_id>``.

        Parameters
        ----------
        modality : {"cxr", "ehr"}
        encoder_id : str
            Descriptive id, e.g. ``"densenet121-res224-all"``.
        dim : int
            Embedding width.
        per_fold : bool
            The encoder is trained per fold: values are ``[fold, stay, dim]``.
        sequence_dim : int, optional
            Width of an additional per-hour ``sequence`` array (``[fold,] stay, time, sequence_dim``).
        attrs : dict
            Provenance; must hold ``weights`` (name or None) and ``preprocessing`` (dict or str); may
            hold ``weights_sha256``, ``library_versions``, ``image_size`` and anything else.
        overwrite : bool
            Discard an existing group (complete or not) and start again.
        region_stays : int
            Stays per region, the resume and concurrency unit (and the chunk length of ``values``).
        map_shape : tuple of int, optional
            ``(C, h, w)``: the embedding also stores a float16 spatial ``map`` array
            ``[stay, C, h, w]`` (chunk one stay, shard one region; format 1.1).

        Returns
        -------
        EmbeddingWriter
            A fresh writer, or for an incomplete group with the same shape a resuming one.

        Raises
        ------
        StoreReadOnlyError
            The store folder is not writable.
        EmbeddingError
            The embedding is complete and ``overwrite`` is false, or an incomplete one has another shape.
        """
        return create_embedding(self, modality, encoder_id, dim, per_fold=per_fold, sequence_dim=sequence_dim,
                                attrs=attrs, overwrite=overwrite, region_stays=region_stays,
                                map_shape=map_shape)
