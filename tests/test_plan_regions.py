import pytest

from moeify import MoEConfig
from moeify.passes.plan_regions import plan_regions

NAMES = [f"h.{i}.mlp" for i in range(6)]


@pytest.mark.parametrize("cfg, selected", [
    (MoEConfig(), [0, 1, 2, 3, 4, 5]),
    (MoEConfig(every_n=2), [1, 3, 5]),
    (MoEConfig(layers=(0, 4)), [0, 4]),
    (MoEConfig(targets=(r"h\.[0-2]\.",)), [0, 1, 2]),
    (MoEConfig(exclude=(r"h\.0\.", r"h\.5\.")), [1, 2, 3, 4]),
    (MoEConfig(targets=(r"h\.[0-3]\.",), exclude=(r"h\.1\.",), every_n=2), [2]),
])
def test_selection(cfg, selected):
    got, skipped = plan_regions(NAMES, cfg)
    assert got == selected
    assert len(skipped) == len(NAMES) - len(selected)  # every unselected region is reported


def test_exclude_wins_and_reasons_are_given():
    _, skipped = plan_regions(NAMES, MoEConfig(targets=("mlp",), exclude=(r"h\.2",)))
    assert [(s.where, "exclude" in s.reason) for s in skipped] == [("h.2.mlp", True)]


def test_missing_layer_index_is_reported():
    got, skipped = plan_regions(NAMES[:2], MoEConfig(layers=(1, 7)))
    assert got == [1]
    assert any(s.where == "layers" and "[7]" in s.reason for s in skipped)


def test_task_heads_are_left_out_unless_targets_choose_them():
    names = [*NAMES[:3], "classifier"]
    heads = {3: "maps width 32 to 2"}
    got, skipped = plan_regions(names, MoEConfig(every_n=3), heads)
    assert got == [2]  # layer positions count the blocks' FFNs only
    assert [(s.where, s.reason) for s in skipped if s.where == "classifier"] == [
        ("classifier", "a task head, not a block's FFN: maps width 32 to 2")]
    assert plan_regions(names, MoEConfig(targets=("mlp", "classifier")), heads)[0] == [0, 1, 2, 3]
    assert plan_regions(names, MoEConfig(targets=("mlp",)), heads)[0] == [0, 1, 2]
