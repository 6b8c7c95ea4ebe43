"""Where the demo's video generation fails: Euler from a partly noised true video (CPU).

For each start time ``tau0`` the held-out videos of a ``univigu-fast demo`` run are noised to
``z = (1 - tau0) z0 + tau0 z1`` (paper Eq. 2) and integrated to ``tau = 1`` by the generation
sampler's Euler rule (conditional pass, no guidance, clean brief-prompt text stream); the decoded
videos are read by the rule-based evaluator. ``tau0 = 0`` is plain generation from noise.

    python bench/cpu_demo_generation_probe.py --run runs/demo-discrete
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from univigu_fast import sampling
from univigu_fast import synthetic as S
from univigu_fast.demo import load_run


def foreground_pixels(pixels: torch.Tensor) -> int:
    """Pixels of frame 0 farther than 0.5 from the frame's median colour (``read_video``'s rule)."""
    frame = pixels[:, 0].reshape(3, -1)
    return int(((frame - frame.median(1).values[:, None]).norm(dim=0) > 0.5).sum())


@torch.no_grad()
def probe(model, data: S.SyntheticData, tau0: float, steps: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    B, vae = len(data.samples), S.SyntheticVAE()
    x = [(1 - tau0) * torch.randn(z.shape, generator=g) + tau0 * z for z in data.latents]
    taus = [tau0 + (1 - tau0) * i / steps for i in range(steps + 1)]
    text = sampling._clean_text(model, data.prompt_ids)
    for t, t_next in zip(taus[:-1], taus[1:]):
        v, _ = sampling._guided(model, x, torch.full((B,), t), list(data.prompt_embeds), None, 1.0, text=text,
                                tau_text=torch.ones(B))
        x = [xi + (t_next - t) * vi for xi, vi in zip(x, v)]
    pixels = [vae.decode(z) for z in x]
    reads = [S.read_video(p) for p in pixels]
    return dict(tau0=tau0, color_accuracy=S.mean(float(r["color"] == s.color) for r, s in zip(reads, data.samples)),
                direction_accuracy=S.mean(float(r["direction"] == s.direction) for r, s in zip(reads, data.samples)),
                foreground_pixels=S.mean(foreground_pixels(p) for p in pixels),
                true_foreground_pixels=S.mean(foreground_pixels(vae.decode(z)) for z in data.latents))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="output folder of `univigu-fast demo`")
    ap.add_argument("--tau0", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75])
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args()
    cfg, _, model, data = load_run(a.run)
    for tau0 in a.tau0:
        r = probe(model, data, tau0, a.steps, cfg.seed)
        print(f"from tau {tau0:.2f}: colour {r['color_accuracy']:.3f}  direction {r['direction_accuracy']:.3f}  "
              f"frame-0 foreground px {r['foreground_pixels']:.0f} (true {r['true_foreground_pixels']:.0f})", flush=True)


if __name__ == "__main__":
    main()
