"""Host (Python) time of one text-only step of the video cache (issue 8), measured on CPU.

A text-only step at wan1.3b-480p is ~2.4 TFLOP over ~30 layers of small launches: a few
milliseconds of GPU work, so the host's time to issue its ~400 kernel launches decides whether the
step is GPU- or host-bound. This script measures that host time without a GPU: the fast model with
the real layer count runs a text step in the Triton interpreter with every kernel launch counted and
skipped (the launchers, checks, autotune-free launch arithmetic and PyTorch glue all run; the
kernels' own work, which a GPU does asynchronously, does not). Tiny widths and one text token keep
the remaining PyTorch compute (the projections) near zero, so the time is the host's.

Not included: Triton's own launch cost per kernel (JIT argument binding and the driver call: a few
microseconds each on a GPU host) and the CUDA launch cost of the PyTorch ops.

``--graph``: the host's share of a step whose layers are replayed from a CUDA graph
(``VideoCache(cuda_graph=True)``): the layer loop is replaced by a copy of its input, standing for the
two input copies and the one replay launch; what remains is the time embedding and the decode head.

    OMP_NUM_THREADS=1 python bench/cpu_text_step_host.py [--layers 30] [--text-len 1] [--repeats 40] [--graph]
"""
from __future__ import annotations

import argparse
import collections
import os
import time

os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported

import torch  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from univigu_fast.config import UniViGUConfig  # noqa: E402
from univigu_fast.model import UniViGUModel  # noqa: E402
from univigu_fast.video_cache import VideoCache  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=30, help="wan1.3b has 30, wan14b 40")
    ap.add_argument("--text-len", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--graph", action="store_true", help="the host's share of a CUDA-graph-replayed step")
    args = ap.parse_args()
    torch.set_num_threads(1)

    launches = collections.Counter()
    run_kernel = InterpretedFunction.run
    skip = False

    def counted(self, *a, **k):
        launches[self.fn.__name__] += 1
        return None if skip else run_kernel(self, *a, **k)

    InterpretedFunction.run = counted
    cfg = UniViGUConfig.tiny(num_attention_heads=2, attention_head_dim=64, ffn_dim=256, num_layers=args.layers,
                             vocab_size=64)
    torch.manual_seed(0)
    model = UniViGUModel(cfg).eval()
    videos = [torch.randn(cfg.in_channels, 2, 8, 8)]
    prompts = [torch.randn(16, cfg.text_dim)]
    text = [torch.randint(0, cfg.vocab_size, (args.text_len,))]
    times = []
    with torch.no_grad():
        cache = VideoCache(model)  # a real full step fills the cache, a real text step warms up
        model(videos, torch.ones(1), prompts, text=text, tau_text=torch.tensor([0.1]), video_cache=cache,
              text_output="sample", sample_seed=0)
        model.text_step(cache, text, torch.tensor([0.2]), text_output="sample", sample_seed=1)
        launches.clear()
        skip = True
        if args.graph:
            cache.run_text_layers = lambda run, x, seg_temb: x.clone()
        for i in range(args.repeats):
            t0 = time.perf_counter()
            model.text_step(cache, text, torch.tensor([0.3]), text_output="sample", sample_seed=2 + i)
            times.append(time.perf_counter() - t0)
    InterpretedFunction.run = run_kernel
    times.sort()
    per_step = {k: v // args.repeats for k, v in launches.most_common()}
    print(f"text-only step{' (layers replayed from a CUDA graph)' if args.graph else ''}, {args.layers} layers, "
          f"{args.text_len} text token(s): host time min "
          f"{times[0] * 1e3:.1f} ms, median {times[len(times) // 2] * 1e3:.1f} ms over {args.repeats} steps; "
          f"{sum(per_step.values())} kernel launches per step")
    for name, n in per_step.items():
        print(f"  {name}: {n}")


if __name__ == "__main__":
    main()
