"""Text utilities: any HF tokenizer (a tiny one built here), tokenize/detokenize, reference decode."""
import pytest
import torch

from _models import randomize, tiny_reference
from univigu_fast.config import UniViGUConfig
from univigu_fast.reference import UniViGUModel
from univigu_fast.text import check_tokenizer, decode, decode_features, detokenize, load_tokenizer, tokenize

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

WORDS = ["a", "cat", "dog", "runs", "on", "the", "grass", "video", "of", "red"]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A 14-id word-level tokenizer (pad 0, </s> 1, unk 2, [x] 3, 10 words), saved like umT5's folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "[x]": 3, **{w: 4 + i for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>",
                                                unk_token="<unk>")
    root = tmp_path_factory.mktemp("wan") / "Wan2.1-T2V-tiny"
    fast.save_pretrained(root / "tokenizer")
    return root


def test_load_tokenizer_from_folder_and_env(tok_dir, monkeypatch):
    a = load_tokenizer(tok_dir / "tokenizer")
    b = load_tokenizer(tok_dir)  # a Wan folder: its tokenizer/ subfolder
    assert len(a) == len(b) == 14
    monkeypatch.setenv("UNIVIGU_TOKENIZER", str(tok_dir / "tokenizer"))
    assert load_tokenizer().convert_tokens_to_ids("cat") == 5
    monkeypatch.delenv("UNIVIGU_TOKENIZER")
    with pytest.raises(ValueError, match="path"):
        load_tokenizer()


def test_tokenize_pads_and_round_trips(tok_dir):
    tok = load_tokenizer(tok_dir)
    texts = ["a cat runs on the grass", "red dog", ""]
    ids, lens = tokenize(tok, texts)
    assert lens.tolist() == [7, 3, 1]  # words + </s>
    assert ids.shape == (3, 7) and ids.dtype == torch.long
    assert ids[0].tolist() == [4, 5, 7, 8, 9, 10, 1]
    assert ids[1].tolist() == [13, 6, 1, 0, 0, 0, 0]  # right-padded with pad id 0
    assert detokenize(tok, ids, lens) == texts
    ids2, lens2 = tokenize(tok, texts, max_length=2)
    assert ids2.shape == (3, 2) and lens2.tolist() == [2, 2, 1]
    assert ids2[:, 1].tolist() == [1, 1, 0]  # a cut text keeps its </s>, as Wan's prompts and preprocess do
    assert tokenize(tok, texts, max_length=0)[1].tolist() == [0, 0, 0]
    with pytest.raises(TypeError, match="texts"):
        tokenize(tok, [1, 2])
    with pytest.raises(ValueError, match="text_lens"):
        detokenize(tok, ids, torch.tensor([8, 1, 1]))
    with pytest.raises(TypeError, match="text_lens must hold integer lengths"):
        detokenize(tok, ids, lens.float())


def test_tokenizer_vocab_checked_against_config(tok_dir):
    tok = load_tokenizer(tok_dir)
    check_tokenizer(tok, UniViGUConfig.tiny(vocab_size=14))
    with pytest.raises(ValueError, match="vocab_size=13"):
        tokenize(tok, "a cat", config=UniViGUConfig.tiny(vocab_size=13))


def test_detokenize_drops_mask_and_unknown_ids(tok_dir):
    tok = load_tokenizer(tok_dir)
    config = UniViGUConfig.tiny(vocab_size=20, discrete_source="mask")
    ids = [torch.tensor([5, config.mask_token_id, 6, 17, 1])]  # 17: a padded-vocabulary row the tokenizer lacks
    assert detokenize(tok, ids) == ["cat dog"]
    import numpy as np
    assert detokenize(tok, [ids[0].numpy()]) == ["cat dog"]  # NumPy rows decode as tensors do
    # logits (one sample's (N, V), or the model's list form) or float ids were decoded to nonsense
    for bad in (torch.randn(3, 20), [torch.randn(3, 20)], [torch.tensor([3.7, 4.2])]):
        with pytest.raises(ValueError, match=r"ids\[0\] must be 1-D integer token ids"):
            detokenize(tok, bad)


def test_pad_prompt_and_lengths_name_bad_values():
    from univigu_fast.packing import padded_lengths
    from univigu_fast.text import pad_prompt

    for length in (5.0, -1, True):
        with pytest.raises(ValueError, match="length must be an int >= 0"):
            pad_prompt(torch.zeros(2, 4), length)
    import numpy as np
    assert pad_prompt(torch.zeros(2, 4), np.int64(3)).shape == (3, 4)
    with pytest.raises(TypeError, match="text_lens must hold integer lengths"):
        padded_lengths([1, None], 2, 3)


def test_tokens_drive_the_model_and_decode_matches_argmax(tok_dir):
    tok = load_tokenizer(tok_dir)
    model = tiny_reference(seed=3, vocab_size=16)
    c = model.config
    ids, lens = tokenize(tok, ["a cat runs", "red dog on the grass"], config=c)
    g = torch.Generator().manual_seed(0)
    video = torch.randn(2, c.in_channels, 1, 4, 4, generator=g)
    prompt = torch.randn(2, 3, c.text_dim, generator=g)
    tau = torch.tensor([0.4, 0.7])
    with torch.no_grad():
        out = model(video, tau, prompt, text=ids, tau_text=tau, text_lens=lens)
        fused = model(video, tau, prompt, text=ids, tau_text=tau, text_lens=lens, text_output="argmax").text_out
    got = decode(model, out.text_out, lens)
    assert got.shape == ids.shape
    for i, n in enumerate(lens.tolist()):
        assert torch.equal(got[i, :n], out.text_out[i, :n].argmax(-1))
        assert torch.equal(got[i, :n], fused.ids[i, :n])
        assert torch.equal(got[i, n:], torch.zeros_like(got[i, n:]))
    assert isinstance(detokenize(tok, got, lens)[0], str)
    # list form mirrors the input
    listed = decode(model, [out.text_out[0, :4], out.text_out[1, :6]])
    assert [t.shape[0] for t in listed] == [4, 6] and torch.equal(listed[0], got[0, :4])
    with pytest.raises(ValueError, match="text_vocab_size"):
        decode(model, torch.zeros(1, 3, c.text_vocab_size + 1))


def test_decode_features_uses_the_head():
    model = tiny_reference(seed=4)
    feats = torch.randn(9, model.config.dim)
    lin = model.text_head.linear
    want = (feats @ lin.weight.t() + lin.bias).argmax(-1)
    assert torch.equal(decode_features(model, feats), want)
    with pytest.raises(ValueError, match="features"):
        decode_features(model, feats[:, :-1])


def test_decode_embedding_flow_is_nearest_row():
    """Paper Eq. 8: argmax_v z . E_v over the real vocabulary (the mask row is never chosen)."""
    torch.manual_seed(0)
    model = randomize(UniViGUModel(UniViGUConfig.tiny(text_flow="embedding", vocab_size=30)), seed=5)
    E = model.vocab_embed.weight.detach()
    target = torch.randint(0, 30, (2, 5))
    z = E[target] * 3.0  # scaled rows: the dot product picks their own id (rows are random, well separated)
    want = (z @ E[:30].t()).argmax(-1)
    got = decode(model, z, torch.tensor([5, 2]))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1, :2], want[1, :2])
    assert torch.equal(got[1, 2:], torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="dim"):
        decode(model, torch.zeros(1, 2, model.config.dim + 1))


def test_pad_prompt_as_wan():
    from univigu_fast.text import WAN_TEXT_LEN, pad_prompt

    e = torch.randn(5, 8)
    p = pad_prompt(e)
    assert p.shape == (WAN_TEXT_LEN, 8) == (512, 8) and torch.equal(p[:5], e) and not p[5:].any()
    assert pad_prompt(e, 0) is e and pad_prompt(e, 5).equal(e)
    with pytest.raises(ValueError, match="6 rows, more than the padded length 5"):
        pad_prompt(torch.randn(6, 8), 5)
    with pytest.raises(ValueError, match=r"\(L, text_dim\)"):
        pad_prompt(torch.randn(8))
