"""Graph capture: trace the largest parts of a model that torch.fx can trace.

Whole Hugging Face models do not symbolic-trace (dynamic control flow, cache objects), but their
blocks and MLPs do. `capture_units` tries the whole model first and, where tracing fails, descends
into the children; every unit records how it was captured, and every failure why.

`install_forward` puts a rewritten graph back on the *user's* module: the module keeps its class
(a subclass with the generated forward is swapped in, so `isinstance`, methods and attributes such
as `.generate()` or `.config` stay), its untouched parameters keep their names.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from moeify.passes import ops


class MoeifyTracer(fx.Tracer):
    """fx tracer whose leaves are torch.nn modules, HF Conv1D, nn.Linear subclasses that compute a
    Linear (Falcon's `FalconLinear`), and parameter-free childless modules.

    Making parameter-free helper modules (activations, rotary caches, ...) opaque keeps tracing
    from failing inside them; they are still called as modules by the rewritten forward.
    """

    def __init__(self, linear_subclasses: frozenset[int] = frozenset()) -> None:
        super().__init__()
        # ids of the nn.Linear subclass instances that compute a Linear, probed before tracing (a probe
        # while tracing would see fx's proxies instead of the weights)
        self.linear_subclasses = linear_subclasses

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if ops.is_conv1d(m) or id(m) in self.linear_subclasses:
            return True
        if super().is_leaf_module(m, module_qualified_name):
            return True
        no_state = not any(True for _ in m.parameters(recurse=True)) and not any(True for _ in m.buffers())
        return no_state and not any(True for _ in m.children())


def trace(module: nn.Module) -> fx.GraphModule:
    subclasses = (m for m in module.modules() if isinstance(m, nn.Linear) and type(m) is not nn.Linear)
    tracer = MoeifyTracer(frozenset(id(m) for m in subclasses if ops.computes_linear(m)))
    graph = tracer.trace(module)
    name = type(module).__name__
    return fx.GraphModule(tracer.root, graph, name)


@dataclass
class CaptureUnit:
    path: str  # qualified name of the traced module ("" for the whole model)
    graph_module: fx.GraphModule
    how: str  # e.g. "fx: whole model" or "fx: submodule transformer.h.0.mlp"
    method: str | None = None  # set when a method other than forward was traced (see `capture_methods`)
    in_place: bool = False  # the method holds a whole FFN and is rewritten itself (`capture_ff_blocks`)


@dataclass
class Capture:
    units: list[CaptureUnit] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (module, reason)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:200]


def _is_container(module: nn.Module) -> bool:
    return isinstance(module, (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict))


def capture_units(model: nn.Module) -> Capture:
    """Trace top-down: a module that traces is one unit; one that does not is split into children."""
    capture = Capture()

    def visit(module: nn.Module, path: str) -> None:
        if not _is_container(module):
            try:
                gm = trace(module)
            except Exception as exc:  # noqa: BLE001 - any trace failure means: look inside
                capture.failures.append((path or "<model>", _first_line(exc)))
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
    base = type(module)
    view = base.__new__(type(base.__name__, (base,), {"forward": getattr(base, method)}))
    state = dict(module.__dict__)  # shallow: the view shares parameters and children, never mutates them
    for key in ("_modules", "_parameters", "_buffers"):
        state[key] = dict(state[key])
    view.__dict__.update(state)
    return trace(view)


def capture_methods(model: nn.Module, capture: Capture) -> None:
    """Add a unit for each helper method of every module whose forward did not trace."""
    for path, _ in list(capture.failures):
        module = model if path == "<model>" else model.get_submodule(path)
        for method in helper_methods(module):
            where = f"{path}.{method}()"
            try:
                gm = trace_method(module, method)
            except Exception as exc:  # noqa: BLE001 - a method that does not trace is only a failed candidate
                capture.failures.append((where, _first_line(exc)))
                continue
            capture.units.append(CaptureUnit("" if path == "<model>" else path, gm,
                                             f"fx: method {where}", method))


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
            capture.failures.append((where, _first_line(exc)))
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
    python_code = gm.graph.python_code(root_module="self")
    forward = fx.graph_module._forward_from_src(python_code.src, python_code.globals, None)
    base = dense_class(module)
    subclass = type(base.__name__, (base,), {
        method: forward,
        "_moeify_dense_class": base,
        "__module__": base.__module__,
        "__qualname__": base.__qualname__,
    })
    module.__class__ = subclass
    # plain attributes, not submodules: the graph is for inspection and passes, not for state_dict
    module.__dict__["_moeify_code"] = python_code.src
    module.__dict__["_moeify_graph_module"] = gm


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
