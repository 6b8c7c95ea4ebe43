"""Packing a batch into one ``[video_0; text_0; video_1; text_1; ...]`` token sequence (DESIGN §2).

``PackedBatch`` holds everything the blocks need: joint ``cu_seqlens``, the segment table
(``[v_0, t_0, v_1, t_1, ...]``, empty text segments kept, expert 0 = ``ffn``, 1 = ``ffn_t``), the
per-token RoPE tables in the format of ``kernels/joint_attention.py`` and the prompts' ``cu_seqlens``.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from .kernels._utils import host_list, remember_host_values, table_cache


def padded_lengths(lengths, batch: int, max_len: int, name: str = "text_lens") -> list[int]:
    """Per-sample lengths ``(B,)`` of a right-padded ``(B, N, ...)`` tensor -> Python ints in ``[0, N]``;
    errors name ``name``, its dtype / shape and what was expected."""
    try:
        t = torch.as_tensor(lengths)
    except (TypeError, RuntimeError, ValueError) as e:
        raise TypeError(f"{name} must hold integer lengths, got {lengths!r} ({e})") from None
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise TypeError(f"{name} must hold integer lengths, got dtype {t.dtype}")
    if t.shape != (batch,):
        raise ValueError(f"{name} must be ({batch},), got shape {tuple(t.shape)}")
    lens = t.tolist()
    if any(n < 0 or n > max_len for n in lens):
        raise ValueError(f"{name} {lens} must lie in [0, N={max_len}]")
    return lens


def _cu(lengths, device) -> torch.Tensor:
    values = [0, *itertools.accumulate(lengths)]
    # the kernels' launchers read these back every layer: keep the host copy (no device sync)
    return remember_host_values(torch.tensor(values, dtype=torch.int32, device=device), values)


def _video_pairs(head_dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Wan's 3-axis RoPE per rotation pair: frequency (float64) and axis (0 = t, 1 = h, 2 = w), each
    ``(head_dim/2,)``; pairs split as diffusers' WanRotaryPosEmbed (h = w = 2 * (head_dim // 6) dims,
    t the rest), in (t, h, w) order."""
    d_hw = 2 * (head_dim // 6)
    dims = (head_dim - 2 * d_hw, d_hw, d_hw)
    freq = torch.cat([1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d) for d in dims])
    return freq, torch.cat([torch.full((d // 2,), axis) for axis, d in enumerate(dims)])


def _video_positions(grid: tuple[int, int, int]) -> torch.Tensor:
    """int64 ``(f*h*w, 3)`` (f, h, w) position of every video token, in (f, h, w) order."""
    axes = torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij")
    return torch.stack(axes, -1).reshape(-1, 3)


def _video_angles(grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Wan's 3-axis RoPE angles ``(f*h*w, head_dim/2)``: each pair's axis position times its
    frequency (:func:`_video_pairs`), float64."""
    freq, axis = _video_pairs(head_dim, theta)
    return _video_positions(grid)[:, axis].double() * freq


def rope_positions(video_grids, text_lens, head_dim: int, text_inv_freq: torch.Tensor, device):
    """The position-id form of the packed batch's RoPE (``kernels.joint_attention.apply_rope_positions``):
    ``pos`` int32 (T, 3) — (f, h, w) for video rows, (p, 0, 0) for text rows —, ``freq`` fp32 and
    ``axis`` int32 (2, head_dim/2) — row 0 the video pairs' frequency and axis, row 1 the text's —,
    and ``interleaved`` bool (T,), in the token order of :meth:`PackedBatch.build`."""
    pos, il = [], []
    for grid, lt in zip(video_grids, text_lens):
        text = torch.zeros(lt, 3, dtype=torch.long)
        text[:, 0] = torch.arange(lt)
        pos += [_video_positions(grid), text]
        il += [torch.ones(math.prod(grid), dtype=torch.bool), torch.zeros(lt, dtype=torch.bool)]
    video_freq, video_axis = _video_pairs(head_dim)
    freq = torch.stack([video_freq.float(), text_inv_freq.detach().float().cpu()])
    axis = torch.stack([video_axis, torch.zeros_like(video_axis)])
    return (torch.cat(pos).to(device, torch.int32), freq.to(device), axis.to(device, torch.int32),
            torch.cat(il).to(device))


@table_cache(maxsize=8)
def _video_rope(grid: tuple[int, int, int], head_dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``cos, sin`` of :func:`_video_angles` on ``device``, computed once per (grid, head dim,
    device): a forward at wan1.3b-480p would otherwise spend ~20 ms of host time (float64 cos / sin
    of 2M angles) and a 17 MB copy on it while the GPU waits. Read-only: never modified in place."""
    ang = _video_angles(grid, head_dim)
    return ang.cos().float().to(device), ang.sin().float().to(device)


def _text_rope(length: int, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``cos, sin`` ``(length, head_dim/2)`` of the 1-D text RoPE, positions 0..length-1: fp32
    angles like the public Rotary, cos / sin in float64, on ``inv_freq``'s device (no host sync)."""
    ang = (torch.arange(length, device=inv_freq.device, dtype=torch.float32)[:, None] * inv_freq[None, :]).double()
    return ang.cos().float(), ang.sin().float()


@dataclass
class PackedBatch:
    video_grids: list[tuple[int, int, int]]  # post-patch (f, h, w) per sample
    video_lens: list[int]
    text_lens: list[int]
    prompt_lens: list[int]
    cu_seqlens: torch.Tensor  # int32 (B+1,) joint sequences
    max_seqlen: int
    seg_offsets: torch.Tensor  # int32 (2B+1,)
    seg_expert: torch.Tensor  # int32 (2B,)
    rope: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # cos, sin (T, hd/2) fp32; interleaved (T,) bool
    cu_seqlens_prompt: torch.Tensor  # int32 (B+1,)
    max_prompt_len: int

    @property
    def batch(self) -> int:
        return len(self.video_lens)

    @property
    def total(self) -> int:
        return sum(self.video_lens) + sum(self.text_lens)

    @property
    def seg_lens(self) -> list[int]:
        return [n for pair in zip(self.video_lens, self.text_lens) for n in pair]

    @classmethod
    def build(cls, video_grids, text_lens, prompt_lens, head_dim: int, text_inv_freq: torch.Tensor, device):
        video_lens = [f * h * w for f, h, w in video_grids]
        seq = [v + t for v, t in zip(video_lens, text_lens)]
        seg_lens = [n for pair in zip(video_lens, text_lens) for n in pair]
        B = len(video_lens)
        device = torch.device(device)
        inv = text_inv_freq.detach().to(device=device, dtype=torch.float32)
        cos, sin, interleaved = [], [], []
        for grid, lt in zip(video_grids, text_lens):
            n_video = grid[0] * grid[1] * grid[2]
            for c, s in (_video_rope(tuple(grid), head_dim, device), _text_rope(lt, inv)):
                cos.append(c)
                sin.append(s)
            interleaved += [torch.ones(n_video, dtype=torch.bool, device=device),
                            torch.zeros(lt, dtype=torch.bool, device=device)]
        if cos:
            rope = (torch.cat(cos), torch.cat(sin), torch.cat(interleaved))
        else:
            empty = torch.zeros(0, head_dim // 2, device=device)
            rope = (empty, empty.clone(), torch.zeros(0, dtype=torch.bool, device=device))
        return cls(
            video_grids=[tuple(g) for g in video_grids], video_lens=video_lens, text_lens=list(text_lens),
            prompt_lens=list(prompt_lens), cu_seqlens=_cu(seq, device), max_seqlen=max(seq, default=0),
            seg_offsets=_cu(seg_lens, device),
            seg_expert=remember_host_values(torch.tensor([0, 1] * B, dtype=torch.int32, device=device), [0, 1] * B),
            rope=rope,
            cu_seqlens_prompt=_cu(prompt_lens, device), max_prompt_len=max(prompt_lens, default=0),
        )

    def pack(self, video_tokens: list[torch.Tensor], text_tokens: list[torch.Tensor]) -> torch.Tensor:
        """Per-sample ``(Lv_i, dim)`` and ``(Lt_i, dim)`` -> packed ``(T, dim)``."""
        return torch.cat([t for pair in zip(video_tokens, text_tokens) for t in pair], 0)

    def unpack(self, packed: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Packed ``(T, ...)`` -> per-sample video rows and text rows."""
        parts = torch.split(packed, self.seg_lens, 0)
        return list(parts[0::2]), list(parts[1::2])

    def index(self, modality: str) -> torch.Tensor:
        """int64 rows of all video (or text) tokens in the packed sequence, in sample order."""
        offs = host_list(self.seg_offsets)
        first = 0 if modality == "video" else 1
        rows = [torch.arange(offs[i], offs[i + 1]) for i in range(first, len(offs) - 1, 2)]
        return torch.cat(rows).to(self.seg_offsets.device) if rows else torch.zeros(0, dtype=torch.long, device=self.seg_offsets.device)
