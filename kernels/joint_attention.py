"""Variable-length joint attention over packed sequences with RoPE (DESIGN §5.3).

RoPE tables (the format every caller uses): ``rope = (cos, sin, interleaved)`` with
``cos, sin`` float32 ``(T, hd // 2)`` — the angle of rotation pair ``i`` for each token — and
``interleaved`` bool ``(T,)``: True pairs dims ``(2i, 2i+1)`` (Wan's complex 3-axis video RoPE),
False pairs dims ``(i, i + hd/2)`` (1-D rotate-half text RoPE). Each pair ``(a, b)`` becomes
``(a cos - b sin, a sin + b cos)``.

The issue's alternative, position ids, is :func:`apply_rope_positions` (the RoPE kernel computing
cos / sin in-kernel from ``(T, 3)`` positions and two per-pair frequency / axis rows):
``bench/bench_joint_attention.py`` times the two forms against each other (op ``rope``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._utils import (HAS_TRITON, cdiv, check_contiguous, check_devices, custom_op, describe, host_list, interpreting,
                     log_once, next_power_of_2, num_sms, on_input_device, pick_fastest, tile_table, use_triton)

if HAS_TRITON:
    import triton
    import triton.language as tl

Rope = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def apply_rope_reference(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate ``x (T, H, hd)`` by per-token RoPE tables; computed in fp32, returned in x.dtype."""
    cos, sin, interleaved = rope
    T, H, hd = x.shape
    xf = x.float()
    # interleaved pairs (2i, 2i+1)
    a_il, b_il = xf[..., 0::2], xf[..., 1::2]
    # rotate-half pairs (i, i + hd/2)
    a_rh, b_rh = xf[..., : hd // 2], xf[..., hd // 2:]
    il = interleaved.view(T, 1, 1) != 0  # bool, or the uint8 / int8 flags the kernels also take
    a = torch.where(il, a_il, a_rh)
    b = torch.where(il, b_il, b_rh)
    c, s = cos.float().unsqueeze(1), sin.float().unsqueeze(1)
    ra, rb = a * c - b * s, a * s + b * c
    out_il = torch.stack((ra, rb), dim=-1).flatten(-2)
    out_rh = torch.cat((ra, rb), dim=-1)
    return torch.where(il, out_il, out_rh).to(x.dtype)


def joint_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    softmax_scale: float | None = None,
    rope_q: Rope | None = None,
    rope_k: Rope | None = None,
) -> torch.Tensor:
    """Per-sample SDPA (non-causal) over packed ``q (Tq, H, hd)``, ``k, v (Tk, H, hd)``.

    Computes in the input dtype (pass fp32 tensors for an fp32 reference). Returns ``(Tq, H, hd)``.
    """
    if rope_q is not None:
        q = apply_rope_reference(q, rope_q)
    if rope_k is not None:
        k = apply_rope_reference(k, rope_k)
    out = torch.empty_like(q)
    cq, ck = host_list(cu_seqlens_q), host_list(cu_seqlens_k)
    for i in range(len(cq) - 1):
        qs, qe, ks, ke = cq[i], cq[i + 1], ck[i], ck[i + 1]
        if qe == qs:
            continue
        if ke == ks:  # nothing to attend to: defined as zeros (flash-attn convention), written as the empty
            # product (q k^T) v so the output stays a function of q, k and v (zero gradients), as the kernel's
            out[qs:qe] = torch.einsum("lhd,khd->hlk", q[qs:qe], k[ks:ke]).matmul(v[ks:ke].transpose(0, 1)).transpose(0, 1)
            continue
        # 4-D (1, H, L, hd) inputs so PyTorch can pick its flash / cuDNN backends (3-D falls back to math)
        o = F.scaled_dot_product_attention(
            q[qs:qe].transpose(0, 1)[None], k[ks:ke].transpose(0, 1)[None], v[ks:ke].transpose(0, 1)[None],
            scale=softmax_scale,
        )
        out[qs:qe] = o[0].transpose(0, 1)
    return out


# ----------------------------------------------------------------------------------------------
# Triton implementation
# ----------------------------------------------------------------------------------------------
# Layout: q (Tq, H, D), k/v (Tk, H, D), all with unit stride on D. Sequences are addressed through
# a flat tile table: program i of the forward grid owns query rows [tile_start[i], +BLOCK_M) of
# sequence tile_seq[i], so a 1-token text sample costs one tile and a 30K-token video many, with
# no padding and no search over cu_seqlens inside the kernel.
#
# RoPE: k is rotated once by `_rope_kernel` before the main loop, because rotating it in the inner
# loop would redo the work for every q tile (T / BLOCK_M times). q can be rotated either in the
# forward kernel's prologue (ROPE_Q: one partner load per q tile, no extra pass) or by the same
# standalone kernel (one extra read+write of q, ~0.1 ms at wan1.3b-480p). `ROPE_Q_IN_PROLOGUE`
# selects; default False because on sm_90 (ptxas -v of the AOT-compiled kernel, triton 3.8) the
# rotated q tile stays live in registers through the main loop and the BLOCK_N=128 / 8-warp config
# spills (255 regs + 44-68 B spill with RoPE vs 231 regs, no spill without); the bench records both
# (impls `triton` and `triton_qprologue`). The backward works on the rotated q and k and un-rotates
# dq, dk with the transposed rotation (the same kernel, angle negated).
ROPE_Q_IN_PROLOGUE = False

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
_LOG2E = 1.4426950408889634

if HAS_TRITON:

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr):
        if IEEE:  # fp32 inputs: exact fp32 products instead of tf32
            return tl.dot(a, b, input_precision="ieee")
        return tl.dot(a, b)

    @triton.jit
    def _rope_cos_sin(cos_ptr, sin_ptr, rows, row_ok, stride_rope, HALF: tl.constexpr, INVERSE: tl.constexpr):
        """The (R, D/2) fp32 cos / sin tables of ``rows`` (contiguous loads); INVERSE negates the angle."""
        offs = rows[:, None].to(tl.int64) * stride_rope + tl.arange(0, HALF)[None, :]
        c = tl.load(cos_ptr + offs, mask=row_ok[:, None], other=1.0)
        s = tl.load(sin_ptr + offs, mask=row_ok[:, None], other=0.0)
        if INVERSE:
            s = -s
        return c, s

    @triton.jit
    def _rope_pos_cos_sin(pos_ptr, freq_ptr, axis_ptr, rows, row_ok, il, HALF: tl.constexpr, INVERSE: tl.constexpr):
        """The (R, D/2) cos / sin of ``rows`` computed from position ids: pair i of a row turns by
        ``pos[t, axis_m[i]] * freq_m[i]``, table row m = 0 for interleaved (video) rows, 1 for the
        others (text); ``pos`` int32 (T, 3), ``freq`` fp32 / ``axis`` int32 (2, D/2). fp32 angles."""
        i = tl.arange(0, HALF)
        il2 = il[:, None]
        freq = tl.where(il2, tl.load(freq_ptr + i)[None, :], tl.load(freq_ptr + HALF + i)[None, :])
        axis = tl.where(il2, tl.load(axis_ptr + i)[None, :], tl.load(axis_ptr + HALF + i)[None, :])
        p = pos_ptr + rows.to(tl.int64) * 3
        p0 = tl.load(p, mask=row_ok, other=0).to(tl.float32)[:, None]
        p1 = tl.load(p + 1, mask=row_ok, other=0).to(tl.float32)[:, None]
        p2 = tl.load(p + 2, mask=row_ok, other=0).to(tl.float32)[:, None]
        angle = tl.where(axis == 0, p0, tl.where(axis == 1, p1, p2)) * freq
        s = tl.sin(angle)
        if INVERSE:
            s = -s
        return tl.cos(angle), s

    @triton.jit
    def _rotate_rows(x, il, c, s, HEAD_DIM: tl.constexpr):
        """Rotate a loaded (R, D) tile ``x`` by its rows' (R, D/2) tables ``c, s``; returns fp32.

        Pair i is (2i, 2i+1) where ``il`` (interleaved) and (i, i + D/2) elsewhere (module docstring);
        both pairings are formed in registers with reshape / split / join, no gathered loads, and
        selected per row. Pair (a, b) -> (a cos - b sin, a sin + b cos)."""
        R: tl.constexpr = x.shape[0]
        HALF: tl.constexpr = HEAD_DIM // 2
        xf = x.to(tl.float32)
        a_il, b_il = tl.split(tl.reshape(xf, (R, HALF, 2)))
        a_rh, b_rh = tl.split(tl.permute(tl.reshape(xf, (R, 2, HALF)), (0, 2, 1)))
        il2 = il[:, None]
        a = tl.where(il2, a_il, a_rh)
        b = tl.where(il2, b_il, b_rh)
        pairs = tl.join(a * c - b * s, a * s + b * c)  # (R, D/2, 2)
        out_il = tl.reshape(pairs, (R, HEAD_DIM))
        out_rh = tl.reshape(tl.permute(pairs, (0, 2, 1)), (R, HEAD_DIM))
        return tl.where(il2, out_il, out_rh)

    @triton.jit
    def _rotate_tile(x, partner, il, cos_ptr, sin_ptr, rows, cols, mask, stride_rope,
                     HEAD_DIM: tl.constexpr, INVERSE: tl.constexpr):
        """:func:`_rotate_rows` with each element's rotation ``partner`` loaded (``_partner_cols``) and
        the tables gathered per element instead of paired in registers: for the forward kernel's
        prologue, where the register form's permutes cost registers its main loop needs (sm_90 ptxas,
        Triton 3.8: 612-1012 B of spills vs 0-44 B with this form). Returns fp32."""
        HALF: tl.constexpr = HEAD_DIM // 2
        il2 = il[:, None]
        pair = tl.where(il2, (cols // 2)[None, :], (cols % HALF)[None, :])
        first = tl.where(il2, (cols % 2 == 0)[None, :], (cols < HALF)[None, :])
        c = tl.load(cos_ptr + rows[:, None].to(tl.int64) * stride_rope + pair, mask=mask, other=1.0)
        s = tl.load(sin_ptr + rows[:, None].to(tl.int64) * stride_rope + pair, mask=mask, other=0.0)
        if INVERSE:
            s = -s
        p = partner.to(tl.float32)
        return x.to(tl.float32) * c + tl.where(first, -p, p) * s

    @triton.jit
    def _partner_cols(il, cols, HEAD_DIM: tl.constexpr):
        """Column of each element's rotation partner: (2i <-> 2i+1) if interleaved else (i <-> i + D/2)."""
        HALF: tl.constexpr = HEAD_DIM // 2
        return tl.where(il[:, None], (cols ^ 1)[None, :], ((cols + HALF) % HEAD_DIM)[None, :])

    @triton.jit(do_not_specialize=["T"])  # new lengths reuse the compiled kernel
    def _bwd_delta_kernel(O, DO, DELTA, T, stride_ot, stride_oh, stride_dot, stride_doh, stride_delta_h,
                          HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr):
        """DELTA[h, t] = sum_d dO[t, h, d] * O[t, h, d] in fp32 (FlashAttention-2 backward preprocessing)."""
        pid_t = tl.program_id(0)
        h = tl.program_id(1)
        rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.arange(0, HEAD_DIM)
        ok = rows < T
        r64 = rows[:, None].to(tl.int64)
        o = tl.load(O + r64 * stride_ot + h * stride_oh + cols[None, :], mask=ok[:, None], other=0.0)
        do = tl.load(DO + r64 * stride_dot + h * stride_doh + cols[None, :], mask=ok[:, None], other=0.0)
        tl.store(DELTA + h * stride_delta_h + rows, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=ok)

    @triton.jit(do_not_specialize=["T", "H"])  # new lengths reuse the compiled kernel
    def _rope_kernel(X, OUT, COS, SIN, IL, POS, FREQ, AXIS, T, H, stride_xt, stride_xh, stride_ot, stride_oh,
                     stride_rope, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, INVERSE: tl.constexpr,
                     FROM_POSITIONS: tl.constexpr):
        """OUT[t, h] = R(t) X[t, h] (or R(t)^T with INVERSE) for a block of tokens and every head: the
        fp32 tables are read once per token and reused for all heads (per (token, head) they would
        cost twice the traffic of x itself). FROM_POSITIONS: cos / sin computed from POS / FREQ / AXIS
        (:func:`_rope_pos_cos_sin`) instead of read from COS / SIN."""
        t0 = tl.program_id(0) * BLOCK_T
        local = tl.arange(0, BLOCK_T)
        cols = tl.arange(0, HEAD_DIM)
        row_ok = t0 + local < T
        mask = row_ok[:, None]
        safe_rows = tl.where(row_ok, t0 + local, 0)
        il = tl.load(IL + safe_rows, mask=row_ok, other=0) != 0
        if FROM_POSITIONS:
            c, s = _rope_pos_cos_sin(POS, FREQ, AXIS, safe_rows, row_ok, il, HEAD_DIM // 2, INVERSE)
        else:
            c, s = _rope_cos_sin(COS, SIN, safe_rows, row_ok, stride_rope, HEAD_DIM // 2, INVERSE)
        # 64-bit block bases, 32-bit offsets inside the block (fewer registers)
        x_blk = X + t0.to(tl.int64) * stride_xt
        o_blk = OUT + t0.to(tl.int64) * stride_ot
        x_offs = local[:, None] * stride_xt + cols[None, :]
        out_offs = local[:, None] * stride_ot + cols[None, :]
        for h in range(0, H):
            x = tl.load(x_blk + h * stride_xh + x_offs, mask=mask, other=0.0)
            out = _rotate_rows(x, il, c, s, HEAD_DIM)
            tl.store(o_blk + h * stride_oh + out_offs, out.to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def _dot_acc(a, b, acc, IEEE: tl.constexpr):
        """acc + a @ b (accumulated inside the MMA)."""
        if IEEE:
            return tl.dot(a, b, acc, input_precision="ieee")
        return tl.dot(a, b, acc)

    @triton.jit
    def _tile_bounds(TILE_SEQ, TILE_START, CU_ROWS, CU_OTHER):
        """The tile of this program (``program_id(0)`` indexes a ``tile_table``): its first row, the end
        of its sequence in its own operand (``CU_ROWS``), and that sequence's [start, end) in the other
        operand (``CU_OTHER``: keys for a query tile, queries for a key tile)."""
        pid = tl.program_id(0)
        seq = tl.load(TILE_SEQ + pid)
        return tl.load(TILE_START + pid), tl.load(CU_ROWS + seq + 1), tl.load(CU_OTHER + seq), tl.load(CU_OTHER + seq + 1)

    @triton.jit
    def _tile_rows(first, end, BLOCK: tl.constexpr):
        """Rows [first, first + BLOCK) of a tile: (in-sequence mask, the rows with those at or past
        ``end`` replaced by ``first``, so every address stays inside the tensor)."""
        rows = first + tl.arange(0, BLOCK)
        ok = rows < end
        return ok, tl.where(ok, rows, first)

    @triton.jit
    def _row_ptrs(X, rows, stride_t, head_off, cols):
        """Pointers to the (R, D) tile ``X[rows, h, cols]`` of a (T, H, D) tensor, ``head_off = h * stride_h``."""
        return X + rows[:, None].to(tl.int64) * stride_t + head_off + cols[None, :]

    @triton.jit
    def _load_kv_block(k_base, v_base, n0, k_end, stride_kt, stride_vt, cols, MASK: tl.constexpr, BLOCK_N: tl.constexpr):
        """K, V rows [n0, n0 + BLOCK_N) of one head and their in-sequence mask. Only a sequence's last,
        partial block needs MASK (bounds-checked loads); full blocks load unmasked."""
        kr = n0 + tl.arange(0, BLOCK_N)
        k_ok = kr < k_end
        k_ptrs = k_base + kr[:, None].to(tl.int64) * stride_kt + cols[None, :]
        v_ptrs = v_base + kr[:, None].to(tl.int64) * stride_vt + cols[None, :]
        if MASK:
            k = tl.load(k_ptrs, mask=k_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=k_ok[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        return k, v, k_ok

    @triton.jit
    def _fwd_step(acc, l_i, m_i, q, k_base, v_base, n0, k_end, stride_kt, stride_vt, cols,
                  IEEE: tl.constexpr, MASK: tl.constexpr, BLOCK_N: tl.constexpr, qk_scale):
        """One key block [n0, n0 + BLOCK_N) of the online softmax (FlashAttention-2). MASK only for a
        sequence's last, partial block: full blocks skip the bounds checks and the score select."""
        k, v, k_ok = _load_kv_block(k_base, v_base, n0, k_end, stride_kt, stride_vt, cols, MASK, BLOCK_N)
        s = _dot(q, tl.trans(k), IEEE)  # raw scores; the scale (>0) is folded into max / exp2 below
        if MASK:
            s = tl.where(k_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = _dot_acc(p.to(v.dtype), v, acc * alpha[:, None], IEEE)
        return acc, l_i, m_new

    @triton.jit
    def _attn_fwd_kernel(
        Q, K, V, O, LSE, CU_Q, CU_K, TILE_SEQ, TILE_START,
        COS, SIN, IL, O_PART, LSE_PART,
        qk_scale,  # softmax_scale * log2(e), > 0
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
        stride_lse_h, stride_rope, stride_ps, stride_lps,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROPE_Q: tl.constexpr, IEEE: tl.constexpr,
        SPLIT: tl.constexpr,
    ):
        """O, LSE for one (query tile, head): q rotated in the prologue, then all keys of its sequence.

        SPLIT (split-KV, for few query tiles over long keys: a text-only step's 256 queries over 33K
        cached keys are 24 programs for 132 SMs otherwise): program ``(tile, head, s)`` takes the s-th
        of ``num_programs(2)`` BLOCK_N-aligned chunks of the keys and writes its normalised partial
        output (fp32, ``O_PART[s]`` laid out as O) and log2-sum-exp (``LSE_PART[s]``, -inf without
        keys); ``_attn_split_combine_kernel`` merges them."""
        h = tl.program_id(1)
        m0, q_end, k_start, k_end = _tile_bounds(TILE_SEQ, TILE_START, CU_Q, CU_K)
        if SPLIT:
            chunk = tl.cdiv(tl.cdiv(k_end - k_start, tl.num_programs(2)), BLOCK_N) * BLOCK_N
            k_start = k_start + tl.program_id(2) * chunk
            k_end = tl.maximum(tl.minimum(k_start + chunk, k_end), k_start)  # empty past the keys

        cols = tl.arange(0, HEAD_DIM)
        row_ok, safe_rows = _tile_rows(m0, q_end, BLOCK_M)
        q_base = Q + safe_rows[:, None].to(tl.int64) * stride_qt + h * stride_qh
        q = tl.load(q_base + cols[None, :], mask=row_ok[:, None], other=0.0)
        if ROPE_Q:
            il = tl.load(IL + safe_rows) != 0
            partner = tl.load(q_base + _partner_cols(il, cols, HEAD_DIM), mask=row_ok[:, None], other=0.0)
            q = _rotate_tile(q, partner, il, COS, SIN, safe_rows, cols, row_ok[:, None], stride_rope,
                             HEAD_DIM, False).to(K.dtype.element_ty)

        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
        k_base = K + h * stride_kh
        v_base = V + h * stride_vh
        k_full_end = k_start + ((k_end - k_start) // BLOCK_N) * BLOCK_N
        for n0 in range(k_start, k_full_end, BLOCK_N):
            acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, k_base, v_base, n0, k_end, stride_kt, stride_vt, cols,
                                      IEEE, False, BLOCK_N, qk_scale)
        if k_full_end < k_end:
            acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, k_base, v_base, k_full_end, k_end, stride_kt, stride_vt, cols,
                                      IEEE, True, BLOCK_N, qk_scale)
        has_keys = l_i > 0
        out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
        if SPLIT:
            split = tl.program_id(2)
            tl.store(_row_ptrs(O_PART + split * stride_ps, safe_rows, stride_ot, h * stride_oh, cols), out,
                     mask=row_ok[:, None])
            lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
            tl.store(LSE_PART + split * stride_lps + h * stride_lse_h + safe_rows, lse, mask=row_ok)
        else:
            tl.store(_row_ptrs(O, safe_rows, stride_ot, h * stride_oh, cols), out.to(O.dtype.element_ty),
                     mask=row_ok[:, None])
            # log2-domain logsumexp of the scaled scores; +inf for rows with no keys (then p = 0 in bwd)
            lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("inf"))
            tl.store(LSE + h * stride_lse_h + safe_rows, lse, mask=row_ok)

    @triton.jit(do_not_specialize=["T", "S"])
    def _attn_split_combine_kernel(O_PART, LSE_PART, O, LSE, T, S, stride_ps, stride_lps, stride_ot, stride_oh,
                                   stride_lse_h, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr):
        """Merge the S split-KV partials of rows [t0, t0 + BLOCK_T) of one head: O = sum_s w_s O_s,
        w_s = 2^(lse_s - lse) with lse = log2 sum_s 2^lse_s (FlashDecoding); O_PART is laid out as O
        (fp32, strides stride_ot / stride_oh), one (T, H, D) slab per split. Rows without keys: O = 0,
        LSE = +inf, as the unsplit kernel."""
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        h = tl.program_id(1)
        ok = rows < T
        cols = tl.arange(0, HEAD_DIM)
        lse_ptrs = LSE_PART + h * stride_lse_h + rows
        m = tl.full((BLOCK_T,), float("-inf"), tl.float32)
        for s in range(0, S):
            m = tl.maximum(m, tl.load(lse_ptrs + s * stride_lps, mask=ok, other=float("-inf")))
        has_keys = m > float("-inf")
        m = tl.where(has_keys, m, 0.0)
        l = tl.zeros((BLOCK_T,), tl.float32)
        acc = tl.zeros((BLOCK_T, HEAD_DIM), tl.float32)
        o_offs = rows[:, None].to(tl.int64) * stride_ot + h * stride_oh + cols[None, :]
        for s in range(0, S):
            w = tl.exp2(tl.load(lse_ptrs + s * stride_lps, mask=ok, other=float("-inf")) - m)
            l += w
            acc += w[:, None] * tl.load(O_PART + s * stride_ps + o_offs, mask=ok[:, None], other=0.0)
        out = acc / tl.where(has_keys, l, 1.0)[:, None]
        tl.store(O + o_offs, out.to(O.dtype.element_ty), mask=ok[:, None])
        tl.store(LSE + h * stride_lse_h + rows, tl.where(has_keys, m + tl.log2(l), float("inf")), mask=ok)

    @triton.jit
    def _dkdv_step(dk, dv, k, v, q_base, do_base, lse_base, delta_base, m0, q_end, stride_qt, stride_dot, cols,
                   IEEE: tl.constexpr, MASK: tl.constexpr, BLOCK_M: tl.constexpr, qk_scale):
        """Contribution of query block [m0, m0 + BLOCK_M) to dK, dV of a key tile (scores transposed, (N, M))."""
        qr = m0 + tl.arange(0, BLOCK_M)
        q_ptrs = q_base + qr[:, None].to(tl.int64) * stride_qt + cols[None, :]
        do_ptrs = do_base + qr[:, None].to(tl.int64) * stride_dot + cols[None, :]
        lse_ptrs = lse_base + qr
        delta_ptrs = delta_base + qr
        if MASK:
            q_ok = qr < q_end
            q = tl.load(q_ptrs, mask=q_ok[:, None], other=0.0)
            do = tl.load(do_ptrs, mask=q_ok[:, None], other=0.0)
            # lse = +inf, dO = 0 for rows past the sequence: their p and dS are exactly 0
            lse = tl.load(lse_ptrs, mask=q_ok, other=float("inf"))
            delta = tl.load(delta_ptrs, mask=q_ok, other=0.0)
        else:
            q = tl.load(q_ptrs)
            do = tl.load(do_ptrs)
            lse = tl.load(lse_ptrs)
            delta = tl.load(delta_ptrs)
        # Key rows past the sequence (k = v = 0) give finite garbage only in their own dK/dV rows,
        # which are never stored, so no select is needed here.
        pt = tl.exp2(_dot(k, tl.trans(q), IEEE) * qk_scale - lse[None, :])
        dv = _dot_acc(pt.to(do.dtype), do, dv, IEEE)
        dpt = _dot(v, tl.trans(do), IEEE)
        dst = pt * (dpt - delta[None, :])
        dk = _dot_acc(dst.to(q.dtype), q, dk, IEEE)
        return dk, dv

    @triton.jit
    def _attn_bwd_dkdv_kernel(
        Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K, TILE_SEQ, TILE_START,
        qk_scale, sm_scale,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
        stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_lse_h,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
    ):
        """dK, dV for one key tile: loop over the query rows of its sequence (FlashAttention-2)."""
        h = tl.program_id(1)
        n0, k_end, q_start, q_end = _tile_bounds(TILE_SEQ, TILE_START, CU_K, CU_Q)
        cols = tl.arange(0, HEAD_DIM)
        k_ok, safe_kr = _tile_rows(n0, k_end, BLOCK_N)
        k = tl.load(_row_ptrs(K, safe_kr, stride_kt, h * stride_kh, cols), mask=k_ok[:, None], other=0.0)
        v = tl.load(_row_ptrs(V, safe_kr, stride_vt, h * stride_vh, cols), mask=k_ok[:, None], other=0.0)
        dk = tl.zeros((BLOCK_N, HEAD_DIM), tl.float32)
        dv = tl.zeros((BLOCK_N, HEAD_DIM), tl.float32)
        q_base = Q + h * stride_qh
        do_base = DO + h * stride_doh
        lse_base = LSE + h * stride_lse_h
        delta_base = DELTA + h * stride_lse_h
        q_full_end = q_start + ((q_end - q_start) // BLOCK_M) * BLOCK_M
        for m0 in range(q_start, q_full_end, BLOCK_M):
            dk, dv = _dkdv_step(dk, dv, k, v, q_base, do_base, lse_base, delta_base, m0, q_end, stride_qt, stride_dot,
                                cols, IEEE, False, BLOCK_M, qk_scale)
        if q_full_end < q_end:
            dk, dv = _dkdv_step(dk, dv, k, v, q_base, do_base, lse_base, delta_base, q_full_end, q_end, stride_qt,
                                stride_dot, cols, IEEE, True, BLOCK_M, qk_scale)
        dk = dk * sm_scale
        tl.store(_row_ptrs(DK, safe_kr, stride_dkt, h * stride_dkh, cols), dk.to(DK.dtype.element_ty), mask=k_ok[:, None])
        tl.store(_row_ptrs(DV, safe_kr, stride_dvt, h * stride_dvh, cols), dv.to(DV.dtype.element_ty), mask=k_ok[:, None])

    @triton.jit
    def _dq_step(dq, q, do, lse, delta, k_base, v_base, n0, k_end, stride_kt, stride_vt, cols,
                 IEEE: tl.constexpr, MASK: tl.constexpr, BLOCK_N: tl.constexpr, qk_scale):
        """Contribution of key block [n0, n0 + BLOCK_N) to dQ of a query tile."""
        k, v, k_ok = _load_kv_block(k_base, v_base, n0, k_end, stride_kt, stride_vt, cols, MASK, BLOCK_N)
        p = tl.exp2(_dot(q, tl.trans(k), IEEE) * qk_scale - lse[:, None])
        if MASK:  # padded keys are zero rows, but exp2(-lse) may overflow: zero them explicitly
            p = tl.where(k_ok[None, :], p, 0.0)
        dp = _dot(do, tl.trans(v), IEEE)
        ds = p * (dp - delta[:, None])
        return _dot_acc(ds.to(k.dtype), k, dq, IEEE)

    @triton.jit
    def _attn_bwd_dq_kernel(
        Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K, TILE_SEQ, TILE_START,
        qk_scale, sm_scale,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
        stride_dqt, stride_dqh, stride_lse_h,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
    ):
        """dQ for one query tile: loop over the keys of its sequence."""
        h = tl.program_id(1)
        m0, q_end, k_start, k_end = _tile_bounds(TILE_SEQ, TILE_START, CU_Q, CU_K)
        cols = tl.arange(0, HEAD_DIM)
        q_ok, safe_qr = _tile_rows(m0, q_end, BLOCK_M)
        q = tl.load(_row_ptrs(Q, safe_qr, stride_qt, h * stride_qh, cols), mask=q_ok[:, None], other=0.0)
        do = tl.load(_row_ptrs(DO, safe_qr, stride_dot, h * stride_doh, cols), mask=q_ok[:, None], other=0.0)
        lse = tl.load(LSE + h * stride_lse_h + safe_qr, mask=q_ok, other=float("inf"))
        delta = tl.load(DELTA + h * stride_lse_h + safe_qr, mask=q_ok, other=0.0)
        dq = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
        k_base = K + h * stride_kh
        v_base = V + h * stride_vh
        k_full_end = k_start + ((k_end - k_start) // BLOCK_N) * BLOCK_N
        for n0 in range(k_start, k_full_end, BLOCK_N):
            dq = _dq_step(dq, q, do, lse, delta, k_base, v_base, n0, k_end, stride_kt, stride_vt, cols,
                          IEEE, False, BLOCK_N, qk_scale)
        if k_full_end < k_end:
            dq = _dq_step(dq, q, do, lse, delta, k_base, v_base, k_full_end, k_end, stride_kt, stride_vt, cols,
                          IEEE, True, BLOCK_N, qk_scale)
        dq = dq * sm_scale
        tl.store(_row_ptrs(DQ, safe_qr, stride_dqt, h * stride_dqh, cols), dq.to(DQ.dtype.element_ty), mask=q_ok[:, None])


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
# Tile sizes. The tile tables are built for these, so they are fixed per head dim; the autotuner
# varies only the inner block, warps and pipeline depth (keyed on HEAD_DIM, never on lengths).
_FWD_BLOCK_M = 128  # query rows per forward / dQ program
_KV_BLOCK_N = 128  # key rows per dK/dV program
_INTERP_BLOCK = 32  # the interpreter's single config (small, ragged tests)
# fp32 inputs (exact IEEE products, for checks, not speed) get one fixed config and no autotuning:
# ptxas takes 10-20 s per fp32 config, which a 5-config sweep per head dim would multiply.
_FP32_INNER_BLOCK = 64  # forward key block; the backward inner blocks use half of it
_FP32_LAUNCH = dict(num_warps=8, num_stages=2)
_ROPE_BLOCK_T = 32
_MAX_KV_SPLITS = 32  # split-KV forward: at most this many key chunks per (query tile, head)


def _gpu_configs(inner: str, sizes: tuple[int, int]):
    """4 configs: both inner blocks at 8 warps x 2-3 stages. No 4-warp configs: at head dim 128 even
    the smaller block's spills on sm_90 (fwd 164 B, dK/dV 2028 B, dQ 116 B: bench/compile_audit.py)."""
    small, large = sizes
    return [triton.Config({inner: b}, num_warps=8, num_stages=s) for b in (small, large) for s in (3, 2)]


if HAS_TRITON:
    _attn_fwd_tuned = triton.autotune(_gpu_configs("BLOCK_N", (64, 128)), key=["HEAD_DIM", "IEEE", "SPLIT"])(
        _attn_fwd_kernel)
    _attn_dkdv_tuned = triton.autotune(_gpu_configs("BLOCK_M", (32, 64)), key=["HEAD_DIM", "IEEE"])(_attn_bwd_dkdv_kernel)
    _attn_dq_tuned = triton.autotune(_gpu_configs("BLOCK_N", (32, 64)), key=["HEAD_DIM", "IEEE"])(_attn_bwd_dq_kernel)


def _rope_tensors(rope: Rope | None, ref: torch.Tensor):
    if rope is None:
        return ref, ref, ref  # dummies, never read (ROPE_Q=False)
    cos, sin, il = rope
    return cos, sin, il.view(torch.uint8) if il.dtype == torch.bool else il


@on_input_device
def _rotate(x: torch.Tensor, cos, sin, il, inverse: bool, positions=None) -> torch.Tensor:
    """R x (or R^T x) for ``x (T, H, D)`` with per-token tables, by ``_rope_kernel``; ``positions``
    = ``(pos, freq, axis)`` computes the angles from position ids instead (``cos`` / ``sin`` unused)."""
    T, H, D = x.shape
    out = torch.empty_like(x)
    if T == 0:
        return out
    il = il.view(torch.uint8) if il.dtype == torch.bool else il
    pos, freq, axis = positions if positions is not None else (il, il, il)  # dummies, never read
    _rope_kernel[(cdiv(T, _ROPE_BLOCK_T),)](
        x, out, cos, sin, il, pos, freq, axis, T, H, x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        cos.stride(0), HEAD_DIM=D, BLOCK_T=_ROPE_BLOCK_T, INVERSE=inverse, FROM_POSITIONS=positions is not None,
    )
    return out


def _blocks(interp: bool):
    return (_INTERP_BLOCK, _INTERP_BLOCK) if interp else (_FWD_BLOCK_M, _KV_BLOCK_N)


def _kv_splits(programs: int, max_k: int, granule: int, device: torch.device) -> int:
    """Key splits of the forward: 1 when the (query tile, head) programs fill the SMs; else enough
    splits for about two programs per SM, each split at least 4 key blocks long."""
    sms = num_sms(device)
    if programs >= sms:
        return 1
    return max(1, min(cdiv(2 * sms, programs), max_k // (4 * granule), _MAX_KV_SPLITS))


def _max_len(cu_seqlens: list[int]) -> int:
    """The longest sequence of a (host) ``cu_seqlens``."""
    return max(b - a for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:]))


def _attention_forward(q, k, v, cu_q, cu_k, scale, rope_q, rope_k, num_splits=None):
    """Returns ``out (Tq, H, D)`` and ``lse (H, Tq)`` (log2 domain of the scaled scores).
    ``num_splits``: key splits (split-KV); None = :func:`_kv_splits`'s choice."""
    Tq, H, D = q.shape
    interp = interpreting()
    block_m, granule = _blocks(interp)
    if rope_k is not None:
        k = _rotate(k, *_rope_tensors(rope_k, k), inverse=False)
    if rope_q is not None and not ROPE_Q_IN_PROLOGUE:
        q = _rotate(q, *_rope_tensors(rope_q, q), inverse=False)
        rope_q = None
    lse = torch.empty((H, Tq), device=q.device, dtype=torch.float32)
    tile_seq, tile_start = tile_table(host_list(cu_q), block_m, q.device)
    if tile_seq.numel() == 0:
        return torch.empty_like(q), lse
    cos, sin, il = _rope_tensors(rope_q, q)
    max_k = _max_len(host_list(cu_k))
    splits = num_splits if num_splits is not None else _kv_splits(tile_seq.numel() * H, max_k, granule, q.device)
    out = torch.empty_like(q)  # q's layout (dense), as the registered fake says
    if splits > 1:  # fp32 partials, one (Tq, H, D) slab per split in O's layout (the kernels index both alike)
        lse_part = torch.empty((splits, H, Tq), device=q.device, dtype=torch.float32)
        o_part = torch.empty_strided((splits, Tq, H, D), (Tq * H * D, *out.stride()), device=q.device,
                                     dtype=torch.float32)
    else:
        o_part, lse_part = out, lse  # dummies, never touched (SPLIT=False)
    args = (q, k, v, out, lse, cu_q, cu_k, tile_seq, tile_start, cos, sin, il, o_part, lse_part, scale * _LOG2E,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
            lse.stride(0), cos.stride(0) if rope_q is not None else 0, o_part.stride(0), lse_part.stride(0))
    meta = dict(HEAD_DIM=D, BLOCK_M=block_m, ROPE_Q=rope_q is not None, IEEE=q.dtype == torch.float32,
                SPLIT=splits > 1)
    grid = (tile_seq.numel(), H, splits)
    if interp:
        _attn_fwd_kernel[grid](*args, BLOCK_N=_INTERP_BLOCK, **meta)
    elif meta["IEEE"]:
        _attn_fwd_kernel[grid](*args, BLOCK_N=_FP32_INNER_BLOCK, **meta, **_FP32_LAUNCH)
    else:
        _attn_fwd_tuned[grid](*args, **meta)
    if splits > 1:
        _attn_split_combine_kernel[(cdiv(Tq, _ROPE_BLOCK_T), H)](
            o_part, lse_part, out, lse, Tq, splits, o_part.stride(0), lse_part.stride(0), out.stride(0), out.stride(1),
            lse.stride(0), HEAD_DIM=D, BLOCK_T=_ROPE_BLOCK_T)
    return out, lse


def _attention_backward(do, q, k, v, out, lse, cu_q, cu_k, scale, rope_q, rope_k):
    """FlashAttention-2 backward on the rotated q, k; dq, dk are rotated back (R^T)."""
    Tq, H, D = q.shape
    interp = interpreting()
    block_m, block_n = _blocks(interp)
    if rope_q is not None:
        q = _rotate(q, *_rope_tensors(rope_q, q), inverse=False)
    if rope_k is not None:
        k = _rotate(k, *_rope_tensors(rope_k, k), inverse=False)
    do = do.contiguous()
    delta = torch.empty((H, Tq), device=q.device, dtype=torch.float32)  # rowsum(dO * O), no fp32 copies
    if Tq:
        _bwd_delta_kernel[(cdiv(Tq, _ROPE_BLOCK_T), H)](
            out, do, delta, Tq, out.stride(0), out.stride(1), do.stride(0), do.stride(1), delta.stride(0),
            HEAD_DIM=D, BLOCK_T=_ROPE_BLOCK_T)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    ieee = q.dtype == torch.float32
    common = dict(HEAD_DIM=D, IEEE=ieee)
    cu_q_list, cu_k_list = host_list(cu_q), host_list(cu_k)
    kv_seq, kv_start = tile_table(cu_k_list, block_n, q.device)
    if kv_seq.numel():
        args = (q, k, v, do, lse, delta, dk, dv, cu_q, cu_k, kv_seq, kv_start, scale * _LOG2E, scale,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
                dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), lse.stride(0))
        grid = (kv_seq.numel(), H)
        if interp:
            _attn_bwd_dkdv_kernel[grid](*args, BLOCK_M=_INTERP_BLOCK, BLOCK_N=block_n, **common)
        elif ieee:
            _attn_bwd_dkdv_kernel[grid](*args, BLOCK_M=_FP32_INNER_BLOCK // 2, BLOCK_N=block_n, **common, **_FP32_LAUNCH)
        else:
            _attn_dkdv_tuned[grid](*args, BLOCK_N=block_n, **common)
    q_seq, q_start = tile_table(cu_q_list, block_m, q.device)
    if q_seq.numel():
        args = (q, k, v, do, lse, delta, dq, cu_q, cu_k, q_seq, q_start, scale * _LOG2E, scale,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
                dq.stride(0), dq.stride(1), lse.stride(0))
        grid = (q_seq.numel(), H)
        if interp:
            _attn_bwd_dq_kernel[grid](*args, BLOCK_M=block_m, BLOCK_N=_INTERP_BLOCK, **common)
        elif ieee:
            _attn_bwd_dq_kernel[grid](*args, BLOCK_M=block_m, BLOCK_N=_FP32_INNER_BLOCK // 2, **common, **_FP32_LAUNCH)
        else:
            _attn_dq_tuned[grid](*args, BLOCK_M=block_m, **common)
    if rope_q is not None:
        dq = _rotate(dq, *_rope_tensors(rope_q, dq), inverse=True)
    if rope_k is not None:
        dk = _rotate(dk, *_rope_tensors(rope_k, dk), inverse=True)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# torch.library ops (so torch.compile traces through without graph breaks) + autograd
# ----------------------------------------------------------------------------------------------
def _rope_or_none(cos, sin, il) -> Rope | None:
    return None if cos is None else (cos, sin, il)


@custom_op("univigu_fast::joint_attention_fwd")
def _joint_attention_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    softmax_scale: float,
    rope_q_cos: torch.Tensor | None, rope_q_sin: torch.Tensor | None, rope_q_il: torch.Tensor | None,
    rope_k_cos: torch.Tensor | None, rope_k_sin: torch.Tensor | None, rope_k_il: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale,
                              _rope_or_none(rope_q_cos, rope_q_sin, rope_q_il), _rope_or_none(rope_k_cos, rope_k_sin, rope_k_il))


@_joint_attention_fwd_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, *rope):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@custom_op("univigu_fast::joint_attention_bwd")
def _joint_attention_bwd_op(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, softmax_scale: float,
    rope_q_cos: torch.Tensor | None, rope_q_sin: torch.Tensor | None, rope_q_il: torch.Tensor | None,
    rope_k_cos: torch.Tensor | None, rope_k_sin: torch.Tensor | None, rope_k_il: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _attention_backward(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, softmax_scale,
                               _rope_or_none(rope_q_cos, rope_q_sin, rope_q_il), _rope_or_none(rope_k_cos, rope_k_sin, rope_k_il))


@_joint_attention_bwd_op.register_fake
def _(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, softmax_scale, *rope):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, scale, *rope = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, *[t if t is not None else torch.empty(0) for t in rope])
    ctx.rope_present = [t is not None for t in rope]
    ctx.scale = scale


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_q, cu_k, *rope = ctx.saved_tensors
    rope = [t if present else None for t, present in zip(rope, ctx.rope_present)]
    dq, dk, dv = _joint_attention_bwd_op(grad_out, q, k, v, out, lse, cu_q, cu_k, ctx.scale, *rope)
    return (dq, dk, dv) + (None,) * 9


torch.library.register_autograd("univigu_fast::joint_attention_fwd", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Standalone RoPE (Triton) for the SDPA backend
# ----------------------------------------------------------------------------------------------
class _Rope(torch.autograd.Function):
    """``R x`` with the per-token tables; the gradient is ``R^T g`` (the same kernel, angle negated)."""

    @staticmethod
    def forward(ctx, x, cos, sin, il):
        ctx.save_for_backward(cos, sin, il)
        return _rotate(x.contiguous(), cos, sin, il, inverse=False)

    @staticmethod
    def backward(ctx, grad):
        cos, sin, il = ctx.saved_tensors
        return _rotate(grad.contiguous(), cos, sin, il, inverse=True), None, None, None


def apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate ``x (T, H, D)`` by per-token RoPE tables (Triton where it can run, else the reference)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"x must be a (T, H, D) tensor, got {describe(x)}")
    if rope is None:  # (None means "no rotation" to joint_attention; here there is nothing else to do)
        raise TypeError("rope must be a tuple (cos, sin, interleaved), got None")
    _check_rope(rope, x, "rope")
    if x.shape[-1] not in SUPPORTED_HEAD_DIMS:  # the kernel's tiles need a power-of-two head_dim
        log_once(f"apply_rope: head_dim {x.shape[-1]} has no Triton kernel (supported: {SUPPORTED_HEAD_DIMS}); "
                 "using the PyTorch reference")
        return apply_rope_reference(x, rope)
    if not use_triton(x):
        return apply_rope_reference(x, rope)
    return _Rope.apply(x, *rope)


def rope_tables_from_positions(pos: torch.Tensor, freq: torch.Tensor, axis: torch.Tensor,
                               interleaved: torch.Tensor) -> Rope:
    """The per-token tables of the position-id form (the spec of :func:`apply_rope_positions`):
    ``pos`` int32 (T, 3), ``freq`` fp32 / ``axis`` int (2, D/2) (row 0: interleaved rows, row 1: the
    others), ``interleaved`` bool (T,) -> ``(cos, sin, interleaved)`` with fp32 angles."""
    m = torch.where(interleaved.bool(), 0, 1).long()
    angle = pos.float().gather(1, axis.long()[m]) * freq.float()[m]
    return angle.cos(), angle.sin(), interleaved


def apply_rope_positions(x: torch.Tensor, pos: torch.Tensor, freq: torch.Tensor, axis: torch.Tensor,
                         interleaved: torch.Tensor) -> torch.Tensor:
    """Rotate ``x (T, H, D)`` with cos / sin computed in the RoPE kernel from position ids (the
    alternative to the tables, forward only; see :func:`rope_tables_from_positions` for the form).
    ``packing.rope_positions`` builds ``pos, freq, axis`` for a packed batch."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"x must be a (T, H, D) tensor, got {describe(x)}")
    T, H, D = x.shape
    want = {"pos": ((T, 3), (torch.int32,)), "freq": ((2, D // 2), (torch.float32,)),
            "axis": ((2, D // 2), (torch.int32,)), "interleaved": ((T,), (torch.bool, torch.uint8, torch.int8))}
    for name, t in (("pos", pos), ("freq", freq), ("axis", axis), ("interleaved", interleaved)):
        shape, dtypes = want[name]
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype not in dtypes or not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous {' / '.join(map(str, dtypes))} of shape {shape}, got {describe(t)}")
    check_devices(x, pos=pos, freq=freq, axis=axis, interleaved=interleaved)
    if axis.numel() and not torch.compiler.is_compiling():  # the kernel gathers pos[:, axis]: an index
        lo, hi = torch.aminmax(axis)  # (one sync; not on the model's path, which uses the tables)
        if lo < 0 or hi > 2:
            raise ValueError(f"axis must hold position columns 0, 1 or 2, got values in [{int(lo)}, {int(hi)}]")
    if not use_triton(x) or D not in SUPPORTED_HEAD_DIMS:  # the kernel's tiles need a power-of-two head_dim
        return apply_rope_reference(x, rope_tables_from_positions(pos, freq, axis, interleaved))
    return _rotate(x.contiguous(), freq, freq, interleaved, inverse=False, positions=(pos, freq, axis))


def _sdpa_varlen(q, k, v, cu_q: list[int], cu_k: list[int], scale: float) -> torch.Tensor:
    """Per-sample ``scaled_dot_product_attention`` (PyTorch picks its fastest backend: flash / cuDNN)."""
    outs = []
    for (qs, qe), (ks, ke) in zip(zip(cu_q[:-1], cu_q[1:]), zip(cu_k[:-1], cu_k[1:])):
        if ke == ks:
            outs.append(q.new_zeros((qe - qs,) + q.shape[1:]))
            continue
        o = F.scaled_dot_product_attention(q[qs:qe].transpose(0, 1)[None], k[ks:ke].transpose(0, 1)[None],
                                           v[ks:ke].transpose(0, 1)[None], scale=scale)
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs) if len(outs) > 1 else outs[0].contiguous()


BACKENDS = ("auto", "triton", "sdpa")


def _choose_backend(backend: str, q: torch.Tensor) -> str:
    """``auto``: the Triton kernel under the interpreter and on GPUs without a fast SDPA backend;
    on CUDA with fp16/bf16 the measured-faster path (H100, DESIGN §6 shapes: per-sample SDPA reaches
    ~600 TFLOP/s where our Triton kernel reaches ~360) — Triton RoPE, then PyTorch's flash/cuDNN SDPA —
    except where few query tiles meet long keys without gradients (:func:`_auto_for_few_queries`)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return "sdpa"
    return "triton"


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------
def _check_cu_seqlens(cu: torch.Tensor, x: torch.Tensor, name: str, max_seqlen, max_name: str) -> None:
    """``cu`` int32 (B+1,) on x's device, 0 first, non-decreasing, ``x.shape[0]`` last; ``max_seqlen``
    an int >= its longest sequence (the kernels read lengths from ``cu``; a smaller bound, as
    flash-attn takes it, is a caller's error)."""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must be 1-D with batch+1 >= 2 entries, got shape {tuple(cu.shape)}")
    if cu.device != x.device:
        raise ValueError(f"{name} must be on the device of the tensors it indexes ({x.device}), got {cu.device}")
    check_contiguous(cu, name)
    if isinstance(max_seqlen, bool) or not hasattr(max_seqlen, "__index__"):  # int, SymInt, numpy int
        raise TypeError(f"{max_name} must be an int, got {type(max_seqlen).__name__}")
    if torch.compiler.is_compiling():  # value checks would sync and break the graph; eager calls do them
        return
    vals = host_list(cu)
    total = x.shape[0]
    if vals[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {vals[0]}")
    if any(b < a for a, b in zip(vals[:-1], vals[1:])):
        raise ValueError(f"{name} must be non-decreasing, got {vals}")
    if vals[-1] != total:
        raise ValueError(f"{name}[-1] must equal the number of packed tokens {total}, got {vals[-1]}")
    longest = _max_len(vals)
    if int(max_seqlen) < longest:
        raise ValueError(f"{max_name} = {int(max_seqlen)} is below the longest sequence in {name} ({longest})")


def _check_rope(rope, x: torch.Tensor, name: str) -> None:
    if rope is None:
        return
    if not (isinstance(rope, (tuple, list)) and len(rope) == 3):
        what = f"a {type(rope).__name__} of length {len(rope)}" if isinstance(rope, (tuple, list)) else type(rope).__name__
        raise TypeError(f"{name} must be a tuple (cos, sin, interleaved), got {what}")
    cos, sin, il = rope
    T, _, D = x.shape
    for t, nm in ((cos, "cos"), (sin, "sin"), (il, "interleaved")):
        if not isinstance(t, torch.Tensor) or t.device != x.device:
            raise ValueError(f"{name}.{nm} must be a tensor on {x.device}, got {getattr(t, 'device', type(t).__name__)}")
    for t, nm in ((cos, "cos"), (sin, "sin")):
        if t.shape != (T, D // 2) or t.dtype != torch.float32:
            raise ValueError(f"{name}.{nm} must be float32 of shape ({T}, {D // 2}), got {t.dtype} {tuple(t.shape)}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name}.{nm} must have unit stride on its last dim")
    if sin.stride() != cos.stride():  # the kernels read both with cos's row stride
        raise ValueError(f"{name}.sin must have cos's strides {tuple(cos.stride())}, got {tuple(sin.stride())}")
    if il.shape != (T,) or il.dtype not in (torch.bool, torch.uint8, torch.int8):
        raise ValueError(f"{name}.interleaved must be bool (or uint8 / int8 flags) of shape ({T},), got {il.dtype} "
                         f"{tuple(il.shape)}")
    check_contiguous(il, f"{name}.interleaved")


def check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, softmax_scale=None, rope_q=None,
                 rope_k=None, any_float: bool = False) -> float:
    """The checks of :func:`joint_attention` (same arguments); returns the softmax scale. ``any_float``:
    any floating dtype and head_dim (what the reference takes; ``ops`` checks with it before falling back)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name} must be (T, H, head_dim), got shape {tuple(t.shape)}")
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32) and not (any_float and t.is_floating_point()):
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[1:] != k.shape[1:]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on (H, head_dim)")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    D = q.shape[-1]
    if D not in SUPPORTED_HEAD_DIMS and not any_float:
        raise ValueError(f"head_dim {D} is not supported: expected one of {SUPPORTED_HEAD_DIMS}")
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    _check_cu_seqlens(cu_seqlens_q, q, "cu_seqlens_q", max_seqlen_q, "max_seqlen_q")
    _check_cu_seqlens(cu_seqlens_k, k, "cu_seqlens_k", max_seqlen_k, "max_seqlen_k")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q ({cu_seqlens_q.numel()}) and cu_seqlens_k ({cu_seqlens_k.numel()}) "
                         "must describe the same batch size")
    _check_rope(rope_q, q, "rope_q")
    _check_rope(rope_k, k, "rope_k")
    if q.shape[1] == 0 or D == 0:
        raise ValueError(f"q, k, v must have at least one head of head_dim >= 1, got q {tuple(q.shape)}")
    try:
        scale = float(softmax_scale) if softmax_scale is not None else D ** -0.5
    except (TypeError, ValueError):
        raise TypeError(f"softmax_scale must be a number or None, got {softmax_scale!r}") from None
    if not scale > 0 or scale == float("inf"):  # the kernels fold the scale into max / exp2 (needs > 0)
        raise ValueError(f"softmax_scale must be a finite positive number, got {softmax_scale!r}")
    return scale


def joint_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    softmax_scale: float | None = None,
    rope_q: Rope | None = None,
    rope_k: Rope | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Non-causal varlen attention over packed sequences, RoPE fused (``flash_attn_varlen_func`` style).

    q (Tq, H, D), k and v (Tk, H, D), D a power of two in [16, 128] (Wan: 128); cu_seqlens_q/k int32
    (B+1,); rope_q / rope_k tables as in the module docstring (None: no rotation; cross-attention
    passes none). Returns (Tq, H, D) in q.dtype. Sample i's queries attend to its keys only; a sample
    with no keys gets zeros. Differentiable in q, k, v. Runs the Triton kernels on CUDA (or under
    the interpreter); elsewhere the per-sample SDPA reference (logged once).
    """
    scale = check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=softmax_scale,
                         rope_q=rope_q, rope_k=rope_k)
    chosen = _choose_backend(backend, q)
    if torch.is_grad_enabled() and any(t.requires_grad for r in (rope_q, rope_k) if r is not None for t in r[:2]):
        log_once("joint_attention: RoPE tables that require grad take the per-sample SDPA reference (the "
                 "kernels differentiate in q, k, v only)")
        return joint_attention_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                         softmax_scale=scale, rope_q=rope_q, rope_k=rope_k)
    if not use_triton(q, k, v):
        log_once("joint_attention: Triton unavailable for these tensors; using the per-sample SDPA reference")
        return joint_attention_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                         softmax_scale=scale, rope_q=rope_q, rope_k=rope_k)
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, scale, rope_q, rope_k)
    if backend == "auto" and chosen == "sdpa" and not torch.compiler.is_compiling():
        chosen = _auto_for_few_queries(*args)
    return _run_sdpa(*args) if chosen == "sdpa" else _run_triton(*args)


def _run_sdpa(q, k, v, cu_q, cu_k, scale, rope_q, rope_k):
    """Backend ``sdpa``: Triton RoPE, then per-sample PyTorch SDPA."""
    if rope_q is not None:
        q = apply_rope(q, rope_q)
    if rope_k is not None:
        k = apply_rope(k, rope_k)
    if torch.compiler.is_compiling():
        raise RuntimeError("joint_attention(backend='sdpa') is not traceable; use backend='triton' under torch.compile")
    return _sdpa_varlen(q, k, v, host_list(cu_q), host_list(cu_k), scale)


def _run_triton(q, k, v, cu_q, cu_k, scale, rope_q, rope_k):
    """Backend ``triton``: our FlashAttention kernels (RoPE in a pre-pass or the q prologue; split-KV
    where few query tiles meet long keys), as a differentiable custom op."""
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    rq = tuple(rope_q) if rope_q is not None else (None, None, None)
    rk = tuple(rope_k) if rope_k is not None else (None, None, None)
    out, _ = _joint_attention_fwd_op(q, k, v, cu_q, cu_k, scale, *rq, *rk)
    return out


_AUTO_FEW_QUERIES: dict = {}  # shape bucket -> the backend ``auto`` measured faster there


def _auto_for_few_queries(q, k, v, cu_q, cu_k, scale, rope_q, rope_k) -> str:
    """``auto`` where (query tiles x heads) cannot fill the GPU and the keys are long — a text-only
    step of the video cache: 256 queries over 33K keys, 24 programs of one tile each for 132 SMs —
    without gradients: our split-KV kernel or per-sample SDPA, whichever ran faster the first time
    this shape bucket was seen (``pick_fastest``). Elsewhere ``sdpa``, as measured at DESIGN §6."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return "sdpa"
    cq = host_list(cu_q)
    tiles = sum(cdiv(e - s, _FWD_BLOCK_M) for s, e in zip(cq[:-1], cq[1:]))  # the forward's tiles, host-side only
    max_k = _max_len(host_list(cu_k))
    H, D = q.shape[1:]
    if tiles == 0 or _kv_splits(tiles * H, max_k, _KV_BLOCK_N, q.device) == 1:
        return "sdpa"
    args = (q, k, v, cu_q, cu_k, scale, rope_q, rope_k)
    key = (str(q.device), q.dtype, H, D, tiles, next_power_of_2(max_k), rope_q is not None, rope_k is not None)
    candidates = {"triton": lambda: _run_triton(*args), "sdpa": lambda: _run_sdpa(*args)}
    return pick_fastest(_AUTO_FEW_QUERIES, key, candidates, "joint_attention: auto backend with few query tiles",
                        q.device)
