"""Variable-length joint attention over packed sequences with RoPE (DESIGN §5.3).

RoPE tables (the format every caller uses): ``rope = (cos, sin, interleaved)`` with
``cos, sin`` float32 ``(T, hd // 2)`` — the angle of rotation pair ``i`` for each token — and
``interleaved`` bool ``(T,)``: True pairs dims ``(2i, 2i+1)`` (Wan's complex 3-axis video RoPE),
False pairs dims ``(i, i + hd/2)`` (1-D rotate-half text RoPE). Each pair ``(a, b)`` becomes
``(a cos - b sin, a sin + b cos)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

Rope = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def apply_rope_reference(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate ``x (T, H, hd)`` by per-token RoPE tables; computed in fp32, returned in x.dtype."""
    cos, sin, interleaved = rope
    T, H, hd = x.shape
    xf = x.float()
    # interleaved pairs (2i, 2i+1)
    a_il, b_il = xf[..., 0::2], xf[..., 1::2]
    # rotate-half pairs (i, i + hd/2)
    a_rh, b_rh = xf[..., : hd // 2], xf[..., hd // 2:]
    il = interleaved.view(T, 1, 1)
    a = torch.where(il, a_il, a_rh)
    b = torch.where(il, b_il, b_rh)
    c, s = cos.float().unsqueeze(1), sin.float().unsqueeze(1)
    ra, rb = a * c - b * s, a * s + b * c
    out_il = torch.stack((ra, rb), dim=-1).flatten(-2)
    out_rh = torch.cat((ra, rb), dim=-1)
    return torch.where(il, out_il, out_rh).to(x.dtype)


def joint_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    softmax_scale: float | None = None,
    rope_q: Rope | None = None,
    rope_k: Rope | None = None,
) -> torch.Tensor:
    """Per-sample SDPA (non-causal) over packed ``q (Tq, H, hd)``, ``k, v (Tk, H, hd)``.

    Computes in the input dtype (pass fp32 tensors for an fp32 reference). Returns ``(Tq, H, hd)``.
    """
    if rope_q is not None:
        q = apply_rope_reference(q, rope_q)
    if rope_k is not None:
        k = apply_rope_reference(k, rope_k)
    out = torch.empty_like(q)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(cq) - 1):
        qs, qe, ks, ke = cq[i], cq[i + 1], ck[i], ck[i + 1]
        if qe == qs:
            continue
        if ke == ks:  # nothing to attend to: defined as zeros (flash-attn convention)
            out[qs:qe] = 0
            continue
        o = F.scaled_dot_product_attention(
            q[qs:qe].transpose(0, 1), k[ks:ke].transpose(0, 1), v[ks:ke].transpose(0, 1), scale=softmax_scale
        )
        out[qs:qe] = o.transpose(0, 1)
    return out
