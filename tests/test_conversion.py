"""Checkpoint conversion: three Wan sources agree; public-implementation checkpoints load; IO round trip."""
import argparse
import json
import re
import shutil

import pytest
import torch

from _models import randomize, tiny_reference
from univigu_fast.config import UniViGUConfig
from univigu_fast.conversion import _TEXT_STREAM as TEXT_STREAM
from univigu_fast.conversion import _WAN_ORIGINAL  # noqa: F401  (the mapping under test)
from univigu_fast.reference import UniViGUModel

diffusers = pytest.importorskip("diffusers")

# Original Wan2.1 (wan/modules/model.py) names for the diffusers names, written out independently
# of the converter (Wan's norm3 is diffusers' norm2).
ORIGINAL_NAMES = {
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "scale_shift_table": "head.modulation",
    "proj_out": "head.head",
    "patch_embedding": "patch_embedding",
}
BLOCK_NAMES = {
    "attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v", "attn1.to_out.0": "self_attn.o",
    "attn1.norm_q": "self_attn.norm_q", "attn1.norm_k": "self_attn.norm_k",
    "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k", "attn2.to_v": "cross_attn.v", "attn2.to_out.0": "cross_attn.o",
    "attn2.norm_q": "cross_attn.norm_q", "attn2.norm_k": "cross_attn.norm_k",
    "norm2": "norm3", "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2", "scale_shift_table": "modulation",
}


def _to_original(sd):
    out = {}
    for key, value in sd.items():
        if key.startswith("blocks."):
            _, n, rest = key.split(".", 2)
            for d, o in BLOCK_NAMES.items():
                if rest == d or rest.startswith(d + "."):
                    out[f"blocks.{n}.{o}{rest[len(d):]}"] = value
                    break
            else:
                raise KeyError(rest)
        else:
            for d, o in ORIGINAL_NAMES.items():
                if key == d or key.startswith(d + "."):
                    out[o + key[len(d):]] = value
                    break
            else:
                raise KeyError(key)
    return out


@pytest.fixture(scope="module")
def wan():
    torch.manual_seed(0)
    config = UniViGUConfig.tiny()
    return randomize(diffusers.WanTransformer3DModel(**config.wan_config()).eval(), seed=4), config


def test_from_wan_three_sources_identical(wan, tmp_path):
    model_wan, config = wan
    torch.manual_seed(1)
    a = UniViGUModel.from_wan(model_wan, vocab_size=config.vocab_size)
    model_wan.save_pretrained(tmp_path / "wan")
    torch.manual_seed(1)
    b = UniViGUModel.from_wan(tmp_path / "wan", vocab_size=config.vocab_size)
    torch.manual_seed(1)
    original = {"_orig_mod." + k: v for k, v in _to_original(model_wan.state_dict()).items() if not k.startswith("rope.")}
    c = UniViGUModel.from_wan(original, config=config)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys() == sc.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]) and torch.equal(sa[k], sc[k]), k
    # the text stream starts from the video stream's weights (public implementation)
    assert torch.equal(sa["time_embedding_t.time_proj.weight"], sa["time_embedding_v.time_proj.weight"])
    assert torch.equal(sa["blocks.0.ffn_t.net.0.proj.weight"], sa["blocks.0.ffn.net.0.proj.weight"])
    assert torch.equal(sa["text_head.linear.weight"], torch.zeros_like(sa["text_head.linear.weight"]))


def test_from_wan_new_text_ffn(wan):
    model_wan, config = wan
    m = UniViGUModel.from_wan(model_wan, vocab_size=config.vocab_size, text_ffn_init="new")
    assert not torch.equal(m.blocks[0].ffn_t.net[0].proj.weight, m.blocks[0].ffn.net[0].proj.weight)


def _public_state_dict(config: UniViGUConfig, seed=0):
    """A state dict laid out with the public implementation's documented names (DESIGN §3)."""
    g = torch.Generator().manual_seed(seed)
    d, f, V, c = config.dim, config.ffn_dim, config.text_vocab_size, config

    def r(*shape):
        return torch.randn(*shape, generator=g)

    sd = {"vocab_embed.weight": r(V, d), "patch_embedding.weight": r(d, c.in_channels, *c.patch_size),
          "patch_embedding.bias": r(d), "rotary_emb_text.inv_freq": 1.0 / (c.text_rope_base ** (torch.arange(0, c.head_dim, 2).float() / c.head_dim)),
          "scale_shift_table_v": r(1, 2, d), "scale_shift_table_t": r(1, 2, d),
          "video_head.proj_out.weight": r(c.out_channels * c.patch_volume, d), "video_head.proj_out.bias": r(c.out_channels * c.patch_volume),
          "text_head.norm_final.weight": r(d), "text_head.linear.weight": r(c.text_out_dim, d), "text_head.linear.bias": r(c.text_out_dim),
          "cond_text_embedder.linear_1.weight": r(d, c.text_dim), "cond_text_embedder.linear_1.bias": r(d),
          "cond_text_embedder.linear_2.weight": r(d, d), "cond_text_embedder.linear_2.bias": r(d)}
    for m in ("v", "t"):
        sd.update({f"time_embedding_{m}.time_embedder.linear_1.weight": r(d, c.freq_dim), f"time_embedding_{m}.time_embedder.linear_1.bias": r(d),
                   f"time_embedding_{m}.time_embedder.linear_2.weight": r(d, d), f"time_embedding_{m}.time_embedder.linear_2.bias": r(d),
                   f"time_embedding_{m}.time_proj.weight": r(6 * d, d), f"time_embedding_{m}.time_proj.bias": r(6 * d)})
    for n in range(c.num_layers):
        p = f"blocks.{n}."
        sd[p + "scale_shift_table"] = r(1, 6, d)
        for a in ("attn1", "attn2"):
            for lin in ("to_q", "to_k", "to_v", "to_out.0"):
                sd[f"{p}{a}.{lin}.weight"], sd[f"{p}{a}.{lin}.bias"] = r(d, d), r(d)
            sd[f"{p}{a}.norm_q.weight"], sd[f"{p}{a}.norm_k.weight"] = r(d), r(d)
        sd[p + "norm2.weight"], sd[p + "norm2.bias"] = r(d), r(d)
        for ffn in ("ffn", "ffn_t"):
            sd[f"{p}{ffn}.net.0.proj.weight"], sd[f"{p}{ffn}.net.0.proj.bias"] = r(f, d), r(f)
            sd[f"{p}{ffn}.net.2.weight"], sd[f"{p}{ffn}.net.2.bias"] = r(d, f), r(d)
    return sd


@pytest.mark.parametrize("overrides", [dict(), dict(discrete_source="mask"), dict(text_flow="embedding", text_rope_base=500.0)])
def test_from_uni_vigu_loads_public_checkpoint(overrides, tmp_path):
    config = UniViGUConfig.tiny(num_layers=3, **overrides)
    sd = _public_state_dict(config)
    assert UniViGUModel(config).state_dict().keys() == sd.keys()  # our names are the documented ones
    wrapped = {"model": {"_fsdp_wrapped_module._orig_mod." + k: v for k, v in sd.items()}, "step": 7}
    torch.save(wrapped, tmp_path / "ckpt.pt")
    hint = {"discrete_source": "mask"} if overrides.get("discrete_source") == "mask" else {}
    model = UniViGUModel.from_uni_vigu(tmp_path / "ckpt.pt", **hint)
    assert model.config == config
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    with pytest.raises(RuntimeError, match="Unexpected key"):
        UniViGUModel.from_uni_vigu({**sd, "blocks.0.extra.weight": torch.zeros(1)}, config=config)


@pytest.mark.parametrize("source", ["uniform", "mask"])
def test_from_uni_vigu_reads_the_mask_source_off_the_umt5_table(source):
    """A released-size table (umT5's 256,384 rows, + 1 for [MASK]) tells the source without a hint
    (a mask checkpoint loaded silently as a uniform model with vocab_size 256,385 before)."""
    from univigu_fast.config import UMT5_VOCAB_SIZE

    config = UniViGUConfig.tiny(num_layers=1, vocab_size=UMT5_VOCAB_SIZE, discrete_source=source)
    model = UniViGUModel.from_uni_vigu(_public_state_dict(config))
    assert model.config == config and model.config.mask_token_id == (UMT5_VOCAB_SIZE if source == "mask" else None)


def test_save_pretrained_round_trip_is_exact(tmp_path):
    model = tiny_reference(seed=6, discrete_source="mask")
    model.save_pretrained(tmp_path / "m")
    back = UniViGUModel.from_pretrained(tmp_path / "m")
    assert back.config == model.config
    for (k, a), (k2, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b)


def test_from_pretrained_takes_diffusers_arguments(tmp_path):
    """``subfolder=``, ``torch_dtype=`` (diffusers' name for ``dtype``), eval mode, and a clear error for a
    folder that is not ours."""
    model = tiny_reference(seed=6)
    model.save_pretrained(tmp_path / "pipe" / "transformer")
    back = UniViGUModel.from_pretrained(tmp_path / "pipe", subfolder="transformer", torch_dtype=torch.float16)
    assert not back.training and not UniViGUModel.from_uni_vigu(model.state_dict()).training
    assert back.patch_embedding.weight.dtype == torch.float16
    assert torch.equal(back.patch_embedding.weight, model.patch_embedding.weight.half())
    with pytest.raises(ValueError, match="not both"):
        UniViGUModel.from_pretrained(tmp_path / "pipe/transformer", dtype=torch.float32, torch_dtype=torch.float16)
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        UniViGUModel.from_pretrained(tmp_path / "pipe/transformer", torch_dtype="bf16")
    with pytest.raises(FileNotFoundError, match="has no config.json.*from_wan"):
        UniViGUModel.from_pretrained(tmp_path / "pipe")
    # a torn config.json / index is named (a bare JSONDecodeError / KeyError before)
    config = tmp_path / "pipe" / "transformer" / "config.json"
    config.write_text(config.read_text()[:40])
    with pytest.raises(ValueError, match=r"transformer/config.json is not valid JSON: .* at line \d+ column \d+"):
        UniViGUModel.from_pretrained(tmp_path / "pipe", subfolder="transformer")
    model.save_pretrained(tmp_path / "sharded", max_shard_size=4096)
    (tmp_path / "sharded" / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(ValueError, match="model.safetensors.index.json has no 'weight_map' object"):
        UniViGUModel.from_pretrained(tmp_path / "sharded")


def _original_release_folder(model_wan, config, folder):
    """An original Wan2.1 release folder: weights in Wan's own layout and a ``WanModel`` config.json
    that, like the released 1.3B one, leaves out text_dim, patch_size, qk_norm and cross_attn_norm."""
    from safetensors.torch import save_file

    folder.mkdir()
    sd = {k: v.contiguous() for k, v in _to_original(model_wan.state_dict()).items() if not k.startswith("rope.")}
    save_file(sd, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "_class_name": "WanModel", "_diffusers_version": "0.30.0", "dim": config.dim, "eps": 1e-06,
        "ffn_dim": config.ffn_dim, "freq_dim": config.freq_dim, "in_dim": config.in_channels, "model_type": "t2v",
        "num_heads": config.num_attention_heads, "num_layers": config.num_layers, "out_dim": config.out_channels,
        "text_len": 512}))


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_from_wan_original_release_folder_and_compiled_module(wan, tmp_path):
    model_wan, config = wan
    torch.manual_seed(1)
    want = UniViGUModel.from_wan(model_wan, vocab_size=config.vocab_size)
    _original_release_folder(model_wan, config, tmp_path / "orig")
    torch.manual_seed(1)
    got = UniViGUModel.from_wan(tmp_path / "orig", vocab_size=config.vocab_size)
    assert got.config == want.config  # sizes the config.json leaves out are read off the weights
    _assert_same_weights(got, want)
    torch.manual_seed(1)
    _assert_same_weights(UniViGUModel.from_wan(torch.compile(model_wan), vocab_size=config.vocab_size), want)


def test_from_wan_folder_picks_the_weights_diffusers_would(wan, tmp_path):
    """Sharded weights are read through their index, and a folder that also holds an fp16 variant
    loads the plain weights unless ``variant="fp16"`` (all ``*.safetensors`` were merged, sorted, so the
    fp16 shards overwrote the fp32 ones)."""
    model_wan, config = wan
    folder = tmp_path / "wan"
    model_wan.save_pretrained(folder, max_shard_size="20KB")
    half = type(model_wan).from_config(model_wan.config)
    half.load_state_dict(model_wan.state_dict())
    half.half().save_pretrained(folder, variant="fp16", max_shard_size="20KB")
    assert len(list(folder.glob("*.fp16-*.safetensors"))) > 1
    torch.manual_seed(1)
    want = UniViGUModel.from_wan(model_wan, vocab_size=config.vocab_size)
    torch.manual_seed(1)
    _assert_same_weights(UniViGUModel.from_wan(folder, vocab_size=config.vocab_size), want)
    got16 = UniViGUModel.from_wan(folder, variant="fp16", vocab_size=config.vocab_size)
    w = "blocks.0.attn1.to_q.weight"
    torch.testing.assert_close(got16.state_dict()[w], want.state_dict()[w].half().float(), atol=0, rtol=0)
    assert not torch.equal(got16.state_dict()[w], want.state_dict()[w])
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.bf16.safetensors"):
        UniViGUModel.from_wan(folder, variant="bf16", vocab_size=config.vocab_size)


def test_from_wan_refuses_configs_that_disagree_with_the_weights(wan, tmp_path):
    model_wan, config = wan
    with pytest.raises(ValueError, match=r"\['num_layers'\] come from the Wan checkpoint's config"):
        UniViGUModel.from_wan(model_wan, num_layers=1)
    original = _to_original(model_wan.state_dict())
    wrong = UniViGUConfig.tiny(num_layers=config.num_layers + 1, ffn_dim=2 * config.ffn_dim)
    with pytest.raises(ValueError, match="does not match the Wan weights: ffn_dim: config 128, weights 64; num_layers"):
        UniViGUModel.from_wan(original, config=wrong)
    with pytest.raises(ValueError, match="attention_head_dim 128 does not divide the weights' dim 32"):
        UniViGUModel.from_wan(original)  # Wan's 128 is the default guess for a bare state dict
    _original_release_folder(model_wan, config, tmp_path / "i2v")
    cfg = json.loads((tmp_path / "i2v" / "config.json").read_text())
    (tmp_path / "i2v" / "config.json").write_text(json.dumps({**cfg, "model_type": "i2v"}))
    with pytest.raises(ValueError, match="model_type 'i2v' is not supported"):
        UniViGUModel.from_wan(tmp_path / "i2v")


def test_bad_checkpoints_get_clear_errors(wan, tmp_path):
    """What a user plausibly passes by mistake is named, not a bare KeyError / NotADirectoryError."""
    from safetensors.torch import save_file

    model_wan, config = wan
    sd = model_wan.state_dict()
    # a single weights file (a common download form) loads like its state dict
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "wan.safetensors"))
    torch.save(sd, tmp_path / "wan.pt")
    want = UniViGUModel.from_wan(sd, attention_head_dim=16, vocab_size=50).state_dict()
    for f in ("wan.safetensors", "wan.pt"):
        got = UniViGUModel.from_wan(tmp_path / f, attention_head_dim=16, vocab_size=50).state_dict()
        video_path = [k for k in want if not any(t in k for t in TEXT_STREAM)]
        assert "scale_shift_table_v" in video_path and "cond_text_embedder.linear_1.weight" in video_path
        assert all(torch.equal(got[k], want[k]) for k in video_path), f
    # the ComfyUI single-file prefix is diffusers' too
    comfy = UniViGUModel.from_wan({"model.diffusion_model." + k: v for k, v in sd.items()}, attention_head_dim=16,
                                  vocab_size=50).state_dict()
    assert all(torch.equal(comfy[k], want[k]) for k in video_path)
    # a truncated file names itself
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "wan.safetensors").read_bytes()[:100])
    with pytest.raises(ValueError, match="cannot read weights from .*cut.safetensors"):
        UniViGUModel.from_wan(tmp_path / "cut.safetensors", attention_head_dim=16)
    # a missing video-path weight, no blocks, a stray block index
    no_text_embedder = {k: v for k, v in sd.items() if not k.startswith("condition_embedder.text_embedder")}
    with pytest.raises(ValueError, match="Wan checkpoint lacks video-path weight 'cond_text_embedder.linear_1.weight'"):
        UniViGUModel.from_wan(no_text_embedder, attention_head_dim=16)
    with pytest.raises(ValueError, match=r"no blocks.N.\* weights"):
        UniViGUModel.from_wan({k: v for k, v in sd.items() if not k.startswith("blocks.")}, attention_head_dim=16)
    stray = {**sd, "blocks.5.ffn.net.0.proj.weight": sd["blocks.0.ffn.net.0.proj.weight"]}
    with pytest.raises(ValueError, match=r"block indices are not 0..2: it has blocks \[5\] but lacks \[2, 3, 4\]"):
        UniViGUModel.from_wan(stray, attention_head_dim=16)
    # from_uni_vigu: a Wan checkpoint, nested weights, the head-dim hint of a state dict without RoPE buffer
    with pytest.raises(ValueError, match="Wan2.1 checkpoint .*from_wan"):
        UniViGUModel.from_uni_vigu(sd)
    public = _public_state_dict(UniViGUConfig.tiny(num_layers=1))
    for key in ("state_dict", "module"):
        assert UniViGUModel.from_uni_vigu({key: public, "step": 1}).config.num_layers == 1
    with pytest.raises(ValueError, match=r"not a Uni-ViGU state dict .*\['ema', 'step'\]"):
        UniViGUModel.from_uni_vigu({"ema": public, "step": 1})
    no_rope = {k: v for k, v in public.items() if k != "rotary_emb_text.inv_freq"}
    with pytest.raises(ValueError, match="attention_head_dim None does not divide"):
        UniViGUModel.from_uni_vigu(no_rope)
    with pytest.raises(RuntimeError, match="Missing key.*rotary_emb_text.inv_freq"):  # the hint is used now
        UniViGUModel.from_uni_vigu(no_rope, attention_head_dim=16)


def test_config_rope_base_must_match_the_stored_frequencies(tmp_path):
    public = _public_state_dict(UniViGUConfig.tiny(num_layers=1, text_rope_base=500.0))
    with pytest.raises(ValueError, match="base 500, the config says text_rope_base=10000"):
        UniViGUModel.from_uni_vigu(public, config=UniViGUConfig.tiny(num_layers=1))
    model = UniViGUModel.from_uni_vigu(public)
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "text_rope_base": 10000.0}))
    with pytest.raises(ValueError, match="base 500, the config says text_rope_base=10000"):
        UniViGUModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("base", [10000.0, 500000.0, 1000000.0, 123.5])
def test_text_rope_base_read_back_from_any_buffer_dtype(dtype, base):
    """``from_uni_vigu`` infers ``text_rope_base`` from the stored frequencies; from a bf16 buffer the
    old one-entry estimate gave 9136 for 10000."""
    from univigu_fast.conversion import _rope_base

    inv_freq = 1.0 / (base ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128))
    got = _rope_base(inv_freq.to(dtype))
    if dtype == torch.float32 or base != 123.5:
        assert got == base
    else:  # a value with more digits than the buffer resolves: close, not exact
        assert abs(got - base) < 0.01 * base


def test_loaders_take_device_and_dtype_and_keep_rope_in_float32(wan, tmp_path):
    """Every loader takes ``device`` / ``dtype`` / ``torch_dtype``; the text RoPE frequencies stay float32
    under any cast (in bf16 they would be off by up to 0.4%)."""
    model_wan, config = wan
    model = tiny_reference(seed=6)
    exact = model.rotary_emb_text.inv_freq.clone()
    model.save_pretrained(tmp_path / "m")
    wan_dir = tmp_path / "pipe"
    model_wan.save_pretrained(wan_dir / "transformer")
    loaded = {
        "from_pretrained": UniViGUModel.from_pretrained(tmp_path / "m", torch_dtype=torch.bfloat16, device="cpu"),
        "from_uni_vigu": UniViGUModel.from_uni_vigu(model.state_dict(), torch_dtype=torch.bfloat16, device="cpu"),
        "from_wan": UniViGUModel.from_wan(model_wan, vocab_size=50, dtype=torch.bfloat16),
        "from_wan folder": UniViGUModel.from_wan(wan_dir, subfolder="transformer", vocab_size=50, torch_dtype=torch.bfloat16),
        ".to(bfloat16)": tiny_reference(seed=6).to(torch.bfloat16),
        ".half()": tiny_reference(seed=6).half(),
    }
    for how, m in loaded.items():
        assert m.patch_embedding.weight.dtype != torch.float32, how
        assert m.rotary_emb_text.inv_freq.dtype == torch.float32, how
        assert torch.equal(m.rotary_emb_text.inv_freq, exact), how
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        UniViGUModel.from_wan(model_wan, vocab_size=50, torch_dtype=torch.int8)


def test_assigned_weights_are_parameters_and_not_the_callers(tmp_path):
    """from_uni_vigu / from_pretrained build on the meta device and take the tensors: the result is an
    ordinary trainable model, and a dict the caller passed is copied, not aliased."""
    model = tiny_reference(seed=6)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    back = UniViGUModel.from_uni_vigu(sd)
    assert all(isinstance(p, torch.nn.Parameter) and p.requires_grad for p in back.parameters())
    assert {p.device.type for p in back.parameters()} | {b.device.type for b in back.buffers()} == {"cpu"}
    with torch.no_grad():
        back.patch_embedding.weight.add_(1.0)
    assert torch.equal(sd["patch_embedding.weight"], model.patch_embedding.weight)
    model.save_pretrained(tmp_path / "m")
    again = UniViGUModel.from_pretrained(tmp_path / "m")
    for k, v in again.state_dict().items():
        assert v.is_contiguous() and torch.equal(v, model.state_dict()[k]), k


def test_save_pretrained_shards_over_max_shard_size(tmp_path):
    """Over ``max_shard_size`` the weights go to ``model-0000i-of-0000n.safetensors`` with the Hugging Face
    index; from_pretrained reads them; a later single-file save removes the old shards."""
    model = tiny_reference(seed=6, discrete_source="mask")
    model.save_pretrained(tmp_path / "m", max_shard_size="20KB")
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 2 and "model.safetensors" not in files and "model.safetensors.index.json" in files
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(model.state_dict()) and set(index["weight_map"].values()) == set(shards)
    back = UniViGUModel.from_pretrained(tmp_path / "m")
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())
    model.save_pretrained(tmp_path / "m")  # default 10GB: one file, stale shards and index gone
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    model.save_pretrained(tmp_path / "m", max_shard_size=30_000)
    sorted((tmp_path / "m").glob("model-*.safetensors"))[1].unlink()
    with pytest.raises(FileNotFoundError, match="names shards that are not there"):
        UniViGUModel.from_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="max_shard_size '10 gigs'"):
        model.save_pretrained(tmp_path / "m", max_shard_size="10 gigs")


def test_loaders_name_the_right_loader_for_the_wrong_source(wan, tmp_path):
    """A source meant for another loader, or not a checkpoint at all, is refused naming what was expected."""
    model_wan, config = wan
    model = tiny_reference(seed=6)
    model.save_pretrained(tmp_path / "ours")
    model_wan.save_pretrained(tmp_path / "wan")
    with pytest.raises(TypeError, match="expects a diffusers WanTransformer3DModel .* got a Linear"):
        UniViGUModel.from_wan(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="already a UniViGUModel .* from_uni_vigu"):
        UniViGUModel.from_wan(model)
    for source in (model.state_dict(), tmp_path / "ours" / "model.safetensors"):
        with pytest.raises(ValueError, match="Uni-ViGU checkpoint .* from_uni_vigu"):
            UniViGUModel.from_wan(source)
    with pytest.raises(FileNotFoundError, match="does not exist .*local files only"):
        UniViGUModel.from_wan("Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
    (tmp_path / "bare").mkdir()
    with pytest.raises(FileNotFoundError, match="bare has no config.json"):
        UniViGUModel.from_wan(tmp_path / "bare")
    with pytest.raises(ValueError, match="is a folder; from_uni_vigu reads one checkpoint file"):
        UniViGUModel.from_uni_vigu(tmp_path / "ours")
    with pytest.raises(ValueError, match="WanTransformer3DModel config, not one save_pretrained wrote.*from_wan"):
        UniViGUModel.from_pretrained(tmp_path / "wan")
    # a config.json path, or a training checkpoint's {"model": state dict}, is read as what it points to
    want = UniViGUModel.from_wan(model_wan, vocab_size=50).state_dict()
    video_path = [k for k in want if not any(t in k for t in TEXT_STREAM)]
    for source in (tmp_path / "wan" / "config.json", {"model": model_wan.state_dict()}):
        got = UniViGUModel.from_wan(source, config=config).state_dict()
        assert all(torch.equal(got[k], want[k]) for k in video_path)
    # a checkpoint with pickled objects: the way round it is named
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(lr=1.0)}, tmp_path / "public.pth")
    with pytest.raises(ValueError, match=r"weights_only=True.*torch.load\(path, weights_only=False\)"):
        UniViGUModel.from_uni_vigu(tmp_path / "public.pth")


def test_loaded_models_own_their_memory(tmp_path, monkeypatch):
    """The weights are the model's: not a memory map of the file (overwriting the folder must not change
    a loaded model) and not shared between parameters when the checkpoint aliased them (torch.save keeps
    aliasing: the public 'copy' init done by reference); a save that fails keeps the earlier one."""
    import safetensors.torch

    a, b = tiny_reference(seed=6), tiny_reference(seed=7)
    a.save_pretrained(tmp_path / "m")
    b.save_pretrained(tmp_path / "b")
    loaded = UniViGUModel.from_pretrained(tmp_path / "m")
    shutil.copyfile(tmp_path / "b" / "model.safetensors", tmp_path / "m" / "model.safetensors")  # in place (cp)
    assert torch.equal(loaded.patch_embedding.weight, a.patch_embedding.weight)
    sd = a.state_dict()
    for k in [k for k in sd if ".ffn." in k]:
        sd[k.replace(".ffn.", ".ffn_t.")] = sd[k]  # the same tensor under both names
    torch.save({"model": sd}, tmp_path / "tied.pt")
    tied = UniViGUModel.from_uni_vigu(tmp_path / "tied.pt")
    w, w_t = tied.blocks[0].ffn.net[0].proj.weight, tied.blocks[0].ffn_t.net[0].proj.weight
    assert torch.equal(w, w_t) and w.untyped_storage().data_ptr() != w_t.untyped_storage().data_ptr()
    tied.save_pretrained(tmp_path / "t")  # safetensors refuses tensors that share memory

    def fail(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        a.save_pretrained(tmp_path / "m", max_shard_size="20KB")
    monkeypatch.undo()
    assert not list((tmp_path / "m").glob("*.tmp"))
    assert torch.equal(UniViGUModel.from_pretrained(tmp_path / "m").patch_embedding.weight, b.patch_embedding.weight)


def test_save_pretrained_replaces_config_with_the_weights(tmp_path):
    """config.json is written with the weight files (under a temporary name, renamed with them): a config
    that cannot be serialised fails before the folder is touched (it left the new weights beside the old
    config, which loaded silently); a NumPy float field is stored as a Python float and saves."""
    np = pytest.importorskip("numpy")
    a = tiny_reference(seed=6)
    a.save_pretrained(tmp_path / "m")
    b = UniViGUModel(UniViGUConfig.tiny(eps=np.float32(1e-5)))
    b.save_pretrained(tmp_path / "np")
    back = UniViGUModel.from_pretrained(tmp_path / "np")
    assert back.config.eps == float(np.float32(1e-5)) and torch.equal(back.patch_embedding.weight, b.patch_embedding.weight)
    b.config.extra["note"] = np.float32(1.0)  # kept verbatim in extra: not JSON
    for shard_size in ("10GB", "20KB"):
        with pytest.raises(TypeError, match="float32 is not JSON serializable"):
            b.save_pretrained(tmp_path / "m", max_shard_size=shard_size)
        assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
        kept = UniViGUModel.from_pretrained(tmp_path / "m")
        assert kept.config == a.config and kept.config.eps == 1e-6
        assert torch.equal(kept.patch_embedding.weight, a.patch_embedding.weight)


def test_from_uni_vigu_refuses_unknown_overrides_with_a_stored_config():
    """A training checkpoint's ``model_config`` plus overrides: a misspelt override is refused naming it (it
    went into ``config.extra`` and the stored value was used), as without a stored config."""
    model = tiny_reference(seed=6)
    ckpt = {"model": model.state_dict(), "model_config": model.config.to_dict()}
    for source in (ckpt, {"model": model.state_dict()}):
        with pytest.raises(TypeError, match=r"from_uni_vigu got unknown config overrides 'kapa_power' "
                                            r"\(did you mean 'kappa_power'\?\): overrides are UniViGUConfig fields"):
            UniViGUModel.from_uni_vigu(source, kapa_power=2.0)
    back = UniViGUModel.from_uni_vigu(ckpt, kappa_power=2.0)
    assert back.config.kappa_power == 2.0 and back.config.extra == {}
    assert torch.equal(back.patch_embedding.weight, model.patch_embedding.weight)


def test_from_uni_vigu_copies_views_of_a_flat_buffer_out(tmp_path):
    """A checkpoint whose tensors are views of one flat buffer (FSDP flat parameters): each parameter gets
    its own storage; the first one kept the whole buffer alive (2x the weights' memory)."""
    model = tiny_reference(seed=6)
    sd = model.state_dict()
    flat = torch.empty(sum(v.numel() for v in sd.values()))
    views, offset = {}, 0
    for k, v in sd.items():
        views[k] = flat[offset:offset + v.numel()].view(v.shape).copy_(v)
        offset += v.numel()
    torch.save({"model": views}, tmp_path / "flat.pt")
    back = UniViGUModel.from_uni_vigu(tmp_path / "flat.pt")
    tensors = dict(back.named_parameters()) | dict(back.named_buffers())
    for k, t in tensors.items():
        assert torch.equal(t, sd[k]), k
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), k
    held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors.values()}
    assert sum(held.values()) == sum(t.numel() * t.element_size() for t in tensors.values())


def test_unreadable_torch_files_are_named_with_torch_reason(tmp_path):
    """A truncated .pt, a safetensors file named .pt and a text file: a ValueError naming the file and what
    torch found, not a bare RuntimeError / KeyError, nor the weights_only=False advice (which is for a
    checkpoint holding pickled objects)."""
    from safetensors.torch import save_file

    model = tiny_reference(seed=6)
    torch.save({"model": model.state_dict()}, tmp_path / "ok.pt")
    raw = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(raw[:len(raw) // 2])
    save_file(model.state_dict(), str(tmp_path / "renamed.pt"))
    (tmp_path / "text.pt").write_text("hello")
    found = {"cut.pt": "RuntimeError: PytorchStreamReader failed reading zip archive",
             "renamed.pt": "UnpicklingError: Unsupported operand", "text.pt": "KeyError: 101"}
    for name, reason in found.items():
        for load in (UniViGUModel.from_uni_vigu, lambda p: UniViGUModel.from_wan(p, attention_head_dim=16)):
            with pytest.raises(ValueError) as info:
                load(tmp_path / name)
            message = str(info.value)
            assert message.startswith(f"cannot read {tmp_path / name}: torch.load failed with {reason}"), message
            assert message.endswith("Expected a complete torch.save file (a safetensors file must be named "
                                    "*.safetensors)") and "weights_only=False" not in message, message
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        UniViGUModel.from_uni_vigu(tmp_path / "missing.pt")


def test_from_wan_names_from_pretrained_for_our_folders(tmp_path):
    """A save_pretrained folder, single-file or sharded, given to from_wan: the right loader is named (the
    sharded one got a FileNotFoundError listing its shards)."""
    model = tiny_reference(seed=6)
    model.save_pretrained(tmp_path / "one")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    for folder in ("one", "sharded"):
        for source in (tmp_path / folder, tmp_path / folder / "config.json"):
            with pytest.raises(ValueError, match=f"{folder} is a Uni-ViGU save_pretrained folder .*config.json has "
                                                 "text-stream fields.*: load it with from_pretrained"):
                UniViGUModel.from_wan(source)


def test_from_pretrained_says_what_the_path_is(tmp_path):
    """A file or a missing path is called so (not 'has no config.json'); a config without a class name is
    'another model's config'."""
    model = tiny_reference(seed=6)
    model.save_pretrained(tmp_path / "m")
    for path, problem in ((tmp_path / "m" / "model.safetensors", "is a file \\(give the folder\\)"),
                          (tmp_path / "gone", "does not exist"), (tmp_path, "has no config.json")):
        with pytest.raises(FileNotFoundError, match=f"^{re.escape(str(path))} {problem}: from_pretrained reads a folder"):
            UniViGUModel.from_pretrained(path)
    (tmp_path / "m" / "config.json").write_text('{"hidden_size": 8}')
    with pytest.raises(ValueError, match=r"config.json is another model's config, not one save_pretrained wrote"):
        UniViGUModel.from_pretrained(tmp_path / "m")
