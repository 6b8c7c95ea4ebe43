"""Trainer: stages' targets, condition dropout seen by the model, exact resume, atomic checkpoints,
2-process gloo DDP == one process on the same global batch, and a fast learning check."""
import json
import os

import pytest
import torch
import torch.multiprocessing as mp

from univigu_fast.config import UniViGUConfig
from univigu_fast.flow import FlowConfig, uniflow_loss
from univigu_fast.reference import UniViGUModel
from univigu_fast.synthetic import SyntheticTokenizer, make_dataset
from univigu_fast.training import STAGE_LR, TrainConfig, Trainer, batch_indices

TEXT_DIM = 24


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny models, one torch thread


def _cfg(text_flow="discrete", **kw):
    return UniViGUConfig.tiny(in_channels=16, out_channels=16, text_dim=TEXT_DIM, vocab_size=len(SyntheticTokenizer()),
                              text_flow=text_flow, **kw)


def _model(text_flow="discrete", seed=0, **kw):
    torch.manual_seed(seed)
    m = UniViGUModel(_cfg(text_flow, **kw))
    m.init_text_stream()
    return m


@pytest.fixture(scope="module")
def data():
    return make_dataset(16, 0, text_dim=TEXT_DIM, frames=2, size=8)


class Spy:
    """Wraps a model's forward to record the conditioning and text it sees."""

    def __init__(self, model):
        self.seen = []
        fwd = model.forward

        def spy(videos, tau_v, prompts, text=None, tau_text=None, **kw):
            self.seen.append(dict(prompts=[p.clone() for p in prompts], text=[t.clone() for t in text],
                                  tau_v=tau_v.clone(), tau_t=tau_text.clone()))
            return fwd(videos, tau_v, prompts, text=text, tau_text=tau_text, **kw)

        model.forward = spy


def test_config_defaults_follow_the_paper():
    assert TrainConfig(stage=1).lr == 2e-4 and TrainConfig(stage=2).lr == 5e-5 == STAGE_LR[2]
    assert tuple(TrainConfig().betas) == (0.9, 0.95)
    with pytest.raises(ValueError, match="stage"):
        TrainConfig(stage=3)


@pytest.mark.parametrize("bad", [dict(warmup_steps=-5), dict(lr=0.0), dict(lr=float("nan")), dict(grad_clip=-1.0),
                                 dict(save_every=-1), dict(log_every=0), dict(min_lr_ratio=1.5),
                                 dict(flow=dict(kappa_power=0.0)), dict(flow=dict(mode_mix={"joint": float("nan")})),
                                 dict(flow=dict(text_weight=float("inf")))])
def test_config_refuses_bad_settings(bad):
    name = next(iter(bad["flow"])) if "flow" in bad else next(iter(bad))
    with pytest.raises(ValueError, match=name):
        TrainConfig(**bad)


def test_config_checks_betas_types_and_warns_on_long_warmup():
    for betas in ((0.9,), (0.9, 1.0), "ab", (0.9, -0.1)):
        with pytest.raises(ValueError, match="betas must be two numbers in"):
            TrainConfig(betas=betas)
    for bad in (dict(steps=2.5), dict(batch_size=True), dict(warmup_steps=1.5)):
        with pytest.raises(TypeError, match=f"{next(iter(bad))} must be an int"):
            TrainConfig(**bad)
    with pytest.raises(ValueError, match="weight_decay must be a finite number"):
        TrainConfig(weight_decay=float("inf"))
    with pytest.warns(UserWarning, match="warmup_steps=10 > steps=5: the learning rate never reaches"):
        TrainConfig(steps=5, warmup_steps=10)
    import warnings

    import numpy as np
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warm-up == steps: the last step runs at lr, nothing to warn about
        cfg = TrainConfig(steps=np.int64(10), warmup_steps=10, betas=(np.float32(0.9), np.float64(0.95)))
    assert cfg.steps == 10 and type(cfg.steps) is int and cfg.betas == (0.8999999761581421, 0.95)


def _examples(data, n=8, **replace):
    """The first n examples of ``data`` as an ExampleSet, with ``replace={field: {index: tensor}}``."""
    from univigu_fast.training import ExampleSet

    fields = {k: list(getattr(data, k)[:n]) for k in ("latents", "prompt_embeds", "prompt_ids", "caption_ids")}
    for k, changes in replace.items():
        for i, t in changes.items():
            fields[k][i] = t
    return ExampleSet(null_prompt=data.null_prompt, **fields)


def test_bad_examples_are_named_before_any_step(data):
    """A bad example is refused by index when first drawn, before the weights move: NaN latents (one ruined
    every weight), ids outside the vocabulary (an IndexError inside the step), float ids; int32 ids train
    as int64 ids do (F.cross_entropy refused them)."""
    V = _cfg().vocab_size
    cfg = TrainConfig(stage=2, steps=1, batch_size=8, warmup_steps=0, progress=False, prompt_length=8)
    nan = data.latents[3].clone()
    nan[0, 0, 0, 0] = float("nan")
    for replace, match in ((dict(latents={3: nan}), "example 3: latents holds NaN or Inf"),
                           (dict(caption_ids={5: torch.tensor([1, V])}), rf"example 5: caption_ids has ids outside \[0, vocab_size={V}\)"),
                           (dict(prompt_ids={2: torch.tensor([-1])}), "example 2: prompt_ids has ids outside"),
                           (dict(caption_ids={1: torch.tensor([1.0, 2.0])}), "example 1: caption_ids must be 1-D integer token ids"),
                           (dict(prompt_embeds={4: torch.randn(3, TEXT_DIM + 1)}), "example 4: prompt_embeds must be a floating point"),
                           # (these two were named by their position inside the step's batch, or not at all)
                           (dict(latents={6: data.latents[6][:, :, :3]}), r"example 6: latents \(F, H, W\) = .* must be positive multiples of patch_size"),
                           (dict(prompt_embeds={7: torch.randn(9, TEXT_DIM)}), "example 7: prompt_embeds has 9 rows, more than prompt_length=8")):
        m = _model()
        before = {k: v.clone() for k, v in m.state_dict().items()}
        with pytest.raises(ValueError, match=match):
            Trainer(m, _examples(data, **replace), cfg).train()
        assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match=r"null_prompt \(the empty prompt's embedding\) must be a floating point \(L0, text_dim=24\)"):
        from univigu_fast.training import ExampleSet
        Trainer(_model(), ExampleSet(data.latents, data.prompt_embeds, data.prompt_ids, data.caption_ids, None), cfg)
    int32 = {i: data.caption_ids[i].int() for i in range(8)}
    a = Trainer(_model(), _examples(data), cfg).train()[0]
    b = Trainer(_model(), _examples(data, caption_ids=int32), cfg).train()[0]
    assert a["loss"] == b["loss"]


def test_divergence_stops_before_the_update(data, tmp_path):
    """A non-finite loss stops the step with an error naming it and leaves the weights as they were;
    a batch that counts no text logs text_loss / text_acc None (they read 0.0); save() needs a place."""
    m = _model()
    with torch.no_grad():
        m.blocks[0].ffn.net[2].bias.fill_(float("inf"))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    tr = Trainer(m, data, TrainConfig(steps=1, batch_size=4, warmup_steps=0, progress=False))
    with pytest.raises(FloatingPointError, match="step 1: non-finite loss .* the weights were not updated"):
        tr.train()
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items()) and tr.step == 0
    (rec,) = Trainer(_model(), data, TrainConfig(steps=1, batch_size=4, warmup_steps=0, progress=False,
                                                 flow=FlowConfig(mode_mix={"generation": 1.0}))).train()
    assert rec["text_loss"] is None and rec["text_acc"] is None and rec["video_loss"] > 0
    # without clipping the gradient norm is still checked (an overflowed bf16 backward reached the weights)
    m = _model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    tr0 = Trainer(m, data, TrainConfig(steps=1, batch_size=4, warmup_steps=0, grad_clip=0.0, progress=False))
    m.blocks[0].ffn.net[2].bias.register_hook(lambda g: torch.full_like(g, float("inf")))
    with pytest.raises(FloatingPointError, match=r"gradient norm \(inf\)"):
        tr0.train()
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match=r"save\(\) needs a path, or TrainConfig\(out_dir=...\)"):
        tr.save()
    assert tr.save(tmp_path / "c.pt").exists()


def test_batches_are_deterministic_epoch_permutations():
    seen = sum((batch_indices(10, 4, s, 0) for s in range(5)), [])
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert batch_indices(10, 4, 3, 0) == batch_indices(10, 4, 3, 0) != batch_indices(10, 4, 3, 1)


@pytest.mark.parametrize("p", [0.0, 1.0, 0.5])
def test_condition_dropout_drops_what_the_model_sees(data, p):
    m = _model()
    spy = Spy(m)
    tr = Trainer(m, data, TrainConfig(stage=1, steps=4, batch_size=8, progress=False,
                                      flow=FlowConfig(cond_dropout=p)))
    recs = tr.train()
    prompts = [q for call in spy.seen for q in call["prompts"]]
    null = [q.shape == data.null_prompt.shape and torch.equal(q, data.null_prompt) for q in prompts]
    assert len(prompts) == 32
    if p == 0.0:
        assert not any(null)
    elif p == 1.0:
        assert all(null)
    else:
        assert 6 <= sum(null) <= 26
    assert sum(r["dropped"] for r in recs) == sum(null)


@pytest.mark.parametrize("stage", [1, 2])
def test_stage_targets(data, stage):
    """Stage 1 recalls the prompt, stage 2 targets the detailed caption; in generation mode (tau_t = 1)
    the stream carries the clean prompt in both stages (what text-to-video inference feeds it)."""
    m = _model()
    spy = Spy(m)
    tr = Trainer(m, data, TrainConfig(stage=stage, steps=1, batch_size=4, progress=False,
                                      flow=FlowConfig(mode_mix={"generation": 1.0})))
    want = data.prompt_ids if stage == 1 else data.caption_ids
    assert all(torch.equal(a, b) for a, b in zip(tr.targets([0, 3, 5]), [want[0], want[3], want[5]]))
    tr.train()
    prompts = {tuple(x.tolist()) for x in data.prompt_ids}
    assert all(tuple(t.tolist()) in prompts for t in spy.seen[0]["text"])
    assert torch.equal(spy.seen[0]["tau_t"], torch.ones(4))
    # understanding mode: the noised text is drawn around the stage's target (same lengths)
    m2 = _model()
    spy2 = Spy(m2)
    tr2 = Trainer(m2, data, TrainConfig(stage=stage, steps=1, batch_size=4, progress=False,
                                        flow=FlowConfig(mode_mix={"understanding": 1.0})))
    tr2.train()
    idx = batch_indices(len(data.prompt_ids), 4, 0, 0)
    assert [t.numel() for t in spy2.seen[0]["text"]] == [want[i].numel() for i in idx]
    assert torch.equal(spy2.seen[0]["tau_v"], torch.ones(4))


def test_prompt_length_pads_what_the_model_sees(data):
    """prompt_length = 8: prompts and the empty prompt reach the model as 8 rows, the real ones then zeros."""
    model = _model()
    spy = Spy(model)
    Trainer(model, data, TrainConfig(stage=1, steps=1, batch_size=4, progress=False, prompt_length=8,
                                     flow=FlowConfig(cond_dropout=0.5))).train()
    idx = batch_indices(len(data.prompt_ids), 4, 0, 0)
    dropped = 0
    for p, i in zip(spy.seen[0]["prompts"], idx):
        src = data.null_prompt if p[: data.null_prompt.shape[0]].equal(data.null_prompt) else data.prompt_embeds[i]
        dropped += src is data.null_prompt
        assert p.shape == (8, TEXT_DIM) and torch.equal(p[: len(src)], src) and not p[len(src):].any()
    assert 0 < dropped < 4
    with pytest.raises(ValueError, match=r"example \d+: prompt_embeds has \d+ rows, more than prompt_length=2"):
        Trainer(_model(), data, TrainConfig(steps=1, batch_size=4, progress=False, prompt_length=2)).train()


def test_logged_lr_is_the_one_the_step_used(data):
    """Linear warm-up over 3 steps, then constant: step k used lr * min(1, k / 3) (the log read the
    scheduler after it had moved on, one step ahead)."""
    recs = Trainer(_model("discrete"), data, TrainConfig(stage=1, steps=4, batch_size=4, warmup_steps=3, lr=1e-3,
                                                          progress=False, log_every=1)).train()
    assert [r["lr"] for r in recs] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3], rel=1e-12)


def test_uniflow_loss_is_the_trainers_step_loss(data):
    """flow.uniflow_loss on the trainer's first batch (same seed and step, the prompts' ids as the text the
    generation samples carry) gives the loss the trainer logs; its generation samples carry those ids."""
    cfg = TrainConfig(stage=2, steps=1, batch_size=8, progress=False, flow=FlowConfig(mode_mix={"generation": 1.0,
                                                                                               "joint": 1.0}))
    model = _model()
    idx = batch_indices(len(data.latents), 8, 0, 0)
    with torch.no_grad():
        loss, _, samples = uniflow_loss(model, [data.latents[i] for i in idx], [data.prompt_embeds[i] for i in idx],
                                        data.null_prompt, [data.caption_ids[i] for i in idx], cfg=cfg.flow, seed=0,
                                        step=0, generation_texts=[data.prompt_ids[i] for i in idx])
    gen = [(s, i) for s, i in zip(samples, idx) if s.mode == "generation"]
    assert gen and all(torch.equal(s.text_in, data.prompt_ids[i]) for s, i in gen)
    (rec,) = Trainer(model, data, cfg).train()
    assert rec["loss"] == pytest.approx(loss.item(), rel=1e-5)


@pytest.mark.parametrize("text_flow", ["discrete", "embedding"])
def test_resume_gives_the_same_next_loss(data, tmp_path, text_flow):
    cfg = dict(stage=1, steps=4, batch_size=4, warmup_steps=2, schedule="cosine", progress=False, lr=1e-3, log_every=1)
    full = Trainer(_model(text_flow), data, TrainConfig(**cfg)).train()
    a = Trainer(_model(text_flow), data, TrainConfig(**cfg, out_dir=str(tmp_path)))
    a.train(steps=2)  # "interrupted" after step 2; its checkpoint is on disk
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt", "log.jsonl"]  # no temporary file left
    with open(tmp_path / "log.jsonl", "a") as f:  # it logged step 3, then was killed (mid-write) before a checkpoint
        f.write(json.dumps(dict(step=3, loss=-1.0)) + '\n{"step": 4, "lo')
    b = Trainer(_model(text_flow, seed=123), data, TrainConfig(**cfg, out_dir=str(tmp_path)))
    assert b.resume_if_possible() and b.step == 2
    rest = b.train()
    assert [r["step"] for r in rest] == [3, 4]
    for r, f in zip(rest, full[2:]):
        assert r["loss"] == f["loss"] and r["lr"] == f["lr"]
    logged = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [r["step"] for r in logged] == [1, 2, 3, 4] and logged[2]["loss"] == full[2]["loss"]
    # Stage 2 pointed at Stage 1's folder carried on Stage 1's run (its steps, its optimizer, its lr); more
    # steps moved the cosine curve (the lr jumped back up); another seed replays other batches. A refused
    # resume loads nothing (the data position was checked after the weights, step and optimizer were loaded)
    for change in (dict(stage=2), dict(lr=5e-4), dict(steps=6), dict(seed=1)):
        fresh = _model(text_flow)
        weights = {k: v.clone() for k, v in fresh.state_dict().items()}
        c = Trainer(fresh, data, TrainConfig(**{**cfg, **change}, out_dir=str(tmp_path)))
        with pytest.raises(ValueError, match=f"holds a run with other settings \\({next(iter(change))}: "):
            c.resume_if_possible()
        assert c.step == 0 and not c.opt.state and c.sched.last_epoch == 0
        assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in weights.items())
    constant = dict(cfg, schedule="constant")
    Trainer(_model(text_flow), data, TrainConfig(**constant, out_dir=str(tmp_path / "c"))).train(steps=2)
    longer = Trainer(_model(text_flow), data, TrainConfig(**{**constant, "steps": 6}, out_dir=str(tmp_path / "c")))
    assert longer.resume_if_possible() and longer.step == 2  # more steps of a constant lr: the same run, continued


def _worker(rank, world, init, data, out):
    import torch.distributed as dist

    import datetime

    torch.set_num_threads(1)
    # a bounded rendezvous: a peer that never arrives fails the test instead of hanging the suite
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        tr = Trainer(_model(), data, TrainConfig(stage=2, steps=3, batch_size=4, lr=1e-3, warmup_steps=0,
                                                  grad_clip=0.0, progress=False))
        recs = tr.train()
        tr.close()  # without it the DDP reducer outlives the group handle and teardown can deadlock
        if rank == 0:
            torch.save([[r["loss"], r["grad_norm"]] for r in recs], out)
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_matches_single_process(data, tmp_path):
    out = tmp_path / "losses.pt"
    import socket

    with socket.socket() as sock:  # a free loopback port for the TCP rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_worker, args=(2, f"tcp://127.0.0.1:{port}", data, str(out)), nprocs=2, join=True,
                       start_method="fork")
    dist_stats = torch.load(out)
    single = Trainer(_model(), data, TrainConfig(stage=2, steps=3, batch_size=4, lr=1e-3, warmup_steps=0,
                                                 grad_clip=0.0, progress=False)).train()
    # the gradient norms agree (Adam's update and clipping hide a wrongly scaled gradient: the losses alone did
    # not see a missing world-size factor), and the losses after updates too
    torch.testing.assert_close(torch.tensor(dist_stats), torch.tensor([[r["loss"], r["grad_norm"]] for r in single]),
                               rtol=1e-5, atol=1e-6)


def test_learns_understanding_fast():
    """A few hundred steps on the synthetic task: the understanding loss falls and the held-out token
    accuracy (caption read from the video alone: condition always dropped) rises far above chance."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: oversubscribed threads (xdist workers x cores) cost 10x
    try:
        _learns_understanding_fast()
    finally:
        torch.set_num_threads(threads)


def _learns_understanding_fast():
    torch.manual_seed(0)
    train = make_dataset(128, 1, text_dim=TEXT_DIM, frames=2)
    held = make_dataset(32, 2, text_dim=TEXT_DIM, frames=2)
    cfg = _cfg(num_attention_heads=2, attention_head_dim=16, num_layers=1, ffn_dim=64, text_ffn_init="new")
    torch.manual_seed(0)
    m = UniViGUModel(cfg)
    m.init_text_stream()
    tr = Trainer(m, train, TrainConfig(stage=1, steps=200, batch_size=8, lr=3e-3, warmup_steps=10, progress=False,
                                       flow=FlowConfig(mode_mix={"understanding": 1.0}, cond_dropout=1.0)))
    recs = tr.train()
    first = sum(r["text_loss"] for r in recs[:10]) / 10
    last = sum(r["text_loss"] for r in recs[-10:]) / 10
    # held out, one shot from pure-noise text (tau_t = 0): the model must read the video
    m.eval()
    with torch.no_grad():
        x0 = [torch.randint(0, cfg.vocab_size, (5,)) for _ in held.latents]
        out = m(held.latents, torch.ones(32), [held.null_prompt] * 32, text=x0, tau_text=torch.zeros(32))
    pred = torch.stack([o.argmax(-1) for o in out.text_out])
    truth = torch.stack(held.prompt_ids)
    token_acc = (pred == truth).float().mean().item()
    color_acc = (pred[:, 1] == truth[:, 1]).float().mean().item()
    print(f"text loss {first:.3f} -> {last:.3f}; held-out token accuracy {token_acc:.3f}, colour {color_acc:.3f}")
    assert last < 0.5 * first
    # chance: 1/V = 0.03 per token; the two template words alone give 0.4; colour (1 of 6) is read from the video
    assert token_acc > 0.55 and color_acc > 0.8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP2 (fully_shard) needs CUDA + NCCL")
@pytest.mark.parametrize("text_flow", ["discrete", "embedding"])
def test_fsdp2_cuda_matches_unsharded_and_resumes(data, tmp_path, text_flow):
    import torch.distributed as dist

    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        cfg = dict(stage=2, steps=3, batch_size=4, lr=1e-3, warmup_steps=0, progress=False)
        plain = Trainer(_model(text_flow).cuda(), data, TrainConfig(**cfg)).train()
        a = Trainer(_model(text_flow).cuda(), data, TrainConfig(**cfg, shard="fsdp", out_dir=str(tmp_path / "ck")))
        sharded = a.train(steps=2)
        b = Trainer(_model(text_flow, seed=5).cuda(), data, TrainConfig(**cfg, shard="fsdp", out_dir=str(tmp_path / "ck")))
        assert b.resume_if_possible() and b.step == 2
        sharded += b.train()
        torch.testing.assert_close(torch.tensor([r["loss"] for r in sharded]), torch.tensor([r["loss"] for r in plain]),
                                   rtol=2e-3, atol=2e-3)
    finally:
        dist.destroy_process_group()


def test_training_checkpoint_loads_with_its_stored_config(data, tmp_path):
    """from_uni_vigu reads ``model_config`` from a Trainer checkpoint: a mask-source model with another
    vocabulary than umT5's, eps and text_ffn_init are not re-guessed from the shapes."""
    m = _model(discrete_source="mask", eps=1e-5, text_ffn_init="new")
    path = Trainer(m, data, TrainConfig(steps=1, batch_size=4, warmup_steps=0, progress=False)).save(tmp_path / "ck.pt")
    back = UniViGUModel.from_uni_vigu(path)
    assert back.config == m.config and back.config.mask_token_id == len(SyntheticTokenizer())
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), back.state_dict().values()))
    # overrides apply on top of the stored config
    assert UniViGUModel.from_uni_vigu(path, eps=1e-6).config.eps == 1e-6


@pytest.mark.parametrize("mix", [{"understanding": 1.0}, {"generation": 1.0}, {"understanding": 1.0, "generation": 1.0}])
def test_resume_after_steps_that_left_parameters_without_gradients(data, tmp_path, mix):
    """AdamW keeps no state for a parameter that has had no gradient (the video head after
    understanding-only steps, the text head after generation-only ones): the checkpoint lacks it too,
    and the resumed run continues exactly, also when such a parameter gets its first gradient after the
    resume (seed 0, batch 1: a generation step, then understanding steps)."""
    cfg = dict(stage=1, steps=3, batch_size=1, warmup_steps=0, progress=False, lr=1e-3, log_every=1, seed=0,
               flow=dict(mode_mix=mix))
    full = Trainer(_model(), data, TrainConfig(**cfg))
    full.train()
    Trainer(_model(), data, TrainConfig(**cfg, out_dir=str(tmp_path))).train(steps=1)
    b = Trainer(_model(seed=5), data, TrainConfig(**cfg, out_dir=str(tmp_path)))
    assert b.resume_if_possible() and b.step == 1
    b.train()
    for (name, got), want in zip(b.model.state_dict().items(), full.model.state_dict().values()):
        assert torch.equal(got, want), name
    # a checkpoint of another model (one layer more here) is refused, not filled in from the new model
    c = Trainer(_model(num_layers=3), data, TrainConfig(**cfg, out_dir=str(tmp_path)))
    with pytest.raises(ValueError, match=r"holds another model: it lacks \['blocks.2."):
        c.resume_if_possible()


def test_resume_refuses_a_changed_kappa_power(data, tmp_path):
    """FlowConfig(kappa_power=None) trains with the model config's exponent: a resume that would train
    with another one (an explicit FlowConfig value, or a model config saying otherwise) is refused."""
    cfg = dict(stage=1, steps=2, batch_size=4, warmup_steps=0, progress=False, out_dir=str(tmp_path))
    Trainer(_model(), data, TrainConfig(**cfg)).train(steps=1)
    assert Trainer(_model(), data, TrainConfig(**cfg, flow=dict(kappa_power=1.0))).resume_if_possible()
    for trainer in (Trainer(_model(), data, TrainConfig(**cfg, flow=dict(kappa_power=3.0))),
                    Trainer(_model(kappa_power=3.0), data, TrainConfig(**cfg))):
        with pytest.raises(ValueError, match="holds a run with other settings \\(flow: "):
            trainer.resume_if_possible()


def test_batch_order_takes_any_int_seed():
    for seed in (2**61, -2**61):  # seed * 7919 is outside manual_seed's range
        assert batch_indices(10, 4, 3, seed) == batch_indices(10, 4, 3, seed)
    assert batch_indices(10, 4, 3, -5) == batch_indices(10, 4, 3, -5) != batch_indices(10, 4, 3, 5)


def test_trainer_refuses_what_it_cannot_train(data, tmp_path):
    """16-bit weights (fp16: NaN weights after the first AdamW update, then a 'model diverged' error; bf16:
    most updates rounded away), in_channels != out_channels (a shape error inside the loss) and a bad
    empty-prompt embedding (NaN: 'the model diverged'; too long for prompt_length: an unnamed error
    mid-step; integer: cast silently) are refused by name before any step; a failed save leaves no file."""
    cfg = TrainConfig(stage=2, steps=1, batch_size=4, warmup_steps=0, progress=False, prompt_length=8)
    for dtype in (torch.float16, torch.bfloat16):
        with pytest.raises(TypeError, match=f"Trainer needs float32 trainable weights .* got .* {dtype}"):
            Trainer(_model().to(dtype), data, cfg)
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="training needs in_channels == out_channels .* in_channels=16, out_channels=8"):
        Trainer(UniViGUModel(UniViGUConfig.tiny(in_channels=16, out_channels=8, text_dim=TEXT_DIM)), data, cfg)
    from univigu_fast.training import ExampleSet

    nan = torch.zeros(1, TEXT_DIM)
    nan[0, 3] = float("nan")
    for null, exc, match in ((nan, ValueError, "null_prompt .* holds NaN or Inf"),
                             (torch.zeros(9, TEXT_DIM), ValueError, "null_prompt has 9 rows, more than prompt_length=8"),
                             (torch.zeros(1, TEXT_DIM, dtype=torch.int64), ValueError, "must be a floating point")):
        with pytest.raises(exc, match=match):
            Trainer(_model(), ExampleSet(data.latents, data.prompt_embeds, data.prompt_ids, data.caption_ids, null), cfg)
    tr = Trainer(_model(), data, cfg)
    bad = tr.state_dict
    tr.state_dict = lambda: {**bad(), "unpicklable": lambda: None}  # torch.save fails mid-write
    with pytest.raises(Exception):
        tr.save(tmp_path / "ck.pt")
    assert os.listdir(tmp_path) == []
