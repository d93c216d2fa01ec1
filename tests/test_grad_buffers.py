"""The expert_loop backward's reusable weight-gradient memory (moeify/moe/grad_buffers.py)."""

import copy
import pickle

import pytest
import torch

from moeify.moe import cpu_kernels, grad_buffers
from moeify.moe.expert_loop import expert_ffn_dense
from moeify.moe.experts import GroupedExperts
from moeify.moe.grad_buffers import GradBuffers

E, D, FF = 4, 128, 1024  # 2 MiB per stacked weight in float32: above grad_buffers.MIN_BYTES


def make_experts(gated: bool = False, backend: str = "expert_loop") -> GroupedExperts:
    torch.manual_seed(0)
    experts = GroupedExperts(E, D, FF, "silu" if gated else "gelu", gated=gated, bias=not gated, backend=backend)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, D ** -0.5)
    return experts


def reference_grads(experts: GroupedExperts, x_ND, counts_E) -> dict[str, torch.Tensor]:
    """The same step's gradients from plain autograd over one F.linear chain per expert."""
    params = {n: p.detach().clone().requires_grad_() for n, p in experts.named_parameters()}

    def of(name, e):
        return params[name][e] if name in params else None

    ys, start = [], 0
    for e, n in enumerate(counts_E.tolist()):
        ys.append(expert_ffn_dense(x_ND[start:start + n], experts.activation, of("w1_EFD", e), of("b1_EF", e),
                                   of("w2_EDF", e), of("b2_ED", e), of("w3_EFD", e), of("b3_EF", e)))
        start += n
    torch.cat(ys).square().sum().backward()
    return {n: p.grad for n, p in params.items()}


def pooled_bytes(experts: GroupedExperts) -> int:
    """Memory the experts' pools hold: the module's (expert_loop) and its weights' (grouped_mm's ops)."""
    pools = [experts.grad_buffers, *(p.__dict__.get(grad_buffers.WEIGHT_ATTR) for p in experts.parameters())]
    return sum(pool.nbytes for pool in pools if pool is not None)


def step(experts: GroupedExperts, counts: list[int], seed: int):
    torch.manual_seed(seed)
    counts_E = torch.tensor(counts)
    x_ND = torch.randn(int(counts_E.sum()), D)
    for p in experts.parameters():
        p.grad = None  # zero_grad(set_to_none=True), the optimizer's default
    experts(x_ND, counts_E).square().sum().backward()
    return x_ND, counts_E


@pytest.mark.parametrize("backend", ["expert_loop", "grouped_mm"])
def test_second_step_reuses_pages_and_idle_experts_read_zero(backend):
    """Step 2 writes into step 1's memory, yet an expert idle in step 2 (busy in step 1) reads zero.
    The grouped_mm backend (the ops torch.compile runs) pools its weight gradients when the CPU
    kernels write them (few rows per expert in float32)."""
    if backend == "grouped_mm" and cpu_kernels.kernels() is None:
        pytest.skip(cpu_kernels.status())
    for gated in (False, True):
        experts = make_experts(gated, backend)
        step(experts, [6, 0, 3, 0], seed=1)
        first = {n: p.grad.data_ptr() for n, p in experts.named_parameters() if p.dim() == 3}
        assert all(p.grad[0].abs().sum() > 0 for p in experts.parameters() if p.dim() == 3)

        x_ND, counts_E = step(experts, [0, 5, 0, 2], seed=2)
        want = reference_grads(experts, x_ND, counts_E)
        for name, p in experts.named_parameters():
            torch.testing.assert_close(p.grad, want[name], rtol=1e-4, atol=1e-4, msg=name)
            if p.dim() == 3:
                assert p.grad.data_ptr() in first.values(), f"{name}: not on reused pages"
                assert p.grad[[0, 2]].abs().sum() == 0, name
        assert pooled_bytes(experts) == (3 if gated else 2) * E * D * FF * 4


def test_gradient_still_held_is_never_overwritten():
    """A gradient the user keeps (detached from .grad) is not handed out again."""
    experts = make_experts()
    step(experts, [2, 2, 2, 2], seed=1)
    kept = experts.w1_EFD.grad
    kept_values = kept.clone()
    step(experts, [8, 0, 0, 0], seed=2)
    assert experts.w1_EFD.grad.data_ptr() != kept.data_ptr()
    assert torch.equal(kept, kept_values)


def test_accumulated_gradients_add_up():
    """Without zeroing, the second backward adds to .grad: the pooled buffer is only the addend."""
    experts = make_experts()
    torch.manual_seed(3)
    x_ND, counts_E = torch.randn(8, D), torch.tensor([3, 1, 0, 4])
    experts(x_ND, counts_E).square().sum().backward()
    once = {n: p.grad.clone() for n, p in experts.named_parameters()}
    experts(x_ND, counts_E).square().sum().backward()
    for name, p in experts.named_parameters():
        torch.testing.assert_close(p.grad, 2 * once[name], msg=name)


def test_a_weight_keeps_its_own_pool_and_a_cast_copy_gets_none():
    w = torch.nn.Parameter(torch.randn(4, 8))
    pool = GradBuffers.of_weight(w)
    assert isinstance(pool, GradBuffers) and GradBuffers.of_weight(w) is pool
    assert GradBuffers.of_weight(w.double()) is None  # a non-leaf, made anew each step
    like = torch.empty(grad_buffers.MIN_BYTES // 4)
    pool.empty_like(like)
    assert pool.nbytes == like.nbytes
    GradBuffers.release_weight(w)
    assert pool.nbytes == 0


def test_pool_is_bounded_and_falls_back_to_the_allocator():
    pool = GradBuffers()
    like = torch.empty(grad_buffers.MIN_BYTES // 4)
    held = [pool.empty_like(like) for _ in range(grad_buffers.MAX_SLOTS + 3)]
    assert pool.nbytes == grad_buffers.MAX_SLOTS * like.nbytes
    assert len({t.data_ptr() for t in held}) == len(held)  # every live tensor on its own memory
    del held
    again = pool.empty_like(like)  # all expired: the first slot is free again
    assert pool.nbytes == grad_buffers.MAX_SLOTS * like.nbytes
    assert again.shape == like.shape and again.dtype == like.dtype
    small = pool.empty_like(torch.empty(16))  # below MIN_BYTES: ordinary memory, not pooled
    assert small.shape == (16,) and pool.nbytes == grad_buffers.MAX_SLOTS * like.nbytes


@pytest.mark.parametrize("backend", ["expert_loop", "grouped_mm"])
def test_eval_copies_and_pickles_start_empty(backend):
    experts = make_experts(backend=backend)
    step(experts, [2, 2, 2, 2], seed=1)
    if backend == "grouped_mm" and cpu_kernels.kernels() is None:
        pytest.skip(cpu_kernels.status())
    assert pooled_bytes(experts) > 0
    twin = copy.deepcopy(experts)
    clone = pickle.loads(pickle.dumps(experts))
    assert pooled_bytes(twin) == 0 and pooled_bytes(clone) == 0
    assert twin.grad_buffers is not experts.grad_buffers
    grad = experts.w1_EFD.grad.clone()
    experts.eval()
    assert pooled_bytes(experts) == 0
    assert torch.equal(experts.w1_EFD.grad, grad)  # a live gradient outlives the pool that made it
    experts.train()
    x_ND, counts_E = step(experts, [1, 2, 3, 4], seed=5)
    want = reference_grads(experts, x_ND, counts_E)
    torch.testing.assert_close(experts.w2_EDF.grad, want["w2_EDF"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pooled", [True, False])
def test_zero_rows_on_reused_memory(pooled, monkeypatch):
    """Rows asked to be zero read zero on memory that held ones; the others keep what was there."""
    if not pooled:
        monkeypatch.setattr(grad_buffers, "MAX_SLOTS", 0)  # the allocator's memory, zeroed the same way
    pool = GradBuffers()
    like = torch.empty(4, 1000, 301)
    first = pool.empty_like(like)
    first.fill_(1.0)
    ptr = first.data_ptr()
    del first
    again = pool.empty_like(like, zero_rows=[1, 3])
    assert again[[1, 3]].abs().sum() == 0
    if pooled:  # the same memory, untouched outside the zero rows
        assert again.data_ptr() == ptr and bool((again[[0, 2]] == 1.0).all())
