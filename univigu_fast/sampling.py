"""Samplers (paper §3.3, Eq. 16-18; DESIGN §4): captioning a clean video with the text flow.

Discrete text flow (the released checkpoints): mixture path ``x_t = x1`` with probability
``kappa(t) = t^n`` else the source token (uniform over V, or [MASK]); the discrete Euler step from
``t`` to ``t + h`` samples ``x1_hat ~ softmax(logits / T)`` — the fused linear-sample kernel does it
without materialising the logits (Gumbel-max) — and moves each token to ``x1_hat`` with probability
``min(1, h kappa'(t) / (1 - kappa(t)))``; the last step lands on ``x1_hat``.
Embedding text flow (paper Eq. 7-8): Euler on the embeddings, then ``argmax_v z . E_v``.
"""
from __future__ import annotations

import torch


def _source_tokens(config, n: int, generator: torch.Generator, device) -> torch.Tensor:
    if config.discrete_source == "mask":
        return torch.full((n,), config.mask_token_id, dtype=torch.long, device=device)
    return torch.randint(0, config.vocab_size, (n,), generator=generator).to(device)


@torch.no_grad()
def caption(model, videos, prompts, text_lens, *, steps: int = 50, seed: int = 0, kappa_power: float = 1.0,
            temperature: float = 1.0) -> list[torch.Tensor]:
    """Understanding (``tau_video = 1``): integrate the text flow from noise to ids, per sample.

    videos: list of (C, F, H, W); prompts: list of (L, text_dim); text_lens: tokens per caption.
    Returns a list of int64 id tensors. ``model`` is a reference or fast ``UniViGUModel``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    c = model.config
    device = model.device
    g = torch.Generator().manual_seed(seed)
    B = len(videos)
    ones = torch.ones(B)
    if c.text_flow == "discrete":
        x = [_source_tokens(c, n, g, device) for n in text_lens]
        for i in range(steps):
            t, h = i / steps, 1.0 / steps
            out = model(videos, ones, prompts, text=x, tau_text=torch.full((B,), t), text_output="sample",
                        sample_seed=int(torch.randint(0, 2**62, (1,), generator=g)), temperature=temperature)
            x1_hat = out.text_out.ids
            p_jump = 1.0 if i == steps - 1 else jump_probability(t, h, kappa_power)
            x = [torch.where(torch.rand(xi.shape, generator=g).to(device) < p_jump, yi, xi) for xi, yi in zip(x, x1_hat)]
        return x
    # embedding flow: Euler on z (paper Eq. 16), decode by argmax against E (Eq. 8)
    z = [torch.randn(n, c.dim, generator=g).to(device, model.dtype) for n in text_lens]
    for i in range(steps):
        out = model(videos, ones, prompts, text=z, tau_text=torch.full((B,), i / steps))
        z = [zi + vi / steps for zi, vi in zip(z, out.text_out)]
    return [decode_embeddings(model, zi) for zi in z]


def jump_probability(t: float, h: float, kappa_power: float) -> float:
    """``min(1, h kappa'(t) / (1 - kappa(t)))`` for ``kappa(t) = t^n`` (the discrete Euler step)."""
    n = kappa_power
    if t == 0.0:
        dkappa = float("inf") if n < 1 else (1.0 if n == 1 else 0.0)
    else:
        dkappa = n * t ** (n - 1)
    kappa = t**n
    return 1.0 if kappa >= 1.0 else min(1.0, h * dkappa / (1.0 - kappa))


def decode_embeddings(model, z: torch.Tensor) -> torch.Tensor:
    """Paper Eq. 8: ``argmax_v z . E_v`` with E = ``vocab_embed.weight`` (the fused argmax kernel)."""
    ids, _, _ = model.ops.linear_argmax(z, model.vocab_embed.weight[: model.config.vocab_size])
    return ids
