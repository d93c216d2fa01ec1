"""Expert capacity (Switch Transformers §2.2): each expert processes at most C assignments.

Shape legend: T tokens, E experts, N assignments (before dropping), M kept assignments.

    C = ceil(T * k * capacity_factor / E)          (k: assignments per token, the router's top_k)
    Routing(N assignments) -> Routing(M <= N assignments, at most C per expert)

Dropped assignments are removed from the `Routing`, so the MoE layer contributes zero for them and
the token passes through unchanged on the model's residual path. Gates of the kept assignments are
not renormalised (GShard/Switch). Which assignments an over-full expert keeps is the drop policy:

    "choice":   every token's first choice before any token's second choice, then the earliest
                tokens (flattened batch order): GShard's, and DeepSpeed's and fairseq's top-2
    "position": the earliest tokens, each with all its choices (then the token's own choice order)
    "gate":     the highest router probability probs_TE[t, e] (batch-prioritised routing, V-MoE)

A token's choices are its assignments in the router's order (best first for top-k). With top-1
routing "choice" and "position" are the same.

Under a token mask (`moeify.token_mask`) C counts only the counted tokens, and padding takes only
the slots that no counted token needs: it comes last in every expert's queue, and
"dropped_fraction" is over the counted tokens' assignments.

Training and evaluation use separate factors (`capacity_factor`, `eval_capacity_factor`; Switch
evaluates with a larger one); a factor of None or inf means dropless (eval_capacity_factor=None: the
training factor, inf: dropless evaluation of a layer that drops in training). The fraction of
assignments dropped is recorded as `routing.losses["dropped_fraction"]` (a detached statistic, not a loss), and
the router's demand before dropping as `routing.demand_E` (counted assignments per expert), where
`AuxLossRecorder` and `moeify.router_stats` pick them up.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moeify.config import DROP_POLICIES
from moeify.errors import ConfigError
from moeify.moe.losses import count_indices, token_mean
from moeify.moe.router import Routing


def expert_capacity(num_tokens: int, top_k: int, factor: float, num_experts: int) -> int:
    """ceil(T * k * factor / E); rounded first so that e.g. 1.2 * 10 / 4 is 3, not 4, and at least 1 for any
    tokens (the rounding took a factor below 5e-10 / (T * k / E) to 0: every token dropped)."""
    capacity = math.ceil(round(num_tokens * top_k * factor / num_experts, 9))
    return max(capacity, 1) if num_tokens > 0 else capacity


def mode_factor(capacity_factor: float | None, eval_capacity_factor: float | None, training: bool) -> float | None:
    """The capacity factor a mode runs with, as the config fields give them; None for dropless (an infinite
    factor is one, and an eval factor of None takes the training one)."""
    factor = capacity_factor if training or eval_capacity_factor is None else eval_capacity_factor
    return None if factor is None or math.isinf(factor) else factor


def keep_within_capacity(routing: Routing, num_experts: int, capacity: int, policy: str,
                         counted_N: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask over the N assignments: True where the assignment fits in its expert's capacity.
    Assignments of padding (`counted_N` False) queue behind every counted one of their expert."""
    N = routing.expert_N.shape[0]
    # stable sort by expert keeps the priority order inside each expert's group (padding after the rest)
    group_N = routing.expert_N if counted_N is None else 2 * routing.expert_N + (~counted_N).long()
    P = routing.per_token
    if policy in ("position", "choice") and P:
        # token-major rows, P per token (token_N = arange(T).repeat_interleave(P)): the priority order is a
        # fixed permutation, so one stable sort by group is left of the general path's two ("position") or
        # three ("choice"): at T=8192, top-2, 8 experts, 0.79-0.95x and 0.49-0.64x its time. One sort of the
        # distinct keys group * N + priority measured 2.2x the general path: torch sorts small keys faster.
        first = torch.arange(N, device=group_N.device)
        if policy == "choice":
            first = first.view(-1, P).T.reshape(-1)
        return _keep_first(first[torch.argsort(group_N[first], stable=True)], routing, num_experts, capacity)
    if policy in ("position", "choice"):
        # token-major order; assignment index breaks ties inside a token
        first = torch.argsort(routing.token_N, stable=True)
        if policy == "choice":  # then choice-major: the c-th choices of all tokens, in token order, for c = 0, 1, ..
            counts_T = count_indices(routing.token_N, routing.logits_TE.shape[0])
            token_starts_T = torch.cumsum(counts_T, 0) - counts_T
            choice_N = torch.arange(N, device=first.device) - token_starts_T[routing.token_N[first]]  # in `first` order
            first = first[torch.argsort(choice_N, stable=True)]
    elif policy == "gate":
        priority_N = routing.probs_TE.detach()[routing.token_N, routing.expert_N]
        first = torch.argsort(priority_N, descending=True, stable=True)
    else:
        raise ConfigError(f"drop_policy={policy!r} is unknown: choose one of {', '.join(DROP_POLICIES)}")
    return _keep_first(first[torch.argsort(group_N[first], stable=True)], routing, num_experts, capacity)


def _keep_first(order_N: torch.Tensor, routing: Routing, num_experts: int, capacity: int) -> torch.Tensor:
    """The keep mask: the first `capacity` assignments of each expert in `order_N` (sorted by expert)."""
    N = order_N.shape[0]
    counts_E = count_indices(routing.expert_N, num_experts)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    sorted_expert_N = routing.expert_N[order_N]
    rank_N = torch.arange(N, device=order_N.device) - starts_E[sorted_expert_N]
    keep_N = torch.zeros(N, dtype=torch.bool, device=order_N.device)
    keep_N[order_N] = rank_N < capacity
    return keep_N


class CapacityLimit(nn.Module):
    """Drops the assignments over capacity from a `Routing` (training or eval factor by mode)."""

    def __init__(self, num_experts: int, top_k: int, capacity_factor: float | None,
                 eval_capacity_factor: float | None = None, policy: str = "choice") -> None:
        super().__init__()
        if policy not in DROP_POLICIES:
            raise ConfigError(f"drop_policy={policy!r} is unknown: choose one of {', '.join(DROP_POLICIES)}")
        self.num_experts, self.top_k, self.policy = num_experts, top_k, policy
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = capacity_factor if eval_capacity_factor is None else eval_capacity_factor

    def extra_repr(self) -> str:
        return (f"capacity_factor={self.capacity_factor}, eval_capacity_factor={self.eval_capacity_factor}, "
                f"policy={self.policy}")

    def factor(self, training: bool | None = None) -> float | None:
        """The factor of this mode (or of training / evaluation when given); None for dropless."""
        training = self.training if training is None else training
        return mode_factor(self.capacity_factor, self.eval_capacity_factor, training)

    def capacity(self, num_tokens: int) -> int | None:
        factor = self.factor()
        return None if factor is None else expert_capacity(num_tokens, self.top_k, factor, self.num_experts)

    def forward(self, routing: Routing) -> Routing:
        found = dict(routing.losses)
        if self.factor() is None:
            found.setdefault("dropped_fraction", routing.logits_TE.new_zeros(()))
            return routing._replace(losses=found)
        if routing.keep_T is None:
            counted_N, capacity = None, self.capacity(routing.logits_TE.shape[0])
        else:
            counted_N, capacity = routing.keep_T[routing.token_N], self.capacity(int(routing.keep_T.sum()))
        keep_N = keep_within_capacity(routing, self.num_experts, capacity, self.policy, counted_N)
        dropped_N = (~keep_N).to(routing.logits_TE.dtype)
        found["dropped_fraction"] = token_mean(dropped_N, counted_N).detach()  # 0 for no tokens
        return routing._replace(token_N=routing.token_N[keep_N], expert_N=routing.expert_N[keep_N],
                                weight_N=routing.weight_N[keep_N], losses=found, per_token=None,
                                demand_E=count_indices(routing.expert_N, self.num_experts, counted_N))
