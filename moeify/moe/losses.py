"""Auxiliary losses of the seed papers, as pure functions of router outputs.

Shape legend: T tokens, E experts, N token-expert assignments.
"""

from __future__ import annotations

import torch


def load_balancing_loss(probs_TE: torch.Tensor, expert_N: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch Transformers eq. (4), extended to top-k: N * sum_i f_i * P_i.

    f_i: fraction of the token-expert assignments sent to expert i (sums to 1 over i);
    P_i: mean router probability of expert i over the tokens. Equals 1 under perfect balance.
    """
    counts_E = torch.bincount(expert_N, minlength=num_experts).to(probs_TE.dtype)
    f_E = counts_E / counts_E.sum().clamp_min(1)
    P_E = probs_TE.mean(dim=0)
    return num_experts * torch.sum(f_E * P_E)


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2."""
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


def cv_squared(x_E: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation, Var/Mean^2 (Shazeer 2017, eq. 6), with the population variance."""
    x_E = x_E.float()
    if x_E.numel() <= 1:
        return x_E.new_zeros(())
    return x_E.var(unbiased=False) / (x_E.mean().square() + 1e-10)
