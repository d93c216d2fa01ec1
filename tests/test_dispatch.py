"""Dispatch and combine: the gather path (every token has P rows) against the scatter path and a plain loop."""

import pytest
import torch

from moeify import MoEConfig
from moeify.moe.build import make_router
from moeify.moe.dispatch import LocalCombine, LocalDispatch
from moeify.moe.router import Routing

T, D, E = 11, 5, 4


def routing_of(P: int, seed: int = 0, per_token: bool = True) -> Routing:
    """P distinct experts per token, token-major, with random gates (float64)."""
    g = torch.Generator().manual_seed(seed)
    expert_TP = torch.stack([torch.randperm(E, generator=g)[:P] for _ in range(T)])
    weight_TP = torch.rand(T, P, generator=g, dtype=torch.float64).requires_grad_()
    token_N = torch.arange(T).repeat_interleave(P)
    return Routing(token_N, expert_TP.reshape(-1), weight_TP.reshape(-1), torch.zeros(T, E), torch.zeros(T, E), {},
                   per_token=P if per_token else None)


def dispatch_combine(routing: Routing, x_TD: torch.Tensor, expert_scale_E: torch.Tensor) -> torch.Tensor:
    """Dispatch, a stand-in expert (row times its expert's scale, so rows must reach the right expert), combine."""
    x_ND, plan = LocalDispatch(E)(x_TD, routing)
    expert_N = torch.repeat_interleave(torch.arange(E), plan.counts_E)
    return LocalCombine()(x_ND * expert_scale_E[expert_N].unsqueeze(-1), plan), plan


def loop_reference(routing: Routing, x_TD: torch.Tensor, expert_scale_E: torch.Tensor) -> torch.Tensor:
    out = [torch.zeros(D, dtype=x_TD.dtype) for _ in range(T)]
    for t, e, w in zip(routing.token_N.tolist(), routing.expert_N.tolist(), routing.weight_N, strict=True):
        out[t] = out[t] + w * expert_scale_E[e] * x_TD[t]
    return torch.stack(out)


@pytest.mark.parametrize("P", [1, 2, 3])
def test_the_gather_path_equals_the_scatter_path_and_the_loop_with_first_and_second_derivatives(P):
    g = torch.Generator().manual_seed(1)
    x_TD = torch.randn(T, D, generator=g, dtype=torch.float64, requires_grad=True)
    scale_E = torch.randn(E, generator=g, dtype=torch.float64)
    grads = {}
    for per_token in (True, False):
        routing = routing_of(P, per_token=per_token)
        out_TD, plan = dispatch_combine(routing, x_TD, scale_E)
        assert (plan.inverse_N is not None) == per_token
        torch.testing.assert_close(out_TD, loop_reference(routing, x_TD, scale_E))
        # second order: the gradient of a function of the first gradients (create_graph=True)
        gx, gw = torch.autograd.grad(out_TD.square().sum(), (x_TD, routing.weight_N), create_graph=True)
        grads[per_token] = (gx, gw, *torch.autograd.grad((gx.sin().sum() + gw.cos().sum()), (x_TD,)))
    for got, want in zip(grads[True], grads[False], strict=True):
        torch.testing.assert_close(got, want)


def test_no_tokens():
    routing = Routing(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0),
                      torch.zeros(0, E), torch.zeros(0, E), {}, per_token=2)
    x_TD = torch.zeros(0, D, requires_grad=True)
    x_ND, plan = LocalDispatch(E)(x_TD, routing)
    out = LocalCombine()(x_ND, plan)
    assert out.shape == (0, D)
    out.sum().backward()
    assert x_TD.grad.shape == (0, D)


@pytest.mark.parametrize(("cfg", "per_token"), [
    (dict(router="topk", top_k=2), 2),
    (dict(router="switch", top_k=1), 1),
    (dict(router="noisy_topk", top_k=3), 3),
    (dict(router="topk", top_k=2, num_groups=2, group_top_k=2), 4),  # hierarchical: J * K rows per token
    (dict(router="switch", top_k=1, capacity_factor=0.5), None),  # drops: tokens keep 0 or 1 rows
    (dict(router="expert_choice", top_k=2), None),  # experts choose: any number per token
])
def test_routers_say_when_every_token_has_the_same_number_of_rows(cfg, per_token):
    router = make_router(MoEConfig(num_experts=8, **cfg), D * 2, torch.Generator().manual_seed(0)).train()
    routing = router(torch.randn(16, D * 2))
    assert routing.per_token == per_token
    if per_token is not None:
        assert torch.equal(routing.token_N, torch.arange(16).repeat_interleave(per_token))
