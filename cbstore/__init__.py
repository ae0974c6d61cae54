"""cbstore: a Zarr v3 feature store of MIMIC-IV ICU stays with chest X-rays, and tools around it.

``import cbstore`` is light: it never imports torch. The store API is loaded on first use::

    from cbstore import open_store
    store = open_store("mimic.zarr")
"""

from __future__ import annotations

from importlib import metadata as _metadata
from typing import Any

from cbstore.format.schema import FORMAT_VERSION

try:
    __version__ = _metadata.version("cbstore")
except _metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = ["FORMAT_VERSION", "Store", "StoreError", "__version__", "open_store", "write_store"]

_LAZY = {
    "open_store": "cbstore.store.reader",
    "write_store": "cbstore.store.writer",
    "Store": "cbstore.store.reader",
    "StoreError": "cbstore.errors",
    "StayDataset": "cbstore.inputs.dataset",
}


def __getattr__(name: str) -> Any:
    """Import the store API (and the torch-dependent dataset) only when first used."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cbstore' has no attribute {name!r}")
