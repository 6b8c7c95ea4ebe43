"""The fast UniViGUModel (kernels; the interpreter on CPU) against the reference on the same weights."""
import pytest
import torch

from _models import sample_batch, tiny_reference
from univigu_fast import UniViGUModel
from univigu_fast.profiling import cast_inputs, flat_outputs
from univigu_fast.reference import UniViGUModel as ReferenceModel

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=1e-2, rtol=1e-2)}


def _pair(dtype=torch.float32, **overrides):
    ref = tiny_reference(seed=11, **overrides).to(DEVICE, dtype)
    fast = UniViGUModel(ref.config).to(DEVICE, dtype).eval()
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def _batch(config, mode, dtype):
    videos, prompts, texts, tau_v, tau_t = sample_batch(config, dtype=dtype)
    if mode == "understanding":
        tau_v = torch.ones_like(tau_v)
    elif mode == "generation":
        tau_t = torch.ones_like(tau_t)
    to = lambda xs: [x.to(DEVICE) for x in xs]  # noqa: E731
    return to(videos), to(prompts), to(texts), tau_v, tau_t


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mode", ["joint", "understanding", "generation"])
def test_fast_matches_reference(mode, dtype):
    ref, fast = _pair(dtype)
    videos, prompts, texts, tau_v, tau_t = _batch(ref.config, mode, dtype)
    with torch.no_grad():
        a = ref(videos, tau_v, prompts, text=texts, tau_text=tau_t)
        b = fast(videos, tau_v, prompts, text=texts, tau_text=tau_t)
    for x, y in zip(a.video_velocity + a.text_out, b.video_velocity + b.text_out):
        assert x.shape == y.shape
        torch.testing.assert_close(y.float(), x.float(), **TOL[dtype])


def test_fast_without_text_and_embedding_flow():
    for overrides in (dict(), dict(text_flow="embedding")):
        ref, fast = _pair(**overrides)
        videos, prompts, texts, tau_v, tau_t = _batch(ref.config, "joint", torch.float32)
        with torch.no_grad():
            for kw in (dict(), dict(text=texts, tau_text=tau_t)):
                a, b = ref(videos, tau_v, prompts, **kw), fast(videos, tau_v, prompts, **kw)
                for x, y in zip(a.video_velocity, b.video_velocity):
                    torch.testing.assert_close(y, x, **TOL[torch.float32])


def test_fused_decode_matches_reference():
    ref, fast = _pair()
    videos, prompts, texts, tau_v, tau_t = _batch(ref.config, "understanding", torch.float32)
    with torch.no_grad():
        a = ref(videos, tau_v, prompts, text=texts, tau_text=tau_t, text_output="argmax").text_out
        b = fast(videos, tau_v, prompts, text=texts, tau_text=tau_t, text_output="argmax").text_out
    assert torch.equal(a.ids[0], b.ids[0])
    torch.testing.assert_close(b.logsumexp[0], a.logsumexp[0], **TOL[torch.float32])


def test_training_step_gradients_match():
    ref, fast = _pair()
    ref.train(), fast.train()
    videos, prompts, texts, tau_v, tau_t = _batch(ref.config, "joint", torch.float32)
    grads = []
    for model in (ref, fast):
        model.zero_grad()
        out = model(videos, tau_v, prompts, text=texts, tau_text=tau_t)
        loss = sum((v.float() ** 2).mean() for v in out.video_velocity) + out.text_out[0].float().logsumexp(-1).mean()
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 50
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_head_dim_without_a_kernel_runs_the_reference_attention():
    """head_dim 24 (the synthetic demo's: 8 heads x 24) has no attention / RoPE kernel: the fast model
    runs their references instead of refusing, so a demo-trained model works with the CLI (forward,
    the cached text step, gradients), and the other ops stay on the kernels."""
    from univigu_fast.video_cache import VideoCache

    ref, fast = _pair(attention_head_dim=24)
    videos, prompts, texts, tau_v, tau_t = _batch(ref.config, "joint", torch.float32)
    got = []
    for model in (ref, fast):
        with torch.no_grad():
            out = model(videos, tau_v, prompts, text=texts, tau_text=tau_t)
            cache = VideoCache(model)
            model(videos, torch.ones_like(tau_v), prompts, text=texts, tau_text=torch.zeros_like(tau_t),
                  video_cache=cache)
            step = model.text_step(cache, texts, tau_t)
            cache.release()
        model.train()
        x = [v.clone().requires_grad_() for v in videos]
        model(x, tau_v, prompts, text=texts, tau_text=tau_t).video_velocity[0].float().pow(2).mean().backward()
        model.eval()
        got.append(out.video_velocity + out.text_out + list(step) + [x[0].grad])
    for a, b in zip(*got):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


def test_torch_compile_traces_the_kernels():
    """Dynamo through the whole model (graph breaks at host-side packing are expected); the kernels are
    opaque custom ops. ``aot_eager`` on CPU (one layer: tracing is the slow part); the CUDA test below runs inductor."""
    ref, fast = _pair(num_layers=1)
    videos, prompts, texts, tau_v, tau_t = _batch(ref.config, "joint", torch.float32)
    compiled = torch.compile(fast, backend="aot_eager")
    with torch.no_grad():
        a = fast(videos, tau_v, prompts, text=texts, tau_text=tau_t)
        b = compiled(videos, tau_v, prompts, text=texts, tau_text=tau_t)
    for x, y in zip(a.video_velocity + a.text_out, b.video_velocity + b.text_out):
        torch.testing.assert_close(y, x, **TOL[torch.float32])


def test_torch_compile_trains_through_the_fused_text_loss():
    """A training step's forward + backward under torch.compile with the fused cross-entropy
    (``text_output="cross_entropy"``): Dynamo traced into the Triton launcher (the interpreter's pointer
    arithmetic failed on fake tensors); the op now runs eagerly at a graph break, and gradients match."""
    ref, fast = _pair(num_layers=1)
    fast.train()
    videos, prompts, texts, tau_v, tau_t = _batch(ref.config, "joint", torch.float32)
    target = [t.flip(0) for t in texts]

    def loss(model):
        out = model(videos, tau_v, prompts, text=texts, tau_text=tau_t, text_output="cross_entropy", text_target=target)
        return sum(v.pow(2).mean() for v in out.video_velocity) + sum(l.sum() for l in out.text_out.loss)

    grads = []
    for model in (fast, torch.compile(fast, backend="aot_eager")):
        fast.zero_grad(set_to_none=True)
        value = loss(model)
        value.backward()
        grads.append([value.detach()] + [p.grad.clone() for p in fast.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 10
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, **TOL[torch.float32])


def test_state_dict_and_names_identical():
    ref, fast = _pair()
    assert [n for n, _ in ref.named_modules()] == [n for n, _ in fast.named_modules()]
    assert list(ref.state_dict()) == list(fast.state_dict())
    back = ReferenceModel(ref.config)
    missing, unexpected = back.load_state_dict(fast.state_dict())
    assert not missing and not unexpected


# ---------------------------------------------------------------------------------------------- GPU
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled kernels / bf16 need CUDA")


def _cuda_models():
    """Wan's head dim (128) and a ragged packed batch big enough to cross kernel tiles."""
    from _models import randomize
    from univigu_fast.config import UniViGUConfig

    cfg = UniViGUConfig.tiny(num_attention_heads=2, attention_head_dim=128, in_channels=16, out_channels=16,
                             text_dim=64, freq_dim=64, ffn_dim=512, vocab_size=1000)
    torch.manual_seed(0)
    ref = randomize(ReferenceModel(cfg), seed=3, std=0.05).cuda().eval()
    fast = UniViGUModel(cfg).cuda().eval()
    fast.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(1)
    videos = [torch.randn(16, 4, 12, 20, generator=g), torch.randn(16, 2, 8, 8, generator=g), torch.randn(16, 1, 2, 2, generator=g)]
    prompts = [torch.randn(n, 64, generator=g) for n in (20, 7, 1)]
    texts = [torch.randint(0, 1000, (n,), generator=g) for n in (37, 0, 5)]
    batch = dict(video_latents=[v.cuda() for v in videos], tau_video=torch.tensor([0.3, 1.0, 0.7]),
                 encoder_hidden_states=[p.cuda() for p in prompts], text=[t.cuda() for t in texts],
                 tau_text=torch.tensor([0.5, 0.2, 1.0]))
    return ref, fast, batch


def _assert_bf16_close(got, ref_bf16, ref_fp32, what):
    """flash-attn's rule: the fast model's error against fp32 at most twice the reference's own bf16 error."""
    err, base = (got - ref_fp32).abs().max().item(), (ref_bf16 - ref_fp32).abs().max().item()
    assert err <= 2 * base + 1e-3 * ref_fp32.abs().max().item(), f"{what}: max err {err:.4g} vs reference bf16 {base:.4g}"


@requires_cuda
def test_cuda_bf16_matches_reference_within_bf16_error():
    ref, fast, batch = _cuda_models()
    with torch.no_grad():
        want32 = flat_outputs(ref(**batch))
        ref.bfloat16(), fast.bfloat16()
        b16 = cast_inputs(batch, torch.bfloat16)
        want16, got16 = flat_outputs(ref(**b16)), flat_outputs(fast(**b16))
    _assert_bf16_close(got16, want16, want32, "bf16 forward")
    # the fused decode picks the same ids wherever the reference's top-2 logits are not bf16-tied
    with torch.no_grad():
        a = ref(**b16, text_output="argmax").text_out
        b = fast(**b16, text_output="argmax").text_out
    ia, ib = torch.cat(list(a.ids)), torch.cat(list(b.ids))
    assert ia.numel() == 42 and (ia == ib).float().mean().item() >= 0.9


@requires_cuda
def test_cuda_training_step_bf16_gradients_match():
    ref, fast, batch = _cuda_models()
    grads = {}
    for name, model, dtype in (("ref32", ref, torch.float32), ("fast16", fast.bfloat16(), torch.bfloat16)):
        model.train()
        out = model(**cast_inputs(batch, dtype))
        loss = sum(v.float().pow(2).mean() for v in out.video_velocity) + \
            sum(t.float().logsumexp(-1).mean() for t in out.text_out if t.numel())
        loss.backward()
        grads[name] = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
    assert grads["ref32"].keys() == grads["fast16"].keys()
    for n, g32 in grads["ref32"].items():
        g16 = grads["fast16"][n]
        if g32.norm() < 1e-6:
            continue
        cos = torch.nn.functional.cosine_similarity(g16.flatten(), g32.flatten(), dim=0).item()
        assert cos > 0.98, f"{n}: cosine {cos:.4f} between bf16 fast and fp32 reference gradients"


@requires_cuda
def test_cuda_autocast_bf16_forward_and_backward():
    ref, fast, batch = _cuda_models()
    with torch.no_grad():
        want32 = flat_outputs(ref(**batch))
        with torch.autocast("cuda", torch.bfloat16):
            want_ac = flat_outputs(ref(**batch))
    fast.train()
    with torch.autocast("cuda", torch.bfloat16):
        out = fast(**batch)
        got_ac = flat_outputs(out)
    _assert_bf16_close(got_ac.detach(), want_ac, want32, "autocast forward")
    got_ac.pow(2).mean().backward()
    grads = [p.grad for p in fast.parameters() if p.grad is not None]
    assert len(grads) > 50 and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


@requires_cuda
def test_cuda_torch_compile_matches_eager():
    ref, fast, batch = _cuda_models()
    fast.bfloat16()
    b16 = cast_inputs(batch, torch.bfloat16)
    compiled = torch.compile(fast)
    with torch.no_grad():
        eager, comp = flat_outputs(fast(**b16)), flat_outputs(compiled(**b16))
    torch.testing.assert_close(comp, eager, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtypes_without_a_kernel_run_the_reference_ops(dtype, monkeypatch):
    """float64 (no kernel takes it) and, under the interpreter, bfloat16 (its ``tl.dot`` computes bf16
    wrongly, DESIGN §7) run the reference ops: the fast model equals the reference in that dtype.
    On CUDA bf16 runs the kernels and is checked within bf16 error (``test_cuda_bf16_*``)."""
    if dtype == torch.bfloat16 and DEVICE == "cuda":
        pytest.skip("bf16 on CUDA runs the kernels; the test_cuda_bf16_* tests check them")
    import univigu_fast.model as fast_module

    launches = []
    monkeypatch.setattr(fast_module, "modulated_layer_norm", lambda *args, **kwargs: launches.append(args))
    ref, fast = _pair(dtype)
    videos, prompts, texts, tau_v, tau_t = _batch(ref.config, "joint", dtype)
    with torch.no_grad():
        a = ref(videos, tau_v, prompts, text=texts, tau_text=tau_t)
        b = fast(videos, tau_v, prompts, text=texts, tau_text=tau_t)
        ids_a = ref(videos, tau_v, prompts, text=texts, tau_text=tau_t, text_output="argmax").text_out.ids
        ids_b = fast(videos, tau_v, prompts, text=texts, tau_text=tau_t, text_output="argmax").text_out.ids
    for x, y in zip(a.video_velocity + a.text_out, b.video_velocity + b.text_out):
        assert y.dtype == dtype
        # float64: the modulation / timestep math is float32 by design (as Wan's), so fp32-level agreement
        torch.testing.assert_close(y, x, **(TOL[torch.float32] if dtype == torch.float64 else dict(atol=0, rtol=0)))
    assert all(torch.equal(i, j) for i, j in zip(ids_a, ids_b))
    assert launches == []  # norm2 too (its fused LayerNorm ran the kernel on float64 rows)


def test_fast_ops_check_arguments_before_falling_back():
    """FAST_OPS falls back to the references (which check nothing and fill preallocated outputs) for a
    float64 input or a head_dim without a kernel: it checks the arguments as the kernels do first. A
    cu_seqlens ending short of the tokens returned rows of uninitialised memory; an expert id out of
    range returned 7e194 for its rows."""
    from univigu_fast.ops import FAST_OPS

    for dtype, D in ((torch.float64, 16), (torch.float32, 24)):
        q = torch.randn(14, 2, D, dtype=dtype)
        for cu_q, cu_k, match in ((torch.tensor([0, 10], dtype=torch.int32), torch.tensor([0, 14], dtype=torch.int32),
                                   r"cu_seqlens_q\[-1\] must equal the number of packed tokens 14, got 10"),
                                  (torch.tensor([0, 14]), torch.tensor([0, 14], dtype=torch.int32), "cu_seqlens_q must be int32"),
                                  (torch.tensor([0, 7, 14], dtype=torch.int32), torch.tensor([0, 14], dtype=torch.int32),
                                   "same batch size")):
            with pytest.raises((ValueError, TypeError), match=match):
                FAST_OPS.attention(q, q, q, cu_q, cu_k, 14, 14)
    x = torch.randn(6, 8, dtype=torch.float64)
    expert = tuple(t.double() for t in (torch.randn(16, 8), torch.randn(16), torch.randn(8, 16), torch.randn(8)))
    seg = torch.tensor([0, 2, 4, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"seg_expert ids must lie in \[0, 2\), got \[0, 1, 2\]"):
        FAST_OPS.modality_ffn(x, seg, torch.tensor([0, 1, 2], dtype=torch.int32), [expert, expert])
    with pytest.raises(ValueError, match=r"weight must be \(V, dim=8\)"):
        FAST_OPS.linear_argmax(x, torch.randn(5, 7, dtype=torch.float64))
    with pytest.raises(ValueError, match="gate must be a floating"):
        FAST_OPS.gated_residual(x, x, seg, torch.randn(2, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"weight must be \(dim=8,\)"):
        FAST_OPS.rms_norm(x, torch.randn(7, dtype=torch.float64), 1e-6)
    with pytest.raises(ValueError, match=r"shift must be \(S=3, dim=8\)"):
        FAST_OPS.modulated_layer_norm(x, seg, torch.randn(2, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64), 1e-6)


@pytest.mark.parametrize("text", ["none", "empty"])
def test_text_expert_gets_no_gradient_without_text_rows(text):
    """A batch without text rows never calls ffn_t in the reference, so its gradients stay None; the fast
    model's grouped FFN must leave them None too (zeros would still move them under AdamW's weight
    decay and momentum)."""
    ref, fast = _pair()
    videos, prompts, _, tau_v, _ = _batch(ref.config, "joint", torch.float32)
    kw = {} if text == "none" else dict(text=[torch.zeros(0, dtype=torch.long, device=DEVICE)] * len(videos),
                                        tau_text=torch.full((len(videos),), 0.5))
    grads = []
    for model in (ref, fast):
        model.train().zero_grad(set_to_none=True)
        sum((v ** 2).mean() for v in model(videos, tau_v, prompts, **kw).video_velocity).backward()
        grads.append({n for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0] == grads[1] and not any(".ffn_t." in n for n in grads[1]) and any(".ffn." in n for n in grads[1])


def test_inference_mode_runs_as_no_grad():
    """Packed tables made under torch.inference_mode() have no version counter to tie their host copy to.
    The kernels' cached tables (tiles, one-segment tables, video RoPE) that a first forward under
    inference_mode builds are shared with later training steps: they are built outside inference mode
    (a training step of the same shapes raised "Inference tensors cannot be saved for backward")."""
    from univigu_fast.kernels import _utils
    from univigu_fast import packing

    for cached in (_utils._tile_table, _utils._one_segment_table, packing._video_rope):
        cached.cache_clear()
    ref, fast = _pair(attention_head_dim=16, num_attention_heads=3)  # shapes no earlier test cached
    videos, prompts, texts, tau_v, tau_t = _batch(ref.config, "joint", torch.float32)
    for model in (ref, fast):
        with torch.inference_mode():
            got = model(videos, tau_v, prompts, text=texts, tau_text=tau_t)
        with torch.no_grad():
            want = model(videos, tau_v, prompts, text=texts, tau_text=tau_t)
        torch.testing.assert_close(flat_outputs(got), flat_outputs(want), atol=0, rtol=0)
        model.train()
        model(videos, tau_v, prompts, text=texts, tau_text=tau_t).video_velocity[0].square().mean().backward()
        model.eval()
    assert all(p.grad is not None for p in fast.blocks[0].norm2.parameters())
