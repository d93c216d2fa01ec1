"""moeify.capture.trace beyond plain fx: modes, **kwargs, opaque children, re-wrapped forwards."""

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moeify
from moeify import capture
from moeify.errors import CaptureError, ExampleInputsError, NoFFNRegionError, TracedPathError
from moeify.passes import ops

CFG = moeify.MoEConfig(num_experts=4, top_k=2)


class ResidualFFN(nn.Module):
    """x + dropout(fc2(gelu(fc1(x)))), the dropout written functionally with the module's mode."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.fc1, self.fc2, self.p = nn.Linear(8, 32), nn.Linear(32, 8), p

    def forward(self, x):
        return x + F.dropout(self.fc2(F.gelu(self.fc1(x))), p=self.p, training=self.training)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_functional_dropout_follows_the_mode_it_runs_in(mode):
    """Traced in one mode, the dropout still drops in training and passes in eval: with the same seed
    the converted model draws the same mask as the dense one."""
    torch.manual_seed(0)
    dense = ResidualFFN().train(mode == "train")
    converted = moeify.convert(dense, CFG, example_inputs=(torch.randn(4, 8),)).model
    x = torch.randn(16, 8)
    for training in (True, False):
        dense.train(training), converted.train(training)
        torch.manual_seed(1)
        want = dense(x)
        torch.manual_seed(1)
        got = converted(x)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    converted.train()
    assert not torch.equal(converted(x), converted(x))  # the mask is drawn every call


def test_a_constant_chosen_by_the_mode_is_chosen_when_the_forward_runs():
    class ModeScaled(ResidualFFN):
        def forward(self, x):
            return self.fc2(F.gelu(self.fc1(x))) * (2.0 if self.training else 0.5)

    module = ModeScaled().eval()
    gm = capture.trace(module)
    selects = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is ops.by_training]
    assert len(selects) == 1 and selects[0].args[1:] == (2.0, 0.5)
    x = torch.randn(3, 8)
    for training in (True, False):
        module.train(training), gm.train(training)
        torch.testing.assert_close(gm(x), module(x))


def test_a_forward_that_branches_on_the_mode_is_refused_and_its_children_converted():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ffn = ResidualFFN(p=0.0)

        def forward(self, x):
            if self.training:
                x = x * 2
            return self.ffn(x)

    with pytest.raises(CaptureError, match="different paths in training and in eval"):
        capture.trace(Branchy())
    dense = Branchy().eval()
    result = moeify.convert(dense, CFG, example_inputs=(torch.randn(4, 8),))
    assert [r.owner for r in result.report.regions] == ["ffn"]
    x = torch.randn(5, 8)
    dense.train(), result.model.train()
    torch.testing.assert_close(result.model(x), dense(x), atol=1e-5, rtol=1e-5)


class KwargsFFN(ResidualFFN):
    def forward(self, x, scale: float = 1.0, **kwargs):
        return x + self.fc2(F.gelu(self.fc1(x))) * scale


def test_kwargs_the_forward_ignores_are_ignored_after_conversion_too():
    dense = KwargsFFN().eval()
    model = moeify.convert(dense, CFG, example_inputs=(torch.randn(4, 8),)).model
    x = torch.randn(3, 8)
    torch.testing.assert_close(model(x, scale=0.5, extra=1), dense(x, scale=0.5, extra=1), atol=1e-5, rtol=1e-5)


class DataDependent(nn.Module):
    """A child fx cannot trace through: its branch depends on the data."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        y = self.proj(x)
        return (y if y.sum() > 0 else -y), y.mean()


class InlineLayer(nn.Module):
    """OPT-style: the layer holds fc1 and fc2 itself and calls an untraceable child before them."""

    def __init__(self) -> None:
        super().__init__()
        self.mix, self.fc1, self.fc2 = DataDependent(), nn.Linear(8, 32), nn.Linear(32, 8)

    def forward(self, x):
        h, _ = self.mix(x)
        return h + self.fc2(F.relu(self.fc1(h)))


def test_an_untraceable_child_of_a_layer_holding_the_ffn_is_called_opaque():
    gm = capture.trace(InlineLayer())
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert calls == ["mix", "fc1", "fc2"]  # mix is one opaque call; fx did not go inside it
    torch.manual_seed(0)
    dense = InlineLayer().eval()
    result = moeify.convert(dense, CFG, example_inputs=(torch.randn(4, 8),))
    assert [r.linears for r in result.report.regions] == [["fc1", "fc2"]]
    for sign in (1.0, -1.0):  # both branches of the opaque child still run
        x = sign * torch.randn(6, 8).abs()
        torch.testing.assert_close(result.model(x), dense(x), atol=1e-5, rtol=1e-5)


def test_a_module_without_its_own_linears_is_not_traced_around_a_failing_child():
    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mix, self.fc = DataDependent(), nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(self.mix(x)[0])

    with pytest.raises(Exception, match="control flow"):
        capture.trace(Holder())


class CheckpointedBase(nn.Module):
    """Like transformers' GradientCheckpointingLayer: every subclass's forward gets the same wrapper."""

    calls = 0

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        forward = cls.forward

        @functools.wraps(forward)
        def wrapped(self, *args, **kwargs):
            CheckpointedBase.calls += 1
            return forward(self, *args, **kwargs)

        cls.forward = wrapped


class WrappedLayer(CheckpointedBase, InlineLayer):
    def forward(self, x, scale=2.0, **kwargs):
        h, _ = self.mix(x * scale)
        return h + self.fc2(F.relu(self.fc1(h)))


def test_a_forward_wrapped_for_every_subclass_is_traced_inside_and_keeps_its_wrapper():
    torch.manual_seed(0)
    dense = WrappedLayer().eval()
    model = moeify.convert(dense, CFG, example_inputs=(torch.randn(4, 8),)).model
    assert type(model).forward.__wrapped__ is not WrappedLayer.forward.__wrapped__  # the rewritten forward ...
    before = CheckpointedBase.calls
    x = torch.randn(5, 8).abs()
    torch.testing.assert_close(model(x, scale=3.0), dense(x, scale=3.0), atol=1e-5, rtol=1e-5)
    assert CheckpointedBase.calls == before + 2  # ... runs inside the same wrapper as the dense one


def _renamed_layers():
    """Layers whose forward (with **kwargs) transformers' deprecate_kwarg wraps, alone and under a
    GradientCheckpointingLayer-style wrapper, as transformers 5.24 does for OPT, BART, Whisper, BioGPT
    and XGLM: the layers did not trace ("not subscriptable"), and those models were left dense."""
    from transformers.utils.deprecation import deprecate_kwarg

    class Renamed(InlineLayer):
        @deprecate_kwarg("past", version="99.0", new_name="cache")
        def forward(self, x, cache=None, **kwargs):  # (OPT's: **kwargs handed to attention)
            h, _ = self.mix(x if cache is None else x + cache)
            return h + self.fc2(F.relu(self.fc1(h)))

    class CheckpointedRenamed(CheckpointedBase, Renamed):
        pass

    return Renamed, CheckpointedRenamed


@pytest.mark.parametrize("which", [0, 1], ids=["renamed", "checkpointed-renamed"])
def test_a_forward_behind_a_keyword_renaming_wrapper_is_traced(which):
    torch.manual_seed(0)
    dense = _renamed_layers()[which]().eval()
    x, cache = torch.randn(4, 8), torch.randn(4, 8)
    result = moeify.convert(dense, CFG, example_inputs=(x,), example_kwargs={"cache": cache})
    assert len(result.report.regions) == 1, result.report
    y = torch.randn(5, 8)
    with torch.no_grad():
        torch.testing.assert_close(result.model(y, cache=y), dense(y, cache=y), atol=1e-5, rtol=1e-5)


class StatefulMix(DataDependent):
    def forward(self, x, state=None):
        y = self.proj(x) if state is None else self.proj(x) + state
        return (y if y.sum() > 0 else -y), y.mean()


class OptionalArgs(nn.Module):
    """`mask` changes the computation when given; `state` is only handed on to an opaque child."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 8)
        self.mix = StatefulMix()

    def forward(self, x, mask=None, state=None):
        if mask is not None:
            x = x * mask
        h, _ = self.mix(x, state=state)
        return self.fc2(F.relu(self.fc1(h)))


def _checks(gm):
    """(input, traced given) of each check the rewritten forward makes on an optional input."""
    return [(n.args[1], n.args[3]) for n in gm.graph.nodes if n.target is capture.require_as_traced]


def test_an_optional_argument_the_forward_branches_on_must_be_given_after_conversion():
    """fx traces `mask is not None` as always true: the rewritten forward then requires `mask` (a clear
    error instead of a wrong result), and leaves `state`, whose None only flows on, optional."""
    gm = capture.trace(OptionalArgs())
    assert _checks(gm) == [("mask", True)]
    torch.manual_seed(0)
    dense = OptionalArgs().eval()
    x, mask, state = torch.randn(4, 8).abs(), torch.rand(4, 8), torch.rand(4, 8)
    model = moeify.convert(dense, CFG, example_inputs=(x, mask, state)).model
    for s in (state, None):
        torch.testing.assert_close(model(x, mask, s), dense(x, mask, s), atol=1e-5, rtol=1e-5)
    with pytest.raises(TracedPathError, match="with `mask` given.*pass `mask`"):
        model(x, None, state)


def test_an_optional_argument_the_forward_cannot_run_without_is_guarded():
    class NeedsState(OptionalArgs):
        def forward(self, x, mask=None, state=None):
            h, _ = self.mix(x + state.flip(0))  # state.flip fails on None while tracing
            return self.fc2(F.relu(self.fc1(h)))

    gm = capture.trace(NeedsState())
    assert _checks(gm) == [("state", True)]


class KwargsChild(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x, shift=None, **kwargs):
        return self.proj(x) if shift is None else self.proj(x) + shift


class HandsOnKwargs(nn.Module):
    """HF-style: the layer hands its **kwargs to a child (BART's encoder layer and its attention)."""

    def __init__(self) -> None:
        super().__init__()
        self.child, self.fc1, self.fc2 = KwargsChild(), nn.Linear(8, 32), nn.Linear(32, 8)

    def forward(self, x, **kwargs):
        h = self.child(x, **kwargs)
        return h + self.fc2(F.gelu(self.fc1(h)))


def test_kwargs_handed_on_reach_the_same_child_after_conversion():
    torch.manual_seed(0)
    dense = HandsOnKwargs().eval()
    model = moeify.convert(dense, CFG, example_inputs=(torch.randn(4, 8),)).model
    x, shift = torch.randn(3, 8), torch.randn(3, 8)
    want = dense(x, shift=shift)
    assert not torch.allclose(want, dense(x))  # the kwarg matters
    torch.testing.assert_close(model(x, shift=shift), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(x), dense(x), atol=1e-5, rtol=1e-5)


def test_a_forward_that_reads_its_kwargs_does_not_trace():
    class ReadsKwargs(HandsOnKwargs):
        def forward(self, x, **kwargs):
            h = self.child(x) * (2.0 if kwargs.get("double") else 1.0)
            return h + self.fc2(F.gelu(self.fc1(h)))

    with pytest.raises(CaptureError, match="reads its \\*\\*kwargs"):
        capture.trace(ReadsKwargs())


class Fp16Clamp(ResidualFFN):
    """BART's and Whisper's guard: clamp only in float16."""

    def forward(self, x):
        y = x + self.fc2(F.gelu(self.fc1(x)))
        if y.dtype == torch.float16 and not torch.isfinite(y).all():
            y = torch.clamp(y, -1000.0, 1000.0)
        return y


def test_a_dtype_test_is_answered_for_the_parameters_and_checked_when_run():
    torch.manual_seed(0)
    dense = Fp16Clamp().eval()
    model = moeify.convert(dense, CFG, example_inputs=(torch.randn(4, 8),)).model
    x = torch.randn(3, 8)
    torch.testing.assert_close(model(x), dense(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(TracedPathError, match="`add.dtype == torch.float16` is False"):
        model.half()(x.half())


class CrossOptional(nn.Module):
    """XGLM-like: `memory` is read through a module that exists only in the cross-attending variant."""

    def __init__(self, cross: bool) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 8)
        if cross:
            self.cross = nn.Linear(8, 8)

    def forward(self, x, memory=None):
        if memory is not None:
            x = x + self.cross(memory)
        return x + self.fc2(F.relu(self.fc1(x)))


def test_an_input_the_example_leaves_none_is_traced_none(tmp_path):
    """Traced as given, the variant without `cross` fails (no such module): nothing converts. With
    example inputs that leave `memory` None it is traced None, and the saved plan records that."""
    torch.manual_seed(0)
    dense = CrossOptional(cross=False).eval()
    with pytest.raises(NoFFNRegionError):
        moeify.convert(dense, CFG)
    x = torch.randn(4, 8)
    result = moeify.convert(dense, CFG, example_inputs=(x,))
    assert result.none_inputs == {"": frozenset({"memory"})}
    assert _checks(result.model._moeify_graph_module) == [("memory", False)]
    torch.testing.assert_close(result.model(x), dense(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(TracedPathError, match="with `memory` None.*pass `memory`"):
        result.model(x, memory=x)
    moeify.save(result, tmp_path / "saved")
    loaded = moeify.load(tmp_path / "saved", model=CrossOptional(cross=False).eval()).model
    torch.testing.assert_close(loaded(x), result.model(x))


def test_an_input_traced_none_is_checked_only_where_given_differs():
    torch.manual_seed(0)
    dense = CrossOptional(cross=True).eval()
    x = torch.randn(4, 8)
    model = moeify.convert(dense, CFG, example_inputs=(x,)).model
    assert _checks(model._moeify_graph_module) == [("memory", False)]  # given, it adds cross(memory)
    torch.testing.assert_close(model(x), dense(x), atol=1e-5, rtol=1e-5)
    given = moeify.convert(dense, CFG, example_inputs=(x, x)).model  # an example passing it: traced given
    assert _checks(given._moeify_graph_module) == [("memory", True)]
    torch.testing.assert_close(given(x, x), dense(x, x), atol=1e-5, rtol=1e-5)


def test_an_input_the_example_leaves_none_that_only_flows_on_stays_an_input():
    """OPT's cache: None in the example, handed to attention when generating. Traced None it would be
    a constant None; it only flows on, so the given trace is kept and the input still reaches the child."""
    torch.manual_seed(0)
    dense = OptionalArgs().eval()
    x, mask, state = torch.randn(4, 8).abs(), torch.rand(4, 8), torch.rand(4, 8)
    result = moeify.convert(dense, CFG, example_inputs=(x, mask))
    assert result.none_inputs == {"": frozenset({"state"})}
    assert _checks(result.model._moeify_graph_module) == [("mask", True)]
    torch.testing.assert_close(result.model(x, mask, state), dense(x, mask, state), atol=1e-5, rtol=1e-5)


def test_example_inputs_the_model_cannot_run_are_refused_saying_so():
    with pytest.raises(ExampleInputsError, match="example inputs do not run on the dense .*fix example_inputs"):
        moeify.convert(CrossOptional(cross=False), CFG, example_inputs=(torch.randn(4, 5),))


class _Head(nn.Module):
    def __init__(self, tail=None) -> None:
        super().__init__()
        self.dense, self.tail = nn.Linear(4, 8), tail

    def forward(self, x):
        h = F.dropout(F.gelu(self.dense(x)), 0.1, self.training)
        return h if self.tail is None else self.tail(h)


@pytest.mark.parametrize(("head", "looks_like_one"), [
    (_Head(), True),  # dense -> act -> functional dropout (which reads the mode)
    (_Head(nn.Identity()), True),  # a parameter-free module after it
    (_Head(nn.LayerNorm(8)), False),  # a module with parameters after it: not a head
])
def test_a_split_head_is_recognised_on_its_own_trace(head, looks_like_one):
    assert capture._returns_activated_linear(capture.trace(head)) is looks_like_one
