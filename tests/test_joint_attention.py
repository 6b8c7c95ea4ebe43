"""joint_attention (Triton, interpreter on CPU / compiled on CUDA) against the per-sample SDPA reference."""
import itertools
import math

import pytest
import torch

from univigu_fast.kernels.joint_attention import (
    apply_rope,
    apply_rope_positions,
    apply_rope_reference,
    joint_attention,
    joint_attention_reference,
    rope_tables_from_positions,
)
from univigu_fast.packing import PackedBatch, rope_positions

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled-kernel (bf16) check needs a GPU")


def _cu(lens):
    return torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=DEVICE)


def _rope(T, D, seed, *, interleaved=None):
    g = torch.Generator().manual_seed(seed)
    angles = torch.rand(T, D // 2, generator=g) * 2 * math.pi
    il = torch.rand(T, generator=g) > 0.5 if interleaved is None else torch.full((T,), interleaved)
    return angles.cos().to(DEVICE), angles.sin().to(DEVICE), il.to(DEVICE)


def _inputs(q_lens, k_lens, H, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    Tq, Tk = sum(q_lens), sum(k_lens)
    q, k, v = (torch.randn(T, H, D, generator=g).to(DEVICE, dtype).requires_grad_() for T in (Tq, Tk, Tk))
    return q, k, v, _cu(q_lens), _cu(k_lens)


TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=3e-3, rtol=3e-3)}
# gradients go through one more fp16 rounding (dS, P) and sum over all keys / queries
GRAD_TOL = {torch.float32: TOL[torch.float32], torch.float16: dict(atol=6e-3, rtol=6e-3)}


def _check(q_lens, k_lens, H, D, dtype, rope, seed=0, backend="triton", softmax_scale=None):
    q, k, v, cu_q, cu_k = _inputs(q_lens, k_lens, H, D, dtype, seed)
    rope_q = _rope(q.shape[0], D, seed + 1) if rope else None
    rope_k = _rope(k.shape[0], D, seed + 2) if rope else None
    out = joint_attention(q, k, v, cu_q, cu_k, max(q_lens), max(k_lens), rope_q=rope_q, rope_k=rope_k, backend=backend,
                          softmax_scale=softmax_scale)
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = joint_attention_reference(qf, kf, vf, cu_q, cu_k, max(q_lens), max(k_lens), rope_q=rope_q, rope_k=rope_k,
                                    softmax_scale=softmax_scale)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), ref, **TOL[dtype])
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed + 3)).to(DEVICE)
    got = torch.autograd.grad(out, (q, k, v), grad.to(dtype))
    want = torch.autograd.grad(ref, (qf, kf, vf), grad)
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a.float(), b, **GRAD_TOL[dtype], msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rope", [True, False])
def test_self_attention_ragged(dtype, rope):
    """Lengths 1, 17, 200 (not multiples of any block), mixed interleaved / rotate-half tokens."""
    _check([1, 17, 200], [1, 17, 200], H=2, D=64, dtype=dtype, rope=rope)


def test_q_rope_in_kernel_prologue(monkeypatch):
    """The alternative q-rotation path (inside the forward kernel's prologue) matches too."""
    import univigu_fast.kernels.joint_attention as ja

    monkeypatch.setattr(ja, "ROPE_Q_IN_PROLOGUE", True)
    _check([1, 40], [1, 40], H=1, D=64, dtype=torch.float32, rope=True, seed=11)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rope_in_prologue", [False, True])
def test_split_kv_forward(dtype, rope_in_prologue, monkeypatch):
    """Split-KV forward (few query tiles over long keys, the text-only step's shape): every split
    count, including more splits than key blocks (empty splits) and a sequence with no keys, gives the
    unsplit kernel's output and log-sum-exp, and the reference's output."""
    import univigu_fast.kernels.joint_attention as ja

    monkeypatch.setattr(ja, "ROPE_Q_IN_PROLOGUE", rope_in_prologue)
    q_lens, k_lens, H, D = [20, 5, 0, 7], [600, 0, 130, 257], 2, 32
    q, k, v, cu_q, cu_k = _inputs(q_lens, k_lens, H, D, dtype, seed=4)
    rope_q, rope_k = _rope(q.shape[0], D, 5), _rope(k.shape[0], D, 6)
    with torch.no_grad():
        ref = joint_attention_reference(q.float(), k.float(), v.float(), cu_q, cu_k, 20, 600, rope_q=rope_q,
                                        rope_k=rope_k)
        scale = D ** -0.5
        out1, lse1 = ja._attention_forward(q, k, v, cu_q, cu_k, scale, rope_q, rope_k, num_splits=1)
        for splits in (2, 3, 8):
            out, lse = ja._attention_forward(q, k, v, cu_q, cu_k, scale, rope_q, rope_k, num_splits=splits)
            torch.testing.assert_close(out.float(), ref, **TOL[dtype])
            torch.testing.assert_close(out.float(), out1.float(), **TOL[dtype])
            torch.testing.assert_close(lse, lse1, atol=1e-4, rtol=1e-5)  # +inf for the rows without keys
    assert torch.isinf(lse1[:, 20:25]).all() and (out1[20:25] == 0).all()


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter's check of the GPU tiles (on a GPU: the bf16 tests)")
@pytest.mark.parametrize("inner", [32, 64, 128])
def test_gpu_tile_shapes_in_the_interpreter(inner, monkeypatch):
    """The GPU's tiles in the interpreter, fp16: 128-row query and key tiles (the tile tables) with
    the autotune lists' inner blocks (forward keys 64 / 128, dK/dV queries and dQ keys 32 / 64) over
    sequences shorter and longer than a tile, RoPE on, forward, every gradient and the split-KV
    forward (the other interpreter tests use 32-row tiles)."""
    import univigu_fast.kernels.joint_attention as ja

    monkeypatch.setattr(ja, "_blocks", lambda interp: (ja._FWD_BLOCK_M, ja._KV_BLOCK_N))
    monkeypatch.setattr(ja, "_INTERP_BLOCK", inner)
    lens = [300, 1, 130, 17]
    _check(lens, lens, H=2, D=64, dtype=torch.float16, rope=True, seed=31)
    q, k, v, cu_q, cu_k = _inputs([20, 3], [700, 129], 2, 64, torch.float16, seed=32)
    with torch.no_grad():
        ref = joint_attention_reference(q.float(), k.float(), v.float(), cu_q, cu_k, 20, 700)
        for splits in (1, 3):
            out, _ = ja._attention_forward(q, k, v, cu_q, cu_k, 64 ** -0.5, None, None, num_splits=splits)
            torch.testing.assert_close(out.float(), ref, **TOL[torch.float16])


def test_split_kv_chosen_for_few_query_tiles():
    """The entry point splits the keys by itself when (query tiles x heads) cannot fill the SMs and
    the keys are long; outputs and gradients (the backward reads the merged log-sum-exp) match."""
    import univigu_fast.kernels.joint_attention as ja

    assert ja._kv_splits(1, 700, ja._INTERP_BLOCK, torch.device("cpu")) > 1
    assert ja._kv_splits(64, 700, ja._INTERP_BLOCK, torch.device("cpu")) == 1
    _check([16], [700], H=1, D=32, dtype=torch.float32, rope=True, seed=21)


def test_pick_fastest_times_once_and_remembers():
    """The timing choice behind ``auto`` for few query tiles (and the cross-entropy forward): the
    faster candidate wins, a known key runs nothing again, another key is timed anew."""
    import time

    from univigu_fast.kernels._utils import pick_fastest

    runs = {"slow": 0, "fast": 0}

    def slow():
        runs["slow"] += 1
        time.sleep(0.01)

    def fast():
        runs["fast"] += 1

    choices = {}
    cpu = torch.device("cpu")
    assert pick_fastest(choices, "a", {"slow": slow, "fast": fast}, "test", cpu, repeats=2) == "fast"
    assert runs == {"slow": 3, "fast": 3}  # one untimed warm-up + 2 timed runs each
    assert pick_fastest(choices, "a", {"slow": slow, "fast": fast}, "test", cpu) == "fast"
    assert runs == {"slow": 3, "fast": 3}
    assert pick_fastest(choices, "b", {"fast": slow, "slow": fast}, "test", cpu, repeats=1) == "slow"
    assert choices == {"a": "fast", "b": "slow"}


def test_long_sequence_single_head():
    _check([513], [513], H=1, D=64, dtype=torch.float32, rope=True, seed=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cross_attention_different_lengths(dtype):
    """Queries = joint sequences, keys = prompts of other lengths (one empty), no RoPE; the last sample's
    lengths are exact multiples of the interpreter block (no partial tail block), with a custom scale."""
    _check([17, 40, 1, 32], [5, 0, 33, 64], H=2, D=64, dtype=dtype, rope=False, seed=5, softmax_scale=0.3)


def test_dq_with_very_negative_scores_and_a_partial_key_block():
    """Every score of a row near -900 (lse far below 0) and 5 keys (a partial key block): the dq
    backward must zero the padded keys' probabilities (exp(0 - lse) of a padded key overflowed: NaN dq)."""
    g = torch.Generator().manual_seed(0)
    q = torch.full((3, 1, 16), 30.0, device=DEVICE, requires_grad=True)
    k = (-30.0 * torch.ones(5, 1, 16) + 0.1 * torch.randn(5, 1, 16, generator=g)).to(DEVICE).requires_grad_()
    v = torch.randn(5, 1, 16, generator=g).to(DEVICE).requires_grad_()
    cu_q, cu_k = _cu([3]), _cu([5])
    out = joint_attention(q, k, v, cu_q, cu_k, 3, 5, backend="triton")
    got = torch.autograd.grad(out.sum(), (q, k, v))
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = torch.autograd.grad(joint_attention_reference(*ref, cu_q, cu_k, 3, 5).sum(), ref)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-4)


def test_empty_key_sequence_gives_zeros():
    q, k, v, cu_q, cu_k = _inputs([3, 4], [0, 5], 1, 16, torch.float32)
    out = joint_attention(q, k, v, cu_q, cu_k, 4, 5)
    assert torch.equal(out[:3], torch.zeros_like(out[:3]))


@pytest.mark.parametrize("D", [16, 128])
def test_other_head_dims(D):
    _check([7, 20], [7, 20], H=1, D=D, dtype=torch.float32, rope=True, seed=D)


def test_rope_pairings_match_their_definitions():
    """Interleaved tokens rotate like Wan's complex RoPE; the others like rotate-half."""
    T, H, D = 6, 2, 16
    x = torch.randn(T, H, D)
    cos, sin, _ = (t.cpu() for t in _rope(T, D, 0))
    il = torch.tensor([True] * 3 + [False] * 3)
    out = apply_rope_reference(x, (cos, sin, il))
    angle = torch.atan2(sin, cos)
    wan = torch.view_as_real(torch.view_as_complex(x[:3].reshape(3, H, D // 2, 2)) * torch.polar(torch.ones_like(angle[:3]), angle[:3])[:, None])
    torch.testing.assert_close(out[:3], wan.flatten(-2))
    c, s = torch.cat([cos[3:]] * 2, -1)[:, None], torch.cat([sin[3:]] * 2, -1)[:, None]
    x1, x2 = x[3:, :, : D // 2], x[3:, :, D // 2:]
    torch.testing.assert_close(out[3:], x[3:] * c + torch.cat([-x2, x1], -1) * s)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("D", [16, 64])
def test_rope_kernel_matches_reference(dtype, D):
    """The standalone RoPE kernel (all heads per token block, pairs formed in registers) against the
    reference: tokens of both pairings mixed inside a block, a ragged last block, several heads, a
    strided input; its gradient is the inverse rotation."""
    T, H = 70, 3
    x = torch.randn(T, H + 1, D, generator=torch.Generator().manual_seed(5)).to(DEVICE, dtype)[:, 1:]
    rope = _rope(T, D, 9)
    xr = x.detach().requires_grad_()
    out = apply_rope(xr, rope)
    torch.testing.assert_close(out.float(), apply_rope_reference(x.float(), rope), **TOL[dtype])
    g = torch.randn(T, H, D, generator=torch.Generator().manual_seed(6)).to(DEVICE, dtype)
    (dx,) = torch.autograd.grad(out, xr, g)
    xf = x.detach().float().requires_grad_()
    (want,) = torch.autograd.grad(apply_rope_reference(xf, rope).float(), xf, g.float())
    torch.testing.assert_close(dx.float(), want, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rope_from_positions_matches_tables(dtype):
    """The position-id form (cos / sin computed in the RoPE kernel): its tables are the packed batch's
    (Wan's 3-axis video RoPE, 1-D text RoPE; two samples, one with no text) and the kernel rotates
    as the table form does; malformed position tables are refused."""
    D, H = 64, 3
    inv_freq = 1.0 / 10000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D)
    grids, text_lens = [(2, 3, 5), (1, 4, 3)], [9, 0]
    packed = PackedBatch.build(grids, text_lens, [3, 3], D, inv_freq, DEVICE)
    pos, freq, axis, il = rope_positions(grids, text_lens, D, inv_freq, DEVICE)
    cos, sin, il2 = rope_tables_from_positions(pos, freq, axis, il)
    torch.testing.assert_close(cos, packed.rope[0], atol=1e-6, rtol=0)  # fp32 angles vs float64 tables
    torch.testing.assert_close(sin, packed.rope[1], atol=1e-6, rtol=0)
    assert torch.equal(il2, packed.rope[2])
    x = torch.randn(pos.shape[0], H, D, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    out = apply_rope_positions(x, pos, freq, axis, il)
    torch.testing.assert_close(out.float(), apply_rope_reference(x.float(), packed.rope), **TOL[dtype])
    with pytest.raises(ValueError, match="pos must be contiguous torch.int32"):
        apply_rope_positions(x, pos.long(), freq, axis, il)
    with pytest.raises(ValueError, match=r"freq must be contiguous torch.float32 of shape \(2, 32\)"):
        apply_rope_positions(x, pos, freq[:, :16], axis, il)


def test_compile_traces_without_graph_break():
    q, k, v, cu_q, cu_k = _inputs([5, 9], [5, 9], 1, 16, torch.float32)
    rope = _rope(14, 16, 1)

    def f(q, k, v):
        return joint_attention(q, k, v, cu_q, cu_k, 9, 9, rope_q=rope, rope_k=rope).sum()

    from torch._dynamo.utils import counters

    counters.clear()
    got = torch.compile(f, backend="eager", fullgraph=True)(q, k, v)
    torch.testing.assert_close(got, f(q, k, v))


@pytest.mark.parametrize(
    "cu_q, match",
    [
        (torch.tensor([0, 5, 3, 9], dtype=torch.int32), "non-decreasing"),
        (torch.tensor([0, 4, 9], dtype=torch.int64), "int32"),
        (torch.tensor([0, 4, 8], dtype=torch.int32), "must equal the number of packed tokens 9"),
        (torch.tensor([1, 4, 9], dtype=torch.int32), r"cu_seqlens_q\[0\] must be 0"),
    ],
)
def test_bad_cu_seqlens(cu_q, match):
    q = torch.randn(9, 1, 16, device=DEVICE)
    cu_k = _cu([4, 5]) if cu_q.numel() == 3 else _cu([4, 1, 4])
    with pytest.raises((ValueError, TypeError), match=match):
        joint_attention(q, q, q, cu_q.to(DEVICE), cu_k, 9, 9)


def test_bad_shapes_and_head_dims():
    q = torch.randn(9, 1, 48, device=DEVICE)
    with pytest.raises(ValueError, match="head_dim 48"):
        joint_attention(q, q, q, _cu([9]), _cu([9]), 9, 9)
    q = torch.randn(9, 1, 16, device=DEVICE)
    with pytest.raises(ValueError, match="must be \\(T, H, head_dim\\)"):
        joint_attention(q[0], q, q, _cu([9]), _cu([9]), 9, 9)
    with pytest.raises(TypeError, match="share a dtype"):
        joint_attention(q, q.half(), q.half(), _cu([9]), _cu([9]), 9, 9)
    with pytest.raises(ValueError, match="softmax_scale must be a finite positive number"):
        joint_attention(q, q, q, _cu([9]), _cu([9]), 9, 9, softmax_scale=-1.0)
    with pytest.raises(ValueError, match="same batch size"):
        joint_attention(q, q, q, _cu([9]), _cu([4, 5]), 9, 5)
    with pytest.raises(ValueError, match=r"rope_q.cos must be float32 of shape \(9, 8\)"):
        joint_attention(q, q, q, _cu([9]), _cu([9]), 9, 9, rope_q=_rope(8, 16, 0))
    with pytest.raises(TypeError, match="softmax_scale must be a number or None, got 'x'"):  # float('x') named nothing
        joint_attention(q, q, q, _cu([9]), _cu([9]), 9, 9, softmax_scale="x")
    with pytest.raises(ValueError, match="at least one head"):  # a ZeroDivisionError in the launcher
        joint_attention(q[:, :0], q[:, :0], q[:, :0], _cu([9]), _cu([9]), 9, 9)
    with pytest.raises(TypeError, match="rope must be a tuple"):
        apply_rope(q, None)


def test_rope_positions_refuse_what_the_kernel_would_read_out_of_bounds():
    """``axis`` values index the position columns and ``interleaved`` is read per row: an axis of 5 or -1,
    a short or float ``interleaved`` gave finite numbers from the kernel (the reference raised)."""
    grids, text_lens, D = [(2, 2, 2)], [3], 16
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    pos, freq, axis, il = rope_positions(grids, text_lens, D, inv_freq, DEVICE)
    T = pos.shape[0]
    x = torch.randn(T, 2, D, device=DEVICE)
    for bad, match in ((dict(axis=torch.full_like(axis, 5)), r"axis must hold position columns 0, 1 or 2, got values in \[5, 5\]"),
                       (dict(axis=torch.full_like(axis, -1)), r"got values in \[-1, -1\]"),
                       (dict(interleaved=il[:-2]), rf"interleaved must be contiguous .* of shape \({T},\)"),
                       (dict(interleaved=il.float()), "interleaved must be contiguous"),
                       (dict(x=x[0]), r"x must be a \(T, H, D\) tensor"),
                       (dict(freq=freq.to("meta")), "freq .* must be on x's device")):
        args = dict(x=x, pos=pos, freq=freq, axis=axis, interleaved=il, **{})
        args.update(bad)
        with pytest.raises(ValueError, match=match):
            apply_rope_positions(**args)
    want = apply_rope_reference(x, rope_tables_from_positions(pos, freq, axis, il))
    torch.testing.assert_close(apply_rope_positions(x, pos, freq, axis, il.to(torch.uint8)), want)


def test_bad_max_seqlen_and_devices():
    """max_seqlen must be an int no smaller than the longest sequence (flash-attn's contract; the
    kernels read the lengths from cu_seqlens, so a wrong bound would otherwise pass unnoticed), and
    every table must be on q's device."""
    q, k = torch.randn(12, 2, 16, device=DEVICE), torch.randn(9, 2, 16, device=DEVICE)
    cu_q, cu_k = _cu([5, 7]), _cu([4, 5])
    for mq, mk, exc, match in ((6, 5, ValueError, r"max_seqlen_q = 6 is below the longest sequence in cu_seqlens_q \(7\)"),
                               (7, 4, ValueError, "max_seqlen_k = 4 is below"),
                               (None, 5, TypeError, "max_seqlen_q must be an int, got NoneType"),
                               (7, 5.0, TypeError, "max_seqlen_k must be an int, got float")):
        with pytest.raises(exc, match=match):
            joint_attention(q, k, k, cu_q, cu_k, mq, mk)
    torch.testing.assert_close(joint_attention(q, k, k, cu_q, cu_k, 100, 100),  # a loose bound is fine
                               joint_attention_reference(q, k, k, cu_q, cu_k, 7, 5))
    with pytest.raises(ValueError, match="cu_seqlens_k must be on the device"):
        joint_attention(q, k, k, cu_q, torch.empty(3, dtype=torch.int32, device="meta"), 7, 5)
    with pytest.raises(ValueError, match="q, k, v must be on one device"):
        joint_attention(q, k, k.to("meta"), cu_q, cu_k, 7, 5)


def test_rope_tables_that_need_grad_and_short_tuples():
    """RoPE tables that require grad take the reference (the kernels gave them no gradient); a tuple of
    the wrong length is named with its length."""
    q = torch.randn(12, 2, 16, device=DEVICE, requires_grad=True)
    cu = _cu([5, 7])
    cos, sin, il = _rope(12, 16, seed=3)
    got, want = [], []
    for out, fn in ((got, joint_attention), (want, joint_attention_reference)):
        c = cos.clone().requires_grad_()
        o = fn(q, q, q, cu, cu, 7, 7, rope_q=(c, sin, il), rope_k=(c, sin, il))
        out += [o, *torch.autograd.grad(o.square().sum(), (q, c))]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    with pytest.raises(TypeError, match="rope_q must be a tuple \\(cos, sin, interleaved\\), got a tuple of length 2"):
        joint_attention(q, q, q, cu, cu, 7, 7, rope_q=(cos, sin))


def test_strided_tables_are_refused():
    """cu_seqlens and the RoPE tables are read through raw pointers: a strided view was read as if
    contiguous (errors of 1-6 against the reference), so it is refused by name."""
    q = torch.randn(9, 1, 16, device=DEVICE)
    cu = torch.tensor([0, 0, 4, 0, 9], dtype=torch.int32, device=DEVICE)[::2]
    with pytest.raises(ValueError, match=r"cu_seqlens_q must be contiguous, got strides \(2,\)"):
        joint_attention(q, q, q, cu, _cu([4, 5]), 5, 5)
    cos, sin, il = _rope(9, 16, 0)
    wide = torch.cat([sin, sin], 1)[:, :8]
    for rope, match in (((cos, sin, il.repeat(2)[::2]), r"rope_q.interleaved must be contiguous"),
                        ((cos, sin, torch.ones(1, dtype=torch.bool, device=DEVICE).expand(9)), "interleaved must be contiguous"),
                        ((cos, wide, il), r"rope_q.sin must have cos's strides \(8, 1\), got \(16, 1\)")):
        with pytest.raises(ValueError, match=match):
            joint_attention(q, q, q, _cu([9]), _cu([9]), 9, 9, rope_q=rope, rope_k=_rope(9, 16, 1))
    with pytest.raises(ValueError, match="rope.cos must have unit stride"):  # apply_rope checked nothing
        apply_rope(q, (cos.t().contiguous().t(), sin, il))
    torch.testing.assert_close(apply_rope(q, (cos, sin, il)), apply_rope_reference(q, (cos, sin, il)))


@cuda_only
@pytest.mark.parametrize("q_rope_prologue", [False, True])
def test_cuda_bf16_wan_shape(q_rope_prologue, monkeypatch):
    """bf16 at one wan1.3b-varlen-like batch: error vs fp32 reference at most ~2x that of torch SDPA in bf16."""
    import univigu_fast.kernels.joint_attention as ja

    monkeypatch.setattr(ja, "ROPE_Q_IN_PROLOGUE", q_rope_prologue)
    q_lens = [4096 + 200, 1024 + 0, 777]
    q, k, v, cu_q, cu_k = _inputs(q_lens, q_lens, 12, 128, torch.bfloat16, seed=7)
    rope = _rope(q.shape[0], 128, 9)
    out = joint_attention(q, k, v, cu_q, cu_k, max(q_lens), max(q_lens), rope_q=rope, rope_k=rope, backend="triton")
    ref = joint_attention_reference(q.float(), k.float(), v.float(), cu_q, cu_k, 0, 0, rope_q=rope, rope_k=rope)
    sdpa_bf16 = joint_attention_reference(q, k, v, cu_q, cu_k, 0, 0, rope_q=rope, rope_k=rope)
    err, base = (out.float() - ref).abs().max(), (sdpa_bf16.float() - ref).abs().max()
    assert err <= 2 * base + 1e-3, (err, base)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(13)).to(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    reff = joint_attention_reference(qf, kf, vf, cu_q, cu_k, 0, 0, rope_q=rope, rope_k=rope)
    want = torch.autograd.grad(reff, (qf, kf, vf), grad.float())
    for a, b in zip(got, want):
        rel = (a.float() - b).norm() / b.norm()
        assert rel < 2e-2, rel


@cuda_only
def test_cuda_bf16_text_step_split_kv():
    """bf16, a text-only step's shape (256 queries over 12K keys, 12 heads): the split-KV kernel and
    ``auto`` (which times it against SDPA once) within ~2x torch SDPA's bf16 error."""
    import univigu_fast.kernels.joint_attention as ja

    q, _, _, cu_q, _ = _inputs([256], [256], 12, 128, torch.bfloat16, seed=8)
    _, k, v, _, cu_k = _inputs([12000], [12000], 12, 128, torch.bfloat16, seed=9)
    with torch.no_grad():
        assert ja._kv_splits(2 * 12, 12000, ja._KV_BLOCK_N, q.device) > 1
        ref = joint_attention_reference(q.float(), k.float(), v.float(), cu_q, cu_k, 0, 0)
        base = (joint_attention_reference(q, k, v, cu_q, cu_k, 0, 0).float() - ref).abs().max()
        for backend in ("triton", "auto"):
            out = joint_attention(q, k, v, cu_q, cu_k, 256, 12000, backend=backend)
            assert (out.float() - ref).abs().max() <= 2 * base + 1e-3, backend


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_backends_agree_with_reference(backend):
    """Both backends (our kernel; our RoPE + per-sample SDPA) match the reference, gradients included."""
    q, k, v, cu_q, cu_k = _inputs([9, 30], [9, 30], 2, 32, torch.float32, seed=21)
    rope = _rope(39, 32, 4)
    out = joint_attention(q, k, v, cu_q, cu_k, 30, 30, rope_q=rope, rope_k=rope, backend=backend)
    qf, kf, vf = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref = joint_attention_reference(qf, kf, vf, cu_q, cu_k, 30, 30, rope_q=rope, rope_k=rope)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(17)).to(ref)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (qf, kf, vf), g)):
        torch.testing.assert_close(a, b, **TOL[torch.float32])
    with pytest.raises(ValueError, match="backend must be one of"):
        joint_attention(q, k, v, cu_q, cu_k, 30, 30, backend="flash")


def test_split_kv_output_keeps_q_layout_as_the_registered_fake():
    """Few query rows over many keys take the split-KV path; its output has q's layout (a permuted,
    dense q here), as the op's fake says, so torch.compile's stride assertions hold, and the values
    match the reference."""
    from univigu_fast.kernels import joint_attention as ja

    torch.manual_seed(0)
    H, D, Tq, Tk = 2, 16, 8, 256
    q = torch.randn(H, Tq, D, device=DEVICE).transpose(0, 1)  # (Tq, H, D), strides (D, Tq * D, 1)
    k, v = torch.randn(Tk, H, D, device=DEVICE), torch.randn(Tk, H, D, device=DEVICE)
    cu_q = torch.tensor([0, Tq], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, Tk], dtype=torch.int32, device=DEVICE)
    assert ja._kv_splits(H, Tk, ja._blocks(ja.interpreting())[1], q.device) > 1  # the path under test
    args = (q, k, v, cu_q, cu_k, 0.25, None, None, None, None, None, None)
    out, _ = ja._joint_attention_fwd_op.op(*args)
    assert out.stride() == q.stride()
    torch.library.opcheck(ja._joint_attention_fwd_op.op, args, test_utils=("test_faketensor",))
    torch.testing.assert_close(out, joint_attention_reference(q, k, v, cu_q, cu_k, Tq, Tk, softmax_scale=0.25),
                               atol=2e-5, rtol=2e-5)


def test_samples_without_keys_stay_differentiable_in_the_reference():
    """Queries of a sample with no keys attend to nothing: zeros (flash-attn's convention), with zero
    gradients. The reference wrote constant zeros: with no sample having both, its output did not
    require grad and ``autograd.grad`` failed; the kernel's gives zeros."""
    q, k, v, cu_q, cu_k = _inputs([3, 0], [0, 4], 2, 64, torch.float32)
    for attention in (joint_attention_reference, joint_attention):
        out = attention(q, k, v, cu_q, cu_k, 3, 4)
        assert out.requires_grad and not out.any()
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        assert all(not g.any() for g in grads)


def test_reference_rope_takes_the_uint8_and_int8_flags_the_kernel_takes():
    """``interleaved`` may be bool, uint8 or int8 (the kernels read ``!= 0``); the reference, also every
    fallback's path, raised torch's "where expected condition to be a boolean tensor" for int8."""
    cos, sin, il = _rope(6, 64, seed=2)
    x = torch.randn(6, 2, 64, device=DEVICE)
    want = apply_rope_reference(x, (cos, sin, il))
    for dtype in (torch.uint8, torch.int8):
        torch.testing.assert_close(apply_rope_reference(x, (cos, sin, il.to(dtype))), want, rtol=0, atol=0)
        torch.testing.assert_close(apply_rope(x, (cos, sin, il.to(dtype))), want, **TOL[torch.float32])
