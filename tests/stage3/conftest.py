"""One torch thread for these tests: on a shared 2-core machine OpenMP spinning makes small
tensor ops hundreds of times slower with two threads than with one."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
