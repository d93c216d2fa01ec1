"""Grouped experts: E independent FFNs whose weights are stacked, run on token groups.

Shape legend: T tokens, N token-expert assignments (T*k for top-k), D model dim (input), O output
dim (usually D), I input dim of one grouped matmul, F FFN hidden dim, E experts. Tokens arrive
sorted by expert (`counts_E[e]` consecutive rows for expert e).

    plain:  y = w2(act(w1 x + b1)) + b2
    gated:  y = w2(act(w1 x + b1) * (w3 x + b3)) + b2      (SwiGLU: act=silu, GeGLU: act=gelu)

`w1_EFD`/`w3_EFD`/`w2_EDF` keep nn.Linear's (out, in) layout per expert, so copying a dense
Linear's weight into an expert is a plain copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moeify.errors import ConfigError
from moeify.moe.expert_loop import (
    ACTIVATIONS,
    _backprop,
    _KernelExperts,
    _linear,
    _matmul,
    _matmul_into,
    _onednn,
    expert_ffn,
    expert_ffn_dense,
)
from moeify.moe.grad_buffers import GradBuffers


def activation_fn(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ConfigError(f"unknown expert activation {name!r}: use one of {', '.join(ACTIVATIONS)}") from None


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # grouped_mm is not on autocast's cast lists: apply the autocast dtype ourselves so expert
    # matmuls run in bf16/fp16 under autocast like nn.Linear would.
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def grouped_mm_usable(x_ND: torch.Tensor, w_EOI: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether `torch.nn.functional.grouped_mm` takes these operands in `dtype`.

    Every row stride must be a multiple of 16 bytes (dims divisible by 4 in fp32). The CPU kernel
    runs float32, bfloat16 and float16; the CUDA kernels take bfloat16 on compute capability 8.0 or
    newer (torch's documented requirement).
    """
    if not hasattr(F, "grouped_mm"):
        return False
    size = torch.empty((), dtype=dtype).element_size()
    if (x_ND.shape[-1] * size) % 16 or (w_EOI.shape[-2] * size) % 16:
        return False
    if x_ND.device.type == "cpu":
        return dtype in (torch.float32, torch.bfloat16, torch.float16)
    if x_ND.device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(x_ND.device) >= (8, 0)
    return False


def _group_sizes(offs_E: torch.Tensor) -> torch.Tensor:
    return torch.diff(offs_E, prepend=offs_E.new_zeros(1)).long()


def _add_group_bias_(y_NO: torch.Tensor, b_EO: torch.Tensor, offs_E: torch.Tensor) -> None:
    """y[rows of group e] += b[e], in place, without materialising an (N, O) bias."""
    if y_NO.device.type == "cpu":  # row slices of a CPU tensor: E broadcast adds, no sync cost
        start = 0
        for e, end in enumerate(offs_E.tolist()):
            if end > start:
                y_NO[start:end].add_(b_EO[e])
            start = end
    else:  # accelerators: one gather-add, no host sync
        y_NO.add_(torch.repeat_interleave(b_EO, _group_sizes(offs_E), dim=0, output_size=y_NO.shape[0]))


def group_sums(a_NO: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """(E, O): the sum of each row group of `a_NO` (a bias gradient), through grouped_mm against columns
    of ones: float32 accumulation and one read of `a_NO`. torch.segment_reduce, used before, summed bf16
    in bf16: 10.6% off in norm at 8192 rows per group on an H100, against 0.17% here, and 1.05 ms
    against 0.58 at (65536, 8192) (benchmarks/results/moe_parts_cuda.txt)."""
    ones_NC = a_NO.new_ones(a_NO.shape[0], 16 // a_NO.element_size())  # grouped_mm: 16-byte rows
    return F.grouped_mm(a_NO.transpose(0, 1), ones_NC, offs=offs_E)[..., 0].contiguous()


# One custom op pair carries the grouped matmul in eager mode and under torch.compile:
# - eager: the backward is ours, so the weight gradient is written once into one (E, O, I) buffer,
#   the bias is added in place per group (the naive `y + repeat_interleave(b)` writes and reads an
#   extra (N, O) tensor each way), and the incoming gradient is made contiguous for grouped_mm.
# - compile: grouped_mm's fake (meta) kernel only accepts bf16 although the CPU kernel runs float32,
#   so tracing float32 grouped_mm fails; the op is opaque to dynamo (one graph, no break per expert)
#   with shapes from the fake implementations and the backward wired through `register_autograd`.
# Registering ops in the `moeify` namespace is this module's only import-time effect, and it is
# idempotent per process.
# - CPU: the products with a row per token (y, and grad x) run one expert at a time through
#   oneDNN, as the eager expert loop does (`expert_loop.ONEDNN`): at D 512, F 2048, 8 experts
#   against grouped_mm, y 6.9 vs 9.9 ms (64 rows per expert) and 105 vs 115 ms (1024 rows);
#   grad x 7.1 vs 9.1 and 83 vs 89 ms. The weight gradient stays on grouped_mm (the same speed).
#   The compiled layer's fwd+bwd, paired in one process, with ÷ without: GELU 0.81 (T=256) and
#   0.96 (T=4096), SwiGLU 0.87 and 0.99.
GROUPED_ONEDNN = True
# - CPU, float32, few rows per expert: moeify's CPU kernels, with the eager expert loop's rule
#   (expert_loop.KERNEL_MAX_ROWS, KERNEL_FUSED_MAX_ROWS), their weight gradients on pages reused
#   from step to step (`GradBuffers.of_weight`: the ops have no module to hold a pool), so a compiled
#   layer keeps the eager loop's speed. Compiled fwd+bwd ÷ eager, paired in one process, GELU and
#   SwiGLU (D 512, F 2048, 8 experts, top-2): T=16 0.99 and 1.04, T=256 1.02 and 1.04; with
#   oneDNN and grouped_mm instead, on freshly mapped gradients, 4.16 and 4.09, 1.73 and 1.63.
GROUPED_CPU_KERNELS = True


def _rows_of(offs_E: torch.Tensor) -> list[tuple[int, slice]]:
    """(expert, its rows) for every expert with rows, from the groups' end offsets."""
    rows, start = [], 0
    for e, end in enumerate(offs_E.tolist()):
        if end > start:
            rows.append((e, slice(start, end)))
        start = end
    return rows


def _per_expert_products(a_NI: torch.Tensor, rows: list[tuple[int, slice]], cols: int, product) -> torch.Tensor:
    """(N, cols) with each expert's rows from `product(e, its rows)`; rows past the last group read 0."""
    covered = rows[-1][1].stop if rows else 0
    out = a_NI.new_empty(a_NI.shape[0], cols) if covered == a_NI.shape[0] else a_NI.new_zeros(a_NI.shape[0], cols)
    for e, r in rows:
        out[r] = product(e, r)
    return out


def _per_expert(x_NI: torch.Tensor) -> bool:
    return GROUPED_ONEDNN and _onednn(x_NI)


def _kernel_groups(x_NI: torch.Tensor, params: tuple, offs_E: torch.Tensor) -> _KernelExperts | None:
    """The CPU kernels' block of all groups, when they run them as they do in the eager expert loop
    (float32, few rows per expert: see expert_loop.KERNEL_MAX_ROWS). Under torch.compile these ops are
    what runs the experts, so without this a compiled CPU layer would lose the kernels' speed-up."""
    if not GROUPED_CPU_KERNELS or x_NI.device.type != "cpu":
        return None
    return _KernelExperts.of(x_NI, params, _group_sizes(offs_E).tolist())


def _rows_buffer(like_NI: torch.Tensor, cols: int, covered: int) -> torch.Tensor:
    """(N, cols) for per-group results: rows past the last group (`covered`) read 0."""
    out = like_NI.new_empty(like_NI.shape[0], cols)
    out[covered:] = 0
    return out


@torch.library.custom_op("moeify::grouped_linear", mutates_args=())
def _grouped_linear_op(x_NI: torch.Tensor, w_EOI: torch.Tensor, b_EO: torch.Tensor | None,
                       offs_E: torch.Tensor) -> torch.Tensor:
    block = _kernel_groups(x_NI, (w_EOI, b_EO), offs_E)
    if block is not None:
        y_NO = _rows_buffer(x_NI, w_EOI.shape[1], int(block.off_E1[-1]))
        return block.kernels.dot(block.off_E1, x_NI.contiguous(), w_EOI, b_EO, y_NO)
    if _per_expert(x_NI):
        return _per_expert_products(x_NI, _rows_of(offs_E), w_EOI.shape[1], lambda e, rows: _linear(
            x_NI[rows], w_EOI[e], None if b_EO is None else b_EO[e]))
    y_NO = F.grouped_mm(x_NI, w_EOI.transpose(-2, -1), offs=offs_E)
    if b_EO is not None:
        _add_group_bias_(y_NO, b_EO, offs_E)
    return y_NO


@_grouped_linear_op.register_fake
def _(x_NI, w_EOI, b_EO, offs_E):
    return x_NI.new_empty(x_NI.shape[0], w_EOI.shape[1])


@torch.library.custom_op("moeify::grouped_linear_backward", mutates_args=())
def _grouped_linear_backward_op(grad_NO: torch.Tensor, x_NI: torch.Tensor, w_EOI: torch.Tensor,
                                offs_E: torch.Tensor, need_x: bool, need_w: bool,
                                need_b: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad x, grad w, grad b); a gradient that is not needed comes back as its own empty tensor
    (a custom op's outputs may not alias one another)."""
    grad_NO = grad_NO.contiguous()
    cpu = grad_NO.device.type == "cpu"
    rows = _rows_of(offs_E) if cpu else []
    block = _kernel_groups(grad_NO, (w_EOI,), offs_E)
    if block is not None:
        grad_x_NI, grad_w_EOI = _kernel_grads(block, grad_NO, x_NI.contiguous(), w_EOI, need_x, need_w)
    else:
        if not need_x:
            grad_x_NI = grad_NO.new_empty(0)
        elif _per_expert(grad_NO):
            grad_x_NI = _per_expert_products(grad_NO, rows, x_NI.shape[1],
                                             lambda e, r: _matmul(grad_NO[r], w_EOI[e], e))
        else:
            grad_x_NI = F.grouped_mm(grad_NO, w_EOI, offs=offs_E)
        # grouped along the token dim: experts without tokens get an exactly zero gradient
        grad_w_EOI = F.grouped_mm(grad_NO.transpose(0, 1), x_NI, offs=offs_E) if need_w else grad_NO.new_empty(0)
    if not need_b:
        grad_b_EO = grad_NO.new_empty(0)
    elif cpu:  # segment_reduce's CPU kernel: 62 ms against 3.5 for these sums at (8192, 2048)
        grad_b_EO = grad_NO.new_zeros(w_EOI.shape[0], w_EOI.shape[1])
        for e, r in rows:
            torch.sum(grad_NO[r], 0, out=grad_b_EO[e])
    else:
        grad_b_EO = group_sums(grad_NO, offs_E)
    return grad_x_NI, grad_w_EOI, grad_b_EO


def _kernel_grads(block: _KernelExperts, grad_NO: torch.Tensor, x_NI: torch.Tensor, w_EOI: torch.Tensor,
                  need_x: bool, need_w: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad x, grad w) through the CPU kernels, by the eager loop's own helpers (one pass over the
    weights for both when few rows allow); idle experts' weight gradients are zeros."""
    pool = GradBuffers.of_weight(w_EOI) if need_w else None  # see grad_buffers: fresh pages cost more
    grad_w_EOI = (torch.empty_like(w_EOI) if pool is None else pool.empty_like(w_EOI)) if need_w else None
    if need_x:  # rows past the last group (none in the layer's own calls) get a zero gradient
        tail = int(block.off_E1[-1]) < x_NI.shape[0]
        grad_x_NI = _backprop(grad_NO, x_NI, w_EOI, grad_w_EOI, False, block,
                              into=torch.zeros_like(x_NI) if tail else None)
    else:
        grad_x_NI = grad_NO.new_empty(0)
        if need_w:
            _matmul_into(grad_w_EOI, grad_NO.mT, x_NI, False, block)
    return grad_x_NI, grad_NO.new_empty(0) if grad_w_EOI is None else grad_w_EOI


@_grouped_linear_backward_op.register_fake
def _(grad_NO, x_NI, w_EOI, offs_E, need_x, need_w, need_b):
    return (torch.empty_like(x_NI) if need_x else grad_NO.new_empty(0),
            torch.empty_like(w_EOI) if need_w else grad_NO.new_empty(0),
            grad_NO.new_empty(w_EOI.shape[0], w_EOI.shape[1]) if need_b else grad_NO.new_empty(0))


def _grouped_linear_setup(ctx, inputs, output):
    x_NI, w_EOI, b_EO, offs_E = inputs
    ctx.has_bias = b_EO is not None
    ctx.save_for_backward(x_NI, w_EOI, offs_E)


def _tracked_grouped_linear_grads(grad_NO: torch.Tensor, x_NI: torch.Tensor, w_EOI: torch.Tensor,
                                  offs_E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """grouped_linear's (grad x, grad w, grad b) as tracked torch ops, one expert at a time: the backward
    of a backward that builds a graph (`create_graph=True`: a gradient penalty), which the custom
    backward op cannot be differentiated through. Experts without rows get zeros."""
    rows = dict(_rows_of(offs_E))
    covered = max((r.stop for r in rows.values()), default=0)
    tail_NI = grad_NO.new_zeros(x_NI.shape[0] - covered, x_NI.shape[1])  # rows past the last group
    grad_x_NI = torch.cat([grad_NO[r] @ w_EOI[e] for e, r in rows.items()] + [tail_NI])
    grad_w_EOI = torch.stack([grad_NO[rows[e]].T @ x_NI[rows[e]] if e in rows else torch.zeros_like(w_EOI[e])
                              for e in range(w_EOI.shape[0])])
    grad_b_EO = torch.stack([grad_NO[rows[e]].sum(0) if e in rows else grad_NO.new_zeros(w_EOI.shape[1])
                             for e in range(w_EOI.shape[0])])
    return grad_x_NI, grad_w_EOI, grad_b_EO


def _grouped_linear_grad(ctx, grad_NO):
    x_NI, w_EOI, offs_E = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    if torch.is_grad_enabled():  # only under create_graph=True: autograd runs a plain backward without grad
        grad_x, grad_w, grad_b = _tracked_grouped_linear_grads(grad_NO, x_NI, w_EOI, offs_E)
    else:
        grad_x, grad_w, grad_b = _grouped_linear_backward_op(grad_NO, x_NI, w_EOI, offs_E, need_x, need_w,
                                                             bool(need_b and ctx.has_bias))
    return (grad_x if need_x else None, grad_w if need_w else None,
            grad_b if (need_b and ctx.has_bias) else None, None)


_grouped_linear_op.register_autograd(_grouped_linear_grad, setup_context=_grouped_linear_setup)


def grouped_linear(x_NI: torch.Tensor, w_EOI: torch.Tensor, b_EO: torch.Tensor | None, counts_E: torch.Tensor,
                   offs_E: torch.Tensor | None, backend: str) -> torch.Tensor:
    """Row group e of `x_NI` times `w_EOI[e].T`, plus `b_EO[e]`. Returns (N, O)."""
    dtype = _compute_dtype(x_NI)
    x_NI, w_EOI = x_NI.to(dtype), w_EOI.to(dtype)
    b_EO = None if b_EO is None else b_EO.to(dtype)
    if backend == "grouped_mm" and grouped_mm_usable(x_NI, w_EOI, dtype):
        if offs_E is None:
            offs_E = torch.cumsum(counts_E, 0).to(torch.int32)
        return _grouped_linear_op(x_NI, w_EOI, b_EO, offs_E)
    # loop backend: one matmul per expert over its slice; used where grouped_mm is unavailable
    chunks = torch.split(x_NI, counts_E.tolist())
    return torch.cat([F.linear(chunk, w_EOI[e], None if b_EO is None else b_EO[e])
                      for e, chunk in enumerate(chunks)], dim=0)


# auto: expert_loop in eager mode on CPU, grouped_mm on accelerators and under torch.compile
BACKENDS = ("auto", "grouped_mm", "expert_loop")


class GroupedExperts(nn.Module):
    """E FFN experts over expert-sorted tokens."""

    def __init__(self, num_experts: int, d_model: int, d_ff: int, activation: str, *, gated: bool = False,
                 bias: bool = True, dropout: float = 0.0, backend: str = "auto", d_out: int | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 init_weights: bool = True) -> None:
        """`init_weights=False` leaves the weights uninitialised, for a caller that writes every element
        (upcycling copies the dense FFN over them: a random init of 8 experts' weights is most of
        the time of an in-memory conversion)."""
        super().__init__()
        activation_fn(activation)  # validate early
        self.num_experts, self.d_model, self.d_ff = num_experts, d_model, d_ff
        self.d_out = d_model if d_out is None else d_out
        self.activation, self.gated, self.has_bias = activation, gated, bias
        self.dropout = dropout
        if backend not in BACKENDS:
            raise ConfigError(f"unknown experts backend {backend!r}: use one of {', '.join(BACKENDS)}")
        self.backend = backend
        # the expert_loop backward's weight gradients (CPU); emptied when the module leaves training
        self.grad_buffers = GradBuffers()
        kw = {"dtype": dtype, "device": device}
        self.w1_EFD = nn.Parameter(torch.empty(num_experts, d_ff, d_model, **kw))
        self.w2_EDF = nn.Parameter(torch.empty(num_experts, self.d_out, d_ff, **kw))
        self.w3_EFD = nn.Parameter(torch.empty(num_experts, d_ff, d_model, **kw)) if gated else None
        self.b1_EF = nn.Parameter(torch.zeros(num_experts, d_ff, **kw)) if bias else None
        self.b2_ED = nn.Parameter(torch.zeros(num_experts, self.d_out, **kw)) if bias else None
        self.b3_EF = nn.Parameter(torch.zeros(num_experts, d_ff, **kw)) if (bias and gated) else None
        for w in (self.w1_EFD, self.w2_EDF, self.w3_EFD):
            if w is not None and init_weights:
                nn.init.normal_(w, std=d_model ** -0.5)

    def extra_repr(self) -> str:
        kind = "gated " if self.gated else ""
        out = f", d_out={self.d_out}" if self.d_out != self.d_model else ""
        return (f"num_experts={self.num_experts}, d_model={self.d_model}, d_ff={self.d_ff}{out}, "
                f"{kind}activation={self.activation}, bias={self.has_bias}, dropout={self.dropout}, "
                f"backend={self.backend}")

    def train(self, mode: bool = True) -> GroupedExperts:  # noqa: D102
        if not mode:
            self.grad_buffers.clear()
            for w in self.parameters(recurse=False):
                GradBuffers.release_weight(w)
        return super().train(mode)

    def backend_for(self, x_ND: torch.Tensor) -> str:
        """The backend this call runs: "auto" picks expert_loop for eager CPU, grouped_mm elsewhere."""
        if self.backend != "auto":
            return self.backend
        if not torch.compiler.is_compiling() and any(torch._C._functorch.is_functorch_wrapped_tensor(t)
                                                     for t in (x_ND, self.w1_EFD)):
            return "loop"  # under torch.func.grad / jacrev: plain torch ops (the other two are autograd.Functions)
        if x_ND.device.type == "cpu" and not torch.compiler.is_compiling():
            return "expert_loop"
        if grouped_mm_usable(x_ND, self.w1_EFD, _compute_dtype(x_ND)):
            return "grouped_mm"
        return "expert_loop"

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        backend = self.backend_for(x_ND)
        if backend == "expert_loop":
            dtype = _compute_dtype(x_ND)
            params = [None if p is None else p.to(dtype) for p in (self.w1_EFD, self.b1_EF, self.w2_EDF,
                                                                  self.b2_ED, self.w3_EFD, self.b3_EF)]
            dropout = self.dropout if self.training else 0.0
            return expert_ffn(x_ND.to(dtype), counts_E.tolist(), self.activation, dropout, self.grad_buffers, *params)
        offs_E = torch.cumsum(counts_E, 0).to(torch.int32)
        act = activation_fn(self.activation)
        h_NF = act(grouped_linear(x_ND, self.w1_EFD, self.b1_EF, counts_E, offs_E, backend))
        if self.w3_EFD is not None:
            h_NF = h_NF * grouped_linear(x_ND, self.w3_EFD, self.b3_EF, counts_E, offs_E, backend)
        if self.dropout > 0 and self.training:
            h_NF = F.dropout(h_NF, self.dropout, training=True)
        return grouped_linear(h_NF, self.w2_EDF, self.b2_ED, counts_E, offs_E, backend)

    def forward_dense(self, x_TD: torch.Tensor, expert: int) -> torch.Tensor:
        """Expert `expert` applied to every row of x (reference path for tests and shared experts)."""
        drop = (lambda h: F.dropout(h, self.dropout, training=True)) if self.dropout > 0 and self.training else None
        params = (self.w1_EFD, self.b1_EF, self.w2_EDF, self.b2_ED, self.w3_EFD, self.b3_EF)
        return expert_ffn_dense(x_TD, self.activation, *(None if p is None else p[expert] for p in params), drop=drop)
