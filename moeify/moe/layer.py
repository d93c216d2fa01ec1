"""`MoELayer`: router -> dispatch -> experts -> combine, with its auxiliary losses recorded.

Shape legend: T tokens (all leading dims flattened), D model dim, E experts, N assignments.

The graph pass `rewrite_to_moe` emits the same four steps as separate graph nodes that call this
layer's children; `MoELayer.forward` is the eager equivalent used when the layer stands alone.
Auxiliary losses are kept on the layer's `aux` child (never in module globals) and collected by
`moeify.aux_loss(model)`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from moeify.errors import CheckpointingError, TransformError
from moeify.moe.dispatch import DispatchPlan, LocalCombine, LocalDispatch
from moeify.moe.experts import GroupedExperts
from moeify.moe.losses import count_indices, token_mean
from moeify.moe.router import Routing, router_dtype


def flatten_tokens(x: torch.Tensor, d_model: int) -> torch.Tensor:
    """(..., D) -> (T, D): the MoE routes every position of every sequence independently."""
    if not torch.compiler.is_compiling() and torch._C._functorch.is_batchedtensor(x):
        raise TransformError("an MoE layer cannot run under torch.func.vmap: its routing gives each expert a number "
                             "of tokens that depends on the data, which vmap cannot batch; loop over the samples, "
                             "or run them as one batch (every token is routed on its own)")
    return x.reshape(-1, d_model)


def unflatten_tokens(y_TD: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(T, O) -> x's leading shape + (O,)."""
    return y_TD.reshape(*x.shape[:-1], y_TD.shape[-1])


LOSS_COEF_FIELDS = {
    "load_balance": "load_balance_coef",
    "z_loss": "z_loss_coef",
    "importance": "importance_coef",
    "load": "load_coef",
}


class _StatsInputs(NamedTuple):
    """What one call's router statistics are computed from, detached (computed when first read)."""
    expert_N: torch.Tensor
    probs_TE: torch.Tensor
    dropped: torch.Tensor | None
    token_N: torch.Tensor
    keep_T: torch.Tensor | None  # the counted tokens under a token mask (padding left out of the statistics)
    demand_E: torch.Tensor | None  # assignments per expert before capacity; None: no capacity limit ran


class AuxLossRecorder(nn.Module):
    """Keeps the weighted aux losses and router statistics of the layer's last forward.

    The losses are the router's, weighted by `coefs`; the router computes only those with a
    coefficient above 0, and none while autograd is off (see `_RouterBase.wants`). The statistics
    are computed when `last_stats` is first read, so a forward that nobody inspects pays nothing
    for them (at one token per step, as in decoding, they cost 5% of the layer).
    """

    _is_impure = True  # a graph node calling it has no users: keep it through dead-code elimination

    def __init__(self, num_experts: int, coefs: dict[str, float]) -> None:
        super().__init__()
        self.num_experts = num_experts
        self._coefs = tuple(coefs.items())  # fixed: the router was told which losses to compute
        self._weighs_losses = any(coef > 0 for coef in coefs.values())
        # False from the start of a forward of the converted model (`mark_new_forward`) until this
        # layer records: a layer the forward skipped (LayerDrop) then reports nothing, rather than
        # an earlier step's losses whose graph a backward has already freed
        self.fresh = True
        # per call of this forward (one entry unless the layer runs several times per forward)
        self._records: dict[int, tuple[dict[str, torch.Tensor], _StatsInputs]] = {}
        self._stats: dict[str, torch.Tensor] | None = None
        # True while a forward of the converted model runs (`mark_new_forward` .. `mark_forward_done`):
        # each call of the layer then adds a record, however many calls the forward makes
        self.in_forward = False
        # how many times the layer runs per forward: several where one graph calls it at several places
        # (set by the rewrite) or its module is reused across depth (ALBERT; counted by the conversion
        # on the example forward, and after every forward of the converted model). A call outside
        # such a forward (a submodule called directly) takes the records 0..n-1 in turn.
        self.calls_per_forward = 1
        self._calls = 0
        # the last forward ran in training mode with autograd off, so the router computed no losses
        # (see `_check_graded`)
        self._ungraded = False

    @property
    def coefs(self) -> dict[str, float]:
        return dict(self._coefs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self._coefs)

    def forward(self, routing: Routing, plan: DispatchPlan | None = None) -> None:
        """Record one call's losses and what its statistics come from. The last forward's losses are
        summed over its calls and its statistics pooled; its first call drops the records before.

        Outside a forward of the converted model (a standalone layer, a submodule called directly)
        every `calls_per_forward` calls make one forward. The call count then repeats from step to
        step, as does the records' emptiness at each call: torch.compile guards on both, and a
        count that grew with every call recompiled the layer on every step."""
        self._check_graded()
        if not self.fresh:  # the first call of a forward of the converted model
            self._calls, self.fresh = 0, True
        if self.in_forward:
            call = self._calls
            self._calls += 1
        else:
            call = self._calls % self.calls_per_forward
            self._calls = (call + 1) % self.calls_per_forward
        if call == 0:
            self._records = {}
        losses = {name: coef * routing.losses[name] for name, coef in self._coefs
                  if coef > 0 and name in routing.losses}
        dropped = routing.losses.get("dropped_fraction")
        self._records[call] = (losses, _StatsInputs(routing.expert_N.detach(), routing.probs_TE.detach(),
                                                    None if dropped is None else dropped.detach(),
                                                    routing.token_N, routing.keep_T, routing.demand_E))
        self._stats = None

    def _check_graded(self) -> None:
        """Refuse reentrant gradient checkpointing, which would silently train without the aux losses:
        it runs the layer with autograd off (the router then computes no loss, as in inference, and
        `moeify.aux_loss` reads 0), and again with autograd on inside the backward, where the losses
        it computes reach no optimiser."""
        if not self.training or not self._weighs_losses:
            return
        if not torch.is_grad_enabled():
            self._ungraded = True
        elif self._ungraded and torch._C._current_graph_task_id() != -1:
            self._ungraded = False
            raise CheckpointingError(
                "an MoE layer ran without autograd in training and then again inside backward: reentrant "
                "gradient checkpointing (torch.utils.checkpoint(..., use_reentrant=True), or transformers' "
                "activation_checkpointing_kwargs / gradient_checkpointing_kwargs={'use_reentrant': True}) leaves "
                "its aux losses without gradient; use use_reentrant=False")
        else:
            self._ungraded = False

    @property
    def last_losses(self) -> dict[str, torch.Tensor]:
        """The weighted losses of the last forward (summed over its calls); {} if it did not run."""
        if not self.fresh or not self._records:
            return {}
        calls = [losses for losses, _ in self._records.values()]
        return calls[0] if len(calls) == 1 else {name: sum(losses[name] for losses in calls) for name in calls[0]}

    @property
    def last_stats(self) -> dict[str, torch.Tensor]:
        """Tokens per expert (kept, and chosen before a capacity limit), tokens, dropped fraction and
        mean gate entropy of the last forward (pooled over its calls); {} before the first, or if the
        last forward did not run it."""
        if not self.fresh:
            return {}
        if self._stats is None and self._records:
            self._stats = self._pooled([self._stats_of(inputs) for _, inputs in self._records.values()])
        return self._stats or {}

    @torch.no_grad()
    def _stats_of(self, inputs: _StatsInputs) -> dict[str, torch.Tensor]:
        keep_T = inputs.keep_T
        keep_N = None if keep_T is None else keep_T[inputs.token_N]
        p = inputs.probs_TE.clamp_min(1e-12)
        kept_E = count_indices(inputs.expert_N, self.num_experts, keep_N)
        return {
            "tokens_per_expert": kept_E,
            "demand_per_expert": kept_E if inputs.demand_E is None else inputs.demand_E,
            "num_tokens": torch.tensor(inputs.probs_TE.shape[0]) if keep_T is None else keep_T.sum(),
            "dropped_fraction": torch.zeros(()) if inputs.dropped is None else inputs.dropped,
            "gate_entropy": token_mean(-(p * p.log()).sum(-1), keep_T),
        }

    @staticmethod
    def _pooled(stats: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if len(stats) == 1:
            return stats[0]
        tokens = sum(found["num_tokens"] for found in stats)
        return {
            **{key: sum(found[key] for found in stats) for key in ("tokens_per_expert", "demand_per_expert")},
            "num_tokens": tokens,
            **{key: sum(found[key] * found["num_tokens"] for found in stats) / tokens.clamp_min(1)
               for key in ("dropped_fraction", "gate_entropy")},
        }

    def __getstate__(self) -> dict[str, Any]:
        """A copy or a pickle starts without the last forward's records: their losses are graph tensors,
        which deepcopy refuses, and belong to the original's step."""
        state = dict(self.__dict__)
        state.update(_records={}, _stats=None, _calls=0)
        return state

    def clear(self) -> None:
        """Forget the last forward's losses and statistics."""
        self._records, self._stats, self._calls = {}, None, 0


def cast_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`model.to(dtype)` in place, its MoE routers in `router_dtype(dtype)`: what moeify.convert makes of a
    dense model of that dtype (a plain model.half() puts the routers in float16 too)."""
    model.to(dtype)
    for layer in model.modules():
        if isinstance(layer, MoELayer):
            layer.router.to(router_dtype(dtype))
    return model


def mark_new_forward(model: nn.Module, args: tuple) -> None:
    """Forward pre-hook of a converted model: a forward begins, so every MoE layer's records are the
    previous forward's until the layer runs again (`AuxLossRecorder.fresh`), and each of its calls
    in this forward adds a record."""
    for recorder in model._moeify_recorders:
        recorder.fresh, recorder.in_forward = False, True


def mark_forward_done(model: nn.Module, args: tuple, output: Any) -> None:
    """Forward hook of a converted model (run on an exception too): the forward is over. A layer that
    ran more often than it was told (its module reused across depth, in a conversion that ran no
    example forward) learns its count, for calls made outside a forward of the model."""
    for recorder in model._moeify_recorders:
        recorder.in_forward = False
        if recorder.fresh and recorder._calls > recorder.calls_per_forward:
            recorder.calls_per_forward = recorder._calls


def install_forward_marker(model: nn.Module) -> None:
    """Have `model`'s forward delimit its MoE layers' records (`mark_new_forward`, `mark_forward_done`):
    the losses `moeify.aux_loss` sums are those of every call the last forward made, however many
    (a module reused across depth runs several times), and a layer the forward skips, as LayerDrop
    does, adds no loss of an earlier step. The hooks are module-level functions and the recorders a
    plain list on the model, so a deepcopy of the model marks its own copies; under `torch.compile`
    the flags read the same on every step (no recompile)."""
    model._moeify_recorders = [m for m in model.modules() if isinstance(m, AuxLossRecorder)]
    model.register_forward_pre_hook(mark_new_forward)
    model.register_forward_hook(mark_forward_done, always_call=True)


class MoELayer(nn.Module):
    """A sparsely gated mixture of FFN experts, a drop-in for one dense FFN region."""

    def __init__(self, router: nn.Module, experts: GroupedExperts, *, coefs: dict[str, float],
                 shared: GroupedExperts | None = None, shared_scale: float = 1.0,
                 routed_scale: float = 1.0) -> None:
        super().__init__()
        self.d_model, self.num_experts = experts.d_model, experts.num_experts
        self.router = router
        self.dispatch = LocalDispatch(experts.num_experts)
        self.experts = experts
        self.combine = LocalCombine()
        self.shared = shared
        self.shared_scale, self.routed_scale = shared_scale, routed_scale
        self.aux = AuxLossRecorder(experts.num_experts, coefs)
        if hasattr(router, "loss_names"):  # compute only the losses this layer weighs
            router.loss_names = frozenset(name for name, coef in coefs.items() if coef > 0)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_experts={self.num_experts}, top_k={getattr(self.router, 'top_k', None)}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_TD = flatten_tokens(x, self.d_model)
        routing = self.router(x_TD, x)
        x_ND, plan = self.dispatch(x_TD, routing)
        y_ND = self.experts(x_ND, plan.counts_E)
        y_TD = self.combine(y_ND, plan)
        self.aux(routing, plan)
        return unflatten_tokens(self.finish(y_TD, x_TD), x)

    def finish(self, y_TD: torch.Tensor, x_TD: torch.Tensor) -> torch.Tensor:
        """Add the shared experts' output (always on) to the routed output."""
        if self.shared is None:
            return y_TD
        shared_TD = sum(self.shared.forward_dense(x_TD, e) for e in range(self.shared.num_experts))
        return self.routed_scale * y_TD + self.shared_scale * shared_TD.to(y_TD.dtype)
