"""Routers: token representations in, token-expert assignments and their gate weights out.

Shape legend: T tokens, D model dim, E experts, K experts per token, N assignments (T*K for
token-choice routers), C tokens per expert (expert choice), G expert groups, J groups per token
(hierarchical), M experts per group.

    TopKRouter          softmax -> top-k -> renormalise (Mixtral), or top-k -> softmax
    SwitchRouter        top-1, gate = router probability (Fedus §2.1), optional input jitter
    NoisyTopKRouter     Shazeer §2.1: H = x W_g + N(0,1) * Softplus(x W_noise); softmax(KeepTopK(H, k))
    ExpertChoiceRouter  each expert takes its top-C tokens by router probability (Zhou et al. 2022)
    HierarchicalRouter  Shazeer app. B: a primary gate picks groups, a secondary gate per group picks
                        experts; total gate = primary * secondary

Every router returns a :class:`Routing`: a flat list of (token, expert, weight) assignments, so
token-choice (top-k), capacity-limited and expert-choice routing share one dispatcher. The router
runs in float32 whatever the model's dtype or autocast state (Switch §2.4 selective precision).
A router given a `capacity` child (`moeify.moe.capacity.CapacityLimit`, set by `make_router`)
drops the assignments over each expert's capacity before returning, so capacity limits apply in
the eager layer and in the rewritten graph alike.

Padding: inside `moeify.token_mask(model, mask)` a router holds a `TokenMask`; the tokens it marks
as padding still get routed (their outputs are whatever the model makes of them), but the losses
are computed over the counted tokens only, the capacity limit gives padding only the slots no
counted token needs, expert choice never picks padding, and `Routing.keep_T` carries the mask on
to the router statistics.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from moeify.errors import TokenMaskError
from moeify.moe import losses


class Routing(NamedTuple):
    token_N: torch.Tensor  # int64: token index of each assignment
    expert_N: torch.Tensor  # int64: expert index of each assignment
    weight_N: torch.Tensor  # float32 gate weight of each assignment
    logits_TE: torch.Tensor  # float32 router logits (clean, before noise)
    probs_TE: torch.Tensor  # float32 router probabilities over all experts (noisy_topk: of the noisy logits)
    losses: dict  # name -> unweighted float32 scalar loss; plus the statistic "dropped_fraction"
    keep_T: torch.Tensor | None = None  # bool: the tokens that count (not padding); None: all of them
    demand_E: torch.Tensor | None = None  # int64: counted assignments per expert before a capacity limit dropped any
    # every token has exactly this many assignments, token-major (token_N = arange(T).repeat_interleave(it)):
    # dispatch and combine then gather instead of scatter-adding; None: any layout (a capacity limit dropped some)
    per_token: int | None = None


class TokenMask(NamedTuple):
    """Which of a layer's tokens count, set on its router by `moeify.token_mask` for one block."""
    keep_T: torch.Tensor  # bool, one entry per token of the layer's input, in its flattened order
    layer: str  # the layer's name, for the error when the layer sees other tokens
    shape: tuple[int, ...]  # the mask's shape as given, checked against the layer input's leading dims


def per_assignment(keep_T: torch.Tensor | None, k: int) -> torch.Tensor | None:
    """keep_T for the token-major assignments of a token-choice decision (k per token)."""
    return None if keep_T is None else keep_T.repeat_interleave(k)


def init_router_weight(weight: torch.Tensor, scale: float, generator: torch.Generator | None) -> None:
    """Switch §2.4: truncated normal, std sqrt(scale / fan_in) before the cut at two std (values beyond it
    are drawn again, not clamped: a clamp piled 4.5% of the weights onto the bounds)."""
    std = math.sqrt(scale / weight.shape[-1])
    with torch.no_grad():
        values = torch.empty(weight.shape, dtype=torch.float32)
        torch.nn.init.trunc_normal_(values, std=std, a=-2 * std, b=2 * std, generator=generator)
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


def router_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """A router's parameter dtype in a model of `model_dtype`: float32 at least (Switch §2.4 selective
    precision), float64 in a float64 model."""
    return torch.promote_types(model_dtype, torch.float32)


def router_linear(linear: nn.Linear, x_TD: torch.Tensor) -> torch.Tensor:
    """`linear(x)` in float32 at least (float64 when the router was made float64, for gradcheck),
    with autocast off: router logits never drop to bf16/fp16 (Switch §2.4)."""
    dtype = torch.promote_types(linear.weight.dtype, torch.float32)
    with torch.autocast(device_type=x_TD.device.type, enabled=False):
        bias = None if linear.bias is None else linear.bias.to(dtype)
        return F.linear(x_TD.to(dtype), linear.weight.to(dtype), bias)


def keep_topk_softmax(h_TE: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shazeer eqs. (3)-(5): G(x) = Softmax(KeepTopK(H(x), k)), returned as the k kept gates and indices."""
    top_TK, idx_TK = h_TE.topk(k, dim=-1)
    return top_TK.softmax(dim=-1), idx_TK


def topk_gates(logits_TE: torch.Tensor, k: int, softmax_before_topk: bool,
               normalize: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate_TK, idx_TK, probs_TE) of the plain top-k router in either order."""
    probs_TE = logits_TE.softmax(dim=-1)
    if softmax_before_topk:
        gate_TK, idx_TK = probs_TE.topk(k, dim=-1)
        if normalize:
            gate_TK = gate_TK / gate_TK.sum(dim=-1, keepdim=True)
        return gate_TK, idx_TK, probs_TE
    gate_TK, idx_TK = keep_topk_softmax(logits_TE, k)
    return gate_TK, idx_TK, probs_TE


def noisy_logits(x_TD: torch.Tensor, gate: nn.Linear, noise: nn.Linear, noise_eps: float,
                 training: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shazeer eq. (4): clean = x W_g, std = Softplus(x W_noise) (+ eps), H = clean + N(0,1) * std.

    The noise is drawn only in training; in eval H = clean. `noise_eps` keeps the smooth load
    estimator finite where Softplus underflows (the authors' code uses 1e-2; 0 is the paper's text).
    """
    clean_TE = router_linear(gate, x_TD)
    std_TE = F.softplus(router_linear(noise, x_TD)) + noise_eps
    if not training:
        return clean_TE, clean_TE, std_TE
    return clean_TE, clean_TE + torch.randn_like(clean_TE) * std_TE, std_TE


def gates_to_load(idx_TK: torch.Tensor, num_experts: int, dtype: torch.dtype,
                  keep_T: torch.Tensor | None = None) -> torch.Tensor:
    """Tokens per expert of a decision: the (non-smooth) load used when no noise is drawn."""
    return losses.count_indices(idx_TK, num_experts, per_assignment(keep_T, idx_TK.shape[-1])).to(dtype)


class _RouterBase(nn.Module):
    def __init__(self, d_model: int, num_experts: int, *, bias: bool = False) -> None:
        super().__init__()
        self.d_model, self.num_experts = d_model, num_experts
        self.gate = nn.Linear(d_model, num_experts, bias=bias, dtype=torch.float32)
        self.capacity: nn.Module | None = None  # a CapacityLimit, set by make_router
        self.loss_names: frozenset[str] | None = None  # set by MoELayer from its coefficients; None: all
        self.token_mask: TokenMask | None = None  # set inside `moeify.token_mask`; None: every token counts
        self._forward_mask: TokenMask | None = None  # the mask of the last forward (for checkpoint recomputes)

    def wants(self, name: str) -> bool:
        """Whether to compute the loss `name`. A router on its own computes every loss; inside an
        MoE layer it computes only those the layer weighs (coefficient > 0), and none while autograd
        is off, as in inference: nothing can train on them there."""
        return self.loss_names is None or (name in self.loss_names and torch.is_grad_enabled())

    def init_weights(self, scale: float, generator: torch.Generator | None) -> None:
        init_router_weight(self.gate.weight, scale, generator)
        if self.gate.bias is not None:
            nn.init.zeros_(self.gate.bias)

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        return router_linear(self.gate, x_TD)

    def counted(self, x_TD: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor | None:
        """The `TokenMask`'s bool (T,) for these tokens, or None when every token counts. `x`, the layer's
        input before its leading dims were flattened (None: not known), must have the mask's layout when
        it has as many leading dims: a (B, S) mask does not fit a sequence-first (S, B) layer.

        A forward that activation checkpointing recomputes inside the backward (non-reentrant: after the
        `token_mask` block has ended, as a training loop runs it) takes the mask of the last forward, so
        the recompute routes and weighs as the forward did (under torch.compile the recompute is part of
        the compiled graph and needs nothing)."""
        mask = self.token_mask
        if not torch.compiler.is_compiling():
            if torch._C._current_graph_task_id() != -1:  # running inside a backward: a checkpoint recompute
                mask = self._forward_mask
            elif self._forward_mask is not mask:  # (a module attribute write costs a few µs: only on change)
                self._forward_mask = mask
        if mask is None:
            return None
        if mask.keep_T.shape[0] != x_TD.shape[0]:
            raise TokenMaskError(
                f"the token mask has {mask.keep_T.shape[0]} entr{'y' if mask.keep_T.shape[0] == 1 else 'ies'} but "
                f"MoE layer {mask.layer!r} sees {x_TD.shape[0]} tokens in this call: give moeify.token_mask the "
                "module whose MoE layers all see the masked batch (an encoder-decoder's stacks apart, "
                "token_mask(model.encoder, src_mask)), and run generation outside the block")
        lead = () if x is None else tuple(x.shape[:-1])
        if len(lead) == len(mask.shape) and lead != mask.shape:
            fix = ("it is laid out sequence-first: pass the mask transposed" if lead == mask.shape[::-1]
                   else "pass a mask laid out as its input's leading dims")
            raise TokenMaskError(f"the token mask is {tuple(mask.shape)} but MoE layer {mask.layer!r} sees tokens laid "
                                 f"out {lead}: {fix}")
        return mask.keep_T.to(x_TD.device)

    def __getstate__(self) -> dict:
        """A copy or a pickle starts without a token mask: the mask belongs to the block it was made in."""
        state = dict(self.__dict__)
        state.update(token_mask=None, _forward_mask=None)
        return state

    def finish(self, routing: Routing) -> Routing:
        """Apply the capacity limit, if any (it records "dropped_fraction")."""
        return routing if self.capacity is None else self.capacity(routing)

    def token_choice(self, idx_TK: torch.Tensor, gate_TK: torch.Tensor, logits_TE: torch.Tensor,
                     probs_TE: torch.Tensor, keep_T: torch.Tensor | None, **extra_losses: torch.Tensor) -> Routing:
        """Package a token-choice decision: gates filled to sum 1 (`fill_gates`), the standard losses
        over the counted tokens (`keep_T`) plus `extra_losses`, then the capacity limit."""
        gate_TK = fill_gates(gate_TK, self.preserve_scale)
        token_N, expert_N, weight_N = token_major(idx_TK, gate_TK)
        found = self.standard_losses(logits_TE, probs_TE, expert_N,
                                     lambda: torch.zeros_like(probs_TE).scatter(1, idx_TK, gate_TK),
                                     keep_T, per_assignment(keep_T, idx_TK.shape[-1]))
        return self.finish(Routing(token_N, expert_N, weight_N, logits_TE, probs_TE, found | extra_losses, keep_T,
                                   per_token=idx_TK.shape[-1]))

    def standard_losses(self, logits_TE: torch.Tensor, probs_TE: torch.Tensor, expert_N: torch.Tensor,
                        gates_TE: Callable[[], torch.Tensor], keep_T: torch.Tensor | None,
                        keep_N: torch.Tensor | None) -> dict:
        """The losses every router has that `wants` asks for, over the counted tokens (`keep_T`, and
        `keep_N` for the assignments; None: all). `gates_TE` is computed only if importance is."""
        found = {}
        if self.wants("load_balance"):
            found["load_balance"] = losses.load_balancing_loss(probs_TE, expert_N, self.num_experts, keep_T, keep_N)
        if self.wants("z_loss"):
            found["z_loss"] = losses.router_z_loss(logits_TE, keep_T)
        if self.wants("importance"):
            found["importance"] = losses.importance_loss(gates_TE(), keep_T)
        return found


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

    def forward(self, x_TD: torch.Tensor, x: torch.Tensor | None = None) -> Routing:
        logits_TE = self.logits(x_TD)
        gate_TK, idx_TK, probs_TE = topk_gates(logits_TE, self.top_k, self.softmax_before_topk, self.normalize)
        return self.token_choice(idx_TK, gate_TK, logits_TE, probs_TE, self.counted(x_TD, x))


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

    def forward(self, x_TD: torch.Tensor, x: torch.Tensor | None = None) -> Routing:
        if self.training and self.jitter > 0:
            noise = torch.empty_like(x_TD, dtype=torch.float32).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            x_TD = x_TD.float() * noise
        logits_TE = self.logits(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        gate_T1, idx_T1 = probs_TE.max(dim=-1, keepdim=True)
        return self.token_choice(idx_T1, gate_T1, logits_TE, probs_TE, self.counted(x_TD, x))


class NoisyTopKRouter(_RouterBase):
    """Shazeer et al. 2017 §2.1, noisy top-k gating:

        H(x)_i = (x W_g)_i + StandardNormal() * Softplus((x W_noise)_i)
        G(x) = Softmax(KeepTopK(H(x), k))

    The noise is drawn only in training mode. Besides the standard losses it returns
    "load" = CV(Load(X))^2 with the smooth estimator of appendix A (training), or the tokens per
    expert when no noise is drawn (eval; not differentiable, as in the authors' code).
    `W_g` and `W_noise` start at zero in the paper; here W_g gets the usual router init and W_noise
    zero (constant noise std Softplus(0) + eps), see `init_weights`.
    """

    def __init__(self, d_model: int, num_experts: int, top_k: int, *, noise_eps: float = 1e-2,
                 preserve_scale: bool = True, bias: bool = False) -> None:
        super().__init__(d_model, num_experts, bias=bias)
        self.noise = nn.Linear(d_model, num_experts, bias=False, dtype=torch.float32)
        self.top_k, self.noise_eps, self.preserve_scale = top_k, noise_eps, preserve_scale

    def extra_repr(self) -> str:
        return f"top_k={self.top_k}, noise_eps={self.noise_eps}, preserve_scale={self.preserve_scale}"

    def init_weights(self, scale: float, generator: torch.Generator | None) -> None:
        super().init_weights(scale, generator)
        nn.init.zeros_(self.noise.weight)

    def forward(self, x_TD: torch.Tensor, x: torch.Tensor | None = None) -> Routing:
        clean_TE, noisy_TE, std_TE = noisy_logits(x_TD, self.gate, self.noise, self.noise_eps, self.training)
        gate_TK, idx_TK = keep_topk_softmax(noisy_TE, self.top_k)
        probs_TE = noisy_TE.softmax(dim=-1)
        keep_T = self.counted(x_TD, x)
        extra = {}
        if self.wants("load"):
            extra["load"] = (losses.load_loss(clean_TE, noisy_TE, std_TE, self.top_k, keep_T) if self.training
                             else losses.cv_squared(gates_to_load(idx_TK, self.num_experts, clean_TE.dtype, keep_T)))
        return self.token_choice(idx_TK, gate_TK, clean_TE, probs_TE, keep_T, **extra)


def expert_choice_capacity(num_tokens: int, top_k: int, factor: float, num_experts: int) -> int:
    """Tokens each expert takes under expert choice: ceil(factor * T * k / E), at most T."""
    return min(num_tokens, max(1, math.ceil(round(factor * num_tokens * top_k / num_experts, 9))))


class ExpertChoiceRouter(_RouterBase):
    """Expert choice (Zhou et al. 2022): S = softmax(x W_g) over experts, then each expert takes the
    C tokens with the highest S[:, e], C = ceil(capacity * T * k / E); gate = S[t, e].

    Perfectly balanced by construction, but a token may be chosen by no expert (its MoE output is
    zero; "dropped_fraction" records the fraction of such tokens) or by many. Under a token mask,
    C counts only the counted tokens and no expert picks padding. With
    `preserve_scale` the gates of each chosen token are shifted to sum to 1 in the forward pass
    (`fill_gates` per token), so a token chosen by at least one copy-initialised expert gets exactly
    the dense output; capacity >= E / k (C = T: every expert takes every token) makes the whole layer
    function preserving.
    """

    def __init__(self, d_model: int, num_experts: int, top_k: int, *, capacity: float = 1.0,
                 preserve_scale: bool = True, bias: bool = False) -> None:
        super().__init__(d_model, num_experts, bias=bias)
        self.top_k, self.capacity_factor, self.preserve_scale = top_k, capacity, preserve_scale

    def extra_repr(self) -> str:
        return f"top_k={self.top_k}, capacity={self.capacity_factor}, preserve_scale={self.preserve_scale}"

    def forward(self, x_TD: torch.Tensor, x: torch.Tensor | None = None) -> Routing:
        logits_TE = self.logits(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        T, E = probs_TE.shape
        keep_T = self.counted(x_TD, x)
        if keep_T is None:
            C = expert_choice_capacity(T, self.top_k, self.capacity_factor, E)
            gate_EC, token_EC = probs_TE.t().topk(C, dim=-1)
        else:  # padding scores below every probability, and C <= the counted tokens: never picked
            C = expert_choice_capacity(int(keep_T.sum()), self.top_k, self.capacity_factor, E)
            gate_EC, token_EC = probs_TE.masked_fill(~keep_T.unsqueeze(-1), -1.0).t().topk(C, dim=-1)
        token_N, weight_N = token_EC.reshape(-1), gate_EC.reshape(-1)
        expert_N = torch.arange(E, device=token_N.device).repeat_interleave(C)
        chosen_T = losses.count_indices(token_N, T)
        if self.preserve_scale:
            sum_T = weight_N.new_zeros(T).index_add(0, token_N, weight_N)
            deficit_T = (1.0 - sum_T) / chosen_T.clamp_min(1).to(sum_T.dtype)
            weight_N = weight_N + deficit_T.detach()[token_N]
        found = self.standard_losses(logits_TE, probs_TE, expert_N,  # every pick is a counted token: keep_N None
                                     lambda: torch.zeros_like(probs_TE).index_put((token_N, expert_N), weight_N),
                                     keep_T, None)
        found["dropped_fraction"] = losses.token_mean((chosen_T == 0).to(probs_TE.dtype), keep_T).detach()
        return self.finish(Routing(token_N, expert_N, weight_N, logits_TE, probs_TE, found, keep_T))


class HierarchicalRouter(_RouterBase):
    """Shazeer et al. 2017 appendix B: a primary gate over G groups keeps `group_top_k` groups, a
    secondary gate per group (one block of M = E/G columns of `gate`) keeps `top_k` experts of each
    kept group; an assignment's gate is primary * secondary. Each level is a top-k router of the
    same kind (noisy with `noisy=True`), so with gates summing to 1 per level the products sum to 1
    and a copy-initialised layer computes the dense function.

    `top_k` (experts per token) = group_top_k * experts_per_group_top_k. Losses, per appendix B:
    "importance" = CV(Importance_H)^2 with Importance_H(X)_{g,j} = sum_x G_p(x)_g G_g(x)_j, and for
    noisy gates "load" = CV(Load_H)^2 with Load_H(X)_{g,j} = Load_p(X)_g Load_g(X^(g))_j / |X^(g)|,
    X^(g) the tokens whose primary gate g is non-zero. `logits_TE` is log(primary * secondary) of
    the clean logits (its softmax is the hierarchical distribution); "z_loss" is the sum of the
    two levels' z-losses.
    """

    def __init__(self, d_model: int, num_experts: int, num_groups: int, group_top_k: int, top_k: int, *,
                 noisy: bool = False, softmax_before_topk: bool = True, normalize: bool = True,
                 preserve_scale: bool = True, noise_eps: float = 1e-2, bias: bool = False) -> None:
        super().__init__(d_model, num_experts, bias=bias)
        self.num_groups, self.group_top_k, self.expert_top_k = num_groups, group_top_k, top_k
        self.per_group = num_experts // num_groups
        self.top_k = group_top_k * top_k
        self.noisy, self.noise_eps = noisy, noise_eps
        self.softmax_before_topk, self.normalize, self.preserve_scale = softmax_before_topk, normalize, preserve_scale
        self.primary_gate = nn.Linear(d_model, num_groups, bias=bias, dtype=torch.float32)
        if noisy:
            self.primary_noise = nn.Linear(d_model, num_groups, bias=False, dtype=torch.float32)
            self.noise = nn.Linear(d_model, num_experts, bias=False, dtype=torch.float32)

    def extra_repr(self) -> str:
        return (f"num_groups={self.num_groups}, group_top_k={self.group_top_k}, top_k_per_group={self.expert_top_k}, "
                f"noisy={self.noisy}, preserve_scale={self.preserve_scale}")

    def init_weights(self, scale: float, generator: torch.Generator | None) -> None:
        super().init_weights(scale, generator)
        init_router_weight(self.primary_gate.weight, scale, generator)
        if self.primary_gate.bias is not None:
            nn.init.zeros_(self.primary_gate.bias)
        if self.noisy:
            nn.init.zeros_(self.primary_noise.weight)
            nn.init.zeros_(self.noise.weight)

    def _level(self, x_TD: torch.Tensor, gate: nn.Linear, noise: nn.Linear | None, k: int, blocks: int):
        """One gating level over `blocks` independent softmaxes of the gate's columns."""
        T, width = x_TD.shape[0], gate.out_features // blocks  # (width named: T may be 0)
        if noise is None:
            clean = router_linear(gate, x_TD).reshape(T * blocks, width)
            g, idx, probs = topk_gates(clean, k, self.softmax_before_topk, self.normalize)
            load = None
        else:
            clean, noisy, std = noisy_logits(x_TD, gate, noise, self.noise_eps, self.training)
            clean, noisy, std = (t.reshape(T * blocks, width) for t in (clean, noisy, std))
            g, idx = keep_topk_softmax(noisy, k)
            probs = noisy.softmax(dim=-1)
            # P(x, i) of appendix A per token (summed over the tokens later, per group for level 2)
            load = (losses.normal_cdf((clean - losses.kth_excluding(noisy, k)) / std) if self.training
                    else torch.zeros_like(clean).scatter(1, idx, 1.0))
        return clean, fill_gates(g, self.preserve_scale), idx, probs, load

    def forward(self, x_TD: torch.Tensor, x: torch.Tensor | None = None) -> Routing:
        T, G, M, J, K = x_TD.shape[0], self.num_groups, self.per_group, self.group_top_k, self.expert_top_k
        p_clean_TG, p_gate_TJ, p_idx_TJ, p_probs_TG, p_load_TG = self._level(
            x_TD, self.primary_gate, self.primary_noise if self.noisy else None, J, 1)
        s_clean, s_gate, s_idx, s_probs, s_load = self._level(x_TD, self.gate, self.noise if self.noisy else None, K, G)
        s_gate_TGK, s_idx_TGK = s_gate.reshape(T, G, K), s_idx.reshape(T, G, K)
        pick_TJK = p_idx_TJ.unsqueeze(-1).expand(T, J, K)
        weight_TJK = p_gate_TJ.unsqueeze(-1) * s_gate_TGK.gather(1, pick_TJK)
        expert_TJK = p_idx_TJ.unsqueeze(-1) * M + s_idx_TGK.gather(1, pick_TJK)
        token_N = torch.arange(T, device=x_TD.device).repeat_interleave(J * K)
        expert_N, weight_N = expert_TJK.reshape(-1), weight_TJK.reshape(-1)

        probs_TE = (p_probs_TG.unsqueeze(-1) * s_probs.reshape(T, G, M)).reshape(T, G * M)
        logits_TGM = p_clean_TG.log_softmax(-1).unsqueeze(-1) + s_clean.log_softmax(-1).reshape(T, G, M)
        logits_TE = logits_TGM.reshape(T, G * M)
        keep_T = self.counted(x_TD, x)  # the losses below are over the counted tokens
        found = {}
        if self.wants("load_balance"):
            found["load_balance"] = losses.load_balancing_loss(probs_TE, expert_N, self.num_experts, keep_T,
                                                               per_assignment(keep_T, J * K))
        if self.wants("z_loss"):
            found["z_loss"] = (losses.router_z_loss(p_clean_TG, keep_T)
                               + losses.router_z_loss(s_clean, per_assignment(keep_T, G)))  # rows (T*G, M)
        if self.wants("importance"):
            found["importance"] = losses.importance_loss(
                torch.zeros_like(probs_TE).index_put((token_N, expert_N), weight_N, accumulate=True), keep_T)
        if self.noisy and self.wants("load"):
            in_group_TG = torch.zeros_like(p_probs_TG).scatter(1, p_idx_TJ, 1.0)  # X^(g) membership
            load_G = losses.token_sum(p_load_TG, keep_T)
            sub_load_GM = losses.token_sum(in_group_TG.unsqueeze(-1) * s_load.reshape(T, G, M), keep_T)
            members_G = losses.token_sum(in_group_TG, keep_T)  # |X^(g)|
            load_GM = load_G.unsqueeze(-1) * sub_load_GM / members_G.clamp_min(1).unsqueeze(-1)
            found["load"] = losses.cv_squared(load_GM.reshape(-1))
        return self.finish(Routing(token_N, expert_N, weight_N, logits_TE, probs_TE, found, keep_T, per_token=J * K))
