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


class InsertAuxLoss(GraphPass):
    def call(self, gm: fx.GraphModule) -> PassResult:
        routers = {n.meta["moeify"]["layer"]: n for n in gm.graph.nodes if _role(n) == "router"}
        have_aux = {n.meta["moeify"]["layer"] for n in gm.graph.nodes if _role(n) == "aux"}
        changes, skipped = [], []
        for name, router in routers.items():
            if name in have_aux:
                skipped.append(Skip(name, "already has an aux-loss node"))
                continue
            combine = next(n for n in gm.graph.nodes if _role(n) == "combine" and n.meta["moeify"]["layer"] == name)
            plan = combine.args[1]
            with gm.graph.inserting_after(combine):
                aux = gm.graph.call_module(f"{name}.aux", (router, plan))
            aux.meta["moeify"] = {"layer": name, "role": "aux"}
            changes.append(f"{name}: aux losses {sorted(gm.get_submodule(name).aux.coefs)} recorded on {name}.aux")
        return PassResult(gm, modified=bool(changes), changes=changes, skipped=skipped)

    def ensures(self, gm: fx.GraphModule) -> None:
        routers = {n.meta["moeify"]["layer"] for n in gm.graph.nodes if _role(n) == "router"}
        have_aux = {n.meta["moeify"]["layer"] for n in gm.graph.nodes if _role(n) == "aux"}
        if routers - have_aux:
            raise PostconditionError(f"MoE layers without aux-loss node: {sorted(routers - have_aux)}")
