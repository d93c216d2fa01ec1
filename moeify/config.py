"""`MoEConfig`: what to convert and how, as one frozen, validated, JSON-serializable dataclass.

Devices, process groups and callables never go in here (see STYLE.md habit 4): the config must
round-trip through the JSON plan that `moeify.save` writes.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from moeify.annotations import fits, union_options
from moeify.errors import ConfigError, UnknownFieldError

CONFIG_VERSION = 1

ROUTERS = ("topk", "switch", "noisy_topk", "expert_choice")
INITS = ("copy", "copy_noise", "split")
SPLIT_METHODS = ("random", "cluster")
DROP_POLICIES = ("choice", "position", "gate")


# torch.Generator.manual_seed takes any integer in [-2**63, 2**64) (negatives wrap modulo 2**64)
SEED_RANGE = (-(2**63), 2**64)


def _fail(field_name: str, value: Any, fix: str) -> None:
    raise ConfigError(f"MoEConfig.{field_name}={value!r} is invalid: {fix}")


# fields where float("inf") means something (an unlimited capacity: dropless); other values must be finite
# The ONNX export check's default bound on |onnxruntime - PyTorch| (float32 outputs): here, where the CLI's
# `--atol` default reads it without importing torch
EXPORT_ATOL = 1e-4
INFINITE_OK = frozenset({"capacity_factor", "eval_capacity_factor"})
INF_JSON = "inf"  # how to_dict / from_dict spell an infinite value of those fields in JSON
_WORDS = {bool: "a bool (true/false)", int: "an integer", float: "a finite number", str: "a string"}
_PLURALS = {int: "integers", str: "strings"}


def _describe(hint: Any) -> str:
    """`hint` in words for an error message's fix (JSON spellings in brackets)."""
    words = []
    for option in union_options(hint):
        if option is type(None):
            continue
        if typing.get_origin(option) is tuple:
            words.append(f"a list of {_PLURALS[typing.get_args(option)[0]]}")
        else:
            words.append(_WORDS[option])
    return " or ".join(words) + (", or None (null)" if type(None) in union_options(hint) else "")


def _type_fix(value: Any, hint: Any) -> str:
    """How to fix a `value` that does not fit the annotation `hint`."""
    wanted = f"use {_describe(hint)}"
    items = [typing.get_args(option)[0] for option in union_options(hint) if typing.get_origin(option) is tuple]
    if isinstance(value, tuple) and items:
        bad = next(item for item in value if not any(fits(item, inner, finite=True) for inner in items))
        return f"{wanted}; {bad!r} is {type(bad).__name__}"
    if isinstance(value, (int, float)) and not isinstance(value, bool) and float in union_options(hint):
        return wanted  # a number of the right type, but inf, nan or too large for a float
    return f"{wanted}, not {type(value).__name__}"


def _field(default: Any, help_text: str) -> Any:
    """A config field with its one-line help (the CLI's option help; `dataclasses.fields(...)[i].metadata`)."""
    return field(default=default, metadata={"help": help_text})


@dataclass(frozen=True)
class MoEConfig:
    """How to turn each selected dense FFN into a Mixture-of-Experts layer.

    Selection: `targets` are regexes matched (``re.search``) against the FFN region's owner module
    name (e.g. ``transformer.h.3.mlp``); `exclude` regexes win over `targets`. After that filter,
    `layers` (indices into the remaining regions, in model order) and then `every_n` (keep regions
    ``i`` with ``i % every_n == every_n - 1``, i.e. every other layer starting from the second, as in
    Switch/GShard) narrow the set further.

    Gates: with ``preserve_scale=True`` (the default) the forward gate values of a token's selected
    experts are made to sum to exactly 1 by ``g' = g + stopgrad((1 - sum(g)) / k)``. For the `topk`
    router with renormalisation this is already true; for `switch` (top-1, gate = router probability
    p) the expert output is multiplied by ``1 + p - stopgrad(p)``: the forward value is the expert's
    output, so a freshly upcycled model computes the dense function, and the router's gradient is
    exactly Switch's ``dL/dp = <dL/dy, E(x)>``. Set ``preserve_scale=False`` for the papers' literal
    gates (the report then states how far the outputs moved at init).
    """

    num_experts: int = _field(8, "experts per MoE layer (each starts as a copy of the dense FFN)")
    top_k: int = _field(2, "experts each token is routed to")
    router: str = _field("topk", "how tokens choose experts")
    init: str = _field("copy", "how experts start from the dense FFN: exact copies, copies plus noise, or its "
                               "hidden neurons split among them")
    seed: int = _field(0, "seed of the new layers' random draws (router weights, noise)")

    # selection
    targets: tuple[str, ...] = _field((), "regexes (re.search) on the FFN's owner module name: convert only the "
                                          "matching regions (task heads too)")
    exclude: tuple[str, ...] = _field((), "regexes on the owner module name of regions to leave dense; win over "
                                          "targets")
    layers: tuple[int, ...] | None = _field(None, "indices into the selected regions, in model order, to convert")
    every_n: int = _field(1, "convert every n-th selected region, from the n-th (2: every other layer, as in "
                             "Switch)")

    # upcycling init
    init_noise: float = _field(0.01, "copy_noise: std of the noise added to each weight, relative to its std")
    split_method: str = _field("random", "init=split: how the hidden neurons are partitioned among experts")

    # router
    normalize_gates: bool = _field(True, "topk: renormalise the selected gates to sum to 1")
    softmax_before_topk: bool = _field(True, "topk: softmax over all experts, then top-k (Mixtral); else top-k, "
                                             "then softmax over the kept logits")
    preserve_scale: bool = _field(True, "make a token's forward gates sum to 1, so a fresh upcycled model "
                                        "computes the dense function (see MoEConfig)")
    router_jitter: float = _field(0.0, "switch: multiplicative uniform noise (1 +- eps) on the router's input "
                                       "while training")
    router_init_scale: float = _field(1.0, "router weight ~ truncnormal(0, sqrt(scale / d_model)); Switch "
                                           "suggests 0.1")
    router_bias: bool = _field(False, "give the router's gate Linear a bias")
    num_groups: int | None = _field(None, "hierarchical MoE (Shazeer app. B): experts in this many groups, chosen "
                                          "by a primary gate")
    group_top_k: int = _field(1, "hierarchical MoE: groups each token is routed to")
    num_shared_experts: int = _field(0, "experts every token goes through besides the routed ones")
    expert_choice_capacity: float = _field(1.0, "expert_choice: each expert takes capacity * T * k / E tokens")

    # auxiliary-loss coefficients
    load_balance_coef: float = _field(0.01, "Switch's load-balancing loss alpha * N * sum_i f_i P_i")
    z_loss_coef: float = _field(0.001, "ST-MoE's router z-loss: mean squared logsumexp of the router logits")
    importance_coef: float = _field(0.0, "Shazeer's importance loss w * CV(Importance)^2")
    load_coef: float = _field(0.0, "Shazeer's smooth load loss w * CV(Load)^2 (noisy_topk only)")

    # capacity and dropout
    capacity_factor: float | None = _field(None, "tokens an expert takes, as a multiple of an even share "
                                                 "(T * k / E); the overflow is dropped. None or inf: dropless")
    eval_capacity_factor: float | None = _field(None, "capacity factor in eval mode. None: capacity_factor's; "
                                                      "inf: dropless")
    drop_policy: str = _field("choice", "which assignments a full expert drops: later choices, then later tokens "
                                        "(choice: GShard's top-2); later tokens with all their choices "
                                        "(position); the lowest gates (gate)")
    expert_dropout: float | None = _field(None, "dropout inside experts (Switch's expert dropout). None: the "
                                                "dense FFN's own")

    version: int = field(default=CONFIG_VERSION)

    def __new__(cls, *args: Any, **fields: Any) -> MoEConfig:
        # the generated __init__ would refuse a misspelt field with a bare TypeError; name the
        # nearest field instead, for keyword arguments, from_dict's JSON and replace() alike
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            near = [f"{name} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(name, known, n=1))
                    else name for name in map(str, unknown)]
            raise UnknownFieldError(f"MoEConfig has no field(s) {', '.join(near)}: fix or remove them, "
                                    "or upgrade moeify")
        return super().__new__(cls)

    def __post_init__(self) -> None:
        # tuples may arrive as lists (from JSON or a CLI), a lone target as a string; normalise
        # them before validating, and leave anything else as it is for the type check to refuse
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not any(typing.get_origin(option) is tuple for option in union_options(hints[f.name])):
                continue
            if isinstance(value, str) and f.name in ("targets", "exclude"):
                object.__setattr__(self, f.name, (value,))
            elif isinstance(value, Iterable) and not isinstance(value, (str, bytes, Mapping)):
                object.__setattr__(self, f.name, tuple(value))
        self._validate()

    def _validate(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not fits(value, hints[f.name], finite=not (f.name in INFINITE_OK and value == math.inf)):
                _fail(f.name, value, _type_fix(value, hints[f.name]))
        # every field has its declared type from here on: the checks below are about values
        if self.version != CONFIG_VERSION:
            _fail("version", self.version, f"this moeify reads config version {CONFIG_VERSION}; re-create the config")
        if self.num_experts < 2:
            _fail("num_experts", self.num_experts, "use an integer >= 2 (one expert is the dense model)")
        if self.top_k < 1:
            _fail("top_k", self.top_k, "use an integer >= 1")
        if not SEED_RANGE[0] <= self.seed < SEED_RANGE[1]:
            _fail("seed", self.seed, "use an integer in [-2**63, 2**64) (what torch.Generator.manual_seed takes)")
        if self.router not in ROUTERS:
            _fail("router", self.router, f"choose one of {', '.join(ROUTERS)}")
        if self.router == "switch" and self.top_k != 1:
            _fail("top_k", self.top_k, "the switch router is top-1: set top_k=1 or use router='topk'")
        if self.group_top_k < 1:
            _fail("group_top_k", self.group_top_k, "use an integer >= 1 (groups kept per token with num_groups)")
        if self.num_groups is None:
            if self.top_k > self.num_experts:
                _fail("top_k", self.top_k, f"top_k must be <= num_experts ({self.num_experts})")
            if self.group_top_k != 1:
                _fail("group_top_k", self.group_top_k, "it only applies to hierarchical MoE: set num_groups, "
                      "or leave group_top_k=1")
        else:
            if self.num_groups < 2:
                _fail("num_groups", self.num_groups, "use an integer >= 2, or None for a flat MoE")
            if self.num_experts % self.num_groups:
                _fail("num_groups", self.num_groups, f"it must divide num_experts ({self.num_experts})")
            per_group = self.num_experts // self.num_groups
            if self.group_top_k > self.num_groups:
                _fail("group_top_k", self.group_top_k, f"use 1..num_groups ({self.num_groups})")
            if self.top_k > per_group:
                _fail("top_k", self.top_k, f"with groups, top_k counts experts per group; use <= {per_group}")
            if self.router not in ("topk", "noisy_topk"):
                _fail("router", self.router, "hierarchical MoE (num_groups) works with router='topk' or 'noisy_topk'")
        if self.init not in INITS:
            _fail("init", self.init, f"choose one of {', '.join(INITS)}")
        if self.split_method not in SPLIT_METHODS:
            _fail("split_method", self.split_method, f"choose one of {', '.join(SPLIT_METHODS)}")
        if self.split_method != "random" and self.init != "split":
            _fail("split_method", self.split_method, "it only applies to init='split': set init='split', "
                  "or leave split_method='random'")
        noise_default = type(self).init_noise  # the field's default
        if self.init_noise != noise_default and self.init != "copy_noise":
            _fail("init_noise", self.init_noise, "it only applies to init='copy_noise': set init='copy_noise', "
                  f"or leave init_noise={noise_default}")
        if self.drop_policy not in DROP_POLICIES:
            _fail("drop_policy", self.drop_policy, f"choose one of {', '.join(DROP_POLICIES)}")
        if self.drop_policy == "gate" and (self.capacity_factor, self.eval_capacity_factor) == (None, None):
            _fail("drop_policy", self.drop_policy, "it chooses what a capacity limit drops, and there is none: set "
                  "capacity_factor, or leave drop_policy='choice'")
        if self.every_n < 1:
            _fail("every_n", self.every_n, "use an integer >= 1 (1 converts every selected region)")
        if self.layers is not None and any(i < 0 for i in self.layers):
            _fail("layers", self.layers, "layer indices count from 0 over the matched FFN regions")
        if self.num_shared_experts < 0:
            _fail("num_shared_experts", self.num_shared_experts, "use an integer >= 0")
        for name in ("init_noise", "router_jitter", "load_balance_coef", "z_loss_coef", "importance_coef", "load_coef"):
            if getattr(self, name) < 0:
                _fail(name, getattr(self, name), "use a finite number >= 0")
        if self.router_jitter > 0 and self.router != "switch":
            _fail("router_jitter", self.router_jitter, "input jitter is part of router='switch' only: "
                  "use router='switch', or leave router_jitter=0")
        if self.router_init_scale <= 0:
            _fail("router_init_scale", self.router_init_scale, "use a finite number > 0")
        if self.expert_choice_capacity <= 0:
            _fail("expert_choice_capacity", self.expert_choice_capacity, "use a finite number > 0")
        if self.expert_choice_capacity != 1.0 and self.router != "expert_choice":
            _fail("expert_choice_capacity", self.expert_choice_capacity, "it only applies to router='expert_choice': "
                  "use capacity_factor to limit other routers, or leave expert_choice_capacity=1.0")
        if self.router == "expert_choice" and (self.capacity_factor, self.eval_capacity_factor) != (None, None):
            name = "capacity_factor" if self.capacity_factor is not None else "eval_capacity_factor"
            _fail(name, getattr(self, name),
                  "expert_choice sets each expert's capacity itself: use expert_choice_capacity and leave "
                  "capacity_factor/eval_capacity_factor None")
        if self.load_coef > 0 and self.router != "noisy_topk":
            _fail("load_coef", self.load_coef, "the smooth load loss needs router='noisy_topk' (its noise); "
                  "use load_balance_coef for other routers")
        for name in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                _fail(name, value, "use a number > 0 (inf: dropless)" + (", or None for the training factor"
                                                                           if name.startswith("eval") else
                                                                           ", or None for dropless routing"))
        if self.expert_dropout is not None and not 0.0 <= self.expert_dropout < 1.0:
            _fail("expert_dropout", self.expert_dropout, "use a probability in [0, 1), or None")
        for name in ("targets", "exclude"):
            for pattern in getattr(self, name):
                try:
                    re.compile(pattern)
                except re.error as exc:
                    _fail(name, pattern, f"not a valid regular expression ({exc})")

    # serialization -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["targets"] = list(self.targets)
        data["exclude"] = list(self.exclude)
        data["layers"] = None if self.layers is None else list(self.layers)
        for name in INFINITE_OK:  # strict JSON has no Infinity: an unlimited capacity is written "inf"
            if data[name] == math.inf:
                data[name] = INF_JSON
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoEConfig:
        if not isinstance(data, Mapping):
            raise ConfigError(f"MoEConfig needs a JSON object of fields, not {type(data).__name__}: "
                              'write {"num_experts": 8, ...}')
        return cls(**{name: math.inf if name in INFINITE_OK and value == INF_JSON else value
                      for name, value in data.items()})

    def replace(self, **changes: Any) -> MoEConfig:
        return dataclasses.replace(self, **changes)
