"""The compute steps of a Uni-ViGU block, as a swappable set of functions.

Every field has exactly the signature of the kernel entry point in ``univigu_fast.kernels``.
``REFERENCE_OPS`` are the pure-PyTorch specs (naive routing, per-sample SDPA, eager glue);
``FAST_OPS`` the kernel entry points (each falls back to its reference where Triton or a GPU is
missing). The reference and the fast model are the same modules with different ops.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

from .kernels import gated_residual as _gr
from .kernels import joint_attention as _ja
from .kernels import linear_argmax as _la
from .kernels import linear_cross_entropy as _lce
from .kernels import modality_ffn as _mf
from .kernels import modulated_layer_norm as _mln
from .kernels import rms_norm as _rn
from .kernels._utils import log_once as _log_once


@dataclass(frozen=True)
class Ops:
    name: str
    modulated_layer_norm: Callable  # (x, seg_offsets, shift, scale, eps)
    gated_residual: Callable  # (h, y, seg_offsets, gate)
    rms_norm: Callable  # (x, weight, eps)
    attention: Callable  # (q, k, v, cu_q, cu_k, max_q, max_k, *, softmax_scale, rope_q, rope_k)
    modality_ffn: Callable  # (x, seg_offsets, seg_expert, experts, *, residual, gate)
    linear_argmax: Callable  # (x, weight, bias=None, *, gumbel_seed=None, temperature=1.0)
    linear_cross_entropy: Callable  # (x, weight, target, bias=None, *, ignore_index=-100, reduction="mean")


REFERENCE_OPS = Ops(
    name="reference",
    modulated_layer_norm=_mln.modulated_layer_norm_reference,
    gated_residual=_gr.gated_residual_reference,
    rms_norm=_rn.rms_norm_reference,
    attention=_ja.joint_attention_reference,
    modality_ffn=_mf.modality_ffn_reference,
    linear_argmax=_la.linear_argmax_reference,
    linear_cross_entropy=_lce.linear_cross_entropy_reference,
)


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype ``F.linear`` on ``x`` computes in under ``torch.autocast`` (which recasts float16 /
    bfloat16 / float32 only), None where autocast leaves it alone: the operands fused ops must be given."""
    if torch.is_autocast_enabled(x.device.type) and x.dtype in (torch.float16, torch.bfloat16, torch.float32):
        return torch.get_autocast_dtype(x.device.type)
    return None


def _fast_modality_ffn(x, seg_offsets, seg_expert, experts, *, residual=None, gate=None):
    """The grouped-GEMM FFN; under ``torch.autocast`` its GEMMs run in the autocast dtype (as ``F.linear``
    would in the reference), the gated residual stays in the residual stream's dtype."""
    dt = autocast_dtype(x)
    if dt is not None:
        x = x.to(dt)
        experts = [tuple(t.to(dt) for t in e) for e in experts]
    return _mf.modality_ffn(x, seg_offsets, seg_expert, experts, residual=residual, gate=gate)


@torch.compiler.disable
def _attention_eager(*args, **kwargs):
    return _ja.joint_attention(*args, **kwargs)


def _fast_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, softmax_scale=None,
                    rope_q=None, rope_k=None):
    """``joint_attention``, backend ``auto`` (on CUDA half precision: Triton RoPE + PyTorch's flash/cuDNN
    SDPA per sample, measured fastest). Under ``torch.compile`` that per-sample loop runs eagerly at a
    graph break, so compiled models keep the fastest attention."""
    if q.shape[-1] not in _ja.SUPPORTED_HEAD_DIMS:  # e.g. the synthetic demo's 24: the kernels' tiles need 2^k
        _log_once(f"joint_attention: head_dim {q.shape[-1]} has no Triton kernel (supported: "
                  f"{_ja.SUPPORTED_HEAD_DIMS}); the model uses the per-sample SDPA reference")
        _ja.check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=softmax_scale,
                         rope_q=rope_q, rope_k=rope_k, any_float=True)
        fn = _ja.joint_attention_reference
    else:
        fn = _attention_eager if torch.compiler.is_compiling() else _ja.joint_attention
    return fn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=softmax_scale,
              rope_q=rope_q, rope_k=rope_k)


@torch.compiler.disable
def _linear_cross_entropy_eager(*args, **kwargs):
    """The fused cross-entropy (an autograd.Function whose launcher chunks on the host, not a custom op)
    runs eagerly at a graph break under ``torch.compile``; autograd goes through it as in eager mode."""
    return _lce.linear_cross_entropy(*args, **kwargs)


_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _kernel_dtypes_only(name: str, fast: Callable, reference: Callable, check: Callable) -> Callable:
    """``fast``, or ``reference`` when the first argument's dtype has no kernel (e.g. a model in float64):
    the kernels refuse such inputs; the model should still run. ``check`` (the kernel entry point's
    argument checks, for any float dtype) runs first: the references check nothing."""
    def op(x, *args, **kwargs):
        if isinstance(x, torch.Tensor) and x.dtype not in _KERNEL_DTYPES:
            check(x, *args, **kwargs)
            _log_once(f"{name}: the kernels take float16 / bfloat16 / float32, got {x.dtype}; "
                      "the model uses the reference op")
            return reference(x, *args, **kwargs)
        return fast(x, *args, **kwargs)
    op.__name__ = op.__qualname__ = name
    op.__doc__ = fast.__doc__
    return op


FAST_OPS = Ops(
    name="triton",
    modulated_layer_norm=_kernel_dtypes_only("modulated_layer_norm", _mln.modulated_layer_norm,
                                             _mln.modulated_layer_norm_reference, _mln.check_inputs),
    gated_residual=_kernel_dtypes_only("gated_residual", _gr.gated_residual, _gr.gated_residual_reference,
                                       _gr.check_inputs),
    rms_norm=_kernel_dtypes_only("rms_norm", _rn.rms_norm, _rn.rms_norm_reference, _rn.check_inputs),
    attention=_kernel_dtypes_only("joint_attention", _fast_attention, _ja.joint_attention_reference,
                                  functools.partial(_ja.check_inputs, any_float=True)),
    modality_ffn=_kernel_dtypes_only("modality_ffn", _fast_modality_ffn, _mf.modality_ffn_reference,
                                     functools.partial(_mf.check_inputs, any_float=True)),
    linear_argmax=_kernel_dtypes_only("linear_argmax", _la.linear_argmax, _la.linear_argmax_reference,
                                      functools.partial(_la.check_inputs, any_float=True)),
    linear_cross_entropy=_kernel_dtypes_only("linear_cross_entropy", _linear_cross_entropy_eager,
                                             _lce.linear_cross_entropy_reference,
                                             functools.partial(_lce.check_inputs, any_float=True)),
)
