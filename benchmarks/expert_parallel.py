"""MoE layer forward+backward: 1 process vs 2 processes with expert parallelism, and all-to-all volume.

    python benchmarks/expert_parallel.py [--tokens 1024] [--steps 5]

Measures, for one converted FFN (an MoE layer with E experts, top-k) on a global batch of
2 * tokens tokens:
  - tokens/s on 1 process (1 and 2 threads) and on 2 processes with expert parallelism
    (launched here with torchrun, 1 thread each; gloo on CPU, NCCL on GPUs);
  - bytes handed to all_to_all per step (summed over ranks, counted by the dispatcher's meter)
    vs the analytic 2 * tokens * k * d_model * bytes_per_elem per layer per direction
    (forward: dispatch + combine; backward: the same rows back).
Results: printed side by side and written to benchmarks/results/expert_parallel.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from benchutil import write_results
from torch import nn

import moeify

HERE = Path(__file__).resolve().parent
WORLD = 2


class FFN(nn.Module):
    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def build(args) -> nn.Module:
    torch.manual_seed(0)
    cfg = moeify.MoEConfig(num_experts=args.experts, top_k=args.top_k, init="copy_noise", init_noise=0.5,
                           router_init_scale=10.0)
    return moeify.convert(FFN(args.d_model, args.d_ff), cfg, verify=False).model


def tokens(args, rank: int, n: int, device) -> torch.Tensor:
    # requires grad, as the output of a previous layer would: the backward then sends input gradients back too
    x = torch.randn(n, args.d_model, generator=torch.Generator().manual_seed(rank)).to(device)
    return x.requires_grad_(True)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(model: nn.Module, x: torch.Tensor, steps: int, device, barrier=lambda: None) -> float:
    """Median seconds of one forward+backward (after 2 warm-up steps)."""
    times = []
    for i in range(steps + 2):
        barrier()
        sync(device)
        start = time.perf_counter()
        y = model(x)
        (y.float().square().mean() + moeify.aux_loss(model)).backward()
        sync(device)
        barrier()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def worker(args) -> None:
    import torch.distributed as dist

    from moeify import distributed as moe_dist

    torch.set_num_threads(1)
    device = moe_dist.init_from_env(timeout_s=120)
    rank = dist.get_rank()
    model = build(args).to(device)
    ep = moe_dist.expert_parallel(model, inplace=True)
    x = tokens(args, rank, args.tokens, device)
    seconds = time_steps(ep.model, x, args.steps, device, barrier=dist.barrier)
    steps_run = args.steps + 2
    m = ep.meter
    counts = torch.tensor([m.forward_bytes, m.backward_bytes, m.forward_remote_bytes, m.count_bytes],
                          dtype=torch.float64, device=device)
    dist.all_reduce(counts)  # summed over ranks
    if rank == 0:
        fwd, bwd, remote, cnt = (v / steps_run for v in counts.tolist())
        Path(args.worker_out).write_text(json.dumps({
            "seconds": seconds, "fwd_bytes": fwd, "bwd_bytes": bwd, "remote_fwd_bytes": remote,
            "count_bytes": cnt, "backend": dist.get_backend(), "device": device.type}))
    moe_dist.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per rank (global batch = 2x)")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-ff", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "expert_parallel.txt")
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_out:
        return worker(args)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    global_tokens = WORLD * args.tokens
    single = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        model = build(args).to(device)
        single[threads] = time_steps(model, tokens(args, 0, global_tokens, device), args.steps, device)

    with tempfile.TemporaryDirectory() as tmp:
        result_file = Path(tmp) / "ep.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
               str(Path(__file__).resolve()), "--worker-out", str(result_file), "--tokens", str(args.tokens),
               "--d-model", str(args.d_model), "--d-ff", str(args.d_ff), "--experts", str(args.experts),
               "--top-k", str(args.top_k), "--steps", str(args.steps)]
        subprocess.run(cmd, check=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
        ep = json.loads(result_file.read_text())

    elem = 4  # float32
    analytic = 2 * global_tokens * args.top_k * args.d_model * elem  # one layer, one direction, all ranks
    rows = [
        ("1 process, 1 thread", single[1], None),
        ("1 process, 2 threads", single[2], None),
        (f"{WORLD} processes EP ({ep['backend']}), 1 thread each", ep["seconds"], None),
    ]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        f"MoE layer fwd+bwd: d_model={args.d_model} d_ff={args.d_ff} E={args.experts} top-{args.top_k}, "
        f"global batch {global_tokens} tokens ({args.tokens} per rank under EP), device {device.type}, "
        f"median of {args.steps} steps; machine load average at the end: {load:.1f}",
        "",
        f"{'setup':42s} {'s/step':>8s} {'tokens/s':>10s} {'vs 1 proc 1 thr':>16s}",
    ]
    for name, sec, _ in rows:
        lines.append(f"{name:42s} {sec:8.4f} {global_tokens / sec:10,.0f} {single[1] / sec:15.2f}x")
    lines += [
        "",
        "all_to_all bytes per step, summed over ranks (one MoE layer):",
        f"  analytic 2*T*k*d_model*4 per direction  {analytic:12,d}",
        f"  measured forward (dispatch + combine)   {int(ep['fwd_bytes']):12,d}  "
        f"ratio {ep['fwd_bytes'] / analytic:.3f}",
        f"  measured backward (gradients back)      {int(ep['bwd_bytes']):12,d}  "
        f"ratio {ep['bwd_bytes'] / analytic:.3f}",
        f"  of the forward, sent to another rank    {int(ep['remote_fwd_bytes']):12,d}  "
        f"({ep['remote_fwd_bytes'] / ep['fwd_bytes']:.0%}; the rest is each rank's chunk to itself)",
        f"  counts exchange (int64 per expert + 1) {int(ep['count_bytes']):12,d}",
    ]
    if device.type == "cpu":
        lines += ["", "Not run on NCCL in this measurement (no GPU): the same script uses NCCL when CUDA is present."]
    text = "\n".join(lines) + "\n"
    print(text)
    write_results(args.out, text)


if __name__ == "__main__":
    main()
