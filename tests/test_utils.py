"""kernels/_utils: host-side launch arithmetic and the custom-op wrapper's direct eager path."""
import pytest
import torch
import triton
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._python_dispatch import TorchDispatchMode

from univigu_fast.kernels._utils import _EagerCustomOp, cdiv, custom_op, next_power_of_2


class _OpNames(TorchDispatchMode):
    """Records the name of every op that reaches the dispatcher's Python mode."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


class _CountOpCalls:
    """Counts the calls that go through the registered op of every ``custom_op`` wrapper in ``modules``."""

    def __init__(self, monkeypatch, *modules):
        self.n = 0
        for mod in modules:
            for name, obj in vars(mod).items():
                if isinstance(obj, _EagerCustomOp):
                    monkeypatch.setattr(obj, "op", self._counted(obj.op))

    def _counted(self, op):
        def call(*args, **kwargs):
            self.n += 1
            return op(*args, **kwargs)
        return call


def test_host_arithmetic_matches_triton():
    for n in list(range(1, 300)) + [4095, 4096, 4097, 33016, 256384]:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for b in (1, 7, 64, 128):
            assert cdiv(n, b) == triton.cdiv(n, b), (n, b)


calls = []


@custom_op("univigu_fast_test::scaled")
def _scaled(x: torch.Tensor, factor: float) -> torch.Tensor:
    calls.append(factor)
    return x * factor


@_scaled.register_fake
def _(x, factor):
    return torch.empty_like(x)


torch.library.register_autograd("univigu_fast_test::scaled", lambda ctx, g: (g * ctx.factor, None),
                                setup_context=lambda ctx, inputs, output: setattr(ctx, "factor", inputs[1]))


def test_custom_op_runs_directly_without_autograd_and_through_the_op_otherwise():
    x = torch.randn(5, requires_grad=True)
    with torch.no_grad():  # inference: the launcher itself, no dispatcher
        y = _scaled(x, factor=3.0)
    assert calls[-1] == 3.0
    torch.testing.assert_close(y, x.detach() * 3.0)
    with torch.no_grad(), _OpNames() as mode:  # a tracing / dispatch mode must see the op, not its insides
        _scaled(x, 5.0)
    assert "univigu_fast_test.scaled.default" in mode.names
    with _OpNames() as mode:  # autograd on: the registered op, so its backward is found
        y = _scaled(x, 2.0)
    assert mode.names == ["univigu_fast_test.scaled.default"]
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.full((5,), 2.0))
    with torch.no_grad():  # make_fx traces one node for the op
        gm = make_fx(lambda t: _scaled(t, 6.0))(torch.ones(2))
    assert "univigu_fast_test.scaled" in gm.code


def test_custom_op_is_one_node_under_compile():
    f = torch.compile(lambda x: _scaled(x, 4.0) + 1, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(f(torch.ones(3)), torch.full((3,), 5.0))


@pytest.mark.usefixtures("one_thread")
def test_fast_text_step_makes_no_dispatcher_round_trips(monkeypatch):
    """A text-only step of the video cache (inference) calls every kernel launcher directly: none of
    the ~300 launches per step pays the custom-op dispatch (bench/cpu_text_step_host.py: the host
    time of a 30-layer text step). The full step with gradients does go through the ops."""
    from _models import tiny_reference
    from univigu_fast.kernels import (gated_residual, joint_attention, linear_argmax, modality_ffn,
                                      modulated_layer_norm, rms_norm)
    from univigu_fast.model import UniViGUModel
    from univigu_fast.video_cache import VideoCache

    counter = _CountOpCalls(monkeypatch, gated_residual, joint_attention, linear_argmax, modality_ffn,
                            modulated_layer_norm, rms_norm)
    ref = tiny_reference(seed=1)
    model = UniViGUModel(ref.config).eval()
    model.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(0)
    videos = [torch.randn(ref.config.in_channels, 1, 4, 4, generator=g)]
    prompts = [torch.randn(3, ref.config.text_dim, generator=g)]
    text = [torch.randint(0, ref.config.vocab_size, (5,), generator=g)]
    with torch.no_grad():
        cache = VideoCache(model)
        model(videos, torch.ones(1), prompts, text=text, tau_text=torch.tensor([0.2]), video_cache=cache)
        out = model.text_step(cache, text, torch.tensor([0.5]), text_output="sample", sample_seed=1)
    assert counter.n == 0 and out.ids[0].shape == (5,)
    model(videos, torch.ones(1), prompts, text=text, tau_text=torch.tensor([0.2]))  # autograd on
    assert counter.n > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter fallback: CPU tensors under TRITON_INTERPRET=1")
def test_broken_interpreter_falls_back_to_the_references_and_says_why(monkeypatch, caplog):
    """Where the probe kernel fails (as Triton 3.6's interpreter does with NumPy >= 2.3), CPU tensors take
    the references, the model names the reason, and it is logged; a working probe restores the kernels."""
    from univigu_fast import UniViGUConfig, UniViGUModel
    from univigu_fast.kernels import _utils
    from univigu_fast.kernels.rms_norm import rms_norm, rms_norm_reference

    def broken(*args, **kwargs):
        raise TypeError("only 0-dimensional arrays can be converted to Python scalars")

    x, w = torch.randn(5, 24), torch.randn(24)
    assert _utils.interpreter_problem() is None and _utils.interpreting() and _utils.use_triton(x)
    monkeypatch.setattr(_utils, "_interpreter_probe_kernel", {(2,): broken})
    with caplog.at_level("WARNING", logger="univigu_fast"):
        problem = _utils._probe_interpreter()
    assert "only 0-dimensional arrays" in problem and "triton==3.8.0" in problem
    assert problem in caplog.text
    monkeypatch.setattr(_utils, "_INTERPRETER_PROBLEM", problem)
    assert _utils.interpreter_problem() == problem
    assert not _utils.interpreting() and not _utils.use_triton(x)
    assert problem in UniViGUModel(UniViGUConfig.tiny()).kernel_path()
    torch.testing.assert_close(rms_norm(x, w), rms_norm_reference(x, w), rtol=0, atol=0)
    monkeypatch.undo()
    assert _utils._probe_interpreter() is None and _utils.use_triton(x)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's bf16 rule concerns CPU tensors")
def test_interpreter_sends_bf16_to_the_references(caplog):
    """Triton's interpreter computes bf16 ``tl.dot`` wrongly (DESIGN §7): bf16 CPU tensors take the
    references, with a log line, instead of returning wrong numbers; fp32 / fp16 keep the kernels."""
    from univigu_fast.kernels import _utils
    from univigu_fast.kernels.modality_ffn import modality_ffn, modality_ffn_reference

    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 32, generator=g)
    experts = [(torch.randn(48, 32, generator=g), torch.randn(48, generator=g), torch.randn(32, 48, generator=g),
                torch.randn(32, generator=g)) for _ in range(2)]
    seg, seg_expert = torch.tensor([0, 30, 40], dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32)
    assert _utils.use_triton(x) and _utils.use_triton(x.half())
    _utils._log_once.cache_clear()  # (an earlier test may have logged the line already)
    with caplog.at_level("WARNING", logger="univigu_fast"):
        assert not _utils.use_triton(x.bfloat16())
    assert "bfloat16" in caplog.text
    xb, eb = x.bfloat16(), [tuple(t.bfloat16() for t in e) for e in experts]
    torch.testing.assert_close(modality_ffn(xb, seg, seg_expert, eb),
                               modality_ffn_reference(xb, seg, seg_expert, eb), atol=0, rtol=0)


def test_reference_fallbacks_trace_with_fullgraph():
    """A fallback logs which path runs; under torch.compile(fullgraph=True) that log must not break the
    graph (Dynamo cannot trace a logger call)."""
    import torch._dynamo

    from univigu_fast.kernels.rms_norm import rms_norm, rms_norm_reference
    from univigu_fast.ops import FAST_OPS

    w = torch.linspace(0.5, 1.5, 8)
    for fn, x in ((lambda x: rms_norm(x, w.bfloat16()), torch.randn(4, 8, dtype=torch.bfloat16)),  # bf16 on CPU
                  (lambda x: FAST_OPS.rms_norm(x, w.double(), 1e-6), torch.randn(4, 8, dtype=torch.float64))):
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(fn, fullgraph=True, backend="eager")(x),
                                   rms_norm_reference(x, w.to(x.dtype), 1e-6))


def test_launchers_make_the_inputs_cuda_device_current(monkeypatch):
    """Triton launches on the current CUDA device: a launcher whose first argument lives on another
    device enters that device for the call (emulated: no GPU here), and does nothing when they agree."""
    import contextlib

    from univigu_fast.kernels._utils import on_input_device

    entered = []

    @contextlib.contextmanager
    def device(index):
        entered.append(index)
        yield

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", device)
    launcher = on_input_device(lambda x, *, scale: x * scale)
    x = torch.ones(2)
    assert torch.equal(launcher(x, scale=2.0), torch.full((2,), 2.0)) and entered == []  # CPU: untouched
    monkeypatch.setattr(torch.Tensor, "get_device", lambda self: 1)
    assert torch.equal(launcher(x, scale=3.0), torch.full((2,), 3.0)) and entered == [1]
    monkeypatch.setattr(torch.Tensor, "get_device", lambda self: 0)
    launcher(x, scale=1.0)
    assert entered == [1]


def test_tables_built_under_fake_tensors_are_not_cached():
    """A first call under a tracing mode (fake tensors: torch.compile / export of a caller) cached a
    FakeTensor that every later real call got back."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    from univigu_fast import packing
    from univigu_fast.kernels import _utils

    offsets, n, grid = (0, 7, 19, 23), 29, (1, 3, 29)  # shapes no other test uses
    cpu = torch.device("cpu")
    with FakeTensorMode():
        fake = (_utils.tile_table(offsets, 4, cpu)[0], _utils.one_segment_table(n, cpu),
                packing._video_rope(grid, 8, cpu)[0])
    assert all(isinstance(t, FakeTensor) for t in fake)
    seg, row = _utils.tile_table(offsets, 4, cpu)
    one = _utils.one_segment_table(n, cpu)
    cos, sin = packing._video_rope(grid, 8, cpu)
    assert not any(isinstance(t, FakeTensor) for t in (seg, row, one, cos, sin))
    assert seg.tolist() == [0, 0, 1, 1, 1, 2] and row.tolist() == [0, 4, 7, 11, 15, 19] and one.tolist() == [0, n]
    assert cos.shape == (87, 4) and torch.equal(cos, packing._video_angles(grid, 8).cos().float())
