import json

import pytest
import torch

import moeify
from moeify.errors import SerializationError
from tests.conftest import ROOT, load_example


@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_round_trip_from_recorded_source_and_from_given_model(tmp_path, name):
    ex = load_example(name)
    result = moeify.convert(ex.build_model(), moeify.MoEConfig(num_experts=4, top_k=2, every_n=2),
                            source=f"{ROOT / 'examples' / name}.py:build_model")
    with torch.no_grad():  # make the weights differ from any fresh conversion
        for p in result.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = moeify.save(result, tmp_path / "out")
    (x,) = ex.example_inputs()
    result.model.eval()
    for loaded in (moeify.load(out), moeify.load(out, model=ex.build_model())):
        with torch.no_grad():
            assert torch.equal(loaded.model.eval()(x), result.model(x))
        assert loaded.config == result.config
        assert [r.name for r in loaded.report.regions] == [r.name for r in result.report.regions]
    # every_n=2 converted only the second of two FFN layers
    assert [r.name for r in result.report.regions][0].startswith(("blocks.1", "layers.1"))


def test_load_without_source_needs_a_model(tmp_path):
    ex = load_example("mlp")
    out = moeify.save(moeify.convert(ex.build_model(), moeify.MoEConfig(num_experts=2, top_k=1)), tmp_path / "o")
    with pytest.raises(SerializationError, match="model=dense_model"):
        moeify.load(out)
    assert moeify.load(out, model=ex.build_model()).report.regions


def test_plan_mismatch_and_bad_plan(tmp_path):
    ex = load_example("mlp")
    out = moeify.save(moeify.convert(ex.build_model(), moeify.MoEConfig(num_experts=2, top_k=1)), tmp_path / "o")
    with pytest.raises(SerializationError, match="does not have"):
        moeify.load(out, model=load_example("gpt").build_model())
    (out / "plan.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(SerializationError, match="not a moeify plan"):
        moeify.load(out, model=ex.build_model())
    with pytest.raises(SerializationError, match="no plan.json"):
        moeify.load(tmp_path)


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    from moeify import serialization

    ex = load_example("mlp")
    result = moeify.convert(ex.build_model(), moeify.MoEConfig(num_experts=2, top_k=1))

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(serialization, "save_model", broken)
    with pytest.raises(SerializationError, match="cannot write .*deeper: disk full"):
        moeify.save(result, tmp_path / "o" / "deeper")
    assert list(tmp_path.iterdir()) == []  # not even the parent the save created


def test_force_never_replaces_a_file_or_a_foreign_directory(tmp_path):
    result = moeify.convert(load_example("mlp").build_model(), moeify.MoEConfig(num_experts=2, top_k=1))
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(SerializationError, match="is a file, not an output directory"):
        moeify.save(result, tmp_path / "afile", force=True)
    (tmp_path / "empty").mkdir()
    moeify.save(result, tmp_path / "empty", force=True)  # an empty directory may be filled
    assert (tmp_path / "afile").read_text() == "mine" and (tmp_path / "empty" / "plan.json").is_file()
