"""Precomputed training examples and the preprocessing that makes them (issue 3, item 3).

**Format** (a directory)::

    meta.json                 {"format": "univigu-fast-examples", "version": 1, "count": N, "text_dim": D,
                               "latent_channels": 16, "prompt_tokens": [lo, hi], "caption_tokens": [lo, hi],
                               "shards": [...], "skipped": {...}, "sources": {...}}
    null_prompt.safetensors   "null_prompt_embeds" (L0, D): the empty prompt's embedding (condition
                              dropout / classifier-free guidance)
    shard_00000.safetensors   per example i: "{i}.latents" (C, F, H, W) Wan-VAE latents, normalised
                              with the VAE's latents_mean / latents_std as the Wan pipeline does;
                              "{i}.prompt_embeds" (L, D) umT5 last hidden state of the prompt's real
                              tokens (no padding); "{i}.prompt_ids" (Np,) int64; "{i}.caption_ids" (Nc,) int64

**Token-length constraints** (paper: prompts 0-128 tokens, detailed captions 128-256; both
configurable): a prompt longer than its maximum is truncated (as the tokenizer would); a caption
longer than its maximum is truncated; a caption (or prompt) shorter than its minimum is skipped and
counted in ``meta.json["skipped"]``.

``VideoTextDataset(path)`` reads the format lazily (``safetensors.safe_open``) and exposes the lists
the trainer takes (``latents``, ``prompt_embeds``, ``prompt_ids``, ``caption_ids``, ``null_prompt``).

**Preprocessing** (``preprocess``; CLI ``univigu-fast preprocess``): a JSONL manifest of
``{"video": path, "prompt": str, "caption": str}`` -> this format, with ``diffusers.AutoencoderKLWan``
and ``transformers`` umT5 (``UMT5EncoderModel`` + its tokenizer) loaded from **local** paths (a Wan
diffusers folder with ``vae/``, ``text_encoder/``, ``tokenizer/`` subfolders, or the folders
themselves). Videos are tensor files (``.pt``/``.safetensors`` key "video"/``.npy``) of frames
``(F, H, W, 3)`` uint8 or float in [0, 1]; other files are read with ``imageio`` if installed. The
frame count is cut to the largest ``4k + 1`` (the Wan VAE's temporal stride).
"""
from __future__ import annotations

import json
import operator
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .config import read_json

FORMAT = "univigu-fast-examples"
VERSION = 1


@dataclass(frozen=True)
class LengthConstraints:
    prompt: tuple[int, int] = (0, 128)
    caption: tuple[int, int] = (128, 256)

    def __post_init__(self):
        for name in ("prompt", "caption"):
            lo, hi = getattr(self, name)
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in (lo, hi)):
                raise TypeError(f"{name} token range must be two ints, got {(lo, hi)}")
            if not 0 <= lo <= hi or hi < 1:
                raise ValueError(f"{name} token range must satisfy 0 <= min <= max, max >= 1, got {(lo, hi)}")


class ExampleWriter:
    """Writes examples in shards of ``shard_size``; ``close()`` writes ``meta.json`` (context manager).

    Writing into a folder that already holds examples first removes its ``meta.json``: until ``close()``
    the folder is not readable, so an interrupted rewrite cannot leave new shards under the old meta."""

    def __init__(self, out: str | Path, *, text_dim: int, null_prompt: torch.Tensor,
                 lengths: LengthConstraints = LengthConstraints(), shard_size: int = 256, sources: dict | None = None):
        from safetensors.torch import save_file

        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        if not isinstance(shard_size, int) or shard_size < 1:
            raise ValueError(f"shard_size must be an int >= 1, got {shard_size!r}")
        if null_prompt.dim() != 2 or null_prompt.shape[1] != text_dim:
            raise ValueError(f"null_prompt must be (L0, text_dim={text_dim}), got {tuple(null_prompt.shape)}")
        (self.out / "meta.json").unlink(missing_ok=True)  # the folder is a dataset again at close()
        save_file({"null_prompt_embeds": null_prompt.detach().float().contiguous().cpu()}, str(self.out / "null_prompt.safetensors"))
        self.text_dim, self.lengths, self.shard_size = text_dim, lengths, shard_size
        self.buf: dict[str, torch.Tensor] = {}
        self.count, self.shards, self.channels = 0, [], None
        self.skipped = {"caption_too_short": 0, "prompt_too_short": 0}
        self.truncated = {"prompt": 0, "caption": 0}
        self.sources = sources or {}

    def add(self, latents: torch.Tensor, prompt_embeds: torch.Tensor, prompt_ids: torch.Tensor,
            caption_ids: torch.Tensor, *, prompt_truncated: bool = False, caption_truncated: bool = False) -> bool:
        """Adds one example (applies the length constraints); returns False if it was skipped.

        Texts over the maximum are cut to it here (their embeddings row-wise). ``preprocess`` instead
        tokenizes and encodes them at the maximum (keeping ``</s>``) and passes ``*_truncated`` so
        that they are counted in ``meta["truncated"]``."""
        if latents.dim() != 4:
            raise ValueError(f"latents must be (C, F, H, W), got {tuple(latents.shape)}")
        if self.channels is not None and latents.shape[0] != self.channels:
            raise ValueError(f"latents have {latents.shape[0]} channels, earlier examples {self.channels}")
        if prompt_embeds.dim() != 2 or prompt_embeds.shape[1] != self.text_dim:
            raise ValueError(f"prompt_embeds must be (L, text_dim={self.text_dim}), got {tuple(prompt_embeds.shape)}")
        for name, ids in (("prompt_ids", prompt_ids), ("caption_ids", caption_ids)):
            if ids.dim() != 1 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
                raise ValueError(f"{name} must be 1-D integer ids, got {ids.dtype} {tuple(ids.shape)}")
            if ids.numel() and int(ids.min()) < 0:
                raise ValueError(f"{name} must be >= 0, got min {int(ids.min())}")
        if prompt_embeds.shape[0] != prompt_ids.numel():
            raise ValueError(f"prompt_embeds has {prompt_embeds.shape[0]} rows for {prompt_ids.numel()} prompt_ids")
        if self.skips(prompt_ids.numel(), caption_ids.numel()):
            return False
        self.channels = latents.shape[0]
        (_, phi), (_, chi) = self.lengths.prompt, self.lengths.caption
        if prompt_ids.numel() > phi:
            prompt_ids, prompt_embeds, prompt_truncated = prompt_ids[:phi], prompt_embeds[:phi], True
        if caption_ids.numel() > chi:
            caption_ids, caption_truncated = caption_ids[:chi], True
        self.truncated["prompt"] += bool(prompt_truncated)
        self.truncated["caption"] += bool(caption_truncated)
        i = self.count
        self.buf.update({f"{i}.latents": latents.detach().float().contiguous().cpu(),
                         f"{i}.prompt_embeds": prompt_embeds.detach().float().contiguous().cpu(),
                         f"{i}.prompt_ids": prompt_ids.long().contiguous().cpu(),
                         f"{i}.caption_ids": caption_ids.long().contiguous().cpu()})
        self.count += 1
        if self.count % self.shard_size == 0:
            self._flush()
        return True

    def skips(self, prompt_len: int, caption_len: int) -> bool:
        """Whether an example with texts of these lengths is below the minimums (then counted as skipped)."""
        if prompt_len < self.lengths.prompt[0]:
            self.skipped["prompt_too_short"] += 1
            return True
        if caption_len < self.lengths.caption[0]:
            self.skipped["caption_too_short"] += 1
            return True
        return False

    def _flush(self):
        from safetensors.torch import save_file

        if not self.buf:
            return
        name = f"shard_{len(self.shards):05d}.safetensors"
        save_file(self.buf, str(self.out / name))
        first = min(int(k.split(".")[0]) for k in self.buf)
        self.shards.append(dict(file=name, first=first, count=len(self.buf) // 4))
        self.buf = {}

    def close(self) -> dict:
        self._flush()
        if self.count == 0:
            warnings.warn(f"{self.out}: no example written (skipped: {self.skipped}); a trainer cannot use it",
                          stacklevel=2)
        meta = dict(format=FORMAT, version=VERSION, count=self.count, text_dim=self.text_dim,
                    latent_channels=self.channels, prompt_tokens=list(self.lengths.prompt),
                    caption_tokens=list(self.lengths.caption), shards=self.shards, skipped=self.skipped,
                    truncated=self.truncated, sources=self.sources)
        tmp = self.out / "meta.json.tmp"
        tmp.write_text(json.dumps(meta, indent=1) + "\n")
        tmp.replace(self.out / "meta.json")
        return meta

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()
        return False


class _Field(Sequence):
    def __init__(self, ds: "VideoTextDataset", key: str):
        self.ds, self.key = ds, key

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.ds.get(i, self.key)


class VideoTextDataset:
    """Reads a directory written by ``ExampleWriter`` / ``preprocess`` (lazily, shard by shard)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"{meta_path} not found: not a univigu-fast examples directory")
        self.meta = read_json(meta_path)
        if not isinstance(self.meta, dict) or self.meta.get("format") != FORMAT:
            fmt = self.meta.get("format") if isinstance(self.meta, dict) else type(self.meta).__name__
            raise ValueError(f"{meta_path}: format {fmt!r}, expected {FORMAT!r}")
        if self.meta.get("version") != VERSION:
            raise ValueError(f"{meta_path}: version {self.meta.get('version')!r}, this univigu-fast reads {VERSION}")
        for key, kind in (("count", int), ("shards", list)):
            if not isinstance(self.meta.get(key), kind):
                raise ValueError(f"{meta_path}: {key!r} must be a{'n' if kind is int else ''} {kind.__name__}, "
                                 f"got {self.meta.get(key)!r}")
        self.null_prompt = self._read_null_prompt()
        self._where = {}
        for sh in self.meta["shards"]:
            if not (isinstance(sh, dict) and isinstance(sh.get("file"), str) and isinstance(sh.get("first"), int)
                    and isinstance(sh.get("count"), int)):
                raise ValueError(f"{meta_path}: a shard entry must be {{file, first, count}}, got {sh!r}")
            for i in range(sh["first"], sh["first"] + sh["count"]):
                if i in self._where:
                    raise ValueError(f"{meta_path}: example {i} is in both {self._where[i]} and {sh['file']}")
                self._where[i] = sh["file"]
        if sorted(self._where) != list(range(self.meta["count"])):
            raise ValueError(f"{meta_path}: its shards hold examples {_ranges(sorted(self._where))}, "
                             f"count says 0..{self.meta['count'] - 1}")
        self._open: dict[str, tuple] = {}  # shard file -> (its stat when opened, safe_open handle)
        self.latents, self.prompt_embeds = _Field(self, "latents"), _Field(self, "prompt_embeds")
        self.prompt_ids, self.caption_ids = _Field(self, "prompt_ids"), _Field(self, "caption_ids")

    def __len__(self):
        return int(self.meta["count"])

    def __getstate__(self):  # open shard handles do not pickle (DataLoader workers under spawn): reopened lazily
        return {**self.__dict__, "_open": {}}

    def _shard(self, f: str):
        """The open handle of shard ``f`` (a truncated or foreign file is named). A handle maps the file: one
        whose file changed since it was opened (rewritten in place, truncated: reading past its new end
        would kill the process with SIGBUS) is reopened."""
        from safetensors import safe_open

        path = self.path / f
        try:
            st = path.stat()
            now = (st.st_ino, st.st_size, st.st_mtime_ns)
            if f not in self._open or self._open[f][0] != now:
                self._open[f] = (now, safe_open(str(path), framework="pt"))
        except Exception as e:  # noqa: BLE001 -- a missing file; SafetensorError names no file
            raise ValueError(f"{path}: not a readable safetensors shard ({type(e).__name__}: {e})") from None
        return self._open[f][1]

    def _read_null_prompt(self) -> torch.Tensor:
        from .conversion import read_safetensors

        path = self.path / "null_prompt.safetensors"
        t = read_safetensors(path, "the empty prompt's embedding").get("null_prompt_embeds")
        text_dim = self.meta.get("text_dim")
        if t is None or t.dim() != 2 or not t.is_floating_point() or (text_dim is not None and t.shape[1] != text_dim):
            raise ValueError(f"{path}: must hold null_prompt_embeds, a float (L0, text_dim={text_dim}) tensor, got "
                             f"{'none' if t is None else f'{t.dtype} {tuple(t.shape)}'}")
        return t.clone()  # our own memory, not a view of the file's pages (a rewrite of the file would change it)

    def get(self, i: int, key: str) -> torch.Tensor:
        """Example ``i``'s ``key`` tensor, checked against ``meta.json`` (a corrupt or foreign shard fails
        here, naming the file, not deep in a training step)."""
        i = operator.index(i)  # ints and integer 0-d tensors (a shuffled torch.randperm index)
        if not -len(self) <= i < len(self):
            raise IndexError(f"example {i} out of range for {len(self)} examples")
        i = i % len(self)
        f = self._where[i]
        shard = self._shard(f)
        if f"{i}.{key}" not in shard.keys():
            raise ValueError(f"{self.path / f}: has no {i}.{key} (meta.json places example {i} in it)")
        # a copy: the handle's tensors view the file's pages, which a rewrite of the file (or an in-place
        # change by a caller, seen by every later read) would change under a running job
        t = shard.get_tensor(f"{i}.{key}").clone()
        if key == "latents":
            ok = t.dim() == 4 and t.is_floating_point() and t.shape[0] == self.meta.get("latent_channels", t.shape[0])
            want = f"float (C={self.meta.get('latent_channels')}, F, H, W)"
        elif key == "prompt_embeds":
            ok = t.dim() == 2 and t.is_floating_point() and t.shape[1] == self.meta.get("text_dim", t.shape[1])
            want = f"float (L, text_dim={self.meta.get('text_dim')})"
        else:
            ok = t.dim() == 1 and t.dtype == torch.long and (t.numel() == 0 or int(t.min()) >= 0)
            want = "int64 (N,) ids >= 0"
        if not ok:
            raise ValueError(f"{self.path / f}: {i}.{key} is {t.dtype} {tuple(t.shape)}, expected {want}")
        return t

    def __getitem__(self, i: int) -> dict:
        ex = {k: self.get(i, k) for k in ("latents", "prompt_embeds", "prompt_ids", "caption_ids")}
        if ex["prompt_embeds"].shape[0] != ex["prompt_ids"].numel():
            raise ValueError(f"{self.path / self._where[i % len(self)]}: example {i} has {ex['prompt_embeds'].shape[0]} "
                             f"prompt_embeds rows for {ex['prompt_ids'].numel()} prompt_ids")
        return ex


def _ranges(ids: list[int]) -> str:
    """[0, 1, 2, 5, 6] -> '0..2, 5..6'."""
    if not ids:
        return "none"
    out, lo = [], ids[0]
    for a, b in zip(ids, ids[1:] + [None]):
        if b != a + 1:
            out.append(f"{lo}..{a}")
            lo = b
    return ", ".join(out)


# ---------------------------------------------------------------------------- preprocessing
def _sub(path: Path, name: str) -> Path:
    return path / name if (path / name).is_dir() else path


def load_video(path: str | Path) -> torch.Tensor:
    """Frames ``(F, H, W, 3)`` -> float ``(3, F, H, W)`` in [-1, 1]."""
    path = Path(path)
    if path.suffix == ".pt":
        v = torch.load(path, map_location="cpu", weights_only=True)
    elif path.suffix == ".safetensors":
        from safetensors.torch import load_file

        v = load_file(str(path))["video"]
    elif path.suffix == ".npy":
        import numpy as np

        v = torch.from_numpy(np.load(path))
    else:
        try:
            import imageio.v3 as iio
        except ImportError as e:
            raise ValueError(f"cannot read {path}: install imageio[pyav] for {path.suffix} videos, or give a "
                             ".pt/.safetensors/.npy tensor of frames (F, H, W, 3)") from e
        v = torch.from_numpy(iio.imread(path))
    if not isinstance(v, torch.Tensor) or v.dim() != 4 or v.shape[-1] != 3:
        raise ValueError(f"{path}: expected frames (F, H, W, 3), got {getattr(v, 'shape', type(v).__name__)}")
    if v.is_floating_point():
        v = v.float()
        if v.numel() and (v.min() < 0 or v.max() > 1):
            raise ValueError(f"{path}: float frames must lie in [0, 1], got [{v.min():.3g}, {v.max():.3g}] "
                             "(give uint8 frames for 0..255)")
    elif v.dtype == torch.uint8:
        v = v.float() / 255.0
    else:
        raise ValueError(f"{path}: frames must be uint8 (0..255) or float in [0, 1], got {v.dtype}")
    return (v.permute(3, 0, 1, 2) * 2 - 1).clamp(-1, 1)


def preprocess(manifest: str | Path, out: str | Path, *, model_path: str | Path | None = None,
               vae_path: str | Path | None = None, text_encoder_path: str | Path | None = None,
               tokenizer_path: str | Path | None = None, lengths: LengthConstraints = LengthConstraints(),
               device: str = "cpu", dtype: torch.dtype = torch.float32, shard_size: int = 256,
               progress: bool = True) -> dict:
    """Manifest (JSONL: video, prompt, caption) -> the examples directory ``out``. Returns meta."""
    from diffusers import AutoencoderKLWan
    from transformers import AutoTokenizer, UMT5EncoderModel

    rows, base = [], Path(manifest).parent
    for k, line in enumerate(Path(manifest).read_text().splitlines()):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{manifest} line {k + 1}: not JSON ({e})") from None
        if not isinstance(r, dict):
            raise ValueError(f"{manifest} line {k + 1}: expected a JSON object {{video, prompt, caption}}, "
                             f"got {type(r).__name__}")
        missing = {"video", "prompt", "caption"} - set(r)
        if missing:
            raise ValueError(f"{manifest} line {k + 1}: missing {sorted(missing)}")
        bad = [f for f in ("video", "prompt", "caption") if not isinstance(r[f], str)]
        if bad:
            raise ValueError(f"{manifest} line {k + 1}: {', '.join(bad)} must be strings, got "
                             f"{', '.join(type(r[f]).__name__ for f in bad)}")
        vp = Path(r["video"])
        r["video"] = vp if vp.is_absolute() else base / vp
        if not r["video"].is_file():  # checked before the first (slow) encode, not when the loop reaches it
            raise FileNotFoundError(f"{manifest} line {k + 1}: video {r['video']} not found")
        rows.append((k + 1, r))
    if not rows:
        raise ValueError(f"{manifest}: no examples (expected JSON lines of video, prompt, caption)")
    root = Path(model_path) if model_path else None
    if root is None and not (vae_path and text_encoder_path and tokenizer_path):
        raise ValueError("give model_path (a Wan diffusers folder) or all of vae_path, text_encoder_path, tokenizer_path")
    vae_p = Path(vae_path) if vae_path else _sub(root, "vae")
    te_p = Path(text_encoder_path) if text_encoder_path else _sub(root, "text_encoder")
    tok_p = Path(tokenizer_path) if tokenizer_path else _sub(root, "tokenizer")
    vae = AutoencoderKLWan.from_pretrained(vae_p, local_files_only=True).to(device, dtype).eval()
    te = UMT5EncoderModel.from_pretrained(te_p, local_files_only=True).to(device, dtype).eval()
    tok = AutoTokenizer.from_pretrained(tok_p, local_files_only=True)
    # pixels per latent-patch side: the VAE's spatial stride (Wan's pipeline: 2 ** len(temperal_downsample))
    # x the transformer's 2 x 2 patch; Wan's pipeline requires sizes divisible by it (16)
    pixel_multiple = 2 ** len(vae.config.temperal_downsample) * 2
    mean = torch.tensor(vae.config.latents_mean).view(-1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(-1, 1, 1, 1)

    def tokenize(text: str, max_len: int) -> tuple[list[int], bool]:
        """Ids of ``text``, cut by the tokenizer to ``max_len`` (so a cut text still ends in ``</s>``, as Wan's
        prompts do); and whether it was cut."""
        ids = tok(text).input_ids
        if len(ids) <= max_len:
            return ids, False
        return tok(text, truncation=True, max_length=max_len).input_ids, True

    @torch.no_grad()
    def embed(ids: list[int]) -> torch.Tensor:
        """umT5 hidden states of the ids (the text encoded at its stored length)."""
        x = torch.tensor([ids], dtype=torch.long, device=device)
        return te(x, attention_mask=torch.ones_like(x)).last_hidden_state[0].float().cpu()

    null = embed(tok("").input_ids)  # the empty prompt: just </s>
    writer = ExampleWriter(out, text_dim=null.shape[1], null_prompt=null, lengths=lengths, shard_size=shard_size,
                           sources=dict(vae=str(vae_p), text_encoder=str(te_p), tokenizer=str(tok_p), manifest=str(manifest)))
    it = rows
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(rows, desc="preprocess")
    with torch.no_grad():
        for line, r in it:
            pids, p_cut = tokenize(r["prompt"], lengths.prompt[1])
            cids, c_cut = tokenize(r["caption"], lengths.caption[1])
            if writer.skips(len(pids), len(cids)):  # too short: not worth encoding the video
                continue
            try:
                x = load_video(r["video"])
            except Exception as e:
                raise ValueError(f"{manifest} line {line}: cannot read video {r['video']}: {e}") from e
            _, frames, height, width = x.shape
            if frames < 1 or height % pixel_multiple or width % pixel_multiple:
                raise ValueError(f"{manifest} line {line}: video {r['video']} has {frames} frames of {height} x {width}; "
                                 f"expected >= 1 frame, height and width multiples of {pixel_multiple}")
            f = (frames - 1) // 4 * 4 + 1
            lat = vae.encode(x[None, :, :f].to(device, dtype)).latent_dist.mode()[0].float().cpu()
            lat = (lat - mean) / std
            writer.add(lat, embed(pids), torch.tensor(pids, dtype=torch.long), torch.tensor(cids, dtype=torch.long),
                       prompt_truncated=p_cut, caption_truncated=c_cut)
    return writer.close()
