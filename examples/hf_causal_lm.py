"""Hugging Face causal LMs (transformers 5.x), small configs, no download: GPT-2, Llama, Phi-3 and OPT.

- GPT-2: its MLP uses HF `Conv1D` (a transposed Linear).
- Llama: SwiGLU MLPs (`down(silu(gate(x)) * up(x))`) become gated MoE layers.
- Phi-3: the same SwiGLU with gate and up fused in one Linear (`gate_up_proj`, then `.chunk(2)`);
  its rows split into the experts' gate and up weights.
- OPT: no MLP submodule; `fc1`, the activation and `fc2` are called in the decoder layer's own
  forward, next to attention that does not trace. moeify traces the layer with its attention as
  one opaque call and rewrites the layer's forward (gradient checkpointing still wraps it).

No whole model fx-traces, so moeify traces the MLP submodules (the OPT layers) and rewrites them in
place. The converted model keeps its class (`GPT2LMHeadModel`, `LlamaForCausalLM`,
`Phi3ForCausalLM`, `OPTForCausalLM`) and `.generate()`s.

    python examples/hf_causal_lm.py            # all four
    moeify convert examples/hf_causal_lm.py:build_llama -o out/hf_llama
"""

from __future__ import annotations

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
)

VOCAB = 128
PAD, EOS = 1, 1


def build_gpt2(num_layers: int = 4) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    # initializer_range=0.2: a random GPT-2 with the default 0.02 repeats one token, which would make
    # "same greedy tokens as dense" a weak check
    config = GPT2Config(n_layer=num_layers, n_embd=64, n_head=4, n_positions=64, vocab_size=VOCAB, use_cache=False,
                        bos_token_id=0, eos_token_id=EOS, pad_token_id=PAD, initializer_range=0.2)
    return GPT2LMHeadModel(config).eval()


def _small_decoder(model_cls, config_cls, num_layers: int):
    """A seeded Llama-shaped decoder (Llama, Phi-3): 64 wide, SwiGLU of 128, grouped-query attention."""
    torch.manual_seed(0)
    config = config_cls(num_hidden_layers=num_layers, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, use_cache=False,
                        bos_token_id=0, eos_token_id=EOS, pad_token_id=PAD)
    return model_cls(config).eval()


def build_llama(num_layers: int = 4) -> LlamaForCausalLM:
    return _small_decoder(LlamaForCausalLM, LlamaConfig, num_layers)


def build_phi3(num_layers: int = 4) -> Phi3ForCausalLM:
    return _small_decoder(Phi3ForCausalLM, Phi3Config, num_layers)


def build_opt(num_layers: int = 4) -> OPTForCausalLM:
    torch.manual_seed(0)
    config = OPTConfig(num_hidden_layers=num_layers, hidden_size=64, ffn_dim=128, num_attention_heads=4,
                       word_embed_proj_dim=64, vocab_size=VOCAB, max_position_embeddings=64, use_cache=False,
                       bos_token_id=0, eos_token_id=EOS, pad_token_id=PAD, init_std=0.2)
    return OPTForCausalLM(config).eval()


BUILDERS = {"gpt2": build_gpt2, "llama": build_llama, "phi3": build_phi3, "opt": build_opt}


def build_model(arch: str = "gpt2", num_layers: int = 4):
    """The `arch` model ("gpt2", "llama", "phi3" or "opt"); `moeify convert examples/hf_causal_lm.py` takes GPT-2."""
    return BUILDERS[arch](num_layers)


def example_inputs():
    return (torch.randint(2, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0)),)


def greedy(model, ids: torch.Tensor, steps: int = 10, use_cache: bool = False) -> torch.Tensor:
    return model.generate(ids, max_new_tokens=steps, do_sample=False, use_cache=use_cache,
                          min_new_tokens=steps, pad_token_id=PAD)


if __name__ == "__main__":
    import moeify

    (ids,) = example_inputs()
    for arch in BUILDERS:
        dense = build_model(arch)
        result = moeify.convert(dense, moeify.MoEConfig(num_experts=8, top_k=2), example_inputs=(ids,))
        print(result.report)
        print(f"\nconverted class: {type(result.model).__name__}")
        print("greedy tokens, dense:", greedy(dense, ids[:1])[0, ids.shape[1]:].tolist())
        print("greedy tokens, MoE:  ", greedy(result.model, ids[:1])[0, ids.shape[1]:].tolist(), "\n")
