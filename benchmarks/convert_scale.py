"""Upcycling at scale: out-of-core conversion of a >= 1B-parameter checkpoint, and in-memory convert.

    python benchmarks/convert_scale.py [--quick] [--workdir DIR] [--out benchmarks/results/convert_scale.txt]

1. Writes a Llama-style dense bf16 checkpoint (random weights, model built on the meta device,
   tensors streamed to disk one at a time), upcycles it to 8 experts with `moeify.ooc`, and
   reports time, output size and peak RSS against a child process that only imports Python +
   torch + moeify and builds the model on meta (the baseline); conversion throughput is compared
   with `cp` of the output file on the same disk. Both timings include a final `sync`.
2. In-memory `moeify.convert` of a >= 100M-parameter float32 Llama: time and peak RSS above the
   dense model's, against the converted model's size plus one MoE layer.

Each measurement runs in its own child process so that its peak RSS (VmHWM) is its own; children
run with glibc's mmap threshold pinned at 64 KiB so freed tensors are returned to the OS. The
generated checkpoints are deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchutil import status_bytes, write_results

ROOT = Path(__file__).resolve().parent.parent
BIG = dict(vocab_size=32000, d_model=2048, n_layers=16, n_heads=16, d_ff=8192)  # ~1.2B params
MID = dict(vocab_size=32000, d_model=768, n_layers=12, n_heads=12, d_ff=2048)  # ~134M params
QUICK_BIG = dict(vocab_size=8000, d_model=512, n_layers=4, n_heads=8, d_ff=2048)
QUICK_MID = dict(vocab_size=8000, d_model=256, n_layers=4, n_heads=4, d_ff=1024)
NUM_EXPERTS = 8


def _llama():
    sys.path.insert(0, str(ROOT / "examples"))
    import llama

    return llama


# ------------------------------------------------------------------ child processes

def child_generate(path: str, sizes: dict) -> dict:
    import torch

    from moeify.ooc import StreamingWriter

    with torch.device("meta"):
        model = _llama().Llama(**sizes).to(torch.bfloat16)
    state = model.state_dict()
    writer = StreamingWriter(path, [(k, v.dtype, tuple(v.shape)) for k, v in state.items()])
    # random values for a 1B model take minutes on 2 cores: draw one 32M-value pool and give each
    # tensor a different window of it (the conversion's cost does not depend on the values)
    g = torch.Generator().manual_seed(0)
    pool = (torch.randn(1 << 25, generator=g) * 0.02).to(torch.bfloat16)
    start = 0
    try:
        for name, t in state.items():
            n = t.numel()
            if name.endswith("norm.weight"):
                value = torch.ones(t.shape, dtype=torch.bfloat16)
            else:
                idx = (torch.arange(n) + start) % pool.numel() if n > pool.numel() - start else None
                value = (pool[idx] if idx is not None else pool[start:start + n]).reshape(t.shape)
                start = (start + 7919 * 64 + n) % (pool.numel() // 2)
            writer.write_tensor(name, value)
    finally:
        writer.close()
    return {"params": sum(v.numel() for v in state.values()), "bytes": os.path.getsize(path)}


def child_baseline(sizes: dict) -> dict:
    import torch

    import moeify  # noqa: F401  - the baseline holds everything the conversion imports
    import moeify.ooc  # noqa: F401

    with torch.device("meta"):
        _llama().Llama(**sizes).to(torch.bfloat16)
    return {"hwm": status_bytes("VmHWM")}


def child_ooc(src: str, out: str, sizes: dict) -> dict:
    import torch

    import moeify
    from moeify.ooc import convert_checkpoint

    llama = _llama()
    t0 = time.perf_counter()
    convert_checkpoint(src, out, moeify.MoEConfig(num_experts=NUM_EXPERTS, top_k=2),
                       model=lambda: llama.Llama(**sizes).to(torch.bfloat16))
    t1 = time.perf_counter()
    os.sync()
    t2 = time.perf_counter()
    return {"seconds": t1 - t0, "seconds_with_sync": t2 - t0, "hwm": status_bytes("VmHWM"),
            "bytes": os.path.getsize(Path(out) / "model.safetensors")}


def child_spot_check(src: str, out: str) -> dict:
    """Layer 0's experts are the dense MLP repeated; the router exists and is float32."""
    import torch

    from moeify.ooc import SafetensorsReader

    with SafetensorsReader(src) as dense, SafetensorsReader(Path(out) / "model.safetensors") as moe:
        w1 = moe.get_tensor("layers.0.mlp.moe.experts.w1_EFD")
        ok = all(torch.equal(w1[e], dense.get_tensor("layers.0.mlp.gate_proj.weight")) for e in range(w1.shape[0]))
        ok &= moe.dtype("layers.0.mlp.moe.router.gate.weight") == torch.float32
        ok &= torch.equal(moe.get_tensor("embed.weight"), dense.get_tensor("embed.weight"))
    return {"ok": bool(ok)}


def child_in_memory(sizes: dict) -> dict:
    import torch

    import moeify

    llama = _llama()
    torch.manual_seed(0)
    dense = llama.Llama(**sizes)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # peak RSS from here on: the dense model is the baseline
    base = status_bytes("VmRSS")
    t0 = time.perf_counter()
    result = moeify.convert(dense, moeify.MoEConfig(num_experts=NUM_EXPERTS, top_k=2), verify=False)
    seconds = time.perf_counter() - t0
    peak = status_bytes("VmHWM") - base
    final = sum(p.numel() * p.element_size() for p in result.model.parameters())
    layer = next(iter(moeify.moe_layers(result.model).values()))
    one_layer = sum(p.numel() * p.element_size() for p in layer.parameters())
    return {"seconds": seconds, "peak_above_dense": peak, "final_bytes": final, "one_layer_bytes": one_layer,
            "params_dense": sum(p.numel() for p in dense.parameters()),
            "params_after": sum(p.numel() for p in result.model.parameters())}


CHILDREN = {"generate": child_generate, "baseline": child_baseline, "ooc": child_ooc,
            "spot_check": child_spot_check, "in_memory": child_in_memory}


def run_child(name: str, *args) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run([sys.executable, __file__, "--child", name, json.dumps(args)], env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"child {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small models (a smoke run of the script)")
    ap.add_argument("--workdir", default=str(ROOT / "benchmarks" / ".convert_scale"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "convert_scale.txt"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("args", nargs="?", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(CHILDREN[a.child](*json.loads(a.args))))
        return

    big, mid = (QUICK_BIG, QUICK_MID) if a.quick else (BIG, MID)
    work = Path(a.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    src, out, copy = work / "dense.safetensors", work / "moe", work / "copy.safetensors"
    gib = 2 ** 30
    lines = [f"convert_scale: {NUM_EXPERTS} experts, top-2, init=copy; disk: {work}", ""]

    def say(text: str) -> None:
        lines.append(text)
        print(text, flush=True)

    try:
        t0 = time.perf_counter()
        gen = run_child("generate", str(src), big)
        say(f"dense checkpoint: Llama {big}: {gen['params'] / 1e9:.3f} B params, bf16, "
            f"{gen['bytes'] / gib:.2f} GiB, generated in {time.perf_counter() - t0:.1f} s")
        base = run_child("baseline", big)
        conv = run_child("ooc", str(src), str(out), big)
        check = run_child("spot_check", str(src), str(out))
        os.sync()
        t0 = time.perf_counter()
        subprocess.run(["cp", str(out / "model.safetensors"), str(copy)], check=True)
        os.sync()
        cp_s = time.perf_counter() - t0
        above = conv["hwm"] - base["hwm"]
        say(f"out-of-core upcycle: {conv['seconds']:.1f} s ({conv['seconds_with_sync']:.1f} s incl. sync), "
            f"output {conv['bytes'] / gib:.2f} GiB, {conv['bytes'] / conv['seconds_with_sync'] / 1e6:.0f} MB/s")
        say(f"  peak RSS {conv['hwm'] / gib:.2f} GiB; baseline (python + torch + moeify, model on meta) "
            f"{base['hwm'] / gib:.2f} GiB; above baseline {above / 2**20:.0f} MiB "
            f"(target < 2048 MiB: {'met' if above < 2 * gib else 'NOT met'})")
        say(f"  cp of the same {conv['bytes'] / gib:.2f} GiB on the same disk: {cp_s:.1f} s incl. sync; "
            f"conversion / cp = {conv['seconds_with_sync'] / cp_s:.2f}x "
            f"(target <= 1.5x: {'met' if conv['seconds_with_sync'] <= 1.5 * cp_s else 'NOT met'})")
        say(f"  spot check (experts = dense MLP, router float32, untouched tensors equal): "
            f"{'ok' if check['ok'] else 'FAILED'}")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)

        mem = run_child("in_memory", mid)
        budget = mem["final_bytes"] + mem["one_layer_bytes"]
        say("")
        say(f"in-memory moeify.convert: Llama {mid} float32, {mem['params_dense'] / 1e6:.0f} M -> "
            f"{mem['params_after'] / 1e6:.0f} M params, {mem['seconds']:.1f} s")
        say(f"  peak RSS above the dense model {mem['peak_above_dense'] / 2**20:.0f} MiB; final model "
            f"{mem['final_bytes'] / 2**20:.0f} MiB + one MoE layer {mem['one_layer_bytes'] / 2**20:.0f} MiB = "
            f"{budget / 2**20:.0f} MiB (target: peak <= that: "
            f"{'met' if mem['peak_above_dense'] <= budget else 'NOT met'})")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not a.quick:
        path = write_results(a.out, "\n".join(lines) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
