"""Video-stream cache quality on CPU (issue 8): attribute accuracy and token agreement per policy.

Loads a trained demo model (a ``stage2/checkpoint.pt`` of ``univigu-fast demo`` or a ``save_pretrained``
folder) and the demo's held-out split as ``run_demo`` built it (``demo.load_run``; the ``DemoConfig``
comes from the run's ``metrics.json``) and captions
it with ``video_cache`` = off / every:4 / once at each requested step count, same seed per policy.
Token agreement = fraction of decoded tokens equal to the exact (``off``) decode with the same seed.
Seconds are CPU wall times of the sampling only (not a GPU figure).

    OMP_NUM_THREADS=1 nice -n 10 python bench/cpu_video_cache_quality.py --run /tmp/demo/d3 --steps 16 50
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from univigu_fast.demo import evaluate_understanding, load_run


@torch.no_grad()
def step_deviation(model, test, cfg, taus=(0.25, 0.5, 0.75), n: int = 32) -> list[dict]:
    """How far one text-only step on a ``once`` cache (captured at tau_text = 0 from the source
    tokens) is from the exact step, at text states ``x_tau`` (each token the true caption's with
    probability tau, else the source): max |logit difference|, mean total-variation distance of the
    softmax, fraction of equal argmax tokens."""
    from univigu_fast.video_cache import VideoCache

    g = torch.Generator().manual_seed(123)
    vids = [v.to(model.dtype) for v in test.latents[:n]]
    null = [test.null_prompt.to(model.dtype)] * len(vids)
    truth = [torch.as_tensor(t) for t in test.caption_ids[:n]]
    V = model.config.vocab_size
    source = [torch.randint(0, V, t.shape, generator=g) for t in truth]
    ones = torch.ones(len(vids))
    out = []
    cache = VideoCache(model)
    try:
        model(vids, ones, null, text=source, tau_text=torch.zeros(len(vids)), video_cache=cache)
        for tau in taus:
            x = [torch.where(torch.rand(t.shape, generator=g) < tau, t, s) for t, s in zip(truth, source)]
            tt = torch.full((len(vids),), tau)
            exact = torch.cat(model(vids, ones, null, text=x, tau_text=tt).text_out)[:, :V].float()
            cached = torch.cat(model.text_step(cache, x, tt))[:, :V].float()
            tv = 0.5 * (exact.softmax(-1) - cached.softmax(-1)).abs().sum(-1)
            out.append(dict(tau=tau, max_abs_logit_diff=float((exact - cached).abs().max()),
                            logit_scale=float(exact.abs().max()), mean_tv_distance=float(tv.mean()),
                            max_tv_distance=float(tv.max()),
                            argmax_agreement=float((exact.argmax(-1) == cached.argmax(-1)).float().mean())))
    finally:
        cache.release()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="demo output folder (its metrics.json has the DemoConfig)")
    ap.add_argument("--checkpoint", type=Path, default=None, help="default: RUN/stage2/checkpoint.pt")
    ap.add_argument("--steps", type=int, nargs="+", default=[16, 50])
    ap.add_argument("--policies", nargs="+", default=["every:4", "once"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg, saved, model, test = load_run(a.run, a.checkpoint)
    results = dict(run=str(a.run), config=saved["config"], n_test=len(test.samples),
                   saved_understanding_attribute_accuracy=saved.get("understanding_attribute_accuracy"), rows=[])
    for steps in a.steps:
        exact = evaluate_understanding(model, test, steps=steps, seed=cfg.seed, keep_ids=True,
                                       temperature=cfg.sampler_temperature)
        ids = exact.pop("ids")
        rows = [dict(policy="off", steps=steps, token_agreement=1.0, **exact)]
        for policy in a.policies:
            r = evaluate_understanding(model, test, steps=steps, seed=cfg.seed, video_cache=policy, reference_ids=ids,
                                       temperature=cfg.sampler_temperature)
            rows.append(dict(policy=policy, steps=steps, **r))
        for r in rows:
            print(f"steps {steps:3d} {r['policy']:>8}: attribute accuracy {r['attribute_accuracy']:.4f}  caption-only "
                  f"{r['caption_only_attribute_accuracy']:.4f}  token agreement {r['token_agreement']:.4f}  "
                  f"CPU {r['seconds']:.1f}s", flush=True)
        results["rows"] += [{k: v for k, v in r.items() if k != "examples"} for r in rows]
    if model.config.text_flow == "discrete":
        results["step_deviation_once"] = step_deviation(model, test, cfg)
        for r in results["step_deviation_once"]:
            print("one text-only step vs exact (cache from tau=0): " + ", ".join(f"{k} {v:.4g}" for k, v in r.items()))
    if a.out:
        a.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
