"""LayerNorm (no affine) + per-segment modulation, the adaLN of every Wan block (DESIGN §5.4).

``out = LN(x) * (1 + scale[s]) + shift[s]`` for the rows of segment ``s`` (paper Eq. 14: the shared
``scale_shift_table`` plus the segment's own time embedding); computed in fp32 and returned in
``x.dtype``, exactly as Wan (``norm1(x.float()) * (1 + scale) + shift``).

Shapes: x (T, dim) packed rows; seg_offsets int32 (S+1,) (empty segments allowed); shift, scale (S, dim).

Triton path. The packed rows are cut into contiguous chunks, one program each; a program walks the
segments its chunk overlaps (found in-kernel from ``seg_offsets``: no per-token index tensor, no host
sync), loads that segment's ``shift``/``scale`` rows once and streams ``BLOCK_T`` rows at a time: one
read of ``x``, one write of ``out`` (Wan's eager form makes ~6 passes with fp32 temporaries).
Forward chunks are a few ``BLOCK_T``-row blocks (so the segment lookup and the parameter rows are
paid once per few blocks, not per 2-row block at dim 1536); backward chunks are long (a few per SM):
``dx`` in the same single pass, and ``dshift[s] = sum_rows dout`` and
``dscale[s] = sum_rows dout * xhat`` accumulated in registers per (program, segment), then added
with one fp32 atomic per column, so no (T, dim) temporary is written.

The launchers are ``torch.library`` custom ops (opaque to ``torch.compile``) wrapped in an
``autograd.Function``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._utils import (HAS_TRITON, cdiv, check_devices, check_eps, check_segments, custom_op, expand_segments, log_once,
                     next_power_of_2, num_sms, use_triton)

if HAS_TRITON:
    import triton
    import triton.language as tl

MAX_BLOCK_T = 16  # rows per inner step (fewer for wide rows, see ``geometry``)
INTERPRETER_PROGRAMS = 4  # programs under the interpreter, both directions (few: every program is emulated)
PROGRAMS_PER_SM = 4  # backward chunks per SM on a GPU (each adds one atomic per column and segment)
FWD_PROGRAMS_PER_SM = 16  # forward: at least this many programs per SM (two waves of resident blocks) ...
FWD_MAX_BLOCKS = 8  # ... and at most this many row blocks per program


def modulated_layer_norm_reference(
    x: torch.Tensor, seg_offsets: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """x (T, dim); seg_offsets int32 (S+1,); shift, scale (S, dim) -> (T, dim) in x.dtype."""
    normed = F.layer_norm(x.float(), (x.shape[-1],), eps=eps)
    out = normed * (1 + expand_segments(scale.float(), seg_offsets)) + expand_segments(shift.float(), seg_offsets)
    return out.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Launch geometry shared by the three glue ops (gated_residual.py and rms_norm.py import it)
# ----------------------------------------------------------------------------------------------
def geometry(T: int, D: int, device: torch.device, reduce: bool = False):
    """``(BLOCK_T, BLOCK_D, chunk, programs, num_warps)`` for ``T`` rows of width ``D``.

    ``chunk`` (a multiple of ``BLOCK_T``) rows per program; ``programs = cdiv(T, chunk)``. Forward
    (``reduce=False``): ``BLOCK_T x BLOCK_D`` (~4K-element) blocks, up to ``FWD_MAX_BLOCKS`` per
    program while at least ``FWD_PROGRAMS_PER_SM`` programs per SM remain (a program's fixed cost,
    the in-kernel segment lookup and the parameter rows, is a few dependent memory round trips).
    Backward (``reduce=True``, per-segment / per-column sums): ``PROGRAMS_PER_SM`` long chunks per
    SM (~8K-element steps), so the partial sums are few. Under the interpreter
    ``INTERPRETER_PROGRAMS`` programs in both directions (multi-block chunks exercised by CPU tests).
    """
    block_d = next_power_of_2(max(D, 1))
    block_t = max(1, min(MAX_BLOCK_T, (8192 if reduce else 4096) // block_d))
    n_blocks = cdiv(T, block_t)
    if device.type == "cuda":
        sms = num_sms(device)
        cap = PROGRAMS_PER_SM * sms if reduce else max(cdiv(n_blocks, FWD_MAX_BLOCKS), FWD_PROGRAMS_PER_SM * sms)
    else:
        cap = INTERPRETER_PROGRAMS
    programs = max(1, min(cap, n_blocks))
    chunk = cdiv(n_blocks, programs) * block_t
    programs = cdiv(T, chunk)
    elems = block_t * block_d
    num_warps = 16 if elems >= 16384 else 8 if elems >= 4096 else 4
    return block_t, block_d, chunk, programs, num_warps


if HAS_TRITON:

    @triton.jit
    def segment_of(OFF, S, row):
        """Index of the segment holding ``row`` (int32 scalar): the number of ``OFF[1..S-1]`` that are ``<= row``.
        Empty segments are skipped naturally (their end equals the next start)."""
        seg = row - row
        for s in range(1, S):
            seg += (tl.load(OFF + s) <= row).to(tl.int32)
        return seg

    @triton.jit
    def chunk_rows(T, chunk):
        """Rows ``[r0, r1)`` of this program's chunk (program ``i`` takes rows ``i * chunk`` on, ``T`` in all)."""
        r0 = tl.program_id(0) * chunk
        return r0, tl.minimum(r0 + chunk, T)

    @triton.jit
    def segment_rows(OFF, s, r0, r1):
        """Rows ``[lo, hi)`` of segment ``s`` inside the chunk ``[r0, r1)`` (empty when ``hi <= lo``)."""
        return tl.maximum(tl.load(OFF + s), r0), tl.minimum(tl.load(OFF + s + 1), r1)

    @triton.jit(do_not_specialize=["T", "S", "chunk"])  # a new video length must not recompile
    def _mln_fwd_kernel(X, OUT, OFF, SHIFT, SCALE, MEAN, RSTD, T, D, S, chunk,
                        stride_x, stride_o, stride_shift, stride_scale, eps,
                        SAVE_STATS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        r0, r1 = chunk_rows(T, chunk)
        cols = tl.arange(0, BLOCK_D)
        col_ok = cols < D
        for s in range(segment_of(OFF, S, r0), segment_of(OFF, S, r1 - 1) + 1):
            lo, hi = segment_rows(OFF, s, r0, r1)
            shift = tl.load(SHIFT + s * stride_shift + cols, mask=col_ok, other=0.0).to(tl.float32)
            scale1 = 1.0 + tl.load(SCALE + s * stride_scale + cols, mask=col_ok, other=0.0).to(tl.float32)
            for r in range(lo, hi, BLOCK_T):
                rows = r + tl.arange(0, BLOCK_T)
                row_ok = rows < hi
                m = row_ok[:, None] & col_ok[None, :]
                x = tl.load(X + rows.to(tl.int64)[:, None] * stride_x + cols[None, :], mask=m, other=0.0).to(tl.float32)
                mean = tl.sum(x, 1) / D
                diff = tl.where(m, x - mean[:, None], 0.0)
                rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, 1) / D + eps)
                out = diff * rstd[:, None] * scale1[None, :] + shift[None, :]
                tl.store(OUT + rows.to(tl.int64)[:, None] * stride_o + cols[None, :], out.to(OUT.dtype.element_ty), mask=m)
                if SAVE_STATS:
                    tl.store(MEAN + rows, mean, mask=row_ok)
                    tl.store(RSTD + rows, rstd, mask=row_ok)

    @triton.jit(do_not_specialize=["T", "S", "chunk"])  # a new video length must not recompile
    def _mln_bwd_kernel(X, DOUT, DX, OFF, SCALE, MEAN, RSTD, DSHIFT, DSCALE, T, D, S, chunk,
                        stride_x, stride_do, stride_dx, stride_scale,
                        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        r0, r1 = chunk_rows(T, chunk)
        cols = tl.arange(0, BLOCK_D)
        col_ok = cols < D
        for s in range(segment_of(OFF, S, r0), segment_of(OFF, S, r1 - 1) + 1):
            lo, hi = segment_rows(OFF, s, r0, r1)
            scale1 = 1.0 + tl.load(SCALE + s * stride_scale + cols, mask=col_ok, other=0.0).to(tl.float32)
            acc_shift = tl.zeros([BLOCK_D], dtype=tl.float32)
            acc_scale = tl.zeros([BLOCK_D], dtype=tl.float32)
            for r in range(lo, hi, BLOCK_T):
                rows = r + tl.arange(0, BLOCK_T)
                row_ok = rows < hi
                m = row_ok[:, None] & col_ok[None, :]
                x = tl.load(X + rows.to(tl.int64)[:, None] * stride_x + cols[None, :], mask=m, other=0.0).to(tl.float32)
                dout = tl.load(DOUT + rows.to(tl.int64)[:, None] * stride_do + cols[None, :], mask=m, other=0.0).to(tl.float32)
                mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
                rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
                xhat = tl.where(m, (x - mean[:, None]) * rstd[:, None], 0.0)
                g = dout * scale1[None, :]  # gradient wrt LN(x)
                dx = rstd[:, None] * (g - (tl.sum(g, 1) / D)[:, None] - xhat * (tl.sum(g * xhat, 1) / D)[:, None])
                tl.store(DX + rows.to(tl.int64)[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=m)
                acc_shift += tl.sum(dout, 0)
                acc_scale += tl.sum(dout * xhat, 0)
            touched = col_ok & (hi > lo)
            tl.atomic_add(DSHIFT + s * D + cols, acc_shift, mask=touched)
            tl.atomic_add(DSCALE + s * D + cols, acc_scale, mask=touched)


# ----------------------------------------------------------------------------------------------
# Launchers as torch.library ops (torch.compile sees them as opaque calls)
# ----------------------------------------------------------------------------------------------
@custom_op("univigu_fast::modulated_layer_norm_fwd")
def _mln_fwd_op(x: torch.Tensor, seg_offsets: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                save_stats: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    T, D = x.shape
    out = torch.empty_like(x)
    n_stats = T if save_stats else 0
    mean = torch.empty(n_stats, device=x.device, dtype=torch.float32)
    rstd = torch.empty(n_stats, device=x.device, dtype=torch.float32)
    if T:
        block_t, block_d, chunk, programs, num_warps = geometry(T, D, x.device)
        _mln_fwd_kernel[(programs,)](
            x, out, seg_offsets, shift, scale, mean, rstd, T, D, seg_offsets.numel() - 1, chunk,
            x.stride(0), out.stride(0), shift.stride(0), scale.stride(0), eps,
            SAVE_STATS=save_stats, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=num_warps)
    return out, mean, rstd


@_mln_fwd_op.register_fake
def _(x, seg_offsets, shift, scale, eps, save_stats):
    n = x.shape[0] if save_stats else 0
    return torch.empty_like(x), x.new_empty(n, dtype=torch.float32), x.new_empty(n, dtype=torch.float32)


@custom_op("univigu_fast::modulated_layer_norm_bwd")
def _mln_bwd_op(dout: torch.Tensor, x: torch.Tensor, seg_offsets: torch.Tensor, scale: torch.Tensor,
                mean: torch.Tensor, rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    T, D = x.shape
    S = seg_offsets.numel() - 1
    dx = torch.empty_like(x)
    dshift = torch.zeros((S, D), device=x.device, dtype=torch.float32)
    dscale = torch.zeros((S, D), device=x.device, dtype=torch.float32)
    if T:
        block_t, block_d, chunk, programs, num_warps = geometry(T, D, x.device, reduce=True)
        _mln_bwd_kernel[(programs,)](
            x, dout, dx, seg_offsets, scale, mean, rstd, dshift, dscale, T, D, S, chunk,
            x.stride(0), dout.stride(0), dx.stride(0), scale.stride(0),
            BLOCK_T=block_t, BLOCK_D=block_d, num_warps=num_warps)
    return dx, dshift, dscale


@_mln_bwd_op.register_fake
def _(dout, x, seg_offsets, scale, mean, rstd):
    S = seg_offsets.shape[0] - 1
    return torch.empty_like(x), x.new_empty((S, x.shape[1]), dtype=torch.float32), x.new_empty((S, x.shape[1]), dtype=torch.float32)


class ModulatedLayerNormFunction(torch.autograd.Function):
    """Autograd wrapper of the fused forward / backward custom ops (inputs already validated, unit last stride)."""

    @staticmethod
    def forward(ctx, x, seg_offsets, shift, scale, eps):
        out, mean, rstd = _mln_fwd_op(x, seg_offsets, shift, scale, eps, True)
        ctx.save_for_backward(x, seg_offsets, scale, mean, rstd)
        return out

    @staticmethod
    def backward(ctx, dout):
        x, seg_offsets, scale, mean, rstd = ctx.saved_tensors
        dx, dshift, dscale = _mln_bwd_op(dout.contiguous(), x, seg_offsets, scale, mean, rstd)
        return dx, None, dshift, dscale, None  # fp32 sums; autograd casts them to shift/scale's dtype


def check_inputs(x, seg_offsets, shift, scale, eps=1e-6) -> None:
    """The checks of :func:`modulated_layer_norm` (same arguments; any floating dtype)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a (T, dim) tensor, got shape {tuple(getattr(x, 'shape', ()))}")
    if not x.is_floating_point():
        raise TypeError(f"x must be floating point, got {x.dtype}")
    check_segments(seg_offsets, x.shape[0], x.device)
    S = seg_offsets.numel() - 1
    for name, t in (("shift", shift), ("scale", scale)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a (S={S}, dim={x.shape[1]}) tensor, got {type(t).__name__}")
        if t.shape != (S, x.shape[1]):
            raise ValueError(f"{name} must be (S={S}, dim={x.shape[1]}), got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
    check_eps(eps)
    check_devices(x, shift=shift, scale=scale)


def modulated_layer_norm(
    x: torch.Tensor, seg_offsets: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """Fused ``LN(x) * (1 + scale[seg]) + shift[seg]``; x (T, dim), shift/scale (S, dim), seg_offsets int32 (S+1,).

    fp32 math, result in ``x.dtype``. Differentiable in x, shift and scale. Triton on CUDA / under the
    interpreter, else the reference (logged once). ``seg_offsets`` must be a valid table (0 first, T
    last, non-decreasing), on x's device; checked (``_utils.check_segments``: no sync for the packer's tables).
    """
    check_inputs(x, seg_offsets, shift, scale, eps)
    if not use_triton(x, seg_offsets, shift, scale):
        log_once("modulated_layer_norm: Triton unavailable for these tensors; using the PyTorch reference")
        return modulated_layer_norm_reference(x, seg_offsets, shift, scale, eps)
    x, shift, scale = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, shift, scale))
    if torch.is_grad_enabled() and (x.requires_grad or shift.requires_grad or scale.requires_grad):
        return ModulatedLayerNormFunction.apply(x, seg_offsets, shift, scale, float(eps))
    return _mln_fwd_op(x, seg_offsets, shift, scale, float(eps), False)[0]


class ModulatedLayerNorm(torch.nn.Module):
    """Thin module: ``forward(x, seg_offsets, shift, scale)`` with a fixed ``eps``."""

    def __init__(self, eps: float = 1e-6):
        super().__init__()
        self.eps = eps

    def forward(self, x, seg_offsets, shift, scale):
        return modulated_layer_norm(x, seg_offsets, shift, scale, self.eps)
