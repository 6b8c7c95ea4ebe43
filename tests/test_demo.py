"""The demo pipeline at a tiny size (metrics.json contract) and the CLI commands end to end."""
import json

import pytest
import torch
from typer.testing import CliRunner

from univigu_fast import synthetic as S
from univigu_fast.cli import app
from univigu_fast.demo import DemoConfig, evaluate_understanding, load_run, run_demo

REQUIRED = ("understanding_attribute_accuracy", "understanding_caption_only_attribute_accuracy",
            "stage1_caption_only_attribute_accuracy", "generation_accuracy", "joint_agreement",
            "joint_background_agreement", "joint_background_agreement_shuffled", "chance", "seconds")

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny models, one torch thread


def test_synthetic_task_is_consistent():
    data = S.make_dataset(40, 3, text_dim=8)
    vae = S.SyntheticVAE()
    for s, z in zip(data.samples, data.latents):
        px = vae.decode(z)
        torch.testing.assert_close(vae.encode(px), z, rtol=1e-4, atol=1e-4)  # the "VAE" is invertible
        assert S.read_video(px) == {"color": s.color, "direction": s.direction, "background": s.background}
        assert all(S.attribute_scores(s.caption, s).values())
        assert S.parse_caption(s.prompt)["size"] is None  # the prompt lacks caption-only attributes
    tok = S.SyntheticTokenizer()
    assert tok.decode(tok.encode(data.samples[0].caption)) == data.samples[0].caption
    assert 0 < S.chance() < 0.5
    train, test = S.split_samples(30, 10, 0)
    assert not {S.combo(s) for s in train} & {S.combo(s) for s in test}


def test_run_demo_tiny_writes_metrics(tmp_path):
    cfg = DemoConfig(seed=1, n_train=24, n_test=4, steps1=3, steps2=3, batch_size=4, layers=1, caption_steps=2,
                     gen_steps=2)
    m = run_demo(cfg, tmp_path, progress=False, log=lambda *a: None)
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    for k in REQUIRED:
        assert k in on_disk and isinstance(on_disk[k], float), k
        assert 0.0 <= on_disk[k] <= 1.0 or k == "seconds"
    assert m["chance"] == pytest.approx(S.chance())
    # load_run gives back the run's config, trained model and held-out split: the caption metric reproduces
    cfg2, saved, model, test = load_run(tmp_path)
    assert saved == on_disk and (cfg2.seed, cfg2.n_test, cfg2.steps2) == (cfg.seed, cfg.n_test, cfg.steps2)
    assert [s.caption for s in test.samples] == [s.caption for s in S.split_samples(cfg.n_train, cfg.n_test, cfg.seed)[1]]
    u = evaluate_understanding(model, test, steps=cfg.caption_steps, seed=cfg.seed, temperature=cfg.sampler_temperature)
    assert u["attribute_accuracy"] == on_disk["understanding_attribute_accuracy"]


def test_evaluate_understanding_accepts_another_sampler():
    data = S.make_dataset(3, 0, text_dim=8)
    truth = [S.SyntheticTokenizer().encode(s.caption) for s in data.samples]

    def oracle(model, videos, prompts, lens, steps, seed):
        return truth  # a "sampler" that knows the answer

    class M:
        device, dtype = torch.device("cpu"), torch.float32

        def eval(self):
            return self

    r = evaluate_understanding(M(), data, caption_fn=oracle)
    assert r["attribute_accuracy"] == 1.0 and r["caption_only_attribute_accuracy"] == 1.0


def test_cli_train_caption_generate_joint(tmp_path, monkeypatch):
    """The commands run the fast model (kernels in the interpreter here; the reference ops without a GPU
    or the interpreter)."""
    from univigu_fast import training
    from univigu_fast.cli_flow import _load_model
    from univigu_fast.config import UniViGUConfig
    from univigu_fast.model import UniViGUModel as FastModel

    trained = []
    init = training.Trainer.__init__
    monkeypatch.setattr(training.Trainer, "__init__", lambda self, model, *a, **k: (trained.append(type(model)),
                                                                                     init(self, model, *a, **k))[1])
    runner = CliRunner()
    cfg = UniViGUConfig.tiny(in_channels=16, out_channels=16, text_dim=8, vocab_size=len(S.SyntheticTokenizer()))
    cfg.save(tmp_path / "cfg.json")
    r = runner.invoke(app, ["train", "--out", str(tmp_path / "s1"), "--config", str(tmp_path / "cfg.json"),
                            "--synthetic", "16", "--steps", "2", "--batch-size", "4", "--save-every", "1"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output.strip().splitlines()[-1])["step"] == 2
    r = runner.invoke(app, ["train", "--out", str(tmp_path / "s2"), "--stage", "2", "--model", str(tmp_path / "s1" / "model"),
                            "--synthetic", "16", "--steps", "1", "--batch-size", "4"])
    assert r.exit_code == 0, r.output
    model = str(tmp_path / "s2" / "model")
    assert trained == [FastModel, FastModel] and type(_load_model(tmp_path / "s2" / "model", "cpu")) is FastModel
    lat = tmp_path / "z.pt"
    torch.save(S.make_dataset(1, 0, text_dim=8).latents[0], lat)
    r = runner.invoke(app, ["caption", "--model", model, "--latents", str(lat), "--synthetic", "--length", "6", "--steps", "2"])
    assert r.exit_code == 0, r.output
    assert len(r.output.split()) <= 6, r.output
    r = runner.invoke(app, ["generate", "--model", model, "--prompt", "a red square moving left", "--synthetic",
                            "--frames", "3", "--height", "8", "--width", "8", "--steps", "2", "--out", str(tmp_path / "g.pt")])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["shape"] == [16, 3, 8, 8] and torch.load(tmp_path / "g.pt").shape == (16, 3, 8, 8) and "read_video" in info
    r = runner.invoke(app, ["joint", "--model", model, "--prompt", "a red square moving left", "--synthetic", "--length", "5",
                            "--frames", "3", "--height", "8", "--width", "8", "--steps", "2", "--out", str(tmp_path / "j.pt")])
    assert r.exit_code == 0, r.output
    assert "caption" in json.loads(r.output)
    r = runner.invoke(app, ["caption", "--model", model, "--latents", str(lat)])
    assert r.exit_code != 0 and "--synthetic" in r.output


def test_cli_inference_and_train_option_checks(tmp_path, monkeypatch):
    """Bad sampler options are usage errors naming the option (they raised internal-argument errors);
    ``joint`` passes --temperature / --kappa-power on; ``train --text-flow`` / ``--kappa-power`` that would
    be ignored are refused."""
    from univigu_fast import sampling
    from univigu_fast.config import UniViGUConfig
    from univigu_fast.reference import UniViGUModel

    cfg = UniViGUConfig.tiny(in_channels=16, out_channels=16, text_dim=8, vocab_size=len(S.SyntheticTokenizer()))
    torch.manual_seed(0)
    UniViGUModel(cfg).save_pretrained(tmp_path / "m")
    cfg.save(tmp_path / "cfg.json")
    UniViGUModel(UniViGUConfig.tiny(text_flow="embedding")).save_pretrained(tmp_path / "emb")
    model = ["--model", str(tmp_path / "m"), "--synthetic"]
    base = ["--prompt", "a red square", "--frames", "1", "--height", "2", "--width", "2", "--steps", "1",
            "--out", str(tmp_path / "o.pt")]
    x = str(tmp_path / "x.pt")
    torch.save(torch.zeros(16, 1, 2, 2), x)
    runner = CliRunner()
    for cmd, args, named in (("caption", ["--latents", x, "--length", "-1"], "--length"),
                             ("caption", ["--latents", x, "--kappa-power", "0"], "--kappa-power"),
                             ("caption", ["--latents", x, "--temperature", "nan"], "--temperature"),
                             ("joint", base + ["--temperature", "1e-38"], "--temperature"),  # (inf logits)
                             ("caption", ["--latents", x, "--steps", "0"], "--steps"),
                             ("generate", base + ["--height", "5"], "--height"),
                             ("generate", base + ["--shift", "0"], "--shift"),
                             ("generate", base + ["--guidance", "nan"], "--guidance"),  # (all-NaN latents, exit 0)
                             ("joint", base + ["--guidance", "inf"], "--guidance"),
                             ("joint", base + ["--width", "0"], "--width"),
                             ("joint", base + ["--kappa-power", "-1"], "--kappa-power")):
        r = runner.invoke(app, [cmd, *model, *args])
        assert r.exit_code == 2 and named in r.output and "Invalid value" in r.output, (cmd, args, r.output)
    seen = {}

    def spy(*a, **k):
        seen.update(k)
        raise SystemExit(0)

    monkeypatch.setattr(sampling, "joint", spy)
    r = runner.invoke(app, ["joint", *model, *base, "--temperature", "0.7", "--kappa-power", "2"])
    assert r.exit_code == 0 and seen["temperature"] == 0.7 and seen["kappa_power"] == 2.0, r.output
    for args, named in ((["--model", str(tmp_path / "m"), "--text-flow", "embedding"], "--text-flow"),
                        (["--config", str(tmp_path / "cfg.json"), "--text-flow", "discrete"], "--text-flow"),
                        (["--model", str(tmp_path / "emb"), "--kappa-power", "2"], "--kappa-power")):
        r = runner.invoke(app, ["train", "--out", str(tmp_path / "t"), "--synthetic", "4", "--steps", "1", *args])
        assert r.exit_code == 2 and named in r.output, (args, r.output)
    # the embedding flow samples nothing: --temperature / --kappa-power were accepted and did nothing
    emb = ["--model", str(tmp_path / "emb"), "--synthetic"]
    for cmd, args, named in (("caption", ["--latents", x, "--temperature", "0.5"], "--temperature"),
                             ("caption", ["--latents", x, "--kappa-power", "2"], "--kappa-power"),
                             ("joint", base + ["--temperature", "0.5"], "--temperature")):
        r = runner.invoke(app, [cmd, *emb, *args])
        assert r.exit_code == 2 and named in r.output and "text_flow is 'embedding'" in r.output, (cmd, args, r.output)


def test_cli_user_mistakes_are_usage_errors(tmp_path, monkeypatch):
    """A missing or foreign --model / --data / --latents / --manifest, an --index out of range, latents of the
    wrong form, a bad --device, --out naming a folder and a negative --synthetic are usage errors naming the
    option (exit 2, no traceback; they were tracebacks, --out one only after the whole sampling run)."""
    from univigu_fast import sampling
    from univigu_fast.config import UniViGUConfig
    from univigu_fast.data import ExampleWriter, LengthConstraints
    from univigu_fast.reference import UniViGUModel

    cfg = UniViGUConfig.tiny(in_channels=16, out_channels=16, text_dim=8, vocab_size=len(S.SyntheticTokenizer()))
    UniViGUModel(cfg).save_pretrained(tmp_path / "m")
    with ExampleWriter(tmp_path / "ex", text_dim=8, null_prompt=torch.zeros(1, 8),
                       lengths=LengthConstraints((0, 8), (0, 8))) as w:
        w.add(torch.zeros(16, 1, 2, 2), torch.zeros(1, 8), torch.tensor([1]), torch.tensor([2, 3]))
    (tmp_path / "empty").mkdir()
    torch.save({"video": torch.zeros(16, 1, 2, 2)}, tmp_path / "dict.pt")
    torch.save(torch.zeros(4, 1, 2, 2), tmp_path / "four.pt")
    torch.save(torch.zeros(16, 1, 2, 2), tmp_path / "16.pt")
    (tmp_path / "text.pt").write_text("not a tensor file")
    monkeypatch.setattr(sampling, "generate", lambda *a, **k: pytest.fail("sampled before checking --out"))
    model = ["--model", str(tmp_path / "m"), "--synthetic"]
    gen = ["generate", *model, "--prompt", "a", "--frames", "1", "--height", "2", "--width", "2", "--steps", "1"]
    cases = [(["caption", "--model", str(tmp_path / "gone"), "--latents", str(tmp_path / "four.pt")], "--model"),
             (["caption", "--model", str(tmp_path / "empty"), "--synthetic", "--latents", str(tmp_path / "four.pt")], "--model"),
             (["caption", *model, "--latents", str(tmp_path / "dict.pt")], "--latents"),
             (["caption", *model, "--latents", str(tmp_path / "text.pt")], "not a torch tensor file"),
             (["caption", *model, "--latents", str(tmp_path / "four.pt")], "in_channels=16"),
             (["caption", *model, "--data", str(tmp_path / "empty")], "--data"),
             (["caption", *model, "--data", str(tmp_path / "ex"), "--index", "5"], "--index 5 is out of range"),
             (["caption", *model, "--data", str(tmp_path / "ex"), "--device", "bogus"], "--device"),
             # options that were accepted and ignored
             (["caption", *model, "--latents", str(tmp_path / "four.pt"), "--index", "1"], "--index"),
             (["caption", *model, "--latents", str(tmp_path / "16.pt"), "--tokenizer", str(tmp_path)], "--synthetic"),
             ([*gen, "--text-encoder", str(tmp_path), "--out", str(tmp_path / "g.pt")], "--synthetic"),
             (["caption", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "ex"), "--tokenizer", str(tmp_path),
               "--text-encoder", str(tmp_path)], "--text-encoder"),
             ([*gen, "--out", str(tmp_path / "empty")], "is a folder"),
             (["train", "--out", str(tmp_path / "t"), "--synthetic", "-3", "--config", str(tmp_path / "m" / "config.json")],
              "--synthetic"),
             (["train", "--out", str(tmp_path / "t"), "--data", str(tmp_path / "empty"), "--config",
               str(tmp_path / "m" / "config.json")], "--data"),
             (["preprocess", "--manifest", str(tmp_path / "gone.jsonl"), "--out", str(tmp_path / "o")], "--manifest")]
    if not torch.cuda.is_available():
        cases.append((["caption", *model, "--data", str(tmp_path / "ex"), "--device", "cuda"], "no CUDA device"))
    for args, named in cases:
        r = CliRunner().invoke(app, args, env={"COLUMNS": "2000"})  # rich wraps the error panel at the width
        flat = " ".join(r.output.replace("│", " ").split())
        assert r.exit_code == 2 and isinstance(r.exception, SystemExit) and named in flat, (args, r.output[-1500:])


def test_demo_model_config_patch_and_heads():
    """DemoConfig's patch / heads reach the model: a (3, 2, 2) patch gives one token per 2 x 2 latent
    area over all frames, and the video velocity comes back at the latent shape."""
    from univigu_fast.reference import UniViGUModel

    tok = S.SyntheticTokenizer()
    cfg = DemoConfig(layers=1)
    data = S.make_dataset(2, 0, text_dim=cfg.text_dim, frames=cfg.frames, size=cfg.pixels)
    for patch in ((3, 2, 2), (1, 2, 2)):
        mc = DemoConfig(layers=1, patch=patch).model_config(len(tok))
        assert tuple(mc.patch_size) == patch and mc.num_attention_heads * mc.attention_head_dim == cfg.heads * cfg.head_dim
        torch.manual_seed(0)
        model = UniViGUModel(mc)
        out = model(data.latents, torch.ones(2), data.prompt_embeds, text=data.caption_ids, tau_text=torch.zeros(2))
        assert [tuple(v.shape) for v in out.video_velocity] == [tuple(z.shape) for z in data.latents]
        (_, F_, H, W), (pt, ph, pw) = data.latents[0].shape, patch
        assert model.patch_embedding(data.latents[0][None]).flatten(2).shape[-1] == (F_ // pt) * (H // ph) * (W // pw)


@pytest.mark.parametrize("option", [["--mode-mix", "joint"], ["--mode-mix", "joint=x"], ["--mode-mix", "joint=1,joint=2"],
                                    ["--mode-mix", "captioning=1"], ["--stage", "3"], ["--schedule", "linear"],
                                    ["--cond-dropout", "2"], ["--batch-size", "0"], ["--warmup", "-5"], ["--lr", "0"],
                                    ["--save-every", "-1"], ["--kappa-power", "0"], ["--text-flow", "continuous"],
                                    ["--loss-unit", "sample"], ["--prompt-length", "-1"]])
def test_cli_train_refuses_bad_options_as_usage_errors(tmp_path, option):
    """Each bad option is a usage error naming it (exit code 2), raised before any model or data is loaded
    (no --config / --data is given: loading would fail otherwise)."""
    r = CliRunner().invoke(app, ["train", "--out", str(tmp_path), *option])
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit), r.output
    name = option[0].lstrip("-").replace("-", "_")
    assert "Invalid value" in r.output and (name in r.output or option[0] in r.output), r.output


@pytest.mark.parametrize("option", [["--prompt-tokens", "5"], ["--prompt-tokens", "0,x"], ["--caption-tokens", "9,2"],
                                    ["--caption-tokens", "0,0"]])
def test_cli_preprocess_refuses_bad_token_ranges(tmp_path, option):
    (tmp_path / "m.jsonl").write_text("")
    r = CliRunner().invoke(app, ["preprocess", "--manifest", str(tmp_path / "m.jsonl"), "--out", str(tmp_path / "o"), *option])
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit) and "Invalid value" in r.output, r.output


def test_demo_cli_usage_errors(tmp_path):
    """Bad demo options are usage errors (exit 2) naming the option, before any data is built."""
    (tmp_path / "afile").write_text("")
    for args, named in ((["--steps1", "-5"], "--steps1"), (["--threads", "-3"], "--threads"),
                        (["--n-test", "0"], "--n-test"), (["--text-flow", "foo"], "--text-flow")):
        result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "o"), *args])
        assert result.exit_code == 2 and named in result.output, (args, result.output[-800:])
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "afile" / "sub")])
    assert result.exit_code == 2 and "--out" in result.output, result.output[-800:]


def test_background_agreement_needs_the_streams_to_agree():
    """The coupling metric: a caption agrees on the background with its own video, not with one whose
    background differs; the prompt never states the background, so copying it scores nothing."""
    vae = S.SyntheticVAE()
    data = S.make_dataset(40, 5, text_dim=8)
    a = data.samples[0]
    b = next(s for s in data.samples if s.background != a.background)
    px_a = vae.decode(data.latents[0])
    assert S.agreement(a.caption, px_a, ("background",)) == 1.0
    assert S.agreement(b.caption, px_a, ("background",)) == 0.0
    assert S.agreement(a.prompt, px_a, ("background",)) == 0.0
    assert S.agreement(a.prompt, px_a) == 1.0  # colour / direction: the prompt alone agrees


def test_background_agreement_control_pairs_every_other_video():
    from univigu_fast.demo import background_agreement

    own, others = background_agreement(["black", "white", None], ["black", "white", "black"])
    assert own == 2 / 3 and others == 1 / 6  # of the 6 cross pairs only caption 0 / video 2 agree; None never does
