"""Fused linear + cross-entropy for training the text logits head (DESIGN §5.2).

``loss = CE(x @ weight.T + bias, target)`` without materialising the ``(N, V)`` logits or their
gradient:

* **Forward**: per row ``lse = logsumexp(z)``, the target logit ``z_t`` and, for label smoothing,
  ``sum_v z_v``, by one of two methods: ``"fused"``, the kernel of :mod:`.linear_argmax` (one
  pass over the vocabulary, logits tiles in registers, no buffer), or ``"chunked"``, one cuBLAS
  GEMM per ``Vc``-column chunk into a reused (N, Vc) buffer plus ``_ce_chunk_stats_kernel``
  (online max / sum-exp). On CUDA the faster is picked by timing both once per shape bucket.
  Per-row loss (``eps`` = label smoothing, as
  ``torch.nn.functional.cross_entropy``):
  ``(1 - eps) (lse - z_t) + eps (lse - mean_v z_v) = lse - (1 - eps) z_t - eps / V sum_v z_v``.
  Only ``lse`` (N floats) is saved for the backward: no gradient is held between the passes.
* **Backward**: the vocabulary is walked in chunks of ``Vc`` columns. For each chunk the logits
  ``(N, Vc)`` are recomputed with one cuBLAS GEMM into a reused buffer, turned in place into
  ``dz = r * (softmax(z) - (1 - eps) onehot(t) - eps / V)`` by ``_ce_grad_kernel`` (``r`` = the
  row's incoming gradient / normaliser, 0 on ignored rows), then ``dW[chunk] = dz^T x`` (a slice of
  dW written once, never accumulated), ``db[chunk] = sum_rows dz``, ``dx += dz W[chunk]``.
  Peak memory: ``dW`` and ``dx`` themselves plus ``N x Vc`` logits (``Vc`` chosen so that is about
  ``N x dim``, like ``x``), i.e. O(chunk) beyond the outputs, and nothing between fwd and bwd
  but ``lse``. Every GEMM has the full ``N`` or the full ``Vc`` as a large dimension (Liger's
  row-chunking instead issues GEMMs with a few dozen rows at V = 256K).

``dx`` accumulation over chunks is in fp32 (each chunk's ``dz W[chunk]`` is one GEMM with fp32
output, ``torch.addmm(..., out_dtype=float32)``, where torch has it). For 16-bit ``x`` the fp32
accumulator lives in the not-yet-written tail rows of ``dW``'s own storage (its last ``2 N`` rows:
``bytes(N x dim fp32) = bytes(2N x dim 16-bit)``), so it costs no memory; the chunks overlapping
that tail are processed last, after the accumulator is rounded once into ``dx``, and add into
``dx`` in its dtype (``2N / Vc + 1`` additions). Where ``dW`` is not requested or is too small,
the accumulator is a plain fp32 buffer. ``logits`` and ``dz`` chunks are in the input dtype (as
Liger's). Precision: the forward's ``lse`` comes from fp32 logits, the backward's softmax from
the chunk rounded to the input dtype, so in 16-bit a row's ``softmax - onehot`` no longer sums to
exactly 0: measured in fp16 against fp64, ``dx`` relative error 3.2e-3 (torch's own fp16 path 2.2e-3)
at logits of magnitude ~28, 1.3e-2 (3.1e-3) at ~110; equal at ~3.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ._utils import (HAS_TRITON, cdiv, check_devices, log_once, next_power_of_2, on_input_device, pick_fastest,
                     use_triton)
from .linear_argmax import _linear_argmax_launch
from .linear_argmax import check_inputs as _check_head_inputs

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .linear_argmax import _finite_or_zero

_REDUCTIONS = ("mean", "sum", "none")


def linear_cross_entropy_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Naive: full ``(N, V)`` fp32 logits, then ``torch.nn.functional.cross_entropy``.

    x (N, dim), weight (V, dim), target (N,) int, bias (V,) -> fp32 loss: scalar, or (N,) for
    ``reduction="none"`` (0 on ignored rows). Differentiable w.r.t. x, weight and bias.
    """
    with torch.autocast(x.device.type, enabled=False):  # fp32 logits (autocast would make the matmul 16-bit)
        logits = x.float() @ weight.float().t()
    if bias is not None:
        logits = logits + bias.float()
    return F.cross_entropy(logits, target.long(), ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)


# ----------------------------------------------------------------------------------------------
# Triton kernel: in-place softmax gradient of one (N, Vc) logits chunk
# ----------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _ce_grad_kernel(
        z_ptr,            # (N, Vc) logits chunk, overwritten with dz (same dtype)
        lse_ptr,          # (N,) fp32 logsumexp of the full row
        tgt_ptr,          # (N,) int32 target, -1 on ignored rows
        scale_ptr,        # (N,) fp32 row scale r (0 on ignored rows)
        N, VC, v0, one_minus_eps, eps_over_v,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
        row_mask = rows < N
        mask = row_mask[:, None] & (cols[None, :] < VC)
        offs = rows[:, None].to(tl.int64) * VC + cols[None, :]
        z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
        tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=-1)
        r = tl.load(scale_ptr + rows, mask=row_mask, other=0.0)
        # d loss / d z_v = softmax(z)_v - (1 - eps) [v == t] - eps / V   (times the row's scale)
        p = tl.exp(z - lse[:, None])
        g = p - eps_over_v - tl.where(cols[None, :] + v0 == tgt[:, None], one_minus_eps, 0.0)
        g = g * r[:, None]
        tl.store(z_ptr + offs, g.to(z_ptr.dtype.element_ty), mask=mask)


    @triton.jit
    def _ce_chunk_stats_kernel(
        z_ptr,            # (N, Vc) logits chunk (fp32 or 16-bit), without bias
        b_ptr,            # (V,) bias (if HAS_BIAS)
        m_ptr, s_ptr,     # (N,) fp32 running max / sum-exp, updated in place
        zt_ptr, zs_ptr,   # (N,) fp32 running target logit / logit sum, updated in place
        tgt_ptr,          # (N,) int32 target, -1 on ignored rows
        N, VC, v0,
        HAS_BIAS: tl.constexpr, SUM_Z: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        m = tl.load(m_ptr + rows, mask=row_mask, other=0.0)
        s = tl.load(s_ptr + rows, mask=row_mask, other=0.0)
        tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=-1)
        zt = tl.zeros((BLOCK_N,), tl.float32)
        zs = tl.zeros((BLOCK_N,), tl.float32)
        for c0 in range(0, VC, BLOCK_V):
            cols = c0 + tl.arange(0, BLOCK_V)
            col_mask = cols < VC
            mask = row_mask[:, None] & col_mask[None, :]
            z = tl.load(z_ptr + rows[:, None].to(tl.int64) * VC + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                z += tl.load(b_ptr + v0 + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
            zt += tl.sum(tl.where(cols[None, :] + v0 == tgt[:, None], z, 0.0), axis=1)
            if SUM_Z:
                zs += tl.sum(tl.where(mask, z, 0.0), axis=1)
            z = tl.where(mask, z, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, axis=1))
            m_shift = _finite_or_zero(m_new)  # exp(-inf - -inf) / exp(inf - inf) would be NaN
            s = s * tl.exp(m - m_shift) + tl.sum(tl.exp(z - m_shift[:, None]), axis=1)
            m = tl.where(row_mask, m_new, 0.0)
        tl.store(m_ptr + rows, m, mask=row_mask)
        tl.store(s_ptr + rows, s, mask=row_mask)
        tl.store(zt_ptr + rows, tl.load(zt_ptr + rows, mask=row_mask, other=0.0) + zt, mask=row_mask)
        if SUM_Z:
            tl.store(zs_ptr + rows, tl.load(zs_ptr + rows, mask=row_mask, other=0.0) + zs, mask=row_mask)


@on_input_device
def _forward_stats_chunked(x, weight, bias, tgt, chunk_v, sum_logits):
    """Forward statistics with cuBLAS: per chunk of ``Vc`` columns one GEMM into an (N, Vc) buffer
    (fp32 where torch can write fp32 from 16-bit inputs), then an online max / sum-exp update.
    Returns ``(lse, z_t, z_sum)`` (N,) fp32, like :func:`_linear_argmax_launch`."""
    n, d = x.shape
    v = weight.shape[0]
    dev = x.device
    bias = None if bias is None else bias.contiguous()  # the statistics kernel reads it through a pointer
    m = torch.full((n,), float("-inf"), device=dev, dtype=torch.float32)
    s, zt, zs = (torch.zeros(n, device=dev, dtype=torch.float32) for _ in range(3))
    wide = _out_dtype_ok("mm", x.dtype, dev)  # fp32 logits chunk from 16-bit inputs
    buf = torch.empty(n * min(chunk_v, v), device=dev, dtype=torch.float32 if wide else x.dtype)
    block_n, block_v = (16, 32) if dev.type == "cpu" else (16, 512)
    for v0 in range(0, v, chunk_v):
        v1 = min(v0 + chunk_v, v)
        z = buf[: n * (v1 - v0)].view(n, v1 - v0)
        if wide:
            torch.mm(x, weight[v0:v1].t(), out_dtype=torch.float32, out=z)
        else:
            torch.mm(x, weight[v0:v1].t(), out=z)
        _ce_chunk_stats_kernel[(cdiv(n, block_n),)](
            z, bias if bias is not None else z, m, s, zt, zs, tgt, n, v1 - v0, v0,
            HAS_BIAS=bias is not None, SUM_Z=sum_logits, BLOCK_N=block_n, BLOCK_V=block_v)
    return m + torch.log(s), zt, (zs if sum_logits else None)


def _forward_stats_fused(x, weight, bias, tgt, chunk_v, sum_logits):
    """Forward statistics with the fused Triton kernel (no logits buffer at all)."""
    _, _, lse, z_t, z_sum = _linear_argmax_launch(x, weight, bias, target=tgt, sum_logits=sum_logits)
    return lse, z_t, z_sum


FORWARD_METHODS = {"fused": _forward_stats_fused, "chunked": _forward_stats_chunked}
_FORWARD_CHOICE: dict = {}


def _pick_forward(x, weight, bias, tgt, chunk_v, sum_logits) -> str:
    """On CUDA, time both forward methods once per (N bucket, dim, V, dtype, bias) and keep the
    faster (like an autotuner); elsewhere the fused kernel."""
    if not x.is_cuda:
        return "fused"
    n, d = x.shape
    key = (next_power_of_2(max(n, 1)), d, weight.shape[0], x.dtype, bias is not None, sum_logits)
    candidates = {name: functools.partial(fn, x, weight, bias, tgt, chunk_v, sum_logits)
                  for name, fn in FORWARD_METHODS.items()}
    return pick_fastest(_FORWARD_CHOICE, key, candidates, "linear_cross_entropy: forward method", x.device,
                        repeats=1)


@on_input_device
def _ce_grad_inplace(z, lse, tgt, scale, v0, label_smoothing, v_total):
    n, vc = z.shape
    if use_triton(z):
        block_n, block_v = (16, 32) if z.device.type == "cpu" else (32, 256)
        grid = (cdiv(n, block_n), cdiv(vc, block_v))
        _ce_grad_kernel[grid](z, lse, tgt, scale, n, vc, v0, 1.0 - label_smoothing,
                              label_smoothing / v_total, BLOCK_N=block_n, BLOCK_V=block_v)
        return z
    # no Triton: the same math in torch (used only when the op runs without a kernel backend)
    cols = torch.arange(v0, v0 + vc, device=z.device)
    g = torch.exp(z.float() - lse[:, None]) - label_smoothing / v_total
    g = g - (1.0 - label_smoothing) * (cols[None, :] == tgt[:, None].long()).float()
    z.copy_(g * scale[:, None])
    return z


def default_chunk_v(n: int, dim: int, v: int) -> int:
    """Vocabulary columns per backward chunk: the (N, Vc) chunk about as large as x (>= 4M elements),
    a multiple of 256."""
    vc = max(dim, (1 << 22) // max(n, 1))
    return max(256, min(v + 255, vc) // 256 * 256)


_OUT_DTYPE_OK: dict = {}  # (op, dtype) -> whether torch's out_dtype=float32 GEMM works here (probed once)


def _out_dtype_ok(op: str, dtype: torch.dtype, device: torch.device) -> bool:
    """Probe once per (op, dtype) whether ``torch.addmm`` / ``torch.mm`` with ``out_dtype=float32``
    and ``out=`` exist for 16-bit inputs on ``device`` (CUDA, torch >= 2.8) and give the right result."""
    if device.type != "cuda" or dtype == torch.float32:
        return False
    key = (op, dtype)
    if key not in _OUT_DTYPE_OK:
        ok = False
        try:
            acc = torch.full((2, 2), 1.0, device=device)
            a = torch.ones(2, 3, device=device, dtype=dtype)
            if op == "addmm":
                torch.addmm(acc, a, a.t(), out_dtype=torch.float32, out=acc)
                ok = bool((acc == 4.0).all())
            else:
                torch.mm(a, a.t(), out_dtype=torch.float32, out=acc)
                ok = bool((acc == 3.0).all())
        except (RuntimeError, TypeError):
            pass
        _OUT_DTYPE_OK[key] = ok
        if not ok:
            log_once(f"linear_cross_entropy: torch.{op}(out_dtype=float32) unavailable for {dtype}; "
                     "using 16-bit GEMM outputs there")
    return _OUT_DTYPE_OK[key]


def _accumulate_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc (fp32) += a @ b`` for 16-bit ``a, b``: one GEMM with fp32 output where torch has
    ``addmm(out_dtype=)``; otherwise the product in ``a.dtype``, added in fp32."""
    if _out_dtype_ok("addmm", a.dtype, acc.device):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.add_(torch.mm(a, b))


def _dx_accumulator(n, d, x, dw, v, chunk_v):
    """fp32 (N, d) accumulator for dx and the first dW row it occupies (``v`` if it is a buffer of
    its own). For 16-bit weights it is carved out of dW's last rows (written last), when they fit."""
    if dw is not None and dw.element_size() == 2:
        acc_rows = 2 * n  # N x d fp32 = 2N rows of d 16-bit values
        tail_start = (v - acc_rows) // chunk_v * chunk_v if v - acc_rows >= chunk_v else 0
        if tail_start > 0 and (tail_start * d) % 2 == 0:
            flat = dw.view(-1)[tail_start * d: tail_start * d + 2 * n * d]
            return flat.view(torch.float32).view(n, d), tail_start
    return torch.empty(n, d, device=x.device, dtype=torch.float32), v


def _linear_ce_backward(x, weight, bias, tgt, lse, scale, label_smoothing, chunk_v,
                        need_dx, need_dw, need_db):
    """Chunked backward. x (N, d), weight (V, d), tgt int32 (N,), lse / scale fp32 (N,).

    Returns ``dx`` (N, d) x.dtype, ``dW`` (V, d) weight.dtype, ``db`` (V,) fp32 (or None each).
    """
    n, d = x.shape
    v = weight.shape[0]
    dev = x.device
    dw = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_dw else None
    db = torch.empty(v, device=dev, dtype=torch.float32) if need_db else None
    dx, acc, tail_start = None, None, v
    if need_dx:
        if x.dtype == torch.float32:
            dx = acc = torch.zeros(n, d, device=dev, dtype=torch.float32)
        else:
            dx = torch.empty(n, d, device=dev, dtype=x.dtype)
            acc, tail_start = _dx_accumulator(n, d, x, dw, v, chunk_v)
            acc.zero_()
    buf = torch.empty(n * min(chunk_v, v), device=dev, dtype=x.dtype)
    for v0 in range(0, v, chunk_v):
        v1 = min(v0 + chunk_v, v)
        if acc is not None and acc is not dx and v0 >= tail_start:
            dx.copy_(acc)  # round the fp32 sum once: dW's tail (the accumulator) is written next
            acc = None
        z = buf[: n * (v1 - v0)].view(n, v1 - v0)
        w_c = weight[v0:v1]
        if bias is not None:  # logits chunk, recomputed: z = x W_c^T + b_c
            torch.addmm(bias[v0:v1].to(x.dtype), x, w_c.t(), out=z)
        else:
            torch.mm(x, w_c.t(), out=z)
        _ce_grad_inplace(z, lse, tgt, scale, v0, label_smoothing, v)  # z <- dz
        if dw is not None:
            torch.mm(z.t(), x, out=dw[v0:v1])
        if db is not None:
            db[v0:v1] = z.sum(0, dtype=torch.float32)
        if need_dx:
            if acc is dx:        # fp32 inputs
                dx.addmm_(z, w_c)
            elif acc is not None:
                _accumulate_fp32(acc, z, w_c)
            else:                # the last chunks, over dW's tail: add in x.dtype
                dx.addmm_(z, w_c)
    if acc is not None and acc is not dx:
        dx.copy_(acc)
    if db is not None and bias is not None:
        db = db.to(bias.dtype)
    return dx, dw, db


class LinearCrossEntropyFunction(torch.autograd.Function):
    """autograd.Function: forward = per-row lse / target-logit statistics (fused kernel or GEMM
    chunks), saving only lse; backward = chunked recompute (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, bias, target, ignore_index, reduction, label_smoothing, chunk_v, forward_method):
        n = x.shape[0]
        v = weight.shape[0]
        valid = _not_ignored(target, ignore_index)
        tgt = torch.where(valid, target, -1).to(torch.int32)
        chunk_v = chunk_v or default_chunk_v(n, x.shape[1], v)
        if n == 0:
            lse = torch.empty(0, device=x.device, dtype=torch.float32)
            rows = lse
        else:
            sum_z = label_smoothing > 0
            method = forward_method or _pick_forward(x, weight, bias, tgt, chunk_v, sum_z)
            lse, z_t, z_sum = FORWARD_METHODS[method](x, weight, bias, tgt, chunk_v, sum_z)
            rows = lse - (1.0 - label_smoothing) * z_t
            if label_smoothing > 0:
                rows = rows - (label_smoothing / v) * z_sum
        rows = torch.where(valid, rows, 0.0)
        count = valid.sum()
        if reduction == "mean":
            loss = rows.sum() / count
        elif reduction == "sum":
            loss = rows.sum()
        else:
            loss = rows
        ctx.save_for_backward(x, weight, bias, tgt, lse, count)
        ctx.reduction, ctx.label_smoothing, ctx.chunk_v = reduction, label_smoothing, chunk_v
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        # create_graph=True (eager): the chunked backward writes into buffers (out=), it has no graph
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            raise RuntimeError("linear_cross_entropy has no double backward (create_graph=True); use "
                               "linear_cross_entropy_reference where second derivatives are needed")
        x, weight, bias, tgt, lse, count = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        if x.shape[0] == 0 or not (need_dx or need_dw or need_db):
            dx = torch.zeros_like(x) if need_dx else None
            dw = torch.zeros_like(weight) if need_dw else None
            db = torch.zeros_like(bias) if need_db else None
            return dx, dw, db, None, None, None, None, None, None
        valid = (tgt >= 0).float()
        g = grad_out.float()
        if ctx.reduction == "mean":
            scale = valid * (g / count.clamp_min(1))
        else:
            scale = valid * g  # scalar (sum) or per-row (none)
        dx, dw, db = _linear_ce_backward(x, weight, bias, tgt, lse, scale.contiguous(), ctx.label_smoothing,
                                         ctx.chunk_v, need_dx, need_dw, need_db and bias is not None)
        return dx, dw, db, None, None, None, None, None, None


def _not_ignored(target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """``target != ignore_index``, as the reference's int64 comparison: an ``ignore_index`` outside an int32
    target's range matches no row (compared in int32 it would wrap, 2**32 matching 0)."""
    info = torch.iinfo(target.dtype)
    if not info.min <= ignore_index <= info.max:
        return torch.ones_like(target, dtype=torch.bool)
    return target != ignore_index


def check_inputs(x, weight, target, bias=None, *, ignore_index: int = -100, reduction: str = "mean",
                 label_smoothing: float = 0.0, any_float: bool = False) -> None:
    """The checks of :func:`linear_cross_entropy` (same arguments); ``any_float``: any floating dtype (what
    the reference takes; ``ops`` checks with it before falling back)."""
    _check_head_inputs(x, weight, bias, any_float=any_float)
    if bias is not None and bias.dtype != x.dtype:
        # the backward recomputes the logits in x's dtype: a wider bias would be rounded there (and
        # overflow float16 above 65504), unlike the forward, which reads it in float32
        raise TypeError(f"bias dtype {bias.dtype} must match x dtype {x.dtype} (as torch.nn.functional.linear)")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"target must be int64 or int32, got {target.dtype}")
    if target.shape != (x.shape[0],):
        raise ValueError(f"target must be (N={x.shape[0]},), got shape {tuple(target.shape)}")
    check_devices(x, target=target)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) \
            or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be a float in [0, 1], got {label_smoothing!r}")
    bad = _not_ignored(target, ignore_index) & ((target < 0) | (target >= weight.shape[0]))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"target[{i}] = {int(target[i])} is outside [0, V={weight.shape[0]}) and is not "
                         f"ignore_index={ignore_index}")


def linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    chunk_v: int | None = None,
    forward_method: str | None = None,
) -> torch.Tensor:
    """Fused ``cross_entropy(x @ weight.T + bias, target)``, forward and backward.

    x (N, dim), weight (V, dim) (same float dtype), target (N,) int64/int32 with ``ignore_index``
    for padding, bias (V,) or None. Returns an fp32 loss: the mean over non-ignored rows
    (``"mean"``, NaN if all are ignored, as torch), their sum (``"sum"``) or per row (``"none"``,
    0 on ignored rows). ``label_smoothing`` as ``torch.nn.functional.cross_entropy``. ``chunk_v``:
    vocabulary columns per chunk (default :func:`default_chunk_v`). ``forward_method``: ``"fused"``
    (the Triton kernel of :mod:`.linear_argmax`, no logits buffer) or ``"chunked"`` (cuBLAS GEMM per
    chunk + online statistics); default: on CUDA the faster of the two, timed once per shape bucket.
    """
    check_inputs(x, weight, target, bias, ignore_index=ignore_index, reduction=reduction,
                 label_smoothing=label_smoothing)
    if chunk_v is not None and (not isinstance(chunk_v, int) or chunk_v < 1):
        raise ValueError(f"chunk_v must be a positive int or None, got {chunk_v!r}")
    if forward_method is not None and forward_method not in FORWARD_METHODS:
        raise ValueError(f"forward_method must be one of {tuple(FORWARD_METHODS)} or None, got {forward_method!r}")
    if not use_triton(x, weight, bias, target):
        log_once("linear_cross_entropy: Triton path unavailable (needs CUDA or TRITON_INTERPRET=1), "
                 "using the reference")
        return linear_cross_entropy_reference(x, weight, target, bias, ignore_index=ignore_index,
                                              reduction=reduction, label_smoothing=label_smoothing)
    return LinearCrossEntropyFunction.apply(x, weight, bias, target, ignore_index, reduction,
                                            float(label_smoothing), chunk_v, forward_method)


class LinearCrossEntropyLoss(torch.nn.Module):
    """Thin module: ``forward(x, weight, target, bias=None)`` -> :func:`linear_cross_entropy`."""

    def __init__(self, ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0):
        super().__init__()
        self.ignore_index, self.reduction, self.label_smoothing = ignore_index, reduction, label_smoothing

    def forward(self, x, weight, target, bias=None):
        return linear_cross_entropy(x, weight, target, bias, ignore_index=self.ignore_index,
                                    reduction=self.reduction, label_smoothing=self.label_smoothing)
