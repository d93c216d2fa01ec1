"""AnnotateSharding: the annotated graph's node.meta against hand-written expected annotations (golden)."""

import pytest
import torch.fx as fx

import moeify
from moeify.errors import PostconditionError
from moeify.passes.annotate_sharding import META_KEY, AnnotateSharding
from moeify.passes.infra import Skip


def expected_annotations(expert_params: list[str], router_params: list[str]) -> dict[str, dict]:
    """Written out by hand from the schema in the issue, not derived from the pass."""
    return {
        "flatten": {"version": 1, "placement": "data_parallel", "mesh_dim": "dp"},
        "router": {"version": 1, "placement": "replicate", "params": {p: "replicate" for p in router_params}},
        "dispatch": {"version": 1, "placement": "collective", "collective": "all_to_all", "mesh_dim": "ep",
                     "exchange": ["counts_E", "x_ND"]},
        "experts": {"version": 1, "placement": "shard", "mesh_dim": "ep",
                    "params": {p: {"dim": 0, "mesh_dim": "ep"} for p in expert_params}},
        "combine": {"version": 1, "placement": "collective", "collective": "all_to_all", "mesh_dim": "ep",
                    "exchange": ["y_ND"]},
        "aux": {"version": 1, "placement": "local", "reduction": "local_batch"},
        "unflatten": {"version": 1, "placement": "data_parallel", "mesh_dim": "dp"},
    }


CASES = [  # example model, config, expert tensors, router tensors, MoE layers (owner-relative name per owner)
    ("gpt", {}, ["w1_EFD", "w2_EDF", "b1_EF", "b2_ED"], ["gate.weight"], ["blocks.0.mlp", "blocks.1.mlp"]),
    ("llama", {}, ["w1_EFD", "w2_EDF", "w3_EFD"], ["gate.weight"], ["layers.0.mlp", "layers.1.mlp"]),
    ("mlp", {"router": "switch", "top_k": 1, "router_bias": True}, ["w1_EFD", "w2_EDF", "b1_EF", "b2_ED"],
     ["gate.weight", "gate.bias"], ["blocks.0", "blocks.1"]),
]


def _converted(example, name, overrides):
    ex = example(name)
    cfg = moeify.MoEConfig(num_experts=4, **{"top_k": 2, **overrides})
    return moeify.convert(ex.build_model(), cfg, verify=False)


@pytest.mark.parametrize("name, overrides, expert_params, router_params, owners", CASES)
def test_annotations_match_golden(example, name, overrides, expert_params, router_params, owners):
    result = _converted(example, name, overrides)
    golden = expected_annotations(expert_params, router_params)
    for owner in owners:
        gm = result.model.get_submodule(owner).__dict__["_moeify_graph_module"]
        got = {}
        for node in gm.graph.nodes:
            if "moeify" in node.meta:
                got[node.meta["moeify"]["role"]] = node.meta[META_KEY]
            else:  # plumbing (getitem, placeholders, the owner's own ops) carries no sharding
                assert META_KEY not in node.meta, node.name
        assert got == golden


@pytest.mark.parametrize("name, overrides, expert_params, router_params, owners", CASES[:1])
def test_report_carries_annotations(example, name, overrides, expert_params, router_params, owners):
    result = _converted(example, name, overrides)
    golden = expected_annotations(expert_params, router_params)
    assert [r.sharding for r in result.report.regions] == [golden] * len(owners)
    text = str(result.report)
    assert "expert-parallel sharding:" in text
    assert "experts w1_EFD/w2_EDF/b1_EF/b2_ED sharded on dim 0 over 'ep'" in text
    assert "all_to_all at dispatch and combine over 'ep'" in text
    # round trip through the saved plan's JSON
    again = moeify.report.ConversionReport.from_dict(result.report.to_dict())
    assert again.regions[0].sharding == golden


def test_unknown_role_is_reported_not_silently_skipped(example):
    result = _converted(example, "gpt", {})
    gm = result.model.get_submodule("blocks.0.mlp").__dict__["_moeify_graph_module"]
    gm = fx.GraphModule(gm, gm.graph)  # fresh copy of the graph, metas included
    for node in gm.graph.nodes:
        node.meta.pop(META_KEY, None)
        if node.meta.get("moeify", {}).get("role") == "aux":
            node.meta["moeify"] = {"layer": "moe", "role": "mystery"}
    out = AnnotateSharding()(gm)
    assert out.modified is False  # meta only
    assert len(out.skipped) == 1 and isinstance(out.skipped[0], Skip)
    assert "no sharding rule for role 'mystery'" in out.skipped[0].reason
    assert out.changes and "sharded on dim 0 over 'ep'" in out.changes[0]


def test_postcondition_names_the_unannotated_node(example):
    result = _converted(example, "gpt", {})
    gm = result.model.get_submodule("blocks.0.mlp").__dict__["_moeify_graph_module"]
    gm = fx.GraphModule(gm, gm.graph)
    for node in gm.graph.nodes:
        node.meta.pop(META_KEY, None)
    with pytest.raises(PostconditionError, match="moe_dispatch"):
        AnnotateSharding().ensures(gm)


def test_split_ffn_layers_are_annotated_too(example):
    """BERT's FFN split across `intermediate` and `output`: the MoE lives in the tail's rewritten graph."""
    result = _converted(example, "hf_bert", {})
    golden = expected_annotations(["w1_EFD", "w2_EDF", "b1_EF", "b2_ED"], ["gate.weight"])
    assert result.report.regions and all(r.sharding == golden for r in result.report.regions)
    tail = result.model.get_submodule(result.report.regions[0].owner).__dict__["_moeify_graph_module"]
    assert {n.meta["moeify"]["role"]: n.meta[META_KEY] for n in tail.graph.nodes if "moeify" in n.meta} == golden
    assert "expert-parallel sharding:" in str(result.report)
