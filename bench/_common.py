"""Shared benchmark plumbing: device peaks, timing, and the results JSON of DESIGN §6.

Every bench file times its impls with :func:`measure` inside a pytest-benchmark test and appends a
record; after every record (and at session end, ``bench/conftest.py``) the run's records are merged,
with the device's measured bf16 matmul peak and copy bandwidth from the same run, into the device's
newest results file (:func:`results_path`: the one ``bench/readme_table.py`` renders), so groups
measured in sessions on different days end up in one file; a device without one gets
``bench/results/<device>-<date>.json``. ``UNIVIGU_RESULTS_DIR`` names another folder for that file,
which then starts from the same-named committed file (``bench/run_gpu.sh`` points it at the device
call's ``$OUT``, so a call cut off at its time limit still returns every figure it measured);
``UNIVIGU_RESULTS_FILE`` names the file itself. Under ``--benchmark-disable`` (a smoke run) every
impl runs once and nothing is recorded.

``peak_mem_bytes`` is the memory an impl allocates on top of what was resident before the call
(inputs and weights excluded), read with ``torch.cuda.max_memory_allocated`` after a garbage
collection (so no earlier call's unreachable tensors sit in the baseline and are freed during the
measured one), and measured again if memory resident before the call was freed during it anyway
(null if that persists). ``configs`` names the autotuned config each of our Triton kernels ran with in the
measured call (``{"<module>.<kernel>": {"BLOCK_N": 128, ..., "num_warps": 8, "num_stages": 4}}``;
a kernel launched several times per call, e.g. the grouped GEMM, shows its last launch), and the
file's ``autotune`` section every (kernel, autotune key) -> config chosen in the run.
``gpu_state`` (NVML, where ``nvidia-ml-py`` is installed) is the SM clock, board power and
temperature read right after the timed rounds: a long measurement (a 50-step caption) that ran
throttled shows a lower clock than the short ones.
"""
from __future__ import annotations

import datetime
import gc
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch

COMMITTED_DIR = Path(__file__).parent / "results"
RESULTS_DIR = Path(os.environ.get("UNIVIGU_RESULTS_DIR") or COMMITTED_DIR)
RECORDS: list[dict] = []
_NOW = datetime.datetime.now()
_RUN_ID, _RUN_DATE = _NOW.isoformat(), _NOW.date().isoformat()  # once per run (a run may pass midnight)
_RUN: dict = {}  # this run's results file ("path") and the records earlier runs left in it ("earlier")
_WARNED: set = set()  # dropped earlier records already reported
_PEAKS: dict[str, float] = {}
WARMUP_S = 0.3  # minimum warm-up per measurement (when it has one), seconds
TIMED_S = 0.5  # target length of the timed rounds of a fast op, seconds
MAX_ROUNDS = 200

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="benchmarks time CUDA kernels")


def device_slug() -> str:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    m = re.search(r"(H100|H200|H20|A100|A10G|L40S|L4|B200|GB200|RTX ?\d+)", name, re.I)
    return (m.group(1) if m else name).replace(" ", "").lower()


def _cuda_time_ms(fn: Callable[[], object], warmup: int = 3, reps: int = 10) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def gpu_busy_ms(fn: Callable[[], object]) -> float | None:
    """Sum of the GPU activity (kernels, copies) of one ``fn()`` call, from the PyTorch profiler, in ms;
    None where the profiler cannot trace the device. Against the call's wall time it says whether
    the call is GPU-bound (busy ~ wall) or waits on the host (busy << wall)."""
    from torch.profiler import ProfilerActivity, profile

    try:
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        busy_us = sum(e.time_range.elapsed_us() for e in prof.events()
                      if e.device_type == torch.autograd.DeviceType.CUDA)
    except Exception:  # noqa: BLE001 - a diagnostic: no figure rather than a failed benchmark
        return None
    return busy_us / 1e3 if busy_us else None


def device_peaks() -> dict[str, float]:
    """Measured bf16 matmul TFLOP/s (8192^3, random data) and device-to-device copy GB/s (read + write)."""
    if not _PEAKS:
        n = 8192
        a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        ms = _cuda_time_ms(lambda: a @ b, warmup=5, reps=20)
        _PEAKS["peak_tflops"] = 2 * n**3 / ms / 1e9
        src = torch.empty(2 * 1024**3 // 2, device="cuda", dtype=torch.bfloat16).normal_()
        dst = torch.empty_like(src)
        ms = _cuda_time_ms(lambda: dst.copy_(src), warmup=3, reps=20)
        _PEAKS["peak_gbps"] = 2 * src.numel() * src.element_size() / ms / 1e6
        del a, b, src, dst
        torch.cuda.empty_cache()
    return _PEAKS


def measure(
    benchmark,
    fn: Callable[[], object],
    *,
    op: str,
    shape: str,
    mode: str,
    impl: str,
    dtype: torch.dtype | str = torch.bfloat16,
    flops: float | None = None,
    bytes_moved: float | None = None,
    rounds: int = 10,
    warmup_rounds: int = 3,
) -> dict:
    """Time ``fn`` (synchronised) with pytest-benchmark, measure its extra peak memory, record it.

    ``flops`` counts only real (unpadded) work; ``bytes_moved`` the minimal device-memory traffic.
    ``rounds`` / ``warmup_rounds`` are minimums: with ``warmup_rounds >= 1`` the warm-up goes on for
    at least ``WARMUP_S`` (GPU clocks ramp up from idle), and a fast op gets more rounds, up to
    ``MAX_ROUNDS``, so its timed part lasts about ``TIMED_S`` (10 rounds of a 0.2 ms op are noise).
    Peak memory comes from one more call, except for a single-round measurement (a 50-step caption),
    where the timed call itself is measured.
    Returns the record (also appended to :data:`RECORDS`). Under ``--benchmark-disable`` pytest-benchmark
    runs ``fn`` once, untimed: ``ms`` is that call's wall time and the record is not kept (a smoke run
    must not replace measured groups in the results file).
    """

    def timed():
        out = fn()
        torch.cuda.synchronize()
        return out

    last_s = None
    start, calls = time.perf_counter(), 0
    while calls < warmup_rounds or (warmup_rounds and time.perf_counter() - start < WARMUP_S):
        t0 = time.perf_counter()
        timed()
        last_s, calls = time.perf_counter() - t0, calls + 1
    if last_s:
        rounds = max(rounds, min(MAX_ROUNDS, math.ceil(TIMED_S / last_s)))
    tuners = _autotuners()

    def forget_configs():  # set again by every launch: afterwards, the configs of the next call
        for tuner in tuners.values():
            tuner.best_config = None

    wall_s = []

    def timed_rounds(n):
        t0 = time.perf_counter()
        out = benchmark.pedantic(timed, rounds=n, iterations=1, warmup_rounds=0)
        wall_s.append(time.perf_counter() - t0)
        return out

    if rounds == 1:  # one long call (a 50-step caption): its memory is read from the timed call itself
        forget_configs()
        peak = _extra_peak_memory(lambda: timed_rounds(1), attempts=1)
        gpu_state = _gpu_state()
    else:
        timed_rounds(rounds)
        gpu_state = _gpu_state()
        forget_configs()
        peak = _extra_peak_memory(timed)
    disabled = benchmark.stats is None  # --benchmark-disable: pedantic ran ``timed`` once, untimed
    ms = wall_s[0] * 1e3 if disabled else benchmark.stats.stats.median * 1e3
    configs = {name: _config_dict(t.best_config) for name, t in tuners.items()
               if getattr(t, "best_config", None) is not None}
    record = {
        "op": op,
        "shape": shape,
        "mode": mode,
        "impl": impl,
        "dtype": str(dtype).replace("torch.", ""),
        "ms": ms,
        "flops": flops,
        "bytes_moved": bytes_moved,
        "tflops": flops / ms / 1e9 if flops else None,
        "gbps": bytes_moved / ms / 1e6 if bytes_moved else None,
        "peak_mem_bytes": peak,
        "configs": configs or None,
        "gpu_state": gpu_state,
        "run": _RUN_ID,
        "date": _RUN_DATE,
        "commit": _git_commit(),
    }
    record.update(rates_vs_peaks(flops, bytes_moved, ms, device_peaks()))
    benchmark.extra_info.update(record)
    if disabled:
        sys.stderr.write(f"bench: pytest-benchmark is disabled (--benchmark-disable): {op} {shape} {mode} {impl} "
                         f"ran once ({ms:.3g} ms wall), not recorded\n")
        return record
    RECORDS.append(record)
    write_results()  # after every record, so a run cut short still leaves its figures
    return record


def rates_vs_peaks(flops: float | None, bytes_moved: float | None, ms: float, peaks: dict) -> dict:
    """``pct_peak``: the achieved TFLOP/s as % of the measured matmul peak (GB/s as % of the copy
    bandwidth when no FLOPs are given); ``pct_roofline`` (both given): the roofline time
    ``max(bytes / bandwidth, flops / peak)`` as % of the measured time (100 = at the roofline)."""
    out = {}
    if flops:
        out["pct_peak"] = 100 * flops / ms / 1e9 / peaks["peak_tflops"]
    elif bytes_moved:
        out["pct_peak"] = 100 * bytes_moved / ms / 1e6 / peaks["peak_gbps"]
    if flops and bytes_moved:
        roof_ms = max(bytes_moved / peaks["peak_gbps"] / 1e6, flops / peaks["peak_tflops"] / 1e9)
        out["pct_roofline"] = 100 * roof_ms / ms
    return out


def _gpu_state() -> dict | None:
    """``{"sm_clock_mhz", "power_w", "temp_c"}`` of the current device from NVML, or None. Read with
    torch.cuda's readers, which map ``CUDA_VISIBLE_DEVICES`` to NVML's index of the same GPU."""
    try:
        return {"sm_clock_mhz": torch.cuda.clock_rate(), "power_w": round(torch.cuda.power_draw() / 1000, 1),
                "temp_c": torch.cuda.temperature()}
    except Exception:  # noqa: BLE001 - diagnostics only
        return None


def _extra_peak_memory(timed, attempts: int = 3) -> int | None:
    """Device memory one call of ``timed`` allocates on top of what was resident before it (its
    outputs included). Garbage is collected before the baseline is read; a call during which memory
    of the baseline was freed (allocated after it, outputs still alive, below the baseline: garbage
    of an earlier test, say, released by the call) would understate its peak by that much, so it is
    measured again; None if that keeps happening."""
    for _ in range(attempts):
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = timed()
        after = torch.cuda.memory_allocated()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        if after >= base:
            return int(peak)
    print(f"bench: extra peak memory not measurable (memory resident before the call was freed during it "
          f"{attempts} times); recorded as null")
    return None


def _autotuners() -> dict:
    """Our ``triton.autotune`` wrappers by ``"<module>.<kernel>"`` (empty without Triton)."""
    try:
        from univigu_fast.kernels import _aot

        return _aot.discover_autotuners()
    except Exception:  # noqa: BLE001 - diagnostics only
        return {}


def _config_dict(cfg) -> dict:
    d = {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    if getattr(cfg, "maxnreg", None):
        d["maxnreg"] = cfg.maxnreg
    return d


def _git_commit() -> str | None:
    if os.environ.get("UNIVIGU_COMMIT"):
        return os.environ["UNIVIGU_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:
        return None


def _identity(record: dict) -> tuple:
    return tuple(record.get(k) for k in ("op", "shape", "mode", "impl", "dtype"))


def results_path() -> Path:
    """The file this run's records merge into: ``UNIVIGU_RESULTS_FILE``; else, in ``RESULTS_DIR``, the
    device's newest results file there or, failing that, the name of its newest committed one (newest
    as ``bench/readme_table.py`` picks the file it renders); else a new ``<device>-<date>.json``."""
    if os.environ.get("UNIVIGU_RESULTS_FILE"):
        return Path(os.environ["UNIVIGU_RESULTS_FILE"])
    from readme_table import newest_results

    for folder in (RESULTS_DIR, COMMITTED_DIR):
        try:
            return RESULTS_DIR / newest_results(folder, f"{device_slug()}-*.json").name
        except FileNotFoundError:
            pass
    return RESULTS_DIR / f"{device_slug()}-{_RUN_DATE}.json"


def _load(path: Path, move_aside: bool = True) -> dict | None:
    """A results file's JSON; None if it is missing or torn (a run killed while writing it): a torn
    file is moved aside to ``<name>.corrupt`` (``move_aside``: the file this run writes; the committed
    file it starts from is only read), which is said on stderr."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError as e:
        if not move_aside:
            sys.stderr.write(f"write_results: {path} is not valid JSON ({e}): not merged, this run starts empty\n")
            return None
        aside = path.with_name(path.name + ".corrupt")
        try:
            os.replace(path, aside)
        except OSError as err:  # a read-only folder: the run still writes its own file
            sys.stderr.write(f"write_results: {path} is not valid JSON ({e}) and cannot be moved aside ({err})\n")
            raise
        sys.stderr.write(f"write_results: {path} is not valid JSON ({e}): moved aside to {aside}\n")
        return None


def write_results() -> Path | None:
    """Merge this run's records into :func:`results_path` (chosen at the run's first write; in a
    fresh ``RESULTS_DIR`` the file starts from the committed file of that name).

    Records of an (op, shape) pair measured in this run replace that pair's older records, so every
    ratio inside one (op, shape) is between impls timed in the same run: measure an (op, shape)'s
    records in one run (``-k`` selections that split them drop the other part, which is reported on
    stderr, as ``model_step`` / ``wan1.3b-480p`` split from its ``cached`` text step); records of
    other pairs are kept. Each record names its ``run``, ``date`` and ``commit``; ``runs`` maps every
    run whose records the file holds to its commit, versions, date and measured peaks (the top-level
    ones are the latest run's); other top-level keys an earlier run or a person left (a ``note``) are
    kept. The file is replaced atomically (a run killed mid-write leaves the previous version).
    """
    if not RECORDS or not torch.cuda.is_available():
        return None
    import triton

    path = _RUN.get("path") or results_path()
    old = _load(path)
    if old is None and path.parent.resolve() != COMMITTED_DIR.resolve():
        old = _load(COMMITTED_DIR / path.name, move_aside=False)  # a fresh $OUT: start from the committed file
    old = old or {"records": []}
    if "path" not in _RUN:  # the file as this run first found it (later writes hold this run's records too)
        path.parent.mkdir(parents=True, exist_ok=True)
        # records of files from before records carried a date: the file's (it held one day's runs)
        _RUN.update(path=path, earlier=[{**r, "date": r.get("date") or old.get("date")} for r in old.get("records", [])])
    fresh = {(r["op"], r["shape"]) for r in RECORDS}
    kept = [r for r in _RUN["earlier"] if (r["op"], r["shape"]) not in fresh]
    measured = {_identity(r) for r in RECORDS}
    dropped = [_identity(r) for r in _RUN["earlier"] if (r["op"], r["shape"]) in fresh and _identity(r) not in measured]
    if set(dropped) - _WARNED:
        _WARNED.update(dropped)
        sys.stderr.write(f"write_results: {path.name}: records of an earlier run dropped because this run measures "
                         f"their (op, shape) again without them: {sorted(set(dropped), key=str)}\n")
    autotune = dict(old.get("autotune") or {})
    for name, tuner in _autotuners().items():  # every key tuned in this process, merged over older runs
        chosen = {" ".join(map(str, key)): _config_dict(cfg) for key, cfg in getattr(tuner, "cache", {}).items()}
        if chosen:
            autotune[name] = {**autotune.get(name, {}), **chosen}
    this_run = {"commit": _git_commit(), "torch": torch.__version__, "triton": triton.__version__,
                "date": _RUN_DATE, **device_peaks()}
    records = kept + RECORDS
    live = {r.get("run") for r in records}
    runs = {k: v for k, v in (old.get("runs") or {}).items() if k in live}
    runs[_RUN_ID] = this_run
    doc = {
        **old,
        "device": torch.cuda.get_device_name(),
        **this_run,
        "run_id": _RUN_ID,
        "runs": runs,
        "records": records,
        "autotune": autotune,
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)
    return path
