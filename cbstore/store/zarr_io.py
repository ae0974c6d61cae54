"""zarr helpers shared by the store writer, the reader and the embedding writer.

Codec choice, array creation with the layout's dtype, dimension names and fill value,
consolidation of the root metadata, running zarr's asynchronous API, and JSON-safe attributes
(see ``store_layout.md``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Coroutine, Iterator, TypeVar

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from cbstore.errors import StoreContentError
from cbstore.format.schema import MANIFEST_NAME, ArraySpec

T = TypeVar("T")

#: Largest chunk of the per-stay 1-D arrays.
MAX_1D_CHUNK = 65_536

#: zstd level of every array. Level 1 compresses the EHR tensor about 9x faster than level 5 did
#: (with bit-shuffle) and smaller, and films within 3 % of level 5's size (store_layout.md,
#: "Chunking and compression").
ZSTD_LEVEL = 1


def codec_for(spec: ArraySpec) -> BloscCodec:
    """The Blosc codec of an array: zstd, bit-shuffle for 1-byte numbers, byte-shuffle for wider ones.

    Strings serialise to variable-length bytes, on which shuffling is meaningless. Bit-shuffle
    suits booleans, 0/1 labels and 8-bit films; byte-shuffle suits float32 and int64 (it
    compresses the EHR tensor 6.5-fold, bit-shuffle 4.2-fold, in about the same time).
    """
    if spec.is_string:
        return BloscCodec(cname="zstd", clevel=ZSTD_LEVEL, shuffle="noshuffle")
    itemsize = np.dtype(spec.dtype).itemsize
    return BloscCodec(cname="zstd", clevel=ZSTD_LEVEL, shuffle="bitshuffle" if itemsize == 1 else "shuffle",
                      typesize=itemsize)


def package_version() -> str:
    """The installed cbstore version."""
    from cbstore import __version__

    return __version__


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


def array_options(
    spec: ArraySpec,
    shape: tuple[int, ...],
    chunks: tuple[int, ...],
    *,
    shards: tuple[int, ...] | None = None,
    attrs: dict | None = None,
) -> dict[str, Any]:
    """Keyword arguments of ``create_array``: the layout's dtype, dimension names, fill value and codec."""
    return {
        "shape": shape,
        "dtype": str if spec.is_string else spec.dtype,
        "chunks": chunks,
        "shards": shards,
        "dimension_names": spec.dims,
        "fill_value": spec.fill,
        "compressors": (codec_for(spec),),
        "attributes": attrs or {},
    }


def create_array(
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
    return group.create_array(name, **array_options(spec, shape, chunks, shards=shards, attrs=attrs))


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion on a private event loop, in a helper thread.

    The helper thread makes this safe where an event loop already runs (e.g. a Jupyter cell).
    ``asyncio.run`` cancels what is left of ``coro`` on an error and waits for its worker threads,
    so nothing is still writing when this returns or raises.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cbstore-zarr") as pool:
        return pool.submit(asyncio.run, coro).result()


def jsonable(attrs: dict, name: str) -> dict:
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
