"""Routers: noisy top-k, top-k in both orders, switch, expert choice, hierarchical, shared experts.

Each router's MoE output is compared with a reference written here from the paper's definition
(per token, from the raw weights); every upcycled layout is checked for function preservation at
init on the example models; the router runs in float32 under bf16 autocast while the experts run
in bf16; expert dropout acts in training only; `moeify.router_stats` matches counts made here.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import moeify
from moeify.moe.build import DenseFFN, build_moe_layer
from moeify.moe.router import ExpertChoiceRouter, NoisyTopKRouter

D, FF = 8, 16


def dense_ffn(seed=0, dropout=0.0):
    g = torch.Generator().manual_seed(seed)
    return DenseFFN("gelu", torch.randn(FF, D, generator=g) / 3, torch.randn(D, FF, generator=g) / 4,
                    torch.randn(FF, generator=g), torch.randn(D, generator=g), dropout=dropout)


def dense_out(dense, x):
    return F.linear(F.gelu(F.linear(x, dense.w1, dense.b1)), dense.w2, dense.b2)


def expert_out(layer, e, x_TD):
    ex = layer.experts
    return F.linear(F.gelu(F.linear(x_TD, ex.w1_EFD[e], ex.b1_EF[e])), ex.w2_EDF[e], ex.b2_ED[e])


def perturbed_layer(cfg, seed=0):
    """An upcycled layer whose experts and router are then randomised, so outputs depend on routing."""
    layer = build_moe_layer(cfg, dense_ffn(seed))
    g = torch.Generator().manual_seed(seed + 10)
    with torch.no_grad():
        for p in layer.experts.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
        for p in layer.router.parameters():
            p.normal_(0, 0.8, generator=g)
    return layer


def mix(layer, x, gates_TE):
    """sum_e gates[t, e] * expert_e(x_t), the definition of an MoE output."""
    out = torch.zeros(x.shape[0], D, dtype=torch.float64)
    for e in range(gates_TE.shape[1]):
        out += gates_TE[:, e:e + 1] * expert_out(layer, e, x).double()
    return out.float()


def keep_topk_softmax_rows(h_TE, k):
    """Shazeer eq. 3/5 row by row: softmax over the k largest entries, zero elsewhere."""
    out = torch.zeros_like(h_TE)
    for t, row in enumerate(h_TE.tolist()):
        top = sorted(range(len(row)), key=lambda i: -row[i])[:k]
        z = sum(math.exp(row[i]) for i in top)
        for i in top:
            out[t, i] = math.exp(row[i]) / z
    return out


def logits_here(linear, x):
    b = 0 if linear.bias is None else linear.bias.double()
    return x.double() @ linear.weight.double().T + b


# ---- each router against its definition ----------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 3])
def test_topk_then_softmax(k):
    layer = perturbed_layer(moeify.MoEConfig(num_experts=5, top_k=k, softmax_before_topk=False)).eval()
    x = torch.randn(20, D)
    with torch.no_grad():
        want = mix(layer, x, keep_topk_softmax_rows(logits_here(layer.router.gate, x), k))
        torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("training", [False, True])
def test_noisy_topk_matches_shazeer(k, training):
    layer = perturbed_layer(moeify.MoEConfig(num_experts=6, top_k=k, router="noisy_topk")).train(training)
    x = torch.randn(20, D)
    torch.manual_seed(1)
    with torch.no_grad():
        got = layer(x)
    torch.manual_seed(1)
    noise = (torch.randn(20, 6) if training else torch.zeros(20, 6)).double()  # the router draws float32 noise
    r = layer.router
    h = logits_here(r.gate, x) + noise * (F.softplus(logits_here(r.noise, x)) + r.noise_eps)
    torch.testing.assert_close(got, mix(layer, x, keep_topk_softmax_rows(h, k)), atol=1e-5, rtol=1e-4)


def test_noise_only_in_training():
    router = NoisyTopKRouter(D, 6, 2)
    with torch.no_grad():
        router.noise.weight.normal_(0, 1)
    x = torch.randn(50, D)
    a, b = router.eval()(x), router(x)
    assert torch.equal(a.expert_N, b.expert_N) and torch.equal(a.weight_N, b.weight_N)
    clean = keep_topk_softmax_rows(logits_here(router.gate, x), 2)
    routed = set(zip(a.token_N.tolist(), a.expert_N.tolist(), strict=True))
    assert routed == set(map(tuple, (clean > 0).nonzero().tolist()))
    router.train()
    c, d = router(x), router(x)
    assert not (torch.equal(c.expert_N, d.expert_N) and torch.allclose(c.weight_N, d.weight_N))


def test_noise_is_standard_normal_scaled_by_softplus_plus_floor():
    """Shazeer eq. 4 without re-seeding the RNG: (H - x W_g) / (Softplus(x W_noise) + 0.01) is N(0, 1):
    mean 0, variance 1, 68.3% within one standard deviation (a uniform of variance 1 has 57.7%)."""
    from moeify.moe.router import noisy_logits

    router = NoisyTopKRouter(D, 6, 2)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        router.gate.weight.normal_(0, 1, generator=g)
        router.noise.weight.normal_(0, 1, generator=g)
    x = torch.randn(20000, D, generator=g)
    torch.manual_seed(0)
    _, h, _ = noisy_logits(x, router.gate, router.noise, router.noise_eps, training=True)
    std = F.softplus(logits_here(router.noise, x)) + 0.01
    z = ((h.double() - logits_here(router.gate, x)) / std).flatten()
    assert abs(z.mean().item()) < 0.02 and z.var().item() == pytest.approx(1.0, abs=0.03)
    assert (z.abs() < 1).double().mean().item() == pytest.approx(0.6827, abs=0.01)


@pytest.mark.parametrize("E, k, T, capacity", [(4, 1, 16, 1.0), (8, 2, 30, 1.0), (8, 2, 30, 0.5), (4, 2, 10, 2.0)])
def test_expert_choice_takes_top_c_tokens(E, k, T, capacity):
    router = ExpertChoiceRouter(D, E, k, capacity=capacity, preserve_scale=False)
    with torch.no_grad():
        router.gate.weight.normal_(0, 1, generator=torch.Generator().manual_seed(2))
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(3))
    routing = router(x)
    probs = torch.softmax(logits_here(router.gate, x), dim=-1)
    C = min(T, math.ceil(capacity * T * k / E))
    for e in range(E):
        mine = routing.expert_N == e
        assert int(mine.sum()) == C
        assert set(routing.token_N[mine].tolist()) == set(torch.argsort(probs[:, e], descending=True)[:C].tolist())
        torch.testing.assert_close(routing.weight_N[mine].double(), probs[routing.token_N[mine], e], atol=1e-6,
                                   rtol=1e-6)
    unchosen = T - len(set(routing.token_N.tolist()))
    assert routing.losses["dropped_fraction"].item() == pytest.approx(unchosen / T)


@pytest.mark.parametrize("G, J, K, noisy", [(2, 1, 2, False), (4, 2, 1, False), (3, 2, 2, True), (2, 2, 1, True)])
def test_hierarchical_gate_is_primary_times_secondary(G, J, K, noisy):
    M = 3
    cfg = moeify.MoEConfig(num_experts=G * M, top_k=K, num_groups=G, group_top_k=J,
                           router="noisy_topk" if noisy else "topk", softmax_before_topk=False)
    layer = perturbed_layer(cfg).train(noisy)
    x = torch.randn(20, D)
    torch.manual_seed(4)
    with torch.no_grad():
        got = layer(x)
    torch.manual_seed(4)
    r = layer.router
    h_p, h_s = logits_here(r.primary_gate, x), logits_here(r.gate, x)
    if noisy:  # the router draws the primary noise, then the secondary noise
        h_p = h_p + torch.randn(20, G).double() * (F.softplus(logits_here(r.primary_noise, x)) + 1e-2)
        h_s = h_s + torch.randn(20, G * M).double() * (F.softplus(logits_here(r.noise, x)) + 1e-2)
    primary = keep_topk_softmax_rows(h_p, J)
    gates = torch.zeros(20, G * M, dtype=torch.float64)
    for g in range(G):
        gates[:, g * M:(g + 1) * M] = primary[:, g:g + 1] * keep_topk_softmax_rows(h_s[:, g * M:(g + 1) * M], K)
    torch.testing.assert_close(got, mix(layer, x, gates), atol=1e-5, rtol=1e-4)
    assert r.top_k == J * K and int((gates > 0).sum()) == 20 * J * K


# ---- function preservation at init ---------------------------------------------------------------
PRESERVING = {
    "topk": dict(router="topk", top_k=2),
    "topk_then_softmax": dict(router="topk", top_k=2, softmax_before_topk=False),
    "switch": dict(router="switch", top_k=1),
    "switch_small_init_jitter": dict(router="switch", top_k=1, router_init_scale=0.1, router_jitter=0.01),
    "noisy_topk": dict(router="noisy_topk", top_k=2),
    "hierarchical": dict(router="topk", num_groups=2, group_top_k=1, top_k=2),
    "hierarchical_noisy": dict(router="noisy_topk", num_groups=4, group_top_k=2, top_k=1),
    "shared_1": dict(router="topk", top_k=2, num_shared_experts=1),
    "shared_2_switch": dict(router="switch", top_k=1, num_shared_experts=2),
    "shared_hierarchical": dict(router="topk", num_groups=2, group_top_k=2, top_k=1, num_shared_experts=1),
    "expert_choice_full_capacity": dict(router="expert_choice", top_k=2, expert_choice_capacity=4.0),  # C = T
}


@pytest.mark.parametrize("model_name", ["mlp", "gpt", "llama"])
@pytest.mark.parametrize("layout", list(PRESERVING))
def test_function_preserving_at_init(example, model_name, layout):
    ex = example(model_name)
    model = ex.build_model().eval()
    inputs = ex.example_inputs()
    cfg = moeify.MoEConfig(num_experts=8, init="copy", **PRESERVING[layout])
    moe = moeify.convert(model, cfg, example_inputs=inputs, verify=False).model.eval()
    with torch.no_grad():
        assert (moe(*inputs) - model(*inputs)).abs().max().item() < 1e-5
    if model_name == "mlp":  # no dropout in this model: training-mode routing (noise, jitter) preserves it too
        moe.train()
        with torch.no_grad():
            assert (moe(*inputs) - model(*inputs)).abs().max().item() < 1e-5


def test_shared_experts_are_dense_copies_with_split_scale():
    dense = dense_ffn()
    layer = build_moe_layer(moeify.MoEConfig(num_experts=4, num_shared_experts=2), dense)
    assert layer.shared.num_experts == 2 and layer.shared_scale == layer.routed_scale == pytest.approx(1 / 3)
    for w in (layer.shared.w1_EFD, layer.experts.w1_EFD):
        assert all(torch.equal(w[e], dense.w1) for e in range(w.shape[0]))


@pytest.mark.parametrize("E, k, capacity", [(8, 1, 1.0), (8, 2, 1.0), (8, 1, 2.0), (8, 1, 8.0), (8, 2, 4.0)])
def test_expert_choice_deviation_at_init(E, k, capacity):
    """Expert choice cannot promise every token an expert. Measured on 64 random tokens: a token
    chosen by at least one (copied) expert gets exactly the dense output, an unchosen one gets 0;
    capacity >= E / k (C = T) chooses every token, so the layer is then exact."""
    dense = dense_ffn()
    layer = build_moe_layer(moeify.MoEConfig(num_experts=E, top_k=k, router="expert_choice",
                                             expert_choice_capacity=capacity), dense).eval()
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = layer(x)
        routing = layer.router(x)
    chosen = torch.zeros(64, dtype=torch.bool)
    chosen[routing.token_N] = True
    ref = dense_out(dense, x)
    torch.testing.assert_close(y[chosen], ref[chosen], atol=1e-5, rtol=1e-5)
    assert (y[~chosen] == 0).all()
    assert layer.aux.last_stats["dropped_fraction"].item() == pytest.approx((~chosen).float().mean().item())
    if capacity * k >= E:
        assert chosen.all()
    deviation = (y - ref).abs().max().item()
    print(f"expert_choice E={E} k={k} capacity={capacity}: unchosen {(~chosen).float().mean():.3f}, "
          f"max |moe - dense| {deviation:.3g}")


# ---- precision under autocast ------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["topk", "switch", "noisy_topk", "hierarchical_noisy", "shared_1",
                                    "expert_choice_full_capacity"])
def test_router_float32_experts_bf16_under_autocast(layout):
    g = torch.Generator().manual_seed(0)
    d, f = 32, 64  # bf16 grouped_mm wants 16-byte aligned strides
    dense = DenseFFN("gelu", torch.randn(f, d, generator=g), torch.randn(d, f, generator=g))
    layer = build_moe_layer(moeify.MoEConfig(num_experts=8, **PRESERVING[layout]), dense).train()
    seen = {}
    layer.router.register_forward_hook(lambda m, a, routing: seen.update(routing=routing))
    layer.experts.register_forward_hook(lambda m, a, y: seen.update(expert_in=a[0].dtype, expert_out=y.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(torch.randn(16, d))
    routing = seen["routing"]
    assert routing.logits_TE.dtype == routing.probs_TE.dtype == routing.weight_N.dtype == torch.float32
    assert seen["expert_in"] == torch.float32 and seen["expert_out"] == torch.bfloat16  # cast inside, matmul in bf16
    assert layer.experts.w1_EFD.dtype == torch.float32 and y.dtype == torch.bfloat16
    assert all(v.dtype == torch.float32 for v in routing.losses.values())


@pytest.mark.parametrize("cast", ["autocast", "model_bf16"])
def test_router_logits_are_float32_values_in_a_bf16_model(cast):
    """Switch's selective precision is about the values, not only the dtype: the logits equal a float64
    computation from the (bf16-representable) weights to float32 rounding, where a bf16 matmul is off by
    about 1e-2; also after `layer.bfloat16()` casts the router's weights (the computation stays float32)."""
    g = torch.Generator().manual_seed(0)
    d, f = 64, 128
    dense = DenseFFN("gelu", torch.randn(f, d, generator=g), torch.randn(d, f, generator=g))
    layer = build_moe_layer(moeify.MoEConfig(num_experts=8, top_k=2), dense).eval()
    with torch.no_grad():
        layer.router.gate.weight.normal_(0, 1, generator=g)
        layer.router.gate.weight.copy_(layer.router.gate.weight.bfloat16().float())  # the same weights in both
    x = torch.randn(64, d, generator=g).bfloat16()
    seen = {}
    layer.router.register_forward_hook(lambda m, a, routing: seen.update(logits=routing.logits_TE))
    if cast == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
            layer(x.float())
    else:
        layer = layer.bfloat16()
        with torch.no_grad():
            layer(x)
    want = x.double() @ layer.router.gate.weight.double().T
    bf16_matmul = (x @ layer.router.gate.weight.bfloat16().T).double()
    assert seen["logits"].dtype == torch.float32
    assert (seen["logits"].double() - want).abs().max() < 1e-4 < (bf16_matmul - want).abs().max()


@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_a_float64_model_routes_in_float64(example, name):
    """The router was made float32 in every model: a float64 model kept only float32 precision (2e-8 off
    dense, where a float64 conversion is at 1e-15)."""
    ex = example(name)
    dense = ex.build_model().double()
    model = moeify.convert(dense, moeify.MoEConfig(num_experts=4, top_k=2), example_inputs=ex.example_inputs()).model
    routers = [layer.router for layer in moeify.moe_layers(model).values()]
    assert {p.dtype for router in routers for p in router.parameters()} == {torch.float64}
    with torch.no_grad():
        assert (model(*ex.example_inputs()) - dense(*ex.example_inputs())).abs().max() < 1e-12


def test_switch_jitter_multiplies_the_router_input_by_uniform_noise_in_training_only():
    """Switch §2.4: the router input times U(1 - eps, 1 + eps) while training; untouched in eval."""
    eps = 0.01
    layer = build_moe_layer(moeify.MoEConfig(num_experts=4, top_k=1, router="switch", router_jitter=eps),
                            dense_ffn())
    x = torch.randn(4096, D, generator=torch.Generator().manual_seed(1)).abs() + 0.5  # no ratio of ~0/~0
    seen = []
    logits = layer.router.logits
    layer.router.logits = lambda x_TD: (seen.append(x_TD.detach().clone()), logits(x_TD))[1]  # the router's input
    torch.manual_seed(0)
    layer.train()(x)
    ratio = (seen[-1].double() / x.double()).flatten()
    assert ratio.min() >= 1 - eps - 1e-6 and ratio.max() <= 1 + eps + 1e-6
    assert ratio.mean().item() == pytest.approx(1.0, abs=3e-4)
    assert ratio.var().item() == pytest.approx(eps ** 2 / 3, rel=0.05)  # a uniform's variance, not a constant
    with torch.no_grad():
        layer.eval()(x)
    assert torch.equal(seen[-1], x)


def test_switch_router_gradient_is_the_papers_with_and_without_preserve_scale():
    """preserve_scale multiplies the expert output by 1 + p - stopgrad(p) instead of p: the forward keeps
    the dense function, and the router's gradient for a given dL/dy is Switch's <dL/dy, E(x)> either way,
    as autograd differentiates it through the paper's y = p_e(x) E_e(x), written here in float64."""
    grads, outputs = {}, {}
    x = torch.randn(32, D, generator=torch.Generator().manual_seed(2))
    dy = torch.randn(32, D, generator=torch.Generator().manual_seed(3))
    for preserve in (True, False):
        layer = perturbed_layer(moeify.MoEConfig(num_experts=4, top_k=1, router="switch", preserve_scale=preserve,
                                                 load_balance_coef=0.0, z_loss_coef=0.0))
        y = layer.train()(x)
        (y * dy).sum().backward()
        grads[preserve], outputs[preserve] = layer.router.gate.weight.grad, y.detach()
    p_T = torch.softmax(logits_here(layer.router.gate, x), -1).max(-1).values.float()  # same router in both
    torch.testing.assert_close(outputs[False], outputs[True] * p_T[:, None], atol=1e-5, rtol=1e-5)
    W = layer.router.gate.weight.detach().double().requires_grad_()
    probs = torch.softmax(x.double() @ W.T, -1)
    chosen = probs.argmax(-1)
    experts_TD = torch.stack([expert_out(layer, int(e), x[t:t + 1])[0] for t, e in enumerate(chosen)]).detach()
    paper = (probs.gather(1, chosen[:, None])[:, 0] * (experts_TD.double() * dy.double()).sum(-1)).sum()
    (want,) = torch.autograd.grad(paper, W)
    for preserve in (True, False):
        torch.testing.assert_close(grads[preserve].double(), want, atol=1e-5, rtol=1e-4)
    assert want.abs().max() > 1e-3


# ---- expert dropout ------------------------------------------------------------------------------------
def test_expert_dropout_training_only():
    dense = dense_ffn(dropout=0.1)
    assert build_moe_layer(moeify.MoEConfig(num_experts=4), dense).experts.dropout == 0.1  # dense rate by default
    layer = build_moe_layer(moeify.MoEConfig(num_experts=4, expert_dropout=0.4), dense)
    assert layer.experts.dropout == 0.4
    x = torch.randn(256, D)
    with torch.no_grad():
        eval_a, eval_b = layer.eval()(x), layer(x)
        train_a, train_b = layer.train()(x), layer(x)
    ref = dense_out(dense, x)
    torch.testing.assert_close(eval_a, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(eval_a, eval_b)
    assert not torch.allclose(train_a, ref, atol=1e-3) and not torch.equal(train_a, train_b)
    # inverted dropout on the hidden units: unbiased, so the batch mean stays near the dense one
    assert (train_a - ref).mean(0).abs().max() < 0.2 * (train_a - ref).abs().mean() + 0.05


def test_expert_dropout_in_converted_model(example):
    ex = example("mlp")
    model = ex.build_model().eval()
    (x,) = ex.example_inputs()
    moe = moeify.convert(model, moeify.MoEConfig(num_experts=4, expert_dropout=0.5), example_inputs=(x,)).model
    with torch.no_grad():
        torch.testing.assert_close(moe.eval()(x), model(x), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(moe.train()(x), model(x), atol=1e-3)


# ---- router statistics -----------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [dict(router="topk", top_k=2), dict(router="switch", top_k=1, capacity_factor=1.0),
                                 dict(router="topk", top_k=2, capacity_factor=0.75, drop_policy="gate")])
def test_router_stats_against_independent_counts(example, cfg):
    ex = example("gpt")
    inputs = ex.example_inputs()
    moe = moeify.convert(ex.build_model(), moeify.MoEConfig(num_experts=4, **cfg), example_inputs=inputs).model.eval()
    layers = moeify.moe_layers(moe)
    captured = {}
    for name, layer in layers.items():
        layer.router.register_forward_pre_hook(lambda m, a, name=name: captured.update({name: a[0].detach()}))
    with torch.no_grad():
        moe(*inputs)
    rows = moeify.router_stats(moe)
    assert [r.layer for r in rows] == list(layers)
    k = cfg["top_k"]
    for row in rows:
        x = captured[row.layer]
        probs = torch.softmax(logits_here(layers[row.layer].router.gate, x), dim=-1)
        T = x.shape[0]
        counts = [0] * 4
        for p in probs.tolist():
            for e in sorted(range(4), key=lambda j: -p[j])[:k]:
                counts[e] += 1
        assert row.demand_per_expert == counts  # the router's choices, before any capacity limit
        factor = cfg.get("capacity_factor")
        if factor is not None:  # whatever the policy, an over-full expert keeps exactly C
            C = math.ceil(T * k * factor / 4)
            counts = [min(c, C) for c in counts]
            assert counts != row.demand_per_expert  # these inputs overflow some expert
        assert row.num_tokens == T and row.tokens_per_expert == counts
        assert row.dropped_fraction == pytest.approx(1 - sum(counts) / (T * k))
        entropy = -(probs * probs.log()).sum(-1).mean().item()
        assert row.gate_entropy == pytest.approx(entropy, rel=1e-4)
    table = moeify.format_stats(rows).splitlines()
    assert "dropped" in table[0]
    # one line per layer, plus a demand line under each layer whose limit dropped some
    assert len(table) == 1 + len(rows) * (2 if "capacity_factor" in cfg else 1)
    if "capacity_factor" in cfg:
        demand = [float(v) for v in table[2].split("demand")[1].split()]
        assert demand == pytest.approx(rows[0].demand_share, abs=0.005)


@pytest.mark.parametrize("cfg", [
    dict(router="topk", top_k=2), dict(router="switch", top_k=1, capacity_factor=1.0),
    dict(router="noisy_topk", top_k=2, importance_coef=0.1, load_coef=0.1), dict(router="expert_choice", top_k=2),
    dict(top_k=2, num_groups=2, group_top_k=1), dict(top_k=2, num_groups=2, group_top_k=1, router="noisy_topk"),
], ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_an_empty_batch_runs_and_adds_nothing(example, cfg):
    """No tokens (a dense model takes them): an empty output, losses and statistics 0, not NaN or a crash."""
    model = moeify.convert(example("gpt").build_model(), moeify.MoEConfig(num_experts=4, **cfg), verify=False).model
    x = torch.randint(0, 64, (0, 8))
    for train in (True, False):
        model.train(train)
        out = model(x)
        assert out.shape == (0, 8, 256)
        aux = moeify.aux_loss(model)
        assert torch.isfinite(aux) and aux.item() == 0
        if train:
            (out.sum() + aux).backward()
        for row in moeify.router_stats(model):
            assert row.num_tokens == 0 and row.dropped_fraction == 0 and row.gate_entropy == 0


def test_router_init_is_a_truncated_normal():
    """Switch §2.4: std sqrt(s / fan_in), cut at two std by redrawing (a clamp put 4.5% on the bounds)."""
    from moeify.moe.router import init_router_weight

    w = torch.empty(256, 512)
    init_router_weight(w, 0.1, torch.Generator().manual_seed(0))
    std = math.sqrt(0.1 / 512)
    assert w.abs().max() <= 2 * std
    assert (w.abs() > 1.99 * std).float().mean() < 0.002  # a clamp leaves ~4.5% at the bound
    # the std of a normal truncated at +-2 sigma: sigma * sqrt(1 - 2 a phi(a) / (2 Phi(a) - 1)), a = 2
    phi, Phi = math.exp(-2) / math.sqrt(2 * math.pi), 0.5 * (1 + math.erf(2 / math.sqrt(2)))
    assert w.std().item() == pytest.approx(std * math.sqrt(1 - 2 * 2 * phi / (2 * Phi - 1)), rel=0.01)


def test_stats_columns_line_up_under_long_layer_names():
    from moeify.stats import LayerStats

    short = LayerStats("h.0.mlp.moe", [4, 4], 8, 0.0, 0.5, [4, 4])
    long = LayerStats("model.decoder.layers.11.encoder_attn_ffn.output.moe", [4, 3], 8, 0.125, 0.5, [4, 4])
    header, *lines = moeify.format_stats([short, long]).splitlines()
    column = header.index("tokens") + len("tokens")  # right-aligned: every count ends where the header does
    assert all(line[:column].endswith("8") for line in lines[:2]), lines
    assert lines[2].index("demand") == header.index("entropy") + 1  # the demand line under the long layer
