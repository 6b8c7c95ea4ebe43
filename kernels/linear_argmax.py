"""Fused linear argmax / sample for text decoding (DESIGN §5.2).

``logits = x @ weight.T (+ bias)``; returns ``(ids, max_logit, logsumexp)`` per row without
materialising the ``(N, V)`` logits in the fast path.

Decoding text in Uni-ViGU (paper Eq. 8 ``argmax_v z . E_v``, the logits head's argmax, and the
discrete Euler solver's sample from ``softmax(logits)``) is a ``(N, dim) x (dim, V)`` product
reduced to one id per token. The Triton path:

1. ``_linear_argmax_partial_kernel``: grid ``row blocks x splits`` (grouped order). Each program owns ``BLOCK_N``
   rows and a contiguous chunk of the vocabulary, walks it in ``BLOCK_V`` tiles, computes each
   ``(BLOCK_N, BLOCK_V)`` logits tile with ``tl.dot`` over ``dim`` in ``BLOCK_D`` blocks, and keeps
   per row a running (best score, its id, its logit) and an online-softmax (max, sum-exp) pair.
   It writes these partials, ``(N, splits)`` each; the logits tile never leaves registers.
   On Hopper the autotuner also tries configs that read x / W through TMA descriptors
   (``USE_TMA``): no address registers, so a 128 x 128 tile fits 128 registers and two programs
   share an SM (one's epilogue runs while the other's MMAs do).
2. ``_linear_argmax_reduce_kernel``: one tiny pass merging the partials of a row in increasing
   vocabulary order.

Ties resolve to the lowest id, like ``torch.argmax``: inside a tile the max reduction returns the
leftmost maximal column, tiles and splits are merged with a strict ``>`` in increasing id order.

Sampling (``gumbel_seed`` given): a two-level Gumbel-max draw, exact for ``softmax(z / T)``. The
vocabulary is cut into fixed groups of ``SAMPLE_GROUP`` ids (the sampling tile). Level 1, in the
partial kernel: each group competes with ``lse_g + G_g`` (its log-sum-exp plus one Gumbel variate),
so group ``g`` wins with probability ``exp(lse_g) / sum_h exp(lse_h)``. Level 2,
``_sample_in_group_kernel``: for each row, the ``SAMPLE_GROUP`` logits of its winning group are
recomputed (a tiny gathered GEMV) and the id is ``argmax_j (z_j + G_j)`` over the group with fresh
Gumbel variates, a draw from ``softmax`` over the group. The product is ``P(id) = softmax(z / T)[id]``.
The big kernel draws one variate per (row, group) instead of one per logit, so its sampling
epilogue is as light as the argmax's; like plain Gumbel-max, a small change of the logits rarely
changes the draw of a given seed. Noise comes from Philox-4x32-10 keyed on ``(seed, group, row)``:
counter ``(group, row, 0, 0)`` word 0 for level 1, counter ``(group, row, 1 + j // 4, 0)`` word
``j % 4`` for column ``j`` of level 2, so the same seed gives the same ids whatever the row tiling,
dim blocking, number of splits or launch configuration (:func:`linear_sample_reference` reproduces them).

Outputs in both modes: ``ids`` int64 ``(N,)``; ``max_logit`` fp32 ``(N,)`` = the *un-noised*
tempered logit of the returned id, ``z[id] / T`` (without a seed and with ``T = 1`` that is the
max logit); ``logsumexp`` fp32 ``(N,)`` = ``logsumexp(z / T)``. Hence ``max_logit - logsumexp`` is
the log-probability of the returned id under ``softmax(z / T)`` (a confidence) in both modes.
"""
from __future__ import annotations

import math

import torch

from ._utils import (HAS_TRITON, TensorDescriptor, cdiv, check_devices, custom_op, log_once, next_power_of_2, num_sms,
                     on_input_device, tma_compatible, use_triton)

if HAS_TRITON:
    import triton
    import triton.language as tl

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Philox rounds of the in-kernel Gumbel noise (Salmon et al. 2011's default, as tl.rand's).
PHILOX_ROUNDS = 10
# Row blocks per program group of the grouped launch order (see the partial kernel).
GROUP_ROWS = 8
# Every GPU config's BLOCK_V divides this, so a split's vocabulary chunk is a whole number of tiles.
_GPU_V_GRANULE = 256
# Vocabulary ids per sampling group (module docstring); sampling launches use BLOCK_V = SAMPLE_GROUP.
SAMPLE_GROUP = 128
# Level-2 launch on a GPU (one program per row, a (SAMPLE_GROUP, dim) slice of W in BLOCK_D steps).
SAMPLE_BLOCK_D, SAMPLE_WARPS = 128, 8


_M32 = 0xFFFFFFFF


def _mulhilo32(a: torch.Tensor, b: int):
    """(hi, lo) 32-bit words of ``a * b`` for ``a`` int64 holding uint32 values, ``b`` a uint32
    constant, without overflowing int64 (b split into 16-bit halves)."""
    p_lo = a * (b & 0xFFFF)
    p_hi = a * (b >> 16)
    return (p_hi + (p_lo >> 16)) >> 16, (((p_hi & 0xFFFF) << 16) + p_lo) & _M32


def philox4x32_reference(seed: int, c0, c1, c2, c3, n_rounds: int = PHILOX_ROUNDS):
    """Philox-4x32 (Salmon et al., SC'11) in PyTorch: counters ``c0..c3`` (int64 tensors holding
    uint32 values), key ``(seed mod 2^32, seed >> 32)`` -> four uint32 words, as ``tl.philox``."""
    k0 = torch.full_like(c0, seed & _M32)
    k1 = torch.full_like(c0, (seed >> 32) & _M32)
    for _ in range(n_rounds):
        hi_b, lo_b = _mulhilo32(c2, 0xCD9E8D57)
        hi_a, lo_a = _mulhilo32(c0, 0xD2511F53)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + 0x9E3779B9) & _M32
        k1 = (k1 + 0xBB67AE85) & _M32
    return c0, c1, c2, c3


def _unit_reference(words: torch.Tensor) -> torch.Tensor:
    """uint32 words (int64 tensor) -> fp32 in [0, 1), 31 bits, exactly as the kernels' ``_uint_to_unit``."""
    signed = torch.where(words >= 2**31, words - 2**32, words)     # bitcast to int32
    signed = torch.where(signed < 0, -signed - 1, signed)          # ~x on negatives, as tl.rand
    return signed.to(torch.float32) * 4.6566127342e-10


def _gumbel_reference(u: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel variates ``-log(-log(u))``, as the kernels' ``_gumbel``."""
    return -torch.log(-torch.log(u))


def group_uniforms_reference(seed: int, n: int, groups: int, device=None) -> torch.Tensor:
    """Level-1 uniforms (n, groups) fp32: word 0 of Philox keyed on ``seed`` at counter ``(group, row, 0, 0)``."""
    c0 = torch.arange(groups, device=device, dtype=torch.int64)[None, :].expand(n, groups)
    c1 = torch.arange(n, device=device, dtype=torch.int64)[:, None].expand(n, groups)
    zero = torch.zeros_like(c0)
    return _unit_reference(philox4x32_reference(seed, c0, c1, zero, zero)[0])


def in_group_uniforms_reference(seed: int, group: torch.Tensor) -> torch.Tensor:
    """Level-2 uniforms (n, SAMPLE_GROUP) fp32 for each row's group ``group`` (n,) int64: column ``j``
    takes word ``j % 4`` of Philox keyed on ``seed`` at counter ``(group, row, 1 + j // 4, 0)``."""
    n, quads = group.shape[0], SAMPLE_GROUP // 4
    c0 = group[:, None].expand(n, quads)
    c1 = torch.arange(n, device=group.device, dtype=torch.int64)[:, None].expand(n, quads)
    c2 = 1 + torch.arange(quads, device=group.device, dtype=torch.int64)[None, :].expand(n, quads)
    words = torch.stack(philox4x32_reference(seed, c0, c1, c2, torch.zeros_like(c0)), dim=-1)
    return _unit_reference(words.reshape(n, SAMPLE_GROUP))


def linear_sample_reference(logits: torch.Tensor, seed: int):
    """The kernels' two-level Gumbel-max draw from ``softmax(logits)`` (module docstring), in PyTorch.

    logits (N, V) fp32 (already divided by the temperature) -> ``(ids, group_margin, pick_margin)``:
    ids int64 (N,); the margins (N,) fp32 are the gaps between the two best noised scores of level 1
    (groups; inf with one group) and of level 2 (ids in the winning group), so tests can set aside
    rows where floating-point summation order could flip the draw.
    """
    n, v = logits.shape
    group = SAMPLE_GROUP
    groups = -(-v // group)
    padded = torch.nn.functional.pad(logits, (0, groups * group - v), value=float("-inf")).view(n, groups, group)
    lse = torch.logsumexp(padded, -1)  # -inf for a group of only -inf logits (a masking bias), never NaN
    score = lse + _gumbel_reference(group_uniforms_reference(seed, n, groups, logits.device))
    win = score.argmax(-1)
    z = padded[torch.arange(n, device=logits.device), win]                     # (N, group)
    pick = z + _gumbel_reference(in_group_uniforms_reference(seed, win))       # -inf on padding
    j = pick.argmax(-1)

    def gap(s):
        top2 = s.topk(2, dim=-1).values
        return top2[:, 0] - top2[:, 1]

    group_margin = gap(score) if groups > 1 else torch.full((n,), float("inf"), device=logits.device)
    return win * group + j, group_margin, gap(pick)


def linear_argmax_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    gumbel_seed: int | None = None,
    temperature: float = 1.0,
):
    """Naive decode: the full ``(N, V)`` logits in fp32, then argmax (ties -> lowest id).

    x (N, dim), weight (V, dim), bias (V,) -> ids int64 (N,), max_logit fp32 (N,), logsumexp fp32 (N,).

    With ``gumbel_seed`` the ids are a sample from ``softmax(logits / temperature)``, drawn as the
    kernels draw it (:func:`linear_sample_reference`: two-level Gumbel-max, the same Philox stream),
    so the reference draws the same ids as the kernel up to floating-point near-ties. ``max_logit`` is then
    ``logits[id] / temperature`` (the un-noised logit of the sampled id) and ``logsumexp`` that of
    ``logits / temperature``. Not differentiable, as the kernel (the two statistics came out requiring
    grad: a loss on them trained the reference model only).
    """
    check_decode_args(temperature, gumbel_seed)
    # fp32 logits, as the kernel's fp32 accumulation (autocast would make the matmul 16-bit)
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        logits = x.float() @ weight.float().t()
        if bias is not None:
            logits = logits + bias.float()
        if temperature != 1.0:
            logits = logits * (1.0 / temperature)
        if gumbel_seed is None:
            ids = logits.argmax(dim=-1)  # first maximal index, like torch.argmax
        else:
            ids = linear_sample_reference(logits, int(gumbel_seed))[0]
        max_logit = logits.gather(-1, ids[:, None]).squeeze(-1)
        return ids, max_logit, torch.logsumexp(logits, dim=-1)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
if HAS_TRITON:

    # sizes that only bound loops / masks are not specialised on (fewer compiles); D, chunk and the
    # strides are (their divisibility decides vectorised, pipelined loads)
    @triton.jit(do_not_specialize=["N", "V", "S", "seed", "n_bucket"])
    def _linear_argmax_partial_kernel(
        x_ptr, w_ptr, b_ptr, tgt_ptr,                      # x (N, D), w (V, D), bias (V,), target (N,)
        x_desc, w_desc,                                    # TMA descriptors of x / w (USE_TMA), else None
        best_ptr, id_ptr, sel_ptr, max_ptr, sumexp_ptr,    # partials (N, S): fp32, int32, fp32 x3
        tlogit_ptr, zsum_ptr,                              # partials (N, S) fp32 (cross-entropy only)
        N, V, D, chunk, S, stride_xn, stride_wv,
        seed, inv_temp, n_bucket,
        HAS_BIAS: tl.constexpr, SAMPLE: tl.constexpr, HAS_TARGET: tl.constexpr, SUM_Z: tl.constexpr,
        EVEN_D: tl.constexpr, IEEE_FP32: tl.constexpr, N_ROUNDS: tl.constexpr, GROUP_R: tl.constexpr,
        TMA_OK: tl.constexpr, USE_TMA: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # TMA_OK: the launcher built descriptors (part of the autotune key; without it the prune
        # drops the USE_TMA configs). USE_TMA: this config loads through them.
        # 1-D grid, grouped: consecutive programs take GROUP_R row blocks x all S splits, so the
        # programs resident together share their x blocks (L2) and stream each W tile once per group.
        pid = tl.program_id(0)
        row_blocks = tl.cdiv(N, BLOCK_N)
        per_group = GROUP_R * S
        first = (pid // per_group) * GROUP_R
        group_size = tl.minimum(row_blocks - first, GROUP_R)
        pid_n = first + (pid % per_group) % group_size
        pid_s = (pid % per_group) // group_size
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        v_start = pid_s * chunk
        v_end = tl.minimum(v_start + chunk, V)
        offs_d = tl.arange(0, BLOCK_D)
        offs_v = tl.arange(0, BLOCK_V)

        m_run = tl.full((BLOCK_N,), float("-inf"), tl.float32)     # running max of z / T
        s_run = tl.zeros((BLOCK_N,), tl.float32)                   # running sum exp(z / T - m_run)
        best = tl.full((BLOCK_N,), float("-inf"), tl.float32)      # best (noised) score so far
        best_id = tl.zeros((BLOCK_N,), tl.int32)
        best_nan = tl.zeros((BLOCK_N,), tl.int32)                  # 1 once best_id is a NaN logit's id
        # un-noised z / T of best_id (sampling: the winning group's max, replaced by level 2's draw)
        best_sel = tl.full((BLOCK_N,), float("-inf"), tl.float32)
        if HAS_TARGET:
            tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=-1).to(tl.int32)
            t_acc = tl.zeros((BLOCK_N,), tl.float32)
        if SUM_Z:
            zs_acc = tl.zeros((BLOCK_N,), tl.float32)

        # Loads are unmasked along rows: row / vocabulary indices past the end are clamped to the last
        # valid one (a real row of memory), and those rows / columns are masked out in the epilogue.
        # Only scalars carry the tile position through the loop: per-column index / mask vectors
        # carried in the accumulator's layout cost ~32 registers each (x2 with pipelining).
        x_rows = x_ptr + tl.minimum(rows, N - 1)[:, None].to(tl.int64) * stride_xn
        # One flat loop over (vocab tile, dim block) so the software pipeline keeps loading across
        # tile boundaries; the tile epilogue runs on the last dim block of each tile.
        k_tiles = tl.cdiv(D, BLOCK_D)
        n_iters = tl.cdiv(v_end - v_start, BLOCK_V) * k_tiles
        ki = k_tiles - 1
        v0 = v_start - BLOCK_V
        acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
        for _ in range(0, n_iters):
            ki = tl.where(ki == k_tiles - 1, 0, ki + 1)
            v0 = tl.where(ki == 0, v0 + BLOCK_V, v0)  # next vocabulary tile
            # logits tile z = x[rows] @ w[cols].T, fp32 accumulation over dim
            if USE_TMA:  # the copy engine zero-fills rows / columns past the tensors' ends
                a = x_desc.load([pid_n * BLOCK_N, ki * BLOCK_D])
                b = w_desc.load([v0, ki * BLOCK_D])
            else:
                w_rows = w_ptr + tl.minimum(v0 + offs_v, V - 1)[:, None].to(tl.int64) * stride_wv
                dd = ki * BLOCK_D + offs_d
                if EVEN_D:
                    a = tl.load(x_rows + dd[None, :])
                    b = tl.load(w_rows + dd[None, :])
                else:
                    a = tl.load(x_rows + dd[None, :], mask=dd[None, :] < D, other=0.0)
                    b = tl.load(w_rows + dd[None, :], mask=dd[None, :] < D, other=0.0)
            if IEEE_FP32:  # fp32 inputs: exact fp32 products, not TF32
                acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, tl.trans(b), acc)
            if ki == k_tiles - 1:  # tile epilogue
                cols = v0 + offs_v
                col_mask = cols < v_end
                if HAS_BIAS:
                    acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
                if HAS_TARGET:
                    t_acc += tl.sum(tl.where(cols[None, :] == tgt[:, None], acc, 0.0), axis=1)
                if SUM_Z:
                    zs_acc += tl.sum(tl.where(col_mask[None, :], acc, 0.0), axis=1)
                z = tl.where(col_mask[None, :], acc * inv_temp, float("-inf"))
                # NaN logits rank above everything, +inf included, as in torch.argmax: the first NaN id
                # wins (a flag, not a value: no float ranks above +inf). The max / shift are over the
                # other logits; the sum-exp keeps the NaN, so the row's logsumexp is NaN like torch's.
                is_nan = z != z
                first_nan = tl.min(tl.where(is_nan, offs_v[None, :], BLOCK_V), axis=1)
                tile_nan = (first_nan < BLOCK_V).to(tl.int32)
                z_rank = tl.where(is_nan, float("-inf"), z)
                if SAMPLE:
                    tile_max = tl.max(z_rank, axis=1)
                else:  # the argmax's max is also the softmax max: one reduction for both
                    tile_max, tile_arg = tl.max(z_rank, axis=1, return_indices=True, return_indices_tie_break_left=True)
                # masked columns: exp(-inf) = 0. A max of -inf (a tile of only -inf logits: a bias masking
                # ids) or +inf is shifted by 0 instead: exp(-inf - -inf) or exp(inf - inf) would be NaN
                tile_sum = tl.sum(tl.exp(z - _finite_or_zero(tile_max)[:, None]), axis=1)
                # online softmax statistics of z / T
                m_new = tl.maximum(m_run, tile_max)
                m_shift = _finite_or_zero(m_new)
                s_run = s_run * tl.exp(m_run - m_shift) + tile_sum * tl.exp(tile_max - m_shift)
                m_run = m_new
                if SAMPLE:
                    # level 1 of the two-level Gumbel-max (module docstring): this tile is one vocabulary
                    # group; it competes with its log-sum-exp plus Gumbel noise, Philox keyed on
                    # (seed, group, row) only. The id inside the winning group: _sample_in_group_kernel.
                    grp = tl.zeros((BLOCK_N,), tl.uint32) + (v0 // BLOCK_V).to(tl.uint32)
                    zero = tl.zeros((BLOCK_N,), tl.uint32)
                    u_grp, _w1, _w2, _w3 = tl.philox(seed, grp, rows.to(tl.uint32), zero, zero, N_ROUNDS)
                    tile_best = tile_max + tl.log(tile_sum) + _gumbel(u_grp)  # NaN with a NaN logit: flagged
                    tile_arg = tl.zeros((BLOCK_N,), tl.int32)  # the group's first id
                    tile_sel = tile_max
                else:
                    tile_arg = tl.where(tile_nan > 0, first_nan, tile_arg)
                    tile_best, tile_sel = tile_max, tile_max
                # strict: an earlier (lower) id wins ties; once a NaN has won, nothing later replaces it
                upd = (best_nan == 0) & ((tile_nan > 0) | (tile_best > best))
                best_nan = tl.maximum(best_nan, tile_nan)
                best = tl.where(upd, tile_best, best)
                best_id = tl.where(upd, v0 + tile_arg.to(tl.int32), best_id)
                best_sel = tl.where(upd, tile_sel, best_sel)
                acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)

        out = rows.to(tl.int64) * S + pid_s
        tl.store(best_ptr + out, tl.where(best_nan > 0, float("nan"), best), mask=row_mask)  # NaN: the flag
        tl.store(id_ptr + out, best_id, mask=row_mask)
        tl.store(sel_ptr + out, best_sel, mask=row_mask)
        tl.store(max_ptr + out, m_run, mask=row_mask)
        tl.store(sumexp_ptr + out, s_run, mask=row_mask)
        if HAS_TARGET:
            tl.store(tlogit_ptr + out, t_acc, mask=row_mask)
        if SUM_Z:
            tl.store(zsum_ptr + out, zs_acc, mask=row_mask)

    @triton.jit
    def _finite_or_zero(m):
        """A running softmax max with -inf (nothing but -inf seen yet) or +inf (an infinite logit: the
        sum-exp is then inf, the logsumexp inf) replaced by 0, to shift exps by."""
        return tl.where((m == float("-inf")) | (m == float("inf")), 0.0, m)

    @triton.jit
    def _uint_to_unit(bits):
        """uint32 -> float32 in [0, 1) (31 random bits, as tl.rand)."""
        xi = bits.to(tl.int32, bitcast=True)
        xi = tl.where(xi < 0, ~xi, xi)
        return xi.to(tl.float32) * 4.6566127342e-10

    @triton.jit
    def _gumbel(bits):
        """uint32 -> a standard Gumbel variate ``-log(-log(u))``, ``u = _uint_to_unit(bits)``."""
        return -tl.log(-tl.log(_uint_to_unit(bits)))

    @triton.jit
    def _linear_argmax_reduce_kernel(
        best_ptr, id_ptr, sel_ptr, max_ptr, sumexp_ptr, tlogit_ptr, zsum_ptr,  # partials (N, S)
        ids_out, sel_out, lse_out, tlogit_out, zsum_out,                      # (N,)
        N, S,
        HAS_TARGET: tl.constexpr, SUM_Z: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        sp = tl.arange(0, BLOCK_S)
        mask = row_mask[:, None] & (sp[None, :] < S)
        offs = rows[:, None].to(tl.int64) * S + sp[None, :]
        best = tl.load(best_ptr + offs, mask=mask, other=float("-inf"))
        # splits are in increasing id order: the leftmost best split holds the lowest id; a NaN best
        # (a split whose winner is a NaN logit) outranks every number, the leftmost such split first
        is_nan = best != best
        first_nan = tl.min(tl.where(is_nan, sp[None, :], BLOCK_S), axis=1)
        _, arg = tl.max(tl.where(is_nan, float("-inf"), best), axis=1, return_indices=True,
                        return_indices_tie_break_left=True)
        arg = tl.where(first_nan < BLOCK_S, first_nan, arg)
        pick = sp[None, :] == arg[:, None]
        ids = tl.sum(tl.where(pick, tl.load(id_ptr + offs, mask=mask, other=0), 0), axis=1)
        sel = tl.sum(tl.where(pick, tl.load(sel_ptr + offs, mask=mask, other=0.0), 0.0), axis=1)
        m = tl.load(max_ptr + offs, mask=mask, other=float("-inf"))
        s = tl.load(sumexp_ptr + offs, mask=mask, other=0.0)
        m_all = _finite_or_zero(tl.max(m, axis=1))  # every logit -inf: lse = 0 + log(0) = -inf, not NaN
        total = tl.sum(tl.where(mask, s * tl.exp(m - m_all[:, None]), 0.0), axis=1)
        lse = m_all + tl.log(total)
        sel = tl.where(lse != lse, float("nan"), sel)  # NaN logits (ranked as +inf): the max is NaN, as torch's
        tl.store(ids_out + rows, ids.to(tl.int64), mask=row_mask)
        tl.store(sel_out + rows, sel, mask=row_mask)
        tl.store(lse_out + rows, lse, mask=row_mask)
        if HAS_TARGET:
            t = tl.sum(tl.load(tlogit_ptr + offs, mask=mask, other=0.0), axis=1)
            tl.store(tlogit_out + rows, t, mask=row_mask)
        if SUM_Z:
            zs = tl.sum(tl.load(zsum_ptr + offs, mask=mask, other=0.0), axis=1)
            tl.store(zsum_out + rows, zs, mask=row_mask)

    @triton.jit(do_not_specialize=["V", "seed"])
    def _sample_in_group_kernel(
        x_ptr, w_ptr, b_ptr, ids_ptr, sel_ptr,    # x (N, D), w (V, D), bias (V,); ids int64 / sel fp32 (N,)
        V, D, stride_xn, stride_wv, seed, inv_temp,
        HAS_BIAS: tl.constexpr, N_ROUNDS: tl.constexpr, GROUP: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """Level 2 of the two-level draw: one program per row. ``ids`` holds the first id of the
        row's winning group (level 1); recompute that group's logits, draw an id from their softmax by
        Gumbel-max, and overwrite ``ids`` / ``sel`` with it and its un-noised logit ``z[id] / T``."""
        row = tl.program_id(0)
        g_start = tl.load(ids_ptr + row).to(tl.int32)
        offs = tl.arange(0, GROUP)
        cols = g_start + offs
        col_mask = cols < V
        acc = tl.zeros((GROUP,), tl.float32)
        x_row = x_ptr + row.to(tl.int64) * stride_xn
        w_rows = w_ptr + cols[:, None].to(tl.int64) * stride_wv
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            xv = tl.load(x_row + dd, mask=dd < D, other=0.0).to(tl.float32)
            wv = tl.load(w_rows + dd[None, :], mask=col_mask[:, None] & (dd[None, :] < D), other=0.0)
            acc += tl.sum(wv.to(tl.float32) * xv[None, :], axis=1)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        z = tl.where(col_mask, acc * inv_temp, float("-inf"))
        # Gumbel-max inside the group: column j takes word j % 4 at counter (group, row, 1 + j // 4, 0)
        # (level 1 used (group, row, 0, 0)); the 4 words are computed per column, GROUP is small
        grp = tl.zeros((GROUP,), tl.uint32) + (g_start // GROUP).to(tl.uint32)
        zero = tl.zeros((GROUP,), tl.uint32)
        r0, r1, r2, r3 = tl.philox(seed, grp, zero + row.to(tl.uint32), 1 + (offs // 4).to(tl.uint32), zero,
                                   N_ROUNDS)
        word = offs % 4
        bits = tl.where(word == 0, r0, tl.where(word == 1, r1, tl.where(word == 2, r2, r3)))
        score = tl.where(col_mask, z + _gumbel(bits), float("-inf"))
        is_nan = score != score  # a NaN logit outranks every number (+inf too), as in torch.argmax
        first_nan = tl.min(tl.where(is_nan, offs, GROUP), axis=0)
        _, j = tl.max(tl.where(is_nan, float("-inf"), score), axis=0, return_indices=True,
                      return_indices_tie_break_left=True)
        j = tl.where(first_nan < GROUP, first_nan, j)
        tl.store(ids_ptr + row, (g_start + j).to(tl.int64))
        tl.store(sel_ptr + row, tl.sum(tl.where(offs == j, z, 0.0), axis=0))

    def _tma_block_shapes(nargs):
        """Autotune pre-hook: the descriptors' boxes are the config's tiles (also for the pointer
        configs, which ignore them, so their compiled signature does not depend on the config tried last)."""
        if nargs["x_desc"] is not None:
            nargs["x_desc"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_D"]]
            nargs["w_desc"].block_shape = [nargs["BLOCK_V"], nargs["BLOCK_D"]]

    def _gpu_configs():
        # registers / spills from ptxas for sm_90 with the GPU machine's Triton 3.6 (bench/compile_audit.py),
        # argmax mode: (128,128,64) w8 s4 184 regs, (128,256,64) 248, (256,128,64) 240, (64,128,64) 160
        # (3 CTAs / SM), (128,128,64) w4 255 (2 CTAs / SM: one's epilogue overlaps the other's MMAs),
        # (128,64,64) 109 (2 CTAs / SM); none spills.
        # TMA (Hopper, 16-bit operands): (128,128,64) w8 s3 128 regs (sampling capped from 202 by
        # maxnreg, no spill; cross-entropy statistics 4 B) and 98 KB, so two 8-warp CTAs per SM;
        # s4 142 regs, (128,256,64) s3 241, (128,128,128) s3 141.
        cfg = triton.Config

        def ptr(n, v, d, num_warps, num_stages):
            return cfg({"USE_TMA": False, "BLOCK_N": n, "BLOCK_V": v, "BLOCK_D": d}, num_warps=num_warps,
                       num_stages=num_stages, pre_hook=_tma_block_shapes)

        def tma(n, v, d, num_warps, num_stages, maxnreg=None):
            return cfg({"USE_TMA": True, "BLOCK_N": n, "BLOCK_V": v, "BLOCK_D": d}, num_warps=num_warps,
                       num_stages=num_stages, maxnreg=maxnreg, pre_hook=_tma_block_shapes)

        return [
            tma(128, 128, 64, 8, 3, maxnreg=128),
            tma(128, 128, 64, 8, 4),
            tma(128, 256, 64, 8, 3),
            tma(128, 128, 128, 8, 3),
            ptr(128, 128, 64, 8, 4),
            ptr(128, 128, 128, 8, 3),
            ptr(128, 256, 64, 8, 3),
            ptr(256, 128, 64, 8, 3),  # N > 128
            ptr(128, 128, 64, 4, 3),
            ptr(64, 128, 64, 4, 3),
            ptr(128, 64, 64, 8, 3),
            ptr(16, 256, 128, 4, 3),  # N <= 16
            ptr(16, 128, 64, 4, 3),  # N <= 16
        ]

    def _prune(configs, named_args, **kwargs):
        """N <= 16 (a few tokens, memory-bound): only the narrow-row configs; 256-row blocks only for
        N > 128; TMA configs only where the launcher built descriptors (``TMA_OK``). Sampling: tiles
        of one vocabulary group (BLOCK_V = SAMPLE_GROUP). The cross-entropy statistics keep more tiles
        live in the epilogue: there only the configs that neither spill much nor overflow shared
        memory (checked with ptxas for sm_90, bench/compile_audit.py)."""
        def flag(name):
            return bool(kwargs.get(name, named_args.get(name)))

        narrow = named_args["n_bucket"] <= 16
        keep = [c for c in configs if (c.kwargs["BLOCK_N"] == 16) == narrow]
        if not flag("TMA_OK"):
            keep = [c for c in keep if not c.kwargs["USE_TMA"]]
        # 256-row blocks from 256 rows on: at N = 256 one row block streams each W tile once (no reliance
        # on L2 to share it between two 128-row programs) in ~1 program per SM; the autotuner decides
        if named_args["n_bucket"] < 256:
            keep = [c for c in keep if c.kwargs["BLOCK_N"] < 256]
        if flag("SAMPLE"):
            keep = [c for c in keep if c.kwargs["BLOCK_V"] == SAMPLE_GROUP]
        if flag("IEEE_FP32"):  # fp32 operands take twice the shared memory: the small tiles only
            return [c for c in keep if c.kwargs["BLOCK_N"] <= 64 and c.kwargs["BLOCK_V"] <= 128]
        if flag("HAS_TARGET") and not narrow:
            keep = [c for c in keep if c.kwargs["BLOCK_V"] <= 128 and c.kwargs["BLOCK_N"] <= 128]
        return keep

    _linear_argmax_partial_tuned = triton.autotune(
        configs=_gpu_configs(),
        key=["n_bucket", "D", "SAMPLE", "HAS_TARGET", "TMA_OK"],
        prune_configs_by={"early_config_prune": _prune},
    )(_linear_argmax_partial_kernel)


# Block sizes of the interpreter path (CPU tests): tiny so that ragged shapes cross tile edges.
INTERPRETER_BLOCKS = {"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_D": 16}


def _default_splits(n: int, v: int, granule: int, device: torch.device) -> int:
    """Vocabulary splits: one group of ``min(row blocks, GROUP_ROWS)`` row blocks x splits gives
    about two programs per SM (row blocks estimated at 128 rows), so configs that fit two per SM
    have them: small N -> many splits, large N -> 33 on an H100."""
    group = min(cdiv(n, 128), GROUP_ROWS)
    return max(1, min(cdiv(v, granule), 2 * num_sms(device) // group))


def _vocab_chunks(v: int, splits: int, granule: int) -> tuple[int, int]:
    """``(chunk, splits)``: vocabulary columns per split (a multiple of ``granule``) and the number of
    non-empty splits that ``splits`` requested ones give for ``v`` columns."""
    tiles = cdiv(v, granule)
    chunk = cdiv(tiles, max(1, min(splits, tiles))) * granule
    return chunk, cdiv(v, chunk)


def _n_bucket(n: int) -> int:
    """The autotune key's row bucket of ``n`` rows (powers of two up to 8192): one tuning per bucket."""
    return min(next_power_of_2(n), 8192)


def _reduce_blocks(splits: int) -> tuple[int, int]:
    """``(BLOCK_N, BLOCK_S)`` of the reduce pass: all ``splits`` partials of a row in one block,
    rows per program so that a program holds at most 4096 partials."""
    block_s = next_power_of_2(splits)
    return max(1, min(64, 4096 // block_s)), block_s


def check_inputs(x, weight, bias=None, *, gumbel_seed=None, temperature=1.0, any_float: bool = False) -> None:
    """The checks of :func:`linear_argmax` (same arguments); ``any_float``: any floating dtype (what the
    reference takes; ``ops`` checks with it before falling back)."""
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError("x and weight must be torch.Tensors")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (N, dim), got shape {tuple(x.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (V, dim), got shape {tuple(weight.shape)}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight must be (V, dim={x.shape[1]}) to match x {tuple(x.shape)}, got {tuple(weight.shape)}")
    if weight.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"weight must have V >= 1 and dim >= 1, got shape {tuple(weight.shape)}")
    if x.dtype not in _FLOAT_DTYPES and not (any_float and x.is_floating_point()):
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match x dtype {x.dtype}")
    if x.device != weight.device:
        raise ValueError(f"x ({x.device}) and weight ({weight.device}) must be on the same device")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must be (V={weight.shape[0]},), got shape {tuple(bias.shape)}")
        if bias.dtype not in _FLOAT_DTYPES and not (any_float and bias.is_floating_point()):
            raise TypeError(f"bias must be a float tensor, got {bias.dtype}")
        check_devices(x, bias=bias)
    check_decode_args(temperature, gumbel_seed)


# A conservative floor: logits / temperature overflows fp32 below about max|logit| / 3.4e38 (at 1e-38
# for logits of 4 or more: ids from inf - inf, a non-finite logsumexp), and far above that a sample
# is already the argmax. Greedy decoding is the call without a seed.
MIN_TEMPERATURE = 1e-6


def check_decode_args(temperature, gumbel_seed):
    """The scalar arguments, checked by the kernel's entry point and the reference alike."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not MIN_TEMPERATURE <= temperature < math.inf:  # (comparisons, not math.isfinite: they trace symbolically)
        raise ValueError(f"temperature must be finite and >= {MIN_TEMPERATURE:g} (a floor: logits / temperature "
                         f"overflows fp32 near 1e-38, and below the floor a sample is the argmax, the call "
                         f"without a seed), got {temperature}")
    if gumbel_seed is not None:
        if isinstance(gumbel_seed, bool) or not isinstance(gumbel_seed, int):
            raise TypeError(f"gumbel_seed must be an int or None, got {type(gumbel_seed).__name__}")
        if not 0 <= gumbel_seed < 2**63:
            raise ValueError(f"gumbel_seed must be in [0, 2**63), got {gumbel_seed}")


@on_input_device
def _linear_argmax_launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    gumbel_seed: int | None = None,
    temperature: float = 1.0,
    target: torch.Tensor | None = None,
    sum_logits: bool = False,
    num_splits: int | None = None,
    blocks: dict | None = None,
    config=None,
):
    """Run the two Triton passes. Returns ``(ids, sel_logit, lse, target_logit, logit_sum)``.

    ``target`` (N,) int: also return ``logits[row, target[row]]`` (un-tempered; 0 where the target
    is outside ``[0, V)``); ``sum_logits``: also return ``logits[row].sum()``. Both for the
    cross-entropy forward. ``num_splits`` / ``blocks`` (constexprs, 4 warps) / ``config`` (one
    ``triton.Config`` of the autotune list) override the launch configuration (tests;
    ``USE_TMA`` loads through TMA descriptors, which x / weight must allow: ``tma_compatible``).
    """
    n, d = x.shape
    v = weight.shape[0]
    dev = x.device
    if x.stride(1) != 1:
        x = x.contiguous()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    interp = dev.type == "cpu"
    sample = gumbel_seed is not None
    launch = dict(num_warps=4)
    if config is not None:
        blocks = dict(config.kwargs)
        launch = dict(num_warps=config.num_warps, num_stages=config.num_stages)
        if config.maxnreg:
            launch["maxnreg"] = config.maxnreg
    if blocks is None and interp:
        blocks = dict(INTERPRETER_BLOCKS, BLOCK_V=SAMPLE_GROUP) if sample else INTERPRETER_BLOCKS
    use_tma = bool(blocks.get("USE_TMA", False)) if blocks is not None else None  # None: the autotuner's choice
    # (the narrow-row configs the autotuner keeps for N <= 16 all use pointer loads: no descriptors)
    tma_ok = tma_compatible(x, weight) and use_tma is not False and (use_tma or n > 16)
    if use_tma and not tma_ok:
        raise ValueError(f"blocks['USE_TMA'] needs 16-bit x / weight with 16-byte aligned rows on Hopper, got "
                         f"x {x.dtype} strides {x.stride()}, weight strides {weight.stride()}")
    if sample and blocks is not None and blocks["BLOCK_V"] != SAMPLE_GROUP:
        raise ValueError(f"sampling tiles the vocabulary in groups of SAMPLE_GROUP={SAMPLE_GROUP}: "
                         f"blocks['BLOCK_V'] must be {SAMPLE_GROUP}, got {blocks['BLOCK_V']}")
    granule = blocks["BLOCK_V"] if blocks is not None else _GPU_V_GRANULE
    chunk, splits = _vocab_chunks(v, num_splits if num_splits is not None else _default_splits(n, v, granule, dev),
                                  granule)

    f32 = dict(device=dev, dtype=torch.float32)
    # separate allocations: every pointer 16-byte aligned, so one compiled variant serves all N
    best, sel_p, max_p, sum_p = (torch.empty((n, splits), **f32) for _ in range(4))
    id_p = torch.empty((n, splits), device=dev, dtype=torch.int32)
    tl_p = torch.empty((n, splits), **f32) if target is not None else best
    zs_p = torch.empty((n, splits), **f32) if sum_logits else best
    dummy = best
    seed = 0 if gumbel_seed is None else int(gumbel_seed)
    x_desc = w_desc = None
    if tma_ok:  # boxes: the given tiles, else set per config by the autotuner's pre-hook
        bn, bv, bd = (blocks["BLOCK_N"], blocks["BLOCK_V"], blocks["BLOCK_D"]) if blocks is not None else (16, 16, 16)
        x_desc = TensorDescriptor.from_tensor(x, [bn, bd])
        w_desc = TensorDescriptor.from_tensor(weight, [bv, bd])
    args = (
        x, weight, bias if bias is not None else dummy, target if target is not None else id_p, x_desc, w_desc,
        best, id_p, sel_p, max_p, sum_p, tl_p, zs_p,
        n, v, d, chunk, splits, x.stride(0), weight.stride(0),
        seed, 1.0 / float(temperature), _n_bucket(n),
    )
    consts = dict(
        HAS_BIAS=bias is not None, SAMPLE=sample, HAS_TARGET=target is not None,
        SUM_Z=sum_logits, IEEE_FP32=x.dtype == torch.float32, N_ROUNDS=PHILOX_ROUNDS, GROUP_R=GROUP_ROWS,
        TMA_OK=tma_ok,
    )
    if blocks is not None:
        consts["EVEN_D"] = d % blocks["BLOCK_D"] == 0
        grid = (cdiv(n, blocks["BLOCK_N"]) * splits,)
        _linear_argmax_partial_kernel[grid](*args, **consts, **dict(blocks, USE_TMA=bool(use_tma)), **launch)
    else:
        consts["EVEN_D"] = d % 128 == 0
        grid = lambda meta: (cdiv(n, meta["BLOCK_N"]) * splits,)  # noqa: E731
        _linear_argmax_partial_tuned[grid](*args, **consts)

    ids = torch.empty(n, device=dev, dtype=torch.int64)
    out = [torch.empty(n, **f32) for _ in range(4)]
    block_r, block_s = _reduce_blocks(splits)
    _linear_argmax_reduce_kernel[(cdiv(n, block_r),)](
        best, id_p, sel_p, max_p, sum_p, tl_p, zs_p,
        ids, out[0], out[1], out[2], out[3], n, splits,
        HAS_TARGET=target is not None, SUM_Z=sum_logits, BLOCK_N=block_r, BLOCK_S=block_s,
    )
    if sample:  # level 2: the id inside each row's winning group, and its logit
        _sample_in_group_kernel[(n,)](
            x, weight, bias if bias is not None else dummy, ids, out[0],
            v, d, x.stride(0), weight.stride(0), seed, 1.0 / float(temperature),
            HAS_BIAS=bias is not None, N_ROUNDS=PHILOX_ROUNDS, GROUP=SAMPLE_GROUP,
            BLOCK_D=16 if interp else SAMPLE_BLOCK_D, num_warps=4 if interp else SAMPLE_WARPS,
        )
    return ids, out[0], out[1], out[2] if target is not None else None, out[3] if sum_logits else None


def linear_argmax(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    gumbel_seed: int | None = None,
    temperature: float = 1.0,
):
    """Fused ``argmax_v (x @ weight.T + bias)`` (or a sample of ``softmax(logits / temperature)``).

    x (N, dim), weight (V, dim), bias (V,) or None; float16/bfloat16/float32 (x and weight alike).
    Returns ``ids`` int64 (N,), ``max_logit`` fp32 (N,) = ``logits[id] / temperature`` (un-noised),
    ``logsumexp`` fp32 (N,) of ``logits / temperature``. ``gumbel_seed`` (int): return an exact sample
    from ``softmax(logits / temperature)`` via in-kernel Gumbel noise; the same seed gives the same
    ids on any launch configuration. Without a seed the temperature only rescales the two logit
    outputs. Never materialises the ``(N, V)`` logits on the Triton path. Not differentiable (a
    decode); one opaque op (``univigu_fast::linear_argmax``) to ``torch.compile``.
    """
    check_inputs(x, weight, bias, gumbel_seed=gumbel_seed, temperature=temperature)
    if not use_triton(x, weight, bias):
        log_once("linear_argmax: Triton path unavailable (needs CUDA or TRITON_INTERPRET=1), using the reference")
        return linear_argmax_reference(x, weight, bias, gumbel_seed=gumbel_seed, temperature=temperature)
    n = x.shape[0]
    if n == 0:
        e = torch.empty(0, device=x.device, dtype=torch.float32)
        return torch.empty(0, device=x.device, dtype=torch.int64), e, e.clone()
    with torch.no_grad():  # a decode: ids and the two statistics are not differentiable
        return _linear_argmax_op(x, weight, bias, gumbel_seed, float(temperature))


@custom_op("univigu_fast::linear_argmax")
def _linear_argmax_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gumbel_seed: int | None,
                      temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The two (three when sampling) kernel launches as one opaque op: ``torch.compile`` traces a call
    to it, not the launcher's host code (descriptors, autotuner pre-hooks, the interpreter)."""
    ids, sel, lse, _, _ = _linear_argmax_launch(x, weight, bias, gumbel_seed=gumbel_seed, temperature=temperature)
    return ids, sel, lse


@_linear_argmax_op.register_fake
def _(x, weight, bias, gumbel_seed, temperature):
    n = x.shape[0]
    return (x.new_empty(n, dtype=torch.int64), x.new_empty(n, dtype=torch.float32),
            x.new_empty(n, dtype=torch.float32))


class LinearArgmax(torch.nn.Module):
    """Thin module: ``forward(x, weight, bias=None, gumbel_seed=None)`` -> :func:`linear_argmax` at the
    module's temperature."""

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.temperature = temperature

    def forward(self, x, weight, bias=None, gumbel_seed=None):
        return linear_argmax(x, weight, bias, gumbel_seed=gumbel_seed, temperature=self.temperature)
