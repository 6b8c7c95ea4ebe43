"""The benchmark results file (bench/_common.py): records are merged into the day's file after
every measurement, so figures of earlier runs and of this run's earlier records both survive a run
that is cut short. No GPU needed: the CUDA queries are replaced by fixed answers."""
import importlib
import json
import sys
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
    sys.modules.pop("_common", None)
    mod = importlib.import_module("_common")
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
    path = tmp_path / f"h100-{common.datetime.date.today().isoformat()}.json"
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
    common._EARLIER.clear()
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
    """pytest-benchmark's fixture as ``measure`` uses it: ``pedantic`` runs the target ``rounds`` times."""

    def __init__(self):
        self.extra_info, self.stats = {}, None

    def pedantic(self, target, rounds, iterations, warmup_rounds):
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
    path = tmp_path / f"h100-{common.datetime.date.today().isoformat()}.json"
    path.write_text(json.dumps({"records": [_record("model_step", "480p", "triton", 9.0, "r0"),
                                            _record("model_step", "480p", "cached", 1.0, "r0")]}))
    common.RECORDS.append(_record("model_step", "480p", "cached", 0.9))
    common.write_results()
    err = capsys.readouterr().err
    assert "dropped" in err and "'triton'" in err and "'cached'" not in err
    common.RECORDS.append(_record("argmax", "n256", "triton", 1.0))
    common.write_results()
    assert capsys.readouterr().err == ""
