"""Find FFNs split across sibling modules, as in BERT, on a trace of the parent's helper method.

    parent.feed_forward_chunk(x):  head(x) = act(head.dense(x));  tail(h, x) = LN(drop(tail.dense(h)) + x)
        => SplitFFNRegion(head, tail):  head(x) -> x (identity);  tail.dense(h) -> MoE(h)

The parent's forward does not fx-trace (HF attention), but a method that wires the two siblings
together does (`moeify.capture.capture_methods`), or the forward itself does with the children
that do not trace called opaque (`moeify.capture.capture_wired`: DeBERTa, MPNet; one trace per
flag value, `paths`); on that flattened trace `MLPRule` / `GatedRule` see the whole
`dense -> act -> dense` path, and a region must show on every path. This pass keeps the regions
whose first and last Linear belong to different modules and checks that the two halves can be
rewritten separately:

- the head module's own forward is exactly `x -> dense -> act [-> dropout]` (it becomes identity);
- the tail module's first input feeds only its dense (that call becomes the MoE, so dropout,
  residual add and LayerNorm stay where they are);
- no other method of the parent (its forward included) calls the head, so the head's output can
  only reach the tail.

It is an analysis pass: `result.analysis` holds the `SplitFFNRegion`s, each with the head's and
the tail's own traces ready to rewrite; every near-match is reported with the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch.fx as fx
from torch import nn

from moeify.passes import ops
from moeify.passes.find_ffn_regions import FFNRegion, FindFFNRegions
from moeify.passes.infra import GraphPass, PassResult, Skip


@dataclass(eq=False)
class SplitFFNRegion:
    ffn: FFNRegion  # the region on the parent method's trace (both Linears, the activation)
    head: str  # module holding `dense -> act` (relative to the parent), e.g. "intermediate"
    tail: str  # module holding the output `dense`, e.g. "output"
    head_gm: fx.GraphModule  # the head's own trace
    tail_gm: fx.GraphModule  # the tail's own trace
    head_nodes: list[fx.Node]  # in head_gm: the nodes the identity rewrite removes
    tail_linear: fx.Node  # in tail_gm: the output Linear call the MoE replaces
    notes: list[str] = field(default_factory=list)

    @property
    def owner(self) -> str:  # the MoE is installed in the tail
        return self.tail

    @property
    def kind(self) -> str:
        return self.ffn.kind

    @property
    def linears(self) -> dict[str, str]:
        return self.ffn.linears

    @property
    def key(self) -> tuple[str, ...]:
        return self.ffn.key

    def __getattr__(self, name: str):  # activation, d_model, d_ff, d_out, bias, dropout: the FFN's
        if name in ("activation", "d_model", "d_ff", "d_out", "bias", "dropout", "may_be_head"):
            return getattr(self.ffn, name)
        raise AttributeError(name)

    def describe(self) -> str:
        return f"{self.ffn.describe()}, split across {self.head} -> {self.tail}"


def _module_of(name: str) -> str:
    return name.rpartition(".")[0]


def _leaf(name: str, prefix: str) -> str:
    return name[len(prefix) + 1:] if prefix else name


def _callers(parent: nn.Module, attr: str, method: str) -> list[str]:
    """Functions of the parent's own classes, besides `method`, whose code names `attr`."""
    found = []
    for cls in type(parent).__mro__:
        if cls.__module__.startswith("torch.nn") or cls is object:
            break
        for name, fn in vars(cls).items():
            code = getattr(fn, "__code__", None)
            if name != method and name not in ("__init__",) and code is not None and attr in code.co_names:
                found.append(f"{cls.__name__}.{name}")
    return found


class FindSplitFFN(GraphPass):
    """Analysis pass over the trace of `parent.<method>`; `result.analysis` = [SplitFFNRegion]."""

    def __init__(self, parent: nn.Module, method: str, trace: Callable[[nn.Module], fx.GraphModule],
                 prefix: str = "", paths: Sequence[fx.GraphModule] = ()) -> None:
        self.parent, self.method, self.trace, self.prefix = parent, method, trace, prefix
        self.paths = paths  # the method's other traced paths (flag inputs set otherwise)

    def _where(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def call(self, gm: fx.GraphModule) -> PassResult:
        found = FindFFNRegions(prefix=self.prefix)(gm).analysis
        on_other_paths = [{r.key for r in FindFFNRegions(prefix=self.prefix)(p).analysis} for p in self.paths]
        regions, skipped = [], []
        for ffn in found:
            first, last = next(iter(ffn.linears.values())), ffn.linears.get("fc2", ffn.linears.get("down"))
            head, tail = _module_of(first), _module_of(last)
            if last is None or head == tail:
                continue  # the whole FFN sits in one module: its own trace converts it
            if not all(ffn.key in keys for keys in on_other_paths):
                reason = f"{self.method} wires {head} into {tail} differently when a flag input is set otherwise"
                skipped.append(Skip(self._where(first), reason, f"wire {head} into {tail} the same way on every path"))
                continue
            result = self.check(ffn, head, tail)
            if isinstance(result, Skip):
                skipped.append(result)
            else:
                regions.append(result)
        return PassResult(gm, modified=False, skipped=skipped, analysis=regions,
                          changes=[f"found {len(regions)} FFN region(s) split across sibling modules"])

    def check(self, ffn: FFNRegion, head: str, tail: str) -> SplitFFNRegion | Skip:
        where = self._where(next(iter(ffn.linears.values())))
        if ffn.kind != "mlp":
            return Skip(where, f"a {ffn.kind} FFN split across {head} and {tail}",
                        "split FFNs are converted for Linear -> act -> Linear only")
        act_node = ffn.nodes[1]  # MLPRule's nodes: fc1, act, [dropout], fc2
        if (ops.owner_of(act_node) or "") != head:
            return Skip(where, f"the activation runs outside {head}", f"apply the activation inside {head}")
        others = _callers(self.parent, head.split(".")[0], self.method)
        if others:
            return Skip(where, f"{head} is also called from {', '.join(others)}, so its output may reach more than "
                               f"{tail}", f"call {head} only from {self.method}")
        head_gm, tail_gm = self.trace(self.parent.get_submodule(head)), self.trace(self.parent.get_submodule(tail))
        in_head = [n for n in ffn.nodes if (ops.owner_of(n) or "") == head]
        head_nodes = self._head_path(head_gm, _leaf(ffn.linears["fc1"], head),
                                     [(n.op, _leaf(n.target, head) if n.op == "call_module" else n.target)
                                      for n in in_head])
        if isinstance(head_nodes, str):
            return Skip(where, f"{head}'s forward is not just dense -> act: {head_nodes}",
                        f"move the extra computation out of {head}")
        tail_linear = self._tail_linear(tail_gm, _leaf(ffn.linears["fc2"], tail))
        if isinstance(tail_linear, str):
            return Skip(where, f"{tail}'s output Linear {tail_linear}",
                        f"make {tail}'s first input feed only its Linear")
        return SplitFFNRegion(ffn, head, tail, head_gm, tail_gm, head_nodes, tail_linear,
                              notes=[f"split FFN: {head} rewritten to identity, MoE installed in {tail}"])

    @staticmethod
    def _head_path(gm: fx.GraphModule, fc1: str, expected: list[tuple[str, object]]) -> list[fx.Node] | str:
        """The head's nodes from its only input to its output, or why the head is more than that.
        `expected`: (op, target) of the region's nodes the parent's trace shows in the head."""
        inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
        output = next(n for n in gm.graph.nodes if n.op == "output")
        body = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
        if len(inputs) != 1:
            return f"it takes {len(inputs)} inputs"
        if not body or body[0].op != "call_module" or body[0].target != fc1 or body[0].args != (inputs[0],):
            return f"it does not start with {fc1}(x)"
        if len(inputs[0].users) != 1:
            return "its input is used by more than its dense"
        if [(n.op, n.target) for n in body] != expected or output.args[0] is not body[-1]:
            return f"it computes {', '.join(n.name for n in body[len(expected):]) or 'a different output'} as well"
        if any(u not in body for n in body[:-1] for u in n.users):
            return "its hidden state is used outside dense -> act"
        return body

    @staticmethod
    def _tail_linear(gm: fx.GraphModule, fc2: str) -> fx.Node | str:
        inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
        calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == fc2]
        if not inputs or len(calls) != 1:
            return f"{fc2} is not called exactly once"
        if calls[0].args != (inputs[0],) or calls[0].kwargs:
            return f"{fc2} does not read the first input directly"
        if len(inputs[0].users) != 1:
            return f"{fc2}'s input is used elsewhere as well"
        return calls[0]
