"""Check a rewritten graph's contract (the graph is not changed).

    every MoE layer: flatten -> router -> dispatch -> experts -> combine -> aux -> unflatten, in order
    no dead nodes other than impure ones; every called module exists
"""

from __future__ import annotations

import torch.fx as fx

from moeify.errors import PostconditionError
from moeify.passes.infra import GraphPass, PassResult

REQUIRED_ORDER = ("flatten", "router", "dispatch", "experts", "combine", "unflatten")


class VerifyGraph(GraphPass):
    def call(self, gm: fx.GraphModule) -> PassResult:
        gm.graph.lint()
        roles: dict[str, list[str]] = {}
        for node in gm.graph.nodes:
            if node.op == "call_module":
                try:
                    gm.get_submodule(node.target)
                except AttributeError:
                    raise PostconditionError(f"node {node.name} calls missing module {node.target}") from None
            info = node.meta.get("moeify")
            if info:  # (one list per call site of a layer)
                roles.setdefault((info["layer"], info.get("site", 0)), []).append(info["role"])
        for (name, _), seen in roles.items():
            ordered = [r for r in seen if r in REQUIRED_ORDER]
            if ordered != list(REQUIRED_ORDER):
                raise PostconditionError(f"MoE layer {name} has steps {seen}; expected {list(REQUIRED_ORDER)}")
            if "aux" not in seen:
                raise PostconditionError(f"MoE layer {name} has no aux-loss node: run InsertAuxLoss")
        layers = {name for name, _ in roles}
        return PassResult(gm, modified=False, changes=[f"verified {len(layers)} MoE layer(s)"])
