"""``UniViGUModelBase``: parameters, input handling and the forward of Uni-ViGU (DESIGN §3).

The reference model (``univigu_fast.reference.UniViGUModel``) and the fast one
(``univigu_fast.UniViGUModel``) are this class with different ``ops``.

Forward contract::

    model(video_latents, tau_video, encoder_hidden_states, text=None, tau_text=None, text_lens=None)
        -> UniViGUOutput(video_velocity, text_out)

* ``video_latents``: ``(B, C, F, H, W)`` or a list of ``(C, F, H, W)`` of different sizes.
* ``tau_video`` / ``tau_text``: ``(B,)`` in [0, 1], the paper's time (0 noise, 1 data). Wan's network
  sees ``t = 1000 (1 - tau_video)``; the text time embedder ``round(1000 (1 - tau_text))`` as the
  public implementation. ``video_velocity`` is the paper's ``u = z1 - z0`` (= minus Wan's output).
* ``encoder_hidden_states``: ``(B, L, text_dim)`` prompt embeddings, or a list of ``(L_i, text_dim)``.
* ``text``: ids ``(B, N)`` (``text_flow="discrete"``) or embeddings ``(B, N, dim)`` (``"embedding"``),
  with optional ``text_lens (B,)`` (padding is dropped, its outputs are zero), or a list of
  per-sample tensors; ``None`` means no text stream (then the model is exactly Wan2.1).
* ``text_out``: logits ``(.., V)`` / velocity ``(.., dim)``; with ``text_output="argmax"`` or
  ``"sample"`` (``sample_seed``, ``temperature``) a ``TextDecoded(ids, max_logit, logsumexp)`` from the
  fused decode op instead (discrete flow: the head's linear over the V real tokens, the [MASK] column
  of the mask source is never decoded and not in the two statistics; embedding flow: the row's embedding
  velocity is returned unchanged, decode it with ``decode_embeddings``); with ``text_output="none"``
  ``None``: the text head is not run (a pass whose text output is not used, e.g. generation's or a
  guidance pass's); with ``text_output="cross_entropy"`` and ``text_target`` (ids of the text's form,
  ``IGNORE_INDEX`` where not counted; discrete flow) a ``TextLoss(loss, correct)`` per token from the fused
  linear cross-entropy, the ``(N, V)`` logits never formed (training). Outputs mirror the input form
  (batched tensors or lists).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import numbers
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import UniViGUConfig
from .kernels._utils import describe, host_to_device
from .kernels.linear_argmax import check_decode_args
from .modules import TextHead, TextProjection, TimeEmbedding, UniViGUBlock, VideoHead
from .ops import Ops, autocast_dtype
from .packing import PackedBatch, padded_lengths
from .video_cache import check_video_cache

logger = logging.getLogger("univigu_fast")


class UniViGUOutput(NamedTuple):
    video_velocity: torch.Tensor | list[torch.Tensor]
    text_out: torch.Tensor | list[torch.Tensor] | None


class TextDecoded(NamedTuple):
    ids: torch.Tensor | list[torch.Tensor]
    max_logit: torch.Tensor | list[torch.Tensor]
    logsumexp: torch.Tensor | list[torch.Tensor]


class TextLoss(NamedTuple):
    """``text_output="cross_entropy"``: per token, fp32 ``loss`` (0 where the target is ``IGNORE_INDEX``)
    and ``correct`` (bool: the argmax is the target; False where ignored)."""
    loss: torch.Tensor | list[torch.Tensor]
    correct: torch.Tensor | list[torch.Tensor]


IGNORE_INDEX = -100  # a text_target position not counted (as torch.nn.functional.cross_entropy)


class TextRope(nn.Module):
    """``rotary_emb_text.inv_freq``: 1-D RoPE frequencies over the full head dim (base ``text_rope_base``)."""

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim)))

    def _apply(self, fn, recurse=True):
        # the frequencies stay float32 when the model is cast (``.to(torch.bfloat16)``, ``.half()``): in
        # bf16 they are off by up to 0.4% and the angles at position 256 by up to 0.3 rad (diffusers
        # likewise keeps Wan's rope in float32)
        inv_freq = self.inv_freq
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != inv_freq.dtype and inv_freq.dtype == torch.float32:
            self.inv_freq = inv_freq.to(device=self.inv_freq.device)
        return self


class UniViGUModelBase(nn.Module):
    ops: Ops  # set by subclasses

    def __init__(self, config: UniViGUConfig):
        super().__init__()
        self.config = c = config
        dim = c.dim
        self.vocab_embed = nn.Embedding(c.text_vocab_size, dim)
        self.patch_embedding = nn.Conv3d(c.in_channels, dim, kernel_size=c.patch_size, stride=c.patch_size)
        self.time_embedding_v = TimeEmbedding(c.freq_dim, dim)
        self.time_embedding_t = TimeEmbedding(c.freq_dim, dim)
        self.cond_text_embedder = TextProjection(c.text_dim, dim)
        self.rotary_emb_text = TextRope(c.head_dim, c.text_rope_base)
        self.blocks = nn.ModuleList(
            UniViGUBlock(dim, c.ffn_dim, c.num_attention_heads, c.eps, c.cross_attn_norm) for _ in range(c.num_layers)
        )
        self.scale_shift_table_v = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)
        self.scale_shift_table_t = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)
        self.video_head = VideoHead(dim, c.out_channels * c.patch_volume)
        self.text_head = TextHead(dim, c.text_out_dim)
        if c.text_ffn_init == "copy":
            for block in self.blocks:
                block.ffn_t.load_state_dict(block.ffn.state_dict())

    # ------------------------------------------------------------------ helpers
    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    def init_text_stream(self) -> None:
        """(Re)initialise what a Wan checkpoint lacks: vocab embedding, text time embedder (a copy of
        the video one), text head table (a copy of the video one), zero text head, ``ffn_t`` per
        ``text_ffn_init`` (a copy of ``ffn``, or fresh)."""
        with torch.no_grad():
            nn.init.normal_(self.vocab_embed.weight)  # rows at the scale of N(0, I) noise (DESIGN §2)
            self.time_embedding_t.load_state_dict(self.time_embedding_v.state_dict())
            self.scale_shift_table_t.copy_(self.scale_shift_table_v)
            nn.init.ones_(self.text_head.norm_final.weight)
            nn.init.zeros_(self.text_head.linear.weight)
            nn.init.zeros_(self.text_head.linear.bias)
            for block in self.blocks:
                if self.config.text_ffn_init == "copy":
                    block.ffn_t.load_state_dict(block.ffn.state_dict())
                else:
                    for lin in (block.ffn_t.net[0].proj, block.ffn_t.net[2]):
                        lin.reset_parameters()

    # ------------------------------------------------------------------ input handling
    def _prepare(self, video_latents, tau_video, encoder_hidden_states, text, tau_text, text_lens):
        c = self.config
        batched_video = isinstance(video_latents, torch.Tensor)
        if batched_video:
            if video_latents.dim() != 5:
                raise ValueError(f"video_latents must be (B, C, F, H, W) or a list of (C, F, H, W), got shape {tuple(video_latents.shape)}")
            if video_latents.shape[0] == 0:
                raise ValueError(f"video_latents must hold at least one video (B >= 1), got shape {tuple(video_latents.shape)}")
            videos = list(video_latents.unbind(0))
        elif isinstance(video_latents, (list, tuple)) and video_latents:
            videos = list(video_latents)
        else:
            raise TypeError(f"video_latents must be a tensor (B, C, F, H, W) or a non-empty list of (C, F, H, W), got {type(video_latents).__name__}")
        B = len(videos)
        pt, ph, pw = c.patch_size
        grids = []
        for i, v in enumerate(videos):
            if not isinstance(v, torch.Tensor) or v.dim() != 4:
                raise ValueError(f"video_latents[{i}] must be (C, F, H, W), got {getattr(v, 'shape', type(v).__name__)}")
            if v.shape[0] != c.in_channels:
                raise ValueError(f"video_latents[{i}] has {v.shape[0]} channels, expected in_channels={c.in_channels}")
            if not v.is_floating_point():
                raise TypeError(f"video_latents must be floating point, got {v.dtype}")
            f, h, w = v.shape[1:]
            if f % pt or h % ph or w % pw or f == 0 or h == 0 or w == 0:
                raise ValueError(f"video_latents[{i}] (F, H, W) = {(f, h, w)} must be positive multiples of patch_size {c.patch_size}")
            grids.append((f // pt, h // ph, w // pw))
        dtype = videos[0].dtype
        if any(v.dtype != dtype for v in videos):
            raise TypeError(f"video_latents mix dtypes: {sorted({str(v.dtype) for v in videos})}")

        tau_video = self._check_tau(tau_video, B, "tau_video")
        # prompts
        if isinstance(encoder_hidden_states, torch.Tensor):
            if encoder_hidden_states.dim() != 3 or encoder_hidden_states.shape[0] != B:
                raise ValueError(f"encoder_hidden_states must be (B={B}, L, text_dim) or a list, got shape {tuple(encoder_hidden_states.shape)}")
            prompts = list(encoder_hidden_states.unbind(0))
        elif isinstance(encoder_hidden_states, (list, tuple)) and len(encoder_hidden_states) == B:
            prompts = list(encoder_hidden_states)
        else:
            raise TypeError(f"encoder_hidden_states must be a (B, L, text_dim) tensor or a list of B tensors (B={B})")
        for i, p in enumerate(prompts):
            if not isinstance(p, torch.Tensor) or p.dim() != 2 or p.shape[-1] != c.text_dim:
                raise ValueError(f"encoder_hidden_states[{i}] must be (L, text_dim={c.text_dim}), got {getattr(p, 'shape', None)}")
            if p.dtype != dtype:
                raise TypeError(f"encoder_hidden_states dtype {p.dtype} does not match video_latents dtype {dtype}")

        # text
        batched_text = isinstance(text, torch.Tensor)
        texts: list[torch.Tensor] = []
        if text is None:
            if tau_text is not None or text_lens is not None:
                raise ValueError("tau_text / text_lens given without text")
            texts = [None] * B
            tau_text = torch.zeros(B, device=tau_video.device)
        else:
            discrete = c.text_flow == "discrete"
            if batched_text:
                want = 2 if discrete else 3
                if text.dim() != want or text.shape[0] != B:
                    form = "(B, N) token ids" if discrete else "(B, N, dim) embeddings"
                    raise ValueError(f"text must be {form} with B={B} for text_flow={c.text_flow!r}, got shape {tuple(text.shape)}")
                texts = list(text.unbind(0))
                if text_lens is not None:
                    texts = [t[:n] for t, n in zip(texts, padded_lengths(text_lens, B, text.shape[1]))]
            elif isinstance(text, (list, tuple)) and len(text) == B:
                if text_lens is not None:
                    raise ValueError("text_lens is only for a padded (B, N) text tensor; a list carries its lengths")
                texts = list(text)
            else:
                raise TypeError(f"text must be a tensor or a list of B={B} tensors, got {type(text).__name__}")
            self._check_text_rows(texts, dtype)
            if discrete:
                self._check_token_range(texts)
            tau_text = self._check_tau(tau_text, B, "tau_text")
        return dict(videos=videos, grids=grids, batched_video=batched_video, tau_video=tau_video, prompts=prompts,
                    texts=texts, batched_text=batched_text, has_text=text is not None, tau_text=tau_text,
                    text_width=text.shape[1] if batched_text else None)

    @staticmethod
    def _check_tau(tau, B, name):
        if tau is None:
            raise ValueError(f"{name} is required")
        try:
            t = torch.as_tensor(tau)  # its own dtype first: complex / bool values are refused, not cast
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"{name} must be a real number or a ({B},) tensor in [0, 1], got {tau!r} ({e})") from None
        if t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"{name} must be a real number or a ({B},) tensor in [0, 1], got {describe(t)}")
        tau = t.float()
        if tau.dim() == 0:
            tau = tau.expand(B)
        if tau.shape != (B,):
            raise ValueError(f"{name} must have shape ({B},), got {tuple(tau.shape)}")
        if torch.isnan(tau).any() or (tau < 0).any() or (tau > 1).any():
            raise ValueError(f"{name} must lie in [0, 1] (paper convention: 0 = noise, 1 = data), got {tau.tolist()}")
        return tau

    # ------------------------------------------------------------------ forward
    def forward(self, video_latents, tau_video, encoder_hidden_states, text=None, tau_text=None, text_lens=None, *,
                text_output: str = "full", sample_seed: int | None = None, temperature: float = 1.0,
                text_target=None, video_cache=None) -> UniViGUOutput:
        _check_text_output(text_output, sample_seed, temperature, _FORWARD_TEXT_OUTPUTS, self.config.text_flow)
        inp = self._prepare(video_latents, tau_video, encoder_hidden_states, text, tau_text, text_lens)
        inp["targets"] = self._text_targets(text_output, text_target, inp)
        c, ops, dev, dtype = self.config, self.ops, self.device, self.dtype
        videos, texts, B = inp["videos"], inp["texts"], len(inp["videos"])
        text_lens_list = [0 if t is None else t.shape[0] for t in texts]
        packed = PackedBatch.build(inp["grids"], text_lens_list, [p.shape[0] for p in inp["prompts"]],
                                   c.head_dim, self.rotary_emb_text.inv_freq, dev)

        # embeddings
        video_tokens = self._patchify(videos, dtype, dev)
        if inp["has_text"]:
            if c.text_flow == "discrete":
                ids = torch.cat([t.to(dev) for t in texts]).long()
                text_rows = self.vocab_embed(ids)
            else:
                text_rows = torch.cat([t.to(dev, dtype) for t in texts])
            text_tokens = list(torch.split(text_rows, text_lens_list))
        else:
            text_tokens = [video_tokens[0].new_zeros(0, c.dim)] * B
        x = packed.pack(video_tokens, text_tokens)
        context = self.cond_text_embedder(torch.cat([p.to(dev, dtype) for p in inp["prompts"]]))
        if video_cache is not None:
            check_video_cache(video_cache, self)
            video_cache.context = context

        # Wan's time convention at the boundary (DESIGN §2)
        temb_v, proj_v = self.time_embedding_v(host_to_device(1000.0 * (1.0 - inp["tau_video"]), dev))
        temb_t, proj_t = self.time_embedding_t(host_to_device(torch.round(1000.0 * (1.0 - inp["tau_text"])), dev))
        seg_temb = torch.stack([proj_v.float(), proj_t.float()], 1).flatten(0, 1)  # (2B, 6, dim): v_0, t_0, ...

        if video_cache is not None:  # a full step that (re)fills the video-stream cache
            video_cache.begin_capture(packed)
        for i, block in enumerate(self.blocks):
            x = block(ops, x, context, seg_temb, packed, kv=video_cache.layer(i) if video_cache is not None else None)
        if video_cache is not None:
            video_cache.end_capture()

        # heads
        video_rows, text_rows = packed.unpack(x)
        shift_v, scale_v = (self.scale_shift_table_v.float() + temb_v.float()[:, None]).unbind(1)
        video_out = []
        for i, rows in enumerate(video_rows):
            h = (F.layer_norm(rows.float(), (c.dim,), eps=c.eps) * (1 + scale_v[i]) + shift_v[i]).type_as(rows)
            video_out.append(-self._unpatchify(self.video_head.proj_out(h), inp["grids"][i]))  # u = -(Wan's output)
        video_velocity = torch.stack(video_out) if inp["batched_video"] and _same_shapes(video_out) else video_out
        if inp["batched_video"] and not isinstance(video_velocity, torch.Tensor):
            video_velocity = torch.stack(video_out)

        text_out = None
        if inp["has_text"] and text_output != "none":
            text_out = self._text_head(text_rows, temb_t, text_lens_list, inp, text_output, sample_seed, temperature)
        return UniViGUOutput(video_velocity, text_out)

    def _text_head(self, text_rows, temb_t, text_lens_list, inp, text_output, sample_seed, temperature):
        """Per-sample text rows -> logits / velocity, or ids through the fused decode op."""
        c, ops = self.config, self.ops
        shift_t, scale_t = (self.scale_shift_table_t.float() + temb_t.float()[:, None]).unbind(1)

        def per_row(t):  # (B, dim) -> (sum(lens), dim); no lengths tensor copied to the device (a sync)
            return torch.cat([r.expand(n, -1) for r, n in zip(t, text_lens_list)])

        rows = torch.cat(text_rows)
        feats = self.text_head.features(rows, per_row(shift_t), per_row(scale_t))
        lin = self.text_head.linear
        if text_output == "cross_entropy":
            return self._text_loss(feats, torch.cat(inp["targets"]), text_lens_list, inp)
        if text_output == "full" or c.text_flow == "embedding":
            return self._shape_text(list(torch.split(lin(feats), text_lens_list)), inp)
        seed = int(sample_seed) if text_output == "sample" else None
        ids, mx, lse = ops.linear_argmax(feats, *self.token_head(), gumbel_seed=seed, temperature=temperature)
        parts = [list(torch.split(t, text_lens_list)) for t in (ids, mx, lse)]
        return TextDecoded(*(self._shape_text(p, inp, pad_value=0) for p in parts))

    def _text_loss(self, feats, target, text_lens_list, inp) -> TextLoss:
        """Per-token cross-entropy of ``text_head.linear`` (all its rows: the mask source's [MASK] is a
        class the model learns not to predict) through the fused op, and argmax == target."""
        lin = self.text_head.linear
        dt = autocast_dtype(feats) or feats.dtype  # the operands F.linear would see
        x, w, b = feats.to(dt), lin.weight.to(dt), None if lin.bias is None else lin.bias.to(dt)
        loss = self.ops.linear_cross_entropy(x, w, target, b, ignore_index=IGNORE_INDEX, reduction="none")
        with torch.no_grad():
            ids = self.ops.linear_argmax(x.detach(), w.detach(), None if b is None else b.detach())[0]
        parts = [list(torch.split(t, text_lens_list)) for t in (loss, ids == target)]
        return TextLoss(*(self._shape_text(p, inp, pad_value=0) for p in parts))

    def _text_targets(self, text_output, text_target, inp) -> list[torch.Tensor] | None:
        """``text_target`` in the text's form (a list of (N_i,) ids, or a padded (B, N) tensor cut by
        ``text_lens``), checked: integer ids in ``[0, text_out_dim)`` or ``IGNORE_INDEX``."""
        if text_output != "cross_entropy":
            if text_target is not None:
                raise ValueError(f"text_target is for text_output='cross_entropy' (it would be ignored with {text_output!r})")
            return None
        c, texts = self.config, inp["texts"]
        if c.text_flow != "discrete":
            raise ValueError("text_output='cross_entropy' is for text_flow='discrete' (the embedding flow's text "
                             "output is a velocity)")
        if not inp["has_text"]:
            raise ValueError("text_output='cross_entropy' needs text")
        if text_target is None:
            raise ValueError("text_output='cross_entropy' needs text_target (the target ids)")
        if isinstance(text_target, torch.Tensor) and inp["batched_text"]:
            if text_target.shape != (len(texts), inp["text_width"]):
                raise ValueError(f"text_target must have the text's shape {(len(texts), inp['text_width'])}, "
                                 f"got {tuple(text_target.shape)}")
            targets = [t[: x.shape[0]] for t, x in zip(text_target.unbind(0), texts)]
        elif isinstance(text_target, (list, tuple)) and not inp["batched_text"] and len(text_target) == len(texts):
            targets = list(text_target)
        else:
            form = f"a ({len(texts)}, N) tensor" if inp["batched_text"] else f"a list of {len(texts)} tensors"
            raise TypeError(f"text_target must have the text's form ({form}), got {type(text_target).__name__}"
                            f"{'' if not isinstance(text_target, (list, tuple)) else f' of {len(text_target)}'}")
        for i, (t, x) in enumerate(zip(targets, texts)):
            if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.is_floating_point() or t.is_complex() \
                    or t.dtype == torch.bool or t.shape[0] != x.shape[0]:
                raise ValueError(f"text_target[{i}] must be ({x.shape[0]},) integer ids like text[{i}], got "
                                 f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
        flat = torch.cat([t.reshape(-1) for t in targets]).to(self.device).long()
        bad = (flat != IGNORE_INDEX) & ((flat < 0) | (flat >= c.text_out_dim))
        if bool(bad.any()):  # a host sync, as the cross-entropy's own check
            raise ValueError(f"text_target has ids outside [0, {c.text_out_dim}) that are not IGNORE_INDEX="
                             f"{IGNORE_INDEX}: {flat[bad][:4].tolist()}")
        return list(torch.split(flat, [t.shape[0] for t in targets]))

    def token_head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``text_head.linear``'s weight and bias over the V real tokens, what decoding ranks: the mask
        source's [MASK] row (index V) is never a decoded token."""
        lin, V = self.text_head.linear, self.config.vocab_size
        return lin.weight[:V], None if lin.bias is None else lin.bias[:V]

    def _check_text_rows(self, texts, dtype: torch.dtype | None) -> None:
        """Per-sample text: 1-D integer ids (discrete) or ``(N, dim)`` embeddings of ``dtype`` (embedding
        flow; ``None``: any float dtype)."""
        c = self.config
        for i, t in enumerate(texts):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"text[{i}] must be a tensor, got {type(t).__name__}")
            if c.text_flow == "discrete":
                if t.dim() != 1 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                    raise ValueError(f"text[{i}] must be 1-D integer token ids for text_flow='discrete', got {t.dtype} {tuple(t.shape)}")
            else:
                if t.dim() != 2 or t.shape[-1] != c.dim:
                    raise ValueError(f"text[{i}] must be (N, dim={c.dim}) embeddings for text_flow='embedding', got {tuple(t.shape)}")
                if dtype is None and not t.is_floating_point():
                    raise TypeError(f"text[{i}] must be floating point embeddings, got {t.dtype}")
                if dtype is not None and t.dtype != dtype:
                    raise TypeError(f"text dtype {t.dtype} does not match video_latents dtype {dtype}")

    def _check_token_range(self, texts) -> None:
        """Token ids in ``[0, text_vocab_size)`` (one host sync for the whole batch when on a GPU)."""
        n = self.config.text_vocab_size
        if not any(t.numel() for t in texts):
            return
        lo, hi = torch.stack(torch.aminmax(torch.cat([t.reshape(-1) for t in texts]))).tolist()
        if lo < 0 or hi >= n:
            bad = next(i for i, t in enumerate(texts) if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n))
            raise ValueError(f"text[{bad}] has token ids outside [0, text_vocab_size={n}): "
                             f"min {int(texts[bad].min())}, max {int(texts[bad].max())}")

    @torch.no_grad()
    def text_step(self, video_cache, text, tau_text, *, text_output: str = "full", sample_seed: int | None = None,
                  temperature: float = 1.0):
        """A text-only denoising step on a filled video-stream cache (understanding, ``tau_video = 1``).

        Only the text tokens run: per layer their queries attend to the cached video keys/values plus
        their own fresh ones, then cross-attention and the text expert FFN. ``text``: a list of
        per-sample ids / embeddings of the lengths the cache was built for (ids on the CPU are range-checked;
        ids on a GPU are not, which would cost a host sync per step: ``forward`` checks them). Returns ``text_out`` as
        ``forward`` does (list form). The layers run as a CUDA graph replay when the cache was made
        with ``cuda_graph=True`` (``VideoCache.run_text_layers``); the decode head runs eagerly. Inference
        only: it runs under ``torch.no_grad()`` (it writes into the cache's buffers), and under
        ``torch.inference_mode()`` when the full step did. A cache whose model's weights, dtype or device
        changed since its full step is refused (``VideoCache.check_ready``)."""
        c = self.config
        _check_text_output(text_output, sample_seed, temperature, ("full", "argmax", "sample"), c.text_flow)
        check_video_cache(video_cache, self)
        video_cache.check_ready(self)
        if not isinstance(text, (list, tuple)):
            raise TypeError(f"text must be a list of per-sample token ids / embeddings, got {type(text).__name__}")
        texts = list(text)
        self._check_text_rows(texts, None)
        if c.text_flow == "discrete" and all(t.is_cpu for t in texts):
            self._check_token_range(texts)
        lens = [t.shape[0] for t in texts]
        view = video_cache.text_view(lens)
        tau_text = self._check_tau(tau_text, len(texts), "tau_text")
        # the mode of the cache's buffers, whatever the caller's: buffers filled under inference_mode are
        # inference tensors (updated in that mode only), others are updated (and a CUDA graph's static
        # inputs made) outside it
        with _buffer_mode(video_cache.keys[0].is_inference()):
            return self._text_step(video_cache, view, texts, lens, tau_text, text_output, sample_seed, temperature)

    def _text_step(self, video_cache, view, texts, lens, tau_text, text_output, sample_seed, temperature):
        c, dev, dtype = self.config, self.device, self.dtype
        if c.text_flow == "discrete":
            rows = self.vocab_embed(torch.cat([t.to(dev) for t in texts]).long())
        else:
            rows = torch.cat([t.to(dev, dtype) for t in texts])
        temb_t, proj_t = self.time_embedding_t(host_to_device(torch.round(1000.0 * (1.0 - tau_text)), dev))
        seg_temb = torch.stack([torch.zeros_like(proj_t, dtype=torch.float32), proj_t.float()], 1).flatten(0, 1)
        x = video_cache.run_text_layers(functools.partial(self._text_layers, video_cache, view), rows, seg_temb)
        inp = {"batched_text": False}
        return self._text_head(list(torch.split(x, lens)), temb_t, lens, inp, text_output, sample_seed, temperature)

    def _text_layers(self, video_cache, view: PackedBatch, x: torch.Tensor, seg_temb: torch.Tensor) -> torch.Tensor:
        """The blocks of a text-only step: x (Lt, dim) text rows -> (Lt, dim)."""
        for i, block in enumerate(self.blocks):
            x = block(self.ops, x, video_cache.context, seg_temb, view, kv=video_cache.layer(i))
        return x

    def _patchify(self, videos, dtype, dev) -> list[torch.Tensor]:
        if all(v.shape == videos[0].shape for v in videos):
            out = self.patch_embedding(torch.stack(videos).to(dev, dtype))
            return list(out.flatten(2).transpose(1, 2).unbind(0))
        return [self.patch_embedding(v[None].to(dev, dtype)).flatten(2).transpose(1, 2)[0] for v in videos]

    def _unpatchify(self, rows: torch.Tensor, grid) -> torch.Tensor:
        f, h, w = grid
        pt, ph, pw = self.config.patch_size
        x = rows.reshape(f, h, w, pt, ph, pw, -1).permute(6, 0, 3, 1, 4, 2, 5)
        return x.reshape(-1, f * pt, h * ph, w * pw)

    @staticmethod
    def _shape_text(parts: list[torch.Tensor], inp, pad_value: float = 0.0):
        if not inp["batched_text"]:
            return parts
        N = inp["text_width"]
        padded = [F.pad(p, [0, 0] * (p.dim() - 1) + [0, N - p.shape[0]], value=pad_value) for p in parts]
        return torch.stack(padded)

    # ------------------------------------------------------------------ constructors / IO
    @classmethod
    def from_wan(cls, source, config: UniViGUConfig | None = None, *, variant: str | None = None, **kwargs):
        """From a diffusers ``WanTransformer3DModel``, a diffusers or original-release Wan2.1 folder
        (``variant="fp16"``: its fp16 weight files), a single weights file or a state dict in either
        layout. Keywords: ``subfolder``, ``device``, ``dtype`` / ``torch_dtype``, and the config's
        text-stream fields (``vocab_size``, ``text_flow``, ...)."""
        from .conversion import from_wan

        return from_wan(cls, source, config, variant=variant, **kwargs)

    @classmethod
    def from_uni_vigu(cls, ckpt, config: UniViGUConfig | None = None, **kwargs):
        """From a checkpoint of the public implementation or a univigu-fast training checkpoint (path or
        dict); config stored or inferred when omitted. Keywords: ``device``, ``dtype`` / ``torch_dtype``,
        and config overrides."""
        from .conversion import from_uni_vigu

        return from_uni_vigu(cls, ckpt, config, **kwargs)

    def save_pretrained(self, path, *, max_shard_size="10GB") -> None:
        """``config.json`` + ``model.safetensors`` (sharded, with an index, over ``max_shard_size``)."""
        from .conversion import save_pretrained

        save_pretrained(self, path, max_shard_size=max_shard_size)

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        """A ``save_pretrained`` folder; keywords ``subfolder``, ``device``, ``dtype`` / ``torch_dtype``."""
        from .conversion import from_pretrained

        return from_pretrained(cls, path, **kwargs)


@contextlib.contextmanager
def _buffer_mode(inference: bool):
    if inference:
        with torch.inference_mode():
            yield
    else:  # (inference_mode(False) alone would turn autograd back on)
        with torch.inference_mode(False), torch.no_grad():
            yield


_FORWARD_TEXT_OUTPUTS = ("full", "argmax", "sample", "cross_entropy", "none")


def _check_text_output(text_output, sample_seed, temperature, choices=_FORWARD_TEXT_OUTPUTS,
                       text_flow: str = "discrete") -> None:
    if text_output not in choices:
        raise ValueError(f"text_output must be {', '.join(map(repr, choices[:-1]))} or {choices[-1]!r}, "
                         f"got {text_output!r}")
    if text_output == "sample" and sample_seed is None:
        raise ValueError("text_output='sample' needs sample_seed")
    if text_output != "sample" and sample_seed is not None:
        raise ValueError(f"sample_seed is for text_output='sample' (it would be ignored with {text_output!r})")
    if text_output not in ("argmax", "sample") and temperature != 1.0:
        raise ValueError(f"temperature is for text_output='argmax' / 'sample' (it would be ignored with "
                         f"{text_output!r}: the full logits are not rescaled)")
    if sample_seed is not None and (isinstance(sample_seed, bool) or not isinstance(sample_seed, numbers.Integral)
                                    or not 0 <= sample_seed < 2**63):
        raise ValueError(f"sample_seed must be an int in [0, 2**63), got {sample_seed!r}")
    check_decode_args(temperature, None if sample_seed is None else int(sample_seed))
    if text_flow != "discrete" and (sample_seed is not None or temperature != 1.0):  # (they were ignored)
        raise ValueError("sample_seed / temperature are for text_flow='discrete': the embedding flow's text output "
                         "is its velocity, nothing is sampled")


def _same_shapes(ts: Sequence[torch.Tensor]) -> bool:
    return all(t.shape == ts[0].shape for t in ts)
