"""Benchmark: joint varlen attention, one layer's self-attention at the DESIGN §6 shapes.

Records op ``joint_attention``, modes ``fwd`` / ``fwd_bwd``, impls:
``triton`` (our FlashAttention kernel, packed, RoPE fused), ``triton_qprologue`` (the same with q
rotated inside the forward kernel's prologue instead of by the RoPE kernel; forward only), ``auto`` (our entry point's default on
CUDA: Triton RoPE kernel + per-sample SDPA, RoPE inside the timing), ``naive`` (padded SDPA with a key-padding mask, the public
implementation's way), ``sdpa`` (per-sample SDPA, best backend), ``varlen``
(``torch.nn.attention.varlen.varlen_attn`` where present), ``flex`` (FlexAttention with a document
mask, compiled), ``flash_attn`` (``flash_attn_varlen_func`` where installed).
Those peers get pre-rotated q/k (a conservative comparison: only ours applies RoPE inside the timed
call); ``sdpa_rope`` is the like-for-like peer: the RoPE reference compiled with ``torch.compile``
(one fused pass over q and k) + per-sample SDPA, what a user without this library would run.
TFLOP/s count real work only: ``4 * sum(L_i^2) * H * hd`` forward, 3.5x that fwd+bwd.

Shape ``wan1.3b-480p-textstep`` (mode ``fwd``): a text-only step's self-attention with the video
cache (issue 8): the 256 text queries over all 33,016 joint keys, already rotated (the cache keeps
rotated keys). Impls ``triton`` (split-KV: too few query tiles to fill the GPU otherwise),
``triton_nosplit`` (the same kernel, one program per (query tile, head)), ``sdpa``, ``auto``.

Op ``rope`` (mode ``fwd``): the RoPE pass of q and k as the ``auto`` backend runs it, with the
angles given as per-token cos / sin tables (impl ``tables``, the library's form) or computed in the
kernel from position ids (impl ``position_ids``): the issue's "measure which is faster".
``bytes_moved`` = q and k read and written (the tables' or ids' bytes on top are what differs).
"""
import pytest
import torch
import torch.nn.functional as F

from _common import measure, requires_cuda
from univigu_fast.kernels._utils import remember_host_values
from univigu_fast.shapes import SHAPES

DTYPE = torch.bfloat16
_CACHE: dict = {}


def _packed(shape_name: str):
    """``(packed, grids, text_inv_freq)`` of a DESIGN §6 shape: the model's packing (video grids,
    per-token RoPE tables, cu_seqlens) on the GPU."""
    from univigu_fast.config import UniViGUConfig
    from univigu_fast.modeling import TextRope
    from univigu_fast.packing import PackedBatch
    from univigu_fast.profiling import video_grid

    s = SHAPES[shape_name]
    grids = [video_grid(lv, shape_name, i) for i, lv in enumerate(s.video_lens)]
    inv_freq = TextRope(s.head_dim, UniViGUConfig.text_rope_base).inv_freq  # the model's (default base)
    packed = PackedBatch.build(grids, s.text_lens, [s.prompt_len] * s.batch, s.head_dim, inv_freq, "cuda")
    return packed, grids, inv_freq


def _inputs(shape_name: str):
    if _CACHE.get("key") == shape_name:
        return _CACHE
    _CACHE.clear()
    torch.cuda.empty_cache()
    s = SHAPES[shape_name]
    lens = list(s.seq_lens)
    T, H, hd = sum(lens), s.num_heads, s.head_dim
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(T, H, hd, device="cuda", dtype=DTYPE, generator=g) for _ in range(3))
    packed = _packed(shape_name)[0]
    rope, cu = packed.rope, packed.cu_seqlens
    _CACHE.update(key=shape_name, q=q, k=k, v=v, rope=rope, cu=cu, lens=lens, H=H, hd=hd,
                  flops=4 * sum(L * L for L in lens) * H * hd)
    return _CACHE


def _impl(name, c):
    """Returns f(q, k, v) -> out for one impl (None where the peer is unavailable)."""
    cu, lens, rope = c["cu"], c["lens"], c["rope"]
    L = max(lens)
    if name == "triton":
        from univigu_fast.kernels.joint_attention import joint_attention

        return lambda q, k, v: joint_attention(q, k, v, cu, cu, L, L, rope_q=rope, rope_k=rope, backend="triton")
    if name == "triton_qprologue":  # the same kernel with q rotated in its prologue (forward only)
        import univigu_fast.kernels.joint_attention as ja

        def prologue(q, k, v):
            ja.ROPE_Q_IN_PROLOGUE = True
            try:
                return ja.joint_attention(q, k, v, cu, cu, L, L, rope_q=rope, rope_k=rope, backend="triton")
            finally:
                ja.ROPE_Q_IN_PROLOGUE = False
        return prologue
    if name == "auto":
        from univigu_fast.kernels.joint_attention import joint_attention

        return lambda q, k, v: joint_attention(q, k, v, cu, cu, L, L, rope_q=rope, rope_k=rope, backend="auto")
    if name in ("sdpa", "sdpa_rope"):
        bounds = list(zip(cu.tolist()[:-1], cu.tolist()[1:]))

        def per_sample(q, k, v):
            return torch.cat([F.scaled_dot_product_attention(q[a:b].transpose(0, 1)[None], k[a:b].transpose(0, 1)[None],
                                                             v[a:b].transpose(0, 1)[None])[0].transpose(0, 1)
                              for a, b in bounds])
        if name == "sdpa":
            return per_sample
        from univigu_fast.kernels.joint_attention import apply_rope_reference

        rotate = torch.compile(apply_rope_reference, dynamic=False)
        return lambda q, k, v: per_sample(rotate(q, rope), rotate(k, rope), v)
    if name == "naive":
        B = len(lens)
        bounds = list(zip(cu.tolist()[:-1], cu.tolist()[1:]))
        key_ok = torch.zeros(B, L, dtype=torch.bool, device="cuda")
        for i, n in enumerate(lens):
            key_ok[i, :n] = True
        mask = key_ok[:, None, None, :]

        def padded(q, k, v):
            def pad(x):
                return torch.stack([F.pad(x[a:b], (0, 0, 0, 0, 0, L - (b - a))) for a, b in bounds]).transpose(1, 2)
            o = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=mask).transpose(1, 2)
            return torch.cat([o[i, : b - a] for i, (a, b) in enumerate(bounds)])
        return padded
    if name == "varlen":
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:
            return None
        return lambda q, k, v: varlen_attn(q, k, v, cu, cu, L, L)
    if name == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        doc = torch.repeat_interleave(torch.arange(len(lens), device="cuda"), torch.tensor(lens, device="cuda"))
        T = doc.numel()
        block_mask = create_block_mask(lambda b, h, qi, ki: doc[qi] == doc[ki], None, None, T, T, device="cuda")
        flex = torch.compile(flex_attention, dynamic=False)
        return lambda q, k, v: flex(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                    block_mask=block_mask)[0].transpose(0, 1)
    if name == "flash_attn":
        try:
            from flash_attn import flash_attn_varlen_func
        except ImportError:
            return None
        return lambda q, k, v: flash_attn_varlen_func(q, k, v, cu, cu, L, L)
    raise ValueError(name)


IMPLS = ["triton", "triton_qprologue", "auto", "naive", "sdpa", "sdpa_rope", "varlen", "flex", "flash_attn"]


@requires_cuda
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("shape", ["wan1.3b-480p", "wan1.3b-varlen", "wan14b-720p"])
def test_bench_joint_attention(benchmark, shape, mode, impl):
    c = _inputs(shape)
    if impl == "naive" and shape == "wan14b-720p" and mode == "fwd_bwd":
        pytest.skip("padded SDPA with a mask at 75,856 tokens x 40 heads: fwd+bwd exceeds the bench budget")
    if impl == "triton_qprologue" and mode == "fwd_bwd":
        pytest.skip("q-rotation placement only changes the forward kernel")
    try:
        fn = _impl(impl, c)
        if fn is None:
            pytest.skip(f"{impl} is not available in this environment")
        q, k, v = (c[n].detach().requires_grad_(mode == "fwd_bwd") for n in "qkv")
        grad = torch.randn_like(q)
        if mode == "fwd":
            def run():
                with torch.no_grad():
                    return fn(q, k, v)
        else:
            def run():
                fn(q, k, v).backward(grad)
        run()
        torch.cuda.synchronize()
    except Exception as e:  # one failing peer must not stop the others
        torch.cuda.empty_cache()
        pytest.skip(f"{impl} failed: {type(e).__name__}: {str(e)[:200]}")
    flops = c["flops"] * (3.5 if mode == "fwd_bwd" else 1.0)
    try:
        measure(benchmark, run, op="joint_attention", shape=shape, mode=mode, impl=impl, dtype=DTYPE,
                flops=flops, rounds=5, warmup_rounds=1)
    except torch.cuda.OutOfMemoryError as e:  # record nothing for this impl; the others go on
        torch.cuda.empty_cache()
        pytest.skip(f"{impl} ran out of memory: {str(e)[:200]}")


@requires_cuda
@pytest.mark.parametrize("form", ["tables", "position_ids"])
@pytest.mark.parametrize("shape", ["wan1.3b-480p", "wan1.3b-varlen", "wan14b-720p"])
def test_bench_rope_form(benchmark, shape, form):
    from univigu_fast.kernels.joint_attention import apply_rope, apply_rope_positions
    from univigu_fast.packing import rope_positions

    s = SHAPES[shape]
    hd = s.head_dim
    packed, grids, inv_freq = _packed(shape)
    positions = rope_positions(grids, s.text_lens, hd, inv_freq, "cuda")
    T = packed.total
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k = (torch.randn(T, s.num_heads, hd, device="cuda", dtype=DTYPE, generator=g) for _ in range(2))
    if form == "tables":
        def run():
            return apply_rope(q, packed.rope), apply_rope(k, packed.rope)
    else:
        def run():
            return apply_rope_positions(q, *positions), apply_rope_positions(k, *positions)
    with torch.no_grad():
        measure(benchmark, run, op="rope", shape=shape, mode="fwd", impl=form, dtype=DTYPE,
                bytes_moved=4 * q.numel() * q.element_size(), rounds=20, warmup_rounds=2)


@requires_cuda
@pytest.mark.parametrize("impl", ["triton", "triton_nosplit", "sdpa", "auto"])
def test_bench_text_step_attention(benchmark, impl):
    import univigu_fast.kernels.joint_attention as ja

    s = SHAPES["wan1.3b-480p"]
    H, hd, lq, lk = s.num_heads, s.head_dim, s.text_lens[0], s.seq_lens[0]
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(lq, H, hd, device="cuda", dtype=DTYPE, generator=g)
    k, v = (torch.randn(lk, H, hd, device="cuda", dtype=DTYPE, generator=g) for _ in range(2))
    # host copies of the tables, as the model's packer keeps them: no device-to-host sync inside the timed call
    cu_q = remember_host_values(torch.tensor([0, lq], dtype=torch.int32, device="cuda"), [0, lq])
    cu_k = remember_host_values(torch.tensor([0, lk], dtype=torch.int32, device="cuda"), [0, lk])
    if impl == "triton_nosplit":
        def run():
            return ja._attention_forward(q, k, v, cu_q, cu_k, hd ** -0.5, None, None, num_splits=1)[0]
    else:
        backend = "triton" if impl == "triton" else impl

        def run():
            return ja.joint_attention(q, k, v, cu_q, cu_k, lq, lk, backend=backend)
    with torch.no_grad():
        measure(benchmark, run, op="joint_attention", shape="wan1.3b-480p-textstep", mode="fwd", impl=impl,
                dtype=DTYPE, flops=4 * lq * lk * H * hd, rounds=20, warmup_rounds=2)
