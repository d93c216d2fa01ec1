"""Comparing a model's outputs with a reference's (conversion and ONNX export checks)."""

from __future__ import annotations

import math

import torch


def abs_diff(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """|got - want| elementwise in float64, where equal values (infinities included) and NaN in both
    differ by 0 and a NaN in one of them by infinity: a max over it never hides a NaN."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    same = (got == want) | (got.isnan() & want.isnan())
    return torch.where(same, 0.0, (got - want).abs().nan_to_num(nan=math.inf, posinf=math.inf))
