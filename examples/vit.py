"""A small Vision Transformer built on PyTorch's own nn.TransformerEncoder (no timm, no torchvision).

nn.TransformerEncoderLayer keeps its FFN in the method `_ff_block` (linear1 -> activation ->
dropout -> linear2), and as a torch.nn module it is opaque to fx. moeify traces that method on
each layer, rewrites it to call the MoE, and turns off the layer's inference fast path (a fused
kernel that would run the dense FFN) through the attribute torch checks before taking it.

    python examples/vit.py
    moeify convert examples/vit.py --num-experts 8 --top-k 2 -o out/vit
"""

from __future__ import annotations

import torch
from torch import nn

IMAGE, PATCH, CLASSES = 32, 8, 10


class ViT(nn.Module):
    def __init__(self, d_model: int = 64, d_ff: int = 128, heads: int = 4, layers: int = 4) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, d_model, PATCH, PATCH)
        self.cls = nn.Parameter(torch.zeros(1, 1, d_model))
        self.pos = nn.Parameter(torch.randn(1, (IMAGE // PATCH) ** 2 + 1, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(d_model, heads, d_ff, dropout=0.1, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, CLASSES)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch(pixels).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(patches.shape[0], -1, -1), patches], dim=1) + self.pos
        return self.head(self.norm(self.encoder(tokens))[:, 0])


def build_model(**kwargs) -> ViT:
    torch.manual_seed(0)
    return ViT(**kwargs).eval()


def example_inputs():
    return (torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(0)),)


if __name__ == "__main__":
    import moeify

    dense = build_model()
    (pixels,) = example_inputs()
    result = moeify.convert(dense, moeify.MoEConfig(num_experts=8, top_k=2), example_inputs=(pixels,))
    print(result.report)
    print("\nlayer 0 _ff_block after conversion:\n" + result.model.encoder.layers[0]._moeify_code.strip())
