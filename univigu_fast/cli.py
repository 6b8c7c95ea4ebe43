"""``univigu-fast`` command line (typer)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(help="univigu-fast: fast Uni-ViGU (Wan2.1 + text stream) on Triton kernels.", no_args_is_help=True)


def _has_nvml() -> bool:
    """NVML's Python bindings (the ``[nvml]`` extra: nvidia-ml-py), which torch.cuda's power / memory readers use."""
    import importlib.util

    return importlib.util.find_spec("pynvml") is not None


def _nvml_memory() -> dict | None:
    """Memory used on the device (all processes), as NVML reports it, of the GPU this process uses
    (``torch.cuda`` maps ``CUDA_VISIBLE_DEVICES``; NVML's own index 0 is another GPU under it)."""
    import torch

    if not _has_nvml():
        return None
    try:
        return {"nvml_memory_used_bytes": int(torch.cuda.device_memory_used())}
    except Exception:  # NVML present but unusable (e.g. in a container): say nothing rather than guess
        return None


def _power_reader():
    """Watts drawn by this process's GPU now (NVML), or None without NVML."""
    import torch

    return (lambda: torch.cuda.power_draw() / 1000.0) if _has_nvml() else None


def _peak_rss_bytes() -> int | None:
    try:
        import resource
    except ImportError:  # not on POSIX
        return None
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


@app.command()
def profile(
    shape: str = typer.Option(None, help="DESIGN §6 shape: wan1.3b-480p, wan1.3b-varlen, wan14b-720p, or 'tiny'. "
                                          "Default: wan1.3b-480p on a GPU, tiny on CPU."),
    config: Optional[Path] = typer.Option(None, help="A UniViGUConfig JSON (e.g. a checkpoint's config.json) instead of the shape's model sizes."),
    mode: str = typer.Option("joint", help="joint | understanding | generation | video (no text stream)."),
    layers: Optional[int] = typer.Option(None, min=1, help="Override the number of layers (FLOPs and times scale linearly)."),
    dtype: str = typer.Option("bf16", help="bf16 | fp16 | fp32 (CPU always runs fp32)."),
    reference: bool = typer.Option(True, help="Profile the reference model (pure PyTorch), side by side."),
    fast: bool = typer.Option(True, help="Profile the fast model (Triton kernels; on CPU they run in the slow interpreter)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
):
    """Per-component FLOPs, latency, TFLOP/s, % of peak and peak memory of one denoising step, fast vs reference
    side by side, and how far apart their outputs are (same weights, same inputs)."""
    import torch

    # usage errors first (exit 2), before any model is built or the GPU's peak is measured
    if not (fast or reference):
        raise typer.BadParameter("nothing to profile: --no-fast and --no-reference together")
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if dtype not in dtypes:
        raise typer.BadParameter(f"expected one of {', '.join(dtypes)}, got {dtype!r}", param_hint="--dtype")
    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    if not on_gpu:  # the kernels run in Triton's interpreter on CPU (set before any kernel module is imported)
        os.environ.setdefault("TRITON_INTERPRET", "1")
        from .kernels._utils import quiet_interpreter_warnings

        quiet_interpreter_warnings()

    from . import profiling as P
    from .config import UniViGUConfig
    from .model import UniViGUModel
    from .reference import UniViGUModel as ReferenceModel
    if mode not in P.MODES:
        raise typer.BadParameter(f"expected one of {', '.join(P.MODES)}, got {mode!r}", param_hint="--mode")
    try:
        shape_obj = P.shape_by_name(shape or ("wan1.3b-480p" if on_gpu else "tiny"))
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--shape") from None
    if not on_gpu and shape_obj.name != "tiny":
        typer.echo(f"WARNING: --shape {shape_obj.name} without a GPU: each step of each model runs for minutes to "
                   "hours on CPU (the fast model in Triton's interpreter); --shape tiny is the CPU profile", err=True)
    from .cli_flow import _usage_errors

    # missing file, bad JSON, unknown or bad fields
    with _usage_errors("--config", f"cannot read a UniViGUConfig from {config}", (OSError, TypeError, ValueError)):
        cfg = UniViGUConfig.load(config, strict=True) if config else P.config_for(shape_obj)
    if layers is not None:
        cfg.num_layers = layers
    torch_dtype = dtypes[dtype] if on_gpu else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        fast_model = UniViGUModel(cfg).to(torch_dtype).eval()
    inputs = P.make_inputs(shape_obj, cfg, mode, device, torch_dtype)
    text_kwargs = P.text_head_kwargs(mode, cfg)
    flops = P.component_flops(shape_obj, cfg, mode, decode=P.decodes(text_kwargs))
    peak_tflops = None
    if on_gpu:  # the matmul peak of the run's dtype (a bf16 peak made fp32 runs look 10x below it)
        n = 8192
        a = torch.randn(n, n, device="cuda", dtype=torch_dtype)
        a @ a
        torch.cuda.synchronize()
        import time

        t0 = time.perf_counter()
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()
        peak_tflops = 10 * 2 * n**3 / (time.perf_counter() - t0) / 1e12
        del a

    # random weights; the text head starts at zero (as for training), so give it values: the decode
    # then picks ids from real logits and the fast/reference comparison below sees them
    with torch.no_grad():
        torch.nn.init.normal_(fast_model.text_head.linear.weight, std=cfg.dim**-0.5)
    results = {}
    models = [("triton", fast_model)] if fast else []
    if reference:
        with torch.device("meta"):  # no second set of weights: it takes the fast model's tensors
            ref = ReferenceModel(cfg)
        ref.load_state_dict(fast_model.state_dict(), assign=True)
        models.append(("reference", ref.eval()))
    for name, model in models:
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        comps = P.profile_components(model, inputs, text_kwargs, reps=5 if on_gpu else 3)
        instrumented = comps["total"]  # with a sync around every op
        with P.PowerSampler(_power_reader() if on_gpu else None) as power:  # the draw during the plain steps
            comps["total"] = P.time_step(model, inputs, text_kwargs, reps=5 if on_gpu else 1)  # plain step, median
        results[name] = {
            "seconds": comps,
            "power_w": power.summary(),
            "peak_mem_bytes": torch.cuda.max_memory_allocated() if on_gpu else None,
            "instrumented_total_seconds": instrumented,
            "process_peak_rss_bytes": _peak_rss_bytes(),  # the whole process so far: bounds both models on CPU
        }
    agreement = P.compare_outputs(fast_model, ref, inputs) if fast and reference else None
    total_flops = sum(flops.values())
    doc_dtype = str(torch_dtype).replace("torch.", "")
    doc = {
        "shape": shape_obj.name, "mode": mode, "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "dtype": doc_dtype, "layers": cfg.num_layers,
        "timings": "GPU" if on_gpu else "CPU (Triton interpreter: not representative of GPU speed)",
        **({"fast_kernel_path": fast_model.kernel_path()} if fast else {}),
        "peak_tflops_measured": peak_tflops, "peak_tflops_dtype": doc_dtype if peak_tflops else None,
        "seconds_note": "components: medians of op-by-op synchronised steps ('other' = the rest of such a step; "
                        "they add up to instrumented_total_seconds); total: the median plain step", "flops": {**flops, "total": total_flops}, "results": results,
        "fast_vs_reference": agreement,
        **({"nvml": _nvml_memory()} if on_gpu else {}),
    }
    if as_json:
        typer.echo(json.dumps(doc, indent=1))
        return
    typer.echo(f"univigu-fast profile: shape={shape_obj.name} mode={mode} layers={cfg.num_layers} "
               f"dtype={doc['dtype']} device={doc['device']}")
    if not on_gpu:
        typer.echo("NOTE: no GPU found - these are CPU timings" + (" of the tiny config" if shape_obj.name == "tiny" else "")
                   + (f" (fast model's kernels: {fast_model.kernel_path()})." if fast else "."))
    header = f"{'component':<16}{'GFLOP':>12}" + "".join(f"{n + ' ms':>18}{n + ' TF/s':>18}" for n, _ in models)
    show_peak = bool(peak_tflops) and "triton" in results
    if show_peak:
        header += f"{'% peak (triton)':>17}"
    typer.echo(header)
    for comp in ("attention", "cross_attention", "ffn", "glue", "decode", "other", "total"):
        if comp not in flops and comp != "total":
            continue
        fl = total_flops if comp == "total" else flops.get(comp, 0.0)
        line = f"{comp:<16}{fl / 1e9:>12.4f}"
        for name, _ in models:
            s = results[name]["seconds"].get(comp, 0.0)
            tf = fl / s / 1e12 if s > 0 and fl else 0.0
            line += f"{s * 1e3:>18.3f}{tf:>18.3f}"
        if show_peak:
            s = results["triton"]["seconds"].get(comp, 0.0)
            line += f"{(100 * fl / s / 1e12 / peak_tflops if s > 0 and fl else 0.0):>17.1f}"
        typer.echo(line)
    typer.echo("(components: median of op-by-op synchronised steps, 'other' = the rest of such a step; "
               "total: median plain step)")
    for name, _ in models:
        pm = results[name]["peak_mem_bytes"]
        if pm is not None:
            typer.echo(f"peak memory ({name}): {pm / 2**30:.2f} GiB")
    if not on_gpu and results[models[-1][0]]["process_peak_rss_bytes"]:
        typer.echo(f"peak memory (process RSS, CPU): {results[models[-1][0]]['process_peak_rss_bytes'] / 2**20:.1f} MiB")
    if doc.get("nvml"):
        typer.echo(f"NVML: device memory used {doc['nvml']['nvml_memory_used_bytes'] / 2**30:.2f} GiB")
    for name, _ in models:
        pw = results[name]["power_w"]
        if pw:
            typer.echo(f"power during the plain steps ({name}): mean {pw['mean_w']:.0f} W, max {pw['max_w']:.0f} W "
                       f"({pw['samples']} NVML readings)")
    if "reference" in results and "triton" in results:
        typer.echo(f"speed-up (reference / triton, total): {results['reference']['seconds']['total'] / results['triton']['seconds']['total']:.2f}x")
    if agreement:
        parts = [f"{name} max |diff| {v['max_abs_diff']:.3g} (reference max |value| {v['max_abs_reference']:.3g})"
                 + (f", argmax agrees on {100 * v['argmax_agreement']:.1f}% of tokens" if "argmax_agreement" in v else "")
                 for name, v in agreement.items()]
        typer.echo(f"fast vs reference, same weights and inputs ({doc['dtype']}): " + "; ".join(parts))


@app.command()
def version():
    """Print the installed version."""
    from . import __version__

    typer.echo(__version__)


from .cli_flow import register as _register_flow  # noqa: E402  train/caption/generate/joint/preprocess/demo

_register_flow(app)


if __name__ == "__main__":
    app()
