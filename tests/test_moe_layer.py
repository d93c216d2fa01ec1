"""The MoE layer against a plain per-token loop written from the definition of top-k MoE."""

import pytest
import torch
import torch.nn.functional as F

from moeify import MoEConfig
from moeify.moe.build import DenseFFN, build_moe_layer
from moeify.moe.router import Routing

ACT = {"relu": F.relu, "gelu": F.gelu, "gelu_tanh": lambda v: F.gelu(v, approximate="tanh"), "silu": F.silu}


def expert_out(layer, e, x_D):
    """Expert e on one token, from the raw weight tensors."""
    ex = layer.experts
    h = ex.w1_EFD[e] @ x_D + (ex.b1_EF[e] if ex.b1_EF is not None else 0)
    h = ACT[ex.activation](h)
    if ex.w3_EFD is not None:
        h = h * (ex.w3_EFD[e] @ x_D + (ex.b3_EF[e] if ex.b3_EF is not None else 0))
    return ex.w2_EDF[e] @ h + (ex.b2_ED[e] if ex.b2_ED is not None else 0)


def reference(layer, x_TD, k, router, preserve_scale):
    """Route each token on its own: softmax over the router logits, top-k, gates, weighted sum of experts."""
    gate = layer.router.gate
    out = []
    for x_D in x_TD:
        logits = gate.weight.double() @ x_D.double() + (gate.bias.double() if gate.bias is not None else 0)
        probs = torch.softmax(logits, dim=0)
        top = sorted(range(len(probs)), key=lambda e: -probs[e].item())[:k]
        if router == "topk":
            gates = [probs[e] / sum(probs[j] for j in top) for e in top]
        else:  # switch: gate = probability, or 1 in value with preserve_scale
            gates = [torch.ones((), dtype=torch.float64) if preserve_scale else probs[top[0]]]
        out.append(sum(g.float() * expert_out(layer, e, x_D) for g, e in zip(gates, top, strict=True)))
    return torch.stack(out)


def random_layer(E, k, D, Fd, act, gated, bias, router, preserve_scale=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    dense = DenseFFN(act, torch.randn(Fd, D, generator=g), torch.randn(D, Fd, generator=g),
                     torch.randn(Fd, generator=g) if bias else None, torch.randn(D, generator=g) if bias else None,
                     torch.randn(Fd, D, generator=g) if gated else None,
                     torch.randn(Fd, generator=g) if (gated and bias) else None)
    cfg = MoEConfig(num_experts=E, top_k=k, router=router, preserve_scale=preserve_scale, router_bias=True, seed=seed)
    layer = build_moe_layer(cfg, dense)
    with torch.no_grad():  # make experts differ so the reference tests the routing, not only the copy
        for p in layer.experts.parameters():
            p.add_(torch.randn(p.shape, generator=g))
        layer.router.gate.weight.normal_(0, 1, generator=g)
    return layer.eval()


@pytest.mark.parametrize("E, k, T, D, Fd, act, gated, bias, router, preserve", [
    (4, 2, 7, 6, 10, "relu", False, True, "topk", True),
    (8, 2, 33, 8, 12, "gelu", False, True, "topk", True),
    (5, 3, 1, 4, 6, "silu", True, False, "topk", True),
    (8, 1, 16, 8, 16, "gelu_tanh", True, True, "switch", True),
    (3, 1, 9, 5, 7, "relu", False, False, "switch", False),
    (16, 4, 3, 8, 8, "silu", True, True, "topk", True),  # T*k < E: most experts get no token
])
def test_matches_per_token_loop(E, k, T, D, Fd, act, gated, bias, router, preserve):
    layer = random_layer(E, k, D, Fd, act, gated, bias, router, preserve)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        got = layer(x)
        want = reference(layer, x, k, router, preserve)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_experts_that_receive_no_tokens():
    layer = random_layer(6, 2, 4, 8, "relu", False, True, "topk")
    with torch.no_grad():
        layer.router.gate.bias.copy_(torch.tensor([0.0, 0.0, 0.0, -1e4, -1e4, -1e4]))
    x = torch.randn(11, 4)
    with torch.no_grad():
        got = layer(x)
        assert layer.aux.last_stats["tokens_per_expert"][3:].sum() == 0
        torch.testing.assert_close(got, reference(layer, x, 2, "topk", True), atol=1e-5, rtol=1e-4)


def test_tokens_routed_to_no_expert_contribute_zero():
    """Dispatch/combine on hand-made assignments where tokens 1 and 3 have none (as after capacity drops)."""
    layer = random_layer(4, 2, 5, 8, "gelu", False, True, "topk")
    x = torch.randn(4, 5)
    token_N = torch.tensor([0, 0, 2, 2])
    expert_N = torch.tensor([1, 3, 0, 1])
    weight_N = torch.tensor([0.25, 0.75, 0.5, 0.5])
    empty = torch.zeros(4, 4)
    routing = Routing(token_N, expert_N, weight_N, empty, empty.softmax(-1), {})
    with torch.no_grad():
        x_ND, plan = layer.dispatch(x, routing)
        y = layer.combine(layer.experts(x_ND, plan.counts_E), plan)
        want = torch.zeros(4, 5)
        for t, e, w in zip(token_N.tolist(), expert_N.tolist(), weight_N.tolist(), strict=True):
            want[t] += w * expert_out(layer, e, x[t])
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-4)
    assert y[1].abs().sum() == 0 and y[3].abs().sum() == 0


@pytest.mark.parametrize("D", [8, 6])  # 6: rows not 16-byte aligned, grouped_mm falls back to a loop
@pytest.mark.parametrize("backend", ["grouped_mm", "expert_loop"])
def test_backends_agree_in_forward_and_backward(backend, D):
    layer = random_layer(4, 2, D, 8, "silu", True, True, "topk")
    layer.experts.backend = backend
    x = torch.randn(13, D, requires_grad=True)
    probe = torch.linspace(-1, 1, 13 * D).view(13, D)

    def grads(fn):  # d(sum(probe * fn(x)))/d(x, every layer parameter)
        x.grad = None
        layer.zero_grad(set_to_none=True)
        y = fn(x)
        (y * probe).sum().backward()
        return y.detach(), {"x": x.grad.clone(), **{n: p.grad.clone() for n, p in layer.named_parameters()}}

    y, got = grads(layer)
    want_y, want = grads(lambda v: reference(layer, v, 2, "topk", True))
    torch.testing.assert_close(y, want_y, atol=1e-5, rtol=1e-4)
    assert got.keys() == want.keys()
    for name in want:  # backward through the per-token loop's autograd is the reference
        torch.testing.assert_close(got[name], want[name], atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_a_layer_computes_only_the_losses_it_weighs_and_none_without_autograd():
    layer = random_layer(4, 2, 8, 16, "gelu", False, True, "topk")
    layer.router.loss_names = None  # a router on its own: every loss
    seen = []
    layer.router.register_forward_hook(lambda m, args, out: seen.append(set(out.losses)))
    x = torch.randn(6, 8)
    layer(x)
    assert seen[-1] == {"load_balance", "z_loss", "importance"}
    layer = random_layer(4, 2, 8, 16, "gelu", False, True, "topk")  # default coefficients: importance 0
    layer.router.register_forward_hook(lambda m, args, out: seen.append(set(out.losses)))
    layer(x)
    assert seen[-1] == {"load_balance", "z_loss"} and set(layer.aux.last_losses) == {"load_balance", "z_loss"}
    with torch.no_grad():
        layer(x)
    assert seen[-1] == set() and layer.aux.last_losses == {}
    assert int(layer.aux.last_stats["tokens_per_expert"].sum()) == 12  # the statistics are still kept


def test_statistics_are_those_of_the_last_forward():
    layer = random_layer(4, 2, 8, 16, "gelu", False, True, "topk")
    routed = []
    layer.router.register_forward_hook(lambda m, args, out: routed.append(out))
    for T in (5, 9):  # read after each forward: the second read is not the first one's cached answer
        layer(torch.randn(T, 8))
        stats, routing = layer.aux.last_stats, routed[-1]
        want_E = torch.bincount(routing.expert_N, minlength=4)
        p = routing.probs_TE.double()
        entropy = -(p * p.log()).sum(-1).mean()
        assert torch.equal(stats["tokens_per_expert"], want_E) and int(stats["num_tokens"]) == T
        assert stats["gate_entropy"].item() == pytest.approx(entropy.item(), rel=1e-6)
