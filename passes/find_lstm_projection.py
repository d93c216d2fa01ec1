"""Rule: the projection between two stacked LSTM layers (Shazeer et al. 2017, §5).

    LSTM_a(x)[0] -> [Dropout] -> Linear -> [Dropout] -> LSTM_b     => FFNRegion(kind="projection")

The MoE replaces the single Linear with an MoE of projections applied to every time step at once
(batch x time flattened into tokens, "taking advantage of convolutionality"). A Linear -> act ->
Linear between LSTMs is an ordinary FFN and is matched by `MLPRule`.

Refusals: `nn.LSTM(proj_size>0)` keeps its projection inside the fused LSTM kernel, so there is no
graph node to replace; a Linear reading an LSTM output but not feeding another LSTM is left alone
(it is usually the softmax's decoder).
"""

from __future__ import annotations

import operator

import torch.fx as fx
from torch import nn

from moeify.passes import ops
from moeify.passes.find_ffn_regions import FFNRegion, common_owner, skip_passthrough
from moeify.passes.infra import Skip


def lstm_of(node: fx.Node, gm: fx.GraphModule) -> nn.LSTM | None:
    module = ops.call_module(node, gm)
    return module if isinstance(module, nn.LSTM) else None


def _step_dropouts_back(node: fx.Node, gm: fx.GraphModule) -> tuple[fx.Node, list[fx.Node]]:
    drops = []
    while ops.dropout_p(node, gm) is not None and node.args and isinstance(node.args[0], fx.Node):
        drops.append(node)
        node = node.args[0]
    return node, drops


def _lstm_output(node: fx.Node, gm: fx.GraphModule) -> fx.Node | None:
    """The LSTM call whose output sequence `node` is (`lstm(x)[0]`), else None."""
    if node.op == "call_function" and node.target is operator.getitem and node.args[1] == 0:
        src = node.args[0]
        if isinstance(src, fx.Node) and lstm_of(src, gm) is not None:
            return src
    return None


class LSTMProjectionRule:
    """A Linear whose input is an LSTM's output sequence and whose output feeds another LSTM."""

    kind = "projection"

    def match(self, node: fx.Node, gm: fx.GraphModule) -> FFNRegion | Skip | None:
        lstm = lstm_of(node, gm)
        if lstm is not None:
            if lstm.proj_size > 0:
                return Skip(str(node.target), f"nn.LSTM(proj_size={lstm.proj_size}) keeps its projection inside the "
                                              "fused LSTM kernel; there is no separate Linear to turn into experts",
                            "use proj_size=0 and an nn.Linear between the LSTM layers")
            return None
        params = ops.linear_of(node, gm)
        if params is None or len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            return None
        source, _ = _step_dropouts_back(node.args[0], gm)
        if _lstm_output(source, gm) is None:
            return None  # not between LSTMs: other rules (or the unclaimed-Linear report) speak for it
        user, _, drops = skip_passthrough(node, gm)
        where = str(node.target)
        feeds = drops[-1] if drops else node
        if user is None or lstm_of(user, gm) is None or not user.args or user.args[0] is not feeds:
            return Skip(where, "reads an LSTM output but does not feed another LSTM's input",
                        "only the projection between stacked LSTM layers becomes an MoE of projections")
        nodes = [node]
        return FFNRegion(self.kind, common_owner(nodes), node.args[0], node, nodes, {"proj": where}, None,
                         params.in_features, 0, params.out_features, params.bias is not None,
                         notes=[f"projection between LSTMs {source.args[0].target} -> {user.target}"])
