"""Inference latency of a converted transformer LM: onnxruntime fused vs onnxruntime portable vs PyTorch eager.

Model: examples/llama.py (4 layers, d_model 512, 8 heads, SwiGLU d_ff 1408) converted to 8 experts, top-2
(SwiGLU experts: the fused mode applies, as com.microsoft.MoE's swiglu). Shapes batch x sequence 1x1, 1x16,
1x128, 8x512. All three measured in this one process, float32, median wall time; ratios are eager / ORT
(> 1: ORT is faster). Writes benchmarks/results/onnx_latency.txt.

    python benchmarks/onnx_latency.py [--quick] [--providers CUDAExecutionProvider,CPUExecutionProvider]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from benchutil import write_results

import moeify
from moeify.inference import open_session
from moeify.onnx_export import export_onnx

ROOT = Path(__file__).resolve().parent.parent
SHAPES = ((1, 1), (1, 16), (1, 128), (8, 512))
VOCAB = 1024


def load_llama():
    spec = importlib.util.spec_from_file_location("_bench_llama", ROOT / "examples" / "llama.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def median_time(fn, min_time: float, min_iter: int = 3, max_iter: int = 200) -> float:
    fn()  # warm-up (allocations, kernel selection)
    times, deadline = [], time.perf_counter() + min_time
    while (len(times) < min_iter or time.perf_counter() < deadline) and len(times) < max_iter:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model and shapes (smoke run)")
    parser.add_argument("--providers", default="CPUExecutionProvider",
                        help="comma-separated onnxruntime providers, first preferred")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "onnx_latency.txt"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    providers = tuple(args.providers.split(","))

    llama = load_llama()
    dims = dict(vocab_size=VOCAB, d_model=64, n_layers=1, n_heads=4, d_ff=176) if args.quick else \
        dict(vocab_size=VOCAB, d_model=512, n_layers=4, n_heads=8, d_ff=1408)
    shapes = SHAPES[:2] if args.quick else SHAPES
    dense = llama.Llama(**dims).eval()
    example = (torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0)),)
    result = moeify.convert(dense, moeify.MoEConfig(num_experts=8, top_k=2), example_inputs=example)
    model = result.model.eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # distinct experts (upcycled copies are identical), so routing spreads work
        for layer in moeify.moe_layers(model).values():
            for p in layer.experts.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.3 * float(p.std()))

    sessions, export_s = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("fused", "portable"):
            start = time.perf_counter()
            report = export_onnx(model, example, Path(tmp) / f"{mode}.onnx", mode=mode)
            export_s[mode] = time.perf_counter() - start
            sessions[mode] = open_session(str(Path(tmp) / f"{mode}.onnx"), providers=providers)
            print(report.format(), flush=True)

    header = [
        f"# onnx_latency: Llama {dims['n_layers']} layers, d_model {dims['d_model']}, SwiGLU d_ff {dims['d_ff']}, "
        f"8 experts top-2, float32",
        f"# torch {torch.__version__} ({torch.get_num_threads()} threads), {sessions['fused'].describe()}, "
        f"cpus={os.cpu_count()}; export s: fused {export_s['fused']:.1f}, portable {export_s['portable']:.1f}",
        f"# load average at start {os.getloadavg()[0]:.1f} (other processes share these cpus: absolute times vary, "
        "ratios are from back-to-back runs in this one process)",
        "# median ms per forward; eager/x = PyTorch eager time / that runtime's time (> 1: faster than eager)",
        f"{'BxS':>7} {'ort_fused':>10} {'ort_portable':>12} {'torch_eager':>11} | {'eager/fused':>11} "
        f"{'eager/portable':>14} | {'max|fused-eager|':>16} {'max|port-eager|':>15}",
    ]
    print("\n".join(header), flush=True)
    lines = list(header)
    for batch, seq in shapes:
        ids = torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(batch * 1000 + seq))
        feeds = {sessions["fused"].input_names[0]: ids.numpy()}
        min_time = 2.0 if batch * seq < 1000 else 4.0
        with torch.inference_mode():
            want = model(ids).numpy()
            eager = median_time(lambda ids=ids: model(ids), min_time)
        ms, diffs = {}, {}
        for mode, s in sessions.items():
            diffs[mode] = float(np.abs(s.run(feeds)[0] - want).max())
            ms[mode] = median_time(lambda s=s, feeds=feeds: s.run(feeds), min_time) * 1e3
        eager *= 1e3
        line = (f"{batch}x{seq:<5} {ms['fused']:>10.3f} {ms['portable']:>12.3f} {eager:>11.3f} | "
                f"{eager / ms['fused']:>11.2f} {eager / ms['portable']:>14.2f} | {diffs['fused']:>16.2e} "
                f"{diffs['portable']:>15.2e}")
        print(line, flush=True)
        lines.append(line)
    out = write_results(args.out, "\n".join(lines) + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
