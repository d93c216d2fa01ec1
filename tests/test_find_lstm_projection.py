"""LSTMProjectionRule: the Linear between stacked LSTMs becomes an MoE of projections."""

from __future__ import annotations

import math
import operator
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import load_example
from torch import nn

import moeify
from moeify.capture import trace
from moeify.moe.projection import ProjectionExperts
from moeify.passes.find_ffn_regions import FindFFNRegions
from moeify.passes.find_lstm_projection import LSTMProjectionRule

warnings.filterwarnings("ignore", message="LSTM with projections")


def _lm(**kwargs):
    return load_example("lstm_lm").build_model(**kwargs)


def test_region_found_between_the_lstms():
    gm = trace(_lm())
    regions = FindFFNRegions()(gm).analysis
    assert len(regions) == 1
    region = regions[0]
    assert (region.kind, region.linears, region.owner) == ("projection", {"proj": "between"}, "")
    assert [n.target for n in region.nodes] == ["between"]
    assert region.input.op == "call_module" and region.input.target == "drop"  # dropout before the Linear
    assert region.input.args[0].target is operator.getitem
    assert (region.d_model, region.d_out) == (48, 32)


def test_graph_after_rewrite_routes_every_time_step():
    dense = _lm()
    result = moeify.convert(dense, moeify.MoEConfig(num_experts=4, top_k=2))
    gm = result.model._moeify_graph_module
    called = [n.target if n.op == "call_module" else n.target.__name__ for n in gm.graph.nodes
              if n.op == "call_module" or (n.op == "call_function" and n.target not in (operator.getitem, getattr))]
    assert called == ["embed", "lstm1", "drop", "flatten_tokens", "moe.router", "moe.dispatch", "moe.experts",
                      "moe.combine", "moe.aux", "unflatten_tokens", "lstm2", "drop", "decoder"]
    assert "between" not in dict(result.model.named_modules())
    assert isinstance(result.model.moe.experts, ProjectionExperts)


def test_projection_experts_match_a_per_token_loop():
    torch.manual_seed(0)
    experts = ProjectionExperts(3, 6, 5, backend="loop")
    nn.init.normal_(experts.b_EO)
    x_ND, counts_E = torch.randn(7, 6), torch.tensor([2, 0, 5])
    owner = [0, 0, 2, 2, 2, 2, 2]
    expected = torch.stack([x_ND[i] @ experts.w_EOD[e].T + experts.b_EO[e] for i, e in enumerate(owner)])
    torch.testing.assert_close(experts(x_ND, counts_E), expected)
    torch.testing.assert_close(experts.forward_dense(x_ND, 1), F.linear(x_ND, experts.w_EOD[1], experts.b_EO[1]))


def test_decoder_after_the_last_lstm_is_refused():
    gm = trace(_lm())
    decoder = next(n for n in gm.graph.nodes if n.target == "decoder")
    skip = LSTMProjectionRule().match(decoder, gm)
    assert "does not feed another LSTM" in skip.reason


def test_linear_not_after_an_lstm_is_not_this_rules_business():
    gm = trace(nn.Sequential(nn.Linear(4, 4), nn.LSTM(4, 4)))
    assert LSTMProjectionRule().match(next(n for n in gm.graph.nodes if n.target == "0"), gm) is None


@pytest.mark.parametrize("proj_size", [8, 16])
def test_lstm_with_proj_size_is_skipped_with_the_reason(proj_size):
    gm = trace(_lm(proj_size=proj_size))
    result = FindFFNRegions()(gm)
    skip = next(s for s in result.skipped if s.where == "lstm1")
    assert f"proj_size={proj_size}" in skip.reason and "fused LSTM kernel" in skip.reason
    assert "proj_size=0" in skip.fix


@pytest.mark.parametrize("ffn", [False, True], ids=["projection", "ffn"])
def test_lstm_lm_with_experts_apart_equals_an_moe_at_every_time_step(ffn):
    """Shazeer §5: the MoE between the LSTMs applies to every (batch, time) position on its own. With the
    router and experts moved off their init, the converted model's logits equal a loop over positions
    that mixes each position's top-2 experts by their softmax gates, then runs lstm2 and the decoder."""
    dense = _lm(ffn=ffn)
    ids = torch.randint(0, 100, (3, 7), generator=torch.Generator().manual_seed(1))
    model = moeify.convert(dense, moeify.MoEConfig(num_experts=4, top_k=2), example_inputs=(ids,)).model.eval()
    (layer,) = moeify.moe_layers(model).values()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        layer.router.gate.weight.normal_(0, 1.0, generator=g)
        for p in layer.experts.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    ex = layer.experts

    def expert(i, v):
        if not ffn:
            return ex.w_EOD[i].double() @ v + ex.b_EO[i].double()
        hidden = torch.relu(ex.w1_EFD[i].double() @ v + ex.b1_EF[i].double())
        return ex.w2_EDF[i].double() @ hidden + ex.b2_ED[i].double()

    with torch.no_grad():
        got = model(ids)
        h, _ = model.lstm1(model.embed(ids))
        mid = torch.zeros(*h.shape[:2], dense.lstm2.input_size, dtype=torch.float64)
        for b in range(h.shape[0]):
            for s in range(h.shape[1]):
                v = h[b, s].double()
                logits = layer.router.gate.weight.double() @ v
                top = torch.topk(logits, 2).indices.tolist()
                z = sum(math.exp(logits[i]) for i in top)
                for i in top:
                    mid[b, s] += math.exp(logits[i]) / z * expert(i, v)
        want = model.decoder(model.lstm2(mid.float())[0])
        moved = (got - dense(ids)).abs().max()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert moved > 1e-3  # the experts' changes reach the logits: the check can fail


def test_an_ffn_between_lstms_of_other_widths_is_not_called_a_head():
    """Between LSTMs of hidden size 48 and input size 32 the FFN maps 48 -> 32, as a head would: it was noted
    as one. A Linear -> ReLU -> Linear after the last LSTM of such a model still is."""
    torch.manual_seed(0)

    class TwoLSTMs(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm1, self.lstm2 = nn.LSTM(32, 48, batch_first=True), nn.LSTM(32, 48, batch_first=True)
            self.between = nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 32))
            self.head = nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 5))

        def forward(self, x):
            return self.head(self.lstm2(self.between(self.lstm1(x)[0]))[0])

    dense = TwoLSTMs().eval()
    x = torch.randn(2, 5, 32)
    report = moeify.convert(dense, moeify.MoEConfig(num_experts=2, top_k=1), example_inputs=(x,)).report
    notes = {r.owner: r.notes for r in report.regions}
    assert not any("may be a head" in n for n in notes["between"])
    assert any("may be a head" in n for n in notes["head"])


def test_an_ffn_between_lstms_is_converted_beside_a_block_stack():
    """With repeated blocks elsewhere in the model (`blocks.0.mlp`), convert's task-head rule skipped the FFN
    between the LSTMs (48 -> 32) as a head, though the find pass had exempted it; the rule now reads the
    pass's decision. A widening FFN after the last LSTM is still left dense as a head."""
    torch.manual_seed(0)

    class BlocksThenLSTMs(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.ModuleDict({"mlp": nn.Sequential(nn.Linear(32, 64), nn.ReLU(),
                                                                              nn.Linear(64, 32))}) for _ in range(2)])
            self.lstm1, self.lstm2 = nn.LSTM(32, 48, batch_first=True), nn.LSTM(32, 48, batch_first=True)
            self.between = nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 32))
            self.head = nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 5))

        def forward(self, x):
            for block in self.blocks:
                x = x + block["mlp"](x)
            return self.head(self.lstm2(self.between(self.lstm1(x)[0]))[0])

    result = moeify.convert(BlocksThenLSTMs().eval(), moeify.MoEConfig(num_experts=2, top_k=1),
                            example_inputs=(torch.randn(2, 5, 32),))
    assert sorted(r.owner for r in result.report.regions) == ["between", "blocks.0.mlp", "blocks.1.mlp"]
    assert any(s.where == "head" and "a task head" in s.reason for s in result.report.skipped)
