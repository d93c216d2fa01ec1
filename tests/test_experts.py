"""GroupedExperts against a plain per-expert loop written here (values and gradients)."""

import pytest
import torch
import torch.nn.functional as F

from moeify.moe import expert_loop, grad_buffers
from moeify.moe import experts as experts_mod
from moeify.moe.experts import GroupedExperts, grouped_mm_usable
from moeify.moe.losses import count_indices

ACT = {"gelu": F.gelu, "gelu_tanh": lambda v: F.gelu(v, approximate="tanh"), "silu": F.silu, "relu": F.relu,
       "quick_gelu": lambda v: v / (1 + torch.exp(-1.702 * v)),  # CLIP's, written out
       "relu2": lambda v: torch.where(v > 0, v * v, 0.0)}  # Primer's squared ReLU


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


# zero-token experts included; padded mode batches all four experts, one expert alone, and the
# evenly spaced experts 1 and 3 through a strided view; at most 2 rows per expert (one token's
# top-2, a decoding step) take the transposed product (TRANSPOSED_MAX_ROWS)
COUNTS = [[3, 0, 5, 1], [0, 0, 6, 0], [0, 4, 0, 2], [1, 0, 1, 0], [2, 1, 2, 2]]
EXPERTS = [  # (backend, gated, activation, bias)
    ("grouped_mm", False, "gelu", True),
    ("grouped_mm", False, "relu", False),
    ("grouped_mm", True, "silu", False),
    ("grouped_mm", True, "gelu", True),
    ("expert_loop", False, "gelu", True),
    ("expert_loop", False, "gelu_tanh", False),
    ("expert_loop", False, "relu", True),
    ("expert_loop", True, "silu", False),
    ("expert_loop", True, "gelu", True),
    ("expert_loop", False, "quick_gelu", True),
    ("grouped_mm", False, "quick_gelu", False),
    ("expert_loop", False, "relu2", True),
    ("expert_loop", True, "relu2", False),
    ("grouped_mm", False, "relu2", False),
]


# expert_loop's modes: blocks of at most 2 rows per expert (several blocks accumulate one expert's
# weight gradient) through oneDNN (float32 on the CPU) or through torch's own matmuls (what float64
# and other devices take), or the active experts in one padded batch
LOOP_MODES = {"blocks": {"PAD_MAX_ROWS": 0, "ROW_BLOCK": 2}, "blocks-aten": {"PAD_MAX_ROWS": 0, "ROW_BLOCK": 2,
                                                                           "ONEDNN": False},
              "padded": {"PAD_MAX_ROWS": 32}}
# grouped_mm's modes on the CPU: per-expert oneDNN products (the default), or torch's grouped_mm
# kernel, the one accelerators run
GROUPED_MODES = {"onednn": {}, "kernel": {"GROUPED_ONEDNN": False}}


def set_mode(monkeypatch, mode):
    for name, value in LOOP_MODES.get(mode, {}).items():
        monkeypatch.setattr(expert_loop, name, value)
    for name, value in GROUPED_MODES.get(mode, {}).items():
        monkeypatch.setattr(experts_mod, name, value)


@pytest.mark.parametrize("backend,gated,activation,bias,mode", [
    (*experts, mode) for experts in EXPERTS for mode in (LOOP_MODES if experts[0] == "expert_loop" else GROUPED_MODES)])
@pytest.mark.parametrize("counts", COUNTS)
def test_grouped_experts_match_per_token_loop(backend, gated, activation, bias, counts, mode, monkeypatch):
    set_mode(monkeypatch, mode)
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
    with torch.no_grad():  # inference runs the same products without an autograd node or saved state
        y_inference = experts(x_ND, counts_E)
    assert y_inference.grad_fn is None and torch.equal(y_inference, y.detach())
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


def test_count_indices_match_bincount():
    expert_N = torch.randint(0, 6, (50,))
    assert torch.equal(count_indices(expert_N, 8), torch.bincount(expert_N, minlength=8))


@pytest.mark.parametrize("backend,mode", [("grouped_mm", "blocks"), ("expert_loop", "blocks"),
                                          ("expert_loop", "padded")])
def test_expert_dropout_drops_hidden_units_and_rescales(backend, mode, monkeypatch):
    """Switch expert dropout: in training each hidden unit is zeroed with probability p, survivors x 1/(1-p)."""
    set_mode(monkeypatch, mode)
    torch.manual_seed(0)
    E, D, Fd, p = 2, 8, 512, 0.25
    experts = GroupedExperts(E, D, Fd, "relu", bias=True, dropout=p, d_out=Fd, backend=backend)
    with torch.no_grad():  # w2 = identity, b1 large: y is exactly the (dropped) positive hidden layer
        experts.w2_EDF.copy_(torch.eye(Fd).expand(E, Fd, Fd))
        experts.b2_ED.zero_()
        experts.b1_EF.fill_(10.0)
    counts_E = torch.tensor([9, 7])
    x_ND = torch.randn(16, D, requires_grad=True)
    hidden = torch.cat([F.relu(x_ND[:9] @ experts.w1_EFD[0].T + 10), F.relu(x_ND[9:] @ experts.w1_EFD[1].T + 10)])

    y = experts.eval()(x_ND, counts_E)
    torch.testing.assert_close(y, hidden)  # no dropout in eval

    y = experts.train()(x_ND, counts_E)
    kept = y != 0
    assert abs(1 - kept.float().mean().item() - p) < 0.03  # 8192 Bernoulli draws: std 0.005
    torch.testing.assert_close(y[kept], hidden[kept] / (1 - p))
    y.sum().backward()
    w1_row = torch.cat([experts.w1_EFD[0].expand(9, -1, -1), experts.w1_EFD[1].expand(7, -1, -1)])  # (N, F, D)
    want = torch.einsum("nf,nfd->nd", kept.float() / (1 - p), w1_row)  # relu' = 1: preacts are > 0
    torch.testing.assert_close(x_ND.grad, want.detach(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mapping_fails", [False, True])
def test_large_gradients_of_idle_experts_are_zero_and_outlive_backward(mapping_fails, monkeypatch):
    """Big weight gradients come from the module's reusable mappings: idle experts' slices read zero.

    When no mapping can be had, they come from an ordinary buffer instead, zeroed the same way.
    """
    import gc

    if mapping_fails:
        def refuse(*args, **kwargs):
            raise OSError("no mapping")
        monkeypatch.setattr(grad_buffers.mmap, "mmap", refuse)
    torch.manual_seed(0)
    E, D, Fd = 4, 256, 2048  # 8 MiB per stacked weight: large enough for the page-backed buffer
    grads = {}
    for backend in ("expert_loop", "grouped_mm"):
        experts = GroupedExperts(E, D, Fd, "gelu", bias=True, backend=backend)
        torch.manual_seed(1)
        with torch.no_grad():  # the same scaled weights for both backends
            for p in experts.parameters():
                p.normal_(0, D ** -0.5)
        x_ND = torch.randn(5, D, requires_grad=True)
        experts(x_ND, torch.tensor([0, 5, 0, 0])).square().sum().backward()
        grads[backend] = {n: p.grad for n, p in experts.named_parameters()}
        del experts
        gc.collect()
    for name, got in grads["expert_loop"].items():
        want = grads["grouped_mm"][name]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3, msg=name)
        assert got[[0, 2, 3]].abs().sum() == 0, name
        assert got[1].abs().sum() > 0, name


def test_grouped_mm_usable_checks_alignment_and_dtype():
    w = torch.empty(2, 8, 16)
    assert grouped_mm_usable(torch.empty(3, 16), w, torch.float32)
    assert grouped_mm_usable(torch.empty(3, 16), w, torch.bfloat16)
    assert not grouped_mm_usable(torch.empty(3, 6), torch.empty(2, 8, 6), torch.float32)  # 24-byte rows
    assert not grouped_mm_usable(torch.empty(3, 16), torch.empty(2, 6, 16), torch.float32)  # 24-byte weight rows
    assert not grouped_mm_usable(torch.empty(3, 16), w, torch.float64)  # no kernel for float64
    # "auto" is the per-expert loop in eager CPU; unusable grouped_mm falls back to a plain loop
    experts = GroupedExperts(2, 6, 8, "relu")
    assert experts.backend_for(torch.empty(3, 6)) == "expert_loop"


@pytest.mark.parametrize("mode", list(LOOP_MODES))
@pytest.mark.parametrize("gated,activation", [(False, "gelu"), (True, "silu"), (False, "quick_gelu"),
                                             (True, "quick_gelu"), (False, "relu2")])
@pytest.mark.parametrize("counts", [[2, 0, 3], [1, 0, 2]])
def test_expert_loop_backward_passes_gradcheck(mode, gated, activation, counts, monkeypatch):
    """The hand-written backward against finite differences, in float64, with an idle expert."""
    set_mode(monkeypatch, mode)
    torch.manual_seed(0)
    experts = GroupedExperts(3, 4, 6, activation, gated=gated, bias=True, backend="expert_loop",
                             dtype=torch.float64)
    counts_E = torch.tensor(counts)
    names = [n for n, _ in experts.named_parameters()]

    def run(x_ND, *params):
        return torch.func.functional_call(experts, dict(zip(names, params, strict=True)), (x_ND, counts_E))

    x_ND = torch.randn(sum(counts), 4, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().normal_().requires_grad_() for p in experts.parameters()]
    assert torch.autograd.gradcheck(run, (x_ND, *params))


def test_padded_batch_covers_evenly_spaced_experts():
    """A padded batch reads the weights through a strided view: evenly spaced active experts, else all."""
    pick = expert_loop._batched_experts
    assert pick([5], 8) is None  # one expert: a plain matmul
    assert pick([1, 5], 8) == slice(1, 6, 4)  # one token's top-2: always evenly spaced
    assert pick([1, 4, 7], 8) == slice(1, 8, 3)
    assert pick([0, 2, 3], 4) == slice(0, 4, 1)  # uneven, but half or more active: all experts
    assert pick([0, 2, 3], 8) is None  # uneven and few: expert by expert


@pytest.mark.parametrize("backend", ["grouped_mm", "expert_loop"])
def test_weight_gradients_when_the_input_needs_none(backend):
    """Frozen inputs, no bias: only the weights need gradients (grouped_mm once returned two aliased empties)."""
    torch.manual_seed(0)
    experts = GroupedExperts(3, 8, 16, "silu", gated=True, bias=False, backend=backend)
    x_ND, counts_E = torch.randn(7, 8), torch.tensor([3, 0, 4])
    experts(x_ND, counts_E).square().sum().backward()
    for name, p in experts.named_parameters():
        assert p.grad is not None and p.grad[1].abs().sum() == 0, name  # expert 1 got no rows
    want = sum(experts.forward_dense(x_ND[rows], e).square().sum()
               for e, rows in ((0, slice(0, 3)), (2, slice(3, 7))))
    grads = torch.autograd.grad(want, [experts.w1_EFD, experts.w2_EDF, experts.w3_EFD])
    for got, ref in zip((experts.w1_EFD.grad, experts.w2_EDF.grad, experts.w3_EFD.grad), grads, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
