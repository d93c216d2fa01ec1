"""Comparing a model's outputs with a reference's (conversion and ONNX export checks)."""

from __future__ import annotations

import math

import torch

# Outputs in bfloat16 / float16 are compared within this many epsilons of their dtype relative to their largest
# magnitude: the same sums in another order, or another runtime's kernels, round differently by about that much.
LOW_PRECISION_ULPS = 2


def low_precision_eps(t: torch.Tensor) -> float:
    """LOW_PRECISION_ULPS epsilons of `t`'s dtype where it is a float coarser than float32, else 0.0."""
    if not t.is_floating_point() or torch.finfo(t.dtype).eps <= torch.finfo(torch.float32).eps:
        return 0.0
    return LOW_PRECISION_ULPS * torch.finfo(t.dtype).eps


def abs_diff(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """|got - want| elementwise in float64, where equal values (infinities included) and NaN in both
    differ by 0 and a NaN in one of them by infinity: a max over it never hides a NaN."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    same = (got == want) | (got.isnan() & want.isnan())
    return torch.where(same, 0.0, (got - want).abs().nan_to_num(nan=math.inf, posinf=math.inf))
