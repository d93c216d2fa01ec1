"""Insert the auxiliary-loss plumbing after each MoE router.

    moe.router -> ... -> moe.combine     =>   moe.router -> ... -> moe.combine -> moe.aux(routing, plan)

`moe.aux` (an `AuxLossRecorder`) keeps the weighted losses and router statistics of the last
forward on the layer itself, where `moeify.aux_loss(model)` collects them: losses flow through the
model, never through module globals. The node is impure, so dead-code elimination keeps it.
"""

from __future__ import annotations

import torch.fx as fx

from moeify.errors import PostconditionError
from moeify.passes.infra import GraphPass, PassResult, Skip


def _role(node: fx.Node) -> str | None:
    return node.meta.get("moeify", {}).get("role")


def _site(node: fx.Node) -> tuple[str, int]:
    info = node.meta["moeify"]
    return info["layer"], info.get("site", 0)


class InsertAuxLoss(GraphPass):
    def call(self, gm: fx.GraphModule) -> PassResult:
        # (layer, site): a layer the graph calls at several places gets an aux node after each
        routers = {_site(n): n for n in gm.graph.nodes if _role(n) == "router"}
        combines = {_site(n): n for n in gm.graph.nodes if _role(n) == "combine"}
        have_aux = {n.meta["moeify"]["layer"] for n in gm.graph.nodes if _role(n) == "aux"}
        changes, skipped = [], []
        for (name, site), router in routers.items():
            if name in have_aux:
                if site == 0:
                    skipped.append(Skip(name, "already has an aux-loss node"))
                continue
            with gm.graph.inserting_after(combines[name, site]):
                aux = gm.graph.call_module(f"{name}.aux", (router, combines[name, site].args[1]))
            aux.meta["moeify"] = {"layer": name, "role": "aux", "site": site}
            if site == 0:
                changes.append(f"{name}: aux losses {sorted(gm.get_submodule(name).aux.coefs)} recorded on {name}.aux")
        return PassResult(gm, modified=bool(changes), changes=changes, skipped=skipped)

    def ensures(self, gm: fx.GraphModule) -> None:
        routers = {n.meta["moeify"]["layer"] for n in gm.graph.nodes if _role(n) == "router"}
        have_aux = {n.meta["moeify"]["layer"] for n in gm.graph.nodes if _role(n) == "aux"}
        if routers - have_aux:
            raise PostconditionError(f"MoE layers without aux-loss node: {sorted(routers - have_aux)}")
