"""Fixtures of the method tests."""

import pytest

from support import make_fusion_store, tiny_store


@pytest.fixture(scope="session")
def store(tmp_path_factory):
    """The 60-stay fusion store the missing-modality method tests share (read only); a test file
    with a store of its own defines a fixture of this name."""
    return tiny_store(tmp_path_factory.mktemp("methods") / "store.zarr")


@pytest.fixture(scope="session")
def store80(tmp_path_factory):
    """The 80-stay fusion store (embeddings and spatial maps) that the other method tests share;
    read only."""
    return make_fusion_store(tmp_path_factory.mktemp("methods80") / "store.zarr", n_stays=80)
