"""Test setup: on a machine without a GPU, run Triton kernels in the interpreter (DESIGN §7)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before any module decorated with @triton.jit is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    # Kernel tests compare the interpreted kernels with the references: where the interpreter cannot
    # run (the ops would fall back to the references), stop with the reason instead of comparing the
    # references with themselves.
    from univigu_fast.kernels._utils import interpreter_problem
    if interpreter_problem():
        raise pytest.UsageError(interpreter_problem())


@pytest.fixture
def one_thread():
    """Tiny models: one torch thread per test process (xdist workers x cores oversubscribe otherwise).

    Opt in per module with ``pytestmark = pytest.mark.usefixtures("one_thread")``; the kernel tests keep
    torch's default thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
