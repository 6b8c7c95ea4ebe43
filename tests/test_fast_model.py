"""The fast UniViGUModel (kernels; the interpreter on CPU) against the reference on the same weights."""
import pytest
import torch

from _models import sample_batch, tiny_reference
from univigu_fast import UniViGUModel
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


def test_state_dict_and_names_identical():
    ref, fast = _pair()
    assert [n for n, _ in ref.named_modules()] == [n for n, _ in fast.named_modules()]
    assert list(ref.state_dict()) == list(fast.state_dict())
    back = ReferenceModel(ref.config)
    missing, unexpected = back.load_state_dict(fast.state_dict())
    assert not missing and not unexpected
