"""The compute steps of a Uni-ViGU block, as a swappable set of functions.

Every field has exactly the signature of the kernel entry point in ``univigu_fast.kernels``.
``REFERENCE_OPS`` are the pure-PyTorch specs (naive routing, per-sample SDPA, eager glue);
``FAST_OPS`` the kernel entry points (each falls back to its reference where Triton or a GPU is
missing). The reference and the fast model are the same modules with different ops.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .kernels import gated_residual as _gr
from .kernels import joint_attention as _ja
from .kernels import linear_argmax as _la
from .kernels import modality_ffn as _mf
from .kernels import modulated_layer_norm as _mln
from .kernels import rms_norm as _rn


@dataclass(frozen=True)
class Ops:
    name: str
    modulated_layer_norm: Callable  # (x, seg_offsets, shift, scale, eps)
    gated_residual: Callable  # (h, y, seg_offsets, gate)
    rms_norm: Callable  # (x, weight, eps)
    attention: Callable  # (q, k, v, cu_q, cu_k, max_q, max_k, *, softmax_scale, rope_q, rope_k)
    modality_ffn: Callable  # (x, seg_offsets, seg_expert, experts, *, residual, gate)
    linear_argmax: Callable  # (x, weight, bias=None, *, gumbel_seed=None, temperature=1.0)


REFERENCE_OPS = Ops(
    name="reference",
    modulated_layer_norm=_mln.modulated_layer_norm_reference,
    gated_residual=_gr.gated_residual_reference,
    rms_norm=_rn.rms_norm_reference,
    attention=_ja.joint_attention_reference,
    modality_ffn=_mf.modality_ffn_reference,
    linear_argmax=_la.linear_argmax_reference,
)


def _fast_modality_ffn(*args, **kwargs):
    # Resolved at call time: the grouped-GEMM entry point lands in kernels/modality_ffn.py.
    fn = getattr(_mf, "modality_ffn", None) or _mf.modality_ffn_reference
    return fn(*args, **kwargs)


FAST_OPS = Ops(
    name="triton",
    modulated_layer_norm=_mln.modulated_layer_norm,
    gated_residual=_gr.gated_residual,
    rms_norm=_rn.rms_norm,
    attention=_ja.joint_attention,
    modality_ffn=_fast_modality_ffn,
    linear_argmax=_la.linear_argmax,
)
