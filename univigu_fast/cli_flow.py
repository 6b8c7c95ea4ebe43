"""``univigu-fast`` commands for training and inference: train, caption, generate, joint, preprocess, demo.

Registered into ``univigu_fast.cli.app`` by ``register(app)``.

Text front end: a Hugging Face umT5 (``--text-encoder`` + ``--tokenizer`` local paths, as Wan uses)
or ``--synthetic`` (the synthetic task's word tokenizer and fixed prompt-embedding table, see
``univigu_fast.synthetic``). Models: ``--model DIR`` is a ``save_pretrained`` folder
(``config.json`` + ``model.safetensors``; ``univigu-fast train`` and ``demo`` write one).
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Optional

import typer

STEPS_HELP = "Euler steps."
SEED_HELP = "Random seed (noise, sampling)."

# Options with the same default and help in several inference commands (typer copies an OptionInfo at each use).
_MODEL_OPTION = typer.Option(..., exists=True, file_okay=False, help="save_pretrained folder of a trained model.")
_PROMPT_OPTION = typer.Option(..., help="The prompt.")
_STEPS_OPTION = typer.Option(50, min=1, help=STEPS_HELP)
_SYNTHETIC_VIDEO_OPTION = typer.Option(False, help="Synthetic task front end; also decodes and reads the video.")
_TOKENIZER_OPTION = typer.Option(None, help="Local umT5 tokenizer folder.")
_TEXT_ENCODER_OPTION = typer.Option(None, help="Local umT5 encoder folder.")
_SEED_OPTION = typer.Option(0, help=SEED_HELP)
_DEVICE_OPTION = typer.Option(None, help="cuda / cpu.")


def _positive_finite(value: float) -> float:
    if not 0 < value < float("inf"):
        raise typer.BadParameter(f"must be a positive finite number, got {value}")
    return value


def _finite(value: float) -> float:
    if not abs(value) < float("inf"):
        raise typer.BadParameter(f"must be a finite number, got {value}")
    return value


@contextlib.contextmanager
def _usage_errors(option: str, what: str, errors: tuple = (OSError, ValueError)):
    """A file or folder the user named that cannot be read (missing, torn, of another kind): a usage error
    naming the option (exit 2), not a traceback."""
    try:
        yield
    except errors as e:
        raise typer.BadParameter(f"{what}: {e}", param_hint=option) from None


def _discrete_text_options(model, temperature: float = 1.0, kappa_power: float | None = None) -> None:
    """--temperature / --kappa-power shape the discrete text path: refused for an embedding-flow model
    (they were accepted and did nothing)."""
    for option, value, default in (("--temperature", temperature, 1.0), ("--kappa-power", kappa_power, None)):
        if value != default and model.config.text_flow != "discrete":
            raise typer.BadParameter(f"shapes the discrete text path; this model's text_flow is "
                                     f"{model.config.text_flow!r}", param_hint=option)


def _temperature(value: float) -> float:
    from .kernels.linear_argmax import check_decode_args

    with _usage_errors("--temperature", "bad temperature", (TypeError, ValueError)):
        check_decode_args(value, None)
    return value


_TEMPERATURE_OPTION = typer.Option(1.0, callback=_temperature,
                                   help="Discrete text: sampling temperature of x1 from the logits.")
_KAPPA_POWER_OPTION = typer.Option(None, callback=lambda v: v if v is None else _positive_finite(v),
                                   help="Discrete text: scheduler exponent n of kappa(t) = t^n (default: the "
                                        "model config's kappa_power, the one it was trained with).")
_SHIFT_OPTION = typer.Option(3.0, callback=_positive_finite,
                             help="Wan flow shift: sigma' = shift sigma / (1 + (shift - 1) sigma).")
_PROMPT_LENGTH_OPTION = typer.Option(None, help="Rows the prompt embeddings are zero-padded to (0 = unpadded); "
                                                "default 512 as Wan's pipeline for umT5, 0 with --synthetic.")


def _device(device: str | None) -> str:
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise typer.BadParameter(str(e).splitlines()[0], param_hint="--device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise typer.BadParameter(f"{device!r}: no CUDA device is available here", param_hint="--device")
    return device


def _load_model(path: Path, device: str):
    import torch

    from .kernels._utils import quiet_interpreter_warnings
    from .model import UniViGUModel  # the Triton kernels (each falls back to its reference op without a GPU)

    quiet_interpreter_warnings()  # only Triton's interpreter (TRITON_INTERPRET=1 on CPU) raises them
    with _usage_errors("--model", f"cannot load a model from {path}"):
        model = UniViGUModel.from_pretrained(path)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return model.to(device, dtype).eval()


class _TextFrontEnd:
    """Prompt -> (embeddings, ids); empty-prompt embedding; ids -> text."""

    def __init__(self, model, tokenizer: Path | None, text_encoder: Path | None, synthetic: bool,
                 prompt_length: int | None = None, encoder: bool = True):
        self.model = model
        self.prompt_length = _prompt_length(prompt_length, synthetic)
        if synthetic and (tokenizer is not None or text_encoder is not None):  # (they were ignored)
            raise typer.BadParameter("uses the synthetic task's tokenizer and prompt encoder: drop --tokenizer / "
                                     "--text-encoder", param_hint="--synthetic")
        if not encoder and text_encoder is not None:
            raise typer.BadParameter("not with --data: its examples folder holds the empty prompt's embedding",
                                     param_hint="--text-encoder")
        if synthetic:
            from . import synthetic as S

            self.tok = S.SyntheticTokenizer()
            self.enc = S.SyntheticPromptEncoder(self.tok, model.config.text_dim)
            self.synthetic = True
            return
        if tokenizer is None or (encoder and text_encoder is None):
            raise typer.BadParameter("give --tokenizer and --text-encoder (local umT5 paths), or --synthetic"
                                     if encoder else "give --tokenizer (a local umT5 tokenizer, to decode), or --synthetic")
        from .text import load_tokenizer

        self.tok = load_tokenizer(tokenizer)
        self.te = None  # only decoding (the caption of a dataset example, whose empty prompt it holds)
        if encoder:
            from transformers import UMT5EncoderModel

            self.te = UMT5EncoderModel.from_pretrained(text_encoder, local_files_only=True).eval()
        self.synthetic = False

    def encode(self, prompt: str):
        """(embedding (prompt_length or L, text_dim), ids (L,)): tokens past prompt_length cut as Wan does."""
        import torch

        dev, dtype = self.model.device, self.model.dtype
        if not self.synthetic and self.te is None:
            raise RuntimeError("this text front end was made without --text-encoder: it only decodes")
        if self.synthetic:
            h, ids = self.enc(prompt), self.tok.encode(prompt)
        else:
            n = self.prompt_length
            enc = self.tok(prompt, return_tensors="pt", **(dict(truncation=True, max_length=n) if n else {}))
            with torch.no_grad():
                h = self.te(enc.input_ids, attention_mask=enc.attention_mask).last_hidden_state[0]
            ids = enc.input_ids[0]
        return self.pad(h).to(dev, dtype), ids

    def pad(self, embeds):
        from .text import pad_prompt

        try:
            return pad_prompt(embeds, self.prompt_length)
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--prompt-length") from None

    def null(self):
        return self.encode("")[0]

    def decode(self, ids) -> str:
        if self.synthetic:
            return self.tok.decode(ids.cpu())
        return self.tok.decode(ids.cpu().tolist(), skip_special_tokens=True)


def _prompt_length(prompt_length: int | None, synthetic: bool) -> int:
    """--prompt-length: Wan's 512 for umT5 prompts, unpadded for the synthetic task (trained so) by default."""
    from .text import WAN_TEXT_LEN

    if prompt_length is None:
        return 0 if synthetic else WAN_TEXT_LEN
    if prompt_length < 0:
        raise typer.BadParameter(f"must be >= 0 (0 = unpadded), got {prompt_length}", param_hint="--prompt-length")
    return prompt_length


def _prompted_model(model: Path, device: str | None, tokenizer: Path | None, text_encoder: Path | None,
                    synthetic: bool, prompt: str, prompt_length: int | None):
    """Load the model and its text front end, encode the prompt: (model, front end, embeddings (L, D), ids (L,))."""
    m = _load_model(model, _device(device))
    fe = _TextFrontEnd(m, tokenizer, text_encoder, synthetic, prompt_length)
    emb, ids = fe.encode(prompt)
    return m, fe, emb, ids


def _check_out_file(out: Path) -> None:
    """Before sampling: the latents file can be written (not a folder), so no run ends in a failed save."""
    if out.is_dir():
        raise typer.BadParameter(f"{out} is a folder; give the file to write the latents to", param_hint="--out")


def _save_latents(latents, out: Path, synthetic: bool) -> dict:
    import torch

    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(latents.float().cpu(), out)
    info = {"latents": str(out), "shape": list(latents.shape)}
    if synthetic:
        from . import synthetic as S

        px = S.SyntheticVAE(latents.shape[0]).decode(latents.float().cpu())
        info["read_video"] = S.read_video(px)
    return info


def train(
    out: Path = typer.Option(..., help="Output folder: checkpoint.pt (resumable), log.jsonl, model/ (save_pretrained)."),
    stage: int = typer.Option(1, help="1 = Knowledge Recall (target text = the prompt); 2 = Capability Refinement (target = detailed caption)."),
    data: Optional[Path] = typer.Option(None, exists=True, file_okay=False,
                                        help="Examples folder written by `univigu-fast preprocess`."),
    synthetic: int = typer.Option(0, min=0, help="Instead of --data: generate this many synthetic shape videos (seed --seed)."),
    model: Optional[Path] = typer.Option(None, exists=True, file_okay=False,
                                         help="Start from a save_pretrained folder (e.g. stage 1's OUT/model)."),
    wan: Optional[Path] = typer.Option(None, exists=True, file_okay=False,
                                       help="Start from a diffusers Wan2.1 transformer folder (text stream initialised)."),
    config: Optional[Path] = typer.Option(None, help="Start from random weights with this UniViGUConfig JSON."),
    text_flow: Optional[str] = typer.Option(None, help="With --wan: 'discrete' (released checkpoints, the default) or "
                                                       "'embedding' (paper Eq. 7-8); --model / --config fix it."),
    steps: int = typer.Option(1000, help="Optimiser steps (total, including resumed ones)."),
    batch_size: int = typer.Option(8, help="Global batch size (split over torchrun ranks)."),
    lr: Optional[float] = typer.Option(None, help="Learning rate; default 2e-4 (stage 1) / 5e-5 (stage 2), the paper's."),
    warmup: int = typer.Option(100, help="Linear warm-up steps."),
    schedule: str = typer.Option("constant", help="'constant' or 'cosine' after warm-up."),
    grad_clip: float = typer.Option(1.0, help="Gradient-norm clip (0 = off)."),
    cond_dropout: float = typer.Option(0.5, help="Probability of replacing the prompt by the empty prompt."),
    mode_mix: str = typer.Option("joint=1,understanding=1,generation=1", help="Mode weights, e.g. 'joint=1,understanding=2'."),
    kappa_power: Optional[float] = typer.Option(None, help="Discrete text: scheduler exponent n of kappa(t) = t^n "
                                                           "(default: the model config's, 1 as the public code's for "
                                                           "a Wan checkpoint); saved in the model's config."),
    prompt_length: Optional[int] = typer.Option(None, help="Rows the prompt embeddings are zero-padded to (0 = "
                                                           "unpadded); default 512 as Wan's pipeline with --data, "
                                                           "0 with --synthetic."),
    loss_unit: str = typer.Option("token", help="Squared errors averaged per 'token' (paper Eq. 11, DESIGN §4: a "
                                                "video token sums its C x patch values) or per 'element' (Wan's MSE)."),
    save_every: int = typer.Option(500, help="Checkpoint every N steps (atomic; always at the end)."),
    resume: bool = typer.Option(True, help="Resume from OUT/checkpoint.pt if present."),
    seed: int = typer.Option(0, help="Seed (data order, noise, dropout)."),
    device: Optional[str] = typer.Option(None, help="cuda / cpu (default: cuda if available). torchrun sets the rank's GPU."),
):
    """Train one stage of Uni-ViGU. Multi-GPU: `torchrun --nproc-per-node N -m univigu_fast.cli train ...` (FSDP2)."""
    import torch
    import torch.distributed as dist

    from .config import UniViGUConfig
    from .flow import FlowConfig
    from .kernels._utils import quiet_interpreter_warnings
    from .model import UniViGUModel  # the Triton kernels (each falls back to its reference op without a GPU)
    from .training import TrainConfig, Trainer

    quiet_interpreter_warnings()  # only Triton's interpreter (TRITON_INTERPRET=1 on CPU) raises them

    try:  # settings first: a bad option is a usage error, before any model or data is loaded
        cfg = TrainConfig(stage=stage, steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup,
                          schedule=schedule, grad_clip=grad_clip, seed=seed, save_every=save_every, out_dir=str(out),
                          prompt_length=_prompt_length(prompt_length, synthetic=data is None),
                          flow=FlowConfig(mode_mix=_mode_mix(mode_mix), cond_dropout=cond_dropout,
                                          kappa_power=kappa_power,
                                          loss_unit=loss_unit))
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    if text_flow not in (None, "discrete", "embedding"):
        raise typer.BadParameter(f"--text-flow must be 'discrete' or 'embedding', got {text_flow!r}")
    if text_flow is not None and wan is None:
        raise typer.BadParameter("only initialises a Wan checkpoint's text stream (with --wan); the model of "
                                 "--model / --config has its text flow in its config", param_hint="--text-flow")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = _device(device)
    if world > 1:
        if dev == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if dev == "cuda" else "gloo")
    if sum(x is not None for x in (model, wan, config)) != 1:
        raise typer.BadParameter("give exactly one of --model, --wan, --config")
    if (data is None) == (synthetic == 0):
        raise typer.BadParameter("give exactly one of --data or --synthetic N")
    if data is not None:  # before the model: a folder that is not an examples folder is a usage error
        from .data import VideoTextDataset

        with _usage_errors("--data", f"cannot read examples from {data}"):
            ds = VideoTextDataset(data)
    if model is not None:
        with _usage_errors("--model", f"cannot load a model from {model}"):
            m = UniViGUModel.from_pretrained(model)
    elif wan is not None:
        with _usage_errors("--wan", f"cannot load a Wan2.1 transformer from {wan}"):
            m = UniViGUModel.from_wan(wan, text_flow=text_flow or "discrete")
    else:
        torch.manual_seed(seed)
        with _usage_errors("--config", f"cannot read a UniViGUConfig from {config}", (OSError, TypeError, ValueError)):
            cfg_model = UniViGUConfig.load(config, strict=True)
        m = UniViGUModel(cfg_model)
        m.init_text_stream()
    _discrete_text_options(m, kappa_power=kappa_power)
    m = m.to(dev, torch.float32)  # float32 weights (a bf16 / fp16 checkpoint too): the Trainer's AdamW masters
    if data is None:
        from . import synthetic as S

        ds = S.make_dataset(synthetic, seed, text_dim=m.config.text_dim)
    tr = Trainer(m, ds, cfg)
    if resume and tr.resume_if_possible():
        typer.echo(f"resumed at step {tr.step}")
    recs = tr.train()
    if tr.rank == 0:
        m.save_pretrained(out / "model") if world == 1 else _save_full(tr, out / "model")
        last = recs[-1] if recs else {}
        typer.echo(json.dumps({"step": tr.step, "loss": last.get("loss"), "text_acc": last.get("text_acc"),
                               "model": str(out / "model")}))
    elif world > 1:
        _save_full(tr, None)
    if world > 1:
        tr.close()  # the DDP reducer must go before the process group (see Trainer.close)
        dist.destroy_process_group()


def _mode_mix(text: str) -> dict[str, float]:
    """'joint=1,understanding=2' -> {'joint': 1.0, 'understanding': 2.0} (FlowConfig checks the names)."""
    mix = {}
    for item in filter(None, (kv.strip() for kv in text.split(","))):
        name, eq, weight = item.partition("=")
        try:
            if not eq or name.strip() in mix:
                raise ValueError
            mix[name.strip()] = float(weight)
        except ValueError:
            raise ValueError(f"--mode-mix must be comma-separated name=weight pairs, each name once "
                             f"(e.g. 'joint=1,understanding=2'), got {text!r}") from None
    return mix


def _save_full(tr, path):
    """Full state dict from a sharded/DDP model (collective), written by rank 0 as ``save_pretrained`` does."""
    from .conversion import save_weights

    sd = tr.state_dict()["model"]
    if path is not None:
        save_weights(sd, tr.model.config, path)


def caption(
    model: Path = _MODEL_OPTION,
    latents: Optional[Path] = typer.Option(None, exists=True, dir_okay=False,
                                           help="A .pt tensor (C, F, H, W) of VAE latents to caption."),
    data: Optional[Path] = typer.Option(None, exists=True, file_okay=False,
                                        help="Or: an examples folder; caption example --index."),
    index: int = typer.Option(0, help="With --data: which example."),
    length: int = typer.Option(256, min=1, help="Caption length in tokens (the model writes exactly this many)."),
    steps: int = _STEPS_OPTION,
    temperature: float = _TEMPERATURE_OPTION,
    kappa_power: Optional[float] = _KAPPA_POWER_OPTION,
    synthetic: bool = typer.Option(False, help="Use the synthetic task's tokenizer/prompt encoder."),
    tokenizer: Optional[Path] = _TOKENIZER_OPTION,
    text_encoder: Optional[Path] = typer.Option(None, help="Local umT5 encoder folder (for the empty-prompt condition; "
                                                           "not with --data, whose examples folder holds it)."),
    prompt_length: Optional[int] = _PROMPT_LENGTH_OPTION,
    seed: int = _SEED_OPTION,
    device: Optional[str] = _DEVICE_OPTION,
    video_cache: str = typer.Option("off", help="Video-stream cache: off (exact) | once | every:R (re-run the video "
                                                "every R steps; every:1 = exact). See README, 'video-stream cache'."),
    cuda_graph: bool = typer.Option(False, help="With a cached policy on a GPU: replay the text-only steps' layers "
                                                "from a CUDA graph (one launch instead of ~400 per step)."),
):
    """Understanding: caption a video (clean video, text from noise; conditioned on the empty prompt)."""
    import torch

    from .sampling import caption as caption_sampler
    from .video_cache import parse_policy

    try:
        policy = parse_policy(video_cache)
    except (TypeError, ValueError) as e:
        raise typer.BadParameter(str(e), param_hint="--video-cache")
    if cuda_graph and policy[0] == "off":
        raise typer.BadParameter("replays the text-only steps of a cached caption: give --video-cache once or every:R",
                                 param_hint="--cuda-graph")

    if (latents is None) == (data is None):
        raise typer.BadParameter("give exactly one of --latents or --data")
    if index != 0 and data is None:  # (it was ignored)
        raise typer.BadParameter("picks an example of --data; --latents holds one video", param_hint="--index")
    # the video first (cheap, and a usage error should not wait for the model and the text encoder)
    if data is not None:
        from .data import VideoTextDataset

        with _usage_errors("--data", f"cannot read example {index} of {data}"):
            ds = VideoTextDataset(data)
            if not -len(ds) <= index < len(ds):
                raise ValueError(f"--index {index} is out of range for its {len(ds)} examples")
            z = ds.latents[index]
    else:
        with _usage_errors("--latents", f"cannot read {latents}"):
            try:
                z = torch.load(latents, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 -- not a torch file / pickled objects: torch's own error types
                raise ValueError(f"not a torch tensor file ({type(e).__name__}: {e})") from None
            if not (isinstance(z, torch.Tensor) and z.dim() == 4 and z.is_floating_point()):
                raise ValueError(f"expected one float (C, F, H, W) tensor, got "
                                 f"{tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}")
    m = _load_model(model, _device(device))
    _discrete_text_options(m, temperature, kappa_power)
    if cuda_graph and m.device.type != "cuda":
        raise typer.BadParameter(f"needs a CUDA device, the model is on {m.device}", param_hint="--cuda-graph")
    if z.shape[0] != m.config.in_channels:
        raise typer.BadParameter(f"the latents have {z.shape[0]} channels, the model takes in_channels="
                                 f"{m.config.in_channels}", param_hint="--data" if data is not None else "--latents")
    fe = _TextFrontEnd(m, tokenizer, text_encoder, synthetic, prompt_length, encoder=data is None)
    null = fe.pad(ds.null_prompt) if data is not None else fe.null()
    ids = caption_sampler(m, [z.to(m.device, m.dtype)], [null.to(m.device, m.dtype)], [length], steps=steps, seed=seed,
                          kappa_power=kappa_power, temperature=temperature, video_cache=video_cache,
                          cuda_graph=cuda_graph)[0]
    typer.echo(fe.decode(ids))


def generate(
    model: Path = _MODEL_OPTION,
    prompt: str = _PROMPT_OPTION,
    out: Path = typer.Option(Path("video_latents.pt"), help="Where to save the generated latents (C, F, H, W)."),
    frames: int = typer.Option(21, min=1, help="Latent frames F (Wan: 21 for 81 video frames)."),
    height: int = typer.Option(60, min=1, help="Latent height H (Wan 480p: 60)."),
    width: int = typer.Option(104, min=1, help="Latent width W (Wan 480p: 104)."),
    steps: int = _STEPS_OPTION,
    shift: float = _SHIFT_OPTION,
    guidance: float = typer.Option(5.0, callback=_finite,
                                   help="Classifier-free guidance scale (1 = off); uncond = the empty prompt."),
    synthetic: bool = _SYNTHETIC_VIDEO_OPTION,
    tokenizer: Optional[Path] = _TOKENIZER_OPTION,
    text_encoder: Optional[Path] = _TEXT_ENCODER_OPTION,
    prompt_length: Optional[int] = _PROMPT_LENGTH_OPTION,
    seed: int = _SEED_OPTION,
    device: Optional[str] = _DEVICE_OPTION,
):
    """Generation: video latents from a prompt (decode them with the Wan VAE)."""
    from .sampling import generate as run_generate

    _check_out_file(out)
    m, fe, emb, ids = _prompted_model(model, device, tokenizer, text_encoder, synthetic, prompt, prompt_length)
    lat = run_generate(m, [emb], [ids], _video_shape(m, frames, height, width), null_prompt=fe.null(),
                       steps=steps, shift=shift, guidance=guidance, seed=seed)[0]
    typer.echo(json.dumps(_save_latents(lat, out, synthetic)))


def joint(
    model: Path = _MODEL_OPTION,
    prompt: str = _PROMPT_OPTION,
    out: Path = typer.Option(Path("video_latents.pt"), help="Where to save the generated latents."),
    length: int = typer.Option(256, min=1, help="Caption length in tokens."),
    frames: int = typer.Option(21, min=1, help="Latent frames F."),
    height: int = typer.Option(60, min=1, help="Latent height H."),
    width: int = typer.Option(104, min=1, help="Latent width W."),
    steps: int = _STEPS_OPTION,
    shift: float = _SHIFT_OPTION,
    guidance: float = typer.Option(5.0, callback=_finite, help="CFG scale on the video velocity (1 = off)."),
    temperature: float = _TEMPERATURE_OPTION,
    kappa_power: Optional[float] = _KAPPA_POWER_OPTION,
    synthetic: bool = _SYNTHETIC_VIDEO_OPTION,
    tokenizer: Optional[Path] = _TOKENIZER_OPTION,
    text_encoder: Optional[Path] = _TEXT_ENCODER_OPTION,
    prompt_length: Optional[int] = _PROMPT_LENGTH_OPTION,
    seed: int = _SEED_OPTION,
    device: Optional[str] = _DEVICE_OPTION,
):
    """Joint generation: a video and its caption together from noise, coupled every step."""
    from .sampling import joint as run_joint

    _check_out_file(out)
    m, fe, emb, _ = _prompted_model(model, device, tokenizer, text_encoder, synthetic, prompt, prompt_length)
    _discrete_text_options(m, temperature, kappa_power)
    lat, ids = run_joint(m, [emb], _video_shape(m, frames, height, width), [length], null_prompt=fe.null(),
                         steps=steps, shift=shift, guidance=guidance, seed=seed, temperature=temperature,
                         kappa_power=kappa_power)
    info = _save_latents(lat[0], out, synthetic)
    info["caption"] = fe.decode(ids[0])
    typer.echo(json.dumps(info))


def _video_shape(m, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(C, F, H, W) to generate; F, H, W must be multiples of the model's patch (a usage error otherwise)."""
    for option, n, p in zip(("--frames", "--height", "--width"), (frames, height, width), m.config.patch_size):
        if n % p:
            raise typer.BadParameter(f"must be a multiple of the model's patch size {p} "
                                     f"(patch_size {tuple(m.config.patch_size)}), got {n}", param_hint=option)
    return m.config.in_channels, frames, height, width


def _token_range(option: str, text: str) -> tuple[int, int]:
    """'0,128' -> (0, 128)."""
    parts = text.split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        return int(parts[0]), int(parts[1])
    except ValueError:
        raise ValueError(f"{option} must be 'min,max' token counts (e.g. '0,128'), got {text!r}") from None


def preprocess(
    manifest: Path = typer.Option(..., exists=True, dir_okay=False,
                                  help="JSONL: one {\"video\": path, \"prompt\": str, \"caption\": str} per line."),
    out: Path = typer.Option(..., help="Output examples folder."),
    wan: Optional[Path] = typer.Option(None, help="Local Wan diffusers folder (vae/, text_encoder/, tokenizer/)."),
    vae: Optional[Path] = typer.Option(None, help="Or: the AutoencoderKLWan folder."),
    text_encoder: Optional[Path] = typer.Option(None, help="Or: the umT5 encoder folder."),
    tokenizer: Optional[Path] = typer.Option(None, help="Or: the umT5 tokenizer folder."),
    prompt_tokens: str = typer.Option("0,128", help="Prompt token range min,max (longer: truncated)."),
    caption_tokens: str = typer.Option("128,256", help="Caption token range min,max (shorter: skipped; longer: truncated)."),
    device: Optional[str] = _DEVICE_OPTION,
):
    """Turn videos + prompts + captions into training examples (Wan VAE latents, umT5 embeddings, token ids)."""
    import torch

    from .data import LengthConstraints, preprocess as run

    try:
        lengths = LengthConstraints(_token_range("--prompt-tokens", prompt_tokens),
                                    _token_range("--caption-tokens", caption_tokens))
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    dev = _device(device)
    meta = run(manifest, out, model_path=wan, vae_path=vae, text_encoder_path=text_encoder, tokenizer_path=tokenizer,
               lengths=lengths, device=dev, dtype=torch.bfloat16 if dev == "cuda" else torch.float32)
    typer.echo(json.dumps({k: meta[k] for k in ("count", "skipped", "truncated")}))


def demo(
    seed: int = typer.Option(0, help="Seed of the synthetic data, model and training."),
    out: Path = typer.Option(..., help="Output folder: metrics.json, stage logs and checkpoints."),
    text_flow: str = typer.Option("discrete", help="'discrete' (public implementation) or 'embedding' (paper Eq. 7-8)."),
    threads: int = typer.Option(0, min=0, help="torch CPU threads (0 = default)."),
    steps1: Optional[int] = typer.Option(None, min=0, help="Override Stage 1 training steps."),
    steps2: Optional[int] = typer.Option(None, min=0, help="Override Stage 2 training steps."),
    n_train: Optional[int] = typer.Option(None, min=1, help="Override the number of training samples."),
    n_test: Optional[int] = typer.Option(None, min=1, help="Override the number of held-out samples."),
    caption_steps: Optional[int] = typer.Option(None, min=1, help="Override the caption sampler's steps."),
    gen_steps: Optional[int] = typer.Option(None, min=1, help="Override the generation / joint sampler's steps."),
):
    """Synthetic task end to end: data, Stage 1, Stage 2, held-out evaluation -> OUT/metrics.json.
    (A quick smoke run: --steps1 2 --steps2 2 --n-train 64 --n-test 8 --caption-steps 2 --gen-steps 2.)"""
    from .demo import DemoConfig, run_demo

    if text_flow not in ("discrete", "embedding"):
        raise typer.BadParameter("--text-flow must be 'discrete' or 'embedding'")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise typer.BadParameter(f"cannot create {out}: {e}", param_hint="--out") from None
    cfg = DemoConfig(seed=seed, text_flow=text_flow, threads=threads)
    for name, value in (("steps1", steps1), ("steps2", steps2), ("n_train", n_train), ("n_test", n_test),
                        ("caption_steps", caption_steps), ("gen_steps", gen_steps)):
        if value is not None:
            setattr(cfg, name, value)
    m = run_demo(cfg, out, log=typer.echo)
    keys = ("understanding_attribute_accuracy", "understanding_caption_only_attribute_accuracy",
            "stage1_caption_only_attribute_accuracy", "generation_accuracy", "joint_agreement",
            "joint_background_agreement", "joint_background_agreement_shuffled", "chance", "seconds")
    typer.echo(json.dumps({k: m[k] for k in keys}, indent=1))


COMMANDS = (train, caption, generate, joint, preprocess, demo)


def register(app: typer.Typer) -> None:
    for fn in COMMANDS:
        app.command()(fn)
