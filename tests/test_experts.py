"""GroupedExperts against a plain per-expert loop written here (values and gradients)."""

import pytest
import torch
import torch.nn.functional as F

from moeify.moe.dispatch import expert_counts
from moeify.moe.experts import GroupedExperts

ACT = {"gelu": F.gelu, "silu": F.silu, "relu": F.relu}


def reference(experts: GroupedExperts, x_ND, counts_E):
    """Expert e applied to its rows, one token at a time: y = w2(act(w1 x + b1) [* (w3 x + b3)]) + b2."""
    act = ACT[experts.activation]
    rows = []
    start = 0
    for e, n in enumerate(counts_E.tolist()):
        for i in range(start, start + n):
            x_D = x_ND[i]
            h_F = experts.w1_EFD[e] @ x_D + (experts.b1_EF[e] if experts.has_bias else 0)
            h_F = act(h_F)
            if experts.gated:
                h_F = h_F * (experts.w3_EFD[e] @ x_D + (experts.b3_EF[e] if experts.has_bias else 0))
            rows.append(experts.w2_EDF[e] @ h_F + (experts.b2_ED[e] if experts.has_bias else 0))
        start += n
    return torch.stack(rows)


COUNTS = [[3, 0, 5, 1], [0, 0, 6, 0]]  # zero-token experts included
EXPERTS = [  # (backend, gated, activation, bias)
    ("grouped_mm", False, "gelu", True),
    ("grouped_mm", False, "relu", False),
    ("grouped_mm", True, "silu", False),
    ("grouped_mm", True, "gelu", True),
    ("loop", False, "gelu", True),
    ("loop", True, "silu", False),
]


@pytest.mark.parametrize("backend,gated,activation,bias", EXPERTS)
@pytest.mark.parametrize("counts", COUNTS)
def test_grouped_experts_match_per_token_loop(backend, gated, activation, bias, counts):
    torch.manual_seed(0)
    experts = GroupedExperts(4, 16, 32, activation, gated=gated, bias=bias, backend=backend)
    if bias:
        with torch.no_grad():
            for b in (experts.b1_EF, experts.b2_ED, experts.b3_EF):
                if b is not None:
                    b.normal_()
    counts_E = torch.tensor(counts)
    x_ND = torch.randn(int(counts_E.sum()), 16, requires_grad=True)
    grad_ND = torch.randn(x_ND.shape[0], 16)

    y = experts(x_ND, counts_E)
    y.backward(grad_ND)
    got = {"x": x_ND.grad.clone(), **{n: p.grad.clone() for n, p in experts.named_parameters()}}
    x_ND.grad = None
    experts.zero_grad(set_to_none=True)
    want_y = reference(experts, x_ND, counts_E)
    want_y.backward(grad_ND)
    want = {"x": x_ND.grad, **{n: p.grad for n, p in experts.named_parameters()}}

    torch.testing.assert_close(y, want_y, rtol=1e-5, atol=1e-5)
    for name in want:
        # an expert with no tokens gets an exactly zero weight gradient
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)


def test_expert_counts_match_bincount():
    expert_N = torch.randint(0, 6, (50,))
    assert torch.equal(expert_counts(expert_N, 8), torch.bincount(expert_N, minlength=8))
