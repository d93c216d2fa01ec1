"""Hugging Face GPT-2 (transformers 5.x), small config, no download: its MLP uses HF `Conv1D`
(a transposed Linear) and the whole model does not fx-trace, so moeify traces the MLP submodules
and rewrites them in place. The converted model is still a `GPT2LMHeadModel` and `.generate()`s.

    python examples/hf_gpt2.py
"""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel

VOCAB = 128


def build_model(n_layer: int = 4) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    # initializer_range=0.2: a random GPT-2 with the default 0.02 repeats one token, which would make
    # "same greedy tokens as dense" a weak check
    config = GPT2Config(n_layer=n_layer, n_embd=64, n_head=4, n_positions=64, vocab_size=VOCAB, use_cache=False,
                        bos_token_id=0, eos_token_id=1, pad_token_id=1, initializer_range=0.2)
    return GPT2LMHeadModel(config).eval()


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
