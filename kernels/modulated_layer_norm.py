"""LayerNorm (no affine) + per-segment modulation, the adaLN of every Wan block (DESIGN §5.4).

``out = LN(x) * (1 + scale[s]) + shift[s]`` for the rows of segment ``s``; computed in fp32 and
returned in ``x.dtype``, exactly as Wan (``norm1(x.float()) * (1 + scale) + shift``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._utils import expand_segments


def modulated_layer_norm_reference(
    x: torch.Tensor, seg_offsets: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """x (T, dim); seg_offsets int32 (S+1,); shift, scale (S, dim) -> (T, dim) in x.dtype."""
    normed = F.layer_norm(x.float(), (x.shape[-1],), eps=eps)
    out = normed * (1 + expand_segments(scale.float(), seg_offsets)) + expand_segments(shift.float(), seg_offsets)
    return out.to(x.dtype)
