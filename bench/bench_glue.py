"""Benchmark: fused memory-bound glue vs eager PyTorch (the references) at the DESIGN §6 token counts.

Ops ``modulated_layer_norm``, ``gated_residual``, ``rms_norm``; mode ``fwd``; impls ``triton`` and
``naive`` (the eager reference, Wan's own form). GB/s use the minimal traffic: each (T, dim)
input read once and the output written once.
"""
import itertools

import pytest
import torch

from _common import measure, requires_cuda
from univigu_fast.shapes import SHAPES

DTYPE = torch.bfloat16


def _case(shape_name):
    s = SHAPES[shape_name]
    segs = [n for pair in zip(s.video_lens, s.text_lens) for n in pair]
    seg = torch.tensor([0, *itertools.accumulate(segs)], dtype=torch.int32, device="cuda")
    T, dim = sum(segs), s.dim
    return seg, T, dim, len(segs)


def _fns(op, impl, seg, T, dim, S):
    from univigu_fast.kernels import gated_residual as gr, modulated_layer_norm as mln, rms_norm as rn

    x = torch.randn(T, dim, device="cuda", dtype=DTYPE)
    y = torch.randn_like(x)
    mod = torch.randn(S, dim, device="cuda", dtype=torch.float32)
    w = torch.randn(dim, device="cuda", dtype=DTYPE)
    nbytes = x.numel() * x.element_size()
    if op == "modulated_layer_norm":
        f = mln.modulated_layer_norm if impl == "triton" else mln.modulated_layer_norm_reference
        return (lambda: f(x, seg, mod, mod)), 2 * nbytes
    if op == "gated_residual":
        f = gr.gated_residual if impl == "triton" else gr.gated_residual_reference
        return (lambda: f(x, y, seg, mod)), 3 * nbytes
    f = rn.rms_norm if impl == "triton" else rn.rms_norm_reference
    return (lambda: f(x, w)), 2 * nbytes


@requires_cuda
@pytest.mark.parametrize("impl", ["triton", "naive"])
@pytest.mark.parametrize("op", ["modulated_layer_norm", "gated_residual", "rms_norm"])
@pytest.mark.parametrize("shape", ["wan1.3b-480p", "wan1.3b-varlen", "wan14b-720p"])
def test_bench_glue(benchmark, shape, op, impl):
    fn, nbytes = _fns(op, impl, *_case(shape))
    with torch.no_grad():
        measure(benchmark, fn, op=op, shape=shape, mode="fwd", impl=impl, dtype=DTYPE, bytes_moved=nbytes,
                rounds=10, warmup_rounds=3)
