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


def _record(op, shape, impl, ms):
    return {"op": op, "shape": shape, "mode": "fwd", "impl": impl, "ms": ms}


def _records(path):
    return sorted((r["op"], r["shape"], r["impl"], r["ms"]) for r in json.loads(path.read_text())["records"])


def test_results_dir_from_environment(common, tmp_path):
    assert common.RESULTS_DIR == tmp_path


def test_each_write_keeps_earlier_runs_records_and_replaces_remeasured_pairs(common, tmp_path):
    path = tmp_path / f"h100-{common.datetime.date.today().isoformat()}.json"
    path.write_text(json.dumps({"run_id": "an earlier run", "records": [
        _record("ffn", "480p", "triton", 4.0), _record("ffn", "480p", "naive", 5.0),
        _record("attention", "480p", "triton", 9.0)]}))

    common.RECORDS.append(_record("ffn", "480p", "triton", 3.0))
    assert common.write_results() == path
    assert _records(path) == [("attention", "480p", "triton", 9.0), ("ffn", "480p", "triton", 3.0)]

    # the second write of the same run (the file now carries this run's id) keeps the earlier run's figures
    common.RECORDS.append(_record("argmax", "n256", "triton", 1.0))
    common.write_results()
    assert _records(path) == [("argmax", "n256", "triton", 1.0), ("attention", "480p", "triton", 9.0),
                              ("ffn", "480p", "triton", 3.0)]
    doc = json.loads(path.read_text())
    assert doc["run_id"] == common._RUN_ID and doc["peak_tflops"] == 800.0 and doc["commit"] == "0" * 40

    # a later run that measures attention again replaces only that pair
    common.RECORDS.clear()
    common._EARLIER.clear()
    common._RUN_ID = "a later run"
    common.RECORDS.append(_record("attention", "480p", "auto", 7.0))
    common.write_results()
    assert _records(path) == [("argmax", "n256", "triton", 1.0), ("attention", "480p", "auto", 7.0),
                              ("ffn", "480p", "triton", 3.0)]
