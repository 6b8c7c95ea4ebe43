"""Samplers: tau = 1 keeps a modality clean, Euler on a shifted grid, discrete Euler jumps, CFG, joint coupling,
embedding decode (Eq. 8); then the real tiny model in all three tasks and both text flows."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from _models import randomize
from univigu_fast.config import UniViGUConfig
from univigu_fast.flow import generation_taus
from univigu_fast.modeling import TextDecoded, UniViGUOutput
from univigu_fast.ops import REFERENCE_OPS
from univigu_fast.reference import UniViGUModel
from univigu_fast.sampling import caption, decode_embeddings, generate, joint

C, FR, H, W = 4, 2, 4, 4


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny models, one torch thread


class Oracle(nn.Module):
    """A fake model that knows the data (video ``z1``, text ``y``) and returns the exact velocity
    ``(z1 - x) / (1 - tau)`` (video, embedding text) or samples ``y`` (discrete). It records every call."""

    ops = REFERENCE_OPS

    def __init__(self, text_flow, z1, y, prompt_scale=None):
        super().__init__()
        self.config = UniViGUConfig.tiny(in_channels=C, out_channels=C, text_flow=text_flow, vocab_size=12)
        torch.manual_seed(0)
        self.vocab_embed = nn.Embedding(self.config.text_vocab_size, self.config.dim)
        self.z1, self.y, self.calls = z1, y, []
        self.prompt_scale = prompt_scale

    device = torch.device("cpu")
    dtype = torch.float32

    def forward(self, videos, tau_v, prompts, text=None, tau_text=None, text_lens=None, *, text_output="full",
                sample_seed=None, temperature=1.0):
        self.calls.append(dict(videos=[v.clone() for v in videos], tau_v=tau_v.clone(), prompts=list(prompts),
                               text=[t.clone() for t in text], tau_t=tau_text.clone(), text_output=text_output))
        vel = []
        for i, (v, t) in enumerate(zip(videos, tau_v.tolist())):
            u = (self.z1[i] - v) / max(1 - t, 1e-6)
            if self.prompt_scale is not None:  # velocity that depends on the condition: for CFG
                u = torch.full_like(v, float(prompts[i].sum()))
            vel.append(u)
        if self.config.text_flow == "discrete":
            out = TextDecoded([yi.clone() for yi in self.y], None, None) if text_output == "sample" else None
        else:
            E = self.vocab_embed.weight.detach()
            out = [(E[yi] - zi) / max(1 - t, 1e-6) for yi, zi, t in zip(self.y, text, tau_text.tolist())]
        return UniViGUOutput(vel, out)


def _data(B=3, N=5):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(C, FR, H, W, generator=g) for _ in range(B)], [torch.randint(0, 12, (N,), generator=g) for _ in range(B)]


@pytest.mark.parametrize("text_flow", ["discrete", "embedding"])
def test_caption_keeps_video_clean_and_reaches_text(text_flow):
    z1, y = _data()
    m = Oracle(text_flow, z1, y)
    prompts = [torch.zeros(1, m.config.text_dim)] * 3
    ids = caption(m, z1, prompts, [5, 5, 5], steps=6, seed=0)
    assert len(m.calls) == 6
    for call in m.calls:  # tau_video = 1: the model sees exactly the clean video at every step
        assert torch.equal(call["tau_v"], torch.ones(3))
        for a, b in zip(call["videos"], z1):
            assert torch.equal(a, b)
    assert [c["tau_t"][0].item() for c in m.calls] == pytest.approx([i / 6 for i in range(6)])
    for a, b in zip(ids, y):
        assert torch.equal(a, b)


def test_discrete_euler_jump_rate():
    """kappa = t, x1_hat fixed: after steps 0..i-1 a token has not jumped with probability
    exp(-sum_j h / (1 - t_j)) (flow_matching's MixtureDiscreteEulerSolver; the first-order rule
    min(1, h / (1 - t)) would give 1 - i / n: 0.03-0.08 away here); the last step lands."""
    N, steps = 4000, 4
    z1, _ = _data(1)
    y = [torch.full((N,), 11)]
    m = Oracle("discrete", z1, y)
    ids = caption(m, z1, [torch.zeros(1, m.config.text_dim)], [N], steps=steps, seed=0)
    base = 1 / 12  # the uniform source already holds 11 for 1/12 of tokens
    for i, call in enumerate(m.calls[1:], start=1):
        frac = (call["text"][0] == 11).float().mean().item()
        stay = math.exp(-sum((1 / steps) / (1 - j / steps) for j in range(i)))
        assert abs(frac - (1 - stay + stay * base)) < 0.025, (i, frac)
    assert torch.equal(ids[0], y[0])


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("text_flow", ["discrete", "embedding"])
def test_generate_keeps_text_clean_and_integrates(text_flow, shift):
    z1, y = _data()
    m = Oracle(text_flow, z1, y)
    prompts = [torch.randn(2, m.config.text_dim) for _ in range(3)]
    out = generate(m, prompts, y, (C, FR, H, W), steps=5, shift=shift, seed=0)
    taus = generation_taus(5, shift)
    assert [c["tau_v"][0].item() for c in m.calls] == pytest.approx(taus[:-1])
    E = m.vocab_embed.weight
    for call in m.calls:  # tau_text = 1: the clean prompt text rides along unchanged
        assert torch.equal(call["tau_t"], torch.ones(3))
        for a, b in zip(call["text"], y):
            want = b if text_flow == "discrete" else E[b]
            assert torch.equal(a, want)
    for a, b in zip(out, z1):  # exact velocity: Euler lands on the data from any grid
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_generate_classifier_free_guidance():
    z1, y = _data(2)
    m = Oracle("discrete", z1, y, prompt_scale=True)
    prompts = [torch.full((1, m.config.text_dim), 1.0 / m.config.text_dim)] * 2  # cond velocity 1
    null = torch.zeros(1, m.config.text_dim)  # uncond velocity 0
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x0 = [torch.randn(C, FR, H, W, generator=g) for _ in range(2)]
    out = generate(m, prompts, y, (C, FR, H, W), null_prompt=null, steps=1, shift=1.0, guidance=4.0, seed=0)
    # v = v_u + g (v_c - v_u) = 0 + 4 (1 - 0), one Euler step of size 1
    for a, b in zip(out, x0):
        torch.testing.assert_close(a, b + 4.0)
    assert any(torch.equal(c["prompts"][0], null) for c in m.calls) and len(m.calls) == 2
    assert [c["text_output"] for c in m.calls] == ["none", "none"]  # the clean prompt's logits are not used
    with pytest.raises(ValueError, match="null_prompt"):
        generate(m, prompts, y, (C, FR, H, W), steps=1, guidance=2.0)


def test_joint_guidance_pass_does_not_run_the_text_head():
    """The unconditional pass of joint CFG steers the video only: its text head is not run."""
    z1, y = _data(2)
    m = Oracle("discrete", z1, y)
    null = torch.zeros(1, m.config.text_dim)
    joint(m, [torch.ones(1, m.config.text_dim)] * 2, (C, FR, H, W), [5] * 2, null_prompt=null, steps=3, guidance=2.0)
    uncond = [torch.equal(c["prompts"][0], null) for c in m.calls]
    assert uncond == [False, True] * 3
    assert [c["text_output"] for c in m.calls] == ["sample", "none"] * 3


@pytest.mark.parametrize("text_flow", ["discrete", "embedding"])
def test_joint_couples_times_and_reaches_both(text_flow):
    z1, y = _data()
    m = Oracle(text_flow, z1, y)
    lat, ids = joint(m, [torch.zeros(1, m.config.text_dim)] * 3, (C, FR, H, W), [5] * 3, steps=4, shift=3.0)
    for call in m.calls:
        assert torch.equal(call["tau_v"], call["tau_t"])
    for a, b in zip(lat, z1):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    for a, b in zip(ids, y):
        assert torch.equal(a, b)


def test_decode_embeddings_is_argmax_against_vocab_embed():
    m = Oracle("embedding", [], [])
    E = m.vocab_embed.weight.detach()
    z = torch.randn(7, m.config.dim)
    torch.testing.assert_close(decode_embeddings(m, z), (z @ E[:12].T).argmax(-1))


@pytest.mark.parametrize("text_flow", ["discrete", "embedding"])
def test_real_tiny_model_all_tasks(text_flow):
    cfg = UniViGUConfig.tiny(text_flow=text_flow, discrete_source="mask" if text_flow == "discrete" else "uniform")
    torch.manual_seed(0)
    m = UniViGUModel(cfg).eval()
    m.init_text_stream()
    vids = [torch.randn(4, 2, 4, 4), torch.randn(4, 1, 2, 6)]
    prompts = [torch.randn(3, cfg.text_dim), torch.randn(2, cfg.text_dim)]
    null = torch.randn(1, cfg.text_dim)
    ids = caption(m, vids, prompts, [5, 0], steps=3)
    assert ids[0].shape == (5,) and ids[1].shape == (0,) and int(ids[0].max()) < cfg.vocab_size
    lat = generate(m, prompts, [torch.tensor([1, 2]), torch.tensor([3])], (4, 2, 4, 4), null_prompt=null, steps=2,
                   guidance=2.0)
    assert all(x.shape == (4, 2, 4, 4) and torch.isfinite(x).all() for x in lat)
    lat, ids = joint(m, prompts, (4, 2, 4, 4), [3, 4], null_prompt=null, steps=2, guidance=2.0)
    assert [i.shape for i in ids] == [(3,), (4,)] and all(int(i.max()) < cfg.vocab_size for i in ids)
    # deterministic given the seed
    assert torch.equal(caption(m, vids, prompts, [5, 2], steps=2, seed=3)[0], caption(m, vids, prompts, [5, 2], steps=2, seed=3)[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 model on CUDA")
@pytest.mark.parametrize("text_flow", ["discrete", "embedding"])
def test_cuda_bf16_samplers_keep_fp32_state(text_flow):
    from univigu_fast.model import UniViGUModel as FastModel

    cfg = UniViGUConfig.tiny(text_flow=text_flow)
    torch.manual_seed(0)
    m = FastModel(cfg).cuda().to(torch.bfloat16).eval()
    m.init_text_stream()
    prompts = [torch.randn(3, cfg.text_dim, device="cuda", dtype=torch.bfloat16)] * 2
    null = torch.zeros(1, cfg.text_dim, device="cuda", dtype=torch.bfloat16)
    lat = generate(m, prompts, [torch.tensor([1, 2])] * 2, (4, 2, 4, 4), null_prompt=null, steps=3, guidance=3.0)
    assert all(x.dtype == torch.float32 and torch.isfinite(x).all() for x in lat)
    lat, ids = joint(m, prompts, (4, 2, 4, 4), [4, 2], null_prompt=null, steps=3, guidance=3.0)
    assert [i.shape for i in ids] == [(4,), (2,)] and all(int(i.max()) < cfg.vocab_size for i in ids)
    ids = caption(m, [x.to(torch.bfloat16) for x in lat], prompts, [5, 3], steps=3)
    assert [i.shape for i in ids] == [(5,), (3,)]


@pytest.mark.parametrize("fast", [False, True])
def test_mask_column_is_never_decoded(fast):
    """The mask source's [MASK] column (id V) is the source, never a target: every decode (``text.decode``,
    ``decode_features``, ``text_output="argmax"`` / ``"sample"``) and the samplers pick among the V real
    tokens even when that column's logit dominates (they returned the [MASK] id before)."""
    from univigu_fast.model import UniViGUModel as FastModel
    from univigu_fast.text import decode, decode_features

    cfg = UniViGUConfig.tiny(discrete_source="mask", vocab_size=20)
    ref = randomize(UniViGUModel(cfg).eval(), seed=2)
    V = cfg.vocab_size
    with torch.no_grad():
        ref.text_head.linear.bias[V] = 1e3
    m = ref
    if fast:
        m = FastModel(cfg).eval()
        m.load_state_dict(ref.state_dict())
    vids, prompts = [torch.randn(4, 1, 2, 2), torch.randn(4, 2, 2, 2)], [torch.randn(2, cfg.text_dim)] * 2
    text, tau = [torch.full((3,), V), torch.randint(0, V, (4,))], torch.tensor([0.0, 0.5])
    with torch.no_grad():
        logits = m(vids, torch.ones(2), prompts, text=text, tau_text=tau).text_out
        assert all((lg.argmax(-1) == V).all() for lg in logits)  # the column does dominate
        want = [lg[:, :V].argmax(-1) for lg in logits]
        am = m(vids, torch.ones(2), prompts, text=text, tau_text=tau, text_output="argmax").text_out
        sm = m(vids, torch.ones(2), prompts, text=text, tau_text=tau, text_output="sample", sample_seed=3).text_out
        feats = torch.randn(6, cfg.dim)
        assert int(decode_features(m, feats).max()) < V
    assert all(torch.equal(a, b) for a, b in zip(decode(m, logits), want))
    assert all(torch.equal(a, b) for a, b in zip(am.ids, want))
    torch.testing.assert_close(torch.cat(list(am.logsumexp)), torch.cat([lg[:, :V].logsumexp(-1) for lg in logits]))
    assert all(int(i.max()) < V for i in sm.ids)
    ids = caption(m, vids, prompts, [5, 3], steps=3, seed=1)
    _, jids = joint(m, prompts, (4, 1, 2, 2), [5, 3], steps=2, seed=1)
    assert all(i.numel() and int(i.max()) < V for i in ids + jids)


def test_embedding_flow_refuses_discrete_sampling_options():
    """temperature / kappa_power shape the discrete path; the embedding flow's text follows its velocity:
    they were accepted and changed nothing."""
    cfg = UniViGUConfig.tiny(text_flow="embedding")
    torch.manual_seed(0)
    m = UniViGUModel(cfg).eval()
    vids, prompts = [torch.randn(4, 1, 2, 2)] * 2, [torch.randn(2, cfg.text_dim)] * 2
    for kw, name in ((dict(temperature=0.1), "temperature"), (dict(kappa_power=3.0), "kappa_power")):
        with pytest.raises(ValueError, match=f"{name} is for text_flow='discrete': the embedding flow samples nothing"):
            caption(m, vids, prompts, [3, 2], steps=1, **kw)
        with pytest.raises(ValueError, match=f"{name} is for text_flow='discrete'"):
            joint(m, prompts, (4, 1, 2, 2), [3, 2], steps=1, **kw)
    assert [i.shape for i in caption(m, vids, prompts, [3, 2], steps=1, temperature=1.0)] == [(3,), (2,)]


def test_sampler_arguments_are_checked():
    """Invalid temperatures, lengths and step counts are refused by name, before the first forward."""
    cfg = UniViGUConfig.tiny(discrete_source="mask")
    torch.manual_seed(0)
    m = UniViGUModel(cfg).eval()
    vids, prompts = [torch.randn(4, 1, 2, 2)] * 2, [torch.randn(2, cfg.text_dim)] * 2
    for temperature in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature must be finite and >= 1e-06"):
            caption(m, vids, prompts, [3, 2], steps=1, temperature=temperature)
        with pytest.raises(ValueError, match="temperature must be finite and >= 1e-06"):
            joint(m, prompts, (4, 1, 2, 2), [3, 2], steps=1, temperature=temperature)
    for lens in ([2.7, 3], ["3", 2], [True, 1], [-1, 2], [torch.tensor(2.0), 1]):
        with pytest.raises(ValueError, match=r"text_lens\[0\] must be a non-negative integer"):
            caption(m, vids, prompts, lens, steps=1)
    with pytest.raises(ValueError, match=r"text_lens has 1 entries, expected one per sample of prompts \(2\)"):
        joint(m, prompts, (4, 1, 2, 2), [3], steps=1)
    for steps in (0, True, 2.0):
        with pytest.raises(ValueError, match="steps must be an int >= 1"):
            caption(m, vids, prompts, [1, 1], steps=steps)
    for seed in (2**64, -2**63 - 1, 1.5):  # torch's own error said 'Overflow when unpacking long long'
        with pytest.raises(ValueError, match=r"seed must be an int in \[-2\*\*63, 2\*\*64\)"):
            caption(m, vids, prompts, [1, 1], steps=1, seed=seed)
    a, b = caption(m, vids, prompts, [2, 1], steps=np.int64(2), seed=np.int64(5)), caption(m, vids, prompts, [2, 1], steps=2, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # NumPy ints (a sweep) work as ints
    ids = caption(m, vids, prompts, [np.int64(2), torch.tensor(1)], steps=1)  # any integer scalar
    assert [i.shape for i in ids] == [(2,), (1,)]
    for kappa_power in (0, -1.0, float("nan"), float("inf"), "2"):
        with pytest.raises(ValueError, match="kappa_power must be a positive finite number"):
            caption(m, vids, prompts, [1, 1], steps=1, kappa_power=kappa_power)
    with pytest.raises(TypeError, match="text_lens must be a sequence"):
        caption(m, vids, prompts, 3, steps=1)
    for lens in (np.array([2, 1]), range(2, 0, -1), torch.tensor([2, 1])):  # sequences of any kind
        assert [i.shape for i in caption(m, vids, prompts, lens, steps=1)] == [(2,), (1,)]


def test_sampler_inputs_are_checked_by_name():
    """A single sample's tensor is refused (iterating it split a video along its channels), a batched
    tensor is taken; prompt ids and video shapes are checked by name before the first forward."""
    cfg = UniViGUConfig.tiny()
    torch.manual_seed(0)
    m = UniViGUModel(cfg).eval()
    m.init_text_stream()
    vids, prompts = [torch.randn(4, 1, 2, 2)] * 2, [torch.randn(2, cfg.text_dim)] * 2
    with pytest.raises(ValueError, match=r"videos must be a list of \(C, F, H, W\) tensors or one \(B, C, F, H, W\)"):
        caption(m, vids[0], prompts[:1], [3], steps=1)
    with pytest.raises(ValueError, match=r"prompts must be a list of \(L, text_dim\) tensors"):
        caption(m, vids[:1], torch.randn(1, cfg.text_dim), [3], steps=1)
    with pytest.raises(ValueError, match=r"videos\[1\] must be a \(C, F, H, W\) tensor"):
        caption(m, [vids[0], vids[1][None]], prompts, [3, 2], steps=1)
    a, b = caption(m, vids, prompts, [3, 2], steps=2), caption(m, torch.stack(vids), torch.stack(prompts), [3, 2], steps=2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    ids = [torch.tensor([1, 2, 3]), torch.tensor([4])]
    for bad, match in (([torch.tensor([cfg.vocab_size]), ids[1]], r"prompt_ids\[0\] has ids outside \[0, vocab_size="),
                       ([ids[0], torch.tensor([-1])], r"prompt_ids\[1\] has ids outside"),
                       ([ids[0], torch.tensor([1.0])], r"prompt_ids\[1\] must be 1-D integer token ids"),
                       ([torch.tensor([[1, 2]]), ids[1]], r"prompt_ids\[0\] must be 1-D integer token ids"),
                       (ids[:1], r"prompts \(2\) and prompt_ids \(1\) must have the same length"),
                       (torch.tensor([[1, 2, 3], [4, 0, 0]]), "pass prompt_lens")):
        with pytest.raises(ValueError, match=match):
            generate(m, prompts, bad, (4, 1, 2, 2), steps=1)
    padded = generate(m, prompts, torch.tensor([[1, 2, 3], [4, 0, 0]]), (4, 1, 2, 2), steps=2, prompt_lens=[3, 1])
    listed = generate(m, prompts, ids, (4, 1, 2, 2), steps=2)
    assert all(torch.equal(x, y) for x, y in zip(padded, listed))
    with pytest.raises(ValueError, match="prompt_lens is only for a padded"):
        generate(m, prompts, ids, (4, 1, 2, 2), steps=1, prompt_lens=[3, 1])
    for shape, match in (((4, 1, 3, 2), r"must be multiples of patch_size"), ((16, 1, 2, 2), "expected in_channels=4"),
                         ((1, 2, 2), "video_shape must be 4 positive ints"), (4, "video_shape must be 4 positive ints"),
                         ((4, 0, 2, 2), "video_shape must be 4 positive ints")):
        with pytest.raises(ValueError, match=match):
            generate(m, prompts, ids, shape, steps=1)
        with pytest.raises(ValueError, match=match):
            joint(m, prompts, shape, [2, 2], steps=1)
    with pytest.raises(ValueError, match="null_prompt must be one"):
        joint(m, prompts, (4, 1, 2, 2), [2, 2], steps=1, guidance=2.0, null_prompt=torch.randn(1, 1, cfg.text_dim))
    with pytest.raises(ValueError, match=rf"null_prompt must be one \(L0, text_dim={cfg.text_dim}\) tensor"):
        generate(m, prompts, ids, (4, 1, 2, 2), steps=1, guidance=2.0, null_prompt=torch.randn(1, cfg.text_dim + 1))
    # shift=inf made every time 0 (the noise came back as the sample), guidance=nan / inf all-NaN latents,
    # strings failed inside with a message naming nothing
    for name, bad in (("shift", float("inf")), ("shift", "3"), ("guidance", float("nan")), ("guidance", float("inf")),
                      ("guidance", "2"), ("shift", True)):
        kw = {name: bad, **({"null_prompt": torch.randn(1, cfg.text_dim)} if name == "guidance" else {})}
        with pytest.raises(ValueError, match=f"{name} must be a finite real number"):
            generate(m, prompts, ids, (4, 1, 2, 2), steps=1, **kw)
        with pytest.raises(ValueError, match=f"{name} must be a finite real number"):
            joint(m, prompts, (4, 1, 2, 2), [2, 2], steps=1, **kw)
    with pytest.raises(ValueError, match="shift must be > 0"):
        generate(m, prompts, ids, (4, 1, 2, 2), steps=1, shift=0.0)
    with pytest.raises(TypeError, match="stats must be a dict"):  # an AttributeError after the whole caption
        caption(m, vids, prompts, [2, 2], steps=1, stats=[])
    with pytest.raises(ValueError, match=rf"z must be \(N, dim={cfg.dim}\) text embeddings"):
        decode_embeddings(m, torch.randn(cfg.dim))


@pytest.mark.parametrize("text_flow", ["discrete", "embedding"])
def test_samplers_take_conditions_of_any_float_dtype(text_flow):
    """The samplers cast videos and prompts to the model's dtype: an fp16 model given fp32 inputs
    samples what it samples from fp16 inputs (the embedding flow's fp16 text state met fp32 videos)."""
    cfg = UniViGUConfig.tiny(text_flow=text_flow)
    torch.manual_seed(0)
    m = UniViGUModel(cfg).eval()
    m.init_text_stream()
    m = m.half()
    vids = [torch.randn(4, 2, 4, 4), torch.randn(4, 1, 2, 2)]
    prompts, null = [torch.randn(3, cfg.text_dim), torch.randn(2, cfg.text_dim)], torch.randn(1, cfg.text_dim)
    half = [t.half() for t in vids], [t.half() for t in prompts], null.half()
    for a, b in zip(caption(m, vids, prompts, [4, 2], steps=2), caption(m, half[0], half[1], [4, 2], steps=2)):
        assert torch.equal(a, b)
    for a, b in zip(generate(m, prompts, [torch.tensor([1, 2])] * 2, (4, 2, 4, 4), null_prompt=null, steps=2, guidance=2.0),
                    generate(m, half[1], [torch.tensor([1, 2])] * 2, (4, 2, 4, 4), null_prompt=half[2], steps=2, guidance=2.0)):
        assert torch.equal(a, b)
    (la, ia), (lb, ib) = (joint(m, p, (4, 2, 4, 4), [3, 1], null_prompt=n, steps=2, guidance=2.0)
                          for p, n in ((prompts, null), (half[1], half[2])))
    assert all(torch.equal(a, b) for a, b in zip(la + ia, lb + ib))


def test_samplers_default_to_the_kappa_power_the_model_was_trained_with(tmp_path, monkeypatch):
    """``kappa_power`` lives in the model config (the Trainer records the one it trains with, the
    checkpoint keeps it); caption / joint default to it instead of 1."""
    from univigu_fast import sampling
    from univigu_fast.synthetic import make_dataset
    from univigu_fast.training import TrainConfig, Trainer

    cfg = UniViGUConfig.tiny(vocab_size=20, in_channels=16, out_channels=16, text_dim=8)
    m = randomize(UniViGUModel(cfg), seed=3)
    data = make_dataset(4, 0, text_dim=8, frames=2, size=8)
    data.caption_ids = [i % 20 for i in data.caption_ids]
    data.prompt_ids = [i % 20 for i in data.prompt_ids]
    Trainer(m, data, TrainConfig(steps=1, batch_size=2, warmup_steps=0, progress=False, flow=dict(kappa_power=3.0)))
    assert m.config.kappa_power == 3.0 and cfg.kappa_power == 1.0  # recorded on the model, the caller's config kept
    m.save_pretrained(tmp_path / "m")
    m = UniViGUModel.from_pretrained(tmp_path / "m")
    assert m.config.kappa_power == 3.0
    used = []
    monkeypatch.setattr(sampling, "PolynomialScheduler",
                        lambda n, cls=sampling.PolynomialScheduler: used.append(n) or cls(n))
    vids, prompts = [torch.randn(16, 2, 2, 2), torch.randn(16, 1, 2, 2)], [torch.randn(2, 8)] * 2
    caption(m, vids, prompts, [6, 4], steps=2, seed=1)
    joint(m, prompts, (16, 1, 2, 2), [6, 4], steps=2, seed=1)
    caption(m, vids, prompts, [6, 4], steps=2, seed=1, kappa_power=1.0)
    assert used == [3.0, 3.0, 1.0]
