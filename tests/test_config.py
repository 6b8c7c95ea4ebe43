"""UniViGUConfig: Wan fields + text fields, presets, derived sizes, (de)serialisation, validation."""
import dataclasses
import inspect

import pytest

from univigu_fast.config import UniViGUConfig

diffusers = pytest.importorskip("diffusers")


def test_has_every_wan_config_field():
    wan_params = set(inspect.signature(diffusers.WanTransformer3DModel.__init__).parameters) - {"self"}
    ours = {f.name for f in dataclasses.fields(UniViGUConfig)}
    assert wan_params <= ours, wan_params - ours
    assert {"vocab_size", "text_flow", "discrete_source", "text_ffn_init", "text_rope_base"} <= ours
    # defaults equal diffusers' where Wan2.1 T2V uses them
    for name in ("patch_size", "in_channels", "out_channels", "text_dim", "freq_dim", "eps", "qk_norm",
                 "cross_attn_norm", "rope_max_seq_len"):
        default = inspect.signature(diffusers.WanTransformer3DModel.__init__).parameters[name].default
        assert getattr(UniViGUConfig(), name) == (tuple(default) if isinstance(default, (list, tuple)) else default), name


def test_presets_sizes():
    small, big, tiny = UniViGUConfig.wan21_1_3b(), UniViGUConfig.wan21_14b(), UniViGUConfig.tiny()
    assert (small.dim, small.ffn_dim, small.num_layers, small.head_dim) == (1536, 8960, 30, 128)
    assert (big.dim, big.ffn_dim, big.num_layers, big.num_attention_heads) == (5120, 13824, 40, 40)
    assert small.vocab_size == big.vocab_size == 256_384
    assert tiny.dim <= 64 and tiny.num_layers == 2 and tiny.num_attention_heads == 2
    assert UniViGUConfig.tiny(num_layers=3).num_layers == 3


def test_derived_sizes():
    c = UniViGUConfig.tiny(vocab_size=50)
    assert (c.text_vocab_size, c.mask_token_id, c.text_out_dim, c.patch_volume) == (50, None, 50, 4)
    m = UniViGUConfig.tiny(vocab_size=50, discrete_source="mask")
    assert (m.text_vocab_size, m.mask_token_id, m.text_out_dim) == (51, 50, 51)
    e = UniViGUConfig.tiny(text_flow="embedding")
    assert e.text_out_dim == e.dim == 32


def test_json_round_trip_keeps_unknown_keys(tmp_path):
    c = UniViGUConfig.tiny(discrete_source="mask", text_rope_base=500.0)
    c.save(tmp_path / "config.json")
    assert UniViGUConfig.load(tmp_path / "config.json") == c
    d = {**c.to_dict(), "_class_name": "WanTransformer3DModel", "future_field": 3}
    back = UniViGUConfig.from_dict(d)
    assert back.extra == {"future_field": 3} and back.to_dict()["future_field"] == 3
    assert isinstance(back.patch_size, tuple)
    wan = diffusers.WanTransformer3DModel(**c.wan_config())  # the video path's kwargs build a Wan model
    assert wan.config.num_layers == c.num_layers


@pytest.mark.parametrize("field, value, exc", [
    ("text_flow", "tokens", ValueError), ("discrete_source", "absorbing", ValueError),
    ("text_ffn_init", "zero", ValueError), ("patch_size", (1, 2), ValueError),
    ("attention_head_dim", 15, ValueError), ("image_dim", 1280, NotImplementedError),
    ("qk_norm", "rms_norm", NotImplementedError),
    ("num_layers", -1, ValueError), ("num_layers", "2", TypeError), ("num_attention_heads", 0, ValueError),
    ("attention_head_dim", -16, ValueError), ("vocab_size", 0, ValueError), ("ffn_dim", 2.5, TypeError),
    ("patch_size", (0, 2, 2), ValueError), ("patch_size", (1, 2.5, 2), TypeError),
    ("text_rope_base", -1.0, ValueError), ("eps", float("nan"), ValueError), ("kappa_power", 0.0, ValueError),
    ("cross_attn_norm", 1, TypeError),
])
def test_invalid_fields_raise_naming_the_field(field, value, exc):
    with pytest.raises(exc, match=field):
        UniViGUConfig.tiny(**{field: value})


def test_strict_load_names_unknown_keys(tmp_path):
    """A config a user wrote is read strictly (profile / train --config): a misspelt field is named with
    the nearest one instead of being kept in ``extra`` while the default is used."""
    import pytest

    from univigu_fast.config import UniViGUConfig

    path = tmp_path / "c.json"
    path.write_text('{"num_layer": 2, "dim": 64, "_class_name": "X"}')
    assert UniViGUConfig.load(path).extra == {"num_layer": 2, "dim": 64}  # lenient: checkpoints' extra keys kept
    with pytest.raises(ValueError, match=r"'num_layer' \(did you mean 'num_layers'\?\), 'dim'"):
        UniViGUConfig.load(path, strict=True)


def test_integer_fields_take_numpy_integers():
    np = pytest.importorskip("numpy")
    c = UniViGUConfig.tiny(num_layers=np.int64(3), patch_size=(np.int32(1), 2, 2))
    assert c.num_layers == 3 and type(c.num_layers) is int and c.patch_size == (1, 2, 2)


def test_float_fields_take_numpy_floats_and_store_python_ones():
    """A NumPy float (e.g. read off an array) is stored as its exact Python float: a ``np.float32`` kept
    as such made ``config.json`` unwritable (save_pretrained failed after replacing the weights)."""
    import json

    np = pytest.importorskip("numpy")
    c = UniViGUConfig.tiny(eps=np.float32(1e-5), text_rope_base=np.float64(500.0), kappa_power=np.float32(2.0),
                           pos_embed_seq_len=np.int64(257))
    assert (type(c.eps), type(c.text_rope_base), type(c.kappa_power), type(c.pos_embed_seq_len)) == (float, float, float, int)
    assert (c.eps, c.text_rope_base, c.kappa_power, c.pos_embed_seq_len) == (float(np.float32(1e-5)), 500.0, 2.0, 257)
    assert c.eps != 1e-5  # the float32 value itself, not a rounding of it
    assert UniViGUConfig.from_dict(json.loads(c.to_json())) == c
