import json

import pytest
import torch

import moeify
from moeify.config import MoEConfig
from moeify.errors import ConfigError, SerializationError
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


def test_load_gives_back_the_dtypes_saved(tmp_path):
    """A model cast to bfloat16 after conversion comes back bfloat16 (it came back float32, as the dense
    model its source builds), and one converted from bfloat16 keeps its float32 routers."""
    ex = load_example("gpt")
    source = f"{ROOT / 'examples' / 'gpt.py'}:build_model"
    cast = moeify.convert(ex.build_model(), moeify.MoEConfig(num_experts=4, top_k=2), source=source)
    cast.model.bfloat16()
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "bf16.py").write_text(f"import sys\nsys.path.insert(0, {str(ROOT)!r})\n"
                                              "from examples.gpt import build_model as _build\n\n\n"
                                              "def build_model():\n    return _build().bfloat16()\n")
    native = moeify.convert(_bf16_gpt(), moeify.MoEConfig(num_experts=4, top_k=2),
                            source=f"{tmp_path / 'src' / 'bf16.py'}:build_model")
    routers = {n for n, p in native.model.named_parameters() if p.dtype == torch.float32}
    assert routers and all(".router." in n for n in routers)
    for name, result in (("cast", cast), ("native", native)):
        saved = result.model.state_dict()
        loaded = moeify.load(moeify.save(result, tmp_path / name)).model.state_dict()
        assert {k: v.dtype for k, v in loaded.items()} == {k: v.dtype for k, v in saved.items()}, name
        assert all(torch.equal(loaded[k], saved[k]) for k in saved), name


def test_plan_json_is_strict_json_with_infinite_values(tmp_path):
    """An infinite capacity factor (dropless) and an infinite output difference (a NaN on one side) go
    into plan.json as "inf" (Python's json wrote Infinity, which strict parsers such as jq refuse) and
    come back as inf."""
    import math

    ex = load_example("mlp")
    cfg = moeify.MoEConfig(num_experts=2, top_k=1, router="switch", capacity_factor=1.0,
                           eval_capacity_factor=math.inf)
    result = moeify.convert(ex.build_model(), cfg)
    result.report.max_abs_diff = math.inf
    out = moeify.save(result, tmp_path / "o")

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    plan = json.loads((out / "plan.json").read_text(), parse_constant=refuse)
    assert plan["config"]["eval_capacity_factor"] == "inf" and plan["report"]["max_abs_diff"] == "inf"
    loaded = moeify.load(out, model=ex.build_model())
    assert loaded.config == cfg and loaded.report.max_abs_diff == math.inf


def _bf16_gpt():
    return load_example("gpt").build_model().bfloat16()


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


def test_an_existing_output_reached_through_a_missing_directory_still_needs_force(tmp_path):
    """`new/../victim` is `victim` once `new` exists: it must be refused as victim itself is (it was
    replaced without force, its files lost), as must `victim/sub/..`."""
    result = moeify.convert(load_example("mlp").build_model(), moeify.MoEConfig(num_experts=2, top_k=1))
    (tmp_path / "victim").mkdir()
    (tmp_path / "victim" / "notes.txt").write_text("precious")
    with pytest.raises(SerializationError, match="victim already exists"):
        moeify.save(result, tmp_path / "new" / ".." / "victim")
    with pytest.raises(SerializationError, match="no moeify output"):
        moeify.save(result, tmp_path / "new" / ".." / "victim", force=True)
    with pytest.raises(SerializationError, match="victim already exists"):
        moeify.save(result, tmp_path / "victim" / "sub" / "..")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["notes.txt", "victim"]
    moeify.save(result, tmp_path / "new" / ".." / "fresh")  # a new output that way is fine
    assert (tmp_path / "fresh" / "plan.json").is_file() and not (tmp_path / "new").exists()


# A saved directory damaged after the fact: `moeify.load` and `moeify stats` say so in one SerializationError
# line naming what is wrong, never a traceback from json, safetensors or load_state_dict.
SMALL = ("import torch\nfrom torch import nn\n\n\ndef build_model():\n"
         "    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))\n\n\n"
         "def example_inputs():\n    return (torch.randn(2, 8),)\n")


@pytest.fixture(scope="module")
def saved_small(tmp_path_factory):
    """`moeify convert small.py -o good` (8 experts, top-2)."""
    from click.testing import CliRunner

    from moeify.cli import main

    root = tmp_path_factory.mktemp("small")
    (root / "small.py").write_text(SMALL)
    r = CliRunner().invoke(main, ["convert", str(root / "small.py"), "-o", str(root / "good")])
    assert r.exit_code == 0, r.output
    return root / "good"


def _edit_plan(change):
    def damage(out):
        plan = json.loads((out / "plan.json").read_text())
        plan = change(plan)
        (out / "plan.json").write_text(json.dumps(plan))
    return damage


def _without(key):
    return _edit_plan(lambda plan: {k: v for k, v in plan.items() if k != key})


def _with(key, value):
    return _edit_plan(lambda plan: {**plan, key: value})


def _fewer_experts(plan):
    plan["config"]["num_experts"] = 4
    return plan


def _cut(keep):
    def damage(out):
        data = (out / "model.safetensors").read_bytes()
        (out / "model.safetensors").write_bytes(keep(data))
    return damage


@pytest.mark.parametrize("damage, needle", [
    (_edit_plan(lambda plan: [1, 2]), "plan.json holds an array, not a JSON object"),
    (_without("config"), "plan.json: 'config' is missing (expected an object)"),
    (_with("config", [1]), "'config' is an array (expected an object)"),
    (_with("config", {"num_experts": "8"}), "MoEConfig.num_experts"),
    (_with("regions", 5), "'regions' is the number 5 (expected a list of regions"),
    (_with("regions", [["0", 2]]), "'regions'[0] is an array (expected a non-empty list of module names)"),
    (_with("report", {"x": 1}), "the report has no 'model_class'"),
    (_with("report", "r"), "'report' is the string 'r' (expected an object)"),
    (_edit_plan(lambda p: {**p, "report": {**p["report"], "params_after": "many"}}),
     "the report's 'params_after' is the string 'many', not int"),
    (_edit_plan(lambda p: {**p, "report": {**p["report"], "regions": [{"name": "moe"}]}}),
     "the report's regions[0] has no 'owner'"),
    (_with("source", "small.py"), "'source' is the string 'small.py' (expected null or an object"),
    (_edit_plan(lambda p: {**p, "source": {**p["source"], "kind": "url"}}),
     "'source'['kind'] is the string 'url' (expected 'file' or 'import')"),
    (_edit_plan(lambda p: {**p, "source": {**p["source"], "name": None}}),
     "'source'['name'] is null (expected a string)"),
    (_with("none_inputs", 5), "'none_inputs' is the number 5 (expected an object"),
    (_with("none_inputs", {"": "attention_mask"}), "'none_inputs'[''] is the string 'attention_mask' (expected a list"),
    (lambda out: (out / "plan.json").write_bytes(b'{"format": "\xff"}'), "plan.json is not UTF-8 text"),
    (_cut(lambda data: data[:-10]), "model.safetensors is not a readable safetensors file (SafetensorError: "
                                    "Error while deserializing header: incomplete metadata"),
    (_cut(lambda data: b""), "model.safetensors is not a readable safetensors file (SafetensorError: "
                             "Error while deserializing header: header too small"),
    (_edit_plan(_fewer_experts), "model.safetensors does not fit the re-applied plan: 'moe.router.gate.weight' "
                                 "is [8, 8] in the file but [4, 8] in the model rebuilt from the plan"),
    (lambda out: (out / "model_source.py").unlink(), "has lost model_source.py, the copy of the model file it was "
                                                     "converted from: call moeify.load(path, model=dense_model)"),
], ids=["plan-is-array", "no-config", "config-array", "config-bad-field", "regions-number", "region-not-names",
        "report-unknown-key", "report-string", "report-field-type", "report-region-missing-field", "source-string",
        "source-kind", "source-name-null", "none-inputs-number", "none-inputs-not-lists", "plan-not-utf8",
        "weights-truncated", "weights-empty", "plan-experts-edited", "source-copy-lost"])
def test_damaged_directory_is_one_line_serialization_error(saved_small, tmp_path, damage, needle):
    import shutil

    from click.testing import CliRunner

    from moeify.cli import main

    out = tmp_path / "damaged"
    shutil.copytree(saved_small, out)
    damage(out)
    with pytest.raises(SerializationError) as err:
        moeify.load(out)
    assert needle in str(err.value) and "\n" not in str(err.value)
    r = CliRunner().invoke(main, ["stats", str(out)])
    assert r.exit_code == 2 and r.output == f"error: {err.value}\n", r.output


def test_report_keys_from_a_later_moeify_are_ignored(saved_small, tmp_path):
    import shutil

    out = tmp_path / "later"
    shutil.copytree(saved_small, out)
    _edit_plan(lambda p: {**p, "report": {**p["report"], "new_fact": 1,
                                          "regions": [{**p["report"]["regions"][0], "new_fact": 2}]}})(out)
    assert moeify.load(out).report.regions[0].d_ff == 16


def test_plan_with_the_init_noise_an_older_moeify_ignored_loads(saved_small, tmp_path):
    """Earlier moeify accepted init_noise with init='copy' (it changed nothing); MoEConfig now refuses that pair,
    but a plan saved with it still loads, to the same weights, since the saved tensors never depended on it."""
    import shutil

    out = tmp_path / "older"
    shutil.copytree(saved_small, out)
    _edit_plan(lambda p: {**p, "config": {**p["config"], "init": "copy", "init_noise": 0.3}})(out)
    with pytest.raises(ConfigError, match="init_noise"):
        MoEConfig.from_dict(json.loads((out / "plan.json").read_text())["config"])
    loaded, want = moeify.load(out), moeify.load(saved_small)
    assert loaded.config.init_noise == MoEConfig().init_noise
    got = loaded.model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in want.model.state_dict().items())


def test_load_into_a_model_of_other_sizes_names_the_tensor(saved_small):
    other = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    with pytest.raises(SerializationError, match=r"^\S+ does not fit the re-applied plan: 'moe\.experts\.w1_EFD' is "
                                                 r"\[8, 16, 8\] in the file but \[8, 32, 8\] in the model rebuilt "
                                                 r"from the plan: was the dense model built with the same sizes") as e:
        moeify.load(saved_small, model=other)
    assert "\n" not in str(e.value)


def test_save_of_a_meta_model_says_to_materialise_the_weights(tmp_path):
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    result = moeify.convert(model, moeify.MoEConfig(num_experts=2, top_k=1), verify=False)
    with pytest.raises(SerializationError, match="parameters are on the meta device .*materialise the weights.*"
                                                 "moeify convert-checkpoint") as e:
        moeify.save(result, tmp_path / "o")
    assert "\n" not in str(e.value) and not (tmp_path / "o").exists()


# weights from a later checkpoint: save_pretrained (what transformers' Trainer writes) -------------------------
def _hf_model(kind):
    import transformers

    if kind == "gpt2-tied":  # Conv1D FFNs, the head tied to the embedding (save_pretrained stores it once)
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4,
                                                                    n_positions=32))
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False))


@pytest.mark.parametrize("kind, shard", [("gpt2-tied", None), ("llama", "30KB")])
def test_load_takes_the_weights_of_a_save_pretrained_checkpoint(tmp_path, kind, shard):
    """A conversion saved before training, then trained and checkpointed with save_pretrained (from_pretrained
    would build the dense model and drop the experts): load(out, weights=folder) re-applies the plan and
    takes every trained tensor, through a sharded index too, the tied head included."""
    torch.manual_seed(0)
    dense = _hf_model(kind).eval()
    x = torch.randint(0, 96, (2, 9))
    result = moeify.convert(dense, moeify.MoEConfig(num_experts=4, top_k=2), example_inputs=(x,))
    out = moeify.save(result, tmp_path / "out")
    with torch.no_grad():  # "training": every tensor moves
        for p in result.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    result.model.save_pretrained(tmp_path / "ckpt", **({"max_shard_size": shard} if shard else {}))
    assert (tmp_path / "ckpt" / ("model.safetensors.index.json" if shard else "model.safetensors")).is_file()

    loaded = moeify.load(out, model=_hf_model(kind), weights=tmp_path / "ckpt").model.eval()
    trained = result.model.state_dict()
    got = loaded.state_dict()
    assert sorted(got) == sorted(trained) and all(torch.equal(got[k], trained[k]) for k in trained)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, result.model.eval()(x).logits)
    untrained = moeify.load(out, model=_hf_model(kind)).model  # the plan's own weights: before training
    assert not torch.equal(untrained.state_dict()[next(iter(trained))], trained[next(iter(trained))])


def test_load_refuses_weights_of_another_model(tmp_path):
    from safetensors.torch import save_file

    ex = load_example("mlp")
    out = moeify.save(moeify.convert(ex.build_model(), moeify.MoEConfig(num_experts=2, top_k=1)), tmp_path / "o")
    dense_state = {k: v.contiguous() for k, v in ex.build_model().state_dict().items()}
    save_file(dense_state, tmp_path / "dense.safetensors")
    with pytest.raises(SerializationError, match=r"dense\.safetensors looks like the dense model's checkpoint: it "
                                                 r"holds no MoE weights \(\d+ missing, e\.g\. \S+\) and the Linears "
                                                 r"the conversion replaced \(e\.g\. blocks\.\d\.fc\d\.\w+\); pass a "
                                                 r"checkpoint saved after the conversion"):
        moeify.load(out, model=ex.build_model(), weights=tmp_path / "dense.safetensors")
    converted = moeify.convert(ex.build_model(), moeify.MoEConfig(num_experts=2, top_k=1)).model.state_dict()
    renamed = {f"other.{k}" if ".moe." in k else k: v.contiguous() for k, v in converted.items()}  # MoE, named apart
    save_file(renamed, tmp_path / "other.safetensors")
    with pytest.raises(SerializationError, match=r"other\.safetensors does not fit the plan of this conversion "
                                                 r"\(missing \[.*w1_EFD.*\], unexpected \[.*\]\): pass a "
                                                 r"checkpoint of the model this plan converted$"):
        moeify.load(out, model=ex.build_model(), weights=tmp_path / "other.safetensors")
    with pytest.raises(SerializationError, match=r"^weights \S+nowhere does not exist: pass a save_pretrained "
                                                 "folder"):
        moeify.load(out, model=ex.build_model(), weights=tmp_path / "nowhere")


def test_a_conversion_of_a_converted_model_loads_onto_the_model_it_started_from(tmp_path):
    """Converting twice (4 experts in block 0, then 8 in block 1) saved fine, but loading rebuilt the dense
    model from the source and failed on mismatched keys, blaming the model's sizes. The report now records
    the MoE layers it started from, and load names what to pass."""
    ex = load_example("gpt")
    x = ex.example_inputs()
    source = str(ROOT / "examples" / "gpt.py") + ":build_model"
    first = moeify.convert(ex.build_model(), moeify.MoEConfig(num_experts=4, layers=(0,)), example_inputs=x,
                           source=source)
    second = moeify.convert(first.model, moeify.MoEConfig(num_experts=8), example_inputs=x, source=source)
    assert second.report.converted_from == ["blocks.0.mlp.moe"]
    assert any("already held 1 moeify MoE layer" in n for n in second.report.notes)
    assert not any("mixture-of-experts modules of its own" in n for n in second.report.notes)  # not "native" MoE
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # trained apart: a load that kept the rebuilt weights would not pass below
        for p in second.model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    moeify.save(first, tmp_path / "first")
    moeify.save(second, tmp_path / "second")
    with pytest.raises(SerializationError, match=r"converted already \(its MoE layers blocks\.0\.mlp\.moe are not in "
                                                 r"the model rebuilt from its source\): pass model="):
        moeify.load(tmp_path / "second")
    again = moeify.load(tmp_path / "second", model=moeify.load(tmp_path / "first").model)
    want = second.model.state_dict()
    assert again.model.state_dict().keys() == want.keys()
    assert all(torch.equal(t, want[k]) for k, t in again.model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(again.model(*x), second.model(*x))
    assert {name: layer.num_experts for name, layer in moeify.moe_layers(again.model).items()} == \
        {"blocks.0.mlp.moe": 4, "blocks.1.mlp.moe": 8}
