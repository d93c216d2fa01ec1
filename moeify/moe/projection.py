"""Projection experts: E independent Linear maps (no hidden layer), for the MoE of projections that
replaces a single Linear between stacked LSTM layers (Shazeer et al. 2017, §5).

Shape legend: N token-expert assignments (tokens sorted by expert), T tokens, D input dim,
O output dim, E experts.

    expert e:  y = w_EOD[e] x + b_EO[e]

Upcycled by copying the dense projection into every expert (`init_projection`), so with
scale-preserving gates the freshly converted layer computes the dense projection. There are no
hidden neurons, so init="split" has nothing to partition: projections are always copied.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moeify.config import MoEConfig
from moeify.moe.build import copy_to_experts, make_router
from moeify.moe.experts import grouped_linear
from moeify.moe.layer import LOSS_COEF_FIELDS, MoELayer


class ProjectionExperts(nn.Module):
    """E Linear experts over expert-sorted tokens (the `experts` child of an MoELayer)."""

    activation = None
    gated = False

    def __init__(self, num_experts: int, d_model: int, d_out: int, *, bias: bool = True,
                 backend: str = "auto", dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.num_experts, self.d_model, self.d_out, self.d_ff = num_experts, d_model, d_out, 0
        self.has_bias = bias
        self.backend = ("grouped_mm" if hasattr(F, "grouped_mm") else "loop") if backend == "auto" else backend
        kw = {"dtype": dtype, "device": device}
        self.w_EOD = nn.Parameter(torch.empty(num_experts, d_out, d_model, **kw))
        self.b_EO = nn.Parameter(torch.zeros(num_experts, d_out, **kw)) if bias else None
        nn.init.normal_(self.w_EOD, std=d_model ** -0.5)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, d_model={self.d_model}, d_out={self.d_out}, "
                f"bias={self.has_bias}, backend={self.backend}")

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        offs_E = torch.cumsum(counts_E, 0).to(torch.int32) if self.backend == "grouped_mm" else None
        return grouped_linear(x_ND, self.w_EOD, self.b_EO, counts_E, offs_E, self.backend)

    def forward_dense(self, x_TD: torch.Tensor, expert: int) -> torch.Tensor:
        """Expert `expert` applied to every row (reference path for tests and shared experts)."""
        return F.linear(x_TD, self.w_EOD[expert], None if self.b_EO is None else self.b_EO[expert])


def init_projection(experts: ProjectionExperts, weight: torch.Tensor, bias: torch.Tensor | None, noise: float,
                    generator: torch.Generator) -> None:
    for dst, src in ((experts.w_EOD, weight), (experts.b_EO, bias)):
        if dst is not None and src is not None:
            copy_to_experts(dst, src, noise, generator)


def build_projection_layer(cfg: MoEConfig, weight: torch.Tensor, bias: torch.Tensor | None, *,
                           generator: torch.Generator) -> MoELayer:
    """An MoE of projections upcycled from one dense Linear (`weight` in (out, in) layout)."""
    experts = ProjectionExperts(cfg.num_experts, weight.shape[1], weight.shape[0], bias=bias is not None,
                                dtype=weight.dtype, device=weight.device)
    init_projection(experts, weight, bias, cfg.init_noise if cfg.init == "copy_noise" else 0.0, generator)
    router = make_router(cfg, weight.shape[1], generator, weight.dtype).to(weight.device)
    coefs = {name: getattr(cfg, field) for name, field in LOSS_COEF_FIELDS.items()}
    return MoELayer(router, experts, coefs=coefs)
