"""bench/readme_table.py: the README's benchmark section is rendered from the newest results file."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _module():
    spec = importlib.util.spec_from_file_location("readme_table", ROOT / "bench" / "readme_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rec(op, shape, mode, impl, ms, **kw):
    return dict(op=op, shape=shape, mode=mode, impl=impl, ms=ms, tflops=kw.get("tflops"), gbps=kw.get("gbps"),
                peak_mem_bytes=kw.get("mem"))


def test_render_ratios_rates_and_memory():
    doc = {"device": "GPU", "commit": "abc", "date": "2026-01-01", "peak_tflops": 800.0, "peak_gbps": 3000.0,
           "records": [
               _rec("linear_cross_entropy", "n8192-d5120", "fwd_bwd", "triton", 100.0, tflops=200.0, mem=3 * 2**20),
               _rec("linear_cross_entropy", "n8192-d5120", "fwd_bwd", "naive", 150.0, mem=30 * 2**20),
               _rec("linear_cross_entropy", "n8192-d5120", "fwd_bwd", "liger", 125.0, mem=2 * 2**20),
               _rec("linear_cross_entropy", "n8192-d5120", "fwd_bwd", "torch", 400.0, mem=None),
               {**_rec("model_step", "wan1.3b-480p", "joint", "triton", 600.0),
                "max_abs_err_vs_fp32": 0.25, "max_abs_fp32": 40.0},
               {**_rec("model_step", "wan1.3b-480p", "joint", "reference", 900.0),
                "max_abs_err_vs_fp32": 0.2, "max_abs_fp32": 40.0},
               _rec("model_step", "wan1.3b-480p", "video", "diffusers", 580.0),
               {**_rec("model_step", "wan1.3b-480p", "train", "triton", 300.0), "layers": 6},
               _rec("joint_attention", "wan1.3b-480p", "fwd", "triton", 10.0),
               _rec("joint_attention", "wan1.3b-480p", "fwd", "triton_qprologue", 8.0),
               _rec("joint_attention", "wan1.3b-480p", "fwd", "sdpa", 11.0),
               _rec("rope", "wan1.3b-480p", "fwd", "tables", 2.0),
               _rec("rope", "wan1.3b-480p", "fwd", "position_ids", 1.0),
           ]}
    text = _module().render(doc, "bench/results/x.json")
    rows = {line.split("|")[1].strip() + "/" + line.split("|")[3].strip().split(" ")[0]:
            [c.strip() for c in line.split("|")[1:-1]]
            for line in text.splitlines() if line.startswith("| ") and "---" not in line and "op |" not in line}
    ce = rows["linear_cross_entropy/fwd_bwd"]
    # ours 100 ms at 200 TFLOP/s = 25% of 800; naive 1.50x; best peer = the faster of liger / torch
    assert ce[3:] == ["100", "200 TFLOP/s (25%)", "150", "liger 125", "1.50x", "1.25x", "3 / 30 / 2"]
    joint = rows["model_step/joint"]
    # a text-stream mode is compared with diffusers on the same video alone (the goal)
    assert joint[3:] == ["600", "—", "900", "580", "1.50x", "1.03x", "— / —", "0.25 / 0.2 (of 40)"]
    assert rows["model_step/train"][2] == "train (6 layers)"
    # our own variants are rows of their own, never "the best peer"
    assert rows["joint_attention/fwd"][6:9] == ["sdpa 11", "—", "1.10x"]
    assert rows["joint_attention (triton_qprologue)/fwd"][6:9] == ["sdpa 11", "—", "1.38x"]
    # an op whose impls are all variants of ours (rope tables vs position ids): each against the other
    assert rows["rope (tables)/fwd"][6:9] == ["position_ids 1", "—", "0.50x"]
    assert rows["rope (position_ids)/fwd"][6:9] == ["tables 2", "—", "2.00x"]


def test_readme_section_is_the_newest_results():
    """Whoever commits a results file regenerates the README table (`python bench/readme_table.py`)."""
    assert _module().main(["--check"]) == 0


def _rows(text):
    return [[c.strip() for c in line.split("|")[1:-1]]
            for line in text.splitlines() if line.startswith("| ") and "---" not in line and "op |" not in line]


def test_a_group_without_ours_is_one_row_with_ours_missing():
    """Our impl failed (the bench files skip a failing impl): its peers are not shown as ours."""
    doc = {"device": "GPU", "date": "2026-12-05", "peak_tflops": 800.0, "peak_gbps": 4000.0, "records": [
        _rec("modality_ffn", "wan1.3b-480p", "fwd_bwd", impl, ms)
        for impl, ms in (("naive", 30.0), ("compile", 20.0), ("grouped_mm", 25.0))]}
    assert _rows(_module().render(doc, "x.json")) == [
        ["modality_ffn", "wan1.3b-480p", "fwd_bwd", "—", "—", "30", "compile 20", "—", "—", "— / — / —"]]


def test_newest_results_is_by_date_then_name_not_file_time(tmp_path):
    import json
    import os

    for name, date in (("h100-2026-11-23.json", "2026-12-05"), ("h200-2026-12-05.json", "2026-12-05"),
                       ("h200-2026-12-01.json", "2026-12-01")):
        (tmp_path / name).write_text(json.dumps({"date": date, "records": []}))
    os.utime(tmp_path / "h100-2026-11-23.json", (2e9, 2e9))  # touched last (a checkout, a copy)
    mod = _module()
    assert mod.newest_results(tmp_path).name == "h200-2026-12-05.json"
    assert mod.newest_results(tmp_path, "h100-*.json").name == "h100-2026-11-23.json"


def test_a_file_merging_several_days_says_so_and_names_diffusers_backend():
    doc = {"device": "GPU", "date": "2026-12-05", "commit": "abc", "peak_tflops": 800.0, "peak_gbps": 4000.0,
           "records": [{**_rec("model_step", "wan1.3b-480p", "joint", "triton", 600.0), "date": "2026-11-23"},
                       {**_rec("model_step", "wan1.3b-480p", "video", "diffusers", 580.0), "date": "2026-12-05",
                        "attention_backend": "_native_cudnn"}]}
    text = _module().render(doc, "x.json")
    assert ", 2026-11-23 to 2026-12-05;" in text.splitlines()[0]
    joint = next(r for r in _rows(text) if r[2] == "joint")
    assert joint[6] == "580 (_native_cudnn)" and joint[8] == "1.03x"


def test_a_file_merging_several_runs_names_their_commits_and_versions():
    """The header named only the latest run's commit and versions for records of several runs."""
    doc = {"device": "GPU", "date": "2026-12-05", "commit": "b" * 40, "torch": "2.12", "triton": "3.7",
           "runs": {"r1": {"torch": "2.11", "triton": "3.6"}, "r2": {"torch": "2.12", "triton": "3.7"}},
           "records": [{**_rec("linear_argmax", "n256-d1536", "fwd", "triton", 1.0), "commit": "a" * 40},
                       {**_rec("modality_ffn", "wan1.3b-480p", "fwd", "triton", 3.0), "commit": "b" * 40}]}
    head = _module().render(doc, "x.json").splitlines()[0]
    assert "commits `aaaaaaaaaa`, `bbbbbbbbbb`" in head and "torch / triton 2.11 / 3.6, 2.12 / 3.7" in head
    one = dict(doc, runs={"r2": doc["runs"]["r2"]}, records=doc["records"][1:])
    head = _module().render(one, "x.json").splitlines()[0]
    assert "torch 2.12, triton 3.7, commit `bbbbbbbbbb`," in head
