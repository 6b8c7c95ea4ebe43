"""The modules of Uni-ViGU under the public implementation's parameter names (DESIGN §3).

They hold parameters only; every compute step that has a kernel goes through an ``Ops`` object
(``univigu_fast/ops.py``), so the reference and the fast model share these classes.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .kernels.modality_ffn import FeedForward
from .ops import Ops
from .packing import PackedBatch


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``(B, dim)`` of Wan timesteps (diffusers ``Timesteps(flip_sin_to_cos=True,
    downscale_freq_shift=0)``): ``[cos(t w_i), sin(t w_i)]`` with ``w_i = max_period^(-i / (dim/2))``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class TimestepEmbedder(nn.Module):
    """``linear_1 -> SiLU -> linear_2`` (diffusers ``TimestepEmbedding``)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class TimeEmbedding(nn.Module):
    """Wan's time path: ``t -> (temb (B, dim), timestep_proj (B, 6, dim))``."""

    def __init__(self, freq_dim: int, dim: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.time_embedder = TimestepEmbedder(freq_dim, dim)
        self.time_proj = nn.Linear(dim, 6 * dim)

    def forward(self, t: torch.Tensor):
        dtype = self.time_embedder.linear_1.weight.dtype
        temb = self.time_embedder(timestep_embedding(t, self.freq_dim).to(dtype))
        return temb, self.time_proj(F.silu(temb)).unflatten(1, (6, -1))


class TextProjection(nn.Module):
    """The prompt projection ``linear_1 -> GELU(tanh) -> linear_2`` (Wan's ``condition_embedder.text_embedder``)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.gelu(self.linear_1(x), approximate="tanh"))


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the parameter dtype (diffusers' ``FP32LayerNorm``)."""

    def forward(self, x):
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class RMSNormWeight(nn.Module):
    """Holds ``weight (dim,)`` of an RMSNorm; the normalisation itself is ``ops.rms_norm``."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


class Attention(nn.Module):
    """Wan's attention projections: ``to_q/k/v``, ``to_out.0``, RMSNorm across heads on q and k.

    No ``forward``: a block calls :meth:`qkv` (or :meth:`query` / :meth:`keys_values`) and :meth:`attend`
    separately, so the video-stream cache can swap in cached keys / values between the two."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])
        self.norm_q = RMSNormWeight(dim)
        self.norm_k = RMSNormWeight(dim)

    def qkv(self, ops: Ops, x, context, eps):
        """Queries from x (Tq, dim), keys/values from context (Tk, dim): (T, H, hd) each, q/k RMS-normed
        across heads, not yet rotated."""
        return (self.query(ops, x, eps), *self.keys_values(ops, context, eps))

    def query(self, ops: Ops, x, eps):
        return ops.rms_norm(self.to_q(x), self.norm_q.weight, eps).unflatten(-1, (self.heads, -1))

    def keys_values(self, ops: Ops, context, eps):
        k = ops.rms_norm(self.to_k(context), self.norm_k.weight, eps).unflatten(-1, (self.heads, -1))
        return k, self.to_v(context).unflatten(-1, (self.heads, -1))

    def attend(self, ops: Ops, q, k, v, cu_q, cu_k, max_q, max_k, rope_q=None, rope_k=None):
        out = ops.attention(q, k, v, cu_q, cu_k, max_q, max_k, rope_q=rope_q, rope_k=rope_k)
        return self.to_out[0](out.flatten(1))


class UniViGUBlock(nn.Module):
    """One block (paper Eq. 14-15): per-segment adaLN, shared self-attention over ``[video; text]``,
    shared cross-attention to the prompt, modality-routed FFN (``ffn`` video, ``ffn_t`` text)."""

    def __init__(self, dim: int, ffn_dim: int, heads: int, eps: float, cross_attn_norm: bool):
        super().__init__()
        self.eps = eps
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)
        self.attn1 = Attention(dim, heads)
        self.attn2 = Attention(dim, heads)
        self.norm2 = FP32LayerNorm(dim, eps=eps, elementwise_affine=True) if cross_attn_norm else nn.Identity()
        self.ffn = FeedForward(dim, ffn_dim)
        self.ffn_t = FeedForward(dim, ffn_dim)

    def forward(self, ops: Ops, x: torch.Tensor, context: torch.Tensor, seg_temb: torch.Tensor, packed: PackedBatch,
                kv=None):
        """x (T, dim) packed; context (T_prompt, dim); seg_temb (S, 6, dim) fp32: per segment the
        ``timestep_proj`` of its modality (video: from tau_video, text: from tau_text).

        ``kv``: an optional per-layer video-stream cache (``univigu_fast.video_cache.LayerKV``): it
        records this layer's self-attention keys/values and the prompt's cross-attention keys/values
        (full step), or supplies the cached video keys/values when ``x`` holds only the text rows
        and the prompt's (text-only step)."""
        seg = packed.seg_offsets
        # 1. modulation per modality segment from the SHARED table (DESIGN §3.1)
        shift, scale, gate, c_shift, c_scale, c_gate = (self.scale_shift_table.float() + seg_temb).unbind(1)
        # 2. shared self-attention: Wan 3-axis RoPE on video rows, 1-D RoPE on text rows
        h = ops.modulated_layer_norm(x, seg, shift, scale, self.eps)
        q, k, v = self.attn1.qkv(ops, h, h, self.eps)
        cu_k, max_k, rope_k = packed.cu_seqlens, packed.max_seqlen, packed.rope
        if kv is not None:
            k, v, cu_k, max_k, rope_k = kv.keys_values(k, v)
        y = self.attn1.attend(ops, q, k, v, packed.cu_seqlens, cu_k, packed.max_seqlen, max_k,
                              rope_q=packed.rope, rope_k=rope_k)
        x = ops.gated_residual(x, y, seg, gate)
        # 3. shared cross-attention to the prompt, ungated
        h = self.norm2(x)  # LayerNorm in fp32, result in x.dtype (FP32LayerNorm), as Wan
        if kv is None:
            k, v = self.attn2.keys_values(ops, context, self.eps)
        else:  # the same every step (prompt and weights only): kept by the cache
            k, v = kv.prompt_keys_values(lambda: self.attn2.keys_values(ops, context, self.eps))
        y = self.attn2.attend(ops, self.attn2.query(ops, h, self.eps), k, v, packed.cu_seqlens,
                              packed.cu_seqlens_prompt, packed.max_seqlen, packed.max_prompt_len)
        x = x + y
        # 4. modality-routed FFN with the gated residual fused
        h = ops.modulated_layer_norm(x, seg, c_shift, c_scale, self.eps)
        return ops.modality_ffn(h, seg, packed.seg_expert, (self.ffn.expert(), self.ffn_t.expert()),
                                residual=x, gate=c_gate)


class VideoHead(nn.Module):
    """``video_head.proj_out`` (Wan's ``proj_out``; ``norm_out`` has no parameters)."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.proj_out = nn.Linear(dim, out_dim)


class TextNorm(nn.Module):
    """``text_head.norm_final``: LayerNorm in fp32 without bias, scaled by ``weight``."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


class TextHead(nn.Module):
    """``text_head.norm_final.weight`` and ``text_head.linear`` (dim -> V(+1) logits, or dim -> dim velocity).

    ``linear`` starts at zero, as in the public implementation."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm_final = TextNorm(dim)
        self.linear = nn.Linear(dim, out_dim)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def features(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The modulated, normalised rows that ``linear`` maps to the output: x (N, dim), shift/scale (N, dim)."""
        normed = F.layer_norm(x.float(), (x.shape[-1],)) * self.norm_final.weight.float()
        return (normed * (1 + scale.float()) + shift.float()).to(x.dtype)
