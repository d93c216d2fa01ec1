"""Graph capture: trace the largest parts of a model that torch.fx can trace.

Whole Hugging Face models do not symbolic-trace (dynamic control flow, cache objects), but their
blocks and MLPs do. `capture_units` tries the whole model first and, where tracing fails, descends
into the children; every unit records how it was captured, and every failure why.

`trace` keeps what it traces true to the module whatever it is called with:

- constants that depend on `self.training` (`F.dropout(x, p, self.training)`): the module is
  traced in both modes and each such constant reads the mode when the forward runs;
- `if mask is not None:` on an optional input, which fx always answers "not None": an optional
  input is traced as given, or as None where the example inputs leave it None
  (`observe_none_inputs`). The module is traced again with each such input in the other case, and
  where that trace differs (or fails), the rewritten forward checks the input: `TracedPathError`
  when it comes in the case that was not traced.

A module that holds two Linears itself may have its FFN written inline (OPT's, BART's and
Whisper's layers: `fc2(act(fc1(x)))` in the layer's forward). For such a module, `trace` also
gets past what stops plain fx there, so the FFN can be found:

- a forward that a base class wraps for every subclass (transformers' gradient-checkpointing
  layers): the inner forward is traced; the class `install_forward` makes gets the same wrapper;
- a child that does not trace (attention) is called as it is, one opaque node, and tracing retries;
- `**kwargs` that the forward hands on (`self.self_attn(x, **kwargs)`): the rewritten forward takes
  `**kwargs` and hands them to the same calls (each such child is called as it is); a forward that
  reads them itself does not trace;
- `if x.dtype == torch.float16:` (BART's and Whisper's fp16 clamp): answered for the dtype of the
  module's parameters, and the rewritten forward checks the answer when it runs.

A module whose forward does not trace but wires an FFN split across two children (DeBERTa's and
MPNet's layers call `intermediate`, then `output`, with no helper method between) is traced for
analysis the same way, its untraceable children opaque, once per value of each flag input
(`trace_paths`, `capture_wired`); only the two halves are rewritten, never that forward.

`install_forward` puts a rewritten graph back on the *user's* module: the module keeps its class
(a subclass with the generated forward is swapped in, so `isinstance`, methods and attributes such
as `.generate()` or `.config` stay), its untouched parameters keep their names.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import operator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn

from moeify.errors import CaptureError, TracedPathError, one_line
from moeify.passes import ops

# children made opaque, one per failed attempt, before a module counts as untraceable
MAX_OPAQUE_CHILDREN = 8


class MoeifyTracer(fx.Tracer):
    """fx tracer whose leaves are torch.nn modules, HF Conv1D, nn.Linear subclasses that compute a
    Linear (Falcon's `FalconLinear`), parameter-free childless modules, and the `opaque` modules.

    Making parameter-free helper modules (activations, rotary caches, ...) opaque keeps tracing
    from failing inside them; they are still called as modules by the rewritten forward. When
    tracing fails inside a module, `failed_in` names the innermost one. `inline`: the root may hold
    an FFN inline (see the module docstring), so hand-on **kwargs and dtype tests are traced.
    """

    def __init__(self, linear_subclasses: frozenset[int] = frozenset(), opaque: frozenset[int] = frozenset(),
                 none_params: frozenset[str] = frozenset(), inline: bool = False,
                 flags: dict[str, bool] | None = None) -> None:
        super().__init__()
        # ids of the nn.Linear subclass instances that compute a Linear, probed before tracing (a probe
        # while tracing would see fx's proxies instead of the weights)
        self.linear_subclasses = linear_subclasses
        self.opaque = opaque
        self.none_params = none_params  # optional parameters traced as None instead of as inputs
        self.inline = inline
        self.flags = flags or {}  # flag parameters traced as these constants (`trace_paths`)
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if ops.is_conv1d(m) or id(m) in self.linear_subclasses or id(m) in self.opaque:
            return True
        if super().is_leaf_module(m, module_qualified_name):
            return True
        no_state = not any(True for _ in m.parameters(recurse=True)) and not any(True for _ in m.buffers())
        return no_state and not any(True for _ in m.children())

    def call_module(self, m: nn.Module, forward, args, kwargs):
        if KWARGS_KEY in kwargs:  # it is handed the forward's **kwargs: call it as it is, with them
            self.opaque = self.opaque | {id(m)}
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # the innermost module's handler runs first
                self.failed_in = self.path_of_module(m)
            raise

    def to_bool(self, obj: fx.Proxy) -> bool:
        """Answer a dtype test (`x.dtype == torch.float16`) for the parameters' dtype, checked at run time."""
        node = obj.node
        test = DTYPE_TESTS.get(node.target) if node.op == "call_function" and len(node.args) == 2 else None
        reads = [a for a in node.args if isinstance(a, fx.Node) and a.op == "call_function"
                 and a.target is getattr and a.args[1:] == ("dtype",)]
        dtypes = [a for a in node.args if isinstance(a, torch.dtype)]
        if not self.inline or test is None or len(reads) != 1 or len(dtypes) != 1:
            return super().to_bool(obj)
        (symbol, compare), tensor = test, reads[0].args[0]
        assumed = next((p.dtype for p in self.root.parameters() if p.is_floating_point()), torch.get_default_dtype())
        answer = compare(assumed, dtypes[0])
        text = f"{getattr(tensor, 'name', tensor)}.dtype {symbol} {dtypes[0]}"
        self.create_proxy("call_function", require_answer, (obj, answer, text, type(self.root).__name__), {})
        return answer

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        fn, args = super().create_args_for_root(root_fn, is_module, concrete_args)
        code = inspect.unwrap(root_fn).__code__
        if self.inline and code.co_flags & inspect.CO_VARKEYWORDS and isinstance(args[-1], fx.Proxy):
            args = [*args[:-1], _HandedOn({KWARGS_KEY: args[-1]})]
        for i, arg in enumerate(args):  # the parameter stays in the signature; the body sees the constant
            if isinstance(arg, fx.Proxy) and arg.node.op == "placeholder":
                if arg.node.target in self.none_params:
                    args[i] = None
                elif arg.node.target in self.flags:
                    args[i] = self.flags[arg.node.target]
        return fn, args


# While tracing, a forward's **kwargs is {KWARGS_KEY: its placeholder}: each call it is splatted into
# records the placeholder under this key, and `_hand_on_kwargs` turns that into a splat again.
KWARGS_KEY = "__moeify_kwargs__"


class _HandedOn(dict):
    """The traced **kwargs: `**` splats it (CPython merges a dict's entries directly), reading it fails."""

    def _read(self, *args, **kwargs):
        raise CaptureError("the forward reads its **kwargs; moeify traces a forward that only hands them on")

    __getitem__ = __contains__ = __len__ = get = keys = items = values = pop = setdefault = copy = _read


def call_with_kwargs(fn: Any, args: tuple, named: dict, kwargs: dict) -> Any:
    """`fn(*args, **named, **kwargs)`: a call the dense forward handed its **kwargs to."""
    return fn(*args, **named, **kwargs)


def _hand_on_kwargs(graph: fx.Graph) -> None:
    """Turn each call that recorded the **kwargs placeholder under KWARGS_KEY into a call_with_kwargs."""
    for node in list(graph.nodes):
        if node.op == "placeholder" and node.target.startswith("**"):
            for user in list(node.users):
                named = dict(user.kwargs)
                handed = named.pop(KWARGS_KEY, None) is node
                if not handed or any(a is node for a in pytree.tree_flatten((user.args, named))[0]):
                    raise CaptureError(f"the forward uses its **kwargs other than by handing them on ({user.name})")
                if user.op not in ("call_module", "call_function"):
                    raise CaptureError(f"the forward hands its **kwargs to a method call ({user.name})")
                with graph.inserting_before(user):
                    fn = graph.get_attr(user.target) if user.op == "call_module" else user.target
                    call = graph.call_function(call_with_kwargs, (fn, tuple(user.args), named, node))
                call.meta = dict(user.meta)
                user.replace_all_uses_with(call)
                graph.erase_node(user)


# the dtype tests `to_bool` answers: operator -> (how it reads, the test on two dtypes)
DTYPE_TESTS = {operator.eq: ("==", operator.eq), operator.ne: ("!=", operator.ne),
               operator.is_: ("is", operator.eq), operator.is_not: ("is not", operator.ne)}


@torch.fx.node.has_side_effect
def require_answer(value: bool, answer: bool, test: str, owner: str) -> bool:
    """Raise when a test the rewritten forward was traced with answers differently now (see `trace`)."""
    if bool(value) != answer:
        raise TracedPathError(f"{owner} was converted from a trace where `{test}` is {answer} (answered for the "
                              f"parameters' dtype at conversion), and now it is {not answer}; convert the model in "
                              "the dtype it runs in, or keep this module dense with MoEConfig(exclude=...)")
    return value


@torch.fx.node.has_side_effect
def require_as_traced(value: Any, name: str, owner: str, given: bool) -> Any:
    """Raise when an optional input is given (None) although the rewritten forward was traced with it
    None (given), and the dense forward does something else then (see `trace`)."""
    if (value is not None) != given:
        traced, now = ("given", "None") if given else ("None", "given")
        fix = (f"pass `{name}`" if given else f"convert with example inputs that pass `{name}`")
        raise TracedPathError(f"{owner} was converted from a trace with `{name}` {traced}, and its dense forward "
                              f"does something else when it is {now}; {fix}, or keep this module dense with "
                              "MoEConfig(exclude=...)")
    return value


def _forward_to_trace(cls: type):
    """The forward to trace in place of `cls.forward`, or None for `cls.forward` itself: the inner one
    when `cls` wraps every subclass's forward the same way (transformers' GradientCheckpointingLayer),
    and below that, or below `cls.forward`, the function a keyword-renaming wrapper calls
    (`_renames_keywords`). Tracing either is exact."""
    forward = cls.forward
    inner = getattr(forward, "__wrapped__", None)
    if inner is not None:
        probe = type(cls.__name__, (cls,), {"forward": inner})  # __init_subclass__ runs on the probe
        rewrapped = probe.forward is not inner and getattr(probe.forward, "__wrapped__", None) is inner
        if rewrapped and forward.__code__ is probe.forward.__code__:
            forward = inner
    while _renames_keywords(forward):
        forward = forward.__wrapped__
    return None if forward is cls.forward else forward


def _renames_keywords(fn: Any) -> bool:
    """Whether `fn` is transformers' `deprecate_kwarg` wrapper: (*args, **kwargs) that renames an old
    keyword to its new name and calls the function it wraps. Around a forward that takes **kwargs it
    does not trace (the forward's keywords reach it as one positional placeholder), and since
    transformers 5.24 it wraps the decoder layers of OPT, BART, Marian, M2M100, Whisper, BioGPT and
    XGLM (past_key_values -> cache), whose models call them by the new name. The converted layer
    takes the new name only."""
    code = getattr(fn, "__code__", None)
    return (getattr(fn, "__wrapped__", None) is not None and code is not None
            and code.co_filename.replace("\\", "/").endswith("transformers/utils/deprecation.py"))


def _view(module: nn.Module, forward) -> nn.Module:
    """A shallow copy of `module` whose class runs `forward`: it shares parameters and children and
    never mutates them (the user's module keeps its class and attributes)."""
    base = type(module)
    cls = type(base.__name__, (base,), {})
    cls.forward = forward  # set after creation: a base's __init_subclass__ would wrap it again
    view = base.__new__(cls)
    state = dict(module.__dict__)
    for key in ("_modules", "_parameters", "_buffers"):
        state[key] = dict(state[key])
    view.__dict__.update(state)
    return view


def _linear_children(module: nn.Module) -> int:
    return sum(isinstance(c, nn.Linear) or ops.is_conv1d(c) for c in module.children())


@dataclass
class _Attempt:
    inline: bool  # the module may hold an FFN inline (two Linear children), or wires one (`trace_paths`)
    none: frozenset[str]  # optional inputs traced as None (None in the example inputs)
    flags: dict[str, bool] = field(default_factory=dict)  # flag inputs traced as these constants
    opaque: set[int] = field(default_factory=set)  # ids of the children called as they are
    failed_in: str | None = None  # where the last trace failed: the innermost module


def _trace_graph(module: nn.Module, attempt: _Attempt, none: frozenset[str] | None = None,
                 ) -> tuple[MoeifyTracer, fx.Graph]:
    subclasses = (m for m in module.modules() if isinstance(m, nn.Linear) and type(m) is not nn.Linear)
    tracer = MoeifyTracer(frozenset(id(m) for m in subclasses if ops.computes_linear(m)), frozenset(attempt.opaque),
                          attempt.none if none is None else none, attempt.inline, attempt.flags)
    try:
        return tracer, tracer.trace(module)
    except Exception:
        attempt.failed_in = tracer.failed_in
        raise


def _trace_flipped(module: nn.Module, attempt: _Attempt) -> fx.Graph:
    """The trace with every module's mode flipped (restored afterwards)."""
    modes = {m: m.training for m in module.modules()}
    try:
        for m, training in modes.items():
            m.training = not training
        return _trace_graph(module, attempt)[1]
    finally:
        for m, training in modes.items():
            m.training = training


def _differs(module: nn.Module, graph: fx.Graph, attempt: _Attempt, name: str) -> bool:
    """Whether tracing with the optional input `name` in its other case (None or given) fails or gives
    more than `graph` with the input read as None."""
    given = name not in attempt.none
    try:
        other = _trace_graph(module, attempt, attempt.none ^ {name})[1]
    except Exception:  # noqa: BLE001 - the forward does not run in the other case
        return True
    return not (_aligned(graph, other, name) if given else _aligned(other, graph, name))


def _input_checks(module: nn.Module, graph: fx.Graph, attempt: _Attempt) -> list[tuple[fx.Node, bool]]:
    """(input, traced given) for each optional (default None) input whose other case, None or given,
    the forward treats differently (or cannot run): the rewritten forward must check it. An input
    traced None only flows on where the given trace differs (see `trace`)."""
    checks = []
    for node in graph.nodes:
        if node.op != "placeholder" or node.args != (None,):
            continue
        if node.target in attempt.none:
            checks.append((node, False))
        elif node.users and _differs(module, graph, attempt, node.target):
            checks.append((node, True))
    return checks


def _comparable(node: fx.Node, index: dict[fx.Node, Any]) -> tuple[list, Any]:
    leaves, spec = pytree.tree_flatten((node.args, node.kwargs))
    return [index[x] if isinstance(x, fx.Node) else x for x in leaves], spec


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    return type(a) is type(b) and a == b


def _constant_diffs(graph: fx.Graph, other: fx.Graph, read_as: dict[fx.Node, Any] | None = None,
                    ) -> list[tuple[fx.Node, int, Any, Any]] | str:
    """Where two traces of one forward differ only in constants: (node of `graph`, index of the
    argument leaf, its constant, the other trace's). A string says where they differ in more: the
    operations, or a node read in one place of the other. `read_as`: nodes of `graph` to compare as
    these constants (an input traced given against the trace with it None)."""
    nodes, others = list(graph.nodes), list(other.nodes)
    if len(nodes) != len(others):
        return f"{len(nodes)} vs {len(others)} traced operations"
    index = {n: ("node", i) for i, n in enumerate(nodes)}
    index.update({n: ("node", i) for i, n in enumerate(others)})
    index.update(read_as or {})
    diffs = []
    for node, twin in zip(nodes, others, strict=True):
        (leaves, spec), (twin_leaves, twin_spec) = _comparable(node, index), _comparable(twin, index)
        if (node.op, node.target) != (twin.op, twin.target) or spec != twin_spec:
            return f"at {node.name}"
        for i, (a, b) in enumerate(zip(leaves, twin_leaves, strict=True)):
            if _same(a, b):
                continue
            if any(isinstance(v, tuple) and v[:1] == ("node",) for v in (a, b)):
                return f"{node.name} reads different values"
            diffs.append((node, i, a, b))
    return diffs


def _aligned(given: fx.Graph, none: fx.Graph, name: str) -> bool:
    """Whether `none` is the trace `given` with the input `name` replaced by None where it is read."""
    inputs = {n: None for n in given.nodes if n.op == "placeholder" and n.target == name}
    return _constant_diffs(given, none, inputs) == []


def _bind_training(graph: fx.Graph, flipped: fx.Graph, root: nn.Module) -> None:
    """Turn the constants that differ between the traces in each mode into reads of the mode."""
    diffs = _constant_diffs(graph, flipped)
    if isinstance(diffs, str):
        raise CaptureError(f"{type(root).__name__}'s forward takes different paths in training and in eval mode "
                           f"({diffs}); moeify rewrites one traced path, so it looks inside this module instead")
    per_node: dict[fx.Node, list[tuple[int, Any, Any]]] = {}
    for node, i, value, other in diffs:
        per_node.setdefault(node, []).append((i, value, other))
    for node, changes in per_node.items():
        args, spec = pytree.tree_flatten((node.args, node.kwargs))
        for i, value, other in changes:
            args[i] = _mode_node(graph, node, value, other, root)
        node.args, node.kwargs = pytree.tree_unflatten(args, spec)


def _mode_node(graph: fx.Graph, node: fx.Node, value: Any, flipped: Any, root: nn.Module) -> fx.Node:
    """A node reading the mode of the module `node` was traced in, selecting `value` in its current mode."""
    stack = node.meta.get("nn_module_stack") or {}
    path = next(reversed(stack.values()))[0] if stack else ""
    training = root.get_submodule(path).training
    with graph.inserting_before(node):
        mode = graph.get_attr(f"{path}.training" if path else "training")
        if (value, flipped) == (training, not training) and isinstance(value, bool):
            return mode
        when_training, when_eval = (value, flipped) if training else (flipped, value)
        return graph.call_function(ops.by_training, (mode, when_training, when_eval))


def trace(module: nn.Module, none_inputs: frozenset[str] = frozenset(), *,
          flags: dict[str, bool] | None = None) -> fx.GraphModule:
    """fx-trace `module` (see the module docstring for what is traced beyond plain fx).

    `none_inputs`: optional inputs to trace as None (`observe_none_inputs` finds those the example
    inputs leave None); the others are traced as given. `flags`: trace these inputs as these
    constants, and trace the module as one that wires an FFN (see `trace_paths`); the result is for
    analysis only: nothing checks the flags when it runs.
    """
    wired = flags is not None
    attempt = _Attempt(inline=wired or _linear_children(module) >= 2, none=frozenset(none_inputs), flags=flags or {})
    inner = _forward_to_trace(type(module)) if attempt.inline else None
    root = module if inner is None else _view(module, inner)
    while True:
        try:
            tracer, graph = _trace_graph(root, attempt)
            # an input the example leaves None is traced None only where that changes the graph: where
            # it merely flows on (a cache handed to attention), the given trace passes it on
            flows_on = {name for name in attempt.none if not _differs(root, graph, attempt, name)}
            if flows_on:
                attempt.none -= flows_on
                tracer, graph = _trace_graph(root, attempt)
            flipped = _trace_flipped(root, attempt)
            checks = _input_checks(root, graph, attempt)
            _bind_training(graph, flipped, root)
            _hand_on_kwargs(graph)
            break
        except Exception:
            if not (attempt.inline and attempt.failed_in) or len(attempt.opaque) >= MAX_OPAQUE_CHILDREN:
                raise
            attempt.opaque.add(id(root.get_submodule(attempt.failed_in)))
            attempt.failed_in = None
    if checks:
        anchor = [n for n in graph.nodes if n.op == "placeholder"][-1]
        for node, given in checks:
            with graph.inserting_after(anchor):
                anchor = graph.call_function(require_as_traced, (node, node.target, type(module).__name__, given))
    return fx.GraphModule(tracer.root, graph, type(module).__name__)


def observe_none_inputs(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, frozenset[str]]:
    """For each module that may hold an FFN inline: its optional (default None) inputs that were None
    in every call while `model` ran once, in eval mode without gradients, on the example inputs."""
    seen: dict[str, set[str]] = {}

    def watch(path: str, signature: inspect.Signature, optional: list[str]):
        def hook(module, hook_args, hook_kwargs):
            try:
                bound = signature.bind(*hook_args, **hook_kwargs).arguments
            except TypeError:
                return
            none = {name for name in optional if bound.get(name) is None}
            seen[path] = none if path not in seen else seen[path] & none
        return hook

    handles = []
    for path, module in model.named_modules():
        if _linear_children(module) < 2:
            continue
        try:
            signature = inspect.signature(module.forward)
        except (TypeError, ValueError):
            continue
        optional = [name for name, p in signature.parameters.items() if p.default is None]
        if optional:
            handles.append(module.register_forward_pre_hook(watch(path, signature, optional), with_kwargs=True))
    if not handles:
        return {}
    try:  # (what the model raises here, `convert.example_errors` reports)
        with torch.no_grad(), eval_mode(model):
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return {path: frozenset(none) for path, none in seen.items() if none}


@contextmanager
def counting_calls(modules: dict[str, nn.Module]):
    """{name: calls of that module} while the block runs (forward hooks, removed afterwards)."""
    calls = dict.fromkeys(modules, 0)
    handles = [module.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
               for name, module in modules.items()]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def eval_mode(model: nn.Module):
    """Run `model` in eval mode; afterwards every module has its own mode back."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


@dataclass
class CaptureUnit:
    path: str  # qualified name of the traced module ("" for the whole model)
    graph_module: fx.GraphModule
    how: str  # e.g. "fx: whole model" or "fx: submodule transformer.h.0.mlp"
    method: str | None = None  # set when a method other than forward was traced (see `capture_methods`)
    in_place: bool = False  # the method holds a whole FFN and is rewritten itself (`capture_ff_blocks`)
    # the same forward traced on its other paths (`trace_paths`): a split FFN counts where all show it
    paths: list[fx.GraphModule] = field(default_factory=list)


@dataclass
class Capture:
    units: list[CaptureUnit] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (module, reason)


def _is_container(module: nn.Module) -> bool:
    return isinstance(module, (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict))


def capture_units(model: nn.Module, none_inputs: dict[str, frozenset[str]] | None = None) -> Capture:
    """Trace top-down: a module that traces is one unit; one that does not is split into children.
    `none_inputs`: per module path, the optional inputs to trace as None (`observe_none_inputs`)."""
    capture = Capture()

    def visit(module: nn.Module, path: str) -> None:
        if not _is_container(module):
            try:
                gm = trace(module, (none_inputs or {}).get(path, frozenset()))
            except Exception as exc:  # noqa: BLE001 - any trace failure means: look inside
                capture.failures.append((path or "<model>", one_line(exc)))
            else:
                how = "fx: whole model" if not path else f"fx: submodule {path}"
                capture.units.append(CaptureUnit(path, gm, how))
                return
        for name, child in module.named_children():
            visit(child, f"{path}.{name}" if path else name)

    visit(model, "")
    return capture


def _calls_children(module: nn.Module, fn) -> bool:
    """Whether `fn`'s code names at least two of `module`'s children (it wires siblings together)."""
    return len(set(module._modules) & set(fn.__code__.co_names)) >= 2


def _tensor_only_signature(fn) -> bool:
    params = list(inspect.signature(fn).parameters.values())[1:]
    return bool(params) and all(p.kind is p.POSITIONAL_OR_KEYWORD and p.default is p.empty for p in params)


def helper_methods(module: nn.Module) -> list[str]:
    """Methods of `module`'s own classes, besides forward, that call two or more of its children.

    Such a method (BERT's `BertLayer.feed_forward_chunk`) shows how the children's outputs flow
    into each other when the forward itself does not trace. Only methods whose parameters are all
    required positionals are candidates: tracing calls them with proxies and nothing else.
    """
    names = []
    for cls in type(module).__mro__:
        if cls.__module__.startswith("torch.nn") or cls is object:
            break
        for name, fn in vars(cls).items():
            if (name != "forward" and not name.startswith("__") and inspect.isfunction(fn) and name not in names
                    and _calls_children(module, fn) and _tensor_only_signature(fn)):
                names.append(name)
    return names


def trace_method(module: nn.Module, method: str) -> fx.GraphModule:
    """fx-trace `module.<method>` as if it were the forward; child modules keep their names."""
    return trace(_view(module, getattr(type(module), method)))


def capture_methods(model: nn.Module, capture: Capture) -> None:
    """Add a unit for each helper method of every module whose forward did not trace."""
    for path, _ in list(capture.failures):
        module = model if path == "<model>" else model.get_submodule(path)
        for method in helper_methods(module):
            where = f"{path}.{method}()"
            try:
                gm = trace_method(module, method)
            except Exception as exc:  # noqa: BLE001 - a method that does not trace is only a failed candidate
                capture.failures.append((where, one_line(exc)))
                continue
            capture.units.append(CaptureUnit("" if path == "<model>" else path, gm,
                                             f"fx: method {where}", method))


# `trace_paths` traces each combination of at most this many flag inputs; more count as untraceable
MAX_FLAGS = 3


def trace_paths(module: nn.Module, none_inputs: frozenset[str] = frozenset()) -> list[fx.GraphModule]:
    """`module`'s forward traced for analysis, with the children that do not trace called as they are:
    once per combination of its flag inputs (parameters with a bool default, such as DeBERTa's
    `output_attentions`), the defaults first. The traces are never installed; a split FFN found on
    them is rewritten in its two halves (`FindSplitFFN`), which holds only if every path shows it."""
    signature = inspect.signature(inspect.unwrap(type(module).forward))
    flags = {name: p.default for name, p in signature.parameters.items() if isinstance(p.default, bool)}
    if len(flags) > MAX_FLAGS:
        raise CaptureError(f"{type(module).__name__}.forward takes {len(flags)} flag inputs; moeify traces every "
                           f"combination of at most {MAX_FLAGS}")
    return [trace(module, none_inputs, flags=dict(zip(flags, values, strict=True)))
            for values in itertools.product(*[(default, not default) for default in flags.values()])]


def _returns_activated_linear(gm: fx.GraphModule) -> bool:
    """Whether the traced forward returns one Linear's output through parameter-free modules and
    elementwise operations only (`dense -> act [-> dropout]`): it may be the first half of a split FFN."""
    def through(node: fx.Node) -> bool:  # (a functional dropout reads the mode: a read passed too)
        module = ops.call_module(node, gm)
        return (ops.is_elementwise(node) or ops.dropout_p(node, gm) is not None or ops.is_mode_read(node)
                or (module is not None and not any(True for _ in module.parameters())))

    output = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    source = ops.single_source(output, through) if isinstance(output, fx.Node) else None
    return source is not None and ops.linear_of(source, gm) is not None


def _wires_split_ffn(module: nn.Module, path: str, units: dict[str, CaptureUnit]) -> bool:
    """Whether the forward calls a child that holds a Linear and a child whose own trace returns an
    activated Linear (`_returns_activated_linear`): it may wire an FFN split across them."""
    called = set(module._modules) & set(inspect.unwrap(type(module).forward).__code__.co_names)
    with_linear = [name for name in called
                   if any(isinstance(m, nn.Linear) or ops.is_conv1d(m) for m in module.get_submodule(name).modules())]
    heads = [name for name in with_linear if (unit := units.get(f"{path}.{name}" if path else name)) is not None
             and _returns_activated_linear(unit.graph_module)]
    return len(with_linear) >= 2 and bool(heads)


def capture_wired(model: nn.Module, capture: Capture, none_inputs: dict[str, frozenset[str]] | None = None) -> None:
    """Add a unit for each module whose forward did not trace, has no helper method unit, and calls two
    children that hold Linears (DeBERTa's and MPNet's layers wire `intermediate` into `output` in the
    forward itself): the forward traced on its paths with the untraceable children opaque (`trace_paths`)."""
    with_method = {unit.path for unit in capture.units if unit.method is not None}
    forwards = {unit.path: unit for unit in capture.units if unit.method is None}
    failed = {"" if where == "<model>" else where for where, _ in capture.failures}
    for path, module in model.named_modules():
        if path not in failed or path in with_method:  # (a helper method shows the wiring)
            continue
        if _is_container(module) or _linear_children(module) >= 2 or not _wires_split_ffn(module, path, forwards):
            continue  # (two Linear children: its trace already called what does not trace as it is)
        where = path or "<model>"
        try:
            graphs = trace_paths(module, (none_inputs or {}).get(path, frozenset()))
        except Exception as exc:  # noqa: BLE001 - one failed candidate
            capture.failures.append((f"{where}.forward(opaque children)", one_line(exc)))
            continue
        capture.units.append(CaptureUnit(path, graphs[0], f"fx: forward of {where}, children that do not trace opaque",
                                         "forward", paths=graphs[1:]))


# PyTorch's own Transformer layers keep their FFN in `_ff_block(x)`. As torch.nn modules they are
# leaves of every trace, and their forward does not trace: the method is traced and rewritten instead.
FF_BLOCK_LAYERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def capture_ff_blocks(model: nn.Module, capture: Capture) -> None:
    """Add an in-place method unit for the `_ff_block` of every nn.Transformer{Encoder,Decoder}Layer."""
    traced = {unit.path for unit in capture.units if unit.method is None}
    for path, module in model.named_modules():
        if not isinstance(module, FF_BLOCK_LAYERS) or path in traced:  # (its forward traced: found there)
            continue
        where = f"{path or '<model>'}._ff_block()"
        try:
            gm = trace_method(module, "_ff_block")
        except Exception as exc:  # noqa: BLE001 - a subclass may have changed it: one failed candidate
            capture.failures.append((where, one_line(exc)))
            continue
        capture.units.append(CaptureUnit(path, gm, f"fx: method {where}", "_ff_block", in_place=True))


def install_forward(module: nn.Module, gm: fx.GraphModule, method: str = "forward") -> None:
    """Make `module` run `gm`'s graph as its forward (or as `method`), keeping its class, attributes and
    parameters.

    `gm` was traced from `module` and rewritten: what the graph calls that `module` lacks (the new
    MoE layers, traced constants) is added to `module` first.
    """
    for node in gm.graph.nodes:
        if node.op in ("call_module", "get_attr"):
            _ensure_attr(module, gm, node.target)
    module.__class__ = _rewritten_class(dense_class(module), gm.graph, method)
    # a plain attribute, not a submodule: the graph is for inspection and passes, not for state_dict
    module.__dict__["_moeify_graph_module"] = gm


def _rewritten_class(base: type, graph: fx.Graph, method: str) -> type:
    """A subclass of `base` whose `method` runs `graph`. It bears `base`'s names, so it cannot be found
    by name: pickle and deepcopy rebuild it from `base` and the graph (`_reduce_rewritten`)."""
    python_code = graph.python_code(root_module="self")
    return type(base.__name__, (base,), {
        method: fx.graph_module._forward_from_src(python_code.src, python_code.globals, None),
        "_moeify_code": python_code.src,  # the generated forward, to read
        "_moeify_dense_class": base,
        "_moeify_method": method,
        "__module__": base.__module__,
        "__qualname__": base.__qualname__,
        "__reduce_ex__": _reduce_rewritten,
        "__setstate__": _setstate_rewritten,
    })


def _reduce_rewritten(module: nn.Module, protocol: int) -> tuple:
    """(rebuild, args, state) of a rewritten module for pickle and deepcopy: its dense class, method and
    graph (an owner-less copy that keeps the nodes' annotations; fx would re-trace a GraphModule on
    unpickling, and that trace breaks on the MoE helpers), and its state with that graph in place of
    the GraphModule."""
    cls = type(module)
    graph = copy.deepcopy(module.__dict__["_moeify_graph_module"].graph)
    state = {k: v for k, v in module.__dict__.items() if k != "_moeify_graph_module"}
    return _new_rewritten, (cls._moeify_dense_class, graph, cls._moeify_method), {**state, "_moeify_graph": graph}


def _new_rewritten(base: type, graph: fx.Graph, method: str) -> nn.Module:
    """An empty instance of the rewritten class, for `_setstate_rewritten` to fill."""
    cls = _rewritten_class(base, graph, method)
    return cls.__new__(cls)


def _setstate_rewritten(module: nn.Module, state: dict) -> None:
    state = dict(state)
    graph = state.pop("_moeify_graph")
    nn.Module.__setstate__(module, state)
    module.__dict__["_moeify_graph_module"] = fx.GraphModule(module, graph)


def _ensure_attr(module: nn.Module, gm: fx.GraphModule, target: str) -> None:
    """Copy onto `module` the first part of `target` it lacks, taken from `gm`."""
    have, src = module, gm
    for part in target.split("."):
        if part in have._modules or part in have._parameters or part in have._buffers or part in have.__dict__:
            have, src = getattr(have, part), getattr(src, part)
            continue
        value = getattr(src, part)
        if isinstance(value, nn.Module):
            have.add_module(part, value)
        elif isinstance(value, nn.Parameter):
            have.register_parameter(part, value)
        elif isinstance(value, torch.Tensor):
            have.register_buffer(part, value, persistent=False)
        else:
            setattr(have, part, value)
        return


def remove_modules(module: nn.Module, targets: list[str]) -> None:
    """Unregister the submodules at `targets` (qualified names); names already gone are ignored."""
    for target in targets:
        parent_name, _, leaf = target.rpartition(".")
        try:
            parent = module.get_submodule(parent_name) if parent_name else module
        except AttributeError:
            continue
        parent._modules.pop(leaf, None)


def dense_class(module: nn.Module) -> type:
    return getattr(type(module), "_moeify_dense_class", type(module))
