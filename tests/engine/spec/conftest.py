"""Fixtures for the speculative-decoding tests: one thread (tiny matmuls on a shared machine)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
