"""How much does classifier-free guidance change the video velocity? (CPU, demo-size model.)

Guidance ``v = v_u + g (v_c - v_u)`` acts only as far as the unconditional pass differs from the
conditional one. As in the public T2V script, the unconditional pass swaps the cross-attention prompt
for the empty one while the text stream keeps the prompt's ids, and condition dropout in training
drops only the cross-attention prompt; the prompt still reaches the video through the shared
self-attention. This trains the demo's model on generation alone (condition dropout 0.5) and reports
the mean ``|v_c - v_u| / |v_c|`` on held-out videos for that unconditional pass and for one whose text
stream is empty too (a pass the model was not trained on: an upper reference, not a recommendation).

    python bench/cpu_guidance_probe.py --steps 400
"""
from __future__ import annotations

import argparse
import json

import torch

from univigu_fast import synthetic as S
from univigu_fast.demo import DemoConfig
from univigu_fast.flow import FlowConfig
from univigu_fast.reference import UniViGUModel
from univigu_fast.training import TrainConfig, Trainer


@torch.no_grad()
def relative_gap(model, data: S.SyntheticData, taus=(0.1, 0.3, 0.5), n: int = 16, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    one = torch.ones(1)
    gaps = {"prompt_ids_kept": [], "text_stream_empty": []}
    for tau in taus:
        for i in range(min(n, len(data.samples))):
            z1 = data.latents[i]
            x = [(1 - tau) * torch.randn(z1.shape, generator=g) + tau * z1]
            t, ids = torch.tensor([tau]), data.prompt_ids[i]
            vc = model(x, t, [data.prompt_embeds[i]], text=[ids], tau_text=one).video_velocity[0]
            for name, text in (("prompt_ids_kept", ids), ("text_stream_empty", ids[:0])):
                vu = model(x, t, [data.null_prompt], text=[text], tau_text=one).video_velocity[0]
                gaps[name].append(float((vc - vu).norm() / vc.norm()))
    return {k: sum(v) / len(v) for k, v in gaps.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = DemoConfig()
    train_s, test_s = S.split_samples(512, 32, 0)
    train, test = (S.make_dataset(s, text_dim=cfg.text_dim, frames=cfg.frames, size=cfg.pixels) for s in (train_s, test_s))
    model = UniViGUModel(cfg.model_config(len(S.SyntheticTokenizer())))
    flow = FlowConfig(mode_mix={"generation": 1.0}, cond_dropout=0.5, loss_unit="element")
    Trainer(model, train, TrainConfig(stage=1, steps=a.steps, batch_size=16, lr=2e-3, warmup_steps=20, progress=False,
                                      flow=flow)).train()
    print(json.dumps(dict(steps=a.steps, **relative_gap(model.eval(), test)), indent=1))


if __name__ == "__main__":
    main()
