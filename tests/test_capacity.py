"""Expert capacity (Switch §2.2): C = ceil(T * k * factor / E), overflow dropped by policy.

References are independent: the capacity from exact fractions, the kept set from a greedy loop over
tokens (policy "position"), over choice ranks then tokens (policy "choice", GShard's top-2 order),
or a sort of the router probabilities computed here (policy "gate"), and the dense FFN computed
from its weights with F.linear.
"""

import json
import math
from fractions import Fraction

import pytest
import torch

import moeify
from moeify.errors import ConfigError
from moeify.moe.build import build_moe_layer
from moeify.moe.capacity import expert_capacity
from tests.test_routers import D, dense_ffn, dense_out  # the same small GELU FFN and its plain F.linear output

E = 4


def MoEConfig_(**kw):
    """A config for the layer-level tests: E experts, a router bias to force choices with."""
    return moeify.MoEConfig(num_experts=E, router_bias=True, **kw)


def forced_layer(cfg, favourite, seed=0):
    """An upcycled layer whose router prefers `favourite` experts (in order) for every token.

    Small random router weights keep the probabilities distinct per token (for the "gate" policy)."""
    dense = dense_ffn(seed)
    layer = build_moe_layer(cfg, dense)
    bias = torch.zeros(E)
    for rank, e in enumerate(favourite):
        bias[e] = 10.0 - 3.0 * rank
    with torch.no_grad():
        layer.router.gate.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(seed + 1))
        layer.router.gate.bias.copy_(bias)
    return layer, dense


def probs_here(layer, x):
    gate = layer.router.gate
    return torch.softmax(x.double() @ gate.weight.double().T + gate.bias.double(), dim=-1)


def expert_rows(layer):
    """Record the rows each expert processes on the next forwards."""
    seen = []
    layer.experts.register_forward_hook(lambda m, args, out: seen.append(args[1].clone()))
    return seen


@pytest.mark.parametrize("T, k, factor, E_", [(16, 1, 1.0, 4), (10, 1, 1.2, 4), (7, 2, 1.25, 3), (33, 2, 0.5, 8),
                                               (1, 1, 1.0, 8), (100, 4, 2.0, 64), (16, 2, 1e-12, 4), (0, 2, 1.0, 4)])
def test_capacity_formula(T, k, factor, E_):
    exact = Fraction(T * k) * Fraction(str(factor)) / E_
    assert expert_capacity(T, k, factor, E_) == math.ceil(exact)


@pytest.mark.parametrize("router, k, factor, policy", [
    ("switch", 1, 1.0, "position"), ("switch", 1, 1.0, "gate"), ("topk", 2, 1.0, "position"),
    ("topk", 2, 0.75, "gate"), ("topk", 1, 1.5, "position"), ("topk", 2, 1.0, "choice"), ("switch", 1, 1.0, "choice"),
])
def test_forced_expert_processes_exactly_capacity(router, k, factor, policy):
    T = 16
    cfg = MoEConfig_(router=router, top_k=k, capacity_factor=factor, drop_policy=policy)
    layer, dense = forced_layer(cfg, favourite=[0, 1][:k])
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(3))
    seen = expert_rows(layer)
    with torch.no_grad():
        y = layer.eval()(x)
    C = math.ceil(Fraction(T * k) * Fraction(str(factor)) / E)
    assert seen[0].tolist() == [C] * k + [0] * (E - k)  # exactly C rows on each favourite expert
    if policy != "gate":  # every token prefers expert 0, then 1: by position and by choice, the first C tokens
        kept = {0: set(range(C)), 1: set(range(C))}
    else:
        probs = probs_here(layer, x)
        kept = {e: set(torch.argsort(probs[:, e], descending=True)[:C].tolist()) for e in range(k)}
    want = torch.zeros(T, D)
    ref = dense_out(dense, x)
    gates = probs_here(layer, x)[:, :k]
    gates = gates / gates.sum(-1, keepdim=True)  # the gates of a fully routed token sum to 1 (top-k renormalised)
    for t in range(T):
        for e in range(k):
            if t in kept[e]:
                want[t] += (gates[t, e].float() if k > 1 else 1.0) * ref[t]
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    dropped = [t for t in range(T) if not any(t in kept[e] for e in range(k))]
    assert dropped and (y[dropped] == 0).all()  # dropped tokens: the MoE contributes exactly zero
    assert layer.aux.last_stats["dropped_fraction"].item() == pytest.approx(1 - C / T)


@pytest.mark.parametrize("router, k", [("switch", 1), ("topk", 2), ("noisy_topk", 2), ("expert_choice", 2)])
def test_none_drops_nothing(router, k):
    layer, dense = forced_layer(MoEConfig_(router=router, top_k=k), favourite=[0])
    x = torch.randn(16, D, generator=torch.Generator().manual_seed(4))
    seen = expert_rows(layer)
    with torch.no_grad():
        y = layer.eval()(x)
    assert layer.aux.last_stats["dropped_fraction"].item() == 0
    if router != "expert_choice":  # expert choice decides its own number of rows per expert
        assert int(seen[0].sum()) == 16 * k
    torch.testing.assert_close(y, dense_out(dense, x), atol=1e-5, rtol=1e-5)


def test_train_and_eval_factors():
    T = 16
    layer, _ = forced_layer(MoEConfig_(router="switch", top_k=1, capacity_factor=0.5, eval_capacity_factor=2.0),
                            favourite=[0])
    x = torch.randn(T, D)
    seen = expert_rows(layer)
    layer.train()(x)
    layer.eval()(x)
    assert int(seen[0][0]) == math.ceil(T * 0.5 / E) and int(seen[1][0]) == math.ceil(T * 2.0 / E)


def test_an_infinite_eval_factor_evaluates_dropless():
    """eval_capacity_factor=inf: a layer that drops in training drops nothing in eval (None would reuse the
    training factor), and the config goes through strict JSON (no Infinity: the factor is "inf") and back."""
    T = 16
    cfg = MoEConfig_(router="switch", top_k=1, capacity_factor=0.5, eval_capacity_factor=math.inf)
    layer, dense = forced_layer(cfg, favourite=[0])
    x = torch.randn(T, D)
    seen = expert_rows(layer)
    layer.train()(x)
    assert int(seen[0][0]) == math.ceil(T * 0.5 / E) and layer.aux.last_stats["dropped_fraction"].item() > 0
    with torch.no_grad():
        y = layer.eval()(x)
    assert int(seen[1][0]) == T and layer.aux.last_stats["dropped_fraction"].item() == 0
    torch.testing.assert_close(y, dense_out(dense, x), atol=1e-5, rtol=1e-5)
    text = json.dumps(cfg.to_dict(), allow_nan=False)
    assert json.loads(text)["eval_capacity_factor"] == "inf"
    assert moeify.MoEConfig.from_dict(json.loads(text)) == cfg
    assert moeify.MoEConfig.from_dict({**cfg.to_dict(), "eval_capacity_factor": math.inf}) == cfg  # older plans
    with pytest.raises(ConfigError, match=r"eval_capacity_factor=0\.0 is invalid: use a number > 0 \(inf: dropless\), "
                                          "or None for the training factor"):
        MoEConfig_(router="switch", top_k=1, capacity_factor=1.0, eval_capacity_factor=0.0)


def greedy_position_reference(probs, k, C):
    """Walk tokens in order, each token's choices best first; keep a choice while its expert has room."""
    load = [0] * probs.shape[1]
    kept = set()
    for t in range(probs.shape[0]):
        for e in sorted(range(probs.shape[1]), key=lambda j: -probs[t, j].item())[:k]:
            if load[e] < C:
                load[e] += 1
                kept.add((t, e))
    return kept


def greedy_choice_reference(probs, k, C):
    """GShard's order: every token's best choice in token order, then every token's second, ...; keep a
    choice while its expert has room."""
    load = [0] * probs.shape[1]
    kept = set()
    ranked = [sorted(range(probs.shape[1]), key=lambda j: -probs[t, j].item())[:k] for t in range(probs.shape[0])]
    for c in range(k):
        for t in range(probs.shape[0]):
            e = ranked[t][c]
            if load[e] < C:
                load[e] += 1
                kept.add((t, e))
    return kept


@pytest.mark.parametrize("policy, reference", [("position", greedy_position_reference),
                                               ("choice", greedy_choice_reference)])
@pytest.mark.parametrize("k, factor", [(1, 1.0), (2, 1.0), (2, 0.5), (3, 1.25)])
def test_policy_matches_its_greedy_loop(k, factor, policy, reference):
    T = 40
    cfg = MoEConfig_(router="topk", top_k=k, capacity_factor=factor, drop_policy=policy)
    layer = build_moe_layer(cfg, dense_ffn())
    with torch.no_grad():  # uneven random router: some experts overflow
        layer.router.gate.weight.normal_(0, 1, generator=torch.Generator().manual_seed(5))
        layer.router.gate.bias.copy_(torch.tensor([1.0, 0.5, 0.0, -1.0]))
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(6))
    routing = layer.router(x)
    got = set(zip(routing.token_N.tolist(), routing.expert_N.tolist(), strict=True))
    assert got == reference(probs_here(layer, x), k, expert_capacity(T, k, factor, E))


def test_choice_policy_is_the_default_and_keeps_first_choices_that_position_drops():
    """Top-2 at capacity 1: token order drops first choices of late tokens to keep early tokens' second
    choices; GShard's order (the default) keeps every first choice here."""
    T, k = 40, 2
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(6))
    first_choices_kept = {}
    for policy in ("choice", "position"):
        kw = {} if policy == "choice" else {"drop_policy": policy}
        layer = build_moe_layer(MoEConfig_(router="topk", top_k=k, capacity_factor=1.0, **kw), dense_ffn())
        with torch.no_grad():
            layer.router.gate.weight.normal_(0, 1, generator=torch.Generator().manual_seed(5))
            layer.router.gate.bias.copy_(torch.tensor([1.0, 0.5, 0.0, -1.0]))
        routing = layer.router(x)
        best = probs_here(layer, x).argmax(-1)
        kept = set(zip(routing.token_N.tolist(), routing.expert_N.tolist(), strict=True))
        first_choices_kept[policy] = sum((t, int(best[t])) in kept for t in range(T))
    assert first_choices_kept["choice"] == T and first_choices_kept["position"] < T, first_choices_kept


def test_dropped_tokens_pass_through_the_residual(example):
    """In a converted model, a dropped token leaves its block unchanged (x + 0)."""
    ex = example("mlp")
    model = ex.build_model()
    cfg = moeify.MoEConfig(num_experts=4, top_k=1, router="switch", router_bias=True, capacity_factor=1.0)
    moe = moeify.convert(model, cfg, example_inputs=ex.example_inputs()).model.eval()
    for layer in moeify.moe_layers(moe).values():
        with torch.no_grad():
            layer.router.gate.weight.zero_()
            layer.router.gate.bias.copy_(torch.tensor([5.0, 0.0, 0.0, 0.0]))
    io = []
    moe.blocks[0].register_forward_hook(lambda m, args, out: io.append((args[0], out)))
    x = torch.randn(32, 16)
    with torch.no_grad():
        moe(x)
    block_in, block_out = io[0]
    C = expert_capacity(32, 1, 1.0, 4)
    torch.testing.assert_close(block_out[C:], block_in[C:], atol=0, rtol=0)
    assert not torch.allclose(block_out[:C], block_in[:C])
    stats = moeify.router_stats(moe)
    assert [s.tokens_per_expert for s in stats] == [[C, 0, 0, 0]] * 2
    assert all(s.dropped_fraction == pytest.approx(1 - C / 32) for s in stats)


def test_expert_choice_refuses_capacity_factor():
    with pytest.raises(moeify.MoeifyError, match="expert_choice_capacity"):
        moeify.MoEConfig(router="expert_choice", capacity_factor=1.0)
