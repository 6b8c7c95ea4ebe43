"""Checkpoint conversion and IO (DESIGN §3).

* ``from_wan``: a diffusers ``WanTransformer3DModel`` (object or folder with config.json + safetensors
  shards), an original Wan2.1 release folder (its ``WanModel`` config.json and weights), a state dict
  in either layout or a single weights file (``.safetensors`` / ``torch.save``; sizes read off the
  weights, ``attention_head_dim`` 128 unless given) -> our names; the text stream is initialised as
  the config says (``init_text_stream``).
* ``from_uni_vigu``: a checkpoint of the public implementation (``torch.save``d dict, weights under
  ``"model"`` (or ``"state_dict"`` / ``"module"``), prefixes ``_fsdp_wrapped_module.`` / ``_orig_mod.`` stripped), config inferred from
  the weight shapes when not given. Its names are ours, so it is a plain ``load_state_dict``.
* ``save_pretrained`` / ``from_pretrained``: ``config.json`` + ``model.safetensors``.

Every loader returns the model in eval mode (diffusers' convention; ``.train()`` before training).
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from .config import UMT5_VOCAB_SIZE, UniViGUConfig, read_json, unknown_field_hints

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
_PREFIXES = ("_fsdp_wrapped_module.", "_orig_mod.", "module.", "model.diffusion_model.")  # the last: ComfyUI single files
# names only a Uni-ViGU checkpoint has (the text stream)
_TEXT_STREAM = ("vocab_embed.", "time_embedding_t.", "scale_shift_table_t", "text_head.", "rotary_emb_text.", ".ffn_t.")


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


def _wan_config_fields(wan_config: dict) -> dict:
    """Our config fields from a Wan ``config.json``: diffusers' ``WanTransformer3DModel`` names, or the
    original release's ``WanModel`` ones (``dim``, ``num_heads``, ``in_dim``, ``out_dim``, ...; fields
    it leaves out take Wan's defaults, which are ours)."""
    if "dim" in wan_config and "num_heads" in wan_config:
        if wan_config.get("model_type", "t2v") != "t2v":
            raise ValueError(f"Wan model_type {wan_config['model_type']!r} is not supported: Uni-ViGU extends the "
                             "text-to-video model (model_type 't2v')")
        dim, heads = wan_config["dim"], wan_config["num_heads"]
        renamed = {"num_attention_heads": heads, "attention_head_dim": dim // heads,
                   "in_channels": wan_config.get("in_dim"), "out_channels": wan_config.get("out_dim"),
                   "patch_size": wan_config.get("patch_size"), "cross_attn_norm": wan_config.get("cross_attn_norm"),
                   **{k: wan_config.get(k) for k in ("ffn_dim", "freq_dim", "text_dim", "num_layers", "eps")}}
        if "qk_norm" in wan_config:  # a bool there: RMSNorm over all heads' q / k, or none
            renamed["qk_norm"] = "rms_norm_across_heads" if wan_config["qk_norm"] else None
        return {k: (tuple(v) if k == "patch_size" else v) for k, v in renamed.items() if v is not None}
    names = set(UniViGUConfig.__dataclass_fields__)
    return {k: v for k, v in wan_config.items() if k in names and not k.startswith("_")}


def _config_from_wan_state(ours: dict, wan_config: dict | None, text_fields: dict) -> UniViGUConfig:
    """The config of a Wan checkpoint (``ours``: its weights under our names) with ``text_fields``."""
    if wan_config is not None:
        fields = _wan_config_fields(wan_config)
        fixed = sorted(set(fields) & set(text_fields))
        if fixed:
            raise ValueError(f"from_wan: {fixed} come from the Wan checkpoint's config; pass text-stream fields only "
                             "(or a complete config=UniViGUConfig(...))")
        # sizes the config.json leaves out (the original release lists only some) are read off the weights
        shapes = _shape_config(ours, fields.get("attention_head_dim", 128))
        return UniViGUConfig(**{**{k: getattr(shapes, k) for k in _SHAPE_FIELDS}, **fields}, **text_fields)
    head_dim = text_fields.pop("attention_head_dim", 128)
    return _shape_config(ours, head_dim, text_fields)


_SHAPE_FIELDS = ("patch_size", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "text_dim",
                 "freq_dim", "ffn_dim", "num_layers", "cross_attn_norm")


def _shape_config(ours: dict, head_dim: int, overrides: dict | None = None) -> UniViGUConfig:
    """``_infer_config`` of a Wan checkpoint (our names), a missing weight reported as such."""
    try:
        return _infer_config(ours, overrides or {}, head_dim=head_dim)
    except KeyError as e:
        raise ValueError(f"Wan checkpoint lacks video-path weight {e.args[0]!r} (univigu-fast's name)") from None


def _check_config_against_weights(config: UniViGUConfig, ours: dict) -> None:
    """Refuse (before a model is allocated) a config whose sizes disagree with the Wan weights."""
    found = _shape_config(ours, config.head_dim)
    wrong = [f"{k}: config {getattr(config, k)!r}, weights {getattr(found, k)!r}" for k in _SHAPE_FIELDS
             if getattr(config, k) != getattr(found, k)]
    if wrong:
        raise ValueError("the config does not match the Wan weights: " + "; ".join(wrong))


def _weight_map(index: Path) -> dict:
    """The ``weight_map`` of a safetensors index file (tensor name -> shard file)."""
    raw = read_json(index)
    if not isinstance(raw, dict) or not isinstance(raw.get("weight_map"), dict):
        raise ValueError(f"{index} has no 'weight_map' object (a safetensors index maps tensor names to shard files)")
    return raw["weight_map"]


def _load_folder_state(folder: Path, variant: str | None = None) -> tuple[dict, dict]:
    """``config.json`` and the weights of a diffusers-style folder: the shards its
    ``*.safetensors.index[.variant].json`` names, else ``diffusion_pytorch_model[.variant].safetensors``
    or the folder's one other ``.safetensors`` file (diffusers' file naming; other variants ignored)."""
    cfg = read_json(folder / "config.json")
    if isinstance(cfg, dict) and "text_flow" in cfg:  # the field from_pretrained recognises
        raise ValueError(f"{folder} is a Uni-ViGU save_pretrained folder (its config.json has text-stream fields), "
                         "not a Wan2.1 one: load it with from_pretrained")
    tag = f".{variant}" if variant else ""
    index = folder / f"diffusion_pytorch_model.safetensors.index{tag}.json"
    single = folder / f"diffusion_pytorch_model{tag}.safetensors"
    if index.exists():
        files = [folder / name for name in sorted(set(_weight_map(index).values()))]
    elif single.exists():
        files = [single]
    else:
        present = sorted(folder.glob("*.safetensors"))
        files = present if len(present) == 1 and not variant else []
        if not files:
            want = f"{index.name} or {single.name}" + ("" if variant else " (or exactly one .safetensors file)")
            raise FileNotFoundError(f"{folder}: expected {want}; found {[f.name for f in present]}")
    sd = {}
    for f in files:
        sd.update(read_safetensors(f))
    return sd, cfg


def read_safetensors(path: Path, what: str = "weights") -> dict:
    """``load_file`` naming the file (and ``what`` it should hold) when it cannot be read (a truncated
    download, say). The tensors view the file's memory map: copy what must outlive a rewrite of it."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors' errors do not name the file
        raise ValueError(f"cannot read {what} from {path}: {type(e).__name__}: {e}") from e


def _torch_load(path: Path):
    """``torch.load(weights_only=True)``; a file it cannot read is named: one that needs more (arbitrary
    pickled objects) with the way round it for a trusted file, else (truncated, not a ``torch.save``
    file) with torch's reason."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise  # it names the file
    except Exception as e:  # noqa: BLE001 - torch's errors (RuntimeError, OSError, UnpicklingError, KeyError) do not name the file
        # torch's "Weights only load failed" suggests weights_only=False even for bytes that are no pickle
        # at all ("Unsupported operand": a safetensors or text file); those get torch's reason instead
        reason = str(e).rpartition("WeightsUnpickler error:")[2].strip().split("\n")[0].split(". ")[0]
        if "Weights only load failed" in str(e) and not reason.startswith("Unsupported operand"):
            raise ValueError(f"cannot read {path} with torch.load(weights_only=True) (it holds more than tensors "
                             f"and plain containers: {reason}). If you trust the file, load it yourself with "
                             "torch.load(path, weights_only=False) and pass the dict") from e
        raise ValueError(f"cannot read {path}: torch.load failed with {type(e).__name__}: {reason}. Expected a "
                         "complete torch.save file (a safetensors file must be named *.safetensors)") from e


def _read_state_file(path: Path) -> dict:
    """A single weights file: ``.safetensors``, else a ``torch.save`` file (``.pt`` / ``.pth`` / ``.bin``)."""
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    obj = _torch_load(path)
    if not isinstance(obj, dict):
        raise TypeError(f"{path} holds a {type(obj).__name__}, expected a state dict")
    return obj


def _weights(ckpt: dict) -> dict:
    """The state dict of a training checkpoint (under ``model`` / ``state_dict`` / ``module``) or ``ckpt``."""
    return next((ckpt[k] for k in ("model", "state_dict", "module") if isinstance(ckpt.get(k), dict)), ckpt)


def _dtype_arg(dtype, torch_dtype):
    """``dtype`` or diffusers' name for it, ``torch_dtype``."""
    if torch_dtype is not None:
        if dtype is not None and dtype != torch_dtype:
            raise ValueError(f"pass dtype or torch_dtype (diffusers' name for it), not both: got {dtype} and {torch_dtype}")
        dtype = torch_dtype
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype such as torch.bfloat16, got {dtype!r}")
    return dtype


def _load_assigned(cls, config: UniViGUConfig, sd: dict, dtype, device, *, owned: bool):
    """``cls(config)`` with ``sd``'s weights (strict), built on the meta device and given the tensors (cast
    to ``dtype``, default the default dtype) instead of random-initialised then overwritten: peak memory is
    the weights once, not a float32 model beside them. The text RoPE frequencies stay float32. ``owned``:
    ``sd``'s tensors are ours (``torch.load``'s) and may become the model's; else (a caller's dict, a
    memory-mapped safetensors file) each is copied. Tensors sharing memory in ``sd`` (``torch.save``
    keeps aliasing) are copied apart. ``device``: default the default device, as for a built model."""
    dtype = dtype or torch.get_default_dtype()
    tensors, taken = {}, set()
    for k, v in sd.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            t = v.detach().to(dtype=torch.float32 if k == "rotary_emb_text.inv_freq" else dtype,
                              memory_format=torch.contiguous_format)
            storage = t.untyped_storage()
            whole = t.storage_offset() == 0 and storage.nbytes() == t.numel() * t.element_size()
            # a view of a larger buffer (a flat parameter) would keep all of it alive: copied out
            if (not owned and t.data_ptr() == v.data_ptr()) or not whole or storage.data_ptr() in taken:
                t = t.clone()
            taken.add(t.untyped_storage().data_ptr())
            v = t
        tensors[k] = v
    with torch.device("meta"):
        model = cls(config)
    model.load_state_dict(tensors, strict=True, assign=True)
    check_text_rope_base(model)
    return model.to(device=torch.get_default_device() if device is None else device)


def _source_kind_error(sd: dict) -> None:
    """Refuse (naming the right loader) a Uni-ViGU state dict passed to ``from_wan``."""
    text = next((k for k in sd if any(t in k for t in _TEXT_STREAM)), None)
    if text is not None:
        raise ValueError(f"this is a Uni-ViGU checkpoint (it has text-stream weights such as {text!r}): load it "
                         "with from_uni_vigu (a save_pretrained folder: from_pretrained)")


def from_wan(cls, source, config: UniViGUConfig | None = None, *, variant: str | None = None,
             subfolder: str | None = None, device=None, dtype: torch.dtype | None = None,
             torch_dtype: torch.dtype | None = None, **text_fields):
    """Build ``cls`` from Wan2.1 weights; see the module docstring for the sources. ``variant``: a
    folder's weight variant as diffusers names it (``"fp16"`` loads ``*.fp16.safetensors``);
    ``subfolder``: the folder under ``source`` (``"transformer"`` of a pipeline is found without it);
    ``device`` / ``dtype`` (``torch_dtype``): where and in what the model is returned (default: the
    default dtype, on the default device). Other keywords are the config's text-stream fields."""
    dtype = _dtype_arg(dtype, torch_dtype)
    wan_config = None
    if (variant is not None or subfolder is not None) and not isinstance(source, (str, Path)):
        raise ValueError("variant / subfolder apply to a folder source only")
    if isinstance(source, torch.nn.Module):
        wan_config = getattr(source, "config", None)
        if isinstance(wan_config, UniViGUConfig):
            raise TypeError(f"source is already a {type(source).__name__} (a Uni-ViGU model); to copy it use "
                            "from_uni_vigu(source.state_dict(), config=source.config)")
        if not isinstance(wan_config, Mapping):
            raise TypeError(f"from_wan expects a diffusers WanTransformer3DModel (a module with a .config dict), a "
                            f"folder, a weights file or a state dict; got a {type(source).__name__} without one")
        sd, wan_config = source.state_dict(), dict(wan_config)
    elif isinstance(source, (str, Path)):
        path = Path(source) / subfolder if subfolder else Path(source)
        if path.is_file() and path.suffix == ".json":  # its config.json or shard index: the folder
            path = path.parent
        if path.is_file():  # one weights file, no config.json
            if variant is not None:
                raise ValueError("variant applies to a folder source only")
            sd = _weights(_read_state_file(path))
        elif path.is_dir():
            if (path / "transformer" / "config.json").exists():
                path = path / "transformer"
            if not (path / "config.json").is_file():
                raise FileNotFoundError(f"{path} has no config.json: from_wan reads a diffusers or original Wan2.1 "
                                        "folder (config.json + weights), a single weights file or a state dict")
            sd, wan_config = _load_folder_state(path, variant)
        else:
            raise FileNotFoundError(f"{path} does not exist (from_wan reads local files only)")
    elif isinstance(source, dict):
        sd = _weights(source)
    else:
        raise TypeError(f"from_wan expects a WanTransformer3DModel, a folder path or a state dict, got {type(source).__name__}")
    # wrapper prefixes (torch.compile, DDP, FSDP) off; the original release's names -> diffusers' (a no-op
    # on those) -> ours
    sd = {_strip(k): v for k, v in sd.items()}
    _source_kind_error(sd)
    ours = diffusers_to_ours(wan_original_to_diffusers(sd))
    if config is None:
        config = _config_from_wan_state(ours, wan_config, dict(text_fields))
    elif text_fields:
        raise ValueError(f"pass either config or text-stream fields ({sorted(text_fields)}), not both")
    _check_config_against_weights(config, ours)
    model = cls(config)
    missing, unexpected = model.load_state_dict(ours, strict=False)
    if unexpected:
        raise ValueError(f"unexpected keys from the Wan checkpoint: {unexpected[:8]}")
    model.init_text_stream()
    not_text = [k for k in missing if not any(t in k or k.startswith(t) for t in _TEXT_STREAM)]
    if not_text:
        raise ValueError(f"Wan checkpoint lacks video-path weights: {not_text[:8]}")
    return model.to(device=device, dtype=dtype).eval()


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
        key = key.replace("._fsdp_wrapped_module.", ".").replace("._orig_mod.", ".")
    return key


def _rope_base(inv_freq: torch.Tensor) -> float:
    """The ``base`` of stored 1-D RoPE frequencies ``inv_freq[i] = base ** (-2 i / head_dim)``.

    A least-squares fit of ``log inv_freq`` over all pairs (one entry of a bf16 buffer alone can be
    off by 9%), then the value with the fewest significant digits that the buffer's rounding cannot tell
    from the fit (10000, not 9998.7, whatever the dtype)."""
    n = inv_freq.numel()
    if n < 2:
        return 10000.0
    i = torch.arange(n, dtype=torch.float64)
    log_base = float(-n * (i * inv_freq.double().log()).sum() / (i * i).sum())
    # worst case of the fit's error when each entry carries the dtype's relative rounding (half an ulp)
    tolerance = max(n * torch.finfo(inv_freq.dtype).eps / 2 * float(i.sum() / (i * i).sum()), 1e-12)
    base = math.exp(log_base)
    for digits in range(1, 16):
        candidate = float(f"{base:.{digits}g}")
        if abs(math.log(candidate) - log_base) <= tolerance:
            return candidate
    return base


def _infer_config(sd: dict, overrides: dict, head_dim: int | None = None) -> UniViGUConfig:
    """Config from weight shapes (public-implementation names)."""
    pe = sd["patch_embedding.weight"]
    dim, in_channels, *patch = pe.shape
    if "rotary_emb_text.inv_freq" in sd:
        head_dim = 2 * sd["rotary_emb_text.inv_freq"].numel()
        base = _rope_base(sd["rotary_emb_text.inv_freq"])
    else:
        base = 10000.0
    if not head_dim or dim % head_dim:
        raise ValueError(f"attention_head_dim {head_dim} does not divide the weights' dim {dim}: pass attention_head_dim")
    blocks = sorted({int(k.split(".")[1]) for k in sd if k.startswith("blocks.") and k.split(".")[1].isdigit()})
    if not blocks:
        raise ValueError("the checkpoint has no blocks.N.* weights")
    if blocks != list(range(len(blocks))):
        stray = sorted(set(blocks) - set(range(len(blocks))))
        raise ValueError(f"the checkpoint's block indices are not 0..{len(blocks) - 1}: it has blocks {stray} "
                         f"but lacks {sorted(set(range(max(blocks) + 1)) - set(blocks))}")
    layers = len(blocks)
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
        # umT5's vocabulary plus one row is the [MASK] source's table (DESIGN §3); other sizes need the hint
        source = overrides.get("discrete_source", "mask" if text_rows == UMT5_VOCAB_SIZE + 1 else "uniform")
        fields["discrete_source"] = source
        fields["vocab_size"] = text_rows - (1 if source == "mask" else 0)
        if head_out is not None:
            fields["text_flow"] = "discrete" if head_out == text_rows else "embedding"
    fields.update(overrides)
    return UniViGUConfig(**fields)


def from_uni_vigu(cls, ckpt, config: UniViGUConfig | None = None, *, device=None, dtype: torch.dtype | None = None,
                  torch_dtype: torch.dtype | None = None, **overrides):
    """Load a public-implementation checkpoint (path or dict) into ``cls``; strict key match.

    The config: ``config``, else the one a univigu-fast training checkpoint stores (``model_config``,
    with ``overrides`` applied), else inferred from the weight shapes. Shapes alone cannot tell the
    ``mask`` source (``vocab_embed`` has V + 1 rows) from ``uniform`` (V rows): a table of umT5's
    256,384 + 1 rows is read as ``mask``; for another vocabulary pass ``discrete_source="mask"`` for a
    checkpoint trained with the mask source. ``device`` / ``dtype`` (``torch_dtype``) as in
    ``from_pretrained``."""
    dtype = _dtype_arg(dtype, torch_dtype)
    owned = False  # torch.load's tensors are ours; a caller's dict and a (memory-mapped) safetensors file are copied
    if isinstance(ckpt, (str, Path)):
        path = Path(ckpt)
        if path.is_dir():
            raise ValueError(f"ckpt {path} is a folder; from_uni_vigu reads one checkpoint file (or a dict): a "
                             "save_pretrained folder loads with from_pretrained, a Wan2.1 folder with from_wan")
        owned = path.suffix != ".safetensors"
        ckpt = _torch_load(path) if owned else read_safetensors(path)
    if not isinstance(ckpt, dict):
        raise TypeError(f"ckpt must be a path or a dict, got {type(ckpt).__name__}")
    sd = {_strip(k): v for k, v in _weights(ckpt).items()}
    if any(k.startswith(("condition_embedder.", "head.head.", "text_embedding.")) for k in sd):
        raise ValueError("this is a Wan2.1 checkpoint (diffusers' or the original release's names): "
                         "load it with from_wan")
    stored = ckpt.get("model_config")
    if config is not None:
        if overrides:
            raise ValueError(f"pass either config or overrides ({sorted(overrides)}), not both")
    elif unknown := sorted(set(overrides) - set(UniViGUConfig.__dataclass_fields__)):
        raise TypeError(f"from_uni_vigu got unknown config overrides {unknown_field_hints(unknown)}: overrides "
                        "are UniViGUConfig fields")
    elif isinstance(stored, dict):
        config = UniViGUConfig.from_dict({**stored, **overrides})
    else:
        if "patch_embedding.weight" not in sd:
            raise ValueError(f"not a Uni-ViGU state dict (no patch_embedding.weight); its top-level keys: "
                             f"{sorted(map(str, ckpt))[:8]}")
        try:
            config = _infer_config(sd, overrides, head_dim=overrides.get("attention_head_dim"))
        except KeyError as e:
            raise ValueError(f"checkpoint lacks weight {e.args[0]!r}") from None
    return _load_assigned(cls, config, sd, dtype, device, owned=owned).eval()


def check_text_rope_base(model) -> None:
    """The loaded RoPE frequencies are the ones ``config.text_rope_base`` gives (the forward uses the
    stored buffer: a config saying otherwise would misdescribe the model)."""
    inv_freq = dict(model.named_buffers()).get("rotary_emb_text.inv_freq")
    if inv_freq is None or inv_freq.numel() < 2:
        return
    stored, said = _rope_base(inv_freq), model.config.text_rope_base
    if abs(stored - said) > 1e-3 * said:
        raise ValueError(f"the weights' text RoPE frequencies have base {stored:g}, the config says "
                         f"text_rope_base={said:g}")


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def _size_bytes(size) -> int:
    """``max_shard_size``: bytes (an int) or a string such as ``"10GB"`` / ``"500MiB"``."""
    if isinstance(size, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", size)
        if m and m.group(2).upper() in _SIZE_UNITS:
            size = float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()]
        else:
            raise ValueError(f"max_shard_size {size!r} is not a size such as '10GB', '500MiB' or a number of bytes")
    if isinstance(size, bool) or not isinstance(size, (int, float)) or not size > 0:
        raise ValueError(f"max_shard_size must be a positive number of bytes or a string such as '10GB', got {size!r}")
    return int(size)


_WEIGHTS, _INDEX = "model.safetensors", "model.safetensors.index.json"
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def save_pretrained(model, path, *, max_shard_size="10GB") -> None:
    """``config.json`` and the weights: ``model.safetensors``, or, over ``max_shard_size`` (diffusers'
    default 10 GB), shards ``model-0000i-of-0000n.safetensors`` named by ``model.safetensors.index.json``
    (the Hugging Face layout)."""
    save_weights(model.state_dict(), model.config, path, max_shard_size=max_shard_size)


def save_weights(state_dict: dict, config: UniViGUConfig, path, *, max_shard_size="10GB") -> None:
    """``save_pretrained`` of a state dict (e.g. the full one gathered from a sharded model). The new
    files (weights and config.json) are written under temporary names first: those of an earlier save into
    the folder are replaced only once every new one is written (a failed save leaves the earlier one loadable)."""
    from safetensors.torch import save_file

    limit = _size_bytes(max_shard_size)
    config_json = config.to_json()  # an unserialisable config fails before any file is touched
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    shards, size = [{}], 0
    for k, v in sd.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    names = [_WEIGHTS] if len(shards) == 1 else [f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                                                  for i in range(1, len(shards) + 1)]
    if len(shards) > 1:
        names.append(_INDEX)
    names.append("config.json")
    try:
        for name, shard in zip(names, shards):
            save_file(shard, str(path / (name + ".tmp")))
        if len(shards) > 1:
            weight_map = {k: name for name, shard in zip(names, shards) for k in shard}
            total = sum(v.numel() * v.element_size() for v in sd.values())
            (path / (_INDEX + ".tmp")).write_text(json.dumps({"metadata": {"total_size": total},
                                                              "weight_map": weight_map}, indent=2) + "\n")
        (path / "config.json.tmp").write_text(config_json)
    except BaseException:
        for name in names:
            (path / (name + ".tmp")).unlink(missing_ok=True)
        raise
    for old in path.iterdir():
        if old.name in (_WEIGHTS, _INDEX) or _SHARD.fullmatch(old.name):
            old.unlink()
    for name in names:
        (path / (name + ".tmp")).replace(path / name)


def from_pretrained(cls, path, *, subfolder: str | None = None, device=None, dtype: torch.dtype | None = None,
                    torch_dtype: torch.dtype | None = None):
    """A folder written by ``save_pretrained`` (``path / subfolder`` when given), in eval mode as in
    diffusers; ``torch_dtype`` is diffusers' name for ``dtype`` (default: the default dtype; the text
    RoPE frequencies stay float32). The model is built without a random initialisation and given a copy
    of the file's tensors (no float32 model beside them; the model owns its memory)."""
    dtype = _dtype_arg(dtype, torch_dtype)
    path = Path(path) / subfolder if subfolder else Path(path)
    if not (path / "config.json").is_file():
        problem = ("does not exist" if not path.exists() else "is a file (give the folder)" if path.is_file()
                   else "has no config.json")
        raise FileNotFoundError(f"{path} {problem}: from_pretrained reads a folder written by save_pretrained; a "
                                "Wan2.1 or Uni-ViGU checkpoint loads with from_wan / from_uni_vigu")
    raw = read_json(path / "config.json")
    if not isinstance(raw, dict) or "text_flow" not in raw:
        kind = f"a {raw['_class_name']}" if isinstance(raw, dict) and "_class_name" in raw else "another model's"
        raise ValueError(f"{path / 'config.json'} is {kind} config, not one save_pretrained wrote (it has no "
                         "text-stream fields): a Wan2.1 folder loads with from_wan")
    config = UniViGUConfig.from_dict(raw)
    if (path / _INDEX).is_file():
        weight_map = _weight_map(path / _INDEX)
        files = sorted(set(weight_map.values()))
        lacking = [f for f in files if not (path / f).is_file()]
        if lacking:
            raise FileNotFoundError(f"{path / _INDEX} names shards that are not there: {lacking}")
        sd = {}
        for f in files:
            sd.update(read_safetensors(path / f))
    else:
        sd = read_safetensors(path / _WEIGHTS)
    return _load_assigned(cls, config, sd, dtype, device, owned=False).eval()  # safetensors: memory-mapped
