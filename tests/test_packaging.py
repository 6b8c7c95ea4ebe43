"""A built wheel ships the kernels as ``univigu_fast.kernels`` and the ``univigu-fast`` entry point."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    # Build from a copy of the sources so the shared checkout gets no build/ or egg-info churn.
    src = tmp_path_factory.mktemp("src")
    for name in ("setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("univigu_fast", "kernels"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheels = list(out.glob("univigu_fast-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_contains_the_kernels_as_a_subpackage(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    kernels = sorted(p.name for p in (ROOT / "kernels").glob("*.py"))
    assert "__init__.py" in kernels and len(kernels) > 1
    for k in kernels:
        assert f"univigu_fast/kernels/{k}" in names, k
    for mod in ("__init__.py", "config.py", "reference.py", "modeling.py", "cli.py", "text.py"):
        assert f"univigu_fast/{mod}" in names, mod
    assert not any(n.startswith("kernels/") or n.startswith("tests/") for n in names)


def test_wheel_declares_the_cli_entry_point(wheel):
    z = zipfile.ZipFile(wheel)
    ep = next(n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt"))
    assert "univigu-fast = univigu_fast.cli:app" in z.read(ep).decode()


def test_profile_cli_json_on_tiny():
    """``univigu-fast profile --json`` runs on CPU (tiny config) and reports per-component numbers.
    (The reference model only: the fast one runs in Triton's slow interpreter on CPU; its numerics
    are tests/test_fast_model.py's business, its timings the GPU pass's.)"""
    import json

    from typer.testing import CliRunner

    from univigu_fast.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["profile", "--json", "--no-fast", "--mode", "joint"])
    assert result.exit_code == 0, result.output[-2000:]
    doc = json.loads(result.output[result.output.index("{"):])
    assert doc["shape"] == "tiny" and doc["layers"] == 2 and set(doc["results"]) == {"reference"}
    if doc["device"] == "cpu":  # the fast model did not run: no kernel path is claimed
        assert doc["timings"].startswith("CPU") and "fast_kernel_path" not in doc
    ref = doc["results"]["reference"]
    assert ref["process_peak_rss_bytes"] > 0 and "instrumented_total_seconds" in ref and "seconds_note" in doc
    secs = doc["results"]["reference"]["seconds"]
    comps = ("attention", "cross_attention", "ffn", "glue", "decode", "other", "total")
    assert set(comps) <= set(secs) and all(secs[c] >= 0 for c in comps) and secs["total"] > 0
    assert all(doc["flops"][c] > 0 for c in ("attention", "cross_attention", "ffn", "decode"))
    assert doc["flops"]["total"] == sum(v for k, v in doc["flops"].items() if k != "total")
    table = runner.invoke(app, ["profile", "--no-fast", "--mode", "video"])
    assert table.exit_code == 0 and "attention" in table.output and "decode" not in table.output
    assert runner.invoke(app, ["profile", "--no-fast", "--no-reference"]).exit_code != 0


def test_profile_cli_usage_errors(tmp_path):
    """Bad options are usage errors (exit 2) that name the option, before any model is built."""
    from typer.testing import CliRunner

    from univigu_fast.cli import app

    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    typo = tmp_path / "typo.json"  # a misspelt field was ignored (the 14B default's 40 layers were profiled)
    typo.write_text('{"num_layer": 2}')
    cases = [(["--layers", "0"], "--layers"), (["--layers", "-2"], "--layers"), (["--dtype", "foo"], "--dtype"),
             (["--shape", "foo"], "--shape"), (["--mode", "foo"], "--mode"),
             (["--config", str(tmp_path / "missing.json")], "--config"), (["--config", str(bad_json)], "--config"),
             (["--config", str(typo)], "'num_layers'"),
             (["--no-fast", "--no-reference"], "nothing to profile")]
    for args, named in cases:
        result = CliRunner().invoke(app, ["profile", "--no-fast", *args])
        assert result.exit_code == 2, (args, result.output[-1000:])
        assert named in result.output, (args, result.output[-1000:])


def test_profile_warns_of_a_large_shape_on_cpu(tmp_path):
    """--shape wan1.3b-480p without a GPU ran for hours without a word: it now says so first (the
    missing --config then stops this run before any model is built)."""
    import torch
    from typer.testing import CliRunner

    from univigu_fast.cli import app

    if torch.cuda.is_available():
        pytest.skip("the warning is for CPU runs")
    result = CliRunner().invoke(app, ["profile", "--shape", "wan1.3b-480p", "--config", str(tmp_path / "missing.json")])
    assert result.exit_code == 2 and "WARNING: --shape wan1.3b-480p without a GPU" in result.output, result.output


def test_power_sampler_reports_the_draw_while_the_block_runs():
    """The profile's power figure: NVML readings polled during the timed steps (one reading after them is
    the idle draw), mean and max; nothing when there is no reader or it fails."""
    import time

    from univigu_fast.profiling import PowerSampler

    readings = iter([300.0, 500.0, 400.0] + [400.0] * 1000)
    with PowerSampler(lambda: next(readings), interval=0.005) as power:
        time.sleep(0.1)
    got = power.summary()
    assert got["samples"] >= 3 and got["max_w"] == 500.0 and 300.0 < got["mean_w"] <= 500.0
    with PowerSampler(None) as power:
        pass
    assert power.summary() is None

    def broken():
        raise RuntimeError("NVML: not supported")

    with PowerSampler(broken, interval=0.005) as power:
        time.sleep(0.05)
    assert power.summary() is None and "not supported" in power.error


def test_profile_cli_embedding_flow_has_no_decode(tmp_path):
    """The embedding flow's text output is a velocity: no decode row, no decode FLOPs."""
    import json

    from typer.testing import CliRunner

    from univigu_fast.cli import app
    from univigu_fast.config import UniViGUConfig

    cfg = tmp_path / "config.json"
    UniViGUConfig.tiny(text_flow="embedding").save(cfg)
    result = CliRunner().invoke(app, ["profile", "--json", "--no-fast", "--config", str(cfg)])
    assert result.exit_code == 0, result.output[-2000:]
    doc = json.loads(result.output[result.output.index("{"):])
    assert "decode" not in doc["flops"] and doc["flops"]["attention"] > 0


def test_profile_cli_compares_fast_with_reference():
    """With both models, ``profile`` runs one step of each on the same weights and inputs and reports
    how far the fast model's outputs are from the reference's (and the text argmax agreement)."""
    import json

    from typer.testing import CliRunner

    from univigu_fast.cli import app

    result = CliRunner().invoke(app, ["profile", "--json", "--mode", "joint", "--layers", "1"])
    assert result.exit_code == 0, result.output[-2000:]
    doc = json.loads(result.output[result.output.index("{"):])
    cmp = doc["fast_vs_reference"]
    assert set(cmp) == {"video_velocity", "text"}
    for v in cmp.values():  # fp32 on CPU: the kernels' interpreter run against the PyTorch reference
        assert 0 <= v["max_abs_diff"] <= 1e-4 * v["max_abs_reference"] and v["max_abs_reference"] > 0.1
    assert cmp["text"]["argmax_agreement"] == 1.0


def test_compare_outputs_sees_a_difference():
    import torch

    from _models import tiny_reference
    from univigu_fast import profiling as P

    ref = tiny_reference()
    other = tiny_reference()  # same seed: the same weights, then two output biases moved
    with torch.no_grad():
        other.video_head.proj_out.bias += 0.5
        other.text_head.linear.bias.copy_(torch.randn(other.text_head.linear.bias.shape) * 10)
    inputs = P.make_inputs(P.TINY_SHAPE, ref.config, "joint", "cpu", torch.float32)
    same = P.compare_outputs(ref, ref, inputs)
    assert same["video_velocity"]["max_abs_diff"] == 0 and same["text"]["argmax_agreement"] == 1.0
    diff = P.compare_outputs(other, ref, inputs)
    assert abs(diff["video_velocity"]["max_abs_diff"] - 0.5) < 1e-4  # the bias shift, through unpatchify
    assert diff["text"]["max_abs_diff"] > 1 and diff["text"]["argmax_agreement"] < 1.0


def test_profiled_step_asks_the_text_head_what_the_samplers_do():
    """``profile`` / ``bench_model`` time one step as the samplers run it: the next ids sampled in joint and
    understanding, no text head in generation (its output is the clean prompt's, not used)."""
    import torch

    from _models import tiny_reference
    from univigu_fast import profiling as P

    model = tiny_reference()
    kinds = [P.text_head_kwargs(m, model.config)["text_output"] for m in P.MODES]
    assert kinds == ["sample", "sample", "none", "none"]  # the samplers' discrete decode draws the next ids
    assert P.text_head_kwargs("joint", tiny_reference(text_flow="embedding").config) == dict(text_output="full")
    calls = []
    model.text_head.linear.register_forward_hook(lambda *a: calls.append(1))
    for mode in P.MODES:
        out = P.step(model, P.make_inputs(P.TINY_SHAPE, model.config, mode, "cpu", torch.float32),
                     P.text_head_kwargs(mode, model.config))
        assert (out.text_out is None) == (mode in ("generation", "video"))
    assert not calls  # the fused decode reads the head's weight; the (N, V) logits are never formed
