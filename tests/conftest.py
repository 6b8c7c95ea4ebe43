"""Test setup: on a machine without a GPU, run Triton kernels in the interpreter (DESIGN §7)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before any module decorated with @triton.jit is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def one_thread():
    """Tiny models: one torch thread per test process (xdist workers x cores oversubscribe otherwise).

    Opt in per module with ``pytestmark = pytest.mark.usefixtures("one_thread")``; the kernel tests keep
    torch's default thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
