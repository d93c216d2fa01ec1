"""Build an `MoELayer` for one dense FFN region and initialise it from the dense weights (upcycling).

    init="copy":       every expert = the dense FFN (function preserving with scale-preserving gates)
    init="copy_noise": the same plus Gaussian noise of std `init_noise * std(weight)` per expert
    init="split":      the dense hidden neurons partitioned among the experts (moeify.moe.init_split)

Routers and inits are looked up in small dispatch tables keyed by the config's names, so a new
router or init is one function here plus its name in `MoEConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moeify.config import MoEConfig
from moeify.errors import ConfigError
from moeify.moe.capacity import CapacityLimit
from moeify.moe.experts import GroupedExperts
from moeify.moe.init_split import init_split, split_d_ff, uniform_router
from moeify.moe.layer import LOSS_COEF_FIELDS, MoELayer
from moeify.moe.router import (
    ExpertChoiceRouter,
    HierarchicalRouter,
    NoisyTopKRouter,
    SwitchRouter,
    TopKRouter,
    router_dtype,
)


@dataclass(frozen=True)
class DenseFFN:
    """The dense weights of one FFN region, in nn.Linear (out, in) layout."""

    activation: str
    w1: torch.Tensor  # (F, D): fc1, or the gate projection of a gated FFN
    w2: torch.Tensor  # (D_out, F)
    b1: torch.Tensor | None = None
    b2: torch.Tensor | None = None
    w3: torch.Tensor | None = None  # (F, D): the up projection of a gated FFN
    b3: torch.Tensor | None = None
    dropout: float = 0.0

    @property
    def gated(self) -> bool:
        return self.w3 is not None

    @property
    def d_model(self) -> int:
        return self.w1.shape[1]

    @property
    def d_ff(self) -> int:
        return self.w1.shape[0]

    @property
    def d_out(self) -> int:
        return self.w2.shape[0]


def make_router(cfg: MoEConfig, d_model: int, generator: torch.Generator,
                model_dtype: torch.dtype = torch.float32) -> nn.Module:
    """The router `cfg` names, initialised (Switch §2.4 scale), with its capacity limit if any; in float32,
    or the model's dtype where that is wider (a float64 model keeps float64 routing)."""
    common = {"preserve_scale": cfg.preserve_scale, "bias": cfg.router_bias}
    if cfg.num_groups is not None:
        router = HierarchicalRouter(d_model, cfg.num_experts, cfg.num_groups, cfg.group_top_k, cfg.top_k,
                                    noisy=cfg.router == "noisy_topk", softmax_before_topk=cfg.softmax_before_topk,
                                    normalize=cfg.normalize_gates, **common)
    elif cfg.router == "topk":
        router = TopKRouter(d_model, cfg.num_experts, cfg.top_k, normalize=cfg.normalize_gates,
                            softmax_before_topk=cfg.softmax_before_topk, **common)
    elif cfg.router == "switch":
        router = SwitchRouter(d_model, cfg.num_experts, jitter=cfg.router_jitter, **common)
    elif cfg.router == "noisy_topk":
        router = NoisyTopKRouter(d_model, cfg.num_experts, cfg.top_k, **common)
    elif cfg.router == "expert_choice":
        router = ExpertChoiceRouter(d_model, cfg.num_experts, cfg.top_k, capacity=cfg.expert_choice_capacity,
                                    **common)
    else:
        raise ConfigError(f"router {cfg.router!r} is not available in this build: use one of "
                          "topk, switch, noisy_topk, expert_choice")
    router.init_weights(cfg.router_init_scale, generator)
    router.to(router_dtype(model_dtype))
    if cfg.capacity_factor is not None or cfg.eval_capacity_factor is not None:
        router.capacity = CapacityLimit(cfg.num_experts, router.top_k, cfg.capacity_factor,
                                        cfg.eval_capacity_factor, cfg.drop_policy)
    return router


def copy_to_experts(dst_E: torch.Tensor, src: torch.Tensor, noise: float, generator: torch.Generator) -> None:
    """Every expert's slice of `dst_E` = `src`, plus N(0, (noise * std(src))^2) noise when noise > 0.

    The noise is drawn on the CPU from `generator` and then moved to `dst_E`'s device, so a seed
    gives the same experts whether the dense model sits on the CPU or on an accelerator. std(src) is
    reduced in float64: a float32 reduction sums in another order on a GPU, and its last bit then
    changed the noise's scale (found on an H100: one expert weight off by an ulp).
    """
    with torch.no_grad():
        dst_E.copy_(src.detach().to(dst_E.dtype).unsqueeze(0).expand_as(dst_E))
        if noise > 0:
            std = float(src.detach().double().std()) * noise if src.numel() > 1 else noise
            dst_E.add_((torch.randn(dst_E.shape, generator=generator) * std).to(device=dst_E.device,
                                                                                 dtype=dst_E.dtype))


def init_copy(experts: GroupedExperts, dense: DenseFFN, noise: float, generator: torch.Generator) -> None:
    pairs = [(experts.w1_EFD, dense.w1), (experts.w2_EDF, dense.w2), (experts.w3_EFD, dense.w3),
             (experts.b1_EF, dense.b1), (experts.b2_ED, dense.b2), (experts.b3_EF, dense.b3)]
    for dst, src in pairs:
        if dst is not None and src is not None:
            copy_to_experts(dst, src, noise, generator)


def make_shared_experts(cfg: MoEConfig, dense: DenseFFN, dropout: float) -> GroupedExperts | None:
    """`cfg.num_shared_experts` always-on experts, each an exact copy of the dense FFN (upcycled)."""
    if cfg.num_shared_experts == 0:
        return None
    shared = GroupedExperts(cfg.num_shared_experts, dense.d_model, dense.d_ff, dense.activation, gated=dense.gated,
                            bias=dense.b1 is not None, dropout=dropout, d_out=dense.d_out, dtype=dense.w1.dtype,
                            device=dense.w1.device, init_weights=False)
    init_copy(shared, dense, 0.0, None)
    return shared


def build_moe_layer(cfg: MoEConfig, dense: DenseFFN, *, generator: torch.Generator | None = None) -> MoELayer:
    """An upcycled MoE layer whose experts start from `dense`."""
    if generator is None:
        generator = torch.Generator().manual_seed(cfg.seed)
    dtype, device = dense.w1.dtype, dense.w1.device
    dropout = dense.dropout if cfg.expert_dropout is None else cfg.expert_dropout
    d_ff = split_d_ff(dense.d_ff, cfg.num_experts) if cfg.init == "split" else dense.d_ff
    experts = GroupedExperts(cfg.num_experts, dense.d_model, d_ff, dense.activation, gated=dense.gated,
                             bias=dense.b1 is not None, dropout=dropout, d_out=dense.d_out, dtype=dtype,
                             device=device, init_weights=False)  # every init below writes all of them
    if cfg.init == "copy":
        init_copy(experts, dense, 0.0, generator)
    elif cfg.init == "copy_noise":
        init_copy(experts, dense, cfg.init_noise, generator)
    elif cfg.init == "split":
        init_split(experts, dense, cfg, generator)
    else:
        raise ConfigError(f"init {cfg.init!r} is not available in this build: use 'copy' or 'copy_noise'")
    router = make_router(cfg, dense.d_model, generator, dtype).to(device)
    if cfg.init == "split":
        uniform_router(router, cfg)
    coefs = {name: getattr(cfg, field) for name, field in LOSS_COEF_FIELDS.items()}
    shared = make_shared_experts(cfg, dense, dropout)
    # S shared copies and the routed mixture (gates summing to 1) each weigh 1/(S+1): the layer
    # still computes the dense FFN at init, and every path gets gradient from the start
    scale = 1.0 / (cfg.num_shared_experts + 1)
    return MoELayer(router, experts, coefs=coefs, shared=shared, shared_scale=scale, routed_scale=scale)
