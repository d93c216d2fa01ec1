"""Rewrite each planned FFN region into an MoE subgraph.

    Linear -> act -> Linear   (or the gated form)
        =>  flatten -> moe.router -> moe.dispatch -> moe.experts -> moe.combine -> unflatten

The new `MoELayer` is installed at `<owner>.<name>` (`moe`, or `moe_<first linear>` when an owner
holds several regions); its children are called one graph node each, so the graph shows routing,
dispatch, expert compute and combine as separate steps. The dense Linear modules are removed.
Every emitted node carries `node.meta["moeify"] = {"layer": name, "role": ..., "site": ...}`. An FFN
that the forward calls at several places (one FFN applied at every depth) becomes one layer called
at each of them, numbered by `site`, so the MoE shares its weights as the dense FFN did.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch.fx as fx
from torch import nn

from moeify.errors import PostconditionError, PreconditionError
from moeify.moe.layer import MoELayer, flatten_tokens, unflatten_tokens
from moeify.passes import ops
from moeify.passes.find_ffn_regions import FFNRegion
from moeify.passes.infra import GraphPass, PassResult

MOE_ROLES = ("flatten", "router", "dispatch", "experts", "combine", "finish", "unflatten")


def layer_name(region: FFNRegion, regions_in_owner: int) -> str:
    first = next(iter(region.linears.values())).rpartition(".")[2]
    leaf = "moe" if regions_in_owner == 1 else f"moe_{first}"
    return f"{region.owner}.{leaf}" if region.owner else leaf


def emit_moe_subgraph(graph: fx.Graph, name: str, layer: MoELayer, x: fx.Node, site: int = 0) -> fx.Node:
    """Append the MoE steps for `layer` (installed at `name`) reading `x`; returns the output node.
    `site` numbers the places of one graph that call the same layer (its meta tells them apart)."""

    def tag(node: fx.Node, role: str) -> fx.Node:
        node.meta["moeify"] = {"layer": name, "role": role, "site": site}
        return node

    x_TD = tag(graph.call_function(flatten_tokens, (x, layer.d_model)), "flatten")
    routing = tag(graph.call_module(f"{name}.router", (x_TD, x)), "router")  # x: the token mask's layout check
    dispatched = tag(graph.call_module(f"{name}.dispatch", (x_TD, routing)), "dispatch")
    x_ND = graph.call_function(operator.getitem, (dispatched, 0))
    plan = graph.call_function(operator.getitem, (dispatched, 1))
    counts_E = graph.call_function(getattr, (plan, "counts_E"))
    y_ND = tag(graph.call_module(f"{name}.experts", (x_ND, counts_E)), "experts")
    y_TD = tag(graph.call_module(f"{name}.combine", (y_ND, plan)), "combine")
    if layer.shared is not None:
        moe = graph.get_attr(name)
        y_TD = tag(graph.call_method("finish", (moe, y_TD, x_TD)), "finish")
    return tag(graph.call_function(unflatten_tokens, (y_TD, x)), "unflatten")


def _remove_submodule(gm: fx.GraphModule, target: str) -> None:
    parent_name, _, leaf = target.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    if leaf in parent._modules:
        del parent._modules[leaf]


class RewriteToMoE(GraphPass):
    """Replace `regions` (found on this same graph) by MoE subgraphs built by `build_layer`."""

    def __init__(self, regions: list[FFNRegion], build_layer: Callable[[FFNRegion, fx.GraphModule], MoELayer]):
        self.regions = list(regions)
        self.build_layer = build_layer
        self.installed: dict[str, MoELayer] = {}  # layer name -> layer, in region order, filled by call()

    def requires(self, gm: fx.GraphModule) -> None:
        graph_nodes = set(gm.graph.nodes)
        for region in self.regions:
            if not set(region.nodes) <= graph_nodes:
                raise PreconditionError(f"region {region.key} was found on another graph: run FindFFNRegions on "
                                        "the graph you rewrite")

    def call(self, gm: fx.GraphModule) -> PassResult:
        # a region called at several places of the graph (one FFN applied at every depth, its weights
        # shared): one layer, called at each of them, so the MoE shares its weights as the dense FFN did
        sites: dict[tuple[str, ...], list[FFNRegion]] = {}
        for region in self.regions:
            sites.setdefault(region.key, []).append(region)
        per_owner: dict[str, int] = {}
        for first, *_ in sites.values():
            per_owner[first.owner] = per_owner.get(first.owner, 0) + 1
        changes = []
        for first, *others in sites.values():
            name = layer_name(first, per_owner[first.owner])
            layer = self.build_layer(first, gm)
            layer.aux.calls_per_forward = 1 + len(others)  # its aux losses: summed over every place
            gm.add_submodule(name, layer)
            for site, region in enumerate((first, *others)):
                self._replace(gm, region, name, layer, site)
            for target in first.linears.values():
                for node in ops.reads_of(gm, target):  # reads the trace left unused (FindFFNRegions refuses used ones)
                    if not node.users:
                        gm.graph.erase_node(node)
                _remove_submodule(gm, target)
            self.installed[name] = layer
            linears = " + ".join(first.linears.values())
            where = f", called at {1 + len(others)} places (weights shared as in the dense model)" if others else ""
            changes.append(f"{linears} ({first.describe()}) -> {name}: {layer.num_experts} experts, "
                           f"top-{getattr(layer.router, 'top_k', '?')} {type(layer.router).__name__}{where}")
        return PassResult(gm, modified=bool(self.regions), changes=changes)

    @staticmethod
    def _replace(gm: fx.GraphModule, region: FFNRegion, name: str, layer: MoELayer, site: int) -> None:
        with gm.graph.inserting_before(region.output):
            out = emit_moe_subgraph(gm.graph, name, layer, region.input, site)
        region.output.replace_all_uses_with(out)
        inputs = [i for node in region.nodes for i in node.all_input_nodes if i not in region.nodes]
        for node in reversed(region.nodes):
            gm.graph.erase_node(node)
        _erase_unused_mode_reads(gm.graph, inputs)

    def ensures(self, gm: fx.GraphModule) -> None:
        targets = {n.target for n in gm.graph.nodes if n.op == "call_module"}
        for region in self.regions:
            leftover = targets.intersection(region.linears.values())
            if leftover:
                raise PostconditionError(f"dense modules {sorted(leftover)} are still called after the rewrite")
        for name in self.installed:
            if not isinstance(gm.get_submodule(name), nn.Module):
                raise PostconditionError(f"MoE layer {name} was not installed")


def _erase_unused_mode_reads(graph: fx.Graph, nodes: list[fx.Node]) -> None:
    """Drop the reads of `self.training` that only the erased region used (its dropout's mode)."""
    pending, erased = list(dict.fromkeys(nodes)), set()
    while pending:
        node = pending.pop()
        if node in erased or node.users or not ops.is_mode_read(node):
            continue
        pending += node.all_input_nodes
        graph.erase_node(node)
        erased.add(node)


def moe_layers(gm: fx.GraphModule) -> dict[str, MoELayer]:
    """The MoE layers a rewritten graph calls, by name."""
    names = {n.meta["moeify"]["layer"] for n in gm.graph.nodes if "moeify" in n.meta}
    return {name: gm.get_submodule(name) for name in sorted(names)}


__all__ = ["MOE_ROLES", "RewriteToMoE", "emit_moe_subgraph", "layer_name", "moe_layers"]
