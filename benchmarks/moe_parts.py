"""The MoE layer's parts on a GPU, each against its alternative: what the layer's overhead over the ideal is made of.

    python benchmarks/moe_parts.py [--device cuda] [--tokens 32768] [--out benchmarks/results/moe_parts_cuda.txt]

bf16 on CUDA (float32 on the CPU), D 2048, F 8192, E 8, top-2 (the issue's GPU sizes). Every timing is the
median of CUDA-event-timed calls (triton.testing.do_bench) after warm-up; every alternative is checked against
a float64 reference, relative error in norm. Sections:
  bias grad   per-expert sums of the output gradient rows: segment_reduce against grouped_mm with a ones column
  bias add    y += b[expert of row]: a materialised repeat_interleave add against grouped_mm's own bias argument
  dispatch    x_TD[token_N] fwd+bwd: indexing (backward: accumulating index_put) against gather + per-token sum
  combine     weighted sum of each token's rows fwd+bwd: index_add against gather + per-token sum
  syncs       host synchronisations in one moeify layer step (torch.cuda.set_sync_debug_mode)
  graphs      one fwd+bwd step of the ideal and of moeify, eager against a captured CUDA graph's replay, and
              moeify under torch.compile(mode="reduce-overhead") (inductor's CUDA graphs)
  profile     the moeify layer's fwd+bwd at the largest T, top ops by device time
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from benchutil import cuda_graph_of, write_results

from moeify.config import MoEConfig
from moeify.moe.build import DenseFFN, build_moe_layer
from moeify.moe.dispatch import DispatchPlan, _GatherTokens, combine_rows, inverse_permutation
from moeify.moe.experts import group_sums

E, K = 8, 2


def timed(fn) -> float:
    """Median milliseconds per call."""
    if torch.cuda.is_available():
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=200, return_mode="median")
    import time

    fn()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[2] * 1e3


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).norm() / want.norm())


def routing_of(T: int, device: str, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    logits = torch.randn(T, E, generator=g)
    w_TK, idx_TK = logits.softmax(-1).topk(K, -1)
    expert_N = idx_TK.reshape(-1).to(device)
    order_N = torch.sort(expert_N).indices
    token_N = torch.arange(T, device=device).repeat_interleave(K)[order_N]
    counts_E = torch.bincount(expert_N, minlength=E)
    offs_E = torch.cumsum(counts_E, 0).to(torch.int32)
    weight_N = (w_TK / w_TK.sum(-1, keepdim=True)).reshape(-1).to(device)[order_N]
    return order_N, token_N, offs_E, weight_N


def bias_sections(T: int, D: int, FF: int, device: str, dtype) -> list[str]:
    N = T * K
    _, _, offs_E, _ = routing_of(T, device, dtype)
    sizes = torch.diff(offs_E, prepend=offs_E.new_zeros(1)).long()
    lines = ["== bias grad: per-expert sums of (N, cols) rows", f"{'cols':>6} {'segment_reduce ms':>18} {'err':>9} "
             f"{'grouped_mm ms':>14} {'err':>9}"]
    for cols in (FF, D):
        a = torch.randn(N, cols, device=device, dtype=dtype)
        want = torch.stack([c.double().sum(0) for c in torch.split(a, sizes.tolist())])
        seg = lambda a=a: torch.segment_reduce(a, "sum", lengths=sizes, axis=0, unsafe=True)  # noqa: E731
        gmm = lambda a=a: group_sums(a, offs_E)  # noqa: E731
        lines.append(f"{cols:>6} {timed(seg):>18.3f} {rel(seg(), want):>9.2e} {timed(gmm):>14.3f} "
                     f"{rel(gmm(), want):>9.2e}")
    lines += ["== bias add: y (N, F) += b[expert of row]"]
    x = torch.randn(N, D, device=device, dtype=dtype)
    w = torch.randn(E, FF, D, device=device, dtype=dtype) * D ** -0.5
    b = torch.randn(E, FF, device=device, dtype=dtype)

    def separate():
        y = F.grouped_mm(x, w.transpose(-2, -1), offs=offs_E)
        return y.add_(torch.repeat_interleave(b, sizes, dim=0, output_size=N))
    want = separate().double()
    lines.append(f"  grouped_mm then repeat_interleave add: {timed(separate):.3f} ms; grouped_mm alone "
                 f"{timed(lambda: F.grouped_mm(x, w.transpose(-2, -1), offs=offs_E)):.3f} ms")
    try:
        fused = lambda: F.grouped_mm(x, w.transpose(-2, -1), offs=offs_E, bias=b)  # noqa: E731
        lines.append(f"  grouped_mm(bias=): {timed(fused):.3f} ms, err against the separate add "
                     f"{rel(fused(), want):.2e}")
    except Exception as exc:  # noqa: BLE001 - report whatever the op says
        lines.append(f"  grouped_mm(bias=): unsupported ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
    return lines


def dispatch_combine_sections(T: int, D: int, device: str, dtype) -> list[str]:
    N = T * K
    order_N, token_N, offs_E, weight_N = routing_of(T, device, dtype)
    inverse_N = inverse_permutation(order_N)
    x = torch.randn(T, D, device=device, dtype=dtype, requires_grad=True)
    gy = torch.randn(N, D, device=device, dtype=dtype)
    y = torch.randn(N, D, device=device, dtype=dtype, requires_grad=True)
    w = weight_N.clone().requires_grad_()
    gout = torch.randn(T, D, device=device, dtype=dtype)

    def run(fn, grad, inputs):
        def step():
            for t in inputs:
                t.grad = None
            fn().backward(grad)
        return step
    old_plan = DispatchPlan(token_N, w, offs_E, T)
    new_plan = old_plan._replace(inverse_N=inverse_N)
    pairs = {
        "dispatch": (run(lambda: x[token_N], gy, [x]),
                     run(lambda: _GatherTokens.apply(x, token_N, inverse_N), gy, [x]), [x]),
        "combine": (run(lambda: combine_rows(y, old_plan), gout, [y, w]),
                    run(lambda: combine_rows(y, new_plan), gout, [y, w]), [y, w]),
    }
    lines = [f"== dispatch and combine, fwd+bwd, T={T}: scatter (index / index_add) against gather + per-token sum"]
    for name, (old, new, inputs) in pairs.items():
        old()
        want = [t.grad.double() for t in inputs]
        new()
        errs = ", ".join(f"{rel(t.grad, g):.1e}" for t, g in zip(inputs, want, strict=True))
        lines.append(f"  {name:8}: scatter {timed(old):.3f} ms, gather {timed(new):.3f} ms (grads against the "
                     f"scatter's: {errs})")
    return lines


def make_layer(D: int, FF: int, device: str, dtype, gated: bool):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: (torch.randn(*s, generator=g) * s[-1] ** -0.5).to(device, dtype)  # noqa: E731
    ffn = DenseFFN("silu" if gated else "gelu", r(FF, D), r(D, FF), None if gated else r(FF), None if gated else r(D),
                   r(FF, D) if gated else None)
    cfg = MoEConfig(num_experts=E, top_k=K, init="copy_noise", init_noise=0.01, load_balance_coef=0.0, z_loss_coef=0.0)
    return build_moe_layer(cfg, ffn), ffn


def step_of(module, x, grad):
    def step():
        x.grad = None
        for p in module.parameters():
            p.grad = None
        module(x).backward(grad)
    return step


def sync_and_graph_sections(Ts: list[int], D: int, FF: int, device: str, dtype) -> list[str]:
    lines = ["== host syncs in one moeify step (torch.cuda.set_sync_debug_mode('warn'))"]
    layer, ffn = make_layer(D, FF, device, dtype, gated=False)
    x = torch.randn(Ts[0], D, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(Ts[0], D, device=device, dtype=dtype)
    step_of(layer, x, grad)()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step_of(layer, x, grad)()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    # the mode's own notice ("Synchronization debug mode is a prototype feature ...") is not a sync
    syncs = [str(w.message).splitlines()[0][:150] for w in caught
             if "synchroniz" in str(w.message).lower() and "debug mode" not in str(w.message)]
    lines += [f"  {len(syncs)} sync(s)", *(f"  {s}" for s in syncs[:8])]
    lines += ["== one fwd+bwd step: eager against a CUDA graph replay (ms)",
              f"{'T':>6} {'ideal':>8} {'ideal graph':>12} {'moeify':>8} {'moeify graph':>12} {'graph err':>10} "
              f"{'reduce-overhead':>16}"]
    for T in Ts:
        row = [f"{T:>6}"]
        layer, _ = make_layer(D, FF, device, dtype, gated=False)
        ideal = torch.nn.Sequential(torch.nn.Linear(D, FF), torch.nn.GELU(), torch.nn.Linear(FF, D)).to(device, dtype)
        for module, rows in ((ideal, T * K), (layer, T)):  # the ideal: the dense FFN on K copies of the tokens
            x = torch.randn(rows, D, device=device, dtype=dtype, requires_grad=True)
            grad = torch.randn_like(x)
            row.append(f"{timed(step_of(module, x, grad)):>8.3f}")
            try:
                graphed, err = graph_step(module, x, grad)
                row.append(f"{timed(graphed):>12.3f}" + (f" {err:>10.1e}" if module is layer else ""))
            except Exception as exc:  # noqa: BLE001
                row.append(f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}")
        try:  # the user-facing route to CUDA graphs: torch.compile's cudagraph trees
            torch._dynamo.reset()
            compiled = torch.compile(layer, mode="reduce-overhead")
            x = torch.randn(T, D, device=device, dtype=dtype, requires_grad=True)
            row.append(f"{timed(step_of(compiled, x, torch.randn_like(x))):>16.3f}")
        except Exception as exc:  # noqa: BLE001
            row.append(f"compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}")
        lines.append(" ".join(row))
    return lines


def graph_step(module, x, grad):
    """A CUDA graph of one fwd+bwd, and its grad x's error against an eager step."""
    step = step_of(module, x, grad)
    step()
    want = x.grad.clone()
    replay = cuda_graph_of(step)
    replay()
    torch.cuda.synchronize()
    return replay, rel(x.grad, want.double())


def profile_section(T: int, D: int, FF: int, device: str, dtype) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    layer, _ = make_layer(D, FF, device, dtype, gated=False)
    x = torch.randn(T, D, device=device, dtype=dtype, requires_grad=True)
    step = step_of(layer, x, torch.randn_like(x))
    step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize() if device == "cuda" else None
    key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    return [f"== profile: moeify gelu T={T}, 3 fwd+bwd steps", prof.key_averages().table(
        sort_by=key, row_limit=30, max_name_column_width=60)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--scale", type=int, default=4, help="D 512, F 2048 times this")
    ap.add_argument("--out")
    args = ap.parse_args()
    device, dtype = args.device, torch.bfloat16 if args.device == "cuda" else torch.float32
    D, FF, T = 512 * args.scale, 2048 * args.scale, args.tokens
    torch.manual_seed(0)
    lines = [f"moe_parts, {device} {dtype}, torch {torch.__version__}, D={D} F={FF} E={E} top-{K}, T={T}"]
    sections = [lambda: bias_sections(T, D, FF, device, dtype), lambda: dispatch_combine_sections(T, D, device, dtype)]
    if device == "cuda":
        sections.append(lambda: sync_and_graph_sections([4 * args.scale, 64 * args.scale, 256 * args.scale], D, FF,
                                                        device, dtype))
    sections.append(lambda: profile_section(T, D, FF, device, dtype))
    for section in sections:
        try:
            part = section()
        except Exception:  # noqa: BLE001 - one failed section must not cost the others on a lent GPU
            import traceback

            part = ["section failed:", traceback.format_exc()]
        print("\n".join(part), flush=True)
        lines += part
    name = f"moe_parts_{device}.txt"
    out = write_results(args.out or Path(__file__).parent / "results" / name, "\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
