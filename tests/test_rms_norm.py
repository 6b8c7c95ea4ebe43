"""Fused RMSNorm (Wan's q/k norm across heads) against the PyTorch reference, forward and backward."""
import pytest
import torch

from test_modulated_layer_norm import DEVICE, DTYPES, TOL, check_fwd_bwd, geometry, rand  # noqa: F401
from univigu_fast.kernels import rms_norm as rn


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T, dim", [(23, 64), (1, 96), (37, 40)])
def test_matches_reference(geometry, dtype, T, dim):
    x, w = rand(T, dim, dtype=dtype, seed=6, scale=2.0), rand(dim, dtype=dtype, seed=7)
    out = rn.rms_norm(x, w, 1e-6)
    assert out.dtype == dtype
    refs = [t.detach().float().requires_grad_() for t in (x, w)]
    check_fwd_bwd(out, rn.rms_norm_reference(*refs), (x, w), refs, dtype,
                  grad_tol=None if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2))


@pytest.mark.parametrize("eps", [1e-6, 1e-3])
def test_eps_where_it_matters(eps):
    """Rows of size ~1e-3 (mean square ~ 1e-6, eps's scale) and an all-zero row: the eps term decides
    the result (elsewhere it is invisible: a kernel without it passed every other test)."""
    x = torch.cat([torch.randn(6, 48, generator=torch.Generator().manual_seed(3)) * 1e-3, torch.zeros(1, 48)])
    x = x.to(DEVICE).requires_grad_()
    w = rand(48, dtype=torch.float32, seed=4)
    ref_in = [x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()]
    check_fwd_bwd(rn.rms_norm(x, w, eps), rn.rms_norm_reference(*ref_in, eps), (x, w), ref_in, torch.float32,
                  grad_tol=dict(atol=1e-4, rtol=1e-4))  # dx ~ rstd ~ 700: fp32 rounding at that scale


def test_no_grad_path_strided_rows_and_module():
    x = torch.randn(11, 2, 32, device=DEVICE)[:, 1]  # row stride 64, unit last stride
    m = rn.RMSNorm(32, eps=1e-5).to(DEVICE)
    with torch.no_grad():
        m.weight.mul_(torch.linspace(0.5, 1.5, 32, device=DEVICE))
        torch.testing.assert_close(m(x), rn.rms_norm_reference(x, m.weight, 1e-5), **TOL[torch.float32])
    empty = torch.zeros(0, 32, device=DEVICE, requires_grad=True)
    m(empty).sum().backward()
    assert torch.equal(m.weight.grad, torch.zeros(32, device=DEVICE))


def test_bad_inputs():
    x = torch.randn(5, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"weight must be \(dim=8,\), got \(7,\)"):
        rn.rms_norm(x, torch.ones(7, device=DEVICE))
    with pytest.raises(ValueError, match=r"x must be a floating \(T, dim\)"):
        rn.rms_norm(x[None], torch.ones(8, device=DEVICE))
    with pytest.raises(ValueError, match=r"weight \(meta\) must be on x's device"):  # torch's error named nothing
        rn.rms_norm(x, torch.ones(8, device="meta"))
    with pytest.raises(TypeError, match="weight must be floating point, got torch.int64"):  # (accepted before)
        rn.rms_norm(x, torch.ones(8, device=DEVICE, dtype=torch.int64))
    for eps in (-1e-6, float("nan"), float("inf")):  # NaN rows / all-NaN outputs before
        with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
            rn.rms_norm(x, torch.ones(8, device=DEVICE), eps)
    import numpy as np  # a NumPy eps is a real number like any other (F.rms_norm takes it)

    torch.testing.assert_close(rn.rms_norm(x, torch.ones(8, device=DEVICE), np.float32(1e-6)),
                               rn.rms_norm(x, torch.ones(8, device=DEVICE), 1e-6))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled kernels at the real width need CUDA")
def test_cuda_bf16_wan_width_and_compile():
    x, w = rand(5000, 1536, dtype=torch.bfloat16, seed=9), rand(1536, dtype=torch.bfloat16, seed=10)
    refs = [t.detach().float().requires_grad_() for t in (x, w)]
    ref = rn.rms_norm_reference(*refs)
    check_fwd_bwd(rn.rms_norm(x, w), ref, (x, w), refs, torch.bfloat16, grad_tol=dict(atol=0.5, rtol=3e-2))
    compiled = torch.compile(lambda a, b: rn.rms_norm(a, b) * 3, fullgraph=True)
    torch.testing.assert_close(compiled(x, w).float(), 3 * ref.float(), **TOL[torch.bfloat16])
