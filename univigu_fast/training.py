"""Training: the two stages of Uni-ViGU (paper §3.3) on the uni-flow loss (``univigu_fast.flow``).

* **Stage 1, Knowledge Recall** (``stage=1``): the target text is the conditioning prompt itself
  (its token ids), and the condition is dropped (replaced by the empty-prompt embedding) with
  probability ``cond_dropout`` so the model cannot copy it. Paper lr 2e-4.
* **Stage 2, Capability Refinement** (``stage=2``): the target text is the detailed caption, the
  condition is still the brief prompt (dropped with ``cond_dropout``). Paper lr 5e-5.

In ``generation`` mode (``tau_text = 1``) the text stream carries the clean **prompt** ids in both
stages: that is what text-to-video inference feeds the stream (the public T2V path), so training
and sampling see the same thing; its text loss is not counted anyway.

Optimiser: AdamW, betas (0.9, 0.95) (the paper's Adam betas; weight decay 0 by default, i.e. Adam),
linear warm-up then constant or cosine, gradient clipping, bf16 autocast on CUDA only (the weights,
AdamW's masters, stay float32: a 16-bit model is refused).
Checkpoints (``OUT/checkpoint.pt``; ``save_every`` steps and at the end) hold model, optimiser,
scheduler, RNG states, the step and the data position; they are written to a temporary file and
renamed, so an interruption leaves the previous checkpoint intact. Batches are a deterministic
function of ``(seed, step)`` (an epoch-wise permutation), so resuming at step k replays exactly the
batches an uninterrupted run would see. Losses go to ``OUT/log.jsonl``; a tqdm bar shows progress
(``text_loss`` / ``text_acc`` are None for a step that counts no text token).

Each example is checked the first time a batch draws it (finite latents and prompt embeddings, integer
ids inside the vocabulary: an error names its index); a step whose loss or gradient norm is not finite
raises ``FloatingPointError`` before the optimiser moves any weight.

**Distributed** (``torchrun``): the global batch is split over ranks in order. On CUDA the model
is sharded with FSDP2 (``torch.distributed.fsdp.fully_shard`` on every block, then the root); on
CPU (gloo), where FSDP cannot run, DDP. Each rank normalises its loss sums by the **global** token
counts (all-reduced before the backward) times the world size, so the averaged gradients equal
those of one process on the whole batch, and the logged loss is the global one.
"""
from __future__ import annotations

import json
import math
import numbers
import os
import random
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist

from .flow import (FlowConfig, check_token_ids, combine, draw_batch, forward_samples, loss_counts, loss_terms,
                   seeded_generator)
from .text import pad_prompt

STAGE_LR = {1: 2e-4, 2: 5e-5}


# TrainConfig fields a resumed run must share with the checkpoint's (Trainer.load)
_RESUME_FIXED = ("stage", "lr", "betas", "weight_decay", "warmup_steps", "schedule", "min_lr_ratio", "flow",
                 "prompt_length")


@dataclass
class TrainConfig:
    stage: int = 1
    steps: int = 1000
    batch_size: int = 8  # global batch
    lr: float | None = None  # default: the paper's lr of the stage (2e-4 / 5e-5)
    betas: tuple = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup_steps: int = 100
    schedule: str = "constant"  # "constant" | "cosine" (after warm-up)
    min_lr_ratio: float = 0.1  # cosine floor
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    save_every: int = 0  # 0: only at the end
    out_dir: str | None = None
    progress: bool = True
    shard: str = "auto"  # "auto": FSDP2 on CUDA / DDP on CPU when world > 1; "fsdp": FSDP2 even on 1 GPU
    prompt_length: int = 0  # zero-pad prompt embeddings (and the empty prompt) to this many rows; 512: Wan's form
    flow: FlowConfig = field(default_factory=FlowConfig)

    def __post_init__(self):
        if self.stage not in (1, 2):
            raise ValueError(f"stage must be 1 (Knowledge Recall) or 2 (Capability Refinement), got {self.stage}")
        if self.steps < 0 or self.batch_size < 1:
            raise ValueError(f"steps must be >= 0 and batch_size >= 1, got {self.steps}, {self.batch_size}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if self.shard not in ("auto", "fsdp"):
            raise ValueError(f"shard must be 'auto' or 'fsdp', got {self.shard!r}")
        for name in ("steps", "batch_size", "warmup_steps", "save_every", "log_every", "seed", "prompt_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name} must be an int, got {value!r}")
            setattr(self, name, int(value))  # NumPy ints too (sweeps), stored as Python ints
        for name in ("warmup_steps", "save_every", "grad_clip", "weight_decay"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        betas = tuple(self.betas) if isinstance(self.betas, (list, tuple)) else ()
        if len(betas) != 2 or not all(isinstance(b, numbers.Real) and not isinstance(b, bool) and 0.0 <= b < 1.0
                                      for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1) (Adam's beta1, beta2), got {self.betas!r}")
        self.betas = tuple(float(b) for b in betas)

        if self.prompt_length < 0:
            raise ValueError(f"prompt_length must be >= 0 (0: unpadded prompts), got {self.prompt_length}")
        if self.log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {self.log_every}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        if self.lr is not None and not 0.0 < self.lr < math.inf:
            raise ValueError(f"lr must be a positive finite number, got {self.lr}")
        if isinstance(self.flow, dict):
            self.flow = FlowConfig(**self.flow)
        if self.lr is None:
            self.lr = STAGE_LR[self.stage]
        if self.steps and self.warmup_steps > self.steps:  # (== steps: the last step runs at lr)
            warnings.warn(f"warmup_steps={self.warmup_steps} > steps={self.steps}: the learning rate never reaches "
                          f"lr={self.lr:g} (it ends at {self.steps / self.warmup_steps:.2g} x lr)", stacklevel=3)


class ExampleSet:
    """In-memory training examples: ``latents``, ``prompt_embeds``, ``prompt_ids``, ``caption_ids``
    (lists, one entry per example) and ``null_prompt`` (the empty prompt's embedding, (L0, text_dim)).
    ``univigu_fast.data.VideoTextDataset`` and ``synthetic.SyntheticData`` both provide these."""

    def __init__(self, latents, prompt_embeds, prompt_ids, caption_ids, null_prompt):
        n = len(latents)
        if not (len(prompt_embeds) == len(prompt_ids) == len(caption_ids) == n) or n == 0:
            raise ValueError("latents, prompt_embeds, prompt_ids and caption_ids must be non-empty lists of equal length")
        self.latents, self.prompt_embeds, self.prompt_ids, self.caption_ids = latents, prompt_embeds, prompt_ids, caption_ids
        self.null_prompt = null_prompt

    @classmethod
    def wrap(cls, data) -> "ExampleSet":
        if isinstance(data, cls):
            return data
        return cls(data.latents, data.prompt_embeds, data.prompt_ids, data.caption_ids, data.null_prompt)

    def __len__(self):
        return len(self.latents)


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Example indices of global batch ``step``: consecutive slices of per-epoch permutations."""
    out = []
    pos = step * batch_size
    while len(out) < batch_size:
        epoch, off = divmod(pos, n)
        perm = torch.randperm(n, generator=seeded_generator(seed * 7919 + epoch))
        take = min(batch_size - len(out), n - off)
        out += perm[off:off + take].tolist()
        pos += take
    return out


def _dist():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _lr_lambda(cfg: TrainConfig):
    def f(step):
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        span = max(1, cfg.steps - cfg.warmup_steps)
        p = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))
    return f


def wrap_distributed(model, shard: str = "auto"):
    """FSDP2 on CUDA, DDP on CPU/gloo; the module is returned unchanged without a process group
    (or with one process, unless ``shard="fsdp"``, which shards even over one GPU)."""
    rank, world = _dist()
    if shard == "fsdp":
        if not (dist.is_available() and dist.is_initialized()) or model.device.type != "cuda":
            raise ValueError("shard='fsdp' needs an initialised process group and a CUDA model")
    elif world == 1:
        return model
    if model.device.type == "cuda":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, find_unused_parameters=True)


class Trainer:
    """Runs one stage. ``model``: a ``UniViGUModel`` (reference or fast); ``data``: an ``ExampleSet``-like."""

    def __init__(self, model, data, cfg: TrainConfig):
        self.cfg = cfg
        self.data = ExampleSet.wrap(data)
        self.model = model  # the module (its config, device, vocab_embed)
        self.rank, self.world = _dist()
        if cfg.batch_size % self.world:
            raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the world size {self.world}")
        c = model.config
        if c.in_channels != c.out_channels:  # the flow's target u = z1 - z0 lives in the input latents' space
            raise ValueError(f"training needs in_channels == out_channels (the velocity target z1 - z0 has the "
                             f"latents' channels), got in_channels={c.in_channels}, out_channels={c.out_channels}")
        # 16-bit weights have no float32 master copy: AdamW's update overflowed float16 (NaN weights after
        # the first step) and rounded most bf16 updates away. On CUDA the step runs under bf16 autocast.
        low = [(n, p.dtype) for n, p in model.named_parameters() if p.requires_grad and p.dtype != torch.float32]
        if low:
            raise TypeError(f"Trainer needs float32 trainable weights (bf16 autocast runs the CUDA step), got "
                            f"{low[0][0]} {low[0][1]} ({len(low)} such parameters): train model.float()")
        null = self.data.null_prompt
        if not isinstance(null, torch.Tensor) or null.dim() != 2 or null.shape[1] != c.text_dim \
                or not null.is_floating_point():
            raise ValueError(f"null_prompt (the empty prompt's embedding) must be a floating point (L0, text_dim="
                             f"{c.text_dim}) tensor, got {getattr(null, 'dtype', '')} "
                             f"{tuple(getattr(null, 'shape', ())) or type(null).__name__}")
        if not torch.isfinite(null).all():
            raise ValueError("null_prompt (the empty prompt's embedding) holds NaN or Inf values")
        if cfg.prompt_length and null.shape[0] > cfg.prompt_length:
            raise ValueError(f"null_prompt has {null.shape[0]} rows, more than prompt_length={cfg.prompt_length} "
                             "(the padded length)")
        if model.config.text_flow == "embedding":  # E is the fixed codebook of Eq. 7-8 (see flow.py)
            model.vocab_embed.weight.requires_grad_(False)
        n = cfg.flow.kappa_power
        if n is not None and n != model.config.kappa_power:
            # the model's config records the scheduler it is trained with: the samplers' default exponent
            model.config = replace(model.config, kappa_power=float(n))
        self.wrapped = wrap_distributed(model, cfg.shard)
        params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                                     foreach=False)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, _lr_lambda(cfg))
        self.step = 0
        self._checked: set[int] = set()  # example indices whose tensors passed ``example``
        self.closed = False
        self.history: list[dict] = []
        self.out = Path(cfg.out_dir) if cfg.out_dir else None
        if self.out and self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ one step
    def example(self, i: int) -> dict[str, torch.Tensor]:
        """Example ``i``'s tensors, checked the first time it is drawn (a bad example is named here, not by
        its batch position inside a step): latents ``(C, F, H, W)`` (F, H, W multiples of the patch size) and
        prompt embeddings ``(L <= prompt_length, text_dim)`` floating point and finite, ids 1-D integers in
        ``[0, vocab_size)`` (returned as int64)."""
        c, d = self.model.config, self.data
        ex = dict(latents=d.latents[i], prompt_embeds=d.prompt_embeds[i], prompt_ids=d.prompt_ids[i],
                  caption_ids=d.caption_ids[i])
        if i in self._checked:
            return {k: v.long() if k.endswith("_ids") else v for k, v in ex.items()}
        for key, ndim, width in (("latents", 4, None), ("prompt_embeds", 2, c.text_dim)):
            t = ex[key]
            if not isinstance(t, torch.Tensor) or t.dim() != ndim or not t.is_floating_point() or \
                    (width is not None and t.shape[-1] != width):
                form = "(C, F, H, W)" if ndim == 4 else f"(L, text_dim={c.text_dim})"
                raise ValueError(f"example {i}: {key} must be a floating point {form} tensor, got "
                                 f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
            if not torch.isfinite(t).all():
                raise ValueError(f"example {i}: {key} holds NaN or Inf values ({int((~torch.isfinite(t)).sum())} of "
                                 f"{t.numel()}); fix or drop the example")
        if ex["latents"].shape[0] != c.in_channels:
            raise ValueError(f"example {i}: latents have {ex['latents'].shape[0]} channels, expected "
                             f"in_channels={c.in_channels}")
        fhw = tuple(ex["latents"].shape[1:])
        if any(n == 0 or n % p for n, p in zip(fhw, c.patch_size)):
            raise ValueError(f"example {i}: latents (F, H, W) = {fhw} must be positive multiples of patch_size {c.patch_size}")
        L = ex["prompt_embeds"].shape[0]
        if self.cfg.prompt_length and L > self.cfg.prompt_length:
            raise ValueError(f"example {i}: prompt_embeds has {L} rows, more than prompt_length="
                             f"{self.cfg.prompt_length} (the padded length; raise it or preprocess shorter prompts)")
        for key in ("prompt_ids", "caption_ids"):
            check_token_ids(ex[key], f"example {i}: {key}", c.vocab_size)
            ex[key] = ex[key].long()
        self._checked.add(i)
        return ex

    @property
    def target_key(self) -> str:
        """The example ids a stage trains the text stream to write: the prompt (1), the caption (2)."""
        return "prompt_ids" if self.cfg.stage == 1 else "caption_ids"

    def targets(self, idx: Sequence[int]) -> list[torch.Tensor]:
        return [self.example(i)[self.target_key] for i in idx]

    def train_step(self) -> dict:
        cfg, model = self.cfg, self.model
        if self.closed and self.world > 1:
            raise RuntimeError("Trainer.close() released the distributed wrapper: this trainer cannot train further")
        idx = batch_indices(len(self.data), cfg.batch_size, self.step, cfg.seed)
        per = cfg.batch_size // self.world
        lo = self.rank * per
        mine = idx[lo:lo + per]
        exs = [self.example(i) for i in mine]
        ys = [e[self.target_key] for e in exs]
        prompts = [pad_prompt(e["prompt_embeds"], cfg.prompt_length) for e in exs]
        samples = draw_batch([e["latents"] for e in exs], prompts,
                             pad_prompt(self.data.null_prompt, cfg.prompt_length), ys, cfg=cfg.flow,
                             model_config=model.config, seed=cfg.seed,
                             step=self.step, index_offset=lo, generation_texts=[e["prompt_ids"] for e in exs])
        # global token counts first (they depend only on modes and lengths)
        counts = torch.tensor([float(c) for c in loss_counts(samples, model.config, cfg.flow.loss_unit)],
                              device=model.device)
        if self.world > 1:
            dist.all_reduce(counts)
        model.train()
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if model.device.type == "cuda" else None
        out = forward_samples(model, samples, forward=self.wrapped, autocast=autocast)
        terms = loss_terms(model, samples, out, cfg.flow.loss_unit)
        loss = combine(terms, cfg.flow, counts[0], counts[1]) * self.world  # DDP/FSDP average the grads
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        # the norm also without clipping (max inf: a no-op scale), for the finite check and the log
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
        # a host sync: a NaN / Inf loss or gradient must not reach the weights (one would ruin them all).
        # (Host floats: under FSDP2 the norm is a DTensor, which does not mix with the local loss.)
        loss_value, gnorm_value = float(loss.detach()), float(gnorm)
        finite = math.isfinite(loss_value) and math.isfinite(gnorm_value)
        if self.world > 1:  # the loss is each rank's share: every rank skips the update together
            flag = torch.tensor(float(finite), device=model.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            finite = bool(flag)
        if not finite:
            self.opt.zero_grad(set_to_none=True)
            raise FloatingPointError(f"step {self.step + 1}: non-finite loss ({loss_value:g} on this rank) or gradient "
                                     f"norm ({gnorm_value}) on examples {mine} (their inputs are finite: the model "
                                     "diverged); the weights were not updated. Resume from the last checkpoint with "
                                     "a lower grad_clip, or train into a new output folder with a lower lr")
        lr = self.opt.param_groups[0]["lr"]  # this step's (the scheduler moves it on for the next one)
        self.opt.step()
        self.sched.step()
        stats = torch.stack([terms["video_sum"].detach(), terms["text_sum"].detach(), terms["text_correct"],
                             terms["text_tokens"]]).float()
        if self.world > 1:
            dist.all_reduce(stats)
        vloss = float(stats[0] / counts[0].clamp_min(1))
        tloss = float(stats[1] / counts[1].clamp_min(1))
        rec = dict(step=self.step + 1, loss=cfg.flow.video_weight * vloss + cfg.flow.text_weight * tloss,
                   video_loss=vloss if counts[0] > 0 else None, text_loss=tloss if counts[1] > 0 else None,
                   text_acc=float(stats[2] / stats[3]) if stats[3] > 0 else None, lr=lr,
                   grad_norm=gnorm_value,
                   modes={m: sum(s.mode == m for s in samples) for m in ("joint", "understanding", "generation")},
                   dropped=sum(s.dropped for s in samples))
        self.step += 1
        return rec

    # ------------------------------------------------------------------ loop
    def train(self, steps: int | None = None) -> list[dict]:
        """Run until ``steps`` (default ``cfg.steps``) total steps; returns the records of this call."""
        end = self.cfg.steps if steps is None else steps
        recs = []
        bar = None
        if self.cfg.progress and self.rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=end, initial=self.step, desc=f"stage {self.cfg.stage}", dynamic_ncols=True, leave=False)
        t0 = time.time()
        log = self._open_log() if self.out and self.rank == 0 else None
        try:
            while self.step < end:
                rec = self.train_step()
                rec["seconds"] = time.time() - t0
                recs.append(rec)
                self.history.append(rec)
                if bar:
                    bar.update(1)
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", acc="-" if rec["text_acc"] is None else f"{rec['text_acc']:.2f}")
                if log and (self.step % self.cfg.log_every == 0 or self.step == end):
                    log.write(json.dumps({k: v for k, v in rec.items()}) + "\n")
                    log.flush()
                if self.out and self.cfg.save_every and self.step % self.cfg.save_every == 0:
                    self.save()
        finally:
            if bar:
                bar.close()
            if log:
                log.close()
        if self.out:
            self.save()
        return recs

    def _open_log(self):
        """``OUT/log.jsonl`` for appending, without the records of steps after ``self.step``: a run
        resumed from an older checkpoint (or a new run, at step 0) logs those steps again."""
        path = self.out / "log.jsonl"
        if path.exists():
            lines = path.read_text().splitlines()
            keep = [line for line in lines if _logged_step(line) <= self.step]
            if len(keep) != len(lines):
                tmp = path.with_name(path.name + f".tmp{os.getpid()}")
                tmp.write_text("".join(line + "\n" for line in keep))
                os.replace(tmp, path)
        return open(path, "a")

    def close(self) -> None:
        """Release the distributed wrapper (DDP's reducer holds a reference to the process group).

        Call it before ``dist.destroy_process_group()``: if the reducer instead outlives the group
        handle, its destruction drops the group's last reference from C++ with the GIL held, and
        gloo's worker threads, still freeing finished work (tensors whose release needs the GIL),
        deadlock with it (pytorch/pytorch#56297). Idempotent; a closed multi-process trainer refuses
        to train further (its gradients would no longer be averaged)."""
        self.closed = True
        if self.wrapped is not self.model:
            if self.world > 1:
                dist.barrier()  # every rank's last collective has completed
            self.wrapped = self.model
            import gc

            gc.collect()

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        msd, osd = get_state_dict(self.wrapped, self.opt,
                                  options=StateDictOptions(full_state_dict=True, cpu_offload=self.world > 1))
        return dict(model=msd, optimizer=osd, scheduler=self.sched.state_dict(), step=self.step,
                    data_position=dict(step=self.step, batch_size=self.cfg.batch_size, seed=self.cfg.seed),
                    rng=dict(torch=torch.get_rng_state(), python=random.getstate(),
                             cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None),
                    train_config=_jsonable(asdict(self.cfg)), model_config=self.model.config.to_dict())

    def save(self, path: str | Path | None = None) -> Path | None:
        """Atomic save (temporary file + rename) by rank 0; every rank must call it (collective)."""
        if path is None and self.out is None:
            raise ValueError("Trainer.save() needs a path, or TrainConfig(out_dir=...) to save OUT/checkpoint.pt in")
        path = Path(path) if path else (self.out / "checkpoint.pt")
        sd = self.state_dict()
        if self.rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + f".tmp{os.getpid()}")
            try:
                with open(tmp, "wb") as f:
                    torch.save(sd, f)
                    f.flush()
                    os.fsync(f.fileno())  # on disk before the rename: a power loss keeps one whole checkpoint
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)  # a failed save (disk full) leaves no partial file
        if self.world > 1:
            dist.barrier()
        return path

    def load(self, path: str | Path) -> None:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        sd = torch.load(path, map_location="cpu", weights_only=False)
        # settings a resume would silently override (the optimizer state carries the old lr / betas) or
        # mix with the old run's (stage targets, schedule, batches): refuse instead, before anything is loaded.
        # steps may grow (not under a cosine schedule, whose curve spans them).
        saved, now = sd.get("train_config", {}), _jsonable(asdict(self.cfg))
        # flow.kappa_power None means the model config's: the checkpoint's for the saved run, this one's now
        then_model = (sd.get("model_config") or {}).get("kappa_power", 1.0)
        for c, model_n in ((saved, then_model), (now, self.model.config.kappa_power)):
            if isinstance(c.get("flow"), dict) and c["flow"].get("kappa_power") is None:
                c["flow"] = {**c["flow"], "kappa_power": model_n}
        fixed = _RESUME_FIXED + (("steps",) if now["schedule"] == "cosine" else ())  # the cosine's span
        changed = {k: (saved[k], now[k]) for k in fixed if k in saved and saved[k] != now[k]}
        dp = sd["data_position"]
        for k in ("batch_size", "seed"):  # the batches a resumed run replays
            if dp[k] != now[k]:
                changed[k] = (dp[k], now[k])
        if changed:
            diff = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in changed.items())
            raise ValueError(f"{path} holds a run with other settings ({diff}): resume with the same settings or "
                             "train into a new output folder")
        # the model strictly (set_model_state_dict fills keys a full state dict lacks from the model itself)
        names = set(self.model.state_dict())
        if set(sd["model"]) != names:
            lacking, extra = sorted(names - set(sd["model"])), sorted(set(sd["model"]) - names)
            raise ValueError(f"{path} holds another model: it lacks {lacking[:6]} and has {extra[:6]} "
                             "(train into a new output folder)")
        set_model_state_dict(self.wrapped, sd["model"],
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
        # the optimizer not strictly: AdamW keeps no state for a parameter that has had no gradient yet (the
        # video head of an understanding-only run, the text head after generation-only steps), nor does the
        # checkpoint; the state the loader makes up for such a parameter (step 1, zero moments) is dropped,
        # so its first update after the resume is the uninterrupted run's
        set_optimizer_state_dict(self.wrapped, self.opt, sd["optimizer"],
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False,
                                                          strict=False))
        stateless = {id(p) for n, p in self.model.named_parameters() if n not in sd["optimizer"]["state"]}
        for p in [p for p in self.opt.state if id(p) in stateless]:
            del self.opt.state[p]
        self.sched.load_state_dict(sd["scheduler"])
        self.step = int(sd["step"])
        torch.set_rng_state(sd["rng"]["torch"])
        random.setstate(sd["rng"]["python"])
        if sd["rng"].get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(sd["rng"]["cuda"])

    def resume_if_possible(self) -> bool:
        if self.out and (self.out / "checkpoint.pt").exists():
            self.load(self.out / "checkpoint.pt")
            return True
        return False


def _logged_step(line: str) -> float:
    """The step of a log.jsonl line; inf for a blank or torn one (a run killed mid-write)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x
