"""The CUDA paths against the CPU ones (skipped where no GPU is visible).

What only a GPU exercises: conversion of a model that already sits on the device (noise drawn on
the CPU, moved over), the grouped_mm custom ops on CUDA in bf16, the per-expert loop fallback for
dtypes grouped_mm has no CUDA kernel for, and onnxruntime's CUDA execution provider on the fused
`com.microsoft.MoE` op. References: the same computation on the CPU in float32, and for the layer
the per-token loop of test_experts.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import load_example
from test_experts import reference

import moeify
from moeify.config import MoEConfig
from moeify.convert import flatten_outputs
from moeify.inference import open_session
from moeify.moe.experts import GroupedExperts, grouped_mm_usable
from moeify.moe.layer import cast_model
from moeify.onnx_export import check_tolerance, export_onnx

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.parametrize("init", [dict(init="copy_noise", init_noise=0.1),
                                  dict(init="split", split_method="random")])
def test_convert_on_cuda_equals_convert_on_cpu(init):
    ex = load_example("mlp")
    cfg = MoEConfig(num_experts=4, top_k=2, seed=3, **init)
    on_cpu = moeify.convert(ex.build_model(), cfg, example_inputs=ex.example_inputs()).model
    on_cuda = moeify.convert(ex.build_model().cuda(), cfg,
                             example_inputs=tuple(x.cuda() for x in ex.example_inputs())).model
    want, got = on_cpu.state_dict(), on_cuda.state_dict()
    assert want.keys() == got.keys()
    for name, value in want.items():
        assert got[name].device.type == "cuda", name
        torch.testing.assert_close(got[name].cpu(), value, rtol=0, atol=0, msg=name)
    x = ex.example_inputs()[0]
    torch.testing.assert_close(on_cuda(x.cuda()).cpu(), on_cpu(x), rtol=1e-4, atol=1e-5)


def test_cluster_split_runs_on_cuda():
    """k-means on the device (float rounding may order near-ties differently than the CPU, so the
    partition is not compared): the converted model must run there and agree with itself on the CPU."""
    ex = load_example("mlp")
    cfg = MoEConfig(num_experts=4, top_k=4, init="split", split_method="cluster", seed=3)
    model = moeify.convert(ex.build_model().cuda(), cfg,
                           example_inputs=tuple(x.cuda() for x in ex.example_inputs())).model
    x = ex.example_inputs()[0]
    with torch.no_grad():
        got = model(x.cuda()).cpu()
        torch.testing.assert_close(got, model.cpu()(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got, ex.build_model()(x), rtol=1e-4, atol=1e-4)  # top_k = E: exact split


@pytest.mark.parametrize("dtype,backend", [(torch.bfloat16, "grouped_mm"), (torch.float32, "expert_loop"),
                                           (torch.bfloat16, "expert_loop")])
@pytest.mark.parametrize("gated", [False, True])
def test_experts_on_cuda_match_the_per_token_loop(dtype, backend, gated):
    if backend == "grouped_mm" and not grouped_mm_usable(torch.empty(1, 64, device="cuda"),
                                                         torch.empty(1, 128, 64, device="cuda"), dtype):
        pytest.skip("grouped_mm has no kernel for this GPU")
    torch.manual_seed(0)
    ref = GroupedExperts(4, 64, 128, "silu" if gated else "gelu", gated=gated, bias=not gated)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.1)
    counts_E = torch.tensor([40, 0, 17, 71])
    x_ND = torch.randn(int(counts_E.sum()), 64)
    grad_ND = torch.randn_like(x_ND)

    dev = GroupedExperts(4, 64, 128, ref.activation, gated=gated, bias=not gated, backend=backend,
                         dtype=dtype, device="cuda")
    dev.load_state_dict(ref.state_dict())
    x_dev = x_ND.to("cuda", dtype, copy=True).requires_grad_()
    y_dev = dev(x_dev, counts_E.cuda())
    y_dev.backward(grad_ND.to("cuda", dtype))

    x_ref = x_ND.clone().requires_grad_()
    want = reference(ref, x_ref, counts_E)
    want.backward(grad_ND)
    # bf16 products summed over up to 71 rows: compare in norm (1% ~ a few bf16 ulps), fp32 elementwise
    close = close_in_norm if dtype == torch.bfloat16 else torch.testing.assert_close
    close(y_dev.float().cpu(), want)
    close(x_dev.grad.float().cpu(), x_ref.grad)
    for (name, p_dev), p_ref in zip(dev.named_parameters(), ref.parameters(), strict=True):
        close(p_dev.grad.float().cpu(), p_ref.grad, msg=name)


def close_in_norm(got: torch.Tensor, want: torch.Tensor, msg: str = "") -> None:
    err = float((got.detach() - want.detach()).norm() / want.detach().norm())
    assert err < 1e-2, f"{msg} relative error {err:.2e}"

def cuda_provider_available() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.skipif(not cuda_provider_available(), reason="onnxruntime has no CUDA provider (install onnxruntime-gpu)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_onnx_on_the_cuda_provider_matches_pytorch(dtype, tmp_path):
    """float16: experts in float16, routers in float32 (cast_model), checked against the float16 PyTorch model
    within 2 float16 epsilons of its largest output, the bound export_onnx's own check uses."""
    ex = load_example("llama")
    model = moeify.convert(ex.build_model(), MoEConfig(num_experts=4, top_k=2, init="copy_noise", init_noise=0.3),
                           example_inputs=ex.example_inputs()).model.eval()
    if dtype == torch.float16:
        cast_model(model, dtype)
    path = tmp_path / "llama.onnx"
    export_onnx(model, ex.example_inputs(), path, mode="fused")
    session = open_session(str(path), providers=("CUDAExecutionProvider",))
    assert session.provider == "CUDAExecutionProvider", session.describe()
    inputs = ex.example_inputs()
    got = session.run(dict(zip(session.input_names, (x.numpy() for x in inputs), strict=True)))
    with torch.no_grad():
        want = flatten_outputs(model(*inputs))
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):  # float16: export's own bound, 2 epsilons of the largest output
        np.testing.assert_allclose(g.astype(np.float32), w.float().numpy(), atol=check_tolerance(w, 1e-3), rtol=0)


def _dense(gated: bool, D: int = 64, FF: int = 128):
    from moeify.moe.build import DenseFFN

    g = torch.Generator().manual_seed(0)
    w = lambda *shape: torch.randn(*shape, generator=g) * shape[-1] ** -0.5  # noqa: E731
    return DenseFFN("silu" if gated else "gelu", w(FF, D), w(D, FF), None if gated else w(FF) * 0.1,
                    None if gated else w(D) * 0.1, w(FF, D) if gated else None)


def _fwd_bwd(layer, x, grad, device, autocast=False, run=None):
    x = x.detach().to(device).requires_grad_()
    layer.zero_grad(set_to_none=True)
    with torch.autocast("cuda", torch.bfloat16, enabled=autocast):
        y = (layer if run is None else run)(x)
        loss = (y.float() * grad.to(device)).sum() + moeify.aux_loss(layer)
    loss.backward()
    # copies: on the CPU .cpu() returns the tensor itself, and layer.cuda() then moves the grads in place
    return (y.detach().to("cpu", torch.float32, copy=True), x.grad.to("cpu", torch.float32, copy=True),
            {n: p.grad.to("cpu", torch.float32, copy=True) for n, p in layer.named_parameters()})


@pytest.mark.parametrize("cfg", [dict(top_k=2), dict(router="switch", top_k=1, capacity_factor=1.0)],
                         ids=["topk", "switch"])
@pytest.mark.parametrize("gated", [False, True])
def test_the_whole_layer_under_bf16_autocast_on_cuda_matches_float32_on_the_cpu(cfg, gated):
    """Router (float32 under autocast, as Switch prescribes), sort dispatch, grouped_mm experts in bf16,
    combine, and the aux losses' gradients, against the same layer in float32 on the CPU."""
    from moeify.moe.build import build_moe_layer

    # experts far apart (noise as large as the weights): the router's gradient is a difference of the
    # experts' outputs, which bf16 cannot resolve between near copies
    layer = build_moe_layer(MoEConfig(num_experts=4, init="copy_noise", init_noise=1.0, seed=1, **cfg),
                            _dense(gated)).train()
    g = torch.Generator().manual_seed(2)
    x, grad = torch.randn(3, 37, 64, generator=g), torch.randn(3, 37, 64, generator=g)
    want = _fwd_bwd(layer, x, grad, "cpu")
    layer.cuda()
    logits = []
    hook = layer.router.register_forward_hook(lambda m, args, out: logits.append(out.logits_TE))
    got = _fwd_bwd(layer, x, grad, "cuda", autocast=True)
    hook.remove()
    assert logits[0].dtype == torch.float32 and logits[0].is_cuda
    # the routing is computed in float32 on both sides: only near-ties could choose differently, and these
    # inputs have none, so the outputs differ by the experts' bf16 products alone
    close_in_norm(got[0], want[0], "output")
    close_in_norm(got[1], want[1], "grad x")
    assert got[2].keys() == want[2].keys()
    for name in want[2]:
        close_in_norm(got[2][name], want[2][name], name)


@pytest.mark.parametrize("gated", [False, True])
def test_the_layer_compiles_on_cuda_in_one_graph_and_matches_eager(gated):
    """inductor on the GPU (Triton kernels around the grouped_mm custom ops): one graph, no break per
    expert, and the compiled fwd+bwd equals eager in bf16 (in norm)."""
    from moeify.moe.build import build_moe_layer

    torch._dynamo.reset()
    layer = build_moe_layer(MoEConfig(num_experts=8, top_k=2, init="copy_noise", init_noise=1.0, seed=1),
                            _dense(gated)).cuda().to(torch.bfloat16)
    layer.router.float()
    g = torch.Generator().manual_seed(3)
    x, grad = torch.randn(4, 64, 64, generator=g), torch.randn(4, 64, 64, generator=g)
    explained = torch._dynamo.explain(layer)(x.cuda().bfloat16())
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    torch._dynamo.reset()
    want = _fwd_bwd(layer, x.bfloat16(), grad, "cuda")
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        got = _fwd_bwd(layer, x.bfloat16(), grad, "cuda", run=torch.compile(layer, fullgraph=True))
    for a, b, name in [(got[0], want[0], "output"), (got[1], want[1], "grad x"),
                       *((got[2][n], want[2][n], n) for n in want[2])]:
        close_in_norm(a, b, name)


def test_reduce_overhead_compile_captures_the_training_step_in_cuda_graphs_and_matches_eager():
    """The GPU path has no host synchronisation and no data-dependent shape (the per-expert counts stay on the
    device, grouped_mm takes them as offsets), so torch.compile(mode="reduce-overhead") runs the layer's fwd+bwd
    from CUDA graphs, with no cudagraph skip: at small T that removes the launch overhead (4.06 -> 0.82 ms at
    T=16, benchmarks/results/moe_parts_cuda.txt). Each step, on new inputs and with the aux losses, must equal
    an eager step."""
    from moeify.moe.build import build_moe_layer

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    layer = build_moe_layer(MoEConfig(num_experts=8, top_k=2, init="copy_noise", init_noise=1.0, seed=1,
                                      load_balance_coef=0.01, z_loss_coef=0.001),
                            _dense(False)).cuda().to(torch.bfloat16)
    layer.router.float()
    compiled = torch.compile(layer, mode="reduce-overhead")
    g = torch.Generator().manual_seed(4)
    grad = torch.randn(64, 64, generator=g).cuda()

    def step(run, x):
        x = x.detach().requires_grad_()
        layer.zero_grad(set_to_none=True)
        (run(x).float() * grad).sum().add(moeify.aux_loss(layer)).backward()
        return [x.grad.clone(), *(p.grad.clone() for p in layer.parameters())]

    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        for _ in range(5):  # warm-up, recording, then replays
            x = torch.randn(64, 64, generator=g).cuda().bfloat16()
            got, want = step(compiled, x), step(layer, x)
            for a, b in zip(got, want, strict=True):
                close_in_norm(a.float(), b.float())
    from torch._inductor.cudagraph_trees import get_manager

    inductor = dict(torch._dynamo.utils.counters["inductor"])
    assert inductor.get("cudagraph_skips", 0) == 0, inductor
    manager = get_manager(torch.cuda.current_device(), create_if_none_exists=False)
    assert manager is not None and sum(len(nodes) for nodes in manager.roots.values()) >= 1  # graphs were recorded


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_hugging_face_lm_converted_on_cuda_preserves_the_dense_model_and_trains_under_bf16_autocast(arch):
    """The whole path on the GPU: a transformers LM on the device, converted there (its MLP submodules traced and
    rewritten), equal to the dense model at init, then AdamW steps under bf16 autocast with the aux losses:
    the LM loss falls on a fixed batch and every expert and router weight moves."""
    ex = load_example("hf_causal_lm")
    dense = ex.build_model(arch, num_layers=2).cuda()
    (ids,) = (x.cuda() for x in ex.example_inputs())
    cfg = MoEConfig(num_experts=4, top_k=2, init="copy")
    model = moeify.convert(copy.deepcopy(dense), cfg, example_inputs=(ids,)).model
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-4)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "moe" in n}
    assert before, "no MoE layer"
    losses = []
    for _ in range(8):
        with torch.autocast("cuda", torch.bfloat16):
            loss = model(ids, labels=ids).loss
        total = loss.float() + moeify.aux_loss(model)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(np.isfinite(losses)) and losses[-1] < 0.9 * losses[0], losses
    for name, p in model.named_parameters():
        if name in before:
            assert not torch.equal(p, before[name]), f"{name} did not move"
