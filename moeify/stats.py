"""Per-layer router statistics from the last forward: tokens per expert (kept, and chosen before a
capacity limit), dropped fraction, gate entropy."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from moeify.errors import expect_type
from moeify.moe.layer import MoELayer


@dataclass(frozen=True)
class LayerStats:
    layer: str
    tokens_per_expert: list[int]
    num_tokens: int
    dropped_fraction: float
    gate_entropy: float
    # assignments each expert was chosen for before the capacity limit dropped the overflow (equal to
    # tokens_per_expert without a limit): how far each expert's demand is from its capacity
    demand_per_expert: list[int]

    @property
    def share(self) -> list[float]:
        """Each expert's share of the kept assignments."""
        return _shares(self.tokens_per_expert)

    @property
    def demand_share(self) -> list[float]:
        """Each expert's share of the assignments the router chose, before any were dropped."""
        return _shares(self.demand_per_expert)


def _shares(counts: list[int]) -> list[float]:
    total = sum(counts) or 1
    return [c / total for c in counts]


def router_stats(model: nn.Module) -> list[LayerStats]:
    """One row per MoE layer that ran in the model's last forward, in module order."""
    expect_type(model, nn.Module, "the model", "pass the converted model (result.model)")
    rows = []
    for name, m in model.named_modules():
        if isinstance(m, MoELayer) and m.aux.last_stats:
            s = m.aux.last_stats
            rows.append(LayerStats(name, s["tokens_per_expert"].tolist(), int(s["num_tokens"]),
                                   float(s["dropped_fraction"]), float(s["gate_entropy"]),
                                   s["demand_per_expert"].tolist()))
    return rows


def format_stats(rows: list[LayerStats]) -> str:
    """A table, one line per layer with each expert's share of the kept assignments; a layer whose
    capacity limit dropped some gets a second line with the shares the router chose (its demand)."""
    expect_type(rows, (list, tuple), "format_stats' rows", "pass what moeify.router_stats(model) returned")
    if not rows:  # an empty table said nothing
        return ("no MoE layer ran in the model's last forward (router_stats(model) of the converted model, after a "
                "forward)")
    width = max([28, *(len(r.layer) for r in rows)])  # Hugging Face names run past 28 characters
    lines = [f"{'layer':<{width}} {'tokens':>7} {'dropped':>8} {'entropy':>8}  share per expert"]
    for r in rows:
        share = " ".join(f"{s:4.2f}" for s in r.share)
        lines.append(f"{r.layer:<{width}} {r.num_tokens:>7} {r.dropped_fraction:>8.3f} {r.gate_entropy:>8.3f}  "
                     f"{share}")
        if r.demand_per_expert != r.tokens_per_expert:
            demand = " ".join(f"{s:4.2f}" for s in r.demand_share)
            lines.append(f"{'':<{width}} {'':>7} {'':>8} {'demand':>8}  {demand}")
    return "\n".join(lines)
