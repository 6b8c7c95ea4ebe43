"""Dataset format and preprocessing with a tiny random Wan VAE and umT5 from local paths."""
import json

import pytest
import torch

from univigu_fast.data import ExampleWriter, LengthConstraints, VideoTextDataset, load_video, preprocess
from univigu_fast.training import ExampleSet

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

WORDS = ["a", "red", "cat", "runs", "on", "green", "grass", "slowly", "in", "the", "sun", "dog"]


def test_writer_reader_round_trip_and_length_constraints(tmp_path):
    null = torch.randn(1, 6)
    lat = [torch.randn(4, 2, 3, 3) for _ in range(5)]
    with ExampleWriter(tmp_path, text_dim=6, null_prompt=null, lengths=LengthConstraints((0, 3), (2, 4)),
                       shard_size=2) as w:
        assert w.add(lat[0], torch.randn(2, 6), torch.tensor([1, 2]), torch.tensor([3, 4, 5]))
        assert not w.add(lat[1], torch.randn(2, 6), torch.tensor([1, 2]), torch.tensor([3]))  # caption too short
        assert w.add(lat[2], torch.randn(5, 6), torch.arange(5), torch.arange(7))  # both truncated
        assert w.add(lat[3], torch.randn(0, 6), torch.zeros(0, dtype=torch.long), torch.arange(2))
        with pytest.raises(ValueError, match="text_dim"):
            w.add(lat[4], torch.randn(2, 5), torch.tensor([1]), torch.arange(3))
    ds = VideoTextDataset(tmp_path)
    assert len(ds) == 3 and ds.meta["skipped"]["caption_too_short"] == 1 and ds.meta["truncated"] == {"prompt": 1, "caption": 1}
    assert len(ds.meta["shards"]) == 2
    torch.testing.assert_close(ds.latents[1], lat[2])
    assert ds.prompt_ids[1].tolist() == [0, 1, 2] and ds.prompt_embeds[1].shape == (3, 6)
    assert ds.caption_ids[1].tolist() == [0, 1, 2, 3]
    assert ds.prompt_embeds[2].shape == (0, 6) and ds.caption_ids[-1].tolist() == [0, 1]
    torch.testing.assert_close(ds.null_prompt, null)
    assert len(ExampleSet.wrap(ds)) == 3  # the trainer takes it as is
    with pytest.raises(IndexError):
        ds.get(3, "latents")
    with pytest.raises(ValueError, match="min <= max"):
        LengthConstraints((5, 2))


def _write_two(path, **writer_kwargs):
    with ExampleWriter(path, text_dim=6, null_prompt=torch.randn(1, 6), lengths=LengthConstraints((0, 3), (0, 4)),
                       **writer_kwargs) as w:
        for _ in range(2):
            w.add(torch.randn(4, 2, 3, 3), torch.randn(2, 6), torch.tensor([1, 2]), torch.tensor([3, 4]))


def test_writer_refuses_bad_examples_and_options(tmp_path):
    null = torch.randn(1, 6)
    with pytest.raises(ValueError, match="shard_size"):
        ExampleWriter(tmp_path / "a", text_dim=6, null_prompt=null, shard_size=0)
    with pytest.raises(TypeError, match="two ints"):
        LengthConstraints((0, 2.5))
    w = ExampleWriter(tmp_path / "b", text_dim=6, null_prompt=null, lengths=LengthConstraints((0, 3), (5, 9)))
    lat, emb = torch.randn(4, 2, 3, 3), torch.randn(2, 6)
    for ids, match in ((torch.tensor([True, False]), "integer ids"), (torch.tensor([1, -3]), ">= 0")):
        with pytest.raises(ValueError, match=match):
            w.add(lat, emb, ids, torch.arange(6))
    # an inconsistent example is refused even when its caption is too short to be kept
    with pytest.raises(ValueError, match="3 rows for 2 prompt_ids"):
        w.add(lat, torch.randn(3, 6), torch.tensor([1, 2]), torch.arange(2))
    with pytest.warns(UserWarning, match="no example written"):
        w.close()


def test_reader_checks_meta_and_stored_tensors(tmp_path):
    _write_two(tmp_path / "ok")
    ds = VideoTextDataset(tmp_path / "ok")
    # integer indices of any kind (a shuffled torch.randperm), not floats
    torch.testing.assert_close(ds.latents[torch.tensor(1)], ds.latents[1])
    assert [ds.caption_ids[i].tolist() for i in torch.randperm(2)] == [[3, 4], [3, 4]]
    with pytest.raises(TypeError):
        ds.get(1.0, "latents")
    meta = json.loads((tmp_path / "ok" / "meta.json").read_text())
    for change, match in (({"count": 3}, r"examples 0..1, count says 0..2"), ({"count": 1}, "count says 0..0"),
                          ({"version": 99}, "version 99")):
        (tmp_path / "ok" / "meta.json").write_text(json.dumps({**meta, **change}))
        with pytest.raises(ValueError, match=match):
            VideoTextDataset(tmp_path / "ok")
    # a shard whose tensors do not match meta.json fails when read, naming the file and key (the null
    # prompt, read when opened, is checked against meta.json too)
    (tmp_path / "ok" / "meta.json").write_text(json.dumps({**meta, "text_dim": 8}))
    with pytest.raises(ValueError, match=r"null_prompt.safetensors: must hold .* text_dim=8\) tensor, got torch.float32 \(1, 6\)"):
        VideoTextDataset(tmp_path / "ok")
    from safetensors.torch import save_file
    save_file({"null_prompt_embeds": torch.zeros(1, 8)}, str(tmp_path / "ok" / "null_prompt.safetensors"))
    with pytest.raises(ValueError, match=r"shard_00000.safetensors: 0.prompt_embeds is torch.float32 \(2, 6\)"):
        VideoTextDataset(tmp_path / "ok").prompt_embeds[0]


def test_reader_names_corrupt_meta_and_shards(tmp_path):
    """A meta.json without count / shards, overlapping shard ranges, a shard missing a declared example
    and an example whose prompt rows do not match its ids are named (bare KeyErrors and a safetensors
    error without the file before)."""
    _write_two(tmp_path / "d", shard_size=1)
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    for change, match in (({"shards": None}, "'shards' must be a list"), ({"count": "2"}, "'count' must be an int"),
                          ({"shards": [meta["shards"][0], {**meta["shards"][1], "first": 0}]},
                           "example 0 is in both shard_00000.safetensors and shard_00001.safetensors"),
                          ({"shards": [{**meta["shards"][0], "count": 2}]}, "")):
        (tmp_path / "d" / "meta.json").write_text(json.dumps({**meta, **change}))
        if match:
            with pytest.raises(ValueError, match=match):
                VideoTextDataset(tmp_path / "d")
        else:  # example 1 declared in shard 0, which does not hold it
            with pytest.raises(ValueError, match=r"shard_00000.safetensors: has no 1.latents"):
                VideoTextDataset(tmp_path / "d").latents[1]
    from safetensors.torch import load_file, save_file
    (tmp_path / "d" / "meta.json").write_text(json.dumps(meta))
    shard = load_file(str(tmp_path / "d" / "shard_00001.safetensors"))
    save_file({**shard, "1.prompt_ids": torch.tensor([1, 2, 3])}, str(tmp_path / "d" / "shard_00001.safetensors"))
    with pytest.raises(ValueError, match="example 1 has 2 prompt_embeds rows for 3 prompt_ids"):
        VideoTextDataset(tmp_path / "d")[1]


def test_reader_names_broken_files(tmp_path):
    """A torn meta.json, a truncated shard and a null prompt file without its tensor (or of the wrong
    form) are named (a bare JSONDecodeError / SafetensorError / KeyError before)."""
    _write_two(tmp_path / "d")
    meta_path, shard = tmp_path / "d" / "meta.json", tmp_path / "d" / "shard_00000.safetensors"
    meta = meta_path.read_text()
    meta_path.write_text(meta[: len(meta) // 2])
    with pytest.raises(ValueError, match=r"meta.json is not valid JSON: .* at line \d+ column \d+"):
        VideoTextDataset(tmp_path / "d")
    meta_path.write_text(meta)
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ValueError, match="shard_00000.safetensors: not a readable safetensors shard"):
        VideoTextDataset(tmp_path / "d").latents[0]
    from safetensors.torch import save_file
    for tensors, got in (({"other": torch.zeros(1, 6)}, "got none"), ({"null_prompt_embeds": torch.zeros(6)}, r"got .* \(6,\)"),
                         ({"null_prompt_embeds": torch.zeros(1, 5)}, r"got .* \(1, 5\)")):
        save_file(tensors, str(tmp_path / "d" / "null_prompt.safetensors"))
        with pytest.raises(ValueError, match=rf"null_prompt.safetensors: must hold null_prompt_embeds, a float \(L0, text_dim=6\) tensor, {got}"):
            VideoTextDataset(tmp_path / "d")


def safe_open_keys(path):
    """(key, data offset) of each tensor in a safetensors file, from its header."""
    import struct

    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    return [(k, v["data_offsets"][0]) for k, v in header.items() if k != "__metadata__"]


def test_read_tensors_own_their_memory_and_the_dataset_pickles(tmp_path):
    """The tensors read view the shard file's memory map no more: an in-place change by a caller was seen
    by every later read (14 after one doubling), a rewrite of the file changed tensors already handed out
    (and a truncation killed the process with SIGBUS). A dataset that has been read pickles (its open
    shard handles did not: a DataLoader with spawned workers failed)."""
    import pickle

    _write_two(tmp_path / "d")
    ds = VideoTextDataset(tmp_path / "d")
    first, null = ds.latents[0].clone(), ds.null_prompt.clone()
    ds.latents[0].mul_(2)
    torch.testing.assert_close(ds.latents[0], first, rtol=0, atol=0)
    shard = tmp_path / "d" / "shard_00000.safetensors"
    last = sorted(safe_open_keys(shard), key=lambda kv: kv[1])[-1][0]  # the tensor stored last in the file
    index, key = int(last.split(".")[0]), last.split(".", 1)[1]
    held = ds.get(index, key)
    before = held.clone()
    data = bytearray(shard.read_bytes())
    data[-held.numel() * held.element_size():] = bytes(held.numel() * held.element_size())  # its bytes, in place
    with open(shard, "r+b") as f:
        f.write(data)
    (tmp_path / "d" / "null_prompt.safetensors").write_bytes(b"")
    torch.testing.assert_close(held, before, rtol=0, atol=0)
    assert not ds.get(index, key).any()  # a new read sees the rewrite
    torch.testing.assert_close(ds.null_prompt, null, rtol=0, atol=0)
    copy = pickle.loads(pickle.dumps(ds))
    assert copy._open == {} and len(copy) == 2 and copy.caption_ids[1].tolist() == [3, 4]
    shard.write_bytes(shard.read_bytes()[:200])  # truncated while the handle is open (SIGBUS): reopened, named
    with pytest.raises(ValueError, match="shard_00000.safetensors: not a readable safetensors shard"):
        ds.latents[1]


def test_rewriting_a_folder_never_mixes_two_datasets(tmp_path):
    """A writer opening a folder that holds examples removes its meta.json first: an interrupted rewrite
    leaves an unreadable folder, not the new shard 0 beside the old shard 1 under the old meta."""
    _write_two(tmp_path / "d", shard_size=1)
    w = ExampleWriter(tmp_path / "d", text_dim=6, null_prompt=torch.randn(1, 6), shard_size=1,
                      lengths=LengthConstraints((0, 3), (0, 4)))
    w.add(torch.randn(4, 2, 3, 3), torch.randn(1, 6), torch.tensor([7]), torch.tensor([8]))  # flushes shard 0
    with pytest.raises(FileNotFoundError, match="not a univigu-fast examples directory"):  # the run "died"
        VideoTextDataset(tmp_path / "d")
    w.close()
    ds = VideoTextDataset(tmp_path / "d")
    assert len(ds) == 1 and ds.caption_ids[0].tolist() == [8]


def test_load_video_refuses_float_frames_outside_unit_range(tmp_path):
    torch.save(torch.rand(5, 8, 8, 3) * 255, tmp_path / "v.pt")
    with pytest.raises(ValueError, match=r"float frames must lie in \[0, 1\]"):
        load_video(tmp_path / "v.pt")
    for frames in (torch.full((2, 8, 8, 3), 1000, dtype=torch.int16), torch.ones(2, 8, 8, 3, dtype=torch.bool)):
        torch.save(frames, tmp_path / "i.pt")  # 10-bit frames / 255 saturated; bool frames became -0.99
        with pytest.raises(ValueError, match=f"frames must be uint8 .* or float in \\[0, 1\\], got {frames.dtype}"):
            load_video(tmp_path / "i.pt")


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    """A tiny random Wan diffusers folder: vae/, text_encoder/ (umT5), tokenizer/."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    root = tmp_path_factory.mktemp("wan-tiny")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2], num_res_blocks=1,
                                     temperal_downsample=[True], attn_scales=[])
    vae.save_pretrained(root / "vae")
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: 3 + i for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>").save_pretrained(root / "tokenizer")
    te = UMT5EncoderModel(UMT5Config(vocab_size=len(vocab), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2))
    te.save_pretrained(root / "text_encoder")
    return root


def test_preprocess_with_tiny_wan_vae_and_umt5(wan_dir, tmp_path):
    g = torch.Generator().manual_seed(0)
    torch.save((torch.rand(6, 16, 16, 3, generator=g) * 255).to(torch.uint8), tmp_path / "v0.pt")
    torch.save(torch.rand(5, 16, 24, 3, generator=g), tmp_path / "v1.pt")
    rows = [dict(video="v0.pt", prompt="a red cat", caption="a red cat runs on green grass slowly"),
            dict(video="v1.pt", prompt="a dog runs in the sun", caption="a dog"),  # caption too short -> skipped
            dict(video=str(tmp_path / "v1.pt"), prompt="a dog runs in the sun", caption="a dog runs on the grass in the sun")]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    meta = preprocess(tmp_path / "m.jsonl", tmp_path / "out", model_path=wan_dir,
                      lengths=LengthConstraints((0, 4), (5, 8)), progress=False)
    assert meta["count"] == 2 and meta["skipped"]["caption_too_short"] == 1 and meta["text_dim"] == 16
    ds = VideoTextDataset(tmp_path / "out")
    # 6 frames -> 5 (4k + 1) -> 3 latent frames (one temporal /2 level in this tiny VAE); spatial /2; 16 channels
    assert ds.latents[0].shape == (16, 3, 8, 8) and ds.latents[1].shape == (16, 3, 8, 12)
    assert ds.prompt_ids[0].tolist() == [3, 4, 5, 1]  # "a red cat </s>"
    # cut by the tokenizer to the maximum, so a cut text still ends in </s> (id 1), as Wan's prompts do
    assert ds.prompt_ids[1].tolist() == [3, 14, 6, 1] and ds.caption_ids[1].tolist() == [3, 14, 6, 7, 12, 9, 11, 1]
    assert meta["truncated"] == {"prompt": 1, "caption": 2} and ds.caption_ids[0].tolist() == [3, 4, 5, 6, 7, 8, 9, 1]
    # the stored embedding is umT5 of the stored ids (not rows cut from a longer text's encoding)
    from transformers import UMT5EncoderModel

    te = UMT5EncoderModel.from_pretrained(wan_dir / "text_encoder")
    for i in range(2):
        with torch.no_grad():
            h = te(ds.prompt_ids[i][None]).last_hidden_state[0]
        torch.testing.assert_close(ds.prompt_embeds[i], h)
    # latents are the VAE's mode, normalised by latents_mean / latents_std
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(wan_dir / "vae")
    x = load_video(tmp_path / "v0.pt")[:, :5]
    with torch.no_grad():
        z = vae.encode(x[None]).latent_dist.mode()[0]
    mean = torch.tensor(vae.config.latents_mean).view(-1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(-1, 1, 1, 1)
    torch.testing.assert_close(ds.latents[0], (z - mean) / std, rtol=1e-4, atol=1e-4)
    # the empty prompt's embedding is umT5 of "" (just </s>)
    assert ds.null_prompt.shape == (1, 16)
    with pytest.raises(ValueError, match="model_path"):
        preprocess(tmp_path / "m.jsonl", tmp_path / "o2")
    # sizes the VAE stride (2 here) x the 2 x 2 patch do not divide are refused with their manifest line
    torch.save(torch.rand(5, 16, 18, 3, generator=g), tmp_path / "v2.pt")
    (tmp_path / "m2.jsonl").write_text(json.dumps(dict(video="v2.pt", prompt="a cat", caption=rows[0]["caption"])))
    with pytest.raises(ValueError, match=r"m2.jsonl line 1: video .*v2.pt has 5 frames of 16 x 18; .* multiples of 4"):
        preprocess(tmp_path / "m2.jsonl", tmp_path / "o3", model_path=wan_dir, lengths=LengthConstraints((0, 4), (5, 8)),
                   progress=False)


def test_preprocess_refuses_bad_manifest_lines_before_loading(tmp_path):
    """A missing video or a line that is not JSON is reported with its manifest line before any model is
    loaded (no model path is given here: loading would fail with another error)."""
    torch.save(torch.zeros(5, 8, 8, 3), tmp_path / "v0.pt")
    good = json.dumps(dict(video="v0.pt", prompt="a cat", caption="a cat runs"))
    for bad, error, match in ((json.dumps(dict(video="gone.pt", prompt="a", caption="b")), FileNotFoundError,
                               r"m.jsonl line 3: video .*gone.pt not found"),
                              ("{video: v0.pt}", ValueError, "m.jsonl line 3: not JSON"),
                              ("5", ValueError, "m.jsonl line 3: expected a JSON object"),
                              (json.dumps(dict(video="v0.pt", prompt=None, caption=["x"])), ValueError,
                               "m.jsonl line 3: prompt, caption must be strings, got NoneType, list")):
        (tmp_path / "m.jsonl").write_text("\n".join([good, "", bad, good]) + "\n")
        with pytest.raises(error, match=match):
            preprocess(tmp_path / "m.jsonl", tmp_path / "out")
    with pytest.raises(ValueError, match="max >= 1"):
        LengthConstraints((0, 0))
    (tmp_path / "m.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="m.jsonl: no examples"):
        preprocess(tmp_path / "m.jsonl", tmp_path / "out")


def test_cli_text_front_end_pads_prompts_as_wan(wan_dir):
    """The CLI's umT5 front end feeds prompts as Wan's pipeline does: cut to --prompt-length tokens (keeping
    </s>), encoded, zero-padded to that many rows (512 by default); the empty prompt likewise."""
    from transformers import UMT5EncoderModel

    from univigu_fast.cli_flow import _TextFrontEnd
    from univigu_fast.config import UniViGUConfig
    from univigu_fast.model import UniViGUModel

    model = UniViGUModel(UniViGUConfig.tiny(text_dim=16, vocab_size=16))
    te = UMT5EncoderModel.from_pretrained(wan_dir / "text_encoder")
    fe = _TextFrontEnd(model, wan_dir / "tokenizer", wan_dir / "text_encoder", synthetic=False)
    emb, ids = fe.encode("a red cat")
    assert ids.tolist() == [3, 4, 5, 1] and emb.shape == (512, 16)
    with torch.no_grad():
        torch.testing.assert_close(emb[:4], te(ids[None]).last_hidden_state[0])
    assert not emb[4:].any() and fe.null().shape == (512, 16) and fe.null()[1:].abs().sum() == 0
    emb, ids = _TextFrontEnd(model, wan_dir / "tokenizer", wan_dir / "text_encoder", False, 3).encode("a red cat")
    assert ids.tolist() == [3, 4, 1] and emb.shape == (3, 16)
    emb, ids = _TextFrontEnd(model, wan_dir / "tokenizer", wan_dir / "text_encoder", False, 0).encode("a red cat")
    assert emb.shape == (4, 16)
    # caption --data decodes only (the examples folder holds the empty prompt): no encoder is asked for or loaded
    decoder = _TextFrontEnd(model, wan_dir / "tokenizer", None, False, encoder=False)
    assert decoder.te is None and decoder.decode(torch.tensor([3, 4, 5, 1])) == fe.decode(torch.tensor([3, 4, 5, 1]))
    with pytest.raises(RuntimeError, match="only decodes"):
        decoder.encode("a red cat")
