"""Fused linear argmax / sample (kernels/linear_argmax.py) against its pure-PyTorch reference.

On CPU the Triton kernels run in the interpreter (fp32, fp16, tiny ragged shapes); the bf16 tests
run only on a GPU.
"""
import pytest
import torch

from univigu_fast.kernels import linear_argmax as la
from univigu_fast.kernels._utils import tma_compatible
from univigu_fast.kernels.linear_argmax import (
    INTERPRETER_BLOCKS,
    SAMPLE_GROUP,
    _linear_argmax_launch,
    linear_argmax,
    linear_argmax_reference,
    linear_sample_reference,
    philox4x32_reference,
)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=1e-4),
       torch.bfloat16: dict(atol=2e-2, rtol=1e-3)}
# df = V - 1 chi-square critical values at p = 1e-4 (fixed threshold; seeds are fixed, so deterministic)
CHI2_CRIT = {11: 37.37, 12: 39.13, 36: 76.36}
# sampling launches tile the vocabulary in groups of SAMPLE_GROUP ids; rows and dim stay small
SAMPLE_BLOCKS = {"BLOCK_N": 128, "BLOCK_V": SAMPLE_GROUP, "BLOCK_D": 16}


def _planted(n, v, d, dtype, seed=0, bias=True, margin=3.0):
    """x (n, d), w (v, d), bias (v,) with a clear winner per row (no near-ties)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(v, d, generator=g)
    x = torch.randn(n, d, generator=g)
    win = torch.randint(0, v, (n,), generator=g)
    x = x + margin * w[win] / w[win].norm(dim=1, keepdim=True)
    b = 0.1 * torch.randn(v, generator=g) if bias else None
    x, w = x.to(dtype), w.to(dtype)
    b = b.to(dtype) if b is not None else None
    # guard: the top-2 gap of the reference logits is far above any accumulation-order error
    logits = x.float() @ w.float().t() + (b.float() if b is not None else 0)
    top2 = logits.topk(2, dim=1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 0.05, "test data has a near-tie"
    return x.to(DEV), w.to(DEV), (b.to(DEV) if b is not None else None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,v,d,bias", [(37, 301, 40, True), (1, 97, 24, False), (20, 33, 17, True)])
def test_argmax_matches_reference(dtype, n, v, d, bias):
    x, w, b = _planted(n, v, d, dtype, bias=bias)
    ids, mx, lse = linear_argmax(x, w, b)
    rids, rmx, rlse = linear_argmax_reference(x, w, b)
    assert ids.dtype == torch.int64 and mx.dtype == torch.float32 and lse.dtype == torch.float32
    torch.testing.assert_close(ids, rids, atol=0, rtol=0)
    torch.testing.assert_close(mx, rmx, **TOL[dtype])
    torch.testing.assert_close(lse, rlse, **TOL[dtype])


@pytest.mark.parametrize("masked", [slice(0, 128), slice(64, 128), slice(128, 200)])
def test_bias_masking_whole_tiles_of_ids(masked):
    """A bias of -inf over whole vocabulary tiles (masked ids; also the first tile, and every split's
    last) gives the reference's logsumexp, not NaN; sampling never draws a masked id."""
    x, w, b = _planted(9, 200, 24, torch.float32, margin=6.0)
    b = b.clone()
    b[masked] = float("-inf")
    ids, mx, lse = linear_argmax(x, w, b)
    rids, rmx, rlse = linear_argmax_reference(x, w, b)
    torch.testing.assert_close(ids, rids, atol=0, rtol=0)
    torch.testing.assert_close(lse, rlse, **TOL[torch.float32])
    assert torch.isfinite(lse).all()
    for splits in (1, 3):
        _, _, lse2 = _linear_argmax_launch(x, w, b, num_splits=splits)[:3]
        torch.testing.assert_close(lse2, rlse, **TOL[torch.float32])
    sids, _, slse = linear_argmax(x, w, b, gumbel_seed=3)
    rsids = linear_argmax_reference(x, w, b, gumbel_seed=3)[0]
    keep = torch.ones(200, dtype=torch.bool)
    keep[masked] = False
    assert keep[sids.cpu()].all() and keep[rsids.cpu()].all()
    torch.testing.assert_close(slse, rlse, **TOL[torch.float32])
    # every id masked: logsumexp -inf, as torch.logsumexp
    _, _, lse_all = linear_argmax(x, w, torch.full_like(b, float("-inf")))
    assert (lse_all == float("-inf")).all()


def test_infinite_and_nan_logits_rank_as_torch_does():
    """A +inf logit (a bias forcing ids 7 and 250) wins, with max_logit and logsumexp inf (exp(inf - inf)
    gave a NaN logsumexp, and sampling drew ids of probability 0). NaN logits rank as torch.argmax ranks
    them, the first NaN id even beside a +inf, with NaN max_logit and logsumexp, when sampling too (the
    kernel skipped them; a whole NaN row made the interpreter raise 'All-NaN slice')."""
    x, w, b = _planted(6, 300, 24, torch.float32, margin=6.0)
    b_inf, w_nan, x_nan = b.clone(), w.clone(), x.clone()
    b_inf[[7, 250]] = float("inf")
    w_nan[140, 0] = float("nan")  # id 140's logit is NaN in every row
    x_nan[2, 0] = float("nan")    # row 2's logits are all NaN
    close = dict(atol=1e-4, rtol=1e-5, equal_nan=True)
    # both in one row (an overflowed hidden state gives +inf and inf - inf = NaN logits): NaN outranks +inf
    for xx, ww, bb, want in ((x, w, b_inf, 7), (x, w_nan, b, 140), (x_nan, w, b, None), (x, w_nan, b_inf, 140)):
        for seed in (None, 3):
            got = linear_argmax(xx, ww, bb, gumbel_seed=seed)
            ref = linear_argmax_reference(xx, ww, bb, gumbel_seed=seed)
            torch.testing.assert_close(got[0], ref[0], atol=0, rtol=0)
            torch.testing.assert_close(got[1], ref[1], **close)
            torch.testing.assert_close(got[2], ref[2], **close)
            if want is not None:
                assert (got[0] == want).all()
        for splits in (1, 3):
            ids, mx, lse = _linear_argmax_launch(xx, ww, bb, num_splits=splits)[:3]
            ref = linear_argmax_reference(xx, ww, bb)
            torch.testing.assert_close(ids, ref[0], atol=0, rtol=0)
            torch.testing.assert_close(mx, ref[1], **close)
            torch.testing.assert_close(lse, ref[2], **close)
    assert linear_argmax(x_nan, w, b)[0][2] == 0 and linear_argmax(x_nan, w, b)[2][2].isnan()


def test_grouped_launch_many_row_blocks():
    """More row blocks than GROUP_ROWS (10 blocks of 16 rows: a full group of 8 and a ragged one)."""
    x, w, b = _planted(150, 70, 32, torch.float32, seed=2)
    rids, rmx, rlse = linear_argmax_reference(x, w, b)
    for splits in (1, 3):
        ids, mx, lse = _linear_argmax_launch(x, w, b, num_splits=splits)[:3]
        torch.testing.assert_close(ids, rids, atol=0, rtol=0)
        torch.testing.assert_close(mx, rmx, **TOL[torch.float32])
        torch.testing.assert_close(lse, rlse, **TOL[torch.float32])


def test_temperature_scales_outputs_not_ids():
    x, w, b = _planted(9, 70, 24, torch.float32)
    ids, mx, lse = linear_argmax(x, w, b, temperature=0.5)
    rids, rmx, rlse = linear_argmax_reference(x, w, b, temperature=0.5)
    torch.testing.assert_close(ids, rids, atol=0, rtol=0)
    torch.testing.assert_close(mx, rmx, **TOL[torch.float32])
    torch.testing.assert_close(lse, rlse, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_exact_ties_resolve_to_lowest_id(dtype):
    """Integer data: exact ties within a tile, across tiles and across splits -> lowest id."""
    v, d = 300, 24
    g = torch.Generator().manual_seed(1)
    w = torch.randint(-2, 3, (v, d), generator=g).float()
    w[[100, 40, 3, 299]] = 3.0     # row 0 (x = +1): max 3 d at ids 3, 40, 100, 299 -> 3
    w[[250, 42, 41]] = -3.0        # row 1 (x = -1): max 3 d at ids 41, 42, 250 -> 41
    x = torch.stack([torch.ones(d), -torch.ones(d), torch.zeros(d)])  # row 2: all logits 0 -> 0
    x, w = x.to(dtype).to(DEV), w.to(dtype).to(DEV)
    expect = torch.tensor([3, 41, 0], device=DEV)
    for splits in (1, 3, 7):
        ids, mx, _ = _linear_argmax_launch(x, w, None, num_splits=splits)[:3]
        torch.testing.assert_close(ids, expect, atol=0, rtol=0)
        torch.testing.assert_close(mx, torch.tensor([3.0 * d, 3.0 * d, 0.0], device=DEV))
    torch.testing.assert_close(linear_argmax_reference(x, w)[0], expect, atol=0, rtol=0)


def test_sample_deterministic_and_tiling_independent():
    x, w, b = _planted(21, 300, 20, torch.float32, margin=6.0)  # three vocabulary groups
    ids1, mx1, lse1 = linear_argmax(x, w, b, gumbel_seed=1234, temperature=3.0)
    ids1b, _, _ = linear_argmax(x, w, b, gumbel_seed=1234, temperature=3.0)
    torch.testing.assert_close(ids1, ids1b, atol=0, rtol=0)
    # other row tilings / dim blockings / split counts draw the same noise: Philox keyed on
    # (seed, group, row) only
    for blocks, splits in (({"BLOCK_N": 32, "BLOCK_V": SAMPLE_GROUP, "BLOCK_D": 32}, 1),
                           ({"BLOCK_N": 16, "BLOCK_V": SAMPLE_GROUP, "BLOCK_D": 16}, 3)):
        ids2 = _linear_argmax_launch(x, w, b, gumbel_seed=1234, temperature=3.0, num_splits=splits, blocks=blocks)[0]
        torch.testing.assert_close(ids1, ids2, atol=0, rtol=0)
    ids3, _, _ = linear_argmax(x, w, b, gumbel_seed=99, temperature=3.0)
    assert (ids3 != ids1).any(), "different seeds gave identical samples"
    # max_logit is the un-noised tempered logit of the sampled id; logsumexp of logits / T
    logits = (x.float() @ w.float().t() + b.float()) / 3.0
    torch.testing.assert_close(mx1, logits.gather(1, ids1[:, None]).squeeze(1), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(lse1, torch.logsumexp(logits, 1), atol=1e-4, rtol=1e-5)
    # a tile that is not one sampling group is refused, not sampled differently
    with pytest.raises(ValueError, match="BLOCK_V"):
        _linear_argmax_launch(x, w, b, gumbel_seed=1, blocks={"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_D": 16})


def test_philox_reference_known_answer():
    """Random123's Philox4x32-10 known-answer vectors (counter 0 / key 0; all-ones counter and key)."""
    z = torch.zeros(1, dtype=torch.int64)
    assert [int(w) for w in philox4x32_reference(0, z, z, z, z)] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    f = torch.full((1,), 0xFFFFFFFF, dtype=torch.int64)
    assert [int(w) for w in philox4x32_reference(2**64 - 1, f, f, f, f)] == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sample_equals_reference_stream(dtype):
    """The kernel's samples are the reference's: same Philox stream, same two-level draw (rows
    within floating-point noise of a decision boundary are not compared)."""
    x, w, b = _planted(37, 301, 40, dtype, margin=0.5)
    for seed, temp in ((7, 1.0), (2**33 + 5, 2.5)):
        ids, mx, lse = linear_argmax(x, w, b, gumbel_seed=seed, temperature=temp)
        rids, rmx, rlse = linear_argmax_reference(x, w, b, gumbel_seed=seed, temperature=temp)
        logits = (x.float() @ w.float().t() + b.float()) / temp
        _, group_margin, pick_margin = linear_sample_reference(logits, seed)
        clear = (group_margin > 1e-3) & (pick_margin > 1e-3)
        assert clear.sum() >= 30
        torch.testing.assert_close(ids[clear], rids[clear], atol=0, rtol=0)
        assert (ids != logits.argmax(1)).any()  # the noise does change some ids
        torch.testing.assert_close(mx[clear], rmx[clear], **TOL[dtype])
        torch.testing.assert_close(lse, rlse, **TOL[dtype])


@pytest.mark.parametrize("v,temperature", [(13, 0.7), (37, 1.5)])
def test_sample_distribution_chi_square(v, temperature):
    """Empirical distribution over rows x seeds matches softmax(logits / T) (chi-square, p = 1e-4)."""
    d, rows = 8, 1024
    g = torch.Generator().manual_seed(v)
    w = torch.randn(v, d, generator=g)
    b = torch.randn(v, generator=g)
    x = torch.randn(1, d, generator=g).expand(rows, d).contiguous()  # identical rows: i.i.d. draws
    x, w, b = x.to(DEV), w.to(DEV), b.to(DEV)
    counts = torch.zeros(v, dtype=torch.float64)
    for seed in (0, 1, 2**40 + 7):
        ids = _linear_argmax_launch(x, w, b, gumbel_seed=seed, temperature=temperature, blocks=SAMPLE_BLOCKS)[0]
        counts += torch.bincount(ids.cpu(), minlength=v).double()
    p = torch.softmax((x[0].float() @ w.float().t() + b.float()).cpu().double() / temperature, 0)
    expected = counts.sum() * p
    stat = ((counts - expected) ** 2 / expected).sum().item()
    assert stat < CHI2_CRIT[v - 1], f"chi-square {stat:.1f} >= {CHI2_CRIT[v - 1]} (df {v - 1})"
    # and the reference sampler draws from the same distribution
    rc = torch.zeros(v, dtype=torch.float64)
    for seed in range(3):
        rc += torch.bincount(linear_argmax_reference(x, w, b, gumbel_seed=seed, temperature=temperature)[0].cpu(),
                             minlength=v).double()
    assert ((rc - expected) ** 2 / expected).sum().item() < CHI2_CRIT[v - 1]


def test_sample_distribution_across_groups_chi_square():
    """Both levels of the draw together: 12 ids spread over three vocabulary groups (two of them in
    different splits) carry all the mass (the other 288 sit 40 nats lower); the empirical counts over
    rows x seeds match softmax over the 12 (chi-square, p = 1e-4), and no other id is ever drawn."""
    v, d, rows = 3 * SAMPLE_GROUP - 84, 8, 1024
    live = torch.tensor([0, 5, 77, 127, 128, 130, 200, 255, 256, 270, 290, v - 1])
    g = torch.Generator().manual_seed(3)
    w = torch.randn(v, d, generator=g)
    b = torch.full((v,), -40.0)
    b[live] = torch.randn(len(live), generator=g)
    x = torch.randn(1, d, generator=g).expand(rows, d).contiguous()
    x, w, b = x.to(DEV), w.to(DEV), b.to(DEV)
    counts = torch.zeros(v, dtype=torch.float64)
    for seed, splits in ((0, 1), (1, 2), (2**40 + 7, 3)):
        ids = _linear_argmax_launch(x, w, b, gumbel_seed=seed, temperature=1.0, num_splits=splits,
                                    blocks=SAMPLE_BLOCKS)[0]
        counts += torch.bincount(ids.cpu(), minlength=v).double()
    dead = torch.ones(v, dtype=torch.bool)
    dead[live] = False
    assert counts[dead].sum() == 0
    p = torch.softmax((x[0].float() @ w.float().t() + b.float()).cpu().double()[live], 0)
    expected = counts.sum() * p
    stat = ((counts[live] - expected) ** 2 / expected).sum().item()
    assert stat < CHI2_CRIT[11], f"chi-square {stat:.1f} >= {CHI2_CRIT[11]} (df 11)"
    assert (counts[live[:4]].sum() > 0) and (counts[live[4:8]].sum() > 0) and (counts[live[8:]].sum() > 0)


def _check_all_outputs(x, w, b, tgt, blocks=None, config=None, sample_blocks=None, sample_config=None, tol=None):
    """Argmax, cross-entropy statistics (target logit, logit sum) and a sample of one launch
    configuration against the reference (sampled rows near a decision boundary set aside)."""
    tol = tol or TOL[x.dtype]
    logits = x.float() @ w.float().t() + b.float()
    rids, rmx, rlse = linear_argmax_reference(x, w, b)
    ids, mx, lse, zt, zs = _linear_argmax_launch(x, w, b, target=tgt, sum_logits=True, blocks=blocks, config=config)
    torch.testing.assert_close(ids, rids, atol=0, rtol=0)
    plain = _linear_argmax_launch(x, w, b, blocks=blocks, config=config)  # the argmax-only specialisation
    torch.testing.assert_close(plain[0], rids, atol=0, rtol=0)
    torch.testing.assert_close(plain[2], rlse, **tol)
    torch.testing.assert_close(mx, rmx, **tol)
    torch.testing.assert_close(lse, rlse, **tol)
    valid = (tgt >= 0) & (tgt < w.shape[0])
    rzt = torch.where(valid, logits.gather(1, tgt.clamp(0, w.shape[0] - 1).long()[:, None]).squeeze(1), 0.0)
    torch.testing.assert_close(zt, rzt, **tol)
    torch.testing.assert_close(zs, logits.sum(1), atol=tol["atol"] * w.shape[0] ** 0.5, rtol=tol["rtol"])
    if sample_blocks is None and sample_config is None:
        return
    sids = _linear_argmax_launch(x, w, b, gumbel_seed=17, blocks=sample_blocks, config=sample_config)[0]
    rs, group_margin, pick_margin = linear_sample_reference(logits, 17)
    clear = (group_margin > 1e-2) & (pick_margin > 1e-2)
    assert clear.float().mean() > 0.8
    torch.testing.assert_close(sids[clear], rs[clear], atol=0, rtol=0)


@pytest.mark.parametrize("n,v,d", [(37, 301, 40), (1, 97, 24), (20, 300, 56)])
def test_tma_loads_match_reference(n, v, d):
    """The USE_TMA configs (Hopper) read x / W through TMA descriptors, zero-filled past the ends of
    the tensors: ragged N and V, dim not a multiple of BLOCK_D. Argmax, cross-entropy statistics and
    sampling equal the reference as the pointer loads do."""
    x, w, b = _planted(n, v, d, torch.float16)
    tgt = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(3), dtype=torch.int32).to(DEV)
    tgt[::5] = -1  # ignored rows: target logit 0
    assert tma_compatible(x, w)
    _check_all_outputs(x, w, b, tgt, blocks=dict(INTERPRETER_BLOCKS, USE_TMA=True),
                       sample_blocks=dict(INTERPRETER_BLOCKS, BLOCK_V=SAMPLE_GROUP, USE_TMA=True))


def test_tma_refused_where_the_copy_engine_cannot_load():
    """fp32 operands, a row stride that is not a multiple of 16 bytes, a base that is not 16-byte
    aligned: no TMA. Forcing it is an error naming USE_TMA; the default launch takes the pointer loads."""
    x, w, b = _planted(9, 70, 20, torch.float16)  # 40-byte rows
    buf = torch.empty(9 * 24 + 1, dtype=torch.float16, device=DEV)
    shifted = buf[1:].view(9, 24)  # 2 bytes off a 16-byte boundary
    shifted.copy_(_planted(9, 70, 24, torch.float16)[0])
    for xx, ww in ((x.float(), w.float()), (x, w), (shifted, _planted(9, 70, 24, torch.float16)[1])):
        assert not tma_compatible(xx, ww)
        with pytest.raises(ValueError, match="USE_TMA"):
            _linear_argmax_launch(xx, ww, None, blocks=dict(INTERPRETER_BLOCKS, USE_TMA=True))
        torch.testing.assert_close(linear_argmax(xx, ww)[0], linear_argmax_reference(xx, ww)[0], atol=0, rtol=0)


@pytest.mark.parametrize("seed", [None, 5])
def test_compile_traces_without_graph_break(seed):
    """The fused decode is one opaque op to torch.compile (argmax and sampling, fullgraph)."""
    x, w, b = _planted(37, 301, 40, torch.float16)

    def f(x, w, b):
        return linear_argmax(x, w, b, gumbel_seed=seed, temperature=0.7)

    got = torch.compile(f, backend="aot_eager", fullgraph=True)(x, w, b)
    for a, e in zip(got, f(x, w, b)):
        torch.testing.assert_close(a, e, atol=0, rtol=0)


def test_empty_rows():
    w = torch.randn(50, 16, device=DEV)
    ids, mx, lse = linear_argmax(torch.randn(0, 16, device=DEV), w)
    assert ids.shape == (0,) and mx.shape == (0,) and lse.shape == (0,)


@pytest.mark.parametrize("bad,err", [
    (dict(x=torch.randn(3, 4, 8)), ValueError),
    (dict(weight=torch.randn(10, 7)), ValueError),
    (dict(weight=torch.randn(10, 8, dtype=torch.float64)), TypeError),
    (dict(x=torch.randn(3, 8).half()), TypeError),
    (dict(bias=torch.randn(11)), ValueError),
    (dict(temperature=0.0), ValueError),
    (dict(temperature=-1.0), ValueError),
    (dict(temperature=1e-38), ValueError),  # logits / T overflowed fp32: arbitrary ids, an inf logsumexp
    (dict(gumbel_seed=1.5), TypeError),
    (dict(gumbel_seed=-1), ValueError),
])
def test_bad_inputs(bad, err):
    args = dict(x=torch.randn(3, 8), weight=torch.randn(10, 8), bias=None, temperature=1.0, gumbel_seed=None)
    args.update(bad)
    with pytest.raises(err):
        linear_argmax(args["x"], args["weight"], args["bias"], temperature=args["temperature"],
                      gumbel_seed=args["gumbel_seed"])


def test_smallest_temperature_samples_the_argmax_with_finite_statistics():
    """At MIN_TEMPERATURE the sample is the argmax (noise T * Gumbel is far below the logit gaps) and
    the statistics of logits / T stay finite."""
    from univigu_fast.kernels.linear_argmax import MIN_TEMPERATURE

    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(6, 16, generator=g), torch.randn(37, 16, generator=g)
    ids, mx, lse = linear_argmax(x, w, gumbel_seed=2, temperature=MIN_TEMPERATURE)
    assert torch.equal(ids, (x @ w.t()).argmax(-1))
    assert torch.isfinite(mx).all() and torch.isfinite(lse).all()
    torch.testing.assert_close(lse, mx, rtol=1e-5, atol=0)  # all the mass on the max


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf"), 1e-7, 1e-38])
def test_reference_refuses_bad_temperature_too(temperature):
    """The reference model decodes with the reference: it refuses what the kernel refuses (a negative
    temperature sampled from softmax(-logits / |T|), 0 divided by zero)."""
    with pytest.raises(ValueError, match="temperature must be finite and >= 1e-06"):
        linear_argmax_reference(torch.randn(3, 8), torch.randn(10, 8), gumbel_seed=1, temperature=temperature)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 tl.dot needs a GPU")
@pytest.mark.parametrize("n,v,d", [(1, 256384, 1536), (256, 256384, 1536), (300, 5001, 200)])
def test_argmax_bf16_gpu(n, v, d):
    x, w, b = _planted(n, v, d, torch.bfloat16, bias=False, margin=6.0)
    ids, mx, lse = linear_argmax(x, w, b)
    rids, rmx, rlse = linear_argmax_reference(x, w, b)
    torch.testing.assert_close(ids, rids, atol=0, rtol=0)
    torch.testing.assert_close(mx, rmx, **TOL[torch.bfloat16])
    torch.testing.assert_close(lse, rlse, **TOL[torch.bfloat16])
    # sampling on GPU: deterministic, the reference's draw, and at a very low temperature
    # it is the argmax
    s1 = linear_argmax(x, w, b, gumbel_seed=3, temperature=40.0)[0]
    torch.testing.assert_close(s1, linear_argmax(x, w, b, gumbel_seed=3, temperature=40.0)[0], atol=0, rtol=0)
    logits = (x.float() @ w.float().t()) / 40.0
    rs, group_margin, pick_margin = linear_sample_reference(logits, 3)
    clear = (group_margin > 1e-2) & (pick_margin > 1e-2)
    torch.testing.assert_close(s1[clear], rs[clear], atol=0, rtol=0)
    del logits
    torch.testing.assert_close(linear_argmax(x, w, b, gumbel_seed=3, temperature=1e-3)[0], rids, atol=0, rtol=0)


@pytest.mark.skipif(DEV != "cpu", reason="the interpreter's check of the GPU tiles (on a GPU: the bf16 test below)")
@pytest.mark.parametrize("cfg", la._gpu_configs() if la.HAS_TRITON else [], ids=lambda c: "n{BLOCK_N}v{BLOCK_V}d{BLOCK_D}{t}-w{w}s{s}".format(
    **c.kwargs, t="-tma" if c.kwargs["USE_TMA"] else "", w=c.num_warps, s=c.num_stages))
def test_gpu_tile_shapes_in_the_interpreter(cfg):
    """Each GPU autotune config's tiles (up to 256 rows or 256 vocabulary columns, TMA boxes) in the
    interpreter, fp16: argmax, cross-entropy statistics and (128-wide vocabulary tiles) sampling at
    N, V and dim that are not multiples of the tiles (the other interpreter tests use small tiles)."""
    n = 9 if cfg.kwargs["BLOCK_N"] == 16 else 140
    x, w, b = _planted(n, 600, 200, torch.float16, seed=4, margin=6.0)
    tgt = torch.randint(0, 600, (n,), generator=torch.Generator().manual_seed(5), dtype=torch.int32).to(DEV)
    tgt[::7] = -100
    _check_all_outputs(x, w, b, tgt, config=cfg)
    if cfg.kwargs["BLOCK_V"] == SAMPLE_GROUP:  # sampling (a per-row second kernel: slow here, so fewer rows)
        _check_all_outputs(x[:24], w, b, tgt[:24], config=cfg, sample_config=cfg)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_every_gpu_config_matches_reference():
    """Each config of the autotune list, TMA and pointer loads, in bf16 (the autotuner may pick any):
    argmax, cross-entropy statistics and sampling at ragged N, V and dim."""
    x, w, b = _planted(300, 5001, 200, torch.bfloat16, margin=6.0)
    tgt = torch.randint(0, 5001, (300,), device=DEV, dtype=torch.int32)
    narrow_x = x[:8].contiguous()
    for cfg in la._gpu_configs():
        if cfg.kwargs["USE_TMA"] and not tma_compatible(x, w):
            continue
        xx = narrow_x if cfg.kwargs["BLOCK_N"] == 16 else x
        sample = cfg.kwargs["BLOCK_V"] == SAMPLE_GROUP
        _check_all_outputs(xx, w, b, tgt[: xx.shape[0]], config=cfg, sample_config=cfg if sample else None,
                           tol=TOL[torch.bfloat16])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_sample_distribution_gpu():
    v, d, rows = 37, 64, 65536
    g = torch.Generator().manual_seed(5)
    w = torch.randn(v, d, generator=g).bfloat16().cuda()
    x = torch.randn(1, d, generator=g).bfloat16().cuda().expand(rows, d).contiguous()
    ids = linear_argmax(x, w, gumbel_seed=11, temperature=1.3)[0]
    counts = torch.bincount(ids, minlength=v).double().cpu()
    p = torch.softmax((x[:1].float() @ w.float().t()).double().cpu()[0] / 1.3, 0)
    expected = rows * p
    assert ((counts - expected) ** 2 / expected).sum().item() < CHI2_CRIT[36]


def test_temperature_change_keeps_one_fullgraph_trace():
    """A second temperature makes Dynamo's float symbolic: the argument check must still trace."""
    import torch._dynamo

    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(6, 16, generator=g), torch.randn(37, 16, generator=g)
    f = torch.compile(lambda x, w, t: la.linear_argmax(x, w, gumbel_seed=3, temperature=t)[0], fullgraph=True,
                      backend="eager")
    for t in (1.0, 0.7):
        assert torch.equal(f(x, w, t), la.linear_argmax(x, w, gumbel_seed=3, temperature=t)[0])
    with pytest.raises(ValueError, match="temperature must be finite and >= 1e-06"):
        la.linear_argmax(x, w, temperature=float("nan"))


def test_reference_statistics_are_not_differentiable_like_the_kernel():
    """The decode is not differentiable: the reference's max_logit / logsumexp required grad (a loss on
    them trained the reference model only); under autocast its logits are still fp32."""
    x, w = torch.randn(4, 8, requires_grad=True), torch.randn(10, 8, requires_grad=True)
    for out in (linear_argmax_reference(x, w), linear_argmax(x, w)):
        assert not any(t.requires_grad for t in out)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, mx, lse = linear_argmax_reference(x, w)
    torch.testing.assert_close(lse, torch.logsumexp(x.detach() @ w.detach().t(), -1), rtol=1e-6, atol=1e-6)
