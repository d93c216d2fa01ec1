"""Upcycling by splitting: partition a dense FFN's F hidden neurons into E experts of F/E neurons
(MoEfication, LLaMA-MoE), instead of copying the whole FFN into every expert.

Shape legend: F dense hidden neurons, E experts, Fe ~ F / E neurons per expert, D model dim,
O output dim.

    dense:     y = W2 h(x) + b2,          h(x) = act(W1 x + b1) [* (W3 x + b3)]   (h is per neuron)
    expert e:  y_e = E * W2[:, I_e] h_{I_e}(x) + b2                            (I_e: e's neurons)
    MoE:       y = sum_{e in top-k} g_e y_e,   sum_e g_e = 1 (scale-preserving gates)

Why the scale E and a full b2 in every expert: with top_k == E and uniform gates (g_e = 1/E, which
`uniform_router` arranges by zeroing the router weight) the MoE computes
sum_e (1/E) (E W2_e h_e + b2) = W2 h + b2 exactly, and b2 counts once because the gates sum to 1.
With top_k < E only k of the E partial sums are added: the layer is *not* function preserving
(each selected partial is weighted ~E/k so the output keeps the dense scale on average); the
conversion report states how far the outputs moved on the example inputs.

When E does not divide F the last neurons of some experts are zero padding (zero input rows and
zero output columns contribute nothing, whatever the activation).

Partitions: `random` (a seeded permutation) or `cluster` (balanced k-means of the neurons' input
weight vectors, so neurons that respond to similar inputs share an expert, as in MoEfication).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moeify.config import MoEConfig
from moeify.errors import ConfigError


def split_d_ff(d_ff: int, num_experts: int) -> int:
    """Neurons per expert (Fe): ceil(F / E), rounded up to a multiple of 8 when E does not divide F.

    Why 8: grouped_mm wants 16-byte aligned strides; the extra neurons are zero padding.
    """
    per_expert = math.ceil(d_ff / num_experts)
    return per_expert if d_ff % num_experts == 0 else 8 * math.ceil(per_expert / 8)


def random_partition(d_ff: int, num_experts: int, generator: torch.Generator) -> list[torch.Tensor]:
    perm_F = torch.randperm(d_ff, generator=generator)
    return [idx.sort().values for idx in torch.tensor_split(perm_F, num_experts)]


def balanced_assign(dist_FE: torch.Tensor, capacity: int) -> torch.Tensor:
    """Each neuron to a cluster, nearest pairs first, no cluster above `capacity`. Returns (F,) ids."""
    num_neurons, num_clusters = dist_FE.shape
    order = torch.argsort(dist_FE.reshape(-1), stable=True)
    assign_F = torch.full((num_neurons,), -1, dtype=torch.long)
    fill_E = [0] * num_clusters
    left = num_neurons
    for flat in order.tolist():
        f, e = divmod(flat, num_clusters)
        if assign_F[f] >= 0 or fill_E[e] >= capacity:
            continue
        assign_F[f] = e
        fill_E[e] += 1
        left -= 1
        if left == 0:
            break
    return assign_F


def cluster_partition(vectors_FK: torch.Tensor, num_experts: int, generator: torch.Generator,
                      iterations: int = 10) -> list[torch.Tensor]:
    """Balanced k-means: clusters of at most ceil(F/E) neurons, centroids from a seeded pick."""
    x_FK = vectors_FK.detach().float()
    x_FK = x_FK / x_FK.norm(dim=1, keepdim=True).clamp_min(1e-12)  # direction, not magnitude, groups neurons
    num_neurons = x_FK.shape[0]
    capacity = math.ceil(num_neurons / num_experts)
    centroids_EK = x_FK[torch.randperm(num_neurons, generator=generator)[:num_experts]].clone()
    assign_F = torch.zeros(num_neurons, dtype=torch.long)
    for _ in range(iterations):
        new_F = balanced_assign(torch.cdist(x_FK, centroids_EK), capacity)
        if torch.equal(new_F, assign_F):
            break
        assign_F = new_F
        for e in range(num_experts):
            members = x_FK[assign_F == e]
            if len(members):
                centroids_EK[e] = members.mean(0)
    return [torch.nonzero(assign_F == e).flatten() for e in range(num_experts)]


def partition_neurons(dense, num_experts: int, method: str, generator: torch.Generator) -> list[torch.Tensor]:
    """E sorted index tensors that together hold each of the dense FFN's F neurons once."""
    if dense.d_ff < num_experts:
        raise ConfigError(f"init='split' needs at least one hidden neuron per expert: the FFN has d_ff={dense.d_ff} "
                          f"< num_experts={num_experts}; use fewer experts or init='copy'")
    if method == "random":
        return random_partition(dense.d_ff, num_experts, generator)
    if method == "cluster":
        if dense.w1.is_meta:  # a structure without values (out-of-core planning): sizes only, nothing drawn
            return list(torch.arange(dense.d_ff).tensor_split(num_experts))
        return cluster_partition(dense.w1, num_experts, generator)
    raise ConfigError(f"split_method {method!r} is unknown: use 'random' or 'cluster'")


def init_split(experts: nn.Module, dense, cfg: MoEConfig, generator: torch.Generator) -> list[torch.Tensor]:
    """Fill `experts` (built with d_ff = split_d_ff(F, E)) from `dense`'s neurons; returns the partition."""
    groups = partition_neurons(dense, cfg.num_experts, cfg.split_method, generator)
    scale = float(cfg.num_experts)
    with torch.no_grad():
        for param in experts.parameters():
            param.zero_()  # padding neurons stay exactly zero
        for e, idx in enumerate(groups):
            n = len(idx)
            experts.w1_EFD[e, :n] = dense.w1[idx]
            experts.w2_EDF[e, :, :n] = dense.w2[:, idx] * scale
            if dense.w3 is not None:
                experts.w3_EFD[e, :n] = dense.w3[idx]
            if dense.b1 is not None:
                experts.b1_EF[e, :n] = dense.b1[idx]
            if dense.b3 is not None:
                experts.b3_EF[e, :n] = dense.b3[idx]
            if dense.b2 is not None:
                experts.b2_ED[e] = dense.b2  # full bias in every expert: the gates sum to 1, so it counts once
    return groups


def uniform_router(router: nn.Module, cfg: MoEConfig) -> None:
    """With top_k == E, zero the router weight so every gate starts at 1/E (the split is then exact).

    With top_k < E the random router is kept: equal logits would send every token to the same
    first k experts.
    """
    gate = getattr(router, "gate", None)
    if cfg.top_k == cfg.num_experts and isinstance(gate, nn.Linear):
        with torch.no_grad():
            gate.weight.zero_()
