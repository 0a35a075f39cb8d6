"""Fixtures shared by several test files."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for these tiny tensors: as fast as two on an idle machine, and ten times
    faster on a busy one (two threads then wait for each other); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
