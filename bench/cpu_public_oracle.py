"""DESIGN §3 exactness oracle (b): our models against the public implementation's own forward, on CPU.

The public implementation (GitHub ``Fr0zenCrane/Uni-ViGU``, non-commercial licence) is not vendored
and not a dependency: point ``--public-repo`` at a local checkout of it (it carries its modified
diffusers, which this script imports from there; its own imports need ``pip install einops omegaconf``).
Nothing here downloads anything.

What runs: a tiny random ``WanTransformer3DModel`` of that diffusers, grown into the public
``WanUnifiedTransformer`` by its own constructor (``from_pretrained`` is redirected to the tiny model,
which is the constructor's only contact with the outside); every parameter then randomised so that
a swapped or shared module (``ffn`` / ``ffn_t``, ``time_embedding_v`` / ``_t``, the zero-initialised
heads) would show. Its ``state_dict`` goes through :func:`UniViGUModel.from_uni_vigu` (strict), and both
models run one forward on the same inputs: a batch of two videos with padded text (the public
``x_t_attention_mask``; ours: ``text_lens``), Wan's timesteps ``time_v = 1000 (1 - tau_v)``,
``time_t = round(1000 (1 - tau_t))``. Compared: our ``video_velocity`` with minus the public video
output (DESIGN §2: ``u = -`` Wan's output), our logits with the public logits at the real text
positions. Both our reference model and the fast model (Triton interpreter on CPU) are checked.

``--dtype float32``: the public time embedding rounds ``temb`` to bfloat16 whatever the model dtype
(its CUDA bf16 deployment); for an fp32 comparison that one cast is made the identity by handing its
module a ``torch`` whose ``bfloat16`` is ``float32`` (its code is not changed), and the tolerance is
fp32's. ``--dtype bfloat16``: both models in bf16 as published, compared against our fp32 reference on
the same weights: the public model's error must stay within a small multiple of our bf16 error.

    python bench/cpu_public_oracle.py --public-repo /path/to/Uni-ViGU [--dtype float32|bfloat16]
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import types
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # the fast model's kernels on CPU

import torch  # noqa: E402


def _public_modules(repo: Path):
    """Import the checkout's modified diffusers and its ``model.transformer`` (prepended to sys.path)."""
    if not (repo / "model" / "transformer.py").is_file() or not (repo / "diffusers").is_dir():
        raise SystemExit(f"--public-repo {repo}: expected model/transformer.py and diffusers/ of Fr0zenCrane/Uni-ViGU")
    sys.path.insert(0, str(repo))
    for name in [m for m in sys.modules if m == "diffusers" or m.startswith("diffusers.")]:
        del sys.modules[name]  # an installed diffusers imported earlier must not shadow the fork
    pub = importlib.import_module("model.transformer")
    wan = importlib.import_module("diffusers").WanTransformer3DModel
    if not str(Path(sys.modules["diffusers"].__file__)).startswith(str(repo)):
        raise SystemExit("could not import the checkout's diffusers fork")
    return pub, wan


class _Float32Torch(types.ModuleType):
    """``torch`` with ``bfloat16`` = ``float32``: the public module's hard-coded bf16 casts become no-ops."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        return torch.float32 if name == "bfloat16" else getattr(torch, name)


def build_public(pub, wan_cls, cfg, seed: int):
    """The public ``WanUnifiedTransformer`` grown from a tiny random Wan of ``cfg``'s sizes."""
    torch.manual_seed(seed)
    wan = wan_cls(**cfg.wan_config())
    original = pub.WanTransformer3DModel
    pub.WanTransformer3DModel = types.SimpleNamespace(from_pretrained=lambda *a, **k: wan)
    try:
        config = dict(hidden_size=cfg.dim, n_heads=cfg.num_attention_heads, cond_dim=cfg.dim, n_blocks=cfg.num_layers,
                      dropout=0.0, length=64)
        model = pub.WanUnifiedTransformer(vocab_size=cfg.vocab_size, masked=False, config=config, ckpt_path="unused")
    finally:
        pub.WanTransformer3DModel = original
    with torch.no_grad():  # nothing left at its (zero / copied / one) initialisation
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 0.1) + (1.0 if "norm" in name else 0.0))
    return model.eval()


def _max_diff(video_a, text_a, video_b, text_b, text_lens) -> tuple[float, float]:
    """Max |a - b| of two video velocities and of two logit tensors at the real text positions."""
    dv = (video_a.float() - video_b.float()).abs().max().item()
    dtxt = max((text_a[i, :n].float() - text_b[i, :n].float()).abs().max().item() for i, n in enumerate(text_lens))
    return dv, dtxt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--public-repo", type=Path, required=True)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

    from univigu_fast.config import UniViGUConfig
    from univigu_fast.model import UniViGUModel as FastModel
    from univigu_fast.reference import UniViGUModel as ReferenceModel

    pub, wan_cls = _public_modules(args.public_repo.resolve())
    if args.dtype == "float32":
        pub.torch = _Float32Torch()
    cfg = UniViGUConfig.tiny(num_layers=2, attention_head_dim=16, num_attention_heads=4, vocab_size=97)
    public = build_public(pub, wan_cls, cfg, args.seed)
    state = public.state_dict()
    reference = ReferenceModel.from_uni_vigu({"model": state})  # strict: no missing / unexpected key

    g = torch.Generator().manual_seed(args.seed + 1)
    B, N, L = 2, 11, 7
    text_lens = [N, 6]
    video = torch.randn(B, cfg.in_channels, 3, 6, 8, generator=g)
    ids = torch.randint(0, cfg.vocab_size, (B, N), generator=g)
    prompt = torch.randn(B, L, cfg.text_dim, generator=g)
    mask = torch.arange(N)[None, :] < torch.tensor(text_lens)[:, None]
    dt = getattr(torch, args.dtype)
    # (the fast model in bf16 is not checked here: the Triton interpreter's bf16 tl.dot is broken, DESIGN §7;
    # reference_fp32 runs on the same, possibly bf16-rounded, weights)
    models = [("reference", reference, dt), ("reference_fp32", reference, torch.float32)]
    if args.dtype == "float32":
        models.insert(1, ("fast", FastModel.from_uni_vigu({"model": state}), torch.float32))
    for tau_v, tau_t in [(0.75, 0.5), (1.0, 0.0), (0.125, 1.0)]:  # Wan times 250/500, 0/1000, 875/0
        time_v = torch.full((B,), 1000.0 * (1 - tau_v))
        time_t = torch.round(torch.full((B,), 1000.0 * (1 - tau_t)))
        with torch.no_grad():
            pv, pt = public.to(dt)(video.to(dt), ids, time_v, time_t, prompt.to(dt), mask)
            pv = -pv.float()  # DESIGN §2: our velocity u is minus Wan's output
            outs = {name: model.to(model_dt)(video.to(model_dt), torch.full((B,), tau_v), list(prompt.to(model_dt)),
                                             text=ids, tau_text=torch.full((B,), tau_t), text_lens=text_lens)
                    for name, model, model_dt in models}
        exact = outs.pop("reference_fp32")
        for name, o in outs.items():
            dv, dtxt = _max_diff(o.video_velocity, o.text_out, pv, pt, text_lens)
            print(f"tau_v={tau_v} tau_t={tau_t} {name:9s} {args.dtype}: max |video diff| {dv:.2e}, "
                  f"max |logit diff| {dtxt:.2e} (scales {pv.abs().max():.2f}, {pt.float().abs().max():.2f})")
            if args.dtype == "float32":
                assert dv < 1e-4 and dtxt < 1e-4, f"{name}: the fp32 forward differs from the public one ({dv}, {dtxt})"
        if args.dtype == "bfloat16":  # the public bf16 error against our fp32 forward vs ours
            pub_err = _max_diff(pv, pt, exact.video_velocity, exact.text_out, text_lens)
            own_err = _max_diff(outs["reference"].video_velocity, outs["reference"].text_out, exact.video_velocity,
                                exact.text_out, text_lens)
            print(f"  bf16 error vs our fp32 forward: public video {pub_err[0]:.2e} / text {pub_err[1]:.2e}, "
                  f"ours video {own_err[0]:.2e} / text {own_err[1]:.2e}")
            assert pub_err[0] <= 3 * own_err[0] + 1e-2 and pub_err[1] <= 3 * own_err[1] + 1e-2, (pub_err, own_err)
    print("OK: same forward as the public implementation on the same weights")


if __name__ == "__main__":
    main()
