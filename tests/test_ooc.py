"""Out-of-core conversion (`moeify.ooc`) against the in-memory path (`moeify.convert` + `moeify.save`)."""

import json
import re
import weakref

import pytest
import torch
from safetensors.torch import load_file, save_file, save_model

import moeify
from moeify.errors import ModelSourceError, SerializationError
from moeify.ooc import SafetensorsReader, convert_checkpoint
from tests.conftest import load_example

SLOW = pytest.mark.slow
CASES = [
    # (example, config, fast); one default case per path and model family, the rest marked slow
    ("llama", dict(num_experts=4, top_k=2), True),
    pytest.param("llama", dict(num_experts=4, top_k=2), False, marks=SLOW),
    pytest.param("llama", dict(num_experts=3, top_k=1, init="copy_noise", seed=7), True, marks=SLOW),
    pytest.param("gpt", dict(num_experts=4, top_k=2), True, marks=SLOW),
    ("gpt", dict(num_experts=4, top_k=2, init="copy_noise"), False),
    pytest.param("mlp", dict(num_experts=2, top_k=1, router="switch", router_bias=True), True, marks=SLOW),
    ("mlp", dict(num_experts=2, top_k=1, router="switch", router_bias=True), False),
    ("lstm_lm", dict(num_experts=4, top_k=2), False),  # a projection region: an MoE of single Linears (KeyError)
    ("llama", dict(num_experts=4, top_k=2, init="split", split_method="cluster"), False),  # k-means needs values
    pytest.param("gpt", dict(num_experts=4, top_k=2, init="split", split_method="cluster"), True, marks=SLOW),
]


def _dense_checkpoint(tmp_path, name, **kwargs):
    model = load_example(name).build_model(**kwargs)
    path = tmp_path / "dense.safetensors"
    save_model(model, str(path))
    return model, path


@pytest.mark.parametrize("name,cfg,fast", CASES)
def test_ooc_equals_in_memory(tmp_path, name, cfg, fast):
    cfg = moeify.MoEConfig(**cfg)
    ex = load_example(name)
    dense, ckpt = _dense_checkpoint(tmp_path, name)
    mem = moeify.convert(dense, cfg, verify=False)
    moeify.save(mem, tmp_path / "mem")
    convert_checkpoint(ckpt, tmp_path / "ooc", cfg, model=ex.build_model, fast=fast)

    want, got = load_file(tmp_path / "mem" / "model.safetensors"), load_file(tmp_path / "ooc" / "model.safetensors")
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        assert torch.equal(got[key], want[key]), key  # bit for bit
    assert json.loads((tmp_path / "ooc" / "plan.json").read_text()) == \
        json.loads((tmp_path / "mem" / "plan.json").read_text())

    loaded = moeify.load(tmp_path / "ooc", model=ex.build_model()).model.eval()
    (x,) = ex.example_inputs()
    with torch.no_grad():
        assert torch.equal(loaded(x), mem.model.eval()(x))


class LayerCountingReader(SafetensorsReader):
    """Records how many distinct transformer layers have tensors alive at once."""

    def __init__(self, path):
        super().__init__(path)
        self.live: dict[str, int] = {}
        self.peak_layers = 0
        self.read_layers: set[str] = set()

    def _drop(self, layer):
        self.live[layer] -= 1
        if not self.live[layer]:
            del self.live[layer]

    def get_tensor(self, name):
        tensor = super().get_tensor(name)
        layer = re.match(r"layers\.\d+", name).group(0)
        self.read_layers.add(layer)
        self.live[layer] = self.live.get(layer, 0) + 1
        self.peak_layers = max(self.peak_layers, len(self.live))
        weakref.finalize(tensor, self._drop, layer)
        return tensor


@pytest.mark.parametrize("fast", [False, True])
def test_ooc_holds_at_most_one_layer(tmp_path, fast):
    sizes = dict(n_layers=6, d_model=32, d_ff=96)
    dense, ckpt = _dense_checkpoint(tmp_path, "llama", **sizes)
    readers = []

    def factory(path):
        readers.append(LayerCountingReader(path))
        return readers[0]

    ex = load_example("llama")
    convert_checkpoint(ckpt, tmp_path / "out", moeify.MoEConfig(num_experts=4), model=lambda: ex.build_model(**sizes),
                       fast=fast, reader_factory=factory)
    reader = readers[0]
    one_ffn = sum(p.numel() * p.element_size() for p in dense.layers[0].mlp.parameters())
    if fast:  # experts are copied file to file: no dense weight is ever materialised
        assert reader.peak_live_bytes == 0 and not reader.read_layers
    else:
        assert reader.read_layers == {f"layers.{i}" for i in range(6)}
        assert reader.peak_layers == 1
        assert reader.peak_live_bytes <= one_ffn
    loaded = moeify.load(tmp_path / "out", model=ex.build_model(**sizes)).model.eval()
    in_memory = moeify.convert(dense, moeify.MoEConfig(num_experts=4), verify=False).model.eval()
    (x,) = ex.example_inputs()
    with torch.no_grad():  # the low-memory path still writes the in-memory conversion's model
        assert torch.equal(loaded(x), in_memory(x))


def test_ooc_rejects_mismatched_checkpoint(tmp_path):
    ex = load_example("llama")
    _, ckpt = _dense_checkpoint(tmp_path, "llama")
    with pytest.raises(SerializationError, match="dtype"):
        convert_checkpoint(ckpt, tmp_path / "a", moeify.MoEConfig(), model=lambda: ex.build_model().to(torch.bfloat16))
    state = load_file(ckpt)
    del state["norm.weight"]
    save_file(state, tmp_path / "partial.safetensors")
    with pytest.raises(SerializationError, match="no tensor 'norm.weight'"):
        convert_checkpoint(tmp_path / "partial.safetensors", tmp_path / "b", moeify.MoEConfig(), model=ex.build_model)
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(SerializationError, match="not a safetensors file"):
        convert_checkpoint(tmp_path / "junk.safetensors", tmp_path / "c", moeify.MoEConfig(), model=ex.build_model)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing half-written


def test_ooc_records_source_for_load(tmp_path):
    """With a ModelSource (what the CLI passes), `moeify.load` rebuilds the dense model by itself."""
    from moeify.source import ModelSource
    from tests.conftest import ROOT

    source = ModelSource.parse(str(ROOT / "examples" / "mlp.py"))
    dense, ckpt = _dense_checkpoint(tmp_path, "mlp")
    want = moeify.convert(dense, moeify.MoEConfig(num_experts=2), verify=False).model.eval()
    (x,) = load_example("mlp").example_inputs()
    for spec in (source, str(ROOT / "examples" / "mlp.py")):  # a spec string as moeify.convert takes one, too
        out = tmp_path / f"out_{type(spec).__name__}"
        convert_checkpoint(ckpt, out, moeify.MoEConfig(num_experts=2), model=lambda: source.build()[0], source=spec)
        assert (out / "model_source.py").is_file()
        loaded = moeify.load(out).model.eval()
        with torch.no_grad():
            assert torch.equal(loaded(x), want(x))


@pytest.mark.parametrize("fast", [True, False])
def test_ooc_fused_gate_up_equals_in_memory(tmp_path, fast):
    """Phi-3's gate_up_proj is split row-wise into gate and up (the fast path steps aside for it)."""
    ex = load_example("hf_causal_lm")
    cfg = moeify.MoEConfig(num_experts=3, top_k=2)
    dense = ex.build_phi3(num_layers=2)
    ckpt = tmp_path / "dense.safetensors"
    save_model(dense, str(ckpt))
    mem = moeify.convert(dense, cfg, example_inputs=ex.example_inputs(), verify=False)
    moeify.save(mem, tmp_path / "mem")
    convert_checkpoint(ckpt, tmp_path / "ooc", cfg, model=lambda: ex.build_phi3(num_layers=2), fast=fast)
    want, got = load_file(tmp_path / "mem" / "model.safetensors"), load_file(tmp_path / "ooc" / "model.safetensors")
    assert sorted(got) == sorted(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    gate_up = dense.model.layers[0].mlp.gate_up_proj.weight
    assert torch.equal(want["model.layers.0.mlp.moe.experts.w1_EFD"][1], gate_up[:128])  # the gate half
    assert torch.equal(want["model.layers.0.mlp.moe.experts.w3_EFD"][1], gate_up[128:])  # the up half


def test_ooc_module_reused_across_depth_sums_every_call(tmp_path):
    """The out-of-core conversion runs no forward, so it cannot count how often ALBERT's one layer runs:
    the loaded model's first forward sums the aux losses over all of its calls all the same."""
    from tests.test_convert import _aux_loss_and_reference, _Reused

    torch.manual_seed(0)
    ckpt = tmp_path / "dense.safetensors"
    save_model(_Reused(), str(ckpt))
    cfg = moeify.MoEConfig(num_experts=4, top_k=2, load_balance_coef=0.5, z_loss_coef=0.1)
    convert_checkpoint(ckpt, tmp_path / "out", cfg, model=_Reused)
    model = moeify.load(tmp_path / "out", model=_Reused()).model
    assert model.block.moe.aux.calls_per_forward == 1  # nothing counted it
    x = torch.randn(2, 5, 8)
    loss, want = _aux_loss_and_reference(model, lambda: model(x))
    assert loss == pytest.approx(want, rel=1e-5)


def _small():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))


def _header(path):
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    return size, json.loads(raw[8:8 + size])


def _last_tensor(path):
    _, header = _header(path)
    header.pop("__metadata__", None)
    return max(header, key=lambda k: header[k]["data_offsets"][1])


def _truncate(path, keep):
    with open(path, "r+b") as f:
        f.truncate(keep)


def _save_altered(path, name, value):
    state = load_file(path)
    if value is None:
        del state[name]
    else:
        state[name] = value
    save_file(state, path)


BROKEN = {
    # case: (break the checkpoint at path, what the error must say)
    "truncated": (lambda p: _truncate(p, p.stat().st_size - 4),
                  lambda p: rf"is truncated: tensor '{re.escape(_last_tensor(p))}' needs bytes \d+\.\.\d+ but the file "
                            rf"has \d+; re-save"),
    "header_only": (lambda p: _truncate(p, 8 + _header(p)[0]),
                    lambda p: r"is truncated: tensor '[\w.]+' needs bytes \d+\.\.\d+ but the file has \d+; re-save"),
    "ffn_shape": (lambda p: _save_altered(p, "2.weight", torch.randn(4, 32)),
                  lambda p: r"2\.weight is torch\.float32 \[4, 32\] but the model built on meta has torch\.float32 "
                            r"\[8, 16\]"),
    "ffn_dtype": (lambda p: _save_altered(p, "2.weight", torch.ones(8, 16, dtype=torch.int32)),
                  lambda p: r"2\.weight is torch\.int32 \[8, 16\] but the model built on meta has torch\.float32"),
    "missing": (lambda p: _save_altered(p, "2.bias", None),
                lambda p: r"has no tensor '2\.bias' that the model needs"),
}


@pytest.mark.parametrize("init", ["copy", "copy_noise", "split"])  # copy: the fast path; the others build layers
@pytest.mark.parametrize("case", list(BROKEN))
def test_ooc_broken_checkpoint_fails_before_writing(tmp_path, case, init):
    """A truncated or mismatched checkpoint is refused with one typed line naming the tensor; nothing is left."""
    ckpt = tmp_path / "dense.safetensors"
    save_model(_small(), str(ckpt))
    breaks, says = BROKEN[case]
    breaks(ckpt)
    with pytest.raises(SerializationError, match=says(ckpt)) as err:
        convert_checkpoint(ckpt, tmp_path / "out", moeify.MoEConfig(num_experts=2, init=init), model=_small)
    assert "\n" not in str(err.value) and "streaming writer" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense.safetensors"]  # no output, no temporary sibling


@pytest.mark.parametrize("init", ["copy", "copy_noise"])
def test_ooc_checkpoint_shrinking_while_read_is_not_masked(tmp_path, init):
    """A file cut short after it was opened (checked at open) fails on the read, with that error, not the
    writer's 'closed after N of M tensors'; the temporary output is removed."""
    ckpt = tmp_path / "dense.safetensors"
    save_model(_small(), str(ckpt))

    def shrinking(path):
        reader = SafetensorsReader(path)
        _truncate(path, reader.data_start)
        return reader

    with pytest.raises(SerializationError, match=r"is truncated: tensor '[\w.]+' needs bytes \d+\.\.\d+ but the file "
                                                 r"(has|ends at) \d+; re-save") as err:
        convert_checkpoint(ckpt, tmp_path / "out", moeify.MoEConfig(num_experts=2, init=init), model=_small,
                           reader_factory=shrinking)
    assert "streaming writer" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense.safetensors"]


# sharded checkpoints (Hugging Face: model-0000i-of-0000n.safetensors + model.safetensors.index.json) -----------
def _tiny_llama(layers: int = 3, tied: bool = False):
    import transformers

    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    return lambda: transformers.LlamaForCausalLM(config)


@pytest.mark.parametrize("fast", [True, False])
def test_ooc_reads_a_sharded_hugging_face_checkpoint(tmp_path, fast):
    """`save_pretrained` with small shards (one tensor or a few each): the index or its folder converts
    bit for bit as the in-memory path does, reading one layer at a time."""
    from moeify.ooc import INDEX_NAME, ShardedReader

    build = _tiny_llama()
    torch.manual_seed(0)
    dense = build().eval()
    dense.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    shards = sorted(p.name for p in (tmp_path / "hf").glob("*.safetensors"))
    assert len(shards) > 3 and (tmp_path / "hf" / INDEX_NAME).is_file()
    cfg = moeify.MoEConfig(num_experts=4, top_k=2)
    x = torch.randint(0, 128, (2, 7))
    mem = moeify.convert(dense, cfg, example_inputs=(x,))
    moeify.save(mem, tmp_path / "mem")
    want = load_file(tmp_path / "mem" / "model.safetensors")
    readers = []

    def factory(path):
        readers.append(ShardedReader(path))
        return readers[-1]

    for source, out in ((tmp_path / "hf" / INDEX_NAME, "by_index"), (tmp_path / "hf", "by_folder")):
        kwargs = {"reader_factory": factory} if out == "by_index" else {}
        convert_checkpoint(source, tmp_path / out, cfg, model=build, fast=fast, **kwargs)
        got = load_file(tmp_path / out / "model.safetensors")
        assert sorted(got) == sorted(want)
        assert all(torch.equal(got[k], want[k]) for k in want)  # bit for bit
    one_ffn = sum(p.numel() * p.element_size() for p in dense.model.layers[0].mlp.parameters())
    assert readers[0].peak_live_bytes == 0 if fast else 0 < readers[0].peak_live_bytes <= one_ffn
    loaded = moeify.load(tmp_path / "by_folder", model=build()).model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, mem.model.eval()(x).logits)


def _sharded_small(tmp_path):
    """_small() saved as two shards and an index."""
    from moeify.ooc import INDEX_NAME

    state = {k: v.contiguous() for k, v in _small().state_dict().items()}
    weight_map = {}
    for i, keys in enumerate((["0.weight", "0.bias"], ["2.weight", "2.bias"])):
        save_file({k: state[k] for k in keys}, tmp_path / f"s{i}.safetensors")
        weight_map.update(dict.fromkeys(keys, f"s{i}.safetensors"))
    index = tmp_path / INDEX_NAME
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index, weight_map


def _remap(index, weight_map, **changes):
    index.write_text(json.dumps({"weight_map": {**weight_map, **changes}}))


SHARD_BREAKS = {
    # case: (break the sharded checkpoint, what the error must say)
    "missing_shard": (lambda index, wm: (index.parent / "s1.safetensors").unlink(),
                      r"names shard s1\.safetensors, which is not a file beside it: download every shard"),
    "outside_folder": (lambda index, wm: _remap(index, wm, **{"2.bias": "../x.safetensors"}),
                       r"names shard \.\./x\.safetensors, which is not a file beside it"),
    "misplaced": (lambda index, wm: _remap(index, wm, **{"2.bias": "s0.safetensors"}),
                  r"places '2\.bias' in s0\.safetensors, which does not hold it"),
    "not_an_index": (lambda index, wm: index.write_text('{"metadata": {}}'), r"is not a safetensors index"),
    "not_json": (lambda index, wm: index.write_text("{"), r"is not a safetensors index"),
    "corrupt_shard": (lambda index, wm: _truncate(index.parent / "s0.safetensors", 20), r"s0\.safetensors"),
    "unmapped_tensor": (lambda index, wm: index.write_text(json.dumps({"weight_map": {k: v for k, v in wm.items()
                                                                                      if k != "2.bias"}})),
                        r"has no tensor '2\.bias' that the model needs"),
}


@pytest.mark.parametrize("case", list(SHARD_BREAKS))
def test_ooc_broken_sharded_checkpoint_fails_before_writing(tmp_path, case):
    index, weight_map = _sharded_small(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    breaks, says = SHARD_BREAKS[case]
    breaks(index, weight_map)
    before = [n for n in before if (tmp_path / n).exists()]
    with pytest.raises(SerializationError, match=says) as err:
        convert_checkpoint(tmp_path, tmp_path / "out", moeify.MoEConfig(num_experts=2), model=_small)
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no temporary sibling


def test_ooc_sharded_small_equals_single_file(tmp_path):
    index, _ = _sharded_small(tmp_path)
    save_model(_small(), str(tmp_path / "one.safetensors"))
    cfg = moeify.MoEConfig(num_experts=2, init="copy_noise")
    convert_checkpoint(index, tmp_path / "a", cfg, model=_small)
    convert_checkpoint(tmp_path / "one.safetensors", tmp_path / "b", cfg, model=_small)
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SerializationError, match="holds neither model.safetensors nor model.safetensors.index.json"):
        convert_checkpoint(tmp_path / "empty", tmp_path / "c", cfg, model=_small)


def test_ooc_sees_the_optional_inputs_the_example_leaves_none(tmp_path):
    """XGLM's decoder layers take encoder_hidden_states: traced as a tensor, they hid the FFN from the out-of-core
    path (it found none) while the in-memory conversion, running its example, found them all. With the example
    it runs once on the meta device and converts bit for bit as in memory; a model that cannot run there
    (BartForCausalLM calls .item()) gets a note instead."""
    import transformers

    config = transformers.XGLMConfig(vocab_size=64, d_model=32, num_layers=2, attention_heads=4, ffn_dim=64)
    torch.manual_seed(0)
    dense = transformers.XGLMForCausalLM(config).eval()
    save_model(dense, str(tmp_path / "dense.safetensors"))
    cfg = moeify.MoEConfig(num_experts=4, top_k=2)
    x = torch.randint(2, 64, (2, 7))
    kwargs = {"use_cache": False}
    mem = moeify.convert(dense, cfg, example_inputs=(x,), example_kwargs=kwargs)
    moeify.save(mem, tmp_path / "mem")
    with pytest.raises(moeify.errors.NoFFNRegionError):
        convert_checkpoint(tmp_path / "dense.safetensors", tmp_path / "blind", cfg,
                           model=lambda: transformers.XGLMForCausalLM(config))
    result = convert_checkpoint(tmp_path / "dense.safetensors", tmp_path / "ooc", cfg,
                                model=lambda: transformers.XGLMForCausalLM(config), example_inputs=(x,),
                                example_kwargs=kwargs)
    assert len(result.report.regions) == len(mem.report.regions) == 2
    want, got = load_file(tmp_path / "mem" / "model.safetensors"), load_file(tmp_path / "ooc" / "model.safetensors")
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    loaded = moeify.load(tmp_path / "ooc", model=transformers.XGLMForCausalLM(config)).model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x, **kwargs).logits, mem.model.eval()(x, **kwargs).logits)

    bart = transformers.BartConfig(vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64,
                                   decoder_ffn_dim=64, encoder_attention_heads=4, decoder_attention_heads=4)
    save_model(transformers.BartForCausalLM(bart), str(tmp_path / "bart.safetensors"))
    result = convert_checkpoint(tmp_path / "bart.safetensors", tmp_path / "bart", cfg,
                                model=lambda: transformers.BartForCausalLM(bart), example_inputs=(x,),
                                example_kwargs=kwargs)
    assert any(n.startswith("the example inputs did not run on the meta device (RuntimeError: Tensor.item()")
               for n in result.report.notes), result.report.notes


@pytest.mark.parametrize("fast", [True, False])
def test_ooc_refuses_tied_tensors_the_checkpoint_holds_apart(tmp_path, fast):
    """A tied model (tie_word_embeddings=True) read from a checkpoint of an untied one, which holds lm_head
    and the embedding with different values: the output kept one of the two for both (logits 1.8 off the
    checkpoint's model), where from_pretrained unties them. Equal values in both names still convert."""
    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in _tiny_llama(layers=2)().state_dict().items()}
    assert not torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
    save_file(state, tmp_path / "apart.safetensors")
    build = _tiny_llama(layers=2, tied=True)

    cfg = moeify.MoEConfig(num_experts=2, top_k=1)
    names = r"(lm_head\.weight and model\.embed_tokens\.weight|model\.embed_tokens\.weight and lm_head\.weight)"
    with pytest.raises(SerializationError, match=rf"the model ties {names} \(one tensor\), but the checkpoint holds "
                                                 r"different values for them: build the model untied"):
        convert_checkpoint(tmp_path / "apart.safetensors", tmp_path / "out", cfg, model=build, fast=fast)
    assert not (tmp_path / "out").exists()
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, tmp_path / "equal.safetensors")
    readers = []

    def factory(path):
        readers.append(SafetensorsReader(path))
        return readers[-1]

    convert_checkpoint(tmp_path / "equal.safetensors", tmp_path / "out", cfg, model=build, fast=fast,
                       reader_factory=factory)
    assert (tmp_path / "out" / "model.safetensors").is_file()
    # the check compares the two tensors' bytes a chunk at a time: neither is loaded whole for it (it held
    # both, 2 x 32 KiB here; the fast path loads nothing else, the other one reads each tensor it writes)
    if fast:
        assert readers[0].peak_live_bytes == 0


def test_ooc_names_a_checkpoint_of_the_base_model_against_a_task_model(tmp_path):
    """Hub checkpoints of GPT-2 and BERT name tensors without and with the task model's prefix: the error
    said to pass the dense model's checkpoint; it now names the prefix and the class to build."""
    import transformers

    gpt2 = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=16)
    bert = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                   intermediate_size=64)
    cases = [(transformers.GPT2Model(gpt2), lambda: transformers.GPT2LMHeadModel(gpt2),
              r"it has 'wpe\.weight': its names lack the model's prefix 'transformer\.'"),
             (transformers.BertForMaskedLM(bert), lambda: transformers.BertModel(bert),
              r"it has 'bert\.embeddings\.\w+\.weight': its names carry a prefix 'bert\.' the model's lack")]
    for i, (saved, build, needle) in enumerate(cases):
        save_model(saved, str(tmp_path / f"{i}.safetensors"))
        with pytest.raises(SerializationError, match=needle + r": build the model class the checkpoint was saved from"):
            convert_checkpoint(tmp_path / f"{i}.safetensors", tmp_path / f"out{i}", moeify.MoEConfig(num_experts=2),
                               model=build)
        assert not (tmp_path / f"out{i}").exists()


def test_ooc_names_a_factory_that_needs_values_on_the_meta_device(tmp_path):
    """A build_model() that loads weights (from_pretrained) or reads values fails on meta with torch's raw
    error; it now says why the structure is built on meta and how to build it."""
    model, path = _dense_checkpoint(tmp_path, "mlp")

    def reads_values():
        built = load_example("mlp").build_model()
        float(built.blocks[0].fc1.weight.detach().sum())  # what from_pretrained's weight handling does, in effect
        return built

    with pytest.raises(ModelSourceError, match=r"the model factory failed on the meta device \(.*\): out-of-core "
                                               r"conversion builds the architecture without weights .*from_config"):
        convert_checkpoint(path, tmp_path / "out", moeify.MoEConfig(num_experts=2), model=reads_values)
    assert not (tmp_path / "out").exists()
