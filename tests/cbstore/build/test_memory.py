"""release_free_memory: trims glibc's heap where it can, releases pyarrow's pool and purges DuckDB's jemalloc only if loaded."""

import ctypes
import sys
import types

import pytest

from cbstore.build import memory


class _Pool:
    def __init__(self):
        self.released = 0

    def release_unused(self):
        self.released += 1


def _fake_pyarrow(pool):
    return types.SimpleNamespace(default_memory_pool=lambda: pool)


def test_it_releases_pyarrows_pool_when_pyarrow_is_loaded(monkeypatch):
    pool = _Pool()
    monkeypatch.setitem(sys.modules, "pyarrow", _fake_pyarrow(pool))
    memory.release_free_memory()
    assert pool.released == 1


def test_it_does_not_import_pyarrow(monkeypatch):
    monkeypatch.delitem(sys.modules, "pyarrow", raising=False)
    memory.release_free_memory()
    assert "pyarrow" not in sys.modules


def test_a_c_library_without_malloc_trim_is_skipped(monkeypatch):
    monkeypatch.setattr(memory.ctypes, "CDLL", lambda name: types.SimpleNamespace())
    pool = _Pool()
    monkeypatch.setitem(sys.modules, "pyarrow", _fake_pyarrow(pool))
    memory.release_free_memory()
    assert pool.released == 1


def test_malloc_trim_is_called_with_zero_padding(monkeypatch):
    calls = []

    class Trim:
        argtypes = None

        def __call__(self, pad):
            calls.append(pad)

    monkeypatch.setattr(memory.ctypes, "CDLL", lambda name: types.SimpleNamespace(malloc_trim=Trim()))
    monkeypatch.delitem(sys.modules, "pyarrow", raising=False)
    memory.release_free_memory()
    assert calls == [0]


def _unload_duckdb(monkeypatch):
    for name in [n for n in sys.modules if n == "_duckdb" or n.startswith("duckdb")]:
        monkeypatch.delitem(sys.modules, name)


@pytest.mark.parametrize("module", ["_duckdb", "duckdb.duckdb"])  # DuckDB >= 1.4, and before
def test_it_purges_every_arena_of_duckdbs_jemalloc_when_duckdb_is_loaded(monkeypatch, module):
    calls = []

    def mallctl(name, *rest):
        calls.append((name, rest))
        return 0

    library = types.SimpleNamespace(duckdb_je_mallctl=mallctl)
    monkeypatch.setattr(memory.ctypes, "CDLL", lambda name: library if name == "/fake/_duckdb.so" else types.SimpleNamespace())
    _unload_duckdb(monkeypatch)
    monkeypatch.setitem(sys.modules, module, types.SimpleNamespace(__file__="/fake/_duckdb.so"))
    memory.release_free_memory()
    assert calls == [(b"arena.4096.purge", (None, None, None, 0))]


def test_duckdb_without_jemalloc_or_not_loaded_is_skipped(monkeypatch):
    monkeypatch.setattr(memory.ctypes, "CDLL", lambda name: types.SimpleNamespace())
    monkeypatch.setitem(sys.modules, "_duckdb", types.SimpleNamespace(__file__="/fake/_duckdb.so"))
    memory.release_free_memory()
    _unload_duckdb(monkeypatch)
    memory.release_free_memory()
    assert memory._duckdb_library() is None


def _dirty_pages_of_duckdbs_jemalloc(mallctl) -> int:
    epoch = ctypes.c_uint64(1)
    mallctl(b"epoch", None, None, ctypes.byref(epoch), ctypes.sizeof(epoch))  # refresh the statistics
    pages, size = ctypes.c_size_t(0), ctypes.c_size_t(ctypes.sizeof(ctypes.c_size_t))
    assert mallctl(b"stats.arenas.4096.pdirty", ctypes.byref(pages), ctypes.byref(size), None, 0) == 0
    return pages.value


def test_freed_duckdb_pages_are_returned_for_real():
    duckdb = pytest.importorskip("duckdb")
    mallctl = getattr(ctypes.CDLL(memory._duckdb_library()), "duckdb_je_mallctl", None)
    if mallctl is None:
        pytest.skip("this DuckDB build has no jemalloc")
    mallctl.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    with duckdb.connect() as con:
        con.execute("CREATE TABLE t AS SELECT range AS i, md5(range::VARCHAR) AS s FROM range(300000)")
        con.execute("DROP TABLE t")
        assert _dirty_pages_of_duckdbs_jemalloc(mallctl) > 0  # freed, still resident
        memory.release_free_memory()
        assert _dirty_pages_of_duckdbs_jemalloc(mallctl) == 0
