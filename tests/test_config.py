import json

import pytest

from moeify import MoEConfig
from moeify.errors import ConfigError, MoeifyError


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
