"""Does joint generation couple the caption to the video? (CPU, on a finished demo run.)

Both streams of a joint sample are conditioned on the brief prompt, which states colour and direction:
following the prompt makes caption and video agree on those without any coupling. The background is
not in the prompt, so caption and video agree on it more often than a caption and *another* sample's
video only if the streams inform each other. Re-runs the demo's joint evaluation (its settings and
seed, so ``joint_agreement`` reproduces the run's) and prints the metrics as JSON.

    python bench/cpu_joint_coupling.py --run runs/demo-discrete
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from univigu_fast.demo import evaluate_joint, load_run


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="output folder of `univigu-fast demo`")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg, saved, model, data = load_run(a.run)
    j = evaluate_joint(model, data, steps=cfg.gen_steps, shift=cfg.shift, guidance=cfg.guidance, seed=cfg.seed,
                       temperature=cfg.sampler_temperature)
    keys = ("joint_agreement", "joint_video_accuracy", "joint_background_agreement", "joint_background_agreement_shuffled")
    print(json.dumps(dict(run=str(a.run), text_flow=cfg.text_flow, n=len(data.samples),
                          saved_joint_agreement=saved.get("joint_agreement"), **{k: j[k] for k in keys}), indent=1))


if __name__ == "__main__":
    main()
