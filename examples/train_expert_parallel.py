"""Train a converted GPT with expert parallelism: experts split across ranks, tokens sent by all-to-all.

    torchrun --nproc_per_node=2 examples/train_expert_parallel.py --steps 30 --out out/gpt_ep

The same command runs on CPUs (gloo) and on GPUs (NCCL, one GPU per rank): the backend and the
device come from `moeify.distributed.init_from_env`. Each rank trains on its own batches (data
parallel for the dense weights, gradients averaged by `sync_gradients`); each holds
num_experts / world_size experts per MoE layer. The checkpoint is written by rank 0 in the
single-process `moeify.save` format: `moeify.load(out, model=build_model())` reads it on one process.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

import moeify
from moeify import distributed as moe_dist


def gpt_module():
    spec = importlib.util.spec_from_file_location("_gpt_example", Path(__file__).with_name("gpt.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def batch(step: int, rank: int, size: int, seq: int, vocab: int, device: torch.device) -> torch.Tensor:
    """A learnable synthetic stream: each sequence counts up by a per-sequence stride (mod vocab)."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    start = torch.randint(0, vocab, (size, 1), generator=g)
    stride = torch.randint(1, 4, (size, 1), generator=g)
    return ((start + stride * torch.arange(seq)) % vocab).to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8, help="sequences per rank per step")
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--num-experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out", type=Path, default=None, help="write the trained model here (moeify.save format)")
    args = parser.parse_args()

    device = moe_dist.init_from_env(timeout_s=300)
    rank, world = dist.get_rank(), dist.get_world_size()
    gpt = gpt_module()
    # every rank converts the same seeded model, so the replicated weights start identical
    result = moeify.convert(gpt.build_model(), moeify.MoEConfig(num_experts=args.num_experts, top_k=args.top_k),
                            verify=False)
    result.model.to(device)
    mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("ep",))
    ep = moe_dist.expert_parallel(result.model, mesh, inplace=True)
    if rank == 0:
        print(f"{world} rank(s) on {device.type} ({dist.get_backend()}): each holds "
              f"{next(iter(ep.shards.values())).count} of {args.num_experts} experts per MoE layer", flush=True)

    opt = torch.optim.AdamW(ep.model.parameters(), lr=args.lr)
    vocab = ep.model.tok.num_embeddings
    start = time.perf_counter()
    for step in range(args.steps):
        idx = batch(step, rank, args.batch, args.seq, vocab, device)
        logits = ep.model(idx)
        lm = gpt.lm_loss(logits, idx)
        loss = lm + moeify.aux_loss(ep.model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        ep.sync_gradients()
        ep.clip_grad_norm_(1.0)  # over the whole model: every rank scales its replicated weights alike
        opt.step()
        if step % 10 == 0 or step == args.steps - 1:
            mean_lm = lm.detach().clone()
            dist.all_reduce(mean_lm)
            if rank == 0:
                tps = (step + 1) * args.batch * args.seq * world / (time.perf_counter() - start)
                print(f"step {step:4d}  lm loss {mean_lm.item() / world:.4f}  {tps:,.0f} tokens/s", flush=True)
    if args.out is not None:
        path = ep.save(result, args.out, force=True)
        if rank == 0:
            print(f"saved to {path} (single-process format; all-to-all bytes sent by rank 0: "
                  f"{ep.meter.forward_bytes + ep.meter.backward_bytes:,})", flush=True)


if __name__ == "__main__":
    main()
    moe_dist.shutdown()  # after main returns, so its training state is gone first
