"""Export an MoE model to ONNX for onnxruntime, with each MoE layer lowered one of two ways.

Shape legend: T tokens, D model dim, O expert output dim (usually D), F FFN hidden dim, E experts,
K experts per token.

    fused:     router -> dispatch -> experts -> combine  =>  MatMul(router) -> com.microsoft.MoE
    portable:  router -> dispatch -> experts -> combine  =>  MatMul -> Softmax -> TopK ->
               for each expert e: NonZero(idx == e) -> Gather rows -> expert FFN -> ScatterND(add)

The lowering happens inside `torch.onnx.export(dynamo=True)`: while the exporter traces, each
`MoELayer`'s four children are swapped for export stand-ins (`_lowered_layers`) and put back
afterwards, so the training path is never touched. The converted owners' graphs call
`<layer>.router / .dispatch / .experts / .combine / .aux` by attribute (see
passes/rewrite_to_moe.py), so the stand-ins see exactly the calls the real modules see:

    router(x_TD, x)        -> logits_TE               (the op takes LOGITS: it applies softmax + top-k)
    dispatch(x_TD, logits) -> (x_TD, plan)            (no permutation; plan.counts_E carries the logits)
    experts(x_TD, logits)  -> y_TO                    (the whole routed MoE: the custom op or portable code)
    combine(y_TO, plan)    -> y_TO;  aux(...) -> None (aux losses are a training concern)

Fused mode emits the torch custom op `moeify::topk_moe`, whose onnxscript translation is one
`com.microsoft.MoE` node (fc1 (E, F, D) and fc2 (E, D, F) are moeify's own w1_EFD / w2_EDF layout).
Portable mode uses standard ONNX operators only and computes, per expert, only the rows of the
tokens routed to it (a static loop over E experts with data-dependent row counts). The exporter's
constant folding may store each expert's weights as its own slice, once per call of the layer (a
layer called three times, three copies); the file keeps one initializer per distinct tensor (same
dtype, shape and bytes), so its weights take what the fused op's shared set takes.
Shared experts stay outside the op as plain MatMuls (`MoELayer.finish`).

What the op can express, mapped from moeify's routers (each mapping is tested against numpy):

    TopKRouter softmax->topk, normalize=True          k, normalize_routing_weights=1
    TopKRouter topk->softmax                          k, normalize_routing_weights=1 (same gates: p_i / sum_topk p)
    TopKRouter normalize=False, preserve_scale=False  portable only (the op's normalize_routing_weights=0 is
                                                      computed wrongly by onnxruntime 1.31's CPU kernel when
                                                      other nodes precede it: 0.37 off in a two-layer MLP)
    TopKRouter normalize=False, preserve_scale=True   k=1: normalize=1 (gate 1); k>1: g + (1 - sum g)/k -> portable only
    SwitchRouter preserve_scale=True                  k=1, normalize=1 (forward gate exactly 1)
    SwitchRouter preserve_scale=False                 portable only (gate = p: normalize=0, as above)
    NoisyTopKRouter                                   k, normalize=1 (inference: no noise, topk->softmax)
    eval capacity, expert choice, hierarchical        refused in both modes with ExportError (batch-dependent routing)

Experts: relu/silu/gelu_tanh map to the op's activation_type; gated SiLU (SwiGLU) to swiglu with
interleaved fc1; exact-erf GELU, other gated activations, projection experts and d_out != d_model
are refused in fused mode unless `fallback="portable"` (exact standard-op lowering for those layers)
or, for exact GELU only, `allow_approximate_gelu=True` (the op's tanh GELU; the report says so).
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import logging
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, redirect_stderr
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import nn

from moeify.capture import counting_calls, eval_mode
from moeify.compare import LOW_PRECISION_ULPS, abs_diff, low_precision_eps
from moeify.config import EXPORT_ATOL
from moeify.errors import ExportError, one_line
from moeify.losses import without_token_masks
from moeify.moe.experts import GroupedExperts, activation_fn
from moeify.moe.layer import MoELayer, cast_model
from moeify.moe.projection import ProjectionExperts
from moeify.moe.router import (
    ExpertChoiceRouter,
    HierarchicalRouter,
    NoisyTopKRouter,
    SwitchRouter,
    TopKRouter,
    router_linear,
)
from moeify.serialization import check_output, write_file_atomically

MODES = ("fused", "portable")
MSFT_DOMAIN = "com.microsoft"
OPSET = 18
# the check's second input: batch + 1, sequence (and any other dynamic axis) - 3, or + 3 when the example's
# is too short to lose 3 (shorter, not longer: an example at the model's maximum length, as BERT
# deployments pad to, would run past its position table)
CHECK_SHAPE_DELTA = (1, 3)
# One ONNX file holds at most 2 GiB (protobuf's limit for a message). An upcycled model passes that soon:
# GPT-2 or BERT-base with 8 experts holds about 2 GB of float32 weights. Weights from this size on
# (64 MiB left for the graph itself) go to a data file beside the model, onnx's external data.
EXTERNAL_DATA_BYTES = (1 << 31) - (1 << 26)
# Tensors below this size stay in the model file even then: onnxruntime's shape inference reads a
# Reshape's target shape only from the model file itself.
EXTERNAL_MIN_BYTES = 1024


# routing semantics ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Gating:
    """What a router computes at inference, in the op's terms."""

    k: int
    renormalize: bool  # chosen gates divided by their sum (the op's normalize_routing_weights=1)
    fill: bool = False  # preserve_scale with raw gates, k > 1: g + (1 - sum g) / k (no op attribute for it)
    description: str = ""

    def gates(self, logits_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_TK, idx_TK) exactly as the router's forward values."""
        probs_TE = logits_TE.softmax(dim=-1)
        gate_TK, idx_TK = probs_TE.topk(self.k, dim=-1)
        if self.renormalize:
            gate_TK = gate_TK / gate_TK.sum(dim=-1, keepdim=True)
        elif self.fill:
            gate_TK = gate_TK + (1.0 - gate_TK.sum(dim=-1, keepdim=True)) / self.k
        return gate_TK, idx_TK


def router_gating(name: str, router: nn.Module) -> Gating:
    """The inference-time gating of `router`, or ExportError for routers ONNX export cannot express."""
    capacity = getattr(router, "capacity", None)
    if capacity is not None and capacity.factor(training=False) is not None:  # (dropless at inference exports)
        raise ExportError(f"{name}: capacity dropping at inference (eval_capacity_factor="
                          f"{capacity.eval_capacity_factor}) cannot be exported to ONNX by moeify: which tokens are "
                          "dropped depends on the whole batch; convert with eval_capacity_factor=inf (dropless at "
                          "inference; CLI: --eval-capacity-factor inf) or capacity_factor=None (dropless)")
    # exact types: a subclass may route differently
    if type(router) is TopKRouter:
        k = router.top_k
        if not router.softmax_before_topk:
            # softmax over the k kept logits = p_i / sum_topk p_j, and top-k of logits = top-k of p
            return Gating(k, True, description="topk->softmax (= renormalised top-k probabilities)")
        if router.normalize:
            return Gating(k, True, description="softmax->topk, renormalised")
        if router.preserve_scale:
            if k == 1:
                return Gating(1, True, description="top-1 with preserve_scale (forward gate 1)")
            return Gating(k, False, fill=True, description="softmax->topk, raw gates + preserve_scale fill")
        return Gating(k, False, description="softmax->topk, raw probabilities")
    if type(router) is SwitchRouter:
        if router.preserve_scale:
            return Gating(1, True, description="switch with preserve_scale (forward gate 1)")
        return Gating(1, False, description="switch, gate = router probability")
    if type(router) is NoisyTopKRouter:
        # no noise at inference: softmax(KeepTopK(clean logits)) = renormalised top-k probabilities
        return Gating(router.top_k, True, description="noisy_topk at inference (clean gate, topk->softmax)")
    if type(router) is ExpertChoiceRouter:
        what, why, fix = ("expert-choice routing", "each expert's token set depends on the whole batch",
                          "router='topk'")
    elif type(router) is HierarchicalRouter:
        what, why, fix = ("hierarchical routing (num_groups)", "a token's gates are products of two gating levels",
                          "num_groups=None")
    else:
        what, why, fix = f"router {type(router).__name__}", "its routing is unknown to the exporter", "router='topk'"
    raise ExportError(f"{name}: {what} cannot be exported to ONNX by moeify ({why}, which neither "
                      f"com.microsoft.MoE nor the portable lowering computes); convert with {fix}")


# the fused custom op ------------------------------------------------------------------------------
def ffn_expert(weights: Sequence[Any], activation: str) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """Expert e of stacked FFN weights (w1_EFD, b1_EF, w2_EOF, b2_EO, w3_EFD, b3_EF) on some rows."""
    w1_EFD, b1_EF, w2_EOF, b2_EO, w3_EFD, b3_EF = weights
    act = activation_fn(activation)

    def run(x_RD: torch.Tensor, e: int) -> torch.Tensor:
        h_RF = act(F.linear(x_RD, w1_EFD[e], None if b1_EF is None else b1_EF[e]))
        if w3_EFD is not None:
            h_RF = h_RF * F.linear(x_RD, w3_EFD[e], None if b3_EF is None else b3_EF[e])
        return F.linear(h_RF, w2_EOF[e], None if b2_EO is None else b2_EO[e])

    return run


def routed_moe(x_TD: torch.Tensor, gate_TK: torch.Tensor, idx_TK: torch.Tensor, num_experts: int, d_out: int,
               expert: Callable[[torch.Tensor, int], torch.Tensor]) -> torch.Tensor:
    """sum_k gate * expert_idx(x), running each expert only on the rows routed to it.

    A static loop over experts; row counts are data dependent (NonZero in ONNX). A token picks an
    expert at most once, so index_add over `tok_R` is a scatter-add without collisions.
    """
    out_TO = x_TD.new_zeros(x_TD.shape[0], d_out, dtype=torch.promote_types(x_TD.dtype, torch.float32))
    for e in range(num_experts):
        tok_R, slot_R = torch.nonzero(idx_TK == e, as_tuple=True)
        y_RO = expert(x_TD.index_select(0, tok_R), e)
        y_RO = y_RO * gate_TK[tok_R, slot_R].to(y_RO.dtype).unsqueeze(-1)  # weighted in the experts' dtype, as
        out_TO = out_TO.index_add(0, tok_R, y_RO.to(out_TO.dtype))      # the layer does; summed in float32 at
    return out_TO.to(x_TD.dtype)                                            # least (onnxruntime's CPU ScatterND
                                                                            # cannot add float16)


@torch.library.custom_op("moeify::topk_moe", mutates_args=())
def topk_moe(x_TD: torch.Tensor, logits_TE: torch.Tensor, w1_EFD: torch.Tensor, b1_EF: torch.Tensor | None,
             w2_EDF: torch.Tensor, b2_ED: torch.Tensor | None, w3_EFD: torch.Tensor | None,
             b3_EF: torch.Tensor | None, k: int, activation: str, normalize: bool) -> torch.Tensor:
    """com.microsoft.MoE's semantics in torch: softmax(logits) -> top-k (-> renormalise) -> experts."""
    gate_TK, idx_TK = Gating(k, normalize).gates(logits_TE)
    expert = ffn_expert((w1_EFD, b1_EF, w2_EDF, b2_ED, w3_EFD, b3_EF), activation)
    return routed_moe(x_TD, gate_TK, idx_TK, w1_EFD.shape[0], w2_EDF.shape[1], expert)


@topk_moe.register_fake
def _topk_moe_fake(x_TD, logits_TE, w1_EFD, b1_EF, w2_EDF, b2_ED, w3_EFD, b3_EF, k, activation, normalize):
    return x_TD.new_empty(x_TD.shape[0], w2_EDF.shape[1])


def ort_activation(activation: str, gated: bool, allow_approximate_gelu: bool) -> tuple[dict | None, str]:
    """com.microsoft.MoE activation attributes for such experts, or (None, why the op cannot express them)."""
    if gated:
        if activation != "silu":
            return None, f"gated experts with activation {activation!r}: the op's only gated activation is SwiGLU"
        # alpha/beta must be explicit (the kernel's defaults are not 1, 0); fc3 is NOT_IMPLEMENTED on
        # CPU, so gate and up rows are interleaved into fc1 (swiglu_fusion=1)
        return {"activation_type": "swiglu", "swiglu_fusion": 1, "activation_alpha": 1.0,
                "activation_beta": 0.0}, ""
    if activation == "gelu":
        if not allow_approximate_gelu:
            return None, ("exact (erf) GELU experts: the op's 'gelu' is the tanh approximation (up to 5e-4 off per "
                          "activation, more in a deep model's outputs; the export's notes say how much); pass "
                          "allow_approximate_gelu=True (CLI: --allow-approximate-gelu) to accept it")
        return {"activation_type": "gelu"}, ""
    if activation == "gelu_tanh":
        return {"activation_type": "gelu"}, ""
    if activation in ("relu", "silu"):
        return {"activation_type": activation}, ""
    return None, f"activation {activation!r}"


def _moe_schema():
    """OpSchema mirroring onnxruntime's com.microsoft.MoE (opset 1, docs/ContribOperators.md).

    onnx.defs has no schema for com.microsoft ops, and the exporter needs one to bind inputs and
    attributes of the onnxscript op.
    """
    from onnx.defs import OpSchema

    opt, req, A = OpSchema.FormalParameterOption.Optional, OpSchema.FormalParameterOption.Single, OpSchema.AttrType
    inputs = [("input", req), ("router_probs", req), ("fc1_experts_weights", req), ("fc1_experts_bias", opt),
              ("fc2_experts_weights", req), ("fc2_experts_bias", opt), ("fc3_experts_weights", opt),
              ("fc3_experts_bias", opt)]
    attrs = [("activation_alpha", A.FLOAT), ("activation_beta", A.FLOAT), ("activation_type", A.STRING),
             ("k", A.INT), ("normalize_routing_weights", A.INT), ("swiglu_fusion", A.INT),
             ("swiglu_limit", A.FLOAT), ("use_sparse_mixer", A.INT)]
    return OpSchema(
        "MoE", MSFT_DOMAIN, 1,
        inputs=[OpSchema.FormalParameter(n, "T", param_option=o) for n, o in inputs],
        outputs=[OpSchema.FormalParameter("output", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "float types")],
        attributes=[OpSchema.Attribute(n, t, "", required=False) for n, t in attrs],
    )


def fused_translation_table(allow_approximate_gelu: bool) -> dict:
    """custom_translation_table for torch.onnx.export: moeify::topk_moe -> one com.microsoft.MoE node."""
    import onnxscript
    from onnxscript import opset18 as op

    moe_op = onnxscript.values.Op(onnxscript.values.Opset(MSFT_DOMAIN, 1), "MoE", _moe_schema())

    def interleave_rows(a, b, is_bias: bool):
        # SwiGLU fusion reads fc1 rows 2i (gate, activated) and 2i+1 (up, linear)
        ab = op.Concat(op.Unsqueeze(a, [2]), op.Unsqueeze(b, [2]), axis=2)  # (E, F, 2[, D])
        if is_bias:
            return op.Reshape(ab, op.Constant(value_ints=[0, -1]))
        shape = op.Concat(op.Shape(a, start=0, end=1), op.Constant(value_ints=[-1]), op.Shape(a, start=2, end=3),
                          axis=0)
        return op.Reshape(ab, shape)

    def topk_moe_to_ort(x_TD, logits_TE, w1_EFD, b1_EF, w2_EDF, b2_ED, w3_EFD, b3_EF, k, activation, normalize):
        # validated before export; asked again so the op can never get a guessed activation
        attrs = ort_activation(activation, w3_EFD is not None, allow_approximate_gelu)[0]
        if attrs is None:
            raise ExportError(f"internal: activation {activation!r} reached the MoE translation unvalidated")
        if w3_EFD is not None:
            fc1 = interleave_rows(w1_EFD, w3_EFD, is_bias=False)
            if b1_EF is not None or b3_EF is not None:
                some = b1_EF if b1_EF is not None else b3_EF
                zero = op.Mul(some, op.Constant(value_float=0.0))
                fc1_b = interleave_rows(b1_EF if b1_EF is not None else zero, b3_EF if b3_EF is not None else zero,
                                        is_bias=True)
            else:
                fc1_b = None
        else:
            fc1, fc1_b = w1_EFD, b1_EF
        return moe_op(x_TD, logits_TE, fc1, fc1_b, w2_EDF, b2_ED, k=int(k),
                      normalize_routing_weights=int(bool(normalize)), **attrs)

    return {torch.ops.moeify.topk_moe.default: topk_moe_to_ort}


# parameter dtypes an exported MoE layer may hold
EXPORT_DTYPES = frozenset({torch.float32, torch.float16})
# what `moeify export --dtype` casts a saved model to
SAVED_EXPORT_DTYPES = {"float32": torch.float32, "float16": torch.float16}


# export stand-ins ---------------------------------------------------------------------------------
class _LoweredPlan(NamedTuple):
    counts_E: torch.Tensor  # the owner's graph passes plan.counts_E to experts: here it is logits_TE


class _RouterLogits(nn.Module):
    def __init__(self, router: nn.Module) -> None:
        super().__init__()
        self.gate = router.gate  # same Linear: parameter names stay <layer>.router.gate.*

    def forward(self, x_TD: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        return router_linear(self.gate, x_TD)  # float32 at least, as the router computes them


class _Passthrough(nn.Module):
    def forward(self, x_TD: torch.Tensor, logits_TE: torch.Tensor):
        return x_TD, _LoweredPlan(logits_TE)


class _CombineIdentity(nn.Module):
    def forward(self, y_TO: torch.Tensor, plan: _LoweredPlan) -> torch.Tensor:
        return y_TO


class _NoAux(nn.Module):
    def forward(self, *args: Any) -> None:
        return None


class _LoweredExperts(nn.Module):
    """The whole routed MoE of one layer, fused (custom op) or portable (standard ops)."""

    def __init__(self, experts: nn.Module, gating: Gating, fused: bool, activation: str | None) -> None:
        super().__init__()
        for pname, param in experts.named_parameters(recurse=False):
            self.register_parameter(pname, param)  # same Parameters, same names: <layer>.experts.w1_EFD
        self.projection = isinstance(experts, ProjectionExperts)
        self.num_experts, self.d_out = experts.num_experts, experts.d_out
        self.gating, self.fused, self.activation = gating, fused, activation

    def _ffn_weights(self) -> tuple:
        return tuple(getattr(self, n, None) for n in ("w1_EFD", "b1_EF", "w2_EDF", "b2_ED", "w3_EFD", "b3_EF"))

    def forward(self, x_TD: torch.Tensor, logits_TE: torch.Tensor) -> torch.Tensor:
        if self.fused:
            # the op takes the router's logits in the input's dtype (float16 logits of a float16 model)
            return torch.ops.moeify.topk_moe(x_TD, logits_TE.to(x_TD.dtype), *self._ffn_weights(), self.gating.k,
                                             self.activation, self.gating.renormalize)
        gate_TK, idx_TK = self.gating.gates(logits_TE)
        if self.projection:
            w_EOD, b_EO = self.w_EOD, getattr(self, "b_EO", None)

            def expert(x_RD, e):
                return F.linear(x_RD, w_EOD[e], None if b_EO is None else b_EO[e])
        else:
            expert = ffn_expert(self._ffn_weights(), self.activation)
        return routed_moe(x_TD, gate_TK, idx_TK, self.num_experts, self.d_out, expert)


# report -------------------------------------------------------------------------------------------
@dataclass
class LayerExport:
    name: str
    lowering: str  # "com.microsoft.MoE" or "portable"
    gating: str
    activation: str
    notes: list[str] = field(default_factory=list)


@dataclass
class ExportReport:
    path: str
    mode: str
    layers: list[LayerExport] = field(default_factory=list)
    node_counts: dict[str, int] = field(default_factory=dict)  # op type (domain-qualified if not ONNX) -> count
    checks: list[tuple[str, float]] = field(default_factory=list)  # (input shapes, max |ORT - PyTorch|)
    atol: float = EXPORT_ATOL
    tolerances: list[float] = field(default_factory=list)  # each check's bound: atol, or wider for float16 outputs
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    signature: str = ""  # the graph's inputs and outputs, `name[dims]`, as onnxruntime will see them

    @property
    def num_moe_nodes(self) -> int:
        return self.node_counts.get(f"{MSFT_DOMAIN}.MoE", 0)

    def format(self) -> str:
        lines = [f"ONNX export ({self.mode}) -> {self.path}: {sum(self.node_counts.values())} nodes, "
                 f"{self.num_moe_nodes} com.microsoft.MoE"]
        lines += [f"  {self.signature}"] if self.signature else []
        lines += [f"  {la.name}: {la.lowering} [{la.gating}; {la.activation}]"
                  + (f" ({'; '.join(la.notes)})" if la.notes else "") for la in self.layers]
        lines += [f"  check {shape}: max |ORT - PyTorch| = {diff:.3g} ({self.bound(tol)})"
                  for (shape, diff), tol in zip(self.checks, self.tolerances, strict=True)]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def bound(self, tolerance: float) -> str:
        if tolerance <= self.atol:
            return f"atol {self.atol:g}"
        return f"tolerance {tolerance:.3g}: {LOW_PRECISION_ULPS} float16 epsilons of the largest output"

    __str__ = format


# planning -----------------------------------------------------------------------------------------
def _plan_layers(model: nn.Module, mode: str, fallback: str | None,
                 allow_approximate_gelu: bool) -> list[tuple[str, MoELayer, _LoweredExperts, LayerExport]]:
    """Decide every layer's lowering before touching anything; raise ExportError on the first refusal."""
    plans = []
    for name, layer in model.named_modules():
        if not isinstance(layer, MoELayer):
            continue
        experts = layer.experts
        if not isinstance(experts, (GroupedExperts, ProjectionExperts)):
            raise ExportError(f"{name}: experts of type {type(experts).__name__} cannot be exported; "
                              "only GroupedExperts and ProjectionExperts are supported")
        dtypes = {p.dtype for p in layer.parameters()}
        if not dtypes <= EXPORT_DTYPES:  # (a float16 model's routers may be float32: Switch's selective precision)
            raise ExportError(f"{name}: parameters are {', '.join(sorted(map(str, dtypes)))}; ONNX export takes "
                              "float32 or float16 (onnxruntime's CPU provider has no bfloat16 Gemm or MoE "
                              "kernels): call model.float(), or model.half()")
        gating = router_gating(name, layer.router)
        activation, notes = experts.activation, []
        lowering = "portable"
        if mode == "fused":
            if isinstance(experts, ProjectionExperts):
                attrs, why = None, "projection experts (one Linear, no hidden layer)"
            else:
                attrs, why = ort_activation(experts.activation, experts.gated, allow_approximate_gelu)
            if attrs is not None and gating.fill:
                attrs, why = None, (f"raw top-{gating.k} gates with preserve_scale (g + (1 - sum g)/k) have no "
                                    "normalize_routing_weights value")
            if attrs is not None and not gating.renormalize:
                attrs, why = None, ("raw router probabilities as gates: onnxruntime 1.31's CPU kernel computes "
                                    "normalize_routing_weights=0 wrongly inside larger graphs (0.37 off in a "
                                    "two-layer MLP)")
            if attrs is not None and experts.d_out != experts.d_model:
                attrs, why = None, f"expert output dim {experts.d_out} != input dim {experts.d_model}"
            if attrs is None:
                if fallback != "portable":
                    raise ExportError(f"{name}: com.microsoft.MoE cannot express {why}; use mode='portable', or "
                                      "fallback='portable' to lower such layers exactly with standard ONNX ops "
                                      "(CLI: --mode portable, or --fallback portable)")
                notes.append(f"fallback to portable: com.microsoft.MoE cannot express {why}")
            else:
                lowering = "com.microsoft.MoE"
                if experts.activation == "gelu":
                    activation = "gelu_tanh"
                    notes.append("exact GELU exported as the op's tanh approximation (allow_approximate_gelu=True)")
                notes.append(", ".join(f"{k}={v}" for k, v in attrs.items()))
        stand_in = _LoweredExperts(experts, gating, lowering != "portable", activation)
        kind = "linear" if experts.activation is None else experts.activation + (" gated" if experts.gated else "")
        plans.append((name, layer, stand_in, LayerExport(name, lowering, gating.description, kind, notes)))
    if not plans:
        raise ExportError(f"{type(model).__name__} has no MoE layer: convert it with moeify.convert first "
                          "(plain torch.onnx.export handles dense models)")
    return plans


@contextmanager
def _lowered_layers(plans):
    """Swap each planned layer's children for export stand-ins; always put the originals back."""
    saved = []
    try:
        for _, layer, stand_in, _ in plans:
            saved.append((layer, dict(layer._modules)))
            layer._modules.update(router=_RouterLogits(layer.router), dispatch=_Passthrough(), experts=stand_in,
                                  combine=_CombineIdentity(), aux=_NoAux())
        yield
    finally:
        for layer, modules in saved:
            layer._modules.clear()
            layer._modules.update(modules)


def _approximated(plans) -> list[nn.Module]:
    """The experts whose fused op computes another activation than theirs (tanh GELU for exact GELU)."""
    return [layer.experts for _, layer, stand_in, _ in plans
            if stand_in.fused and stand_in.activation != layer.experts.activation]


@contextmanager
def _reference_activation(plans):
    """While checking an approximate-GELU export, the PyTorch reference uses the same tanh GELU."""
    changed = [(experts, experts.activation) for experts in _approximated(plans)]
    try:
        for experts, _ in changed:
            experts.activation = "gelu_tanh"
        yield
    finally:
        for experts, activation in changed:
            experts.activation = activation


# inputs -------------------------------------------------------------------------------------------
def _dynamic_dims(t: torch.Tensor, name: str = "") -> dict[int, str]:
    """The axes an input of this kind varies along: dim 0 is the batch; dim 1 is the sequence of token
    ids and masks (integer, (B, S, ...)) and of (B, S, D) float activations, and the samples of a Hugging
    Face audio model's waveform (`input_values` (B, samples): wav2vec2, HuBERT, WavLM). Other float inputs
    of rank 2 ((B, features)) and of rank 4 or more (images (B, C, H, W), video) vary in the batch only:
    their channels are a constant of the model."""
    dims = {0: "batch"} if t.dim() >= 1 else {}
    if t.dim() >= 2 and (not t.is_floating_point() or t.dim() == 3):
        dims[1] = "seq"
    elif t.dim() == 2 and name == "input_values":
        dims[1] = "samples"
    return dims


def _child_name(name: str, key: Any) -> str:
    """The name of item `key` inside the input or output `name` (a key alone under an empty `name`)."""
    return f"{name}_{key}" if name else str(key)


def _named_tensors(value: Any, name: str) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors in `value` in the exporter's order, each named `name` and the keys, fields or indices
    leading to it, joined by '_' (`batch_input_ids`, `hidden_0`; a key alone under an empty `name`)."""
    from moeify.convert import output_items

    if isinstance(value, torch.Tensor):
        yield name, value
    for key, item in output_items(value) or ():
        yield from _named_tensors(item, _child_name(name, key))


def _leaves(bound: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of the inputs by the names the ONNX graph gives them: an input's own name, and for the
    tensors inside a dict, dataclass, tuple or list input (`forward(self, batch)` with a dict batch) their
    `_named_tensors` names (`batch_input_ids`)."""
    return {leaf: t for name, value in bound.items() for leaf, t in _named_tensors(value, name)}


def _map_leaves(value: Any, name: str, fn: Callable[[str, torch.Tensor], Any],
                other: Callable[[Any], Any] | None = None, *, shapes: bool = False) -> Any:
    """`value` with each tensor in it replaced by fn(its `_leaves` name, it), and anything else that is
    not a container by other(it) (default: kept); containers rebuilt as dicts, lists and tuples (what
    torch.export's dynamic_shapes, None for a non-tensor, and the inputs of a second check take). A
    dataclass is rebuilt as itself, or with `shapes` (a dynamic_shapes spec) as the list of its fields,
    which is how torch.export matches a pytree node it was taught (`_dataclasses_as_pytrees`)."""
    from moeify.convert import output_items

    if isinstance(value, torch.Tensor):
        return fn(name, value)
    items = output_items(value)
    if items is None:
        return value if other is None else other(value)
    mapped = {key: _map_leaves(item, _child_name(name, key), fn, other, shapes=shapes) for key, item in items}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple
        return type(value)(*mapped.values())
    if isinstance(value, (tuple, list)):
        return type(value)(mapped.values())
    if isinstance(value, dict):
        return dict(zip(value, mapped.values(), strict=True))
    return list(mapped.values()) if shapes else dataclasses.replace(value, **mapped)


def _axes_spec(bound: dict[str, Any], given: dict[str, dict[int, str]] | None) -> dict[str, dict[int, str]]:
    """Dynamic axes per tensor input (`_leaves` names): `given` where it names the input, else inferred
    (`_dynamic_dims`)."""
    given = dict(given or {})
    leaves = _leaves(bound)
    unknown = sorted(set(given) - set(leaves))
    if unknown:
        raise ExportError(f"dynamic_axes names {unknown}, which are not inputs of the model: use the input "
                          f"names {sorted(leaves)}")
    spec = {}
    for name, value in leaves.items():
        dims = dict(given[name]) if name in given else _dynamic_dims(value, name)
        bad = [d for d in dims if not (isinstance(d, int) and 0 <= d < value.dim())]
        if bad:
            raise ExportError(f"dynamic_axes[{name!r}] names dims {bad}, but that input has rank {value.dim()}: "
                              f"use dims 0..{value.dim() - 1}")
        spec[name] = dims
    return _separate_sequences(leaves, spec, set(given))


def _separate_sequences(bound: dict[str, Any], spec: dict[str, dict[int, str]],
                        given: set[str]) -> dict[str, dict[int, str]]:
    """Refine the guessed sequence axes (inputs not in `given`): a seq2seq model's decoder inputs
    (Hugging Face's `decoder_*`) get their own axis `decoder_seq`, and so does any input whose example
    length differs from the first one's (named after the first input of that length): one shared axis
    tied their lengths, which torch.export refused, or, at equal example lengths, exported a graph that
    failed on any other pair. A (B, S) float input shaped as token ids (a float attention mask) takes
    their axes instead of varying in the batch only."""
    ids = {tuple(v.shape): spec[n] for n, v in bound.items() if n in spec and n not in given
           and isinstance(v, torch.Tensor) and v.dim() == 2 and not v.is_floating_point()}
    axis_of: dict[tuple[str, int], str] = {}  # (group, length) -> axis name
    out = {}
    for name, dims in spec.items():
        value = bound[name]
        if name in given:
            out[name] = dims
            continue
        if value.dim() == 2 and value.is_floating_point() and tuple(value.shape) in ids:
            dims = dict(ids[tuple(value.shape)])
        if dims.get(1) == "seq":
            group = "decoder_seq" if name.startswith("decoder_") else "seq"
            named = group if all(g != group for g, _ in axis_of) else f"{name}_seq"  # the group's first length
            dims[1] = axis_of.setdefault((group, value.shape[1]), named)
        out[name] = dims
    return out


def _bind(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The example inputs by parameter name, the forward called as `model(**bound)`; inputs that land in
    its `**kwargs` become keyword inputs of their own (bound as one dict named `kwargs`, they would be
    passed as `kwargs={...}` and silently ignored)."""
    signature = inspect.signature(model.forward)
    try:
        arguments = signature.bind(*args, **kwargs).arguments
    except TypeError as exc:
        raise ExportError(f"the example inputs do not fit {type(model).__name__}.forward ({exc}): pass "
                          "example_inputs (a tuple) and example_kwargs matching its signature") from None
    bound: dict[str, Any] = {}
    for name, value in arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            bound.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise ExportError(f"{type(model).__name__}.forward takes *{name}, which the exporter cannot name: "
                                  "pass those inputs by keyword, or wrap the model in a module with named inputs")
        else:
            bound[name] = value
    return _unaliased(bound)


@contextmanager
def _inputs_as_parameters(model: nn.Module, bound: dict[str, Any]):
    """While exporting, `model.forward` seen with every input as a parameter of its own.

    torch.export matches dynamic_shapes (and names graph inputs) against the forward's signature, so an
    input that reaches it through `**kwargs` got no dynamic axis (the export failed inside, with an
    IndexError). An instance attribute with an explicit `__signature__` shadows the class's forward and
    passes every input on by keyword; the parameters and their names are the model's own."""
    parameters = inspect.signature(model.forward).parameters
    named = {name for name, p in parameters.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    if named.issuperset(bound):
        yield
        return
    forward = model.forward
    shadowed = model.__dict__.get("forward")  # an instance forward already there (hooks, accelerate) stays

    def named_forward(**inputs: Any) -> Any:
        return forward(**inputs)
    named_forward.__signature__ = inspect.Signature(
        [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY) for name in bound])
    model.forward = named_forward
    try:
        yield
    finally:
        if shadowed is None:
            del model.forward
        else:
            model.forward = shadowed


def _unaliased(bound: dict[str, Any]) -> dict[str, Any]:
    """Copies for inputs given as the same tensor as an earlier one (`(ids, ids)`): torch.export would
    merge them into one graph input, and the exported model would read one tensor for both."""
    seen: set[int] = set()
    out = {}
    for name, value in bound.items():
        if isinstance(value, torch.Tensor):
            value = value.clone() if id(value) in seen else value
            seen.add(id(value))
        out[name] = value
    return out


def _resized(value: Any, dims: dict[int, str], generator: torch.Generator) -> Any:
    """A new input like `value` with its batch dim grown and other dynamic dims moved by CHECK_SHAPE_DELTA."""
    if not isinstance(value, torch.Tensor) or not dims:
        return value
    shape = list(value.shape)
    for dim, axis in dims.items():
        shape[dim] = _check_size(shape[dim], axis)
    if value.is_floating_point():
        return (torch.randn(shape, generator=generator) * value.float().std().clamp_min(1e-3)).to(value.dtype)
    if value.numel() and (value.dtype == torch.bool or bool(((value == 0) | (value == 1)).all())):
        # masks (and all-0 token types): the example tiled over the grown dims, so every row keeps a mix
        # of visible and masked positions the model accepts, whichever value means padding (1 in
        # Hugging Face's attention_mask, True in PyTorch's key-padding mask: filled with ones, it masked
        # every token and the check compared NaN with NaN)
        reps = [-(-n // m) for n, m in zip(shape, value.shape, strict=True)]
        return value.repeat(*reps)[tuple(slice(0, n) for n in shape)].clone()
    low = int(value.min()) if value.numel() else 0
    high = int(value.max()) + 1 if value.numel() else 1
    return torch.randint(low, max(high, low + 1), shape, generator=generator, dtype=value.dtype)


def _check_size(size: int, axis: str) -> int:
    """The check's second size of a dynamic axis of the example's `size` (see CHECK_SHAPE_DELTA)."""
    if axis == "batch":
        return size + CHECK_SHAPE_DELTA[0]
    step = CHECK_SHAPE_DELTA[1]
    return size - step if size > step + 1 else size + step


def _flat_tensors(values: Any) -> list[torch.Tensor]:
    from moeify.convert import flatten_outputs

    return flatten_outputs(values)


def _shape_text(bound: dict[str, Any]) -> str:
    return ", ".join(f"{k}={tuple(v.shape)}" for k, v in _leaves(bound).items())


# export -------------------------------------------------------------------------------------------
def _count_nodes(model_proto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model_proto.graph.node:
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


# ONNX operators that draw random numbers: an export check cannot match PyTorch through them
RANDOM_OPS = frozenset({"RandomUniform", "RandomUniformLike", "RandomNormal", "RandomNormalLike", "Multinomial",
                        "Bernoulli"})


def _run_check(onnx_path: Path, model_proto, model: nn.Module, bound_list: list[dict[str, Any]], plans,
               report: ExportReport) -> bool:
    """onnxruntime on the written file against PyTorch at each input set; True when the declared output
    shapes had to be loosened (`model_proto` changed)."""
    import onnxruntime as ort

    from moeify.inference import open_session

    session = open_session(onnx_path, providers=("CPUExecutionProvider",)).session
    quiet_run = ort.RunOptions()
    quiet_run.log_severity_level = 4  # a failed run is reported in the ExportError, not logged to stderr too
    loosened = padded = False
    drift = 0.0  # max |ORT - the model with its own activations| where the op approximates them
    names = [i.name for i in session.get_inputs()]
    for bound in bound_list:
        leaves = _leaves(bound)
        tensors = list(leaves.values())
        if len(tensors) != len(names):
            raise ExportError(f"the exported model has {len(names)} inputs but the example has {len(tensors)} "
                              "tensors: pass every tensor input explicitly")
        feeds = {n: t.detach().cpu().numpy() for n, t in zip(names, tensors, strict=True)}
        try:
            got = session.run(None, feeds, quiet_run)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own pybind error types
            raise ExportError(f"onnxruntime failed to run the exported model at {_shape_text(bound)} "
                              f"({one_line(exc, limit=300)}); nothing was written{_rnn_hint(model, report)}") from exc
        loosened |= _loosen_outputs(model_proto, got, bound, report)
        with torch.no_grad(), eval_mode(model), _reference_activation(plans):
            want = _flat_tensors(model(**bound))
        if len(got) != len(want):
            raise ExportError(f"the ONNX model returns {len(got)} outputs, PyTorch {len(want)}")
        masks = [v for n, v in leaves.items()
                 if v.dim() == 2 and (n == "attention_mask" or n.endswith("_attention_mask"))]
        compared = [_max_diff(torch.from_numpy(g), w, masks) for g, w in zip(got, want, strict=True)]
        diff = max((d for d, _ in compared), default=0.0)
        padded |= any(skipped for _, skipped in compared)
        allowed = [check_tolerance(w, report.atol) for w in want]
        tolerance = max(allowed, default=report.atol)
        if _approximated(plans):
            with torch.no_grad(), eval_mode(model):
                exact = _flat_tensors(model(**bound))
            drift = max([drift, *(_max_diff(torch.from_numpy(g), w, masks)[0]
                                  for g, w in zip(got, exact, strict=True))])
        shape = _shape_text(bound)
        report.checks.append((shape, diff))
        report.tolerances.append(tolerance)
        if not all(d <= a for (d, _), a in zip(compared, allowed, strict=True)):
            random = sorted({n.op_type for n in model_proto.graph.node if n.op_type in RANDOM_OPS})
            hint = (f"the graph draws random numbers ({', '.join(random)}), and onnxruntime draws other ones than "
                    "PyTorch: make the forward deterministic in eval mode, or pass the randomness as an input "
                    "(ViT-MAE: noise=...)" if random else "Try the other mode, or report it with the model")
            raise ExportError(f"onnxruntime's outputs differ from PyTorch's by {diff:.3g} "
                              f"(> {report.bound(tolerance)}) "
                              f"at {shape} in {report.mode} mode; nothing was written. {hint}")
    if padded:
        report.notes.append("the check skipped the positions the attention mask marks as padding")
    if _approximated(plans):
        report.notes.append(f"the op's tanh GELU moves the outputs by up to {drift:.3g} from the model's exact GELU "
                            "(the check compared with PyTorch in tanh GELU)")
    return loosened


def _rnn_hint(model: nn.Module, report: ExportReport) -> str:
    """Why a graph with a sequence-first recurrent layer fails at another length: torch.export keeps the
    example's sequence length inside a batch_first=False nn.LSTM / GRU / RNN (the dense model fails alike)."""
    rnns = [name for name, m in model.named_modules() if isinstance(m, nn.RNNBase) and not m.batch_first]
    if not rnns or not report.dynamic_axes:
        return ""
    axes = {name: {1: "batch"} for name in report.dynamic_axes}  # sequence-first inputs: (seq, batch, ...)
    return (f". {type(model).__name__} runs {rnns[0]} sequence-first (batch_first=False), whose sequence length "
            f"torch.export fixes at the example's: let only the batch vary, e.g. dynamic_axes={axes} for "
            "(seq, batch) inputs (CLI: --dynamic-axes), or build the recurrent layers with batch_first=True")


def check_tolerance(want: torch.Tensor, atol: float) -> float:
    """How far onnxruntime may be from PyTorch on the output `want`: atol, or for a float16 output
    LOW_PRECISION_ULPS of its epsilon relative to its largest magnitude where that is more (the two runtimes
    round each float16 op's result, and sum matmuls in other orders: up to 1.1 epsilons on the float16 BERT,
    GPT-2 and Llama of the tests)."""
    eps = low_precision_eps(want)
    return max(atol, eps * want.detach().abs().max().item()) if eps and want.numel() else atol


def _max_diff(got: torch.Tensor, want: torch.Tensor, masks: list[torch.Tensor]) -> tuple[float, bool]:
    """max |got - want| over the positions of real tokens, and whether any were skipped. Where a Hugging
    Face attention mask (1: token, 0: padding) of the output's (batch, seq) marks padding, the model
    attends over keys that are all masked (left padding in a causal model), whose result each
    implementation defines its own way (PyTorch and onnxruntime differed by 6.4 on Llama), and nothing
    downstream reads it. Masks of that shape that disagree (an encoder's and a decoder's): all compared."""
    diff = abs_diff(got, want)
    fitting = [m for m in masks if diff.dim() >= 2 and tuple(m.shape) == tuple(diff.shape[:2])]
    skipped = False
    if fitting and all(torch.equal(m, fitting[0]) for m in fitting) and not bool(fitting[0].all()):
        diff, skipped = diff[fitting[0] != 0], True
    return (diff.max().item() if diff.numel() else 0.0), skipped


def _loosen_outputs(model_proto, got: list, bound: dict[str, Any], report: ExportReport) -> bool:
    """Output dims the graph declares fixed but that came out another size at this run (torch.export
    specialises some, as after nn.LSTM) become symbolic: named after the dynamic input axis of that
    size in this run, else after the output. The graph's intermediate shapes (value_info) then go too:
    they carry the same fixed sizes, and onnxruntime, inferring from them, warned on every run at
    another size that the output did not have the shape it expected. True when any changed."""
    changed = False
    sizes: dict[str, int] = {}
    leaves = _leaves(bound)
    for name, dims in report.dynamic_axes.items():
        for d, axis in dims.items():
            sizes.setdefault(axis, leaves[name].shape[d])
    for value, array in zip(model_proto.graph.output, got, strict=False):
        for d, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.HasField("dim_value") and d < array.ndim and dim.dim_value != array.shape[d]:
                dim.dim_param = next((axis for axis, n in sizes.items() if n == array.shape[d]), f"{value.name}_{d}")
                changed = True
    if changed:
        del model_proto.graph.value_info[:]  # optional hints; onnxruntime infers the shapes itself
    return changed


def export_onnx(model: nn.Module, example_inputs: Sequence[Any] = (), path: str | os.PathLike = "model.onnx", *,
                mode: str = "fused", dynamic: bool = True, check: bool = True,
                example_kwargs: dict[str, Any] | None = None, allow_approximate_gelu: bool = False,
                fallback: str | None = None, atol: float = EXPORT_ATOL,
                dynamic_axes: dict[str, dict[int, str]] | None = None, force: bool = False,
                external_data: bool | None = None, output_names: Sequence[str] | None = None) -> ExportReport:
    """Export an MoE model (from `moeify.convert`/`moeify.load`, or a `ConversionResult`) to ONNX at `path`.

    mode="fused": every MoE layer becomes one com.microsoft.MoE node (onnxruntime CPU and CUDA);
    layers the op cannot express exactly raise ExportError, or with fallback="portable" are
    lowered the portable way (the report says which). mode="portable": standard ONNX operators
    only. `dynamic`: batch (dim 0) and sequence (dim 1 of token ids / (B, S, D) inputs) axes are
    dynamic; images and other float inputs of rank 2 or >= 4 vary in the batch only.
    `dynamic_axes` ({input name: {dim: axis name}}) replaces that guess for the inputs it names;
    inputs that share an axis name share its size ({} makes an input static). `check`: run
    onnxruntime on the example inputs and on inputs with batch + 1 and
    sequence - 3 (+ 3 below 5), compare with PyTorch, and raise ExportError beyond `atol` (float16 outputs:
    `check_tolerance`; nothing written); positions a Hugging Face attention mask marks as padding are not
    compared (`_max_diff`). A float16 model exports in float16, its routers computing in float32 at least.
    The graph's inputs carry the forward's parameter names; its outputs are named after the output's
    structure (`_output_names`: `logits`, `last_hidden_state`; `output`, `output_0`... for tensors and
    tuples), or `output_names`, one per output tensor.
    An existing file at `path` is replaced only with `force`.
    `external_data`: store the weights in `<path>.data` beside the model (onnx's external data; the two
    files move together). None: only when they reach EXTERNAL_DATA_BYTES, past which one file cannot hold
    them; False refuses such a model.
    The model is never changed: its MoE layers are lowered only while the exporter traces.
    """
    if mode not in MODES:
        raise ExportError(f"export mode {mode!r} is unknown: use one of {', '.join(MODES)}")
    if fallback == "none":  # as the CLI spells it
        fallback = None
    if fallback not in (None, "portable"):
        raise ExportError(f"fallback={fallback!r} is unknown: use None (refuse) or 'portable'")
    _check_options(dynamic, dynamic_axes, atol)
    if hasattr(model, "model") and hasattr(model, "config") and not isinstance(model, nn.Module):
        model = model.model  # a ConversionResult
    example_inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    kwargs = dict(example_kwargs or {})
    path = Path(path)
    data_name = f"{path.name}.data"  # where weights kept beside the model go (see EXTERNAL_DATA_BYTES)
    for output in (path, path.parent / data_name):
        check_output(output, force=force, directory=False)
    _refuse_replacing_other_files(path, data_name)

    plans = _plan_layers(model, mode, fallback, allow_approximate_gelu)
    bound = _bind(model, example_inputs, kwargs)
    with without_token_masks(model):  # inference: an enclosing token_mask block does not apply
        fused_calls, example_out = _fused_calls(model, bound, plans)  # (also: the inputs run, before torch.export)
    names = _chosen_output_names(example_out, output_names)
    report = ExportReport(str(path), mode, [p[3] for p in plans], atol=atol)
    dynamic_shapes = None
    dims: dict[str, dict[int, str]] = {}
    if dynamic:
        dims = _axes_spec(bound, dynamic_axes)
        shared = {axis: torch.export.Dim(axis, min=1) for spec in dims.values() for axis in spec.values()}
        dynamic_shapes = {name: _map_leaves(value, name, lambda leaf, _: {d: shared[axis] for d, axis
                                                                        in dims.get(leaf, {}).items()} or None,
                                            other=lambda _: None, shapes=True)
                          for name, value in bound.items()}
        report.dynamic_axes = {name: spec for name, spec in dims.items() if spec}

    table = fused_translation_table(allow_approximate_gelu) if any(p[2].fused for p in plans) else None
    try:
        with torch.no_grad(), eval_mode(model), _lowered_layers(plans), _quiet_torch_internals(), \
                _dataclasses_as_pytrees((example_out, bound)), _inputs_as_parameters(model, bound):
            program = torch.onnx.export(model, (), kwargs=bound, dynamo=True, dynamic_shapes=dynamic_shapes,
                                        custom_translation_table=table, opset_version=OPSET, optimize=True,
                                        external_data=False, verbose=False)
    except ExportError:
        raise
    except Exception as exc:  # noqa: BLE001 - the exporter raises many types; one line says which
        root = _root_cause(exc)
        hint = _size_one_hint(bound, report) or _export_hint(root, mode, dynamic)
        raise ExportError(f"torch.onnx.export failed on {type(model).__name__} in {mode} mode "
                          f"({root}); {hint}") from exc
    _name_outputs(program.model, names, report)
    _store_each_tensor_once(program.model, report)
    external = _external_data(program.model, data_name, external_data, report)
    model_proto = program.model_proto
    if table is not None and not any(o.domain == MSFT_DOMAIN for o in model_proto.opset_import):
        import onnx

        model_proto.opset_import.append(onnx.helper.make_opsetid(MSFT_DOMAIN, 1))
    report.node_counts = _count_nodes(model_proto)
    _check_dynamic_axes(model_proto, report)
    inputs = [bound]
    if check and report.dynamic_axes:
        gen = torch.Generator().manual_seed(0)
        inputs.append({n: _map_leaves(v, n, lambda leaf, t: _resized(t, dims.get(leaf) or {}, gen))
                       for n, v in bound.items()})
    elif check:
        report.notes.append("no dynamic axis: checked at the example shape only")

    def fill(tmp: Path) -> None:
        """Write, then check what was written (the file is what onnxruntime reads, external data included)."""
        _save(model_proto, tmp, data_name if external else None)
        _validate_graph(tmp, fused_calls, report)
        if check:
            with without_token_masks(model):
                loosened = _run_check(tmp, model_proto, model, inputs, plans, report)
            if loosened:  # the graph again; external weights stay as written
                _save(model_proto, tmp, None)

    write_file_atomically(path, fill, force=force, companions=[data_name])
    report.signature = _signature(model_proto)
    return report


def export_saved(out_dir: str | os.PathLike, path: str | os.PathLike, *, weights: str | os.PathLike | None = None,
                 dtype: str = "float32", **options: Any) -> ExportReport:
    """`moeify export OUT_DIR -o PATH`: load a saved conversion (with the `weights` of a later checkpoint,
    see `moeify.load`) and export it with the example inputs of its saved model source
    (`example_inputs()` in model_source.py), its weights and floating-point inputs cast to `dtype`
    ("float32", or "float16" for onnxruntime's CUDA provider; the routers stay float32). `options` go to
    `export_onnx`."""
    from moeify.serialization import load, saved_example_inputs

    if dtype not in SAVED_EXPORT_DTYPES:
        raise ExportError(f"export dtype {dtype!r} is unknown: use one of {', '.join(SAVED_EXPORT_DTYPES)}")
    _check_options(options.get("dynamic", True), options.get("dynamic_axes"), options.get("atol", EXPORT_ATOL))
    args, kwargs = saved_example_inputs(out_dir)
    model = load(out_dir, weights=weights).model
    want = SAVED_EXPORT_DTYPES[dtype]
    before = {name: p.dtype for name, p in model.named_parameters()}
    cast_model(model, want)  # the loaded model is this call's own
    cast = sorted({str(before[name]).removeprefix("torch.") for name, p in model.named_parameters()
                   if p.dtype != before[name]})
    args, kwargs = pytree.tree_map_only(torch.Tensor, lambda t: t.to(want) if t.is_floating_point() else t,
                                        (args, kwargs))
    report = export_onnx(model, args, path, example_kwargs=kwargs, **options)
    if cast:
        report.notes.append(f"the saved weights are {', '.join(cast)}: exported in {dtype}")
    return report


def _check_options(dynamic: bool, dynamic_axes: dict | None, atol: float) -> None:
    """The refusals that need no model: `export_saved` runs them before loading one."""
    if not (isinstance(atol, (int, float)) and not isinstance(atol, bool) and 0 <= atol < math.inf):
        raise ExportError(f"atol={atol!r} is invalid (CLI: --atol): use a finite number >= 0, the largest "
                          "|onnxruntime - PyTorch| the check accepts")
    if dynamic_axes and not dynamic:
        raise ExportError("dynamic_axes was given with dynamic=False (CLI: --dynamic-axes with --static), which "
                          "fixes every axis: drop one of them")


def _check_dynamic_axes(model_proto, report: ExportReport) -> None:
    """torch.export may specialise an axis it was told is dynamic; refuse rather than ship a fixed shape."""
    graph_inputs = {i.name: i for i in model_proto.graph.input}
    for name, dims in report.dynamic_axes.items():
        if name not in graph_inputs:
            continue
        shape = graph_inputs[name].type.tensor_type.shape.dim
        fixed = {kind: shape[d].dim_value for d, kind in dims.items()
                 if d < len(shape) and shape[d].HasField("dim_value")}
        if fixed and any(size == 1 for size in fixed.values()):
            raise ExportError(f"torch.export fixed the dynamic axis {fixed} of input {name!r}: "
                              f"{_size_one_hint({}, report, fixed)}")
        if fixed:
            raise ExportError(f"torch.export fixed the dynamic axis {fixed} of input {name!r}: the model treats it "
                              "as a constant (or, with nn.LSTM, one process exported twice, a torch issue); pass "
                              f"dynamic_axes={{{name!r}: {{...}}}} naming only the axes that vary (CLI: "
                              f"--dynamic-axes '{{\"{name}\": {{...}}}}', or --static), or export in a fresh process")
    _name_dynamic_axes(model_proto, report)


def _name_dynamic_axes(model_proto, report: ExportReport) -> None:
    """Give the dynamic axes the names asked for wherever they appear: torch names them after its own
    symbols (s72) when other example inputs are not tensors (use_cache=False)."""
    graph_inputs = {i.name: i for i in model_proto.graph.input}
    rename = {}
    for name, dims in report.dynamic_axes.items():
        if name in graph_inputs:
            shape = graph_inputs[name].type.tensor_type.shape.dim
            rename.update({shape[d].dim_param: axis for d, axis in dims.items()
                           if d < len(shape) and shape[d].dim_param and shape[d].dim_param != axis})
    if not rename:
        return
    graph = model_proto.graph
    for value in (*graph.input, *graph.output, *graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in rename:
                dim.dim_param = rename[dim.dim_param]


# What torch's exporter prints that no user can act on (torch 2.9-2.13): (category, message regex).
# Silenced during torch.onnx.export only; any other warning still shows.
TORCH_NOISE_WARNINGS = (
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),  # torch.utils._pytree, on copy
    (FutureWarning, r"_check_is_size will be removed"),  # torch's own decompositions (nn.LSTM)
    # nn.LSTM rebuilds its _flat_weights list in forward; only a message naming nothing else is silenced
    (UserWarning, r"The tensor attributes (self\.[\w.]*_flat_weights\[\d+\](, )?)+ were assigned during export"),
    # two inputs sharing an axis (ids and their mask: batch, seq) by name, as moeify declares them
    (UserWarning, r"# The axis name: (\w+) will not be used, since it shares the same shape constraints with another "
                  r"axis: \1\.$"),
    # non-tensor inputs (use_cache=False): moeify names the graph's axes itself (`_name_dynamic_axes`)
    (UserWarning, r"# ONNX model has different number of inputs than the flatten dynamic_shapes\. The dynamic axes "
                  r"will not be renamed\.$"),
)
# What torch logs that no user can act on: (logger, message start). The registry logs "torchvision is not
# installed. Skipping torchvision::nms" (and 3 more ops) at every export; symbolic shapes, when the model
# branches on a tensor's values, logs the whole traced graph (500 lines) above the error that says so.
TORCH_NOISE_LOGS = (
    ("torch.onnx._internal.exporter._registration", "torchvision is not installed"),
    ("torch.fx.experimental.symbolic_shapes", "Unable to find user code corresponding to"),
)


class _DropLogLines(logging.Filter):
    def __init__(self, start: str) -> None:
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.start)


@contextmanager
def _quiet_torch_internals():
    """Silence TORCH_NOISE_WARNINGS and TORCH_NOISE_LOGS; every other log line and warning still shows.
    Restored on exit. What goes to sys.stderr meanwhile is held: written after a success; after a
    failure, kept as a note of the exception (shown only with its traceback, as `moeify --debug` does).
    A failing torch.export prints the partial graph of each capture it tried there: hundreds of lines
    above the one-line error that says what failed."""
    filters = [(logging.getLogger(name), _DropLogLines(start)) for name, start in TORCH_NOISE_LOGS]
    for logger, drop in filters:
        logger.addFilter(drop)
    held = io.StringIO()
    try:
        with warnings.catch_warnings(), redirect_stderr(held):
            for category, pattern in TORCH_NOISE_WARNINGS:
                warnings.filterwarnings("ignore", pattern, category)
            yield
    except BaseException as exc:
        if held.getvalue().strip():
            exc.add_note(f"torch's output while exporting:\n{held.getvalue()}")
        held = io.StringIO()
        raise
    finally:
        sys.stderr.write(held.getvalue())
        for logger, drop in filters:
            logger.removeFilter(drop)


def _root_cause(exc: BaseException) -> str:
    """`Type: first line` of the innermost exception behind `exc` (the exporter wraps the one that says
    what went wrong in several of its own)."""
    while (exc.__cause__ or exc.__context__) is not None:
        exc = exc.__cause__ or exc.__context__
    return one_line(exc, limit=300)


def _size_one_hint(bound: dict[str, Any], report: ExportReport, fixed: dict[str, int] | None = None) -> str | None:
    """The fix when the example has size 1 on a dynamic axis: torch.export takes an axis of size 1 for a
    constant (its 0/1 specialisation), which fails or fixes that axis whatever the model does."""
    leaves = _leaves(bound)
    ones = sorted({axis for axis, size in (fixed or {}).items() if size == 1} |
                  {axis for name, dims in report.dynamic_axes.items() for d, axis in dims.items()
                   if name in leaves and leaves[name].shape[d] == 1})
    if not ones:
        return None
    return (f"the example has size 1 on the dynamic axis {', '.join(ones)}, which torch.export takes for a constant: "
            "export with an example of size >= 2 on every dynamic axis (batch and sequence), or dynamic=False "
            "(the CLI's --static) for a model that only ever sees that size")


def _export_hint(root: str, mode: str, dynamic: bool) -> str:
    """What to try after the export failed with `root` (`_root_cause`), given the options in use."""
    if "cache_utils" in root:  # a transformers Cache among the outputs: torch.export cannot flatten it
        return ("the model returns a transformers cache: pass use_cache=False in example_kwargs (for `moeify "
                "export`: example_inputs() in the model file returning ((ids,), {'use_cache': False}))")
    if "register a pytree" in root:  # an output object torch.export cannot flatten
        return ("the model returns an object torch.export cannot take apart (named above), in every mode: return "
                "tensors, or tuples, lists, dicts or dataclasses of them")
    if root.startswith("GuardOnDataDependentSymNode"):  # the forward's Python control flow reads a tensor
        return ("the forward branches on a tensor's values (a Python `if` or `bool()` on a tensor), which a graph "
                "cannot hold: compute both sides and pick with torch.where, or use torch.cond")
    tries = (["mode='portable' (CLI: --mode portable)"] if mode != "portable" else []) + (
        ["dynamic=False (CLI: --static)"] if dynamic else [])
    return f"try {' or '.join(tries)}" if tries else "please report it with the model"


@contextmanager
def _dataclasses_as_pytrees(out: Any):
    """Inside, the dataclass types in `out` (the model's output and inputs) are pytree nodes, as torch.export
    needs to flatten them (it knows no user dataclass); afterwards torch knows them as it did before."""
    from moeify.convert import output_items

    found: list[type] = []

    def walk(value: Any) -> None:
        kind = type(value)
        if dataclasses.is_dataclass(value) and kind not in pytree.SUPPORTED_NODES and kind not in found:
            found.append(kind)
        for _, item in output_items(value) or ():
            walk(item)
    walk(out)
    for kind in found:
        pytree.register_dataclass(kind)
    try:
        yield
    finally:
        for kind in found:
            pytree._deregister_pytree_node(kind)


def _fused_calls(model: nn.Module, bound: dict[str, Any], plans) -> tuple[int, Any]:
    """One forward at the example inputs, its layers lowered as the exporter will see them, before the
    export. Inputs the model cannot take are named here (inside torch.export they fail with an error
    about the export, and a hint, another mode, that cannot help). Returns the com.microsoft.MoE nodes
    the fused graph must hold: the calls of fused layers (a layer that runs more than once, as ALBERT's
    layer shared across depth, is one node per call); and the output, whose structure names the graph's."""
    fused = {name: stand_in for name, _, stand_in, _ in plans if stand_in.fused}
    try:
        with counting_calls(fused) as calls, torch.no_grad(), eval_mode(model), _lowered_layers(plans):
            out = model(**bound)
    except Exception as exc:  # noqa: BLE001 - whatever the forward raises, the inputs are the cause
        shapes = _shape_text(bound)
        raise ExportError(f"the example inputs{f' ({shapes})' if shapes else ''} do not run on "
                          f"{type(model).__name__} ({one_line(exc, limit=300)}): pass inputs its forward accepts") \
            from exc
    return sum(calls.values()), out


# outputs ------------------------------------------------------------------------------------------
def _output_names(out: Any) -> list[str]:
    """A name for each tensor `flatten_outputs` finds in `out`, in its order: a dict's (a Hugging Face
    ModelOutput's) keys or a dataclass's fields, `_i` after a sequence's name for its items, `output` for an
    unnamed root
    (`logits`, `hidden_states_0`; `output`; `output_0`, `output_1_0`)."""
    root = "output" if isinstance(out, (tuple, list)) else ""  # a sequence's items after a name: output_0
    return [name or "output" for name, _ in _named_tensors(out, root)]


def _chosen_output_names(out: Any, given: Sequence[str] | None) -> list[str]:
    """The graph's output names: `given` (checked against the output's tensors), else `_output_names`."""
    names = _output_names(out)
    if given is None:
        return names
    given = [given] if isinstance(given, str) else list(given)
    if len(given) != len(names) or not all(isinstance(n, str) and n for n in given):
        raise ExportError(f"output_names has {len(given)} name(s) but the model returns {len(names)} output "
                          f"tensor(s) ({', '.join(names)}): give one non-empty name per tensor, in that order")
    if len(set(given)) != len(given):
        raise ExportError(f"output_names repeats a name ({', '.join(given)}): give each output its own")
    return given


def _name_outputs(ir_model, names: list[str], report: ExportReport) -> None:
    """Rename the graph's outputs to `names` (the exporter names them after the nodes computing them,
    `linear_10`, which also differ between modes). Left as they are, with a note, where a name cannot be
    given: outputs that are not one tensor each, or a name another value of the graph holds."""
    graph = ir_model.graph
    outputs = list(graph.outputs)
    if [v.name for v in outputs] == names:
        return
    own = {id(v) for v in outputs}
    taken = {v.name for v in graph.inputs} | set(graph.initializers) | {
        v.name for node in graph.all_nodes() for v in node.outputs if id(v) not in own}
    why = None
    if len(outputs) != len(names):
        why = f"the graph has {len(outputs)} outputs for {len(names)} output tensors"
    elif len(own) != len(outputs) or any(v.producer() is None for v in outputs):
        why = "an output repeats another, or is an input"
    elif set(names) & taken:
        why = f"{', '.join(sorted(set(names) & taken))} name other values of the graph"
    if why:
        report.notes.append(f"outputs keep the exporter's names ({why})")
        return
    for value, name in zip(outputs, names, strict=True):
        value.name = name


def _signature(model_proto) -> str:
    """`inputs: ids[batch, seq]; outputs: logits[batch, seq, 64]` of an ONNX graph."""
    def text(values) -> str:
        return ", ".join(f"{v.name}[{', '.join(d.dim_param or str(d.dim_value) for d in v.type.tensor_type.shape.dim)}]"
                         for v in values)

    return f"inputs: {text(model_proto.graph.input)}; outputs: {text(model_proto.graph.output)}"


def _validate_graph(onnx_path: Path, want: int, report: ExportReport) -> None:
    """onnx.checker passes on the written file, the graph holds `want` com.microsoft.MoE nodes, and
    portable means portable."""
    import onnx

    try:
        onnx.checker.check_model(str(onnx_path))
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"the exported graph fails onnx.checker ({str(exc).splitlines()[0]}); nothing was written") \
            from exc
    if report.num_moe_nodes != want:
        raise ExportError(f"expected {want} com.microsoft.MoE node(s), one per call of a fused layer, the graph has "
                          f"{report.num_moe_nodes}; please report this with the model")
    if report.mode == "portable" and any(k.startswith(f"{MSFT_DOMAIN}.") for k in report.node_counts):
        raise ExportError("the portable graph contains com.microsoft operators; please report this")


def _store_each_tensor_once(ir_model, report: ExportReport) -> None:
    """Keep one initializer per distinct tensor: same dtype, shape and bytes, compared in full (onnx_ir's
    DeduplicateInitializersPass keys on the whole contents, not on a hash). torch's optimizer runs that
    pass with its default limit of 1024 elements, so larger tensors it folded once per call of a layer
    (a portable layer's per-expert slices) stayed repeated; here nothing is too large. It holds a copy
    of every tensor's bytes while it runs, less than the serialisations that follow. The hashed variant
    is not used: it hashes `numpy()` buffers and raises on a non-contiguous tensor."""
    from onnx_ir.passes.common import DeduplicateInitializersPass

    stored = {name: value.const_value for graph in ir_model.graphs() for name, value in graph.initializers.items()}
    DeduplicateInitializersPass(size_limit=sys.maxsize)(ir_model)
    kept = {name for graph in ir_model.graphs() for name in graph.initializers}
    dropped = [tensor for name, tensor in stored.items() if name not in kept]
    if dropped:
        report.notes.append(f"{len(dropped)} repeated initializer(s) ({sum(t.nbytes for t in dropped)} bytes) stored "
                            "once: the exporter had folded a copy per call of a layer")


def _external_data(ir_model, data_name: str, wanted: bool | None, report: ExportReport) -> bool:
    """Whether the weights go to `data_name` beside the model file."""
    nbytes = sum(value.const_value.nbytes for graph in ir_model.graphs() for value in graph.initializers.values()
                 if value.const_value is not None)
    if wanted is False and nbytes >= EXTERNAL_DATA_BYTES:
        raise ExportError(f"the weights take {nbytes / 2**30:.2f} GiB, more than one ONNX file can hold (2 GiB): "
                          "store them beside it with external_data=True or None (CLI: --external-data)")
    if not (wanted or nbytes >= EXTERNAL_DATA_BYTES):
        return False
    size = f"{nbytes / 2**30:.2f} GiB" if nbytes >= 1 << 30 else f"{nbytes / 2**20:.1f} MiB"
    report.notes.append(f"weights ({size}) in {data_name} beside {data_name.removesuffix('.data')}: keep the "
                        "two together")
    return True


def _refuse_replacing_other_files(path: Path, data_name: str) -> None:
    """What `force` may replace: an earlier export at `path` (an ONNX model), and beside it the data file that
    model keeps its weights in; not a file of another kind given by mistake, nor another data file of that
    name (a single-file export next to it does not own it)."""
    import onnx

    data = path.parent / data_name
    if not (path.exists() or data.exists()):
        return
    try:
        earlier = onnx.load(str(path), load_external_data=False) if path.exists() else None
    except Exception:  # noqa: BLE001 - protobuf raises DecodeError and others on a file that is no model
        earlier = None
    if earlier is not None and not (earlier.ir_version and earlier.graph.node):  # bytes that parse as an empty one
        earlier = None
    if path.exists() and earlier is None:
        raise ExportError(f"{path} exists and is not an ONNX model, which force replaces: choose another output path")
    owned = earlier is not None and any(e.key == "location" and e.value == data_name
                                        for t in _initializers(earlier.graph) for e in t.external_data)
    if data.exists() and not owned:
        raise ExportError(f"{data} exists and is not the external data of an earlier export to {path.name}: move it "
                          "away or choose another output path")


def _save(model_proto, path: Path, data_name: str | None) -> None:
    """The model at `path`; with `data_name`, its weights in that file beside it (and `model_proto` then
    refers to them there instead of holding them)."""
    import onnx
    from onnx.external_data_helper import set_external_data

    if data_name is not None:  # onnx.save(save_as_external_data=True) refuses when a file of that name exists
        for tensor in _initializers(model_proto.graph):  # in the working directory, wherever `path` is
            if tensor.HasField("raw_data") and len(tensor.raw_data) >= EXTERNAL_MIN_BYTES:
                set_external_data(tensor, data_name)
    onnx.save(model_proto, str(path))  # writes the tensors marked external to `data_name` beside `path`


def _initializers(graph):
    """The initializers of an ONNX graph and of the subgraphs of its nodes (If, Loop, Scan)."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            for subgraph in (*([attribute.g] if attribute.HasField("g") else []), *attribute.graphs):
                yield from _initializers(subgraph)


__all__ = ["ExportReport", "Gating", "LayerExport", "MODES", "export_onnx", "export_saved", "router_gating",
           "topk_moe"]
