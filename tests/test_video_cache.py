"""Video-stream cache for understanding: exactness with every:1, the text-only step by hand, memory."""
import math

import pytest
import torch
import torch.nn.functional as F

from _models import tiny_reference
from univigu_fast.kernels.joint_attention import apply_rope_reference
from univigu_fast.sampling import _TextState, caption
from univigu_fast.video_cache import VideoCache, cache_bytes, caption_cached, parse_policy


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny models, one torch thread


def _inputs(config, seed=0):
    g = torch.Generator().manual_seed(seed)
    videos = [torch.randn(config.in_channels, 3, 6, 10, generator=g), torch.randn(config.in_channels, 1, 4, 4, generator=g)]
    prompts = [torch.randn(5, config.text_dim, generator=g), torch.randn(3, config.text_dim, generator=g)]
    return videos, prompts


def test_every_1_equals_exact_caption_and_logits():
    model = tiny_reference(seed=3)
    videos, prompts = _inputs(model.config)
    exact = caption(model, videos, prompts, [7, 2], steps=5, seed=4)
    stats = {}
    cached = caption(model, videos, prompts, [7, 2], steps=5, seed=4, video_cache="every:1", stats=stats)
    assert all(torch.equal(a, b) for a, b in zip(exact, cached))
    assert stats["full_steps"] == 5 and stats["text_steps"] == 0 and stats["cache_bytes"] > 0
    # a text-only step on the step it was captured from reproduces the full step's logits
    g = torch.Generator().manual_seed(1)
    text = [torch.randint(0, model.config.vocab_size, (n,), generator=g) for n in (7, 2)]
    tau_t = torch.tensor([0.3, 0.7])
    with torch.no_grad():
        cache = VideoCache(model)
        full = model(videos, torch.ones(2), prompts, text=text, tau_text=tau_t, video_cache=cache).text_out
        step = model.text_step(cache, text, tau_t)
    for a, b in zip(full, step):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_text_step_names_out_of_range_ids():
    """Host ids outside the vocabulary get forward's error (a bare IndexError from the embedding before)."""
    model = tiny_reference(seed=3)
    videos, prompts = _inputs(model.config)
    V = model.config.text_vocab_size
    text = [torch.zeros(7, dtype=torch.long), torch.zeros(2, dtype=torch.long)]
    with torch.no_grad():
        cache = VideoCache(model)
        model(videos, torch.ones(2), prompts, text=text, tau_text=torch.zeros(2), video_cache=cache)
        for bad in (V, -1):
            with pytest.raises(ValueError, match=rf"text\[1\] has token ids outside \[0, text_vocab_size={V}\)"):
                model.text_step(cache, [text[0], torch.full((2,), bad)], torch.tensor([0.3, 0.7]))


def test_cache_belongs_to_its_model_and_text_step_needs_no_no_grad():
    """Another model (same config) reading a cache is refused (its text step gave logits off by 6.8; a
    deeper model an IndexError); text_step called with autograd on works (a view error deep in autograd
    before); max_cache_bytes without a cache is refused like cuda_graph."""
    model, other = tiny_reference(seed=3), tiny_reference(seed=4)
    videos, prompts = _inputs(model.config)
    text, tau = [torch.zeros(7, dtype=torch.long), torch.zeros(2, dtype=torch.long)], torch.tensor([0.3, 0.7])
    cache = VideoCache(model)
    with torch.no_grad():
        full = model(videos, torch.ones(2), prompts, text=text, tau_text=tau, video_cache=cache).text_out
    for call in (lambda: other.text_step(cache, text, tau),
                 lambda: other(videos, torch.ones(2), prompts, text=text, tau_text=tau, video_cache=cache)):
        with pytest.raises(ValueError, match="video_cache was made for another model"):
            call()
    step = model.text_step(cache, text, tau)  # autograd on
    for a, b in zip(full, step):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="max_cache_bytes is the budget of a cached caption"):
        caption(model, videos, prompts, [7, 2], steps=2, max_cache_bytes=10**9)


@pytest.mark.parametrize("source", ["uniform", "mask"])
def test_default_off_is_the_exact_loop(source):
    """The default policy is the plain Euler loop, bit for bit: a hand-written loop of full forwards
    (no cache argument) with the same random stream gives the same ids; the alias and every:1 agree."""
    model = tiny_reference(seed=6, discrete_source=source)
    videos, prompts = _inputs(model.config, seed=3)
    lens, steps, seed = [6, 3], 4, 11
    g = torch.Generator().manual_seed(seed)
    state = _TextState(model, lens, g, 1.0, 1.0)
    with torch.no_grad():
        for i in range(steps):
            out = model(videos, torch.ones(2), prompts, tau_text=torch.full((2,), i / steps), **state.forward_kwargs())
            state.step(out.text_out, i / steps, (i + 1) / steps, last=i == steps - 1)
    want = state.ids()
    stats = {}
    got = caption(model, videos, prompts, lens, steps=steps, seed=seed, stats=stats)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert stats == dict(cache_bytes=0, full_steps=steps, text_steps=0)
    for kw in (dict(video_cache="off"), dict(video_cache="every:1")):
        assert all(torch.equal(a, b) for a, b in zip(caption_cached(model, videos, prompts, lens, steps=steps, seed=seed, **kw), want))
    # and the approximate policies run the announced mix of full and text-only steps
    for policy, full in (("once", 1), ("every:3", 2)):
        stats = {}
        ids = caption(model, videos, prompts, lens, steps=steps, seed=seed, video_cache=policy, stats=stats)
        assert [i.shape[0] for i in ids] == lens and stats["full_steps"] == full and stats["text_steps"] == steps - full


def _by_hand(model, cache, text, tau_t):
    """The text-only step from the equations: per layer the text rows attend to [cached video K/V;
    their own K/V] per sample, then cross-attention to the prompt and the text expert FFN."""
    c = model.config
    eps, H = c.eps, c.num_attention_heads
    joint = cache.joint
    offs = joint.cu_seqlens.tolist()
    x = [model.vocab_embed(t) for t in text]
    temb_t, proj_t = model.time_embedding_t(torch.round(1000 * (1 - tau_t)))
    ctx = torch.split(cache.context, joint.prompt_lens)

    def rms(t, w):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps) * w

    def attention(q, k, v):
        s = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(c.head_dim)
        return torch.einsum("hqk,khd->qhd", s.softmax(-1), v).flatten(1)

    for layer, block in enumerate(model.blocks):
        out = []
        for i, xi in enumerate(x):
            lv, lt = joint.video_lens[i], joint.text_lens[i]
            shift, scale, gate, c_shift, c_scale, c_gate = (block.scale_shift_table[0] + proj_t[i]).unbind(0)
            h = F.layer_norm(xi, (c.dim,), eps=eps) * (1 + scale) + shift
            a1 = block.attn1
            q = rms(a1.to_q(h), a1.norm_q.weight).view(lt, H, -1)
            k = rms(a1.to_k(h), a1.norm_k.weight).view(lt, H, -1)
            v = a1.to_v(h).view(lt, H, -1)
            kv_rows = slice(offs[i], offs[i] + lv)
            text_rope = [t[offs[i] + lv: offs[i + 1]] for t in joint.rope]  # text rows: 1-D RoPE, positions 0..lt-1
            q = apply_rope_reference(q, text_rope)
            # the cached video keys are stored rotated (Wan's 3-axis RoPE); the fresh text keys are rotated here
            keys = torch.cat([cache.keys[layer][kv_rows], apply_rope_reference(k, text_rope)])
            vals = torch.cat([cache.values[layer][kv_rows], v])
            xi = xi + gate * a1.to_out[0](attention(q, keys, vals))
            hc = block.norm2(xi)
            a2 = block.attn2
            q = rms(a2.to_q(hc), a2.norm_q.weight).view(lt, H, -1)
            kc = rms(a2.to_k(ctx[i]), a2.norm_k.weight).view(-1, H, c.head_dim)
            vc = a2.to_v(ctx[i]).view(-1, H, c.head_dim)
            xi = xi + a2.to_out[0](attention(q, kc, vc))
            hf = F.layer_norm(xi, (c.dim,), eps=eps) * (1 + c_scale) + c_shift
            out.append(xi + c_gate * block.ffn_t(hf))
        x = out
    logits = []
    for i, xi in enumerate(x):
        shift, scale = (model.scale_shift_table_t[0] + temb_t[i]).unbind(0)
        feats = F.layer_norm(xi, (c.dim,)) * model.text_head.norm_final.weight * (1 + scale) + shift
        logits.append(model.text_head.linear(feats))
    return logits


def test_once_text_step_matches_hand_computed():
    model = tiny_reference(seed=5)
    videos, prompts = _inputs(model.config, seed=2)
    g = torch.Generator().manual_seed(7)
    first = [torch.randint(0, model.config.vocab_size, (n,), generator=g) for n in (6, 3)]
    later = [torch.randint(0, model.config.vocab_size, (n,), generator=g) for n in (6, 3)]
    with torch.no_grad():
        cache = VideoCache(model)
        model(videos, torch.ones(2), prompts, text=first, tau_text=torch.tensor([0.1, 0.2]), video_cache=cache)
        tau = torch.tensor([0.5, 0.8])
        got = model.text_step(cache, later, tau)
        want = _by_hand(model, cache, later, tau)
        exact = model(videos, torch.ones(2), prompts, text=later, tau_text=tau).text_out
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)
    # and it is an approximation: the exact step (video re-run with the new text) differs
    assert max((a - b).abs().max() for a, b in zip(got, exact)) > 1e-4


def test_text_step_reuses_the_prompt_keys_values():
    """The prompt's cross-attention keys/values are projected on the full step only; a refresh
    projects them again (a new full step may come with new weights)."""
    model = tiny_reference(seed=5)
    videos, prompts = _inputs(model.config, seed=2)
    calls = []
    for block in model.blocks:
        block.attn2.to_k.register_forward_hook(lambda *a: calls.append("k"))
        block.attn2.to_v.register_forward_hook(lambda *a: calls.append("v"))
    text = [torch.randint(0, model.config.vocab_size, (n,), generator=torch.Generator().manual_seed(1)) for n in (6, 3)]
    with torch.no_grad():
        cache = VideoCache(model)
        model(videos, torch.ones(2), prompts, text=text, tau_text=torch.tensor([0.1, 0.2]), video_cache=cache)
        assert len(calls) == 2 * model.config.num_layers
        model.text_step(cache, text, torch.tensor([0.5, 0.8]))
        model.text_step(cache, text, torch.tensor([0.6, 0.9]))
        assert len(calls) == 2 * model.config.num_layers
        model(videos, torch.ones(2), prompts, text=text, tau_text=torch.tensor([0.1, 0.2]), video_cache=cache)
        assert len(calls) == 4 * model.config.num_layers


def test_cache_memory_is_accounted_refused_and_released(monkeypatch):
    model = tiny_reference()
    videos, prompts = _inputs(model.config)
    c = model.config
    expected = cache_bytes(c, [3 * 3 * 5, 1 * 2 * 2], [4, 2], torch.float32, prompt_lens=[5, 3])
    assert expected == c.num_layers * 2 * (45 + 4 + 6 + 8) * c.dim * 4  # video, text and prompt rows
    released = []
    orig = VideoCache.release

    def spy(self):
        orig(self)
        released.append(self.nbytes)

    monkeypatch.setattr(VideoCache, "release", spy)
    stats = {}
    caption(model, videos, prompts, [4, 2], steps=3, video_cache="once", stats=stats)
    assert stats["cache_bytes"] == expected and stats["full_steps"] == 1 and stats["text_steps"] == 2
    assert released == [0]  # released once, nothing left behind
    peaks, storage = [], []
    orig_begin, orig_end = VideoCache.begin_capture, VideoCache.end_capture

    def begin(self, packed):
        orig_begin(self, packed)
        peaks.append(self.nbytes)

    def end(self):
        orig_end(self)
        storage.append([t.data_ptr() for t in self.keys + self.values + [t for kv in self.prompt_kv for t in kv]])

    monkeypatch.setattr(VideoCache, "begin_capture", begin)
    monkeypatch.setattr(VideoCache, "end_capture", end)
    caption(model, videos, prompts, [4, 2], steps=4, video_cache="every:2", stats=stats)
    # a refresh of the same batch writes into the buffers it has: same storage, nothing added
    assert peaks == [0, expected] and storage[0] == storage[1] and stats["cache_bytes"] == expected
    assert stats["full_steps"] == 2
    # a full step on another batch drops the old buffers before filling new ones
    cache = VideoCache(model)
    with torch.no_grad():
        model(videos, torch.ones(2), prompts, text=[torch.arange(4), torch.arange(2)], tau_text=torch.zeros(2),
              video_cache=cache)
        model(videos[:1], torch.ones(1), prompts[:1], text=[torch.arange(4)], tau_text=torch.zeros(1),
              video_cache=cache)
    assert peaks[-1] == 0 and cache.nbytes < expected
    released.clear()
    with pytest.raises(MemoryError, match="video cache needs"):
        caption(model, videos, prompts, [4, 2], steps=2, video_cache="once", max_cache_bytes=expected - 1)
    assert len(released) == 1  # released on the error path too


def test_bad_cache_budget_and_text_step_ids_are_refused():
    model = tiny_reference(seed=5)
    videos, prompts = _inputs(model.config, seed=2)
    for budget in (float("nan"), -1, True, "100"):  # NaN compared as "fits" and built the cache
        with pytest.raises(ValueError, match="max_cache_bytes"):
            caption(model, videos, prompts, [4, 2], steps=2, video_cache="once", max_cache_bytes=budget)
    text = [torch.arange(4), torch.arange(2)]
    with torch.no_grad():
        cache = VideoCache(model)
        model(videos, torch.ones(2), prompts, text=text, tau_text=torch.zeros(2), video_cache=cache)
        for bad in ([t.float() for t in text], [t.bool() for t in text], [t[:, None] for t in text]):
            with pytest.raises(ValueError, match=r"text\[0\] must be 1-D integer token ids"):
                model.text_step(cache, bad, torch.tensor([0.5, 0.5]))


def _filled_cache(model, videos, prompts, text, tau_text=(0.0, 0.0), **kw):
    cache = VideoCache(model, **kw)
    model(videos, torch.ones(len(videos)), prompts, text=text, tau_text=torch.tensor(tau_text), video_cache=cache)
    return cache


def test_text_step_checks_text_output_like_forward():
    """'sample' without a seed and unknown modes were decoded as argmax without a word."""
    model = tiny_reference(seed=5)
    videos, prompts = _inputs(model.config, seed=2)
    text = [torch.arange(4), torch.arange(2)]
    with torch.no_grad():
        cache = _filled_cache(model, videos, prompts, text)
    tau = torch.tensor([0.5, 0.5])
    with pytest.raises(ValueError, match="text_output='sample' needs sample_seed"):
        model.text_step(cache, text, tau, text_output="sample")
    with pytest.raises(ValueError, match="text_output must be 'full', 'argmax' or 'sample', got 'samples'"):
        model.text_step(cache, text, tau, text_output="samples")
    with pytest.raises(ValueError, match="text_output must be 'full', 'argmax' or 'sample', got 'none'"):
        model.text_step(cache, text, tau, text_output="none")  # a text-only step's output is its text
    with pytest.raises(TypeError, match="text must be a list of per-sample token ids"):
        model.text_step(cache, None, tau)
    with pytest.raises(TypeError, match="video_cache must be a univigu_fast.video_cache.VideoCache"):
        model.text_step("once", text, tau)


@pytest.mark.parametrize("change", ["load_state_dict", "assign", "in_place", "half", "submodule_assign", "data_assign",
                                    "setattr", "half_and_back", "data_assign_twice", "data_swap", "new_layer",
                                    "copied_layer"])
def test_text_step_refuses_a_cache_of_changed_weights(change):
    """A text step after the model's weights changed mixed the old weights' video / prompt keys and
    values with the new weights (logits 4.9 off the exact ones); after ``.half()`` it (and the next
    full step, which refilled the old fp32 buffers) failed inside the attention. Now the text step is
    refused, and a full step refills the cache (new buffers for a new dtype) so the text steps are exact again."""
    model, other = tiny_reference(seed=5), tiny_reference(seed=6)
    videos, prompts = _inputs(model.config, seed=2)
    text, tau = [torch.arange(4), torch.arange(2)], torch.tensor([0.3, 0.6])
    with torch.no_grad():
        cache = _filled_cache(model, videos, prompts, text)
        model.text_step(cache, text, tau)
        if change == "load_state_dict":
            model.load_state_dict(other.state_dict())
        elif change == "assign":
            model.load_state_dict(other.state_dict(), assign=True)
        elif change == "in_place":
            model.blocks[0].attn1.to_v.weight.mul_(2)
        elif change == "submodule_assign":  # (the root's load_state_dict hook does not run)
            model.blocks[0].load_state_dict(other.blocks[0].state_dict(), assign=True)
        elif change == "data_assign":
            model.blocks[0].attn1.to_v.weight.data = other.blocks[0].attn1.to_v.weight.detach().clone()
        elif change == "setattr":
            model.blocks[0].attn1.to_v.weight = torch.nn.Parameter(other.blocks[0].attn1.to_v.weight.detach().clone())
        elif change == "half_and_back":  # same dtype, same values (fp16-rounded), new storage
            model.half().float()
        elif change == "data_assign_twice":  # CUDA's allocator may hand the first storage back (a sum of
            for _ in range(2):                 # addresses was then the same again): the record holds it
                for p in model.parameters():
                    p.data = p.data * 1.1
        elif change == "data_swap":  # two same-shape weights swap storages (same set of addresses)
            a, b = model.blocks[0].attn1.to_q.weight, model.blocks[0].attn1.to_k.weight
            a.data, b.data = b.data, a.data
        elif change == "new_layer":  # a replaced submodule (LoRA injection, a quantized swap): the old
            layer = torch.nn.Linear(*model.blocks[0].attn1.to_v.weight.T.shape)  # one's slots are unchanged
            layer.load_state_dict(other.blocks[0].attn1.to_v.state_dict())
            model.blocks[0].attn1.to_v = layer
        elif change == "copied_layer":
            import copy

            model.blocks[0].attn1.to_v = copy.deepcopy(other.blocks[0].attn1.to_v)
        else:
            model.half()
        error = ValueError if change == "half" else RuntimeError
        with pytest.raises(error, match="run a full step with video_cache=... first"):
            model.text_step(cache, text, tau)
        dtype = model.dtype
        full = model([v.to(dtype) for v in videos], torch.ones(2), [p.to(dtype) for p in prompts], text=text,
                     tau_text=tau, video_cache=cache).text_out
        assert cache.keys[0].dtype == dtype
        step = model.text_step(cache, text, tau)
    for a, b in zip(full, step):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_text_step_refuses_weights_swapped_into_the_slots():
    """torch.func.functional_call puts other weights (e.g. EMA ones) into the model's slots for one call:
    a plain text step on a cache filled inside such a call, and a text step with such weights in the
    slots on a cache filled with the model's own, mixed two sets of weights (logits 2.2 and 3.2 off)."""
    from torch.func import functional_call

    model = tiny_reference(seed=5)
    videos, prompts = _inputs(model.config, seed=2)
    text, tau = [torch.arange(4), torch.arange(2)], torch.tensor([0.3, 0.6])
    ema = {n: p.detach() * 1.2 for n, p in model.named_parameters()}
    with torch.no_grad():
        cache = VideoCache(model)
        functional_call(model, ema, (videos, torch.ones(2), prompts), dict(text=text, tau_text=tau, video_cache=cache))
        with pytest.raises(RuntimeError, match="run a full step"):
            model.text_step(cache, text, tau)
        cache = _filled_cache(model, videos, prompts, text)
        for name, t in ema.items():  # the slots now hold plain tensors, as inside functional_call
            mod_name, _, leaf = name.rpartition(".")
            mod = model.get_submodule(mod_name)
            delattr(mod, leaf)
            setattr(mod, leaf, t)
        with pytest.raises(RuntimeError, match="run a full step"):
            model.text_step(cache, text, tau)


def test_cache_survives_unrelated_modules_and_frozen_keys():
    """Building another module between a full step and a text step changes nothing of this model's
    weights (a process-wide count of parameter registrations refused the step); a full step whose keys
    need no grad but whose queries do (only to_q trained) keeps its own copies (the attention saves the
    keys: a text step before the backward broke it)."""
    model = tiny_reference(seed=5)
    videos, prompts = _inputs(model.config, seed=2)
    text, tau = [torch.arange(4), torch.arange(2)], torch.tensor([0.3, 0.6])
    with torch.no_grad():
        cache = _filled_cache(model, videos, prompts, text)
        torch.nn.Linear(3, 3)
        model.text_step(cache, text, tau)
    # the recorded weights' storages stay alive, so no other tensor can take a recorded address
    w = model.blocks[0].attn1.to_q.weight
    w.data = w.data.clone()
    assert [t.data_ptr() for t in cache.weights._held] == [ptr for _, ptr, _ in cache.weights.params]
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith("attn1.to_q.weight"))
    cache = VideoCache(model)  # new buffers: the keys this autograd step stores (a refill copies into old ones)
    out = model(videos, torch.ones(2), prompts, text=text, tau_text=tau, video_cache=cache)
    model.text_step(cache, text, tau)
    sum(t.square().sum() for t in out.text_out).backward()
    assert model.blocks[0].attn1.to_q.weight.grad is not None
    cache.release()
    assert cache.nbytes == 0 and cache.text_rows.numel() == 0 and cache.weights is None


def test_cache_of_an_autograd_full_step():
    """A full step run with autograd on: the cache keeps its own detached copies, so the text steps'
    in-place writes neither break that step's backward (it failed: "modified by an inplace operation")
    nor chain every refresh's autograd graph into the buffers; the step itself keeps its own graph:
    every gradient equals the uncached step's (the prompt path and cross-attention k/v got none)."""
    model = tiny_reference(seed=5)
    videos, prompts = _inputs(model.config, seed=2)
    text, tau = [torch.arange(4), torch.arange(2)], torch.tensor([0.3, 0.6])

    def grads(**kw):
        model.zero_grad(set_to_none=True)
        out = model(videos, torch.ones(2), prompts, text=text, tau_text=tau, **kw)
        if "video_cache" in kw:
            model.text_step(kw["video_cache"], text, tau)
        sum(t.float().square().sum() for t in out.text_out).backward()
        return {n: p.grad for n, p in model.named_parameters()}

    want = grads()
    cache = VideoCache(model)
    for _ in range(2):  # the second is a refill of the same batch
        got = grads(video_cache=cache)
        assert not any(t.requires_grad for t in cache.keys + cache.values)
        assert not any(t.requires_grad for kv in cache.prompt_kv for t in kv)
        assert [n for n in want if (want[n] is None) != (got[n] is None)] == []
        for n, g in want.items():
            if g is not None:
                torch.testing.assert_close(got[n], g, rtol=1e-5, atol=1e-6, msg=n)


def test_text_step_on_a_cache_filled_under_inference_mode():
    """Inference tensors may only be updated in inference mode: a text step (no_grad) on a cache filled
    under ``torch.inference_mode()`` raised; it now runs in that mode, and equals the no_grad result."""
    model = tiny_reference(seed=5)
    videos, prompts = _inputs(model.config, seed=2)
    text, tau = [torch.arange(4), torch.arange(2)], torch.tensor([0.3, 0.6])
    with torch.inference_mode():
        cache = _filled_cache(model, videos, prompts, text)
    got = model.text_step(cache, text, tau)
    with torch.no_grad():
        want = model.text_step(_filled_cache(model, videos, prompts, text), text, tau)
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert not torch.is_inference_mode_enabled()
    with torch.no_grad():  # a refresh outside inference mode: new buffers (updating inference tensors raised)
        model(videos, torch.ones(2), prompts, text=text, tau_text=torch.zeros(2), video_cache=cache)
    assert not cache.keys[0].is_inference()
    for a, b in zip(want, model.text_step(cache, text, tau)):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


@pytest.mark.parametrize("bad", ["sometimes", "every:0", "every:x", "every", "", 3, "every: 2", "every:+2", "every:1_0"])
def test_bad_policy_strings(bad):
    with pytest.raises((ValueError, TypeError), match="policy"):
        parse_policy(bad)


def test_policies_parse():
    assert parse_policy("off") == ("off", 0)
    assert parse_policy("ONCE") == ("once", 0)
    assert parse_policy("every:4") == ("every", 4)


def test_cli_caption_video_cache(tmp_path):
    """``univigu-fast caption --video-cache``: off and every:1 print the same caption, once runs,
    a bad policy is a usage error naming the option."""
    from typer.testing import CliRunner

    from univigu_fast import synthetic as S
    from univigu_fast.cli import app

    model = tiny_reference(seed=2, in_channels=16, out_channels=16, text_dim=8, vocab_size=len(S.SyntheticTokenizer()))
    model.save_pretrained(tmp_path / "m")
    lat = tmp_path / "z.pt"
    torch.save(S.make_dataset(1, 0, text_dim=8).latents[0], lat)
    base = ["caption", "--model", str(tmp_path / "m"), "--latents", str(lat), "--synthetic", "--length", "6",
            "--steps", "3", "--seed", "5"]
    runner = CliRunner()
    outs = {}
    for policy in ("off", "every:1", "once"):
        r = runner.invoke(app, base + ["--video-cache", policy])
        assert r.exit_code == 0, r.output
        outs[policy] = r.output
    assert outs["off"] == outs["every:1"] and len(outs["once"].split()) <= 6
    r = runner.invoke(app, base + ["--video-cache", "sometimes"])
    assert r.exit_code != 0 and "--video-cache" in r.output
    r = runner.invoke(app, base + ["--video-cache", "off", "--cuda-graph"])  # no text-only steps to replay
    assert r.exit_code != 0 and "--cuda-graph" in r.output and "--video-cache once" in r.output
    if not torch.cuda.is_available():
        r = runner.invoke(app, base + ["--video-cache", "once", "--cuda-graph"])
        assert r.exit_code != 0 and "--cuda-graph" in r.output and "needs a CUDA device" in r.output


def test_demo_evaluates_the_cached_policies(tmp_path):
    """metrics.json of ``univigu-fast demo`` carries accuracy / caption-only accuracy / token agreement
    per cached policy; evaluate_understanding's token agreement is 1 for every:1 (exact) and the
    fraction of equal tokens otherwise."""
    import json

    from univigu_fast import synthetic as S
    from univigu_fast.demo import DemoConfig, evaluate_understanding, run_demo, token_agreement

    cfg = DemoConfig(seed=2, n_train=16, n_test=3, steps1=2, steps2=2, batch_size=4, layers=1, caption_steps=3,
                     gen_steps=1)
    run_demo(cfg, tmp_path, progress=False, log=lambda *a: None)
    m = json.loads((tmp_path / "metrics.json").read_text())
    for name in ("once", "every4"):
        for key in ("understanding_attribute_accuracy", "understanding_caption_only_attribute_accuracy",
                    "understanding_token_agreement"):
            v = m[f"{key}_cached_{name}"]
            assert isinstance(v, float) and 0.0 <= v <= 1.0, (key, name, v)
    model = tiny_reference(seed=4, in_channels=16, out_channels=16, text_dim=8, vocab_size=len(S.SyntheticTokenizer()))
    data = S.make_dataset(3, 0, text_dim=8, frames=2, size=8)
    exact = evaluate_understanding(model, data, steps=3, seed=1, batch=2, keep_ids=True)
    same = evaluate_understanding(model, data, steps=3, seed=1, batch=2, video_cache="every:1", reference_ids=exact["ids"])
    assert same["token_agreement"] == 1.0 and same["attribute_accuracy"] == exact["attribute_accuracy"]
    once = evaluate_understanding(model, data, steps=3, seed=1, batch=2, video_cache="once", reference_ids=exact["ids"],
                                  keep_ids=True)
    n_eq = sum(a == b for x, y in zip(once["ids"], exact["ids"]) for a, b in zip(x, y))
    assert once["token_agreement"] == n_eq / sum(len(x) for x in exact["ids"])
    assert token_agreement([[1, 2], [3]], [[1, 0], [3]]) == 2 / 3
    with pytest.raises(ValueError, match="lengths"):
        token_agreement([[1, 2]], [[1]])


@pytest.mark.parametrize("device", ["cuda" if torch.cuda.is_available() else "cpu"])
def test_fast_model_text_step_matches_reference(device):
    """The fast model (Triton kernels; the interpreter on CPU) on a ``once`` cache: its text-only step
    (varlen attention with text queries over [cached video; text] keys) equals the reference's."""
    from univigu_fast.model import UniViGUModel as FastModel

    ref = tiny_reference(seed=8).to(device)
    fast = FastModel(ref.config).to(device).eval()
    fast.load_state_dict(ref.state_dict())
    videos, prompts = _inputs(ref.config, seed=4)
    videos, prompts = [v.to(device) for v in videos], [p.to(device) for p in prompts]
    g = torch.Generator().manual_seed(2)
    first = [torch.randint(0, ref.config.vocab_size, (n,), generator=g).to(device) for n in (5, 3)]
    later = [torch.randint(0, ref.config.vocab_size, (n,), generator=g).to(device) for n in (5, 3)]
    got = []
    with torch.no_grad():
        for m in (ref, fast):
            cache = VideoCache(m)
            m(videos, torch.ones(2), prompts, text=first, tau_text=torch.tensor([0.0, 0.1]), video_cache=cache)
            got.append(m.text_step(cache, later, torch.tensor([0.4, 0.6])))
            cache.release()
    for a, b in zip(*got):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


def test_fast_model_reads_index_tables_without_a_device_sync(monkeypatch):
    """Every int32 index table the fast model's kernels check or launch from (cu_seqlens, segment
    tables, the one-segment table of its norms) is read from the host copy the packer remembered: a
    ``.tolist()`` of a device tensor would sync the GPU every layer and fail inside a CUDA graph."""
    from univigu_fast.model import UniViGUModel as FastModel

    ref = tiny_reference(seed=8)
    fast = FastModel(ref.config).eval()
    fast.load_state_dict(ref.state_dict())
    videos, prompts = _inputs(ref.config, seed=4)
    text = [torch.randint(0, ref.config.vocab_size, (n,)) for n in (5, 3)]
    reads = []
    tolist = torch.Tensor.tolist

    def recording_tolist(t):
        if t.dtype == torch.int32:
            reads.append(tuple(t.shape))
        return tolist(t)

    with torch.no_grad():
        cache = VideoCache(fast)
        fast(videos, torch.ones(2), prompts, text=text, tau_text=torch.tensor([0.0, 0.1]), video_cache=cache)
        monkeypatch.setattr(torch.Tensor, "tolist", recording_tolist)
        fast(videos, torch.ones(2), prompts, text=text, tau_text=torch.tensor([0.2, 0.1]))
        fast.text_step(cache, text, torch.tensor([0.4, 0.6]))
        cache.release()
    assert reads == []


def test_cost_model_counts():
    """The FLOP estimate: with no video rows a text-only step is the exact step (same rows, same
    GEMMs) less the prompt's key/value projections the cache keeps; step counts per policy; every:1
    costs exactly the exact caption."""
    from univigu_fast.profiling import component_flops, config_for
    from univigu_fast.shapes import SHAPES, BenchShape
    from univigu_fast.video_cache import caption_cost, text_step_bytes, text_step_flops

    s = SHAPES["wan1.3b-varlen"]
    c = config_for(s)
    textonly = BenchShape("t", (0,) * s.batch, s.text_lens, s.prompt_len, s.dim, s.ffn_dim, s.num_heads, s.head_dim,
                          s.num_layers)
    want = component_flops(textonly, c, "understanding", decode=True)
    want["other"] -= c.num_layers * 2 * (s.prompt_len * s.batch) * c.dim * c.dim * 2  # to_k, to_v of the prompt
    assert text_step_flops(textonly, c) == pytest.approx(want)
    s = SHAPES["wan1.3b-480p"]
    off, once, every4 = (caption_cost(s, c, 50, p) for p in ("off", "once", "every:4"))
    assert (once["full_steps"], once["text_steps"], every4["full_steps"], every4["text_steps"]) == (1, 49, 13, 37)
    assert caption_cost(s, c, 50, "every:1")["flops"] == off["flops"] == 50 * off["full_step_flops"]
    assert 250e12 < off["full_step_flops"] < 320e12  # issue 8: "about 280 TFLOP per step"
    assert off["full_step_flops"] / once["text_step_flops"] > 100
    # the text step reads every cached key/value row once per layer (bf16)
    assert text_step_bytes(s, c) > c.num_layers * 2 * (32760 + 256) * c.dim * 2
    for steps in (0, -3, 2.0):  # 0 and -3 reported negative text-step counts
        with pytest.raises(ValueError, match="steps must be a positive int"):
            caption_cost(s, c, steps, "once")


# ---------------------------------------------------------------------------- CUDA graph of the text step
def _fake_capture(fn, device):
    """CPU stand-in for ``capture_cuda_graph`` with a CUDA graph's contract: capturing computes nothing
    valid (the output holds NaN until the first replay); a replay re-runs the recorded work into
    the same output tensor, reading whatever the static inputs hold then."""
    out = torch.full_like(fn(), float("nan"))

    class Graph:
        def replay(self):
            out.copy_(fn())

    return Graph(), out


@pytest.fixture
def fake_graphs(monkeypatch):
    """CUDA graphs on CPU: the device check passes, captures are counted."""
    import univigu_fast.video_cache as vc

    captured = []

    def capture(fn, device):
        captured.append(fn)
        return _fake_capture(fn, device)

    monkeypatch.setattr(vc, "check_cuda_graph_device", lambda device: None)
    monkeypatch.setattr(vc, "capture_cuda_graph", capture)
    return captured


def test_cuda_graph_text_steps_equal_eager_steps(fake_graphs):
    """Replayed text steps (static inputs refreshed per step, output copied out) give each step's own
    result: steps with different ids and times equal the eager steps, also compared after later
    replays. A refresh of the same batch (every:r; new text, so new video keys/values) writes into the
    buffers the graph reads (same storage) and keeps the graph: the replays after it equal eager steps
    after the same refresh. A full step on another batch drops the graph."""
    model = tiny_reference(seed=5)
    videos, prompts = _inputs(model.config, seed=2)
    g = torch.Generator().manual_seed(3)

    def ids():
        return [torch.randint(0, model.config.vocab_size, (n,), generator=g) for n in (6, 3)]

    first, refresh = ids(), ids()
    steps = [(ids(), torch.tensor([0.1 * i + 0.2, 0.5 - 0.1 * i])) for i in range(3)]
    outs = {}
    with torch.no_grad():
        for graph in (False, True):
            cache = VideoCache(model, cuda_graph=graph)
            model(videos, torch.ones(2), prompts, text=first, tau_text=torch.zeros(2), video_cache=cache)
            out = [model.text_step(cache, text, tau) for text, tau in steps]
            captured, storage = cache.graph, [t.data_ptr() for t in cache.keys + cache.values]
            model(videos, torch.ones(2), prompts, text=refresh, tau_text=torch.tensor([0.3, 0.2]), video_cache=cache)
            out += [model.text_step(cache, text, tau) for text, tau in steps]
            outs[graph] = out
            if graph:
                assert cache.graph is captured and cache.graph_captures == 1 and len(fake_graphs) == 1
                assert [t.data_ptr() for t in cache.keys + cache.values] == storage
                model(videos[:1], torch.ones(1), prompts[:1], text=first[:1], tau_text=torch.zeros(1),
                      video_cache=cache)
                assert cache.graph is None  # another batch: other buffers
            cache.release()
            assert cache.graph is None
    for eager, replayed in zip(outs[False], outs[True]):
        for a, b in zip(eager, replayed):
            torch.testing.assert_close(b, a, rtol=0, atol=0)
    replayed = [o[0] for o in outs[True]]
    assert not torch.equal(replayed[0], replayed[1])  # the steps differ: stale inputs would show
    assert not torch.allclose(replayed[0], replayed[3])  # same step after the refresh: new video keys/values


def test_cuda_graph_caption_and_fallbacks(fake_graphs, monkeypatch, caplog):
    """``caption(cuda_graph=True)``: the same ids as without, one capture for the whole caption (the
    refreshes write into the same buffers), also for a text_step called with autograd on (it runs under
    no_grad); a failing capture logs why and runs the text steps eagerly (same ids)."""
    import univigu_fast.video_cache as vc

    model = tiny_reference(seed=7)
    videos, prompts = _inputs(model.config, seed=5)
    kw = dict(steps=7, seed=2, video_cache="every:3")  # full steps 0, 3, 6; text steps 1, 2, 4, 5
    want = caption(model, videos, prompts, [5, 2], **kw)
    stats = {}
    got = caption(model, videos, prompts, [5, 2], cuda_graph=True, stats=stats, **kw)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert stats["graph_captures"] == 1 and stats["graph_error"] is None and len(fake_graphs) == 1  # refreshes in place

    cache = VideoCache(model, cuda_graph=True)
    text = [torch.zeros(4, dtype=torch.long)]
    model(videos[:1], torch.ones(1), prompts[:1], text=text, tau_text=torch.zeros(1), video_cache=cache)
    model.text_step(cache, text, torch.tensor([0.5]))  # autograd on: text_step is inference only (no_grad)
    assert cache.graph_captures == 1 and cache.graph_error is None

    def broken(fn, device):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(vc, "capture_cuda_graph", broken)
    with caplog.at_level("WARNING", logger="univigu_fast"):
        got = caption(model, videos, prompts, [5, 2], cuda_graph=True, stats=stats, **kw)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert stats["graph_captures"] == 0 and "not permitted" in stats["graph_error"]
    assert "CUDA graph capture of the text step failed" in caplog.text


def test_cuda_graph_dropped_when_the_weights_may_have_moved(fake_graphs):
    """A graph reads the weights where they were at capture: after ``load_state_dict`` (``assign=True``
    puts new tensors in place) the next full step refills the cache into new buffers and drops the graph
    (it kept replaying the old weights' memory); an in-place update keeps the storage, and the graph."""
    model, other = tiny_reference(seed=5), tiny_reference(seed=6)
    videos, prompts = _inputs(model.config, seed=2)
    text, tau = [torch.arange(4), torch.arange(2)], torch.tensor([0.3, 0.6])
    with torch.no_grad():
        cache = _filled_cache(model, videos, prompts, text, cuda_graph=True)
        model.text_step(cache, text, tau)
        graph = cache.graph
        model.blocks[0].attn1.to_v.weight.mul_(2)
        model(videos, torch.ones(2), prompts, text=text, tau_text=tau, video_cache=cache)
        model.text_step(cache, text, tau)
        assert cache.graph is graph and cache.graph_captures == 1
        model.half().float()  # same dtype, new storage: the graph would read freed memory
        model(videos, torch.ones(2), prompts, text=text, tau_text=tau, video_cache=cache)
        assert cache.graph is None
        model.text_step(cache, text, tau)
        assert cache.graph_captures == 2
        model.blocks[0].attn1.to_v = torch.nn.Linear(*model.blocks[0].attn1.to_v.weight.T.shape)  # a new layer
        model(videos, torch.ones(2), prompts, text=text, tau_text=tau, video_cache=cache)
        assert cache.graph is None
        model.text_step(cache, text, tau)
        assert cache.graph_captures == 3
        model.blocks[0].attn1.to_v = other.blocks[0].attn1.to_v
        model.load_state_dict(other.state_dict(), assign=True)
        model(videos, torch.ones(2), prompts, text=text, tau_text=tau, video_cache=cache)
        assert cache.graph is None
        got = model.text_step(cache, text, tau)
        assert cache.graph_captures == 4
        want = other.text_step(_filled_cache(other, videos, prompts, text, tau_text=(0.3, 0.6)), text, tau)
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_cuda_graph_first_replayed_under_inference_mode(fake_graphs):
    """A graph captured by a text step under inference_mode (cache filled outside it) kept inference
    tensors as its static inputs: the next text step outside inference_mode raised."""
    model = tiny_reference(seed=5)
    videos, prompts = _inputs(model.config, seed=2)
    text, tau = [torch.arange(4), torch.arange(2)], torch.tensor([0.3, 0.6])
    with torch.no_grad():
        eager = _filled_cache(model, videos, prompts, text)
        want = [model.text_step(eager, text, tau), model.text_step(eager, text, tau * 0.5)]
        cache = _filled_cache(model, videos, prompts, text, cuda_graph=True)
    with torch.inference_mode():
        first = model.text_step(cache, text, tau)
    with torch.no_grad():
        second = model.text_step(cache, text, tau * 0.5)
    for got, ref in zip((first, second), want):
        for a, b in zip(ref, got):
            torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_cuda_graph_refused_where_it_cannot_run():
    model = tiny_reference()
    videos, prompts = _inputs(model.config)
    with pytest.raises(ValueError, match="cuda_graph=True needs a model on a CUDA device, got a model on cpu"):
        VideoCache(model, cuda_graph=True)
    with pytest.raises(TypeError, match="cuda_graph must be True or False, got 'no'"):
        VideoCache(model, cuda_graph="no")
    with pytest.raises(ValueError, match="cuda_graph=True .* video_cache='off' has none"):
        caption(model, videos, prompts, [3, 2], steps=2, cuda_graph=True)


def test_cuda_graph_keeps_the_kernels_cached_tables(fake_graphs):
    """A graph reads, at every replay, the device tables the kernels' launchers took from their caches
    (tile tables, the fused LayerNorm's one-segment tables: LRU caches), which may drop them
    later: the graph keeps every table handed out while it was captured. The fast model (interpreter):
    each table an eager text step uses is one the graph holds; none leak outside a capture."""
    from univigu_fast.kernels._utils import retain_cached_tables
    from univigu_fast.model import UniViGUModel as FastModel

    ref = tiny_reference(seed=9)
    fast = FastModel(ref.config).eval()
    fast.load_state_dict(ref.state_dict())
    videos, prompts = _inputs(ref.config, seed=1)
    text = [torch.arange(4), torch.arange(2)]
    with torch.no_grad():
        cache = VideoCache(fast, cuda_graph=True)
        fast(videos, torch.ones(2), prompts, text=text, tau_text=torch.tensor([0.1, 0.2]), video_cache=cache)
        fast.text_step(cache, text, torch.tensor([0.3, 0.4]))
        with retain_cached_tables() as used:
            cache.run_text_layers = lambda run, x, seg_temb: run(x, seg_temb)  # one eager step, same tables
            fast.text_step(cache, text, torch.tensor([0.3, 0.4]))
    kept = {id(t) for t in cache.graph.tables}
    assert any(isinstance(t, tuple) for t in used) and any(isinstance(t, torch.Tensor) for t in used)
    assert all(id(t) in kept for t in used)
    from univigu_fast.kernels import _utils

    assert _utils._RETAINERS == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and stream syncs need a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_on_the_gpu(dtype):
    """The real capture with the fast model: an eager text step never waits for the GPU (torch's sync
    debug mode raises on any host sync; a capture would fail on one); replayed steps equal the eager
    ones (same kernels, same configs) in logits and in a sampled caption's ids."""
    from univigu_fast.model import UniViGUModel as FastModel

    ref = tiny_reference(seed=8)
    fast = FastModel(ref.config).to("cuda", dtype).eval()
    fast.load_state_dict(ref.state_dict())
    videos, prompts = _inputs(ref.config, seed=4)
    videos, prompts = [v.to("cuda", dtype) for v in videos], [p.to("cuda", dtype) for p in prompts]
    g = torch.Generator().manual_seed(2)
    first = [torch.randint(0, ref.config.vocab_size, (n,), generator=g).cuda() for n in (5, 3)]
    steps = [([torch.randint(0, ref.config.vocab_size, (n,), generator=g).cuda() for n in (5, 3)],
              torch.tensor([0.2 + 0.1 * i, 0.6 - 0.1 * i])) for i in range(3)]
    outs = {}
    with torch.no_grad():
        for graph in (False, True):
            cache = VideoCache(fast, cuda_graph=graph)
            fast(videos, torch.ones(2), prompts, text=first, tau_text=torch.tensor([0.0, 0.1]), video_cache=cache)
            if not graph:
                fast.text_step(cache, *steps[0], text_output="sample", sample_seed=1)  # autotuning syncs
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
                try:
                    fast.text_step(cache, *steps[0], text_output="sample", sample_seed=1)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            outs[graph] = [fast.text_step(cache, text, tau) for text, tau in steps]
            if graph:
                assert cache.graph_error is None and cache.graph_captures == 1
            cache.release()
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for eager, replayed in zip(outs[False], outs[True]):
        for a, b in zip(eager, replayed):
            torch.testing.assert_close(b, a, **tol)
    if dtype == torch.float32:
        kw = dict(steps=6, seed=3, video_cache="every:3")
        stats = {}
        want = caption(fast, videos, prompts, [5, 3], **kw)
        got = caption(fast, videos, prompts, [5, 3], cuda_graph=True, stats=stats, **kw)
        assert stats["graph_captures"] == 1 and stats["graph_error"] is None
        assert all(torch.equal(a, b) for a, b in zip(got, want))
