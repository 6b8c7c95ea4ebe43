"""Modality-routed grouped FFN over the packed ``[video; text]`` sequence (DESIGN §5.1).

Spec (paper Eq. 13/15): token rows of segment ``s`` go through expert ``e = seg_expert[s]``::

    y = W2_e · gelu_tanh(W1_e · x + b1_e) + b2_e
    out = residual + gate[s] * y            (or ``y`` when residual and gate are None)
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ._utils import expand_segments

Expert = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # (w1 (F,dim), b1 (F,), w2 (dim,F), b2 (dim,))


def modality_ffn_reference(
    x: torch.Tensor,
    seg_offsets: torch.Tensor,
    seg_expert: torch.Tensor,
    experts: Sequence[Expert],
    *,
    residual: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """Naive routing: gather each expert's rows, two dense ``F.linear`` calls, scatter back.

    x (T, dim); seg_offsets int32 (S+1,); seg_expert int32 (S,); gate (S, dim); residual (T, dim).
    Computes in the dtype of ``x`` (pass fp32 tensors for an fp32 reference).
    """
    token_expert = expand_segments(seg_expert.long(), seg_offsets)
    y = x.new_empty(x.shape)
    for e, (w1, b1, w2, b2) in enumerate(experts):
        rows = (token_expert == e).nonzero(as_tuple=True)[0]
        if rows.numel() == 0:
            continue
        h = F.gelu(F.linear(x.index_select(0, rows), w1, b1), approximate="tanh")
        y.index_copy_(0, rows, F.linear(h, w2, b2))
    if gate is None and residual is None:
        return y
    # gated residual in fp32, as Wan: (h.float() + y.float() * gate).type_as(h)
    out = y.float()
    if gate is not None:
        out = out * expand_segments(gate.float(), seg_offsets)
    if residual is not None:
        out = residual.float() + out
    return out.to(x.dtype if residual is None else residual.dtype)


class GELUProj(torch.nn.Module):
    """``net.0`` of a diffusers FeedForward: ``gelu_tanh(proj(x))`` (parameter names ``proj.{weight,bias}``)."""

    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.proj = torch.nn.Linear(dim, inner_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(torch.nn.Module):
    """Wan's FFN under diffusers' names: ``net.0.proj`` (dim -> inner, GELU-tanh), ``net.2`` (inner -> dim)."""

    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.net = torch.nn.ModuleList([GELUProj(dim, inner_dim), torch.nn.Dropout(0.0), torch.nn.Linear(inner_dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x

    def expert(self) -> Expert:
        """``(w1, b1, w2, b2)`` in ``nn.Linear`` layout, as :func:`modality_ffn` takes them."""
        return (self.net[0].proj.weight, self.net[0].proj.bias, self.net[2].weight, self.net[2].bias)
