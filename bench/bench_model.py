"""End-to-end benchmark: one denoising step of the full model at the DESIGN §6 shapes (30 layers).

Records op ``model_step``: modes ``joint`` / ``understanding`` (the next ids sampled as the samplers do:
fused for ``triton``, logits + Gumbel-max for ``reference``), ``generation`` (the text head not run, as in
the sampler: ``profiling.text_head_kwargs``), ``train`` (forward + backward of the training loss: video MSE
+ the fused text cross-entropy), ``video`` (no text stream: ``triton`` vs diffusers'
``WanTransformer3DModel`` on the same weights, timed with the fastest of its attention backends that runs here, named in the record's
``attention_backend``; ``attention_backends_ms`` has every one tried); impls ``triton`` (fast model),
``reference``, ``diffusers``. Op ``caption``: a 50-step caption of one video at wan1.3b-480p (``triton``).
Op ``caption`` also with the video-stream cache (impls ``cached-once``, ``cached-every4``; with
``-graph``: its text-only steps replayed from a CUDA graph) and ``model_step`` / ``understanding`` /
``cached`` and ``cached-graph`` (one text-only step on a filled cache; its record also carries
``gpu_busy_ms``, the GPU's busy time in the step from the profiler: far below ``ms`` = host-bound).
``joint`` records of ``triton`` and ``reference`` also carry ``max_abs_err_vs_fp32`` (max |output -
the fp32 reference's| over the video velocity and the full text logits) and ``max_abs_fp32``.
wan14b-720p is not run here (three 14B copies do not fit one 80 GB GPU next to their activations).
"""
import pytest
import torch

from _common import _cuda_time_ms, gpu_busy_ms, measure, requires_cuda, write_results
from univigu_fast import profiling as P
from univigu_fast.shapes import SHAPES

DTYPE = torch.bfloat16
_CACHE: dict = {}


# Training at the full 30 layers does not fit one 80 GB GPU (saved activations ~2.5 GB per layer at
# 33K tokens for the fast model, more for the eager reference): mode ``train`` runs this many layers
# and says so in the record (``"layers": 6``; shape names stay DESIGN §6's); time per layer compares.
TRAIN_LAYERS = 6


def _models(shape_name, layers=None):
    key = (shape_name, layers)
    if _CACHE.get("key") == key:
        return _CACHE
    _CACHE.clear()
    torch.cuda.empty_cache()
    from univigu_fast import UniViGUModel
    from univigu_fast.reference import UniViGUModel as ReferenceModel

    s = SHAPES[shape_name]
    cfg = P.config_for(s)
    if layers is not None:
        cfg.num_layers = layers
    torch.manual_seed(0)
    with torch.device("cuda"):
        fast = UniViGUModel(cfg).to(DTYPE).eval()
    with torch.no_grad():
        torch.nn.init.normal_(fast.text_head.linear.weight, std=0.02)
    with torch.device("meta"):  # no second copy of the weights (nor its random init on the host)
        ref = ReferenceModel(cfg)
    ref.load_state_dict(fast.state_dict(), assign=True)  # same tensors
    _CACHE.update(key=key, shape=s, cfg=cfg, fast=fast, ref=ref.eval())
    return _CACHE


def _diffusers(c):
    if "wan" not in c:
        from diffusers import WanTransformer3DModel

        from univigu_fast.conversion import diffusers_to_ours

        with torch.device("cuda"):
            wan = WanTransformer3DModel(**c["cfg"].wan_config()).to(DTYPE).eval()
        ours = c["fast"].state_dict()
        sd = {}
        for k in wan.state_dict():  # copy our video-path weights into the diffusers model
            mapped = list(diffusers_to_ours({k: None}).keys())
            if mapped:
                sd[k] = ours[mapped[0]]
        wan.load_state_dict(sd, strict=False)
        c["wan"] = wan
    return c["wan"]


# diffusers' attention backends (``diffusers.attention_backend``) tried for its model, the fastest
# recorded: PyTorch SDPA's (auto, cuDNN, flash) and flash-attn 2 / 3 and xformers where installed
# (those refuse at once when absent). Not tried: the memory-efficient SDPA (slower than flash / cuDNN
# at bf16, head dim 128), Hub kernels (downloads), SageAttention (int8: another function), flex and
# math (eager, they materialise the score matrix).
DIFFUSERS_BACKENDS = ("native", "_native_cudnn", "_native_flash", "flash", "_flash_3", "xformers")


def _fastest_backend(run) -> tuple[str | None, dict]:
    """Times ``run`` (give it one sample: the probe costs device time) under each of
    :data:`DIFFUSERS_BACKENDS`, one warm-up call and one timed: the fastest's name (None where the
    installed diffusers has no attention backends or none ran) and ``{backend: ms, or why it did
    not run}``."""
    try:
        from diffusers import attention_backend
    except ImportError:  # a diffusers without attention backends: its default attention only
        return None, {}
    tried = {}
    for name in DIFFUSERS_BACKENDS:
        try:
            with attention_backend(name):
                run()
                tried[name] = _cuda_time_ms(run, warmup=0, reps=1)
        except Exception as e:  # not installed, or no kernel for this dtype / head size / GPU
            tried[name] = f"{type(e).__name__}: {str(e)[:120]}"
            torch.cuda.empty_cache()
    ok = {k: v for k, v in tried.items() if isinstance(v, float)}
    return (min(ok, key=ok.get) if ok else None), tried


def _error_vs_fp32(c, inputs, model) -> tuple[float, float]:
    """Max |output - fp32 reference output| of one joint step (video velocity and full text logits)
    and the fp32 output's max |value|. flash-attn's rule reads two records of one run: the fast
    model's error at most twice the bf16 reference's. The fp32 outputs are computed once per shape
    by a float copy of the reference model, dropped afterwards."""
    if "fp32_out" not in c:
        import copy

        oracle = copy.deepcopy(c["ref"]).float()
        with torch.no_grad():
            c["fp32_out"] = P.flat_outputs(oracle(**P.cast_inputs(inputs, torch.float32)))
        del oracle
        torch.cuda.empty_cache()
    with torch.no_grad():
        got = P.flat_outputs(model(**inputs))
    want = c["fp32_out"]
    return (got - want).abs().max().item(), want.abs().max().item()


def _flops(s, cfg, mode):
    """One step's FLOPs (``cfg``'s layers). ``train``: every GEMM 3x its forward, attention 3.5x
    (flash-attn's count, as ``bench_joint_attention``: its backward recomputes the scores)."""
    f = P.component_flops(s, cfg, "video" if mode == "video" else "joint", decode=mode in ("joint", "understanding", "train"))
    total = sum(f.values())
    return 3 * total + 0.5 * (f["attention"] + f["cross_attention"]) if mode == "train" else total


@requires_cuda
@pytest.mark.parametrize("impl", ["triton", "reference", "diffusers"])
@pytest.mark.parametrize("mode", ["joint", "understanding", "generation", "video", "train"])
@pytest.mark.parametrize("shape", ["wan1.3b-480p", "wan1.3b-varlen"])
def test_bench_model_step(benchmark, shape, mode, impl):
    if impl == "diffusers" and mode != "video":
        pytest.skip("diffusers' WanTransformer3DModel has no text stream: compared in mode 'video'")
    if impl == "reference" and mode == "video":
        pytest.skip("video-only is compared against diffusers")
    c = _models(shape, TRAIN_LAYERS if mode == "train" else None)
    s, cfg = c["shape"], c["cfg"]
    inputs = P.make_inputs(s, cfg, "video" if mode in ("video",) else ("joint" if mode == "train" else mode), "cuda", DTYPE)
    try:
        if impl == "diffusers":
            wan = _diffusers(c)
            t_wan = [1000 * (1 - tau) for tau in inputs["tau_video"].tolist()]

            def run_default():
                with torch.no_grad():
                    return [wan(v[None], torch.tensor([t], device="cuda"), p[None]).sample
                            for v, t, p in zip(inputs["video_latents"], t_wan, inputs["encoder_hidden_states"])]

            def run_first():  # the probe's call: the first sample (480p: one ~0.6 s forward per backend)
                with torch.no_grad():
                    return wan(inputs["video_latents"][0][None], torch.tensor([t_wan[0]], device="cuda"),
                               inputs["encoder_hidden_states"][0][None]).sample

            backend, tried = _fastest_backend(run_first)

            def run():
                if backend is None:
                    return run_default()
                from diffusers import attention_backend

                with attention_backend(backend):
                    return run_default()
        else:
            model = c["fast"] if impl == "triton" else c["ref"]
            if mode == "train":
                model.train()
                params = [p for p in model.parameters()]
                for p in params:
                    p.requires_grad_(True)

                def run():  # the Trainer's loss form: video MSE + the fused text cross-entropy (flow.forward_samples)
                    out = model(**inputs, text_output="cross_entropy", text_target=inputs["text"])
                    loss = sum(v.float().pow(2).mean() for v in out.video_velocity) + \
                        sum(t.sum() for t in out.text_out.loss)
                    loss.backward()
                    for p in params:
                        p.grad = None
            else:
                model.eval()

                def run():
                    return P.step(model, inputs, P.text_head_kwargs(mode, cfg))
        run()
        torch.cuda.synchronize()
    except Exception as e:  # one failing impl must not stop the others
        torch.cuda.empty_cache()
        pytest.skip(f"{impl} failed: {type(e).__name__}: {str(e)[:300]}")
    record = measure(benchmark, run, op="model_step", shape=shape, mode=mode, impl=impl, dtype=DTYPE,
                     flops=_flops(s, cfg, mode), rounds=3, warmup_rounds=1)
    if impl == "diffusers":
        record.update(attention_backend=backend or "default", attention_backends_ms=tried)
        write_results()
    if mode == "train":
        record["layers"] = cfg.num_layers
        write_results()
    if mode == "joint":  # the "outputs within bf16 tolerance of the reference", at this shape
        try:
            record["max_abs_err_vs_fp32"], record["max_abs_fp32"] = _error_vs_fp32(c, inputs, model)
        except Exception as e:  # e.g. out of memory: the timing stands, the error figure is missing
            record["max_abs_err_vs_fp32"] = None
            record["error_check_failed"] = f"{type(e).__name__}: {str(e)[:300]}"
            torch.cuda.empty_cache()
        write_results()
    if mode == "train":
        for p in (c["fast"] if impl == "triton" else c["ref"]).parameters():
            p.requires_grad_(False)


@requires_cuda
@pytest.mark.parametrize("impl", ["triton", "cached-once", "cached-every4", "cached-once-graph", "cached-every4-graph"])
def test_bench_caption_50_steps(benchmark, impl):
    """A 50-step caption of one wan1.3b-480p video: exact (``triton``) or with the video-stream cache
    (``-graph``: text-only steps replayed from a CUDA graph)."""
    from univigu_fast.sampling import caption

    c = _models("wan1.3b-480p")
    inputs = P.make_inputs(c["shape"], c["cfg"], "understanding", "cuda", DTYPE)
    lens = list(c["shape"].text_lens)
    policy = {"triton": "off", "cached-once": "once", "cached-every4": "every:4"}[impl.removesuffix("-graph")]
    stats = {}

    def run(steps=50):
        return caption(c["fast"], inputs["video_latents"], inputs["encoder_hidden_states"], lens, steps=steps, seed=0,
                       video_cache=policy, cuda_graph=impl.endswith("-graph"), stats=stats)

    from univigu_fast.video_cache import caption_cost

    # the one timed call must not pay first-launch compiles and autotuning (of the full step and of the
    # text-only shapes: split-KV attention, FFN at the text rows, the decode): a 2-step caption runs both
    run(steps=2)
    torch.cuda.synchronize()
    record = measure(benchmark, run, op="caption", shape="wan1.3b-480p", mode="understanding", impl=impl, dtype=DTYPE,
                     flops=caption_cost(c["shape"], c["cfg"], 50, policy)["flops"], rounds=1, warmup_rounds=0)
    if impl.endswith("-graph"):
        record["graph_error"] = stats["graph_error"]  # None, or why the text steps ran eagerly
        write_results()


@requires_cuda
@pytest.mark.parametrize("impl", ["cached", "cached-graph"])
def test_bench_cached_text_step(benchmark, impl):
    """One understanding step on a filled video-stream cache (impl ``cached``): only the text rows run
    (``cached-graph``: the layers replayed from a CUDA graph, captured in the warm-up round)."""
    from univigu_fast.video_cache import VideoCache, text_step_bytes, text_step_flops

    c = _models("wan1.3b-480p")
    inputs = P.make_inputs(c["shape"], c["cfg"], "understanding", "cuda", DTYPE)
    cache = VideoCache(c["fast"], cuda_graph=impl == "cached-graph")
    with torch.no_grad():
        c["fast"](**inputs, video_cache=cache)

    def run():
        with torch.no_grad():
            return c["fast"].text_step(cache, inputs["text"], inputs["tau_text"],
                                       **P.text_head_kwargs("understanding", c["cfg"]))

    try:
        record = measure(benchmark, run, op="model_step", shape="wan1.3b-480p", mode="understanding", impl=impl,
                         dtype=DTYPE, flops=sum(text_step_flops(c["shape"], c["cfg"]).values()),
                         bytes_moved=text_step_bytes(c["shape"], c["cfg"]), rounds=5, warmup_rounds=1)
        # host-bound or GPU-bound? (a text step is ~400 small launches for a few ms of GPU work)
        record["gpu_busy_ms"] = gpu_busy_ms(run)
        if cache.cuda_graph:
            record["graph_error"] = cache.graph_error
        write_results()
    finally:
        cache.release()
