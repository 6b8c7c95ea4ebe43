"""Uni-flow math on hand-made tensors: paths, velocity targets, schedulers, loss weighting (paper Eq. 2-3,
7-8, 11; DESIGN §4)."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from univigu_fast.config import UniViGUConfig
from univigu_fast.flow import (FlowConfig, NoisedSample, PolynomialScheduler, combine, discrete_path, draw_sample,
                               generation_taus, loss_terms, sample_generator, source_tokens, text_inputs, video_path,
                               wan_shift)
from univigu_fast.modeling import UniViGUOutput


def test_video_path_and_velocity_hand_values():
    z1 = torch.tensor([[1.0, 2.0], [0.0, -4.0]])
    z0 = torch.tensor([[3.0, -1.0], [2.0, 2.0]])
    zt, u = video_path(z1, z0, torch.tensor(0.25))
    torch.testing.assert_close(zt, torch.tensor([[2.5, -0.25], [1.5, 0.5]]), rtol=0, atol=0)
    torch.testing.assert_close(u, torch.tensor([[-2.0, 3.0], [-2.0, -6.0]]), rtol=0, atol=0)
    # per-sample tau broadcasts over the trailing dims; tau = 0 -> noise, tau = 1 -> data
    zt, _ = video_path(z1, z0, torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(zt, torch.stack([z0[0], z1[1]]), rtol=0, atol=0)


def test_polynomial_scheduler_and_jump_probability():
    s2 = PolynomialScheduler(2.0)
    assert s2.kappa(0.5) == 0.25 and s2.dkappa(0.5) == 1.0
    # flow_matching's MixtureDiscreteEulerSolver: P(jump) = 1 - exp(-h kappa' / (1 - kappa))
    assert s2.jump_probability(0.5, 0.1) == pytest.approx(1 - math.exp(-0.1 * 1.0 / 0.75))
    s1 = PolynomialScheduler(1.0)
    assert s1.jump_probability(0.5, 0.1) == pytest.approx(1 - math.exp(-0.2))
    assert s1.jump_probability(0.9, 0.1) == pytest.approx(1 - math.exp(-1.0))
    assert s1.jump_probability(1.0, 0.1) == 1.0
    assert s1.jump_probability(0.0, 0.5) == pytest.approx(1 - math.exp(-0.5))
    assert PolynomialScheduler(0.5).jump_probability(0.0, 0.1) == 1.0  # kappa'(0) = inf
    torch.testing.assert_close(s2.dkappa(torch.tensor([0.5, 1.0])), torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="exponent"):
        PolynomialScheduler(0.0)


def test_discrete_mixture_path_probabilities():
    g = torch.Generator().manual_seed(0)
    x1 = torch.full((20000,), 7)
    x0 = torch.full((20000,), 3)
    assert torch.equal(discrete_path(x1, x0, 1.0, PolynomialScheduler(1.0), g), x1)
    assert torch.equal(discrete_path(x1, x0, 0.0, PolynomialScheduler(1.0), g), x0)
    for n, tau in ((1.0, 0.3), (2.0, 0.6)):
        frac = (discrete_path(x1, x0, tau, PolynomialScheduler(n), g) == 7).float().mean().item()
        assert abs(frac - tau**n) < 0.015, (n, tau, frac)
    u = source_tokens(5000, 11, "uniform", g)
    assert u.min() >= 0 and u.max() == 10
    assert torch.equal(source_tokens(4, 11, "mask", mask_token_id=11), torch.full((4,), 11))
    with pytest.raises(ValueError, match="source"):
        source_tokens(4, 11, "gauss")


def test_wan_flow_shift_grid():
    assert wan_shift(0.5, 3.0) == pytest.approx(0.75)
    taus = generation_taus(4, 1.0)
    assert taus == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    taus = generation_taus(4, 3.0)
    assert taus[0] == 0.0 and taus[-1] == 1.0
    assert taus[2] == pytest.approx(1 - 0.75)  # sigma 0.5 -> 0.75
    assert all(b > a for a, b in zip(taus, taus[1:]))
    with pytest.raises(ValueError, match="steps"):
        generation_taus(0)
    for shift in (0.1, 0.2, 0.45, 0.5, 7.0):  # 1 + (shift - 1) != shift in floating point for some (was tau -2e-16)
        taus = generation_taus(7, shift)
        assert taus[0] == 0.0 and taus[-1] == 1.0 and all(b > a for a, b in zip(taus, taus[1:]))


def _fake_model(text_flow="discrete", vocab=5, dim=4):
    cfg = UniViGUConfig.tiny(vocab_size=vocab, num_attention_heads=1, attention_head_dim=dim, text_flow=text_flow)
    torch.manual_seed(0)
    emb = nn.Embedding(cfg.text_vocab_size, cfg.dim)  # N(0, 1) rows: nearly orthogonal at dim 64
    return SimpleNamespace(config=cfg, device=torch.device("cpu"), vocab_embed=emb)


def _sample(mode, video_target, text_target, tau_t=0.5, noise=None):
    return NoisedSample(mode, 0.5, tau_t, None, video_target, None, text_target, noise, None, False)


def test_loss_weighting_token_count_normalised_discrete():
    m = _fake_model("discrete", vocab=5)  # 4 latent channels, (1, 2, 2) patch: 16 latent values per video token
    shape = (4, 1, 2, 6)  # 3 video tokens
    vt = [torch.randn(shape), torch.zeros(shape), torch.randn(shape)]
    vp = [torch.zeros(shape), torch.full(shape, 2.0), torch.randn(shape)]
    y = [torch.tensor([1, 2, 3]), torch.tensor([4]), torch.tensor([0, 0])]
    logits = [torch.randn(3, 5), torch.randn(1, 5), torch.randn(2, 5)]
    samples = [_sample("joint", vt[0], y[0]), _sample("understanding", vt[1], y[1]), _sample("generation", vt[2], y[2])]
    terms = loss_terms(m, samples, UniViGUOutput(vp, logits))
    # video: joint + generation samples count (6 tokens); understanding (tau_v = 1) does not
    per_token = [((vp[i] - vt[i]) ** 2).reshape(4, 1, 1, 2, 3, 2).sum((0, 3, 5)).flatten() for i in (0, 2)]
    want_v = torch.cat(per_token)  # each token's squared norm over its 4 x 1 x 2 x 2 latent values
    assert terms["video_count"].item() == 6 == want_v.numel()
    torch.testing.assert_close(terms["video_sum"], want_v.sum())
    # text: joint + understanding count (4 tokens in all), generation (tau_t = 1) does not
    ce = torch.cat([F.cross_entropy(logits[0], y[0], reduction="none"), F.cross_entropy(logits[1], y[1], reduction="none")])
    assert terms["text_count"].item() == 4
    torch.testing.assert_close(terms["text_sum"], ce.sum())
    loss = combine(terms, FlowConfig())
    # Eq. 11 with lambda_v = 1, lambda_t = |z_v| / |z_t|, normalised by |z_v|: the per-token means, added
    torch.testing.assert_close(loss, want_v.mean() + ce.mean())
    # token-count normalisation is over all tokens of the batch, not a mean of per-sample means
    assert not math.isclose(loss.item(), (want_v.mean() + (ce[:3].mean() + ce[3:].mean()) / 2).item(), rel_tol=1e-4)
    # lambda_v and the text weight scale their terms
    torch.testing.assert_close(combine(terms, FlowConfig(video_weight=0.5, text_weight=2.0)),
                               0.5 * want_v.mean() + 2 * ce.mean())
    # loss_unit="element": Wan's per-element MSE for video (the cross-entropy stays per token)
    terms = loss_terms(m, samples, UniViGUOutput(vp, logits), "element")
    assert terms["video_count"].item() == 6 * 16 and terms["text_count"].item() == 4
    torch.testing.assert_close(combine(terms, FlowConfig(loss_unit="element")), want_v.sum() / 96 + ce.mean())


def test_embedding_flow_inputs_targets_and_loss():
    m = _fake_model("embedding", vocab=6, dim=64)
    E = m.vocab_embed.weight.detach()
    y = torch.tensor([2, 5, 0])
    z0 = torch.randn(3, 64)
    s = _sample("understanding", torch.zeros(1), y, tau_t=0.3, noise=z0)
    (zt,) = text_inputs(m, [s])
    torch.testing.assert_close(zt, 0.7 * z0 + 0.3 * E[y])  # Eq. 7: z_t = (1 - tau) z0 + tau E[y]
    v = torch.randn(3, 64)
    terms = loss_terms(m, [s], UniViGUOutput([torch.zeros(1)], [v]))
    u = E[y] - z0  # Eq. 7 velocity target
    torch.testing.assert_close(terms["text_sum"], ((v - u) ** 2).sum())
    assert terms["text_count"].item() == 3 and terms["text_tokens"].item() == 3 and terms["video_count"].item() == 0
    assert loss_terms(m, [s], UniViGUOutput([torch.zeros(1)], [v]), "element")["text_count"].item() == 3 * 64
    # the exact velocity decodes (one Euler jump to tau = 1, then Eq. 8 argmax) to the right ids
    terms = loss_terms(m, [s], UniViGUOutput([torch.zeros(1)], [u]))
    assert terms["text_sum"].item() == 0 and terms["text_correct"].item() == 3
    # E is a fixed codebook: no gradient reaches it through the target
    assert not text_inputs(m, [s])[0].requires_grad


@pytest.mark.parametrize("text_flow", ["discrete", "embedding"])
def test_draw_sample_modes_pin_tau_and_keep_clean(text_flow):
    cfg = UniViGUConfig.tiny(text_flow=text_flow)
    video = torch.randn(4, 2, 4, 4)
    prompt, null = torch.randn(3, cfg.text_dim), torch.zeros(1, cfg.text_dim)
    y = torch.tensor([1, 2, 3, 4])
    fc = FlowConfig(cond_dropout=0.0)
    u = draw_sample(video, prompt, null, y, sample_generator(0, 0, 0), fc, cfg, mode="understanding")
    assert u.tau_video == 1.0 and torch.equal(u.video_in, video) and u.prompt is prompt
    gsm = draw_sample(video, prompt, null, y, sample_generator(0, 0, 1), fc, cfg, mode="generation")
    assert gsm.tau_text == 1.0
    if text_flow == "discrete":
        assert torch.equal(gsm.text_in, y)
    j = draw_sample(video, prompt, null, y, sample_generator(0, 0, 2), fc, cfg, mode="joint")
    assert 0 <= j.tau_video < 1 and 0 <= j.tau_text < 1
    z0 = (j.video_in - j.tau_video * video) / (1 - j.tau_video)
    torch.testing.assert_close(j.video_target, video - z0, rtol=1e-4, atol=1e-4)
    # same (seed, step, index) -> same draw (sharding-invariant randomness)
    j2 = draw_sample(video, prompt, null, y, sample_generator(0, 0, 2), fc, cfg, mode="joint")
    assert torch.equal(j.video_in, j2.video_in) and j.tau_text == j2.tau_text
    # the mode mix draws only allowed modes, in proportion
    g = torch.Generator().manual_seed(0)
    mix = FlowConfig(mode_mix={"understanding": 3.0, "generation": 1.0})
    modes = [mix.draw_mode(g) for _ in range(2000)]
    assert set(modes) == {"understanding", "generation"}
    assert abs(modes.count("understanding") / 2000 - 0.75) < 0.04
    with pytest.raises(ValueError, match="mode_mix"):
        FlowConfig(mode_mix={"video": 1.0})
    with pytest.raises(ValueError, match="cond_dropout"):
        FlowConfig(cond_dropout=1.5)


def test_matches_flow_matching_library():
    """Cross-check against Meta's flow_matching (the public code's dependency; a dev requirement): the
    polynomial scheduler, the mixture path's token frequencies, and one step of its
    MixtureDiscreteEulerSolver (the fraction of tokens that jump to x1) against ``jump_probability``."""
    pytest.importorskip("flow_matching", reason="pip install -e '.[dev]' installs flow_matching")
    from flow_matching.path import MixtureDiscreteProbPath
    from flow_matching.path.scheduler import PolynomialConvexScheduler
    from flow_matching.solver import MixtureDiscreteEulerSolver
    from flow_matching.utils import ModelWrapper

    from univigu_fast.sampling import jump_probability

    t = torch.tensor([0.2, 0.7])
    out = PolynomialConvexScheduler(n=2.0)(t)
    torch.testing.assert_close(out.alpha_t, PolynomialScheduler(2.0).kappa(t))
    torch.testing.assert_close(out.d_alpha_t, PolynomialScheduler(2.0).dkappa(t))

    n, V = 40000, 11
    x0 = torch.zeros(n, dtype=torch.long)
    x1 = torch.ones(n, dtype=torch.long)
    for power, tau in ((1.0, 0.3), (2.0, 0.6)):  # fraction of x1 tokens on the path: both kappa(tau)
        path = MixtureDiscreteProbPath(PolynomialConvexScheduler(n=power))
        torch.manual_seed(0)
        theirs = path.sample(x_0=x0, x_1=x1, t=torch.full((n,), tau)).x_t.float().mean()
        ours = discrete_path(x1, x0, tau, PolynomialScheduler(power), torch.Generator().manual_seed(0)).float().mean()
        k = PolynomialScheduler(power).kappa(tau)
        assert abs(theirs - k) < 0.01 and abs(ours - k) < 0.01, (power, tau, float(theirs), float(ours), k)

    class OneHot(ModelWrapper):  # the posterior p(x1 | x_t) puts all mass on token 1
        def __init__(self):
            super().__init__(None)

        def forward(self, x, t, **extras):
            return F.one_hot(torch.ones_like(x), V).float()

    for power, tau, h in ((1.0, 0.3, 0.1), (2.0, 0.5, 0.2), (1.0, 0.05, 0.02)):
        solver = MixtureDiscreteEulerSolver(OneHot(), MixtureDiscreteProbPath(PolynomialConvexScheduler(n=power)), V)
        torch.manual_seed(1)
        steps = solver.sample(x_init=x0, step_size=None, time_grid=torch.tensor([tau, tau + h, 1.0]),
                              return_intermediates=True)
        jumped = float(steps[1].float().mean())  # after the first (non-final) step
        want = jump_probability(tau, h, power)
        assert abs(jumped - want) < 4 * (want * (1 - want) / n) ** 0.5 + 1e-3, (power, tau, h, jumped, want)


def test_draw_sample_checks_and_precision():
    """Unknown modes and mismatched batch lists are refused (zip dropped samples; a typo trained as
    joint); any int seed seeds the per-sample generator; bf16 latents get a float32 path and target."""
    from univigu_fast.flow import draw_batch

    cfg = UniViGUConfig.tiny()
    video, prompt, null, y = torch.randn(4, 2, 4, 4), torch.randn(3, cfg.text_dim), torch.zeros(1, cfg.text_dim), torch.tensor([1, 2])
    fc = FlowConfig()
    with pytest.raises(ValueError, match="mode must be one of"):
        draw_sample(video, prompt, null, y, sample_generator(0, 0, 0), fc, cfg, mode="understand")
    for kw, name in ((dict(prompts=[prompt]), "prompts"), (dict(text_ids=[y]), "text_ids"),
                     (dict(modes=["joint"]), "modes"), (dict(generation_texts=[y]), "generation_texts")):
        args = {**dict(videos=[video, video], prompts=[prompt, prompt], null_prompt=null, text_ids=[y, y]), **kw}
        with pytest.raises(ValueError, match=rf"{name} has 1 entries, expected one per video \(2\)"):
            draw_batch(**args, cfg=fc, model_config=cfg)
    for bad, match in (([y, torch.tensor([cfg.vocab_size])], r"text_ids\[1\] has ids outside \[0, vocab_size="),
                       ([y, torch.tensor([1.0])], r"text_ids\[1\] must be 1-D integer token ids")):
        with pytest.raises(ValueError, match=match):  # the loss failed on them with a bare IndexError
            draw_batch([video, video], [prompt, prompt], null, bad, cfg=fc, model_config=cfg)
    torch.testing.assert_close(video_path(video, video * 0, 0.25)[0], 0.25 * video)  # a float tau too
    for seed in (20240601, 2**40, -3):  # (seed * 1e6 + step) * 1e6 + index passed manual_seed's 2^64
        a = draw_sample(video, prompt, null, y, sample_generator(seed, 5, 1), fc, cfg, mode="joint")
        b = draw_sample(video, prompt, null, y, sample_generator(seed, 5, 1), fc, cfg, mode="joint")
        assert torch.equal(a.video_in, b.video_in)
    assert sample_generator(1, 2, 3).initial_seed() == (1 * 1_000_003 + 2) * 1_000_033 + 3  # small seeds unchanged
    vb = video.bfloat16()
    s32 = draw_sample(vb.float(), prompt, null, y, sample_generator(0, 0, 0), fc, cfg, mode="joint")
    s16 = draw_sample(vb, prompt, null, y, sample_generator(0, 0, 0), fc, cfg, mode="joint")
    assert s16.video_in.dtype == s16.video_target.dtype == torch.float32
    assert torch.equal(s16.video_in, s32.video_in) and torch.equal(s16.video_target, s32.video_target)


def test_nothing_counted_still_backpropagates():
    """A batch whose samples count no token (understanding with empty captions) gives a zero loss that
    backward accepts (it raised 'element 0 of tensors does not require grad')."""
    from _models import tiny_reference
    from univigu_fast.flow import uniflow_loss

    model = tiny_reference(seed=1).train()
    c = model.config
    videos = [torch.randn(c.in_channels, 1, 4, 4), torch.randn(c.in_channels, 1, 2, 2)]
    prompts = [torch.randn(2, c.text_dim)] * 2
    empty = [torch.zeros(0, dtype=torch.long)] * 2
    loss, terms, _ = uniflow_loss(model, videos, prompts, torch.zeros(1, c.text_dim), empty, cfg=FlowConfig(),
                                  modes=["understanding", "understanding"])
    assert loss.item() == 0 and terms["video_count"].item() == terms["text_count"].item() == 0
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("source", ["uniform", "mask"])
def test_fused_text_loss_is_the_logits_loss(fast, source):
    """Training's discrete text loss runs the fused linear cross-entropy inside the forward (``forward_samples``:
    ``text_output="cross_entropy"``, the (N, V) logits never formed): loss sums, token accuracy and every
    gradient equal those of the full logits + ``F.cross_entropy`` (modes mixed: generation's clean prompt
    text and an empty caption are not counted; the mask source's [MASK] column is a class of both)."""
    from _models import tiny_reference
    from univigu_fast.flow import draw_batch, forward_samples
    from univigu_fast.model import UniViGUModel as FastModel
    from univigu_fast.modeling import TextLoss

    ref = tiny_reference(seed=3, discrete_source=source).train()
    with torch.no_grad():
        ref.text_head.linear.bias[7] += 8.0  # the argmax is token 7: the targets below are half right
    model = ref
    if fast:
        model = FastModel(ref.config).train()
        model.load_state_dict(ref.state_dict())
    c = model.config
    g = torch.Generator().manual_seed(5)
    videos = [torch.randn(c.in_channels, 1, 4, 4, generator=g) for _ in range(4)]
    prompts = [torch.randn(3, c.text_dim, generator=g) for _ in range(4)]
    ids = [torch.randint(0, 7, (n,), generator=g) for n in (5, 3, 0, 4)]
    ids[0][::2], ids[1][1] = 7, 7
    samples = draw_batch(videos, prompts, torch.zeros(1, c.text_dim), ids, cfg=FlowConfig(), model_config=c, seed=2,
                         modes=["joint", "understanding", "understanding", "generation"],
                         generation_texts=[torch.tensor([1, 2])] * 4)
    fwd = model.forward

    def logits_forward(*args, text_output=None, text_target=None, **kw):
        return fwd(*args, **kw)

    results = []
    for forward in (None, logits_forward):
        out = forward_samples(model, samples, forward=forward)
        assert isinstance(out.text_out, TextLoss) == (forward is None)
        terms = loss_terms(model, samples, out)
        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(combine(terms, FlowConfig()), params, allow_unused=True)
        results.append((terms, grads))
    (fused, g_fused), (logits, g_logits) = results
    assert fused["text_count"].item() == 8 and fused["text_tokens"].item() == 8  # 5 + 3 + 0; generation not
    for key in ("text_sum", "text_correct", "video_sum"):
        torch.testing.assert_close(fused[key], logits[key], rtol=1e-5, atol=1e-5)
    assert fused["text_correct"].item() == 4
    head = model.text_head.linear.weight
    for p, a, b in zip(params, g_fused, g_logits):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert g_fused[[i for i, p in enumerate(params) if p is head][0]].abs().sum() > 0


def test_cross_entropy_output_checks_its_targets():
    """text_output="cross_entropy": per-token loss and argmax == target for ids in the text's form (a padded
    (B, N) batch too); bad targets are refused by name."""
    from _models import sample_batch, tiny_reference
    from univigu_fast.modeling import IGNORE_INDEX

    model = tiny_reference(seed=1)
    c = model.config
    videos, prompts, texts, tau_v, tau_t = sample_batch(c)
    target = [torch.randint(0, c.text_out_dim, (t.shape[0],)) for t in texts]
    target[0][2] = IGNORE_INDEX
    with torch.no_grad():
        logits = model(videos, tau_v, prompts, text=texts, tau_text=tau_t).text_out
        out = model(videos, tau_v, prompts, text=texts, tau_text=tau_t, text_output="cross_entropy",
                    text_target=target).text_out
        want = F.cross_entropy(logits[0], target[0], reduction="none")
        torch.testing.assert_close(out.loss[0], want, rtol=1e-5, atol=1e-6)
        assert out.loss[0][2] == 0 and not out.correct[0][2] and out.loss[1].shape == (0,)
        assert torch.equal(out.correct[0][[0, 1, 3]], (logits[0].argmax(-1) == target[0])[[0, 1, 3]])
        padded = torch.stack([texts[0], torch.zeros(7, dtype=texts[0].dtype)])
        batched = model(videos, tau_v, prompts, text=padded, tau_text=tau_t, text_lens=torch.tensor([7, 0]),
                        text_output="cross_entropy", text_target=torch.stack([target[0], torch.full((7,), 3)])).text_out
        torch.testing.assert_close(batched.loss[0], want, rtol=1e-5, atol=1e-6)
        assert batched.loss.shape == (2, 7) and not batched.loss[1].any()
    kw = dict(text=texts, tau_text=tau_t)
    for extra, exc, match in (
            (dict(text_output="cross_entropy"), ValueError, "needs text_target"),
            (dict(text_target=target), ValueError, "text_target is for text_output='cross_entropy'"),
            (dict(text_output="cross_entropy", text_target=target[:1]), TypeError, "text_target must have the text's form \\(a list of 2 tensors\\), got list of 1"),
            (dict(text_output="cross_entropy", text_target=[target[0][:3], target[1]]), ValueError, r"text_target\[0\] must be \(7,\) integer ids like text\[0\]"),
            (dict(text_output="cross_entropy", text_target=[target[0].float(), target[1]]), ValueError, r"text_target\[0\] must be"),
            (dict(text_output="cross_entropy", text_target=[torch.full((7,), c.text_out_dim), target[1]]), ValueError,
             rf"text_target has ids outside \[0, {c.text_out_dim}\) that are not IGNORE_INDEX=-100"),
            (dict(text_output="cross_entropy", text_target=target, temperature=0.5), ValueError, "temperature is for")):
        with pytest.raises(exc, match=match):
            model(videos, tau_v, prompts, **kw, **extra)
    with pytest.raises(ValueError, match="text_output='cross_entropy' needs text"):
        model(videos, tau_v, prompts, text_output="cross_entropy", text_target=target)
    emb = tiny_reference(text_flow="embedding")
    ve, pe, te, tv, tt = sample_batch(emb.config)
    with pytest.raises(ValueError, match="'cross_entropy' is for text_flow='discrete'"):
        emb(ve, tv, pe, text=te, tau_text=tt, text_output="cross_entropy", text_target=target)


def test_cross_entropy_output_under_autocast():
    """Under CPU bf16 autocast: a float32 model's fused loss is that of bf16 operands with fp32 logits
    (F.linear's operands under autocast); a float64 model's is float64's (autocast leaves float64 alone:
    the fused path computed it in bf16, 6e-3 off)."""
    from _models import sample_batch, tiny_reference

    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-5)):
        model = tiny_reference(seed=1).to(dtype)
        videos, prompts, texts, tau_v, tau_t = sample_batch(model.config, dtype=dtype)
        target = [torch.randint(0, model.config.text_out_dim, (t.shape[0],)) for t in texts]
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            feats = {}
            model.text_head.linear.register_forward_pre_hook(lambda m, a: feats.update(x=a[0]))
            model(videos, tau_v, prompts, text=texts, tau_text=tau_t)  # full logits: records the head's input
            out = model(videos, tau_v, prompts, text=texts, tau_text=tau_t, text_output="cross_entropy",
                        text_target=target).text_out
        lin = model.text_head.linear
        x, w, b = feats["x"][:7], lin.weight, lin.bias
        if dtype == torch.float32:  # the operands F.linear sees under autocast, the logits in fp32
            x, w, b = x.bfloat16(), w.bfloat16(), b.bfloat16()
        want = F.cross_entropy(x.double() @ w.double().t() + b.double(), target[0], reduction="none")
        torch.testing.assert_close(out.loss[0].double(), want, rtol=tol, atol=tol)
