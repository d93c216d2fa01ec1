"""MoE layer forward+backward: moeify vs the ideal and two classic implementations.

    python benchmarks/moe_layer.py [--quick] [--no-compile] [--out benchmarks/results/moe_layer.txt]
    python benchmarks/moe_layer.py --device cuda      # bf16, D, F and T x4, TFLOP/s -> moe_layer_cuda.txt

--quick: T in {16, 256, 4096} (x scale), shorter timing windows, torch.compile at the largest only.
--device cuda: the issue's GPU run: bfloat16 (--dtype), sizes x4 (--scale: D 2048, F 8192, T in
{4, 64, 1024, 16384, 32768}); steps end with a device synchronize; achieved TFLOP/s next to each
time; peak memory from the CUDA caching allocator (max_memory_allocated) in the same process;
profiles sorted by device time; at the three smallest T, the ideal's and moeify's fwd+bwd replayed
from a CUDA graph (small T is launch-bound). The CPU-only parts (malloc variants in child processes, RSS) are
skipped there.

Shape legend: T tokens, D model dim, F FFN dim, E experts, K experts per token, C capacity.

Variants (same router weights, same expert weights, top-k softmax routing renormalised):
  ideal    the dense FFN applied to K copies of the tokens: the matmul work of top-k, no routing
  moeify   `MoELayer` (router -> sort dispatch -> experts -> combine), default (auto) experts backend
  loop     one nn.Linear pair per expert, gather its tokens, run, index_add back (HF Mixtral style)
  onehot   capacity-factor one-hot dispatch/combine with einsum (GShard/Switch style, factor 1.25)
  experts  moeify's experts alone on K copies of the tokens split evenly over the E experts: the
           expert matmuls with no router, dispatch or combine. moeify / experts is the routing
           overhead; experts / ideal is the price of E smaller matmuls and E experts' weights.

Timing: the variants run in round-robin rounds in one process; a ratio is the median over rounds of
(variant / ideal) measured back to back, so slow drifts of a shared machine cancel, and times are
the fastest round (at least 5 rounds; onehot above T=4096 is timed once). Each step takes the next
of 4 input batches, so the routing changes from step to step as in training. Two timing processes
run: glibc malloc as installed, and glibc malloc tuned to recycle freed memory
(MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ = 1 GiB). By default every allocation of 32 MiB
or more is a fresh mmap whose pages fault in one by one (~8 ms per 32 MiB on this machine). The
stacked expert weight gradients, the largest such blocks, come from memory moeify's experts keep
mapped from step to step (moeify/moe/grad_buffers.py) under either malloc.

Floors (small T): backward writes a gradient for every expert's weights (E times the dense FFN's),
which the ideal does not.
  floor          expert weight-gradient bytes / copy bandwidth (bytes written per second)
  traffic floor  + the expert weights read twice (forward, and backward for the input gradient)
                 at read bandwidth: what any implementation must move through memory per step

Peak memory: a third process pins glibc's mmap threshold to 64 KiB so every tensor is mmapped and
returned to the OS when freed; peak RSS (VmHWM, reset through /proc/self/clear_refs) during one
fwd+bwd minus the RSS before it then follows live tensor memory. Each variant first runs one
untimed step at the size, so that what the math libraries set up once and keep (oneDNN's primitive
cache: 17 MiB on moeify's first step at T=256, measured) is not counted as memory of a step.
moeify's kept gradient memory is dropped before the measured step, so the step pays for it.
Budget = 1.2 x the ideal's peak plus the expert weight gradients.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from benchutil import cuda_graph_of, status_bytes, write_results
from torch import nn

from moeify.config import MoEConfig
from moeify.moe.build import DenseFFN, build_moe_layer
from moeify.moe.experts import GroupedExperts

E, K = 8, 2
INFER_TOKENS = 2  # the inference-forward table covers the first (smallest) token counts
GRAPH_TOKENS = 3  # and the CUDA-graph table (GPU only) the first three
CAPACITY_FACTOR = 1.25


@dataclass(frozen=True)
class Setup:
    """Where and at what size one run measures (CPU: fp32, D 512, F 2048; GPU: bf16, everything x4)."""

    device: str = "cpu"
    dtype: str = "float32"
    scale: int = 1

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def d_model(self) -> int:
        return 512 * self.scale

    @property
    def d_ff(self) -> int:
        return 2048 * self.scale

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def tokens(self, quick: bool) -> list[int]:
        return [t * self.scale for t in ([16, 256, 4096] if quick else [1, 16, 256, 4096, 8192])]

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def tensor(self, *shape: int, requires_grad: bool = False) -> torch.Tensor:
        return torch.randn(*shape, device=self.device, dtype=self.torch_dtype, requires_grad=requires_grad)

    def argv(self) -> list[str]:
        return ["--device", self.device, "--dtype", self.dtype, "--scale", str(self.scale)]

    def expert_weight_bytes(self, gated: bool) -> int:
        D, FF = self.d_model, self.d_ff
        per_expert = (3 if gated else 2) * D * FF + (0 if gated else FF + D)
        return E * per_expert * self.torch_dtype.itemsize

    def flops(self, T: int, gated: bool) -> float:
        """Matmul flops of one top-k fwd+bwd: 3 passes x 2 flops x T*K rows x D*F per weight matrix."""
        return 3 * 2 * T * K * self.d_model * self.d_ff * (3 if gated else 2)


# ---------------------------------------------------------------- measurement helpers

def peak_cuda_delta(fn, clear) -> int:
    """Bytes of peak CUDA caching-allocator memory above what was allocated before `fn`, after one untimed run."""
    clear()
    fn()
    clear()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    return torch.cuda.max_memory_allocated() - base


def peak_rss_delta(fn, clear) -> int:
    """Bytes of peak RSS above the starting RSS while `fn` runs, after one untimed run (`clear` frees the
    last step's grads before each)."""
    clear()
    fn()
    clear()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        return -1
    base = status_bytes("VmRSS")
    fn()
    return status_bytes("VmHWM") - base


def bench(fn, min_time: float, max_reps: int = 50) -> float:
    """Fastest seconds per call after one warm-up."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < min_time and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_rounds(fns: dict, min_time: float, min_rounds: int = 3, max_rounds: int = 30) -> dict[str, list[float]]:
    """Seconds per call of each fn, per round-robin round (after one warm-up call each)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    while len(times[next(iter(fns))]) < min_rounds or (time.perf_counter() - start < min_time * len(fns)
                                                        and len(times[next(iter(fns))]) < max_rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def paired_ratio(num: list[float], den: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(num, den, strict=True))


def bandwidths(setup: Setup) -> tuple[float, float]:
    """(bytes written per second by a 256 MiB copy, bytes read per second by a 256 MiB sum)."""
    src = torch.randn(64 << 20, device=setup.device)
    dst = torch.empty_like(src)
    nbytes = src.numel() * src.element_size()

    def copy():
        dst.copy_(src)
        setup.sync()

    def read():
        src.sum()
        setup.sync()
    return nbytes / bench(copy, 1.0), nbytes / bench(read, 1.0)


# ---------------------------------------------------------------- the variants

def activation(gated: bool):
    return F.silu if gated else F.gelu


class DenseFFNModule(nn.Module):
    def __init__(self, ffn: DenseFFN) -> None:
        super().__init__()
        kw = {"device": ffn.w1.device, "dtype": ffn.w1.dtype}
        self.fc1 = nn.Linear(ffn.d_model, ffn.d_ff, bias=ffn.b1 is not None, **kw)
        self.fc2 = nn.Linear(ffn.d_ff, ffn.d_model, bias=ffn.b2 is not None, **kw)
        self.fc3 = nn.Linear(ffn.d_model, ffn.d_ff, bias=False, **kw) if ffn.gated else None
        with torch.no_grad():
            self.fc1.weight.copy_(ffn.w1), self.fc2.weight.copy_(ffn.w2)
            if ffn.b1 is not None:
                self.fc1.bias.copy_(ffn.b1), self.fc2.bias.copy_(ffn.b2)
            if self.fc3 is not None:
                self.fc3.weight.copy_(ffn.w3)
        self.act = activation(ffn.gated)

    def forward(self, x):
        h = self.act(self.fc1(x))
        if self.fc3 is not None:
            h = h * self.fc3(x)
        return self.fc2(h)


class Ideal(nn.Module):
    def __init__(self, ffn: DenseFFN) -> None:
        super().__init__()
        self.ffn = DenseFFNModule(ffn)

    def forward(self, x_TD):
        # summing the K copies stands in for the combine (and gives the output the MoE's shape)
        return self.ffn(x_TD.repeat(K, 1)).view(K, *x_TD.shape).sum(0)


def topk_route(gate: nn.Linear, x_TD):
    probs_TE = gate(x_TD).softmax(-1)
    w_TK, idx_TK = probs_TE.topk(K, dim=-1)
    return w_TK / w_TK.sum(-1, keepdim=True), idx_TK


class LoopMoE(nn.Module):
    """HF Mixtral-style sparse block."""

    def __init__(self, ffn: DenseFFN, gate_weight) -> None:
        super().__init__()
        self.gate = nn.Linear(ffn.d_model, E, bias=False, device=ffn.w1.device, dtype=ffn.w1.dtype)
        self.gate.weight.data.copy_(gate_weight)
        self.experts = nn.ModuleList(DenseFFNModule(ffn) for _ in range(E))

    def forward(self, x_TD):
        w_TK, idx_TK = topk_route(self.gate, x_TD)
        out_TD = torch.zeros_like(x_TD)
        mask_EKT = F.one_hot(idx_TK, E).permute(2, 1, 0)
        for e in range(E):
            k_idx, tok = torch.where(mask_EKT[e])
            if tok.numel() == 0:
                continue
            y = self.experts[e](x_TD[tok]) * w_TK[tok, k_idx, None]
            out_TD = out_TD.index_add(0, tok, y)
        return out_TD


class OneHotMoE(nn.Module):
    """GShard/Switch dispatch: one-hot (T, E, C) dispatch and combine tensors, einsum in and out."""

    def __init__(self, ffn: DenseFFN, gate_weight) -> None:
        super().__init__()
        self.gate = nn.Linear(ffn.d_model, E, bias=False, device=ffn.w1.device, dtype=ffn.w1.dtype)
        self.gate.weight.data.copy_(gate_weight)
        self.gated = ffn.gated
        self.w1_EFD = nn.Parameter(ffn.w1.expand(E, -1, -1).clone())
        self.w2_EDF = nn.Parameter(ffn.w2.expand(E, -1, -1).clone())
        self.w3_EFD = nn.Parameter(ffn.w3.expand(E, -1, -1).clone()) if ffn.gated else None
        self.b1_EF = nn.Parameter(ffn.b1.expand(E, -1).clone()) if ffn.b1 is not None else None
        self.b2_ED = nn.Parameter(ffn.b2.expand(E, -1).clone()) if ffn.b2 is not None else None

    def forward(self, x_TD):
        T = x_TD.shape[0]
        C = max(1, math.ceil(CAPACITY_FACTOR * T * K / E))
        w_TK, idx_TK = topk_route(self.gate, x_TD)
        mask_TKE = F.one_hot(idx_TK, E)
        # position of each assignment in its expert's buffer, k-major priority (GShard)
        pos_KTE = torch.cumsum(mask_TKE.transpose(0, 1).reshape(-1, E), 0).reshape(K, T, E) - 1
        pos_TKE = pos_KTE.transpose(0, 1) * mask_TKE
        keep_TKE = mask_TKE * (pos_TKE < C)
        slot_TKEC = F.one_hot(pos_TKE.clamp(max=C - 1), C) * keep_TKE.unsqueeze(-1)
        dispatch_TEC = slot_TKEC.sum(1).to(x_TD.dtype)
        combine_TEC = (slot_TKEC * w_TK[..., None, None]).sum(1)
        x_ECD = torch.einsum("tec,td->ecd", dispatch_TEC, x_TD)
        h_ECF = torch.einsum("ecd,efd->ecf", x_ECD, self.w1_EFD)
        if self.b1_EF is not None:
            h_ECF = h_ECF + self.b1_EF[:, None]
        h_ECF = activation(self.gated)(h_ECF)
        if self.w3_EFD is not None:
            h_ECF = h_ECF * torch.einsum("ecd,efd->ecf", x_ECD, self.w3_EFD)
        y_ECD = torch.einsum("ecf,edf->ecd", h_ECF, self.w2_EDF)
        if self.b2_ED is not None:
            y_ECD = y_ECD + self.b2_ED[:, None]
        return torch.einsum("tec,ecd->td", combine_TEC, y_ECD)


class BalancedExperts(nn.Module):
    """The MoE layer's own experts on K copies of the tokens, assigned to experts in equal blocks."""

    def __init__(self, experts: nn.Module) -> None:
        super().__init__()
        self.experts = experts

    def forward(self, x_TD):
        x_ND = x_TD.repeat(K, 1)
        N = x_ND.shape[0]
        counts_E = torch.full((E,), N // E, dtype=torch.int64, device=x_TD.device)
        counts_E[: N % E] += 1
        return self.experts(x_ND, counts_E).view(K, *x_TD.shape).sum(0)


def make_variants(setup: Setup, gated: bool, seed: int = 0) -> dict[str, nn.Module]:
    g = torch.Generator().manual_seed(seed)
    D, FF = setup.d_model, setup.d_ff

    def rand(*shape: int, std: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * std).to(setup.device, setup.torch_dtype)
    ffn = DenseFFN("silu" if gated else "gelu", rand(FF, D, std=D ** -0.5), rand(D, FF, std=FF ** -0.5),
                   None if gated else rand(FF, std=0.02), None if gated else rand(D, std=0.02),
                   rand(FF, D, std=D ** -0.5) if gated else None)
    cfg = MoEConfig(num_experts=E, top_k=K, init="copy_noise", init_noise=0.01, seed=seed,
                    load_balance_coef=0.0, z_loss_coef=0.0)
    moe = build_moe_layer(cfg, ffn)
    gate_w = moe.router.gate.weight.detach()
    return {"ideal": Ideal(ffn), "moeify": moe, "loop": LoopMoE(ffn, gate_w), "onehot": OneHotMoE(ffn, gate_w),
            "experts": BalancedExperts(moe.experts)}


def clear_fn(module: nn.Module, x_TD):
    def clear():
        for p in module.parameters():
            p.grad = None
        x_TD.grad = None
    return clear


def cold_clear_fn(module: nn.Module, x_TD):
    """clear_fn, and the experts' reusable gradient memory dropped too: the step measured pays for it."""
    clear = clear_fn(module, x_TD)

    def cold_clear():
        clear()
        for m in module.modules():
            if isinstance(m, GroupedExperts):
                m.grad_buffers.clear()
    return cold_clear


def graph_step_fn(module: nn.Module, x_TD, grad_TD):
    """One fwd+bwd without the device synchronize, for a CUDA graph to capture."""
    clear = clear_fn(module, x_TD)

    def step():
        clear()
        module(x_TD).backward(grad_TD)
    return step


def step_fn(module: nn.Module, x_TD, grad_TD, setup: Setup, more: tuple = ()):
    """One fwd+bwd per call; with `more` inputs, calls cycle through x_TD, *more (new routing each step)."""
    inputs = (x_TD, *more)
    clears = [clear_fn(module, x) for x in inputs]
    calls = [0]

    def step():
        i = calls[0] % len(inputs)
        calls[0] += 1
        clears[i]()
        module(inputs[i]).backward(grad_TD)
        setup.sync()
    return step


# ---------------------------------------------------------------- main

def forward_fn(module: nn.Module, inputs: list, setup: Setup, reps: int = 8):
    """`reps` inference forwards (eval mode, no grad) per call, cycling through the inputs."""
    def forward():
        was_training = module.training
        module.eval()
        with torch.no_grad():
            for i in range(reps):
                module(inputs[i % len(inputs)])
        setup.sync()
        module.train(was_training)
    return forward


@contextmanager
def labelled_cpu_kernels():
    """moeify's CPU kernels as labelled ranges in a profile ("moeify_kernel.grad", ...): called through
    ctypes, their time would otherwise count as the self time of the autograd node that calls them."""
    from torch.profiler import record_function

    from moeify.moe import cpu_kernels
    real = {name: getattr(cpu_kernels.Kernels, name) for name in ("dot", "axpy", "outer", "grad")}

    def labelled(name):
        def call(self, *args, **kwargs):
            with record_function(f"moeify_kernel.{name}"):
                return real[name](self, *args, **kwargs)
        return call
    try:
        for name in real:
            setattr(cpu_kernels.Kernels, name, labelled(name))
        yield
    finally:
        for name, fn in real.items():
            setattr(cpu_kernels.Kernels, name, fn)


def profile_summary(setup: Setup, module, x_TD, grad_TD, rows: int = 14) -> str:
    from torch.profiler import ProfilerActivity, profile

    step = step_fn(module, x_TD, grad_TD, setup)
    step()
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if setup.cuda else [])]
    with labelled_cpu_kernels(), profile(activities=activities) as prof:
        for _ in range(3):
            step()
    sort_by = "self_device_time_total" if setup.cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort_by, row_limit=rows, max_name_column_width=40)


# Timed steps cycle through this many input batches, so routing changes from step to step as in
# training (a fixed batch would route the same tokens to the same experts every step).
BATCHES = 4
# onehot takes ~15 s per step at T=8192 on the CPU: above this T it is timed once, not every round
ONEHOT_ROUNDS_MAX_T = 4096
# ... and skipped where its (T, K, E, C) int64 one-hot slot tensor alone would pass this size
ONEHOT_MAX_BYTES = 8 << 30
TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}
MEASURE_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # see the module docstring (peak memory)


def onehot_bytes(T: int) -> int:
    C = max(1, math.ceil(CAPACITY_FACTOR * T * K / E))
    return T * K * E * C * 8


def time_phase(setup: Setup, tokens: list[int], min_time: float, compile_tokens: list[int],
               with_profiles: bool) -> dict:
    """Timings of every variant, one process; returns a JSON-able dict."""
    write_bw, read_bw = bandwidths(setup)
    rows, infer, profiles, compiled, graphs = [], [], [], [], []
    for gated in (False, True):
        kind = "swiglu" if gated else "gelu"
        variants = make_variants(setup, gated)
        for T in tokens:
            x_TD, *more = (setup.tensor(T, setup.d_model, requires_grad=True) for _ in range(BATCHES))
            grad_TD = setup.tensor(T, setup.d_model)
            steps = {name: step_fn(m, x_TD, grad_TD, setup, more) for name, m in variants.items()}
            if onehot_bytes(T) > ONEHOT_MAX_BYTES:
                steps.pop("onehot")
            slow = {"onehot": steps.pop("onehot")} if T > ONEHOT_ROUNDS_MAX_T and "onehot" in steps else {}
            times = bench_rounds(steps, min_time, min_rounds=5)
            ratios = {name: paired_ratio(t, times["ideal"]) for name, t in times.items()}
            for name, step in slow.items():  # timed once after a warm-up, against the median ideal
                step()
                t0 = time.perf_counter()
                step()
                times[name] = [time.perf_counter() - t0]
                ratios[name] = times[name][0] / statistics.median(times["ideal"])
            rows.append({"kind": kind, "T": T, "rounds": len(times["ideal"]),
                         **{f"{name}_s": min(t) for name, t in times.items()},
                         **{f"{name}_ratio": r for name, r in ratios.items()},
                         "moeify_vs_loop": paired_ratio(times["moeify"], times["loop"]),
                         "moeify_vs_experts": paired_ratio(times["moeify"], times["experts"])})
            print(kind, T, {k: round(v, 4) for k, v in rows[-1].items() if k.endswith(("_s", "ratio", "loop"))},
                  flush=True)
        if setup.cuda:  # small T is launch-bound: the same steps replayed from a CUDA graph
            for T in tokens[:GRAPH_TOKENS]:
                times = {}
                for name in ("ideal", "moeify"):
                    x_TD = setup.tensor(T, setup.d_model, requires_grad=True)
                    replay = cuda_graph_of(graph_step_fn(variants[name], x_TD, setup.tensor(T, setup.d_model)))
                    times[name] = bench(lambda replay=replay: (replay(), setup.sync()), min_time / 4)
                graphs.append({"kind": kind, "T": T, "ideal_s": times["ideal"], "moeify_s": times["moeify"]})
        for T in tokens[:INFER_TOKENS]:  # decoding-sized batches: the forward alone, as in inference
            inputs = [setup.tensor(T, setup.d_model) for _ in range(BATCHES)]
            fwds = {name: forward_fn(variants[name], inputs, setup) for name in ("ideal", "moeify", "loop")}
            times = bench_rounds(fwds, min_time / 2, min_rounds=10)
            infer.append({"kind": kind, "T": T, **{f"{n}_s": min(t) / 8 for n, t in times.items()},
                          **{f"{n}_ratio": paired_ratio(t, times["ideal"]) for n, t in times.items()},
                          "moeify_vs_loop": paired_ratio(times["moeify"], times["loop"])})
        if with_profiles:
            for T in sorted({tokens[0], tokens[min(1, len(tokens) - 1)], tokens[-1]}):
                x_TD = setup.tensor(T, setup.d_model, requires_grad=True)
                profiles.append(f"-- profile: moeify {kind}, T={T}, 3 steps, top ops by self "
                                f"{'device' if setup.cuda else 'CPU'} time\n"
                                + profile_summary(setup, variants["moeify"], x_TD, setup.tensor(T, setup.d_model)))
        for T in compile_tokens:
            x_TD = setup.tensor(T, setup.d_model, requires_grad=True)
            grad_TD = setup.tensor(T, setup.d_model)
            comp = torch.compile(variants["moeify"])
            t0 = time.perf_counter()
            step_fn(comp, x_TD, grad_TD, setup)()
            compile_s = time.perf_counter() - t0
            times = bench_rounds({"eager": step_fn(variants["moeify"], x_TD, grad_TD, setup),
                                  "compiled": step_fn(comp, x_TD, grad_TD, setup)}, min_time)
            compiled.append({"kind": kind, "T": T, "eager_s": min(times["eager"]),
                             "compiled_s": min(times["compiled"]), "compile_s": compile_s,
                             "ratio": paired_ratio(times["compiled"], times["eager"])})
    return {"write_bw": write_bw, "read_bw": read_bw, "rows": rows, "infer": infer, "profiles": profiles,
            "compiled": compiled, "graphs": graphs, "loadavg": os.getloadavg()}


def mem_phase(setup: Setup, tokens: list[int]) -> dict:
    peak = peak_cuda_delta if setup.cuda else peak_rss_delta
    rows = []
    for gated in (False, True):
        variants = make_variants(setup, gated)
        for T in tokens:
            x_TD = setup.tensor(T, setup.d_model, requires_grad=True)
            grad_TD = setup.tensor(T, setup.d_model)
            rows.append({"kind": "swiglu" if gated else "gelu", "T": T,
                         **{name: peak(step_fn(m, x_TD, grad_TD, setup), cold_clear_fn(m, x_TD))
                            for name, m in variants.items()
                            if name != "experts" and not (name == "onehot" and onehot_bytes(T) > ONEHOT_MAX_BYTES)}})
    return {"rows": rows}


def run_child(phase: str, malloc_env: dict, argv: list[str]) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(malloc_env)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "phase.json"
        subprocess.run([sys.executable, __file__, *argv, "--phase", phase, "--json", str(out)], env=env, check=True)
        return json.loads(out.read_text())


def ratio_cell(r: dict, name: str, width: int) -> str:
    value = r.get(f"{name}_ratio")
    return f"{'n/a':>{width}}" if value is None else f"{value:>{width}.2f}"


def time_table(setup: Setup, name: str, res: dict) -> list[str]:
    lines = [f"== timing, {name}: copy {res['write_bw'] / 1e9:.2f} GB/s written, "
             f"sum {res['read_bw'] / 1e9:.2f} GB/s read",
             f"{'kind':7} {'T':>5} {'ideal ms':>9} {'moeify ms':>10} {'/ideal':>7} {'loop':>6} {'onehot':>7} "
             f"{'experts':>8} {'vs loop':>8} {'vs exp':>7} {'floor ms':>9} {'traffic':>8} {'/target':>8} "
             f"{'TFLOP/s':>8} {'ideal TF':>8} {'rounds':>6}"]
    for r in res["rows"]:
        gated = r["kind"] == "swiglu"
        wbytes = setup.expert_weight_bytes(gated)
        floor = wbytes / res["write_bw"]
        traffic = floor + 2 * wbytes / res["read_bw"]
        target = max(r["ideal_s"], floor)
        flops = setup.flops(r["T"], gated)
        lines.append(f"{r['kind']:7} {r['T']:>5} {r['ideal_s'] * 1e3:>9.2f} {r['moeify_s'] * 1e3:>10.2f} "
                     f"{r['moeify_ratio']:>7.2f} {r['loop_ratio']:>6.2f} {ratio_cell(r, 'onehot', 7)} "
                     f"{r['experts_ratio']:>8.2f} {r['moeify_vs_loop']:>8.2f} {r['moeify_vs_experts']:>7.2f} "
                     f"{floor * 1e3:>9.2f} {traffic * 1e3:>8.2f} {r['moeify_s'] / target:>8.2f} "
                     f"{flops / r['moeify_s'] / 1e12:>8.3f} {flops / r['ideal_s'] / 1e12:>8.3f} {r['rounds']:>6}")
    lines.append("inference forward (eval, no grad; 8 forwards per timed call), time / ideal time:")
    lines.append(f"  {'kind':7} {'T':>5} {'ideal ms':>9} {'moeify ms':>10} {'/ideal':>7} {'loop':>6} {'vs loop':>8}")
    for r in res["infer"]:
        lines.append(f"  {r['kind']:7} {r['T']:>5} {r['ideal_s'] * 1e3:>9.3f} {r['moeify_s'] * 1e3:>10.3f} "
                     f"{r['moeify_ratio']:>7.2f} {r['loop_ratio']:>6.2f} {r['moeify_vs_loop']:>8.2f}")
    if res.get("graphs"):
        lines.append("fwd+bwd replayed from a CUDA graph (launch overhead removed; one input, so one routing):")
        lines.append(f"  {'kind':7} {'T':>5} {'ideal ms':>9} {'moeify ms':>10} {'/ideal':>7} {'traffic':>8} "
                     f"{'/max(ideal, traffic)':>21}")
        for r in res["graphs"]:
            wbytes = setup.expert_weight_bytes(r["kind"] == "swiglu")
            traffic = wbytes / res["write_bw"] + 2 * wbytes / res["read_bw"]
            lines.append(f"  {r['kind']:7} {r['T']:>5} {r['ideal_s'] * 1e3:>9.3f} {r['moeify_s'] * 1e3:>10.3f} "
                         f"{r['moeify_s'] / r['ideal_s']:>7.2f} {traffic * 1e3:>8.2f} "
                         f"{r['moeify_s'] / max(r['ideal_s'], traffic):>21.2f}")
    lines.append(f"load average at the end (1/5/15 min): {tuple(round(v, 2) for v in res['loadavg'])}")
    if res["compiled"]:
        lines.append("torch.compile of the moeify layer (fwd+bwd; compiled runs the grouped_linear custom ops, "
                     "eager the expert loop):")
        for c in res["compiled"]:
            lines.append(f"  {c['kind']:7} T={c['T']:>5}: eager {c['eager_s'] * 1e3:8.2f} ms, compiled "
                         f"{c['compiled_s'] * 1e3:8.2f} ms ({c['ratio']:.2f}x eager; first call incl. compile "
                         f"{c['compile_s']:.1f} s)")
    return lines


def mem_table(setup: Setup, res: dict, caveat: str = "") -> list[str]:
    where = "CUDA allocator peak above the memory allocated" if setup.cuda else "peak RSS above the RSS"
    lines = [f"== peak memory of one fwd+bwd (MiB: {where} before it){caveat}",
             f"{'kind':7} {'T':>5} {'ideal':>8} {'moeify':>8} {'loop':>8} {'onehot':>8} {'budget':>8} {'/budget':>8}"]
    for r in res["rows"]:
        budget = 1.2 * r["ideal"] + setup.expert_weight_bytes(r["kind"] == "swiglu")
        lines.append(f"{r['kind']:7} {r['T']:>5} " + " ".join(
            f"{r[n] / 2**20:>8.1f}" if n in r else f"{'n/a':>8}" for n in ("ideal", "moeify", "loop", "onehot"))
                     + f" {budget / 2**20:>8.1f} {r['moeify'] / budget:>8.2f}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="T in {16, 256, 4096} (x scale), shorter timing windows")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile comparison")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                    help="default float32 on the CPU, bfloat16 on CUDA")
    ap.add_argument("--scale", type=int, help="D, F and T times this (default 1 on the CPU, 4 on CUDA)")
    ap.add_argument("--tokens", help="comma-separated token counts instead of the default set (before scaling)")
    ap.add_argument("--one-process", action="store_true",
                    help="measure in this process, malloc as installed (always so on CUDA)")
    ap.add_argument("--out", help="default benchmarks/results/moe_layer.txt (moe_layer_cuda.txt on CUDA; "
                                  "_quick before .txt with --quick)")
    ap.add_argument("--phase", choices=["time", "time-profile", "mem"], help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is visible to torch; run on a GPU machine or use --device cpu")
    setup = Setup(args.device, args.dtype or ("bfloat16" if cuda else "float32"), args.scale or (4 if cuda else 1))
    tokens = ([int(t) * setup.scale for t in args.tokens.split(",")] if args.tokens else setup.tokens(args.quick))
    min_time = 0.5 if args.quick else 2.0
    compile_tokens = [] if args.no_compile else (tokens[-1:] if args.quick else tokens[1:4])
    torch.manual_seed(0)
    if args.phase:  # a child process: measure, write JSON, exit
        if args.phase == "mem":
            res = mem_phase(setup, tokens)
        else:
            res = time_phase(setup, tokens, min_time, compile_tokens if args.phase == "time-profile" else [],
                             with_profiles=args.phase == "time-profile")
        Path(args.json).write_text(json.dumps(res))
        return

    where = (f"{torch.cuda.get_device_name(setup.device)}" if cuda
             else f"CPU, {torch.get_num_threads()} threads")
    header = [f"moe_layer fwd+bwd, {setup.dtype} {where}, torch {torch.__version__}",
              f"D={setup.d_model} F={setup.d_ff} E={E} top-{K}; onehot capacity factor {CAPACITY_FACTOR}",
              "/ideal, loop, onehot, experts: time / ideal time (median of back-to-back ratios);",
              "vs loop, vs exp: moeify / loop, moeify / experts (the routing overhead);",
              "floor: expert weight-grad bytes / copy bandwidth; traffic: floor + expert weights read twice;",
              "/target: moeify / max(ideal, floor); TFLOP/s: matmul flops of top-k fwd+bwd / time", ""]
    print("\n".join(header), flush=True)
    argv = setup.argv() + (["--quick"] if args.quick else []) + (["--no-compile"] if args.no_compile else []) + (
        ["--tokens", args.tokens] if args.tokens else [])
    if cuda or args.one_process:  # CUDA has no malloc variants to compare: one process measures everything
        timed = time_phase(setup, tokens, min_time, compile_tokens, with_profiles=True)
        sections = [*time_table(setup, "CUDA" if cuda else "one process, malloc as installed", timed), "",
                    *mem_table(setup, mem_phase(setup, tokens), "" if cuda else
                               "\n   (one CPU process: malloc reuses freed memory, so these undercount)"),
                    "", *timed["profiles"]]
    else:
        tuned = run_child("time-profile", TUNED_MALLOC, argv)
        default = run_child("time", {}, argv)
        mem = run_child("mem", MEASURE_MALLOC, argv)
        sections = [*time_table(setup, "malloc as installed (default)", default), "",
                    *time_table(setup, "malloc tuned (MALLOC_MMAP_THRESHOLD_=MALLOC_TRIM_THRESHOLD_=1 GiB)", tuned),
                    "", *mem_table(setup, mem), "", *tuned["profiles"]]
    lines = [*header, *sections]
    name = f"moe_layer{'_cuda' if cuda else ''}{'_quick' if args.quick else ''}.txt"  # quick keeps the full run's file
    out = write_results(args.out or Path(__file__).parent / "results" / name, "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
