"""Fused linear cross-entropy (kernels/linear_cross_entropy.py): loss and gradients vs the reference.

CPU: Triton in the interpreter (fp32, fp16, tiny ragged shapes, several backward chunks). GPU: bf16.
"""
import pytest
import torch

from univigu_fast.kernels.linear_cross_entropy import (
    LinearCrossEntropyLoss,
    default_chunk_v,
    linear_cross_entropy,
    linear_cross_entropy_reference,
)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# loss: absolute / relative; grads: relative to the largest reference entry (16-bit logits chunks)
LOSS_TOL = {torch.float32: dict(atol=1e-4, rtol=1e-5), torch.float16: dict(atol=1e-3, rtol=1e-3),
            torch.bfloat16: dict(atol=1e-2, rtol=1e-2)}
GRAD_REL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def _data(n, v, d, dtype, bias=True, n_ignored=2, seed=0, ignore_index=-100):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * 0.5
    w = torch.randn(v, d, generator=g) * d**-0.5 * 3
    b = torch.randn(v, generator=g) if bias else None
    t = torch.randint(0, v, (n,), generator=g)
    t[torch.randperm(n, generator=g)[:n_ignored]] = ignore_index
    cast = lambda a: None if a is None else a.to(dtype).to(DEV)  # noqa: E731
    return cast(x), cast(w), cast(b), t.to(DEV)


def _check(x, w, b, t, *, reduction="mean", label_smoothing=0.0, chunk_v=None, ignore_index=-100,
           grads=(True, True, True)):
    dtype = x.dtype
    leaves = [a.detach().clone().requires_grad_(r) if a is not None else None for a, r in zip((x, w, b), grads)]
    refs = [a.detach().float().requires_grad_(r) if a is not None else None for a, r in zip((x, w, b), grads)]
    loss = linear_cross_entropy(leaves[0], leaves[1], t, leaves[2], ignore_index=ignore_index, reduction=reduction,
                                label_smoothing=label_smoothing, chunk_v=chunk_v)
    ref = linear_cross_entropy_reference(refs[0], refs[1], t, refs[2], ignore_index=ignore_index,
                                         reduction=reduction, label_smoothing=label_smoothing)
    assert loss.dtype == torch.float32 and loss.shape == ref.shape
    torch.testing.assert_close(loss, ref, **LOSS_TOL[dtype])
    go = torch.randn_like(ref) if reduction == "none" else torch.tensor(1.7, device=ref.device)
    wanted = [i for i, a in enumerate(leaves) if a is not None and a.requires_grad]
    got = torch.autograd.grad(loss, [leaves[i] for i in wanted], go)
    exp = torch.autograd.grad(ref, [refs[i] for i in wanted], go)
    for i, g, e in zip(wanted, got, exp):
        assert g.dtype == leaves[i].dtype and g.shape == leaves[i].shape
        scale = e.abs().max().item() + 1e-6
        torch.testing.assert_close(g.float(), e, atol=GRAD_REL[dtype] * scale, rtol=GRAD_REL[dtype],
                                   msg=lambda m: f"grad {'xwb'[i]}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_reference(dtype, reduction):
    x, w, b, t = _data(13, 300, 24, dtype)
    _check(x, w, b, t, reduction=reduction, chunk_v=32)  # 10 chunks, the last one ragged


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_label_smoothing_no_bias(dtype):
    x, w, _, t = _data(9, 77, 19, dtype, bias=False, n_ignored=3)
    _check(x, w, None, t, label_smoothing=0.1, chunk_v=16)
    _check(x, w, None, t, reduction="none", label_smoothing=0.25, chunk_v=64)


@pytest.mark.parametrize("grads", [(True, False, False), (False, True, True), (True, False, True)])
def test_partial_grads(grads):
    """Frozen weight (dx accumulator in its own buffer), frozen x, frozen weight with bias."""
    x, w, b, t = _data(11, 150, 20, torch.float16)
    _check(x, w, b, t, chunk_v=32, grads=grads)


def test_default_chunk_single_row_and_custom_ignore_index():
    x, w, b, t = _data(1, 97, 33, torch.float32, n_ignored=0)
    _check(x, w, b, t)
    assert default_chunk_v(1, 33, 97) >= 97  # one chunk
    x, w, b, t = _data(7, 50, 16, torch.float16, ignore_index=3, n_ignored=2)
    _check(x, w, b, t, ignore_index=3, chunk_v=24)


def test_all_ignored():
    x, w, b, t = _data(4, 40, 16, torch.float32, n_ignored=4)
    xs = x.clone().requires_grad_()
    loss = linear_cross_entropy(xs, w, t, b, reduction="sum")
    loss.backward()
    assert loss.item() == 0.0 and xs.grad.abs().max().item() == 0.0
    assert torch.isnan(linear_cross_entropy(x, w, t, b, reduction="mean"))  # 0 / 0, as torch


def test_module():
    x, w, b, t = _data(6, 45, 16, torch.float32)
    loss = LinearCrossEntropyLoss(reduction="sum", label_smoothing=0.05)(x, w, t, b)
    ref = linear_cross_entropy_reference(x, w, t, b, reduction="sum", label_smoothing=0.05)
    torch.testing.assert_close(loss, ref, **LOSS_TOL[torch.float32])


@pytest.mark.parametrize("bad,err", [
    (dict(target=torch.randint(0, 10, (4,)).float()), TypeError),
    (dict(target=torch.randint(0, 10, (5,))), ValueError),
    (dict(target=torch.tensor([0, 1, 10, 2])), ValueError),
    (dict(target=torch.tensor([0, -1, 3, 2])), ValueError),
    (dict(reduction="avg"), ValueError),
    (dict(label_smoothing=1.5), ValueError),
    (dict(weight=torch.randn(10, 7)), ValueError),
    (dict(chunk_v=0), ValueError),
    (dict(forward_method="cublas"), ValueError),
])
def test_bad_inputs(bad, err):
    args = dict(x=torch.randn(4, 8), weight=torch.randn(10, 8), target=torch.tensor([0, 1, -100, 9]),
                reduction="mean", label_smoothing=0.0, chunk_v=None, forward_method=None)
    args.update(bad)
    with pytest.raises(err):
        linear_cross_entropy(args["x"], args["weight"], args["target"], reduction=args["reduction"],
                             label_smoothing=args["label_smoothing"], chunk_v=args["chunk_v"],
                             forward_method=args["forward_method"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 tl.dot needs a GPU")
@pytest.mark.parametrize("n,v,d,chunk_v", [(256, 256384, 1536, None), (1000, 5003, 200, 512)])
def test_bf16_gpu(n, v, d, chunk_v):
    x, w, b, t = _data(n, v, d, torch.bfloat16, bias=False, n_ignored=n // 10)
    _check(x, w, None, t, chunk_v=chunk_v)
    x, w, b, t = _data(n, v, d, torch.bfloat16, bias=True, n_ignored=n // 10)
    _check(x, w, b, t, reduction="none", label_smoothing=0.1, chunk_v=chunk_v)
    ref = linear_cross_entropy_reference(x, w, t, b, reduction="none")
    for method in ("fused", "chunked"):
        loss = linear_cross_entropy(x, w, t, b, reduction="none", chunk_v=chunk_v, forward_method=method)
        torch.testing.assert_close(loss, ref, **LOSS_TOL[torch.bfloat16])


def test_dx_accumulator_borrows_dw_tail():
    """16-bit weights: the fp32 dx accumulator sits in dW's last rows (no extra memory) when they fit."""
    from univigu_fast.kernels.linear_cross_entropy import _dx_accumulator

    x = torch.zeros(13, 24, dtype=torch.float16)
    dw = torch.empty(300, 24, dtype=torch.float16)
    acc, tail = _dx_accumulator(13, 24, x, dw, 300, 32)
    assert acc.dtype == torch.float32 and acc.shape == (13, 24) and tail == 256
    start = dw.data_ptr() + tail * 24 * 2
    assert start <= acc.data_ptr() and acc.data_ptr() + acc.numel() * 4 <= dw.data_ptr() + dw.numel() * 2
    acc2, tail2 = _dx_accumulator(13, 24, x, torch.empty(40, 24, dtype=torch.float16), 40, 32)  # too small
    assert tail2 == 40 and acc2.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("method", ["fused", "chunked"])
def test_forward_methods(dtype, method):
    """Both forward statistics paths (fused Triton kernel / GEMM chunks + online stats) match."""
    x, w, b, t = _data(10, 130, 24, dtype)
    _check(x, w, b, t, chunk_v=48, reduction="sum", label_smoothing=0.1)
    loss = linear_cross_entropy(x, w, t, b, reduction="none", label_smoothing=0.1, chunk_v=48, forward_method=method)
    ref = linear_cross_entropy_reference(x, w, t, b, reduction="none", label_smoothing=0.1)
    torch.testing.assert_close(loss, ref, **LOSS_TOL[dtype])
    x, w, _, t = _data(10, 130, 24, dtype, bias=False)
    loss = linear_cross_entropy(x, w, t, None, chunk_v=64, forward_method=method)
    torch.testing.assert_close(loss, linear_cross_entropy_reference(x, w, t), **LOSS_TOL[dtype])


@pytest.mark.parametrize("method", ["fused", "chunked"])
def test_bias_masking_whole_chunks_of_ids(method):
    """A bias of -inf over whole vocabulary tiles / chunks (the first one too) gives the reference's
    loss and gradients, not NaN (targets are never masked ids)."""
    x, w, b, t = _data(10, 200, 24, torch.float32)
    b = b.clone()
    b[:64] = float("-inf")
    t = torch.where((t >= 0) & (t < 64), t + 64, t)  # ignored rows keep ignore_index
    loss = linear_cross_entropy(x, w, t, b, chunk_v=64, forward_method=method)
    torch.testing.assert_close(loss, linear_cross_entropy_reference(x, w, t, b), **LOSS_TOL[torch.float32])
    _check(x, w, b, t, chunk_v=64, grads=(True, True, False))


@pytest.mark.parametrize("method", ["fused", "chunked"])
def test_nan_rows_that_are_ignored_and_infinite_logits(method):
    """A row of NaN logits whose target is ignore_index leaves the loss as the reference's (the fused kernel
    raised 'All-NaN slice' in the interpreter); a +inf logit on a non-target id gives the loss's exact
    value, inf (torch's log_softmax gives NaN there)."""
    x, w, b, t = _data(8, 200, 24, torch.float32)
    x = x.clone()
    x[1, 0] = float("nan")
    t = t.clone()
    t[1] = -100
    got = linear_cross_entropy(x, w, t, b, chunk_v=64, forward_method=method)
    want = linear_cross_entropy_reference(x, w, t, b)
    assert torch.isfinite(want)
    torch.testing.assert_close(got, want, **LOSS_TOL[torch.float32])
    x[1, 0] = 0.0
    b = b.clone()
    b[150] = float("inf")
    t = torch.where(t == 150, 151, t)
    got = linear_cross_entropy(x, w, t, b, chunk_v=64, forward_method=method, reduction="none")
    assert torch.isinf(got[t != -100]).all() and (got[t == -100] == 0).all()


def test_int32_target_with_an_ignore_index_outside_int32():
    """An ``ignore_index`` no int32 target can hold ignores no row, as in the reference's int64 comparison:
    compared in int32 it wrapped (2**32 matched every target 0: loss 10.01 vs 8.39)."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(6, 16, generator=g), torch.randn(40, 16, generator=g)
    target = torch.tensor([0, 3, 0, 7, 0, 39], dtype=torch.int32)
    for ignore_index in (2**32, -(2**40)):
        got = linear_cross_entropy(x, w, target, ignore_index=ignore_index)
        want = linear_cross_entropy_reference(x, w, target, ignore_index=ignore_index)
        torch.testing.assert_close(got, want, **LOSS_TOL[torch.float32])


def test_double_backward_is_refused_clearly():
    """create_graph=True gave 'mm(): functions with out=... arguments don't support automatic
    differentiation' from inside the backward; it is refused by name (a gradient without a graph would
    silently drop a gradient penalty's second-order term)."""
    x, w, b, t = _data(6, 80, 16, torch.float32)
    x = x.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="linear_cross_entropy has no double backward"):
        torch.autograd.grad(linear_cross_entropy(x, w, t, b), x, create_graph=True)
    (gx,) = torch.autograd.grad(linear_cross_entropy(x, w, t, b), x)
    torch.testing.assert_close(gx, torch.autograd.grad(linear_cross_entropy_reference(x, w, t, b), x)[0],
                               atol=1e-5, rtol=1e-4)


def test_strided_bias_and_transposed_weight():
    """The cuBLAS-chunked statistics read the bias through a pointer (a bias[::2] view gave a loss off by
    1.35), and dW of a transposed fp16 weight over several vocabulary chunks failed on a view."""
    x, w, b, t = _data(6, 80, 16, torch.float32)
    b_full = torch.randn(160, device=DEV)
    for method in ("chunked", "fused"):
        got = linear_cross_entropy(x, w, t, b_full[::2], forward_method=method)
        torch.testing.assert_close(got, linear_cross_entropy_reference(x, w, t, b_full[::2]), **LOSS_TOL[torch.float32])
    x, w, b, t = _data(4, 600, 16, torch.float16)
    _check(x, w.t().contiguous().t(), b, t, chunk_v=256)


def test_bias_dtype_must_match_x():
    """The backward recomputes the logits in x's dtype: an fp32 bias beside fp16 x would be rounded (and
    overflow above 65504, giving inf / NaN gradients), so it is refused by name."""
    x, w, b, t = _data(6, 20, 8, torch.float16)
    with pytest.raises(TypeError, match="bias dtype torch.float32 must match x dtype torch.float16"):
        linear_cross_entropy(x, w, t, b.float())
