"""modality_ffn (grouped GEMMs; interpreter on CPU, compiled on CUDA) against the split + dense reference."""
import itertools

import pytest
import torch

from univigu_fast.kernels.modality_ffn import ModalityFFN, modality_ffn, modality_ffn_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=1e-2, rtol=1e-2)}


def _case(lens, experts_of, dim, inner, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    seg = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=DEVICE)
    seg_expert = torch.tensor(experts_of, dtype=torch.int32, device=DEVICE)
    T = sum(lens)

    def r(*shape, s=1.0):
        return (s * torch.randn(*shape, generator=g)).to(DEVICE, dtype).requires_grad_()

    experts = [[r(f, dim, s=dim**-0.5), r(f, s=0.1), r(dim, f, s=f**-0.5), r(dim, s=0.1)] for f in inner]
    return r(T, dim), seg, seg_expert, experts, r(T, dim), r(len(lens), dim)


def _compare(x, seg, seg_expert, experts, residual, gate, dtype):
    out = modality_ffn(x, seg, seg_expert, experts, residual=residual, gate=gate)
    f32 = lambda t: None if t is None else t.detach().float().requires_grad_()  # noqa: E731
    rx, rres, rgate = f32(x), f32(residual), f32(gate)
    rexp = [[f32(t) for t in e] for e in experts]
    ref = modality_ffn_reference(rx, seg, seg_expert, rexp, residual=rres, gate=rgate)
    torch.testing.assert_close(out.float(), ref, **TOL[dtype])
    grad = torch.randn_like(ref)
    ins = [t for t in (x, residual, gate) if t is not None] + [t for e in experts for t in e]
    rins = [t for t in (rx, rres, rgate) if t is not None] + [t for e in rexp for t in e]
    got = torch.autograd.grad(out, ins, grad.to(out.dtype), allow_unused=True)
    want = torch.autograd.grad(ref, rins, grad, allow_unused=True)
    for a, b, t in zip(got, want, rins):
        a = torch.zeros_like(t) if a is None else a  # an expert with no tokens gets zero gradients
        b = torch.zeros_like(t) if b is None else b
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, **TOL[dtype])
        else:  # half-precision weight gradients sum hundreds of rounded products: compare relative norms
            assert (a.float() - b).norm() <= 5e-3 * b.norm() + 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("gated", [True, False])
def test_ragged_segments_two_experts(dtype, gated):
    """Segments of 0, 1, 17, 255 tokens over three samples; experts with different inner sizes;
    dim not a multiple of the blocks."""
    lens = [255, 17, 0, 1, 17, 0]
    x, seg, seg_expert, experts, residual, gate = _case(lens, [0, 1, 0, 1, 0, 1], dim=40, inner=(72, 24), dtype=dtype)
    _compare(x, seg, seg_expert, experts, residual if gated else None, gate if gated else None, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_recompute_preactivation_backward(dtype, monkeypatch):
    """The recompute strategy (nothing (T, F)-sized saved) gives the same values and gradients."""
    import univigu_fast.kernels.modality_ffn as mod

    monkeypatch.setattr(mod, "RECOMPUTE_PREACTIVATION", True)
    x, seg, seg_expert, experts, residual, gate = _case([33, 1, 0, 40], [0, 1, 0, 1], dim=24, inner=(40, 56), dtype=dtype, seed=2)
    _compare(x, seg, seg_expert, experts, residual, gate, dtype)


@pytest.mark.parametrize("gated", [True, False])
def test_tma_loads_match_reference(gated, monkeypatch):
    """The USE_TMA configs (Hopper, 16-bit) read A and each expert's weight through TMA descriptors,
    zero-filled past their ends: ragged segments (0, 1, 17, 100 tokens), experts of different inner
    sizes, dims not multiples of the tiles. Forward and every gradient match the reference."""
    import univigu_fast.kernels.modality_ffn as mod

    monkeypatch.setattr(mod, "_INTERP_BLOCKS", dict(mod._INTERP_BLOCKS, USE_TMA=True))
    lens = [100, 17, 0, 1, 17, 0]
    x, seg, seg_expert, experts, residual, gate = _case(lens, [0, 1, 0, 1, 0, 1], dim=48, inner=(80, 32),
                                                        dtype=torch.float16, seed=3)
    _compare(x, seg, seg_expert, experts, residual if gated else None, gate if gated else None, torch.float16)
    with pytest.raises(ValueError, match="USE_TMA"):  # 40-byte rows: no descriptor possible, refused
        modality_ffn(*_case([5], [0], dim=20, inner=(32,), dtype=torch.float16)[:4])


@pytest.mark.parametrize("use_tma", [False, True])
def test_each_expert_reads_only_its_columns(use_tma, monkeypatch):
    """A (T, K_max) holds expert 1's rows in only its K_1 < K_max columns (the rest unwritten memory,
    here NaN, as dP in the backward): both load paths stop at K_e, no NaN * 0 leaks into the result."""
    import univigu_fast.kernels.modality_ffn as mod

    monkeypatch.setattr(mod, "_INTERP_BLOCKS", dict(mod._INTERP_BLOCKS, USE_TMA=use_tma))
    g = torch.Generator().manual_seed(4)
    seg = torch.tensor([0, 40, 49], dtype=torch.int32, device=DEVICE)
    seg_expert = torch.tensor([0, 1], dtype=torch.int32, device=DEVICE)
    a = torch.randn(49, 64, generator=g).half()
    a[40:, 48:] = float("nan")
    w0, w1 = torch.randn(32, 64, generator=g).half(), torch.randn(32, 48, generator=g).half()
    plan = mod._Plan(seg, seg_expert, [0, 40, 49], 32)
    out = mod._grouped_gemm(plan, a.to(DEVICE), [w0.to(DEVICE), w1.to(DEVICE)], [None, None], True, 32,
                            epilogue=mod.EPI_NONE)
    want = torch.cat([a[:40].float() @ w0.float().t(), a[40:, :48].float() @ w1.float().t()])
    torch.testing.assert_close(out.float().cpu(), want, **TOL[torch.float16])


def test_block_multiple_dims_and_single_expert_segments():
    x, seg, seg_expert, experts, residual, gate = _case([64, 32], [1, 1], dim=64, inner=(64, 128), dtype=torch.float32, seed=1)
    _compare(x, seg, seg_expert, experts, None, gate, torch.float32)
    # expert 0 has no rows: its weights get no gradient (None, as autograd gives an unused parameter), not
    # zeros, which AdamW's weight decay and momentum would still move (_compare reads None as zeros)
    out = modality_ffn(x, seg, seg_expert, experts, gate=gate)
    grads = torch.autograd.grad(out.square().sum(), [*experts[0], *experts[1]], allow_unused=True)
    assert all(g is None for g in grads[:4]) and all(g is not None for g in grads[4:])


def test_module_names_and_forward():
    m = ModalityFFN(16, 32).to(DEVICE)
    assert list(m.state_dict()) == ["ffn.net.0.proj.weight", "ffn.net.0.proj.bias", "ffn.net.2.weight", "ffn.net.2.bias",
                                    "ffn_t.net.0.proj.weight", "ffn_t.net.0.proj.bias", "ffn_t.net.2.weight", "ffn_t.net.2.bias"]
    x = torch.randn(9, 16, device=DEVICE)
    seg = torch.tensor([0, 6, 9], dtype=torch.int32, device=DEVICE)
    se = torch.tensor([0, 1], dtype=torch.int32, device=DEVICE)
    torch.testing.assert_close(m(x, seg, se)[:6], m.ffn(x[:6]), **TOL[torch.float32])
    torch.testing.assert_close(m(x, seg, se)[6:], m.ffn_t(x[6:]), **TOL[torch.float32])


def test_compile_traces_without_graph_break():
    x, seg, seg_expert, experts, residual, gate = _case([5, 3], [0, 1], dim=16, inner=(32, 32), dtype=torch.float32)

    def f(x, residual, gate):
        return modality_ffn(x, seg, seg_expert, experts, residual=residual, gate=gate)

    got = torch.compile(f, backend="eager", fullgraph=True)(x, residual, gate)
    torch.testing.assert_close(got, f(x, residual, gate))
    # traced, the table's values are not read (a sync), but its layout still is checked
    strided = seg.repeat_interleave(2)[::2]
    with pytest.raises(Exception, match="seg_offsets must be contiguous"):
        torch.compile(lambda x: modality_ffn(x, strided, seg_expert, experts), backend="eager", fullgraph=True)(x)


def test_bad_segment_tables_and_dims():
    x, seg, seg_expert, experts, residual, gate = _case([5, 3], [0, 1], dim=16, inner=(32, 32), dtype=torch.float32)
    T = x.shape[0]
    bad = [
        (torch.tensor([0, 6, 5, T], dtype=torch.int32), torch.tensor([0, 1, 0], dtype=torch.int32), ValueError, "non-decreasing"),
        (torch.tensor([0, 5, T + 2], dtype=torch.int32), seg_expert, ValueError, "must equal the number of tokens"),
        (seg.long(), seg_expert, TypeError, "int32"),
        (seg, torch.tensor([0, 2], dtype=torch.int32), ValueError, "expert ids"),
        (seg, seg_expert.long(), TypeError, "seg_expert must be an int32"),
        (seg, torch.tensor([0], dtype=torch.int32), ValueError, "one expert per segment"),
        # read through raw pointers: strided views gave errors of ~2 (and out-of-bounds writes)
        (seg.repeat_interleave(2)[::2], seg_expert, ValueError, "seg_offsets must be contiguous"),
        (seg, seg_expert.repeat_interleave(2)[::2], ValueError, "seg_expert must be contiguous"),
    ]
    for s, se, exc, match in bad:
        with pytest.raises(exc, match=match):
            modality_ffn(x, s.to(DEVICE), se.to(DEVICE), experts)
    with pytest.raises(ValueError, match="do not match"):
        modality_ffn(x[:, :15], seg, seg_expert, experts)
    no_bias = [(w1, None, w2, None) for w1, _, w2, _ in experts]  # nn.Linear(bias=False): an AttributeError before
    with pytest.raises(TypeError, match=r"experts\[0\] b1 must be a tensor, got NoneType .*pass zeros"):
        modality_ffn(x, seg, seg_expert, no_bias)
    for kw, name in ((dict(gate=gate.to("meta")), "gate"), (dict(residual=residual.to("meta")), "residual"),
                     (dict(residual=1.0), "residual")):
        with pytest.raises((ValueError, TypeError), match=rf"{name} (\(meta\) must be on x's device|must be a tensor)"):
            modality_ffn(x, seg, seg_expert, experts, **kw)
    with pytest.raises(ValueError, match=r"experts\[1\] w2 \(meta\) must be on x's device"):
        modality_ffn(x, seg, seg_expert, [experts[0], (*experts[1][:2], experts[1][2].to("meta"), experts[1][3])])
    with pytest.raises(ValueError, match="gate must be"):
        modality_ffn(x, seg, seg_expert, experts, gate=gate[:1])
    with pytest.raises(ValueError, match="residual must be"):
        modality_ffn(x, seg, seg_expert, experts, residual=residual[:, :8])
    with pytest.raises(ValueError, match=r"x must be a \(T, dim\)"):
        modality_ffn(x[:, 0], seg, seg_expert, experts)
    with pytest.raises(TypeError, match="must match x.dtype"):
        modality_ffn(x, seg, seg_expert, [[t.half() for t in e] for e in experts])
    with pytest.raises(TypeError, match="x must be float16, bfloat16 or float32, got torch.int64"):
        modality_ffn(x.long(), seg, seg_expert, [[t.long() for t in e] for e in experts])
    for kw, name in ((dict(residual=residual.int()), "residual"), (dict(gate=gate.int()), "gate")):
        # an int residual made the output int (truncated); an int gate was accepted too
        with pytest.raises(TypeError, match=f"{name} must be float16, bfloat16 or float32, got torch.int32"):
            modality_ffn(x, seg, seg_expert, experts, **kw)
    meta = torch.empty(3, dtype=torch.int32, device="meta")
    with pytest.raises(ValueError, match="seg_offsets must be on the data's device"):
        modality_ffn(x, meta, seg_expert, experts)
    with pytest.raises(ValueError, match="seg_expert must be on x's device"):
        modality_ffn(x, seg, meta[:2], experts)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled-kernel (bf16) check needs a GPU")
def test_cuda_bf16_wan_480p():
    """bf16 at wan1.3b-480p (32,760 video + 256 text tokens, dim 1536, ffn 8960): error vs an fp32
    reference at most ~2x that of the same computation done by PyTorch in bf16."""
    lens = [32760, 256]
    x, seg, seg_expert, experts, residual, gate = _case(lens, [0, 1], dim=1536, inner=(8960, 8960), dtype=torch.bfloat16)
    with torch.no_grad():
        out = modality_ffn(x, seg, seg_expert, experts, residual=residual, gate=gate).float()
        ref32 = modality_ffn_reference(x.float(), seg, seg_expert, [[t.float() for t in e] for e in experts],
                                       residual=residual.float(), gate=gate.float())
        ref16 = modality_ffn_reference(x, seg, seg_expert, experts, residual=residual, gate=gate).float()
    err, base = (out - ref32).abs().max(), (ref16 - ref32).abs().max()
    assert err <= 2 * base + 1e-2, (err, base)
    xs = x[:4096 + 256].detach().requires_grad_()
    seg2 = torch.tensor([0, 4096, 4096 + 256], dtype=torch.int32, device=DEVICE)
    _compare_bf16_grads(xs, seg2, seg_expert, experts)


def _compare_bf16_grads(x, seg, seg_expert, experts):
    out = modality_ffn(x, seg, seg_expert, experts)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, experts[0][0], experts[1][2]], g)
    xf = x.detach().float().requires_grad_()
    ef = [[t.detach().float().requires_grad_() for t in e] for e in experts]
    ref = modality_ffn_reference(xf, seg, seg_expert, ef)
    want = torch.autograd.grad(ref, [xf, ef[0][0], ef[1][2]], g.float())
    for a, b in zip(got, want):
        assert ((a.float() - b).norm() / b.norm()) < 2e-2


def _gpu_tiles():
    """The GPU's tile shapes: every autotune config on 128-row M tiles, and the small-problem config
    on its 64-row tiles."""
    import univigu_fast.kernels.modality_ffn as mod

    tiles = [dict(c.kwargs, BLOCK_M=mod._GPU_BLOCK_M) for c in mod._gemm_configs()]
    return tiles + [dict(mod._SMALL_CONFIG, BLOCK_M=mod._SMALL_BLOCK_M)]


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter's check of the GPU tiles (on a GPU: the bf16 test below)")
@pytest.mark.parametrize("tiles", _gpu_tiles(), ids=lambda t: "m{BLOCK_M}n{BLOCK_N}k{BLOCK_K}{tma}".format(
    **t, tma="-tma" if t["USE_TMA"] else ""))
def test_gpu_tile_shapes_in_the_interpreter(tiles, monkeypatch):
    """The GPU configs' tile shapes (128 x 256 output tiles, 128-row M tiles over ragged segments,
    TMA boxes) run in the interpreter, fp16, forward with the gated residual and every gradient:
    segments shorter and longer than a tile, dims and inner sizes that are not multiples of the tiles
    (the interpreter tests elsewhere use 32-wide tiles)."""
    import univigu_fast.kernels.modality_ffn as mod

    monkeypatch.setattr(mod, "_INTERP_BLOCKS", tiles)
    lens = [300, 17, 0, 1, 130]
    x, seg, seg_expert, experts, residual, gate = _case(lens, [0, 1, 0, 1, 1], dim=200, inner=(264, 136),
                                                        dtype=torch.float16, seed=7)
    _compare(x, seg, seg_expert, experts, residual, gate, torch.float16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled-kernel (bf16) check needs a GPU")
def test_every_gpu_config_bf16(monkeypatch):
    """Each config of the autotune list (TMA and pointer loads; the autotuner may pick any) on all
    four GEMMs: a shape where every one takes the autotuned path (T * N_max >= _SMALL_PROBLEM)."""
    import triton

    import univigu_fast.kernels.modality_ffn as mod

    x, seg, seg_expert, experts, _, _ = _case([8000, 300], [0, 1], dim=512, inner=(2048, 1024), dtype=torch.bfloat16)
    assert 8300 * 512 >= mod._SMALL_PROBLEM
    tuned = mod._grouped_gemm_tuned
    for cfg in mod._gemm_configs():
        if cfg.kwargs["USE_TMA"] and torch.cuda.get_device_capability()[0] < 9:
            continue
        one_config = triton.autotune([cfg], key=tuned.keys)(mod._grouped_gemm_kernel)
        monkeypatch.setattr(mod, "_grouped_gemm_tuned", one_config)
        out = modality_ffn(x, seg, seg_expert, experts)
        f32 = [[t.detach().float() for t in e] for e in experts]
        ref = modality_ffn_reference(x.detach().float(), seg, seg_expert, f32)
        assert ((out.float() - ref).norm() / ref.norm()) < 1e-2, cfg
        _compare_bf16_grads(x, seg, seg_expert, experts)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled-kernel (bf16) check needs a GPU")
def test_cuda_bf16_text_step_small_tiles():
    """A text-only step's FFN (256 rows over two samples): every GEMM small, 64-row M tiles."""
    import univigu_fast.kernels.modality_ffn as mod

    lens = [200, 56]
    x, seg, seg_expert, experts, residual, gate = _case(lens, [1, 1], dim=1536, inner=(8960, 8960), dtype=torch.bfloat16)
    assert mod._Plan(seg, seg_expert, [0, 200, 256], 8960).block_m == mod._SMALL_BLOCK_M
    with torch.no_grad():
        out = modality_ffn(x, seg, seg_expert, experts, residual=residual, gate=gate).float()
        ref = modality_ffn_reference(x.float(), seg, seg_expert, [[t.float() for t in e] for e in experts],
                                     residual=residual.float(), gate=gate.float())
    assert ((out - ref).norm() / ref.norm()) < 1e-2


def test_forward_op_is_deterministic_when_expert_sizes_differ():
    """The saved pre-activation is (T, F_max): the smaller expert's rows must not carry leftover memory
    in the columns it does not use (opcheck compares the op's eager and AOT-traced outputs)."""
    from univigu_fast.kernels import modality_ffn as mf

    g = torch.Generator().manual_seed(0)
    T, D, F1, F2 = 13, 16, 24, 8
    seg = torch.tensor([0, 9, 9, 13], dtype=torch.int32)
    seg_expert = torch.tensor([0, 1, 1], dtype=torch.int32)
    x = torch.randn(T, D, generator=g)
    flat = [torch.randn(*s, generator=g) for s in ((F1, D), (F1,), (D, F1), (D,), (F2, D), (F2,), (D, F2), (D,))]
    args = (x, seg, seg_expert, flat, None, None, True, False)
    pre = mf._modality_ffn_fwd_op.op(*args)[1]
    assert pre.shape == (T, F1) and torch.equal(pre[9:, F2:], torch.zeros(T - 9, F1 - F2))
    torch.library.opcheck(mf._modality_ffn_fwd_op.op, args, test_utils=("test_aot_dispatch_dynamic",))
