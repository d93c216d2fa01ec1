"""Real models: HF GPT-2 / Llama / Phi-3 / BERT / ViT (small configs), a ViT on nn.TransformerEncoder,
the pretrained all-MiniLM-L6-v2, and the seed paper's LSTM LM. The dense model is the reference:
outputs at init, greedy generation, the report's regions, and save/load round trips, as one table
of models."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import pytest
import torch
from conftest import enable_checkpointing, load_example

import moeify
from moeify.errors import NoFFNRegionError

warnings.filterwarnings("ignore", message="LSTM with projections")


@dataclass(frozen=True)
class Case:
    example: str
    regions: tuple[str, ...]
    capture: str  # substring every region's capture description has
    kwargs: tuple = ()

    def build(self):
        return load_example(self.example).build_model(**dict(self.kwargs))

    def inputs(self):
        return load_example(self.example).example_inputs()


CASES = {
    "gpt2": Case("hf_causal_lm", tuple(f"transformer.h.{i}.mlp.moe" for i in range(4)), "fx: submodule transformer.h.",
                 (("arch", "gpt2"),)),
    "llama": Case("hf_causal_lm", tuple(f"model.layers.{i}.mlp.moe" for i in range(4)), "fx: submodule model.layers.",
                  (("arch", "llama"),)),
    "phi3": Case("hf_causal_lm", tuple(f"model.layers.{i}.mlp.moe" for i in range(4)), "fx: submodule model.layers.",
                 (("arch", "phi3"),)),
    "opt": Case("hf_causal_lm", tuple(f"model.decoder.layers.{i}.moe" for i in range(4)),
                "fx: submodule model.decoder.layers.", (("arch", "opt"),)),
    "bert": Case("hf_bert", tuple(f"encoder.layer.{i}.output.moe" for i in range(4)),
                 "feed_forward_chunk(); split: intermediate -> identity, MoE in output"),
    "minilm": Case("minilm", tuple(f"encoder.layer.{i}.output.moe" for i in range(6)),
                   "feed_forward_chunk(); split: intermediate -> identity, MoE in output"),
    "vit": Case("hf_vit", tuple(f"vit.layers.{i}.mlp.moe" for i in range(4)), "fx: submodule vit.layers."),
    "torch_vit": Case("vit", tuple(f"encoder.layers.{i}.moe" for i in range(4)), "fx: method encoder.layers."),
    "lstm": Case("lstm_lm", ("moe",), "fx: whole model"),
    "lstm_ffn": Case("lstm_lm", ("between.moe",), "fx: whole model", (("ffn", True),)),
}
FAST = ["gpt2", "llama", "phi3", "opt", "bert", "vit", "torch_vit", "lstm", "lstm_ffn"]
MINILM = pytest.param("minilm", marks=pytest.mark.slow)  # 22M pretrained weights: ~10 s per conversion
CFG = moeify.MoEConfig(num_experts=8, top_k=2)


@pytest.fixture(scope="module")
def converted():
    cache = {}

    def get(name):
        if name not in cache:
            case = CASES[name]
            dense = case.build()
            cache[name] = (dense, moeify.convert(dense, CFG, example_inputs=case.inputs()))
        return cache[name]

    return get


def _outputs(model, inputs):
    with torch.no_grad():
        out = model(*inputs)
    return out if isinstance(out, torch.Tensor) else out[0]


@pytest.mark.parametrize("name", [*FAST, MINILM])
def test_outputs_at_init_match_dense(converted, name):
    dense, result = converted(name)
    inputs = CASES[name].inputs()
    if name == "minilm":
        pool = load_example("minilm").mean_pooled
        with torch.no_grad():
            cosine = (pool(dense, *inputs) * pool(result.model, *inputs)).sum(-1)
        assert cosine.min().item() >= 0.99999
    else:
        diff = (_outputs(dense, inputs) - _outputs(result.model, inputs)).abs().max().item()
        assert diff <= 1e-5
    assert result.report.function_preserving and result.report.max_abs_diff <= 1e-4


@pytest.mark.parametrize("name", [*FAST, MINILM])
def test_report_lists_exactly_the_expected_regions(converted, name):
    dense, result = converted(name)
    case = CASES[name]
    assert [r.name for r in result.report.regions] == list(case.regions)
    assert all(case.capture in r.capture for r in result.report.regions)
    assert set(moeify.moe_layers(result.model)) == set(case.regions)
    assert type(result.model).__name__ == type(dense).__name__ and isinstance(result.model, type(dense))
    replaced = tuple(f"{name}." for r in result.report.regions for name in r.linears)
    untouched = {k for k in dense.state_dict() if not k.startswith(replaced)}
    assert untouched <= set(result.model.state_dict())  # untouched parameters keep their names


@pytest.mark.parametrize(("name", "use_cache"), [("gpt2", False), ("gpt2", True), ("llama", False),
                                               ("llama", True), ("phi3", False), ("opt", False), ("opt", True),
                                               ("lstm", False)])
def test_greedy_generation_matches_dense(converted, name, use_cache):
    dense, result = converted(name)
    example = load_example(CASES[name].example)
    (ids,) = CASES[name].inputs()
    if name == "lstm":
        a, b = dense.generate(ids[:1], 10), result.model.generate(ids[:1], 10)
    else:
        a, b = (example.greedy(m, ids[:1], 10, use_cache=use_cache) for m in (dense, result.model))
    assert a.shape[1] == ids.shape[1] + 10
    assert len(set(a[0, ids.shape[1]:].tolist())) > 1  # a model stuck on one token would prove little
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", [*FAST, MINILM])
def test_save_load_round_trip(converted, name, tmp_path):
    _, result = converted(name)
    inputs = CASES[name].inputs()
    with torch.no_grad():  # make the experts differ so a wrong load could not pass
        for layer in moeify.moe_layers(result.model).values():
            for p in layer.parameters():
                p.add_(torch.randn_like(p) * 1e-2)
    moeify.save(result, tmp_path / "out")
    loaded = moeify.load(tmp_path / "out", model=CASES[name].build())
    assert type(loaded.model).__name__ == type(result.model).__name__
    assert torch.equal(_outputs(result.model, inputs), _outputs(loaded.model, inputs))


@pytest.mark.parametrize(("cfg", "expected"), [
    (dict(every_n=2), [1, 3]),
    (dict(layers=(0, 2)), [0, 2]),
    (dict(exclude=(r"h\.0\.",), every_n=2), [2]),
    (dict(targets=(r"h\.[23]\.",),), [2, 3]),
])
def test_selection_on_hf_gpt2(cfg, expected):
    case = CASES["gpt2"]
    result = moeify.convert(case.build(), CFG.replace(**cfg))  # selection only: outputs are checked above
    assert [r.name for r in result.report.regions] == [f"transformer.h.{i}.mlp.moe" for i in expected]
    skipped = {s.where for s in result.report.skipped}
    assert {f"transformer.h.{i}.mlp" for i in range(4) if i not in expected} <= skipped


def test_selection_on_hf_bert_every_other_layer():
    case = CASES["bert"]
    result = moeify.convert(case.build(), CFG.replace(every_n=2), example_inputs=case.inputs())
    assert [r.name for r in result.report.regions] == ["encoder.layer.1.output.moe", "encoder.layer.3.output.moe"]
    assert result.report.max_abs_diff <= 1e-5


class NoFFN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(8, 16)
        self.out = torch.nn.Linear(16, 8)

    def forward(self, x):
        return self.out(torch.tanh(self.inp(x)))


def test_model_without_ffn_names_nearest_candidates():
    with pytest.raises(NoFFNRegionError) as info:
        moeify.convert(NoFFN(), CFG)
    message = str(info.value)
    assert "no FFN region found in NoFFN" in message
    assert "inp: feeds function tanh" in message and "out:" in message


def test_lstm_with_proj_size_is_reported_skipped():
    case = CASES["lstm"]
    result = moeify.convert(load_example("lstm_lm").build_model(proj_size=16), CFG, example_inputs=case.inputs())
    skip = next(s for s in result.report.skipped if s.where == "lstm1")
    assert "proj_size=16" in skip.reason and "fused" in skip.reason


def _hf_families():
    import transformers as T

    small = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2, vocab_size=128)
    t5 = dict(d_model=64, d_ff=128, num_heads=4, num_layers=2, vocab_size=128, d_kv=16, decoder_start_token_id=0)
    clip = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2)
    # BART-style encoder-decoders: the FFN is inline in each layer's forward (fc1, act, fc2)
    s2s = dict(d_model=64, encoder_ffn_dim=128, decoder_ffn_dim=128, encoder_layers=2, decoder_layers=2,
               encoder_attention_heads=4, decoder_attention_heads=4, vocab_size=128, max_position_embeddings=64,
               pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
    return {  # name: (build, expected kind, regions, inputs: "ids" | "seq2seq" | "pixels" | "audio")
        "t5": (lambda: T.T5ForConditionalGeneration(T.T5Config(**t5)), "mlp", 4, "seq2seq"),
        "t5-gated": (lambda: T.T5ForConditionalGeneration(T.T5Config(**t5, feed_forward_proj="gated-gelu")),
                     "gated", 4, "seq2seq"),
        "falcon": (lambda: T.FalconForCausalLM(T.FalconConfig(hidden_size=64, num_attention_heads=4,
                                                              num_hidden_layers=2, vocab_size=128)), "mlp", 2, "ids"),
        "bloom": (lambda: T.BloomForCausalLM(T.BloomConfig(hidden_size=64, n_head=4, n_layer=2, vocab_size=128)),
                  "mlp", 2, "ids"),
        "gpt-neox": (lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**small)), "mlp", 2, "ids"),
        "mistral": (lambda: T.MistralForCausalLM(T.MistralConfig(**small, num_key_value_heads=2)), "gated", 2, "ids"),
        "qwen2": (lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**small, num_key_value_heads=2)), "gated", 2, "ids"),
        "gemma": (lambda: T.GemmaForCausalLM(T.GemmaConfig(**small, num_key_value_heads=2, head_dim=16)),
                  "gated", 2, "ids"),
        # the layer forward wires intermediate into output itself (no helper method), DeBERTa's with a flag
        "deberta-v2": (lambda: T.DebertaV2Model(T.DebertaV2Config(**small, max_position_embeddings=64)), "mlp", 2,
                       "ids"),
        "mpnet": (lambda: T.MPNetModel(T.MPNetConfig(**small, max_position_embeddings=64)), "mlp", 2, "ids"),
        # ESM (protein LM): a BERT-style split whose GELU is written out as erf arithmetic
        "esm": (lambda: T.EsmModel(T.EsmConfig(**small, max_position_embeddings=64, pad_token_id=1)), "mlp", 2, "ids"),
        # squared-ReLU experts (Primer's relu(x)^2)
        "nemotron": (lambda: T.NemotronForCausalLM(T.NemotronConfig(**small, num_key_value_heads=2, head_dim=16)),
                     "mlp", 2, "ids"),
        # one layer module run at every depth: one MoE layer, its aux losses over both calls
        "albert": (lambda: T.AlbertModel(T.AlbertConfig(**small, embedding_size=32, max_position_embeddings=64)),
                   "mlp", 1, "ids"),
        # FFN blocks that trace on their own and again inside the layer's wired trace: each converted once
        "mobilebert": (lambda: T.MobileBertModel(T.MobileBertConfig(
            **small, embedding_size=32, intra_bottleneck_size=32, true_hidden_size=32, max_position_embeddings=64)),
                       "mlp", 8, "ids"),
        "distilbert": (lambda: T.DistilBertModel(T.DistilBertConfig(dim=64, hidden_dim=128, n_heads=4, n_layers=2,
                                                                    vocab_size=128)), "mlp", 2, "ids"),
        "clip-text": (lambda: T.CLIPTextModel(T.CLIPTextConfig(**clip, vocab_size=128)), "mlp", 2, "ids"),
        "clip-vision": (lambda: T.CLIPVisionModel(T.CLIPVisionConfig(**clip, image_size=32, patch_size=8)),
                        "mlp", 2, "pixels"),
        "bart": (lambda: T.BartForConditionalGeneration(T.BartConfig(**s2s)), "mlp", 4, "seq2seq"),
        "marian": (lambda: T.MarianMTModel(T.MarianConfig(**s2s)), "mlp", 4, "seq2seq"),
        "m2m100": (lambda: T.M2M100ForConditionalGeneration(T.M2M100Config(**s2s)), "mlp", 4, "seq2seq"),
        "whisper": (lambda: T.WhisperForConditionalGeneration(T.WhisperConfig(
            **{k: v for k, v in s2s.items() if k != "max_position_embeddings"}, num_mel_bins=8,
            max_source_positions=16, max_target_positions=16)), "mlp", 4, "audio"),
        "biogpt": (lambda: T.BioGptForCausalLM(T.BioGptConfig(**small, pad_token_id=1)), "mlp", 2, "ids"),
        # decoder layers whose cross-attention input the example leaves None: traced None
        "bart-causal": (lambda: T.BartForCausalLM(T.BartConfig(**s2s)), "mlp", 2, "ids"),
        "xglm": (lambda: T.XGLMForCausalLM(T.XGLMConfig(d_model=64, ffn_dim=128, num_layers=2, attention_heads=4,
                                                         vocab_size=128, pad_token_id=1)), "mlp", 2, "ids"),
    }


@pytest.mark.parametrize("family", list(_hf_families()))
def test_more_hf_families_convert_function_preserving(family):
    """T5 (its FFN reads `wo.weight.dtype` while tracing), Falcon (`FalconLinear`, an nn.Linear subclass
    with its own forward), BLOOM (a tanh GELU with a rounded constant), CLIP (QuickGELU), the common
    decoder families, and FFNs inline in layer forwards (BART, Marian, M2M100, Whisper, BioGPT; the
    encoder layers' fp16 clamp is a dtype test; BartForCausalLM's and XGLM's decoder layers see no
    encoder states): every FFN found, the dense function kept."""
    build, kind, count, inputs = _hf_families()[family]
    torch.manual_seed(0)
    dense = build().eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 128, (2, 8), generator=gen)
    args = {"pixels": (torch.randn(2, 3, 32, 32, generator=gen),),
            "audio": (torch.randn(2, 8, 32, generator=gen),)}.get(inputs, (ids,))
    kwargs = {"decoder_input_ids": ids} if inputs in ("seq2seq", "audio") else {}
    result = moeify.convert(dense, moeify.MoEConfig(num_experts=4, top_k=2), example_inputs=args,
                            example_kwargs=kwargs)
    assert [r.kind for r in result.report.regions] == [kind] * count
    assert len(moeify.moe_layers(result.model)) == count  # and no second copy of any
    calls = [r.calls_per_forward for r in result.report.regions]
    assert calls == ([dense.config.num_hidden_layers] if family == "albert" else [1] * count)
    with torch.no_grad():
        want, got = dense(*args, **kwargs), result.model(*args, **kwargs)
    key = "logits" if "logits" in want else "last_hidden_state"
    assert (want[key] - got[key]).abs().max().item() <= 1e-5


def test_opt_layers_train_under_gradient_checkpointing():
    """The rewritten OPT layer forward keeps transformers' checkpointing wrapper: the same loss and
    expert gradients with and without it (dropout on: the recompute replays the RNG)."""
    example = load_example("hf_causal_lm")
    dense = example.build_model("opt", num_layers=2)
    (ids,) = example.example_inputs()
    model = moeify.convert(dense, moeify.MoEConfig(num_experts=4, top_k=2), example_inputs=(ids,)).model.train()
    moe = model.model.decoder.layers[0].moe
    calls = []
    moe.router.register_forward_hook(lambda *_: calls.append(1))  # the graph calls the MoE's parts
    runs = []
    for checkpointing in (False, True):
        if checkpointing:
            enable_checkpointing(model, reentrant=False)
        model.zero_grad()
        torch.manual_seed(3)
        loss = model(ids, labels=ids).loss
        loss.backward()
        runs.append((loss.detach(), moe.experts.w1_EFD.grad.clone(), len(calls)))
        calls.clear()
    assert [run[2] for run in runs] == [1, 2]  # checkpointed: the layer ran again in backward
    assert runs[0][1].abs().sum() > 0
    torch.testing.assert_close(runs[1][0], runs[0][0])
    torch.testing.assert_close(runs[1][1], runs[0][1])


def test_a_model_that_already_is_an_moe_is_refused_saying_so():
    import transformers as T

    model = T.MixtralForCausalLM(T.MixtralConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                                 num_hidden_layers=1, vocab_size=128, num_key_value_heads=2,
                                                 num_local_experts=4))
    with pytest.raises(NoFFNRegionError, match="already holds mixture-of-experts modules .*MixtralSparseMoeBlock"):
        moeify.convert(model, CFG, example_inputs=(torch.randint(2, 128, (1, 4)),))


@pytest.mark.parametrize("family, message", [
    ("Apertus", "model.layers.0.mlp.up_proj: feeds act_fn (XIELUActivation), which moeify does not know as an "
                "activation"),
    ("BitNet", "model.layers.0.mlp.gate_proj: the gated product goes through ffn_sub_norm (BitNetRMSNorm) before "
               "the output Linear"),
])
def test_unknown_layers_inside_hf_ffns_are_named(family, message):
    """Apertus's learned xIELU and BitNet's sub-norm: the refusals listed the traced ops (`used by 7 nodes (gt,
    mul, ...)`, `does not feed a single output Linear`)."""
    import transformers as T

    config = getattr(T, f"{family}Config")(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=4, num_key_value_heads=2, bos_token_id=1,
                                          eos_token_id=2, pad_token_id=0)
    model = getattr(T, f"{family}ForCausalLM")(config)
    with pytest.raises(NoFFNRegionError) as info:
        moeify.convert(model, CFG, example_inputs=(torch.randint(3, 64, (1, 4)),))
    assert message in str(info.value)


def test_torch_nn_transformer_encoder_and_decoder_layers():
    """The encoder layer does not trace (its fast-path checks): its _ff_block is rewritten; the decoder
    layer traces as a whole and is rewritten there, once."""
    torch.manual_seed(0)
    dense = torch.nn.Transformer(d_model=32, nhead=4, num_encoder_layers=1, num_decoder_layers=1,
                                 dim_feedforward=64, batch_first=True).eval()
    src, tgt = torch.randn(2, 5, 32), torch.randn(2, 4, 32)
    result = moeify.convert(dense, CFG, example_inputs=(src, tgt))
    assert [(r.name, r.capture) for r in result.report.regions] == [
        ("encoder.layers.0.moe", "fx: method encoder.layers.0._ff_block()"),
        ("decoder.layers.0.moe", "fx: submodule decoder.layers.0")]
    assert result.model.encoder.layers[0].activation_relu_or_gelu is False
    with torch.no_grad():  # eval, no grad: the encoder layer's fused fast path would apply if left on
        assert (dense(src, tgt) - result.model(src, tgt)).abs().max().item() <= 1e-5
