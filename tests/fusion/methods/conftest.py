"""Fixtures of the method tests."""

import pytest

from support import tiny_store


@pytest.fixture(scope="session")
def store(tmp_path_factory):
    """The 60-stay fusion store the missing-modality method tests share (read only); a test file
    with a store of its own defines a fixture of this name."""
    return tiny_store(tmp_path_factory.mktemp("methods") / "store.zarr")
