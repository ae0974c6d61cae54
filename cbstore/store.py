"""Writing and reading cbstore stores (the layout of ``store_layout.md``).

Writing: :func:`write_store` (or :class:`StoreWriter` when images arrive region by region) writes a
:class:`~cbstore.content.StoreContent` into a temporary sibling ``<path>.partial-<random>``,
consolidates the root metadata, writes ``cbstore_manifest.json`` last and renames the folder into
place, so nothing half-written ever sits at the final path.

Reading: :func:`open_store` returns a :class:`Store` with numpy/pandas accessors, lazy xarray
views and (via :meth:`Store.torch_dataset`) a torch Dataset. Embeddings are added to an existing
store through :meth:`Store.create_embedding` and the :class:`EmbeddingWriter` it returns.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import stat
import warnings
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import pandas as pd
import zarr
from zarr.codecs import BloscCodec

from cbstore.content import CXR_COLUMNS, FEATURE_COLUMNS, PART_CODES, STAT_NAMES, STAY_COLUMNS, StoreContent
from cbstore.errors import (
    EmbeddingError,
    StoreContentError,
    StoreError,
    StoreExistsError,
    StoreReadOnlyError,
    StoreVersionError,
)
from cbstore.schema import (
    ARRAYS,
    DATETIME_ATTRS,
    DATETIME_COLUMNS,
    EMBEDDING_ATTRS_SCHEMA,
    EMBEDDING_CALLER_ATTRS,
    EMBEDDINGS_GROUP,
    FORMAT_VERSION,
    GROUP_ENCODING,
    GROUPS,
    LOS_CLASS_NAMES,
    MANIFEST_NAME,
    MODALITIES,
    ROOT_ATTRS_KEY,
    ROOT_ATTRS_SCHEMA,
    TASKS,
    ArraySpec,
    check_schema,
    config_sha256,
    major,
)

if TYPE_CHECKING:  # pragma: no cover
    import xarray as xr

__all__ = [
    "EmbeddingWriter", "Store", "StoreError", "StoreWriter", "open_store", "write_store",
    "FORMAT_VERSION",
]

#: Largest chunk of the per-stay 1-D arrays.
MAX_1D_CHUNK = 65_536

_NUMERIC_CODEC = BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle")
# bitshuffle is meaningless on the variable-length bytes that strings serialise to
_STRING_CODEC = BloscCodec(cname="zstd", clevel=5, shuffle="noshuffle")


def _package_version() -> str:
    from cbstore import __version__

    return __version__


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@contextlib.contextmanager
def quiet_zarr_warnings() -> Iterator[None]:
    """Silence the two zarr warnings that cbstore's own choices trigger, and nothing else.

    - "Consolidated metadata is currently not part in the Zarr format 3 specification": cbstore
      deliberately consolidates (one read opens the whole hierarchy).
    - "Object at cbstore_manifest.json is not recognized as a component of a Zarr hierarchy":
      walking the root folder without consolidated metadata meets the (non-zarr) manifest file.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="Consolidated metadata is currently not part", category=UserWarning
        )
        warnings.filterwarnings(
            "ignore", message=f"Object at {MANIFEST_NAME} is not recognized", category=UserWarning
        )
        yield


def consolidate(path: str | os.PathLike) -> None:
    """Consolidate the root metadata of the store at ``path`` (see :func:`quiet_zarr_warnings`)."""
    with quiet_zarr_warnings():
        zarr.consolidate_metadata(str(path))


def _create_array(
    group: zarr.Group,
    name: str,
    spec: ArraySpec,
    shape: tuple[int, ...],
    chunks: tuple[int, ...],
    *,
    shards: tuple[int, ...] | None = None,
    attrs: dict | None = None,
) -> zarr.Array:
    """Create one array with the layout's dtype, dimension names, fill value and compression."""
    return group.create_array(
        name,
        shape=shape,
        dtype=str if spec.is_string else spec.dtype,
        chunks=chunks,
        shards=shards,
        dimension_names=spec.dims,
        fill_value=spec.fill,
        compressors=(_STRING_CODEC if spec.is_string else _NUMERIC_CODEC,),
        attributes=attrs or {},
    )


# --------------------------------------------------------------------------------------------
# content checks and conversion
# --------------------------------------------------------------------------------------------


def _lossless(value: Any, dtype: str | np.dtype, name: str) -> np.ndarray:
    """Convert ``value`` to ``dtype``, refusing conversions that change any value.

    Numbers going to a float dtype are only rounded to its precision (float64 -> float32 is
    how the store keeps floats); every other conversion must keep each value exactly.
    """
    arr = np.asarray(value)
    target = np.dtype(dtype)
    if arr.dtype == target:
        return arr
    if arr.dtype.kind in "OUSTM" and target.kind != "O":
        raise StoreContentError(f"{name}: expected {target} values, got dtype {arr.dtype}")
    if target.kind == "f" and arr.dtype.kind in "fiub":
        return arr.astype(target)
    with np.errstate(invalid="ignore", over="ignore"):
        out = arr.astype(target)
        same = np.array_equal(out, arr, equal_nan=arr.dtype.kind == "f")
    if not same:
        raise StoreContentError(
            f"{name}: values do not fit {target} without change (given {arr.dtype}); "
            "convert them in the build before writing"
        )
    return out


def _strings(values: Any, name: str) -> np.ndarray:
    """Object array of str; missing (None/NaN/NA) becomes ``""``."""
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        if v is None or (not isinstance(v, str) and pd.isna(v)):
            out[i] = ""
        elif isinstance(v, str):
            out[i] = v
        else:
            raise StoreContentError(f"{name}: row {i} holds {v!r} ({type(v).__name__}), expected a string")
    return out


def _epoch_seconds(values: Any, name: str, *, allow_missing: bool) -> np.ndarray:
    """int64 seconds since the epoch from datetimes (or already-int seconds); -1 for missing."""
    ser = pd.Series(values)
    if ser.dtype.kind in "iu":
        out = ser.to_numpy(dtype=np.int64)
        if not allow_missing and (out < 0).any():
            raise StoreContentError(f"{name}: negative seconds since epoch (missing values are not allowed)")
        return out
    try:
        ser = pd.to_datetime(ser)
    except (TypeError, ValueError) as exc:
        raise StoreContentError(f"{name}: cannot be read as datetimes ({exc})") from exc
    if getattr(ser.dt, "tz", None) is not None:
        raise StoreContentError(f"{name}: datetimes must be naive (MIMIC's shifted clock), got tz {ser.dt.tz}")
    missing = ser.isna().to_numpy()
    if missing.any() and not allow_missing:
        bad = np.flatnonzero(missing)[:5].tolist()
        raise StoreContentError(f"{name}: missing datetimes at rows {bad}; every stay needs this time")
    ns = ser.astype("datetime64[ns]").to_numpy().astype("int64")
    seconds, rest = np.divmod(ns, 1_000_000_000)
    if (rest[~missing] != 0).any():
        row = int(np.flatnonzero((rest != 0) & ~missing)[0])
        raise StoreContentError(f"{name}: row {row} has a sub-second time; the store keeps whole seconds")
    seconds[missing] = -1
    return seconds


def _check_shape(arr: np.ndarray, shape: tuple[int | None, ...], name: str) -> None:
    if arr.ndim != len(shape) or any(want is not None and got != want for got, want in zip(arr.shape, shape)):
        want = tuple("?" if s is None else s for s in shape)
        raise StoreContentError(f"{name}: expected shape {want}, got {arr.shape}")


def _jsonable(attrs: dict, name: str) -> dict:
    """Round-trip through JSON (numpy scalars become Python numbers); refuse what JSON cannot hold."""

    def default(obj: Any) -> Any:
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
        if isinstance(obj, Path):
            return str(obj)
        raise TypeError(f"{type(obj).__name__} is not JSON serialisable")

    try:
        return json.loads(json.dumps(attrs, default=default, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise StoreContentError(f"{name}: not JSON serialisable ({exc})") from exc


def _prepare(content: StoreContent, image_size: int | None) -> dict[str, np.ndarray]:
    """Check ``content`` against the layout and convert it to ``{array path: numpy array}``.

    Images are not included (they are written separately). Raises StoreContentError naming the
    first problem found.
    """
    stays = content.stays
    n = len(stays)
    if n == 0:
        raise StoreContentError("content.stays is empty; a store needs at least one stay")
    stay_ids = _lossless(stays.index.to_numpy(), "int64", "content.stays.index (stay_id)")
    if np.unique(stay_ids).size != n:
        dup = pd.Index(stay_ids)[pd.Index(stay_ids).duplicated()][:5].tolist()
        raise StoreContentError(f"content.stays.index: duplicate stay_id values {dup}")
    if (np.diff(stay_ids) <= 0).any():
        raise StoreContentError("content.stays.index: stay_id must be sorted ascending; sort all content first")
    missing = [c for c in STAY_COLUMNS if c not in stays.columns]
    if missing:
        raise StoreContentError(f"content.stays: missing columns {missing}")

    out: dict[str, np.ndarray] = {}
    for group in ("stays", "labels", "ehr", "cxr", "splits"):
        out[f"{group}/stay"] = stay_ids
    for col in STAY_COLUMNS:
        spec = ARRAYS[f"stays/{col}"]
        name = f"content.stays[{col!r}]"
        if col in DATETIME_COLUMNS:
            out[f"stays/{col}"] = _epoch_seconds(stays[col], name, allow_missing=False)
        elif spec.is_string:
            out[f"stays/{col}"] = _strings(stays[col].tolist(), name)
        else:
            out[f"stays/{col}"] = _lossless(stays[col].to_numpy(), spec.dtype, name)

    # labels
    labels = content.labels
    need = ("mortality", "mortality_hosp", "phenotype_labels", "los", "los_class")
    absent = [k for k in need if k not in labels]
    if absent:
        raise StoreContentError(f"content.labels: missing {absent}")
    n_pheno = len(content.phenotype_names)
    if n_pheno == 0 or len(set(content.phenotype_names)) != n_pheno:
        raise StoreContentError("content.phenotype_names: must be non-empty and unique")
    out["labels/phenotype"] = _strings(content.phenotype_names, "content.phenotype_names")
    for key in need:
        arr = _lossless(labels[key], ARRAYS[f"labels/{key}"].dtype, f"content.labels[{key!r}]")
        _check_shape(arr, (n, n_pheno) if key == "phenotype_labels" else (n,), f"content.labels[{key!r}]")
        out[f"labels/{key}"] = arr
    for key in ("mortality", "mortality_hosp", "phenotype_labels"):
        bad = ~np.isin(out[f"labels/{key}"], (0, 1))
        if bad.any():
            raise StoreContentError(f"content.labels[{key!r}]: values must be 0/1, found {np.unique(out[f'labels/{key}'][bad])[:5].tolist()}")
    lc = out["labels/los_class"]
    if ((lc < -1) | (lc >= len(LOS_CLASS_NAMES))).any():
        raise StoreContentError(f"content.labels['los_class']: codes must be -1..{len(LOS_CLASS_NAMES) - 1}")

    # ehr
    features = content.features
    missing = [c for c in FEATURE_COLUMNS if c not in features.columns]
    if missing:
        raise StoreContentError(f"content.features: missing columns {missing}")
    n_feat = len(features)
    values = np.asarray(content.ehr_values)
    if values.dtype != np.float32:
        values = _lossless(values, "float32", "content.ehr_values")
    _check_shape(values, (n, None, n_feat), "content.ehr_values")
    window = values.shape[1]
    if window < 1:
        raise StoreContentError("content.ehr_values: the time axis is empty")
    if np.isinf(values).any():
        raise StoreContentError("content.ehr_values: contains inf; use NaN for 'not observed'")
    names = _strings(features["name"].tolist(), "content.features['name']")
    if len(set(names)) != n_feat or "" in set(names):
        raise StoreContentError("content.features['name']: names must be non-empty and unique")
    kinds = _strings(features["kind"].tolist(), "content.features['kind']")
    bad = sorted(set(kinds) - {"continuous", "binary"})
    if bad:
        raise StoreContentError(f"content.features['kind']: unknown kinds {bad}; use 'continuous' or 'binary'")
    out["ehr/time"] = np.arange(window, dtype=np.int16)
    out["ehr/feature"] = names
    out["ehr/values"] = values
    out["ehr/observed"] = ~np.isnan(values)
    out["ehr/unit"] = _strings(features["unit"].tolist(), "content.features['unit']")
    out["ehr/kind"] = kinds
    out["ehr/normalize"] = _lossless(features["normalize"].to_numpy(), "bool", "content.features['normalize']")

    # cxr
    cxr = content.cxr
    missing = [c for c in CXR_COLUMNS if c not in cxr.columns]
    if missing:
        raise StoreContentError(f"content.cxr: missing columns {missing}")
    if len(cxr) != n:
        raise StoreContentError(f"content.cxr: {len(cxr)} rows, expected one per stay ({n})")
    for col in CXR_COLUMNS:
        spec = ARRAYS[f"cxr/{col}"]
        name = f"content.cxr[{col!r}]"
        if col == "study_time":
            out["cxr/study_time"] = _epoch_seconds(cxr[col].to_numpy(), name, allow_missing=True)
        elif spec.is_string:
            out[f"cxr/{col}"] = _strings(cxr[col].tolist(), name)
        else:
            out[f"cxr/{col}"] = _lossless(cxr[col].to_numpy(), spec.dtype, name)
    if content.images is not None:
        images = np.asarray(content.images)
        if images.dtype != np.uint8:
            raise StoreContentError(f"content.images: expected uint8, got {images.dtype}")
        _check_shape(images, (n, None, None), "content.images")
        if image_size is not None and images.shape[1:] != (image_size, image_size):
            raise StoreContentError(f"content.images: shape {images.shape[1:]} does not match image_size {image_size}")

    # splits and stats
    splits = _lossless(content.splits, "uint8", "content.splits")
    _check_shape(splits, (n, None), "content.splits")
    n_folds = splits.shape[1]
    if n_folds < 1:
        raise StoreContentError("content.splits: needs at least one fold")
    bad = ~np.isin(splits, list(PART_CODES.values()))
    if bad.any():
        raise StoreContentError(f"content.splits: codes must be 0 (train), 1 (val), 2 (test); found {np.unique(splits[bad]).tolist()}")
    out["splits/fold"] = np.arange(n_folds, dtype=np.int8)
    out["splits/part"] = splits
    out["stats/fold"] = np.arange(n_folds, dtype=np.int8)
    out["stats/feature"] = names
    for s in STAT_NAMES:
        if s not in content.stats:
            raise StoreContentError(f"content.stats: missing {s!r} (need {list(STAT_NAMES)})")
        arr = _lossless(content.stats[s], ARRAYS[f"stats/{s}"].dtype, f"content.stats[{s!r}]")
        _check_shape(arr, (n_folds, n_feat), f"content.stats[{s!r}]")
        out[f"stats/{s}"] = arr
    return out


def _root_attrs(content: StoreContent, arrays: dict, image_size: int, chunks: dict, shards: dict) -> dict:
    attrs = _jsonable(dict(content.attrs), "content.attrs")
    attrs.setdefault("config_sha256", config_sha256(attrs.get("config", {})))
    derived = {
        "n_stays": len(arrays["stays/stay"]),
        "window_hours": int(arrays["ehr/values"].shape[1]),
        "n_folds": int(arrays["splits/part"].shape[1]),
        "image_size": int(image_size),
    }
    for key, value in derived.items():
        if key in attrs and attrs[key] != value:
            raise StoreContentError(f"content.attrs[{key!r}] = {attrs[key]!r} but the content has {value}")
    if "config" in attrs and attrs["config_sha256"] != config_sha256(attrs["config"]):
        raise StoreContentError("content.attrs['config_sha256'] is not the SHA-256 of content.attrs['config']")
    attrs.update(derived)
    attrs.update(
        format_version=FORMAT_VERSION,
        created_by=f"cbstore {_package_version()}",
        created_at=_now(),
        chunks={k: list(v) for k, v in chunks.items()},
        shards={k: list(v) for k, v in shards.items()},
    )
    problems = check_schema(attrs, ROOT_ATTRS_SCHEMA, "content.attrs")
    if problems:
        raise StoreContentError("store attributes do not match the schema:\n  " + "\n  ".join(problems))
    return attrs


def _is_cbstore_dir(path: Path) -> bool:
    """Whether ``path`` looks like a (possibly incomplete) cbstore store, safe to replace."""
    if (path / MANIFEST_NAME).is_file():
        return True
    try:
        meta = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta.get("attributes", {}).get(ROOT_ATTRS_KEY), dict)


# --------------------------------------------------------------------------------------------
# writer
# --------------------------------------------------------------------------------------------


class StoreWriter:
    """Write a store, streaming images region by region.

    All arrays except ``cxr/images`` are written on construction, into a temporary sibling folder
    ``<path>.partial-<random>``; :meth:`write_images` fills image shards; :meth:`finish`
    consolidates, writes the manifest last and renames the folder to ``path``. Used as a context
    manager, an exception inside the ``with`` block removes the temporary folder.

    Parameters
    ----------
    path : str or os.PathLike
        Final store path (conventionally ending in ``.zarr``).
    content : StoreContent
        Everything but (optionally) the images; ``content.images`` is ignored here.
    image_size : int
        Side of the square images.
    overwrite : bool
        Replace an existing store at ``path``.
    chunk_stays : int
        Stays per EHR chunk and per image shard.

    Raises
    ------
    StoreExistsError
        ``path`` exists and ``overwrite`` is false.
    StoreContentError
        The content does not fit the layout.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        content: StoreContent,
        image_size: int,
        overwrite: bool = False,
        *,
        chunk_stays: int = 256,
    ) -> None:
        self.path = Path(path).absolute()
        self.overwrite = overwrite
        if chunk_stays < 1:
            raise StoreContentError(f"chunk_stays must be >= 1, got {chunk_stays}")
        if image_size < 1:
            raise StoreContentError(f"image_size must be >= 1, got {image_size}")
        self._check_target()
        arrays = _prepare(content, image_size)
        n = len(arrays["stays/stay"])
        self.n_stays = n
        self.image_size = int(image_size)
        self.shard_stays = min(chunk_stays, n)
        self._present = arrays["cxr/present"]
        n_shards = -(-n // self.shard_stays)
        self._shards_written = np.zeros(n_shards, dtype=bool)

        c1 = min(n, MAX_1D_CHUNK)
        chunks: dict[str, tuple[int, ...]] = {}
        for key, arr in arrays.items():
            spec = ARRAYS[key]
            if spec.dims[0] == "stay":
                first = self.shard_stays if arr.ndim == 3 else c1
                chunks[key] = (first, *arr.shape[1:])
            else:
                chunks[key] = arr.shape
        chunks["cxr/images"] = (1, image_size, image_size)
        shards = {"cxr/images": (self.shard_stays, image_size, image_size)}
        attrs = _root_attrs(content, arrays, image_size, chunks, shards)

        self.partial = self.path.with_name(f"{self.path.name}.partial-{secrets.token_hex(4)}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._finished = False
        try:
            root = zarr.open_group(
                str(self.partial), mode="w-", zarr_format=3,
                attributes={ROOT_ATTRS_KEY: attrs, "encoding-type": "cbstore", "encoding-version": FORMAT_VERSION},
            )
            for group in GROUPS:
                self._write_group(root, group, arrays, chunks)
            self._images = _create_array(
                root["cxr"], "images", ARRAYS["cxr/images"], (n, image_size, image_size),
                chunks["cxr/images"], shards=shards["cxr/images"],
            )
        except BaseException:
            self.abort()
            raise
        self._arrays_meta = {
            key: {"shape": list(arr.shape), "dtype": ARRAYS[key].dtype} for key, arr in arrays.items()
        }
        self._arrays_meta["cxr/images"] = {"shape": [n, image_size, image_size], "dtype": "uint8"}

    def _check_target(self) -> None:
        if not self.path.exists():
            return
        if not self.overwrite:
            raise StoreExistsError(f"{self.path} exists; pass --overwrite (overwrite=True) to replace it")
        if not self.path.is_dir() or not _is_cbstore_dir(self.path):
            raise StoreExistsError(
                f"{self.path} exists and is not a cbstore store; refusing to replace it even with "
                "--overwrite: remove it yourself or choose another path"
            )

    @staticmethod
    def _write_group(root: zarr.Group, group: str, arrays: dict, chunks: dict) -> None:
        etype, eversion = GROUP_ENCODING[group]
        gattrs: dict[str, Any] = {"encoding-type": etype, "encoding-version": eversion}
        if group == "stays":
            gattrs.update({"_index": "stay", "column-order": list(STAY_COLUMNS)})
        grp = root.create_group(group, attributes=gattrs)
        for key, arr in arrays.items():
            if not key.startswith(group + "/"):
                continue
            name = key.split("/", 1)[1]
            spec = ARRAYS[key]
            attrs: dict[str, Any] = {}
            if (group == "stays" and name in DATETIME_COLUMNS) or key == "cxr/study_time":
                attrs.update(DATETIME_ATTRS)
                if key == "cxr/study_time":
                    attrs["missing_value"] = -1  # CF: xarray decodes "no film" to NaT
            if group == "stays" and name != "stay":
                # anndata dataframe columns carry their own element encoding
                attrs.update({"encoding-type": "string-array" if spec.is_string else "array",
                              "encoding-version": "0.2.0"})
            zarr_arr = _create_array(grp, name, spec, arr.shape, chunks[key], attrs=attrs)
            zarr_arr[...] = arr

    def write_images(self, start: int, images: np.ndarray) -> None:
        """Write images of stays ``start .. start + len(images)``.

        ``start`` must be a multiple of the shard size (``chunk_stays``) and the block must end at
        a shard boundary or at the last stay, so concurrent writers never share a shard. Images of
        stays without a film must be all zero.
        """
        self._check_open()
        images = np.asarray(images)
        k = len(images)
        n, s = self.n_stays, self.shard_stays
        if images.dtype != np.uint8 or images.shape[1:] != (self.image_size, self.image_size):
            raise StoreContentError(
                f"images: expected uint8 [k, {self.image_size}, {self.image_size}], got {images.dtype} {images.shape}"
            )
        stop = start + k
        if k == 0 or start < 0 or start % s or stop > n or (stop % s and stop != n):
            raise StoreContentError(
                f"images: block {start}..{stop} is not aligned to shards of {s} stays (n_stays {n})"
            )
        absent = ~self._present[start:stop]
        if absent.any() and images[absent].any():
            row = start + int(np.flatnonzero(absent & images.reshape(k, -1).any(axis=1))[0])
            raise StoreContentError(f"images: stay position {row} has no film (cxr present false) but a non-zero image")
        self._images[start:stop] = images
        self._shards_written[start // s: -(-stop // s)] = True

    def _check_open(self) -> None:
        if self._finished:
            raise StoreError(f"the writer for {self.path} is already finished")

    def finish(self) -> Path:
        """Consolidate, write the manifest last, move the store into place; return its path."""
        self._check_open()
        s = self.shard_stays
        for shard in np.flatnonzero(~self._shards_written):
            if self._present[shard * s:(shard + 1) * s].any():
                raise StoreError(
                    f"images of stays {shard * s}..{min((shard + 1) * s, self.n_stays) - 1} were never "
                    "written although some have a film; call write_images for every shard"
                )
        consolidate(self.partial)
        _write_manifest(self.partial, self.n_stays, self._arrays_meta)
        self._move_into_place()
        self._finished = True
        return self.path

    def _move_into_place(self) -> None:
        if self.path.exists():
            self._check_target()  # appeared since we started, or overwrite of a checked store
            old = self.path.with_name(f"{self.path.name}.old-{secrets.token_hex(4)}")
            os.rename(self.path, old)
            os.rename(self.partial, self.path)
            shutil.rmtree(old)
        else:
            os.rename(self.partial, self.path)

    def abort(self) -> None:
        """Remove the temporary folder (nothing is left at the final path)."""
        self._finished = True
        shutil.rmtree(self.partial, ignore_errors=True)

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and not self._finished:
            self.abort()


def _write_manifest(path: Path, n_stays: int, arrays: dict) -> None:
    manifest = {
        "format_version": FORMAT_VERSION,
        "n_stays": int(n_stays),
        "arrays": arrays,
        "complete": True,
        "created_at": _now(),
    }
    tmp = path / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path / MANIFEST_NAME)


def write_store(
    path: str | os.PathLike,
    content: StoreContent,
    *,
    overwrite: bool = False,
    chunk_stays: int = 256,
) -> Path:
    """Write ``content`` as a complete store at ``path``.

    Parameters
    ----------
    path : str or os.PathLike
        Target path; written via a temporary sibling ``<path>.partial-<random>``.
    content : StoreContent
        Content with ``images`` set.
    overwrite : bool
        Replace an existing store (the old one is removed only after the new one is complete).
    chunk_stays : int
        Stays per EHR chunk and per image shard.

    Returns
    -------
    pathlib.Path
        The absolute store path.

    Raises
    ------
    StoreExistsError
        ``path`` exists and ``overwrite`` is false.
    StoreContentError
        The content does not fit the layout.
    """
    if content.images is None:
        raise StoreContentError("content.images is None; use StoreWriter to stream images region by region")
    images = np.asarray(content.images)
    if images.ndim != 3:
        raise StoreContentError(f"content.images: expected [stay, y, x], got shape {images.shape}")
    with StoreWriter(path, content, images.shape[1], overwrite, chunk_stays=chunk_stays) as writer:
        for start in range(0, writer.n_stays, writer.shard_stays):
            writer.write_images(start, images[start:start + writer.shard_stays])
        return writer.finish()


# --------------------------------------------------------------------------------------------
# reader
# --------------------------------------------------------------------------------------------


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
                f"store {p} has format version {version}, but this cbstore ({_package_version()}) "
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

    # -- labels and splits ---------------------------------------------------------------------

    def _check_task(self, task: str) -> None:
        if task not in TASKS:
            raise StoreError(f"unknown task {task!r}; choose one of {list(TASKS)}")

    def labels(self, task: str) -> np.ndarray:
        """Labels of ``task``: int8 [n] (mortality*), int8 [n, P] (phenotype), int8 los_class [n] (los)."""
        self._check_task(task)
        key = {"phenotype": "phenotype_labels", "los": "los_class"}.get(task, task)
        return np.asarray(self._array(f"labels/{key}")[:], dtype=np.int8)

    def label_names(self, task: str) -> list[str]:
        """Label names: ``[task]`` for mortality*, phenotype names, or the LoS class names."""
        self._check_task(task)
        if task == "phenotype":
            return list(self.phenotype_names)
        if task == "los":
            return list(LOS_CLASS_NAMES)
        return [task]

    def task_mask(self, task: str) -> np.ndarray:
        """bool [n]: stays usable for ``task`` (LoS needs a stay of at least 2 days)."""
        self._check_task(task)
        if task == "los":
            return self.labels("los") >= 0
        return np.ones(self.n_stays, dtype=bool)

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
        arr = self._array(key)
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

    def torch_dataset(self, task: str, fold: int, part: str, *, cohort: str = "full",
                      with_images: bool = True, cxr_drop: np.ndarray | None = None):
        """torch Dataset of ``part`` of ``fold`` for ``task`` (:class:`cbstore.dataset.StayDataset`).

        EHR inputs are imputed and normalised with ``fold``'s training statistics from ``stats/``;
        torch is imported only when this is called.
        """
        from cbstore.dataset import StayDataset

        return StayDataset(self, task, fold, part, cohort=cohort, with_images=with_images, cxr_drop=cxr_drop)

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
        if modality not in MODALITIES:
            raise EmbeddingError(f"unknown modality {modality!r}; choose one of {list(MODALITIES)}")
        if not isinstance(dim, (int, np.integer)) or dim < 1:
            raise EmbeddingError(f"dim must be a positive integer, got {dim!r}")
        if sequence_dim is not None and (not isinstance(sequence_dim, (int, np.integer)) or sequence_dim < 1):
            raise EmbeddingError(f"sequence_dim must be a positive integer or None, got {sequence_dim!r}")
        if region_stays < 1:
            raise EmbeddingError(f"region_stays must be >= 1, got {region_stays}")
        missing = [k for k in EMBEDDING_CALLER_ATTRS if k not in attrs]
        if missing:
            raise EmbeddingError(f"attrs for {modality}/{encoder_id} lack {missing} (provenance is required)")
        if not self.is_writable():
            raise StoreReadOnlyError(
                f"store {self.path} is read-only (no write permission); copy it somewhere writable "
                "or fix its permissions before encoding"
            )
        full = {
            **_jsonable(dict(attrs), f"attrs of {modality}/{encoder_id}"),
            "encoding-type": GROUP_ENCODING["embedding"][0],
            "encoding-version": GROUP_ENCODING["embedding"][1],
            "encoder_id": encoder_id, "modality": modality, "per_fold": bool(per_fold), "dim": int(dim),
            "sequence_dim": None if sequence_dim is None else int(sequence_dim),
            "region_stays": int(region_stays), "created_at": _now(), "complete": False,
        }
        full.setdefault("weights_sha256", None)
        full["library_versions"] = {**_library_versions(), **full.get("library_versions", {})}
        problems = check_schema(full, EMBEDDING_ATTRS_SCHEMA, f"embedding {modality}/{encoder_id} attrs")
        if problems:
            raise EmbeddingError("\n".join(problems))

        root = zarr.open_group(str(self.path), mode="r+", use_consolidated=False)
        gpath = f"{EMBEDDINGS_GROUP}/{modality}/{encoder_id}"
        if gpath in root:
            old = dict(root[gpath].attrs)
            if not overwrite:
                if old.get("complete") is True:
                    raise EmbeddingError(
                        f"embedding {modality}/{encoder_id} in {self.path} is already complete; "
                        "pass --overwrite (overwrite=True) to recompute it"
                    )
                shape = {k: old.get(k) for k in ("dim", "per_fold", "sequence_dim", "region_stays")}
                want = {k: full[k] for k in shape}
                if shape != want:
                    raise EmbeddingError(
                        f"incomplete embedding {modality}/{encoder_id} in {self.path} was started with "
                        f"{shape}, not {want}; pass --overwrite to start again"
                    )
                return EmbeddingWriter(self, modality, encoder_id)
            del root[gpath]
        for sub, etype in ((EMBEDDINGS_GROUP, "embeddings"), (f"{EMBEDDINGS_GROUP}/{modality}", "embeddings")):
            if sub not in root:
                root.create_group(sub, attributes={"encoding-type": GROUP_ENCODING[etype][0],
                                                   "encoding-version": GROUP_ENCODING[etype][1]})
        _create_embedding_arrays(root.create_group(gpath, attributes=full), self, full)
        # the new group is visible as incomplete at once, so a stale complete entry of an
        # overwritten group can never be read
        consolidate(self.path)
        self.refresh()
        return EmbeddingWriter(self, modality, encoder_id)


def _library_versions() -> dict[str, str]:
    import sys
    from importlib import metadata

    out = {"python": sys.version.split()[0], "cbstore": _package_version()}
    for pkg in ("numpy", "zarr", "torch", "torchxrayvision"):
        if pkg in ("numpy", "zarr") or pkg in sys.modules:
            try:
                out[pkg] = metadata.version(pkg)
            except metadata.PackageNotFoundError:
                pass
    return out


def _create_embedding_arrays(grp: zarr.Group, store: Store, attrs: dict) -> None:
    n, rs = store.n_stays, min(attrs["region_stays"], store.n_stays)
    dim, per_fold, seq = attrs["dim"], attrs["per_fold"], attrs["sequence_dim"]
    n_regions = -(-n // attrs["region_stays"])
    folds = store.n_folds
    stay = _create_array(grp, "stay", ARRAYS["stays/stay"], (n,), (min(n, MAX_1D_CHUNK),))
    stay[:] = store.stay_ids
    fspec = ArraySpec("float32", ("fold", "stay", "dim") if per_fold else ("stay", "dim"), float("nan"))
    if per_fold:
        fold = _create_array(grp, "fold", ARRAYS["splits/fold"], (folds,), (folds,))
        fold[:] = np.arange(folds, dtype=np.int8)
        _create_array(grp, "values", fspec, (folds, n, dim), (1, rs, dim))
        _create_array(grp, "done", ArraySpec("bool", ("fold", "region"), False), (folds, n_regions), (1, 1))
    else:
        _create_array(grp, "values", fspec, (n, dim), (rs, dim))
        _create_array(grp, "done", ArraySpec("bool", ("region",), False), (n_regions,), (1,))
    _create_array(grp, "present", ArraySpec("bool", ("stay",), False), (n,), (rs,))
    if seq is not None:
        window = store.window_hours
        time = _create_array(grp, "time", ARRAYS["ehr/time"], (window,), (window,))
        time[:] = np.arange(window, dtype=np.int16)
        if per_fold:
            sspec = ArraySpec("float32", ("fold", "stay", "time", "seq_dim"), float("nan"))
            _create_array(grp, "sequence", sspec, (folds, n, window, seq), (1, rs, window, seq))
        else:
            sspec = ArraySpec("float32", ("stay", "time", "seq_dim"), float("nan"))
            _create_array(grp, "sequence", sspec, (n, window, seq), (rs, window, seq))


class EmbeddingWriter:
    """Region-wise writer of one embedding group (see :meth:`Store.create_embedding`).

    A region is ``region_stays`` consecutive stays, chunk aligned, so separate processes may write
    disjoint regions at once. Each region's ``done`` flag is its own chunk and is set only after
    the region's data; :meth:`write` is idempotent, so an interrupted pass resumes from
    :meth:`done_regions`. The writer holds only plain values (picklable for dask workers).

    Attributes
    ----------
    n_regions : int
    n_stays : int
    region_stays : int
    per_fold : bool
    dim : int
    sequence_dim : int or None
    """

    def __init__(self, store: Store | str | os.PathLike, modality: str, encoder_id: str) -> None:
        self.store_path = str(store.path if isinstance(store, Store) else Path(store).absolute())
        self.modality, self.encoder_id = modality, encoder_id
        self.group_path = f"{EMBEDDINGS_GROUP}/{modality}/{encoder_id}"
        grp = self._group("r")
        attrs = dict(grp.attrs)
        self.dim = int(attrs["dim"])
        self.per_fold = bool(attrs["per_fold"])
        self.sequence_dim = attrs.get("sequence_dim")
        self.region_stays = int(attrs["region_stays"])
        self.n_stays = int(grp["present"].shape[0])
        self.n_folds = int(grp["values"].shape[0]) if self.per_fold else 1
        self.n_regions = -(-self.n_stays // self.region_stays)
        # encoders whose features are NaN by design (e.g. ehr-stats: nothing observed) set this attr
        self.nan_allowed = bool(attrs.get("nan_allowed", False))

    @classmethod
    def open(cls, store_path: str | os.PathLike, modality: str, encoder_id: str) -> "EmbeddingWriter":
        """Open an existing incomplete embedding for writing (e.g. in a dask worker)."""
        return cls(store_path, modality, encoder_id)

    def _group(self, mode: str = "r+") -> zarr.Group:
        try:
            return zarr.open_group(self.store_path, path=self.group_path, mode=mode, use_consolidated=False)
        except FileNotFoundError:
            raise EmbeddingError(f"no embedding group {self.group_path} in {self.store_path}") from None

    def __repr__(self) -> str:
        return (f"EmbeddingWriter({self.store_path!r}, {self.modality}/{self.encoder_id}, "
                f"{int(self.done_regions().sum())}/{self.n_regions} regions done)")

    def region(self, r: int) -> slice:
        """Stay positions of region ``r``."""
        if not 0 <= r < self.n_regions:
            raise EmbeddingError(f"region {r} out of range 0..{self.n_regions - 1}")
        return slice(r * self.region_stays, min((r + 1) * self.region_stays, self.n_stays))

    def done_matrix(self) -> np.ndarray:
        """bool [fold, region] (per-fold encoders) or [1, region]: which parts are written."""
        done = np.asarray(self._group("r")["done"][...], dtype=bool)
        return done.reshape(self.n_folds, self.n_regions)

    @property
    def attrs(self) -> dict:
        """Current attributes of the embedding group (provenance, ``complete``)."""
        return dict(self._group("r").attrs)

    def update_attrs(self, values: dict) -> None:
        """Add or replace provenance attributes (e.g. per-fold training history) before :meth:`finish`.

        Call from one process only (attrs live in one file). ``complete`` cannot be set here.
        """
        if "complete" in values:
            raise EmbeddingError("attrs['complete'] is set by finish(), not update_attrs()")
        self._group("r+").update_attributes(_jsonable(dict(values), f"attrs of {self.group_path}"))

    def done_regions(self) -> np.ndarray:
        """bool [n_regions]: regions written completely (for per-fold encoders: in every fold)."""
        return self.done_matrix().all(axis=0)

    def write(
        self,
        r: int,
        values: np.ndarray,
        present: np.ndarray,
        fold: int | None = None,
        sequence: np.ndarray | None = None,
    ) -> None:
        """Write region ``r`` (for per-fold encoders: one fold of it) and mark it done.

        Parameters
        ----------
        r : int
            Region index.
        values : numpy.ndarray
            float [k, dim] for the k stays of the region; rows of absent stays are stored as NaN.
        present : numpy.ndarray
            bool [k].
        fold : int, optional
            Required for per-fold encoders, must be None otherwise.
        sequence : numpy.ndarray, optional
            float [k, T, sequence_dim], required when the group has a sequence array.

        Raises
        ------
        EmbeddingError
            Wrong shapes, fold, or NaN/inf values for present stays (the message names the stay ids).
        """
        sl = self.region(r)
        k = sl.stop - sl.start
        what = f"{self.modality}/{self.encoder_id} region {r}"
        if self.per_fold:
            if fold is None or not 0 <= int(fold) < self.n_folds:
                raise EmbeddingError(f"{what}: per-fold encoder needs fold=0..{self.n_folds - 1}, got {fold!r}")
        elif fold is not None:
            raise EmbeddingError(f"{what}: encoder is not per fold; do not pass fold")
        values = np.array(values, dtype=np.float32)
        present = np.asarray(present)
        if values.shape != (k, self.dim):
            raise EmbeddingError(f"{what}: values must have shape ({k}, {self.dim}), got {values.shape}")
        if present.shape != (k,) or present.dtype != bool:
            raise EmbeddingError(f"{what}: present must be bool ({k},), got {present.dtype} {present.shape}")
        grp = self._group("r+")
        stay_ids = grp["stay"][sl]
        self._check_finite(values, present, stay_ids, what, self.nan_allowed)
        values[~present] = np.nan
        if (sequence is None) != (self.sequence_dim is None):
            need = "needs" if self.sequence_dim is not None else "has no"
            raise EmbeddingError(f"{what}: this embedding {need} a sequence array")
        if sequence is not None:
            sequence = np.array(sequence, dtype=np.float32)
            window = grp["time"].shape[0]
            if sequence.shape != (k, window, self.sequence_dim):
                raise EmbeddingError(
                    f"{what}: sequence must have shape ({k}, {window}, {self.sequence_dim}), got {sequence.shape}"
                )
            self._check_finite(sequence.reshape(k, -1), present, stay_ids, what + " sequence",
                               self.nan_allowed)
            sequence[~present] = np.nan
        if self.per_fold:
            # present is one array for all folds: folds written earlier must agree with this one
            written = np.asarray(grp["done"][:, r], dtype=bool)
            written[int(fold)] = False
            if written.any():
                stored = np.asarray(grp["present"][sl], dtype=bool)
                if not np.array_equal(stored, present):
                    ids = stay_ids[stored != present][:10].tolist()
                    raise EmbeddingError(
                        f"{what} fold {fold}: present differs from the folds already written for stays "
                        f"{ids}; present must not depend on the fold"
                    )
            grp["values"][int(fold), sl] = values
            if sequence is not None:
                grp["sequence"][int(fold), sl] = sequence
        else:
            grp["values"][sl] = values
            if sequence is not None:
                grp["sequence"][sl] = sequence
        grp["present"][sl] = present
        # the flag goes last: a crash before it leaves the region to be redone
        if self.per_fold:
            grp["done"][int(fold), r] = True
        else:
            grp["done"][r] = True

    @staticmethod
    def _check_finite(values: np.ndarray, present: np.ndarray, stay_ids: np.ndarray, what: str,
                      nan_allowed: bool = False) -> None:
        ok = ~np.isinf(values).any(axis=1) if nan_allowed else np.isfinite(values).all(axis=1)
        bad = present & ~ok
        if bad.any():
            ids = stay_ids[bad][:10].tolist()
            kind = "inf" if nan_allowed else "NaN/inf"
            raise EmbeddingError(f"{what}: {kind} values for present stays {ids} ({int(bad.sum())} in all)")

    def finish(self) -> None:
        """Check every region is done and no present stay has NaN; mark complete; re-consolidate.

        Raises
        ------
        EmbeddingError
            Regions not written, or NaN values for present stays (the message names the stay ids).
        """
        done = self.done_matrix()
        if not done.all():
            missing = [(f, r) for f, r in zip(*np.nonzero(~done))]
            where = ", ".join(f"region {r}" + (f" fold {f}" if self.per_fold else "") for f, r in missing[:8])
            raise EmbeddingError(
                f"embedding {self.modality}/{self.encoder_id}: {len(missing)} region(s) not written yet "
                f"({where}{', ...' if len(missing) > 8 else ''}); resume the pass before finishing"
            )
        grp = self._group("r+")
        present = np.asarray(grp["present"][...], dtype=bool)
        stay_ids = np.asarray(grp["stay"][...])
        names = ["values"] + (["sequence"] if "sequence" in grp else [])
        for name in names:
            arr = grp[name]
            for f in range(self.n_folds):
                for r in range(self.n_regions):
                    sl = self.region(r)
                    block = np.asarray(arr[f, sl] if self.per_fold else arr[sl])
                    block = block.reshape(len(block), -1)
                    fold_note = f" fold {f}" if self.per_fold else ""
                    self._check_finite(block, present[sl], stay_ids[sl],
                                       f"embedding {self.modality}/{self.encoder_id} {name}{fold_note}",
                                       self.nan_allowed)
        grp.update_attributes({"complete": True, "completed_at": _now()})
        consolidate(self.store_path)

