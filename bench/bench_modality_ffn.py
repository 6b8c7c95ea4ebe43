"""Benchmark: modality-routed FFN over the packed [video; text] sequence at the DESIGN §6 shapes.

Records op ``modality_ffn``, modes ``fwd`` / ``fwd_bwd``, impls ``triton`` (grouped GEMMs, fused
epilogues; backward from the saved pre-activation), ``triton_recompute`` (fwd_bwd only: the backward
recomputes the pre-activation instead, ``RECOMPUTE_PREACTIVATION = True``), ``naive`` (split + two dense calls + eager gated residual: the reference), ``compile``
(``torch.compile`` of the naive), ``grouped_mm`` (PyTorch's native grouped matmul on rows sorted by
expert, gather/scatter included; its weight and bias gradients go to stacked ``(E, ...)`` leaves),
all computing ``residual + gate[seg] * FFN_e(x)``.
FLOPs: ``4 T dim ffn`` forward, 3x that forward+backward.
"""
import itertools

import pytest
import torch
import torch.nn.functional as F

from _common import measure, requires_cuda
from univigu_fast.kernels._utils import remember_host_values
from univigu_fast.shapes import SHAPES

DTYPE = torch.bfloat16
_CACHE: dict = {}


def _case(shape_name):
    if _CACHE.get("key") == shape_name:
        return _CACHE
    _CACHE.clear()
    torch.cuda.empty_cache()
    s = SHAPES[shape_name]
    lens = [n for pair in zip(s.video_lens, s.text_lens) for n in pair]
    T, dim, f = sum(lens), s.dim, s.ffn_dim
    g = torch.Generator(device="cuda").manual_seed(0)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, device="cuda", generator=g) * scale).to(DTYPE)

    experts = [(r(f, dim, scale=dim**-0.5), r(f, scale=0.1), r(dim, f, scale=f**-0.5), r(dim, scale=0.1)) for _ in range(2)]
    offsets, experts_of = [0, *itertools.accumulate(lens)], [0, 1] * s.batch
    # tables that remember their host values, as the model's packer builds them (no sync per call)
    _CACHE.update(key=shape_name, x=r(T, dim), residual=r(T, dim), gate=r(len(lens), dim, scale=0.1),
                  seg=remember_host_values(torch.tensor(offsets, dtype=torch.int32, device="cuda"), offsets),
                  seg_expert=remember_host_values(torch.tensor(experts_of, dtype=torch.int32, device="cuda"), experts_of),
                  experts=experts, flops=4 * T * dim * f)
    return _CACHE


def _grouped_mm_ffn(seg, seg_expert, experts, train):
    """Peer: sort rows by expert, two torch grouped matmuls (per-expert weights stacked once into
    ``(E, ...)`` leaves, as a grouped_mm model would hold them; gradients land there), bias added in
    place per expert slice, scatter back."""
    gmm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    if gmm is None:
        return None
    from univigu_fast.kernels._utils import expand_segments

    tok_expert = expand_segments(seg_expert.long(), seg)
    perm = torch.argsort(tok_expert, stable=True)
    counts = torch.bincount(tok_expert, minlength=len(experts))
    offs = torch.cumsum(counts, 0).to(torch.int32)
    bounds = list(itertools.pairwise([0, *offs.tolist()]))  # host copy once, outside the timed calls

    def leaf(i):
        return torch.stack([e[i] for e in experts]).detach().requires_grad_(train)
    w1, b1, w2, b2 = (leaf(i) for i in range(4))  # (E, f, dim), (E, f), (E, dim, f), (E, dim)

    def add_bias(h, b):
        for e, (lo, hi) in enumerate(bounds):
            h[lo:hi] += b[e]
        return h

    def run(x, residual, gate):
        xs = x[perm]
        h = F.gelu(add_bias(gmm(xs, w1.transpose(1, 2), offs=offs), b1), approximate="tanh")
        y = add_bias(gmm(h, w2.transpose(1, 2), offs=offs), b2)
        out = torch.empty_like(y)
        out[perm] = y
        return (residual.float() + out.float() * expand_segments(gate.float(), seg)).to(x.dtype)
    return run


def _impl(name, c, train):
    from univigu_fast.kernels.modality_ffn import modality_ffn, modality_ffn_reference

    seg, se, experts = c["seg"], c["seg_expert"], c["experts"]
    if name == "triton":
        return lambda x, res, gate: modality_ffn(x, seg, se, experts, residual=res, gate=gate)
    if name == "triton_recompute":
        import univigu_fast.kernels.modality_ffn as mod

        def run(x, res, gate):
            mod.RECOMPUTE_PREACTIVATION = True
            try:
                return modality_ffn(x, seg, se, experts, residual=res, gate=gate)
            finally:
                mod.RECOMPUTE_PREACTIVATION = False
        return run
    if name == "naive":
        return lambda x, res, gate: modality_ffn_reference(x, seg, se, experts, residual=res, gate=gate)
    if name == "compile":
        f = torch.compile(lambda x, res, gate: modality_ffn_reference(x, seg, se, experts, residual=res, gate=gate))
        return f
    if name == "grouped_mm":
        return _grouped_mm_ffn(seg, se, experts, train)
    raise ValueError(name)


@requires_cuda
@pytest.mark.parametrize("impl", ["triton", "triton_recompute", "naive", "compile", "grouped_mm"])
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("shape", ["wan1.3b-480p", "wan1.3b-varlen", "wan14b-720p"])
def test_bench_modality_ffn(benchmark, shape, mode, impl):
    if impl == "triton_recompute" and mode != "fwd_bwd":
        pytest.skip("the recompute switch only changes the backward")
    if shape == "wan14b-720p" and (mode == "fwd_bwd" or impl == "compile"):
        pytest.skip("wan14b-720p: forward only and no torch.compile peer, to fit the bench time budget")
    c = _case(shape)
    try:
        train = mode == "fwd_bwd"
        fn = _impl(impl, c, train)
        if fn is None:
            pytest.skip(f"{impl} is not available in this torch")
        x, res, gate = (c[n].detach().requires_grad_(train) for n in ("x", "residual", "gate"))
        if train:
            for e in c["experts"]:
                for t in e:
                    t.requires_grad_(True)
            grad = torch.randn_like(x)

            def run():
                fn(x, res, gate).backward(grad)
        else:
            def run():
                with torch.no_grad():
                    return fn(x, res, gate)
        run()
        torch.cuda.synchronize()
    except Exception as e:  # one failing peer must not stop the others
        torch.cuda.empty_cache()
        pytest.skip(f"{impl} failed: {type(e).__name__}: {str(e)[:200]}")
    finally:
        for e in c["experts"]:
            for t in e:
                t.grad = None
    measure(benchmark, run, op="modality_ffn", shape=shape, mode=mode, impl=impl, dtype=DTYPE,
            flops=c["flops"] * (3 if mode == "fwd_bwd" else 1), rounds=5, warmup_rounds=2)
    for e in c["experts"]:
        for t in e:
            t.requires_grad_(False)
            t.grad = None
