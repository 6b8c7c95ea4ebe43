"""Gated residual with a per-segment gate (DESIGN §5.4): ``h + gate[s] * y``, fp32 math as Wan.

Shapes: h, y (T, dim) packed rows; seg_offsets int32 (S+1,) (empty segments allowed); gate (S, dim).
Paper Eq. 14: ``x <- x + g_s * Attn(...)`` with the gate of the row's modality segment.

Triton path: the chunked segment walk of ``modulated_layer_norm.py`` (segment found in-kernel, the
gate row loaded once per segment); one read of ``h`` and ``y``, one write. Backward in one pass:
``dh = dout``, ``dy = gate[s] * dout`` and ``dgate[s] = sum_rows dout * y`` (per-program register
sums, one fp32 atomic per column and segment).
"""
from __future__ import annotations

import torch

from ._utils import HAS_TRITON, check_devices, check_segments, custom_op, describe, expand_segments, log_once, use_triton
from .modulated_layer_norm import geometry

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .modulated_layer_norm import chunk_rows, segment_of, segment_rows


def gated_residual_reference(h: torch.Tensor, y: torch.Tensor, seg_offsets: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """h, y (T, dim); seg_offsets int32 (S+1,); gate (S, dim) -> (T, dim) in h.dtype."""
    return (h.float() + y.float() * expand_segments(gate.float(), seg_offsets)).to(h.dtype)


if HAS_TRITON:

    @triton.jit(do_not_specialize=["T", "S", "chunk"])  # a new video length must not recompile
    def _gated_residual_fwd_kernel(H, Y, OUT, OFF, GATE, T, D, S, chunk, stride_h, stride_y, stride_o, stride_g,
                                   BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        r0, r1 = chunk_rows(T, chunk)
        cols = tl.arange(0, BLOCK_D)
        col_ok = cols < D
        for s in range(segment_of(OFF, S, r0), segment_of(OFF, S, r1 - 1) + 1):
            lo, hi = segment_rows(OFF, s, r0, r1)
            g = tl.load(GATE + s * stride_g + cols, mask=col_ok, other=0.0).to(tl.float32)
            for r in range(lo, hi, BLOCK_T):
                rows = (r + tl.arange(0, BLOCK_T)).to(tl.int64)
                m = (rows < hi)[:, None] & col_ok[None, :]
                h = tl.load(H + rows[:, None] * stride_h + cols[None, :], mask=m, other=0.0).to(tl.float32)
                y = tl.load(Y + rows[:, None] * stride_y + cols[None, :], mask=m, other=0.0).to(tl.float32)
                tl.store(OUT + rows[:, None] * stride_o + cols[None, :], (h + g[None, :] * y).to(OUT.dtype.element_ty), mask=m)

    @triton.jit(do_not_specialize=["T", "S", "chunk"])  # a new video length must not recompile
    def _gated_residual_bwd_kernel(DOUT, Y, DY, OFF, GATE, DGATE, T, D, S, chunk, stride_do, stride_y, stride_dy, stride_g,
                                   BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        r0, r1 = chunk_rows(T, chunk)
        cols = tl.arange(0, BLOCK_D)
        col_ok = cols < D
        for s in range(segment_of(OFF, S, r0), segment_of(OFF, S, r1 - 1) + 1):
            lo, hi = segment_rows(OFF, s, r0, r1)
            g = tl.load(GATE + s * stride_g + cols, mask=col_ok, other=0.0).to(tl.float32)
            acc = tl.zeros([BLOCK_D], dtype=tl.float32)
            for r in range(lo, hi, BLOCK_T):
                rows = (r + tl.arange(0, BLOCK_T)).to(tl.int64)
                m = (rows < hi)[:, None] & col_ok[None, :]
                dout = tl.load(DOUT + rows[:, None] * stride_do + cols[None, :], mask=m, other=0.0).to(tl.float32)
                y = tl.load(Y + rows[:, None] * stride_y + cols[None, :], mask=m, other=0.0).to(tl.float32)
                tl.store(DY + rows[:, None] * stride_dy + cols[None, :], (g[None, :] * dout).to(DY.dtype.element_ty), mask=m)
                acc += tl.sum(dout * y, 0)
            tl.atomic_add(DGATE + s * D + cols, acc, mask=col_ok & (hi > lo))


@custom_op("univigu_fast::gated_residual_fwd")
def _gated_residual_fwd_op(h: torch.Tensor, y: torch.Tensor, seg_offsets: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    T, D = h.shape
    out = torch.empty_like(h)
    if T:
        block_t, block_d, chunk, programs, num_warps = geometry(T, D, h.device)
        _gated_residual_fwd_kernel[(programs,)](
            h, y, out, seg_offsets, gate, T, D, seg_offsets.numel() - 1, chunk,
            h.stride(0), y.stride(0), out.stride(0), gate.stride(0),
            BLOCK_T=block_t, BLOCK_D=block_d, num_warps=num_warps)
    return out


@_gated_residual_fwd_op.register_fake
def _(h, y, seg_offsets, gate):
    return torch.empty_like(h)


@custom_op("univigu_fast::gated_residual_bwd")
def _gated_residual_bwd_op(dout: torch.Tensor, y: torch.Tensor, seg_offsets: torch.Tensor,
                           gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    T, D = y.shape
    S = seg_offsets.numel() - 1
    dy = torch.empty_like(y)
    dgate = torch.zeros((S, D), device=y.device, dtype=torch.float32)
    if T:
        block_t, block_d, chunk, programs, num_warps = geometry(T, D, y.device, reduce=True)
        _gated_residual_bwd_kernel[(programs,)](
            dout, y, dy, seg_offsets, gate, dgate, T, D, S, chunk,
            dout.stride(0), y.stride(0), dy.stride(0), gate.stride(0),
            BLOCK_T=block_t, BLOCK_D=block_d, num_warps=num_warps)
    return dy, dgate


@_gated_residual_bwd_op.register_fake
def _(dout, y, seg_offsets, gate):
    return torch.empty_like(y), y.new_empty((seg_offsets.shape[0] - 1, y.shape[1]), dtype=torch.float32)


class GatedResidualFunction(torch.autograd.Function):
    """Autograd wrapper of the fused forward / backward custom ops (inputs validated, unit last stride)."""

    @staticmethod
    def forward(ctx, h, y, seg_offsets, gate):
        ctx.save_for_backward(y, seg_offsets, gate)
        return _gated_residual_fwd_op(h, y, seg_offsets, gate)

    @staticmethod
    def backward(ctx, dout):
        y, seg_offsets, gate = ctx.saved_tensors
        dout = dout.contiguous()
        dy, dgate = _gated_residual_bwd_op(dout, y, seg_offsets, gate)
        return dout, dy, None, dgate  # dout is in h's dtype; fp32 dgate is cast to gate's dtype by autograd


def check_inputs(h, y, seg_offsets, gate) -> None:
    """The checks of :func:`gated_residual` (same arguments; any floating dtype)."""
    for name, t in (("h", h), ("y", y)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating (T, dim) tensor, got {describe(t)}")
    if h.shape != y.shape:
        raise ValueError(f"h and y must both be (T, dim), got {tuple(h.shape)} and {tuple(y.shape)}")
    check_segments(seg_offsets, h.shape[0], h.device)
    S = seg_offsets.numel() - 1
    if not isinstance(gate, torch.Tensor) or gate.shape != (S, h.shape[1]) or not gate.is_floating_point():
        raise ValueError(f"gate must be a floating (S={S}, dim={h.shape[1]}) tensor, got {describe(gate)}")
    check_devices(h, y=y, gate=gate)


def gated_residual(h: torch.Tensor, y: torch.Tensor, seg_offsets: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``h + gate[seg] * y`` (fp32 math, result in h.dtype); h, y (T, dim), gate (S, dim), seg_offsets int32 (S+1,).

    Differentiable in h, y and gate. ``h`` and ``y`` may differ in dtype (e.g. an fp32 residual
    stream and a bf16 branch under autocast). Triton on CUDA / under the interpreter, else the reference.
    """
    check_inputs(h, y, seg_offsets, gate)
    if not use_triton(h, y, seg_offsets, gate):
        log_once("gated_residual: Triton unavailable for these tensors; using the PyTorch reference")
        return gated_residual_reference(h, y, seg_offsets, gate)
    h, y, gate = (t if t.stride(-1) == 1 else t.contiguous() for t in (h, y, gate))
    if torch.is_grad_enabled() and (h.requires_grad or y.requires_grad or gate.requires_grad):
        return GatedResidualFunction.apply(h, y, seg_offsets, gate)
    return _gated_residual_fwd_op(h, y, seg_offsets, gate)


class GatedResidual(torch.nn.Module):
    """Thin module: ``forward(h, y, seg_offsets, gate) = h + gate[seg] * y``."""

    def forward(self, h, y, seg_offsets, gate):
        return gated_residual(h, y, seg_offsets, gate)
