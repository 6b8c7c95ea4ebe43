"""A small synthetic video-text task that shows the uni-flow learns (issue 3, item 6).

**Videos.** One coloured shape moves on a plain background: ``F`` frames of ``S x S`` RGB pixels.
Attributes: colour (6), shape (3), direction (4) — stated by the brief prompt
(``"a red square moving left"``) — and the caption-only attributes size (2), speed (2), start
position across the motion (3) and background (3), which the detailed caption adds
(``"a small red square moving left slowly starting near the top on a black background"``).
The motion is centred on the canvas, so the shape stays in frame.

**"VAE" (a fixed invertible map, stand-in for Wan's VAE).** Pixels in [-1, 1] ``(3, F, S, S)`` ->
2x2 pixel-unshuffle ``(12, F, S/2, S/2)`` -> a fixed orthonormal 16 x 12 channel map (seeded) ->
latents ``(16, F, S/2, S/2)``. ``decode`` applies the transpose and the pixel shuffle, the exact
left inverse, so a generated latent decodes to pixels that the rule-based evaluator reads.

**Text.** A word-level tokenizer built in code (``SyntheticTokenizer``; ``to_hf()`` gives the same
vocabulary as a Hugging Face ``PreTrainedTokenizerFast`` so ``univigu_fast.text`` works with it).
**Prompt embeddings (stand-in for umT5):** a fixed random table ``(V, text_dim)`` (seeded, N(0, 1))
looked up at the prompt's ids followed by ``</s>``; the empty prompt is the ``</s>`` row alone,
which is what umT5 sees for ``""`` — it is the unconditional (condition-dropout / CFG) embedding.

**Evaluators (rule based).** ``read_video``: background = the median colour of each frame;
foreground = pixels farther than 0.5 from it; dominant colour = the palette colour nearest the
foreground mean; direction = the larger axis of the foreground centroid's displacement from the
first to the last frame. ``parse_caption`` reads attributes from the caption's words (anchored on
"moving", "near the", "background").
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

COLORS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0),
          "yellow": (1.0, 1.0, 0.0), "cyan": (0.0, 1.0, 1.0), "magenta": (1.0, 0.0, 1.0)}
SHAPES = ("square", "circle", "triangle")
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}  # (dy, dx)
SIZES = {"small": 5.0, "large": 8.0}  # side in pixels
SPEEDS = {"slowly": 2.0, "quickly": 4.0}  # pixels per frame
POSITIONS_H = ("top", "middle", "bottom")  # across a horizontal motion
POSITIONS_V = ("left", "middle", "right")  # across a vertical motion
BACKGROUNDS = {"black": (0.0, 0.0, 0.0), "white": (1.0, 1.0, 1.0), "gray": (0.5, 0.5, 0.5)}
RAMP = 0.1  # background brightness ramp (absolute-position cue)
TRAIL = 0.3  # motion-trail blend towards the shape's colour

PROMPT_ATTRIBUTES = ("color", "shape", "direction")
CAPTION_ONLY_ATTRIBUTES = ("size", "speed", "position", "background")
ATTRIBUTES = PROMPT_ATTRIBUTES + CAPTION_ONLY_ATTRIBUTES
N_VALUES = {"color": len(COLORS), "shape": len(SHAPES), "direction": len(DIRECTIONS), "size": len(SIZES),
            "speed": len(SPEEDS), "position": 3, "background": len(BACKGROUNDS)}
SPECIALS = ("<pad>", "</s>", "<unk>")
TEMPLATE_WORDS = ("a", "moving", "starting", "near", "the", "on", "background")


def chance(attributes=ATTRIBUTES) -> float:
    """Accuracy of guessing each attribute uniformly at random (mean over ``attributes``)."""
    return sum(1.0 / N_VALUES[a] for a in attributes) / len(attributes)


@dataclass(frozen=True)
class Sample:
    color: str
    shape: str
    direction: str
    size: str
    speed: str
    position: str
    background: str
    jitter: float = 0.0  # sub-pixel offset of the path across the motion

    def attributes(self) -> dict:
        return {a: getattr(self, a) for a in ATTRIBUTES}

    @property
    def prompt(self) -> str:
        return f"a {self.color} {self.shape} moving {self.direction}"

    @property
    def caption(self) -> str:
        return (f"a {self.size} {self.color} {self.shape} moving {self.direction} {self.speed} "
                f"starting near the {self.position} on a {self.background} background")


def combo(sample: Sample) -> tuple:
    """The sample's attribute values (what a caption states), without the jitter."""
    return tuple(getattr(sample, a) for a in ATTRIBUTES)


def split_samples(n_train: int, n_test: int, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Held-out split: ``n_test`` samples, then ``n_train`` samples none of whose attribute
    combinations (all seven attributes) occurs in the test set, so evaluation needs composition."""
    test = random_samples(n_test, seed * 2 + 1)
    held = {combo(s) for s in test}
    train, k = [], 0
    while len(train) < n_train:
        for s in random_samples(n_train, seed * 2 + 2 + 1_000_003 * k):
            if combo(s) not in held and len(train) < n_train:
                train.append(s)
        k += 1
    return train, test


def random_samples(n: int, seed: int) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)

    def pick(seq):
        seq = list(seq)
        return seq[int(torch.randint(len(seq), (1,), generator=g))]

    out = []
    for _ in range(n):
        d = pick(DIRECTIONS)
        pos = pick(POSITIONS_H if DIRECTIONS[d][1] else POSITIONS_V)
        out.append(Sample(pick(COLORS), pick(SHAPES), d, pick(SIZES), pick(SPEEDS), pos, pick(BACKGROUNDS),
                          float(torch.rand((), generator=g)) - 0.5))
    return out


# ---------------------------------------------------------------------------- rendering
def render(sample: Sample, frames: int = 3, size: int = 16) -> torch.Tensor:
    """Pixels in [0, 1], ``(3, frames, size, size)``.

    Two cues make position and motion visible to a *tiny* model trained from scratch (a pretrained
    Wan has these priors; RoPE alone gives a small network only relative positions): the background
    carries a fixed brightness ramp (+-``RAMP`` along each axis, the same in every video: absolute
    position), and each frame shows a faint motion trail where the shape was one frame earlier
    (direction and speed readable within a frame). At the demo's size (3 frames of 16 px) ``read_video``
    reads colour, direction and background right for all 7,776 attribute combinations, although in
    5% of them (saturated colours on white, their complements on black) trail pixels pass its
    foreground threshold; at 8 px the shape covers most of the frame and it is not reliable
    (direction misread in 37%: tests at that size do not read the videos)."""
    dy, dx = DIRECTIONS[sample.direction]
    speed = SPEEDS[sample.speed]
    r = SIZES[sample.size] / 2
    across = {"top": 0.25, "left": 0.25, "middle": 0.5, "bottom": 0.75, "right": 0.75}[sample.position] * size
    across += sample.jitter
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    bg = torch.tensor(BACKGROUNDS[sample.background])
    fg = torch.tensor(COLORS[sample.color])
    ramp = RAMP * ((yy / size - 0.5) + (xx / size - 0.5))  # (S, S) in [-RAMP, RAMP]
    base = (bg.view(3, 1, 1) + ramp * (1 if sample.background != "white" else -1)).clamp(0, 1)
    video = base[:, None].repeat(1, frames, 1, 1)

    def mask(f):
        along = size / 2 + (dy or dx) * speed * (f - (frames - 1) / 2)  # centred on the canvas
        cy, cx = (along, across) if dy else (across, along)
        ry, rx = yy - cy, xx - cx
        if sample.shape == "square":
            return (ry.abs() <= r) & (rx.abs() <= r)
        if sample.shape == "circle":
            return ry**2 + rx**2 <= (r + 0.25) ** 2
        return (ry.abs() <= r) & (rx.abs() <= (ry + r) / 2 + 0.25)  # triangle pointing up

    for f in range(frames):
        trail = mask(f - 1)
        video[:, f][:, trail] = (1 - TRAIL) * base[:, trail] + TRAIL * fg[:, None]
        video[:, f][:, mask(f)] = fg[:, None]
    return video


class SyntheticVAE:
    """Fixed invertible pixels <-> latents map (see the module docstring). Latents ``(16, F, S/2, S/2)``."""

    def __init__(self, channels: int = 16, seed: int = 1234):
        if channels < 12:
            raise ValueError(f"SyntheticVAE needs >= 12 latent channels (3 x 2 x 2), got {channels}")
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(channels, 12, generator=g))
        self.Q = q  # (channels, 12), orthonormal columns
        self.channels = channels

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(3, F, S, S) in [0, 1] -> (C, F, S/2, S/2)."""
        x = pixels * 2 - 1
        x = F.pixel_unshuffle(x.permute(1, 0, 2, 3), 2)  # (F, 12, S/2, S/2)
        return torch.einsum("ck,fkhw->cfhw", self.Q, x)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(C, F, H, W) -> pixels (3, F, 2H, 2W) in [0, 1] (clamped)."""
        x = torch.einsum("ck,cfhw->fkhw", self.Q, latents.float())
        x = F.pixel_shuffle(x, 2).permute(1, 0, 2, 3)
        return ((x + 1) / 2).clamp(0, 1)


# ---------------------------------------------------------------------------- tokenizer / prompt encoder
class SyntheticTokenizer:
    """Word-level tokenizer over the task's words: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, then words."""

    def __init__(self):
        words = list(TEMPLATE_WORDS)
        for group in (COLORS, SHAPES, DIRECTIONS, SIZES, SPEEDS, POSITIONS_H, POSITIONS_V, BACKGROUNDS):
            words += [w for w in group if w not in words]
        self.vocab = {w: i for i, w in enumerate(list(SPECIALS) + words)}
        self.inv = {i: w for w, i in self.vocab.items()}
        self.pad_id, self.eos_id, self.unk_id = 0, 1, 2

    def __len__(self):
        return len(self.vocab)

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor([self.vocab.get(w, self.unk_id) for w in text.split()], dtype=torch.long)

    def decode(self, ids) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return " ".join(self.inv.get(int(i), "<unk>") for i in ids if int(i) not in (self.pad_id, self.eos_id))

    def to_hf(self):
        """The same vocabulary as a ``transformers.PreTrainedTokenizerFast`` (WordLevel)."""
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        tk = Tokenizer(models.WordLevel(dict(self.vocab), unk_token="<unk>"))
        tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


class SyntheticPromptEncoder:
    """Stand-in for umT5: a fixed random table ``(V, text_dim)``; a prompt -> its rows then ``</s>``."""

    def __init__(self, tokenizer: SyntheticTokenizer, text_dim: int, seed: int = 4321):
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(len(tokenizer), text_dim, generator=g)
        self.tok = tokenizer

    def __call__(self, prompt: str) -> torch.Tensor:
        ids = torch.cat([self.tok.encode(prompt), torch.tensor([self.tok.eos_id])])
        return self.table[ids]

    def null(self) -> torch.Tensor:
        """The empty prompt's embedding: the ``</s>`` row, ``(1, text_dim)``."""
        return self("")


# ---------------------------------------------------------------------------- dataset
@dataclass
class SyntheticData:
    """The lists ``Trainer`` takes, as ``VideoTextDataset`` gives them, with one difference: ``prompt_ids``
    are the prompt's words without the ``</s>`` that ``prompt_embeds`` has a row for (umT5's ids keep it),
    so ``ExampleWriter`` (prompt rows == prompt ids) refuses these examples. The demo's Stage 1 recalls
    the words; its figures were measured so."""

    samples: list
    latents: list  # (C, F, H, W)
    prompt_embeds: list  # (L, text_dim)
    prompt_ids: list  # (Np,)
    caption_ids: list  # (Nc,)
    null_prompt: torch.Tensor


def make_dataset(n: int | list, seed: int = 0, *, text_dim: int, frames: int = 3, size: int = 16,
                 channels: int = 16) -> SyntheticData:
    """``n`` random samples (seeded) or an explicit list of ``Sample``s -> latents, prompt embeddings and ids."""
    tok = SyntheticTokenizer()
    enc = SyntheticPromptEncoder(tok, text_dim)
    vae = SyntheticVAE(channels)
    samples = list(n) if isinstance(n, (list, tuple)) else random_samples(n, seed)
    lat = [vae.encode(render(s, frames, size)) for s in samples]
    return SyntheticData(samples, lat, [enc(s.prompt) for s in samples], [tok.encode(s.prompt) for s in samples],
                         [tok.encode(s.caption) for s in samples], enc.null())


# ---------------------------------------------------------------------------- evaluators
def read_video(pixels: torch.Tensor) -> dict:
    """Rule-based reading of ``(3, F, S, S)`` pixels in [0, 1]: ``{"color", "direction", "background"}``
    (colour / direction None if no foreground is found in the first or last frame; the background is
    the named one nearest the first frame's median colour)."""
    Fr = pixels.shape[1]
    median = pixels[:, 0].reshape(3, -1).median(dim=1).values
    background = min(BACKGROUNDS, key=lambda b: float((median - torch.tensor(BACKGROUNDS[b])).norm()))
    cents, cols = [], []
    for f in (0, Fr - 1):
        fr = pixels[:, f].reshape(3, -1)
        bg = fr.median(dim=1).values
        m = (fr - bg[:, None]).norm(dim=0) > 0.5
        if m.sum() == 0:
            return {"color": None, "direction": None, "background": background}
        idx = m.nonzero()[:, 0].float()
        S = pixels.shape[-1]
        cents.append(torch.stack([(idx // S).mean(), (idx % S).mean()]))
        cols.append(fr[:, m].mean(1))
    col = torch.stack(cols).mean(0)
    names = list(COLORS)
    color = names[int(torch.stack([(col - torch.tensor(COLORS[c])).norm() for c in names]).argmin())]
    dy, dx = (cents[1] - cents[0]).tolist()
    if max(abs(dy), abs(dx)) < 0.5:
        direction = None
    elif abs(dx) >= abs(dy):
        direction = "right" if dx > 0 else "left"
    else:
        direction = "down" if dy > 0 else "up"
    return {"color": color, "direction": direction, "background": background}


def parse_caption(text: str) -> dict:
    """Attributes stated in a caption (``None`` where absent)."""
    w = text.split()
    out = {a: None for a in ATTRIBUTES}

    def first(group):
        return next((x for x in w if x in group), None)

    out["color"], out["shape"], out["size"], out["speed"] = first(COLORS), first(SHAPES), first(SIZES), first(SPEEDS)
    for i, x in enumerate(w):
        if x == "moving" and i + 1 < len(w) and w[i + 1] in DIRECTIONS:
            out["direction"] = w[i + 1]
        if x == "near" and i + 2 < len(w) and w[i + 1] == "the" and w[i + 2] in POSITIONS_H + POSITIONS_V:
            out["position"] = w[i + 2]
        if x == "background" and i > 0 and w[i - 1] in BACKGROUNDS:
            out["background"] = w[i - 1]
    return out


def attribute_scores(text: str, sample: Sample, attributes=ATTRIBUTES) -> dict:
    got = parse_caption(text)
    return {a: float(got[a] == getattr(sample, a)) for a in attributes}


def agreement(text: str, pixels: torch.Tensor, attributes=("color", "direction")) -> float:
    """Joint generation: fraction of ``attributes`` on which the caption and the video agree. Colour and
    direction are stated by the prompt both streams are conditioned on (following the prompt is enough to
    agree on them); the background is not, so only the streams' coupling makes them agree on it."""
    got, seen = parse_caption(text), read_video(pixels)
    return sum(float(got[a] is not None and got[a] == seen[a]) for a in attributes) / len(attributes)


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else math.nan
