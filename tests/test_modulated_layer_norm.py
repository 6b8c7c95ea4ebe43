"""Fused modulated LayerNorm (adaLN, paper Eq. 14) against the PyTorch reference, forward and backward."""
import itertools

import pytest
import torch

from univigu_fast.kernels import modulated_layer_norm as mln

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])
# video / text segments: empty ones (first, middle, last), a 1-row one, none a multiple of the row block
SEG_TABLES = {"ragged": [17, 0, 1, 5, 0, 9], "empty_ends": [0, 23, 0, 3, 11, 0], "single": [29]}


def seg_table(lens):
    return torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=DEVICE)


def rand(*shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g)).to(DEVICE, dtype).requires_grad_()


def check_fwd_bwd(out, ref, inputs, ref_inputs, dtype, grad_tol=None):
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(99)).to(DEVICE)
    got = torch.autograd.grad(out, inputs, g.to(out.dtype))
    want = torch.autograd.grad(ref, ref_inputs, g.to(ref.dtype))
    for a, b, t in zip(got, want, inputs):
        assert a.dtype == t.dtype and a.shape == t.shape
        torch.testing.assert_close(a.float(), b.float(), **(grad_tol or TOL[dtype]))


@pytest.fixture(params=[(16, 4), (2, 3)], ids=["default_geometry", "2row_blocks_3programs"])
def geometry(request, monkeypatch):
    """Default launch geometry, and one where chunk edges fall inside segments and programs hold several."""
    block_t, programs = request.param
    monkeypatch.setattr(mln, "MAX_BLOCK_T", block_t)
    monkeypatch.setattr(mln, "INTERPRETER_PROGRAMS", programs)
    monkeypatch.setattr(mln, "PROGRAMS_PER_SM", max(1, programs // 2))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("table, dim", [("ragged", 48), ("empty_ends", 100), ("single", 64)])
def test_matches_reference(geometry, dtype, table, dim):
    lens = SEG_TABLES[table]
    T, S = sum(lens), len(lens)
    x = rand(T, dim, dtype=dtype, seed=0, scale=3.0)
    shift, scale = rand(S, dim, dtype=torch.float32, seed=1), rand(S, dim, dtype=torch.float32, seed=2)
    seg = seg_table(lens)
    out = mln.modulated_layer_norm(x, seg, shift, scale)
    assert out.dtype == dtype and out.shape == x.shape
    refs = [t.detach().float().requires_grad_() for t in (x, shift, scale)]
    ref = mln.modulated_layer_norm_reference(refs[0], seg, refs[1], refs[2])
    # dscale / dshift sum over up to 29 rows: a little looser in half precision
    check_fwd_bwd(out, ref, (x, shift, scale), refs, dtype,
                  grad_tol=None if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2))


def test_strided_modulation_and_no_grad_path():
    """shift/scale as the model passes them (views of a (S, 6, dim) table) and the inference path."""
    lens = SEG_TABLES["ragged"]
    T, S, dim = sum(lens), len(lens), 40
    x = torch.randn(T, dim, device=DEVICE)
    table = torch.randn(S, 6, dim, device=DEVICE)
    shift, scale = table[:, 0], table[:, 1]
    assert not shift.is_contiguous()
    with torch.no_grad():
        out = mln.modulated_layer_norm(x, seg_table(lens), shift, scale, 1e-5)
    torch.testing.assert_close(out, mln.modulated_layer_norm_reference(x, seg_table(lens), shift, scale, 1e-5), **TOL[torch.float32])


def test_empty_input():
    x = torch.zeros(0, 8, device=DEVICE, requires_grad=True)
    shift = torch.zeros(2, 8, device=DEVICE, requires_grad=True)
    out = mln.modulated_layer_norm(x, seg_table([0, 0]), shift, shift)
    assert out.shape == (0, 8)
    out.sum().backward()
    assert torch.equal(shift.grad, torch.zeros_like(shift))


def test_module():
    lens = [3, 4]
    x, mod = torch.randn(7, 16, device=DEVICE), torch.randn(2, 16, device=DEVICE)
    torch.testing.assert_close(mln.ModulatedLayerNorm(1e-6)(x, seg_table(lens), mod, -mod),
                               mln.modulated_layer_norm_reference(x, seg_table(lens), mod, -mod), **TOL[torch.float32])


def test_bad_inputs():
    x = torch.randn(5, 8, device=DEVICE)
    seg = seg_table([2, 3])
    ok = torch.zeros(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"scale \(meta\) must be on x's device"):  # torch's error named nothing
        mln.modulated_layer_norm(x, seg, ok, ok.to("meta"))
    with pytest.raises(ValueError, match="eps must be a finite number >= 0, got nan"):  # all-NaN output before
        mln.modulated_layer_norm(x, seg, ok, ok, float("nan"))
    for bad in (None, 0.0):  # an AttributeError before
        with pytest.raises(TypeError, match=r"shift must be a \(S=2, dim=8\) tensor, got"):
            mln.modulated_layer_norm(x, seg, bad, ok)
    with pytest.raises(ValueError, match=r"shift must be \(S=2, dim=8\), got \(3, 8\)"):
        mln.modulated_layer_norm(x, seg, torch.zeros(3, 8, device=DEVICE), ok)
    with pytest.raises(ValueError, match=r"scale must be \(S=2, dim=8\)"):
        mln.modulated_layer_norm(x, seg, ok, torch.zeros(2, 7, device=DEVICE))
    with pytest.raises(TypeError, match="seg_offsets must be .*int32"):
        mln.modulated_layer_norm(x, seg.long(), ok, ok)
    with pytest.raises(ValueError, match="seg_offsets must be contiguous"):  # a strided view was misread
        mln.modulated_layer_norm(x, seg.repeat_interleave(2)[::2], ok, ok)
    with pytest.raises(ValueError, match=r"x must be a \(T, dim\)"):
        mln.modulated_layer_norm(x[None], seg, ok, ok)
    with pytest.raises(TypeError, match="x must be floating"):
        mln.modulated_layer_norm(x.long(), seg, ok, ok)
    # the table's values: a wrong one left rows unwritten (values of 1e20) or read past x's end
    for bad, match in (([0, 3, 4], r"\[-1\] must equal the number of tokens 5"), ([0, 3, 9], "tokens 5, got 9"),
                       ([1, 3, 5], r"\[0\] must be 0"), ([0, 4, 3, 5], "non-decreasing")):
        table = torch.tensor(bad, dtype=torch.int32, device=DEVICE)
        mod = torch.zeros(len(bad) - 1, 8, device=DEVICE)
        with pytest.raises(ValueError, match=match):
            mln.modulated_layer_norm(x, table, mod, mod)
    with pytest.raises(ValueError, match="seg_offsets must be on the data's device"):
        mln.modulated_layer_norm(x, torch.empty(3, dtype=torch.int32, device="meta"), ok, ok)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled kernels at the real width need CUDA")
def test_cuda_bf16_wan_width_and_compile():
    """bf16 at Wan 1.3B's width with 480p-like + text segments; eager and under torch.compile."""
    lens = [4093, 256, 1021, 0, 37, 1]
    T, S, dim = sum(lens), len(lens), 1536
    x = rand(T, dim, dtype=torch.bfloat16, seed=3)
    shift, scale = rand(S, dim, dtype=torch.float32, seed=4), rand(S, dim, dtype=torch.float32, seed=5)
    seg = seg_table(lens)
    refs = [t.detach().float().requires_grad_() for t in (x, shift, scale)]
    ref = mln.modulated_layer_norm_reference(refs[0], seg, refs[1], refs[2])
    check_fwd_bwd(mln.modulated_layer_norm(x, seg, shift, scale), ref, (x, shift, scale), refs, torch.bfloat16,
                  grad_tol=dict(atol=0.5, rtol=2e-2))  # dshift/dscale: sums of ~4000 bf16-rounded rows
    compiled = torch.compile(lambda a, b, c: mln.modulated_layer_norm(a, seg, b, c) * 2, fullgraph=True)
    torch.testing.assert_close(compiled(x, shift, scale).float(), 2 * ref.float(), **TOL[torch.bfloat16])
