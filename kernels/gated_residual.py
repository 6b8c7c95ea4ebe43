"""Gated residual with a per-segment gate (DESIGN §5.4): ``h + gate[s] * y``, fp32 math as Wan."""
from __future__ import annotations

import torch

from ._utils import expand_segments


def gated_residual_reference(h: torch.Tensor, y: torch.Tensor, seg_offsets: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """h, y (T, dim); seg_offsets int32 (S+1,); gate (S, dim) -> (T, dim) in h.dtype."""
    return (h.float() + y.float() * expand_segments(gate.float(), seg_offsets)).to(h.dtype)
