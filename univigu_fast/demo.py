"""``univigu-fast demo``: proof on the synthetic shapes task that the uni-flow learns (issue 3, item 6).

Pipeline (``run_demo``): build a held-out split of the synthetic task (``synthetic.split_samples``:
no test attribute combination occurs in training), train a tiny ``UniViGUModel`` from scratch with
Stage 1 (Knowledge Recall: target = the brief prompt) then Stage 2 (Capability Refinement: target
= the detailed caption, conditioned on the brief prompt), and evaluate on the held-out samples:

* **understanding** (``evaluate_understanding``): caption the clean video (``tau_video = 1``)
  conditioned on the empty prompt (the condition-dropout case, so the caption comes from the video
  alone); fraction of attributes stated correctly, over all seven and over the four caption-only ones
  (size, speed, start position, background). Run after Stage 1 as well (with the Stage-1 target
  length, the prompt's): Stage 1, trained to write the prompt, does not state caption-only attributes.
* **generation** (``evaluate_generation``): video from the brief prompt (Euler, Wan flow shift,
  CFG with the empty prompt), decoded by the synthetic VAE and read by the rule-based evaluator;
  fraction of videos whose dominant colour and motion direction both match the prompt.
* **joint** (``evaluate_joint``): video and caption from noise together, conditioned on the prompt
  (captions sampled at the understanding's temperature); mean agreement of the caption's
  colour/direction with what the video shows (both are stated by the prompt: following it is enough),
  and the coupling measure: agreement on the background, which the prompt does not state, beside the
  same agreement of each caption with every other sample's video (the level without coupling).

Generation and joint are conditioned on the brief prompt alone (colour, shape, direction: 72
triples, all of which occur in training); what is held out for them is the video, not the prompt.

The demo's model is trained from scratch, so its learning rates are higher than the paper's
fine-tuning defaults (``DemoConfig.lr1/lr2``; the trainer's defaults stay 2e-4 / 5e-5).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import sampling
from . import synthetic as S
from .config import UniViGUConfig
from .flow import FlowConfig
from .training import Trainer, TrainConfig


@dataclass
class DemoConfig:
    seed: int = 0
    text_flow: str = "discrete"
    n_train: int = 1536
    n_test: int = 64
    # model (tiny): dim = heads x head_dim
    # 8 heads x 24 = dim 192: with 2 x 32 (an earlier default) the text rows pooled the video as a bag
    # of tokens and direction / speed / start position stayed at chance (more heads = more pooling
    # patterns); dim 192 >= the 16 x 3 x 2 x 2 = 192 values of a (3, 2, 2) patch, where dim 64 squeezed
    # every token's velocity through rank 64 (video loss 0.88 vs 0.38). Understanding-only proxy,
    # 1500 steps, held-out: 8 x 8 0.80, 8 x 24 0.95 of attributes.
    heads: int = 8
    head_dim: int = 24
    layers: int = 2
    # (t, h, w) patch on the latents: t = frames puts all frames of a 4 x 4 pixel area in one token,
    # so motion is in a token's content (16 video tokens instead of 48, also faster)
    patch: tuple = (3, 2, 2)
    ffn_dim: int = 256
    text_dim: int = 32
    frames: int = 3
    pixels: int = 16  # latents (16, frames, pixels/2, pixels/2)
    # training
    batch_size: int = 16
    steps1: int = 1200
    steps2: int = 3200
    lr1: float = 2e-3
    lr2: float = 1e-3
    warmup: int = 50
    cond_dropout: float = 0.5
    mode_mix: dict = field(default_factory=lambda: {"joint": 1.0, "understanding": 3.0, "generation": 2.0})
    # per-element squared errors (FlowConfig.loss_unit): a video token of this task holds 192 latent values,
    # and the per-token mean of DESIGN §4 weights video 192 x more against the captions; measured (seed 0):
    # understanding 0.612 (discrete) / 0.607 (embedding) with "token" vs 0.926 / 0.647 with "element" (at
    # 2626013; the committed embedding run gives 0.658)
    loss_unit: str = "element"
    # sampling
    caption_steps: int = 16
    caption_temperature: float = 0.1  # x1_hat ~ softmax(logits / T) in the discrete caption sampler

    @property
    def sampler_temperature(self) -> float:
        """What the samplers get: the embedding flow samples nothing (its text follows its velocity)."""
        return self.caption_temperature if self.text_flow == "discrete" else 1.0
    gen_steps: int = 20
    shift: float = 1.0
    guidance: float = 3.0
    threads: int = 0  # torch threads (0: leave as is)

    def model_config(self, vocab_size: int) -> UniViGUConfig:
        return UniViGUConfig(patch_size=tuple(self.patch), num_attention_heads=self.heads, attention_head_dim=self.head_dim,
                             in_channels=16, out_channels=16, text_dim=self.text_dim, freq_dim=64, ffn_dim=self.ffn_dim,
                             num_layers=self.layers, vocab_size=vocab_size, text_flow=self.text_flow)


def _chunks(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


# ---------------------------------------------------------------------------- evaluators
# video-stream cache policies the demo evaluates next to the exact caption (metrics.json key suffix, policy)
CACHED_POLICIES = (("once", "once"), ("every4", "every:4"))

def evaluate_understanding(model, data: S.SyntheticData, *, text_len: int | None = None, steps: int = 16,
                           seed: int = 0, batch: int = 64, condition: str = "null", tokenizer=None,
                           caption_fn=None, reference_ids=None, keep_ids: bool = False, **sampler_kwargs) -> dict:
    """Caption the clean videos of ``data`` and score the attributes stated in the decoded text.

    ``text_len``: tokens to generate (default: the detailed caption's length); ``condition``:
    ``"null"`` (empty prompt, captions from the video alone) or ``"prompt"`` (the brief prompt);
    ``caption_fn``: the sampler (default ``sampling.caption``), called as
    ``caption_fn(model, videos, prompts, lens, steps=, seed=, **sampler_kwargs)`` so a caller can
    evaluate other sampler options (e.g. ``video_cache="once"``). Returns ``attribute_accuracy``,
    ``caption_only_attribute_accuracy``, ``prompt_attribute_accuracy``, ``per_attribute``, a few
    ``examples`` and ``seconds`` (sampling wall time); with ``keep_ids`` also ``ids`` (the decoded
    token ids, one list per sample); with ``reference_ids`` (such a list, e.g. the exact sampler's
    with the same seed) also ``token_agreement``: the fraction of decoded tokens equal to it.
    """
    tok = tokenizer or S.SyntheticTokenizer()
    fn = caption_fn or sampling.caption
    n = len(data.samples)
    L = text_len if text_len is not None else len(data.caption_ids[0])
    dev, dtype = model.device, model.dtype
    texts, all_ids = [], []
    model.eval()
    t0 = time.time()
    for sl in _chunks(n, batch):
        vids = [v.to(dev, dtype) for v in data.latents[sl]]
        prompts = ([data.null_prompt.to(dev, dtype)] * len(vids) if condition == "null"
                   else [p.to(dev, dtype) for p in data.prompt_embeds[sl]])
        ids = fn(model, vids, prompts, [L] * len(vids), steps=steps, seed=seed + sl.start, **sampler_kwargs)
        all_ids += [torch.as_tensor(i).cpu().tolist() for i in ids]
        texts += [tok.decode(i.cpu()) for i in ids]
    seconds = time.time() - t0
    scores = [S.attribute_scores(t, s) for t, s in zip(texts, data.samples)]
    per = {a: S.mean(sc[a] for sc in scores) for a in S.ATTRIBUTES}
    res = dict(attribute_accuracy=S.mean(per.values()),
               caption_only_attribute_accuracy=S.mean(per[a] for a in S.CAPTION_ONLY_ATTRIBUTES),
               prompt_attribute_accuracy=S.mean(per[a] for a in S.PROMPT_ATTRIBUTES),
               per_attribute=per, examples=[dict(truth=s.caption, decoded=t) for s, t in zip(data.samples[:4], texts[:4])],
               seconds=seconds)
    if reference_ids is not None:
        res["token_agreement"] = token_agreement(all_ids, reference_ids)
    if keep_ids:
        res["ids"] = all_ids
    return res


def token_agreement(ids, reference_ids) -> float:
    """Fraction of token positions where ``ids`` equals ``reference_ids`` (lists of per-sample id lists
    or tensors of the same lengths), pooled over all samples."""
    if len(ids) != len(reference_ids):
        raise ValueError(f"ids has {len(ids)} samples but reference_ids has {len(reference_ids)}")
    same = total = 0
    for a, b in zip(ids, reference_ids):
        a, b = torch.as_tensor(a).cpu().view(-1), torch.as_tensor(b).cpu().view(-1)
        if a.shape != b.shape:
            raise ValueError(f"decoded lengths differ: {tuple(a.shape)} vs reference {tuple(b.shape)}")
        same += int((a == b).sum())
        total += a.numel()
    return same / total if total else 1.0


def evaluate_generation(model, data: S.SyntheticData, *, steps: int = 20, shift: float = 1.0, guidance: float = 3.0,
                        seed: int = 0, batch: int = 64, vae: S.SyntheticVAE | None = None) -> dict:
    """Generate a video per brief prompt; fraction whose dominant colour and direction match."""
    vae = vae or S.SyntheticVAE()
    dev, dtype = model.device, model.dtype
    shape = tuple(data.latents[0].shape)
    reads = []
    model.eval()
    for sl in _chunks(len(data.samples), batch):
        lat = sampling.generate(model, [p.to(dev, dtype) for p in data.prompt_embeds[sl]], data.prompt_ids[sl], shape,
                                null_prompt=data.null_prompt.to(dev, dtype), steps=steps, shift=shift, guidance=guidance,
                                seed=seed + sl.start)
        reads += [S.read_video(vae.decode(x.float().cpu())) for x in lat]
    col = [float(r["color"] == s.color) for r, s in zip(reads, data.samples)]
    dirn = [float(r["direction"] == s.direction) for r, s in zip(reads, data.samples)]
    both = [c * d for c, d in zip(col, dirn)]
    return dict(generation_accuracy=S.mean(both), color_accuracy=S.mean(col), direction_accuracy=S.mean(dirn))


def evaluate_joint(model, data: S.SyntheticData, *, steps: int = 20, shift: float = 1.0, guidance: float = 3.0,
                   seed: int = 0, batch: int = 64, text_len: int | None = None, vae: S.SyntheticVAE | None = None,
                   tokenizer=None, temperature: float = 1.0) -> dict:
    """Joint generation from the prompts; caption-video agreement on colour and direction, how often
    the joint video itself matches the prompt, and the agreement on the background (not in the prompt)
    of each caption with its own video and, as the control, with the other samples' videos."""
    vae = vae or S.SyntheticVAE()
    tok = tokenizer or S.SyntheticTokenizer()
    L = text_len if text_len is not None else len(data.caption_ids[0])
    dev, dtype = model.device, model.dtype
    shape = tuple(data.latents[0].shape)
    agree, match, examples, said_bg, seen_bg = [], [], [], [], []
    model.eval()
    for sl in _chunks(len(data.samples), batch):
        lat, ids = sampling.joint(model, [p.to(dev, dtype) for p in data.prompt_embeds[sl]], shape,
                                  [L] * (sl.stop - sl.start), null_prompt=data.null_prompt.to(dev, dtype), steps=steps,
                                  shift=shift, guidance=guidance, seed=seed + sl.start, temperature=temperature)
        for x, i, s in zip(lat, ids, data.samples[sl]):
            pix = vae.decode(x.float().cpu())
            text = tok.decode(i.cpu())
            agree.append(S.agreement(text, pix))
            seen = S.read_video(pix)
            said_bg.append(S.parse_caption(text)["background"])
            seen_bg.append(seen["background"])
            match.append(float(seen["color"] == s.color and seen["direction"] == s.direction))
            if len(examples) < 4:
                examples.append(dict(prompt=s.prompt, caption=text, video=seen))
    own, others = background_agreement(said_bg, seen_bg)
    return dict(joint_agreement=S.mean(agree), joint_video_accuracy=S.mean(match), joint_background_agreement=own,
                joint_background_agreement_shuffled=others, examples=examples)


def background_agreement(said: list, seen: list) -> tuple[float, float]:
    """Fraction of captions whose stated background is the one their own video shows, and the same over
    every caption paired with every *other* video (the level the two streams' marginals give without
    any coupling). ``said``: per caption the parsed background (None when not stated)."""
    own = S.mean(float(a is not None and a == b) for a, b in zip(said, seen))
    others = S.mean(float(a is not None and a == b) for i, a in enumerate(said) for j, b in enumerate(seen) if i != j)
    return own, others


# ---------------------------------------------------------------------------- the demo
def _dataset(cfg: DemoConfig, samples: list) -> S.SyntheticData:
    """``samples`` (from ``S.split_samples``) rendered and encoded at ``cfg``'s sizes."""
    return S.make_dataset(samples, text_dim=cfg.text_dim, frames=cfg.frames, size=cfg.pixels)


def load_run(run: str | Path, checkpoint: str | Path | None = None):
    """A finished ``run_demo`` output folder: ``(DemoConfig, saved metrics, model in eval mode, held-out
    data)``. The config comes from ``run/metrics.json``; the model from ``checkpoint`` (a trainer
    ``checkpoint.pt`` or a ``save_pretrained`` folder; default ``run/stage2/checkpoint.pt``); the
    held-out split is rebuilt exactly as ``run_demo`` built it."""
    from .reference import UniViGUModel

    run = Path(run)
    saved = json.loads((run / "metrics.json").read_text())
    cfg = DemoConfig(**{k: v for k, v in saved["config"].items() if k in DemoConfig.__dataclass_fields__})
    path = Path(checkpoint) if checkpoint is not None else run / "stage2" / "checkpoint.pt"
    if path.is_dir():
        model = UniViGUModel.from_pretrained(path)
    else:
        ck = torch.load(path, map_location="cpu", weights_only=False)
        model = UniViGUModel(UniViGUConfig.from_dict(ck["model_config"]))
        model.load_state_dict(ck["model"])
    _, test_samples = S.split_samples(cfg.n_train, cfg.n_test, cfg.seed)
    return cfg, saved, model.eval(), _dataset(cfg, test_samples)


def run_demo(cfg: DemoConfig, out: str | Path, *, progress: bool = True, log=print) -> dict:
    """Data, Stage 1, Stage 2, evaluation; writes ``out/metrics.json`` and returns the metrics."""
    t_start = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tok = S.SyntheticTokenizer()
    train_s, test_s = S.split_samples(cfg.n_train, cfg.n_test, cfg.seed)
    train, test = _dataset(cfg, train_s), _dataset(cfg, test_s)
    from .reference import UniViGUModel

    torch.manual_seed(cfg.seed)
    mcfg = cfg.model_config(len(tok))
    model = UniViGUModel(mcfg)
    flow = FlowConfig(mode_mix=dict(cfg.mode_mix), cond_dropout=cfg.cond_dropout, loss_unit=cfg.loss_unit)
    metrics: dict = dict(config=asdict(cfg), chance=S.chance(), chance_caption_only=S.chance(S.CAPTION_ONLY_ATTRIBUTES))
    stage_seconds = {}
    for stage, steps, lr in ((1, cfg.steps1, cfg.lr1), (2, cfg.steps2, cfg.lr2)):
        t0 = time.time()
        tcfg = TrainConfig(stage=stage, steps=steps, batch_size=cfg.batch_size, lr=lr, warmup_steps=cfg.warmup,
                           seed=cfg.seed + stage, out_dir=str(out / f"stage{stage}"), progress=progress, log_every=25,
                           flow=flow)
        recs = Trainer(model, train, tcfg).train()
        stage_seconds[stage] = time.time() - t0
        tail = recs[-50:]
        for name, key in (("text_loss", "text_loss"), ("text_token_accuracy", "text_acc"), ("video_loss", "video_loss")):
            metrics[f"stage{stage}_final_{name}"] = S.mean(r[key] for r in tail if r[key] is not None)
        if stage == 1:
            u1 = evaluate_understanding(model, test, text_len=len(test.prompt_ids[0]), steps=cfg.caption_steps,
                                        seed=cfg.seed, temperature=cfg.sampler_temperature)
            metrics["stage1_understanding_attribute_accuracy"] = u1["attribute_accuracy"]
            metrics["stage1_understanding_prompt_attribute_accuracy"] = u1["prompt_attribute_accuracy"]
            metrics["stage1_understanding_caption_only_attribute_accuracy"] = u1["caption_only_attribute_accuracy"]
            metrics["stage1_caption_only_attribute_accuracy"] = u1["caption_only_attribute_accuracy"]
            metrics["stage1_examples"] = u1["examples"]
            log(f"stage 1: {stage_seconds[1]:.0f}s, understanding {u1['attribute_accuracy']:.3f} "
                f"(prompt attrs {u1['prompt_attribute_accuracy']:.3f}, caption-only {u1['caption_only_attribute_accuracy']:.3f})")
    t_eval = time.time()
    u = evaluate_understanding(model, test, steps=cfg.caption_steps, seed=cfg.seed, keep_ids=True,
                               temperature=cfg.sampler_temperature)
    exact_ids = u.pop("ids")
    # issue 8: the same captions with the video-stream cache (same seed), scored and compared token by token
    cached = {name: evaluate_understanding(model, test, steps=cfg.caption_steps, seed=cfg.seed, video_cache=policy,
                                           temperature=cfg.sampler_temperature,
                                           reference_ids=exact_ids)
              for name, policy in CACHED_POLICIES}
    g = evaluate_generation(model, test, steps=cfg.gen_steps, shift=cfg.shift, guidance=cfg.guidance, seed=cfg.seed)
    j = evaluate_joint(model, test, steps=cfg.gen_steps, shift=cfg.shift, guidance=cfg.guidance, seed=cfg.seed,
                       temperature=cfg.sampler_temperature)
    metrics.update(
        understanding_attribute_accuracy=u["attribute_accuracy"],
        understanding_caption_only_attribute_accuracy=u["caption_only_attribute_accuracy"],
        understanding_prompt_attribute_accuracy=u["prompt_attribute_accuracy"],
        understanding_per_attribute=u["per_attribute"], understanding_examples=u["examples"],
        generation_accuracy=g["generation_accuracy"], generation_color_accuracy=g["color_accuracy"],
        generation_direction_accuracy=g["direction_accuracy"],
        joint_agreement=j["joint_agreement"], joint_video_accuracy=j["joint_video_accuracy"], joint_examples=j["examples"],
        joint_background_agreement=j["joint_background_agreement"],
        joint_background_agreement_shuffled=j["joint_background_agreement_shuffled"],
        generation_chance=(1 / len(S.COLORS)) * (1 / len(S.DIRECTIONS)),
        n_train=len(train_s), n_test=len(test_s), text_flow=cfg.text_flow, seed=cfg.seed,
        stage1_seconds=stage_seconds[1], stage2_seconds=stage_seconds[2], eval_seconds=time.time() - t_eval,
        torch_threads=torch.get_num_threads(),
    )
    metrics["understanding_seconds"] = u["seconds"]
    for name, r in cached.items():
        metrics[f"understanding_attribute_accuracy_cached_{name}"] = r["attribute_accuracy"]
        metrics[f"understanding_caption_only_attribute_accuracy_cached_{name}"] = r["caption_only_attribute_accuracy"]
        metrics[f"understanding_token_agreement_cached_{name}"] = r["token_agreement"]
        metrics[f"understanding_seconds_cached_{name}"] = r["seconds"]
    metrics["understanding_cached"] = cached
    metrics.update(understanding=u, generation=g, joint=j,
                   stage1={k[7:]: v for k, v in metrics.items() if k.startswith("stage1_")},
                   stage2={k[7:]: v for k, v in metrics.items() if k.startswith("stage2_")})
    metrics["seconds"] = time.time() - t_start
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    log(f"understanding {u['attribute_accuracy']:.3f} (caption-only {u['caption_only_attribute_accuracy']:.3f})"
        + "".join(f"; cached {n}: {r['attribute_accuracy']:.3f} (tokens = exact {r['token_agreement']:.3f})"
                  for n, r in cached.items())
        + f", generation {g['generation_accuracy']:.3f}, joint agreement {j['joint_agreement']:.3f} (background "
        f"{j['joint_background_agreement']:.3f}, other videos {j['joint_background_agreement_shuffled']:.3f}), "
        f"chance {metrics['chance']:.3f}, {metrics['seconds']:.0f}s")
    return metrics
