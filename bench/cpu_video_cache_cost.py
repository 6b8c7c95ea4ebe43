"""Video-stream cache cost (issue 8): FLOP estimate at the named GPU shapes, CPU timings at small ones.

1. ESTIMATE (no GPU involved): FLOPs of an exact understanding step vs a text-only cached step
   (``profiling.component_flops`` / ``video_cache.text_step_flops``), and the implied speed-up of a
   50-step caption per policy for a compute-bound model (time proportional to FLOPs). Also the
   text step's minimal memory traffic (``text_step_bytes``) for a roofline caveat.
2. CPU MEASUREMENT: wall time of a 50-step caption per policy with the reference model (fp32,
   ``--threads`` torch threads) at the tiny test config and at a small CPU shape where the video
   dominates the sequence, next to the same FLOP model's prediction for that shape.

    OMP_NUM_THREADS=1 nice -n 10 python bench/cpu_video_cache_cost.py
"""
from __future__ import annotations

import argparse
import time

import torch

from univigu_fast.config import UniViGUConfig
from univigu_fast.profiling import TINY_SHAPE, config_for, video_grid
from univigu_fast.reference import UniViGUModel
from univigu_fast.sampling import caption
from univigu_fast.shapes import SHAPES, BenchShape
from univigu_fast.video_cache import caption_cost, text_step_bytes

POLICIES = ("off", "every:4", "once")
# a CPU-sized shape with a video-dominated sequence (1560 video tokens, 2 x 30 x 26 grid, 32 text tokens)
CPU_SHAPE = BenchShape("cpu-small", (1560,), (32,), 16, 128, 512, 2, 64, 4)


def estimate(steps: int) -> None:
    print(f"ESTIMATE (FLOP count, not a measurement), {steps}-step caption:")
    for name in ("wan1.3b-480p", "wan1.3b-varlen"):
        s = SHAPES[name]
        c = config_for(s)
        off = caption_cost(s, c, steps, "off")
        print(f"  {name}: exact step {off['full_step_flops'] / 1e12:.1f} TFLOP, text-only step "
              f"{off['text_step_flops'] / 1e12:.2f} TFLOP ({off['full_step_flops'] / off['text_step_flops']:.0f}x fewer); "
              f"text step reads >= {text_step_bytes(s, c) / 1e9:.1f} GB (bf16 K/V of all rows + weights)")
        for p in POLICIES:
            r = caption_cost(s, c, steps, p)
            print(f"    {p:>8}: {r['full_steps']:2d} full + {r['text_steps']:2d} text steps = {r['flops'] / 1e12:8.1f} TFLOP"
                  f" -> compute-bound speed-up <= {off['flops'] / r['flops']:.2f}x")


def _inputs(shape: BenchShape, config: UniViGUConfig, g):
    pt, ph, pw = config.patch_size
    vids, prompts = [], []
    for i, lv in enumerate(shape.video_lens):
        f, h, w = video_grid(lv, shape.name, i) if shape.name == "tiny" else (2, 30, 26)
        vids.append(torch.randn(config.in_channels, f * pt, h * ph, w * pw, generator=g))
        prompts.append(torch.randn(shape.prompt_len, config.text_dim, generator=g))
    return vids, prompts


def cpu_timing(steps: int, reps: int) -> None:
    print(f"CPU MEASUREMENT (reference model, fp32, {torch.get_num_threads()} thread(s); not a GPU figure), "
          f"{steps}-step caption, median of {reps}:")
    for shape in (TINY_SHAPE, CPU_SHAPE):
        config = config_for(shape) if shape.name == "tiny" else UniViGUConfig(
            num_attention_heads=shape.num_heads, attention_head_dim=shape.head_dim, ffn_dim=shape.ffn_dim,
            num_layers=shape.num_layers, text_dim=32, freq_dim=64, vocab_size=1000)
        torch.manual_seed(0)
        model = UniViGUModel(config).eval()
        vids, prompts = _inputs(shape, config, torch.Generator().manual_seed(0))
        lens = list(shape.text_lens)
        base = None
        for p in POLICIES:
            caption(model, vids, prompts, lens, steps=2, video_cache=p)  # warm-up
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                caption(model, vids, prompts, lens, steps=steps, video_cache=p)
                ts.append(time.perf_counter() - t0)
            t = sorted(ts)[len(ts) // 2]
            base = base or t
            pred = caption_cost(shape, config, steps, "off")["flops"] / caption_cost(shape, config, steps, p)["flops"]
            print(f"  {shape.name} (video {list(shape.video_lens)}, text {lens}, dim {config.dim}, "
                  f"{config.num_layers} layers) {p:>8}: {t:7.3f} s  speed-up {base / t:5.2f}x  (FLOP model {pred:5.2f}x)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    estimate(a.steps)
    cpu_timing(a.steps, a.reps)


if __name__ == "__main__":
    main()
