"""Fused gated residual ``h + gate[seg] * y`` (paper Eq. 14) against the PyTorch reference, forward and backward."""
import pytest
import torch

from test_modulated_layer_norm import DEVICE, DTYPES, SEG_TABLES, TOL, check_fwd_bwd, geometry, rand, seg_table  # noqa: F401
from univigu_fast.kernels import gated_residual as gr


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("table, dim", [("ragged", 72), ("empty_ends", 40), ("single", 33)])
def test_matches_reference(geometry, dtype, table, dim):
    lens = SEG_TABLES[table]
    T, S = sum(lens), len(lens)
    h, y = rand(T, dim, dtype=dtype, seed=3), rand(T, dim, dtype=dtype, seed=4)
    gate = rand(S, dim, dtype=torch.float32, seed=5)
    seg = seg_table(lens)
    out = gr.gated_residual(h, y, seg, gate)
    assert out.dtype == dtype
    refs = [t.detach().float().requires_grad_() for t in (h, y, gate)]
    ref = gr.gated_residual_reference(refs[0], refs[1], seg, refs[2])
    check_fwd_bwd(out, ref, (h, y, gate), refs, dtype,
                  grad_tol=None if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2))


def test_mixed_dtypes_and_no_grad_path():
    """An fp32 residual stream with a half-precision branch (autocast) and a strided gate view."""
    lens = SEG_TABLES["ragged"]
    T, S, dim = sum(lens), len(lens), 24
    h = torch.randn(T, dim, device=DEVICE)
    y = torch.randn(T, dim, device=DEVICE).half()
    gate = torch.randn(S, 6, dim, device=DEVICE)[:, 2]
    with torch.no_grad():
        out = gr.gated_residual(h, y, seg_table(lens), gate)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, gr.gated_residual_reference(h, y, seg_table(lens), gate), **TOL[torch.float32])


def test_mixed_dtype_grads_keep_input_dtypes():
    lens = [5, 0, 4]
    h = torch.randn(9, 16, device=DEVICE, requires_grad=True)
    y = torch.randn(9, 16, device=DEVICE).half().requires_grad_()
    gate = torch.randn(3, 16, device=DEVICE, requires_grad=True)
    gr.gated_residual(h, y, seg_table(lens), gate).sum().backward()
    assert h.grad.dtype == torch.float32 and y.grad.dtype == torch.float16 and gate.grad.dtype == torch.float32
    torch.testing.assert_close(y.grad.float(), gate.detach().repeat_interleave(torch.tensor(lens, device=DEVICE), 0),
                               **TOL[torch.float16])
    assert torch.equal(gate.grad[1], torch.zeros(16, device=DEVICE))  # the empty segment gets no gradient


def test_bad_inputs():
    x = torch.randn(5, 8, device=DEVICE)
    seg = seg_table([2, 3])
    gate = torch.zeros(2, 8, device=DEVICE)
    with pytest.raises(TypeError, match="seg_offsets must be .*int32"):
        gr.gated_residual(x, x, seg.long(), gate)
    with pytest.raises(ValueError, match="seg_offsets must be contiguous"):  # a strided view was misread
        gr.gated_residual(x, x, seg.repeat_interleave(2)[::2], gate)
    for kw, name in ((dict(y=x.to("meta")), "y"), (dict(gate=gate.to("meta")), "gate")):  # torch named nothing
        with pytest.raises(ValueError, match=rf"{name} \(meta\) must be on x's device"):
            gr.gated_residual(x, kw.get("y", x), seg, kw.get("gate", gate))
    with pytest.raises(ValueError, match=r"h and y must both be \(T, dim\), got \(5, 8\) and \(4, 8\)"):
        gr.gated_residual(x, x[:4], seg, gate)
    with pytest.raises(ValueError, match=r"gate must be a floating \(S=2, dim=8\)"):
        gr.gated_residual(x, x, seg, torch.zeros(3, 8, device=DEVICE))
    # the table's values: a wrong one left rows unwritten (values of 1e25) or read past h's end
    for bad, match in (([0, 3, 4], r"\[-1\] must equal the number of tokens 5"), ([1, 3, 5], r"\[0\] must be 0"),
                       ([0, 4, 3, 5], "non-decreasing")):
        table = torch.tensor(bad, dtype=torch.int32, device=DEVICE)
        with pytest.raises(ValueError, match=match):
            gr.gated_residual(x, x, table, torch.zeros(len(bad) - 1, 8, device=DEVICE))
    with pytest.raises(ValueError, match="seg_offsets must be on the data's device"):
        gr.gated_residual(x, x, torch.empty(3, dtype=torch.int32, device="meta"), gate)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled kernels at the real width need CUDA")
def test_cuda_bf16_wan_width_and_compile():
    lens = [4093, 256, 1021, 0, 37, 1]
    T, S, dim = sum(lens), len(lens), 1536
    h, y = rand(T, dim, dtype=torch.bfloat16, seed=6), rand(T, dim, dtype=torch.bfloat16, seed=7)
    gate = rand(S, dim, dtype=torch.float32, seed=8)
    seg = seg_table(lens)
    refs = [t.detach().float().requires_grad_() for t in (h, y, gate)]
    ref = gr.gated_residual_reference(refs[0], refs[1], seg, refs[2])
    check_fwd_bwd(gr.gated_residual(h, y, seg, gate), ref, (h, y, gate), refs, torch.bfloat16,
                  grad_tol=dict(atol=0.5, rtol=2e-2))
    compiled = torch.compile(lambda a, b, c: gr.gated_residual(a, b, seg, c) + 1, fullgraph=True)
    torch.testing.assert_close(compiled(h, y, gate).float(), ref.float() + 1, **TOL[torch.bfloat16])


def test_half_gate_gets_half_grad():
    lens = [3, 2]
    h = torch.randn(5, 8, device=DEVICE).half().requires_grad_()
    gate = torch.randn(2, 8, device=DEVICE).half().requires_grad_()
    gr.gated_residual(h, h.detach(), seg_table(lens), gate).float().sum().backward()
    assert gate.grad.dtype == torch.float16 and h.grad.dtype == torch.float16
    want = torch.stack([h.detach()[:3].float().sum(0), h.detach()[3:].float().sum(0)])
    torch.testing.assert_close(gate.grad.float(), want, **TOL[torch.float16])
