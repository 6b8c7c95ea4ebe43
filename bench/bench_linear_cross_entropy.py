"""Benchmark: fused linear cross-entropy, forward + backward (DESIGN §6).

Records ``linear_cross_entropy``, shapes ``n{N}-d{dim}`` (V = 256,384, bf16, 10% ignored targets),
mode ``fwd_bwd`` (loss, then d/dx and d/dW), impls ``triton`` (ours), ``naive`` (full logits +
``F.cross_entropy``), ``liger`` (``LigerFusedLinearCrossEntropyLoss``, skipped if not installed),
``torch`` (``torch.nn.functional.linear_cross_entropy``, skipped where absent).
``flops = 6 N V dim`` (the logits, d/dx and d/dW GEMMs; a kernel that recomputes the logits in
its backward does more) and ``bytes_moved = 2 (bytes(W) + bytes(x))`` (W and x read, their
gradients written).
"""
import pytest
import torch
import torch.nn.functional as F

from _common import measure, requires_cuda

V = 256_384
SHAPES = [(n, d) for n in (256, 2048, 8192) for d in (1536, 5120)]
IMPLS = ["triton", "naive", "liger", "torch"]
_CACHE: dict = {}


def _inputs(n, d):
    if _CACHE.get("key") != (n, d):
        _CACHE.clear()
        torch.cuda.empty_cache()
        g = torch.Generator(device="cuda").manual_seed(0)
        w = (torch.randn(V, d, device="cuda", dtype=torch.bfloat16, generator=g) * d**-0.5).requires_grad_()
        x = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
        t = torch.randint(0, V, (n,), device="cuda", generator=g)
        t[torch.randperm(n, device="cuda", generator=g)[: n // 10]] = -100
        _CACHE.update(key=(n, d), x=x, w=w, t=t)
    return _CACHE["x"], _CACHE["w"], _CACHE["t"]


def _loss_fn(impl):
    if impl == "triton":
        from univigu_fast.kernels.linear_cross_entropy import linear_cross_entropy

        return lambda x, w, t: linear_cross_entropy(x, w, t)
    if impl == "naive":
        return lambda x, w, t: F.cross_entropy((x @ w.t()).float(), t, ignore_index=-100)
    if impl == "liger":
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except Exception as e:  # optional peer
            pytest.skip(f"liger-kernel not installed ({type(e).__name__})")
        mod = LigerFusedLinearCrossEntropyLoss(ignore_index=-100)
        return lambda x, w, t: mod(w, x, t)  # Liger's argument order: (lin_weight, _input, target)
    if not hasattr(F, "linear_cross_entropy"):
        pytest.skip("torch.nn.functional.linear_cross_entropy not in this torch")
    return lambda x, w, t: F.linear_cross_entropy(x, w, t)


@requires_cuda
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n,d", SHAPES, ids=[f"n{n}-d{d}" for n, d in SHAPES])
def test_bench_linear_cross_entropy(benchmark, n, d, impl):
    x, w, t = _inputs(n, d)
    loss_fn = _loss_fn(impl)

    def fwd_bwd():
        loss = loss_fn(x, w, t)
        return torch.autograd.grad(loss, [x, w])

    try:
        fwd_bwd()
        torch.cuda.synchronize()
    except Exception as e:  # one failing impl must not stop the others
        pytest.skip(f"{impl} failed: {type(e).__name__}: {e}")
    rounds = 5 if n * d >= 2048 * 5120 else 8
    measure(benchmark, fwd_bwd, op="linear_cross_entropy", shape=f"n{n}-d{d}", mode="fwd_bwd", impl=impl,
            flops=6 * n * V * d, bytes_moved=2 * (w.numel() * w.element_size() + x.numel() * x.element_size()),
            rounds=rounds, warmup_rounds=2)
