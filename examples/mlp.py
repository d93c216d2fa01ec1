"""A plain MLP classifier: two FFN blocks (Linear -> ReLU -> Linear) with residuals.

    moeify inspect examples/mlp.py
    moeify convert examples/mlp.py --num-experts 4 --top-k 2 -o out/mlp
"""

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, d_ff)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(d_ff, d_model)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class MLP(nn.Module):
    def __init__(self, d_in: int = 16, d_model: int = 32, d_ff: int = 64, n_blocks: int = 2, n_classes: int = 5):
        super().__init__()
        self.embed = nn.Linear(d_in, d_model)
        self.blocks = nn.Sequential(*[Block(d_model, d_ff) for _ in range(n_blocks)])
        self.head = nn.Linear(d_model, n_classes)

    def forward(self, x):
        return self.head(self.blocks(self.embed(x)))


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return MLP()


def example_inputs():
    return (torch.randn(8, 16, generator=torch.Generator().manual_seed(1)),)
