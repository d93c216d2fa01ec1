import copy
import json
import pickle

import pytest

from moeify import MoEConfig
from moeify.errors import ConfigError, MoeifyError, UnknownFieldError


@pytest.mark.parametrize("kwargs, needle", [
    ({"num_experts": 1}, "num_experts"),
    ({"top_k": 0}, "top_k"),
    ({"num_experts": 4, "top_k": 5}, "top_k must be <= num_experts"),
    ({"router": "bogus"}, "choose one of"),
    ({"router": "switch", "top_k": 2}, "switch router is top-1"),
    ({"init": "zeros"}, "init"),
    ({"every_n": 0}, "every_n"),
    ({"capacity_factor": 0.0}, "capacity_factor"),
    ({"expert_dropout": 1.5}, "expert_dropout"),
    ({"targets": ("(",)}, "regular expression"),
    ({"num_groups": 3, "num_experts": 8}, "divide"),
    ({"z_loss_coef": -1.0}, "z_loss_coef"),
    ({"drop_policy": "gate"}, "capacity limit drops, and there is none: set capacity_factor"),  # was accepted, unused
])
def test_invalid_values_raise_typed_error_with_fix(kwargs, needle):
    with pytest.raises(ConfigError) as info:
        MoEConfig(**kwargs)
    assert isinstance(info.value, MoeifyError)
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_json_round_trip_and_frozen():
    cfg = MoEConfig(num_experts=4, top_k=1, router="switch", targets=["mlp"], layers=[0, 2])
    data = json.loads(cfg.to_json())
    assert data["version"] == 1
    again = MoEConfig.from_dict(data)
    assert again == cfg and again.targets == ("mlp",) and again.layers == (0, 2)
    with pytest.raises(AttributeError):
        cfg.num_experts = 3


def test_unknown_field_is_refused():
    with pytest.raises(ConfigError, match="no field"):
        MoEConfig.from_dict({"num_experts": 4, "experts": 3})


INF = float("inf")


@pytest.mark.parametrize("data, name", [
    # wrong types, as a --config JSON file can spell them
    ({"preserve_scale": "false"}, "preserve_scale"),
    ({"router_bias": 1}, "router_bias"),
    ({"num_shared_experts": "2"}, "num_shared_experts"),
    ({"router_init_scale": "1"}, "router_init_scale"),
    ({"expert_dropout": "0.1"}, "expert_dropout"),
    ({"layers": 3}, "layers"),
    ({"layers": ["a"]}, "layers"),
    ({"layers": [True]}, "layers"),
    ({"targets": 5}, "targets"),
    ({"targets": ["mlp", 3]}, "targets"),
    ({"exclude": {"a": 1}}, "exclude"),
    ({"seed": "x"}, "seed"),
    ({"num_shared_experts": 1.5}, "num_shared_experts"),
    ({"num_experts": True}, "num_experts"),
    ({"num_groups": 2.0}, "num_groups"),
    ({"router": 3}, "router"),
    ({"version": "1"}, "version"),
    # out of range
    ({"seed": 10**23}, "seed"),
    ({"seed": -(2**63) - 1}, "seed"),
    ({"capacity_factor": -INF}, "capacity_factor"),  # (inf is dropless: test_capacity)
    ({"eval_capacity_factor": float("nan")}, "eval_capacity_factor"),
    ({"capacity_factor": 10**400}, "capacity_factor"),
    ({"router": "expert_choice", "expert_choice_capacity": INF}, "expert_choice_capacity"),
    ({"router_init_scale": INF}, "router_init_scale"),
    ({"group_top_k": -5}, "group_top_k"),
    # options that would be silently ignored in this combination
    ({"group_top_k": 2}, "group_top_k"),
    ({"router_jitter": 0.1}, "router_jitter"),
    ({"router": "noisy_topk", "router_jitter": 0.1}, "router_jitter"),
    ({"expert_choice_capacity": 2.0}, "expert_choice_capacity"),
    ({"router": "switch", "top_k": 1, "expert_choice_capacity": 0.5}, "expert_choice_capacity"),
    ({"split_method": "cluster"}, "split_method"),
    ({"init": "copy_noise", "split_method": "cluster"}, "split_method"),
    ({"init_noise": 0.05}, "init_noise"),
    ({"init": "split", "init_noise": 0.05}, "init_noise"),
])
def test_bad_field_is_one_line_config_error_naming_it(data, name):
    with pytest.raises(ConfigError) as info:
        MoEConfig.from_dict(data)
    message = str(info.value)
    assert message.startswith(f"MoEConfig.{name}=") and " is invalid: " in message
    assert "\n" not in message


@pytest.mark.parametrize("data", [[{"num_experts": 4}], "num_experts", 3])
def test_config_that_is_not_an_object_is_refused(data):
    with pytest.raises(ConfigError, match="JSON object"):
        MoEConfig.from_dict(data)


@pytest.mark.parametrize("kwargs, field_name, stored", [
    ({"seed": 2**64 - 1}, "seed", 2**64 - 1),  # torch.Generator.manual_seed's range: [-2**63, 2**64)
    ({"seed": -(2**63)}, "seed", -(2**63)),
    ({"capacity_factor": 2}, "capacity_factor", 2),  # an int is a float
    ({"router_init_scale": 1}, "router_init_scale", 1),
    ({"layers": [2, 0]}, "layers", (2, 0)),
    ({"layers": range(0, 4, 2)}, "layers", (0, 2)),
    ({"targets": "mlp"}, "targets", ("mlp",)),
    ({"exclude": ["a", "b"]}, "exclude", ("a", "b")),
    ({"router": "switch", "top_k": 1, "router_jitter": 0.01}, "router_jitter", 0.01),
    ({"router": "expert_choice", "expert_choice_capacity": 4}, "expert_choice_capacity", 4),
    ({"init": "split", "split_method": "cluster"}, "split_method", "cluster"),
    ({"num_groups": 2, "group_top_k": 2, "top_k": 1}, "group_top_k", 2),
])
def test_valid_values_are_kept_and_round_trip(kwargs, field_name, stored):
    cfg = MoEConfig(**kwargs)
    assert getattr(cfg, field_name) == stored
    assert MoEConfig.from_dict(json.loads(cfg.to_json())) == cfg
    hash(cfg)


def test_unknown_field_suggests_the_nearest():
    with pytest.raises(ConfigError, match=r"num_expert \(did you mean num_experts\?\)"):
        MoEConfig.from_dict({"num_expert": 4})


@pytest.mark.parametrize("make", [lambda: MoEConfig(num_expert=4), lambda: MoEConfig(num_experts=4).replace(topk=1)],
                         ids=["constructor", "replace"])
def test_unknown_keyword_is_a_config_error_naming_the_nearest_field(make):
    # the generated __init__ said only "unexpected keyword argument"; still a TypeError for callers catching that
    near = r"no field\(s\) (num_expert|topk) \(did you mean (num_experts|top_k)\?\)"
    with pytest.raises(UnknownFieldError, match=near):
        make()
    assert issubclass(UnknownFieldError, ConfigError) and issubclass(UnknownFieldError, TypeError)


def test_config_pickles_and_copies_with_its_checked_constructor():
    cfg = MoEConfig(num_experts=4, top_k=1, router="switch", capacity_factor=1.25)
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    assert copy.deepcopy(cfg) == cfg
