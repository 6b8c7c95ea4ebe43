"""Modality-routed grouped FFN over the packed ``[video; text]`` sequence (DESIGN §5.1).

Spec (paper Eq. 13/15): token rows of segment ``s`` go through expert ``e = seg_expert[s]``::

    y = W2_e · gelu_tanh(W1_e · x + b1_e) + b2_e
    out = residual + gate[s] * y            (or ``y`` when residual and gate are None)
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ._utils import (HAS_TRITON, TensorDescriptor, cdiv, check_contiguous, check_devices, check_segments,
                     custom_op, expand_segments, host_list, interpreting, log_once, segment_sum, tile_table,
                     tma_compatible, token_segments, tracing, use_triton)

if HAS_TRITON:
    import triton
    import triton.language as tl

Expert = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # (w1 (F,dim), b1 (F,), w2 (dim,F), b2 (dim,))


def modality_ffn_reference(
    x: torch.Tensor,
    seg_offsets: torch.Tensor,
    seg_expert: torch.Tensor,
    experts: Sequence[Expert],
    *,
    residual: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """Naive routing: gather each expert's rows, two dense ``F.linear`` calls, scatter back.

    x (T, dim); seg_offsets int32 (S+1,); seg_expert int32 (S,); gate (S, dim); residual (T, dim).
    Computes in the dtype of ``x`` (pass fp32 tensors for an fp32 reference).
    """
    token_expert = expand_segments(seg_expert.long(), seg_offsets)
    y = x.new_empty(x.shape)
    for e, (w1, b1, w2, b2) in enumerate(experts):
        rows = (token_expert == e).nonzero(as_tuple=True)[0]
        if rows.numel() == 0:
            continue
        h = F.gelu(F.linear(x.index_select(0, rows), w1, b1), approximate="tanh")
        y.index_copy_(0, rows, F.linear(h, w2, b2).to(y.dtype))  # F.linear is bf16 under autocast
    if gate is None and residual is None:
        return y
    # gated residual in fp32, as Wan: (h.float() + y.float() * gate).type_as(h)
    out = y.float()
    if gate is not None:
        out = out * expand_segments(gate.float(), seg_offsets)
    if residual is not None:
        out = residual.float() + out
    return out.to(x.dtype if residual is None else residual.dtype)


class GELUProj(torch.nn.Module):
    """``net.0`` of a diffusers FeedForward: ``gelu_tanh(proj(x))`` (parameter names ``proj.{weight,bias}``)."""

    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.proj = torch.nn.Linear(dim, inner_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(torch.nn.Module):
    """Wan's FFN under diffusers' names: ``net.0.proj`` (dim -> inner, GELU-tanh), ``net.2`` (inner -> dim)."""

    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.net = torch.nn.ModuleList([GELUProj(dim, inner_dim), torch.nn.Dropout(0.0), torch.nn.Linear(inner_dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x

    def expert(self) -> Expert:
        """``(w1, b1, w2, b2)`` in ``nn.Linear`` layout, as :func:`modality_ffn` takes them."""
        gelu_proj, _, out = self.net  # (iterating a ModuleList is cheaper than indexing it: once per layer and step)
        return (gelu_proj.proj.weight, gelu_proj.proj.bias, out.weight, out.bias)


# ----------------------------------------------------------------------------------------------
# Triton grouped GEMM over the segment table
# ----------------------------------------------------------------------------------------------
# One kernel serves the four GEMMs of the FFN (forward X·W1ᵀ, H·W2ᵀ; backward dY·W2, dP·W1):
#   C[rows of segment s, n] = A[rows, :K_e] @ B_e[:K_e, n] (+ epilogue),   e = seg_expert[s]
# The two experts' weights are separate kernel arguments (aligned, used in place: no stacking, no
# gather/scatter of rows); each segment's program picks its expert's pointer and sizes.
# Tile scheduler: a flat table of (segment, first row) M-tiles over every segment of every sample
# (built on the host, cached per segment table); one 1-D launch covers (M-tile, N-tile) pairs with a
# global index, swizzled in bands of GROUP_M M-tiles for L2 reuse. A 1-token text segment costs one
# M-tile and a 30K-token video segment 256 of them, all in the same launch; N-tiles past a narrower
# expert's F_e exit at once. On Hopper (16-bit) the autotuner also tries TMA-descriptor loads: one
# descriptor pair per expert, A limited to that expert's K_e columns, fewer registers (128x128x64:
# 135 instead of 161 for the first GEMM, ptxas sm_90, Triton 3.6).

EPI_NONE, EPI_BIAS_GELU, EPI_BIAS_GATED, EPI_GELU_GRAD = 0, 1, 2, 3

#: Backward strategy. False: the forward saves the pre-activation (T, F_max) and the backward gets
#: h = gelu(pre) from its dP epilogue. True: nothing (T, F)-sized is saved; the backward recomputes
#: pre and h with one extra grouped GEMM (x W1ᵀ). bench/bench_modality_ffn.py times both.
RECOMPUTE_PREACTIVATION = False
# GELU(tanh) constants appear literally in the kernels: sqrt(2 / pi) = 0.7978845608028654 and, in
# _gelu_sigmoid, -2 sqrt(2 / pi) log2(e) = -2.302208198144325 (times 0.044715: -0.1029432395800235).

if HAS_TRITON:

    @triton.jit
    def _gelu_sigmoid(x):
        """``s = sigmoid(2u)``, ``u = sqrt(2/pi) (x + 0.044715 x^3)``: GELU(tanh)(x) = x (1 + tanh u) / 2
        = x s, and its derivative s + 2 sqrt(2/pi) x s (1 - s) (1 + 3 * 0.044715 x^2). One exp2 and one
        division, no tanh and no 1 + tanh cancellation for negative x; exp(-2u) = exp2(x (A + B x^2))."""
        return 1.0 / (1.0 + tl.exp2(x * (-2.302208198144325 + -0.1029432395800235 * x * x)))

    @triton.jit
    def _tma_mainloop(a_desc, b_desc, row0, n0, K, B_TRANS: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """``A[row0:+BLOCK_M, :K] @ B[:K, n0:+BLOCK_N]`` through TMA descriptors (boxes zero-filled
        past each descriptor's shape: A's is (T, K_e), B's expert e's weight)."""
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a = a_desc.load([row0, k0])
            if B_TRANS:
                b = tl.trans(b_desc.load([n0, k0]))
            else:
                b = b_desc.load([k0, n0])
            acc = tl.dot(a, b, acc)
        return acc

    @triton.jit(do_not_specialize=["NUM_M_TILES"])  # tile count follows T: no recompiles per video size
    def _grouped_gemm_kernel(
        A, B0, B1, C, BIAS0, BIAS1, AUX, RES, GATE, H_OUT,
        A0_DESC, A1_DESC, B0_DESC, B1_DESC,
        TILE_SEG, TILE_ROW, SEG_OFF, SEG_EXPERT, NUM_M_TILES,
        K0, N0, K1, N1,
        stride_am, stride_cm, stride_auxm, stride_gate,
        B_TRANS: tl.constexpr, EPILOGUE: tl.constexpr, HAS_GATE: tl.constexpr, HAS_RES: tl.constexpr,
        WRITE_AUX: tl.constexpr, WRITE_H: tl.constexpr, K_MAX: tl.constexpr, N_MAX: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        ALIGNED: tl.constexpr, IEEE: tl.constexpr, TMA_OK: tl.constexpr, USE_TMA: tl.constexpr,
    ):
        """C[rows of segment s] = A[rows, :K_e] @ B_e (+ epilogue), e = SEG_EXPERT[s] in {0, 1}.

        B_e is expert e's weight in nn.Linear layout, row-major: B_TRANS reads it transposed
        (B_e[k, n] = W[n, k], W of shape (N_e, K_e)), otherwise as is (W of shape (K_e, N_e)).
        USE_TMA (Hopper, 16-bit): the main loop reads A and B_e through the TMA descriptors
        A{e}_DESC (A limited to K_e columns) and B{e}_DESC instead of pointers. TMA_OK: the
        launcher built them (autotune key; the prune drops USE_TMA configs without it)."""
        # 1-D grid over (M-tile, N-tile) pairs, swizzled in bands of GROUP_M M-tiles so that the
        # programs resident at one time share A row-blocks and B column-blocks in L2.
        pid = tl.program_id(0)
        num_n = tl.cdiv(N_MAX, BLOCK_N)
        band = GROUP_M * num_n
        first_m = (pid // band) * GROUP_M
        group_m = tl.minimum(NUM_M_TILES - first_m, GROUP_M)
        pid_m = first_m + (pid % band) % group_m
        pid_n = (pid % band) // group_m
        seg = tl.load(TILE_SEG + pid_m)
        row0 = tl.load(TILE_ROW + pid_m)
        row_end = tl.load(SEG_OFF + seg + 1)
        e = tl.load(SEG_EXPERT + seg)
        if e == 0:
            B = B0
            BIAS = BIAS0
            K = K0
            N = N0
        else:
            B = B1
            BIAS = BIAS1
            K = K1
            N = N1
        if ALIGNED:  # every K_e, N_e a multiple of 16 (host-checked): keeps loads vectorised
            K = tl.multiple_of(K, 16)
            N = tl.multiple_of(N, 16)
        n0 = pid_n * BLOCK_N
        if n0 >= N:  # an expert narrower than N_MAX
            return
        rows = row0 + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        rows = tl.where(row_ok, rows, row0).to(tl.int64)
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        if USE_TMA:  # a descriptor cannot be picked at run time like a pointer: one loop per expert
            if e == 0:
                acc = _tma_mainloop(A0_DESC, B0_DESC, row0, n0, K, B_TRANS, BLOCK_M, BLOCK_N, BLOCK_K)
            else:
                acc = _tma_mainloop(A1_DESC, B1_DESC, row0, n0, K, B_TRANS, BLOCK_M, BLOCK_N, BLOCK_K)
        else:
            # columns stay unclamped (contiguous, so loads/stores vectorise); masks guard the tail
            ks = tl.arange(0, BLOCK_K)
            a_ptrs = A + rows[:, None] * stride_am + ks[None, :]
            if B_TRANS:
                b_ptrs = B + cols[None, :].to(tl.int64) * K + ks[:, None]
                b_step = BLOCK_K
            else:
                b_ptrs = B + ks[:, None].to(tl.int64) * N + cols[None, :]
                b_step = BLOCK_K * N
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                k_ok = (k0 + ks) < K
                a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                if IEEE:
                    acc += tl.dot(a, b, input_precision="ieee")
                else:
                    acc += tl.dot(a, b)
                a_ptrs += BLOCK_K
                b_ptrs += b_step
        mask = row_ok[:, None] & col_ok[None, :]
        if EPILOGUE == 1:  # + b1, keep the pre-activation, GELU(tanh)
            acc += tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            if WRITE_AUX:
                tl.store(AUX + rows[:, None] * stride_auxm + cols[None, :], acc.to(AUX.dtype.element_ty), mask=mask)
            acc = acc * _gelu_sigmoid(acc)
        elif EPILOGUE == 2:  # + b2, then residual + gate[seg] * y in fp32
            acc += tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            if WRITE_AUX:  # y itself, for the gate's gradient
                tl.store(AUX + rows[:, None] * stride_auxm + cols[None, :], acc.to(AUX.dtype.element_ty), mask=mask)
            if HAS_GATE:
                acc = acc * tl.load(GATE + seg * stride_gate + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            if HAS_RES:
                acc += tl.load(RES + rows[:, None] * stride_cm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        elif EPILOGUE == 3:  # dP = dH * gelu'(pre)
            pre = tl.load(AUX + rows[:, None] * stride_auxm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            sg = _gelu_sigmoid(pre)
            dgelu = sg + (2 * 0.7978845608028654) * pre * sg * (1.0 - sg) * (1.0 + 3 * 0.044715 * pre * pre)
            if WRITE_H:  # h = gelu(pre) for the weight gradient of W2 (no separate pass)
                h = pre * sg
                tl.store(H_OUT + rows[:, None] * stride_auxm + cols[None, :], h.to(H_OUT.dtype.element_ty), mask=mask)
            acc = acc * dgelu
        tl.store(C + rows[:, None] * stride_cm + cols[None, :], acc.to(C.dtype.element_ty), mask=mask)


def _tma_block_shapes(nargs):
    """Autotune pre-hook: the descriptors' boxes are the config's tiles (also for the pointer configs,
    which ignore them, so their compiled signature does not depend on the config tried last)."""
    if nargs["A0_DESC"] is None:
        return
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    for name in ("A0_DESC", "A1_DESC"):
        nargs[name].block_shape = [bm, bk]
    for name in ("B0_DESC", "B1_DESC"):
        nargs[name].block_shape = [bn, bk] if nargs["B_TRANS"] else [bk, bn]


def _gemm_configs():
    # BLOCK_M is fixed by the tile table (128 on GPU). TMA (Hopper, 16-bit) first, then pointer loads:
    # Hopper-friendly first, Ampere-friendly last.
    def cfg(n, k, num_warps, num_stages, tma=False, maxnreg=None):
        return triton.Config({"BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8, "USE_TMA": tma}, num_warps=num_warps,
                             num_stages=num_stages, maxnreg=maxnreg, pre_hook=_tma_block_shapes)

    return [
        cfg(128, 64, 8, 3, tma=True),
        cfg(128, 32, 8, 4, tma=True),
        cfg(128, 32, 8, 3, tma=True, maxnreg=128),
        cfg(128, 64, 8, 4),
        cfg(256, 64, 8, 3),
        cfg(128, 64, 4, 4),
        cfg(128, 32, 4, 4),
        cfg(128, 32, 8, 3),
    ]


def _prune_configs(configs, named_args, **kwargs):
    """The gated-residual and GELU-gradient epilogues hold a second (BLOCK_M, BLOCK_N) fp32 tile:
    with more than 64 accumulator values per thread, or under a 128-register cap (the config that
    fits two CTAs per SM), they spill (ptxas, sm_90), so keep those out. TMA configs only where the
    launcher built descriptors (``TMA_OK``)."""
    def arg(name):
        return kwargs.get(name, named_args.get(name))

    heavy = arg("EPILOGUE") in (EPI_BIAS_GATED, EPI_GELU_GRAD)
    configs = [c for c in configs if arg("TMA_OK") or not c.kwargs["USE_TMA"]]
    kept = [c for c in configs
            if not heavy or (_GPU_BLOCK_M * c.kwargs["BLOCK_N"] <= 64 * 32 * c.num_warps and not c.maxnreg)]
    return kept or configs


if HAS_TRITON:
    # Keyed on the expert sizes (shape bucket), never on T: a new video length does not re-tune.
    _grouped_gemm_tuned = triton.autotune(
        _gemm_configs(),
        key=["K_MAX", "N_MAX", "B_TRANS", "EPILOGUE", "IEEE", "HAS_GATE", "HAS_RES", "WRITE_AUX", "WRITE_H", "ALIGNED",
             "TMA_OK"],
        prune_configs_by={"early_config_prune": _prune_configs},
    )(_grouped_gemm_kernel)

_GPU_BLOCK_M = 128
_SMALL_PROBLEM = 1 << 22  # T * N_max below this: the shape bucket "small", fixed config
_SMALL_CONFIG = dict(BLOCK_N=64, BLOCK_K=32, GROUP_M=8, USE_TMA=False)
_SMALL_BLOCK_M = 64  # M tiles when every GEMM of a call is small (see _Plan)
_INTERP_BLOCKS = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, USE_TMA=False)  # tests set USE_TMA too


class _Plan:
    """Per-call scheduling data: the M-tile table and device copies of the segment table. ``max_cols``:
    the widest GEMM output of the call; when even that one is a small problem (a text-only step's
    few hundred rows) every GEMM takes the fixed config on ``_SMALL_BLOCK_M``-row tiles (twice the
    programs of 128-row tiles: the (T, dim) GEMM of 256 rows is 48 programs otherwise)."""

    def __init__(self, seg_offsets: torch.Tensor, seg_expert: torch.Tensor, offsets: list[int], max_cols: int):
        self.interp = interpreting()
        if self.interp:
            self.block_m = _INTERP_BLOCKS["BLOCK_M"]
        else:
            self.block_m = _SMALL_BLOCK_M if offsets[-1] * max_cols < _SMALL_PROBLEM else _GPU_BLOCK_M
        self.tile_seg, self.tile_row = tile_table(offsets, self.block_m, seg_offsets.device)
        self.num_tiles = self.tile_seg.numel()
        self.seg_off = seg_offsets
        self.seg_expert = seg_expert


def _grouped_gemm(plan: _Plan, a: torch.Tensor, mats, biases, transpose: bool, out_cols: int, *, epilogue: int,
                  out_dtype=None, aux: torch.Tensor | None = None, write_aux: bool = False,
                  residual: torch.Tensor | None = None, gate: torch.Tensor | None = None,
                  h_out: torch.Tensor | None = None) -> torch.Tensor:
    """Launch the grouped GEMM with B_e = mats[e]ᵀ (transpose) or mats[e]; at most two experts.

    a (T, K_max) row-major; returns C (T, out_cols). ``aux`` (T, *) is the pre-activation / y buffer
    (written when ``write_aux``; read by the GELU-gradient epilogue), ``h_out`` receives gelu(pre)
    in the GELU-gradient epilogue."""
    mats = list(mats) + [mats[-1]] * (2 - len(mats))
    biases = list(biases) + [biases[-1]] * (2 - len(biases))
    dims = []
    for m in mats:
        r, c = m.shape  # row-major nn.Linear layout (out, in)
        dims += [c, r] if transpose else [r, c]  # (K_e, N_e)
    T = a.shape[0]
    c = torch.empty((T, out_cols), device=a.device, dtype=out_dtype or a.dtype)
    if plan.num_tiles == 0:
        return c
    dummy = c
    b0, b1 = (b if b is not None else dummy for b in biases)
    k_max, n_max = max(dims[0::2]), max(dims[1::2])
    small = not plan.interp and (a.dtype == torch.float32 or T * n_max < _SMALL_PROBLEM)
    use_tma = _INTERP_BLOCKS["USE_TMA"] if plan.interp else (False if small else None)  # None: autotuned
    descs = [None] * 4
    if use_tma is not False and tma_compatible(a, *mats):
        # A limited to expert e's K_e columns (the other expert's wider K may hold unwritten memory);
        # boxes: the interpreter's tiles, else set per config by the autotuner's pre-hook
        bm, bn, bk = (_INTERP_BLOCKS[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
        descs = [TensorDescriptor(a, [T, dims[2 * e]], [a.stride(0), 1], [bm, bk]) for e in (0, 1)]
        descs += [TensorDescriptor.from_tensor(m, [bn, bk] if transpose else [bk, bn]) for m in mats]
    elif use_tma:
        raise ValueError(f"USE_TMA needs 16-bit a / weights with 16-byte aligned rows, got a {a.dtype} "
                         f"strides {a.stride()}, weight strides {[m.stride() for m in mats]}")
    args = (a, mats[0], mats[1], c, b0, b1, aux if aux is not None else dummy,
            residual if residual is not None else dummy, gate if gate is not None else dummy,
            h_out if h_out is not None else dummy, *descs,
            plan.tile_seg, plan.tile_row, plan.seg_off, plan.seg_expert, plan.num_tiles, *dims,
            a.stride(0), c.stride(0), aux.stride(0) if aux is not None else 0, gate.stride(0) if gate is not None else 0)
    meta = dict(B_TRANS=transpose, EPILOGUE=epilogue, HAS_GATE=gate is not None, HAS_RES=residual is not None,
                WRITE_AUX=write_aux, WRITE_H=h_out is not None, K_MAX=k_max, N_MAX=n_max,
                ALIGNED=all(d % 16 == 0 for d in dims), IEEE=a.dtype == torch.float32, TMA_OK=descs[0] is not None)
    if plan.interp:
        grid = (plan.num_tiles * cdiv(n_max, _INTERP_BLOCKS["BLOCK_N"]),)
        _grouped_gemm_kernel[grid](*args, **meta, **_INTERP_BLOCKS)
    elif small:
        # fp32 (CUDA-core dot) and small problems: one fixed config, no tuning (and no compiles) for them
        grid = (plan.num_tiles * cdiv(n_max, _SMALL_CONFIG["BLOCK_N"]),)
        _grouped_gemm_kernel[grid](*args, **meta, BLOCK_M=plan.block_m, **_SMALL_CONFIG, num_warps=4, num_stages=3)
    else:
        grid = lambda META: (plan.num_tiles * cdiv(n_max, META["BLOCK_N"]),)  # noqa: E731
        _grouped_gemm_tuned[grid](*args, **meta, BLOCK_M=plan.block_m)
    return c


# ----------------------------------------------------------------------------------------------
# Forward / backward, torch.library ops, autograd
# ----------------------------------------------------------------------------------------------
def _split(flat: list[torch.Tensor]) -> list[tuple]:
    return [tuple(flat[i:i + 4]) for i in range(0, len(flat), 4)]


def _ffn_forward(x, seg_offsets, seg_expert, flat, residual, gate, save: bool, recompute: bool):
    """Two grouped GEMMs. Returns (out, pre, y): ``pre`` (T, F_max) the saved pre-activation
    (empty unless ``save`` and not ``recompute``), ``y`` (T, dim) the un-gated FFN output kept for
    the gate's gradient (empty unless ``save`` and a gate is given)."""
    experts = _split(flat)
    offsets = host_list(seg_offsets)
    T, dim = x.shape
    f_max = max(w1.shape[0] for w1, _, _, _ in experts)
    plan = _Plan(seg_offsets, seg_expert, offsets, max(f_max, dim))
    keep_pre = save and not recompute
    # zeros where the experts' inner sizes differ: a smaller expert's rows leave columns unwritten, and an
    # op's output must not depend on leftover memory (opcheck / AOT compare it)
    ragged = len({w1.shape[0] for w1, _, _, _ in experts}) > 1
    pre = x.new_empty(0) if not keep_pre else (x.new_zeros if ragged else x.new_empty)((T, f_max))
    h = _grouped_gemm(plan, x, [e[0] for e in experts], [e[1] for e in experts], True, f_max,
                      epilogue=EPI_BIAS_GELU, aux=pre if keep_pre else None, write_aux=keep_pre)
    y_save = torch.empty((T, dim), device=x.device, dtype=x.dtype) if (save and gate is not None) else x.new_empty(0)
    out = _grouped_gemm(plan, h, [e[2] for e in experts], [e[3] for e in experts], True, dim,
                        epilogue=EPI_BIAS_GATED, out_dtype=residual.dtype if residual is not None else x.dtype,
                        aux=y_save if y_save.numel() else None, write_aux=bool(y_save.numel()),
                        residual=residual, gate=gate)
    return out, pre, y_save


def _ffn_backward(dout, x, seg_offsets, seg_expert, flat, gate, pre, y_save):
    """dX, per-expert (dW1, db1, dW2, db2) and dgate. With an empty ``pre`` the pre-activation and
    h are recomputed by the first GEMM; otherwise h = gelu(pre) comes out of the dP epilogue."""
    experts = _split(flat)
    offsets = host_list(seg_offsets)
    T, dim = x.shape
    f_max = max(e[0].shape[0] for e in experts)
    plan = _Plan(seg_offsets, seg_expert, offsets, max(f_max, dim))
    dout = dout.contiguous()
    if gate is not None:  # out = residual + gate[s] * y  =>  dy = gate[s] * dout,  dgate[s] = sum_{t in s} dout_t * y_t
        seg_ids = token_segments(seg_offsets, T)
        dy = (dout.float() * gate.float().index_select(0, seg_ids.long())).to(x.dtype)
        dgate = segment_sum(dout.float() * y_save.float(), seg_ids, gate.shape[0]).to(gate.dtype)
    else:
        dy, dgate = dout.to(x.dtype), None
    if pre.numel() == 0:  # recompute: pre = x W1ᵀ + b1 and h = gelu(pre) in one grouped GEMM
        pre = torch.empty((T, f_max), device=x.device, dtype=x.dtype)
        h = _grouped_gemm(plan, x, [e[0] for e in experts], [e[1] for e in experts], True, f_max,
                          epilogue=EPI_BIAS_GELU, aux=pre, write_aux=True)
        h_out = None
    else:
        h = h_out = torch.empty((T, f_max), device=x.device, dtype=x.dtype)
    # dP = (dY W2_e) * gelu'(pre)   (and h = gelu(pre) on the side when pre was saved)
    dp = _grouped_gemm(plan, dy, [e[2] for e in experts], [None] * len(experts), False, f_max,
                       epilogue=EPI_GELU_GRAD, aux=pre, h_out=h_out)
    dx = _grouped_gemm(plan, dp, [e[0] for e in experts], [None] * len(experts), False, dim, epilogue=EPI_NONE)
    # Weight gradients: per segment one cuBLAS GEMM on the contiguous row slice (tensor cores in the
    # input dtype, fp32 accumulation inside), partial sums over an expert's segments added in fp32.
    grads = [[None] * 4 for _ in experts]
    expert_of = host_list(seg_expert)

    def acc(ge, k, val):
        val = val.float()
        ge[k] = val if ge[k] is None else ge[k].add_(val)

    for s in range(len(offsets) - 1):
        a, b = offsets[s], offsets[s + 1]
        if a == b:
            continue
        e = expert_of[s]
        f = experts[e][0].shape[0]
        ge = grads[e]
        dys, dps = dy[a:b], dp[a:b, :f]
        acc(ge, 0, dps.t() @ x[a:b])
        acc(ge, 1, dps.sum(0, dtype=torch.float32))
        acc(ge, 2, dys.t() @ h[a:b, :f])
        acc(ge, 3, dys.sum(0, dtype=torch.float32))
    flat_grads = [(torch.zeros_like(t) if g is None else g.to(t.dtype)) for ge, e in zip(grads, experts) for g, t in zip(ge, e)]
    return dx, flat_grads, dgate


@custom_op("univigu_fast::modality_ffn_fwd")
def _modality_ffn_fwd_op(x: torch.Tensor, seg_offsets: torch.Tensor, seg_expert: torch.Tensor, weights: list[torch.Tensor],
                         residual: torch.Tensor | None, gate: torch.Tensor | None, save: bool, recompute: bool
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _ffn_forward(x, seg_offsets, seg_expert, weights, residual, gate, save, recompute)


@_modality_ffn_fwd_op.register_fake
def _(x, seg_offsets, seg_expert, weights, residual, gate, save, recompute):
    f_max = max(w.shape[0] for w in weights[0::4])
    out = torch.empty_like(residual) if residual is not None else torch.empty_like(x)
    pre = x.new_empty((x.shape[0], f_max)) if (save and not recompute) else x.new_empty(0)
    y = torch.empty_like(x) if (save and gate is not None) else x.new_empty(0)
    return out, pre, y


@custom_op("univigu_fast::modality_ffn_bwd")
def _modality_ffn_bwd_op(dout: torch.Tensor, x: torch.Tensor, seg_offsets: torch.Tensor, seg_expert: torch.Tensor,
                         weights: list[torch.Tensor], gate: torch.Tensor | None, pre: torch.Tensor, y: torch.Tensor
                         ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    dx, dws, dgate = _ffn_backward(dout, x, seg_offsets, seg_expert, weights, gate, pre, y)
    return dx, dws, (dgate if dgate is not None else dout.new_empty(0))


@_modality_ffn_bwd_op.register_fake
def _(dout, x, seg_offsets, seg_expert, weights, gate, pre, y):
    return (torch.empty_like(x), [torch.empty_like(w) for w in weights],
            torch.empty_like(gate) if gate is not None else dout.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, seg_offsets, seg_expert, weights, residual, gate, save, recompute = inputs
    _, pre, y = output
    ctx.save_for_backward(x, seg_offsets, seg_expert, pre, y, *weights, *( [gate] if gate is not None else []))
    ctx.n_weights = len(weights)
    ctx.has_gate = gate is not None
    ctx.has_residual = residual is not None
    ctx.saved = save
    ctx.unused = _experts_without_rows(seg_offsets, seg_expert, len(weights) // 4)


def _experts_without_rows(seg_offsets, seg_expert, n_experts: int) -> set:
    """Experts no segment with rows routes to: their weights get no gradient (None, as when the reference
    never calls them; zeros would still move them under weight decay and momentum). Eager only: traced
    (torch.compile, fake tensors) the values are unknown and every expert gets a gradient."""
    if tracing():
        return set()
    offsets, expert = host_list(seg_offsets), host_list(seg_expert)
    used = {e for e, a, b in zip(expert, offsets, offsets[1:]) if b > a}
    return set(range(n_experts)) - used


def _backward(ctx, dout, _dpre, _dy):
    x, seg_offsets, seg_expert, pre, y, *rest = ctx.saved_tensors
    weights = rest[: ctx.n_weights]
    gate = rest[ctx.n_weights] if ctx.has_gate else None
    if not ctx.saved:
        raise RuntimeError("modality_ffn: backward called on a forward run without grad")
    dx, dws, dgate = _modality_ffn_bwd_op(dout, x, seg_offsets, seg_expert, list(weights), gate, pre, y)
    dres = dout if ctx.has_residual else None  # d(residual + ...) / d residual = identity
    dws = [None if i // 4 in ctx.unused else g for i, g in enumerate(dws)]
    return dx, None, None, dws, dres, (dgate if ctx.has_gate else None), None, None


torch.library.register_autograd("univigu_fast::modality_ffn_fwd", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Entry point and module
# ----------------------------------------------------------------------------------------------
def check_inputs(x, seg_offsets, seg_expert, experts, residual=None, gate=None, *, any_float: bool = False) -> None:
    """The checks of :func:`modality_ffn` (same arguments); ``any_float``: any floating dtype (what the
    reference takes; ``ops`` checks with it before falling back)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a (T, dim) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    T, dim = x.shape
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32) and not (any_float and x.is_floating_point()):
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if not isinstance(seg_expert, torch.Tensor) or seg_expert.dtype != torch.int32:
        raise TypeError(f"seg_expert must be an int32 tensor, got {getattr(seg_expert, 'dtype', type(seg_expert).__name__)}")
    if seg_expert.device != x.device:
        raise ValueError(f"seg_expert must be on x's device {x.device}, got {seg_expert.device}")
    check_contiguous(seg_expert, "seg_expert")
    offsets = check_segments(seg_offsets, T, x.device)  # None under torch.compile (values need a sync)
    S = seg_offsets.numel() - 1
    if seg_expert.shape != (S,):
        raise ValueError(f"seg_expert must have shape ({S},) (one expert per segment), got {tuple(seg_expert.shape)}")
    if not experts:
        raise ValueError("experts must hold at least one (w1, b1, w2, b2) tuple")
    if offsets is not None and S and not all(0 <= e < len(experts) for e in host_list(seg_expert)):
        raise ValueError(f"seg_expert ids must lie in [0, {len(experts)}), got {host_list(seg_expert)}")
    for i, e in enumerate(experts):
        if len(e) != 4:
            raise ValueError(f"experts[{i}] must be (w1, b1, w2, b2), got {len(e)} items")
        for nm, t in zip(("w1", "b1", "w2", "b2"), e):
            if not isinstance(t, torch.Tensor):
                hint = " (an nn.Linear(bias=False) has none: pass zeros)" if nm[0] == "b" and t is None else ""
                raise TypeError(f"experts[{i}] {nm} must be a tensor, got {type(t).__name__}{hint}")
        w1, b1, w2, b2 = e
        check_devices(x, **{f"experts[{i}] {nm}": t for nm, t in zip(("w1", "b1", "w2", "b2"), e)})
        f = w1.shape[0] if w1.dim() == 2 else -1
        if w1.shape != (f, dim) or b1.shape != (f,) or w2.shape != (dim, f) or b2.shape != (dim,):
            raise ValueError(f"experts[{i}] shapes {tuple(w1.shape)}, {tuple(b1.shape)}, {tuple(w2.shape)}, {tuple(b2.shape)} "
                             f"do not match (F, dim={dim}), (F,), (dim, F), (dim,)")
        if any(t.dtype != x.dtype for t in e):
            raise TypeError(f"experts[{i}] dtypes {[t.dtype for t in e]} must match x.dtype {x.dtype}")
    check_devices(x, residual=residual, gate=gate)
    for name, t in (("residual", residual), ("gate", gate)):  # an int residual truncated the output to ints
        if t is not None and t.dtype not in (torch.float16, torch.bfloat16, torch.float32) \
                and not (any_float and t.is_floating_point()):
            raise TypeError(f"{name} must be float16, bfloat16 or float32{' (or another float)' if any_float else ''}, "
                            f"got {t.dtype}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual must be (T, dim) = {tuple(x.shape)}, got {tuple(residual.shape)}")
    if gate is not None and gate.shape != (S, dim):
        raise ValueError(f"gate must be (S, dim) = ({S}, {dim}), got {tuple(gate.shape)}")


def modality_ffn(
    x: torch.Tensor,
    seg_offsets: torch.Tensor,
    seg_expert: torch.Tensor,
    experts: Sequence[Expert],
    *,
    residual: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """``residual + gate[segment] * FFN_e(x)`` over a packed sequence, one grouped GEMM launch per matmul.

    x (T, dim); seg_offsets int32 (S+1,) (0 first, T last, non-decreasing; empty segments allowed);
    seg_expert int32 (S,); experts: ``(w1 (F_e, dim), b1 (F_e,), w2 (dim, F_e), b2 (dim,))`` per expert
    (``nn.Linear`` layout, inner sizes may differ); gate (S, dim); residual (T, dim). Either or both
    of residual / gate may be None. Differentiable in x, every weight, the gate and the residual.
    Triton on CUDA (or under the interpreter) for fp16 / bf16 / fp32; the reference elsewhere.
    """
    check_inputs(x, seg_offsets, seg_expert, experts, residual, gate)
    tensors = [x, residual, gate, *[t for e in experts for t in e]]
    if len(experts) > 2:
        log_once("modality_ffn: the grouped kernel takes at most two experts; using the reference")
        return modality_ffn_reference(x, seg_offsets, seg_expert, experts, residual=residual, gate=gate)
    if not use_triton(*tensors):
        log_once("modality_ffn: Triton unavailable for these tensors; using the split + dense reference")
        return modality_ffn_reference(x, seg_offsets, seg_expert, experts, residual=residual, gate=gate)
    x = x.contiguous()
    residual = residual.contiguous() if residual is not None else None
    gate = gate.contiguous() if gate is not None else None
    flat = [t.contiguous() for e in experts for t in e]
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in [x, residual, gate, *flat])
    out, _, _ = _modality_ffn_fwd_op(x, seg_offsets, seg_expert, flat, residual, gate, save, RECOMPUTE_PREACTIVATION)
    return out


class ModalityFFN(torch.nn.Module):
    """The two experts under the model's names (``ffn`` video, ``ffn_t`` text) with a routed forward."""

    def __init__(self, dim: int, ffn_dim: int, text_ffn_dim: int | None = None):
        super().__init__()
        self.ffn = FeedForward(dim, ffn_dim)
        self.ffn_t = FeedForward(dim, text_ffn_dim or ffn_dim)

    def forward(self, x, seg_offsets, seg_expert, *, residual=None, gate=None):
        return modality_ffn(x, seg_offsets, seg_expert, (self.ffn.expert(), self.ffn_t.expert()), residual=residual, gate=gate)
