"""Writing a store: :func:`write_store` and :class:`StoreWriter` (the layout of ``store_layout.md``).

The writer checks a :class:`~cbstore.format.content.StoreContent` against the layout, writes it into a
temporary sibling ``<path>.partial-<random>``, consolidates the root metadata once, writes
``cbstore_manifest.json`` last and renames the folder into place, so nothing half-written ever
sits at the final path. Image shards are written by :class:`cbstore.store.image_shards.ShardWriter`,
only for shards holding at least one film.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr
import zarr.api.asynchronous

from cbstore.errors import StoreContentError, StoreError, StoreExistsError
from cbstore.format.content import CXR_COLUMNS, FEATURE_COLUMNS, PART_CODES, STAT_NAMES, STAY_COLUMNS, StoreContent
from cbstore.format.schema import (
    ARRAYS,
    DATETIME_ATTRS,
    DATETIME_COLUMNS,
    FORMAT_VERSION,
    GROUP_ENCODING,
    GROUPS,
    LOS_CLASS_NAMES,
    MANIFEST_NAME,
    ROOT_ATTRS_KEY,
    check_packaged,
    config_sha256,
    now,
)
from cbstore.store.image_shards import ShardWriter
from cbstore.store.zarr_io import MAX_1D_CHUNK, array_options, consolidate, jsonable, package_version, run_async

__all__ = ["PartitionedStoreWriter", "StoreWriter", "write_store"]


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


def _check_values(values: Any, name: str) -> np.ndarray:
    """The EHR tensor (or a block of it) as float32, refusing inf."""
    values = np.asarray(values)
    if values.dtype != np.float32:
        values = _lossless(values, "float32", name)
    if np.isinf(values).any():
        raise StoreContentError(f"{name}: contains inf; use NaN for 'not observed'")
    return values


def _check_shape(arr: np.ndarray, shape: tuple[int | None, ...], name: str) -> None:
    if arr.ndim != len(shape) or any(want is not None and got != want for got, want in zip(arr.shape, shape)):
        want = tuple("?" if s is None else s for s in shape)
        raise StoreContentError(f"{name}: expected shape {want}, got {arr.shape}")


def _prepare(content: StoreContent, image_size: int | None,
             ehr_shape: tuple[int, int, int] | None = None) -> dict[str, np.ndarray]:
    """Check ``content`` against the layout and convert it to ``{array path: numpy array}``.

    Images are not included (they are written separately), nor ``ehr/values`` and
    ``ehr/observed`` when ``content.ehr_values`` is None, in which case ``ehr_shape`` gives the
    tensor's shape (it was written block by block). Raises StoreContentError naming the first
    problem found.
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
    if content.ehr_values is None:
        if ehr_shape is None or tuple(ehr_shape)[::2] != (n, n_feat):
            raise StoreContentError(f"content.ehr_values is None and the tensor written has shape {ehr_shape}, "
                                    f"not ({n}, window, {n_feat})")
        values, window = None, int(ehr_shape[1])
    else:
        values = _check_values(content.ehr_values, "content.ehr_values")
        _check_shape(values, (n, None, n_feat), "content.ehr_values")
        window = values.shape[1]
    if window < 1:
        raise StoreContentError("content.ehr_values: the time axis is empty")
    names = _strings(features["name"].tolist(), "content.features['name']")
    if len(set(names)) != n_feat or "" in set(names):
        raise StoreContentError("content.features['name']: names must be non-empty and unique")
    kinds = _strings(features["kind"].tolist(), "content.features['kind']")
    bad = sorted(set(kinds) - {"continuous", "binary"})
    if bad:
        raise StoreContentError(f"content.features['kind']: unknown kinds {bad}; use 'continuous' or 'binary'")
    out["ehr/time"] = np.arange(window, dtype=np.int16)
    out["ehr/feature"] = names
    if values is not None:
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
    attrs = jsonable(dict(content.attrs), "content.attrs")
    attrs.setdefault("config_sha256", config_sha256(attrs.get("config", {})))
    derived = {
        "n_stays": len(arrays["stays/stay"]),
        "window_hours": len(arrays["ehr/time"]),
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
        created_by=f"cbstore {package_version()}",
        created_at=now(),
        chunks={k: list(v) for k, v in chunks.items()},
        shards={k: list(v) for k, v in shards.items()},
    )
    problems = check_packaged(attrs, "root_attrs", "content.attrs")
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


def _group_attrs(group: str) -> dict[str, Any]:
    etype, eversion = GROUP_ENCODING[group]
    attrs: dict[str, Any] = {"encoding-type": etype, "encoding-version": eversion}
    if group == "stays":
        attrs.update({"_index": "stay", "column-order": list(STAY_COLUMNS)})
    return attrs


def _array_attrs(key: str) -> dict[str, Any]:
    group, name = key.split("/", 1)
    attrs: dict[str, Any] = {}
    if (group == "stays" and name in DATETIME_COLUMNS) or key == "cxr/study_time":
        attrs.update(DATETIME_ATTRS)
        if key == "cxr/study_time":
            attrs["missing_value"] = -1  # CF: xarray decodes "no film" to NaT
    if group == "stays" and name != "stay":
        # anndata dataframe columns carry their own element encoding
        attrs.update({"encoding-type": "string-array" if ARRAYS[key].is_string else "array",
                      "encoding-version": "0.2.0"})
    return attrs


def _layout(shapes: dict[str, tuple[int, ...]], n_stays: int, shard_stays: int,
            image_size: int) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """Chunk shapes of every array in ``shapes`` and shard shapes (``cxr/images``), as stored."""
    c1 = min(n_stays, MAX_1D_CHUNK)
    chunks: dict[str, tuple[int, ...]] = {}
    for key, shape in shapes.items():
        if ARRAYS[key].dims[0] == "stay":
            first = shard_stays if len(shape) == 3 else c1
            chunks[key] = (first, *shape[1:])
        else:
            chunks[key] = tuple(shape)
    chunks["cxr/images"] = (1, image_size, image_size)
    return chunks, {"cxr/images": (shard_stays, image_size, image_size)}


def _plan(shapes: dict[str, tuple[int, ...]], chunks: dict, shards: dict) -> list[tuple[str, str, dict]]:
    """``(group, name, create_array options)`` of each array of ``shapes``."""
    return [(*key.split("/", 1), array_options(ARRAYS[key], shapes[key], chunks[key], shards=shards.get(key),
                                               attrs=_array_attrs(key)))
            for key in shapes]


async def _write_arrays(partial: Path, root_attrs: dict, arrays: dict[str, np.ndarray],
                        shapes: dict[str, tuple[int, ...]], chunks: dict[str, tuple[int, ...]],
                        shards: dict[str, tuple[int, ...]], *, fresh: bool = True) -> None:
    """Create the arrays of ``shapes`` and write those given in ``arrays`` whole.

    With ``fresh``, the root (with ``root_attrs``) and every group are created first; otherwise
    they exist already and ``root_attrs`` are added to the root's. One call per step for all
    arrays at once: zarr's per-array work (metadata checks and writes, codec hand-offs to
    threads) then overlaps instead of running array after array.
    """
    # every argument is computed before the first coroutine exists, so an error here leaves none unawaited
    plan = _plan(shapes, chunks, shards)
    if fresh:
        root = await zarr.api.asynchronous.open_group(store=str(partial), mode="w-", zarr_format=3,
                                                      attributes=root_attrs)
        made = await asyncio.gather(*[root.create_group(g, attributes=_group_attrs(g)) for g in GROUPS])
    else:
        root = await zarr.api.asynchronous.open_group(store=str(partial), mode="r+", zarr_format=3)
        await root.update_attributes(root_attrs)
        made = await asyncio.gather(*[root.getitem(g) for g in GROUPS])
    groups = dict(zip(GROUPS, made))
    # not fresh: a finish that was interrupted may have created some of the arrays already
    created = await asyncio.gather(*[groups[group].create_array(name, **options, overwrite=not fresh)
                                     for group, name, options in plan])
    await asyncio.gather(*[zarr_arr.setitem(Ellipsis, arrays[key])
                           for zarr_arr, key in zip(created, shapes) if key in arrays])


def _arrays_meta(shapes: dict[str, tuple[int, ...]]) -> dict[str, dict]:
    """The manifest's ``arrays``: path -> shape and dtype."""
    return {key: {"shape": list(shape), "dtype": ARRAYS[key].dtype} for key, shape in shapes.items()}


def _write_image_block(shards: ShardWriter, n: int, s: int, image_size: int, start: int, images: np.ndarray,
                       present: np.ndarray) -> None:
    """Write the image shards of stays ``start .. start + len(images)`` (shard-aligned; see StoreWriter)."""
    images = np.asarray(images)
    k = len(images)
    if images.dtype != np.uint8 or images.shape[1:] != (image_size, image_size):
        raise StoreContentError(
            f"images: expected uint8 [k, {image_size}, {image_size}], got {images.dtype} {images.shape}"
        )
    stop = start + k
    if k == 0 or start < 0 or start % s or stop > n or (stop % s and stop != n):
        raise StoreContentError(
            f"images: block {start}..{stop} is not aligned to shards of {s} stays (n_stays {n})"
        )
    stray = images.reshape(k, -1).any(axis=1) & ~present
    if stray.any():
        row = start + int(np.argmax(stray))
        raise StoreContentError(f"images: stay position {row} has no film (cxr present false) but a non-zero image")
    for shard in range(start // s, -(-stop // s)):
        lo = shard * s - start
        shards.write(shard, images[lo:lo + s], present[lo:lo + s])


def _move_into_place(partial: Path, path: Path, check_target) -> None:
    """Rename the finished ``partial`` folder to ``path``, replacing a checked existing store."""
    if path.exists():
        check_target()  # appeared since we started, or overwrite of a checked store
        old = path.with_name(f"{path.name}.old-{secrets.token_hex(4)}")
        os.rename(path, old)
        os.rename(partial, path)
        shutil.rmtree(old)
    else:
        os.rename(partial, path)


def _check_target(path: Path, overwrite: bool) -> None:
    """Refuse an existing ``path`` unless ``overwrite`` and it is a cbstore store."""
    if not path.exists():
        return
    if not overwrite:
        raise StoreExistsError(f"{path} exists; pass --overwrite (overwrite=True) to replace it")
    if not path.is_dir() or not _is_cbstore_dir(path):
        raise StoreExistsError(
            f"{path} exists and is not a cbstore store; refusing to replace it even with "
            "--overwrite: remove it yourself or choose another path"
        )


class StoreWriter:
    """Write a store, streaming images shard by shard.

    All arrays except ``cxr/images`` are written on construction, into a temporary sibling folder
    ``<path>.partial-<random>``; :meth:`write_images` writes image shards; :meth:`finish`
    consolidates, writes the manifest last and renames the folder to ``path``. Used as a context
    manager, an exception inside the ``with`` block removes the temporary folder.

    Only the films of stays whose ``cxr.present`` is true are stored: the image chunks of the
    other stays are never written (readers see the fill value 0), and a shard without any film
    writes no file.

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

        shapes = {key: arr.shape for key, arr in arrays.items()}
        shapes["cxr/images"] = (n, self.image_size, self.image_size)
        chunks, shards = _layout(shapes, n, self.shard_stays, self.image_size)
        attrs = _root_attrs(content, arrays, image_size, chunks, shards)

        self.partial = self.path.with_name(f"{self.path.name}.partial-{secrets.token_hex(4)}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._finished = False
        try:
            root_attrs = {ROOT_ATTRS_KEY: attrs, "encoding-type": "cbstore", "encoding-version": FORMAT_VERSION}
            run_async(_write_arrays(self.partial, root_attrs, arrays, shapes, chunks, shards))
            images = zarr.open_array(str(self.partial / "cxr" / "images"), mode="r+")
            self._shards = ShardWriter(images, self.partial / "cxr" / "images")
        except BaseException:
            self.abort()
            raise
        self._arrays_meta = _arrays_meta(shapes)

    def _check_target(self) -> None:
        _check_target(self.path, self.overwrite)

    def write_images(self, start: int, images: np.ndarray) -> None:
        """Write images of stays ``start .. start + len(images)``.

        ``start`` must be a multiple of the shard size (``chunk_stays``) and the block must end at
        a shard boundary or at the last stay, so concurrent writers never share a shard. Images of
        stays without a film must be all zero; they are checked, not stored.
        """
        self._check_open()
        n, s = self.n_stays, self.shard_stays
        stop = start + len(images)
        _write_image_block(self._shards, n, s, self.image_size, start, images, self._present[start:stop])
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
        _move_into_place(self.partial, self.path, self._check_target)

    def abort(self) -> None:
        """Remove the temporary folder (nothing is left at the final path)."""
        self._finished = True
        shutil.rmtree(self.partial, ignore_errors=True)

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and not self._finished:
            self.abort()


#: Arrays a :class:`PartitionedStoreWriter` writes block by block; :meth:`PartitionedStoreWriter.finish`
#: writes all the others.
BLOCK_ARRAYS = ("ehr/values", "ehr/observed", "cxr/images")


class PartitionedStoreWriter:
    """Write a store whose large arrays arrive block by block, possibly over several runs.

    The folder ``partial`` holds the unfinished store. On construction it gets the root, the
    groups and the empty arrays of :data:`BLOCK_ARRAYS` (or, if it already holds them with the
    same shapes, is reopened: an interrupted build resumes there). :meth:`write_ehr` and
    :meth:`write_images` write whole chunks and shards of the stays of one block;
    rewriting a block gives the same bytes. :meth:`finish` writes every other array from a
    :class:`~cbstore.format.content.StoreContent` whose ``ehr_values`` and ``images`` are None,
    consolidates, writes the manifest last and renames ``partial`` to the final path.

    Parameters
    ----------
    partial : str or os.PathLike
        Folder of the unfinished store (next to the final path, on the same file system).
    n_stays, window, n_features, image_size : int
        Shape of the EHR tensor ``[n_stays, window, n_features]`` and side of the films.
    chunk_stays : int
        Stays per EHR chunk and per image shard (capped at ``n_stays``).

    Raises
    ------
    StoreError
        ``partial`` holds arrays of other shapes.
    """

    def __init__(self, partial: str | os.PathLike, n_stays: int, window: int, n_features: int, image_size: int,
                 *, chunk_stays: int = 256) -> None:
        if min(n_stays, window, n_features, image_size, chunk_stays) < 1:
            raise StoreContentError(f"n_stays, window, n_features, image_size and chunk_stays must be >= 1, got "
                                    f"{(n_stays, window, n_features, image_size, chunk_stays)}")
        self.partial = Path(partial).absolute()
        self.n_stays, self.image_size = int(n_stays), int(image_size)
        self.shard_stays = min(int(chunk_stays), self.n_stays)
        self.shapes = {"ehr/values": (self.n_stays, int(window), int(n_features)),
                       "ehr/observed": (self.n_stays, int(window), int(n_features)),
                       "cxr/images": (self.n_stays, self.image_size, self.image_size)}
        self.chunks, self.shards = _layout(self.shapes, self.n_stays, self.shard_stays, self.image_size)
        if not (self.partial / "zarr.json").is_file():
            shutil.rmtree(self.partial, ignore_errors=True)  # a creation that did not finish
            self.partial.parent.mkdir(parents=True, exist_ok=True)
            root_attrs = {"encoding-type": "cbstore", "encoding-version": FORMAT_VERSION}
            run_async(_write_arrays(self.partial, root_attrs, {}, self.shapes, self.chunks, self.shards))
        self._arrays = {key: zarr.open_array(str(self.partial / key), mode="r+") for key in BLOCK_ARRAYS}
        for key, array in self._arrays.items():
            if array.shape != self.shapes[key]:
                raise StoreError(f"the unfinished store {self.partial} has {key} of shape {array.shape}, not "
                                 f"{self.shapes[key]}; remove it (or rebuild with --overwrite)")
        self._shards = ShardWriter(self._arrays["cxr/images"], self.partial / "cxr" / "images")

    @property
    def values(self) -> zarr.Array:
        """The ``ehr/values`` array as written so far (for statistics computed from the store)."""
        return self._arrays["ehr/values"]

    def write_ehr(self, start: int, values: np.ndarray) -> None:
        """Write ``ehr/values`` and ``ehr/observed`` of stays ``start .. start + len(values)``.

        The block must start at a chunk boundary and end at one or at the last stay.
        """
        values = _check_values(values, "ehr values")
        n, s = self.n_stays, self.shard_stays
        stop = start + len(values)
        _check_shape(values, (None, *self.shapes["ehr/values"][1:]), "ehr values")
        if len(values) == 0 or start < 0 or start % s or stop > n or (stop % s and stop != n):
            raise StoreContentError(f"ehr values: block {start}..{stop} is not aligned to chunks of {s} stays "
                                    f"(n_stays {n})")
        self._arrays["ehr/values"][start:stop] = values
        self._arrays["ehr/observed"][start:stop] = ~np.isnan(values)

    def write_images(self, start: int, images: np.ndarray, present: np.ndarray) -> None:
        """Write the image shards of stays ``start .. start + len(images)`` (only films where ``present``)."""
        present = np.asarray(present, dtype=bool)
        if present.shape != (len(images),):
            raise StoreContentError(f"images: {len(images)} images but present has shape {present.shape}")
        _write_image_block(self._shards, self.n_stays, self.shard_stays, self.image_size, start, images, present)

    def finish(self, path: str | os.PathLike, content: StoreContent, overwrite: bool = False) -> Path:
        """Write the other arrays and the attributes, consolidate, write the manifest, move into place.

        ``content.ehr_values`` and ``content.images`` must be None (they were written block by
        block). Every shard holding a film of ``content.cxr.present`` must have been written.

        Returns
        -------
        pathlib.Path
            The absolute store path.
        """
        path = Path(path).absolute()
        _check_target(path, overwrite)
        if content.ehr_values is not None or content.images is not None:
            raise StoreContentError("content.ehr_values and content.images must be None: they were written "
                                    "block by block")
        arrays = _prepare(content, self.image_size, ehr_shape=self.shapes["ehr/values"])
        if len(arrays["stays/stay"]) != self.n_stays:
            raise StoreContentError(f"content has {len(arrays['stays/stay'])} stays, the arrays written "
                                    f"{self.n_stays}")
        self._check_films(arrays["cxr/present"])
        shapes = {key: arr.shape for key, arr in arrays.items()}
        chunks, shards = _layout({**shapes, **self.shapes}, self.n_stays, self.shard_stays, self.image_size)
        attrs = _root_attrs(content, arrays, self.image_size, chunks, shards)
        run_async(_write_arrays(self.partial, {ROOT_ATTRS_KEY: attrs}, arrays, shapes, chunks, shards, fresh=False))
        consolidate(self.partial)
        _write_manifest(self.partial, self.n_stays, _arrays_meta({**shapes, **self.shapes}))
        _move_into_place(self.partial, path, lambda: _check_target(path, overwrite))
        return path

    def _check_films(self, present: np.ndarray) -> None:
        s = self.shard_stays
        images = self._arrays["cxr/images"]
        for shard in range(-(-self.n_stays // s)):
            key = images.metadata.encode_chunk_key((shard, 0, 0))
            if present[shard * s:(shard + 1) * s].any() and not (self.partial / "cxr" / "images" / key).is_file():
                raise StoreError(f"images of stays {shard * s}..{min((shard + 1) * s, self.n_stays) - 1} were "
                                 f"never written although some have a film")


def _write_manifest(path: Path, n_stays: int, arrays: dict) -> None:
    manifest = {
        "format_version": FORMAT_VERSION,
        "n_stays": int(n_stays),
        "arrays": arrays,
        "complete": True,
        "created_at": now(),
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
