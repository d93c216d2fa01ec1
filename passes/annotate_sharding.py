"""Annotate each MoE subgraph with how it is laid out under expert parallelism (the graph is not changed).

    moe.<role> node   =>   the same node with node.meta["moeify_sharding"] = {...}

Mesh dimensions: "ep" (expert parallel: experts are split across its ranks, tokens are exchanged
with an all-to-all) and "dp" (data parallel: each rank has its own tokens; dense parameters are
replicated and their gradients averaged). Schema, per role (version `SHARDING_VERSION`):

    flatten, unflatten  {"placement": "data_parallel", "mesh_dim": "dp"}          tokens split by rank
    router              {"placement": "replicate", "params": {"gate.weight": "replicate", ...}}
    dispatch            {"placement": "collective", "collective": "all_to_all", "mesh_dim": "ep",
                         "exchange": ["counts_E", "x_ND"]}                        counts first, then rows
    experts             {"placement": "shard", "mesh_dim": "ep",
                         "params": {"w1_EFD": {"dim": 0, "mesh_dim": "ep"}, ...}} every expert tensor on E
    combine             {"placement": "collective", "collective": "all_to_all", "mesh_dim": "ep",
                         "exchange": ["y_ND"]}                                    rows back to their tokens
    aux                 {"placement": "local", "reduction": "local_batch"}        each rank's own tokens
    finish              {"placement": "replicate", "params": {...}}               shared experts, dense

`moeify.distributed` reads these annotations to decide which parameters to slice and which
children to swap for all-to-all versions; every value is plain JSON so the conversion report
can carry it (`RegionReport.sharding`).
"""

from __future__ import annotations

import torch.fx as fx

from moeify.errors import PostconditionError
from moeify.passes.infra import GraphPass, PassResult, Skip

SHARDING_VERSION = 1
META_KEY = "moeify_sharding"
EP, DP = "ep", "dp"


def _param_names(module) -> list[str]:
    return [name for name, _ in module.named_parameters()]


def annotation_for(role: str, layer) -> dict | None:
    """The sharding annotation of an MoE node with `role` in `layer` (an `MoELayer`); None: unknown role."""
    if role in ("flatten", "unflatten"):
        return {"placement": "data_parallel", "mesh_dim": DP}
    if role == "router":
        return {"placement": "replicate", "params": {n: "replicate" for n in _param_names(layer.router)}}
    if role == "dispatch":
        return {"placement": "collective", "collective": "all_to_all", "mesh_dim": EP,
                "exchange": ["counts_E", "x_ND"]}
    if role == "experts":
        # every GroupedExperts tensor has E first (w1_EFD, w2_EDF, b1_EF, ...): shard dim 0
        return {"placement": "shard", "mesh_dim": EP,
                "params": {n: {"dim": 0, "mesh_dim": EP} for n in _param_names(layer.experts)}}
    if role == "combine":
        return {"placement": "collective", "collective": "all_to_all", "mesh_dim": EP, "exchange": ["y_ND"]}
    if role == "aux":
        return {"placement": "local", "reduction": "local_batch"}
    if role == "finish":
        shared = layer.shared
        return {"placement": "replicate",
                "params": {n: "replicate" for n in (_param_names(shared) if shared is not None else [])}}
    return None


def layer_sharding(gm: fx.GraphModule, layer: str) -> dict[str, dict]:
    """{role: annotation} of one annotated MoE layer of `gm` (what the conversion report shows)."""
    return {n.meta["moeify"]["role"]: n.meta[META_KEY] for n in gm.graph.nodes
            if n.meta.get("moeify", {}).get("layer") == layer and META_KEY in n.meta}


class AnnotateSharding(GraphPass):
    """Tag every node of every MoE subgraph with its expert-parallel layout."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        changes: list[str] = []
        skipped: list[Skip] = []
        per_layer: dict[str, list[str]] = {}
        for node in gm.graph.nodes:
            info = node.meta.get("moeify")
            if not info:
                continue
            layer = gm.get_submodule(info["layer"])
            note = annotation_for(info["role"], layer)
            if note is None:
                skipped.append(Skip(f"{info['layer']} node {node.name}", f"no sharding rule for role {info['role']!r}",
                                    "add the role to moeify.passes.annotate_sharding.annotation_for"))
                continue
            node.meta[META_KEY] = {"version": SHARDING_VERSION, **note}
            per_layer.setdefault(info["layer"], []).append(info["role"])
        for name in per_layer:
            experts = ", ".join(_param_names(gm.get_submodule(name).experts))
            changes.append(f"{name}: experts ({experts}) sharded on dim 0 over '{EP}'; all-to-all at dispatch and "
                           f"combine over '{EP}'; router replicated; tokens data-parallel over '{DP}'")
        # meta only: the code is unchanged, so no recompile is needed (modified=False)
        return PassResult(gm, modified=False, changes=changes, skipped=skipped)

    def ensures(self, gm: fx.GraphModule) -> None:
        for node in gm.graph.nodes:
            info = node.meta.get("moeify")
            if info and info["role"] in ("dispatch", "experts", "combine") and META_KEY not in node.meta:
                raise PostconditionError(f"MoE node {node.name} ({info['layer']} {info['role']}) has no sharding "
                                         "annotation")
