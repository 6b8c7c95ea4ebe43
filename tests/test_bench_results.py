"""The benchmark results file (bench/_common.py): records are merged into the device's newest
results file after every measurement, so figures of earlier runs (other days) and of this run's
earlier records both survive a run that is cut short; and bench/run_gpu.sh's budget and usage.
No GPU needed: the CUDA queries are replaced by fixed answers, python3 by a stub."""
import contextlib
import importlib
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def common(monkeypatch, tmp_path):
    pytest.importorskip("triton")  # write_results records the Triton version
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.setenv("UNIVIGU_RESULTS_DIR", str(tmp_path))
    monkeypatch.setenv("UNIVIGU_COMMIT", "0" * 40)
    monkeypatch.delenv("UNIVIGU_RESULTS_FILE", raising=False)
    sys.modules.pop("_common", None)
    mod = importlib.import_module("_common")
    monkeypatch.setattr(mod, "COMMITTED_DIR", tmp_path / "committed")  # not the checkout's bench/results
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(mod, "device_peaks", lambda: {"peak_tflops": 800.0, "peak_gbps": 3000.0})
    monkeypatch.setattr(mod, "_autotuners", lambda: {})
    yield mod
    sys.modules.pop("_common", None)


def _record(op, shape, impl, ms, run=None):
    return {"op": op, "shape": shape, "mode": "fwd", "impl": impl, "ms": ms, "run": run}


def _records(path):
    return sorted((r["op"], r["shape"], r["impl"], r["ms"]) for r in json.loads(path.read_text())["records"])


def test_results_dir_from_environment(common, tmp_path):
    assert common.RESULTS_DIR == tmp_path


def test_each_write_keeps_earlier_runs_records_and_replaces_remeasured_pairs(common, tmp_path):
    path = tmp_path / f"h100-{common._RUN_DATE}.json"
    earlier = {"commit": "1" * 40, "peak_tflops": 790.0, "peak_gbps": 2900.0}
    path.write_text(json.dumps({"run_id": "r0", "note": "kept", "runs": {"r0": earlier, "gone": earlier},
                                "records": [
        _record("ffn", "480p", "triton", 4.0, "r0"), _record("ffn", "480p", "naive", 5.0, "r0"),
        _record("attention", "480p", "triton", 9.0, "r0")]}))

    common.RECORDS.append(_record("ffn", "480p", "triton", 3.0, common._RUN_ID))
    assert common.write_results() == path
    assert _records(path) == [("attention", "480p", "triton", 9.0), ("ffn", "480p", "triton", 3.0)]

    # the second write of the same run (the file now carries this run's id) keeps the earlier run's figures
    common.RECORDS.append(_record("argmax", "n256", "triton", 1.0))
    common.write_results()
    assert _records(path) == [("argmax", "n256", "triton", 1.0), ("attention", "480p", "triton", 9.0),
                              ("ffn", "480p", "triton", 3.0)]
    doc = json.loads(path.read_text())
    assert doc["run_id"] == common._RUN_ID and doc["peak_tflops"] == 800.0 and doc["commit"] == "0" * 40
    # each kept record's run keeps its own peaks and commit (a run none of whose records is left is
    # dropped), this run's are added, and a note left in the file survives
    assert doc["runs"]["r0"] == earlier and "gone" not in doc["runs"] and doc["note"] == "kept"
    assert doc["runs"][common._RUN_ID]["peak_tflops"] == 800.0 and doc["runs"][common._RUN_ID]["commit"] == "0" * 40

    # a later run that measures attention again replaces only that pair
    common.RECORDS.clear()
    common._RUN.clear()
    common._RUN_ID = "a later run"
    common.RECORDS.append(_record("attention", "480p", "auto", 7.0))
    common.write_results()
    assert _records(path) == [("argmax", "n256", "triton", 1.0), ("attention", "480p", "auto", 7.0),
                              ("ffn", "480p", "triton", 3.0)]


def test_rates_against_the_measured_peaks(common):
    peaks = {"peak_tflops": 800.0, "peak_gbps": 2000.0}
    # compute-bound: 8 TFLOP in 20 ms = 400 TFLOP/s = 50% of peak; the roofline (10 ms) is half the time
    r = common.rates_vs_peaks(8e12, 1e9, 20.0, peaks)
    assert r["pct_peak"] == pytest.approx(50.0) and r["pct_roofline"] == pytest.approx(50.0)
    # memory-bound: 4 GB at 2000 GB/s is 2 ms; measured 2.5 ms -> 80% of the roofline
    r = common.rates_vs_peaks(1e9, 4e9, 2.5, peaks)
    assert r["pct_roofline"] == pytest.approx(80.0) and r["pct_peak"] == pytest.approx(0.05)
    # bytes only: % of the copy bandwidth, no roofline
    assert common.rates_vs_peaks(None, 4e9, 4.0, peaks) == {"pct_peak": pytest.approx(50.0)}


class _FakeDeviceMemory:
    """torch.cuda's allocation counters over a scripted device: ``resident`` bytes before a call, and
    per call (allocated during it, freed from the resident set during it, left allocated after it)."""

    def __init__(self, resident, calls):
        self.allocated, self.peak, self.calls = resident, resident, list(calls)

    def call(self):
        extra, freed, kept = self.calls.pop(0)
        self.allocated -= freed                    # e.g. an earlier test's garbage released by the call
        self.peak = max(self.peak, self.allocated + extra)
        self.allocated += kept
        return "outputs"

    def install(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: setattr(self, "peak", self.allocated))
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: self.allocated)
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: self.peak)


def test_extra_peak_memory_is_measured_again_when_the_call_frees_resident_memory(common, monkeypatch):
    # first call: 750 resident bytes are freed before its 2500-byte peak (it would read 1750);
    # the second call frees nothing and reads the true 2500 (100 of them outputs)
    mem = _FakeDeviceMemory(resident=1000, calls=[(2500, 750, 100), (2500, 0, 100)])
    mem.install(monkeypatch)
    assert common._extra_peak_memory(mem.call) == 2500 and not mem.calls
    # a call that frees resident memory every time has no sound figure: null, not a low number
    mem = _FakeDeviceMemory(resident=1000, calls=[(2500, 750, 100)] * 3)
    mem.install(monkeypatch)
    assert common._extra_peak_memory(mem.call) is None
    # the usual case: one call
    mem = _FakeDeviceMemory(resident=1000, calls=[(300, 0, 0), (999, 0, 0)])
    mem.install(monkeypatch)
    assert common._extra_peak_memory(mem.call) == 300 and len(mem.calls) == 1


class _FakeBenchmark:
    """pytest-benchmark's fixture as ``measure`` uses it: ``pedantic`` runs the target ``rounds`` times;
    disabled (``--benchmark-disable``), once, and ``stats`` stays None."""

    def __init__(self, disabled=False):
        self.extra_info, self.stats, self.disabled = {}, None, disabled

    def pedantic(self, target, rounds, iterations, warmup_rounds):
        if self.disabled:
            return target()
        for _ in range(rounds):
            result = target()
        self.stats = type("S", (), {"stats": type("T", (), {"median": 2.0})()})()
        return result


def test_a_single_round_measurement_reads_memory_from_the_timed_call(common, monkeypatch):
    """A 50-step caption (rounds=1, no warm-up) runs once: its peak memory is read from the timed call,
    not from a second 40-second call."""
    calls = []
    mem = _FakeDeviceMemory(resident=1000, calls=[(500, 0, 10)] * 4)
    mem.install(monkeypatch)
    monkeypatch.setattr(common, "write_results", lambda: None)

    def fn():
        calls.append(1)
        return mem.call()

    rec = common.measure(_FakeBenchmark(), fn, op="caption", shape="s", mode="m", impl="i", rounds=1, warmup_rounds=0)
    assert len(calls) == 1 and rec["peak_mem_bytes"] == 500 and rec["ms"] == 2000.0
    calls.clear()
    rec = common.measure(_FakeBenchmark(), fn, op="x", shape="s", mode="m", impl="i", rounds=2, warmup_rounds=0)
    assert len(calls) == 3 and rec["peak_mem_bytes"] == 500  # two timed rounds, then one for memory


def test_dropping_records_a_run_did_not_remeasure_is_reported(common, tmp_path, capsys):
    """A -k selection that measures only part of an (op, shape) drops the rest (the pair's ratios come
    from one run): that is said on stderr, naming the dropped records, once."""
    path = tmp_path / f"h100-{common._RUN_DATE}.json"
    path.write_text(json.dumps({"records": [_record("model_step", "480p", "triton", 9.0, "r0"),
                                            _record("model_step", "480p", "cached", 1.0, "r0")]}))
    common.RECORDS.append(_record("model_step", "480p", "cached", 0.9))
    common.write_results()
    err = capsys.readouterr().err
    assert "dropped" in err and "'triton'" in err and "'cached'" not in err
    common.RECORDS.append(_record("argmax", "n256", "triton", 1.0))
    common.write_results()
    assert capsys.readouterr().err == ""


def _doc(date, *records, **top):
    return json.dumps({"date": date, "device": "NVIDIA H100 80GB HBM3", **top, "records": list(records)})


def test_a_later_session_merges_into_the_devices_newest_file(common, tmp_path):
    """One group per session, sessions on different days: every session's records land in one file
    (the one the README renders), other groups' records kept, not in a new file of the day."""
    (tmp_path / "h100-2026-11-01.json").write_text(_doc("2026-11-01", _record("old", "s", "triton", 1.0, "r0")))
    newest = tmp_path / "h100-2026-11-23.json"
    newest.write_text(_doc("2026-11-23", _record("model_step", "480p", "triton", 600.0, "r1"), commit="1" * 40))
    (tmp_path / "h200-2026-12-30.json").write_text(_doc("2026-12-30"))  # another device's
    common.RECORDS.append({**_record("linear_argmax", "n256", "triton", 0.3, common._RUN_ID), "date": common._RUN_DATE})
    assert common.write_results() == newest
    assert _records(newest) == [("linear_argmax", "n256", "triton", 0.3), ("model_step", "480p", "triton", 600.0)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h100-2026-11-01.json", "h100-2026-11-23.json",
                                                          "h200-2026-12-30.json"]  # no new file, no temporary left
    doc = json.loads(newest.read_text())
    # top level: the latest run's date, commit and versions; that run's entry and records say the same
    assert doc["date"] == common._RUN_DATE and doc["commit"] == "0" * 40
    assert doc["runs"][common._RUN_ID]["date"] == common._RUN_DATE and doc["runs"][common._RUN_ID]["torch"]
    # each record says its day (one from a file of before records carried it: the file's date)
    assert {r["op"]: r["date"] for r in doc["records"]} == {"linear_argmax": common._RUN_DATE, "model_step": "2026-11-23"}


def test_a_fresh_results_dir_starts_from_the_committed_file(common, tmp_path, monkeypatch):
    """run_gpu.sh points UNIVIGU_RESULTS_DIR at the device call's empty $OUT: the one file written
    there is the device's committed file plus this run's records; the committed file is not touched."""
    out = tmp_path / "out"
    monkeypatch.setattr(common, "RESULTS_DIR", out)
    committed = tmp_path / "committed"
    committed.mkdir()
    (committed / "h100-2026-11-23.json").write_text(_doc("2026-11-23", _record("model_step", "480p", "triton", 600.0)))
    (committed / "h100-2026-11-01.json").write_text(_doc("2026-11-01", _record("old", "s", "triton", 1.0)))
    before = {p.name: p.read_text() for p in committed.iterdir()}
    common.RECORDS.append(_record("linear_argmax", "n256", "triton", 0.3))
    assert common.write_results() == out / "h100-2026-11-23.json"
    assert [p.name for p in out.iterdir()] == ["h100-2026-11-23.json"]
    assert _records(out / "h100-2026-11-23.json") == [("linear_argmax", "n256", "triton", 0.3),
                                                      ("model_step", "480p", "triton", 600.0)]
    assert {p.name: p.read_text() for p in committed.iterdir()} == before
    # a second run in the same call continues from what the first wrote there
    common.RECORDS[:] = [_record("rms_norm", "480p", "triton", 0.2)]
    common._RUN.clear()
    common.write_results()
    assert len(_records(out / "h100-2026-11-23.json")) == 3


def test_results_file_for_a_new_device_or_named_explicitly(common, tmp_path, monkeypatch):
    common.RECORDS.append(_record("linear_argmax", "n256", "triton", 0.3))
    assert common.results_path() == tmp_path / f"h100-{common._RUN_DATE}.json"  # no file of this device yet
    monkeypatch.setenv("UNIVIGU_RESULTS_FILE", str(tmp_path / "mine" / "x.json"))
    assert common.write_results() == tmp_path / "mine" / "x.json"
    assert _records(tmp_path / "mine" / "x.json") == [("linear_argmax", "n256", "triton", 0.3)]


def test_a_torn_results_file_is_moved_aside_and_writes_are_atomic(common, tmp_path, monkeypatch, capsys):
    path = tmp_path / f"h100-{common._RUN_DATE}.json"
    torn = _doc(common._RUN_DATE, _record("a", "s", "triton", 1.0))[:40]
    path.write_text(torn)  # a run SIGKILLed mid-write (before writes were atomic)
    common.RECORDS.append(_record("b", "s", "triton", 1.0))
    assert common.write_results() == path
    assert _records(path) == [("b", "s", "triton", 1.0)]
    aside = tmp_path / (path.name + ".corrupt")
    assert aside.read_text() == torn and str(aside) in capsys.readouterr().err

    # killed while writing the next version: the file still holds the previous one, whole
    good = path.read_text()
    real_write = Path.write_text

    def killed_mid_write(self, text, *a, **k):
        real_write(self, text[: len(text) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", killed_mid_write)
    common.RECORDS.append(_record("c", "s", "triton", 1.0))
    with pytest.raises(KeyboardInterrupt):
        common.write_results()
    monkeypatch.setattr(Path, "write_text", real_write)
    assert path.read_text() == good


def test_a_torn_committed_file_is_read_not_moved(common, tmp_path, monkeypatch, capsys):
    """A fresh $OUT starts from the committed file; a torn one is said and skipped, not renamed in the
    checkout (a read-only checkout raised PermissionError at every later measurement: nothing written)."""
    out, committed = tmp_path / "out", tmp_path / "committed"
    monkeypatch.setattr(common, "RESULTS_DIR", out)
    committed.mkdir()
    (committed / "h100-2026-11-23.json").write_text("{\"records\": [")

    real_replace = os.replace

    def read_only_checkout(src, dst):
        if Path(src).parent == committed:
            raise PermissionError(f"read-only: {src}")
        return real_replace(src, dst)

    monkeypatch.setattr(common.os, "replace", read_only_checkout)
    common.RECORDS.append(_record("b", "s", "triton", 1.0))
    path = common.write_results()
    assert path == out / "h100-2026-11-23.json" and _records(path) == [("b", "s", "triton", 1.0)]
    assert sorted(p.name for p in committed.iterdir()) == ["h100-2026-11-23.json"]
    assert "not merged, this run starts empty" in capsys.readouterr().err


def test_benchmark_disabled_runs_once_and_records_nothing(common, monkeypatch, capsys):
    """``pytest bench --benchmark-disable`` (a smoke run): pytest-benchmark runs the target once and
    keeps no stats; the call is timed by the wall clock and not recorded (it must not replace the
    measured figures of its group)."""
    mem = _FakeDeviceMemory(resident=0, calls=[(100, 0, 0)] * 3)
    mem.install(monkeypatch)
    calls = []
    rec = common.measure(_FakeBenchmark(disabled=True), lambda: calls.append(1) or mem.call(), op="x", shape="s",
                         mode="fwd", impl="triton", rounds=2, warmup_rounds=0)
    assert rec["ms"] > 0 and rec["peak_mem_bytes"] == 100 and len(calls) == 2  # the one call, then memory
    assert common.RECORDS == [] and common.write_results() is None
    assert "--benchmark-disable" in capsys.readouterr().err


def test_gpu_state_reads_this_process_gpu_through_torch(common, monkeypatch):
    """Under CUDA_VISIBLE_DEVICES=3, NVML's index 0 is another GPU: torch.cuda's readers map it."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    other_gpu = types.SimpleNamespace(nvmlInit=lambda: None, nvmlDeviceGetHandleByIndex=lambda i: i,
                                      nvmlDeviceGetClockInfo=lambda h, k: 345, nvmlDeviceGetPowerUsage=lambda h: 70_000,
                                      nvmlDeviceGetTemperature=lambda h, k: 30, NVML_CLOCK_SM=1, NVML_TEMPERATURE_GPU=0)
    monkeypatch.setitem(sys.modules, "pynvml", other_gpu)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "clock_rate", lambda *a: 1755)
    monkeypatch.setattr(torch.cuda, "power_draw", lambda *a: 412_340)
    monkeypatch.setattr(torch.cuda, "temperature", lambda *a: 61)
    assert common._gpu_state() == {"sm_clock_mhz": 1755, "power_w": 412.3, "temp_c": 61}


def test_no_git_noise_without_a_repository(common, monkeypatch, tmp_path, capfd):
    monkeypatch.delenv("UNIVIGU_COMMIT")
    monkeypatch.setenv("GIT_DIR", str(tmp_path / "no-repo"))  # as the device's copy of the tree (no .git)
    assert common._git_commit() is None
    assert "fatal" not in capfd.readouterr().err


def test_diffusers_is_timed_with_its_fastest_attention_backend(common, monkeypatch):
    """Issue 7: diffusers' WanTransformer3DModel "with its best attention backend": every backend
    that runs here is timed, the fastest named; backends that are not installed or fail are listed
    with the reason; a diffusers without attention backends runs its default."""
    active, speed = [], {"native": 5.0, "_native_cudnn": 3.0}

    @contextlib.contextmanager
    def attention_backend(name):
        if name in ("flash", "_flash_3", "xformers"):
            raise RuntimeError(f"{name} is not installed")
        active.append(name)
        try:
            yield
        finally:
            active.pop()

    def run():
        if active[-1] == "_native_flash":
            raise RuntimeError("no kernel for this input")

    monkeypatch.setitem(sys.modules, "diffusers", types.SimpleNamespace(attention_backend=attention_backend))
    sys.modules.pop("bench_model", None)
    bench_model = importlib.import_module("bench_model")
    monkeypatch.setattr(bench_model, "_cuda_time_ms", lambda fn, **k: fn() or speed[active[-1]])
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    best, tried = bench_model._fastest_backend(run)
    assert best == "_native_cudnn" and tried["native"] == 5.0
    assert "not installed" in tried["flash"] and "no kernel" in tried["_native_flash"]
    assert set(tried) == set(bench_model.DIFFUSERS_BACKENDS) and not active
    monkeypatch.setitem(sys.modules, "diffusers", types.SimpleNamespace())  # no attention_backend
    assert bench_model._fastest_backend(run) == (None, {})
    sys.modules.pop("bench_model", None)


# bench/run_gpu.sh with a stub python3 on PATH: "python3 -m pytest" logs its arguments and runs until
# interrupted; every other python3 call succeeds at once.
_STUB = """#!/bin/bash
if [ "$1" = "-m" ] && [ "$2" = "pytest" ]; then
  echo "$*" >> "$STUB_LOG"; trap 'exit 2' INT; while :; do sleep 0.05; done
fi
exit 0
"""


def _run_gpu(tmp_path, *args, budget="2"):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "python3").write_text(_STUB)
    (bin_dir / "python3").chmod(0o755)
    log = tmp_path / "pytest-runs.log"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OUT": str(tmp_path / "out"),
           "STUB_LOG": str(log), "UNIVIGU_COMMIT": "x", "UNIVIGU_BUDGET_S": budget, "UNIVIGU_MIN_STEP_S": "1"}
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(BENCH / "run_gpu.sh"), *args], env=env, capture_output=True, text=True,
                          timeout=30)
    runs = log.read_text().splitlines() if log.exists() else []
    return proc, runs, time.monotonic() - t0


def test_run_gpu_budget_is_for_the_whole_call(tmp_path):
    """``all`` runs tests, then benches: UNIVIGU_BUDGET_S bounds both together (the device kills the
    command at 600 s), so benches get what the tests left (here nothing)."""
    proc, runs, elapsed = _run_gpu(tmp_path, "all")
    assert len(runs) == 1 and runs[0].startswith("-m pytest tests"), runs
    assert "--maxfail=20" in runs[0].split() and "-x" not in runs[0].split()
    assert proc.returncode == 1 and "bench not run" in proc.stderr
    assert elapsed < 8


def test_run_gpu_refuses_an_unknown_step(tmp_path):
    proc, runs, _ = _run_gpu(tmp_path, "linear_argmax")
    assert proc.returncode == 2 and "usage" in proc.stderr and runs == []
    for budget in ("5m", "330.5"):  # an arithmetic error and "deadline: unbound variable", after the installs
        proc, runs, _ = _run_gpu(tmp_path, "bench", budget=budget)
        assert proc.returncode == 2 and "must be whole seconds" in proc.stderr and runs == [], proc.stderr
