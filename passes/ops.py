"""What a graph node *is*, for the matchers: a Linear-like call, an activation, a dropout.

Linear-like modules are read through one adapter (`linear_params`) so every pattern sees weights in
nn.Linear's (out_features, in_features) layout: nn.Linear as is, Hugging Face `Conv1D` transposed.
Activations are recognised by type or function, and an unknown activation module is probed
numerically against the supported ones, since model zoos carry many equivalent GELU classes.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from moeify.moe.experts import ACTIVATIONS

SUPPORTED_ACTIVATIONS = tuple(ACTIVATIONS)  # what the experts can compute: the probe's references

_ACT_FUNCTIONS = {
    F.relu: "relu", torch.relu: "relu", F.silu: "silu", F.gelu: "gelu",
}
_ACT_METHODS = {"relu": "relu"}
_ACT_MODULES = {nn.ReLU: "relu", nn.SiLU: "silu"}


@dataclass(frozen=True)
class LinearParams:
    weight: torch.Tensor  # (out, in), a view of the module's parameter
    bias: torch.Tensor | None
    in_features: int
    out_features: int


def is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's transposed linear (GPT-2): weight (in, out), attribute `nf` = out."""
    # read `_parameters` directly: during fx tracing `module.weight` would record a stray get_attr node
    return (type(module).__name__ == "Conv1D" and "nf" in vars(module)
            and module._parameters.get("weight") is not None)


def computes_linear(module: nn.Module) -> bool:
    """nn.Linear itself, or a subclass whose forward is F.linear (Falcon's `FalconLinear` rewrites it as
    `x @ W.T + b`); a subclass that computes something else (scaled, quantized) or holds more than its
    weight and bias (LoRA adapters, whose zero-initialised B computes F.linear at first; a
    parametrization such as weight_norm) is not one: converting it would drop what it adds.

    A subclass with its own forward is probed on two random rows; on the meta device, where nothing
    can be computed, only subclasses that keep nn.Linear's forward count.
    """
    if type(module) is nn.Linear:
        return True
    if not isinstance(module, nn.Linear) or any(True for _ in module.children()) or \
            set(module._parameters) - {"weight", "bias"} or set(module._buffers):
        return False  # adapters (LoRA's A and B), parametrizations (weight_norm), quantization state
    if type(module).forward is nn.Linear.forward:
        return True
    weight = module._parameters.get("weight")  # not `module.weight`: see is_conv1d
    if weight is None or not weight.is_floating_point() or weight.device.type == "meta":
        return False
    gen = torch.Generator(device=weight.device).manual_seed(0)
    x = torch.randn(2, module.in_features, generator=gen, device=weight.device).to(weight.dtype)
    with torch.no_grad():
        try:
            got = type(module).forward(module, x)  # not module(x): fx patches __call__ while it traces
        except Exception:  # noqa: BLE001 - an arbitrary forward: anything it raises means "not a Linear"
            return False
        want = F.linear(x, weight, module._parameters.get("bias"))
    return isinstance(got, torch.Tensor) and got.shape == want.shape and torch.allclose(got, want, rtol=1e-3,
                                                                                        atol=1e-4)


def linear_params(module: nn.Module) -> LinearParams | None:
    if isinstance(module, nn.Linear) and computes_linear(module):
        return LinearParams(module.weight, module.bias, module.in_features, module.out_features)
    if is_conv1d(module):
        w = module.weight.T
        return LinearParams(w, module.bias, w.shape[1], w.shape[0])
    return None


def call_module(node: fx.Node, gm: fx.GraphModule) -> nn.Module | None:
    if node.op != "call_module":
        return None
    try:
        return gm.get_submodule(node.target)
    except AttributeError:
        return None


def linear_of(node: fx.Node, gm: fx.GraphModule) -> LinearParams | None:
    module = call_module(node, gm)
    return None if module is None else linear_params(module)


# Where an activation module is probed: densely on [-6, 6], where the supported activations differ,
# and out to large magnitudes, where capped ones (ReLU6, Hardtanh, HF's ClippedGELU) part from them.
PROBE_FAR = (10.0, 30.0, 100.0, 1e3, 1e4)


def _probe_activation(module: nn.Module) -> str | None:
    """The supported activation `module` computes, from its values on [-6, 6] and at +-PROBE_FAR in
    float32, in training and in eval mode (an activation that also drops out is none of them).

    The tolerance (1e-5) passes re-implementations with rounded constants (BLOOM's tanh GELU uses
    0.79788456 for sqrt(2/pi)) and still separates exact from tanh GELU, which differ by up to
    4.7e-4. The module is called as it is (its modes restored afterwards): never converted, so the
    user's model is left untouched.
    """
    if list(module.parameters()):
        return None
    far = torch.tensor(PROBE_FAR)
    x = torch.cat([torch.linspace(-6, 6, 241), far, -far])
    modes = {m: m.training for m in module.modules()}
    try:
        ys = []
        for training in (True, False):
            module.train(training)
            with torch.no_grad():
                ys.append(module(x))
    except Exception:  # noqa: BLE001 - any failure means "not a plain activation"
        return None
    finally:
        for m, training in modes.items():
            m.training = training
    if not all(isinstance(y, torch.Tensor) and y.shape == x.shape and y.dtype == x.dtype for y in ys):
        return None
    for name, fn in ACTIVATIONS.items():
        want = fn(x)
        if all(torch.allclose(y, want, atol=1e-5, rtol=1e-5) for y in ys):
            return name
    return None


def activation_of(node: fx.Node, gm: fx.GraphModule) -> tuple[str | None, str]:
    """(supported activation name, "") or (None, description of what the node is)."""
    if node.op == "call_function":
        name = _ACT_FUNCTIONS.get(node.target)
        if name == "gelu" and node.kwargs.get("approximate", "none") == "tanh":
            name = "gelu_tanh"
        if name is not None and len(node.args) == 1 and set(node.kwargs) <= {"approximate", "inplace"}:
            return name, ""
        return None, f"function {getattr(node.target, '__name__', node.target)}"
    if node.op == "call_method":
        name = _ACT_METHODS.get(node.target)
        if name is None and node.target in ("chunk", "split"):  # a fused gate_up that FusedGatedRule refused
            return None, (f"method .{node.target}() (gate and up halves are recognised when split in two equal "
                          "parts along dim=-1)")
        return (name, "") if name else (None, f"method .{node.target}()")
    if node.op == "output":
        return None, "the output"
    module = call_module(node, gm)
    if module is None:
        return None, f"{node.op} {node.target}"
    for cls, name in _ACT_MODULES.items():
        if type(module) is cls:
            return name, ""
    if type(module) is nn.GELU:
        return ("gelu_tanh" if module.approximate == "tanh" else "gelu"), ""
    if list(module.parameters(recurse=True)) or linear_params(module) is not None:
        return None, f"module {node.target} ({type(module).__name__})"
    probed = _probe_activation(module)
    if probed:
        return probed, ""
    return None, f"module {type(module).__name__}"  # (the caller says which activations are supported)


# What an activation written out inline may be made of (ESM's `x * 0.5 * (1.0 + torch.erf(x / sqrt(2)))`):
# elementwise operations on tensors and Python numbers
_ELEMENTWISE_FUNCTIONS = frozenset({
    operator.add, operator.sub, operator.mul, operator.truediv, operator.pow, operator.neg,
    torch.add, torch.sub, torch.mul, torch.div, torch.pow, torch.neg, torch.square, torch.erf, torch.tanh,
    torch.sigmoid, torch.exp, torch.relu, torch.clamp, torch.clamp_min,
    F.relu, F.gelu, F.silu, F.sigmoid, F.tanh,
})
_ELEMENTWISE_METHODS = frozenset({"add", "sub", "mul", "div", "pow", "neg", "square", "erf", "tanh", "sigmoid",
                                  "exp", "relu", "clamp", "clamp_min"})
# nodes an inline activation may take (the tanh GELU written out takes 8)
MAX_INLINE_ACTIVATION_NODES = 16


def is_elementwise(node: fx.Node) -> bool:
    if node.op == "call_function":
        known = node.target in _ELEMENTWISE_FUNCTIONS
    else:
        known = node.op == "call_method" and node.target in _ELEMENTWISE_METHODS
    leaves = [*node.args, *node.kwargs.values()]
    return known and all(isinstance(a, (fx.Node, int, float, bool, str)) or a is None for a in leaves)


def derivation(node: fx.Node, through: Callable[[fx.Node], bool],
               limit: int = MAX_INLINE_ACTIVATION_NODES) -> tuple[fx.Node, set[fx.Node]] | None:
    """(the one node `node` is computed from through nodes that `through` accepts, those nodes), walking
    back over their inputs (at most `limit` nodes), or None when there are several or the walk is longer.
    When `through` refuses `node` itself, it is its own source and the set is empty."""
    pending, seen, sources, inside = [node], set(), set(), set()
    while pending:
        n = pending.pop()
        if n in seen:
            continue
        seen.add(n)
        if len(seen) > limit:
            return None
        if through(n):
            inside.add(n)
            pending += n.all_input_nodes
        else:
            sources.add(n)
    return (next(iter(sources)), inside) if len(sources) == 1 else None


def single_source(node: fx.Node, through: Callable[[fx.Node], bool],
                  limit: int = MAX_INLINE_ACTIVATION_NODES) -> fx.Node | None:
    """The one node `node` is computed from through nodes that `through` accepts (`derivation`)."""
    found = derivation(node, through, limit)
    return None if found is None else found[0]


def is_plain_mul(node: fx.Node) -> bool:
    """`a * b`, `torch.mul(a, b)` or `a.mul(b)`: a multiplication of two operands and nothing else."""
    return is_mul(node) and len(node.args) == 2 and not node.kwargs


def is_plain_div(node: fx.Node) -> bool:
    """`a / b`, `torch.div(a, b)` or `a.div(b)`: a true division of two operands (no rounding mode)."""
    return ((node.op == "call_function" and node.target in (operator.truediv, torch.div))
            or (node.op == "call_method" and node.target == "div")) and len(node.args) == 2 and not node.kwargs


def product_factors(root: fx.Node, limit: int = MAX_INLINE_ACTIVATION_NODES
                    ) -> tuple[list[fx.Node | float], list[fx.Node | float], list[fx.Node]] | None:
    """(factors, divisors, operations) of the product `root` computes, read through the
    multiplications and the numerators of the divisions it is made of, so that `(a * b) * c`,
    `a * (b * c)` and `(c * a) / d * b` all give the factors a, b, c (and the second the divisor d):
    nodes and Python numbers in the order written, and `root` with the operations under it.
    A denominator is one divisor as written, never read into: what divides stays apart from what
    multiplies. None when `root` is no plain multiplication or division, an operand is neither a
    node nor a number, or the product takes more than `limit` operations.
    """
    if not (is_plain_mul(root) or is_plain_div(root)):
        return None
    factors: list[fx.Node | float] = []
    divisors: list[fx.Node | float] = []
    steps = [root]
    pending = [(root.args[1], is_plain_div(root)), (root.args[0], False)]  # a stack: pops the left operand first
    while pending:
        a, divides = pending.pop()
        if isinstance(a, fx.Node) and not divides and (is_plain_mul(a) or is_plain_div(a)):
            steps.append(a)
            if len(steps) > limit:
                return None
            pending += [(a.args[1], is_plain_div(a)), (a.args[0], False)]
        elif isinstance(a, fx.Node) or (isinstance(a, (int, float)) and not isinstance(a, bool)):
            (divisors if divides else factors).append(a)
        else:
            return None
    return factors, divisors, list(dict.fromkeys(steps))  # (a node multiplied twice, as in t * t, is one node)


def probe_product(start: fx.Node, nodes: list[fx.Node], factors: list[fx.Node | float],
                  divisors: list[fx.Node | float] = ()) -> str | None:
    """The supported activation that the product of `factors` divided by `divisors` computes from
    `start`'s output, or None.

    Each factor or divisor is `start`, one of `nodes` (elementwise nodes computed from `start`, each
    other and Python numbers, in graph order) or a Python number. The nodes are copied into a graph of
    their own and probed like an activation module (`_probe_activation`): the user's graph is not touched.
    """
    graph = fx.Graph()
    copies = {start: graph.placeholder("x")}
    for n in nodes:
        copies[n] = graph.node_copy(n, lambda a: copies[a])
    out: fx.Node | float | None = None
    for f in sorted(factors, key=lambda f: not isinstance(f, fx.Node)):  # numbers last: a node heads the product
        value = copies[f] if isinstance(f, fx.Node) else f
        out = value if out is None else graph.call_function(operator.mul, (out, value))
    for d in divisors:
        value = copies[d] if isinstance(d, fx.Node) else d
        out = graph.call_function(operator.truediv, (1.0 if out is None else out, value))
    if not isinstance(out, fx.Node):
        return None
    graph.output(out)
    return _probe_activation(fx.GraphModule(nn.Module(), graph))


def inline_activation(start: fx.Node) -> tuple[str, list[fx.Node]] | None:
    """(name, nodes in graph order, the last its output) of a supported activation written out as
    elementwise operations on `start`'s output, or None.

    The nodes are those after `start` that are elementwise and read only `start`, each other and
    Python numbers; `start` and all of them but the last must be used only among them. What they
    compute is probed like an activation module (`probe_product`), on a copy of the nodes.
    """
    inside: list[fx.Node] = []
    node = start.next
    for _ in range(4 * MAX_INLINE_ACTIVATION_NODES):  # they sit right after start in a trace
        if node.op == "output" or len(inside) >= MAX_INLINE_ACTIVATION_NODES:
            break
        reads = node.all_input_nodes
        if reads and is_elementwise(node) and all(r is start or r in inside for r in reads):
            inside.append(node)
        node = node.next
    members = {start, *inside}
    exits = [n for n in inside if any(u not in members for u in n.users) or not n.users]
    if not inside or len(exits) != 1 or exits[0] is not inside[-1] or any(u not in members for u in start.users):
        return None
    name = probe_product(start, inside, [inside[-1]])
    return None if name is None else (name, inside)


def dropout_p(node: fx.Node, gm: fx.GraphModule) -> float | None:
    """The dropout probability if the node is a dropout, else None."""
    module = call_module(node, gm)
    if isinstance(module, nn.Dropout):
        return float(module.p)
    if node.op == "call_function" and node.target is F.dropout:
        p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
        training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
        if training is False:  # F.dropout(h, p, training=False) does nothing
            return 0.0
        if training is True and p != 0:  # drops in eval mode too, which expert dropout never does
            return None
        return float(p) if isinstance(p, (int, float)) else None
    return None


def feature_half(node: fx.Node) -> tuple[fx.Node | None, fx.Node, int, int | None] | None:
    """(split node, split tensor, i, size) when `node` takes part i of a tensor split in two along its
    last dim: `t.chunk(2, dim=-1)` (size None: halves by construction), `t.split(size, dim=-1)` /
    `torch.split`, or the slices `t[..., :size]` (i=0) and `t[..., size:]` or `t[..., size:2*size]`
    (i=1, split node None).
    The caller checks that two equal parts cover the tensor (`size` is half its features)."""
    if node.op != "call_function" or node.target is not operator.getitem or len(node.args) != 2:
        return None
    src, index = node.args
    if not isinstance(src, fx.Node):
        return None
    if isinstance(index, tuple):  # t[..., :size] / t[..., size:]
        last = index[-1] if len(index) == 2 and index[0] is Ellipsis else None
        if not isinstance(last, slice) or last.step not in (None, 1):
            return None
        start, stop = last.start, last.stop
        if start in (None, 0) and isinstance(stop, int) and stop > 0:
            return None, src, 0, stop
        if isinstance(start, int) and start > 0 and stop in (None, 2 * start):  # [F:] or [F:2F]
            return None, src, 1, start
        return None
    if index not in (0, 1) or not src.args or not isinstance(src.args[0], fx.Node):
        return None
    if src.op == "call_method":
        method = src.target
    else:
        method = {torch.chunk: "chunk", torch.split: "split"}.get(src.target) if src.op == "call_function" else None
    if method not in ("chunk", "split"):
        return None
    arg = "chunks" if method == "chunk" else "split_size_or_sections"
    parts = src.kwargs.get(arg, src.kwargs.get("split_size", src.args[1] if len(src.args) > 1 else None))
    dim = src.kwargs.get("dim", src.args[2] if len(src.args) > 2 else 0)
    if dim != -1:
        return None
    if method == "chunk":
        return (src, src.args[0], index, None) if parts == 2 else None
    if isinstance(parts, (list, tuple)) and len(parts) == 2 and parts[0] == parts[1]:
        parts = parts[0]
    return (src, src.args[0], index, parts) if isinstance(parts, int) and parts > 0 else None


def reads_of(gm: fx.GraphModule, target: str) -> list[fx.Node]:
    """The get_attr nodes that read module `target` or one of its attributes (`wo`, `wo.weight`)."""
    return [n for n in gm.graph.nodes
            if n.op == "get_attr" and (n.target == target or n.target.startswith(f"{target}."))]


def by_training(training: bool, when_training: Any, when_eval: Any) -> Any:
    """A traced constant that depends on a module's mode, read when the forward runs (see
    `moeify.capture`: a module is traced in both modes)."""
    return when_training if training else when_eval


def is_mode_read(node: fx.Node) -> bool:
    """A read of a module's training flag, or a constant chosen by one: pure, dropped when unused."""
    if node.op == "get_attr":
        return node.target == "training" or node.target.endswith(".training")
    return node.op == "call_function" and node.target is by_training


def is_mul(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in (operator.mul, torch.mul)) or (
        node.op == "call_method" and node.target == "mul")


def single_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def owner_of(node: fx.Node) -> str | None:
    """Qualified name of the module whose forward issued this node, relative to the traced root."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return "" if node.op != "call_module" else node.target.rpartition(".")[0]
    paths = [path for path, _ in stack.values()]
    if node.op == "call_module" and paths and paths[-1] == node.target:
        paths = paths[:-1]  # a leaf module's own entry: its caller is the owner
    return paths[-1] if paths else ""
