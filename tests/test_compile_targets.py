"""Every Triton kernel compiles offline for the GPUs we target (no GPU needed).

For each launch the launchers make at a DESIGN §6 shape (``kernels/_aot.py: build_cases``), one
representative autotune config (the first the autotuner's own prune keeps) is compiled with
Triton's NVIDIA backend for sm_90 (H100) and sm_80 (A100) and checked:

* it compiles (Triton -> PTX -> ptxas cubin);
* ``metadata.shared`` <= the device's opt-in shared-memory limit (a config over it fails to launch);
* the GEMM-like kernels (grouped FFN GEMM, attention fwd / bwd, the text head's argmax / CE
  partial) use tensor cores: ``wgmma`` on sm_90, ``mma.sync`` on sm_80. One legitimate exception:
  the argmax / sample partial kernel for N <= 16 rows (decoding a few tokens) uses its 16-row
  configs, and wgmma needs 64 rows per warpgroup, so there ``mma.sync`` is expected on sm_90 too.

The first launch of every kernel in bf16 on both targets and in fp16 on sm_90; the kernel's other
launches (other epilogues, sampling, RoPE in the prologue, ...) in bf16 on sm_90. (sm_80 lowers fp16
and bf16 through the same ``mma.sync`` path; the rest is left to ``bench/compile_audit.py`` to keep
this file under a minute on 2 cores.)
Kernels run in the interpreter in this process (conftest), and Triton fixes interpreter vs compiler
mode at import, so compilation happens in one helper process per pytest worker
(``python -m univigu_fast.kernels._aot --serve``). Note: this compiles with the installed Triton,
the GPU machine runs an older one: a proxy, not a substitute for the GPU tests.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from univigu_fast.kernels import _aot

_SKIP = _aot.backend_available()
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")

_CASES = [c for c in _aot.build_cases(("bf16", "fp16")) if c.in_test] if _SKIP is None else []


def _pid(case, arch: int) -> str:
    return f"{case.kernel}-{case.variant_name}-{case.dtype}-sm{arch}"  # (no brackets: usable with -k)


def _matrix():
    """First launch of every kernel: bf16 on sm_90 and sm_80, fp16 on sm_90 (unless the kernel has
    no 16-bit operand); the other launches (other epilogues / modes): bf16 on sm_90."""
    params, first = [], {}
    for c in _CASES:
        first.setdefault((c.kernel, c.dtype), c.variant_name)
    for c in _CASES:
        is_first = first[(c.kernel, c.dtype)] == c.variant_name
        if c.dtype == "bf16":
            params += [pytest.param(c.id, arch, id=_pid(c, arch)) for arch in ((90, 80) if is_first else (90,))]
        elif is_first and any(isinstance(v, str) and c.dtype in v for v in c.args.values()):
            params.append(pytest.param(c.id, 90, id=_pid(c, 90)))
    return params


_MATRIX = _matrix()
_BY_ID = {c.id: c for c in _CASES}


class _Server:
    def __init__(self):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        self.proc = subprocess.Popen([sys.executable, "-m", "univigu_fast.kernels._aot", "--serve"], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"compile server died at start (exit {self.proc.wait()})")
        self.inventory = json.loads(line)

    def compile(self, case: str, arch: int) -> dict:
        self.proc.stdin.write(json.dumps(dict(case=case, arch=arch)) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"compile server died on {case} sm_{arch} (exit {self.proc.wait()})")
        return json.loads(line)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="session")
def server():
    s = _Server()
    yield s
    s.close()


def test_every_kernel_is_covered(server):
    """The cases cover every @triton.jit kernel in kernels/ (found by introspection, so a new kernel
    without a case fails here), in this (interpreter) process and in the compiling one alike."""
    here = set(_aot.discover_kernels())
    assert len(here) >= 16, sorted(here)
    assert set(server.inventory["kernels"]) == here
    tested = {c.kernel for c in _CASES if any(p.values[0] == c.id for p in _MATRIX)}
    assert tested == here, f"kernels without a compile case: {sorted(here - tested)}"
    for arch in (90, 80):
        on_arch = {c.kernel for c in _CASES if any(p.values == (c.id, arch) for p in _MATRIX)}
        assert on_arch == here, f"sm_{arch}: kernels not compiled: {sorted(here - on_arch)}"
    assert set(_aot.GEMM_KERNELS) <= here


def test_cases_follow_the_launchers():
    """Spot checks that the cases take the launchers' own numbers (not copies that could drift)."""
    from univigu_fast.kernels import joint_attention as ja
    from univigu_fast.kernels import modality_ffn as mf

    by_id = {c.id: c for c in _CASES}
    ffn = by_id["modality_ffn._grouped_gemm_kernel[fwd2-bf16]"]
    assert ffn.variant["BLOCK_M"] == mf._GPU_BLOCK_M and ffn.variant["EPILOGUE"] == mf.EPI_BIAS_GATED
    assert [c for c, _, _, _ in ffn.configs] == [c.kwargs for c in mf._gemm_configs()]
    assert all(mf._GPU_BLOCK_M * ffn.configs[i][0]["BLOCK_N"] <= 2048 * ffn.configs[i][1] for i in ffn.kept)
    fwd = by_id["joint_attention._attn_fwd_kernel[plain-bf16]"]
    assert fwd.variant["ROPE_Q"] == ja.ROPE_Q_IN_PROLOGUE and fwd.variant["BLOCK_M"] == ja._FWD_BLOCK_M
    assert fwd.args["COS"] == "*bf16"  # without RoPE in the prologue the launcher passes q as the dummy table


@pytest.mark.parametrize("case_id,arch", [p.values for p in _MATRIX], ids=[p.id for p in _MATRIX])
def test_compiles_for_target(server, case_id, arch):
    res = server.compile(case_id, arch)
    assert "error" not in res, f"{case_id} does not compile for sm_{arch}:\n{res.get('error')}"
    limit = _aot.SHARED_LIMIT[arch]
    assert 0 <= res["shared"] <= limit, (
        f"{case_id} config {res['cfg']} (warps {res['num_warps']}, stages {res['num_stages']}) needs "
        f"{res['shared']} B of shared memory on sm_{arch}, the limit is {limit} B")
    case = _BY_ID[case_id]
    if case.kernel in _aot.GEMM_KERNELS:
        # sm_80: mma.sync; sm_90: wgmma, or mma.sync for 16-row tiles (wgmma needs 64 rows per warpgroup)
        expected = case.sm90_mma if arch >= 90 else "mma.sync"
        if expected == "wgmma":
            assert res["wgmma"] > 0, f"{case_id}: no wgmma in the sm_{arch} PTX (mma.sync: {res['mma_sync']})"
        elif expected == "mma.sync":
            assert res["mma_sync"] > 0, f"{case_id}: no mma.sync in the sm_{arch} PTX"
    else:  # memory-bound kernels: no dot, so no tensor-core instructions either
        assert res["wgmma"] == 0 and res["mma_sync"] == 0
