"""Checkpoint conversion and IO (DESIGN §3).

* ``from_wan``: a diffusers ``WanTransformer3DModel`` (object or folder with config.json + safetensors
  shards) or an original Wan2.1 state dict -> our names; the text stream is initialised as the
  config says (``init_text_stream``).
* ``from_uni_vigu``: a checkpoint of the public implementation (``torch.save``d dict, weights under
  ``"model"``, prefixes ``_fsdp_wrapped_module.`` / ``_orig_mod.`` stripped), config inferred from
  the weight shapes when not given. Its names are ours, so it is a plain ``load_state_dict``.
* ``save_pretrained`` / ``from_pretrained``: ``config.json`` + ``model.safetensors``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .config import UniViGUConfig

# diffusers top-level name -> our name(s); blocks are identical.
_DIFFUSERS_TOP = {
    "condition_embedder.time_embedder.": ("time_embedding_v.time_embedder.",),
    "condition_embedder.time_proj.": ("time_embedding_v.time_proj.",),
    "condition_embedder.text_embedder.": ("cond_text_embedder.",),
    "scale_shift_table": ("scale_shift_table_v",),
    "proj_out.": ("video_head.proj_out.",),
    "patch_embedding.": ("patch_embedding.",),
}

# original Wan2.1 (wan/modules/model.py) -> diffusers names; Wan's norm3 (cross-attention norm,
# affine) is diffusers' norm2, Wan's norm2 (FFN norm) has no parameters.
_WAN_ORIGINAL = [
    (r"^time_embedding\.0\.", "condition_embedder.time_embedder.linear_1."),
    (r"^time_embedding\.2\.", "condition_embedder.time_embedder.linear_2."),
    (r"^text_embedding\.0\.", "condition_embedder.text_embedder.linear_1."),
    (r"^text_embedding\.2\.", "condition_embedder.text_embedder.linear_2."),
    (r"^time_projection\.1\.", "condition_embedder.time_proj."),
    (r"^head\.modulation$", "scale_shift_table"),
    (r"^head\.head\.", "proj_out."),
    (r"\.modulation$", ".scale_shift_table"),
    (r"\.self_attn\.q\.", ".attn1.to_q."),
    (r"\.self_attn\.k\.", ".attn1.to_k."),
    (r"\.self_attn\.v\.", ".attn1.to_v."),
    (r"\.self_attn\.o\.", ".attn1.to_out.0."),
    (r"\.self_attn\.norm_q\.", ".attn1.norm_q."),
    (r"\.self_attn\.norm_k\.", ".attn1.norm_k."),
    (r"\.cross_attn\.q\.", ".attn2.to_q."),
    (r"\.cross_attn\.k\.", ".attn2.to_k."),
    (r"\.cross_attn\.v\.", ".attn2.to_v."),
    (r"\.cross_attn\.o\.", ".attn2.to_out.0."),
    (r"\.cross_attn\.norm_q\.", ".attn2.norm_q."),
    (r"\.cross_attn\.norm_k\.", ".attn2.norm_k."),
    (r"\.norm3\.", ".norm2."),
    (r"\.ffn\.0\.", ".ffn.net.0.proj."),
    (r"\.ffn\.2\.", ".ffn.net.2."),
]
_PREFIXES = ("_fsdp_wrapped_module.", "_orig_mod.", "module.")


def wan_original_to_diffusers(state_dict: dict) -> dict:
    """Rename an original Wan2.1 transformer state dict to diffusers' ``WanTransformer3DModel`` names."""
    out = {}
    for key, value in state_dict.items():
        new = key
        for pattern, repl in _WAN_ORIGINAL:
            new = re.sub(pattern, repl, new)
        out[new] = value
    return out


def diffusers_to_ours(state_dict: dict) -> dict:
    """diffusers ``WanTransformer3DModel`` names -> ours (video path only)."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith("blocks."):
            out[key] = value
            continue
        for prefix, targets in _DIFFUSERS_TOP.items():
            if key.startswith(prefix):
                for target in targets:
                    out[target + key[len(prefix):]] = value
                break
        else:
            if key.startswith("rope.") or key.startswith("norm_out."):
                continue  # buffers / parameter-free
            raise KeyError(f"unexpected WanTransformer3DModel key {key!r}")
    return out


def _config_from_wan_state(sd: dict, wan_config: dict | None, text_fields: dict) -> UniViGUConfig:
    if wan_config is not None:
        names = set(UniViGUConfig.__dataclass_fields__)
        return UniViGUConfig(**{k: v for k, v in wan_config.items() if k in names and not k.startswith("_")}, **text_fields)
    return _infer_config(diffusers_to_ours(sd), text_fields, head_dim=text_fields.pop("attention_head_dim", 128))


def _load_folder_state(folder: Path) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    cfg = json.loads((folder / "config.json").read_text())
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {folder}")
    sd = {}
    for f in files:
        sd.update(load_file(str(f)))
    return sd, cfg


def from_wan(cls, source, config: UniViGUConfig | None = None, **text_fields):
    """Build ``cls`` from Wan2.1 weights; see the module docstring for the three sources."""
    wan_config = None
    if isinstance(source, torch.nn.Module):
        sd = source.state_dict()
        wan_config = dict(source.config)
    elif isinstance(source, (str, Path)):
        folder = Path(source)
        if (folder / "transformer" / "config.json").exists():
            folder = folder / "transformer"
        sd, wan_config = _load_folder_state(folder)
    elif isinstance(source, dict):
        sd = wan_original_to_diffusers({_strip(k): v for k, v in source.items()})
    else:
        raise TypeError(f"from_wan expects a WanTransformer3DModel, a folder path or a state dict, got {type(source).__name__}")
    if config is None:
        config = _config_from_wan_state(sd, wan_config, dict(text_fields))
    elif text_fields:
        raise ValueError("pass either config or text-stream fields, not both")
    model = cls(config)
    ours = diffusers_to_ours(sd)
    missing, unexpected = model.load_state_dict(ours, strict=False)
    if unexpected:
        raise ValueError(f"unexpected keys from the Wan checkpoint: {unexpected[:8]}")
    model.init_text_stream()
    text_stream = ("vocab_embed.", "time_embedding_t.", "scale_shift_table_t", "text_head.", "rotary_emb_text.", ".ffn_t.")
    not_text = [k for k in missing if not any(t in k or k.startswith(t) for t in text_stream)]
    if not_text:
        raise ValueError(f"Wan checkpoint lacks video-path weights: {not_text[:8]}")
    return model


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
        key = key.replace("._fsdp_wrapped_module.", ".").replace("._orig_mod.", ".")
    return key


def _infer_config(sd: dict, overrides: dict, head_dim: int | None = None) -> UniViGUConfig:
    """Config from weight shapes (public-implementation names)."""
    pe = sd["patch_embedding.weight"]
    dim, in_channels, *patch = pe.shape
    if "rotary_emb_text.inv_freq" in sd:
        inv = sd["rotary_emb_text.inv_freq"].double()
        head_dim = 2 * inv.numel()
        base = float(inv[1] ** (-head_dim / 2)) if inv.numel() > 1 else 10000.0
        if abs(base - round(base)) < 1e-3 * base:  # undo fp32 rounding of the stored frequencies
            base = float(round(base))
    else:
        base = 10000.0
    layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    text_rows = sd["vocab_embed.weight"].shape[0] if "vocab_embed.weight" in sd else None
    head_out = sd["text_head.linear.weight"].shape[0] if "text_head.linear.weight" in sd else None
    fields = dict(
        patch_size=tuple(patch), num_attention_heads=dim // head_dim, attention_head_dim=head_dim,
        in_channels=in_channels, out_channels=sd["video_head.proj_out.weight"].shape[0] // (patch[0] * patch[1] * patch[2]),
        text_dim=sd["cond_text_embedder.linear_1.weight"].shape[1],
        freq_dim=sd["time_embedding_v.time_embedder.linear_1.weight"].shape[1],
        ffn_dim=sd["blocks.0.ffn.net.0.proj.weight"].shape[0], num_layers=layers,
        cross_attn_norm="blocks.0.norm2.weight" in sd, text_rope_base=base,
    )
    if text_rows is not None:
        source = overrides.get("discrete_source", "uniform")
        fields["vocab_size"] = text_rows - (1 if source == "mask" else 0)
        if head_out is not None:
            fields["text_flow"] = "discrete" if head_out == text_rows else "embedding"
    fields.update(overrides)
    return UniViGUConfig(**fields)


def from_uni_vigu(cls, ckpt, config: UniViGUConfig | None = None, **overrides):
    """Load a public-implementation checkpoint (path or dict) into ``cls``; strict key match.

    Shapes cannot tell the ``mask`` source (``vocab_embed`` has V + 1 rows) from ``uniform`` (V rows):
    pass ``discrete_source="mask"`` for a checkpoint trained with the mask source."""
    if isinstance(ckpt, (str, Path)):
        ckpt = torch.load(str(ckpt), map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict):
        raise TypeError(f"ckpt must be a path or a dict, got {type(ckpt).__name__}")
    sd = ckpt["model"] if "model" in ckpt and isinstance(ckpt["model"], dict) else ckpt
    sd = {_strip(k): v for k, v in sd.items()}
    if config is None:
        config = _infer_config(sd, overrides)
    elif overrides:
        raise ValueError("pass either config or overrides, not both")
    model = cls(config)
    model.load_state_dict(sd, strict=True)
    return model


def save_pretrained(model, path) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.config.save(path / "config.json")
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(sd, str(path / "model.safetensors"))


def from_pretrained(cls, path, *, device=None, dtype=None):
    from safetensors.torch import load_file

    path = Path(path)
    model = cls(UniViGUConfig.load(path / "config.json"))
    model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
    return model.to(device=device, dtype=dtype) if (device or dtype) else model
