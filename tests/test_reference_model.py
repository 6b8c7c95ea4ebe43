"""The reference UniViGUModel: exactly Wan2.1 without text, and DESIGN §3 with text."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _models import randomize, sample_batch, tiny_reference
from univigu_fast.config import UniViGUConfig
from univigu_fast.ops import REFERENCE_OPS
from univigu_fast.packing import PackedBatch
from univigu_fast.reference import UniViGUModel

diffusers = pytest.importorskip("diffusers")


def test_matches_diffusers_wan_without_text():
    torch.manual_seed(0)
    config = UniViGUConfig.tiny()
    wan = randomize(diffusers.WanTransformer3DModel(**config.wan_config()).eval(), seed=1)
    model = UniViGUModel.from_wan(wan, vocab_size=config.vocab_size).eval()
    video = torch.randn(2, config.in_channels, 3, 6, 10)  # odd F, odd H/2 and W/2
    prompt = torch.randn(2, 7, config.text_dim)
    tau = torch.tensor([0.25, 0.9])
    with torch.no_grad():
        wan_out = wan(video, 1000 * (1 - tau), prompt).sample
        ours = model(video, tau, prompt).video_velocity
    assert ours.shape == video.shape
    torch.testing.assert_close(ours, -wan_out, atol=1e-5, rtol=1e-5)


def test_packing_is_exact():
    model = tiny_reference()
    c = model.config
    g = torch.Generator().manual_seed(3)
    videos = [torch.randn(c.in_channels, *fhw, generator=g) for fhw in ((3, 6, 10), (1, 4, 4), (2, 2, 6))]
    prompts = [torch.randn(n, c.text_dim, generator=g) for n in (5, 1, 9)]
    texts = [torch.randint(0, c.vocab_size, (n,), generator=g) for n in (7, 0, 1)]
    tau_v, tau_t = torch.tensor([0.1, 0.5, 1.0]), torch.tensor([0.0, 0.4, 0.7])
    with torch.no_grad():
        packed = model(videos, tau_v, prompts, text=texts, tau_text=tau_t)
        for i in range(3):
            alone = model([videos[i]], tau_v[i:i + 1], [prompts[i]], text=[texts[i]], tau_text=tau_t[i:i + 1])
            torch.testing.assert_close(packed.video_velocity[i], alone.video_velocity[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(packed.text_out[i], alone.text_out[0], atol=1e-5, rtol=1e-5)
            assert packed.text_out[i].shape == (texts[i].numel(), c.text_vocab_size)


def test_packed_rope_tables():
    """PackedBatch's per-token RoPE tables: the video rows Wan's 3-axis angles (cached per grid), the
    text rows positions 0.. times inv_freq; a caller writing into one batch's tables cannot change
    the next batch's (the per-grid cache never escapes)."""
    head_dim, grids, text_lens = 24, [(2, 3, 4), (1, 2, 2)], [5, 0]
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    first = PackedBatch.build(grids, text_lens, [3, 3], head_dim, inv, "cpu")
    want = []
    for (f, h, w), lt in zip(grids, text_lens):
        d_hw = 2 * (head_dim // 6)
        pos = torch.stack(torch.meshgrid(torch.arange(f), torch.arange(h), torch.arange(w), indexing="ij"), -1)
        parts = [pos.reshape(-1, 3)[:, a, None].double() / 10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
                 for a, d in enumerate((head_dim - 2 * d_hw, d_hw, d_hw))]
        want += [torch.cat(parts, -1), (torch.arange(lt, dtype=torch.float32)[:, None] * inv).double()]
    angles = torch.cat(want)
    torch.testing.assert_close(first.rope[0], angles.cos().float(), rtol=0, atol=0)
    torch.testing.assert_close(first.rope[1], angles.sin().float(), rtol=0, atol=0)
    assert first.rope[2].tolist() == [True] * 24 + [False] * 5 + [True] * 4
    first.rope[0].zero_()
    again = PackedBatch.build(grids, text_lens, [3, 3], head_dim, inv, "cpu")
    torch.testing.assert_close(again.rope[0], angles.cos().float(), rtol=0, atol=0)


def test_streams_interact_and_ffn_t_is_text_only():
    model = tiny_reference()
    c = model.config
    videos, prompts, texts, tau_v, tau_t = sample_batch(c)
    with torch.no_grad():
        base = model(videos, tau_v, prompts, text=texts, tau_text=tau_t)
        other_text = [torch.randint(0, c.vocab_size, t.shape) for t in texts]
        changed = model(videos, tau_v, prompts, text=other_text, tau_text=tau_t)
        # shared self-attention: text tokens move the video output of sample 0 (which has text)
        assert (changed.video_velocity[0] - base.video_velocity[0]).abs().max() > 1e-4
        # ... but not that of sample 1 (no text; other samples never mix)
        torch.testing.assert_close(changed.video_velocity[1], base.video_velocity[1])
        # cross-attention reaches text tokens
        prompts2 = [p + 1.0 for p in prompts]
        assert (model(videos, tau_v, prompts2, text=texts, tau_text=tau_t).text_out[0] - base.text_out[0]).abs().max() > 1e-4
        # ffn_t only touches text: a text-less call is unchanged by perturbing it
        no_text = model(videos, tau_v, prompts).video_velocity
        for block in model.blocks:
            block.ffn_t.net[2].weight.add_(1.0)
        torch.testing.assert_close(model(videos, tau_v, prompts).video_velocity, no_text)
        assert (model(videos, tau_v, prompts, text=texts, tau_text=tau_t).text_out[0] - base.text_out[0]).abs().max() > 1e-3


def test_padded_text_matches_unpadded():
    model = tiny_reference()
    c = model.config
    g = torch.Generator().manual_seed(5)
    video = torch.randn(2, c.in_channels, 2, 4, 6, generator=g)
    prompt = torch.randn(2, 4, c.text_dim, generator=g)
    ids = torch.randint(0, c.vocab_size, (2, 6), generator=g)
    lens = torch.tensor([6, 3])
    tau_v, tau_t = torch.tensor([0.5, 0.2]), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        padded = model(video, tau_v, prompt, text=ids, tau_text=tau_t, text_lens=lens)
        listed = model(list(video), tau_v, list(prompt), text=[ids[0], ids[1, :3]], tau_text=tau_t)
    assert padded.text_out.shape == (2, 6, c.text_vocab_size)
    torch.testing.assert_close(padded.video_velocity, torch.stack(listed.video_velocity))
    torch.testing.assert_close(padded.text_out[1, :3], listed.text_out[1])
    assert torch.equal(padded.text_out[1, 3:], torch.zeros_like(padded.text_out[1, 3:]))


def _rope_wan(x, f, h, w):
    """Wan's 3-axis complex RoPE on x (L, H, D), written from diffusers' definition."""
    D = x.shape[-1]
    d_hw = 2 * (D // 6)
    d_t = D - 2 * d_hw
    grids = torch.meshgrid(torch.arange(f), torch.arange(h), torch.arange(w), indexing="ij")
    angles = []
    for pos, d in zip(grids, (d_t, d_hw, d_hw)):
        inv = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        angles.append(pos.reshape(-1, 1).double() * inv)
    ang = torch.cat(angles, -1)  # (L, D/2)
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], D // 2, 2))
    return torch.view_as_real(xc * torch.polar(torch.ones_like(ang), ang)[:, None]).flatten(-2).float()


def _rope_text(x, base=10000.0):
    L, H, D = x.shape
    inv = 1.0 / base ** (torch.arange(0, D, 2).float() / D)
    ang = torch.arange(L).float()[:, None] * inv
    cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None], torch.cat([ang.sin()] * 2, -1)[:, None]
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def test_block_follows_design_step_by_step():
    """One block by hand (DESIGN §3 / Eq. 14-15) for one sample with padded text and a key-padding mask."""
    model = tiny_reference(seed=2)
    c, block = model.config, model.blocks[0]
    g = torch.Generator().manual_seed(9)
    f, h, w = 2, 2, 3
    Lv, Lt, pad, Lp = f * h * w, 4, 3, 5
    x_v, x_t = torch.randn(Lv, c.dim, generator=g), torch.randn(Lt, c.dim, generator=g)
    ctx = torch.randn(Lp, c.dim, generator=g)
    temb_v, temb_t = torch.randn(6, c.dim, generator=g), torch.randn(6, c.dim, generator=g)

    packed = PackedBatch.build([(f, h, w)], [Lt], [Lp], c.head_dim, model.rotary_emb_text.inv_freq, "cpu")
    with torch.no_grad():
        got = block(REFERENCE_OPS, torch.cat([x_v, x_t]), ctx, torch.stack([temb_v, temb_t]), packed)

        # by hand, with the text padded by `pad` junk tokens that the key-padding mask must hide
        x = torch.cat([x_v, x_t, torch.randn(pad, c.dim, generator=g)])
        keep = torch.cat([torch.ones(Lv + Lt, dtype=torch.bool), torch.zeros(pad, dtype=torch.bool)])
        is_text = torch.arange(len(x)) >= Lv
        mods = block.scale_shift_table[0] + torch.where(is_text[:, None, None], temb_t, temb_v)  # (L, 6, dim)
        shift, scale, gate, c_shift, c_scale, c_gate = mods.unbind(1)
        ln = F.layer_norm(x, (c.dim,), eps=c.eps)
        hs = ln * (1 + scale) + shift
        a1 = block.attn1

        def rms(t, wgt):
            return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + c.eps) * wgt

        q = rms(a1.to_q(hs), a1.norm_q.weight).view(len(x), c.num_attention_heads, -1)
        k = rms(a1.to_k(hs), a1.norm_k.weight).view(len(x), c.num_attention_heads, -1)
        v = a1.to_v(hs).view(len(x), c.num_attention_heads, -1)
        q = torch.cat([_rope_wan(q[:Lv], f, h, w), _rope_text(q[Lv:])])
        k = torch.cat([_rope_wan(k[:Lv], f, h, w), _rope_text(k[Lv:])])
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(c.head_dim)
        scores = scores.masked_fill(~keep[None, None, :], float("-inf"))
        attn = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).flatten(1)
        x = x + gate * a1.to_out[0](attn)
        hc = block.norm2(x)
        a2 = block.attn2
        q = rms(a2.to_q(hc), a2.norm_q.weight).view(len(x), c.num_attention_heads, -1)
        k = rms(a2.to_k(ctx), a2.norm_k.weight).view(Lp, c.num_attention_heads, -1)
        v = a2.to_v(ctx).view(Lp, c.num_attention_heads, -1)
        attn = torch.einsum("hqk,khd->qhd", (torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(c.head_dim)).softmax(-1), v)
        x = x + a2.to_out[0](attn.flatten(1))
        hf = F.layer_norm(x, (c.dim,), eps=c.eps) * (1 + c_scale) + c_shift
        ffn_out = torch.where(is_text[:, None], block.ffn_t(hf), block.ffn(hf))
        want = (x + c_gate * ffn_out)[keep]
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_text_output_argmax_matches_logits():
    model = tiny_reference()
    videos, prompts, texts, tau_v, tau_t = sample_batch(model.config)
    with torch.no_grad():
        full = model(videos, tau_v, prompts, text=texts, tau_text=tau_t)
        dec = model(videos, tau_v, prompts, text=texts, tau_text=tau_t, text_output="argmax").text_out
    assert torch.equal(dec.ids[0], full.text_out[0].argmax(-1))
    torch.testing.assert_close(dec.logsumexp[0], torch.logsumexp(full.text_out[0], -1))


@pytest.mark.parametrize("text_flow", ["discrete", "embedding"])
def test_text_output_none_skips_the_text_head(text_flow):
    """Generation and guidance passes do not use the text output: ``"none"`` does not run the head
    (the discrete head's logits are (N, V): 131 MB in bf16 for 256 tokens at V = 256K, every step)."""
    model = tiny_reference(text_flow=text_flow)
    videos, prompts, texts, tau_v, tau_t = sample_batch(model.config)
    calls = []
    model.text_head.linear.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        full = model(videos, tau_v, prompts, text=texts, tau_text=tau_t)
        assert len(calls) == 1
        none = model(videos, tau_v, prompts, text=texts, tau_text=tau_t, text_output="none")
    assert len(calls) == 1 and none.text_out is None
    torch.testing.assert_close(none.video_velocity, full.video_velocity, rtol=0, atol=0)
    with pytest.raises(ValueError, match="temperature is for text_output='argmax' / 'sample' \\(it would be ignored with 'none'"):
        model(videos, tau_v, prompts, text=texts, tau_text=tau_t, text_output="none", temperature=0.5)
    with pytest.raises(ValueError, match="text_output must be 'full', 'argmax', 'sample', 'cross_entropy' or 'none', got 'nothing'"):
        model(videos, tau_v, prompts, text=texts, tau_text=tau_t, text_output="nothing")


def test_embedding_flow_outputs_velocity():
    model = tiny_reference(text_flow="embedding")
    c = model.config
    videos, prompts, texts, tau_v, tau_t = sample_batch(c)
    with torch.no_grad():
        out = model(videos, tau_v, prompts, text=texts, tau_text=tau_t)
    assert out.text_out[0].shape == (7, c.dim) and out.text_out[1].shape == (0, c.dim)
    # nothing is sampled from a velocity: a seed / temperature were accepted and ignored
    for kw in (dict(text_output="sample", sample_seed=3), dict(text_output="argmax", temperature=0.05)):
        with pytest.raises(ValueError, match="sample_seed / temperature are for text_flow='discrete'"):
            model(videos, tau_v, prompts, text=texts, tau_text=tau_t, **kw)


@pytest.mark.parametrize(
    "case, exc, match",
    [
        ("rank", ValueError, "video_latents"),
        ("channels", ValueError, "in_channels"),
        ("tau_range", ValueError, "tau_video"),
        ("tau_len", ValueError, "tau_video"),
        ("tau_text_range", ValueError, "tau_text"),
        ("text_lens", ValueError, "text_lens"),
        ("text_lens_float", TypeError, "text_lens must hold integer lengths, got dtype torch.float32"),
        ("text_lens_bool", TypeError, "text_lens must hold integer lengths, got dtype torch.bool"),
        ("bool_ids", ValueError, r"text\[0\] must be 1-D integer token ids"),
        ("token_id", ValueError, "token ids"),
        ("emb_width", ValueError, "dim"),
        ("dtype_mix", TypeError, "encoder_hidden_states dtype"),
        ("prompt_width", ValueError, "text_dim"),
        ("missing_tau_text", ValueError, "tau_text"),
        # (these four failed deep inside with an IndexError / AttributeError / torch's own message)
        ("empty_batch", ValueError, r"at least one video \(B >= 1\)"),
        ("tau_string", TypeError, "tau_video must be a real number or a \\(2,\\) tensor"),
        ("tau_complex", TypeError, "tau_video must be a real number"),
        ("cache_policy", TypeError, "video_cache must be a univigu_fast.video_cache.VideoCache"),
        # (these were accepted and did nothing)
        ("seed_with_argmax", ValueError, "sample_seed is for text_output='sample'"),
        ("temperature_with_full", ValueError, "temperature is for text_output='argmax' / 'sample'"),
        ("bad_seed", ValueError, r"sample_seed must be an int in \[0, 2\*\*63\), got -5"),
        ("numpy_complex_tau", TypeError, "tau_video must be a real number"),
        ("numpy_bool_tau", TypeError, "tau_video must be a real number"),
    ],
)
def test_bad_inputs_name_the_argument(case, exc, match):
    model = tiny_reference(text_flow="embedding" if case == "emb_width" else "discrete")
    c = model.config
    video, prompt = torch.randn(2, c.in_channels, 1, 2, 2), torch.randn(2, 3, c.text_dim)
    ids = torch.randint(0, c.vocab_size, (2, 4))
    tau = torch.tensor([0.5, 0.5])
    kwargs = dict(video_latents=video, tau_video=tau, encoder_hidden_states=prompt)
    if case == "rank":
        kwargs["video_latents"] = video[0]
    elif case == "channels":
        kwargs["video_latents"] = torch.randn(2, c.in_channels + 1, 1, 2, 2)
    elif case == "tau_range":
        kwargs["tau_video"] = torch.tensor([0.5, 1.5])
    elif case == "tau_len":
        kwargs["tau_video"] = torch.tensor([0.5, 0.5, 0.5])
    elif case == "tau_text_range":
        kwargs.update(text=ids, tau_text=torch.tensor([-0.1, 0.5]))
    elif case == "text_lens":
        kwargs.update(text=ids, tau_text=tau, text_lens=torch.tensor([5, 2]))
    elif case == "text_lens_float":  # 5.5 was cut to 5 and 4.0 failed inside slicing without a name
        kwargs.update(text=ids, tau_text=tau, text_lens=torch.tensor([4.0, 2.0]))
    elif case == "text_lens_bool":  # was read as lengths 1 and 0
        kwargs.update(text=ids, tau_text=tau, text_lens=torch.tensor([True, False]))
    elif case == "bool_ids":
        kwargs.update(text=ids > 0, tau_text=tau)
    elif case == "token_id":
        kwargs.update(text=ids + c.text_vocab_size, tau_text=tau)
    elif case == "emb_width":
        kwargs.update(text=torch.randn(2, 4, c.dim + 1), tau_text=tau)
    elif case == "dtype_mix":
        kwargs["encoder_hidden_states"] = prompt.double()
    elif case == "prompt_width":
        kwargs["encoder_hidden_states"] = torch.randn(2, 3, c.text_dim + 2)
    elif case == "missing_tau_text":
        kwargs.update(text=ids)
    elif case == "empty_batch":
        kwargs.update(video_latents=video[:0], tau_video=tau[:0], encoder_hidden_states=prompt[:0])
    elif case == "tau_string":
        kwargs["tau_video"] = "0.5"
    elif case == "tau_complex":
        kwargs["tau_video"] = torch.tensor([0.5, 0.5], dtype=torch.complex64)
    elif case == "cache_policy":
        kwargs.update(text=ids, tau_text=tau, video_cache="once")
    elif case == "seed_with_argmax":
        kwargs.update(text=ids, tau_text=tau, text_output="argmax", sample_seed=3)
    elif case == "temperature_with_full":
        kwargs.update(text=ids, tau_text=tau, temperature=0.5)
    elif case == "bad_seed":
        kwargs.update(text=ids, tau_text=tau, text_output="sample", sample_seed=-5)
    elif case == "numpy_complex_tau":  # the imaginary part was dropped with a warning
        kwargs["tau_video"] = np.array([0.3 + 2j, 0.5 + 1j])
    elif case == "numpy_bool_tau":  # read as 0 / 1
        kwargs["tau_video"] = np.array([True, False])
    with pytest.raises(exc, match=match):
        model(**kwargs)
