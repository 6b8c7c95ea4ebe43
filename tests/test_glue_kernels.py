"""Fused glue kernels (modulated LayerNorm, gated residual, RMSNorm) against their references."""
import itertools

import pytest
import torch

from univigu_fast.kernels.gated_residual import gated_residual, gated_residual_reference
from univigu_fast.kernels.modulated_layer_norm import modulated_layer_norm, modulated_layer_norm_reference
from univigu_fast.kernels.rms_norm import rms_norm, rms_norm_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])
SEG_LENS = [17, 0, 1, 5, 0, 9]  # video / text segments, some empty, none a block multiple


def _seg(lens):
    return torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=DEVICE)


def _rand(*shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEVICE, dtype).requires_grad_()


def _grads_close(out, ref, inputs, ref_inputs, dtype):
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])
    g = torch.randn_like(ref.float())
    got = torch.autograd.grad(out, inputs, g.to(out.dtype))
    want = torch.autograd.grad(ref, ref_inputs, g.to(ref.dtype))
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b.float(), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [48, 100])
def test_modulated_layer_norm(dtype, dim):
    T, S = sum(SEG_LENS), len(SEG_LENS)
    x, shift, scale = _rand(T, dim, dtype=dtype, seed=0), _rand(S, dim, dtype=torch.float32, seed=1), _rand(S, dim, dtype=torch.float32, seed=2)
    seg = _seg(SEG_LENS)
    out = modulated_layer_norm(x, seg, shift, scale)
    refs = [t.detach().float().requires_grad_() for t in (x, shift, scale)]
    ref = modulated_layer_norm_reference(refs[0], seg, refs[1], refs[2])
    assert out.dtype == dtype
    _grads_close(out, ref, (x, shift, scale), refs, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_residual(dtype):
    T, S, dim = sum(SEG_LENS), len(SEG_LENS), 72
    h, y, gate = _rand(T, dim, dtype=dtype, seed=3), _rand(T, dim, dtype=dtype, seed=4), _rand(S, dim, dtype=torch.float32, seed=5)
    seg = _seg(SEG_LENS)
    out = gated_residual(h, y, seg, gate)
    refs = [t.detach().float().requires_grad_() for t in (h, y, gate)]
    ref = gated_residual_reference(*refs[:2], seg, refs[2])
    _grads_close(out, ref, (h, y, gate), refs, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [64, 96])
def test_rms_norm(dtype, dim):
    x, w = _rand(23, dim, dtype=dtype, seed=6), _rand(dim, dtype=dtype, seed=7)
    out = rms_norm(x, w)
    refs = [t.detach().float().requires_grad_() for t in (x, w)]
    ref = rms_norm_reference(*refs)
    _grads_close(out, ref, (x, w), refs, dtype)


def test_bad_inputs():
    x = torch.randn(5, 8, device=DEVICE)
    seg = _seg([2, 3])
    with pytest.raises(ValueError, match=r"shift must be \(S=2, dim=8\)"):
        modulated_layer_norm(x, seg, torch.zeros(3, 8, device=DEVICE), torch.zeros(2, 8, device=DEVICE))
    with pytest.raises(TypeError, match="seg_offsets must be int32"):
        gated_residual(x, x, seg.long(), torch.zeros(2, 8, device=DEVICE))
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(7, device=DEVICE))
