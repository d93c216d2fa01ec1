"""Find the dense FFN regions of a traced graph (an analysis pass: the graph is not changed).

    Linear(x) -> act -> [Dropout/Identity] -> Linear                   => FFNRegion(kind="mlp")
    act(Linear_gate(x)) * Linear_up(x) -> [Dropout/Identity] -> Linear => FFNRegion(kind="gated")
    g, u = Linear_gate_up(x).chunk(2, -1); act(g) * u -> ... -> Linear => FFNRegion(kind="gated"),
                                                                         gate and up fused (Phi-3)
    up * g * torch.sigmoid(g), bracketed and ordered any way -> Linear => FFNRegion(kind="gated", act="silu")
    up * g / (1 + torch.exp(-g)), the divisor from the gate alone -> Linear => FFNRegion(kind="gated", act="silu")
    LSTM -> Linear -> LSTM                                        => FFNRegion(kind="projection")
                                                                     (find_lstm_projection)

`Linear` is nn.Linear or Hugging Face `Conv1D`; `act` is ReLU, GELU (exact or tanh), SiLU, as a
module, a function or a method, or any parameter-free module that computes one of them, or one
written out as elementwise operations (ESM's `x * 0.5 * (1 + torch.erf(x / sqrt(2)))`, probed the
same way: `ops.inline_activation`). A gated product is read through its multiplications, its factors
grouped by the tensor each is computed from (`_Product`): one factor must be up on its own, and the
others together a supported activation of the gate, probed as one (`ops.probe_product`), so
`up * g * torch.sigmoid(g)` is SwiGLU however it is bracketed, plain or fused. A division is read the
same way, its denominator a divisor of the probe: up must multiply, never divide.
Each rule has a `match` that returns the region, or a `Skip` saying why a near-match was refused and how to
make it eligible. Every Linear-like node not claimed by a region is reported as refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx
from torch import nn

from moeify.passes import ops
from moeify.passes.infra import GraphPass, PassResult, Skip


@dataclass(eq=False)
class FFNRegion:
    kind: str  # "mlp" | "gated" (other rules add their own kinds)
    owner: str  # module (relative to the traced root) whose forward holds every node of the region
    input: fx.Node
    output: fx.Node
    nodes: list[fx.Node]  # the nodes the rewrite replaces, in graph order
    linears: dict[str, str]  # role -> qualified module name: fc1/fc2, or gate/up/down
    activation: str | None
    d_model: int
    d_ff: int
    d_out: int
    bias: bool
    dropout: float = 0.0
    notes: list[str] = field(default_factory=list)
    gate_half: int = 0  # fused gate/up ("gate_up" linear): which half of its output rows is the gate
    # writes another width than it reads, as a task head does and a block's FFN does not (a projection
    # between recurrent layers is exempt): set by FindFFNRegions, read by convert.task_heads
    may_be_head: bool = False

    @property
    def key(self) -> tuple[str, ...]:
        """Identity of the region across traces: its Linear modules' names."""
        return tuple(sorted(self.linears.values()))

    def describe(self) -> str:
        act = f", act={self.activation}" if self.activation else ""
        return f"{self.kind}{act}, d_model={self.d_model}, d_ff={self.d_ff}"


def common_owner(nodes: list[fx.Node]) -> str:
    owners = [ops.owner_of(n) or "" for n in nodes]
    parts = [o.split(".") if o else [] for o in owners]
    prefix: list[str] = []
    for items in zip(*parts, strict=False):  # common prefix: stop at the shortest
        if all(p == items[0] for p in items):
            prefix.append(items[0])
        else:
            break
    return ".".join(prefix)


def _only_input(node: fx.Node) -> fx.Node | None:
    if len(node.args) == 1 and not node.kwargs and isinstance(node.args[0], fx.Node):
        return node.args[0]
    return None


def _entry_linear(node: fx.Node, gm: fx.GraphModule) -> tuple[ops.LinearParams, str, fx.Node] | Skip | None:
    """(params, where, input) of the Linear a region starts at; None if `node` is no Linear, a Skip
    if it is called with more than one tensor."""
    params = ops.linear_of(node, gm)
    module = ops.call_module(node, gm)
    if params is None and isinstance(module, nn.Linear):
        extra = sorted({*module._parameters, *module._buffers, *module._modules} - {"weight", "bias"})
        holds = f" (it holds {', '.join(extra)})" if extra else ""
        return Skip(str(node.target), f"is a {type(module).__name__}, an nn.Linear that computes or holds more than "
                    f"F.linear{holds}", "merge adapters or remove parametrizations first, or keep it dense")
    if params is None:
        return None
    where = str(node.target)
    x = _only_input(node)
    if x is None:
        return Skip(where, "called with extra arguments", "call the Linear with one tensor")
    return params, where, x


def skip_passthrough(node: fx.Node, gm: fx.GraphModule) -> tuple[fx.Node | None, float, list[fx.Node]]:
    """Step over the dropouts and nn.Identity modules right after `node` (timm's Mlp puts both
    between its activation and fc2): (the next other node, the combined dropout p, the nodes stepped
    over). The dropout becomes the experts' dropout; an identity computes nothing."""
    keep, stepped = 1.0, []
    nxt = ops.single_user(node)
    while nxt is not None:
        p = ops.dropout_p(nxt, gm)
        if p is None and not isinstance(ops.call_module(nxt, gm), nn.Identity):
            break
        keep *= 1.0 - (p or 0.0)
        stepped.append(nxt)
        nxt = ops.single_user(nxt)
    return nxt, round(1.0 - keep, 12), stepped


def _feeds_linear(node: fx.Node, gm: fx.GraphModule) -> bool:
    nxt = skip_passthrough(node, gm)[0]
    return nxt is not None and ops.linear_of(nxt, gm) is not None


def _is_inplace_activation(node: fx.Node) -> bool:
    """`F.relu_(h)`, `h.relu_()`, `F.relu(h, inplace=True)`: the activation overwrites its input."""
    name = getattr(node.target, "__name__", node.target) if node.op != "call_module" else ""
    return (isinstance(name, str) and name.endswith("_") and not name.startswith("_")) or \
        node.kwargs.get("inplace") is True


def _feeds_recurrent(node: fx.Node, gm: fx.GraphModule) -> bool:
    """`node` (through dropouts) is the input of an nn.LSTM / GRU / RNN: the FFN between stacked recurrent
    layers maps to their input size, which need not be its own (Shazeer 2017 §5), and is no head."""
    user = skip_passthrough(node, gm)[0]
    return user is not None and isinstance(ops.call_module(user, gm), nn.RNNBase)


AXES_SWAPS = frozenset({"transpose", "permute", "swapaxes", "swapdims", "t", "mT"})


def _axes_swap(node: fx.Node) -> str | None:
    """How `node` moves its input's axes (`transpose`, `permute`, `.mT`, ...), or None when it does not."""
    if node.op == "call_method" and node.target in AXES_SWAPS:
        return str(node.target)
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        if name in AXES_SWAPS:
            return name
        if name == "getattr" and len(node.args) > 1 and node.args[1] in AXES_SWAPS:
            return str(node.args[1])
    return None


def _users(node: fx.Node) -> str:
    return ", ".join(u.name for u in node.users) or "nothing"


def _traced_child(nodes: list[fx.Node], parent: fx.Node) -> str | None:
    """'path (Class)' of the one module, below the one that issued `parent`, whose forward issued every
    node of `nodes`: a layer the trace went into (an activation or a norm moeify does not know, such as
    xIELU or BitNet's sub-norm), which a refusal names rather than the ops it traced to. None when a node
    is a module call (a leaf such as nn.GELU: not traced into) or the module is an nn.Linear subclass."""
    entries = set()
    for node in nodes:
        stack = list((node.meta.get("nn_module_stack") or {}).values())
        if not stack or node.op == "call_module":
            return None
        entries.add(stack[-1])
    if len(entries) != 1:
        return None
    (path, cls), owner = entries.pop(), ops.owner_of(parent)
    if isinstance(cls, type) and issubclass(cls, nn.Linear):
        return None
    below = path.startswith(f"{owner}.") if owner else bool(path)
    return f"{path} ({getattr(cls, '__name__', str(cls).rpartition('.')[2])})" if below else None


class MLPRule:
    """Linear -> act -> [Dropout/Identity] -> Linear."""

    kind = "mlp"

    def match(self, fc1: fx.Node, gm: fx.GraphModule) -> FFNRegion | Skip | None:
        entry = _entry_linear(fc1, gm)
        if not isinstance(entry, tuple):
            return entry
        p1, where, x = entry
        act_node = ops.single_user(fc1)
        act, what = ops.activation_of(act_node, gm) if act_node is not None else (None, "")
        act_nodes = [act_node]
        if act is None or not _feeds_linear(act_node, gm):
            inline = ops.inline_activation(fc1)  # written out: x * 0.5 * (1 + erf(x / sqrt(2)))
            if inline is not None:
                act, act_nodes = inline
                act_node = act_nodes[-1]
        if act_node is None:
            child = _traced_child(list(fc1.users), fc1)
            if child is not None:
                return Skip(where, f"feeds {child}, which moeify does not know as an activation",
                            f"FFN regions are Linear -> {'/'.join(ops.SUPPORTED_ACTIVATIONS)} -> Linear; "
                            "keep this FFN dense, or use a supported activation")
            inplace = next((u.name for u in fc1.users if _is_inplace_activation(u)), None)
            fix = (f"{inplace} changes its input in place and the input is used again: write h = act(h)"
                   if inplace else "an FFN's hidden state must feed only its activation")
            return Skip(where, f"its output is used by {len(fc1.users)} nodes ({_users(fc1)}), not by one activation",
                        fix)
        if act is None:
            return Skip(where, f"feeds {what}, not a supported activation",
                        f"FFN regions are Linear -> {'/'.join(ops.SUPPORTED_ACTIVATIONS)} -> Linear")
        fc2, p, drop_nodes = skip_passthrough(act_node, gm)
        p2 = None if fc2 is None else ops.linear_of(fc2, gm)
        if p2 is None:
            feeds = "several nodes" if fc2 is None else fc2.name
            return Skip(where, f"{act} output feeds {feeds}, not a second Linear",
                        "the activation must feed the FFN's output Linear")
        if p2.in_features != p1.out_features:
            return Skip(where, f"{fc2.target}.in_features={p2.in_features} != {fc1.target}.out_features="
                               f"{p1.out_features}", "the two Linears must share the hidden size")
        if (p1.bias is None) != (p2.bias is None):
            return Skip(where, "one Linear has a bias and the other not", "use bias on both or neither")
        nodes = [fc1, *act_nodes, *drop_nodes, fc2]
        return FFNRegion(self.kind, common_owner(nodes), x, fc2, nodes,
                         {"fc1": str(fc1.target), "fc2": str(fc2.target)}, act,
                         p1.in_features, p1.out_features, p2.out_features, p1.bias is not None, p)


def _written(factors: list[fx.Node | float], divisors: list[fx.Node | float]) -> str:
    def name(f):
        return f.name if isinstance(f, fx.Node) else repr(f)
    return (" * ".join(map(name, factors)) or "1") + "".join(f" / {name(d)}" for d in divisors)


@dataclass(eq=False)
class _Product:
    """What a multiplication or division node computes, read through the multiplications and
    numerators under it (`ops.product_factors`), so that `up * g * torch.sigmoid(g)`,
    `g * up * torch.sigmoid(g)`, `(g * torch.sigmoid(g)) * up` and `up * g / (1 + torch.exp(-g))` read
    alike: its factors and divisors, grouped by the one tensor each is computed from, through
    elementwise operations or one activation node (`F.silu(g)`, `self.act(g)`)."""

    root: fx.Node
    operations: list[fx.Node]  # root and the multiplications and divisions under it
    factors: list[fx.Node | float]  # what multiplies, as written
    divisors: list[fx.Node | float]  # what divides, as written
    groups: dict[fx.Node, list[fx.Node]]  # source -> the factors and divisors computed from it
    derived: dict[fx.Node, set[fx.Node]]  # source -> the nodes between it and its factors
    named: dict[fx.Node, str]  # factors that are one activation node, by activation
    mixed: list[fx.Node]  # factors computed from several tensors (or through too many nodes)

    def written(self) -> str:
        return _written(self.factors, self.divisors)

    def of(self, gate: fx.Node) -> tuple[list[fx.Node | float], list[fx.Node | float]]:
        """(factors, divisors) computed from `gate`, and the numbers, which go with the gate."""
        def keep(f):
            return not isinstance(f, fx.Node) or f in self.groups[gate]
        return [f for f in self.factors if keep(f)], [d for d in self.divisors if keep(d)]

    def activation(self, gate: fx.Node) -> str | None:
        """The supported activation the factors and divisors computed from `gate` (and the numbers)
        make together."""
        factors, divisors = self.of(gate)
        if len(factors) == 1 and not divisors and factors[0] in self.named:
            return self.named[factors[0]]
        nodes = self.derived[gate]
        if not all(ops.is_elementwise(n) for n in nodes):  # an activation module among other factors
            return None
        return ops.probe_product(gate, sorted(nodes, key=_position(self.root.graph)), factors, divisors)


def _product_at(mul: fx.Node, gm: fx.GraphModule) -> _Product | None:
    """The product `mul` (a multiplication or division) computes, read at the outermost one only: one
    whose only user multiplies it again, or divides it, is part of a larger product, read there."""
    user = ops.single_user(mul)
    if user is not None and (ops.is_plain_mul(user) or (ops.is_plain_div(user) and user.args[0] is mul)):
        return None
    found = ops.product_factors(mul)
    if found is None:
        return None
    factors, divisors, operations = found
    product = _Product(mul, operations, factors, divisors, {}, {}, {}, [])
    source_of: dict[fx.Node, fx.Node] = {}
    for f in dict.fromkeys(f for f in [*factors, *divisors] if isinstance(f, fx.Node)):
        act, _ = ops.activation_of(f, gm)
        if act and f.args and isinstance(f.args[0], fx.Node):
            source, inside = f.args[0], {f}
            product.named[f] = act
        elif (walk := ops.derivation(f, ops.is_elementwise)) is not None:
            source, inside = walk
        else:
            product.mixed.append(f)
            continue
        source_of[f] = source
        product.derived.setdefault(source, set()).update(inside)
    for f in [*factors, *divisors]:  # every occurrence: g * g is two factors of g
        if f in source_of:
            product.groups.setdefault(source_of[f], []).append(f)
    return product


def _act_products(product: _Product, is_projection):
    """(activation, its nodes in graph order, gate, up) for each way of reading `product` as
    act(gate) * up: `up` a factor on its own (never a divisor), every other factor and divisor
    computed from `gate` alone and together a supported activation of it (`ops.probe_product`), both
    accepted by `is_projection`.

    The activation's nodes are those between gate and the factors and the operations under the
    product's root: `up * g * torch.sigmoid(g)` and `up * g / (1 + torch.exp(-g))` are SiLU(g) * up
    whichever way they are bracketed.
    """
    if len(product.groups) != 2 or product.mixed:
        return
    for gate, up in (tuple(product.groups), tuple(product.groups)[::-1]):
        if product.groups[up] != [up] or up not in product.factors or not (is_projection(gate) and is_projection(up)):
            continue
        act = product.activation(gate)
        if act is not None:
            nodes = sorted(product.derived[gate] | set(product.operations[1:]), key=_position(product.root.graph))
            yield act, nodes, gate, up


def _projection(node: fx.Node, gm: fx.GraphModule) -> str | None:
    """The module a gate or up factor comes from: a Linear, or the Linear a feature half is split from."""
    if ops.linear_of(node, gm) is not None:
        return str(node.target)
    half = ops.feature_half(node)
    return None if half is None or half[1].op != "call_module" else str(half[1].target)


def _product_refusal(product: _Product, gm: fx.GraphModule) -> Skip | None:
    """Why a product written like a gated FFN's (three or more factors, two or more of them
    projections, feeding a Linear) is not act(gate(x)) * up(x), or None if it is read as one or is not
    written like one."""
    projections = [s for s in product.groups if _projection(s, gm) is not None]
    if len(product.factors) + len(product.divisors) < 3 or len(projections) < 2 or not _feeds_linear(product.root, gm):
        return None
    if any(_act_products(product, lambda n: _projection(n, gm) is not None)):
        return None
    where = _projection(min(projections, key=_position(gm.graph)), gm)
    head = f"{product.root.name} = {product.written()}"
    if product.mixed:
        reason = f"{head}: {', '.join(f.name for f in product.mixed)} is computed from several tensors"
    elif len(product.groups) > 2:
        reason = (f"{head} multiplies {len(product.groups)} tensors ({', '.join(s.name for s in product.groups)}), "
                  "not a gate and an up projection")
    elif not (alone := [s for s in product.groups if product.groups[s] == [s]]):
        reason = f"{head}: neither {' nor '.join(s.name for s in product.groups)} is a factor on its own, as up(x) is"
    elif not any(s in product.factors for s in alone):
        reason = f"{head}: {alone[0].name} divides the product, as up(x) must not"
    else:  # two tensors, one a factor on its own, but the other's factors make no supported activation
        gate = next((s for s in product.groups if product.groups[s] != [s] or s not in product.factors), None)
        if gate is None:
            reason = f"{head}: no activation is applied to {' or '.join(s.name for s in product.groups)}"
        else:
            reason = f"{head}: {_written(*product.of(gate))}, computed from {gate.name}, is not a supported activation"
    return Skip(where, reason, f"gated FFNs are act(gate(x)) * up(x) -> down, act one of "
                               f"{'/'.join(ops.SUPPORTED_ACTIVATIONS)} (SiLU also as gate * sigmoid(gate))")


def _gated_down(mul: fx.Node, gm: fx.GraphModule, where: str, d_ff: int, bias: bool):
    """The output Linear of a gated product (over dropouts/identities), checked against the hidden size
    and bias of the gate/up side: (down node, its params, dropout p, nodes stepped over), or a Skip."""
    down, p, stepped = skip_passthrough(mul, gm)
    pd = None if down is None else ops.linear_of(down, gm)
    if pd is None:
        child = _traced_child([down] if down is not None else list(mul.users), mul)
        if child is not None:
            return Skip(where, f"the gated product goes through {child} before the output Linear",
                        "gated FFNs are act(gate(x)) * up(x) -> down, with nothing but dropout between the "
                        "product and down; keep this FFN dense")
        return Skip(where, "the gated product does not feed a single output Linear",
                    "gated FFNs are act(gate(x)) * up(x) -> down")
    if pd.in_features != d_ff:
        return Skip(where, f"{down.target}.in_features={pd.in_features} does not match the gate/up hidden size "
                           f"{d_ff}", "gate and up map D->F, down maps F->D")
    if (pd.bias is None) == bias:
        return Skip(where, "only some of gate/up/down have a bias", "use bias on all of them or none")
    return down, pd, p, stepped


def _leak(inner: set[fx.Node], root: fx.Node) -> fx.Node | None:
    """The first node of `inner` (a gated product's nodes but its root) used outside them and the root."""
    allowed = inner | {root}
    return next((n for n in root.graph.nodes if n in inner and not set(n.users) <= allowed), None)


class GatedRule:
    """act(Linear_gate(x)) * Linear_up(x) -> [Dropout] -> Linear_down   (SwiGLU, GeGLU).

    The product is read through its multiplications (`_Product`): `up * g * torch.sigmoid(g)` and
    `g * up * torch.sigmoid(g)` are SiLU(g) * up as much as `F.silu(g) * up` is.
    """

    kind = "gated"

    def match(self, mul: fx.Node, gm: fx.GraphModule) -> FFNRegion | Skip | None:
        product = _product_at(mul, gm)
        if product is None:
            return None
        found = next(_act_products(product, lambda n: ops.linear_of(n, gm) is not None), None)
        if found is None:
            return _product_refusal(product, gm)
        act, act_nodes, gate, up = found
        pg, pu = ops.linear_of(gate, gm), ops.linear_of(up, gm)
        where = str(gate.target)
        x = _only_input(gate)
        if x is None or _only_input(up) is not x:
            return Skip(where, f"gate {gate.target} and up {up.target} do not read the same input",
                        "a gated FFN applies both projections to the same tensor")
        leak = _leak({gate, up, *act_nodes}, mul)
        if leak is not None:
            return Skip(where, f"{leak.name} is used outside the gated FFN ({_users(leak)})",
                        "the gated FFN's intermediates must not leak out")
        if pg.out_features != pu.out_features or pg.in_features != pu.in_features:
            return Skip(where, "gate/up/down shapes do not line up", "gate and up map D->F, down maps F->D")
        if (pg.bias is None) != (pu.bias is None):
            return Skip(where, "only some of gate/up/down have a bias", "use bias on all three or none")
        tail = _gated_down(mul, gm, where, pg.out_features, pg.bias is not None)
        if isinstance(tail, Skip):
            return tail
        down, pd, p, drop_nodes = tail
        nodes = sorted({gate, up, *act_nodes, mul, *drop_nodes, down}, key=_position(gm.graph))
        return FFNRegion(self.kind, common_owner(nodes), x, down, nodes,
                         {"gate": str(gate.target), "up": str(up.target), "down": str(down.target)}, act,
                         pg.in_features, pg.out_features, pd.out_features, pg.bias is not None, p)


class FusedGatedRule:
    """g, u = Linear_gate_up(x).chunk(2, dim=-1); act(g) * u -> [Dropout/Identity] -> Linear_down.

    One Linear computes gate and up together (Phi-3's `gate_up_proj`); its output rows split into
    the gate half and the up half, which become the experts' gate and up weights. The halves may
    also come from `.split(F, dim=-1)` or from the slices `[..., :F]` and `[..., F:]`. The product is
    read as in GatedRule: `u * g * torch.sigmoid(g)` is SiLU(g) * u.
    """

    kind = "gated"

    def match(self, mul: fx.Node, gm: fx.GraphModule) -> FFNRegion | Skip | None:
        product = _product_at(mul, gm)
        if product is None:
            return None
        halves = ((act, act_nodes, g, u, ops.feature_half(g), ops.feature_half(u))
                  for act, act_nodes, g, u in _act_products(product, lambda n: ops.feature_half(n) is not None))
        found = next((h for h in halves if h[4][:2] == h[5][:2] and h[4][2] != h[5][2]), None)
        if found is None:
            return None
        act, act_nodes, gate_half, up_half, (split, gate_up, gate_index, gate_size), (_, _, _, up_size) = found
        entry = _entry_linear(gate_up, gm)
        if not isinstance(entry, tuple):
            return entry
        pgu, where, x = entry
        sizes = {size for size in (gate_size, up_size) if size is not None}
        if pgu.out_features % 2 or sizes - {pgu.out_features // 2}:
            return Skip(where, f"{gate_up.target}'s {pgu.out_features} output features are not split in two "
                               f"equal halves (parts of {sorted(sizes)})", "gate_up maps D->2F, down maps F->D")
        splits = [] if split is None else [split]
        uses = [(gate_up, 1), (split, 2)] if split is not None else [(gate_up, 2)]
        leak = next((node for node, want in uses if len(node.users) != want), None)
        leak = leak or _leak({gate_half, up_half, *act_nodes}, mul)
        if leak is not None:
            return Skip(where, f"{leak.name} is used outside the gated FFN ({_users(leak)})",
                        "the gated FFN's intermediates must not leak out")
        tail = _gated_down(mul, gm, where, pgu.out_features // 2, pgu.bias is not None)
        if isinstance(tail, Skip):
            return tail
        down, pd, p, stepped = tail
        nodes = sorted({gate_up, *splits, gate_half, up_half, *act_nodes, mul, *stepped, down}, key=_position(gm.graph))
        return FFNRegion(self.kind, common_owner(nodes), x, down, nodes,
                         {"gate_up": str(gate_up.target), "down": str(down.target)}, act,
                         pgu.in_features, pd.in_features, pd.out_features, pgu.bias is not None, p,
                         gate_half=gate_index)


def _weight_reader(region: FFNRegion, gm: fx.GraphModule) -> fx.Node | None:
    """A get_attr of one of the region's Linears (`wo.weight`) that some node uses, if any.

    Unused ones are harmless: T5's FFN compares `self.wo.weight.dtype` while tracing, which leaves a
    get_attr with no users; the rewrite erases those with the modules.
    """
    return next((n for name in region.linears.values() for n in ops.reads_of(gm, name) if n.users), None)


def _position(graph: fx.Graph):
    """A sort key putting nodes of `graph` in graph order."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    return order.__getitem__


DEFAULT_RULES = (GatedRule(), FusedGatedRule(), MLPRule())


def default_rules() -> tuple:
    """The rules FindFFNRegions runs by default: the FFN rules above plus the LSTM projection rule."""
    from moeify.passes.find_lstm_projection import LSTMProjectionRule  # local: that module imports this one

    return (*DEFAULT_RULES, LSTMProjectionRule())


class FindFFNRegions(GraphPass):
    """Analysis pass: `result.analysis` is the list of regions in graph order."""

    def __init__(self, rules=None, prefix: str = "") -> None:
        self.rules = default_rules() if rules is None else tuple(rules)
        self.prefix = prefix  # qualified name of the traced root, for messages

    def call(self, gm: fx.GraphModule) -> PassResult:
        regions: list[FFNRegion] = []
        refusals: dict[fx.Node, Skip] = {}
        claimed: set[fx.Node] = set()
        for rule in self.rules:
            for node in gm.graph.nodes:
                if node in claimed:
                    continue
                found = rule.match(node, gm)
                if isinstance(found, FFNRegion):
                    if claimed.intersection(found.nodes):
                        continue
                    reader = _weight_reader(found, gm)
                    if reader is not None:  # the rewrite removes these modules: nothing else may use them
                        refusals.setdefault(node, Skip(str(next(iter(found.linears.values()))),
                                                       f"{reader.target} is read outside the FFN (by "
                                                       f"{_users(reader)})", "read the weights only through the "
                                                       "FFN's Linear calls"))
                        continue
                    regions.append(found)
                    claimed.update(found.nodes)
                elif isinstance(found, Skip):
                    refusals.setdefault(node, found)
        explained: set[fx.Node] = set()
        for region in list(regions):  # the rewrite removes the region's Linears: no other call may use them
            names = set(region.linears.values())
            other = next((n for n in gm.graph.nodes
                          if n.op == "call_module" and n.target in names and n not in claimed), None)
            if other is not None:
                regions.remove(region)
                claimed.difference_update(region.nodes)
                explained.update(region.nodes)  # refused below as a whole: its Linears need no line of their own
                refusals.setdefault(region.output, Skip(
                    str(next(iter(region.linears.values()))), f"{other.target} is also called outside the FFN (by "
                    f"{other.name})", "give the other call its own Linear, or keep this FFN dense"))
        skipped = []
        for node, skip in refusals.items():
            if node not in claimed:
                where = f"{self.prefix}.{skip.where}" if self.prefix else skip.where
                skipped.append(Skip(where, skip.reason, skip.fix))
        for node in gm.graph.nodes:  # Linear-like nodes no rule looked at
            if node not in claimed and node not in explained and node not in refusals \
                    and ops.linear_of(node, gm) is not None:
                if not any(node in r.nodes for r in regions):
                    where = f"{self.prefix}.{node.target}" if self.prefix else str(node.target)
                    skipped.append(Skip(where, f"Linear not followed by an activation (feeds {_users(node)})",
                                        "only Linear -> act -> Linear and gated FFNs are converted"))
        for region in regions:
            region.may_be_head = region.kind != "projection" and region.d_out != region.d_model \
                and not _feeds_recurrent(region.output, gm)
            if region.may_be_head:
                region.notes.append(f"it maps {region.d_model} features to {region.d_out}, which a transformer FFN "
                                    "does not: it may be a head; MoEConfig(exclude=...) keeps it dense")
            if (swap := _axes_swap(region.input)) is not None:
                region.notes.append(f"its input comes through {swap}: it mixes along another axis than the features "
                                    "(MLP-Mixer's token mixing), so its MoE routes rows that are not the model's "
                                    "tokens, and moeify.token_mask cannot mask them; MoEConfig(exclude=...) keeps "
                                    "it dense")
        position = _position(gm.graph)
        regions.sort(key=lambda r: position(r.output))
        return PassResult(gm, modified=False, skipped=skipped, analysis=regions,
                          changes=[f"found {len(regions)} FFN region(s)"])
