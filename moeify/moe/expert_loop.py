"""The whole expert FFN, one expert at a time, with a hand-written backward (the CPU path).

Shape legend: N token-expert assignments (sorted by expert), n rows of one expert, D model dim,
F FFN hidden dim, O output dim, E experts.

Why a second path next to `grouped_mm`: a grouped matmul runs one layer for every expert before the
next layer starts, so the (N, F) hidden activation goes to and from main memory between the two
matmuls, the activation and their backward. Running expert e's fc1 -> act -> fc2 back to back keeps
its (n, F) slice in the last-level cache, which on a CPU is worth more than the grouped kernel
(measured in `benchmarks/moe_layer.py`). Per expert, forward and backward use the BLAS calls
nn.Linear uses (`addmm` with the bias fused), and write straight into preallocated (N, .) and
(E, ., .) buffers: no per-expert tensors to concatenate, no index_add, one weight-gradient buffer
per weight. On accelerators `grouped_mm` stays the better choice (one kernel, no host sync).

Saved for backward, per row: the pre-activation, the up projection (gated), the fc2 input, and the
dropout mask when expert dropout is active: what nn.Linear + activation would save, minus act(a1)
of gated experts, which is recomputed from the cached slice in backward.
"""

from __future__ import annotations

import torch


def _act_forward(name: str, a: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    if name == "gelu":
        return torch.ops.aten.gelu.out(a, approximate="none", out=out)
    if name == "gelu_tanh":
        return torch.ops.aten.gelu.out(a, approximate="tanh", out=out)
    if name == "silu":
        return torch.ops.aten.silu.out(a, out=out)
    return torch.clamp_min(a, 0, out=out)  # relu


def _act_backward(name: str, grad: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    if name == "gelu":
        return torch.ops.aten.gelu_backward(grad, a, approximate="none")
    if name == "gelu_tanh":
        return torch.ops.aten.gelu_backward(grad, a, approximate="tanh")
    if name == "silu":
        return torch.ops.aten.silu_backward(grad, a)
    return torch.ops.aten.threshold_backward(grad, a, 0)  # relu


def _linear_out(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """out = x @ w.T + b for one expert (2-D) or for all experts at once (3-D, padded rows)."""
    if x.dim() == 2:
        return torch.mm(x, w.T, out=out) if b is None else torch.addmm(b, x, w.T, out=out)
    return torch.bmm(x, w.mT, out=out) if b is None else torch.baddbmm(b.unsqueeze(1), x, w.mT, out=out)


def _add_matmul_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return out.addmm_(a, b) if out.dim() == 2 else out.baddbmm_(a, b)


# Pad instead of loop when every expert has at most this many rows: with so few rows each matmul
# only streams its expert's weights, and one batched call over all experts (each core on its own
# experts) reads them about twice as fast as E calls that each split one small matmul over the cores.
PAD_MAX_ROWS = 32


class _Layout:
    """Where each expert's rows live: slices of the (N, .) buffers, or one padded (E, C, .) batch."""

    def __init__(self, sizes: list[int], num_experts: int, device: torch.device) -> None:
        self.sizes = sizes
        capacity = max(sizes, default=0)
        self.padded = 0 < capacity <= PAD_MAX_ROWS and len(sizes) > 1
        if self.padded:
            sizes_E = torch.tensor(sizes, device=device)
            expert_N = torch.repeat_interleave(torch.arange(num_experts, device=device), sizes_E)
            starts_E = torch.cumsum(sizes_E, 0) - sizes_E
            self.index = (expert_N, torch.arange(expert_N.shape[0], device=device) - starts_E[expert_N])
            self.capacity = capacity

    def rows(self, N: int, *trailing: int) -> tuple[int, ...]:
        return (len(self.sizes), self.capacity, *trailing) if self.padded else (N, *trailing)

    def pad(self, t_NX: torch.Tensor) -> torch.Tensor:
        if not self.padded:
            return t_NX.contiguous()
        out = t_NX.new_zeros(len(self.sizes), self.capacity, t_NX.shape[-1])
        out[self.index] = t_NX
        return out

    def unpad(self, t: torch.Tensor) -> torch.Tensor:
        return t[self.index] if self.padded else t

    def groups(self):
        """(index into the expert dim or None for all, index into the row buffers), per group."""
        if self.padded:
            yield None, slice(None)
            return
        start = 0
        for e, n in enumerate(self.sizes):
            if n:
                yield e, slice(start, start + n)
            start += n

    def empty_experts(self) -> list[int]:
        return [] if self.padded else [e for e, n in enumerate(self.sizes) if n == 0]


def _pick(t: torch.Tensor | None, e: int | None) -> torch.Tensor | None:
    return t if (t is None or e is None) else t[e]


class ExpertFFNLoop(torch.autograd.Function):
    """y = w2(drop(act(w1 x + b1) [* (w3 x + b3)])) + b2 per expert group of rows."""

    @staticmethod
    def forward(ctx, x_ND, sizes, activation, dropout, w1_EFD, b1_EF, w2_EOF, b2_EO, w3_EFD, b3_EF):  # noqa: D102
        N, E, d_ff, d_out = x_ND.shape[0], w1_EFD.shape[0], w1_EFD.shape[1], w2_EOF.shape[1]
        layout = _Layout(list(sizes), E, x_ND.device)
        x = layout.pad(x_ND)
        a1 = x.new_empty(layout.rows(N, d_ff))
        a3 = x.new_empty(layout.rows(N, d_ff)) if w3_EFD is not None else None
        h = x.new_empty(layout.rows(N, d_ff))
        keep = torch.empty(layout.rows(N, d_ff), dtype=torch.bool, device=x.device) if dropout > 0 else None
        y = x.new_empty(layout.rows(N, d_out))
        for e, rows in layout.groups():
            x_g, a1_g, h_g = x[rows], a1[rows], h[rows]
            _linear_out(x_g, _pick(w1_EFD, e), _pick(b1_EF, e), a1_g)
            _act_forward(activation, a1_g, h_g)
            if a3 is not None:
                h_g.mul_(_linear_out(x_g, _pick(w3_EFD, e), _pick(b3_EF, e), a3[rows]))
            if keep is not None:
                keep_g = torch.bernoulli(torch.full_like(h_g, 1.0 - dropout)).bool()
                keep[rows] = keep_g
                h_g.mul_(keep_g).div_(1.0 - dropout)
            _linear_out(h_g, _pick(w2_EOF, e), _pick(b2_EO, e), y[rows])
        ctx.layout, ctx.activation, ctx.dropout = layout, activation, dropout
        ctx.has_bias = (b1_EF is not None, b2_EO is not None, b3_EF is not None)
        ctx.save_for_backward(x, w1_EFD, w2_EOF, w3_EFD, a1, a3, h, keep)
        return layout.unpad(y)

    @staticmethod
    def backward(ctx, grad_NO):  # noqa: D102
        x, w1_EFD, w2_EOF, w3_EFD, a1, a3, h, keep = ctx.saved_tensors
        layout = ctx.layout
        dy = layout.pad(grad_NO)
        need = ctx.needs_input_grad
        has_b1, has_b2, has_b3 = ctx.has_bias
        gated = w3_EFD is not None
        grad_x = torch.empty_like(x) if need[0] else None
        # every expert's slice is written below; only experts without rows are zero-filled
        grad_w1 = torch.empty_like(w1_EFD) if need[4] else None
        grad_b1 = w1_EFD.new_empty(w1_EFD.shape[:2]) if (has_b1 and need[5]) else None
        grad_w2 = torch.empty_like(w2_EOF) if need[6] else None
        grad_b2 = w2_EOF.new_empty(w2_EOF.shape[:2]) if (has_b2 and need[7]) else None
        grad_w3 = torch.empty_like(w3_EFD) if (gated and need[8]) else None
        grad_b3 = w3_EFD.new_empty(w3_EFD.shape[:2]) if (gated and has_b3 and need[9]) else None
        for e in layout.empty_experts():
            for g in (grad_w1, grad_b1, grad_w2, grad_b2, grad_w3, grad_b3):
                if g is not None:
                    g[e].zero_()
        for e, rows in layout.groups():
            dy_g, x_g, a1_g = dy[rows], x[rows], a1[rows]
            if grad_w2 is not None:
                torch.matmul(dy_g.mT, h[rows], out=_pick(grad_w2, e))
            if grad_b2 is not None:
                torch.sum(dy_g, -2, out=_pick(grad_b2, e))
            dh_g = torch.matmul(dy_g, _pick(w2_EOF, e))
            if keep is not None:
                dh_g.mul_(keep[rows]).div_(1.0 - ctx.dropout)
            if gated:
                da3_g = dh_g * _act_forward(ctx.activation, a1_g, torch.empty_like(a1_g))
                da1_g = _act_backward(ctx.activation, dh_g.mul_(a3[rows]), a1_g)
            else:
                da1_g = _act_backward(ctx.activation, dh_g, a1_g)
            if grad_w1 is not None:
                torch.matmul(da1_g.mT, x_g, out=_pick(grad_w1, e))
            if grad_b1 is not None:
                torch.sum(da1_g, -2, out=_pick(grad_b1, e))
            if gated and grad_w3 is not None:
                torch.matmul(da3_g.mT, x_g, out=_pick(grad_w3, e))
            if gated and grad_b3 is not None:
                torch.sum(da3_g, -2, out=_pick(grad_b3, e))
            if grad_x is not None:
                torch.matmul(da1_g, _pick(w1_EFD, e), out=grad_x[rows])
                if gated:
                    _add_matmul_(grad_x[rows], da3_g, _pick(w3_EFD, e))
        return (None if grad_x is None else layout.unpad(grad_x), None, None, None,
                grad_w1, grad_b1, grad_w2, grad_b2, grad_w3, grad_b3)
