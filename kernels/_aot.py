"""Offline (ahead-of-time) compilation of every Triton kernel for NVIDIA targets, without a GPU.

Used by ``tests/test_compile_targets.py`` (one representative config per kernel launch, sm_90 and
sm_80) and ``bench/compile_audit.py`` (every autotune config, sm_90). Triton's NVIDIA backend
(bundled ``ptxas``) compiles for a ``GPUTarget`` on a CPU-only machine, so a kernel that would
not compile, overflows shared memory or loses its tensor-core lowering is caught before a GPU run.

Cases are built at a DESIGN §6 shape (``wan1.3b-480p``; the text head at ``n256-d1536``) with the
compile-time arguments the launchers pass there: block sizes and configs are read from the kernel
modules (``_gemm_configs``, ``_FWD_BLOCK_M``, ``geometry``, ...), not copied. The integer
arguments carry their values at that shape, specialised as Triton's JIT does (divisible by 16 ->
``tt.divisibility`` hint, unless in ``do_not_specialize``; ``1`` -> a constant), so the compiled
code is the one a launch at that shape would produce.

Triton decides interpreter vs compiler mode when ``@triton.jit`` runs, so compile in a process
started without ``TRITON_INTERPRET=1`` (``python -m univigu_fast.kernels._aot --serve`` reads
JSON requests line by line, which is how the test does it under the interpreter's conftest).
"""
from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import textwrap

#: Maximum dynamic shared memory per block (opt-in), bytes: cudaDevAttrMaxSharedMemoryPerBlockOptin.
SHARED_LIMIT = {90: 232448, 80: 166912}
#: Kernels whose main loop is a matrix product: their PTX must use tensor cores.
GEMM_KERNELS = (
    "modality_ffn._grouped_gemm_kernel",
    "joint_attention._attn_fwd_kernel",
    "joint_attention._attn_bwd_dkdv_kernel",
    "joint_attention._attn_bwd_dq_kernel",
    "linear_argmax._linear_argmax_partial_kernel",
)
DTYPES = ("bf16", "fp16")
_TORCH_TO_TRITON = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


# ----------------------------------------------------------------------------------------------
# Discovery
# ----------------------------------------------------------------------------------------------
def kernel_modules() -> list[str]:
    """Every op module of the kernels package (``kernels/<op>.py``; private helpers excluded)."""
    pkg = importlib.import_module("univigu_fast.kernels")
    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))


def _returns_value(src: str) -> bool:
    tree = ast.parse(textwrap.dedent(src))
    return any(isinstance(n, ast.Return) and n.value is not None for n in ast.walk(tree))


def discover_kernels() -> dict[str, object]:
    """``"<module>.<name>"`` -> jit function for every launchable ``@triton.jit`` kernel defined in
    the kernels package: jit functions that return nothing (device helpers such as ``_tanh`` return
    values and are compiled as part of the kernels that call them). Works in both modes."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    found = {}
    for mod_name in kernel_modules():
        mod = importlib.import_module(f"univigu_fast.kernels.{mod_name}")
        for name, obj in vars(mod).items():
            if not isinstance(obj, (JITFunction, InterpretedFunction)):
                continue
            fn = obj.fn
            if fn.__module__ != mod.__name__:  # re-exported from another module
                continue
            if not _returns_value(inspect.getsource(fn)):
                found[f"{mod_name}.{name}"] = obj
    return found


def discover_autotuners() -> dict[str, object]:
    """``"<module>.<kernel>"`` -> the ``triton.autotune`` wrapper of that kernel (where there is one)."""
    from triton.runtime.autotuner import Autotuner

    out = {}
    for mod_name in kernel_modules():
        mod = importlib.import_module(f"univigu_fast.kernels.{mod_name}")
        for obj in vars(mod).values():
            if isinstance(obj, Autotuner):
                out[f"{mod_name}.{obj.fn.__name__}"] = obj
    return out


# ----------------------------------------------------------------------------------------------
# Cases: one kernel launch as the launcher makes it at a DESIGN §6 shape
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DescArg:
    """A host-side TMA descriptor argument: ``dtype`` of its tensor and the constexpr names of its box
    (``("BLOCK_N", "BLOCK_D")``), or None where the launch passes no descriptor (``present`` False)."""

    dtype: str
    box: tuple
    present: bool = True


@dataclasses.dataclass
class Case:
    """``args``: name -> pointer type (``"*bf16"``), int value or float value at the shape;
    ``variant``: the launch-time constexprs that are not autotuned; ``configs``: the candidate
    (constexprs, num_warps, num_stages) triples (the autotune list, or the one fixed launch)."""

    kernel: str
    variant_name: str
    dtype: str
    args: dict
    variant: dict
    configs: list  # [(dict, num_warps, num_stages, maxnreg or None)]
    kept: list  # indices of configs the autotuner's early prune keeps for this variant
    #: tensor-core instruction expected on sm_90 for GEMM kernels ("wgmma"; "mma.sync" where a tile
    #: has fewer than 64 rows per warpgroup, which wgmma cannot take; None for the IEEE-fp32 launches,
    #: whose exact fp32 products run on FMA units by design)
    sm90_mma: str | None = "wgmma"
    #: compiled by tests/test_compile_targets.py too (False: audit only, where a compiled launch
    #: of the same kernel differs only by a lighter epilogue)
    in_test: bool = True

    @property
    def id(self) -> str:
        return f"{self.kernel}[{self.variant_name}-{self.dtype}]"


def _configs_of(tuner, variant: dict, named_args: dict):
    cfgs = [(dict(c.kwargs), c.num_warps, c.num_stages, c.maxnreg) for c in tuner.configs]
    prune = (tuner.early_config_prune if hasattr(tuner, "early_config_prune") else None)
    kept = list(range(len(cfgs)))
    if prune is not None:
        survivors = prune(tuner.configs, {**named_args, **variant}, **variant)
        kept = [i for i, c in enumerate(tuner.configs) if any(c is s for s in survivors)]
    return cfgs, kept


def _fixed(constexprs: dict, num_warps: int = 4, num_stages: int = 3):
    return [(dict(constexprs), num_warps, num_stages, None)], [0]


def build_cases(dtypes=DTYPES) -> list[Case]:
    """Every kernel launch variant of the launchers at ``wan1.3b-480p`` (and ``n256-d1536`` with
    V = 256,384 for the text head; ``n8`` for one-token-per-sample decoding), for each dtype
    (``"fp32"`` gives the launchers' IEEE-fp32 launches)."""
    import triton

    from univigu_fast.shapes import SHAPES
    from . import joint_attention as ja
    from . import linear_argmax as la
    from . import modality_ffn as mf
    from .modulated_layer_norm import geometry

    import torch

    sh = SHAPES["wan1.3b-480p"]
    T = sum(sh.seq_lens)
    dim, ffn, H, hd = sh.dim, sh.ffn_dim, sh.num_heads, sh.head_dim
    n_seg = 2 * sh.batch
    cpu = torch.device("cpu")
    tuners = discover_autotuners()
    cases: list[Case] = []

    for dt in dtypes:
        p = "*" + dt
        ieee = dt == "fp32"
        # ---------------- modality_ffn: grouped GEMM, the four launches of fwd + bwd ----------------
        mt = triton.cdiv(T, mf._GPU_BLOCK_M)
        assert T * ffn >= mf._SMALL_PROBLEM, "the §6 shape must take the autotuned path"
        ptrs = dict(A=p, B0=p, B1=p, C=p, BIAS0=p, BIAS1=p, AUX=p, RES=p, GATE="*fp32", H_OUT=p,
                    TILE_SEG="*i32", TILE_ROW="*i32", SEG_OFF="*i32", SEG_EXPERT="*i32")
        ffn_launches = {
            # name: (K_e, N_e, B_TRANS, EPILOGUE, gate/res, WRITE_AUX, WRITE_H, stride_am, stride_cm, stride_auxm)
            "fwd1": (dim, ffn, True, mf.EPI_BIAS_GELU, False, True, False, dim, ffn, ffn),
            "fwd2": (ffn, dim, True, mf.EPI_BIAS_GATED, True, True, False, ffn, dim, dim),
            "fwd1_infer": (dim, ffn, True, mf.EPI_BIAS_GELU, False, False, False, dim, ffn, 0),  # nothing saved
            "fwd2_infer": (ffn, dim, True, mf.EPI_BIAS_GATED, True, False, False, ffn, dim, 0),
            "bwd_dp": (dim, ffn, False, mf.EPI_GELU_GRAD, False, False, True, dim, ffn, ffn),
            "bwd_dx": (ffn, dim, False, mf.EPI_NONE, False, False, False, ffn, dim, 0),
        }
        for name, (K, N, bt, epi, gated, aux, wh, sa, sc, sx) in ffn_launches.items():
            # autotuned 16-bit launches on Hopper get TMA descriptors (kernels._utils.tma_compatible)
            b_box = ("BLOCK_N", "BLOCK_K") if bt else ("BLOCK_K", "BLOCK_N")
            descs = dict(A0_DESC=DescArg(dt, ("BLOCK_M", "BLOCK_K")), A1_DESC=DescArg(dt, ("BLOCK_M", "BLOCK_K")),
                         B0_DESC=DescArg(dt, b_box), B1_DESC=DescArg(dt, b_box))
            args = dict(ptrs, **descs, NUM_M_TILES=mt, K0=K, N0=N, K1=K, N1=N, stride_am=sa, stride_cm=sc,
                        stride_auxm=sx, stride_gate=dim if gated else 0)
            variant = dict(B_TRANS=bt, EPILOGUE=epi, HAS_GATE=gated, HAS_RES=gated, WRITE_AUX=aux, WRITE_H=wh,
                           K_MAX=K, N_MAX=N, ALIGNED=True, IEEE=ieee, BLOCK_M=mf._GPU_BLOCK_M, TMA_OK=not ieee)
            no_tma = dict(args, **{k: dataclasses.replace(v, present=False) for k, v in descs.items()})
            if ieee:  # fp32: the launcher's one fixed config, no tuning, no descriptors
                cfgs, kept = _fixed(mf._SMALL_CONFIG, 4, 3)
                args, variant = no_tma, dict(variant, TMA_OK=False)
            else:
                cfgs, kept = _configs_of(tuners["modality_ffn._grouped_gemm_kernel"], variant, args)
            cases.append(Case("modality_ffn._grouped_gemm_kernel", name, dt, args, variant, cfgs, kept,
                              in_test=not name.endswith("_infer")))
            if name in ("fwd1", "fwd2") and not ieee:
                # a text-only step (T = 256): every GEMM small, fixed config on the small M tiles
                assert 256 * max(ffn, dim) < mf._SMALL_PROBLEM
                cfgs, kept = _fixed(mf._SMALL_CONFIG, 4, 3)
                cases.append(Case("modality_ffn._grouped_gemm_kernel", f"{name}_small", dt,
                                  dict(no_tma, NUM_M_TILES=256 // mf._SMALL_BLOCK_M),
                                  dict(variant, TMA_OK=False, BLOCK_M=mf._SMALL_BLOCK_M), cfgs, kept))

        # ---------------- joint_attention: FlashAttention-2 fwd / bwd and helpers ----------------
        lse_stride = T
        strides = dict(stride_qt=H * hd, stride_qh=hd, stride_kt=H * hd, stride_kh=hd, stride_vt=H * hd,
                       stride_vh=hd)
        tiles = dict(CU_Q="*i32", CU_K="*i32", TILE_SEQ="*i32", TILE_START="*i32")

        def attention_case(kernel: str, name: str, args: dict, variant: dict, fp32_inner: dict) -> None:
            # IEEE fp32: the launcher's fixed inner block and launch; else the autotuner's configs
            kernel = "joint_attention." + kernel
            if ieee:
                cfgs, kept = _fixed(fp32_inner, **ja._FP32_LAUNCH)
            else:
                cfgs, kept = _configs_of(tuners[kernel], variant, args)
            cases.append(Case(kernel, name, dt, args, variant, cfgs, kept))

        for rope in sorted({ja.ROPE_Q_IN_PROLOGUE, True}):
            # unsplit: the partial-output arguments are the launcher's dummies (O and LSE themselves)
            args = dict(Q=p, K=p, V=p, O=p, LSE="*fp32", **tiles,
                        COS="*fp32" if rope else p, SIN="*fp32" if rope else p, IL="*u8" if rope else p,
                        O_PART=p, LSE_PART="*fp32",
                        qk_scale=0.1275, **strides, stride_ot=H * hd, stride_oh=hd, stride_lse_h=lse_stride,
                        stride_rope=hd // 2 if rope else 0, stride_ps=H * hd, stride_lps=lse_stride)
            variant = dict(HEAD_DIM=hd, BLOCK_M=ja._FWD_BLOCK_M, ROPE_Q=rope, IEEE=ieee, SPLIT=False)
            attention_case("_attn_fwd_kernel", "rope_q" if rope else "plain", args, variant,
                           dict(BLOCK_N=ja._FP32_INNER_BLOCK))
        # split-KV: a text-only step's 256 queries over the joint keys (rotated by the cache)
        tq = 256
        args = dict(Q=p, K=p, V=p, O=p, LSE="*fp32", **tiles, COS=p, SIN=p, IL=p, O_PART="*fp32", LSE_PART="*fp32",
                    qk_scale=0.1275, **strides, stride_ot=H * hd, stride_oh=hd, stride_lse_h=tq, stride_rope=0,
                    stride_ps=tq * H * hd, stride_lps=H * tq)
        attention_case("_attn_fwd_kernel", "split_kv", args,
                       dict(HEAD_DIM=hd, BLOCK_M=ja._FWD_BLOCK_M, ROPE_Q=False, IEEE=ieee, SPLIT=True),
                       dict(BLOCK_N=ja._FP32_INNER_BLOCK))
        args = dict(O_PART="*fp32", LSE_PART="*fp32", O=p, LSE="*fp32", T=tq, S=11, stride_ps=tq * H * hd,
                    stride_lps=H * tq, stride_ot=H * hd, stride_oh=hd, stride_lse_h=tq)
        cfgs, kept = _fixed(dict(HEAD_DIM=hd, BLOCK_T=ja._ROPE_BLOCK_T))
        cases.append(Case("joint_attention._attn_split_combine_kernel", "split_kv", dt, args, {}, cfgs, kept))
        bwd = dict(Q=p, K=p, V=p, DO=p, LSE="*fp32", DELTA="*fp32", **strides, stride_dot=H * hd, stride_doh=hd,
                   qk_scale=0.1275, sm_scale=0.0884)
        args = dict(bwd, DK=p, DV=p, **tiles, stride_dkt=H * hd, stride_dkh=hd, stride_dvt=H * hd, stride_dvh=hd,
                    stride_lse_h=lse_stride)
        attention_case("_attn_bwd_dkdv_kernel", "bwd", args, dict(HEAD_DIM=hd, BLOCK_N=ja._KV_BLOCK_N, IEEE=ieee),
                       dict(BLOCK_M=ja._FP32_INNER_BLOCK // 2))
        args = dict(bwd, DQ=p, **tiles, stride_dqt=H * hd, stride_dqh=hd, stride_lse_h=lse_stride)
        attention_case("_attn_bwd_dq_kernel", "bwd", args, dict(HEAD_DIM=hd, BLOCK_M=ja._FWD_BLOCK_M, IEEE=ieee),
                       dict(BLOCK_N=ja._FP32_INNER_BLOCK // 2))
        args = dict(O=p, DO=p, DELTA="*fp32", T=T, stride_ot=H * hd, stride_oh=hd, stride_dot=H * hd, stride_doh=hd,
                    stride_delta_h=lse_stride)
        cfgs, kept = _fixed(dict(HEAD_DIM=hd, BLOCK_T=ja._ROPE_BLOCK_T))
        cases.append(Case("joint_attention._bwd_delta_kernel", "bwd", dt, args, {}, cfgs, kept))
        for name, inverse, positions in (("forward", False, False), ("inverse", True, False),
                                         ("positions", False, True)):
            # the launcher passes IL as the dummy position tables of the tables form
            tables = (dict(POS="*i32", FREQ="*fp32", AXIS="*i32") if positions
                      else dict(POS="*u8", FREQ="*u8", AXIS="*u8"))
            args = dict(X=p, OUT=p, COS="*fp32", SIN="*fp32", IL="*u8", **tables, T=T, H=H, stride_xt=H * hd,
                        stride_xh=hd, stride_ot=H * hd, stride_oh=hd, stride_rope=hd // 2)
            cfgs, kept = _fixed(dict(HEAD_DIM=hd, BLOCK_T=ja._ROPE_BLOCK_T, INVERSE=inverse, FROM_POSITIONS=positions))
            cases.append(Case("joint_attention._rope_kernel", name, dt, args, {}, cfgs, kept))

        # ---------------- linear_argmax / linear_cross_entropy: the text head ----------------
        n, d, V = 256, dim, 256_384
        num_sms, la.num_sms = la.num_sms, lambda device: 132  # the launcher's split count on an H100
        try:
            splits = la._default_splits(n, V, la._GPU_V_GRANULE, cpu)
        finally:
            la.num_sms = num_sms
        chunk, splits = la._vocab_chunks(V, splits, la._GPU_V_GRANULE)  # as _linear_argmax_launch
        # 16-bit operands on Hopper: the launcher builds TMA descriptors (kernels._utils.tma_compatible)
        tma_ok = not ieee
        base = dict(x_ptr=p, w_ptr=p, b_ptr=p, tgt_ptr="*i32", best_ptr="*fp32", id_ptr="*i32", sel_ptr="*fp32",
                    x_desc=DescArg(dt, ("BLOCK_N", "BLOCK_D"), tma_ok),
                    w_desc=DescArg(dt, ("BLOCK_V", "BLOCK_D"), tma_ok),
                    max_ptr="*fp32", sumexp_ptr="*fp32", tlogit_ptr="*fp32", zsum_ptr="*fp32",
                    N=n, V=V, D=d, chunk=chunk, S=splits, stride_xn=d, stride_wv=d, seed=0, inv_temp=1.0,
                    n_bucket=la._n_bucket(n))
        for name, (sample, target, sum_z, seed, rows) in {
            "argmax": (False, False, False, 0, n), "sample": (True, False, False, 2**40 + 7, n),
            "ce_stats": (False, True, True, 0, n),
            "argmax_narrow": (False, False, False, 0, 8), "sample_narrow": (True, False, False, 7, 8),
        }.items():
            rows_tma = tma_ok and rows > 16  # no descriptors for the narrow-row launches
            args = dict(base, seed=seed, N=rows, n_bucket=la._n_bucket(rows),
                        x_desc=dataclasses.replace(base["x_desc"], present=rows_tma),
                        w_desc=dataclasses.replace(base["w_desc"], present=rows_tma))
            variant = dict(HAS_BIAS=True, SAMPLE=sample, HAS_TARGET=target, SUM_Z=sum_z, EVEN_D=d % 128 == 0,
                           IEEE_FP32=ieee, N_ROUNDS=la.PHILOX_ROUNDS, GROUP_R=la.GROUP_ROWS, TMA_OK=rows_tma)
            cfgs, kept = _configs_of(tuners["linear_argmax._linear_argmax_partial_kernel"], variant, args)
            # N <= 16 rows (decoding a few tokens): 16-row tiles, below wgmma's 64 rows per warpgroup
            cases.append(Case("linear_argmax._linear_argmax_partial_kernel", name, dt, args, variant, cfgs, kept,
                              sm90_mma="mma.sync" if rows <= 16 else "wgmma"))
        block_r, block_s = la._reduce_blocks(splits)
        args = dict(best_ptr="*fp32", id_ptr="*i32", sel_ptr="*fp32", max_ptr="*fp32", sumexp_ptr="*fp32",
                    tlogit_ptr="*fp32", zsum_ptr="*fp32", ids_out="*i64", sel_out="*fp32", lse_out="*fp32",
                    tlogit_out="*fp32", zsum_out="*fp32", N=n, S=splits)
        cfgs, kept = _fixed(dict(HAS_TARGET=True, SUM_Z=True, BLOCK_N=block_r, BLOCK_S=block_s))
        cases.append(Case("linear_argmax._linear_argmax_reduce_kernel", "ce", dt, args, {}, cfgs, kept))
        args = dict(x_ptr=p, w_ptr=p, b_ptr=p, ids_ptr="*i64", sel_ptr="*fp32", V=V, D=d, stride_xn=d,
                    stride_wv=d, seed=2**40 + 7, inv_temp=1.0)
        cfgs, kept = _fixed(dict(HAS_BIAS=True, N_ROUNDS=la.PHILOX_ROUNDS, GROUP=la.SAMPLE_GROUP,
                                 BLOCK_D=la.SAMPLE_BLOCK_D), num_warps=la.SAMPLE_WARPS)
        cases.append(Case("linear_argmax._sample_in_group_kernel", "sample", dt, args, {}, cfgs, kept))
        vc = 4096  # a backward chunk of columns (multiple of 256)
        args = dict(z_ptr=p, lse_ptr="*fp32", tgt_ptr="*i32", scale_ptr="*fp32", N=n, VC=vc, v0=vc,
                    one_minus_eps=0.9, eps_over_v=0.1 / V)
        cfgs, kept = _fixed(dict(BLOCK_N=32, BLOCK_V=256))
        cases.append(Case("linear_cross_entropy._ce_grad_kernel", "bwd", dt, args, {}, cfgs, kept))
        for zdt in ("fp32", dt):  # logits chunk in fp32 (torch.mm out_dtype) or in the input dtype
            args = dict(z_ptr="*" + zdt, b_ptr=p, m_ptr="*fp32", s_ptr="*fp32", zt_ptr="*fp32", zs_ptr="*fp32",
                        tgt_ptr="*i32", N=n, VC=vc, v0=vc)
            cfgs, kept = _fixed(dict(HAS_BIAS=True, SUM_Z=True, BLOCK_N=16, BLOCK_V=512))
            cases.append(Case("linear_cross_entropy._ce_chunk_stats_kernel", f"z_{zdt}", dt, args, {}, cfgs, kept))

        # ---------------- memory-bound glue (launch geometry from modulated_layer_norm.geometry) -------
        bt, bd, ch, _, nw = geometry(T, dim, cpu)
        rbt, rbd, rch, _, rnw = geometry(T, dim, cpu, reduce=True)
        seg = dict(OFF="*i32", T=T, D=dim, S=n_seg)
        args = dict(X=p, OUT=p, SHIFT="*fp32", SCALE="*fp32", MEAN="*fp32", RSTD="*fp32", **seg, chunk=ch,
                    stride_x=dim, stride_o=dim, stride_shift=dim, stride_scale=dim, eps=1e-6)
        cfgs, kept = _fixed(dict(SAVE_STATS=True, BLOCK_T=bt, BLOCK_D=bd), nw)
        cases.append(Case("modulated_layer_norm._mln_fwd_kernel", "train", dt, args, {}, cfgs, kept))
        args = dict(X=p, DOUT=p, DX=p, SCALE="*fp32", MEAN="*fp32", RSTD="*fp32", DSHIFT="*fp32", DSCALE="*fp32",
                    **seg, chunk=rch, stride_x=dim, stride_do=dim, stride_dx=dim, stride_scale=dim)
        cfgs, kept = _fixed(dict(BLOCK_T=rbt, BLOCK_D=rbd), rnw)
        cases.append(Case("modulated_layer_norm._mln_bwd_kernel", "bwd", dt, args, {}, cfgs, kept))
        args = dict(H=p, Y=p, OUT=p, GATE="*fp32", **seg, chunk=ch, stride_h=dim, stride_y=dim, stride_o=dim,
                    stride_g=dim)
        cfgs, kept = _fixed(dict(BLOCK_T=bt, BLOCK_D=bd), nw)
        cases.append(Case("gated_residual._gated_residual_fwd_kernel", "fwd", dt, args, {}, cfgs, kept))
        args = dict(DOUT=p, Y=p, DY=p, GATE="*fp32", DGATE="*fp32", **seg, chunk=rch, stride_do=dim, stride_y=dim,
                    stride_dy=dim, stride_g=dim)
        cfgs, kept = _fixed(dict(BLOCK_T=rbt, BLOCK_D=rbd), rnw)
        cases.append(Case("gated_residual._gated_residual_bwd_kernel", "bwd", dt, args, {}, cfgs, kept))
        args = dict(X=p, W=p, OUT=p, RSTD="*fp32", T=T, D=dim, chunk=ch, stride_x=dim, stride_o=dim, eps=1e-6)
        cfgs, kept = _fixed(dict(SAVE_STATS=True, BLOCK_T=bt, BLOCK_D=bd), nw)
        cases.append(Case("rms_norm._rms_fwd_kernel", "train", dt, args, {}, cfgs, kept))
        args = dict(X=p, W=p, DOUT=p, DX=p, RSTD="*fp32", DW_PART="*fp32", T=T, D=dim, chunk=rch, stride_x=dim,
                    stride_do=dim, stride_dx=dim)
        cfgs, kept = _fixed(dict(BLOCK_T=rbt, BLOCK_D=rbd), rnw)
        cases.append(Case("rms_norm._rms_bwd_kernel", "bwd", dt, args, {}, cfgs, kept))
    for c in cases:
        if c.dtype == "fp32":
            c.sm90_mma = None
    return cases


# ----------------------------------------------------------------------------------------------
# Compilation
# ----------------------------------------------------------------------------------------------
def _signature(kernel, args: dict, constexprs: dict):
    """Signature, constants and attrs the JIT would derive from a launch with these arguments."""
    names = kernel.arg_names
    missing = [n for n in names if n not in args and n not in constexprs]
    extra = [n for n in list(args) + list(constexprs) if n not in names]
    if missing or extra:
        raise ValueError(f"{kernel.__name__}: case arguments do not match the kernel: missing {missing}, unknown {extra}")
    dns = {names[i] if isinstance(i, int) else i for i in (kernel.do_not_specialize or ())}
    sig, consts, attrs = {}, dict(constexprs), {}
    for i, n in enumerate(names):
        if n in constexprs:
            sig[n] = "constexpr"
            continue
        v = args[n]
        if isinstance(v, DescArg):
            if v.present:
                sig[n] = f"tensordesc<{v.dtype}[{', '.join(str(constexprs[b]) for b in v.box)}]>"
            else:
                sig[n], consts[n] = "constexpr", None
            continue
        if isinstance(v, str):
            sig[n] = v
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        elif isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{kernel.__name__}.{n}: unsupported case value {v!r}")
        elif isinstance(v, float):
            sig[n] = "fp32"
        elif n in dns:
            sig[n] = "i32" if -2**31 <= v < 2**31 else "i64"
        elif v == 1:
            sig[n], consts[n] = "constexpr", 1
        else:
            sig[n] = "i32" if -2**31 <= v < 2**31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


_PTXAS_RE = {
    "regs": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


def ptxas_usage(ptx: str, arch: int) -> dict:
    """Registers and spill bytes of the kernel in ``ptx`` from ``ptxas -v`` (Triton's bundled ptxas)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o",
                            os.path.join(tmp, "k.cubin")], capture_output=True, text=True, check=True)
    out = {}
    for k, rx in _PTXAS_RE.items():
        m = rx.findall(r.stderr)
        out[k] = int(m[-1]) if m else None
    return out


def for_arch(case: Case, arch: int) -> Case:
    """``case`` as launched on ``sm_<arch>``: before Hopper the launchers build no TMA descriptors
    (``TMA_OK`` False: descriptor arguments None, the autotuner's prune drops the ``USE_TMA`` configs)."""
    if arch >= 90 or not case.variant.get("TMA_OK"):
        return case
    args = {k: dataclasses.replace(v, present=False) if isinstance(v, DescArg) else v for k, v in case.args.items()}
    kept = [i for i in case.kept if not case.configs[i][0].get("USE_TMA")]
    return dataclasses.replace(case, args=args, variant=dict(case.variant, TMA_OK=False), kept=kept)


def compile_case(case: Case, arch: int, config_index: int | None = None, usage: bool = False) -> dict:
    """Compile one config of ``case`` for ``sm_<arch>``. Returns a JSON-able dict: ``shared``
    (bytes), ``wgmma`` / ``mma_sync`` (the PTX uses them), ``regs`` / spills (``usage``) or ``error``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernels = discover_kernels()
    kernel = kernels[case.kernel]
    case = for_arch(case, arch)
    idx = case.kept[0] if config_index is None else config_index
    cfg, nw, ns, maxnreg = case.configs[idx]
    sig, consts, attrs = _signature(kernel, case.args, {**case.variant, **cfg})
    res = dict(kernel=case.kernel, case=case.id, arch=arch, config=idx, num_warps=nw, num_stages=ns, cfg=cfg)
    options = dict(num_warps=nw, num_stages=ns)
    if maxnreg:
        options["maxnreg"] = res["maxnreg"] = maxnreg
    try:
        k = triton.compile(ASTSource(kernel, sig, consts, attrs), target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as e:  # noqa: BLE001 - reported, the caller decides
        res["error"] = f"{type(e).__name__}: {str(e)[-2000:]}"
        return res
    ptx = k.asm["ptx"]
    res.update(shared=int(k.metadata.shared), wgmma=ptx.count("wgmma.mma_async"), mma_sync=ptx.count("mma.sync"))
    if usage:
        res.update(ptxas_usage(ptx, arch))
    return res


def serve() -> None:
    """Answer JSON requests ``{"case": id, "arch": 90, "config": null, "usage": false}`` on stdin,
    one JSON result per line on stdout (used from processes running the interpreter)."""
    cases = {c.id: c for c in build_cases()}
    inventory = dict(kernels=sorted(discover_kernels()), cases=sorted(cases))
    out = sys.stdout
    sys.stdout = sys.stderr  # stray prints (compiler diagnostics) must not break the protocol
    out.write(json.dumps(inventory) + "\n")
    out.flush()
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        try:
            res = compile_case(cases[req["case"]], int(req["arch"]), req.get("config"), bool(req.get("usage")))
        except Exception as e:  # noqa: BLE001
            res = dict(case=req.get("case"), error=f"{type(e).__name__}: {e}")
        out.write(json.dumps(res) + "\n")
        out.flush()


def backend_available() -> str | None:
    """None if Triton's NVIDIA backend and its ptxas are usable here, else the reason."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        path = get_ptxas(90).path
    except Exception as e:  # noqa: BLE001
        return f"triton has no usable NVIDIA backend / ptxas: {type(e).__name__}: {e}"
    if not (path and os.path.exists(path)):
        return f"ptxas not found ({path})"
    return None


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("run without TRITON_INTERPRET=1: the interpreter cannot compile for a GPU")
    if sys.argv[1:] == ["--serve"]:
        serve()
    else:
        sys.exit("usage: python -m univigu_fast.kernels._aot --serve")
