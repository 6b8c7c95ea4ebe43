"""Helpers shared by the kernels: when to take the Triton path, segment tables, logging once."""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import numbers
import os
import time
import warnings

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

try:  # triton is a hard dependency on Linux; elsewhere every op falls back to its reference.
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is missing
    HAS_TRITON = False

TensorDescriptor = None  # host-side TMA descriptors (Triton >= 3.4); None: the kernels' pointer loads only
if HAS_TRITON:
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:  # pragma: no cover - older Triton
        pass

logger = logging.getLogger("univigu_fast")


# Triton builds each @triton.jit kernel as interpreted or compiled when its module is imported (read
# here once, before the kernel modules): a later change of the variable does not switch the kernels.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


if HAS_TRITON:
    import triton.language as tl

    @triton.jit
    def _interpreter_probe_kernel(OUT, n):
        # the kernels' pattern: a loop whose bounds come from program_id arithmetic
        r0 = tl.program_id(0) * 2
        r1 = tl.minimum(r0 + 2, n)
        for r in range(r0, r1):
            tl.store(OUT + r, r)


def _probe_interpreter() -> str | None:
    """Run a tiny kernel in Triton's interpreter: None if it computes the right values, else why not
    (logged). Known case: Triton 3.6's interpreter converts loop bounds with ``int()`` of 1-element
    arrays, which NumPy >= 2.3 refuses ("only 0-dimensional arrays can be converted to Python
    scalars"); Triton 3.8's does not."""
    out = torch.full((3,), -1, dtype=torch.int32)
    try:
        _interpreter_probe_kernel[(2,)](out, 3)
        problem = None if out.tolist() == [0, 1, 2] else f"computed {out.tolist()} instead of [0, 1, 2]"
    except Exception as e:  # noqa: BLE001 - any failure means the kernels cannot run here
        problem = f"{type(e).__name__}: {e}"
    if problem is None:
        return None
    import numpy
    problem = (f"Triton {triton.__version__}'s interpreter cannot run the kernels with NumPy {numpy.__version__} "
               f"({problem}); install triton==3.8.0 (README) or numpy<2.3")
    logger.warning("TRITON_INTERPRET=1 ignored, the ops run their PyTorch references: %s", problem)
    return problem


# Probed once, at import (a plain flag afterwards: torch.compile reads it without tracing the probe).
_INTERPRETER_PROBLEM = _probe_interpreter() if HAS_TRITON and _INTERPRET else None


def interpreter_problem() -> str | None:
    """Why Triton's interpreter, asked for with ``TRITON_INTERPRET=1``, cannot run the kernels here
    (None: it can, or it was not asked for). Then the ops run their PyTorch references on CPU tensors."""
    return _INTERPRETER_PROBLEM


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET=1`` was set at import and Triton's interpreter can run the kernels
    here (:func:`interpreter_problem`): Triton kernels run on CPU tensors (tests on CPU)."""
    return _INTERPRET and _INTERPRETER_PROBLEM is None


def quiet_interpreter_warnings() -> None:
    """Hide the NumPy RuntimeWarnings Triton's interpreter raises on masked-off lanes (their -inf / NaN
    arithmetic is masked out of every result), e.g. from a CLI command's output on CPU."""
    warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"triton\.runtime\.interpreter")


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """Whether the Triton path can run on ``tensors``: all on CUDA, or all on CPU under the interpreter
    and none bfloat16 (the interpreter's bf16 matmul is broken, DESIGN §7: those run the references)."""
    if not HAS_TRITON:
        return False
    ts = [t for t in tensors if t is not None]  # (is_cuda / is_cpu: no torch.device objects; called per launch)
    if not ts:
        return False
    if all(t.is_cuda for t in ts):
        return True
    if not (all(t.is_cpu for t in ts) and interpreting()):
        return False
    if any(t.dtype == torch.bfloat16 for t in ts):  # DESIGN §7: the interpreter's bf16 tl.dot is wrong
        log_once("TRITON_INTERPRET=1: Triton's interpreter computes bfloat16 wrongly; bf16 CPU tensors run "
                 "the PyTorch references (test the kernels in fp32 / fp16 there)")
        return False
    return True


# Host-side launch arithmetic on Python ints. ``triton.cdiv`` / ``triton.next_power_of_2`` are
# constexpr functions (~3.5 us a call): a text-only step of the video cache computes ~1,000 of them.
def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` of Python ints."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ``>= n`` (``n >= 1``), as ``triton.next_power_of_2``."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


def custom_op(name: str):
    """``torch.library.custom_op(name, mutates_args=())`` with a direct eager path.

    The registered op is what ``torch.compile`` traces (one opaque node), what autograd sees
    (``torch.library.register_autograd(name, ...)``) and what a tracing dispatch mode (``make_fx``,
    fake tensors, non-strict export) intercepts. Called eagerly with autograd off and no such mode
    active (inference, and inside an ``autograd.Function``'s forward / backward) the decorated
    launcher runs directly, without the dispatcher's ~10 us per call: a text-only step of the video
    cache makes ~300 such calls for a few milliseconds of GPU work. ``.op`` is the registered op."""
    def wrap(fn):
        fn = on_input_device(fn)
        return _EagerCustomOp(torch.library.custom_op(name, mutates_args=())(fn), fn)
    return wrap


def on_input_device(fn):
    """Run ``fn`` with its first argument's CUDA device current. Triton launches on the current device
    and stream, not the tensors': without this a model on ``cuda:1`` while ``cuda:0`` is current would
    launch its kernels on the wrong device. One ``get_device`` call when the devices agree."""
    @functools.wraps(fn)
    def guarded(*args, **kwargs):
        index = args[0].get_device()
        if index >= 0 and index != torch.cuda.current_device():
            with torch.cuda.device(index):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)
    return guarded


class _EagerCustomOp:
    __slots__ = ("op", "fn", "__doc__")

    def __init__(self, op, fn):
        self.op, self.fn, self.__doc__ = op, fn, fn.__doc__

    def __call__(self, *args, **kwargs):
        if torch.is_grad_enabled() or tracing():
            return self.op(*args, **kwargs)
        return self.fn(*args, **kwargs)

    def register_fake(self, fake):
        return self.op.register_fake(fake)


def tracing() -> bool:
    """Whether ``torch.compile`` or a tracing dispatch mode (``make_fx``, fake tensors, non-strict export)
    is running: tensors may then hold no values to read on the host."""
    return torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None


def table_cache(maxsize: int):
    """``functools.lru_cache`` for device tables every later call shares, built outside inference mode: a
    table made by a first call under ``torch.inference_mode()`` would be an inference tensor, which a
    later training step cannot save for its backward. Under a tracing mode (fake tensors, ``make_fx``)
    the table is built and not cached: a fake tensor kept would be handed to every later real call."""
    def wrap(build):
        def fresh(*args):
            with torch.inference_mode(False), torch.no_grad():
                return build(*args)

        cached = functools.lru_cache(maxsize=maxsize)(fresh)

        @functools.wraps(build)
        def table(*args):
            return fresh(*args) if _get_current_dispatch_mode() is not None else cached(*args)
        table.cache_clear, table.cache_info = cached.cache_clear, cached.cache_info
        return table
    return wrap


@table_cache(maxsize=64)
def _tile_table(offsets: tuple[int, ...], block: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    seg, row = [], []
    for s in range(len(offsets) - 1):
        for r in range(offsets[s], offsets[s + 1], block):
            seg.append(s)
            row.append(r)
    tiles = torch.tensor([seg, row], dtype=torch.int32).to(device)
    return tiles[0], tiles[1]


def tile_table(offsets, block: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat table of every ``block``-row tile of every segment (or sequence) of a packed batch:
    int32 ``(segment id, first row)`` per tile on ``device``; empty segments get none. ``offsets``:
    the host values of ``seg_offsets`` / ``cu_seqlens``. Cached per (table, block, device): every
    layer of a step reuses it, and a copy from host memory per call would make each launch wait for
    the GPU. Read-only."""
    return retain(_tile_table(tuple(offsets), block, torch.device(device)))


@table_cache(maxsize=64)
def _one_segment_table(n: int, device: torch.device) -> torch.Tensor:
    return remember_host_values(torch.tensor([0, n], dtype=torch.int32).to(device), [0, n])


def one_segment_table(n: int, device) -> torch.Tensor:
    """``seg_offsets`` ``[0, n]`` (int32, on ``device``): one segment of all ``n`` rows, for a
    segment-table kernel applied to a whole tensor. Cached per (n, device) like :func:`tile_table`
    (every layer reuses it; no host copy per call). Read-only."""
    return retain(_one_segment_table(n, torch.device(device)))


_RETAINERS: list[list] = []


@contextlib.contextmanager
def retain_cached_tables():
    """Collect, into the yielded list, every cached device table handed out inside the block (tile
    tables, one-segment tables): a CUDA graph recorded in the block reads their memory at every
    replay, but the caches may drop them later (LRU), so the graph's owner keeps this list alive."""
    kept: list = []
    _RETAINERS.append(kept)
    try:
        yield kept
    finally:
        _RETAINERS.remove(kept)


def retain(tables):
    """``tables`` (a tensor or a tuple of them), added to every active :func:`retain_cached_tables` list."""
    for kept in _RETAINERS:
        kept.append(tables)
    return tables


INTERPRETER_SMS = 4  # "SM count" under the interpreter: small, so split / multi-program paths run on CPU


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached); ``INTERPRETER_SMS`` elsewhere."""
    if device.type != "cuda":
        return INTERPRETER_SMS
    return _cuda_properties(device).multi_processor_count


def _cuda_properties(device: torch.device):
    return _cuda_properties_of(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_properties_of(index: int):
    """``torch.cuda.get_device_properties`` once per device: launchers ask on every call."""
    return torch.cuda.get_device_properties(index)


def tma_compatible(*tensors: torch.Tensor) -> bool:
    """Whether every (2-D) tensor can be read through a TMA descriptor: 16-bit (the fp32 paths keep
    their exact pointer kernels), rows contiguous, 16-byte aligned base and row stride (the copy
    engine's requirements), on a Hopper or newer GPU (or under the interpreter, which emulates it)."""
    if TensorDescriptor is None:
        return False
    for t in tensors:
        if t.dim() != 2 or t.dtype not in (torch.float16, torch.bfloat16) or t.stride(1) != 1:
            return False
        if t.data_ptr() % 16 or t.stride(0) * t.element_size() % 16:
            return False
        if t.device.type == "cuda" and _cuda_properties(t.device).major < 9:
            return False
    return True


def pick_fastest(choices: dict, key, candidates: dict, what: str, device: torch.device, repeats: int = 3) -> str:
    """Like an autotuner for whole code paths: the first time ``key`` is seen, run every candidate
    (``name -> zero-argument callable``) once untimed (compiles, autotuning), then ``repeats`` timed
    runs (CUDA events on a GPU, wall clock elsewhere), and remember the fastest in ``choices[key]``
    (logged once with the timings). Returns the chosen name."""
    if key not in choices:
        times = {}
        for name, fn in candidates.items():
            fn()
            best = float("inf")
            for _ in range(repeats):
                if device.type == "cuda":
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    fn()
                    end.record()
                    end.synchronize()
                    best = min(best, start.elapsed_time(end))
                else:
                    t0 = time.perf_counter()
                    fn()
                    best = min(best, (time.perf_counter() - t0) * 1e3)
            times[name] = best
        choices[key] = min(times, key=times.get)
        log_once(f"{what} for {key}: {choices[key]} ({', '.join(f'{k} {t:.3f} ms' for k, t in times.items())})")
    return choices[key]


def log_once(message: str) -> None:
    """Log ``message`` at WARNING level the first time it is seen (e.g. which path an op takes); nothing
    while ``torch.compile`` traces (Dynamo cannot trace a logger call: a fallback would break the graph)."""
    if not torch.compiler.is_compiling():
        _log_once(message)


@functools.lru_cache(maxsize=None)
def _log_once(message: str) -> None:
    logger.warning(message)


def remember_host_values(t: torch.Tensor, values) -> torch.Tensor:
    """Record on ``t`` the values it was built from, so :func:`host_list` needs no device sync.

    For small metadata tensors (cu_seqlens, segment tables) that the packer builds from Python lists
    and the kernels' launchers read back on the host every layer. Tied to ``t._version``: an
    in-place change of ``t`` invalidates the record (an inference tensor, made under
    ``torch.inference_mode()``, has no version counter: its record holds until it is replaced)."""
    t._univigu_host = (_version(t), tuple(int(v) for v in values))
    return t


def _version(t: torch.Tensor):
    return None if t.is_inference() else t._version


def host_list(t: torch.Tensor) -> list[int]:
    """``t.tolist()`` of a small 1-D integer tensor, without a device sync when the values were
    recorded with :func:`remember_host_values` (and ``t`` is unchanged since)."""
    rec = getattr(t, "_univigu_host", None)
    if rec is not None and rec[0] == _version(t):
        return list(rec[1])
    return t.tolist()


def host_to_device(t: torch.Tensor, device) -> torch.Tensor:
    """``t.to(device)`` for a small host tensor (a timestep, random numbers) without a stream sync on
    CUDA: a plain copy from pageable memory waits until the GPU has run all queued work, so the host
    cannot run ahead of it; staging in pinned memory and copying asynchronously does not wait (the
    pinned block is not reused before the copy has run). Elsewhere, and under ``torch.compile``, ``t.to(device)``."""
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu" or torch.compiler.is_compiling():
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def describe(t) -> str:
    """``"<dtype> <shape>"`` of a tensor (or the type name of anything else) for error messages."""
    return f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}"


def check_eps(eps) -> None:
    """A norm's ``eps``: a finite number >= 0 (NaN or inf gave all-NaN outputs, a negative one NaN rows)."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0 <= eps < math.inf:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")


def check_devices(x: torch.Tensor, **tensors) -> None:
    """Each named tensor (None skipped) on ``x``'s device; a mix would otherwise fail inside the reference
    op with an error that names no argument."""
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor or None, got {type(t).__name__}")
        if t.device != x.device:
            raise ValueError(f"{name} ({t.device}) must be on x's device ({x.device})")


def check_contiguous(t: torch.Tensor, name: str) -> None:
    """Tables the kernels index through a raw pointer (offsets, cu_seqlens, RoPE masks) must be
    contiguous: a strided view would be read as if it were not."""
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {tuple(t.stride())} for shape {tuple(t.shape)} "
                         "(pass .contiguous())")


def check_offsets_tensor(seg_offsets) -> int:
    """Cheap check (dtype, shape, layout; no host sync) of a ``seg_offsets`` argument: a contiguous
    1-D int32 tensor of ``S+1 >= 2`` offsets, else ``TypeError`` / ``ValueError``. Returns ``S``. The
    values are not checked (see :func:`check_segment_table` for that)."""
    if not isinstance(seg_offsets, torch.Tensor) or seg_offsets.dtype != torch.int32 or seg_offsets.dim() != 1 \
            or seg_offsets.numel() < 2:
        raise TypeError(f"seg_offsets must be a 1-D int32 tensor of S+1 >= 2 offsets, got {describe(seg_offsets)}")
    check_contiguous(seg_offsets, "seg_offsets")
    return seg_offsets.numel() - 1


def check_segment_table(seg_offsets: torch.Tensor, total: int, name: str = "seg_offsets") -> list[int]:
    """Validate a packed segment table and return it as a Python list.

    ``seg_offsets`` is int32 ``(S+1,)``: 0 first, ``total`` last, non-decreasing (empty segments
    allowed). Raises ``TypeError``/``ValueError`` naming ``name`` otherwise.
    """
    if not isinstance(seg_offsets, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(seg_offsets).__name__}")
    if seg_offsets.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {seg_offsets.dtype}")
    if seg_offsets.dim() != 1 or seg_offsets.numel() < 2:
        raise ValueError(f"{name} must be 1-D with at least 2 entries, got shape {tuple(seg_offsets.shape)}")
    check_contiguous(seg_offsets, name)
    offsets = host_list(seg_offsets)
    if offsets[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {offsets[0]}")
    if offsets[-1] != total:
        raise ValueError(f"{name}[-1] must equal the number of tokens {total}, got {offsets[-1]}")
    if any(b < a for a, b in zip(offsets[:-1], offsets[1:])):
        raise ValueError(f"{name} must be non-decreasing, got {offsets}")
    return offsets


def check_segments(seg_offsets, total: int, device: torch.device, name: str = "seg_offsets") -> list[int] | None:
    """What a segment-table kernel checks before it launches: ``seg_offsets`` on ``device`` (the data's),
    its structure and, except under ``torch.compile`` (a sync would break the graph), its values as
    :func:`check_segment_table` does: a wrong table would make a kernel skip or overrun rows. The
    values are read on the host: no device sync for the packer's tables, which remember them
    (:func:`remember_host_values`); one sync for a table made elsewhere. Returns them (None when
    compiling)."""
    if isinstance(seg_offsets, torch.Tensor) and seg_offsets.device != torch.device(device):
        raise ValueError(f"{name} must be on the data's device {device}, got {seg_offsets.device}")
    if torch.compiler.is_compiling():
        check_offsets_tensor(seg_offsets)
        return None
    return check_segment_table(seg_offsets, total, name)


def segment_lengths(seg_offsets: torch.Tensor) -> torch.Tensor:
    """``(S+1,)`` offsets -> ``(S,)`` int64 lengths."""
    return (seg_offsets[1:] - seg_offsets[:-1]).long()


def expand_segments(values: torch.Tensor, seg_offsets: torch.Tensor) -> torch.Tensor:
    """Per-segment rows ``values (S, ...)`` -> per-token rows ``(T, ...)`` (segment i repeated len_i times)."""
    return torch.repeat_interleave(values, segment_lengths(seg_offsets).to(values.device), dim=0,
                                   output_size=host_list(seg_offsets)[-1])


def token_segments(seg_offsets: torch.Tensor, total: int) -> torch.Tensor:
    """int32 ``(total,)`` segment id of every packed row (no host sync: searchsorted on the device)."""
    rows = torch.arange(total, device=seg_offsets.device, dtype=seg_offsets.dtype)
    return torch.searchsorted(seg_offsets[1:].contiguous(), rows, right=True).to(torch.int32)


def segment_sum(values: torch.Tensor, seg_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Sum rows ``values (T, D)`` into ``(num_segments, D)`` by per-row segment id."""
    out = values.new_zeros((num_segments, values.shape[-1]))
    return out.index_add_(0, seg_ids.long(), values)
