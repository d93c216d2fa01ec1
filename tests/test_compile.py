"""torch.compile of the MoE layer: one graph (no break per expert), same outputs and gradients as eager."""

import warnings

import pytest
import torch

import moeify
from moeify.moe.build import DenseFFN, build_moe_layer

D, FF = 16, 32


def make_layer(num_experts: int, gated: bool):
    g = torch.Generator().manual_seed(0)
    # fan-in scaled weights keep activations O(1), so 1e-5 is a float32-reassociation tolerance
    w = lambda *shape: torch.randn(*shape, generator=g) * shape[-1] ** -0.5  # noqa: E731
    ffn = DenseFFN("silu" if gated else "gelu", w(FF, D), w(D, FF), None if gated else w(FF),
                   None if gated else w(D), w(FF, D) if gated else None)
    cfg = moeify.MoEConfig(num_experts=num_experts, top_k=2, init="copy_noise", init_noise=0.1)
    return build_moe_layer(cfg, ffn)


def breaks(layer, x, **dynamo_config):
    torch._dynamo.reset()
    with torch._dynamo.config.patch(**dynamo_config):
        return torch._dynamo.explain(layer)(x)


@pytest.mark.parametrize("gated", [pytest.param(False, marks=pytest.mark.slow), True])
def test_moe_layer_has_no_graph_break_per_expert(gated):
    x = torch.randn(2, 8, D)
    layer = make_layer(4, gated)
    assert layer.aux.coefs["load_balance"] > 0  # the aux-loss counting code is traced too
    whole = breaks(layer, x)
    assert (whole.graph_count, whole.graph_break_count) == (1, 0), whole.break_reasons
    many = breaks(make_layer(8, gated), x)
    assert (many.graph_count, many.graph_break_count) == (1, 0), many.break_reasons


def test_compiled_layer_runs_step_after_step_without_recompiling():
    """The layer's aux recorder counts its calls: a count that grew with every call made
    torch.compile recompile on every step until its limit, then run the layer eagerly."""
    torch._dynamo.reset()
    layer = make_layer(4, gated=True)
    compiled = torch.compile(layer, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True, capture_dynamic_output_shape_ops=True):
        for step in range(4):
            x = torch.randn(2, 8, D, requires_grad=True)
            compiled(x).sum().add(moeify.aux_loss(layer)).backward()
            assert x.grad is not None and layer.router.gate.weight.grad is not None, step


def _fwd_bwd(layer, x, grad, run=None):
    x = x.clone().requires_grad_()
    layer.zero_grad(set_to_none=True)
    y = (layer if run is None else run)(x)
    y.backward(grad)
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
@pytest.mark.parametrize("gated", [pytest.param(False, marks=pytest.mark.slow), True])
def test_compiled_layer_matches_eager(backend, gated):
    torch._dynamo.reset()
    layer = make_layer(4, gated)
    g = torch.Generator().manual_seed(1)
    x, grad = torch.randn(2, 8, D, generator=g), torch.randn(2, 8, D, generator=g)
    want = _fwd_bwd(layer, x, grad)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        got = _fwd_bwd(layer, x, grad, torch.compile(layer, backend=backend, fullgraph=True))
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    assert got[2].keys() == want[2].keys()
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], rtol=1e-5, atol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")


class _Inner(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.ffn = torch.nn.Sequential(torch.nn.Linear(D, FF), torch.nn.GELU(), torch.nn.Linear(FF, D))

    def forward(self, x):
        return x + self.ffn(x)


class _ReusedModule(torch.nn.Module):
    """One FFN module run at every depth (ALBERT's shape), traceable as a whole."""

    def __init__(self):
        super().__init__()
        self.layer = _Inner()

    def forward(self, x):
        for _ in range(3):
            x = self.layer(x)
        return x


@pytest.mark.parametrize("verify", [True, False])
def test_compiled_converted_model_keeps_every_call_of_a_reused_layer_without_recompiling(verify):
    """The forward hooks that delimit a layer's records (and, with no example forward at conversion,
    teach it its call count on the first step) leave one graph and no recompile over 5 steps."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    x = torch.randn(2, 5, D)
    cfg = moeify.MoEConfig(num_experts=4, top_k=2, load_balance_coef=0.5, z_loss_coef=0.0)
    model = moeify.convert(_ReusedModule(), cfg, example_inputs=(x,), verify=verify).model.train()
    recorder = model.layer.ffn.moe.aux
    compiled = torch.compile(model, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True, capture_dynamic_output_shape_ops=True):
        for _ in range(5):
            losses = []
            hook = recorder.register_forward_pre_hook(
                lambda m, args, seen=losses: seen.append(args[0].losses["load_balance"]))
            compiled(x).sum().add(moeify.aux_loss(model)).backward()
            hook.remove()
            assert len(losses) == 3 and len(recorder._records) == 3
            torch.testing.assert_close(moeify.aux_loss(model).detach(), 0.5 * sum(losses).detach())
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_torch_func_grad_runs_on_the_plain_loop_and_vmap_is_refused_in_one_line(example):
    """torch.func.grad failed inside the CPU loop's autograd.Function (no setup_context), and vmap with a
    scatter_add_ message naming no layer. grad now takes the per-expert loop of plain torch ops, and equals
    an ordinary backward; vmap, which cannot batch data-dependent expert sizes, raises TransformError."""
    from torch.func import functional_call, grad, vmap

    from moeify.errors import TransformError

    ex = example("gpt")
    (x,) = ex.example_inputs()
    model = moeify.convert(ex.build_model(), moeify.MoEConfig(num_experts=4, top_k=2), example_inputs=(x,)).model.eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # experts apart: the router's gradient is not round-off
        for layer in moeify.moe_layers(model).values():
            for p in layer.experts.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    params = {k: v.detach() for k, v in model.named_parameters()}
    got = grad(lambda p: functional_call(model, p, (x,)).square().mean())(params)
    model(x).square().mean().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.grad, atol=1e-6 * float(p.grad.abs().max()) + 1e-9, rtol=1e-4)
    assert all(float(layer.router.gate.weight.grad.abs().max()) > 1e-4 for layer in moeify.moe_layers(model).values())
    with pytest.raises(TransformError, match="cannot run under torch.func.vmap"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: no batching rule for CPU flash attention (before the MoE layer)
        vmap(lambda xi: functional_call(model, params, (xi[None],)))(x)
