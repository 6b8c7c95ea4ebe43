"""LayerNorm (no affine) + per-segment modulation, the adaLN of every Wan block (DESIGN §5.4).

``out = LN(x) * (1 + scale[s]) + shift[s]`` for the rows of segment ``s``; computed in fp32 and
returned in ``x.dtype``, exactly as Wan (``norm1(x.float()) * (1 + scale) + shift``).

Triton path: one program per row, a single read of ``x`` and write of ``out`` (Wan's eager form
makes ~6 passes with fp32 temporaries). Backward: ``dx`` in one kernel; ``dscale``/``dshift`` are
per-segment sums done with ``index_add_``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._utils import HAS_TRITON, expand_segments, log_once, segment_sum, token_segments, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl


def modulated_layer_norm_reference(
    x: torch.Tensor, seg_offsets: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """x (T, dim); seg_offsets int32 (S+1,); shift, scale (S, dim) -> (T, dim) in x.dtype."""
    normed = F.layer_norm(x.float(), (x.shape[-1],), eps=eps)
    out = normed * (1 + expand_segments(scale.float(), seg_offsets)) + expand_segments(shift.float(), seg_offsets)
    return out.to(x.dtype)


if HAS_TRITON:

    @triton.jit
    def _mln_fwd_kernel(X, OUT, SEG, SHIFT, SCALE, MEAN, RSTD, D, stride_x, stride_o, stride_mod, eps,
                        BLOCK_D: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK_D)
        ok = cols < D
        x = tl.load(X + row.to(tl.int64) * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
        mean = tl.sum(x, 0) / D
        diff = tl.where(ok, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, 0) / D + eps)
        seg = tl.load(SEG + row)
        shift = tl.load(SHIFT + seg * stride_mod + cols, mask=ok, other=0.0).to(tl.float32)
        scale = tl.load(SCALE + seg * stride_mod + cols, mask=ok, other=0.0).to(tl.float32)
        out = diff * rstd * (1.0 + scale) + shift
        tl.store(OUT + row.to(tl.int64) * stride_o + cols, out.to(OUT.dtype.element_ty), mask=ok)
        tl.store(MEAN + row, mean)
        tl.store(RSTD + row, rstd)

    @triton.jit
    def _mln_bwd_kernel(X, DOUT, DX, XHAT, SEG, SCALE, MEAN, RSTD, D, stride_x, stride_do, stride_dx, stride_mod,
                        BLOCK_D: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK_D)
        ok = cols < D
        x = tl.load(X + row.to(tl.int64) * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
        dout = tl.load(DOUT + row.to(tl.int64) * stride_do + cols, mask=ok, other=0.0).to(tl.float32)
        seg = tl.load(SEG + row)
        scale = tl.load(SCALE + seg * stride_mod + cols, mask=ok, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        xhat = tl.where(ok, (x - tl.load(MEAN + row)) * rstd, 0.0)
        g = dout * (1.0 + scale)  # gradient wrt LN(x)
        dx = rstd * (g - tl.sum(g, 0) / D - xhat * (tl.sum(g * xhat, 0) / D))
        tl.store(DX + row.to(tl.int64) * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=ok)
        tl.store(XHAT + row.to(tl.int64) * stride_dx + cols, xhat * dout, mask=ok)  # for dscale


class _ModulatedLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, seg_offsets, shift, scale, eps):
        T, D = x.shape
        seg = token_segments(seg_offsets, T)
        out = torch.empty_like(x)
        mean = torch.empty(T, device=x.device, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        shift_c, scale_c = shift.float().contiguous(), scale.float().contiguous()
        if T:
            _mln_fwd_kernel[(T,)](x, out, seg, shift_c, scale_c, mean, rstd, D, x.stride(0), out.stride(0),
                                  shift_c.stride(0), eps, BLOCK_D=triton.next_power_of_2(D), num_warps=8 if D >= 2048 else 4)
        ctx.save_for_backward(x, seg, scale_c, mean, rstd)
        ctx.num_segments = shift.shape[0]
        ctx.mod_dtypes = (shift.dtype, scale.dtype)
        return out

    @staticmethod
    def backward(ctx, dout):
        x, seg, scale_c, mean, rstd = ctx.saved_tensors
        T, D = x.shape
        dout = dout.contiguous()
        dx = torch.empty_like(x)
        xhat_dout = torch.empty((T, D), device=x.device, dtype=torch.float32)
        if T:
            _mln_bwd_kernel[(T,)](x, dout, dx, xhat_dout, seg, scale_c, mean, rstd, D, x.stride(0), dout.stride(0),
                                  dx.stride(0), scale_c.stride(0), BLOCK_D=triton.next_power_of_2(D),
                                  num_warps=8 if D >= 2048 else 4)
        dshift = segment_sum(dout.float(), seg, ctx.num_segments).to(ctx.mod_dtypes[0])
        dscale = segment_sum(xhat_dout, seg, ctx.num_segments).to(ctx.mod_dtypes[1])
        return dx, None, dshift, dscale, None


def modulated_layer_norm(
    x: torch.Tensor, seg_offsets: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """Fused ``LN(x) * (1 + scale[seg]) + shift[seg]``; x (T, dim), shift/scale (S, dim), seg_offsets int32 (S+1,).

    Differentiable in x, shift and scale. Triton on CUDA / under the interpreter, else the reference.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be (T, dim), got shape {tuple(x.shape)}")
    S = seg_offsets.numel() - 1
    for name, t in (("shift", shift), ("scale", scale)):
        if t.shape != (S, x.shape[1]):
            raise ValueError(f"{name} must be (S={S}, dim={x.shape[1]}), got {tuple(t.shape)}")
    if seg_offsets.dtype != torch.int32:
        raise TypeError(f"seg_offsets must be int32, got {seg_offsets.dtype}")
    if not use_triton(x, shift, scale) or x.stride(-1) != 1:
        log_once("modulated_layer_norm: Triton unavailable for these tensors; using the PyTorch reference")
        return modulated_layer_norm_reference(x, seg_offsets, shift, scale, eps)
    return _ModulatedLayerNorm.apply(x, seg_offsets, shift, scale, eps)
