"""init="split": dense FFN neurons partitioned among experts. References are the dense FFN written
out with torch.nn.functional in the test, and partitions checked by counting neurons."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import load_example

import moeify
from moeify.errors import ConfigError
from moeify.moe.build import DenseFFN, build_moe_layer
from moeify.moe.init_split import cluster_partition, partition_neurons, split_d_ff


def _dense(gated: bool, d_ff: int, d_model: int = 16, seed: int = 0) -> DenseFFN:
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    return DenseFFN("silu" if gated else "gelu", r(d_ff, d_model), r(d_model, d_ff) / d_ff ** 0.5, r(d_ff), r(d_model),
                    r(d_ff, d_model) if gated else None, r(d_ff) if gated else None)


def _reference(dense: DenseFFN, x: torch.Tensor) -> torch.Tensor:
    h = F.linear(x, dense.w1, dense.b1)
    h = F.silu(h) * F.linear(x, dense.w3, dense.b3) if dense.gated else F.gelu(h)
    return F.linear(h, dense.w2, dense.b2)


@pytest.mark.parametrize("method", ["random", "cluster"])
@pytest.mark.parametrize(("d_ff", "experts"), [(64, 8), (70, 8), (48, 4)])
def test_partition_holds_every_neuron_once_balanced(method, d_ff, experts):
    groups = partition_neurons(_dense(False, d_ff), experts, method, torch.Generator().manual_seed(0))
    assert len(groups) == experts
    assert sorted(torch.cat(groups).tolist()) == list(range(d_ff))
    assert max(len(g) for g in groups) <= -(-d_ff // experts) <= split_d_ff(d_ff, experts)


def test_cluster_partition_recovers_planted_clusters():
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(4, 32, generator=g) * 5
    labels = torch.arange(4).repeat_interleave(10)[torch.randperm(40, generator=g)]
    vectors = centres[labels] + 0.05 * torch.randn(40, 32, generator=g)
    groups = cluster_partition(vectors, 4, torch.Generator().manual_seed(0))
    assert sorted(sorted(labels[idx].tolist()) for idx in groups) == [[c] * 10 for c in range(4)]


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("method", ["random", "cluster"])
@pytest.mark.parametrize("d_ff", [64, 70])
def test_top_k_equal_experts_is_exact(gated, method, d_ff):
    dense = _dense(gated, d_ff)
    layer = build_moe_layer(moeify.MoEConfig(num_experts=8, top_k=8, init="split", split_method=method), dense)
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(2))
    ref = _reference(dense, x)
    torch.testing.assert_close(layer(x), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    assert layer.experts.d_ff == split_d_ff(d_ff, 8)  # each expert holds F/E neurons, not a copy of F


def test_top_k_below_experts_is_reported_with_its_deviation():
    lm = load_example("lstm_lm")
    dense = lm.build_model(ffn=True)
    (ids,) = lm.example_inputs()
    exact = moeify.convert(dense, moeify.MoEConfig(num_experts=4, top_k=4, init="split"), example_inputs=(ids,))
    assert exact.report.function_preserving and exact.report.max_abs_diff < 1e-5
    for method in ("random", "cluster"):
        cfg = moeify.MoEConfig(num_experts=4, top_k=1, init="split", split_method=method)
        result = moeify.convert(dense, cfg, example_inputs=(ids,))
        with torch.no_grad():
            moved = (dense(ids) - result.model(ids)).abs().max().item()
        assert result.report.function_preserving is False
        assert result.report.max_abs_diff == pytest.approx(moved) and moved > 1e-4
        assert any("does not promise the dense function" in n and f"{moved:.3g}" in n for n in result.report.notes)


def test_more_experts_than_neurons_is_a_config_error():
    with pytest.raises(ConfigError, match="needs at least one hidden neuron per expert"):
        build_moe_layer(moeify.MoEConfig(num_experts=8, top_k=2, init="split"), _dense(False, 4))
