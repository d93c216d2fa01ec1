"""Golden checks of the FFN-region finder: what it finds on each example, and why it refuses near-misses."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moeify.capture import trace
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


@pytest.mark.parametrize("act, expected", [
    (nn.ReLU(), "relu"), (nn.GELU(), "gelu"), (nn.GELU(approximate="tanh"), "gelu_tanh"), (nn.SiLU(), "silu"),
    (NewGELU(), "gelu_tanh"), (F.relu, "relu"), (F.silu, "silu"),
    (lambda x: F.gelu(x, approximate="tanh"), "gelu_tanh"),
])
def test_activations(act, expected):
    regions = find(Act(act)).analysis
    assert [(r.kind, r.activation) for r in regions] == [("mlp", expected)]


def test_dropout_between_is_part_of_region():
    (region,) = find(Act(nn.GELU(), dropout=True)).analysis
    assert region.dropout == pytest.approx(0.1)
    assert [n.name for n in region.nodes] == ["fc1", "act", "dropout", "fc2"]


@pytest.mark.parametrize("module, reason", [
    (Act(nn.Tanh()), "not a supported activation"),
    (Act(nn.GELU(), second_use=True), "used by 2 nodes"),
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
