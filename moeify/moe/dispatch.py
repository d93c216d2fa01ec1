"""Token dispatch and combine: group token-expert assignments by expert, and scatter results back.

Shape legend: T tokens, D model dim, E experts, N assignments.

    dispatch: x_TD, routing        -> x_ND (rows grouped by expert), DispatchPlan
    combine:  y_ND, DispatchPlan   -> y_TD = sum over a token's assignments of weight * y

Dropless: every assignment the router made is computed (capacity limits are applied by the
router, see `moeify.moe.capacity`). `LocalDispatch`/`LocalCombine` keep everything on this
process; expert parallelism swaps in all-to-all variants with the same interface.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from moeify.moe.losses import count_indices
from moeify.moe.router import Routing


class DispatchPlan(NamedTuple):
    token_N: torch.Tensor  # token index of each expert-sorted row
    weight_N: torch.Tensor  # gate weight of each expert-sorted row
    counts_E: torch.Tensor  # rows per (local) expert, in order
    num_tokens: int  # T, to size the combine output
    extra: tuple = ()  # transport-specific state (all-to-all splits)


def group_by_expert(routing: Routing, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Permutation that sorts assignments by expert, and the number of assignments per expert."""
    # torch.sort (not argsort(stable=True)): order inside an expert's group does not matter, and the
    # unstable sort is faster. Counts come from a scatter-add count, never from the sorted keys.
    order_N = torch.sort(routing.expert_N).indices
    return order_N, count_indices(routing.expert_N, num_experts)


class LocalDispatch(nn.Module):
    def __init__(self, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts

    def forward(self, x_TD: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, DispatchPlan]:
        order_N, counts_E = group_by_expert(routing, self.num_experts)
        token_N = routing.token_N[order_N]
        x_ND = x_TD[token_N]
        return x_ND, DispatchPlan(token_N, routing.weight_N[order_N], counts_E, x_TD.shape[0])


class LocalCombine(nn.Module):
    def forward(self, y_ND: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        weighted_ND = y_ND * plan.weight_N.to(y_ND.dtype).unsqueeze(-1)
        out_TD = y_ND.new_zeros(plan.num_tokens, y_ND.shape[-1])
        return out_TD.index_add(0, plan.token_N, weighted_ND)
