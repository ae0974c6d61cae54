"""Fixtures shared by several test files."""

import pytest


@pytest.fixture
def one_torch_thread():
    """Run the test with one torch thread (bit-identical CPU results; fair on 2 shared cores)."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
