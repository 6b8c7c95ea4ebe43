"""Gated residual with a per-segment gate (DESIGN §5.4): ``h + gate[s] * y``, fp32 math as Wan.

Triton path: one read of ``h`` and ``y``, one write, the gate row picked per token from its segment.
"""
from __future__ import annotations

import torch

from ._utils import HAS_TRITON, expand_segments, log_once, segment_sum, token_segments, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl


def gated_residual_reference(h: torch.Tensor, y: torch.Tensor, seg_offsets: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """h, y (T, dim); seg_offsets int32 (S+1,); gate (S, dim) -> (T, dim) in h.dtype."""
    return (h.float() + y.float() * expand_segments(gate.float(), seg_offsets)).to(h.dtype)


if HAS_TRITON:

    @triton.jit
    def _gated_residual_kernel(H, Y, OUT, SEG, GATE, D, stride_h, stride_y, stride_o, stride_g,
                               BLOCK_D: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK_D)
        ok = cols < D
        seg = tl.load(SEG + row)
        h = tl.load(H + row.to(tl.int64) * stride_h + cols, mask=ok, other=0.0).to(tl.float32)
        y = tl.load(Y + row.to(tl.int64) * stride_y + cols, mask=ok, other=0.0).to(tl.float32)
        g = tl.load(GATE + seg * stride_g + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(OUT + row.to(tl.int64) * stride_o + cols, (h + g * y).to(OUT.dtype.element_ty), mask=ok)


def _launch(h, y, seg, gate):
    T, D = h.shape
    out = torch.empty_like(h)
    if T:
        _gated_residual_kernel[(T,)](h, y, out, seg, gate, D, h.stride(0), y.stride(0), out.stride(0), gate.stride(0),
                                     BLOCK_D=triton.next_power_of_2(D), num_warps=4)
    return out


class _GatedResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, y, seg_offsets, gate):
        seg = token_segments(seg_offsets, h.shape[0])
        gate_f = gate.float().contiguous()
        ctx.save_for_backward(y, seg, gate_f)
        ctx.gate_dtype, ctx.y_dtype = gate.dtype, y.dtype
        return _launch(h, y, seg, gate_f)

    @staticmethod
    def backward(ctx, dout):
        y, seg, gate_f = ctx.saved_tensors
        dout = dout.contiguous()
        zeros = torch.zeros_like(dout, dtype=ctx.y_dtype)
        dy = _launch(zeros, dout.to(ctx.y_dtype), seg, gate_f)  # gate[seg] * dout, the same kernel
        dgate = segment_sum(dout.float() * y.float(), seg, gate_f.shape[0]).to(ctx.gate_dtype)
        return dout, dy, None, dgate


def gated_residual(h: torch.Tensor, y: torch.Tensor, seg_offsets: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``h + gate[seg] * y`` (fp32 math, result in h.dtype); h, y (T, dim), gate (S, dim). Differentiable in h, y, gate."""
    if h.dim() != 2 or h.shape != y.shape:
        raise ValueError(f"h and y must both be (T, dim), got {tuple(h.shape)} and {tuple(y.shape)}")
    S = seg_offsets.numel() - 1
    if gate.shape != (S, h.shape[1]):
        raise ValueError(f"gate must be (S={S}, dim={h.shape[1]}), got {tuple(gate.shape)}")
    if seg_offsets.dtype != torch.int32:
        raise TypeError(f"seg_offsets must be int32, got {seg_offsets.dtype}")
    if not use_triton(h, y, gate) or h.stride(-1) != 1 or y.stride(-1) != 1:
        log_once("gated_residual: Triton unavailable for these tensors; using the PyTorch reference")
        return gated_residual_reference(h, y, seg_offsets, gate)
    return _GatedResidual.apply(h, y, seg_offsets, gate)
