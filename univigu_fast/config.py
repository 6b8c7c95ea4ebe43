"""``UniViGUConfig``: every ``WanTransformer3DModel`` config field plus the text stream's fields."""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import operator
from dataclasses import dataclass, field
from pathlib import Path

TEXT_FLOWS = ("discrete", "embedding")
DISCRETE_SOURCES = ("uniform", "mask")
TEXT_FFN_INITS = ("copy", "new")
UMT5_VOCAB_SIZE = 256_384
_POSITIVE_INTS = ("num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "text_dim", "freq_dim",
                  "ffn_dim", "num_layers", "rope_max_seq_len", "vocab_size")


def read_json(path: str | Path):
    """``json.loads`` of a file; a torn or hand-broken file is named in the error (a bare JSONDecodeError is not)."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None


def unknown_field_hints(keys) -> str:
    """``keys`` that are not ``UniViGUConfig`` fields, each with the nearest field name:
    ``'num_layer' (did you mean 'num_layers'?), 'dim'``."""
    import difflib

    names = [f.name for f in dataclasses.fields(UniViGUConfig) if f.name != "extra"]
    return ", ".join(f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, names, 1)) else repr(k)
                     for k in keys)


@dataclass
class UniViGUConfig:
    # --- WanTransformer3DModel fields (diffusers names and defaults) ---
    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    qk_norm: str | None = "rms_norm_across_heads"
    eps: float = 1e-6
    image_dim: int | None = None
    added_kv_proj_dim: int | None = None
    rope_max_seq_len: int = 1024
    pos_embed_seq_len: int | None = None
    # --- text stream ---
    vocab_size: int = UMT5_VOCAB_SIZE
    text_flow: str = "discrete"  # "discrete": ids -> logits (released checkpoints); "embedding": paper Eq. 7-8
    discrete_source: str = "uniform"  # "mask" adds one [MASK] token (id = vocab_size)
    text_ffn_init: str = "copy"  # ffn_t starts as a copy of ffn ("copy", public code) or newly initialised ("new", paper)
    text_rope_base: float = 10000.0
    kappa_power: float = 1.0  # discrete text: the exponent n of kappa(t) = t^n the model is trained with (samplers' default)
    extra: dict = field(default_factory=dict)  # unknown keys kept on round trips

    def __post_init__(self):
        try:
            self.patch_size = tuple(operator.index(p) for p in self.patch_size)
        except TypeError:
            raise TypeError(f"patch_size must be 3 positive integers (t, h, w), got {self.patch_size!r}") from None
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be 3 positive integers (t, h, w), got {self.patch_size}")
        for name in _POSITIVE_INTS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name} must be a positive integer, got {value!r} ({type(value).__name__})")
            if value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
            setattr(self, name, int(value))
        for name in ("eps", "text_rope_base", "kappa_power"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
            setattr(self, name, float(value))  # a NumPy scalar would not serialise to JSON
        if isinstance(self.pos_embed_seq_len, numbers.Integral) and not isinstance(self.pos_embed_seq_len, bool):
            self.pos_embed_seq_len = int(self.pos_embed_seq_len)
        if not isinstance(self.cross_attn_norm, bool):
            raise TypeError(f"cross_attn_norm must be a bool, got {self.cross_attn_norm!r}")
        if self.text_flow not in TEXT_FLOWS:
            raise ValueError(f"text_flow must be one of {TEXT_FLOWS}, got {self.text_flow!r}")
        if self.discrete_source not in DISCRETE_SOURCES:
            raise ValueError(f"discrete_source must be one of {DISCRETE_SOURCES}, got {self.discrete_source!r}")
        if self.text_ffn_init not in TEXT_FFN_INITS:
            raise ValueError(f"text_ffn_init must be one of {TEXT_FFN_INITS}, got {self.text_ffn_init!r}")
        if self.image_dim is not None or self.added_kv_proj_dim is not None:
            raise NotImplementedError("image conditioning (Wan I2V: image_dim / added_kv_proj_dim) is not supported")
        if self.qk_norm != "rms_norm_across_heads":
            raise NotImplementedError(f"qk_norm={self.qk_norm!r}: only 'rms_norm_across_heads' (Wan2.1) is supported")
        if self.attention_head_dim % 2:
            raise ValueError(f"attention_head_dim must be even for RoPE, got {self.attention_head_dim}")

    # --- derived sizes ---
    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def head_dim(self) -> int:
        return self.attention_head_dim

    @property
    def text_vocab_size(self) -> int:
        """Rows of ``vocab_embed``: the vocabulary, plus the mask token for the mask source."""
        return self.vocab_size + (1 if self.discrete_source == "mask" else 0)

    @property
    def mask_token_id(self) -> int | None:
        return self.vocab_size if self.discrete_source == "mask" else None

    @property
    def text_out_dim(self) -> int:
        """Width of ``text_head.linear``: logits (discrete) or an embedding velocity (embedding)."""
        return self.text_vocab_size if self.text_flow == "discrete" else self.dim

    @property
    def patch_volume(self) -> int:
        return math.prod(self.patch_size)

    # --- (de)serialisation ---
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["patch_size"] = list(self.patch_size)
        extra = d.pop("extra")
        return {**extra, **d}

    @classmethod
    def from_dict(cls, d: dict, strict: bool = False) -> "UniViGUConfig":
        """Fields from ``d``; other keys (``_``-prefixed ones dropped) are kept in ``extra``, or, with
        ``strict=True`` (a config a user wrote), refused with the nearest field names."""
        if not isinstance(d, dict):
            raise TypeError(f"a UniViGUConfig is a JSON object of its fields, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names and not k.startswith("_")}
        if strict and extra:
            raise ValueError(f"unknown UniViGUConfig keys: {unknown_field_hints(extra)}")
        return cls(**known, extra=extra)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path, strict: bool = False) -> "UniViGUConfig":
        return cls.from_dict(read_json(path), strict=strict)

    def wan_config(self) -> dict:
        """The ``WanTransformer3DModel`` constructor kwargs of the video path."""
        keys = ("patch_size", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "text_dim",
                "freq_dim", "ffn_dim", "num_layers", "cross_attn_norm", "qk_norm", "eps", "image_dim",
                "added_kv_proj_dim", "rope_max_seq_len", "pos_embed_seq_len")
        return {k: getattr(self, k) for k in keys}

    # --- presets ---
    @classmethod
    def tiny(cls, **overrides) -> "UniViGUConfig":
        """A CPU-test size: dim 32 (2 heads x 16), 2 layers, vocab 50."""
        base = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, text_dim=24,
                    freq_dim=32, ffn_dim=64, num_layers=2, vocab_size=50)
        return cls(**{**base, **overrides})

    @classmethod
    def wan21_1_3b(cls, **overrides) -> "UniViGUConfig":
        """Wan2.1 T2V 1.3B: dim 1536 (12 x 128), ffn 8960, 30 layers."""
        return cls(**{**dict(num_attention_heads=12, ffn_dim=8960, num_layers=30), **overrides})

    @classmethod
    def wan21_14b(cls, **overrides) -> "UniViGUConfig":
        """Wan2.1 T2V 14B: dim 5120 (40 x 128), ffn 13824, 40 layers."""
        return cls(**{**dict(num_attention_heads=40, ffn_dim=13824, num_layers=40), **overrides})
