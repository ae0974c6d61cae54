"""Fixtures of the encoder tests."""

import pytest

from encoders import weights as W


@pytest.fixture
def no_library_cache(tmp_path, monkeypatch):
    """Point the library caches at an empty folder and clear $CBSTORE_WEIGHTS_DIR."""
    empty = tmp_path / "library-cache"
    empty.mkdir()
    monkeypatch.setattr(W, "library_cache_dir", lambda library: empty)
    monkeypatch.delenv(W.WEIGHTS_DIR_ENV, raising=False)
    return empty
