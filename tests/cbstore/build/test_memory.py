"""release_free_memory: trims glibc's heap where it can, releases pyarrow's pool only if loaded."""

import sys
import types

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
