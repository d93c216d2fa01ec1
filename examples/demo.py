"""End-to-end demo (`make demo`): upcycle the GPT example into an 8-expert top-2 MoE, check it computes
the dense function, train it on generated sequences, print the loss and each layer's expert token
share, save, reload, and check the reloaded model gives the same outputs.

    python examples/demo.py [--steps 150] [--out out/demo]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch

import moeify

HERE = Path(__file__).resolve().parent


def load_gpt():
    spec = importlib.util.spec_from_file_location("moeify_example_gpt", HERE / "gpt.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def markov_batches(vocab: int, batch: int, seq: int, seed: int):
    """Endless batches from a fixed random order-1 Markov chain with sparse transitions (learnable)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(vocab, vocab, generator=g) * 4.0
    probs = logits.softmax(-1)
    while True:
        x = torch.empty(batch, seq, dtype=torch.long)
        x[:, 0] = torch.randint(0, vocab, (batch,), generator=g)
        for t in range(1, seq):
            x[:, t] = torch.multinomial(probs[x[:, t - 1]], 1, generator=g).squeeze(1)
        yield x


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--out", default="out/demo")
    ap.add_argument("--plot", default="out/demo_utilization.png")
    args = ap.parse_args(argv)
    torch.manual_seed(0)

    gpt = load_gpt()
    dense = gpt.build_model()  # default sizes, so `moeify.load(out)` can rebuild it from the recorded source
    (x,) = gpt.example_inputs()
    cfg = moeify.MoEConfig(num_experts=8, top_k=2, router="topk", init="copy", seed=0)
    result = moeify.convert(dense, cfg, example_inputs=(x,))
    print(result.report)
    print()
    print("rewritten forward of blocks.0.mlp:")
    print(result.model.blocks[0].mlp._moeify_code)

    model = result.model
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = markov_batches(64, 16, 64, seed=0)
    t0 = time.perf_counter()
    first = None
    for step in range(1, args.steps + 1):
        idx = next(data)
        task = gpt.lm_loss(model(idx), idx)
        loss = task + moeify.aux_loss(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        first = task.item() if first is None else first
        if step == 1 or step % 25 == 0:
            print(f"step {step:4d}  lm loss {task.item():.3f}  aux {moeify.aux_loss(model).item():.4f}")
    print(f"trained {args.steps} steps in {time.perf_counter() - t0:.1f}s: lm loss {first:.3f} -> {task.item():.3f}")
    print()
    print("expert token share per layer (last batch):")
    print(moeify.format_stats(moeify.router_stats(model)))

    # record where the dense model comes from, so `moeify.load(out)` alone can rebuild it
    result.source = {"kind": "file", "target": str(HERE / "gpt.py"), "name": "build_model"}
    moeify.save(result, args.out, force=True)
    model.eval()
    reloaded = moeify.load(args.out).model.eval()  # rebuilt from the source recorded in the plan
    with torch.no_grad():
        diff = (reloaded(x) - model(x)).abs().max().item()
    print(f"saved to {args.out}; reloaded model max |diff| = {diff:.3g}")
    if diff > 1e-6:
        print("error: the reloaded model differs", file=sys.stderr)
        return 1
    from moeify.plots import plot_utilization

    with torch.no_grad():
        model(next(data))
    path = plot_utilization(model, args.plot, title="demo: share of tokens per expert after training")
    print(f"expert utilisation heatmap: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
