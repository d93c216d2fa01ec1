"""Hugging Face ViT image classifier (transformers 5.x), small config, random weights, no download.

ViT's MLP block (`ViTMLP`: fc1 -> GELU -> fc2) is its own submodule, so moeify traces each block
with torch.fx and swaps it for an MoE; the patch embedding, attention and classifier stay as they
are. Every patch token is routed on its own.

    python examples/hf_vit.py
    moeify convert examples/hf_vit.py --num-experts 8 --top-k 2 -o out/vit
"""

from __future__ import annotations

import torch
from transformers import ViTConfig, ViTForImageClassification

IMAGE, PATCH, CLASSES = 32, 8, 10


def build_model(num_layers: int = 4) -> ViTForImageClassification:
    torch.manual_seed(0)
    config = ViTConfig(hidden_size=64, num_hidden_layers=num_layers, num_attention_heads=4, intermediate_size=128,
                       image_size=IMAGE, patch_size=PATCH, num_labels=CLASSES)
    return ViTForImageClassification(config).eval()


def example_inputs():
    return (torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(0)),)


if __name__ == "__main__":
    import moeify

    dense = build_model()
    (pixels,) = example_inputs()
    result = moeify.convert(dense, moeify.MoEConfig(num_experts=8, top_k=2), example_inputs=(pixels,))
    print(result.report)
    with torch.no_grad():
        same = torch.equal(dense(pixels).logits.argmax(-1), result.model(pixels).logits.argmax(-1))
    print(f"\npredicted classes equal the dense model's: {same}")
