"""Golden structure of the graph after RewriteToMoE (+ InsertAuxLoss, VerifyGraph) on a two-layer FFN."""

import pytest
import torch
from torch import nn

from moeify import MoEConfig
from moeify.capture import trace
from moeify.convert import dense_ffn
from moeify.errors import PostconditionError
from moeify.moe.build import build_moe_layer
from moeify.passes.find_ffn_regions import FindFFNRegions
from moeify.passes.infra import PassManager
from moeify.passes.insert_aux_loss import InsertAuxLoss
from moeify.passes.rewrite_to_moe import RewriteToMoE
from moeify.passes.verify_graph import VerifyGraph


class TwoFFN(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 8)
        self.up, self.down = nn.Linear(8, 32), nn.Linear(32, 8)

    def forward(self, x):
        x = x + self.fc2(torch.relu(self.fc1(x)))
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


def rewrite(module, cfg=None):
    cfg = cfg or MoEConfig(num_experts=4, top_k=2)
    gm = trace(module)
    regions = FindFFNRegions()(gm).analysis
    build = lambda region, g: build_moe_layer(cfg, dense_ffn(region, g))  # noqa: E731
    rewrite_pass = RewriteToMoE(regions, build)
    gm, log = PassManager([rewrite_pass, InsertAuxLoss(), VerifyGraph()])(gm)
    return gm, log, rewrite_pass


def test_golden_structure():
    gm, log, _ = rewrite(TwoFFN())
    calls = [(n.op, str(n.target)) for n in gm.graph.nodes if n.op in ("call_module", "call_function")]
    expected_layer = lambda name: [  # noqa: E731
        ("call_function", "<function flatten_tokens"),
        ("call_module", f"{name}.router"), ("call_module", f"{name}.dispatch"),
        ("call_function", "<built-in function getitem>"), ("call_function", "<built-in function getitem>"),
        ("call_function", "<built-in function getattr>"),
        ("call_module", f"{name}.experts"), ("call_module", f"{name}.combine"), ("call_module", f"{name}.aux"),
        ("call_function", "<function unflatten_tokens"),
    ]
    simplified = [(op, t.split(" at ")[0]) for op, t in calls]
    assert simplified == (expected_layer("moe_fc1") + [("call_function", "<built-in function add>")]
                          + expected_layer("moe_up") + [("call_function", "<built-in function add>")])
    # the dense modules are gone, the MoE layers are installed
    names = dict(gm.named_modules())
    assert "fc1" not in names and "down" not in names and "moe_fc1.experts" in names
    roles = [n.meta["moeify"]["role"] for n in gm.graph.nodes if "moeify" in n.meta]
    assert roles == ["flatten", "router", "dispatch", "experts", "combine", "aux", "unflatten"] * 2
    assert any("fc1 + fc2" in c and "moe_fc1" in c for c in log.changes)


def test_rewritten_graph_preserves_function():
    torch.manual_seed(0)
    module = TwoFFN()
    x = torch.randn(3, 5, 8)
    gm, _, _ = rewrite(module)
    torch.testing.assert_close(gm(x), module(x), atol=1e-5, rtol=1e-5)


def test_verify_refuses_layer_without_aux():
    gm = trace(TwoFFN())
    cfg = MoEConfig(num_experts=4, top_k=2)
    regions = FindFFNRegions()(gm).analysis
    RewriteToMoE(regions, lambda r, g: build_moe_layer(cfg, dense_ffn(r, g)))(gm)
    with pytest.raises(PostconditionError, match="no aux-loss node"):
        VerifyGraph()(gm)
