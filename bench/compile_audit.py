"""Compile audit (not a test): every autotune config of every Triton kernel, offline for sm_90.

For every launch the launchers make at a DESIGN §6 shape (``univigu_fast.kernels._aot.build_cases``)
and every config in that kernel's autotune list (or the launcher's one fixed config), compile with
Triton's NVIDIA backend (no GPU needed) and print one row: kernel, launch, config, whether the
autotuner's early prune keeps it for that launch, shared memory (bytes, limit 232,448 on H100),
registers and spill bytes (``ptxas -v``), and whether the PTX uses ``wgmma``.

    python bench/compile_audit.py                    # bf16, sm_90
    python bench/compile_audit.py --dtypes bf16 fp32 --arch 80 --json out.json --filter attn

The installed Triton compiles here; the GPU machine may run an older one (3.6 in 2026-11), whose
register allocation differs (the same config can spill under one and not the other). To audit with
the GPU's version, install its wheel aside and put it first on the path, e.g.
``pip download --no-deps triton==3.6.0 -d /tmp/w && pip install --no-deps --target /tmp/t36 /tmp/w/*.whl``
then ``PYTHONPATH=/tmp/t36 python bench/compile_audit.py``. This is a proxy for compile errors,
shared-memory overflow, spills and lost tensor-core lowering, not a timing.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)  # must precede every triton import: compile, don't interpret

from univigu_fast.kernels import _aot  # noqa: E402

SPILL_WARN = 64  # bytes of spill stores above which a config is flagged


def _cfg_str(cfg: dict, nw: int, ns: int, maxnreg, variant_keys) -> str:
    parts = [f"{k[6:] if k.startswith('BLOCK_') else k}={v}" for k, v in cfg.items()
             if k not in variant_keys and k != "USE_TMA"]
    if cfg.get("USE_TMA"):
        parts.append("tma")
    return " ".join(parts) + f" w{nw} s{ns}" + (f" r{maxnreg}" if maxnreg else "")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", nargs="+", default=["bf16"], choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--arch", type=int, default=90, choices=sorted(_aot.SHARED_LIMIT))
    ap.add_argument("--filter", default="", help="substring of the case id")
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    reason = _aot.backend_available()
    if reason:
        print(f"cannot audit: {reason}", file=sys.stderr)
        return 2
    limit = _aot.SHARED_LIMIT[args.arch]
    rows, problems = [], []
    header = f"{'kernel':<44} {'launch':<20} {'config':<34} {'kept':>4} {'shared':>7} {'regs':>4} {'spill':>6} {'wgmma':>5} {'s':>5}"
    import triton

    print(f"# triton {triton.__version__}, sm_{args.arch}, shared limit {limit} B; spill = bytes of spill stores; kept = the autotuner's prune keeps it")
    print(header)
    print("-" * len(header))
    for case in _aot.build_cases(tuple(args.dtypes)):
        if args.filter not in case.id:
            continue
        case = _aot.for_arch(case, args.arch)
        for i, (cfg, nw, ns, maxnreg) in enumerate(case.configs):
            if cfg.get("USE_TMA") and not case.variant.get("TMA_OK"):
                continue  # never launched here: the launcher builds no TMA descriptors (fp32, before sm_90)
            t0 = time.time()
            r = _aot.compile_case(case, args.arch, i, usage=True)
            dt = time.time() - t0
            kept = i in case.kept
            name = case.kernel.split(".", 1)[1]
            launch = f"{case.variant_name}-{case.dtype}"
            cfg_s = _cfg_str(cfg, nw, ns, maxnreg, case.variant)
            r.update(case=case.id, kept=kept, seconds=round(dt, 1))
            rows.append(r)
            if "error" in r:
                print(f"{name:<44} {launch:<20} {cfg_s:<34} {'y' if kept else 'n':>4} COMPILE ERROR: "
                      f"{r['error'].splitlines()[0][:120]}", flush=True)
                problems.append((case.id, cfg_s, kept, "compile error"))
                continue
            spill = r.get("spill_stores") or 0
            wg = "yes" if r["wgmma"] else ("mma" if r["mma_sync"] else "-")
            flag = ""
            if r["shared"] > limit:
                flag, why = " <-- SHARED", "shared overflow"
            elif spill > SPILL_WARN:
                flag, why = " <-- SPILLS", f"spills {spill} B"
            elif (kept and case.kernel in _aot.GEMM_KERNELS and args.arch >= 90 and case.sm90_mma == "wgmma"
                  and not r["wgmma"]):  # (a pruned 16-row config on a wide launch legitimately has none)
                flag, why = " <-- NO WGMMA", "no wgmma"
            else:
                why = ""
            if why:
                problems.append((case.id, cfg_s, kept, why))
            print(f"{name:<44} {launch:<20} {cfg_s:<34} {'y' if kept else 'n':>4} {r['shared']:>7} "
                  f"{r.get('regs') or 0:>4} {spill:>6} {wg:>5} {dt:>5.1f}{flag}", flush=True)
    print()
    if problems:
        print(f"{len(problems)} flagged config(s):")
        for cid, cfg_s, kept, why in problems:
            print(f"  {cid}  {cfg_s}  ({'kept by prune' if kept else 'pruned for this launch'}): {why}")
    else:
        print("no config overflows shared memory, spills more than "
              f"{SPILL_WARN} B or misses its tensor-core lowering")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(arch=args.arch, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
