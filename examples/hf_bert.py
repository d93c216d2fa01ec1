"""Hugging Face BERT (transformers 5.x), small config, no download. BERT's FFN is split across two
sibling modules: `intermediate` (dense -> GELU) and `output` (dense -> dropout -> +residual ->
LayerNorm). moeify finds the whole dense -> act -> dense path on a trace of
`BertLayer.feed_forward_chunk`, rewrites `intermediate` to identity and replaces `output.dense`
with the MoE, so the residual add and the LayerNorm stay where they were.

    python examples/hf_bert.py
"""

from __future__ import annotations

import torch
from transformers import BertConfig, BertModel

VOCAB = 128


def build_model(num_layers: int = 4) -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(num_hidden_layers=num_layers, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                        vocab_size=VOCAB, max_position_embeddings=64)
    return BertModel(config).eval()


def example_inputs():
    ids = torch.randint(1, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    return (ids, torch.ones_like(ids))


if __name__ == "__main__":
    import moeify

    dense = build_model()
    inputs = example_inputs()
    result = moeify.convert(dense, moeify.MoEConfig(num_experts=8, top_k=2), example_inputs=inputs)
    print(result.report)
    print("\nlayer 0 after conversion:")
    print("  intermediate.forward:", result.model.encoder.layer[0].intermediate._moeify_code.strip().splitlines()[-1])
    print("  output.forward:\n" + result.model.encoder.layer[0].output._moeify_code.strip())
