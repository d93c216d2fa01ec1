"""Routers: token representations in, token-expert assignments and their gate weights out.

Shape legend: T tokens, D model dim, E experts, K experts per token, N assignments (T*K for
token-choice routers).

Every router returns a :class:`Routing`: a flat list of (token, expert, weight) assignments, so
token-choice (top-k), capacity-limited and expert-choice routing share one dispatcher. The router
runs in float32 whatever the model's dtype or autocast state (Switch §2.4 selective precision).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from moeify.moe import losses


class Routing(NamedTuple):
    token_N: torch.Tensor  # int64: token index of each assignment
    expert_N: torch.Tensor  # int64: expert index of each assignment
    weight_N: torch.Tensor  # float32 gate weight of each assignment
    logits_TE: torch.Tensor  # float32 router logits (clean, before noise)
    probs_TE: torch.Tensor  # float32 router probabilities over all experts
    losses: dict  # name -> unweighted float32 scalar loss of this routing decision


def init_router_weight(weight: torch.Tensor, scale: float, generator: torch.Generator | None) -> None:
    """Switch §2.4: truncated normal, std sqrt(scale / fan_in), cut at two std."""
    std = math.sqrt(scale / weight.shape[-1])
    with torch.no_grad():
        values = torch.randn(weight.shape, generator=generator, dtype=torch.float32).clamp_(-2, 2) * std
        weight.copy_(values.to(weight.dtype))


def fill_gates(weight_TK: torch.Tensor, preserve_scale: bool) -> torch.Tensor:
    """Make the forward gates of each token sum to 1 while keeping their gradients (see MoEConfig)."""
    if not preserve_scale:
        return weight_TK
    k = weight_TK.shape[-1]
    deficit_T1 = (1.0 - weight_TK.sum(dim=-1, keepdim=True)) / k
    return weight_TK + deficit_T1.detach()


def token_major(idx_TK: torch.Tensor, gate_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token_N, expert_N, weight_N) for a token-choice decision, N = T*K, token-major order."""
    T, K = idx_TK.shape
    token_N = torch.arange(T, device=idx_TK.device).repeat_interleave(K)
    return token_N, idx_TK.reshape(-1), gate_TK.reshape(-1)


class _RouterBase(nn.Module):
    def __init__(self, d_model: int, num_experts: int, *, bias: bool = False) -> None:
        super().__init__()
        self.d_model, self.num_experts = d_model, num_experts
        self.gate = nn.Linear(d_model, num_experts, bias=bias, dtype=torch.float32)

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            return self.gate(x_TD.float())

    def standard_losses(self, logits_TE: torch.Tensor, probs_TE: torch.Tensor, expert_N: torch.Tensor,
                        importance_E: torch.Tensor) -> dict:
        return {
            "load_balance": losses.load_balancing_loss(probs_TE, expert_N, self.num_experts),
            "z_loss": losses.router_z_loss(logits_TE),
            "importance": losses.cv_squared(importance_E),
        }


class TopKRouter(_RouterBase):
    """softmax -> top-k -> renormalise (Mixtral), or top-k -> softmax over the kept logits."""

    def __init__(self, d_model: int, num_experts: int, top_k: int, *, normalize: bool = True,
                 softmax_before_topk: bool = True, preserve_scale: bool = True, bias: bool = False) -> None:
        super().__init__(d_model, num_experts, bias=bias)
        self.top_k, self.normalize = top_k, normalize
        self.softmax_before_topk, self.preserve_scale = softmax_before_topk, preserve_scale

    def extra_repr(self) -> str:
        order = "softmax->topk" if self.softmax_before_topk else "topk->softmax"
        return f"top_k={self.top_k}, {order}, normalize={self.normalize}, preserve_scale={self.preserve_scale}"

    def forward(self, x_TD: torch.Tensor) -> Routing:
        logits_TE = self.logits(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        if self.softmax_before_topk:
            gate_TK, idx_TK = probs_TE.topk(self.top_k, dim=-1)
            if self.normalize:
                gate_TK = gate_TK / gate_TK.sum(dim=-1, keepdim=True)
        else:
            top_logits_TK, idx_TK = logits_TE.topk(self.top_k, dim=-1)
            gate_TK = top_logits_TK.softmax(dim=-1)
        gate_TK = fill_gates(gate_TK, self.preserve_scale)
        token_N, expert_N, weight_N = token_major(idx_TK, gate_TK)
        gates_TE = torch.zeros_like(probs_TE).scatter(1, idx_TK, gate_TK)
        return Routing(token_N, expert_N, weight_N, logits_TE, probs_TE,
                       self.standard_losses(logits_TE, probs_TE, expert_N, gates_TE.sum(0)))


class SwitchRouter(_RouterBase):
    """Switch Transformers top-1: gate = router probability of the chosen expert (Fedus §2.1).

    Optional multiplicative jitter on the router input while training (§2.4, `jitter` = eps: the
    input is multiplied by U(1 - eps, 1 + eps)).
    """

    def __init__(self, d_model: int, num_experts: int, *, jitter: float = 0.0, preserve_scale: bool = True,
                 bias: bool = False) -> None:
        super().__init__(d_model, num_experts, bias=bias)
        self.top_k, self.jitter, self.preserve_scale = 1, jitter, preserve_scale

    def extra_repr(self) -> str:
        return f"top_k=1, jitter={self.jitter}, preserve_scale={self.preserve_scale}"

    def forward(self, x_TD: torch.Tensor) -> Routing:
        if self.training and self.jitter > 0:
            noise = torch.empty_like(x_TD, dtype=torch.float32).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            x_TD = x_TD.float() * noise
        logits_TE = self.logits(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        gate_T1, idx_T1 = probs_TE.max(dim=-1, keepdim=True)
        gate_T1 = fill_gates(gate_T1, self.preserve_scale)
        token_N, expert_N, weight_N = token_major(idx_T1, gate_T1)
        gates_TE = torch.zeros_like(probs_TE).scatter(1, idx_T1, gate_T1)
        return Routing(token_N, expert_N, weight_N, logits_TE, probs_TE,
                       self.standard_losses(logits_TE, probs_TE, expert_N, gates_TE.sum(0)))
