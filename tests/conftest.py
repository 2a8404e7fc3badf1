"""Fixtures shared by the test files."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module: its tiny matrices on a shared 2-core machine mostly make extra threads wait
    on each other (a tiny step ran 50x slower with two threads under load), and fits then round the same way as in
    the single-threaded subprocesses they are compared with. Use with `pytestmark = pytest.mark.usefixtures(...)`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
