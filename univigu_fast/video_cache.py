"""Video-stream cache for fast understanding (captioning a clean video).

With ``tau_video = 1`` the video tokens' input is fixed and only the text tokens (a few hundred
among ~33K keys) move between text denoising steps. The cache keeps, per layer, the video tokens'
self-attention keys (after the q/k RMSNorm and RoPE: rotated once, when captured) and values
inside a packed joint ``[video_i; text_i]`` buffer. A *full* step runs the whole model and
records them; a *text-only* step (``UniViGUModel.text_step``) rotates its fresh text keys, writes
them and the text values in place into the text rows of the buffer and lets the text queries
attend to ``[cached video; fresh text]`` per sample — the varlen attention with different query
and key lengths, no key rotation — then runs cross-attention and the text FFN. (Rotating the
keys inside the attention, as an uncached step does, would re-read and re-write every cached
video key at every text step.)

The prompt's cross-attention keys/values (a function of the prompt and the weights only) are kept
from the full step too, so a text-only step does not recompute them.

Policies: ``off`` (exact: every step full), ``every:r`` (full every r-th step, ``every:1`` = exact),
``once`` (full at the first step only). Memory: ``layers x sum(Lv_i) x 2 x dim`` elements (plus the
few text and prompt rows), reported by :func:`cache_bytes`; a cache that would not fit is refused
with a ``MemoryError`` naming the size and the budget.

``cuda_graph=True`` (CUDA only): a text-only step is a few milliseconds of GPU work in ~400 small
kernel launches, so the host's time to issue them can exceed the GPU's. With this option the step's
layer loop is captured once in a CUDA graph (at the first text step) and replayed on the later
text steps: one launch for all layers. The inputs that change per step (the text rows and their
time modulation) are copied into the graph's static buffers; the decode head runs outside it (its
sampling seed changes every step). A refresh (``every:r``) writes the new keys/values into the same
buffers, so one graph serves the whole caption; a full step on another batch drops it.

A cache belongs to one model and to its weights as they were at the last full step: a text-only step
refuses a cache whose model has since changed its weights in place (an optimizer step,
``load_state_dict``), replaced a parameter (``assign=True``, ``setattr``, ``p.data = ...``) or a layer,
or changed dtype or device; a full step after such a change refills it (into new buffers, dropping a captured
graph, which reads the weights where they were). Not seen (no version counter moves): writes through
``p.data`` and fused optimizer steps (``fused=True``); run a full step after those. The cache keeps the
storages of the weights its full step read until the next full step or ``release()``: after
``model.half()`` or a swapped layer the old weights stay in memory until then. A cache filled under
``torch.inference_mode()`` is updated by its text steps in that mode too.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch

from .kernels._utils import retain_cached_tables
from .packing import PackedBatch

logger = logging.getLogger("univigu_fast")


def parse_policy(policy: str) -> tuple[str, int]:
    """``"off"`` -> ("off", 0); ``"once"`` -> ("once", 0); ``"every:r"`` -> ("every", r)."""
    if not isinstance(policy, str):
        raise TypeError(f"video cache policy must be a string ('off', 'once' or 'every:r'), got {type(policy).__name__}")
    p = policy.strip().lower()
    if p in ("off", "once"):
        return p, 0
    every = re.fullmatch(r"every:([1-9][0-9]*)", p)  # not int(): it would take " 2", "+2", "1_0"
    if every:
        return "every", int(every.group(1))
    raise ValueError(f"video cache policy {policy!r} is not one of 'off', 'once', 'every:r' (r a positive integer)")


def cache_bytes(config, video_lens, text_lens, dtype: torch.dtype, prompt_lens=()) -> int:
    """Bytes the cache holds: per layer, keys and values for every joint row (video rows dominate)
    and every prompt row."""
    rows = sum(video_lens) + sum(text_lens) + sum(prompt_lens)
    return config.num_layers * 2 * rows * config.dim * torch.tensor([], dtype=dtype).element_size()


def is_full_step(policy: tuple[str, int], step: int) -> bool:
    kind, r = policy
    return kind == "off" or step == 0 or (kind == "every" and step % r == 0)


def _owned(t: torch.Tensor) -> torch.Tensor:
    """The cache's own copy of a tensor autograd may save for a backward pass (text steps write into the
    buffers in place; the attention saves keys that need no grad when its queries do), else ``t``
    itself (no copy in the usual no-grad full step)."""
    return t.detach().clone() if torch.is_grad_enabled() else t


@dataclass
class LayerKV:
    """One layer's packed joint key/value buffers, and how a block should use them."""

    cache: "VideoCache"
    index: int

    def keys_values(self, k: torch.Tensor, v: torch.Tensor):
        c = self.cache
        joint = c.joint
        if c.capturing:
            # a full step: these ARE the joint keys/values. Keep the keys rotated (the same rotation,
            # same dtype, the attention would apply) and let the attention skip its key rotation.
            k = c.rotate(k, joint.rope)
            if c.refill:  # a refresh of the same batch: into the buffers a text-step graph reads
                with torch.no_grad():  # the buffers stay out of this step's autograd graph
                    c.keys[self.index].copy_(k)
                    c.values[self.index].copy_(v)
            else:
                c.keys[self.index], c.values[self.index] = _owned(k), _owned(v)
            return k, v, joint.cu_seqlens, joint.max_seqlen, None
        # text-only step: fresh text keys (rotated with the text rows' tables) and values written in
        # place into the text rows (the buffers belong to the cache; the video rows are never written)
        kb, vb = c.keys[self.index], c.values[self.index]
        if c.text_rows.numel():
            kb.index_copy_(0, c.text_rows, c.rotate(k, c.text_rope).to(kb.dtype))
            vb.index_copy_(0, c.text_rows, v.to(vb.dtype))
        return kb, vb, joint.cu_seqlens, joint.max_seqlen, None

    def prompt_keys_values(self, compute):
        """The prompt's cross-attention keys/values: ``compute()`` on a full step, kept for text steps."""
        c = self.cache
        kept = c.prompt_kv[self.index]
        if c.capturing or kept is None:
            fresh = compute()
            if c.refill and kept is not None:
                with torch.no_grad():
                    for old, new in zip(kept, fresh):
                        old.copy_(new)
            else:
                c.prompt_kv[self.index] = tuple(_owned(t) for t in fresh)
            return fresh  # (with autograd: the step's own graph, not the cache's detached copies)
        return kept


def _layout(packed: PackedBatch, dtype: torch.dtype):
    return (packed.video_grids, packed.text_lens, packed.prompt_lens, packed.cu_seqlens.device, dtype)


class WeightsRecord:
    """``model``'s weights as a full step saw them: the module tree (each child in its slot, each module's
    parameter slots, None ones included), each parameter's storage address (the storage kept alive by a
    view: no other tensor can take the address while this record exists) and its version counter.
    ``moved()``: a submodule or parameter slot holds another object (a replaced layer, LoRA injection,
    ``setattr``, ``load_state_dict(assign=True)``, ``torch.func.functional_call``) or a parameter another
    storage (``p.data = ...``, a dtype or device round trip); ``changed()``: that, or an in-place update
    (optimizer steps, ``load_state_dict`` copies). Host-only: ~0.3 ms for a 1.3B model's ~1K tensors.
    Not seen: writes through ``p.data`` and fused optimizer steps (no version counter moves). The replaced
    storages stay alive until the next full step or ``VideoCache.release()``."""

    def __init__(self, model):
        modules = list(model.modules())
        self.slots = [(d, name, obj) for m in modules for d in (m._modules, m._parameters) for name, obj in d.items()]
        params = [p for _, _, p in self.slots if isinstance(p, torch.Tensor)]
        self.params = [(p, p.data_ptr(), p._version) for p in params]
        self._held = [p.detach() for p in params]  # the storages, alive while recorded

    def moved(self) -> bool:
        return any(d.get(name) is not obj for d, name, obj in self.slots) or \
            any(p.data_ptr() != ptr for p, ptr, _ in self.params)

    def changed(self) -> bool:
        return self.moved() or any(p._version != version for p, _, version in self.params)


def check_cuda_graph_device(device: torch.device) -> None:
    if device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a model on a CUDA device, got a model on {device}")


def capture_cuda_graph(fn, device: torch.device):
    """Record ``fn()`` (no arguments; it reads and writes fixed tensors on ``device``) in a CUDA graph,
    after one warm-up run on a side stream (autotuning, lazy initialisation: nothing of that may
    happen during capture). Returns ``(graph, out)``: ``graph.replay()`` re-runs the recorded work,
    which writes its result into ``out`` (not valid before the first replay)."""
    with torch.cuda.device(device):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()
    return graph, out


class GraphedTextLayers:
    """The layer loop of a text-only step, ``run(x, seg_temb) -> x``, replayed from a CUDA graph.

    ``x`` (Lt, dim) the text rows, ``seg_temb`` (2B, 6, dim) their time modulation: copied into
    static buffers before each replay; every other tensor ``run`` reads must stay where it was at
    capture: the weights, the cache's keys/values and text packing (refreshed in place; the cache
    drops the graph when it drops them) and the kernels' cached tile / one-segment tables (kept
    here: their caches may evict them).
    Returns a fresh tensor (the graph's own output buffer is overwritten by the next replay)."""

    def __init__(self, run, x: torch.Tensor, seg_temb: torch.Tensor):
        self.x, self.seg_temb = x.clone(), seg_temb.clone()
        with retain_cached_tables() as self.tables:
            self.graph, self.out = capture_cuda_graph(lambda: run(self.x, self.seg_temb), x.device)

    def accepts(self, x: torch.Tensor, seg_temb: torch.Tensor) -> bool:
        return all(a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
                   for a, b in ((x, self.x), (seg_temb, self.seg_temb)))

    def __call__(self, x: torch.Tensor, seg_temb: torch.Tensor) -> torch.Tensor:
        self.x.copy_(x)
        self.seg_temb.copy_(seg_temb)
        self.graph.replay()
        return self.out.clone()


def check_video_cache(video_cache, model) -> None:
    """``video_cache`` is a ``VideoCache`` made for ``model`` (not a policy string: those are ``caption``'s)."""
    if not isinstance(video_cache, VideoCache):
        raise TypeError(f"video_cache must be a univigu_fast.video_cache.VideoCache(model), got "
                        f"{type(video_cache).__name__} (policies such as 'once' are caption()'s video_cache)")
    video_cache.check_owner(model)


def _size(n_bytes) -> str:
    return f"{n_bytes / 2**30:.2f} GiB ({int(n_bytes):,} bytes)"


class VideoCache:
    """Per-caption cache of the video stream's per-layer keys/values (see the module docstring)."""

    def __init__(self, model, max_bytes: int | None = None, cuda_graph: bool = False):
        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, (int, float))
                                      or not max_bytes >= 0):  # NaN would compare as "fits"
            raise ValueError(f"max_bytes (max_cache_bytes) must be a number of bytes >= 0 or None, got {max_bytes!r}")
        self.model = model
        self.max_bytes = max_bytes
        if not isinstance(cuda_graph, bool):
            raise TypeError(f"cuda_graph must be True or False, got {cuda_graph!r}")
        if cuda_graph:
            check_cuda_graph_device(model.device)
        self.cuda_graph = cuda_graph
        self.graph: GraphedTextLayers | None = None
        self.graph_captures = 0  # CUDA graphs captured (one per full step followed by text steps)
        self.graph_error: str | None = None  # why capture failed (text steps then run eagerly)
        n = model.config.num_layers
        self.keys: list[torch.Tensor | None] = [None] * n
        self.values: list[torch.Tensor | None] = [None] * n
        self.prompt_kv: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n
        self.joint: PackedBatch | None = None
        self.context: torch.Tensor | None = None
        self.capturing = False
        self.refill = False  # this full step refreshes the buffers of the same batch in place
        self.text_rows = torch.zeros(0, dtype=torch.long)
        self.text_rope = None
        self.weights: WeightsRecord | None = None  # the model's weights at the last full step
        self._views: dict = {}
        # the key rotation of the model's own attention op (bit-identical keys): the reference's for
        # the reference ops, else the kernel entry point (which falls back to the reference itself)
        from .kernels.joint_attention import apply_rope, apply_rope_reference, joint_attention_reference

        self.rotate = apply_rope_reference if model.ops.attention is joint_attention_reference else apply_rope

    def check_owner(self, model) -> None:
        """The cache holds ``self.model``'s keys / values: another model (even of the same config) must not
        read them (its text steps would mix two models' layers)."""
        if model is not self.model:
            raise ValueError(f"video_cache was made for another model (VideoCache({type(self.model).__name__}) at "
                             f"{id(self.model):#x}); make one per model: VideoCache(model)")

    def check_ready(self, model) -> None:
        """A text-only step of ``model`` may read this cache (``check_video_cache`` first): it is filled by a
        full step, and the model's weights, dtype and device are those of that step."""
        if self.joint is None or self.capturing or self.keys[0] is None:
            raise RuntimeError("text_step needs a filled cache: run a full step with video_cache=... first")
        kept = self.keys[0]
        if (model.dtype, model.device) != (kept.dtype, kept.device):
            raise ValueError(f"the model is now {model.dtype} on {model.device} but the cache was filled in {kept.dtype} "
                             f"on {kept.device}: run a full step with video_cache=... first")
        if self.weights is None or self.weights.changed():
            raise RuntimeError("the model's weights changed since the cache's last full step (an in-place update such "
                               "as load_state_dict or an optimizer step, a replaced parameter or layer): run a full "
                               "step with video_cache=... first")

    def check_fits(self, video_lens, text_lens, prompt_lens=()) -> int:
        need = cache_bytes(self.model.config, video_lens, text_lens, self.model.dtype, prompt_lens)
        budget = self.max_bytes
        if budget is None and self.model.device.type == "cuda":
            dev = self.model.device
            # free to the driver plus what PyTorch's caching allocator holds unused (freed tensors, the
            # old cache's buffers included); half of it, leaving room for the activations
            free = torch.cuda.mem_get_info(dev)[0] + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
            budget = free // 2
        if budget is not None and need > budget:
            raise MemoryError(f"video cache needs {_size(need)} ({self.model.config.num_layers} layers x "
                              f"({sum(video_lens)} video + {sum(text_lens)} text + {sum(prompt_lens)} prompt tokens) "
                              f"x 2 x dim {self.model.config.dim}) but the budget is {_size(budget)}; "
                              "use video_cache='off' or a larger max_cache_bytes")
        return need

    def begin_capture(self, packed: PackedBatch) -> None:
        self.capturing = True
        old = self.weights
        # a refresh (every:r) of the same batch writes the new keys/values into the buffers already
        # there: same memory, and a captured text-step graph (which reads those buffers, the packing,
        # the text tables kept here and the weights where they were) stays valid
        self.refill = self.joint is not None and all(k is not None for k in self.keys) and \
            _layout(packed, self.model.dtype) == _layout(self.joint, self.keys[0].dtype) and \
            old is not None and not old.moved() and \
            self.keys[0].is_inference() == torch.is_inference_mode_enabled()  # inference tensors: same mode
        self.weights = WeightsRecord(self.model)
        if self.refill:
            return
        # another batch: drop the old buffers first, so the free memory the budget is read from
        # includes them and old and new never coexist
        self._drop_layers()
        self.check_fits(packed.video_lens, packed.text_lens, packed.prompt_lens)
        self.joint = packed
        self.text_rows = packed.index("text")
        self.text_rope = tuple(t.index_select(0, self.text_rows).contiguous() for t in packed.rope)
        self._views.clear()

    def end_capture(self) -> None:
        self.capturing = False

    def layer(self, i: int) -> LayerKV:
        return LayerKV(self, i)

    def run_text_layers(self, run, x: torch.Tensor, seg_temb: torch.Tensor) -> torch.Tensor:
        """``run(x, seg_temb)``, the layer loop of a text-only step: eagerly, or with ``cuda_graph``
        (and autograd off) by replaying its CUDA graph, captured at the first text step on these
        buffers. A capture that fails is logged, kept in ``graph_error``, and the text steps of
        this cache then run eagerly."""
        if not self.cuda_graph or self.graph_error is not None or torch.is_grad_enabled():
            return run(x, seg_temb)
        if self.graph is None or not self.graph.accepts(x, seg_temb):
            self.graph = None
            try:
                self.graph = GraphedTextLayers(run, x, seg_temb)
            except Exception as e:  # noqa: BLE001 -- any capture failure: the eager step is still exact
                self.graph_error = f"{type(e).__name__}: {e}"
                logger.warning("video cache: CUDA graph capture of the text step failed (%s); text steps run "
                               "eagerly", self.graph_error)
                return run(x, seg_temb)
            self.graph_captures += 1
        return self.graph(x, seg_temb)

    def text_view(self, text_lens: list[int]) -> PackedBatch:
        """The text-only packing of a text step (empty video segments, text RoPE positions 0..L-1)."""
        if list(text_lens) != list(self.joint.text_lens):
            raise ValueError(f"text lengths {list(text_lens)} differ from the cached step's {self.joint.text_lens}")
        key = tuple(text_lens)
        if key not in self._views:
            j = self.joint
            self._views[key] = PackedBatch.build([(0, 0, 0)] * j.batch, text_lens, j.prompt_lens, self.model.config.head_dim,
                                                 self.model.rotary_emb_text.inv_freq, self.model.device)
        return self._views[key]

    @property
    def nbytes(self) -> int:
        tensors = self.keys + self.values + [t for kv in self.prompt_kv if kv is not None for t in kv]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def _drop_layers(self) -> None:
        self.graph = None  # it reads the buffers dropped here
        self.refill = False
        self.keys = [None] * len(self.keys)
        self.values = [None] * len(self.values)
        self.prompt_kv = [None] * len(self.prompt_kv)

    def release(self) -> None:
        """Drop every cached tensor (called at the end of each caption)."""
        self._drop_layers()
        self.context = None
        self.joint = None
        self.text_rope = None
        self._views.clear()
        self.text_rows = torch.zeros(0, dtype=torch.long)
        self.weights = None


# ---------------------------------------------------------------------------- cost model (estimates)
def text_step_flops(shape, config, decode: bool = True) -> dict[str, float]:
    """Forward FLOPs of one text-only step on a filled cache, per component (multiply-add = 2 FLOPs),
    in the terms of ``profiling.component_flops`` (whose understanding-mode count is the exact step).

    Only the ``Lt`` text rows of each sample run: q/k/v/o projections, attention of ``Lt`` queries
    over ``Lv + Lt`` keys, cross-attention (its prompt keys/values come from the cache: no prompt
    projections), the text FFN and the decode. An estimate from the shapes, not a measurement."""
    d, L, P = config.dim, config.num_layers, shape.prompt_len
    text = list(shape.text_lens)
    Lt = sum(text)
    flops = {
        "attention": L * 4 * sum(t * (v + t) for v, t in zip(shape.video_lens, text)) * d,
        "cross_attention": L * 4 * Lt * P * d,
        "ffn": L * 4 * Lt * d * config.ffn_dim,
        "glue": 0.0,
        "other": L * (2 * Lt * d * d * 4 + 2 * Lt * d * d * 2),  # self q/k/v/o, cross q/o
    }
    if decode:
        flops["decode"] = 2 * Lt * config.text_out_dim * d
    return flops


def text_step_bytes(shape, config, element_size: int = 2) -> float:
    """Bytes one text-only step moves at least: per layer the attention reads the cached keys/values
    of every joint row (the text rows are written in place) and the layer's weights a text row
    uses are read once (self-attention q/k/v/o, cross-attention q/o: the prompt's keys/values come
    from the cache; the text FFN); then the text head once. Activations of the few text rows are
    ignored. An estimate, not a measurement."""
    d, L = config.dim, config.num_layers
    rows = sum(shape.video_lens) + sum(shape.text_lens)
    kv = 2 * rows * d * element_size  # keys + values of one layer
    weights = (6 * d * d + 2 * d * config.ffn_dim) * element_size
    return L * (kv + weights) + config.text_out_dim * d * element_size


def caption_cost(shape, config, steps: int, policy: str) -> dict:
    """Full and text-only step counts of a ``steps``-step caption under ``policy`` and the FLOP total
    (exact step = ``profiling.component_flops(..., "understanding", decode=True)``)."""
    from .profiling import component_flops

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    pol = parse_policy(policy)
    full = sum(is_full_step(pol, i) for i in range(steps))
    f_full = sum(component_flops(shape, config, "understanding", decode=True).values())
    f_text = sum(text_step_flops(shape, config).values())
    return dict(policy=policy, steps=steps, full_steps=full, text_steps=steps - full, full_step_flops=f_full,
                text_step_flops=f_text, flops=full * f_full + (steps - full) * f_text)


def caption_cached(model, videos, prompts, text_lens, **kwargs) -> list[torch.Tensor]:
    """Alias of ``univigu_fast.sampling.caption`` (which takes ``video_cache=``, ``max_cache_bytes=``,
    ``stats=``): one Euler loop for every policy."""
    from .sampling import caption

    return caption(model, videos, prompts, text_lens, **kwargs)
