"""Auxiliary losses of the seed papers, as pure functions of router outputs.

Shape legend: T tokens, E experts, N token-expert assignments.

Every loss takes an optional `keep_T` (bool, per token; `keep_N` per assignment): the tokens that
count, padding left out (`moeify.token_mask`). A loss with a mask equals the loss of a batch holding
only the counted tokens; it is computed with masked sums rather than by selecting rows, so shapes
stay independent of the data and torch.compile traces it without a graph break.
"""

from __future__ import annotations

import torch


def count_indices(index_N: torch.Tensor, size: int, keep_N: torch.Tensor | None = None) -> torch.Tensor:
    """How often each value in [0, size) occurs in `index_N` (int64, shape (size,)), counting only the
    entries `keep_N` marks when given.

    `torch.bincount(index_N, minlength=size)` for valid indices, but with an output shape that does
    not depend on the data, so torch.compile traces it without a graph break.
    """
    counts = torch.zeros(size, dtype=torch.int64, device=index_N.device)
    ones_N = torch.ones_like(index_N, dtype=torch.int64) if keep_N is None else keep_N.to(torch.int64)
    return counts.scatter_add_(0, index_N.reshape(-1), ones_N.reshape(-1))


def load_balancing_loss(probs_TE: torch.Tensor, expert_N: torch.Tensor, num_experts: int,
                        keep_T: torch.Tensor | None = None, keep_N: torch.Tensor | None = None) -> torch.Tensor:
    """Switch Transformers eq. (4), extended to top-k: N * sum_i f_i * P_i.

    f_i: fraction of the token-expert assignments sent to expert i (sums to 1 over i);
    P_i: mean router probability of expert i over the tokens. Equals 1 under perfect balance.
    """
    counts_E = count_indices(expert_N, num_experts, keep_N).to(probs_TE.dtype)
    f_E = counts_E / counts_E.sum().clamp_min(1)
    P_E = token_mean(probs_TE, keep_T)
    return num_experts * torch.sum(f_E * P_E)


def token_sum(x_T: torch.Tensor, keep_T: torch.Tensor | None = None) -> torch.Tensor:
    """The sum over tokens (dim 0), of the counted tokens only when `keep_T` is given."""
    if keep_T is None:
        return x_T.sum(dim=0)
    return torch.where(keep_T.reshape(-1, *(1,) * (x_T.dim() - 1)), x_T, 0).sum(dim=0)


def token_mean(x_T: torch.Tensor, keep_T: torch.Tensor | None = None) -> torch.Tensor:
    """The mean over tokens (dim 0), of the counted tokens only when `keep_T` is given; 0 for no
    tokens (an empty batch adds no loss, not NaN)."""
    if keep_T is None:
        return x_T.sum(dim=0) / max(x_T.shape[0], 1)
    return token_sum(x_T, keep_T) / keep_T.sum().clamp_min(1)


def router_z_loss(logits_TE: torch.Tensor, keep_T: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2."""
    return token_mean(torch.logsumexp(logits_TE, dim=-1).square(), keep_T)


def cv_squared(x_E: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation, Var/Mean^2 (Shazeer 2017, eq. 6), with the population variance."""
    if x_E.dtype != torch.float64:  # float64 stays float64 so gradcheck can run on it
        x_E = x_E.float()
    if x_E.numel() <= 1:
        return x_E.new_zeros(())
    return x_E.var(unbiased=False) / (x_E.mean().square() + 1e-10)


def importance(gates_TE: torch.Tensor, keep_T: torch.Tensor | None = None) -> torch.Tensor:
    """Shazeer §4: Importance(X) = sum over the batch of each expert's gate value G(x)_i. Returns (E,)."""
    return token_sum(gates_TE, keep_T)


def importance_loss(gates_TE: torch.Tensor, keep_T: torch.Tensor | None = None) -> torch.Tensor:
    """Shazeer eq. (6) without its coefficient: CV(Importance(X))^2."""
    return cv_squared(importance(gates_TE, keep_T))


def kth_excluding(h_TE: torch.Tensor, k: int) -> torch.Tensor:
    """Shazeer appendix A: kth_excluding(H(x), k, i) for every i, the k-th highest component of H(x)
    once component i is left out. Returns (T, E).

    Leaving out a component that is itself among the top k moves the k-th place to the (k+1)-th
    value; leaving out any other component leaves the k-th value in place.
    """
    num_experts = h_TE.shape[-1]
    if k >= num_experts:
        # with k = E every expert is always kept: no competitor, the threshold is -inf (P = 1)
        return torch.full_like(h_TE, float("-inf"))
    top_TK1, _ = h_TE.topk(k + 1, dim=-1)
    kth_T1, next_T1 = top_TK1[:, k - 1:k], top_TK1[:, k:k + 1]
    in_top_TE = h_TE >= kth_T1
    return torch.where(in_top_TE, next_T1, kth_T1)


def normal_cdf(z: torch.Tensor) -> torch.Tensor:
    """Phi, the standard normal CDF."""
    return 0.5 * (1.0 + torch.erf(z * 0.7071067811865476))


def smooth_load(clean_TE: torch.Tensor, noisy_TE: torch.Tensor, noise_std_TE: torch.Tensor, k: int,
                keep_T: torch.Tensor | None = None) -> torch.Tensor:
    """Shazeer appendix A, eqs. (8)-(9): Load(X)_i = sum_x P(x, i) with

        P(x, i) = Phi( ((x W_g)_i - kth_excluding(H(x), k, i)) / Softplus((x W_noise)_i) )

    the probability that expert i stays in the top k when only its own noise is redrawn.
    `clean_TE` = x W_g, `noisy_TE` = H(x), `noise_std_TE` = Softplus(x W_noise). Returns (E,).
    """
    threshold_TE = kth_excluding(noisy_TE, k)
    return token_sum(normal_cdf((clean_TE - threshold_TE) / noise_std_TE), keep_T)


def load_loss(clean_TE: torch.Tensor, noisy_TE: torch.Tensor, noise_std_TE: torch.Tensor, k: int,
              keep_T: torch.Tensor | None = None) -> torch.Tensor:
    """Shazeer eq. (11) without its coefficient: CV(Load(X))^2."""
    return cv_squared(smooth_load(clean_TE, noisy_TE, noise_std_TE, k, keep_T))
