"""The expert matmuls at few rows per expert vs streaming the same weights: where small-T time goes.

    python benchmarks/small_gemm.py [--out benchmarks/results/small_gemm.txt]

At small T each of the E experts sees a handful of rows, so every expert matmul must stream that
expert's whole weight matrix for very little arithmetic: the memory system is the limit, and the
speed of reading E*F*D weights once is the floor. This script times, on the moe_layer benchmark's
shapes (E 8, D 512, F 2048, float32), the three products of one linear layer's fwd+bwd, as the
layer issues them, for m rows per expert:

  fwd      y = x @ w.T           (per expert `mm`, all experts as one padded `bmm`, the padded batch
                                 as `(w @ x.T).T` (`bmmT`), and per expert through oneDNN's linear)
  dX       dx = dy @ w            (`mm`, `bmm`, oneDNN)
  dW       dw = dy.T @ x          written into the stacked (E, F, D) gradient (`mm`, `bmm`)

next to a `sum` over the same weights (read bandwidth) and a `copy` into a same-sized buffer (write
bandwidth). Columns: ms per call over all E experts, and GB/s of weight bytes moved (read for fwd and
dX, written for dW). Times are medians over rounds that run every form back to back in a shuffled
order, all in one process.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import torch
from benchutil import write_results

E, D, FF = 8, 512, 2048
ROWS = (1, 2, 4, 8, 16, 32, 64, 256)


def forms(m: int, w_EFD: torch.Tensor, gw_EFD: torch.Tensor) -> dict:
    x_EMD = torch.randn(E, m, D)
    dy_EMF = torch.randn(E, m, FF)
    out_EMF = torch.empty(E, m, FF)
    dx_EMD = torch.empty(E, m, D)
    def onednn(a, w):  # a @ w.T, as moeify.moe.expert_loop runs one expert's row-per-token products
        return torch.ops.mkldnn._linear_pointwise(a, w, None, "none", [], "")

    return {
        "fwd mm": lambda: [torch.mm(x_EMD[e], w_EFD[e].T, out=out_EMF[e]) for e in range(E)],
        "fwd bmm": lambda: torch.bmm(x_EMD, w_EFD.mT, out=out_EMF),
        "fwd bmmT": lambda: out_EMF.copy_(torch.bmm(w_EFD, x_EMD.mT).mT),
        "fwd onednn": lambda: [onednn(x_EMD[e], w_EFD[e]) for e in range(E)],
        "dX mm": lambda: [torch.mm(dy_EMF[e], w_EFD[e], out=dx_EMD[e]) for e in range(E)],
        "dX bmm": lambda: torch.bmm(dy_EMF, w_EFD, out=dx_EMD),
        "dX onednn": lambda: [onednn(dy_EMF[e], w_EFD[e].T) for e in range(E)],
        "dW mm": lambda: [torch.mm(dy_EMF[e].T, x_EMD[e], out=gw_EFD[e]) for e in range(E)],
        "dW bmm": lambda: torch.bmm(dy_EMF.mT, x_EMD, out=gw_EFD),
    }


def timed_rounds(fns: dict, rounds: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        order = list(fns)
        random.shuffle(order)
        for name in order:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "small_gemm.txt"))
    args = ap.parse_args()
    random.seed(0)
    torch.manual_seed(0)
    w_EFD = torch.randn(E, FF, D)
    gw_EFD = torch.empty_like(w_EFD)
    nbytes = w_EFD.numel() * w_EFD.element_size()
    stream = timed_rounds({"sum": lambda: w_EFD.sum(), "copy": lambda: gw_EFD.copy_(w_EFD)}, args.rounds)
    lines = [f"expert matmuls vs streaming, float32 CPU, {torch.get_num_threads()} threads, torch {torch.__version__}",
             f"E={E} D={D} F={FF}: {nbytes / 2**20:.0f} MiB of weights per product",
             f"sum (read) {stream['sum'] * 1e3:.2f} ms = {nbytes / stream['sum'] / 1e9:.1f} GB/s; "
             f"copy (write) {stream['copy'] * 1e3:.2f} ms = {nbytes / stream['copy'] / 1e9:.1f} GB/s written",
             "ms per product over all experts, (GB/s of weight bytes read for fwd/dX, written for dW); "
             "/sum: fwd bmm time / sum time", ""]
    names = list(forms(1, w_EFD, gw_EFD))
    lines.append(f"{'rows':>5} " + " ".join(f"{n:>16}" for n in names) + f" {'/sum':>6} {'GFLOP/s':>8}")
    for m in ROWS:
        t = timed_rounds(forms(m, w_EFD, gw_EFD), args.rounds if m <= 64 else max(5, args.rounds // 4))
        flops = 2 * E * m * D * FF
        best = min(t.values())
        lines.append(f"{m:>5} " + " ".join(f"{t[n] * 1e3:>7.2f} ({nbytes / t[n] / 1e9:>5.1f})" for n in names)
                     + f" {t['fwd bmm'] / stream['sum']:>6.1f} {flops / best / 1e9:>8.0f}")
        print(lines[-1], flush=True)
    out = write_results(args.out, "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
