"""Handing freed heap memory back to the operating system between the steps of a build.

Three allocators share the build process, and each keeps what is freed for reuse instead of
returning it at once, so that over a long build the resident size creeps up partition after
partition although nothing more is held:

* glibc's ``malloc`` (Python, NumPy, PIL; the main thread and each decoding thread's arena):
  ``malloc_trim(0)`` returns the free pages of every arena;
* pyarrow's pool (mimalloc), where pandas keeps the characters of its ``str`` columns (the
  MIMIC-CXR metadata rows, the per-stay tables): ``release_unused()`` returns what the freed
  columns held;
* DuckDB's jemalloc keeps what a query freed for its decay time (DuckDB sets 1 s), so that the
  pages of one partition are still resident when the next one allocates its own: purging all its
  arenas returns them (with 40,000 synthetic stays, the partitions then start at 262-282 MB
  instead of 316-409 MB).

Each call costs a few milliseconds. Where the C library has no ``malloc_trim`` (macOS, musl) that
part is skipped; pyarrow is released only if pandas loaded it (the build does not import it), and
DuckDB's arenas only where its module exports jemalloc's control call (the Linux builds).
"""

from __future__ import annotations

import ctypes
import sys
from importlib.machinery import EXTENSION_SUFFIXES


#: jemalloc's name for all arenas at once (``MALLCTL_ARENAS_ALL``) in ``arena.<i>.purge``.
_ALL_ARENAS = 4096


def release_free_memory() -> None:
    """Return the free pages of glibc's heap, pyarrow's pool and DuckDB's jemalloc (if loaded) to the operating system."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim.argtypes = [ctypes.c_size_t]
        trim(0)
    pyarrow = sys.modules.get("pyarrow")
    if pyarrow is not None:
        pyarrow.default_memory_pool().release_unused()
    _purge_duckdb_arenas()


def _purge_duckdb_arenas() -> None:
    """Return the free pages of every arena of DuckDB's jemalloc, if DuckDB is loaded and built with it."""
    library = _duckdb_library()
    if library is None:
        return
    mallctl = getattr(ctypes.CDLL(library), "duckdb_je_mallctl", None)
    if mallctl is None:  # a build of DuckDB without jemalloc (macOS, Windows)
        return
    mallctl.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    mallctl(f"arena.{_ALL_ARENAS}.purge".encode(), None, None, None, 0)


def _duckdb_library() -> str | None:
    """The file of DuckDB's compiled module if it is loaded (``_duckdb``, or ``duckdb.duckdb`` in older releases)."""
    for name, module in list(sys.modules.items()):  # a copy: another thread may be importing
        if name == "_duckdb" or name.startswith("duckdb."):
            path = getattr(module, "__file__", None) or ""
            if path.endswith(tuple(EXTENSION_SUFFIXES)):
                return path
    return None
