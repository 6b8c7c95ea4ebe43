"""RMSNorm over the last dim with a weight: Wan's q/k norm across heads (``dim = H * hd``) (DESIGN §5.4).

Triton path: one program per row, fp32 statistics, forward and backward (``dweight`` summed with
one matmul-free reduction over rows in PyTorch).
"""
from __future__ import annotations

import torch

from ._utils import HAS_TRITON, log_once, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x (T, dim), weight (dim,) -> (T, dim) in x.dtype; statistics in fp32 (as torch.nn.RMSNorm in diffusers' Wan)."""
    xf = x.float()
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (out * weight.float()).to(x.dtype)


if HAS_TRITON:

    @triton.jit
    def _rms_fwd_kernel(X, W, OUT, RSTD, D, stride_x, stride_o, eps, BLOCK_D: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK_D)
        ok = cols < D
        x = tl.load(X + row.to(tl.int64) * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
        w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / D + eps)
        tl.store(OUT + row.to(tl.int64) * stride_o + cols, (x * rstd * w).to(OUT.dtype.element_ty), mask=ok)
        tl.store(RSTD + row, rstd)

    @triton.jit
    def _rms_bwd_kernel(X, W, DOUT, DX, DWROW, RSTD, D, stride_x, stride_do, stride_dx, BLOCK_D: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK_D)
        ok = cols < D
        x = tl.load(X + row.to(tl.int64) * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
        w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
        dout = tl.load(DOUT + row.to(tl.int64) * stride_do + cols, mask=ok, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        xhat = x * rstd
        g = dout * w
        dx = rstd * (g - xhat * (tl.sum(g * xhat, 0) / D))
        tl.store(DX + row.to(tl.int64) * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=ok)
        tl.store(DWROW + row.to(tl.int64) * stride_dx + cols, dout * xhat, mask=ok)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        T, D = x.shape
        out = torch.empty_like(x)
        rstd = torch.empty(T, device=x.device, dtype=torch.float32)
        if T:
            _rms_fwd_kernel[(T,)](x, weight, out, rstd, D, x.stride(0), out.stride(0), eps,
                                  BLOCK_D=triton.next_power_of_2(D), num_warps=8 if D >= 2048 else 4)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, dout):
        x, weight, rstd = ctx.saved_tensors
        T, D = x.shape
        dout = dout.contiguous()
        dx = torch.empty_like(x)
        dw_rows = torch.empty((T, D), device=x.device, dtype=torch.float32)
        if T:
            _rms_bwd_kernel[(T,)](x, weight, dout, dx, dw_rows, rstd, D, x.stride(0), dout.stride(0), dx.stride(0),
                                  BLOCK_D=triton.next_power_of_2(D), num_warps=8 if D >= 2048 else 4)
        return dx, dw_rows.sum(0).to(weight.dtype), None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm of ``x (T, dim)`` with ``weight (dim,)``, fp32 statistics, result in x.dtype; differentiable in both."""
    if x.dim() != 2 or weight.shape != (x.shape[-1],):
        raise ValueError(f"x must be (T, dim) and weight (dim,), got {tuple(x.shape)} and {tuple(weight.shape)}")
    if not use_triton(x, weight) or x.stride(-1) != 1 or not weight.is_contiguous():
        log_once("rms_norm: Triton unavailable for these tensors; using the PyTorch reference")
        return rms_norm_reference(x, weight, eps)
    return _RMSNorm.apply(x, weight, eps)
