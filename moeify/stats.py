"""Per-layer router statistics from the last forward: tokens per expert, dropped fraction, gate entropy."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from moeify.moe.layer import MoELayer


@dataclass(frozen=True)
class LayerStats:
    layer: str
    tokens_per_expert: list[int]
    num_tokens: int
    dropped_fraction: float
    gate_entropy: float

    @property
    def share(self) -> list[float]:
        total = sum(self.tokens_per_expert) or 1
        return [c / total for c in self.tokens_per_expert]


def router_stats(model: nn.Module) -> list[LayerStats]:
    """One row per MoE layer that ran in the model's last forward, in module order."""
    rows = []
    for name, m in model.named_modules():
        if isinstance(m, MoELayer) and m.aux.last_stats:
            s = m.aux.last_stats
            rows.append(LayerStats(name, [int(c) for c in s["tokens_per_expert"].tolist()], int(s["num_tokens"]),
                                   float(s["dropped_fraction"]), float(s["gate_entropy"])))
    return rows


def format_stats(rows: list[LayerStats]) -> str:
    lines = [f"{'layer':<28} {'tokens':>7} {'dropped':>8} {'entropy':>8}  share per expert"]
    for r in rows:
        share = " ".join(f"{s:4.2f}" for s in r.share)
        lines.append(f"{r.layer:<28} {r.num_tokens:>7} {r.dropped_fraction:>8.3f} {r.gate_entropy:>8.3f}  {share}")
    return "\n".join(lines)
