"""Euler samplers of Uni-ViGU (paper §3.3, Eq. 16-18; DESIGN §4).

Three tasks, all on the paper's time (0 noise, 1 data):

* ``caption`` / ``understand`` (``tau_video = 1``): the clean video conditions, the text flows from
  its source to data.
* ``generate`` (``tau_text = 1``): the text stream holds the clean prompt (ids or ``E[ids]``, as the
  public T2V path does), the video flows from N(0, I) to data with Euler steps on a Wan flow-shifted
  grid (``sigma' = shift sigma / (1 + (shift - 1) sigma)`` on ``sigma = 1 - tau``; the public
  default shift is 3) and classifier-free guidance ``v = v_u + g (v_c - v_u)`` where the
  unconditional pass swaps the cross-attention condition for the empty-prompt embedding (the
  text stream is the same in both passes).
* ``joint``: video and text both from noise on the same time grid (``tau_text = tau_video`` at
  every step, as the public T2VT path), one forward per step drives both.

Discrete text flow: the discrete Euler solver of the mixture path ``kappa(t) = t^n``: sample
``x1_hat ~ softmax(logits / T)`` (the model's fused ``text_output="sample"`` decode: Gumbel-max, no
logits materialised), and each token jumps to ``x1_hat`` with probability
``1 - exp(-h kappa'(t) / (1 - kappa(t)))``, as Meta's ``MixtureDiscreteEulerSolver`` with which the
public implementation captions; the last step lands on ``x1_hat``. With the [MASK] source, ``x1_hat``
is drawn over the V real tokens (the model's decode leaves the [MASK] column out: never a target).
Embedding text flow:
Euler on the embeddings, then ``argmax_v z . E_v`` (Eq. 8) with the fused ``linear_argmax`` op against
``vocab_embed``.
All functions return token ids; detokenise with the tokenizer (``univigu_fast.text``/synthetic).

Randomness: one generator seeded with ``seed`` draws for the whole batch, sample after sample (video
noise, text source, jump uniforms, the decode's Gumbel seeds), and the fused sampler's Gumbel noise
is keyed on the row of the packed batch. Same inputs and seed give the same outputs; a sample's draw
also depends on its position in the batch and on the text lengths of the samples before it (as with
one generator for a batch in diffusers). Run a sample alone (B = 1) to reproduce it on its own.
"""
from __future__ import annotations

import math
import numbers
import operator
from typing import Sequence

import torch

from .flow import PolynomialScheduler, check_token_ids, generation_taus
from .kernels._utils import host_to_device
from .kernels.linear_argmax import check_decode_args
from .packing import padded_lengths
from .video_cache import VideoCache, is_full_step, parse_policy


def _rng_seed(g: torch.Generator) -> int:
    return int(torch.randint(0, 2**62, (1,), generator=g))


def _source_tokens(config, n: int, generator: torch.Generator, device) -> torch.Tensor:
    if config.discrete_source == "mask":
        return torch.full((n,), config.mask_token_id, dtype=torch.long, device=device)
    return torch.randint(0, config.vocab_size, (n,), generator=generator).to(device)


def _check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    return int(steps)


def _generator(seed) -> torch.Generator:
    """The sampler's host generator; ``seed`` any int ``manual_seed`` takes, in [-2^63, 2^64)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not -2**63 <= seed < 2**64:
        raise ValueError(f"seed must be an int in [-2**63, 2**64), got {seed!r}")
    return torch.Generator().manual_seed(int(seed))


def _per_sample(x, name: str, form: str) -> list[torch.Tensor]:
    """A list of per-sample ``form`` tensors from a list / tuple of them or one batched tensor with a
    leading B axis. A single sample's tensor is refused: iterating it would split it along its first axis."""
    ndim = form.count(",") + 1
    if isinstance(x, torch.Tensor):
        if x.dim() != ndim + 1:
            raise ValueError(f"{name} must be a list of {form} tensors or one (B, {form[1:]} tensor, got a tensor "
                             f"of shape {tuple(x.shape)} (wrap a single sample in a list)")
        return list(x.unbind(0))
    if not isinstance(x, (list, tuple)) or not x:
        raise TypeError(f"{name} must be a non-empty list of {form} tensors, got {type(x).__name__}")
    for i, t in enumerate(x):
        if not isinstance(t, torch.Tensor) or t.dim() != ndim:
            raise ValueError(f"{name}[{i}] must be a {form} tensor, got {getattr(t, 'shape', type(t).__name__)}")
    return list(x)


def _check_video_shape(config, video_shape) -> tuple[int, int, int, int]:
    """``(C, F, H, W)`` of the latents to generate: C = in_channels, F, H, W positive multiples of the patch."""
    try:
        shape = tuple(operator.index(n) for n in video_shape)
    except TypeError:
        shape = ()
    if len(shape) != 4 or min(shape) < 1 or any(isinstance(n, bool) for n in video_shape):
        raise ValueError(f"video_shape must be 4 positive ints (C, F, H, W), got {video_shape!r}")
    if shape[0] != config.in_channels:
        raise ValueError(f"video_shape {shape} has C={shape[0]} channels, expected in_channels={config.in_channels}")
    if any(n % p for n, p in zip(shape[1:], config.patch_size)):
        raise ValueError(f"video_shape (F, H, W) = {shape[1:]} must be multiples of patch_size {config.patch_size}")
    return shape


def _check_guidance(config, null_prompt, guidance, shift) -> None:
    """``guidance`` a finite real (CFG scale), ``shift`` a finite real > 0 (Wan's flow shift; inf made every
    time 0: the sampler returned its noise), ``null_prompt`` one ``(L0, text_dim)`` tensor when guided."""
    for name, value in (("guidance", guidance), ("shift", shift)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite real number, got {value!r}")
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift!r}")
    if guidance != 1.0 and null_prompt is None:
        raise ValueError("guidance != 1 needs null_prompt (the empty-prompt condition)")
    if null_prompt is not None and (not isinstance(null_prompt, torch.Tensor) or null_prompt.dim() != 2
                                    or null_prompt.shape[-1] != config.text_dim):
        raise ValueError(f"null_prompt must be one (L0, text_dim={config.text_dim}) tensor, got "
                         f"{getattr(null_prompt, 'shape', type(null_prompt).__name__)}")


def _check_prompt_ids(prompt_ids, prompt_lens, batch: int, vocab_size: int) -> list[torch.Tensor]:
    """Per-prompt 1-D token ids in ``[0, vocab_size)``, from a list or a right-padded ``(B, N)`` tensor with
    ``prompt_lens`` (padding must not enter the text stream)."""
    if isinstance(prompt_ids, torch.Tensor) and prompt_ids.dim() == 2:
        if prompt_lens is None:
            raise ValueError(f"prompt_ids is a padded {tuple(prompt_ids.shape)} tensor: pass prompt_lens (tokens per "
                             "prompt) or a list of 1-D id tensors (the padding would enter the text stream)")
        if prompt_ids.shape[0] != batch:
            raise ValueError(f"prompt_ids must have one row per prompt ({batch}), got shape {tuple(prompt_ids.shape)}")
        lens = padded_lengths(prompt_lens, batch, prompt_ids.shape[1], name="prompt_lens")
        ids = [row[:n] for row, n in zip(prompt_ids, lens)]
    elif prompt_lens is not None:
        raise ValueError("prompt_lens is only for a padded (B, N) prompt_ids tensor; a list carries its lengths")
    elif isinstance(prompt_ids, (list, tuple)):
        ids = list(prompt_ids)
    else:
        raise TypeError(f"prompt_ids must be a list of 1-D token id tensors or a padded (B, N) tensor with "
                        f"prompt_lens, got {type(prompt_ids).__name__}")
    if len(ids) != batch:
        raise ValueError(f"prompts ({batch}) and prompt_ids ({len(ids)}) must have the same length")
    for i, t in enumerate(ids):
        check_token_ids(t, f"prompt_ids[{i}]", vocab_size)
    return ids


def _check_text_lens(text_lens, batch: int, batch_name: str) -> list[int]:
    if isinstance(text_lens, (str, bytes, numbers.Number)) or not hasattr(text_lens, "__iter__") or \
            getattr(text_lens, "ndim", 1) != 1:  # a list, tuple, range, 1-D tensor or NumPy array
        raise TypeError(f"text_lens must be a sequence of tokens per sample of {batch_name}, got "
                        f"{type(text_lens).__name__} {tuple(getattr(text_lens, 'shape', ()))}")
    lens = list(text_lens)
    if len(lens) != batch:
        raise ValueError(f"text_lens has {len(lens)} entries, expected one per sample of {batch_name} ({batch})")
    out = []
    for i, n in enumerate(lens):
        boolean = isinstance(n, bool) or (isinstance(n, torch.Tensor) and n.dtype == torch.bool)
        try:
            k = None if boolean else operator.index(n)  # ints, NumPy ints, one-element integer tensors
        except TypeError:
            k = None
        if k is None or k < 0:
            raise ValueError(f"text_lens[{i}] must be a non-negative integer, got {n!r}")
        out.append(k)
    return out


def _model_inputs(model, tensors) -> list[torch.Tensor]:
    """Conditions in the model's device and dtype (the forward wants one dtype for all its inputs)."""
    return [t.to(model.device, model.dtype) for t in tensors]


def jump_probability(t: float, h: float, kappa_power: float) -> float:
    """``1 - exp(-h kappa'(t) / (1 - kappa(t)))`` for ``kappa(t) = t^n`` (the discrete Euler step)."""
    return PolynomialScheduler(kappa_power).jump_probability(t, h)


def decode_embeddings(model, z: torch.Tensor) -> torch.Tensor:
    """Paper Eq. 8: ``argmax_v z . E_v`` with E = ``vocab_embed.weight`` (the fused argmax kernel);
    the [MASK] row, if any, is excluded. z: (N, dim) -> ids (N,)."""
    if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape[-1] != model.config.dim:
        raise ValueError(f"z must be (N, dim={model.config.dim}) text embeddings, got {getattr(z, 'shape', type(z).__name__)}")
    ids, _, _ = model.ops.linear_argmax(z, model.vocab_embed.weight[: model.config.vocab_size])
    return ids


class _TextState:
    """The text stream during sampling: ids (discrete) or embeddings (embedding flow)."""

    def __init__(self, model, text_lens, g, kappa_power, temperature):
        check_decode_args(temperature, None)  # before the first (expensive) forward
        if model.config.text_flow != "discrete":  # (they were accepted and did nothing)
            for name, value, default in (("temperature", temperature, 1.0), ("kappa_power", kappa_power, None)):
                if value != default:
                    raise ValueError(f"{name} is for text_flow='discrete': the embedding flow samples nothing (its "
                                     f"text follows its velocity, Eq. 16), got {name}={value!r}")
        if kappa_power is None:  # the exponent the model was trained with
            kappa_power = model.config.kappa_power
        if isinstance(kappa_power, bool) or not isinstance(kappa_power, numbers.Real) or not 0 < kappa_power < math.inf:
            raise ValueError(f"kappa_power must be a positive finite number (kappa(t) = t^kappa_power), got {kappa_power!r}")
        c = model.config
        self.model, self.c, self.g = model, c, g
        self.sched = PolynomialScheduler(kappa_power)
        self.temperature = temperature
        dev = model.device
        if c.text_flow == "discrete":
            self.x = [_source_tokens(c, n, g, dev) for n in text_lens]
        else:
            self.x = [torch.randn(n, c.dim, generator=g).to(dev) for n in text_lens]  # fp32 state

    def forward_kwargs(self):
        dtype = self.model.dtype
        kw = dict(text=self.x if self.c.text_flow == "discrete" else [zi.to(dtype) for zi in self.x])
        if self.c.text_flow == "discrete":
            kw.update(text_output="sample", sample_seed=_rng_seed(self.g), temperature=self.temperature)
        return kw

    def step(self, text_out, t: float, t_next: float, last: bool):
        if self.c.text_flow == "discrete":
            x1_hat = text_out.ids
            p = 1.0 if last else self.sched.jump_probability(t, t_next - t)
            self.x = [torch.where(host_to_device(torch.rand(xi.shape, generator=self.g), xi.device) < p, yi, xi)
                      for xi, yi in zip(self.x, x1_hat)]
        else:  # Euler, Eq. 16
            self.x = [zi + (t_next - t) * vi.float() for zi, vi in zip(self.x, text_out)]

    def ids(self) -> list[torch.Tensor]:
        if self.c.text_flow == "discrete":
            return self.x
        return [decode_embeddings(self.model, zi.to(self.model.dtype)) for zi in self.x]


@torch.no_grad()
def caption(model, videos, prompts, text_lens, *, steps: int = 50, seed: int = 0, kappa_power: float | None = None,
            temperature: float = 1.0, video_cache: str = "off", max_cache_bytes: int | None = None,
            cuda_graph: bool = False, stats: dict | None = None) -> list[torch.Tensor]:
    """Understanding (``tau_video = 1``): integrate the text flow from its source to ids, per sample.

    videos: list of clean latents (C, F, H, W); prompts: list of (L, text_dim) conditions (the
    empty-prompt embedding for plain captioning); text_lens: tokens per caption. Returns a list of
    int64 id tensors ``(text_lens[i],)``. ``model`` is a reference or fast ``UniViGUModel``.
    ``kappa_power``: the discrete scheduler's exponent n, default the model config's (what it was
    trained with).

    ``video_cache`` (``univigu_fast.video_cache``): ``"off"`` (exact, the default: every step is a
    full forward), ``"every:r"`` (a full forward that refills the video-stream cache every r-th step,
    text-only ``model.text_step`` in between; ``every:1`` = exact) or ``"once"`` (full at the first
    step only). The policy only chooses the model call of each step: the Euler loop and the random
    stream are the same, so ``off`` and ``every:1`` give the same ids. ``max_cache_bytes``: the cache
    budget (default on CUDA: half the free memory; a cache that does not fit raises ``MemoryError``).
    ``cuda_graph=True`` (CUDA, a cached policy): the text-only steps replay a CUDA graph of their layer
    loop (``univigu_fast.video_cache``), so ~400 kernel launches per step cost one. The cache is
    released before returning (also on error). ``stats`` (a dict, if given) receives ``cache_bytes``
    (peak), ``full_steps``, ``text_steps`` and, with ``cuda_graph``, ``graph_captures`` and
    ``graph_error`` (None, or why capture failed and the text steps ran eagerly).
    """
    policy = parse_policy(video_cache)
    if cuda_graph and policy[0] == "off":
        raise ValueError("cuda_graph=True replays the text-only steps of a cached caption; video_cache='off' has "
                         "none (use 'once' or 'every:r')")
    if max_cache_bytes is not None and policy[0] == "off":
        raise ValueError("max_cache_bytes is the budget of a cached caption; video_cache='off' keeps no cache "
                         "(use 'once' or 'every:r')")
    steps = _check_steps(steps)
    if stats is not None and not isinstance(stats, dict):
        raise TypeError(f"stats must be a dict (it receives the step counts) or None, got {type(stats).__name__}")
    videos, prompts = _per_sample(videos, "videos", "(C, F, H, W)"), _per_sample(prompts, "prompts", "(L, text_dim)")
    if len(prompts) != len(videos):
        raise ValueError(f"videos ({len(videos)}) and prompts ({len(prompts)}) must have the same length")
    text_lens = _check_text_lens(text_lens, len(videos), "videos")
    videos, prompts = _model_inputs(model, videos), _model_inputs(model, prompts)
    g = _generator(seed)
    B = len(videos)
    state = _TextState(model, text_lens, g, kappa_power, temperature)
    ones = torch.ones(B)
    cache = None if policy[0] == "off" else VideoCache(model, max_bytes=max_cache_bytes, cuda_graph=cuda_graph)
    full_steps = text_steps = peak = 0
    try:
        for i in range(steps):
            t, t_next = i / steps, (i + 1) / steps
            kw = state.forward_kwargs()
            tau_t = torch.full((B,), t)
            if cache is None:  # exact: no cache argument at all (any model with the forward signature)
                out = model(videos, ones, prompts, tau_text=tau_t, **kw).text_out
                full_steps += 1
            elif is_full_step(policy, i):  # full forward that (re)captures the video stream
                out = model(videos, ones, prompts, tau_text=tau_t, video_cache=cache, **kw).text_out
                full_steps += 1
                peak = max(peak, cache.nbytes)
            else:  # text rows only, against the cached video keys/values
                out = model.text_step(cache, kw.pop("text"), tau_t, **kw)
                text_steps += 1
            state.step(out, t, t_next, last=i == steps - 1)
    finally:
        if cache is not None:
            cache.release()
    if stats is not None:
        stats.update(cache_bytes=peak, full_steps=full_steps, text_steps=text_steps)
        if cuda_graph:
            stats.update(graph_captures=cache.graph_captures, graph_error=cache.graph_error)
    return state.ids()


understand = caption


def _clean_text(model, text_ids):
    if model.config.text_flow == "discrete":
        return [t.to(model.device) for t in text_ids]
    E = model.vocab_embed.weight
    return [E[t.to(model.device)] for t in text_ids]


def _guided(model, x, tau_v, prompts, null_prompts, guidance, **kw):
    """Velocity with CFG; the Euler state ``x`` is fp32, the model sees its dtype; returns fp32."""
    x = [xi.to(model.dtype) for xi in x]
    out = model(x, tau_v, prompts, **kw)
    if guidance == 1.0:
        return [v.float() for v in out.video_velocity], out
    kw_u = dict(kw, text_output="none")  # the unconditional pass's text output is not used
    kw_u.pop("sample_seed", None)
    kw_u.pop("temperature", None)
    vu = model(x, tau_v, null_prompts, **kw_u).video_velocity
    return [u.float() + guidance * (c.float() - u.float()) for c, u in zip(out.video_velocity, vu)], out


@torch.no_grad()
def generate(model, prompts, prompt_ids, video_shape: Sequence[int], *, null_prompt: torch.Tensor | None = None,
             steps: int = 50, shift: float = 3.0, guidance: float = 1.0, seed: int = 0,
             prompt_lens=None) -> list[torch.Tensor]:
    """Generation (``tau_text = 1``): video latents from N(0, I) given the prompt.

    prompts: list of (L, text_dim) prompt embeddings (or a (B, L, text_dim) tensor); prompt_ids: list
    of (N,) prompt token ids (the clean text stream; a length-0 tensor gives an empty text segment), or
    a right-padded (B, N) tensor with ``prompt_lens`` (B,);
    video_shape: (C, F, H, W); null_prompt: (L0, text_dim) empty-prompt condition, needed when
    ``guidance != 1``; shift: Wan's flow shift; guidance: classifier-free guidance scale (as in the
    public T2V script the unconditional pass swaps only the cross-attention prompt and the text stream
    keeps ``prompt_ids``; the prompt also reaches the video through self-attention, so guidance acts
    weakly: README).
    Returns a list of fp32 (C, F, H, W) latents (the Euler state is kept in fp32 whatever the model dtype).
    """
    steps = _check_steps(steps)
    prompts = _per_sample(prompts, "prompts", "(L, text_dim)")
    _check_guidance(model.config, null_prompt, guidance, shift)
    prompt_ids = _check_prompt_ids(prompt_ids, prompt_lens, len(prompts), model.config.vocab_size)
    video_shape = _check_video_shape(model.config, video_shape)
    g = _generator(seed)
    B, dev = len(prompts), model.device
    x = [torch.randn(video_shape, generator=g).to(dev) for _ in range(B)]  # fp32 Euler state
    taus = generation_taus(steps, shift)
    text = _clean_text(model, prompt_ids)
    prompts = _model_inputs(model, prompts)
    nulls = None if null_prompt is None else _model_inputs(model, [null_prompt]) * B
    for i in range(steps):
        t, t_next = taus[i], taus[i + 1]
        v, _ = _guided(model, x, torch.full((B,), t), prompts, nulls, guidance, text=text,
                       tau_text=torch.ones(B), text_output="none")  # the clean prompt's logits are not used
        x = [xi + (t_next - t) * vi for xi, vi in zip(x, v)]
    return x


@torch.no_grad()
def joint(model, prompts, video_shape: Sequence[int], text_lens, *, null_prompt: torch.Tensor | None = None,
          steps: int = 50, shift: float = 3.0, guidance: float = 1.0, seed: int = 0, kappa_power: float | None = None,
          temperature: float = 1.0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Joint generation: video and text from noise, coupled every step (``tau_text = tau_video``).

    Guidance (if any) is applied to the video velocity; the text uses the conditional pass and the
    same discrete Euler solver as ``caption`` (DESIGN §4). (The public T2VT script instead keeps each
    sampled token with probability ``i / (steps - 1)`` and ends with an argmax pass at ``tau_text = 1``.)
    ``kappa_power`` defaults to the model config's. Returns ``(latents list of (C, F, H, W), ids list of (text_lens[i],))``.
    """
    steps = _check_steps(steps)
    prompts = _per_sample(prompts, "prompts", "(L, text_dim)")
    _check_guidance(model.config, null_prompt, guidance, shift)
    text_lens = _check_text_lens(text_lens, len(prompts), "prompts")
    video_shape = _check_video_shape(model.config, video_shape)
    g = _generator(seed)
    B, dev = len(prompts), model.device
    x = [torch.randn(video_shape, generator=g).to(dev) for _ in range(B)]  # fp32 Euler state
    state = _TextState(model, text_lens, g, kappa_power, temperature)
    taus = generation_taus(steps, shift)
    prompts = _model_inputs(model, prompts)
    nulls = None if null_prompt is None else _model_inputs(model, [null_prompt]) * B
    for i in range(steps):
        t, t_next = taus[i], taus[i + 1]
        tau = torch.full((B,), t)
        v, out = _guided(model, x, tau, prompts, nulls, guidance, tau_text=tau, **state.forward_kwargs())
        x = [xi + (t_next - t) * vi for xi, vi in zip(x, v)]
        state.step(out.text_out, t, t_next, last=i == steps - 1)
    return x, state.ids()
