"""The whole expert FFN, one expert at a time, with a hand-written backward (the CPU path).

Shape legend: N token-expert assignments (sorted by expert), n rows of one expert, D model dim,
F FFN hidden dim, O output dim, E experts.

Why a second path next to `grouped_mm`: on a CPU, E BLAS calls per layer that nn.Linear would make
are as fast as the grouped kernel, the products with a row per token can go through oneDNN, faster
than both (see ONEDNN), and owning the backward lets every product go straight to its final place:
the bias is fused into the product, each expert's output lands in the (N, .) output, each weight
gradient in one stacked (E, ., .) buffer on memory reused from step to step (`grad_buffers`) with
no per-expert outputs to concatenate, no index_add, no separate bias pass over an (N, F)
tensor, and an expert's fc1 -> act -> fc2 runs back to back. Rows of one expert go in blocks of at
most ROW_BLOCK, which bounds the backward's temporaries; smaller blocks measured slower (more,
smaller matmuls, and the weight gradient accumulated over blocks). When every expert has only a
few rows, the experts run as one padded batched matmul instead (see PAD_MAX_ROWS). With up to a few
hundred rows per expert in float32, all experts' products run in one call of moeify's own CPU kernels
(cpu_kernels.c; see KERNEL_MAX_ROWS), where MKL runs skinny products at a fraction of the memory
bandwidth; the block loop then has one block, and the helpers below hand it to the kernels. On
accelerators `grouped_mm` stays the better choice (one kernel, no host sync).

Without a gradient to compute (inference), `expert_ffn` runs the same blocks with no autograd node and
nothing kept for a backward. Saved for backward, per row: the pre-activation, the up projection
(gated), the fc2 input, and the dropout mask when expert dropout is active: what nn.Linear +
activation would save, minus act(a1) of gated experts, which is recomputed from the cached block in
backward.

A gradient of the gradient (create_graph=True: a gradient penalty, MAML) cannot go through the
hand-written kernels, which write in place under no_grad. Autograd runs a backward with grad mode on
exactly when its caller asked for create_graph, so that flag alone sends the backward to
`_differentiable_backward`: each expert recomputed from the saved inputs by `expert_ffn_dense`
(autograd-tracked torch ops, the forward's dropout mask) and differentiated by autograd with
create_graph. An ordinary backward pays only that flag check.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from moeify.moe import cpu_kernels


def _act_forward(name: str, a: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    if name == "gelu":
        return torch.ops.aten.gelu.out(a, approximate="none", out=out)
    if name == "gelu_tanh":
        return torch.ops.aten.gelu.out(a, approximate="tanh", out=out)
    if name == "silu":
        return torch.ops.aten.silu.out(a, out=out)
    if name == "quick_gelu":  # a * sigmoid(1.702 a)
        return torch.sigmoid(a * QUICK_GELU_SCALE, out=out).mul_(a)
    if name == "relu2":
        return torch.clamp_min(a, 0, out=out).square_()
    return torch.clamp_min(a, 0, out=out)  # relu


def _act_backward(name: str, grad: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    if name == "gelu":
        return torch.ops.aten.gelu_backward(grad, a, approximate="none")
    if name == "gelu_tanh":
        return torch.ops.aten.gelu_backward(grad, a, approximate="tanh")
    if name == "silu":
        return torch.ops.aten.silu_backward(grad, a)
    if name == "quick_gelu":  # d/da a s(ka) = s(ka) (1 + k a (1 - s(ka)))
        s = torch.sigmoid(a * QUICK_GELU_SCALE)
        return grad * s * (1.0 + QUICK_GELU_SCALE * a * (1.0 - s))
    if name == "relu2":  # d/da relu(a)^2 = 2 relu(a)
        return grad * a.clamp_min(0).mul_(2.0)
    return torch.ops.aten.threshold_backward(grad, a, 0)  # relu


QUICK_GELU_SCALE = 1.702  # CLIP's QuickGELU: a * sigmoid(1.702 a)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x): the GELU approximation of OpenAI's CLIP (HF `QuickGELUActivation`)."""
    return x * torch.sigmoid(QUICK_GELU_SCALE * x)


def relu2(x: torch.Tensor) -> torch.Tensor:
    """relu(x)^2: Primer's squared ReLU (HF `ReLUSquaredActivation`: Nemotron, Persimmon)."""
    return F.relu(x).square()


# The activations as plain differentiable functions, by the names `_act_forward` takes (the experts'
# other paths, and the loop's gradient of the gradient).
ACTIVATIONS = {"relu": F.relu, "gelu": _gelu, "gelu_tanh": _gelu_tanh, "silu": F.silu, "quick_gelu": quick_gelu,
               "relu2": relu2}


def expert_ffn_dense(x_TD: torch.Tensor, activation: str, w1_FD: torch.Tensor, b1_F: torch.Tensor | None,
                     w2_OF: torch.Tensor, b2_O: torch.Tensor | None, w3_FD: torch.Tensor | None = None,
                     b3_F: torch.Tensor | None = None, drop=None) -> torch.Tensor:
    """One expert's FFN on every row of x with plain, differentiable torch ops:
    w2(drop(act(w1 x + b1) [* (w3 x + b3)])) + b2, `drop` (a function of the hidden layer) when given."""
    h_TF = ACTIVATIONS[activation](F.linear(x_TD, w1_FD, b1_F))
    if w3_FD is not None:
        h_TF = h_TF * F.linear(x_TD, w3_FD, b3_F)
    if drop is not None:
        h_TF = drop(h_TF)
    return F.linear(h_TF, w2_OF, b2_O)


def _onednn(x: torch.Tensor) -> bool:
    return ONEDNN and x.device.type == "cpu" and x.dtype in ONEDNN_DTYPES and torch.backends.mkldnn.is_available()


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T + b for one expert's rows (2-D), through oneDNN on the CPU (see ONEDNN)."""
    if _onednn(x):
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    return torch.nn.functional.linear(x, w, b)


def _matmul(a: torch.Tensor, w: torch.Tensor, experts) -> torch.Tensor:
    """a @ w: one expert (2-D, through `_linear`), a padded batch of experts (3-D), or every expert's
    rows at once through the CPU kernels."""
    if isinstance(experts, _KernelExperts):
        return experts.kernels.axpy(experts.off_E1, a, w, a.new_empty(a.shape[0], w.shape[-1]))
    return _linear(a, w.T) if a.dim() == 2 else torch.matmul(a, w)


def _linear_out(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, experts,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T + b for one expert (2-D), a batch of experts at once (3-D, padded rows), or every
    expert's rows through the CPU kernels, written to `out` when given."""
    if isinstance(experts, _KernelExperts):
        out = x.new_empty(x.shape[0], w.shape[1]) if out is None else out
        return experts.kernels.dot(experts.off_E1, x, w, b, out)
    if x.dim() == 2:
        y = _linear(x, w, b)
        return y if out is None else out.copy_(y)
    if out is None:
        out = x.new_empty(*x.shape[:2], w.shape[1])
    if x.shape[1] <= TRANSPOSED_MAX_ROWS:  # (w @ x.T).T: see TRANSPOSED_MAX_ROWS
        wx = torch.bmm(w, x.mT) if b is None else torch.baddbmm(b.unsqueeze(-1), w, x.mT)
        return out.copy_(wx.mT)
    return torch.bmm(x, w.mT, out=out) if b is None else torch.baddbmm(b.unsqueeze(1), x, w.mT, out=out)


def _add_matmul_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return out.addmm_(a, b) if out.dim() == 2 else out.baddbmm_(a, b)


# Pad instead of loop when every expert has at most this many rows: with so few rows each matmul
# only streams its expert's weights, and one batched call over several experts (each core on its
# own experts) reads them about twice as fast as one call per expert that splits a small matmul over
# the cores (one row, two experts: 0.46 ms batched against 0.85 ms in two calls).
PAD_MAX_ROWS = 32
# With at most this many rows per expert (one token, as in decoding), the padded batch computes
# w @ x.T and copies the small transposed result: MKL streams the weights about twice as fast as
# for x @ w.T (one row, 8 experts' (2048, 512) fc1: 0.9 ms against 2.0 ms). Forward of the layer at
# T=1, no grad, paired in one process: GELU 1.74 -> 1.51 ms, SwiGLU 2.23 -> 1.92 ms. At 4 and more
# rows the two forms are within noise, and at T=16 the transposed one was 7% slower.
TRANSPOSED_MAX_ROWS = 2
# A weight gradient summed over at most this many rows is written as that many outer products
# (elementwise passes over the gradient) instead of a matmul: MKL's gemm with an inner dimension of
# one or two writes its (O, I) result at a fraction of the memory bandwidth. Eight experts' (512,
# 2048) weight gradients, median of paired rounds: 1 row 1.11 -> 0.51 ms, 2 rows 3.3 -> 1.0 ms; at
# 4 rows 2.9 -> 1.8 ms, but with routed (uneven) tokens the padded batch's capacity is the largest
# expert's, and at T=16 (capacity 5-8) the outer products measured 0.99-1.19x the matmul. Layer
# fwd+bwd (D 512, F 2048, 8 experts, top-2), paired in one process, this form / the matmul form:
# T=1 0.96-0.99 (GELU), 0.95-0.98 (SwiGLU); T=2 0.93 (GELU); T=4 0.85 (SwiGLU); T=16 1.00.
OUTER_MAX_ROWS = 2
# One expert's products whose result has a row per token (fc1, fc2, and the input gradients) go
# through oneDNN's linear on the CPU: at these shapes it is faster than MKL's gemm behind torch.mm,
# eight experts of (2048, 512), fc1 at 64 / 512 / 1024 rows each: 8.7 -> 6.8, 62 -> 52, 116 -> 108 ms
# (the input gradient: 8.6 -> 7.2, 48 -> 45, 99 -> 90 ms). The weight gradients stay on torch.mm,
# which writes straight into the stacked gradient (oneDNN has no output argument, and the copy
# costs more than it gains), and the padded batch stays on bmm (within 10% of oneDNN per expert).
ONEDNN = True
ONEDNN_DTYPES = (torch.float32, torch.bfloat16)
# Rows per block of one expert in the loop (see the module docstring). Measured at T=4096 (about
# 1024 rows per expert), fwd+bwd / the dense ideal: 1.18 with 256-row blocks, 1.09 with 512, 1.05
# with 1024, 0.96 unblocked (GELU; SwiGLU 1.22 / 1.12 / 1.06 / 1.04).
ROW_BLOCK = 4096
# With at most KERNEL_MAX_ROWS rows in the largest expert, all experts run in one call of
# each CPU kernel (cpu_kernels.c, when it can be built) instead of the padded batch or the loop over
# experts. Layer fwd+bwd (D 512, F 2048, 8 experts, top-2, float32, 2 threads), kernels / torch's
# matmuls, paired in one process, GELU and SwiGLU, with separate backward kernels: T=4 0.52, 0.67;
# T=16 0.61, 0.59; T=64 0.61, 0.63; T=256 0.80, 0.87; T=1024 0.96, 0.98; T=4096 (about 1024 rows per
# expert) 1.39, 1.30; T=1 (one row per expert) 1.05, 1.05, so the padded batch kept T=1 until the
# fused backward below, with which the kernels took T=1 to 0.63, 0.62 and T=2 to 0.75, 0.77 of it.
KERNEL_MAX_ROWS = 512
# With at most this many rows in the largest expert, a layer's input and weight gradients come from
# one kernel pass over its weights (moe_grad) instead of two (moe_axpy, then moe_outer). Per weight,
# eight experts with m rows each (one idle, one with 2m), fused / separate, (2048, 512) and
# (512, 2048) weights: m=1 0.59, 0.58; m=4 0.60, 0.65; m=8 0.61, 0.82; m=16 0.78, 0.98; m=32 0.97,
# 1.28. Layer fwd+bwd, this threshold / no fused pass (/ a threshold of 96), GELU and SwiGLU: T=16
# 0.78 (1.05), 0.74 (1.01); T=64 0.93 (0.99), 0.89 (1.02); T=256 0.98 (0.83), 0.99 (0.88).
KERNEL_FUSED_MAX_ROWS = 32
# The AVX2 build (CPUs without AVX-512) runs the experts only with AVX2_KERNEL_ROWS rows in the
# largest expert (and at most KERNEL_MAX_ROWS): measured as an AVX2 build on the AVX-512 development
# machine, layer fwd+bwd ÷ torch's matmuls, GELU and SwiGLU: T=1 (one row per expert) 1.10, 0.99;
# T=2 0.94, 0.93; T=4 0.71, 0.77; T=16 0.89, 0.75; T=64 (16-31 rows) 0.94, 0.84; T=128 (32-47 rows)
# 1.06, 0.96; T=256 1.11, 1.11; T=1024 1.44, 1.42. (The AVX-512 build: 0.70, 0.62 at T=1 and
# 0.88, 0.92 at T=1024.) Not measured on a CPU that has only AVX2.
AVX2_KERNEL_ROWS = (2, 32)


def _kernels_for(x: torch.Tensor, params: tuple) -> cpu_kernels.Kernels | None:
    """The CPU kernels when they can run these experts: float32 CPU tensors, unit last strides."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return None
    if any(t is not None and (t.dtype != torch.float32 or t.stride(-1) != 1) for t in params):
        return None
    return cpu_kernels.kernels()


def _batched_experts(active: list[int], num_experts: int) -> slice | None:
    """The experts one padded batch covers, as a slice of the stacked weights, or None to loop.

    The batch reads the weights through a strided view, so it must be evenly spaced: the active
    experts themselves when they are (always so for two, as in one token's top-2), else all experts
    when at least half are active (an expert without rows costs the batch two reads of its weights).
    """
    if len(active) < 2:
        return None
    step = active[1] - active[0]
    if active == list(range(active[0], active[-1] + 1, step)):
        return slice(active[0], active[-1] + 1, step)
    return slice(0, num_experts, 1) if 2 * len(active) >= num_experts else None


class _KernelExperts:
    """The block of every expert's rows at once, run by the CPU kernels: where each expert's rows
    start (E + 1 offsets) and each row's expert (for the bias gradients)."""

    def __init__(self, kernels: cpu_kernels.Kernels, sizes: list[int]) -> None:
        self.kernels = kernels
        self.fused = max(sizes) <= KERNEL_FUSED_MAX_ROWS
        self.sizes_E = torch.tensor(sizes, dtype=torch.int64)
        self.off_E1 = torch.cat([self.sizes_E.new_zeros(1), self.sizes_E.cumsum(0)])

    @classmethod
    def of(cls, x: torch.Tensor, params: tuple, sizes: list[int]) -> _KernelExperts | None:
        """The block, when the kernels can run these experts (see KERNEL_MAX_ROWS, AVX2_KERNEL_ROWS
        and `_kernels_for`)."""
        largest = max(sizes, default=0)
        if not 0 < largest <= KERNEL_MAX_ROWS:
            return None
        kernels = _kernels_for(x, params)
        if kernels is None or (kernels.vector_width == 8 and not AVX2_KERNEL_ROWS[0] <= largest <= AVX2_KERNEL_ROWS[1]):
            return None
        return cls(kernels, sizes)

    @functools.cached_property
    def expert_N(self) -> torch.Tensor:
        """Each row's expert: only the bias gradients need it."""
        return torch.repeat_interleave(torch.arange(len(self.sizes_E)), self.sizes_E)


class _Layout:
    """Where each expert's rows live: blocks of the (N, .) row buffers, or one padded (B, C, .) batch.

    A block is (experts, rows, first block of its experts): one expert index and a row range of the
    (N, .) buffers, or a slice of B evenly spaced experts and all rows of the padded batch.
    """

    def __init__(self, sizes: list[int], num_experts: int, device: torch.device,
                 kernels: _KernelExperts | None = None) -> None:
        self.sizes = sizes
        capacity = max(sizes, default=0)
        self.batch = None
        if kernels is not None:  # every expert in one kernel call
            self.blocks = [(kernels, slice(None), True)]
            return
        batch = (_batched_experts([e for e, n in enumerate(sizes) if n], num_experts)
                 if 0 < capacity <= PAD_MAX_ROWS else None)
        self.batch = None if batch is None else range(num_experts)[batch]  # the padded batch's experts
        self.blocks: list[tuple[int | slice | _KernelExperts, slice, bool]] = []
        if batch is not None:  # each row's (expert in the batch, row in it): at most 32 per expert, on the host
            expert_N, row_N = [], []
            for e, n in enumerate(sizes):
                expert_N += [(e - batch.start) // batch.step] * n
                row_N += range(n)
            self.index = (torch.tensor(expert_N, device=device), torch.tensor(row_N, device=device))
            self.capacity = capacity
            self.blocks.append((batch, slice(None), True))
            return
        start = 0
        for e, n in enumerate(sizes):
            for begin in range(start, start + n, ROW_BLOCK):
                self.blocks.append((e, slice(begin, min(begin + ROW_BLOCK, start + n)), begin == start))
            start += n

    @property
    def padded(self) -> bool:
        return self.batch is not None

    def rows(self, N: int, *trailing: int) -> tuple[int, ...]:
        return (len(self.batch), self.capacity, *trailing) if self.padded else (N, *trailing)

    def pad(self, t_NX: torch.Tensor) -> torch.Tensor:
        if not self.padded:
            return t_NX.contiguous()
        out = t_NX.new_zeros(len(self.batch), self.capacity, t_NX.shape[-1])
        out[self.index] = t_NX
        return out

    def unpad(self, t: torch.Tensor) -> torch.Tensor:
        return t[self.index] if self.padded else t

    def empty_experts(self) -> list[int]:
        """Experts whose weight gradients no block writes: they must be zeroed."""
        if self.blocks and isinstance(self.blocks[0][0], _KernelExperts):
            return []  # the weight-gradient kernel writes their zeros
        if self.padded:  # the batch writes zeros for its own experts without rows
            return [e for e in range(len(self.sizes)) if e not in self.batch]
        return [e for e, n in enumerate(self.sizes) if n == 0]


def _pick(t: torch.Tensor | None, experts: int | slice) -> torch.Tensor | None:
    """One expert's slice of a stacked tensor, a strided view of a padded batch's experts, or all of
    it for the kernels."""
    if t is None or isinstance(experts, _KernelExperts):
        return t
    return t[experts]


def _matmul_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool, experts) -> None:
    """out (+)= a @ b for a weight gradient: a (.., O, n) the output gradient transposed, b (.., n, I)."""
    if isinstance(experts, _KernelExperts):
        experts.kernels.outer(experts.off_E1, a.mT, b, out, accumulate)
        return
    rows = a.shape[-1]
    if not 0 < rows <= OUTER_MAX_ROWS:
        if accumulate:
            _add_matmul_(out, a, b)
        else:
            torch.matmul(a, b, out=out)
        return
    for r in range(rows):  # one outer product per row (see OUTER_MAX_ROWS)
        col_O1, row_1I = a[..., r:r + 1], b[..., r:r + 1, :]
        if r or accumulate:
            out.addcmul_(col_O1, row_1I)
        else:
            torch.mul(col_O1, row_1I, out=out)


def _backprop(g: torch.Tensor, x: torch.Tensor, w: torch.Tensor, grad_w: torch.Tensor | None, accumulate: bool,
              experts, into: torch.Tensor | None = None) -> torch.Tensor:
    """A linear layer's input gradient g @ w (added to `into` when given, and returned) and, when
    `grad_w` is given, its weight gradient g.T @ x written to it (added when `accumulate`). With few rows
    per expert the CPU kernels do both in one pass over the weights (see KERNEL_FUSED_MAX_ROWS)."""
    if grad_w is not None and isinstance(experts, _KernelExperts) and experts.fused:
        out = g.new_empty(g.shape[0], w.shape[-1]) if into is None else into
        return experts.kernels.grad(experts.off_E1, g, x, w, out, grad_w, into is not None, accumulate)
    if grad_w is not None:
        _matmul_into(grad_w, g.mT, x, accumulate, experts)
    dx = _matmul(g, w, experts)
    return dx if into is None else into.add_(dx)


def _sum_into(out: torch.Tensor, a: torch.Tensor, accumulate: bool, experts) -> None:
    if isinstance(experts, _KernelExperts):  # out (E, O): each expert's rows summed
        (out if accumulate else out.zero_()).index_add_(0, experts.expert_N, a)
        return
    if accumulate:
        out.add_(a.sum(-2))
    else:
        torch.sum(a, -2, out=out)


def _run_blocks(x: torch.Tensor, layout: _Layout, activation: str, dropout: float, params: tuple,
                saved: list | None) -> torch.Tensor:
    """The experts over the layout's blocks of `x` (padded or not); returns the unpadded (N, O) output.
    Each block's (a1, a3, h, keep) is appended to `saved` when given (what the backward reads)."""
    w1_EFD, b1_EF, w2_EOF, b2_EO, w3_EFD, b3_EF = params
    N = sum(layout.sizes)
    y = x.new_empty(layout.rows(N, w2_EOF.shape[1]))
    for e, rows, _ in layout.blocks:
        x_b = x[rows]
        a1_b = _linear_out(x_b, _pick(w1_EFD, e), _pick(b1_EF, e), e)
        h_b = _act_forward(activation, a1_b, torch.empty_like(a1_b))
        a3_b = keep_b = None
        if w3_EFD is not None:
            a3_b = _linear_out(x_b, _pick(w3_EFD, e), _pick(b3_EF, e), e)
            h_b.mul_(a3_b)
        if dropout > 0:
            keep_b = torch.bernoulli(torch.full_like(h_b, 1.0 - dropout)).bool()
            h_b.mul_(keep_b).div_(1.0 - dropout)
        _linear_out(h_b, _pick(w2_EOF, e), _pick(b2_EO, e), e, y[rows])
        if saved is not None:
            saved.append((a1_b, a3_b, h_b, keep_b))
    return layout.unpad(y)


def expert_ffn(x_ND: torch.Tensor, sizes: list[int], activation: str, dropout: float, buffers, *params) -> torch.Tensor:
    """The experts of `ExpertFFNLoop` on expert-sorted rows: through the autograd function when a
    gradient will be asked for, else straight (no state kept for a backward, no autograd node)."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x_ND, *params)):
        return ExpertFFNLoop.apply(x_ND, sizes, activation, dropout, buffers, *params)
    layout = _Layout(list(sizes), params[0].shape[0], x_ND.device, _KernelExperts.of(x_ND, params, list(sizes)))
    return _run_blocks(layout.pad(x_ND), layout, activation, dropout, params, None)


class ExpertFFNLoop(torch.autograd.Function):
    """y = w2(drop(act(w1 x + b1) [* (w3 x + b3)])) + b2 per expert group of rows."""

    @staticmethod
    def forward(ctx, x_ND, sizes, activation, dropout, buffers, w1_EFD, b1_EF, w2_EOF, b2_EO, w3_EFD, b3_EF):  # noqa: D102
        params = (w1_EFD, b1_EF, w2_EOF, b2_EO, w3_EFD, b3_EF)
        layout = _Layout(list(sizes), w1_EFD.shape[0], x_ND.device, _KernelExperts.of(x_ND, params, list(sizes)))
        x = layout.pad(x_ND)
        saved = []  # per block: (a1, a3, h, keep)
        y = _run_blocks(x, layout, activation, dropout, params, saved)
        ctx.layout, ctx.activation, ctx.dropout, ctx.saved_blocks = layout, activation, dropout, saved
        ctx.buffers = buffers
        ctx.has_bias = (b1_EF is not None, b2_EO is not None, b3_EF is not None)
        # x: the rows as the blocks read them (padded or not; x_ND itself when already contiguous);
        # x_ND and the biases: what `_differentiable_backward` recomputes the experts from
        ctx.save_for_backward(x, w1_EFD, w2_EOF, w3_EFD, x_ND, b1_EF, b2_EO, b3_EF)
        return y

    @staticmethod
    def backward(ctx, grad_NO):  # noqa: D102
        if torch.is_grad_enabled():  # create_graph=True (see the module docstring)
            return _differentiable_backward(ctx, grad_NO)
        x, w1_EFD, w2_EOF, w3_EFD = ctx.saved_tensors[:4]
        layout = ctx.layout
        dy = layout.pad(grad_NO)
        need = ctx.needs_input_grad
        has_b1, has_b2, has_b3 = ctx.has_bias
        gated = w3_EFD is not None
        grad_x = torch.empty_like(x) if need[0] else None
        # every expert with rows has its slices written below; the others' must read zero
        # (the module's GradBuffers: memory reused from step to step)
        empty = layout.empty_experts()
        grad_w1 = ctx.buffers.empty_like(w1_EFD, zero_rows=empty) if need[5] else None
        grad_b1 = w1_EFD.new_zeros(w1_EFD.shape[:2]) if (has_b1 and need[6]) else None
        grad_w2 = ctx.buffers.empty_like(w2_EOF, zero_rows=empty) if need[7] else None
        grad_b2 = w2_EOF.new_zeros(w2_EOF.shape[:2]) if (has_b2 and need[8]) else None
        grad_w3 = ctx.buffers.empty_like(w3_EFD, zero_rows=empty) if (gated and need[9]) else None
        grad_b3 = w3_EFD.new_zeros(w3_EFD.shape[:2]) if (gated and has_b3 and need[10]) else None
        for (e, rows, first), (a1_b, a3_b, h_b, keep_b) in zip(layout.blocks, ctx.saved_blocks, strict=True):
            dy_b, x_b, acc = dy[rows], x[rows], not first
            if grad_b2 is not None:
                _sum_into(_pick(grad_b2, e), dy_b, acc, e)
            dh_b = _backprop(dy_b, h_b, _pick(w2_EOF, e), _pick(grad_w2, e), acc, e)
            if keep_b is not None:
                dh_b.mul_(keep_b).div_(1.0 - ctx.dropout)
            if gated:
                da3_b = dh_b * _act_forward(ctx.activation, a1_b, torch.empty_like(a1_b))
                da1_b = _act_backward(ctx.activation, dh_b.mul_(a3_b), a1_b)
            else:
                da1_b = _act_backward(ctx.activation, dh_b, a1_b)
            if grad_b1 is not None:
                _sum_into(_pick(grad_b1, e), da1_b, acc, e)
            if gated and grad_b3 is not None:
                _sum_into(_pick(grad_b3, e), da3_b, acc, e)
            if grad_x is None:  # the weight gradients alone
                if grad_w1 is not None:
                    _matmul_into(_pick(grad_w1, e), da1_b.mT, x_b, acc, e)
                if gated and grad_w3 is not None:
                    _matmul_into(_pick(grad_w3, e), da3_b.mT, x_b, acc, e)
                continue
            dx_b = _backprop(da1_b, x_b, _pick(w1_EFD, e), _pick(grad_w1, e), acc, e)
            if gated:
                _backprop(da3_b, x_b, _pick(w3_EFD, e), _pick(grad_w3, e), acc, e, into=dx_b)
            grad_x[rows] = dx_b
        return (None if grad_x is None else layout.unpad(grad_x), None, None, None, None,
                grad_w1, grad_b1, grad_w2, grad_b2, grad_w3, grad_b3)


def _differentiable_backward(ctx, grad_NO: torch.Tensor) -> tuple:
    """`ExpertFFNLoop.backward` as a graph autograd can differentiate again: each expert with rows
    recomputed by `expert_ffn_dense` from the saved inputs, under the forward's dropout mask, then
    torch.autograd.grad with create_graph. Experts without rows get exact zeros, as in the fast path."""
    _, w1_EFD, w2_EOF, w3_EFD, x_ND, b1_EF, b2_EO, b3_EF = ctx.saved_tensors
    inputs = (x_ND, w1_EFD, b1_EF, w2_EOF, b2_EO, w3_EFD, b3_EF)
    needs = (ctx.needs_input_grad[0], *ctx.needs_input_grad[5:])
    wanted = [i for i, t in enumerate(inputs) if t is not None and needs[i]]
    layout, p = ctx.layout, ctx.dropout
    keep_NF = None
    if p > 0 and ctx.saved_blocks:  # the blocks' masks in row order; a padded batch's unpadded
        keep_NF = layout.unpad(torch.cat([keep_b for *_, keep_b in ctx.saved_blocks], dim=-2))
    ys_nO, dys_nO = [], []  # per expert with rows: its recomputed output, and the incoming gradient
    start = 0
    # the saved tensors are already in the forward's compute dtype: autocast must not recast them
    with torch.autocast(x_ND.device.type, enabled=False):
        for e, n in enumerate(layout.sizes):
            rows = slice(start, start + n)
            start += n
            if n == 0:
                continue
            drop = None if keep_NF is None else (lambda h_nF, keep_nF=keep_NF[rows]: h_nF * keep_nF / (1.0 - p))
            ys_nO.append(expert_ffn_dense(x_ND[rows], ctx.activation, *(_pick(t, e) for t in inputs[1:]), drop=drop))
            dys_nO.append(grad_NO[rows])
        if ys_nO:
            grads = torch.autograd.grad(ys_nO, [inputs[i] for i in wanted], dys_nO, create_graph=True,
                                        allow_unused=True, materialize_grads=True)
        else:  # no rows at all
            grads = [torch.zeros_like(inputs[i]) for i in wanted]
    out = [None] * len(inputs)
    for i, g in zip(wanted, grads, strict=True):
        out[i] = g
    return (out[0], None, None, None, None, *out[1:])
