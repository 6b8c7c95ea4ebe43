"""Text utilities: tokenizers and the reference decode of the text stream (DESIGN §2).

* Any Hugging Face tokenizer works; the default is Wan's umT5 tokenizer loaded from a local path
  (``load_tokenizer(path)``, or ``$UNIVIGU_TOKENIZER``; nothing is downloaded unless asked).
* ``tokenize``: strings -> padded ids ``(B, N)`` + ``text_lens (B,)``, the model's ``text`` input. As
  the public implementation, ids are the tokenizer's own (special tokens such as ``</s>`` kept),
  padded on the right; the model drops the padding via ``text_lens``.
* ``decode``: the text stream's output -> token ids. Discrete flow: ``argmax`` of the given logits
  over the V real tokens (the fused op without logits: ``decode_features`` or the model's
  ``text_output="argmax"``). Embedding flow (paper Eq. 8): ``argmax_v z . E_v`` against ``vocab_embed``,
  a ``(N, dim) x (dim, V)`` product reduced to one id per row through ``ops.linear_argmax`` (the fused
  kernel in the fast model, a plain matmul + argmax in the reference).
* ``detokenize``: ids -> strings, dropping the [MASK] id and ids the tokenizer does not know.
* ``pad_prompt``: a prompt's umT5 embedding zero-padded to 512 rows, the conditioning Wan's pipeline feeds.
"""
from __future__ import annotations

import numbers
import os
from pathlib import Path
from typing import Sequence

import torch

from .config import UniViGUConfig
from .packing import padded_lengths

DEFAULT_TOKENIZER_ENV = "UNIVIGU_TOKENIZER"
WAN_TEXT_LEN = 512  # umT5 rows Wan's pipeline pads every prompt (and the empty one) to: its max_sequence_length


def pad_prompt(embeds: torch.Tensor, length: int = WAN_TEXT_LEN) -> torch.Tensor:
    """Prompt embedding ``(L, text_dim)`` -> ``(length, text_dim)`` with zero rows after the ``L`` real ones,
    the form Wan's pipeline feeds (cross-attention sees the padding rows: through the text embedder they
    are not zero). ``length = 0`` returns the embedding unchanged."""
    if embeds.dim() != 2:
        raise ValueError(f"prompt embedding must be (L, text_dim), got {tuple(embeds.shape)}")
    if isinstance(length, bool) or not isinstance(length, numbers.Integral) or length < 0:
        raise ValueError(f"length must be an int >= 0 (0: unpadded), got {length!r}")
    length = int(length)
    if length == 0:
        return embeds
    if embeds.shape[0] > length:
        raise ValueError(f"prompt embedding has {embeds.shape[0]} rows, more than the padded length {length}")
    return torch.cat([embeds, embeds.new_zeros(length - embeds.shape[0], embeds.shape[1])])


def load_tokenizer(path: str | Path | None = None, *, local_files_only: bool = True, **kwargs):
    """Load a Hugging Face tokenizer (umT5's by default) from ``path``.

    ``path`` is a tokenizer folder, a Wan diffusers folder (its ``tokenizer/`` subfolder is used)
    or, with ``local_files_only=False``, a hub name. Without ``path`` the ``$UNIVIGU_TOKENIZER``
    environment variable names it.
    """
    from transformers import AutoTokenizer

    path = path if path is not None else os.environ.get(DEFAULT_TOKENIZER_ENV)
    if path is None:
        raise ValueError(f"load_tokenizer needs a path (umT5 tokenizer folder, e.g. <Wan2.1 folder>/tokenizer) "
                         f"or the {DEFAULT_TOKENIZER_ENV} environment variable")
    p = Path(path)
    if p.is_dir() and (p / "tokenizer").is_dir() and not (p / "tokenizer_config.json").exists():
        p = p / "tokenizer"
    return AutoTokenizer.from_pretrained(str(p) if p.exists() else str(path), local_files_only=local_files_only, **kwargs)


def tokenizer_vocab_size(tokenizer) -> int:
    """Ids the tokenizer can produce (base vocabulary plus added tokens)."""
    return len(tokenizer)


def check_tokenizer(tokenizer, config: UniViGUConfig) -> None:
    """Refuse a tokenizer whose ids would not fit the model's ``vocab_embed`` (``config.vocab_size``)."""
    n = tokenizer_vocab_size(tokenizer)
    if n > config.vocab_size:
        raise ValueError(f"tokenizer has {n} ids but config.vocab_size={config.vocab_size}: its ids would overflow "
                         f"vocab_embed")


def tokenize(tokenizer, texts: str | Sequence[str], *, max_length: int | None = None,
             config: UniViGUConfig | None = None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Strings -> ``(ids (B, N) int64, text_lens (B,) int64)`` for the model's ``text`` / ``text_lens``.

    Ids are right-padded with the tokenizer's pad id (0 when it has none) to the longest text. A text
    longer than ``max_length`` is cut by the tokenizer, so it keeps its end token (``</s>``) as Wan's
    prompts and ``univigu-fast preprocess`` do. With ``config`` the ids are checked against its vocabulary.
    """
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, Sequence) or not all(isinstance(t, str) for t in texts):
        raise TypeError(f"texts must be a string or a sequence of strings, got {type(texts).__name__}")
    if max_length is not None and max_length < 0:
        raise ValueError(f"max_length must be >= 0, got {max_length}")
    if config is not None:
        check_tokenizer(tokenizer, config)
    rows = []
    for t in texts:
        ids = list(tokenizer(t, add_special_tokens=True)["input_ids"])
        if max_length is not None and len(ids) > max_length:
            ids = list(tokenizer(t, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"])
            ids = ids[:max_length]  # a tokenizer whose special tokens alone exceed max_length
        rows.append(ids)
    lens = torch.tensor([len(r) for r in rows], dtype=torch.long)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return ids.to(device), lens.to(device)


def detokenize(tokenizer, ids: torch.Tensor | Sequence[torch.Tensor], text_lens: torch.Tensor | None = None,
               *, skip_special_tokens: bool = True) -> list[str]:
    """Ids ``(B, N)`` (with optional ``text_lens``) or a list of 1-D id tensors -> strings.

    Ids the tokenizer cannot decode (the [MASK] id ``vocab_size``, unused rows of a padded
    vocabulary) are dropped.
    """
    if isinstance(ids, torch.Tensor):
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2:
            raise ValueError(f"ids must be (B, N) or a list of (N,), got shape {tuple(ids.shape)}")
        B, N = ids.shape
        lens = [N] * B if text_lens is None else padded_lengths(text_lens, B, N)
        rows = [ids[i, :n] for i, n in enumerate(lens)]
    else:
        if text_lens is not None:
            raise ValueError("text_lens is only for a padded (B, N) ids tensor")
        rows = list(ids)
    rows = [r if isinstance(r, torch.Tensor) else torch.as_tensor(r) for r in rows]  # lists / NumPy rows too
    for i, r in enumerate(rows):  # logits or float "ids" were truncated to ints and decoded to nonsense
        if r.dim() != 1 or r.is_floating_point() or r.is_complex() or r.dtype == torch.bool:
            raise ValueError(f"ids[{i}] must be 1-D integer token ids, got {r.dtype} {tuple(r.shape)} (decode "
                             "logits with univigu_fast.text.decode first)")
    known = tokenizer_vocab_size(tokenizer)
    return [tokenizer.decode([int(i) for i in r.tolist() if 0 <= int(i) < known], skip_special_tokens=skip_special_tokens)
            for r in rows]


def decode(model, text_out: torch.Tensor | Sequence[torch.Tensor], text_lens: torch.Tensor | None = None):
    """The model's ``text_out`` -> token ids, with ``model.ops.linear_argmax``.

    Discrete flow: ``text_out`` are logits ``(.., text_vocab_size)``; the id is their argmax over the
    V real tokens (the mask source's [MASK] column is never decoded; to decode without
    forming the logits, call the model with ``text_output="argmax"``, or :func:`decode_features`,
    which go through ``ops.linear_argmax``). Embedding flow:
    ``text_out`` are embeddings ``(.., dim)`` (e.g. the final ``z`` of the text flow); the id is
    ``argmax_v z . E_v`` over the real vocabulary (paper Eq. 8). Padded rows (``text_lens``) get id 0.
    Returns ids mirroring the input form (``(B, N)`` tensor or a list of ``(N_i,)``).
    """
    c = model.config
    batched = isinstance(text_out, torch.Tensor)
    if batched:
        if text_out.dim() == 2:
            text_out = text_out[None]
        if text_out.dim() != 3:
            raise ValueError(f"text_out must be (B, N, width) or a list of (N, width), got shape {tuple(text_out.shape)}")
        B, N = text_out.shape[:2]
        lens = [N] * B if text_lens is None else padded_lengths(text_lens, B, N)
        rows = [text_out[i, :n] for i, n in enumerate(lens)]
    else:
        if text_lens is not None:
            raise ValueError("text_lens is only for a padded (B, N, width) text_out tensor")
        rows = list(text_out)
    if c.text_flow == "discrete":
        want = c.text_vocab_size
        if any(r.dim() != 2 or r.shape[-1] != want for r in rows):
            raise ValueError(f"text_out must be logits with width text_vocab_size={want} for text_flow='discrete'")
        ids = [r[:, : c.vocab_size].float().argmax(-1) for r in rows]  # the [MASK] column is never a token
    else:
        if any(r.dim() != 2 or r.shape[-1] != c.dim for r in rows):
            raise ValueError(f"text_out must be embeddings with width dim={c.dim} for text_flow='embedding'")
        E = model.vocab_embed.weight[: c.vocab_size]
        flat = torch.cat(rows) if rows else E.new_zeros(0, c.dim)
        out, _, _ = model.ops.linear_argmax(flat.to(E.dtype), E)
        ids = list(torch.split(out, [r.shape[0] for r in rows]))
    if not batched:
        return ids
    return torch.stack([torch.nn.functional.pad(i, (0, N - i.shape[0])) for i in ids])


def decode_features(model, features: torch.Tensor) -> torch.Tensor:
    """Head features ``(N, dim)`` (``text_head.features`` output) -> ids ``(N,)`` via the fused
    ``ops.linear_argmax`` over ``text_head.linear`` (discrete flow), without forming the logits."""
    c = model.config
    if c.text_flow != "discrete":
        raise ValueError("decode_features is for text_flow='discrete' (the head outputs logits)")
    if features.dim() != 2 or features.shape[-1] != c.dim:
        raise ValueError(f"features must be (N, dim={c.dim}), got shape {tuple(features.shape)}")
    ids, _, _ = model.ops.linear_argmax(features, *model.token_head())
    return ids
