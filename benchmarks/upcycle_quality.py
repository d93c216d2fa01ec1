"""Does sparse upcycling pay off? Dense vs upcycled MoE vs MoE from scratch on real English text, plus
distillation of the upcycled MoE back into a dense model (Switch Transformers §4).

    python benchmarks/upcycle_quality.py            # full run (about 30 min on 2 idle cores)
    python benchmarks/upcycle_quality.py --quick    # pipeline check (well under 2 min)

Corpus: the docstrings of Python's standard library (`moeify.corpus.stdlib_docstrings`), byte tokens,
docstring i in validation iff i % 10 == 9. Model: examples/gpt.py (pre-norm GPT, GELU MLP).

Per seed (model init, router init and token order all follow the seed):
  pretrain  dense, global steps [0, N)
  (a) dense       continue the dense checkpoint for M steps               [N, N+M)
  (b) upcycled    moeify.convert(checkpoint, 8 experts, top-2, init=copy)  [N, N+M)
  (c) switch      the same with router=switch (top-1)                     [N, N+M)
  (d) scratch     the same MoE shape, fresh random experts, trained        [0, N+M)
  (e) distilled   dense student from the checkpoint, 0.25 * KL to (b)'s soft targets + 0.75 * CE, [N, N+M)
Every arm sees the batch `batch_at(train, t)` at global step t, uses AdamW with the same hyper-
parameters and the same learning rate at step t (warmup + cosine over N+M steps); continuation
arms start with a fresh optimizer state (AdamW betas (0.9, 0.95); the distillation arm uses
`moeify.distill`'s own AdamW, betas (0.9, 0.999), with the same learning rates and weight decay).
Train loss = LM loss + moeify.aux_loss(model); the reported validation loss is the LM loss alone
(nats per byte) on a fixed set of validation windows.

Writes <out>/upcycle_quality.json, .txt, loss_curves.png and upcycle_utilization.png, after every
seed (a partial run leaves valid results for the seeds done).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from benchutil import write_results

import moeify
from moeify.corpus import batch_at, eval_windows, stdlib_docstrings
from moeify.distill import DistillConfig, distill
from moeify.plots import plot_loss_curves, plot_utilization

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"  # the full run's; --quick writes to RESULTS / "quick"
ARMS = ("dense", "upcycled_top2", "upcycled_switch", "moe_scratch", "distilled")
ARM_TITLES = {"dense": "(a) dense continued", "upcycled_top2": "(b) upcycled 8e top-2",
              "upcycled_switch": "(c) upcycled 8e switch", "moe_scratch": "(d) MoE from scratch",
              "distilled": "(e) dense distilled from (b)"}

QUICK = dict(d_model=32, layers=2, heads=2, seq_len=32, batch=4, dense_steps=20, moe_steps=20, seeds=1,
             eval_every=10, eval_windows=8, corpus_bytes=100_000)
FULL = dict(d_model=128, layers=4, heads=4, seq_len=64, batch=8, dense_steps=300, moe_steps=300, seeds=3,
            eval_every=50, eval_windows=32, corpus_bytes=50_000_000)


def load_gpt():
    spec = importlib.util.spec_from_file_location("_moeify_bench_gpt", ROOT / "examples" / "gpt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def lr_schedule(base: float, total: int, warmup: int):
    def lr_at(step: int) -> float:
        if step < warmup:
            return base * (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    return lr_at


@torch.no_grad()
def val_loss(model, windows: torch.Tensor, chunk: int = 16) -> float:
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], chunk):
        idx = windows[i:i + chunk]
        logits = model(idx)
        total += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1),
                                 reduction="sum").item()
        count += idx[:, 1:].numel()
    model.train(was)
    return total / count


class Curve:
    def __init__(self) -> None:
        self.steps: list[int] = []
        self.values: list[float] = []

    def add(self, step: int, value: float) -> None:
        self.steps.append(step)
        self.values.append(value)


def train(model, start: int, stop: int, a, data, windows, lr_at, curve: Curve) -> float:
    """Train global steps [start, stop); evaluate every a.eval_every steps. Returns training tokens/s."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a.lr, betas=(0.9, 0.95),
                            weight_decay=0.01)
    model.train()
    busy = 0.0
    for step in range(start, stop):
        if step % a.eval_every == 0:
            curve.add(step, val_loss(model, windows))
        idx = batch_at(data, step, batch_size=a.batch, seq_len=a.seq_len, seed=a.seed)
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        logits = model(idx)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))
        loss = loss + moeify.aux_loss(model, dense_ok=True)  # the dense baseline trains in this loop too
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        busy += time.perf_counter() - t0
    curve.add(stop, val_loss(model, windows))
    return (stop - start) * a.batch * a.seq_len / max(busy, 1e-9)


def reinit_experts(model, seed: int) -> None:
    """From scratch: independent random experts (GPT's N(0, 0.02) init), not copies of one FFN."""
    g = torch.Generator().manual_seed(10_007 + seed)
    with torch.no_grad():
        for layer in moeify.moe_layers(model).values():
            for name, p in layer.experts.named_parameters():
                if name.startswith("w"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
                else:
                    p.zero_()


def run_seed(a, gpt, corpus, windows) -> dict:
    N, M = a.dense_steps, a.moe_steps
    lr_at = lr_schedule(a.lr, N + M, max(1, (N + M) // 20))
    shape = dict(vocab_size=256, d_model=a.d_model, n_layers=a.layers, n_heads=a.heads, max_len=a.seq_len)
    top2 = moeify.MoEConfig(num_experts=a.experts, top_k=2, init="copy", seed=a.seed)
    switch = moeify.MoEConfig(num_experts=a.experts, top_k=1, router="switch", init="copy", seed=a.seed)
    example = (windows[:2],)
    curves = {arm: Curve() for arm in ARMS + ("pretrain",)}
    speed, params = {}, {}

    torch.manual_seed(a.seed)
    init = gpt.GPT(**shape)
    dense = copy.deepcopy(init)
    speed["pretrain"] = train(dense, 0, N, a, corpus.train, windows, lr_at, curves["pretrain"])
    params["dense"] = sum(p.numel() for p in dense.parameters())

    arm_models = {"dense": copy.deepcopy(dense)}
    for arm, cfg in (("upcycled_top2", top2), ("upcycled_switch", switch)):
        result = moeify.convert(dense, cfg, example_inputs=example)
        arm_models[arm] = result.model
        params[arm] = {"total": result.report.params_after, "active_per_token": result.report.active_params_per_token}
    for arm in ("dense", "upcycled_top2", "upcycled_switch"):
        speed[arm] = train(arm_models[arm], N, N + M, a, corpus.train, windows, lr_at, curves[arm])
        print(f"  seed {a.seed} {arm:<16} val {curves[arm].values[-1]:.4f}  {speed[arm]:8.0f} tok/s", flush=True)

    scratch = moeify.convert(init, top2, example_inputs=example).model
    reinit_experts(scratch, a.seed)
    speed["moe_scratch"] = train(scratch, 0, N + M, a, corpus.train, windows, lr_at, curves["moe_scratch"])
    print(f"  seed {a.seed} {'moe_scratch':<16} val {curves['moe_scratch'].values[-1]:.4f}  "
          f"{speed['moe_scratch']:8.0f} tok/s", flush=True)

    teacher = arm_models["upcycled_top2"]
    batches = ((idx[:, :-1], idx[:, 1:]) for idx in
               (batch_at(corpus.train, t, batch_size=a.batch, seq_len=a.seq_len, seed=a.seed) for t in range(N, N + M)))
    dcurve = curves["distilled"]
    t0 = time.perf_counter()
    eval_time = [0.0]

    def on_step(step: int, student, loss: float) -> None:
        t = N + step + 1
        if t % a.eval_every == 0 or t == N + M:
            e0 = time.perf_counter()
            dcurve.add(t, val_loss(student, windows))
            eval_time[0] += time.perf_counter() - e0

    dcurve.add(N, curves["pretrain"].values[-1])
    dcfg = DistillConfig(teacher_weight=a.teacher_weight, lr=a.lr, weight_decay=0.01)
    distill(dense, teacher, batches, config=dcfg, lr_at=lambda s: lr_at(N + s), on_step=on_step)
    speed["distilled"] = M * a.batch * a.seq_len / max(time.perf_counter() - t0 - eval_time[0], 1e-9)
    print(f"  seed {a.seed} {'distilled':<16} val {dcurve.values[-1]:.4f}  {speed['distilled']:8.0f} tok/s", flush=True)

    teacher.eval()
    with torch.no_grad():
        teacher(windows[: min(32, windows.shape[0])])
    util = moeify.router_stats(teacher)
    return {"seed": a.seed, "curves": {k: {"steps": c.steps, "values": c.values} for k, c in curves.items()},
            "final": {arm: curves[arm].values[-1] for arm in ARMS}, "pretrain_final": curves["pretrain"].values[-1],
            "tokens_per_s": speed, "params": params,
            "utilization": [{"layer": r.layer, "share": r.share} for r in util], "_util_rows": util}


def summarize(runs: list[dict]) -> dict:
    out = {}
    for arm in ARMS:
        vals = [r["final"][arm] for r in runs]
        out[arm] = {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                    "min": min(vals), "max": max(vals), "per_seed": vals,
                    "tokens_per_s": statistics.fmean(r["tokens_per_s"][arm] for r in runs)}
    gains = [r["final"]["dense"] - r["final"]["upcycled_top2"] for r in runs]
    kept = [(r["final"]["dense"] - r["final"]["distilled"]) / g if g > 0 else None
            for r, g in zip(runs, gains, strict=True)]
    wins = sum(g > 0 for g in gains)
    out["verdict"] = {
        "upcycled_beats_dense_seeds": wins, "seeds": len(runs),
        "gain_nats_per_seed": gains,
        "distill_kept_fraction_per_seed": kept,
        "distill_kept_fraction_mean": statistics.fmean(k for k in kept if k is not None) if any(
            k is not None for k in kept) else None,
    }
    return out


def report_text(a, corpus, runs, summary) -> str:
    dense_speed = summary["dense"]["tokens_per_s"]
    lines = [f"upcycle_quality ({'quick' if a.quick else 'full'}): GPT d_model={a.d_model} layers={a.layers} "
             f"seq={a.seq_len} batch={a.batch}; dense N={a.dense_steps} steps, then M={a.moe_steps} steps per arm; "
             f"{a.experts} experts; seeds {[r['seed'] for r in runs]}; torch threads {torch.get_num_threads()}",
             f"corpus: {corpus.description['source']}; python {corpus.description['python']}; "
             f"{corpus.description['train_bytes']} train / {corpus.description['val_bytes']} val bytes; "
             f"sha256 {corpus.description['sha256'][:16]}",
             f"dense checkpoint at step N: val loss {statistics.fmean(r['pretrain_final'] for r in runs):.4f}", "",
             f"{'arm':<30} {'final val loss':>15} {'std':>7} {'min..max':>17} {'tok/s':>8} {'x dense':>8}"]
    for arm in ARMS:
        s = summary[arm]
        lines.append(f"{ARM_TITLES[arm]:<30} {s['mean']:>15.4f} {s['std']:>7.4f} {s['min']:>8.4f}..{s['max']:<8.4f} "
                     f"{s['tokens_per_s']:>8.0f} {s['tokens_per_s'] / dense_speed:>8.2f}")
    v = summary["verdict"]
    lines += ["", f"(b) upcycled top-2 beats (a) dense continued on {v['upcycled_beats_dense_seeds']} of {v['seeds']} "
              f"seed(s); gain (a)-(b) per seed: {', '.join(f'{g:+.4f}' for g in v['gain_nats_per_seed'])} nats/byte"]
    if v["upcycled_beats_dense_seeds"] < v["seeds"]:
        lines.append("NOTE: (b) does NOT beat (a) on every seed; see the report for why.")
    kept = v["distill_kept_fraction_mean"]
    per_seed = ", ".join("n/a" if k is None else f"{k:.2f}" for k in v["distill_kept_fraction_per_seed"])
    lines.append("distillation (e): fraction of (b)'s gain over (a) kept by the dense student: "
                 + (f"{kept:.2f} (per seed: {per_seed})" if kept is not None else "n/a ((b) did not improve on (a))"))
    return "\n".join(lines) + "\n"


def write_loss_plot(path: Path, config: dict, runs: list[dict]) -> Path:
    curves = {title: {"steps": runs[0]["curves"][arm]["steps"], "values": [r["curves"][arm]["values"] for r in runs]}
              for arm, title in (("pretrain", "dense pretraining"), *ARM_TITLES.items())}
    n = config["dense_steps"]
    return plot_loss_curves(curves, path, marks={"upcycle": n}, zoom_from=n, ylabel="val loss (nats/byte)",
                            title=f"validation loss, GPT d{config['d_model']}x{config['layers']} on stdlib docstrings "
                                  f"({len(runs)} seed(s), band = min..max)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model and few steps: checks the pipeline only")
    p.add_argument("--out", type=Path, default=None,
                   help="results folder (default benchmarks/results; with --quick benchmarks/results/quick, so a "
                        "pipeline check never replaces the full run's results)")
    for key, value in FULL.items():
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=None,
                       help=f"default {value} (quick {QUICK[key]})")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--teacher-weight", type=float, default=0.25, help="Switch §4 used 0.25")
    p.add_argument("--threads", type=int, default=2, help="torch threads (use 1 on a machine busy with other work)")
    p.add_argument("--plot-only", action="store_true", help="redraw loss_curves.png from <out>/upcycle_quality.json")
    a = p.parse_args(argv)
    if a.out is None:
        a.out = RESULTS / "quick" if a.quick else RESULTS
    if a.plot_only:
        data = json.loads((a.out / "upcycle_quality.json").read_text())
        print(write_loss_plot(a.out / "loss_curves.png", data["config"], data["runs"]))
        return 0
    for key, value in (QUICK if a.quick else FULL).items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    corpus = stdlib_docstrings(a.corpus_bytes)
    windows = eval_windows(corpus.val, num=a.eval_windows, seq_len=a.seq_len)
    gpt = load_gpt()
    desc = corpus.description
    print(f"corpus: {desc['train_bytes']} train / {desc['val_bytes']} val bytes", flush=True)

    runs = []
    for seed in range(a.seeds):
        a.seed = seed
        runs.append(run_seed(a, gpt, corpus, windows))
        summary = summarize(runs)
        config = {k: v for k, v in vars(a).items() if k not in ("out", "seed")}
        payload = {"config": config, "corpus": corpus.description, "summary": summary,
                   "runs": [{k: v for k, v in r.items() if not k.startswith("_")} for r in runs],
                   "seeds_done": len(runs), "wall_s": time.time() - started}
        write_results(a.out / "upcycle_quality.json", json.dumps(payload, indent=1))
        write_results(a.out / "upcycle_quality.txt", report_text(a, corpus, runs, summary))
        write_loss_plot(a.out / "loss_curves.png", vars(a), runs)
        plot_utilization(runs[0]["_util_rows"], a.out / "upcycle_utilization.png",
                         title="(b) upcycled top-2 after training: share of tokens per expert (val windows, seed 0)")
    print(report_text(a, corpus, runs, summarize(runs)))
    for name in ("upcycle_quality.json", "upcycle_quality.txt", "loss_curves.png", "upcycle_utilization.png"):
        print(a.out / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
