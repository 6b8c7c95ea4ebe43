"""The fast, drop-in ``UniViGUModel``: the reference model's modules, config, state_dict and forward,
run on the Triton kernels (packed varlen attention with fused RoPE, grouped modality FFN with the
gated residual fused, fused adaLN / gated residual / q-k RMSNorm / cross-attention LayerNorm, fused
text decoding).

Each kernel entry point falls back to its PyTorch reference where Triton or a GPU is missing and
logs that once; ``UniViGUModel.kernel_path()`` says which path runs on the current device.
"""
from __future__ import annotations

import torch

from .kernels._utils import HAS_TRITON, interpreter_problem, interpreting, log_once, one_segment_table, use_triton
from .kernels.modulated_layer_norm import modulated_layer_norm
from .modeling import TextDecoded, UniViGUModelBase, UniViGUOutput
from .modules import FP32LayerNorm
from .ops import _KERNEL_DTYPES, FAST_OPS


class FusedFP32LayerNorm(FP32LayerNorm):
    """``FP32LayerNorm`` (the blocks' ``norm2``, affine) on the fused LayerNorm kernel: one segment
    covering every row, ``LN(x) * (1 + (weight - 1)) + bias``. Same parameters, same result (fp32 math,
    output in ``x.dtype``) in one read and one write instead of Wan's three fp32 passes."""

    def forward(self, x):
        if x.dim() != 2 or self.weight is None or self.bias is None or x.dtype not in _KERNEL_DTYPES \
                or not use_triton(x, self.weight):  # (float64: the reference, as for every op)
            return super().forward(x)
        return modulated_layer_norm(x, one_segment_table(x.shape[0], x.device), self.bias.float()[None],
                                    (self.weight.float() - 1.0)[None], self.eps)


class UniViGUModel(UniViGUModelBase):
    ops = FAST_OPS

    def __init__(self, config):
        super().__init__(config)
        for block in self.blocks:
            if type(block.norm2) is FP32LayerNorm:  # same parameters and names: only the forward differs
                block.norm2.__class__ = FusedFP32LayerNorm

    def kernel_path(self) -> str:
        if not HAS_TRITON:
            return "reference (triton is not installed)"
        if self.device.type == "cuda":
            return "triton (CUDA)"
        if interpreting():
            return "triton (interpreter, CPU)"
        if interpreter_problem():
            return f"reference ({interpreter_problem()})"
        return "reference (no GPU; set TRITON_INTERPRET=1 to run the kernels on CPU)"

    def forward(self, *args, **kwargs) -> UniViGUOutput:
        if not torch.compiler.is_compiling():
            log_once(f"univigu_fast.UniViGUModel: kernels run as {self.kernel_path()}")
        return super().forward(*args, **kwargs)


__all__ = ["UniViGUModel", "UniViGUOutput", "TextDecoded"]
