"""How well each balancing mechanism undoes a deliberately skewed router.

    python benchmarks/router_balance.py [--steps 60] [--out benchmarks/results/router_balance.txt]

examples/mlp.py is converted (4 experts, top-1) with a router bias of +3 on expert 0, so nearly
every token starts on expert 0 (CV of tokens per expert ~1.7, the maximum is sqrt(E - 1)). The same
fixed-seed classification run (Adam, lr 3e-2) is repeated per configuration; the table gives the
CV of tokens per expert (worst layer, eval mode, on the training batch) before and after, its ratio
to the no-loss run, the final task loss and the fraction of assignments dropped. All numbers come
from one process; results are printed and written to the output file.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from benchutil import write_results

import moeify

ROOT = Path(__file__).resolve().parent.parent

# name -> (MoEConfig fields, the no-loss run it is compared with)
CONFIGS = {
    "topk, no aux loss": (dict(router="topk"), None),
    "topk + switch loss 0.1": (dict(router="topk", load_balance_coef=0.1), "topk, no aux loss"),
    "topk + importance 0.1 (k=1: gates are 1)": (dict(router="topk", importance_coef=0.1), "topk, no aux loss"),
    "topk k=2, no aux loss": (dict(router="topk", top_k=2), None),
    "topk k=2 + importance 0.1": (dict(router="topk", top_k=2, importance_coef=0.1), "topk k=2, no aux loss"),
    "topk k=2 + switch loss 0.1": (dict(router="topk", top_k=2, load_balance_coef=0.1), "topk k=2, no aux loss"),
    "noisy_topk, no aux loss": (dict(router="noisy_topk"), None),
    "noisy_topk + load 0.1": (dict(router="noisy_topk", load_coef=0.1), "noisy_topk, no aux loss"),
    "noisy_topk k=2, no aux loss": (dict(router="noisy_topk", top_k=2), None),
    "noisy_topk k=2 + importance 0.1 + load 0.1": (dict(router="noisy_topk", top_k=2, importance_coef=0.1,
                                                        load_coef=0.1), "noisy_topk k=2, no aux loss"),
    "switch + capacity 1.25, no aux loss": (dict(router="switch", capacity_factor=1.25), None),
    "switch + capacity 1.25 + switch loss 0.1": (dict(router="switch", capacity_factor=1.25, load_balance_coef=0.1),
                                                 "switch + capacity 1.25, no aux loss"),
    "expert_choice (balanced by construction)": (dict(router="expert_choice"), None),
}


def load_mlp():
    spec = importlib.util.spec_from_file_location("_bench_mlp", ROOT / "examples" / "mlp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cv_and_drop(model, X) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        model(X)
    model.train()
    rows = moeify.router_stats(model)
    cvs = []
    for row in rows:
        counts = torch.tensor(row.tokens_per_expert, dtype=torch.float64)
        cvs.append((counts.std(unbiased=False) / counts.mean()).item())
    return max(cvs), max(r.dropped_fraction for r in rows)


def run(mlp, fields: dict, steps: int) -> dict:
    cfg = moeify.MoEConfig(num_experts=4, router_bias=True, z_loss_coef=0.0, seed=0,
                           **{"top_k": 1, "load_balance_coef": 0.0, **fields})
    model = moeify.convert(mlp.build_model(), cfg, example_inputs=mlp.example_inputs()).model
    for layer in moeify.moe_layers(model).values():
        with torch.no_grad():
            layer.router.gate.bias.copy_(torch.tensor([3.0, 0.0, 0.0, 0.0]))
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(256, 16, generator=g), torch.randint(0, 5, (256,), generator=g)
    cv0, _ = cv_and_drop(model, X)
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(steps):
        task = F.cross_entropy(model(X), y)
        loss = task + moeify.aux_loss(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
    cv1, dropped = cv_and_drop(model, X)
    return {"cv_before": cv0, "cv_after": cv1, "task_loss": task.item(), "dropped": dropped}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "router_balance.txt"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    mlp = load_mlp()
    results = {name: run(mlp, fields, args.steps) for name, (fields, _) in CONFIGS.items()}
    lines = [f"skewed router (bias +3 on expert 0), mlp example, 4 experts, {args.steps} Adam steps",
             f"{'configuration':<44} {'CV before':>9} {'CV after':>9} {'vs no loss':>10} {'task loss':>9} "
             f"{'dropped':>8}"]
    for name, r in results.items():
        baseline = CONFIGS[name][1]
        ratio = f"{results[baseline]['cv_after'] / r['cv_after']:.1f}x" if baseline and r["cv_after"] > 0 else "-"
        lines.append(f"{name:<44} {r['cv_before']:9.3f} {r['cv_after']:9.3f} {ratio:>10} {r['task_loss']:9.3f} "
                     f"{r['dropped']:8.3f}")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    write_results(args.out, text)


if __name__ == "__main__":
    main()
