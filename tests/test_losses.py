"""Auxiliary losses against the papers' formulas, transcribed here as plain per-token Python loops.

Shazeer et al. 2017 (importance §4 eq. 6, smooth load appendix A eqs. 8-11, hierarchical appendix B),
Switch Transformers eq. 4 (load balancing, extended to top-k), ST-MoE router z-loss. Gradients are
checked with `torch.autograd.gradcheck` in float64 and must reach W_g (and W_noise for the load
loss). Last, a converted model with a deliberately skewed router is trained with and without the
balancing loss.
"""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import moeify
from moeify.moe import losses
from moeify.moe.router import HierarchicalRouter, NoisyTopKRouter, SwitchRouter, TopKRouter

T, D, E = 24, 6, 5


# ---- the papers' formulas, one token and one expert at a time -----------------------------------
def cv2(values):
    """CV(X)^2 = Var(X) / Mean(X)^2, population variance (Shazeer eq. 6)."""
    n = len(values)
    mean = sum(values) / n
    return (sum((v - mean) ** 2 for v in values) / n) / mean ** 2


def softplus(v):
    return math.log1p(math.exp(v))


def phi(z):
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def matvec(W, x):
    return [sum(W[i][d] * x[d] for d in range(len(x))) for i in range(len(W))]


def keep_topk_softmax(h, k):
    """Shazeer eqs. 3 and 5: softmax over the k largest components, 0 elsewhere."""
    top = sorted(range(len(h)), key=lambda i: -h[i])[:k]
    z = sum(math.exp(h[i]) for i in top)
    return [math.exp(h[i]) / z if i in top else 0.0 for i in range(len(h))]


def kth_excluding(h, k, i):
    """The k-th highest component of h, leaving out component i."""
    return sorted((h[j] for j in range(len(h)) if j != i), reverse=True)[k - 1]


def paper_noisy_gating(x, Wg, Wn, noise, k, eps):
    """Per token: clean logits, noise std, H, G (Shazeer eq. 3-5)."""
    rows = []
    for t, x_t in enumerate(x):
        clean = matvec(Wg, x_t)
        std = [softplus(v) + eps for v in matvec(Wn, x_t)]
        h = [clean[i] + noise[t][i] * std[i] for i in range(len(clean))]
        rows.append((clean, std, h, keep_topk_softmax(h, k)))
    return rows


def paper_importance_loss(rows):
    E_ = len(rows[0][3])
    return cv2([sum(r[3][i] for r in rows) for i in range(E_)])


def paper_load(rows, k):
    """Load(X)_i = sum_x Phi((clean_i - kth_excluding(H, k, i)) / std_i) (appendix A eqs. 8-10)."""
    E_ = len(rows[0][0])
    return [sum(phi((c[i] - kth_excluding(h, k, i)) / s[i]) for c, s, h, _ in rows) for i in range(E_)]


def paper_switch_loss(probs, chosen_lists, num_experts):
    """alpha-free Switch eq. 4: N * sum_i f_i P_i; f_i = share of assignments to i, P_i = mean prob."""
    n_assign = sum(len(c) for c in chosen_lists)
    f = [sum(c.count(i) for c in chosen_lists) / n_assign for i in range(num_experts)]
    P = [sum(p[i] for p in probs) / len(probs) for i in range(num_experts)]
    return num_experts * sum(fi * Pi for fi, Pi in zip(f, P, strict=True))


def paper_choices(router, x, k):
    """The router's logits, softmax probabilities and top-k experts per token, from its weights (lists)."""
    logits = (x @ router.gate.weight.T).tolist()
    probs = [softmax(row) for row in logits]
    return logits, probs, [sorted(range(len(p)), key=lambda i: -p[i])[:k] for p in probs]


def paper_z_loss(logits):
    """ST-MoE eq. 5: 1/B sum_x (log sum_j exp(x_j))^2."""
    return sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits) / len(logits)


def softmax(v):
    m = max(v)
    z = sum(math.exp(a - m) for a in v)
    return [math.exp(a - m) / z for a in v]


def triples(routing):
    """(token, expert, weight) of each assignment."""
    return zip(routing.token_N.tolist(), routing.expert_N.tolist(), routing.weight_N.tolist(), strict=True)


# ---- fixtures ----------------------------------------------------------------------------------
def inputs(seed=0):
    return torch.randn(T, D, generator=torch.Generator().manual_seed(seed))


def noisy_router(k, eps=1e-2, seed=0):
    router = NoisyTopKRouter(D, E, k, noise_eps=eps)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # W_noise non-zero so the noise std differs per token and expert
        router.gate.weight.normal_(0, 0.7, generator=g)
        router.noise.weight.normal_(0, 0.7, generator=g)
    return router.train()


def run_with_noise(router, x, seed=123):
    """Route with a known noise draw: the router uses randn_like, so reseeding reproduces it."""
    torch.manual_seed(seed)
    routing = router(x)
    torch.manual_seed(seed)
    noise = torch.randn(x.shape[0], router.num_experts, dtype=router.gate.weight.dtype)
    return routing, noise.tolist()


# ---- each loss equals its transcription ---------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("eps", [0.0, 1e-2])
def test_noisy_topk_importance_and_load_match_shazeer(k, eps):
    router, x = noisy_router(k, eps), inputs()
    routing, noise = run_with_noise(router, x)
    rows = paper_noisy_gating(x.tolist(), router.gate.weight.tolist(), router.noise.weight.tolist(), noise, k, eps)
    want_load = paper_load(rows, k)
    got_load = losses.smooth_load(routing.logits_TE, routing.logits_TE + torch.tensor(noise) *
                                  (F.softplus(x @ router.noise.weight.T) + eps),
                                  F.softplus(x @ router.noise.weight.T) + eps, k)
    assert got_load.tolist() == pytest.approx(want_load, rel=1e-4, abs=1e-5)
    assert routing.losses["importance"].item() == pytest.approx(paper_importance_loss(rows), rel=1e-4, abs=1e-6)
    assert routing.losses["load"].item() == pytest.approx(cv2(want_load), rel=1e-4, abs=1e-6)
    # the routed assignments are the paper's non-zero gates, with the paper's values
    gates = [[0.0] * E for _ in range(T)]
    for t, e, w in triples(routing):
        gates[t][e] = w
    for t in range(T):
        assert gates[t] == pytest.approx(rows[t][3], abs=1e-5)


def test_kth_excluding_matches_definition_with_ties():
    h = torch.tensor([[3.0, 2.0, 2.0, 1.0, 0.5], [0.1, 0.1, 0.1, 0.1, 0.1], [5.0, -1.0, 4.0, 4.5, 0.0]])
    for k in (1, 2, 3, 4):
        got = losses.kth_excluding(h, k).tolist()
        for t, row in enumerate(h.tolist()):
            assert got[t] == [kth_excluding(row, k, i) for i in range(len(row))]


@pytest.mark.parametrize("router_kind, k", [("topk", 1), ("topk", 2), ("topk_then_softmax", 3), ("switch", 1)])
def test_switch_balance_and_z_loss_match_formula(router_kind, k):
    if router_kind == "switch":
        router = SwitchRouter(D, E)
    else:
        router = TopKRouter(D, E, k, softmax_before_topk=router_kind == "topk")
    with torch.no_grad():
        router.gate.weight.normal_(0, 1, generator=torch.Generator().manual_seed(3))
    x = inputs(1)
    routing = router(x)
    logits, probs, chosen = paper_choices(router, x, k)
    assert routing.losses["load_balance"].item() == pytest.approx(paper_switch_loss(probs, chosen, E), rel=1e-5)
    assert routing.losses["z_loss"].item() == pytest.approx(paper_z_loss(logits), rel=1e-5)
    # importance of a token-choice router: CV^2 of the summed gates
    gates = [[0.0] * E for _ in range(T)]
    for t, e, w in triples(routing):
        gates[t][e] = w
    assert routing.losses["importance"].item() == pytest.approx(cv2([sum(g[i] for g in gates) for i in range(E)]),
                                                                rel=1e-4)


@pytest.mark.parametrize("router_kind, k, factor", [("switch", 1, 0.5), ("topk", 2, 0.75)])
def test_switch_balance_counts_the_routers_choices_before_capacity_drops(router_kind, k, factor):
    """f_i in Switch eq. 4 is the share the router chose for expert i (Mesh TF counts the argmax before the
    capacity limit): a skewed router must see its skew even where the capacity limit evened the load."""
    from moeify.moe.capacity import CapacityLimit

    router = SwitchRouter(D, E) if router_kind == "switch" else TopKRouter(D, E, k)
    with torch.no_grad():
        router.gate.weight.normal_(0, 1, generator=torch.Generator().manual_seed(3))
        router.gate.weight[0] += 2.0  # expert 0 is everyone's favourite: over capacity
    router.capacity = CapacityLimit(E, k, factor)
    x = inputs(1)
    routing = router(x)
    assert routing.losses["dropped_fraction"].item() > 0.1  # the limit did drop many assignments
    _, probs, chosen = paper_choices(router, x, k)
    kept = [[e for t_, e, _ in triples(routing) if t_ == t] for t in range(T)]
    before, after = paper_switch_loss(probs, chosen, E), paper_switch_loss(probs, kept, E)
    assert routing.losses["load_balance"].item() == pytest.approx(before, rel=1e-5)
    assert abs(before - after) > 0.05 * before  # the two counts differ: the check can tell them apart


def test_balanced_switch_loss_is_one():
    """Switch eq. 4 is minimised at 1 under uniform routing (a property the formula promises)."""
    probs = torch.full((8, 4), 0.25)
    assert losses.load_balancing_loss(probs, torch.arange(8) % 4, 4).item() == pytest.approx(1.0)


def test_hierarchical_losses_match_appendix_b():
    G, M, J, K, eps = 2, 3, 1, 2, 1e-2
    router = HierarchicalRouter(D, G * M, G, J, K, noisy=True, noise_eps=eps).train()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in router.parameters():
            p.normal_(0, 0.7, generator=g)
    x = inputs(2)
    torch.manual_seed(9)
    routing = router(x)
    torch.manual_seed(9)  # the router draws the primary noise first, then the secondary
    n_p = torch.randn(T, G).tolist()
    n_s = torch.randn(T, G * M).tolist()
    xs = x.tolist()
    prim = paper_noisy_gating(xs, router.primary_gate.weight.tolist(), router.primary_noise.weight.tolist(), n_p, J,
                              eps)
    Wg, Wn = router.gate.weight.tolist(), router.noise.weight.tolist()
    sec = [paper_noisy_gating(xs, Wg[g * M:(g + 1) * M], Wn[g * M:(g + 1) * M],
                              [row[g * M:(g + 1) * M] for row in n_s], K, eps) for g in range(G)]
    # Importance_H(X)_{g,j} = sum_x G_p(x)_g G_g(x)_j
    imp = [sum(prim[t][3][g] * sec[g][t][3][j] for t in range(T)) for g in range(G) for j in range(M)]
    # Load_H(X)_{g,j} = Load_p(X)_g * Load_g(X^(g))_j / |X^(g)|, X^(g) = tokens with G_p(x)_g > 0
    load_p = paper_load(prim, J)
    load = []
    for g in range(G):
        members = [t for t in range(T) if prim[t][3][g] > 0]
        sub = paper_load([sec[g][t] for t in members], K) if members else [0.0] * M
        load += [load_p[g] * sub[j] / max(len(members), 1) for j in range(M)]
    assert routing.losses["importance"].item() == pytest.approx(cv2(imp), rel=1e-4)
    assert routing.losses["load"].item() == pytest.approx(cv2(load), rel=1e-4)
    # and the assignments carry the product gates
    got = {(t, e): w for t, e, w in triples(routing)}
    want = {(t, g * M + j): prim[t][3][g] * sec[g][t][3][j] for t in range(T) for g in range(G) for j in range(M)
            if prim[t][3][g] * sec[g][t][3][j] > 0}
    assert got.keys() == want.keys()
    assert [got[key] for key in sorted(got)] == pytest.approx([want[key] for key in sorted(want)], abs=1e-5)


# ---- gradients in float64 ------------------------------------------------------------------------
def loss_of(router, names, loss_name, x, seed=123):
    def f(*weights):
        torch.manual_seed(seed)  # the same noise draw on every evaluation
        return functional_call(router, dict(zip(names, weights, strict=True)), (x,)).losses[loss_name]
    return f


@pytest.mark.parametrize("kind, loss_name, params", [
    ("noisy", "load", ("gate.weight", "noise.weight")),
    ("noisy", "importance", ("gate.weight", "noise.weight")),
    ("noisy", "z_loss", ("gate.weight",)),
    ("noisy", "load_balance", ("gate.weight", "noise.weight")),
    ("topk", "importance", ("gate.weight",)),
    ("topk", "load_balance", ("gate.weight",)),
    ("topk", "z_loss", ("gate.weight",)),
    ("hier", "load", ("gate.weight", "noise.weight", "primary_gate.weight", "primary_noise.weight")),
    ("hier", "importance", ("gate.weight", "primary_gate.weight")),
])
def test_loss_gradients_reach_router_weights(kind, loss_name, params):
    if kind == "noisy":
        router = noisy_router(2)
    elif kind == "topk":
        router = TopKRouter(D, E, 2)
        with torch.no_grad():
            router.gate.weight.normal_(0, 0.7, generator=torch.Generator().manual_seed(1))
    else:
        router = HierarchicalRouter(D, 9, 3, 2, 2, noisy=True).train()  # k < choices at both levels: gates < 1
        with torch.no_grad():
            for p in router.parameters():
                p.normal_(0, 0.7, generator=torch.Generator().manual_seed(4))
    router = router.double()
    x = inputs().double()
    state = dict(router.named_parameters())
    weights = tuple(state[n].detach().clone().requires_grad_(True) for n in params)
    f = loss_of(router, params, loss_name, x)
    assert f(*weights).dtype == torch.float64
    assert torch.autograd.gradcheck(f, weights, eps=1e-6, atol=1e-5, rtol=1e-3, fast_mode=True)
    grads = torch.autograd.grad(f(*weights), weights)
    for name, grad in zip(params, grads, strict=True):
        assert grad.abs().sum() > 0, f"{loss_name} does not reach {name}"


# ---- a skewed router is balanced by the loss -------------------------------------------------------
def cv_tokens_per_expert(model, X):
    model.eval()
    with torch.no_grad():
        model(X)
    model.train()
    out = []
    for row in moeify.router_stats(model):
        counts = torch.tensor(row.tokens_per_expert, dtype=torch.float64)
        out.append((counts.std(unbiased=False) / counts.mean()).item())
    return max(out)


def train_skewed(example, coef, steps=20):
    ex = example("mlp")
    cfg = moeify.MoEConfig(num_experts=4, top_k=1, router="topk", router_bias=True, load_balance_coef=coef,
                           z_loss_coef=0.0, seed=0)
    model = moeify.convert(ex.build_model(), cfg, example_inputs=ex.example_inputs()).model
    for layer in moeify.moe_layers(model).values():
        with torch.no_grad():  # skew: expert 0 wins almost every token
            layer.router.gate.bias.copy_(torch.tensor([3.0, 0.0, 0.0, 0.0]))
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(256, 16, generator=g), torch.randint(0, 5, (256,), generator=g)
    before = cv_tokens_per_expert(model, X)
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(steps):
        loss = F.cross_entropy(model(X), y) + moeify.aux_loss(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return before, cv_tokens_per_expert(model, X)


def test_balancing_loss_reduces_cv_of_skewed_router(example):
    """Stated factor: with the Switch loss (coef 0.1) the CV of tokens per expert ends at least 5x
    below the same run without it (measured ~20x: 1.72 -> 0.07-0.10 vs 1.72 -> 1.68-1.72)."""
    before, without = train_skewed(example, 0.0)
    before_with, with_loss = train_skewed(example, 0.1)
    assert before == pytest.approx(before_with) and before > 1.5  # both start from the same skew
    assert with_loss * 5 < without, (without, with_loss)
    assert with_loss < 0.5 * before


def test_every_loss_reaches_aux_loss_per_layer(example):
    """Each coefficient weighs its own loss, per layer, and moeify.aux_loss sums them with grad."""
    ex = example("mlp")
    coefs = {"load_balance": 0.01, "z_loss": 0.002, "importance": 0.3, "load": 0.5}
    cfg = moeify.MoEConfig(num_experts=4, top_k=2, router="noisy_topk", load_balance_coef=0.01, z_loss_coef=0.002,
                           importance_coef=0.3, load_coef=0.5)
    model = moeify.convert(ex.build_model(), cfg, example_inputs=ex.example_inputs()).model.train()
    routings = {}
    for name, layer in moeify.moe_layers(model).items():
        layer.router.register_forward_hook(lambda m, a, out, name=name: routings.update({name: out}))
    model(*ex.example_inputs())
    per_layer = moeify.aux_losses(model)
    assert set(per_layer) == set(routings) and len(per_layer) == 2
    for name, found in per_layer.items():
        assert set(found) == set(coefs)
        for loss_name, coef in coefs.items():
            assert found[loss_name].item() == pytest.approx(coef * routings[name].losses[loss_name].item())
    total = moeify.aux_loss(model)
    assert total.item() == pytest.approx(sum(v.item() for found in per_layer.values() for v in found.values()))
    total.backward()
    for layer in moeify.moe_layers(model).values():
        assert layer.router.gate.weight.grad.abs().sum() > 0 and layer.router.noise.weight.grad.abs().sum() > 0


def test_load_loss_needs_noisy_router():
    with pytest.raises(moeify.MoeifyError, match="load_coef.*noisy_topk"):
        moeify.MoEConfig(router="topk", load_coef=0.1)


def test_aux_loss_of_a_model_without_moe_layers_warns_and_format_stats_says_none_ran(example):
    """The dense model passed by mistake gave a silent 0 (and router_stats an empty table)."""
    ex = example("gpt")
    dense = ex.build_model()
    with pytest.warns(UserWarning, match="has no MoE layer, so its aux loss is 0; pass the converted model"):
        assert moeify.aux_loss(dense).item() == 0.0
    with warnings.catch_warnings():  # a loop that trains dense models too says so
        warnings.simplefilter("error")
        assert moeify.aux_loss(dense, dense_ok=True).item() == 0.0
    assert moeify.format_stats(moeify.router_stats(dense)).startswith("no MoE layer ran in the model's last forward")
    model = moeify.convert(dense, moeify.MoEConfig(num_experts=4)).model
    assert moeify.format_stats(moeify.router_stats(model)).startswith("no MoE layer ran")  # before any forward
    model(*ex.example_inputs())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert moeify.aux_loss(model).item() > 0
    assert moeify.format_stats(moeify.router_stats(model)).startswith("layer")
