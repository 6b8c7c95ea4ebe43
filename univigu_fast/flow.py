"""Uni-flow: probability paths, velocity targets and the unified loss (paper §3.1, §3.3; DESIGN §4).

Time follows the paper: ``tau`` in [0, 1], 0 = noise, 1 = data.

* **Video** (continuous flow, paper Eq. 2-3): ``z_tau = (1 - tau) z0 + tau z1``, ``z0 ~ N(0, I)``,
  target velocity ``u = z1 - z0``; loss ``||v_hat - u||^2``.
* **Text, discrete** (``text_flow="discrete"``, the public implementation, which uses Meta's
  ``flow_matching`` mixture path): ``x_t = x1`` with probability ``kappa(t) = t^n`` else ``x0``,
  ``x0`` uniform over the V real tokens (``discrete_source="uniform"``, the public default) or the
  [MASK] token (id V). The public code's scheduler exponent default is ``n = 1``. Loss: the
  cross-entropy of the logits against ``x1`` on **every** text token (the public code passes all
  tokens to ``torch.nn.CrossEntropyLoss``, masked or not).
* **Text, embedding** (``text_flow="embedding"``, paper Eq. 7-8): ``z_{t,1} = E[y]`` with
  ``E = model.vocab_embed.weight``, ``z_{t,tau} = (1 - tau) z0 + tau z_{t,1}``, ``u = z_{t,1} - z0``,
  MSE loss. ``E`` is **detached** in both the input ``z_t`` and the target: it acts as the fixed
  codebook of the paper (initialised N(0, I) by ``init_text_stream``, the scale of the noise).
  Letting the MSE target depend on trainable E invites the trivial solution "shrink E", which
  lowers the loss and destroys the argmax decoding of Eq. 8.

**Loss (Eq. 11 with the token-count normalisation of DESIGN §4).**
``L = (1/|z_v|) sum_video ||v_hat - u||^2 + (1/|z_t|) sum_text loss_t`` i.e. the per-token mean of each
modality, added (``lambda_v = 1``, ``lambda_t = |z_v| / |z_t|``, normalised by ``|z_v|``): a video
token's squared error sums its ``C x patch volume`` latent values (64 for Wan), an embedding-text
token's its ``dim`` values, a discrete-text token's loss is its cross-entropy. ``loss_unit="element"``
instead takes the per-element mean of the squared errors (Wan's own MSE; the cross-entropy stays
per token), which weights video ``C x patch volume`` times less against discrete text. Means are
over the tokens of the whole (global) batch.

**Modes.** ``joint``: ``tau_v, tau_t ~ U(0, 1)`` independently. ``understanding``: ``tau_v = 1``
(clean video, its loss is not counted: its target ``z1 - z0`` is unpredictable from a clean
video). ``generation``: ``tau_t = 1`` (clean text, text loss not counted). A training batch draws
a mode per sample with the probabilities ``mode_mix``.

Randomness is drawn **per sample** from a generator seeded by ``(seed, step, global sample index)``
(``sample_generator``), so a batch split over ranks draws exactly what a single process draws.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from .modeling import IGNORE_INDEX, TextLoss

MODES = ("joint", "understanding", "generation")


# ---------------------------------------------------------------------------- schedulers
@dataclass(frozen=True)
class PolynomialScheduler:
    """``kappa(t) = t^n`` (Meta's ``PolynomialConvexScheduler``); the public code uses ``n = 1``."""

    n: float = 1.0

    def __post_init__(self):
        if not self.n > 0:
            raise ValueError(f"PolynomialScheduler exponent n must be > 0, got {self.n}")

    def kappa(self, t):
        return t**self.n

    def dkappa(self, t):
        if isinstance(t, torch.Tensor):
            return self.n * t.clamp_min(1e-12) ** (self.n - 1) if self.n != 1 else torch.ones_like(t)
        if self.n == 1:
            return 1.0
        return float("inf") if (t == 0 and self.n < 1) else self.n * t ** (self.n - 1)

    def jump_probability(self, t: float, h: float) -> float:
        """Discrete Euler step ``t -> t + h``: a token not already at ``x1_hat`` jumps to it with
        probability ``1 - exp(-h kappa'(t) / (1 - kappa(t)))`` (1 once kappa = 1), the rule of Meta's
        ``MixtureDiscreteEulerSolver`` that the public implementation captions with. (Its first-order
        form ``min(1, h kappa' / (1 - kappa))`` would track ``kappa`` exactly for a fixed ``x1_hat``;
        the exponential one is kept for the released checkpoints' sampling behaviour.)"""
        k = self.kappa(t)
        if k >= 1.0:
            return 1.0
        return -math.expm1(-h * self.dkappa(t) / (1.0 - k))


def wan_shift(sigma, shift: float):
    """Wan's flow shift on ``sigma = 1 - tau``: ``sigma' = shift sigma / (1 + (shift - 1) sigma)``."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def generation_taus(steps: int, shift: float = 1.0) -> list[float]:
    """``steps + 1`` paper-convention times from 0 to 1 for Euler sampling with Wan's flow shift
    (uniform ``sigma`` grid 1 -> 0, shifted; ``shift = 1`` gives the uniform grid)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0 < shift < math.inf:  # inf would make every time 0
        raise ValueError(f"shift must be finite and > 0, got {shift}")
    # sigma = 1 maps to 1 only up to rounding (1 + (shift - 1) != shift for e.g. 0.2): pin the start at 0
    return [0.0] + [min(1.0, max(0.0, 1.0 - wan_shift(1.0 - i / steps, shift))) for i in range(1, steps + 1)]


# ---------------------------------------------------------------------------- paths
def video_path(z1: torch.Tensor, z0: torch.Tensor, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Paper Eq. 2-3: ``z_tau = (1 - tau) z0 + tau z1`` and ``u = z1 - z0``; tau broadcasts from the left."""
    tau = torch.as_tensor(tau, device=z1.device)
    t = tau.reshape(tau.shape + (1,) * (z1.dim() - tau.dim())).to(z1.dtype)
    return (1 - t) * z0 + t * z1, z1 - z0


def discrete_path(x1: torch.Tensor, x0: torch.Tensor, tau, scheduler: PolynomialScheduler,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Mixture path: each token is ``x1`` with probability ``kappa(tau)``, else ``x0``."""
    k = scheduler.kappa(torch.as_tensor(tau, dtype=torch.float32))
    k = k.reshape(k.shape + (1,) * (x1.dim() - k.dim()))
    keep = torch.rand(x1.shape, generator=generator) < k
    return torch.where(keep.to(x1.device), x1, x0)


def source_tokens(n: int, vocab_size: int, source: str, generator: torch.Generator | None = None,
                  mask_token_id: int | None = None) -> torch.Tensor:
    """``n`` source ids: uniform over the V real tokens, or all [MASK] (id ``mask_token_id``)."""
    if source == "mask":
        if mask_token_id is None:
            raise ValueError("source='mask' needs mask_token_id")
        return torch.full((n,), mask_token_id, dtype=torch.long)
    if source != "uniform":
        raise ValueError(f"source must be 'uniform' or 'mask', got {source!r}")
    return torch.randint(0, vocab_size, (n,), generator=generator)


# ---------------------------------------------------------------------------- per-sample randomness
def seeded_generator(mix: int) -> torch.Generator:
    """A host generator seeded with ``mix`` reduced modulo 2^64, ``manual_seed``'s range (it reads a
    negative seed as its two's complement, so values already in range keep their stream): any int
    seed mixed with steps and indices works (20240601 * 1_000_003 * ... overflowed it)."""
    return torch.Generator().manual_seed(mix % 2**64)


def sample_generator(seed: int, step: int, index: int) -> torch.Generator:
    """A generator for global sample ``index`` of training step ``step`` (sharding-invariant)."""
    return seeded_generator((seed * 1_000_003 + step) * 1_000_033 + index)


@dataclass
class FlowConfig:
    """Uni-flow training options."""

    mode_mix: dict = field(default_factory=lambda: {"joint": 1.0, "understanding": 1.0, "generation": 1.0})
    kappa_power: float | None = None  # scheduler exponent n of kappa(t) = t^n; None: the model config's (default 1)
    cond_dropout: float = 0.5  # probability of replacing the prompt by the empty-prompt condition
    video_weight: float = 1.0  # lambda_v
    text_weight: float = 1.0  # multiplies the per-token text mean (1 = the paper's token-count normalisation)
    loss_unit: str = "token"  # squared errors averaged per "token" (Eq. 11, DESIGN §4) or per "element" (Wan's MSE)

    def __post_init__(self):
        bad = set(self.mode_mix) - set(MODES)
        weights = self.mode_mix.values()
        if bad or not self.mode_mix or any(not 0 <= w < math.inf for w in weights) or sum(weights) <= 0:
            raise ValueError(f"mode_mix must map a subset of {MODES} to finite non-negative weights (sum > 0), "
                             f"got {self.mode_mix}")
        if not 0.0 <= self.cond_dropout <= 1.0:
            raise ValueError(f"cond_dropout must lie in [0, 1], got {self.cond_dropout}")
        if self.kappa_power is not None and not 0.0 < self.kappa_power < math.inf:
            raise ValueError(f"kappa_power must be a positive finite number, got {self.kappa_power}")
        if self.loss_unit not in ("token", "element"):
            raise ValueError(f"loss_unit must be 'token' or 'element', got {self.loss_unit!r}")
        for name in ("video_weight", "text_weight"):
            if not 0.0 <= getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")

    def draw_mode(self, g: torch.Generator) -> str:
        names = [m for m in MODES if self.mode_mix.get(m, 0) > 0]
        w = torch.tensor([float(self.mode_mix[m]) for m in names])
        return names[int(torch.multinomial(w / w.sum(), 1, generator=g))]


@dataclass
class NoisedSample:
    """Model inputs and targets for one sample (``understanding``/``generation`` pin one tau to 1)."""

    mode: str
    tau_video: float
    tau_text: float
    video_in: torch.Tensor
    video_target: torch.Tensor
    text_in: torch.Tensor
    text_target: torch.Tensor  # ids (discrete: CE target; embedding: ids whose E rows define the target)
    text_noise: torch.Tensor | None  # embedding flow: z0 of the text (N, dim)
    prompt: torch.Tensor
    dropped: bool


def draw_sample(video: torch.Tensor, prompt: torch.Tensor, null_prompt: torch.Tensor, text_ids: torch.Tensor,
                g: torch.Generator, cfg: FlowConfig, model_config, mode: str | None = None,
                generation_text: torch.Tensor | None = None) -> NoisedSample:
    """Draws mode, times, noise and condition dropout for one sample and builds its noised inputs.

    video (C, F, H, W); prompt (L, text_dim); null_prompt (L0, text_dim) the empty-prompt condition;
    text_ids (N,) the target text; generation_text: the clean text the stream carries in
    ``generation`` mode (default ``text_ids``; the trainer passes the prompt's ids, what T2V inference
    feeds, as the public code does). Embedding-flow ``text_in`` is returned as noise + ids: the caller
    builds ``z_t = (1 - tau) z0 + tau E[y]`` with the live ``vocab_embed`` (``text_inputs``). The video
    path and target are float32 whatever ``video``'s dtype (the forward casts to the model's).
    """
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    mode = mode or cfg.draw_mode(g)
    if mode == "generation" and generation_text is not None:
        text_ids = generation_text
    tau_v, tau_t = torch.rand(2, generator=g).tolist()
    if mode == "understanding":
        tau_v = 1.0
    elif mode == "generation":
        tau_t = 1.0
    z0 = torch.randn(video.shape, generator=g).to(video.device)  # float32: a bf16 path would round tau and z0
    v_in, v_target = video_path(video.float(), z0, torch.tensor(tau_v))
    dropped = bool(torch.rand((), generator=g) < cfg.cond_dropout)
    text_noise = None
    if model_config.text_flow == "discrete":
        x0 = source_tokens(text_ids.numel(), model_config.vocab_size, model_config.discrete_source, g,
                           model_config.mask_token_id)
        n = model_config.kappa_power if cfg.kappa_power is None else cfg.kappa_power
        t_in = discrete_path(text_ids, x0.to(text_ids.device), tau_t, PolynomialScheduler(n), g)
    else:
        text_noise = torch.randn(text_ids.numel(), model_config.dim, generator=g)
        t_in = text_ids
    return NoisedSample(mode, tau_v, tau_t, v_in, v_target, t_in, text_ids, text_noise,
                        null_prompt if dropped else prompt, dropped)


def codebook(model) -> torch.Tensor:
    """``vocab_embed.weight`` detached, gathered in full when FSDP2 shards it (a DTensor)."""
    E = model.vocab_embed.weight.detach()
    return E.full_tensor() if hasattr(E, "full_tensor") else E


def text_inputs(model, samples: Sequence[NoisedSample]) -> list[torch.Tensor]:
    """Text stream inputs: ids (discrete) or ``z_t = (1 - tau) z0 + tau E[y]`` (embedding, E detached)."""
    if model.config.text_flow == "discrete":
        return [s.text_in for s in samples]
    E = codebook(model)
    out = []
    for s in samples:
        z1 = E[s.text_target.to(E.device)]
        out.append(((1 - s.tau_text) * s.text_noise.to(E.device, E.dtype) + s.tau_text * z1))
    return out


def loss_counts(samples: Sequence[NoisedSample], model_config, loss_unit: str = "token") -> tuple[int, int]:
    """``(|z_v|, |z_t|)``: the video and text units the loss sums of ``samples`` are divided by (tokens;
    with ``loss_unit="element"`` the latent / embedding values of the squared-error terms)."""
    pt, ph, pw = model_config.patch_size
    video_unit = model_config.out_channels * pt * ph * pw if loss_unit == "token" else 1
    text_unit = model_config.dim if loss_unit == "element" and model_config.text_flow == "embedding" else 1
    video = sum(s.video_target.numel() for s in samples if s.mode != "understanding") // video_unit
    text = sum(s.text_target.numel() for s in samples if s.mode != "generation") * text_unit
    return video, text


def loss_terms(model, samples: Sequence[NoisedSample], out, loss_unit: str = "token") -> dict[str, torch.Tensor]:
    """Sums and counts of the two loss terms over ``samples`` (before normalisation).

    Returns ``video_sum`` (sum of squared errors over counted video elements), ``video_count``,
    ``text_sum`` (sum of per-token CE, or of squared errors over elements), ``text_count``
    (``loss_counts``), ``text_tokens``, ``text_correct`` (discrete: argmax == target over counted
    tokens; embedding: decode by Eq. 8). ``out.text_out``: a ``TextLoss`` (``forward_samples``, the fused
    cross-entropy), the logits, or the embedding flow's velocity.
    """
    c = model.config
    dev = model.device
    v_pred, t_pred = out.video_velocity, out.text_out
    zero = torch.zeros((), device=dev, dtype=torch.float32)
    vs, ts, corr = zero, zero, zero
    E = codebook(model) if c.text_flow == "embedding" else None
    for i, s in enumerate(samples):
        if s.mode != "understanding":
            d = v_pred[i].float() - s.video_target.to(dev).float()
            vs = vs + d.pow(2).sum()
        if _counts_text(s):
            y = s.text_target.to(dev)
            if isinstance(t_pred, TextLoss):  # the fused cross-entropy (forward_samples)
                ts = ts + t_pred.loss[i].sum()
                corr = corr + t_pred.correct[i].sum().float()
            elif c.text_flow == "discrete":  # logits
                logits = t_pred[i].float()
                ts = ts + F.cross_entropy(logits, y, reduction="sum")
                corr = corr + (logits.argmax(-1) == y).sum().float()
            else:
                u = E[y].float() - s.text_noise.to(dev).float()
                d = t_pred[i].float() - u
                ts = ts + d.pow(2).sum()
                with torch.no_grad():  # one-step estimate of z1 from z_tau and v (Eq. 16 to tau = 1)
                    z_t = (1 - s.tau_text) * s.text_noise.to(dev).float() + s.tau_text * E[y].float()
                    z1_hat = z_t + (1 - s.tau_text) * t_pred[i].float()
                    ids = (z1_hat @ E[: c.vocab_size].float().T).argmax(-1)
                    corr = corr + (ids == y).sum().float()
    vc, tc = loss_counts(samples, c, loss_unit)
    if vc == 0 and tc == 0:  # nothing counted (e.g. understanding with empty captions): a zero loss that is
        vs = vs + 0.0 * sum(v.float().sum() for v in v_pred)  # still a graph, so backward runs (and DDP syncs)
    return dict(video_sum=vs, video_count=torch.tensor(float(vc), device=dev), text_sum=ts,
                text_count=torch.tensor(float(tc), device=dev), text_correct=corr,
                text_tokens=torch.tensor(float(loss_counts(samples, c)[1]), device=dev))


def combine(terms: dict[str, torch.Tensor], cfg: FlowConfig, video_count=None, text_count=None) -> torch.Tensor:
    """``lambda_v * video_sum / |video| + text_weight * text_sum / |text|`` (Eq. 11, token-count
    normalised). Pass the global counts in a distributed run (each rank then holds its share)."""
    vc = terms["video_count"] if video_count is None else video_count
    tc = terms["text_count"] if text_count is None else text_count
    lv = terms["video_sum"] / vc.clamp_min(1.0)
    lt = terms["text_sum"] / tc.clamp_min(1.0)
    return cfg.video_weight * lv + cfg.text_weight * lt


def check_token_ids(t, name: str, vocab_size: int) -> None:
    """``t`` 1-D integer token ids in ``[0, vocab_size)``; errors name it as ``name``."""
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.is_floating_point() or t.is_complex() \
            or t.dtype == torch.bool:
        raise ValueError(f"{name} must be 1-D integer token ids, got {getattr(t, 'dtype', type(t).__name__)} "
                         f"{tuple(getattr(t, 'shape', ()))}")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= vocab_size):
        raise ValueError(f"{name} has ids outside [0, vocab_size={vocab_size}): min {int(t.min())}, max {int(t.max())}")


def draw_batch(videos, prompts, null_prompt, text_ids, *, cfg: FlowConfig, model_config, seed: int = 0,
               step: int = 0, index_offset: int = 0, modes: Sequence[str] | None = None,
               generation_texts=None) -> list[NoisedSample]:
    """``draw_sample`` for each sample of a (local) batch, sample ``i`` drawing from the generator of
    global index ``index_offset + i`` (so a batch split over ranks draws what one process draws)."""
    n = len(videos)
    for name, xs in (("prompts", prompts), ("text_ids", text_ids), ("modes", modes), ("generation_texts", generation_texts)):
        if xs is not None and len(xs) != n:
            raise ValueError(f"{name} has {len(xs)} entries, expected one per video ({n})")
        if name in ("text_ids", "generation_texts") and xs is not None:
            for i, t in enumerate(xs):  # the loss would fail on them with a bare IndexError
                check_token_ids(t, f"{name}[{i}]", model_config.vocab_size)
    return [draw_sample(v, p, null_prompt, y, sample_generator(seed, step, index_offset + i), cfg, model_config,
                        mode=None if modes is None else modes[i],
                        generation_text=None if generation_texts is None else generation_texts[i])
            for i, (v, p, y) in enumerate(zip(videos, prompts, text_ids))]


def _counts_text(s: NoisedSample) -> bool:
    """Whether the text loss counts ``s``'s text (generation carries the clean prompt, not a target)."""
    return s.mode != "generation" and s.text_target.numel() > 0


def forward_samples(model, samples: Sequence[NoisedSample], *, forward=None, autocast=None):
    """The model's output on the noised samples (``forward``: a wrapper of ``model``, e.g. DDP / FSDP).
    Discrete flow: the text output is the fused cross-entropy against the targets (``TextLoss``; the
    ``(N, V)`` logits are never formed), computed inside the forward, where DDP / FSDP see the head."""
    dev, dtype = model.device, model.dtype
    texts = [t.to(dev, dtype) if t.is_floating_point() else t.to(dev) for t in text_inputs(model, samples)]
    kw = {}
    if model.config.text_flow == "discrete":
        kw = dict(text_output="cross_entropy",
                  text_target=[s.text_target.to(dev) if _counts_text(s) else torch.full_like(t, IGNORE_INDEX)
                               for s, t in zip(samples, texts)])
    with autocast if autocast is not None else _nullcontext():
        return (forward or model)([s.video_in.to(dev, dtype) for s in samples],
                                  torch.tensor([s.tau_video for s in samples]),
                                  [s.prompt.to(dev, dtype) for s in samples],
                                  text=texts, tau_text=torch.tensor([s.tau_text for s in samples]), **kw)


def uniflow_loss(model, videos, prompts, null_prompt, text_ids, *, cfg: FlowConfig, seed: int = 0, step: int = 0,
                 index_offset: int = 0, modes: Sequence[str] | None = None, generation_texts=None, autocast=None):
    """The unified loss of one (local) batch. Returns ``(loss, terms, samples)``.

    videos: list of (C, F, H, W) clean latents; prompts: list of (L_i, text_dim); null_prompt:
    (L0, text_dim) the empty-prompt condition; text_ids: list of (N_i,) target ids; generation_texts:
    the clean ids the text stream carries in ``generation`` mode (default ``text_ids``; ``Trainer``
    passes the prompts' ids, what T2V inference feeds).
    """
    samples = draw_batch(videos, prompts, null_prompt, text_ids, cfg=cfg, model_config=model.config, seed=seed,
                         step=step, index_offset=index_offset, modes=modes, generation_texts=generation_texts)
    terms = loss_terms(model, samples, forward_samples(model, samples, autocast=autocast), cfg.loss_unit)
    return combine(terms, cfg), terms, samples


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def accuracy_chance(vocab_size: int) -> float:
    return 1.0 / vocab_size if vocab_size > 0 else math.nan
