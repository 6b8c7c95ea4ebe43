"""Test setup: on a machine without a GPU, run Triton kernels in the interpreter (DESIGN §7)."""
import os

import torch

if not torch.cuda.is_available():
    # Must be set before any module decorated with @triton.jit is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
