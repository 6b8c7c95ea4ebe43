"""Benchmark: fused memory-bound glue vs eager PyTorch (the references) at the DESIGN §6 token counts.

Ops ``modulated_layer_norm``, ``gated_residual``, ``rms_norm``; modes ``fwd`` (inference path) and
``fwd_bwd`` (forward + backward of every input, as in training); impls ``triton``, ``naive`` (the
eager reference) and ``compile`` (``torch.compile`` of the reference, the strongest peer for fused
elementwise work). GB/s use the minimal traffic: each (T, dim) tensor read once and
each (T, dim) result written once (fwd_bwd: forward traffic plus, backward, ``dout`` and the saved
inputs read once and the input gradients written once); ``% of peak`` is of the copy bandwidth
measured in the same run.
"""
import itertools

import pytest
import torch

from _common import measure, requires_cuda
from univigu_fast.kernels._utils import remember_host_values
from univigu_fast.shapes import SHAPES

DTYPE = torch.bfloat16


def _case(shape_name):
    s = SHAPES[shape_name]
    segs = [n for pair in zip(s.video_lens, s.text_lens) for n in pair]
    offsets = [0, *itertools.accumulate(segs)]
    # a table that remembers its host values, as the model's packer builds it (no sync per call)
    seg = remember_host_values(torch.tensor(offsets, dtype=torch.int32, device="cuda"), offsets)
    T, dim = sum(segs), s.dim
    return seg, T, dim, len(segs)


def _fns(op, impl, mode, seg, T, dim, S):
    from univigu_fast.kernels import gated_residual as gr, modulated_layer_norm as mln, rms_norm as rn

    grad = mode == "fwd_bwd"
    x = torch.randn(T, dim, device="cuda", dtype=DTYPE, requires_grad=grad)
    y = torch.randn(T, dim, device="cuda", dtype=DTYPE, requires_grad=grad)
    mod = torch.randn(S, dim, device="cuda", dtype=torch.float32, requires_grad=grad)
    w = torch.randn(dim, device="cuda", dtype=DTYPE, requires_grad=grad)
    dout = torch.randn(T, dim, device="cuda", dtype=DTYPE)
    nbytes = x.numel() * x.element_size()
    module = {"modulated_layer_norm": mln, "gated_residual": gr, "rms_norm": rn}[op]
    f = getattr(module, op if impl == "triton" else f"{op}_reference")
    if impl == "compile":
        f = torch.compile(f, dynamic=False)
    if op == "modulated_layer_norm":
        call, fwd_bytes, bwd_bytes, inputs = (lambda: f(x, seg, mod, mod)), 2, 3, (x, mod)
    elif op == "gated_residual":
        call, fwd_bytes, bwd_bytes, inputs = (lambda: f(x, y, seg, mod)), 3, 3, (x, y, mod)
    else:
        call, fwd_bytes, bwd_bytes, inputs = (lambda: f(x, w)), 2, 3, (x, w)
    if not grad:
        return call, fwd_bytes * nbytes

    def fwd_bwd():
        return torch.autograd.grad(call(), inputs, dout)

    return fwd_bwd, (fwd_bytes + bwd_bytes) * nbytes


@requires_cuda
@pytest.mark.parametrize("impl", ["triton", "naive", "compile"])
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("op", ["modulated_layer_norm", "gated_residual", "rms_norm"])
@pytest.mark.parametrize("shape", ["wan1.3b-480p", "wan1.3b-varlen", "wan14b-720p"])
def test_bench_glue(benchmark, shape, op, mode, impl):
    fn, nbytes = _fns(op, impl, mode, *_case(shape))
    with torch.set_grad_enabled(mode == "fwd_bwd"):
        try:
            fn()
            torch.cuda.synchronize()
        except Exception as e:  # one failing peer (a compile error) must not stop the others
            pytest.skip(f"{impl} failed: {type(e).__name__}: {str(e)[:200]}")
        measure(benchmark, fn, op=op, shape=shape, mode=mode, impl=impl, dtype=DTYPE, bytes_moved=nbytes,
                rounds=10, warmup_rounds=3)
