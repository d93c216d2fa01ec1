"""compare.abs_diff against a plain per-element reference written here."""

import math

import torch

from moeify.compare import abs_diff


def reference(a: float, b: float) -> float:
    if a == b or (math.isnan(a) and math.isnan(b)):
        return 0.0
    if math.isnan(a) or math.isnan(b):
        return math.inf
    return abs(a - b)


def test_abs_diff_never_hides_a_nan_and_counts_equal_specials_as_equal():
    values = [0.0, -1.5, 2.0, math.inf, -math.inf, math.nan]
    got = torch.tensor([a for a in values for _ in values], dtype=torch.float32)
    want = torch.tensor([b for _ in values for b in values], dtype=torch.float32)
    expected = [reference(a, b) for a in values for b in values]
    assert abs_diff(got, want).tolist() == expected
    assert abs_diff(torch.tensor([1.0, math.nan]), torch.tensor([1.0, 2.0])).max().item() == math.inf
