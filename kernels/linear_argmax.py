"""Fused linear argmax / sample for text decoding (DESIGN §5.2).

``logits = x @ weight.T (+ bias)``; returns ``(ids, max_logit, logsumexp)`` per row without
materialising the ``(N, V)`` logits in the fast path.
"""
from __future__ import annotations

import torch


def linear_argmax_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """Naive decode: the full ``(N, V)`` logits in fp32, then argmax (ties -> lowest id).

    x (N, dim), weight (V, dim), bias (V,) -> ids int64 (N,), max_logit fp32 (N,), logsumexp fp32 (N,).
    """
    logits = x.float() @ weight.float().t()
    if bias is not None:
        logits = logits + bias.float()
    ids = logits.argmax(dim=-1)  # first maximal index, like torch.argmax
    max_logit = logits.gather(-1, ids[:, None]).squeeze(-1)
    return ids, max_logit, torch.logsumexp(logits, dim=-1)
