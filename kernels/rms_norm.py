"""RMSNorm over the last dim with a weight: Wan's q/k norm across heads (``dim = H * hd``) (DESIGN §5.4).

``out = x / sqrt(mean(x^2) + eps) * weight``; shapes x (T, dim), weight (dim,); fp32 statistics,
result in ``x.dtype`` (as ``torch.nn.RMSNorm`` in diffusers' Wan).

Triton path: one ``BLOCK_T``-row block per program forward (one read of ``x``, one write). Backward:
a few long chunks per SM, ``dx`` in the same single pass and ``dweight`` as per-program fp32 partial
sums ``(P, dim)`` reduced by one ``sum(0)`` (deterministic, no (T, dim) temporary).

A fused RMSNorm + RoPE was considered: RoPE is applied inside the attention op (``joint_attention``'s
Triton kernels rotate q/k in their prologue, its SDPA backend with one rotation kernel), so a fused
norm+rotation would only save one read and one write of q and k per layer (< 2% of a 1.3B step);
the ops keep the two separate.
"""
from __future__ import annotations

import torch

from ._utils import HAS_TRITON, check_devices, check_eps, custom_op, log_once, use_triton
from .modulated_layer_norm import geometry

if HAS_TRITON:
    import triton
    import triton.language as tl


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x (T, dim), weight (dim,) -> (T, dim) in x.dtype; statistics in fp32 (as torch.nn.RMSNorm in diffusers' Wan)."""
    xf = x.float()
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (out * weight.float()).to(x.dtype)


if HAS_TRITON:

    @triton.jit(do_not_specialize=["T", "chunk"])  # a new video length must not recompile
    def _rms_fwd_kernel(X, W, OUT, RSTD, T, D, chunk, stride_x, stride_o, eps,
                        SAVE_STATS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        r0 = tl.program_id(0) * chunk
        r1 = tl.minimum(r0 + chunk, T)
        cols = tl.arange(0, BLOCK_D)
        col_ok = cols < D
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
        for r in range(r0, r1, BLOCK_T):
            rows = r + tl.arange(0, BLOCK_T)
            row_ok = rows < r1
            m = row_ok[:, None] & col_ok[None, :]
            x = tl.load(X + rows.to(tl.int64)[:, None] * stride_x + cols[None, :], mask=m, other=0.0).to(tl.float32)
            rstd = 1.0 / tl.sqrt(tl.sum(x * x, 1) / D + eps)
            out = x * rstd[:, None] * w[None, :]
            tl.store(OUT + rows.to(tl.int64)[:, None] * stride_o + cols[None, :], out.to(OUT.dtype.element_ty), mask=m)
            if SAVE_STATS:
                tl.store(RSTD + rows, rstd, mask=row_ok)

    @triton.jit(do_not_specialize=["T", "chunk"])  # a new video length must not recompile
    def _rms_bwd_kernel(X, W, DOUT, DX, RSTD, DW_PART, T, D, chunk, stride_x, stride_do, stride_dx,
                        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        pid = tl.program_id(0)
        r0 = pid * chunk
        r1 = tl.minimum(r0 + chunk, T)
        cols = tl.arange(0, BLOCK_D)
        col_ok = cols < D
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for r in range(r0, r1, BLOCK_T):
            rows = r + tl.arange(0, BLOCK_T)
            row_ok = rows < r1
            m = row_ok[:, None] & col_ok[None, :]
            x = tl.load(X + rows.to(tl.int64)[:, None] * stride_x + cols[None, :], mask=m, other=0.0).to(tl.float32)
            dout = tl.load(DOUT + rows.to(tl.int64)[:, None] * stride_do + cols[None, :], mask=m, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
            xhat = x * rstd[:, None]
            g = dout * w[None, :]
            dx = rstd[:, None] * (g - xhat * (tl.sum(g * xhat, 1) / D)[:, None])
            tl.store(DX + rows.to(tl.int64)[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=m)
            acc += tl.sum(dout * xhat, 0)
        tl.store(DW_PART + pid * D + cols, acc, mask=col_ok)


@custom_op("univigu_fast::rms_norm_fwd")
def _rms_fwd_op(x: torch.Tensor, weight: torch.Tensor, eps: float, save_stats: bool) -> tuple[torch.Tensor, torch.Tensor]:
    T, D = x.shape
    out = torch.empty_like(x)
    rstd = torch.empty(T if save_stats else 0, device=x.device, dtype=torch.float32)
    if T:
        block_t, block_d, chunk, programs, num_warps = geometry(T, D, x.device)
        _rms_fwd_kernel[(programs,)](x, weight, out, rstd, T, D, chunk, x.stride(0), out.stride(0), eps,
                                     SAVE_STATS=save_stats, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=num_warps)
    return out, rstd


@_rms_fwd_op.register_fake
def _(x, weight, eps, save_stats):
    return torch.empty_like(x), x.new_empty(x.shape[0] if save_stats else 0, dtype=torch.float32)


@custom_op("univigu_fast::rms_norm_bwd")
def _rms_bwd_op(dout: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    T, D = x.shape
    dx = torch.empty_like(x)
    if not T:
        return dx, torch.zeros_like(weight)
    block_t, block_d, chunk, programs, num_warps = geometry(T, D, x.device, reduce=True)
    dw_part = torch.empty((programs, D), device=x.device, dtype=torch.float32)
    _rms_bwd_kernel[(programs,)](x, weight, dout, dx, rstd, dw_part, T, D, chunk, x.stride(0), dout.stride(0), dx.stride(0),
                                 BLOCK_T=block_t, BLOCK_D=block_d, num_warps=num_warps)
    return dx, dw_part.sum(0).to(weight.dtype)


@_rms_bwd_op.register_fake
def _(dout, x, weight, rstd):
    return torch.empty_like(x), torch.empty_like(weight)


class RMSNormFunction(torch.autograd.Function):
    """Autograd wrapper of the fused forward / backward custom ops (inputs validated, unit last stride)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        out, rstd = _rms_fwd_op(x, weight, eps, True)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, dout):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = _rms_bwd_op(dout.contiguous(), x, weight, rstd)
        return dx, dw, None


def check_inputs(x, weight, eps=1e-6) -> None:
    """The checks of :func:`rms_norm` (same arguments; any floating dtype)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x must be a floating (T, dim) tensor, got {getattr(x, 'dtype', type(x).__name__)} "
                         f"{tuple(getattr(x, 'shape', ()))}")
    if not isinstance(weight, torch.Tensor) or weight.shape != (x.shape[-1],):
        raise ValueError(f"weight must be (dim={x.shape[-1]},), got {tuple(getattr(weight, 'shape', ()))}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be floating point, got {weight.dtype}")
    check_eps(eps)
    check_devices(x, weight=weight)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm of ``x (T, dim)`` with ``weight (dim,)``, fp32 statistics, result in x.dtype; differentiable in both."""
    check_inputs(x, weight, eps)
    if not use_triton(x, weight):
        log_once("rms_norm: Triton unavailable for these tensors; using the PyTorch reference")
        return rms_norm_reference(x, weight, eps)
    x = x if x.stride(-1) == 1 else x.contiguous()
    weight = weight.contiguous()
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return RMSNormFunction.apply(x, weight, float(eps))
    return _rms_fwd_op(x, weight, float(eps), False)[0]


class RMSNorm(torch.nn.Module):
    """Thin module over :func:`rms_norm` with a learned ``weight (dim,)``."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)
