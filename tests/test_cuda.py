"""The CUDA paths against the CPU ones (skipped where no GPU is visible).

What only a GPU exercises: conversion of a model that already sits on the device (noise drawn on
the CPU, moved over), the grouped_mm custom ops on CUDA in bf16, the per-expert loop fallback for
dtypes grouped_mm has no CUDA kernel for, and onnxruntime's CUDA execution provider on the fused
`com.microsoft.MoE` op. References: the same computation on the CPU in float32, and for the layer
the per-token loop of test_experts.
"""

from __future__ import annotations

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
from moeify.onnx_export import export_onnx

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
    err = float((got - want).norm() / want.norm())
    assert err < 1e-2, f"{msg} relative error {err:.2e}"

def test_fused_onnx_on_the_cuda_provider_matches_pytorch(tmp_path):
    ex = load_example("llama")
    model = moeify.convert(ex.build_model(), MoEConfig(num_experts=4, top_k=2, init="copy_noise", init_noise=0.3),
                           example_inputs=ex.example_inputs()).model.eval()
    path = tmp_path / "llama.onnx"
    export_onnx(model, ex.example_inputs(), path, mode="fused")
    session = open_session(str(path), providers=("CUDAExecutionProvider",))
    assert session.provider == "CUDAExecutionProvider", session.describe()
    inputs = ex.example_inputs()
    got = session.run(dict(zip(session.input_names, (x.numpy() for x in inputs), strict=True)))
    with torch.no_grad():
        want = flatten_outputs(model(*inputs))
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w.numpy(), atol=1e-3, rtol=0)
