"""FindSplitFFN: a dense -> act -> dense path split across sibling modules (BERT), found on a trace
of the parent's helper method; the head becomes identity and the tail's Linear becomes the MoE."""

from __future__ import annotations

import operator

import pytest
import torch
from conftest import load_example
from torch import nn

import moeify
from moeify.capture import (
    MAX_FLAGS,
    capture_methods,
    capture_units,
    capture_wired,
    helper_methods,
    trace,
    trace_method,
    trace_paths,
)
from moeify.errors import CaptureError, NoFFNRegionError
from moeify.passes.find_split_ffn import FindSplitFFN


class Head(nn.Module):  # BertIntermediate's shape
    def __init__(self, extra: bool = False):
        super().__init__()
        self.dense, self.act, self.extra = nn.Linear(8, 32), nn.GELU(), extra

    def forward(self, x):
        return self.act(self.dense(x * 0.5 if self.extra else x))


class Tail(nn.Module):  # BertOutput's shape
    def __init__(self, drop_first: bool = False):
        super().__init__()
        self.dense, self.drop, self.norm = nn.Linear(32, 8), nn.Dropout(0.1), nn.LayerNorm(8)
        self.drop_first = drop_first

    def forward(self, h, residual):
        if self.drop_first:  # dropout on the hidden layer: it would belong inside the experts
            return self.norm(self.dense(self.drop(h)) + residual)
        return self.norm(self.drop(self.dense(h)) + residual)


class Layer(nn.Module):
    """Its forward does not fx-trace (data-dependent branch); `ffn` wires head into tail."""

    def __init__(self, head=None, tail=None):
        super().__init__()
        self.attn = nn.Linear(8, 8)
        self.intermediate, self.output = head or Head(), tail or Tail()

    def ffn(self, x):
        return self.output(self.intermediate(x), x)

    def forward(self, x):
        if x.sum() > 1e9:  # breaks symbolic tracing, as HF attention does
            x = x * 0
        return self.ffn(self.attn(x))


class LeakyLayer(Layer):
    """Also uses the head's output outside `ffn`: converting the split would change that use."""

    def forward(self, x):
        return super().forward(x + self.intermediate(x)[..., :8])


def _find(layer):
    gm = trace_method(layer, "ffn")
    return FindSplitFFN(layer, "ffn", trace)(gm)


def test_helper_methods_are_those_calling_two_children():
    assert helper_methods(Layer()) == ["ffn"]
    layer = Layer()
    cap = capture_units(layer)
    capture_methods(layer, cap)
    assert "<model>" in dict(cap.failures)  # the forward does not trace ...
    assert [(u.path, u.method) for u in cap.units if u.method] == [("", "ffn")]  # ... the helper does


def test_region_found_across_siblings():
    result = _find(Layer())
    assert len(result.analysis) == 1 and not result.skipped
    split = result.analysis[0]
    assert (split.head, split.tail, split.owner, split.kind) == ("intermediate", "output", "output", "mlp")
    assert split.linears == {"fc1": "intermediate.dense", "fc2": "output.dense"}
    assert [n.target for n in split.head_nodes] == ["dense", "act"]
    assert split.tail_linear.target == "dense" and split.tail_linear.args[0].op == "placeholder"


def test_graphs_after_the_rewrite():
    torch.manual_seed(0)
    dense = Layer().eval()
    x = torch.randn(3, 5, 8)
    result = moeify.convert(dense, moeify.MoEConfig(num_experts=4, top_k=2), example_inputs=(x,))
    head = result.model.intermediate._moeify_graph_module.graph
    assert [n.op for n in head.nodes] == ["placeholder", "output"]
    assert list(head.nodes)[1].args[0] is list(head.nodes)[0]  # identity
    tail = result.model.output._moeify_graph_module
    called = [n.target if n.op == "call_module" else getattr(n.target, "__name__", n.target) for n in tail.graph.nodes
              if n.op in ("call_module", "call_function") and n.target not in (operator.getitem, getattr)]
    assert called == ["flatten_tokens", "moe.router", "moe.dispatch", "moe.experts", "moe.combine", "moe.aux",
                      "unflatten_tokens", "drop", "add", "norm"]
    assert "dense" not in result.model.intermediate._modules and "dense" not in result.model.output._modules
    assert [r.name for r in result.report.regions] == ["output.moe"]
    assert "fx: method <model>.ffn()" in result.report.regions[0].capture
    with torch.no_grad():
        assert (dense(x) - result.model(x)).abs().max().item() < 1e-5


@pytest.mark.parametrize(("layer", "reason"), [
    (lambda: Layer(head=Head(extra=True)), "intermediate's forward is not just dense -> act: it does not start"),
    (lambda: Layer(tail=Tail(drop_first=True)), "output's output Linear dense does not read the first input"),
    (LeakyLayer, "intermediate is also called from LeakyLayer.forward"),
])
def test_refusals_say_why(layer, reason):
    result = _find(layer())
    assert not result.analysis
    assert len(result.skipped) == 1 and reason in result.skipped[0].reason
    assert result.skipped[0].where == "intermediate.dense"


def test_bert_split_regions_and_residual_layernorm_kept():
    bert = load_example("hf_bert").build_model(num_layers=2)
    layer = bert.encoder.layer[0]
    result = FindSplitFFN(layer, "feed_forward_chunk", trace, prefix="encoder.layer.0")(
        trace_method(layer, "feed_forward_chunk"))
    (split,) = result.analysis
    assert (split.head, split.tail, split.activation, split.d_ff) == ("intermediate", "output", "gelu", 128)
    tail_ops = [n.target for n in split.tail_gm.graph.nodes if n.op == "call_module"]
    assert tail_ops == ["dense", "dropout", "LayerNorm"]


class Attention(nn.Module):
    """A child whose forward does not fx-trace (data-dependent branch), as HF attention."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return self.proj(x * 0 if x.sum() > 1e9 else x)


class WiredLayer(nn.Module):
    """DeBERTa's and MPNet's shape: no helper method, the forward itself wires head into tail, and a
    flag input chooses what else it returns; with `leak`, the head's output is one of those."""

    def __init__(self, leak: bool = False):
        super().__init__()
        self.attention, self.intermediate, self.output, self.leak = Attention(), Head(), Tail(), leak

    def forward(self, x, return_hidden: bool = False):
        a = self.attention(x)
        h = self.intermediate(a)
        out = self.output(h, a)
        if return_hidden:
            return out, (h if self.leak else a)
        return out


def test_a_forward_wiring_the_halves_is_traced_with_untraceable_children_opaque():
    torch.manual_seed(0)
    dense = WiredLayer().eval()
    x = torch.randn(3, 5, 8)
    result = moeify.convert(dense, moeify.MoEConfig(num_experts=4, top_k=2), example_inputs=(x,))
    (region,) = result.report.regions
    assert region.name == "output.moe"
    assert region.capture.startswith("fx: forward of <model>, children that do not trace opaque; split")
    with torch.no_grad():  # the forward itself is not rewritten: both paths run as before
        torch.testing.assert_close(result.model(x), dense(x), atol=1e-5, rtol=1e-5)
        for got, want in zip(result.model(x, return_hidden=True), dense(x, return_hidden=True), strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_trace_paths_traces_every_combination_of_flags():
    graphs = trace_paths(WiredLayer())
    outputs = [next(n for n in gm.graph.nodes if n.op == "output").args[0] for gm in graphs]
    assert isinstance(outputs[0], torch.fx.Node) and isinstance(outputs[1], tuple)  # default first, then set

    class ManyFlags(WiredLayer):
        def forward(self, x, a: bool = False, b: bool = False, c: bool = True, d: bool = False):
            return super().forward(x)

    with pytest.raises(CaptureError, match=f"takes {MAX_FLAGS + 1} flag inputs"):
        trace_paths(ManyFlags())


def test_a_split_wired_otherwise_when_a_flag_is_set_is_refused():
    with pytest.raises(NoFFNRegionError, match="wires intermediate into output differently when a flag input is set"):
        moeify.convert(WiredLayer(leak=True), moeify.MoEConfig(num_experts=4, top_k=2),
                       example_inputs=(torch.randn(3, 5, 8),))


class NoHeadLayer(nn.Module):
    """Wires two children that hold Linears, but neither returns an activated Linear (attention and
    its output projection, as in BERT's attention block)."""

    def __init__(self):
        super().__init__()
        self.attention, self.output = Attention(), Tail()

    def forward(self, x):
        a = self.attention(x)
        return self.output(a.repeat(1, 1, 4), a)


@pytest.mark.parametrize(("layer", "wired"), [(WiredLayer, True), (NoHeadLayer, False), (Layer, False)])
def test_only_a_forward_calling_a_head_like_child_is_traced_wired(layer, wired):
    """Tracing a forward around its untraceable children costs a trace per flag value: it is tried
    only where a child's own trace returns `dense -> act` and no helper method shows the wiring."""
    model = layer()
    cap = capture_units(model)
    capture_methods(model, cap)
    capture_wired(model, cap)
    assert any(u.method == "forward" for u in cap.units) is wired


class FFNBlock(nn.Module):
    """MobileBERT's FFNLayer: a split FFN whose own forward traces."""

    def __init__(self):
        super().__init__()
        self.intermediate, self.output = Head(), Tail()

    def forward(self, x):
        return self.output(self.intermediate(x), x)


class StackedLayer(nn.Module):
    """MobileBERT's layer: an untraceable forward that runs FFN blocks and wires its own split FFN; its
    wired trace traces through the blocks, so their regions show a second time there."""

    def __init__(self):
        super().__init__()
        self.attention, self.ffn = Attention(), nn.ModuleList([FFNBlock(), FFNBlock()])
        self.intermediate, self.output = Head(), Tail()

    def forward(self, x):
        a = self.attention(x)
        for block in self.ffn:
            a = block(a)
        return self.output(self.intermediate(a), a)


def test_a_region_seen_on_two_traces_is_converted_once():
    torch.manual_seed(0)
    dense = StackedLayer().eval()
    x = torch.randn(3, 5, 8)
    result = moeify.convert(dense, moeify.MoEConfig(num_experts=4, top_k=2), example_inputs=(x,))
    layers = moeify.moe_layers(result.model)
    assert sorted(layers) == ["ffn.0.moe", "ffn.1.moe", "output.moe"]
    calls = {name: 0 for name in layers}
    for name, layer in layers.items():  # every MoE layer runs (a second copy would sit unused)
        layer.experts.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), dense(x), atol=1e-5, rtol=1e-5)
    assert calls == dict.fromkeys(layers, 1)
    dense_params = sum(p.numel() for p in dense.parameters())
    ffn_params = sum(p.numel() for p in dense.output.dense.parameters()) + sum(
        p.numel() for p in dense.intermediate.dense.parameters())
    assert sum(p.numel() for p in result.model.parameters()) == dense_params + 3 * (
        (4 - 1) * ffn_params + 8 * 4)  # 3 FFNs: 4 experts each instead of one, plus a router (8 x 4)

