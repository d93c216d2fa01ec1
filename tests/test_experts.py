"""GroupedExperts against a plain per-expert loop written here (values and gradients)."""

import pytest
import torch
import torch.nn.functional as F

from moeify.moe import cpu_kernels, expert_loop, grad_buffers
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
# weight gradient) through oneDNN (float32 on the CPU) with the weight gradients as matmuls, or
# through torch's own matmuls (what float64 and other devices take) with the weight gradients as
# outer products (OUTER_MAX_ROWS), or the active experts in one padded batch (outer products where
# the batch has one row per expert, [1, 0, 1, 0]), or every expert in one call of moeify's CPU
# kernels (cpu_kernels.c), one row per expert included, with each weight's backward in one pass
# (moe_grad) or in two (moe_axpy, moe_outer)
LOOP_MODES = {"blocks": {"PAD_MAX_ROWS": 0, "ROW_BLOCK": 2, "OUTER_MAX_ROWS": 0, "KERNEL_MAX_ROWS": 0},
              "blocks-aten": {"PAD_MAX_ROWS": 0, "ROW_BLOCK": 2, "ONEDNN": False, "KERNEL_MAX_ROWS": 0},
              "padded": {"PAD_MAX_ROWS": 32, "KERNEL_MAX_ROWS": 0},
              "kernels": {},
              "kernels-unfused": {"KERNEL_FUSED_MAX_ROWS": 0}}
# grouped_mm's modes on the CPU: moeify's CPU kernels (the default with few rows in float32),
# per-expert oneDNN products, or torch's grouped_mm kernel, the one accelerators run
GROUPED_MODES = {"cpu-kernels": {}, "onednn": {"GROUPED_CPU_KERNELS": False},
                 "kernel": {"GROUPED_CPU_KERNELS": False, "GROUPED_ONEDNN": False}}


def set_mode(monkeypatch, mode):
    if mode in ("kernels", "kernels-unfused", "cpu-kernels") and cpu_kernels.kernels() is None:
        pytest.skip(cpu_kernels.status())
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


@pytest.mark.parametrize("mode", list(LOOP_MODES))
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("frozen", [("w2_EDF",), ("w1_EFD", "w3_EFD"), ("b1_EF", "b2_ED", "b3_EF"), ("x",)])
def test_expert_loop_gives_only_the_gradients_asked_for(mode, gated, frozen, monkeypatch):
    """Frozen weights (or an input without a gradient) get none; the rest match the per-token loop."""
    set_mode(monkeypatch, mode)
    torch.manual_seed(0)
    experts = GroupedExperts(4, 16, 32, "silu" if gated else "gelu", gated=gated, bias=True, backend="expert_loop")
    for name, p in experts.named_parameters():
        p.requires_grad_(name not in frozen)
    counts_E = torch.tensor([3, 0, 5, 1])
    x_ND = torch.randn(9, 16, requires_grad="x" not in frozen)
    grad_ND = torch.randn(9, 16)
    inputs = {"x": x_ND, **dict(experts.named_parameters())}
    wanted = {n: t for n, t in inputs.items() if t.requires_grad}
    got = torch.autograd.grad(experts(x_ND, counts_E), list(wanted.values()), grad_ND)
    want = torch.autograd.grad(reference(experts, x_ND, counts_E), list(wanted.values()), grad_ND)
    for name, g, w in zip(wanted, got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=name)


def test_count_indices_match_bincount():
    expert_N = torch.randint(0, 6, (50,))
    assert torch.equal(count_indices(expert_N, 8), torch.bincount(expert_N, minlength=8))


@pytest.mark.parametrize("backend,mode", [("grouped_mm", "blocks"), ("expert_loop", "blocks"),
                                          ("expert_loop", "padded"), ("expert_loop", "kernels")])
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


# the CPU kernels are float32 only (their float64 references: tests/test_cpu_kernels.py)
@pytest.mark.parametrize("mode", [m for m in LOOP_MODES if not m.startswith("kernels")])
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


# Second-order gradients through the CPU loop (a gradient penalty as in WGAN-GP, MAML): the loop's
# backward is hand-written, so under create_graph=True it must still hand autograd a graph.
DOUBLE_BACKWARD_EXPERTS = [  # (gated, activation, bias, dropout)
    (False, "gelu", True, 0.0),
    (True, "silu", True, 0.0),  # SwiGLU
    (True, "gelu", False, 0.0),  # GeGLU
    (False, "gelu_tanh", False, 0.0),
    (False, "relu", True, 0.0),
    (False, "quick_gelu", True, 0.0),
    (True, "relu2", True, 0.0),
    (False, "gelu", True, 0.3),
    (True, "silu", True, 0.3),
]


def backward_nodes(y) -> set[str]:
    """The names of every node of y's autograd graph."""
    names, pending, seen = set(), [y.grad_fn], set()
    while pending:
        node = pending.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(node.name())
        pending += [next_node for next_node, _ in node.next_functions]
    return names


def loop_ran(y) -> bool:
    return y.grad_fn is not None and y.grad_fn.name() == "ExpertFFNLoopBackward"


def seeded(fn, seed=0):
    """fn with the global RNG reseeded at every call (restored after): the same dropout mask each time."""
    def run(*args):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return fn(*args)
    return run


@pytest.mark.parametrize("mode", ["blocks", "padded"])
@pytest.mark.parametrize("gated,activation,bias,dropout", DOUBLE_BACKWARD_EXPERTS)
def test_expert_loop_passes_gradgradcheck(mode, gated, activation, bias, dropout, monkeypatch):
    """Gradients of the gradients against finite differences, in float64, with an idle expert."""
    set_mode(monkeypatch, mode)
    torch.manual_seed(0)
    experts = GroupedExperts(3, 4, 6, activation, gated=gated, bias=bias, dropout=dropout, dtype=torch.float64)
    counts_E = torch.tensor([2, 0, 3])
    names = [n for n, _ in experts.named_parameters()]
    x_ND = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    assert experts.backend_for(x_ND) == "expert_loop"  # "auto" in eager CPU, float64 included

    def run(x_ND, *params):
        y = torch.func.functional_call(experts, dict(zip(names, params, strict=True)), (x_ND, counts_E))
        assert loop_ran(y)
        return y

    params = [p.detach().clone().normal_().requires_grad_() for p in experts.parameters()]
    assert torch.autograd.gradgradcheck(seeded(run), (x_ND, *params))


def per_expert_reference(experts: GroupedExperts, x_ND, counts_E, keep_NF=None):
    """One F.linear chain per expert on its rows, ordinary autograd; `keep_NF`: a dropout mask to apply."""
    act, p = ACT[experts.activation], experts.dropout
    ys, start = [], 0
    for e, n in enumerate(counts_E.tolist()):
        rows = slice(start, start + n)
        start += n
        bias = (lambda b, e=e: None if b is None else b[e])
        h = act(F.linear(x_ND[rows], experts.w1_EFD[e], bias(experts.b1_EF)))
        if experts.gated:
            h = h * F.linear(x_ND[rows], experts.w3_EFD[e], bias(experts.b3_EF))
        if keep_NF is not None:
            h = h * keep_NF[rows] / (1 - p)
        ys.append(F.linear(h, experts.w2_EDF[e], bias(experts.b2_ED)))
    return torch.cat(ys)


def random_experts(gated, activation, bias, dropout=0.0, dtype=torch.float32):
    torch.manual_seed(0)
    experts = GroupedExperts(4, 8, 16, activation, gated=gated, bias=bias, dropout=dropout, dtype=dtype)
    with torch.no_grad():
        for b in (experts.b1_EF, experts.b2_ED, experts.b3_EF):
            if b is not None:
                b.normal_()
    return experts


def penalty_step(forward, x_ND, target_ND, params, loss_kind):
    """One critic step with a gradient penalty: (loss + |d loss / d x|^2).backward(); returns the gradients."""
    for t in (x_ND, *params):
        t.grad = None
    y = forward(x_ND)
    # "mse": the incoming gradient depends on the weights; "linear": it does not (a constant)
    loss = (y - target_ND).square().sum() if loss_kind == "mse" else (y * target_ND).sum()
    grad_x, = torch.autograd.grad(loss, x_ND, create_graph=True)
    (loss + grad_x.square().sum()).backward()
    return y, [t.grad.clone() for t in (x_ND, *params)]


@pytest.mark.parametrize("mode", ["kernels", "blocks", "padded"])
@pytest.mark.parametrize("gated,activation,bias,dropout", [e for e in DOUBLE_BACKWARD_EXPERTS if not e[3]])
@pytest.mark.parametrize("loss_kind", ["mse", "linear"])
def test_gradient_penalty_matches_per_expert_reference(mode, gated, activation, bias, dropout, loss_kind,
                                                       monkeypatch):
    """A gradient-penalty step through the loop (float32: oneDNN products by default) against F.linear per expert."""
    set_mode(monkeypatch, mode)
    experts = random_experts(gated, activation, bias)
    counts_E = torch.tensor([3, 0, 5, 2])
    params = list(experts.parameters())
    x_ND = torch.randn(10, 8, requires_grad=True)
    target_ND = torch.randn(10, 8)

    y, got = penalty_step(lambda x: experts(x, counts_E), x_ND, target_ND, params, loss_kind)
    assert loop_ran(y)
    _, want = penalty_step(lambda x: per_expert_reference(experts, x, counts_E), x_ND, target_ND, params, loss_kind)
    for name, g, w in zip(["x", *(n for n, _ in experts.named_parameters())], got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4, msg=name)
        if name != "x":  # expert 1 has no rows: its slices get exactly zero
            assert g[1].abs().sum() == 0, name


def test_gradient_penalty_keeps_the_forward_dropout_mask():
    """With expert dropout, the second-order gradients use the mask the forward drew (read back from y)."""
    torch.manual_seed(0)
    experts = GroupedExperts(4, 8, 16, "relu", bias=True, dropout=0.5, d_out=16).train()
    with torch.no_grad():  # w2 = identity, b1 large: y is exactly the dropped hidden layer, all units active
        experts.w2_EDF.copy_(torch.eye(16).expand(4, 16, 16))
        experts.b1_EF.fill_(20.0)
        experts.b2_ED.zero_()
    counts_E = torch.tensor([3, 0, 5, 2])
    params = list(experts.parameters())
    x_ND = torch.randn(10, 8, requires_grad=True)
    target_ND = torch.randn(10, 16)

    y, got = penalty_step(lambda x: experts(x, counts_E), x_ND, target_ND, params, "mse")
    assert loop_ran(y)
    keep_NF = (y != 0).float()
    assert 0.3 < 1 - keep_NF.mean() < 0.7  # 160 draws at p = 0.5
    _, want = penalty_step(lambda x: per_expert_reference(experts, x, counts_E, keep_NF), x_ND, target_ND, params,
                           "mse")
    for name, g, w in zip(["x", *(n for n, _ in experts.named_parameters())], got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("mode", ["kernels", "blocks", "padded"])
@pytest.mark.parametrize("gated,activation,bias,dropout", DOUBLE_BACKWARD_EXPERTS)
def test_first_order_gradients_stay_on_the_hand_written_backward(mode, gated, activation, bias, dropout, monkeypatch):
    """An ordinary backward (no create_graph) never takes the differentiable path, and both paths agree on
    the gradients of one forward (its dropout mask included)."""
    set_mode(monkeypatch, mode)
    experts = random_experts(gated, activation, bias, dropout).train()
    counts_E = torch.tensor([3, 0, 5, 2])
    inputs = [torch.randn(10, 8, requires_grad=True), *experts.parameters()]
    y = experts(inputs[0], counts_E)
    assert loop_ran(y)
    grad_ND = torch.randn_like(y)

    differentiable = expert_loop._differentiable_backward
    calls = []
    monkeypatch.setattr(expert_loop, "_differentiable_backward", lambda *a: calls.append(a) or differentiable(*a))
    fast = torch.autograd.grad(y, inputs, grad_ND, retain_graph=True)
    assert not calls
    tracked = torch.autograd.grad(y, inputs, grad_ND, create_graph=True)
    assert len(calls) == 1
    for name, f, t in zip(["x", *(n for n, _ in experts.named_parameters())], fast, tracked, strict=True):
        assert f.grad_fn is None, name
        torch.testing.assert_close(f, t.detach(), rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("gated,activation,bias,dropout", [e for e in DOUBLE_BACKWARD_EXPERTS if not e[3]])
@pytest.mark.parametrize("loss_kind", ["mse", "linear"])
def test_gradient_penalty_through_grouped_mm_matches_per_expert_reference(gated, activation, bias, dropout,
                                                                         loss_kind):
    """The grouped_mm backend (accelerators, torch.compile) takes a gradient of a gradient too: its custom
    op's backward switches to tracked per-expert products when a graph is being built."""
    experts = random_experts(gated, activation, bias)
    experts.backend = "grouped_mm"
    counts_E = torch.tensor([3, 0, 5, 2])
    params = list(experts.parameters())
    x_ND = torch.randn(10, 8, requires_grad=True)
    target_ND = torch.randn(10, 8)

    y, got = penalty_step(lambda x: experts(x, counts_E), x_ND, target_ND, params, loss_kind)
    assert "GeneratedBackwardFor_moeify_grouped_linear_defaultBackward" in backward_nodes(y)  # the custom op ran
    _, want = penalty_step(lambda x: per_expert_reference(experts, x, counts_E), x_ND, target_ND, params, loss_kind)
    for name, g, w in zip(["x", *(n for n, _ in experts.named_parameters())], got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4, msg=name)
        if name != "x":
            assert g[1].abs().sum() == 0, name
