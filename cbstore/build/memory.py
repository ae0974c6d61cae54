"""Handing freed heap memory back to the operating system between the steps of a build.

Three allocators share the build process, and two of them keep what is freed for reuse instead
of returning it, so that over a long build the resident size creeps up partition after
partition although nothing more is held:

* glibc's ``malloc`` (Python, NumPy, PIL; the main thread and each decoding thread's arena):
  ``malloc_trim(0)`` returns the free pages of every arena;
* pyarrow's pool (mimalloc), where pandas keeps the characters of its ``str`` columns (the
  MIMIC-CXR metadata table, the per-stay tables): ``release_unused()`` returns what the freed
  columns held (46 MB after the film selection of 40,000 synthetic stays);
* DuckDB's jemalloc returns its free pages by itself once its background threads are on
  (:class:`cbstore.build.extract.Extractor` turns them on).

Each call costs a few milliseconds. Where the C library has no ``malloc_trim`` (macOS, musl) that
part is skipped; pyarrow is released only if pandas loaded it (the build does not import it).
"""

from __future__ import annotations

import ctypes
import sys


def release_free_memory() -> None:
    """Return the free pages of glibc's heap and of pyarrow's pool (if loaded) to the operating system."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim.argtypes = [ctypes.c_size_t]
        trim(0)
    pyarrow = sys.modules.get("pyarrow")
    if pyarrow is not None:
        pyarrow.default_memory_pool().release_unused()
