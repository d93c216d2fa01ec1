"""Golden checks of the FFN-region finder: what it finds on each example, and why it refuses near-misses."""

import math
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moeify
from moeify.capture import trace
from moeify.errors import NoFFNRegionError
from moeify.passes.find_ffn_regions import FindFFNRegions
from tests.conftest import load_example


def find(module):
    result = FindFFNRegions()(trace(module))
    assert result.modified is False
    return result


@pytest.mark.parametrize("name, expected", [
    ("mlp", [("mlp", "relu", ("blocks.0.fc1", "blocks.0.fc2")), ("mlp", "relu", ("blocks.1.fc1", "blocks.1.fc2"))]),
    ("gpt", [("mlp", "gelu", ("blocks.0.mlp.fc1", "blocks.0.mlp.fc2")),
             ("mlp", "gelu", ("blocks.1.mlp.fc1", "blocks.1.mlp.fc2"))]),
    ("llama", [("gated", "silu", ("layers.0.mlp.down_proj", "layers.0.mlp.gate_proj", "layers.0.mlp.up_proj")),
               ("gated", "silu", ("layers.1.mlp.down_proj", "layers.1.mlp.gate_proj", "layers.1.mlp.up_proj"))]),
])
def test_examples(name, expected):
    regions = find(load_example(name).build_model()).analysis
    assert [(r.kind, r.activation, r.key) for r in regions] == expected


class Act(nn.Module):
    def __init__(self, act, dropout=False, second_use=False, bias=True):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16, bias=bias), nn.Linear(16, 8, bias=bias)
        self.act, self.dropout, self.second_use = act, nn.Dropout(0.1) if dropout else None, second_use

    def forward(self, x):
        h = self.fc1(x)
        a = self.act(h)
        if self.dropout is not None:
            a = self.dropout(a)
        y = self.fc2(a)
        return y + h.sum() if self.second_use else y


class NewGELU(nn.Module):  # a zoo-style GELU class the finder must recognise by probing
    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * (x + 0.044715 * torch.pow(x, 3.0))))


class RoundedGELU(nn.Module):  # BLOOM's: sqrt(2/pi) written as 0.79788456
    def forward(self, x):
        return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


class BufferedSiLU(nn.Module):  # a buffer, no parameters: the probe must leave its dtype alone
    def __init__(self):
        super().__init__()
        self.register_buffer("one", torch.ones(()))

    def forward(self, x):
        return x * torch.sigmoid(x * self.one)


@pytest.mark.parametrize("act, expected", [
    (nn.ReLU(), "relu"), (nn.GELU(), "gelu"), (nn.GELU(approximate="tanh"), "gelu_tanh"), (nn.SiLU(), "silu"),
    (NewGELU(), "gelu_tanh"), (RoundedGELU(), "gelu_tanh"), (F.relu, "relu"), (F.silu, "silu"),
    (lambda x: F.gelu(x, approximate="tanh"), "gelu_tanh"),
])
def test_activations(act, expected):
    regions = find(Act(act)).analysis
    assert [(r.kind, r.activation) for r in regions] == [("mlp", expected)]


INLINE_ACTIVATIONS = {  # written out in the forward (fx traces them into elementwise nodes)
    "esm-gelu": (lambda x: x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0))), "gelu"),
    "mingpt-gelu": (lambda x: 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi)
                                                          * (x + 0.044715 * torch.pow(x, 3.0)))), "gelu_tanh"),
    "silu": (lambda x: x * torch.sigmoid(x), "silu"),
    "quick-gelu": (lambda x: x * torch.sigmoid(1.702 * x), "quick_gelu"),
    "relu-squared": (lambda x: torch.relu(x) ** 2, "relu2"),  # relu first: a supported act that feeds no Linear
    "relu-square-method": (lambda x: F.relu(x).square(), "relu2"),
}


@pytest.mark.parametrize("name", list(INLINE_ACTIVATIONS))
def test_activations_written_out_are_probed_and_convert(name):
    act, expected = INLINE_ACTIVATIONS[name]
    (region,) = find(Act(act)).analysis
    assert (region.kind, region.activation) == ("mlp", expected)
    assert region.nodes[0].name == "fc1" and region.nodes[-1].name == "fc2" and len(region.nodes) >= 3
    torch.manual_seed(0)
    dense, x = Act(act).eval(), torch.randn(5, 8)
    model = moeify.convert(dense, moeify.MoEConfig(num_experts=4, top_k=2), example_inputs=(x,)).model
    assert not any(n.op == "call_function" and n.target in (torch.erf, torch.tanh, torch.sigmoid, torch.relu)
                   for n in model._moeify_graph_module.graph.nodes)  # every node of the activation replaced
    torch.testing.assert_close(model(x), dense(x), atol=1e-5, rtol=1e-5)


def test_dropout_between_is_part_of_region():
    (region,) = find(Act(nn.GELU(), dropout=True)).analysis
    assert region.dropout == pytest.approx(0.1)
    assert [n.name for n in region.nodes] == ["fc1", "act", "dropout", "fc2"]


class WrittenOutGated(nn.Module):
    """A gated FFN whose gate activation is written out (research code's `g * torch.sigmoid(g)`)."""

    def __init__(self, act):
        super().__init__()
        self.gate, self.up = nn.Linear(8, 16, bias=False), nn.Linear(8, 16, bias=False)
        self.down = nn.Linear(16, 8, bias=False)
        self.act = act

    def forward(self, x):
        return self.down(self.act(self.gate(x)) * self.up(x))


@pytest.mark.parametrize(("act", "expected"), [
    (lambda g: g * torch.sigmoid(g), "silu"),
    (lambda g: 0.5 * g * (1.0 + torch.erf(g / math.sqrt(2.0))), "gelu"),
])
def test_a_gate_activation_written_out_is_a_gated_region(act, expected):
    (region,) = find(WrittenOutGated(act)).analysis
    assert (region.kind, region.activation) == ("gated", expected)
    torch.manual_seed(0)
    dense, x = WrittenOutGated(act).eval(), torch.randn(5, 8)
    model = moeify.convert(dense, moeify.MoEConfig(num_experts=4, top_k=2), example_inputs=(x,)).model
    torch.testing.assert_close(model(x), dense(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("module, reason", [
    (Act(nn.Tanh()), "not a supported activation"),
    (Act(nn.GELU(), second_use=True), "used by 2 nodes"),
    (Act(lambda x: x * torch.sigmoid(x) * 2.0), "used by 2 nodes"),  # written out, but no activation
    (Act(lambda x: x * torch.sigmoid(x), second_use=True), "used by 3 nodes"),  # its input read elsewhere too
])
def test_refusals_say_why(module, reason):
    result = find(module)
    assert result.analysis == []
    assert any(s.where == "fc1" and reason in s.reason for s in result.skipped), result.skipped


def test_mismatched_hidden_sizes_refused():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
            self.fc2.in_features = 12  # a corrupted module: the rule must not trust shapes blindly

        def forward(self, x):
            return self.fc2(F.relu(self.fc1(x)))

    result = find(Bad())
    assert result.analysis == [] and "in_features=12" in result.skipped[0].reason


class TimmMlp(nn.Module):
    """timm's Mlp: fc1 -> act -> drop1 -> norm (Identity by default) -> fc2 -> drop2."""

    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.drop1 = nn.Linear(8, 16), nn.GELU(), nn.Dropout(0.2)
        self.norm, self.fc2, self.drop2 = nn.Identity(), nn.Linear(16, 8), nn.Dropout(0.2)

    def forward(self, x):
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


def test_identity_and_dropout_between_are_stepped_over():
    (region,) = find(TimmMlp()).analysis
    assert [n.name for n in region.nodes] == ["fc1", "act", "drop1", "norm", "fc2"]
    assert region.dropout == 0.2  # the dropout after fc2 stays outside the region


class FusedGateUp(nn.Module):
    """Phi-3's MLP: one Linear for gate and up, its output split in two halves (`form`)."""

    FORMS = {
        "chunk": lambda h, dim: h.chunk(2, dim=dim),
        "torch.chunk": lambda h, dim: torch.chunk(h, 2, dim=dim),
        "split": lambda h, dim: h.split(16, dim=dim),
        "torch.split": lambda h, dim: torch.split(h, [16, 16], dim),
        "slices": lambda h, dim: (h[..., :16], h[..., 16:]),
        "bounded slices": lambda h, dim: (h[..., 0:16], h[..., 16:32]),
    }

    def __init__(self, gate_second=False, form="chunk", dim=-1, leak=False):
        super().__init__()
        self.gate_up_proj, self.down_proj = nn.Linear(8, 32, bias=False), nn.Linear(16, 8, bias=False)
        self.gate_second, self.form, self.dim, self.leak = gate_second, form, dim, leak

    def forward(self, x):
        h = self.gate_up_proj(x)
        a, b = self.FORMS[self.form](h, self.dim)
        gate, up = (b, a) if self.gate_second else (a, b)
        y = self.down_proj(F.silu(gate) * up)
        return y + up.sum() if self.leak else y


@pytest.mark.parametrize("gate_second", [False, True])
@pytest.mark.parametrize("form", list(FusedGateUp.FORMS))
def test_fused_gate_up_is_a_gated_region(gate_second, form):
    (region,) = find(FusedGateUp(gate_second, form)).analysis
    assert (region.kind, region.activation, region.gate_half) == ("gated", "silu", int(gate_second))
    assert region.linears == {"gate_up": "gate_up_proj", "down": "down_proj"}
    assert (region.d_model, region.d_ff, region.d_out) == (8, 16, 8)


@pytest.mark.parametrize("form", list(FusedGateUp.FORMS))
def test_fused_gate_up_converts_function_preserving(form):
    torch.manual_seed(0)
    dense, x = FusedGateUp(gate_second=True, form=form).eval(), torch.randn(3, 5, 8)
    result = moeify.convert(dense, moeify.MoEConfig(num_experts=4, top_k=2), example_inputs=(x,))
    assert [r.name for r in result.report.regions] == ["moe"]
    torch.testing.assert_close(result.model.eval()(x), dense(x), rtol=1e-5, atol=1e-6)


class SlicedBadly(FusedGateUp):
    def forward(self, x):  # the gate's rows overlap the up's: not two halves
        h = self.gate_up_proj(x)
        return self.down_proj(F.silu(h[..., :16]) * h[..., 8:])


@pytest.mark.parametrize("module, where, reason", [
    (FusedGateUp(dim=0), "gate_up_proj", "feeds method .chunk()"),  # halves of the batch, not of the features
    (FusedGateUp(form="split", dim=0), "gate_up_proj", "feeds method .split()"),
    (FusedGateUp(leak=True), "gate_up_proj", "used outside the gated FFN"),
    (FusedGateUp(leak=True, form="slices"), "gate_up_proj", "used outside the gated FFN"),
    (SlicedBadly(), "gate_up_proj", "not split in two equal halves (parts of [8, 16])"),
])
def test_fused_gate_up_refusals(module, where, reason):
    result = find(module)
    assert result.analysis == []
    assert any(s.where == where and reason in s.reason for s in result.skipped), result.skipped


class MatmulLinear(nn.Linear):  # Falcon's FalconLinear: the same function, written out
    def forward(self, x):
        return x @ self.weight.T + self.bias


class ScaledLinear(nn.Linear):  # another function: must not be taken for a Linear
    def forward(self, x):
        return 2.0 * super().forward(x)


class PlainSubclass(nn.Linear):
    pass


@pytest.mark.parametrize("cls, want", [(nn.Linear, True), (PlainSubclass, True), (MatmulLinear, True),
                                       (ScaledLinear, False)])
def test_computes_linear_probes_subclasses(cls, want):
    from moeify.passes import ops

    assert ops.computes_linear(cls(8, 16)) is want
    assert (ops.linear_params(cls(8, 16)) is not None) is want
    on_meta = cls(8, 16, device="meta")  # nothing to compute there: only an inherited forward counts
    assert ops.computes_linear(on_meta) is (cls in (nn.Linear, PlainSubclass))


@pytest.mark.parametrize("cls, found", [(MatmulLinear, True), (ScaledLinear, False)])
def test_linear_subclasses_in_an_ffn(cls, found):
    class FFN(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = cls(8, 16), cls(16, 8)

        def forward(self, x):
            return self.fc2(F.gelu(self.fc1(x)))

    regions = find(FFN()).analysis
    assert [r.linears for r in regions] == ([{"fc1": "fc1", "fc2": "fc2"}] if found else [])


class ReadsWeight(nn.Module):
    """T5's DenseReluDense checks `self.wo.weight.dtype` (a get_attr the trace leaves unused); `use`
    makes the weight feed the output too, which the rewrite could not keep."""

    def __init__(self, use):
        super().__init__()
        self.wi, self.wo, self.use = nn.Linear(8, 16), nn.Linear(16, 8), use

    def forward(self, x):
        h = F.relu(self.wi(x))
        if isinstance(self.wo.weight, torch.Tensor):
            h = h.to(torch.float32)
        y = self.wo(h)
        return y + self.wo.weight.sum() if self.use else y


def test_unused_weight_read_is_dropped_and_used_one_refused():
    import moeify

    module = ReadsWeight(use=False)
    (region,) = find(module).analysis
    x = torch.randn(3, 8)
    result = moeify.convert(module, moeify.MoEConfig(num_experts=2, top_k=1), example_inputs=(x,))
    assert result.report.function_preserving
    refused = find(ReadsWeight(use=True))
    assert refused.analysis == []
    assert any("wo.weight is read outside the FFN" in s.reason for s in refused.skipped), refused.skipped


def test_activation_probe_leaves_the_module_as_it_was():
    from moeify.passes import ops

    act = BufferedSiLU()
    assert ops._probe_activation(act) == "silu"
    assert act.one.dtype == torch.float32  # the probe used to call module.double() on the user's module


class _Capped(nn.Module):
    """Linear -> act -> Linear whose activation matches a supported one only on [-6, 6]."""

    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(8, 32), act, nn.Linear(32, 8)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class _ClampedGELU(nn.Module):  # Hugging Face's ClippedGELUActivation(-10, 10)
    def forward(self, x):
        return torch.clamp(F.gelu(x), -10, 10)


class _GELUDrop(nn.Module):  # an activation that also drops out in training
    def forward(self, x):
        return F.dropout(F.gelu(x), 0.5, self.training)


@pytest.mark.parametrize("act", [nn.ReLU6(), nn.Hardtanh(0, 6), _ClampedGELU(), _GELUDrop()],
                         ids=["relu6", "hardtanh", "clipped_gelu", "gelu_dropout"])
def test_an_activation_that_differs_far_out_or_in_training_is_refused(act):
    """ReLU6 equals ReLU on [-6, 6] (the probe's old range): converted as ReLU it moved outputs by 4.85."""
    r = find(_Capped(act))
    regions, skipped = r.analysis, r.skipped
    assert regions == []
    assert any("fc1" in s.where and "not a supported activation" in s.reason for s in skipped)


class _LoRALinear(nn.Linear):
    def __init__(self, i: int, o: int) -> None:
        super().__init__(i, o)
        self.lora_A, self.lora_B = nn.Parameter(torch.randn(2, i)), nn.Parameter(torch.zeros(o, 2))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + x @ self.lora_A.T @ self.lora_B.T


def test_linears_with_adapters_or_parametrizations_are_not_converted():
    """LoRA's B starts at zero, so its Linear computes F.linear: converted, its adapters were dropped."""
    lora = _Capped(nn.GELU())
    lora.fc1, lora.fc2 = _LoRALinear(8, 32), _LoRALinear(32, 8)
    assert find(lora).analysis == []
    normed = _Capped(nn.GELU())
    torch.nn.utils.parametrizations.weight_norm(normed.fc1)
    r = find(normed)
    regions, skipped = r.analysis, r.skipped
    assert regions == [] and any("ParametrizedLinear" in s.reason and "parametrizations" in s.reason
                                 for s in skipped)


class _DropoutOff(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 8)

    def forward(self, x):
        return self.fc2(F.dropout(F.gelu(self.fc1(x)), p=0.5, training=False))


def test_functional_dropout_with_training_false_is_no_expert_dropout():
    result = moeify.convert(_DropoutOff(), moeify.MoEConfig(num_experts=2, top_k=1))
    assert result.model.moe.experts.dropout == 0.0


class _SharedFc2(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.side = nn.Linear(8, 32), nn.Linear(32, 8), nn.Linear(8, 32)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(x))) + self.fc2(self.side(x))


def test_a_linear_also_called_outside_the_ffn_is_refused():
    """The rewrite removes the FFN's Linears: another call of fc2 crashed it."""
    r = find(_SharedFc2())
    regions, skipped = r.analysis, r.skipped
    assert regions == [] and any("fc2 is also called outside the FFN" in s.reason for s in skipped)


class _SharedUp(nn.Module):
    """The FFN's first Linear called again outside it, through another activation (tanh)."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down, self.probe = nn.Linear(8, 32), nn.Linear(32, 8), nn.Linear(32, 3)

    def forward(self, x):
        x = x + self.down(F.relu(self.up(x)))
        return self.probe(torch.tanh(self.up(x)))


def test_an_ffn_refused_for_a_shared_linear_gets_one_line():
    """Its Linear was also listed as 'Linear not followed by an activation (feeds relu)', which contradicts
    the FFN it was found in."""
    skipped = find(_SharedUp()).skipped
    assert [s.where for s in skipped if "also called outside the FFN" in s.reason] == ["up"]
    assert not any(s.reason.startswith("Linear not followed by an activation") for s in skipped), skipped


class _InplaceAct(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 8)

    def forward(self, x):
        h = self.fc1(x)
        F.relu_(h)
        return self.fc2(h)


def test_an_in_place_activation_is_refused_naming_it():
    r = find(_InplaceAct())
    assert r.analysis == []
    assert any(s.where == "fc1" and "relu_ changes its input in place" in s.fix for s in r.skipped)


class _LearnedAct(nn.Module):
    """xIELU-like (Apertus): an activation with parameters of its own, traced into several ops."""

    def __init__(self) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(0.8))

    def forward(self, x):
        return torch.where(x > 0, self.alpha * x * x + x, torch.expm1(x.clamp(max=0)) - x)


class _SubNorm(nn.Module):
    """RMS norm with a weight, as BitNet puts between the gated product and down_proj."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, h):
        h32 = h.to(torch.float32)
        return self.weight * (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(h.dtype)


class _LoraLinear(nn.Linear):
    """An nn.Linear whose forward adds a low-rank term: traced into, as it is no plain Linear."""

    def __init__(self, i: int, o: int) -> None:
        super().__init__(i, o)
        self.A, self.B = nn.Parameter(torch.randn(2, i)), nn.Parameter(torch.randn(o, 2))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + x @ self.A.t() @ self.B.t()


class _UnknownLayers(nn.Module):
    def __init__(self, case: str) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
        self.gate, self.up = nn.Linear(8, 16), nn.Linear(8, 16)
        self.down = _LoraLinear(16, 8) if case == "lora down" else nn.Linear(16, 8)
        self.act = nn.GELU() if case == "activation twice" else _LearnedAct()
        self.norm, self.case = _SubNorm(16), case

    def forward(self, x):
        if self.case == "learned activation":
            return self.fc2(self.act(self.fc1(x)))
        if self.case == "activation twice":  # one supported module, called twice on fc1's output
            h = self.fc1(x)
            return self.fc2(self.act(h)) + self.act(h).mean()
        product = F.silu(self.gate(x)) * self.up(x)
        return self.down(self.norm(product) if self.case == "sub-norm" else product)


@pytest.mark.parametrize("case, where, reason", [
    ("learned activation", "fc1", "feeds act (_LearnedAct), which moeify does not know as an activation"),
    ("sub-norm", "gate", "the gated product goes through norm (_SubNorm) before the output Linear"),
    # not traced into: the old reasons, which are right there
    ("activation twice", "fc1", "its output is used by 2 nodes (act, act_1), not by one activation"),
    ("lora down", "gate", "the gated product does not feed a single output Linear"),
])
def test_a_layer_traced_into_is_named_in_the_refusal(case, where, reason):
    """The refusals named the traced ops ("used by 7 nodes (gt, mul, mul_1, ...)", "does not feed a single
    output Linear"); the module the user wrote is what they can act on. A supported activation module
    called twice is no unknown activation, and an nn.Linear subclass as down is not "before" the output."""
    r = find(_UnknownLayers(case))
    assert r.analysis == []
    assert any(s.where == where and s.reason == reason for s in r.skipped), r.skipped


class UnbracketedSwiGLU(nn.Module):
    """SwiGLU written without brackets, as hand-written Llama MLPs do: `up * g * torch.sigmoid(g)`
    multiplies (up * g) by sigmoid(g), so no node computes SiLU(g) on its own. `fused` takes gate and
    up from one Linear's output, as Phi-3 does."""

    FORMS = {
        "up*g*sig": lambda g, u: u * g * torch.sigmoid(g),
        "g*up*sig": lambda g, u: g * u * torch.sigmoid(g),
        "g*sig*up": lambda g, u: g * torch.sigmoid(g) * u,
        "sig*up*g": lambda g, u: torch.sigmoid(g) * u * g,
        "sig*g*up": lambda g, u: torch.sigmoid(g) * g * u,
        "up*sig*g": lambda g, u: u * torch.sigmoid(g) * g,
        "up*(g*sig)": lambda g, u: u * (g * torch.sigmoid(g)),
        "g*(sig*up)": lambda g, u: g * (torch.sigmoid(g) * u),
        "method": lambda g, u: g.mul(u).mul(g.sigmoid()),
    }

    def __init__(self, form, fused=False):
        super().__init__()
        self.form, self.fused = form, fused
        if fused:
            self.gate_up_proj = nn.Linear(8, 32, bias=False)
        else:
            self.gate_proj, self.up_proj = nn.Linear(8, 16, bias=False), nn.Linear(8, 16, bias=False)
        self.down_proj = nn.Linear(16, 8, bias=False)

    def gate_up(self, x):
        return self.gate_up_proj(x).chunk(2, dim=-1) if self.fused else (self.gate_proj(x), self.up_proj(x))

    def forward(self, x):
        g, u = self.gate_up(x)  # (fx unpacks a chunk only into named targets)
        return self.down_proj(self.FORMS[self.form](g, u))

    def bracketed(self, x):
        """The same FFN written as F.silu(gate) * up: the reference the forms must equal."""
        g, u = self.gate_up(x)
        return self.down_proj(F.silu(g) * u)


@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused"])
@pytest.mark.parametrize("form", list(UnbracketedSwiGLU.FORMS))
def test_swiglu_without_brackets_is_a_gated_region_and_converts(form, fused):
    torch.manual_seed(0)
    dense, x = UnbracketedSwiGLU(form, fused).eval(), torch.randn(3, 5, 8)
    torch.testing.assert_close(dense(x), dense.bracketed(x))  # the form is SwiGLU: the test's own premise
    gm = trace(dense)
    (region,) = FindFFNRegions()(gm).analysis
    assert (region.kind, region.activation) == ("gated", "silu")
    assert region.linears == ({"gate_up": "gate_up_proj", "down": "down_proj"} if fused else
                              {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"})
    assert (region.d_model, region.d_ff, region.d_out) == (8, 16, 8)
    # the whole forward is the FFN: every node the trace computes (the sigmoid, both products) is replaced
    assert region.nodes == [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    assert len(region.nodes) == (8 if fused else 6)

    result = moeify.convert(dense, moeify.MoEConfig(num_experts=4, top_k=2), example_inputs=(x,))
    assert [r.name for r in result.report.regions] == ["moe"]
    graph = result.model._moeify_graph_module.graph
    assert not any(n.target in (torch.sigmoid, "sigmoid", operator.mul, "mul") for n in graph.nodes)
    torch.testing.assert_close(result.model.eval()(x), dense(x), rtol=1e-5, atol=1e-6)


class SwiGLUNearMiss(UnbracketedSwiGLU):
    """Products that look like unbracketed SwiGLU but compute something else, or leak an intermediate."""

    MISSES = {
        "other gate": lambda m, x, g, u: m.down_proj(u * g * torch.sigmoid(m.other(x))),
        "shifted sigmoid": lambda m, x, g, u: m.down_proj(u * g * torch.sigmoid(g + 1.0)),
        "extra tensor": lambda m, x, g, u: m.down_proj(u * g * torch.sigmoid(g) * m.other(x)),
        "extra number": lambda m, x, g, u: m.down_proj(u * g * torch.sigmoid(g) * 2.0),
        "up twice": lambda m, x, g, u: m.down_proj(u * g * torch.sigmoid(g) * u),
        "sigmoid of a sum": lambda m, x, g, u: m.down_proj(u * g * torch.sigmoid(g + u)),
        "no activation": lambda m, x, g, u: m.down_proj(u * g * 2.0),
        "leaks up*g": lambda m, x, g, u: (lambda ug: m.down_proj(ug * torch.sigmoid(g)) + ug.sum())(u * g),
        "leaks sigmoid": lambda m, x, g, u: (lambda s: m.down_proj(u * g * s) + s.sum())(torch.sigmoid(g)),
        "leaks gate": lambda m, x, g, u: m.down_proj(u * g * torch.sigmoid(g)) + g.sum(),
        "leaks up": lambda m, x, g, u: m.down_proj(u * g * torch.sigmoid(g)) + u.sum(),
    }

    FORM = "up*g*sig"

    def __init__(self, miss, fused=False):
        super().__init__(self.FORM, fused)
        self.miss, self.other = miss, nn.Linear(8, 16, bias=False)

    def forward(self, x):
        g, u = self.gate_up(x)
        return self.MISSES[self.miss](self, x, g, u)


@pytest.mark.parametrize("miss, reason", [
    ("other gate", "mul_1 = up_proj * gate_proj * sigmoid multiplies 3 tensors (up_proj, gate_proj, other)"),
    ("shifted sigmoid", "gate_proj * sigmoid, computed from gate_proj, is not a supported activation"),
    ("extra tensor", "multiplies 3 tensors (up_proj, gate_proj, other)"),
    ("extra number", "gate_proj * sigmoid * 2.0, computed from gate_proj, is not a supported activation"),
    ("up twice", "neither up_proj nor gate_proj is a factor on its own"),
    ("sigmoid of a sum", "sigmoid is computed from several tensors"),
    ("no activation", "no activation is applied to up_proj or gate_proj"),
    ("leaks up*g", "mul is used outside the gated FFN (mul_1, sum_1)"),
    ("leaks sigmoid", "sigmoid is used outside the gated FFN"),
    ("leaks gate", "gate_proj is used outside the gated FFN"),
    ("leaks up", "up_proj is used outside the gated FFN"),
])
def test_swiglu_without_brackets_near_misses_are_refused(miss, reason):
    result = find(SwiGLUNearMiss(miss))
    assert result.analysis == []
    assert any(s.where == "gate_proj" and reason in s.reason for s in result.skipped), result.skipped


@pytest.mark.parametrize("miss, reason", [
    ("other gate", "multiplies 3 tensors (getitem_1, getitem, other)"),
    ("extra number", "getitem * sigmoid * 2.0, computed from getitem, is not a supported activation"),
    ("leaks up*g", "mul is used outside the gated FFN"),
    ("leaks sigmoid", "sigmoid is used outside the gated FFN"),
    ("leaks gate", "getitem is used outside the gated FFN"),
    ("leaks up", "getitem_1 is used outside the gated FFN"),
])
def test_fused_swiglu_without_brackets_near_misses_are_refused(miss, reason):
    result = find(SwiGLUNearMiss(miss, fused=True))
    assert result.analysis == []
    assert any(s.where == "gate_up_proj" and reason in s.reason for s in result.skipped), result.skipped


@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused"])
def test_a_written_out_gelu_gate_is_read_through_the_product_too(fused):
    """The same reading serves any written-out activation, GELU included, bracketed or not."""
    class GeGLU(UnbracketedSwiGLU):
        def forward(self, x):
            g, u = self.gate_up(x)
            return self.down_proj(u * 0.5 * g * (1.0 + torch.erf(g / math.sqrt(2.0))))

    torch.manual_seed(0)
    dense, x = GeGLU("up*g*sig", fused).eval(), torch.randn(5, 8)
    (region,) = find(dense).analysis
    assert (region.kind, region.activation) == ("gated", "gelu")
    model = moeify.convert(dense, moeify.MoEConfig(num_experts=4, top_k=2), example_inputs=(x,)).model
    g, u = dense.gate_up(x)
    torch.testing.assert_close(model(x), dense.down_proj(F.gelu(g) * u), atol=1e-5, rtol=1e-5)


class DividedSwiGLU(UnbracketedSwiGLU):
    """SwiGLU written with a division, sigmoid(g) as 1 / (1 + exp(-g)): `up * g / (1 + torch.exp(-g))`
    divides (up * g) by a tensor computed from the gate alone."""

    FORMS = {
        "up*g/den": lambda g, u: u * g / (1 + torch.exp(-g)),
        "g*up/den": lambda g, u: g * u / (1 + torch.exp(-g)),
        "up/den*g": lambda g, u: u / (1 + torch.exp(-g)) * g,  # up divided, then multiplied by g: SwiGLU too
        "g/den*up": lambda g, u: g / (1 + torch.exp(-g)) * u,
        "up*(g/den)": lambda g, u: u * (g / (1 + torch.exp(-g))),
        "up*g/(1/sig)": lambda g, u: u * g / (1 / torch.sigmoid(g)),
        "torch.div": lambda g, u: torch.div(u * g, 1 + torch.exp(-g)),
        "method": lambda g, u: u.mul(g).div(g.neg().exp().add(1)),
    }


@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused"])
@pytest.mark.parametrize("form", list(DividedSwiGLU.FORMS))
def test_swiglu_with_a_division_is_a_gated_region_and_converts(form, fused):
    torch.manual_seed(0)
    dense, x = DividedSwiGLU(form, fused).eval(), torch.randn(3, 5, 8)
    g, u = dense.gate_up(x)
    reference = dense.down_proj(F.silu(g) * u)  # hand-written SwiGLU, independent of the form
    torch.testing.assert_close(dense(x), reference, rtol=1e-5, atol=1e-6)  # the form is SwiGLU
    gm = trace(dense)
    (region,) = FindFFNRegions()(gm).analysis
    assert (region.kind, region.activation) == ("gated", "silu")
    assert region.linears == ({"gate_up": "gate_up_proj", "down": "down_proj"} if fused else
                              {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"})
    # the whole forward is the FFN: the exp, the division and the products are all replaced
    assert region.nodes == [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]

    result = moeify.convert(dense, moeify.MoEConfig(num_experts=4, top_k=2), example_inputs=(x,))
    assert [r.name for r in result.report.regions] == ["moe"]
    graph = result.model._moeify_graph_module.graph
    assert not any(n.target in (torch.exp, "exp", operator.truediv, torch.div, "div", operator.mul, "mul")
                   for n in graph.nodes)
    out = result.model.eval()(x)
    torch.testing.assert_close(out, dense(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)


class DividedNearMiss(SwiGLUNearMiss):
    """Divisions that look like SwiGLU's but compute something else: up must multiply the product,
    and the denominator must come from the gate alone."""

    MISSES = {
        "up divides": lambda m, x, g, u: m.down_proj(g * torch.sigmoid(g) / u),
        "other denominator": lambda m, x, g, u: m.down_proj(u * g / (1 + torch.exp(-m.other(x)))),
        "denominator from up": lambda m, x, g, u: m.down_proj(g * torch.sigmoid(g) / (1 + torch.exp(-u))),
        "denominator from both": lambda m, x, g, u: m.down_proj(u * g / (1 + torch.exp(-g - u))),
        "wrong sign": lambda m, x, g, u: m.down_proj(u * g / (1 + torch.exp(g))),
        "divided by a number": lambda m, x, g, u: m.down_proj(u * g * torch.sigmoid(g) / 2.0),
        "floor division": lambda m, x, g, u: m.down_proj(torch.div(u * g, 1 + torch.exp(-g), rounding_mode="floor")),
    }

    FORMS, FORM = DividedSwiGLU.FORMS, "up*g/den"


@pytest.mark.parametrize("miss, reason", [
    ("up divides", "truediv = gate_proj * sigmoid / up_proj: up_proj divides the product"),
    ("other denominator", "multiplies 3 tensors (up_proj, gate_proj, other)"),
    ("denominator from up", "neither gate_proj nor up_proj is a factor on its own"),
    ("denominator from both", "add is computed from several tensors"),
    ("wrong sign", "gate_proj / add, computed from gate_proj, is not a supported activation"),
    ("divided by a number", "gate_proj * sigmoid / 2.0, computed from gate_proj, is not a supported activation"),
    ("floor division", None),  # not a plain division: not read as a product at all
])
@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused"])
def test_swiglu_with_a_division_near_misses_are_refused(miss, reason, fused):
    result = find(DividedNearMiss(miss, fused))
    assert result.analysis == []
    if reason is not None and not fused:  # (fused, the halves are named getitem*)
        assert any(s.where == "gate_proj" and reason in s.reason for s in result.skipped), result.skipped
    with pytest.raises(NoFFNRegionError):
        moeify.convert(DividedNearMiss(miss, fused), moeify.MoEConfig(num_experts=4, top_k=2),
                       example_inputs=(torch.randn(5, 8),))


class _MixerBlock(nn.Module):
    """MLP-Mixer: a token-mixing MLP over the patch axis (its input transposed), then a channel MLP."""

    def __init__(self, patches=6, d=8):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.token_mixing = nn.Sequential(nn.Linear(patches, 12), nn.GELU(), nn.Linear(12, patches))
        self.channel_mixing = nn.Sequential(nn.Linear(d, 32), nn.GELU(), nn.Linear(32, d))

    def forward(self, x):  # (B, patches, d)
        x = x + self.token_mixing(self.norm(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mixing(self.norm(x))


def test_an_ffn_over_a_transposed_input_is_noted_in_the_conversion_report():
    """Its MoE routes (batch x channel) rows, not tokens, and token_mask cannot mask them: converted, with a note
    (the note is found on the block's trace, and kept when the rewrite traces the MLP on its own)."""
    x = torch.randn(2, 6, 8)
    report = moeify.convert(_MixerBlock(), moeify.MoEConfig(num_experts=4), example_inputs=(x,)).report
    notes = {r.owner: r.notes for r in report.regions}
    assert notes["channel_mixing"] == []
    assert len(notes["token_mixing"]) == 1 and notes["token_mixing"][0].startswith(
        "its input comes through transpose: it mixes along another axis than the features (MLP-Mixer's token mixing)")
