"""RMSNorm over the last dim with a weight: Wan's q/k norm across heads (``dim = H * hd``) (DESIGN §5.4)."""
from __future__ import annotations

import torch


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x (T, dim), weight (dim,) -> (T, dim) in x.dtype; statistics in fp32 (as torch.nn.RMSNorm in diffusers' Wan)."""
    xf = x.float()
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (out * weight.float()).to(x.dtype)
