"""moeify's CPU expert kernels (moeify/moe/cpu_kernels.c) against plain per-expert float64 products,
and how the loader builds, caches and falls back."""

import subprocess

import pytest
import torch

from moeify.moe import cpu_kernels, expert_loop
from moeify.moe.experts import GroupedExperts


@pytest.fixture
def kernels():
    """The kernels the layer uses on this machine."""
    found = cpu_kernels.kernels()
    if found is None:
        pytest.skip(cpu_kernels.status())
    return found


@pytest.fixture(scope="module")
def avx2_build(tmp_path_factory):
    """The AVX2 kernels, built with AVX-512 turned off: what a CPU without AVX-512 runs."""
    if not {"avx2", "fma"} <= set(cpu_kernels._cpu_flags().split()):
        pytest.skip("this CPU has no AVX2 with FMA")
    try:
        path = cpu_kernels.build(tmp_path_factory.mktemp("avx2"), "cc", (*cpu_kernels.FLAGS, "-mno-avx512f"))
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"cannot build the AVX2 kernels: {e}")
    found = cpu_kernels.open_library(path)
    assert not isinstance(found, str) and found.vector_width == 8
    return found


@pytest.fixture(params=["native", "avx2"])
def any_kernels(request):
    """Each build the kernels have: this machine's (AVX-512 here) and the AVX2 one."""
    return request.getfixturevalue("kernels" if request.param == "native" else "avx2_build")


def offsets(sizes):
    return torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], dtype=torch.int64)


def rows_of(sizes):
    start = 0
    for e, n in enumerate(sizes):
        yield e, slice(start, start + n)
        start += n


# ragged experts with idle ones; row counts that hit every tile (1-3 rows take the wide tile, 6-row
# tiles plus each remainder), dimensions off the vector width and off the work-item chunks
SIZES = [[3, 0, 7, 1, 2], [0, 0, 13, 0, 0], [6, 5, 4, 12, 0], [1, 1, 1, 1, 1]]
DIMS = [(64, 48), (133, 70), (37, 150), (101, 16), (5, 3)]  # (n_out, n_in): a weight's rows, columns


def padded_rows(n, width, pad=5):
    """An (n, width) view of a wider tensor: the kernels take a row stride."""
    return torch.randn(n, width + pad)[:, :width]


@pytest.mark.parametrize("sizes", SIZES)
@pytest.mark.parametrize("n_out,n_in", DIMS)
@pytest.mark.parametrize("bias", [True, False])
def test_dot_matches_per_expert_linear(any_kernels, sizes, n_out, n_in, bias):
    E, N = len(sizes), sum(sizes)
    x_NK, w_EOK = padded_rows(N, n_in), torch.randn(E, n_out, n_in)
    b_EO = torch.randn(E, n_out) if bias else None
    out_NO = torch.full((N, n_out), float("nan"))
    any_kernels.dot(offsets(sizes), x_NK, w_EOK, b_EO, out_NO)
    for e, rows in rows_of(sizes):
        want = x_NK[rows].double() @ w_EOK[e].double().T + (b_EO[e].double() if bias else 0)
        torch.testing.assert_close(out_NO[rows].double(), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("sizes", SIZES)
@pytest.mark.parametrize("n_out,n_in", DIMS)
@pytest.mark.parametrize("accumulate", [False, True])
def test_axpy_matches_per_expert_input_gradient(any_kernels, sizes, n_out, n_in, accumulate):
    E, N = len(sizes), sum(sizes)
    g_NO, w_EOK = padded_rows(N, n_out), torch.randn(E, n_out, n_in)
    before_NK = torch.randn(N, n_in)
    out_NK = before_NK.clone()
    any_kernels.axpy(offsets(sizes), g_NO, w_EOK, out_NK, accumulate)
    for e, rows in rows_of(sizes):
        want = g_NO[rows].double() @ w_EOK[e].double() + (before_NK[rows].double() if accumulate else 0)
        torch.testing.assert_close(out_NK[rows].double(), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("sizes", SIZES)
@pytest.mark.parametrize("n_out,n_in", DIMS)
@pytest.mark.parametrize("accumulate", [False, True])
def test_outer_matches_per_expert_weight_gradient(any_kernels, sizes, n_out, n_in, accumulate):
    E, N = len(sizes), sum(sizes)
    g_NO, x_NK = padded_rows(N, n_out), padded_rows(N, n_in)
    before_EOK = torch.full((E, n_out, n_in), float("nan")) if not accumulate else torch.randn(E, n_out, n_in)
    out_EOK = before_EOK.clone()
    any_kernels.outer(offsets(sizes), g_NO, x_NK, out_EOK, accumulate)
    for e, rows in rows_of(sizes):
        want = g_NO[rows].double().T @ x_NK[rows].double() + (before_EOK[e].double() if accumulate else 0)
        # an idle expert: zeros written over the NaNs, or its accumulated gradient left as it was
        torch.testing.assert_close(out_EOK[e].double(), want, rtol=1e-5, atol=1e-4)


def misaligned(*shape):
    """A tensor whose data starts 4 bytes past a 64-byte boundary: the kernels' plain-store path."""
    return torch.empty(torch.Size(shape).numel() + 1)[1:].view(shape)


@pytest.mark.parametrize("sizes", SIZES)
@pytest.mark.parametrize("n_out,n_in", DIMS)
@pytest.mark.parametrize("acc_dx,acc_dw", [(False, False), (True, False), (False, True)])
def test_grad_matches_per_expert_input_and_weight_gradients(any_kernels, sizes, n_out, n_in, acc_dx, acc_dw):
    E, N = len(sizes), sum(sizes)
    g_NO, x_NK, w_EOK = padded_rows(N, n_out), padded_rows(N, n_in), torch.randn(E, n_out, n_in)
    dx_before_NK = torch.randn(N, n_in) if acc_dx else torch.full((N, n_in), float("nan"))
    dw_before_EOK = torch.randn(E, n_out, n_in) if acc_dw else torch.full((E, n_out, n_in), float("nan"))
    dx_NK, dw_EOK = dx_before_NK.clone(), dw_before_EOK.clone()
    assert any_kernels.grad(offsets(sizes), g_NO, x_NK, w_EOK, dx_NK, dw_EOK, acc_dx, acc_dw) is dx_NK
    for e, rows in rows_of(sizes):
        g, x = g_NO[rows].double(), x_NK[rows].double()
        want_dx = g @ w_EOK[e].double() + (dx_before_NK[rows].double() if acc_dx else 0)
        want_dw = g.T @ x + (dw_before_EOK[e].double() if acc_dw else 0)  # zeros for an idle expert
        torch.testing.assert_close(dx_NK[rows].double(), want_dx, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(dw_EOK[e].double(), want_dw, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kernel", ["grad", "outer"])
def test_weight_gradients_off_the_cache_line_take_plain_stores(any_kernels, kernel):
    """Non-temporal stores need 64-byte aligned rows; a gradient that is not gets the same values."""
    sizes, n_out, n_in = [3, 0, 8], 40, 64
    E, N = len(sizes), sum(sizes)
    g_NO, x_NK, w_EOK = torch.randn(N, n_out), torch.randn(N, n_in), torch.randn(E, n_out, n_in)
    results = []
    for dw_EOK in (torch.empty(E, n_out, n_in), misaligned(E, n_out, n_in)):
        dw_EOK.fill_(float("nan"))
        if kernel == "grad":
            any_kernels.grad(offsets(sizes), g_NO, x_NK, w_EOK, torch.empty(N, n_in), dw_EOK)
        else:
            any_kernels.outer(offsets(sizes), g_NO, x_NK, dw_EOK)
        results.append(dw_EOK)
    assert results[0].data_ptr() % 64 == 0 and results[1].data_ptr() % 64 == 4
    for e, rows in rows_of(sizes):
        torch.testing.assert_close(results[1][e].double(), g_NO[rows].double().T @ x_NK[rows].double(),
                                   rtol=1e-5, atol=1e-4)
    assert torch.equal(results[0], results[1])


def test_results_do_not_depend_on_the_thread_count(any_kernels):
    """Each output element is summed by one thread in one order: 1 and 2 threads agree bit for bit."""
    sizes = [5, 0, 9, 2]
    E, N, n_out, n_in = 4, 16, 200, 96
    x_NK, g_NO, w_EOK = torch.randn(N, n_in), torch.randn(N, n_out), torch.randn(E, n_out, n_in)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append((any_kernels.dot(offsets(sizes), x_NK, w_EOK, None, torch.empty(N, n_out)),
                            any_kernels.axpy(offsets(sizes), g_NO, w_EOK, torch.empty(N, n_in)),
                            any_kernels.outer(offsets(sizes), g_NO, x_NK, torch.empty(E, n_out, n_in)),
                            any_kernels.grad(offsets(sizes), g_NO, x_NK, w_EOK, torch.empty(N, n_in),
                                         dw_EOK := torch.empty(E, n_out, n_in)), dw_EOK))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results, strict=True):
        assert torch.equal(one, two)


def test_wrong_operands_are_refused_before_the_kernel_reads_them(any_kernels):
    off = offsets([2, 3])
    w_EOK = torch.randn(2, 8, 4)
    with pytest.raises(ValueError, match="unit column stride"):
        any_kernels.dot(off, torch.randn(4, 5).T, w_EOK, None, torch.empty(5, 8))  # x transposed
    with pytest.raises(ValueError, match=r">= 5, 4"):
        any_kernels.dot(off, torch.randn(3, 4), w_EOK, None, torch.empty(5, 8))  # fewer rows than the offsets say
    with pytest.raises(ValueError, match="offsets"):
        any_kernels.dot(off.int(), torch.randn(5, 4), w_EOK, None, torch.empty(5, 8))
    with pytest.raises(ValueError, match="float32"):
        any_kernels.outer(off, torch.randn(5, 8), torch.randn(5, 4), torch.empty(2, 8, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"weights' shape \(2, 8, 4\), got \(2, 4, 8\)"):
        any_kernels.grad(off, torch.randn(5, 8), torch.randn(5, 4), w_EOK, torch.empty(5, 4), torch.empty(2, 4, 8))


@pytest.mark.parametrize("build", ["native", "avx2"])
@pytest.mark.parametrize("backend", ["expert_loop", "grouped_mm"])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("fused,input_grad", [(True, True), (False, True), (True, False)])
def test_experts_take_the_kernels_and_match_the_torch_path(build, backend, gated, fused, input_grad, monkeypatch,
                                                           request):
    """Both experts backends (the eager loop, and the custom ops torch.compile runs) take every expert
    in one kernel call per product (none of torch's matmuls), the backward of each weight in one `grad`
    pass when few rows allow it (else `axpy` and `outer`; `outer` alone without an input gradient), and
    their outputs and gradients equal the path with the kernels turned off, with either build."""
    found = request.getfixturevalue("kernels" if build == "native" else "avx2_build")
    loader = cpu_kernels.kernels
    monkeypatch.setattr(cpu_kernels, "kernels", lambda: found)
    torch.manual_seed(0)
    if not fused:
        monkeypatch.setattr(expert_loop, "KERNEL_FUSED_MAX_ROWS", 8)  # below the largest expert's 9 rows
    experts = GroupedExperts(4, 64, 96, "silu" if gated else "gelu", gated=gated, bias=not gated,
                             backend=backend)
    counts_E = torch.tensor([5, 0, 9, 2])
    x_ND = torch.randn(16, 64, requires_grad=input_grad)
    grad_ND = torch.randn(16, 64)
    calls = {"dot": 0, "axpy": 0, "outer": 0, "grad": 0}
    for name in calls:
        real = getattr(cpu_kernels.Kernels, name)

        def counted(self, *args, _name=name, _real=real):
            calls[_name] += 1
            return _real(self, *args)
        monkeypatch.setattr(cpu_kernels.Kernels, name, counted)

    def step():
        x_ND.grad = None
        experts.zero_grad(set_to_none=True)
        y = experts(x_ND, counts_E)
        y.backward(grad_ND)
        return [y.detach(), *([x_ND.grad] if input_grad else []), *(p.grad for p in experts.parameters())]

    with_kernels = step()
    matrices = 3 if gated else 2
    if not input_grad:  # fc2's input gradient is still needed (for fc1's weights), the layer's is not
        expected = {"dot": matrices, "axpy": 0, "outer": matrices - 1, "grad": 1}
    elif fused:
        expected = {"dot": matrices, "axpy": 0, "outer": 0, "grad": matrices}
    else:
        expected = {"dot": matrices, "axpy": matrices, "outer": matrices, "grad": 0}
    assert calls == expected
    monkeypatch.setattr(cpu_kernels, "kernels", loader)  # the real loader again, now turned off
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
    assert cpu_kernels.kernels() is None and "turned off" in cpu_kernels.status()
    without = step()
    assert calls["dot"] == matrices  # no further calls
    for got, want in zip(with_kernels, without, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for grad in with_kernels[1 + input_grad:]:  # expert 1 has no rows: its weight gradients are exactly zero
        assert not grad[1].any()


def test_rows_past_the_kernel_range_take_the_loop(kernels, monkeypatch):
    sizes, x_ND, w_EOK = [5, 1], torch.randn(6, 4), torch.randn(2, 8, 4)
    monkeypatch.setattr(expert_loop, "KERNEL_MAX_ROWS", 4)
    assert expert_loop._KernelExperts.of(x_ND, (w_EOK,), sizes) is None
    layout = expert_loop._Layout(sizes, 2, torch.device("cpu"), None)
    assert not any(isinstance(e, expert_loop._KernelExperts) for e, *_ in layout.blocks)
    monkeypatch.setattr(expert_loop, "KERNEL_MAX_ROWS", 5)
    block = expert_loop._KernelExperts.of(x_ND, (w_EOK,), sizes)
    assert block is not None and block.off_E1.tolist() == [0, 5, 6]
    layout = expert_loop._Layout(sizes, 2, torch.device("cpu"), block)
    assert layout.blocks[0][0] is block and layout.empty_experts() == []
    assert expert_loop._KernelExperts.of(x_ND.double(), (w_EOK.double(),), sizes) is None  # float32 only
    assert expert_loop._KernelExperts.of(x_ND, (w_EOK,), [0, 0]) is None  # no rows at all


@pytest.mark.parametrize("build", ["native", "avx2"])
def test_each_build_takes_the_row_range_it_was_measured_faster_in(build, monkeypatch, request):
    found = request.getfixturevalue("kernels" if build == "native" else "avx2_build")
    monkeypatch.setattr(cpu_kernels, "kernels", lambda: found)
    x_ND, w_EOK = torch.randn(64, 4), torch.randn(2, 8, 4)
    taken = {n: expert_loop._KernelExperts.of(x_ND, (w_EOK,), [n, 0]) is not None for n in (1, 2, 32, 33, 64)}
    if found.vector_width == 8:
        assert taken == {1: False, 2: True, 32: True, 33: False, 64: False}  # expert_loop.AVX2_KERNEL_ROWS
    else:
        assert taken == dict.fromkeys(taken, True)  # 1 to KERNEL_MAX_ROWS


@pytest.fixture
def fresh_loader(tmp_path, monkeypatch):
    """A loader with an empty cache and nothing loaded yet in this process."""
    monkeypatch.setenv("MOEIFY_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(cpu_kernels.ENV_SWITCH, raising=False)
    cpu_kernels._load.cache_clear()
    yield tmp_path / "cache"
    cpu_kernels._load.cache_clear()


def test_a_missing_compiler_falls_back_to_torch(fresh_loader, monkeypatch):
    monkeypatch.setenv("CC", str(fresh_loader / "no-such-cc"))
    assert cpu_kernels.kernels() is None
    assert "cannot build with" in cpu_kernels.status() and "no-such-cc" in cpu_kernels.status()
    experts = GroupedExperts(2, 16, 32, "gelu", backend="expert_loop")  # still runs, on torch's matmuls
    x_ND = torch.randn(6, 16)
    y = experts(x_ND, torch.tensor([4, 2]))
    F = torch.nn.functional
    for e, rows in rows_of([4, 2]):
        h = F.gelu(F.linear(x_ND[rows], experts.w1_EFD[e], experts.b1_EF[e]))
        torch.testing.assert_close(y[rows], F.linear(h, experts.w2_EDF[e], experts.b2_ED[e]), rtol=1e-5, atol=1e-5)


def test_a_failing_compile_names_the_compiler_error(fresh_loader, tmp_path, monkeypatch):
    cc = tmp_path / "cc"
    cc.write_text("#!/bin/sh\necho 'cpu_kernels.c:1: error: this compiler refuses' >&2\nexit 1\n")
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    assert cpu_kernels.kernels() is None
    assert "failed: cpu_kernels.c:1: error: this compiler refuses" in cpu_kernels.status()
    assert not list(fresh_loader.iterdir())  # no half-written library left behind


def test_builds_once_into_the_cache_and_reuses_it(fresh_loader):
    try:
        subprocess.run(["cc", "--version"], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("no C compiler")
    found = cpu_kernels.kernels()
    if found is None:
        pytest.skip(cpu_kernels.status())
    assert found.path.parent == fresh_loader and [p.name for p in fresh_loader.iterdir()] == [found.path.name]
    built = found.path.stat().st_mtime_ns
    assert cpu_kernels.build(fresh_loader, "cc") == found.path  # the cached build, not a new one
    assert found.path.stat().st_mtime_ns == built


@pytest.mark.parametrize("use_kernels", [True, False])
def test_grouped_op_rows_past_the_last_group_read_zero(kernels, use_kernels, monkeypatch):
    """The compiled path's op with fewer grouped rows than x has: those rows' output and input
    gradient are zero, the others match F.linear per group, with the kernels and without."""
    from moeify.moe import experts as experts_mod
    monkeypatch.setattr(experts_mod, "GROUPED_CPU_KERNELS", use_kernels)
    torch.manual_seed(0)
    x_NI = torch.randn(7, 16, requires_grad=True)
    w_EOI = torch.randn(2, 24, 16, requires_grad=True)
    b_EO = torch.randn(2, 24, requires_grad=True)
    offs_E = torch.tensor([3, 5], dtype=torch.int32)  # rows 5 and 6 belong to no group

    def nan_freed(*shape):  # freed memory the next allocation of this size likely reuses: NaN, not zeros
        del_me = torch.full(shape, float("nan"))
        del del_me

    nan_freed(7, 24)
    y_NO = experts_mod._grouped_linear_op(x_NI, w_EOI, b_EO, offs_E)
    grad_NO = torch.randn(7, 24)
    nan_freed(7, 16)
    got = torch.autograd.grad(y_NO, (x_NI, w_EOI, b_EO), grad_NO)
    want_y = torch.cat([torch.nn.functional.linear(x_NI[:3], w_EOI[0], b_EO[0]),
                        torch.nn.functional.linear(x_NI[3:5], w_EOI[1], b_EO[1]), torch.zeros(2, 24)])
    want = torch.autograd.grad(want_y, (x_NI, w_EOI, b_EO), grad_NO)
    torch.testing.assert_close(y_NO, want_y, rtol=1e-5, atol=1e-5)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    assert not got[0][5:].any()
