"""The fast, drop-in ``UniViGUModel``: the reference model's modules, config, state_dict and forward,
run on the Triton kernels (packed varlen attention with fused RoPE, grouped modality FFN with the
gated residual fused, fused adaLN / gated residual / q-k RMSNorm, fused text decoding).

Each kernel entry point falls back to its PyTorch reference where Triton or a GPU is missing and
logs that once; ``UniViGUModel.kernel_path()`` says which path runs on the current device.
"""
from __future__ import annotations

import torch

from .kernels._utils import HAS_TRITON, interpreting, log_once
from .modeling import TextDecoded, UniViGUModelBase, UniViGUOutput
from .ops import FAST_OPS


class UniViGUModel(UniViGUModelBase):
    ops = FAST_OPS

    def kernel_path(self) -> str:
        if not HAS_TRITON:
            return "reference (triton is not installed)"
        if self.device.type == "cuda":
            return "triton (CUDA)"
        if interpreting():
            return "triton (interpreter, CPU)"
        return "reference (no GPU; set TRITON_INTERPRET=1 to run the kernels on CPU)"

    def forward(self, *args, **kwargs) -> UniViGUOutput:
        log_once(f"univigu_fast.UniViGUModel: kernels run as {self.kernel_path()}")
        return super().forward(*args, **kwargs)


__all__ = ["UniViGUModel", "UniViGUOutput", "TextDecoded"]
