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


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x)


ACTIVATIONS = {"relu": F.relu, "gelu": _gelu, "gelu_tanh": _gelu_tanh, "silu": F.silu}


def activation_fn(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ConfigError(f"unknown expert activation {name!r}: use one of {', '.join(ACTIVATIONS)}") from None


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (grouped_mm's backward needs it)."""

    @staticmethod
    def forward(ctx, x):  # noqa: D102
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return grad.contiguous()


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # grouped_mm is not on autocast's cast lists: apply the autocast dtype ourselves so expert
    # matmuls run in bf16/fp16 under autocast like nn.Linear would.
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def grouped_mm_aligned(x_ND: torch.Tensor, w_EOI: torch.Tensor) -> bool:
    """grouped_mm needs every row stride to be a multiple of 16 bytes (e.g. dims divisible by 4 in fp32)."""
    size = x_ND.element_size()
    return (x_ND.shape[-1] * size) % 16 == 0 and (w_EOI.shape[-2] * size) % 16 == 0


# torch.compile: grouped_mm's fake (meta) kernel only accepts bf16 inputs, although the CPU kernel
# runs float32, so tracing float32 grouped_mm fails. Under compile the grouped matmul goes through
# these two custom ops instead: opaque to dynamo (one graph, no break per expert), with shapes given
# by their fake implementations and the backward wired through `register_autograd`. Registering an
# op in the `moeify` namespace is this module's only import-time effect, and it is idempotent per process.
@torch.library.custom_op("moeify::grouped_linear", mutates_args=())
def _grouped_linear_op(x_NI: torch.Tensor, w_EOI: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    return F.grouped_mm(x_NI, w_EOI.transpose(-2, -1), offs=offs_E)


@_grouped_linear_op.register_fake
def _(x_NI, w_EOI, offs_E):
    return x_NI.new_empty(x_NI.shape[0], w_EOI.shape[1])


@torch.library.custom_op("moeify::grouped_linear_backward", mutates_args=())
def _grouped_linear_backward_op(grad_NO: torch.Tensor, x_NI: torch.Tensor, w_EOI: torch.Tensor,
                                offs_E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    grad_NO = grad_NO.contiguous()
    grad_x_NI = F.grouped_mm(grad_NO, w_EOI, offs=offs_E)
    grad_w_EOI = torch.zeros_like(w_EOI)  # experts without tokens get a zero gradient
    start = 0
    for e, end in enumerate(offs_E.tolist()):
        if end > start:
            torch.mm(grad_NO[start:end].T, x_NI[start:end], out=grad_w_EOI[e])
        start = end
    return grad_x_NI, grad_w_EOI


@_grouped_linear_backward_op.register_fake
def _(grad_NO, x_NI, w_EOI, offs_E):
    return torch.empty_like(x_NI), torch.empty_like(w_EOI)


def _grouped_linear_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _grouped_linear_grad(ctx, grad_NO):
    x_NI, w_EOI, offs_E = ctx.saved_tensors
    grad_x_NI, grad_w_EOI = _grouped_linear_backward_op(grad_NO, x_NI, w_EOI, offs_E)
    return grad_x_NI, grad_w_EOI, None


_grouped_linear_op.register_autograd(_grouped_linear_grad, setup_context=_grouped_linear_setup)


def grouped_linear(x_ND: torch.Tensor, w_EOI: torch.Tensor, counts_E: torch.Tensor, offs_E: torch.Tensor | None,
                   backend: str) -> torch.Tensor:
    """Row group e of `x_ND` times `w_EOI[e].T`. Returns (N, O)."""
    dtype = _compute_dtype(x_ND)
    x_ND = x_ND.to(dtype)
    w_EOI = w_EOI.to(dtype)
    if backend == "grouped_mm" and grouped_mm_aligned(x_ND, w_EOI):
        if torch.compiler.is_compiling():
            return _grouped_linear_op(x_ND, w_EOI, offs_E)
        return _ContiguousGrad.apply(F.grouped_mm(x_ND, w_EOI.transpose(-2, -1), offs=offs_E))
    # loop backend: one matmul per expert over its slice; used where grouped_mm is unavailable
    chunks = torch.split(x_ND, counts_E.tolist())
    return torch.cat([chunk @ w_EOI[e].T for e, chunk in enumerate(chunks)], dim=0)


class GroupedExperts(nn.Module):
    """E FFN experts over expert-sorted tokens."""

    def __init__(self, num_experts: int, d_model: int, d_ff: int, activation: str, *, gated: bool = False,
                 bias: bool = True, dropout: float = 0.0, backend: str = "auto", d_out: int | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        activation_fn(activation)  # validate early
        self.num_experts, self.d_model, self.d_ff = num_experts, d_model, d_ff
        self.d_out = d_model if d_out is None else d_out
        self.activation, self.gated, self.has_bias = activation, gated, bias
        self.dropout = dropout
        if backend == "auto":
            backend = "grouped_mm" if hasattr(F, "grouped_mm") else "loop"
        if backend not in ("grouped_mm", "loop"):
            raise ConfigError(f"unknown experts backend {backend!r}: use 'grouped_mm', 'loop' or 'auto'")
        self.backend = backend
        kw = {"dtype": dtype, "device": device}
        self.w1_EFD = nn.Parameter(torch.empty(num_experts, d_ff, d_model, **kw))
        self.w2_EDF = nn.Parameter(torch.empty(num_experts, self.d_out, d_ff, **kw))
        self.w3_EFD = nn.Parameter(torch.empty(num_experts, d_ff, d_model, **kw)) if gated else None
        self.b1_EF = nn.Parameter(torch.zeros(num_experts, d_ff, **kw)) if bias else None
        self.b2_ED = nn.Parameter(torch.zeros(num_experts, self.d_out, **kw)) if bias else None
        self.b3_EF = nn.Parameter(torch.zeros(num_experts, d_ff, **kw)) if (bias and gated) else None
        for w in (self.w1_EFD, self.w2_EDF, self.w3_EFD):
            if w is not None:
                nn.init.normal_(w, std=d_model ** -0.5)

    def extra_repr(self) -> str:
        kind = "gated " if self.gated else ""
        out = f", d_out={self.d_out}" if self.d_out != self.d_model else ""
        return (f"num_experts={self.num_experts}, d_model={self.d_model}, d_ff={self.d_ff}{out}, "
                f"{kind}activation={self.activation}, bias={self.has_bias}, dropout={self.dropout}, "
                f"backend={self.backend}")

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        offs_E = torch.cumsum(counts_E, 0).to(torch.int32) if self.backend == "grouped_mm" else None

        def rows(b_EO):  # per-row bias of each row's expert
            return torch.repeat_interleave(b_EO, counts_E, dim=0, output_size=x_ND.shape[0])

        act = activation_fn(self.activation)
        h_NF = grouped_linear(x_ND, self.w1_EFD, counts_E, offs_E, self.backend)
        if self.b1_EF is not None:
            h_NF = h_NF + rows(self.b1_EF).to(h_NF.dtype)
        h_NF = act(h_NF)
        if self.w3_EFD is not None:
            up_NF = grouped_linear(x_ND, self.w3_EFD, counts_E, offs_E, self.backend)
            if self.b3_EF is not None:
                up_NF = up_NF + rows(self.b3_EF).to(up_NF.dtype)
            h_NF = h_NF * up_NF
        if self.dropout > 0 and self.training:
            h_NF = F.dropout(h_NF, self.dropout, training=True)
        y_ND = grouped_linear(h_NF, self.w2_EDF, counts_E, offs_E, self.backend)
        if self.b2_ED is not None:
            y_ND = y_ND + rows(self.b2_ED).to(y_ND.dtype)
        return y_ND

    def forward_dense(self, x_TD: torch.Tensor, expert: int) -> torch.Tensor:
        """Expert `expert` applied to every row of x (reference path for tests and shared experts)."""
        act = activation_fn(self.activation)
        h = F.linear(x_TD, self.w1_EFD[expert], None if self.b1_EF is None else self.b1_EF[expert])
        h = act(h)
        if self.w3_EFD is not None:
            h = h * F.linear(x_TD, self.w3_EFD[expert], None if self.b3_EF is None else self.b3_EF[expert])
        if self.dropout > 0 and self.training:
            h = F.dropout(h, self.dropout, training=True)
        return F.linear(h, self.w2_EDF[expert], None if self.b2_ED is None else self.b2_ED[expert])
