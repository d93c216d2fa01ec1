"""`moeify.convert`: dense model in, MoE model and a report out. The caller's model is not touched.

Steps (check everything first, then mutate a copy):
1. capture: trace the largest traceable parts of the model (`moeify.capture`);
2. find: `FindFFNRegions` on each captured graph;
3. plan: `plan_regions` applies the config's selection; nothing selected is a typed error;
4. rewrite: per owner module (the innermost module whose forward holds a region), trace that
   owner alone and run `RewriteToMoE -> InsertAuxLoss -> AnnotateSharding -> VerifyGraph`, then install the new
   forward on the owner (same class, same parameter names for everything untouched);
5. verify: on the example inputs, the converted model's outputs vs the dense model's.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from moeify import capture as capture_mod
from moeify.compare import abs_diff, low_precision_eps
from moeify.config import MoEConfig
from moeify.errors import (
    CaptureError,
    ExampleInputsError,
    MoeifyError,
    NoFFNRegionError,
    VerificationError,
    expect_type,
    one_line,
)
from moeify.moe.build import DenseFFN, build_moe_layer
from moeify.moe.capacity import mode_factor
from moeify.moe.layer import MoELayer, install_forward_marker
from moeify.moe.projection import build_projection_layer
from moeify.passes import ops
from moeify.passes.annotate_sharding import AnnotateSharding, layer_sharding
from moeify.passes.find_ffn_regions import FFNRegion, FindFFNRegions
from moeify.passes.find_split_ffn import FindSplitFFN, SplitFFNRegion
from moeify.passes.infra import PassManager, Skip
from moeify.passes.insert_aux_loss import InsertAuxLoss
from moeify.passes.plan_regions import plan_regions
from moeify.passes.rewrite_to_moe import RewriteToMoE
from moeify.passes.verify_graph import VerifyGraph
from moeify.report import ConversionReport, RegionReport


@dataclass
class ConversionResult:
    model: nn.Module
    report: ConversionReport
    config: MoEConfig
    source: dict[str, Any] | None = None  # how to rebuild the dense model (recorded by `moeify.save`)
    regions: list[str] = field(default_factory=list)  # keys of the converted regions, for re-application
    # per module path, the optional inputs traced as None (`capture.observe_none_inputs`), for re-application
    none_inputs: dict[str, frozenset[str]] = field(default_factory=dict)


@dataclass
class FoundRegion:
    region: FFNRegion
    unit: capture_mod.CaptureUnit

    @property
    def owner(self) -> str:
        return _join(self.unit.path, self.region.owner)

    @property
    def key(self) -> tuple[str, ...]:
        return region_key(self.unit.path, self.region)


def region_key(prefix: str, region: FFNRegion) -> tuple[str, ...]:
    """Identity of a region across traces: its Linear modules' names, qualified by the traced unit's path."""
    return tuple(sorted(_join(prefix, name) for name in region.linears.values()))


def task_heads(found: Sequence[FoundRegion]) -> dict[int, str]:
    """The regions that look like a task head (ELECTRA's classifier and discriminator_predictions, a
    sequence-classification head) rather than a block's FFN, each with why: outside the repeated blocks
    (no `.N.` in its path) that the other regions sit in, and writing another width than it reads (a
    block's FFN writes back into the residual stream, as wide as what it read: `FFNRegion.may_be_head`, which
    exempts projections between recurrent layers)."""
    in_stack = [re.search(r"(^|\.)\d+(\.|$)", f.owner) is not None for f in found]
    if not any(in_stack):
        return {}
    return {i: f"outside the repeated blocks the other FFNs sit in, and maps width {f.region.d_model} to "
               f"{f.region.d_out}"
            for i, f in enumerate(found) if not in_stack[i] and f.region.may_be_head}


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else (prefix or name)


def dense_ffn(region: FFNRegion, gm: fx.GraphModule) -> DenseFFN:
    """Read a region's dense weights (Linear layout) from the graph's modules."""
    lin = {role: ops.linear_params(gm.get_submodule(name)) for role, name in region.linears.items()}
    if "gate_up" in lin:  # one Linear for gate and up: split its output rows
        w, b, d_ff = lin["gate_up"].weight, lin["gate_up"].bias, region.d_ff
        halves = (slice(0, d_ff), slice(d_ff, 2 * d_ff))
        gate, up = halves[region.gate_half], halves[1 - region.gate_half]
        return DenseFFN(region.activation, w[gate], lin["down"].weight, None if b is None else b[gate],
                        lin["down"].bias, w[up], None if b is None else b[up], region.dropout)
    if region.kind == "gated":
        return DenseFFN(region.activation, lin["gate"].weight, lin["down"].weight, lin["gate"].bias,
                        lin["down"].bias, lin["up"].weight, lin["up"].bias, region.dropout)
    return DenseFFN(region.activation, lin["fc1"].weight, lin["fc2"].weight, lin["fc1"].bias, lin["fc2"].bias,
                    dropout=region.dropout)


def find_regions(model: nn.Module, none_inputs: dict[str, frozenset[str]] | None = None,
                 ) -> tuple[list[FoundRegion], list[Skip], capture_mod.Capture]:
    """Every FFN region of `model`, in model order, and every refused candidate. `none_inputs`: see
    `capture.observe_none_inputs`."""
    cap = capture_mod.capture_units(model, none_inputs)
    capture_mod.capture_methods(model, cap)  # helper methods of untraceable modules: split FFNs (BERT)
    capture_mod.capture_ff_blocks(model, cap)  # nn.TransformerEncoderLayer / DecoderLayer: their _ff_block
    capture_mod.capture_wired(model, cap, none_inputs)  # forwards wiring split FFNs (DeBERTa, MPNet)
    found: list[FoundRegion] = []
    skipped: list[Skip] = []
    for unit in cap.units:
        if unit.method is not None and not unit.in_place:
            parent = model.get_submodule(unit.path) if unit.path else model
            result = FindSplitFFN(parent, unit.method, capture_mod.trace, prefix=unit.path,
                                  paths=unit.paths)(unit.graph_module)
        else:
            result = FindFFNRegions(prefix=unit.path)(unit.graph_module)
        found += [FoundRegion(r, unit) for r in result.analysis]
        skipped += result.skipped
    found, overlaps = _distinct_regions(found)
    skipped += overlaps
    # a split FFN's halves were refused one by one on the siblings' own traces: drop those refusals
    claimed = {_join(f.unit.path, name) for f in found for name in f.region.linears.values()}
    skipped = [s for s in skipped if s.where not in claimed]
    scripted = [path for path, m in model.named_modules() if isinstance(m, torch.jit.ScriptModule)]
    skipped += [Skip(path, "is a TorchScript module (torch.jit.script / trace), which fx cannot look into",
                     "convert the model before scripting it") for path in scripted
                if not any(path.startswith(f"{outer}.") for outer in scripted)]
    if any(f.unit.method is not None for f in found):  # method units come last from capture: put them in place
        order = {name: i for i, (name, _) in enumerate(model.named_modules())}
        found.sort(key=lambda f: order.get(f.owner, len(order)))
    return found, skipped, cap


def _distinct_regions(found: list[FoundRegion]) -> tuple[list[FoundRegion], list[Skip]]:
    """Each Linear converted once. A region can show on two traces: a child that traces on its own, and
    its parent's forward traced around its untraceable children, which traces through that child
    again (MobileBERT's FFN blocks inside its layers); it is kept on the unit found first (capture
    lists forward traces before helper methods and wired forwards). Regions that share only some of
    their Linears are both refused: converting one would take a Linear the other still calls."""
    keys_of: dict[str, set[tuple[str, ...]]] = {}
    for f in found:
        for name in f.key:
            keys_of.setdefault(name, set()).add(f.key)
    kept: list[FoundRegion] = []
    skipped: list[Skip] = []
    seen: set[tuple[str, ...]] = set()
    for f in found:
        if f.key in seen:
            continue
        seen.add(f.key)
        others = sorted({key for name in f.key for key in keys_of[name]} - {f.key})
        if others:
            skipped.append(Skip(f.owner, f"its Linears {', '.join(f.key)} also take part in the region "
                                         f"{'; '.join(', '.join(key) for key in others)}: converting either would "
                                         "take a Linear the other still calls",
                                "exclude the owners of both with MoEConfig(exclude=...)"))
        else:
            kept.append(f)
    return kept, skipped


def nearest_candidates(skipped: list[Skip], model: nn.Module | None = None, cap: capture_mod.Capture | None = None,
             limit: int = 5) -> str:
    if not skipped and model is not None:
        moe = native_moe_types(model)
        if moe:
            return f"none: it already holds mixture-of-experts modules ({', '.join(moe[:3])})"
        untraced = f" ({len(cap.failures)} modules did not trace, e.g. {cap.failures[0][0] or '<model>'}: " \
                   f"{cap.failures[0][1]})" if cap is not None and cap.failures else ""
        return f"no Linear layer was seen in the parts of the model that trace{untraced}"
    more = f"; and {len(skipped) - limit} more" if len(skipped) > limit else ""
    return "; ".join(str(s) for s in skipped[:limit]) + more


def native_moe_modules(model: nn.Module) -> dict[str, str]:
    """{name: class} of the mixture-of-experts modules a model holds of its own, not moeify's, by their class
    names' ending (MixtralSparseMoeBlock, Qwen2MoeExperts, DeepseekV3MoE, SwitchTransformersSparseMLP; not
    Qwen2MoeAttention)."""
    ours = {id(m) for layer in moe_layers(model).values() for m in layer.modules()}  # moeify's: a second conversion
    return {name: type(m).__name__ for name, m in model.named_modules() if id(m) not in ours
            and re.search(r"(experts|moe|moeblock|sparsemlp|moelayer)$", type(m).__name__, re.I)}


def native_moe_types(model: nn.Module) -> list[str]:
    return sorted(set(native_moe_modules(model).values()))


def region_builder(cfg: MoEConfig, generator: torch.Generator) -> Callable[[FFNRegion, fx.GraphModule], MoELayer]:
    def build(region: FFNRegion, gm: fx.GraphModule) -> MoELayer:
        if region.kind == "projection":  # a single Linear: an MoE of projections, no hidden layer
            lin = ops.linear_params(gm.get_submodule(region.linears["proj"]))
            return build_projection_layer(cfg, lin.weight, lin.bias, generator=generator)
        return build_moe_layer(cfg, dense_ffn(region, gm), generator=generator)
    return build


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def active_params(model: nn.Module) -> int:
    """Parameters a token touches: everything outside the routed experts, plus top-k experts' worth."""
    total = count_params(model)
    for layer in moe_layers(model).values():
        per_expert = sum(p.numel() for p in layer.experts.parameters()) // layer.experts.num_experts
        total -= per_expert * (layer.experts.num_experts - getattr(layer.router, "top_k", 1))
    return total


def moe_layers(model: nn.Module) -> dict[str, MoELayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, MoELayer)}


def preservation_gap(cfg: MoEConfig) -> str | None:
    """Why `cfg` does not promise that a freshly converted model computes the dense function; None when
    it does."""
    if cfg.init == "copy_noise":
        return f"init='copy_noise' adds noise of std {cfg.init_noise:g} to each expert's copy"
    if cfg.router == "expert_choice":  # every token is chosen by some expert only when capacity * k >= E
        if cfg.expert_choice_capacity * cfg.top_k < cfg.num_experts:
            return "expert choice with expert_choice_capacity x top_k < num_experts leaves some tokens unpicked"
        if cfg.init != "copy" or not cfg.preserve_scale:
            return "expert choice preserves the function only with init='copy' and preserve_scale=True"
        return None
    if cfg.init == "split" and cfg.top_k < cfg.num_experts:
        return "init='split' with top_k < num_experts runs only part of the FFN's neurons per token"
    train_factor, eval_factor = (mode_factor(cfg.capacity_factor, cfg.eval_capacity_factor, training)
                                 for training in (True, False))
    if eval_factor is not None:
        return f"tokens over an expert's capacity (capacity factor {eval_factor:g}) are dropped"
    if train_factor is not None:
        return (f"in training, tokens over an expert's capacity (capacity factor {train_factor:g}) are "
                "dropped; evaluation is dropless")
    if not (cfg.preserve_scale or (cfg.router == "topk" and cfg.normalize_gates)):
        return "preserve_scale=False: the gate values scale the experts' outputs"
    return None


def function_preserving(cfg: MoEConfig) -> bool:
    """Whether `cfg` promises that a freshly converted model computes the dense function."""
    return preservation_gap(cfg) is None


def convert(model: nn.Module, config: MoEConfig | None = None, *, example_inputs: Sequence[Any] = (),
            example_kwargs: dict[str, Any] | None = None, only: Sequence[Sequence[str]] | None = None,
            verify: bool = True, atol: float = 1e-5, source: str | None = None,
            none_inputs: dict[str, Sequence[str]] | None = None) -> ConversionResult:
    """Convert the FFN regions of `model` into MoE layers. `model` itself is left unchanged.
    `config`: a `MoEConfig` (default: MoEConfig()), or a dict of its fields.

    `example_inputs`: positional inputs of the forward (a tuple, or one tensor), or a dict of keyword
    inputs; `example_kwargs`: keyword inputs next to positional ones.

    `only`: keys (sorted Linear names) of the regions to convert, as recorded in a saved plan;
    overrides the config's selection. `verify`: compare outputs on the example inputs and raise
    `VerificationError` when a function-preserving config does not preserve the function.
    `source`: where the dense model comes from (`model.py[:NAME]` or `package.module:factory`),
    recorded by `moeify.save` so that `moeify.load(out_dir)` can rebuild it without a model.
    `none_inputs`: per module path, the optional inputs to trace as None, as recorded in a saved
    plan; by default those the example inputs leave None (`capture.observe_none_inputs`).

    The caller's RNG state is left as it was (`rng_kept`): the example runs and the new layers'
    constructors draw nothing a seeded script would draw next.
    """
    from moeify.source import ModelSource

    expect_type(model, nn.Module, "convert's model", "pass the dense model itself (build_model(), not build_model)")
    if isinstance(config, Mapping):  # the fields as a dict, as plan.json and --config hold them
        config = MoEConfig.from_dict(config)
    expect_type(config, (MoEConfig, type(None)), "convert's config",
                "pass moeify.MoEConfig(...) or a dict of its fields")
    expect_type(verify, bool, "verify", "pass True or False")
    source_record = ModelSource.parse(source).check(defines=True).to_dict() if source is not None else None
    if isinstance(example_inputs, torch.Tensor):  # one input given bare, as to export_onnx
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, Mapping):  # keyword inputs ({"input_ids": ..., "attention_mask": ...}), as
        # a model file's example_inputs() may return them: iterated as a sequence, the names were passed
        if example_kwargs:
            raise ExampleInputsError("example_inputs is a dict of keyword inputs and example_kwargs is given too: "
                                     "pass the keyword inputs in one of them")
        example_inputs, example_kwargs = (), dict(example_inputs)
    with rng_kept(model, example_inputs, example_kwargs or {}):
        return _convert(model, config or MoEConfig(), tuple(example_inputs), example_kwargs or {}, only, verify,
                        atol, source_record, none_inputs)


def _convert(model: nn.Module, cfg: MoEConfig, example_inputs: tuple, example_kwargs: dict[str, Any],
             only: Sequence[Sequence[str]] | None, verify: bool, atol: float, source_record: dict | None,
             none_inputs: dict[str, Sequence[str]] | None) -> ConversionResult:
    checked = verify and bool(example_inputs or example_kwargs)
    if checked and any(p.device.type == "meta" for p in model.parameters()):
        raise ExampleInputsError(f"{type(model).__name__} has parameters on the meta device, so it cannot run to "
                                 "verify the conversion: load its weights first, pass verify=False (--no-verify), or "
                                 "upcycle its checkpoint out of core (moeify convert-checkpoint)")
    with example_errors(model):  # the dense outputs first: bad inputs fail before any work is done
        dense_out = _outputs(model, example_inputs, example_kwargs) if checked else []
    if checked and not dense_out:  # a check over no tensor would pass whatever the conversion did
        raise VerificationError(f"{type(model).__name__}'s output holds no tensor that moeify can compare (it looks "
                                "in tensors, tuples, lists, dicts and dataclasses): return one of those, or pass "
                                "verify=False (--no-verify) to convert unchecked")
    # the converted model's check runs from the RNG state the dense run started from: what the rewrite
    # draws (the observing forward, layer constructors) is undone
    with rng_kept(model, example_inputs, example_kwargs):
        result = _rewrite(model, cfg, example_inputs, example_kwargs, only, source_record, none_inputs)
    if checked:
        check_outputs(dense_out, result.model, example_inputs, example_kwargs, result.report, cfg, atol)
        _report_calls_per_forward(result.model, result.report)
    return result


def _rewrite(model: nn.Module, cfg: MoEConfig, example_inputs: tuple, example_kwargs: dict[str, Any],
             only: Sequence[Sequence[str]] | None, source_record: dict | None,
             none_inputs: dict[str, Sequence[str]] | None) -> ConversionResult:
    """`_convert` without the check: capture, find, plan and rewrite on a copy of `model`."""
    converted = copy.deepcopy(model)
    if none_inputs is None and (example_inputs or example_kwargs):
        with example_errors(model):
            none_inputs = capture_mod.observe_none_inputs(converted, example_inputs, example_kwargs)
    if none_inputs is not None:
        none_inputs = {path: frozenset(names) for path, names in none_inputs.items()}
    else:
        none_inputs = {}
    found, skipped, cap = find_regions(converted, none_inputs)
    if not found and (done := moe_layers(model)):
        raise NoFFNRegionError(f"{type(model).__name__} has {len(done)} MoE layer(s) ({', '.join(list(done)[:3])}"
                               f"{', ...' if len(done) > 3 else ''}) and no dense FFN left: it was converted "
                               "already; convert the dense model (result.model is the converted one)")
    if not found:
        raise NoFFNRegionError(f"no FFN region found in {type(model).__name__}: nearest candidates: "
                               f"{nearest_candidates(skipped, model, cap)}. moeify converts Linear -> act -> Linear "
                               "and gated FFNs")
    if only is not None:
        wanted = {tuple(k) for k in only}
        selected = [i for i, f in enumerate(found) if f.key in wanted]
        missing = wanted - {found[i].key for i in selected}
        if missing:
            raise NoFFNRegionError(f"the plan names regions this model does not have: {sorted(missing)}; "
                                   "build the same architecture the plan was made from")
        plan_skips: list[Skip] = []
    else:
        selected, plan_skips = plan_regions([f.owner for f in found], cfg, task_heads(found))
    if not selected:
        raise NoFFNRegionError(f"{len(found)} FFN region(s) found ({', '.join(f.owner or '<model>' for f in found)}) "
                               f"but the config selected none: {nearest_candidates(plan_skips)}")

    tied = _tied_weights(converted, [found[i] for i in selected])  # read before the rewrite removes the Linears
    report = ConversionReport(model_class=type(model).__name__, skipped=skipped + plan_skips,
                              capture_failures=cap.failures, params_before=count_params(model),
                              function_preserving=function_preserving(cfg))
    generator = torch.Generator().manual_seed(cfg.seed)
    by_owner: dict[str, list[FoundRegion]] = {}
    for i in selected:
        by_owner.setdefault(found[i].owner, []).append(found[i])
    for owner, group in by_owner.items():
        if isinstance(group[0].region, SplitFFNRegion):
            _rewrite_split(converted, group[0], cfg, generator, report)
        else:
            unit = group[0].unit
            _rewrite_owner(converted, owner, group, cfg, generator, report,
                           method=unit.method if unit.in_place else "forward",
                           none_inputs=none_inputs.get(owner, frozenset()))
            for f in group:  # the traced units still hold the dense Linears: let them go before the next owner
                capture_mod.remove_modules(f.unit.graph_module, list(f.region.linears.values()))

    for region in report.regions:
        region.notes += [tied[name] for name in dict.fromkeys(region.linears) if name in tied]
    for module in converted.modules():  # a new layer is born in training mode: give it its parent's mode
        for child in module.children():
            if isinstance(child, MoELayer):
                child.train(module.training)
        if isinstance(module, nn.TransformerEncoder) and any(capture_mod.dense_class(layer) is not type(layer)
                                                             for layer in module.layers):
            # its nested-tensor fast path (eval, with a padding mask) reads layers[0].linear1 and runs fused
            # kernels: a rewritten layer has neither; this attribute is the switch torch checks first
            module.use_nested_tensor = False
    install_forward_marker(converted)
    report.params_after = count_params(converted)
    report.active_params_per_token = active_params(converted)
    report.converted_from = list(moe_layers(model))
    if report.converted_from:  # plan.json records this conversion only: loading needs the model it started from
        report.notes.append(f"the model already held {len(report.converted_from)} moeify MoE layer(s) "
                            f"({', '.join(report.converted_from[:3])}): moeify.save records this conversion only, "
                            "so moeify.load it with model= the model it was converted from")
    native = native_moe_modules(model)
    if native:  # Qwen2-MoE: its shared expert is the dense FFN found; its own experts are left as they are
        kinds = sorted(set(native.values()))
        inside = [f.owner for f in (found[i] for i in selected)
                  if any(f.owner.startswith(f"{name}.") for name in native)]
        shared = (f"; of them, {len(inside)} sit inside its own MoE blocks ({', '.join(inside[:3])}: shared experts, "
                  "which every token ran, now routed; MoEConfig(exclude=...) keeps them dense)") if inside else ""
        report.notes.append(f"the model already holds mixture-of-experts modules of its own ({', '.join(kinds[:3])}): "
                            f"only its dense FFNs were converted{shared}, and the active parameters per token count "
                            "its own experts as if every token used them all")
    return ConversionResult(converted, report, cfg, source=source_record,
                            regions=[list(found[i].key) for i in selected], none_inputs=none_inputs)


def _tied_weights(model: nn.Module, selected: list[FoundRegion]) -> dict[str, str]:
    """{Linear: note} for the selected regions' Linears that share a parameter with a module outside
    their region (weights tied across layers): the MoE layer gets copies, and the tie is gone."""
    notes: dict[str, str] = {}
    holders: dict[int, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        for name, param in module._parameters.items():
            if param is not None:
                holders.setdefault(id(param), []).append(_join(path, name))
    for f in selected:
        roles: dict[str, list[str]] = {}
        for role, name in f.region.linears.items():
            roles.setdefault(_join(f.unit.path, name), []).append(role)
        for linear, its_roles in roles.items():  # one Linear in two places of the FFN: fc(act(fc(x)))
            if len(its_roles) > 1:
                notes[linear] = (f"{linear} is the FFN's {' and its '.join(its_roles)}: each expert gets a copy for "
                                 "each, so that tie is not kept")
        own = set(roles)
        for linear in sorted(own):
            module = model.get_submodule(linear)
            others = sorted({h for p in module._parameters.values() if p is not None for h in holders[id(p)]
                             if h.rpartition(".")[0] not in own})
            if others:
                notes[linear] = (f"{notes[linear]}; " if linear in notes else "") + (
                    f"{linear} shares parameters with {', '.join(others[:3])}: its experts are copies, so that tie is "
                    "not kept")
    return notes


def _report_calls_per_forward(model: nn.Module, report: ConversionReport) -> None:
    """After the example forward: a layer whose module ran more often than its graph calls it (a module
    reused across depth, ALBERT's layer) has learned how often (`moe.layer.mark_forward_done`). The
    report keeps the count, so that `moeify.load` restores it (`set_calls_per_forward`); the
    example's records are dropped."""
    layers = moe_layers(model)
    for region in report.regions:
        if region.name not in layers:
            continue
        aux = layers[region.name].aux
        if aux.calls_per_forward > region.calls_per_forward:
            region.calls_per_forward = aux.calls_per_forward
            region.notes.append(f"its module runs {region.calls_per_forward} times per forward on the example "
                                "inputs: one MoE layer, its aux losses summed over every call")
        aux.clear()


def set_calls_per_forward(model: nn.Module, report: ConversionReport) -> None:
    """Give a loaded model's MoE layers the calls per forward its report recorded (what they use for
    calls made outside a forward of the model, such as a submodule called on its own)."""
    layers = moe_layers(model)
    for region in report.regions:
        if region.name in layers:
            layers[region.name].aux.calls_per_forward = region.calls_per_forward


def _rewrite_owner(model: nn.Module, owner: str, group: list[FoundRegion], cfg: MoEConfig,
                   generator: torch.Generator, report: ConversionReport, method: str = "forward",
                   none_inputs: frozenset[str] = frozenset()) -> None:
    """Rewrite `owner`'s forward (or `method`, for a unit that traced one) with the group's regions."""
    owner_module = model.get_submodule(owner)
    unit = group[0].unit
    try:
        gm = (capture_mod.trace(owner_module, none_inputs) if method == "forward"
              else capture_mod.trace_method(owner_module, method))
        how = unit.how if unit.path == owner else f"{unit.how}; rewritten on fx trace of {owner or '<model>'}"
        prefix = owner
    except Exception as exc:  # noqa: BLE001
        raise CaptureError(f"{owner or '<model>'} holds FFN regions but does not trace on its own "
                           f"({type(exc).__name__}: {exc}); exclude it with MoEConfig(exclude=...)") from exc
    regions = FindFFNRegions(prefix=prefix)(gm).analysis
    # the notes of the discovery trace, which sees the region's surroundings (an input transposed by the caller,
    # an output feeding an LSTM), where the owner's own trace sees its forward's inputs and outputs
    found_notes = {f.key: f.region.notes for f in group}
    chosen = [r for r in regions if region_key(prefix, r) in found_notes]
    firsts: dict[tuple[str, ...], FFNRegion] = {}  # one per region, in order
    calls: dict[tuple[str, ...], int] = {}  # its call sites: several where one FFN runs at every depth
    for r in chosen:
        key = region_key(prefix, r)
        firsts.setdefault(key, r)
        calls[key] = calls.get(key, 0) + 1
    if len(firsts) != len(group):
        raise CaptureError(f"{owner}: the region(s) found on the whole graph were not found again on the owner's own "
                           "trace; its forward may depend on its caller")
    rewrite = RewriteToMoE(chosen, region_builder(cfg, generator))
    gm, log = PassManager([rewrite, InsertAuxLoss(), AnnotateSharding(), VerifyGraph()])(gm, where=owner)
    capture_mod.install_forward(owner_module, gm, method)
    capture_mod.remove_modules(owner_module, [n for r in chosen for n in r.linears.values()])
    if isinstance(owner_module, nn.TransformerEncoderLayer):
        # its eval fast path runs the dense FFN in one fused kernel (and reads linear1): this attribute
        # is one of the conditions torch checks before taking it, and keeps the layer on _ff_block
        owner_module.activation_relu_or_gelu = False
    report.changes += [f"{owner or '<model>'}: {c}" for c in log.changes]
    report.skipped += log.skipped
    for (key, region), (name, layer) in zip(firsts.items(), rewrite.installed.items(), strict=True):
        sites = calls[key]
        shared = [f"called at {sites} places of {owner or '<model>'}'s forward: one MoE layer, its weights shared "
                  "as the dense FFN's were"] if sites > 1 else []
        notes = list(found_notes[key]) + shared
        report.regions.append(RegionReport(
            name=_join(owner, name), owner=owner, kind=region.kind, activation=region.activation,
            d_model=region.d_model, d_ff=region.d_ff, linears=[_join(prefix, n) for n in region.linears.values()],
            capture=how, num_experts=layer.num_experts, top_k=getattr(layer.router, "top_k", cfg.top_k),
            router=cfg.router, notes=notes, sharding=layer_sharding(gm, name), calls_per_forward=sites))


def _rewrite_split(model: nn.Module, found: FoundRegion, cfg: MoEConfig, generator: torch.Generator,
                   report: ConversionReport) -> None:
    """Rewrite a split FFN on its two halves' own traces: the head becomes identity, the tail's
    output Linear becomes the MoE (its dropout, residual add and LayerNorm stay)."""
    split: SplitFFNRegion = found.region
    parent = found.unit.path
    head, tail = _join(parent, split.head), _join(parent, split.tail)
    layer = build_moe_layer(cfg, dense_ffn(split.ffn, found.unit.graph_module), generator=generator)

    head_gm = split.head_gm
    output = next(n for n in head_gm.graph.nodes if n.op == "output")
    output.args = (next(n for n in head_gm.graph.nodes if n.op == "placeholder"),)
    for node in reversed(split.head_nodes):
        head_gm.graph.erase_node(node)
    head_gm.graph.lint()
    head_gm.recompile()

    fc2 = split.tail_linear
    tail_region = FFNRegion(split.kind, "", fc2.args[0], fc2, [fc2], {"fc2": str(fc2.target)}, split.activation,
                            split.d_model, split.d_ff, split.d_out, split.bias, split.dropout)
    rewrite = RewriteToMoE([tail_region], lambda region, gm: layer)
    tail_gm, log = PassManager([rewrite, InsertAuxLoss(), AnnotateSharding(), VerifyGraph()])(split.tail_gm,
                                                                                                where=tail)

    head_module, tail_module = model.get_submodule(head), model.get_submodule(tail)
    capture_mod.install_forward(head_module, head_gm)
    capture_mod.install_forward(tail_module, tail_gm)
    capture_mod.remove_modules(head_module, [split.ffn.linears["fc1"].rpartition(".")[2]])
    capture_mod.remove_modules(tail_module, [str(fc2.target)])
    name = next(iter(rewrite.installed))
    report.changes += [f"{head}: forward rewritten to identity ({split.ffn.linears['fc1']} and its activation moved "
                       f"into {_join(tail, name)})"]
    report.changes += [f"{tail}: {c}" for c in log.changes]
    report.skipped += log.skipped
    how = f"{found.unit.how}; split: {split.head} -> identity, MoE in {split.tail}"
    report.regions.append(RegionReport(
        name=_join(tail, name), owner=tail, kind=split.kind, activation=split.activation, d_model=split.d_model,
        d_ff=split.d_ff, linears=[_join(parent, n) for n in split.linears.values()], capture=how,
        num_experts=layer.num_experts, top_k=getattr(layer.router, "top_k", cfg.top_k), router=cfg.router,
        notes=list(split.notes), sharding=layer_sharding(tail_gm, name)))


def output_items(out: Any) -> list[tuple[str, Any]] | None:
    """The named parts of a container output: a dict's (a Hugging Face ModelOutput's) items, a
    dataclass instance's fields, a sequence's items named by index; None for anything else."""
    if isinstance(out, dict):
        return [(str(key), value) for key, value in out.items()]
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return [(f.name, getattr(out, f.name)) for f in dataclasses.fields(out)]
    if isinstance(out, (tuple, list)):
        return [(str(i), value) for i, value in enumerate(out)]
    return None


def flatten_outputs(out: Any) -> list[torch.Tensor]:
    """Every tensor in a model output (tensor, tuple, list, dict, HF ModelOutput, dataclass), in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    items = output_items(out)
    return [] if items is None else [t for _, value in items for t in flatten_outputs(value)]


# Verification compares |dense - converted| with atol + VERIFY_RTOL * max |dense| (per output tensor):
# float32 rounding of sums whose terms are of magnitude m is about 1e-7 m, so large outputs (mT5's
# logits reach 45) move by more than atol under any reordering of their sums, and so does an element
# where such terms cancel (near zero next to 1e4s): the scale is the tensor's, not the element's. A
# wrong conversion moves outputs by about m. The experts' CPU kernels sum in another order than
# nn.Linear's BLAS, so even a copy of the dense FFN rounds differently.
VERIFY_RTOL = 1e-5


@contextmanager
def rng_kept(model: nn.Module, args: Sequence[Any], kwargs: dict[str, Any]):
    """Run `model` on these inputs inside without moving the caller's RNG state (CPU, and the CUDA
    devices that hold its parameters or the inputs): converting does not change what a seeded
    script draws next."""
    cuda = sorted({t.device.index or 0 for t in (*model.parameters(), *flatten_outputs((args, kwargs)))
                   if t.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        yield


@torch.no_grad()
def _outputs(model: nn.Module, args: Sequence[Any], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """The model's output tensors in eval mode, drawn from the caller's RNG state, which is kept: the
    dense and the converted model draw the same random numbers (ViT-MAE's masking)."""
    with rng_kept(model, args, kwargs), capture_mod.eval_mode(model), _no_fused_fast_path():
        return flatten_outputs(model(*args, **kwargs))


@contextmanager
def _no_fused_fast_path():
    """torch's fused inference path of nn.MultiheadAttention and nn.TransformerEncoder off: with a padding
    mask it computes nested tensors and returns zeros at padded positions, where the layer-by-layer
    path (the one a converted layer takes) computes values; the positions that count agree."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


@contextmanager
def example_errors(model: nn.Module):
    """Inside, a failure of the model's forward on the example inputs is an ExampleInputsError."""
    try:
        yield
    except MoeifyError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of the user's forward: one line naming it
        raise ExampleInputsError(f"the example inputs do not run on the dense {type(model).__name__} "
                                 f"({one_line(exc)}); fix example_inputs() so that model(*inputs) runs") from exc


def output_diffs(dense_out: list[torch.Tensor], converted: nn.Module, args: Sequence[Any], kwargs: dict[str, Any],
                 atol: float, rtol: float = VERIFY_RTOL) -> tuple[float, float]:
    """(max |dense - converted|, max of |dense - converted| - tolerance) over all outputs, the
    converted model run as `_outputs` ran the dense one; NaN as in `compare.abs_diff`.

    The tolerance is atol + rtol * max |dense| per tensor, widened for outputs of a low-precision dtype (bfloat16,
    float16) to compare.LOW_PRECISION_ULPS of its epsilon relative to the output's largest magnitude:
    there the same sums in another order round differently by that much."""
    got = _outputs(converted, args, kwargs)
    if len(dense_out) != len(got):
        raise VerificationError(f"the converted model returns {len(got)} tensors, the dense model {len(dense_out)}")
    diff, excess = 0.0, -math.inf
    for x, y in zip(dense_out, got, strict=True):
        if x.numel():
            d = abs_diff(y, x)
            x_abs = x.double().cpu().abs()
            a, r = atol, rtol
            eps = low_precision_eps(x)
            if eps:
                a, r = max(a, eps * x_abs.max().item()), max(r, eps)
            diff, excess = max(diff, d.max().item()), max(excess, (d - a - r * x_abs.max()).max().item())
    return diff, excess


def check_outputs(dense_out: list[torch.Tensor], converted: nn.Module, args: Sequence[Any], kwargs: dict[str, Any],
                  report: ConversionReport, cfg: MoEConfig, atol: float) -> None:
    diff, excess = output_diffs(dense_out, converted, args, kwargs, atol)
    report.max_abs_diff = diff
    if report.function_preserving and excess > 0:
        raise VerificationError(f"the converted model's outputs differ from the dense model's by {diff:.3g} "
                                f"(> {atol} + {VERIFY_RTOL} x max |output|) although the config is function "
                                "preserving; please report this with the model, or pass verify=False (--no-verify) "
                                "to inspect it")
    if not report.function_preserving:
        report.notes.append(f"this config does not promise the dense function ({preservation_gap(cfg)}): outputs "
                            f"at init moved by max |diff| {diff:.3g} on the example inputs, in eval mode")
