"""Benchmark: fused linear argmax / sample vs matmul + argmax / softmax + multinomial (DESIGN §6).

Records ``linear_argmax`` and ``linear_sample``, shapes ``n{N}-d{dim}`` (V = 256,384, bf16), impls
``triton`` and ``naive``. ``flops = 2 N V dim``, ``bytes_moved = bytes(W) + bytes(x)``, so the
roofline ``max(bytes / bandwidth, flops / peak)`` is computable from the results file.
"""
import pytest
import torch

from _common import measure, requires_cuda

V = 256_384
SHAPES = [(n, d) for n in (256, 2048, 8192) for d in (1536, 5120)]
TEMPERATURE = 1.0
_CACHE: dict = {}


def _inputs(n, d):
    if _CACHE.get("key") != (n, d):
        _CACHE.clear()
        torch.cuda.empty_cache()
        g = torch.Generator(device="cuda").manual_seed(0)
        w = torch.randn(V, d, device="cuda", dtype=torch.bfloat16, generator=g) * d**-0.5
        x = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, generator=g)
        _CACHE.update(key=(n, d), x=x, w=w)
    return _CACHE["x"], _CACHE["w"]


def _impl(op, impl):
    from univigu_fast.kernels.linear_argmax import linear_argmax

    if op == "linear_argmax":
        if impl == "triton":
            return lambda x, w: linear_argmax(x, w)
        return lambda x, w: torch.argmax(x @ w.t(), dim=-1)
    if impl == "triton":
        return lambda x, w: linear_argmax(x, w, gumbel_seed=1234, temperature=TEMPERATURE)
    return lambda x, w: torch.multinomial(torch.softmax((x @ w.t()).float() / TEMPERATURE, dim=-1), 1)


@requires_cuda
@pytest.mark.parametrize("impl", ["triton", "naive"])
@pytest.mark.parametrize("op", ["linear_argmax", "linear_sample"])
@pytest.mark.parametrize("n,d", SHAPES, ids=[f"n{n}-d{d}" for n, d in SHAPES])
def test_bench_linear_argmax(benchmark, n, d, op, impl):
    x, w = _inputs(n, d)
    fn = _impl(op, impl)
    try:
        fn(x, w)
        torch.cuda.synchronize()
    except Exception as e:  # one failing impl must not stop the others
        pytest.skip(f"{impl} failed: {type(e).__name__}: {e}")
    measure(benchmark, lambda: fn(x, w), op=op, shape=f"n{n}-d{d}", mode="fwd", impl=impl,
            flops=2 * n * V * d, bytes_moved=w.numel() * w.element_size() + x.numel() * x.element_size(),
            rounds=10, warmup_rounds=3)
