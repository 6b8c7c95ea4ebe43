"""Shared by ``univigu-fast profile`` and ``bench/bench_model.py``: named-shape inputs, analytic FLOPs
per component, and a per-op timer around an ``Ops`` object.

Components: ``attention`` (self-attention core), ``cross_attention`` (core), ``ffn`` (routed FFN),
``glue`` (modulated LayerNorm, gated residual, q/k RMSNorm), ``decode`` (fused text decoding),
``other``: in time the rest of the step (projections, embeddings, heads); in FLOPs the blocks'
self-attention q/k/v/o and cross-attention q/k/v/o projections only (the patch / prompt / time
embeddings and the video head add < 0.01% at wan1.3b-480p and are not counted).
"""
from __future__ import annotations

import dataclasses
import time
from collections import defaultdict

import torch

from .config import UniViGUConfig
from .ops import Ops
from .shapes import SHAPES, BenchShape

MODES = ("joint", "understanding", "generation", "video")

TINY_SHAPE = BenchShape("tiny", (3 * 4 * 6, 1 * 2 * 2), (12, 0), 7, 32, 64, 2, 16, 2)
_TINY_GRIDS = [(3, 4, 6), (1, 2, 2)]


def config_for(shape: BenchShape) -> UniViGUConfig:
    if shape.name == "tiny":
        return UniViGUConfig.tiny()
    return UniViGUConfig(num_attention_heads=shape.num_heads, attention_head_dim=shape.head_dim, ffn_dim=shape.ffn_dim,
                         num_layers=shape.num_layers)


def video_grid(n_tokens: int, shape_name: str, index: int) -> tuple[int, int, int]:
    """A post-patch (f, h, w) grid with exactly ``n_tokens`` tokens (480p: 21 x 30 x 52; 720p: 21 x 45 x 80)."""
    if shape_name == "tiny":
        return _TINY_GRIDS[index]
    for h, w in ((30, 52), (45, 80), (30, 13), (16, 16), (30, 26)):
        if n_tokens % (h * w) == 0:
            return (n_tokens // (h * w), h, w)
    raise ValueError(f"no grid for {n_tokens} video tokens")


def make_inputs(shape: BenchShape, config: UniViGUConfig, mode: str, device, dtype, seed: int = 0):
    """Model inputs for one denoising step of ``mode`` at ``shape`` (lists: packed batches of any sizes)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    g = torch.Generator(device="cpu").manual_seed(seed)
    pt, ph, pw = config.patch_size
    videos, prompts, texts = [], [], []
    for i, (lv, lt) in enumerate(zip(shape.video_lens, shape.text_lens)):
        f, h, w = video_grid(lv, shape.name, i)
        videos.append(torch.randn(config.in_channels, f * pt, h * ph, w * pw, generator=g).to(device, dtype))
        prompts.append(torch.randn(shape.prompt_len, config.text_dim, generator=g).to(device, dtype))
        if config.text_flow == "discrete":
            texts.append(torch.randint(0, config.vocab_size, (lt,), generator=g).to(device))
        else:
            texts.append(torch.randn(lt, config.dim, generator=g).to(device, dtype))
    B = shape.batch
    tau_v = torch.ones(B) if mode == "understanding" else torch.rand(B, generator=g)
    tau_t = torch.ones(B) if mode == "generation" else torch.rand(B, generator=g)
    kwargs = dict(video_latents=videos, tau_video=tau_v, encoder_hidden_states=prompts)
    if mode != "video":
        kwargs.update(text=texts, tau_text=tau_t)
    return kwargs


def component_flops(shape: BenchShape, config: UniViGUConfig, mode: str, decode: bool = False) -> dict[str, float]:
    """Forward FLOPs per component for one step (multiply-add = 2 FLOPs)."""
    text = [0] * shape.batch if mode == "video" else list(shape.text_lens)
    seq = [v + t for v, t in zip(shape.video_lens, text)]
    T, P, d, L = sum(seq), shape.prompt_len * shape.batch, config.dim, config.num_layers
    flops = {
        "attention": L * 4 * sum(s * s for s in seq) * d,
        "cross_attention": L * 4 * sum(s * shape.prompt_len for s in seq) * d,
        "ffn": L * 4 * T * d * config.ffn_dim,
        "glue": 0.0,
        "other": L * (2 * T * d * d * 4 + 2 * T * d * d * 2 + 2 * P * d * d * 2),
    }
    if decode:
        flops["decode"] = 2 * sum(text) * config.text_out_dim * d
    return flops


class TimedOps:
    """Wraps an ``Ops`` so each call is timed (synchronised) and booked to its component."""

    def __init__(self, ops: Ops):
        self.inner = ops
        self.seconds: dict[str, float] = defaultdict(float)

    def _wrap(self, fn, component_of):
        def timed(*args, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.seconds[component_of(args, kwargs)] += time.perf_counter() - t0
            return out
        return timed

    def ops(self) -> Ops:
        o = self.inner

        def attention_kind(args, kwargs):
            return "attention" if kwargs.get("rope_q") is not None else "cross_attention"

        return dataclasses.replace(
            o, name=o.name + "+timed",
            modulated_layer_norm=self._wrap(o.modulated_layer_norm, lambda a, k: "glue"),
            gated_residual=self._wrap(o.gated_residual, lambda a, k: "glue"),
            rms_norm=self._wrap(o.rms_norm, lambda a, k: "glue"),
            attention=self._wrap(o.attention, attention_kind),
            modality_ffn=self._wrap(o.modality_ffn, lambda a, k: "ffn"),
            linear_argmax=self._wrap(o.linear_argmax, lambda a, k: "decode"),
            linear_cross_entropy=self._wrap(o.linear_cross_entropy, lambda a, k: "decode"),
        )


class PowerSampler:
    """The mean and max of ``read()`` (watts) polled every ``interval`` seconds in a thread while the block
    runs: the GPU's draw during the timed steps (NVML averages over up to 1 s, so one reading after a
    run is the idle draw). ``summary()``: ``{"mean_w", "max_w", "samples"}``, or None when ``read`` is
    None, failed, or the block was too short for a sample."""

    def __init__(self, read, interval: float = 0.05):
        import threading

        self.read, self.interval = read, interval
        self.samples: list[float] = []
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        while not self._stop.wait(self.interval):
            try:
                self.samples.append(float(self.read()))
            except Exception as e:  # noqa: BLE001 -- NVML unusable (e.g. in a container): report nothing
                self.error = f"{type(e).__name__}: {e}"
                return

    def __enter__(self):
        if self.read is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.read is not None:
            self._stop.set()
            self._thread.join()

    def summary(self) -> dict | None:
        if self.read is None or self.error or not self.samples:
            return None
        return {"mean_w": sum(self.samples) / len(self.samples), "max_w": max(self.samples), "samples": len(self.samples)}


def text_head_kwargs(mode: str, config: UniViGUConfig) -> dict:
    """What one step of ``mode`` asks of the text head, as the samplers do: a sample of the next ids from
    the fused decode (joint, understanding: ``text_output="sample"``, a fixed seed; the embedding flow's
    velocity is its output), nothing in generation (the clean prompt text's output is not used) or
    without a text stream. (A guided joint step adds an unconditional pass with ``"none"``.)"""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode in ("generation", "video"):
        return dict(text_output="none")
    return dict(text_output="sample", sample_seed=0) if config.text_flow == "discrete" else dict(text_output="full")


def decodes(text_kwargs: dict) -> bool:
    """Whether a step with ``text_kwargs`` runs the fused decode (the ``decode`` FLOPs of ``component_flops``)."""
    return text_kwargs["text_output"] in ("argmax", "sample")


def step(model, inputs: dict, text_kwargs: dict):
    with torch.no_grad():
        return model(**inputs, **text_kwargs)


def time_step(model, inputs: dict, text_kwargs: dict, reps: int = 3) -> float:
    """Median seconds of one synchronised forward step."""
    times = []
    for _ in range(reps + 1):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(model, inputs, text_kwargs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times = sorted(times[1:])
    return times[len(times) // 2]


def profile_components(model, inputs: dict, text_kwargs: dict, reps: int = 3) -> dict[str, float]:
    """Seconds per component in one step: ops timed one by one over ``reps`` instrumented steps (after a
    warm-up), the median per component; ``other`` is the rest of the median instrumented step."""
    timed = TimedOps(type(model).ops)
    model.ops = timed.ops()
    runs = []
    try:
        step(model, inputs, text_kwargs)  # warm-up (compiles / autotunes)
        for _ in range(max(reps, 1)):
            timed.seconds.clear()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step(model, inputs, text_kwargs)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            runs.append({**timed.seconds, "total": time.perf_counter() - t0})
    finally:
        del model.ops  # back to the class's ops

    def median(xs):
        xs = sorted(xs)
        return xs[len(xs) // 2]

    out = {k: median([r.get(k, 0.0) for r in runs]) for k in runs[0]}
    total = out.pop("total")
    out["other"] = max(total - sum(out.values()), 0.0)
    out["total"] = total
    return out


def shape_by_name(name: str) -> BenchShape:
    if name == "tiny":
        return TINY_SHAPE
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}: expected 'tiny' or one of {sorted(SHAPES)}")
    return SHAPES[name]


def cast_inputs(inputs: dict, dtype: torch.dtype) -> dict:
    """Model keyword inputs with every floating tensor (also inside lists) cast to ``dtype``."""
    def cast(t):
        return t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    return {k: [cast(t) for t in v] if isinstance(v, list) else v for k, v in inputs.items()}


def flat_outputs(out) -> torch.Tensor:
    """One fp32 vector of a model output: a tensor, per-sample tensors, or a ``UniViGUOutput`` (its
    video velocity, then its text output where there is one)."""
    if hasattr(out, "video_velocity"):
        return torch.cat([flat_outputs(t) for t in (out.video_velocity, out.text_out) if t is not None])
    parts = [out] if isinstance(out, torch.Tensor) else list(out)
    return torch.cat([t.float().flatten() for t in parts]) if parts else torch.zeros(0)


def compare_outputs(fast, reference, inputs: dict) -> dict:
    """One step of both models on the same inputs (``text_output="full"``; they share weights in
    ``univigu-fast profile``): per output, the max |fast - reference| and, for scale, the reference's
    max |value|; for discrete text, the share of text tokens whose logits' argmax agree."""
    with torch.no_grad():
        want, got = reference(**inputs), fast(**inputs)
    res = {}
    for name, a, b in (("video_velocity", want.video_velocity, got.video_velocity),
                       ("text", want.text_out, got.text_out)):
        if a is None:
            continue
        fa, fb = flat_outputs(a), flat_outputs(b)
        if not fa.numel():
            continue
        res[name] = {"max_abs_diff": (fb - fa).abs().max().item(), "max_abs_reference": fa.abs().max().item()}
    if "text" in res and reference.config.text_flow == "discrete":
        ids_a = torch.cat([t.argmax(-1).flatten() for t in want.text_out])
        ids_b = torch.cat([t.argmax(-1).flatten() for t in got.text_out])
        res["text"]["argmax_agreement"] = (ids_a == ids_b).float().mean().item()
    return res
