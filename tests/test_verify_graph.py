import pytest

from moeify.capture import trace
from moeify.errors import PostconditionError
from moeify.passes.verify_graph import VerifyGraph
from tests.test_rewrite_to_moe import TwoFFN, rewrite


def test_accepts_rewritten_graph():
    gm, _, _ = rewrite(TwoFFN())
    assert VerifyGraph()(gm).changes == ["verified 2 MoE layer(s)"]


def test_rejects_missing_step():
    gm, _, _ = rewrite(TwoFFN())
    node = next(n for n in gm.graph.nodes if n.meta.get("moeify", {}).get("role") == "combine")
    node.meta["moeify"] = {"layer": node.meta["moeify"]["layer"], "role": "something-else"}
    with pytest.raises(PostconditionError, match="expected"):
        VerifyGraph()(gm)


def test_dense_graph_has_nothing_to_verify():
    assert VerifyGraph()(trace(TwoFFN())).changes == ["verified 0 MoE layer(s)"]
