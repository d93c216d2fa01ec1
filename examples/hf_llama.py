"""Hugging Face Llama (transformers 5.x), small config, no download: SwiGLU MLPs
(`down(silu(gate(x)) * up(x))`) become gated MoE layers; the model keeps its class and `.generate()`.

    python examples/hf_llama.py
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 128


def build_model(num_layers: int = 4) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=num_layers, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, use_cache=False,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return LlamaForCausalLM(config).eval()


def example_inputs():
    return (torch.randint(2, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0)),)


def greedy(model, ids: torch.Tensor, steps: int = 10, use_cache: bool = False) -> torch.Tensor:
    return model.generate(ids, max_new_tokens=steps, do_sample=False, use_cache=use_cache,
                          min_new_tokens=steps, pad_token_id=1)


if __name__ == "__main__":
    import moeify

    dense = build_model()
    (ids,) = example_inputs()
    result = moeify.convert(dense, moeify.MoEConfig(num_experts=8, top_k=2), example_inputs=(ids,))
    print(result.report)
    print(f"\nconverted class: {type(result.model).__name__}")
    print("greedy tokens, dense:", greedy(dense, ids[:1])[0, ids.shape[1]:].tolist())
    print("greedy tokens, MoE:  ", greedy(result.model, ids[:1])[0, ids.shape[1]:].tolist())
