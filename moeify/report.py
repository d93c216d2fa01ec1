"""What a conversion did: regions converted (and how each was captured), candidates refused with
the reason, parameter counts, and the function-preservation check."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from moeify.passes.infra import Skip


@dataclass
class RegionReport:
    name: str  # qualified name of the installed MoE layer
    owner: str  # module whose forward was rewritten
    kind: str
    activation: str | None
    d_model: int
    d_ff: int
    linears: list[str]  # the dense modules it replaced
    capture: str  # how the region was captured
    num_experts: int
    top_k: int
    router: str
    notes: list[str] = field(default_factory=list)
    sharding: dict[str, Any] = field(default_factory=dict)


@dataclass
class ConversionReport:
    model_class: str
    regions: list[RegionReport] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    capture_failures: list[tuple[str, str]] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    active_params_per_token: int = 0
    max_abs_diff: float | None = None  # outputs at init vs the dense model, on the example inputs
    function_preserving: bool | None = None  # the config promises equality at init
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["skipped"] = [asdict(s) for s in self.skipped]
        data["capture_failures"] = [list(f) for f in self.capture_failures]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConversionReport:
        data = dict(data)
        data["regions"] = [RegionReport(**r) for r in data.get("regions", [])]
        data["skipped"] = [Skip(**s) for s in data.get("skipped", [])]
        data["capture_failures"] = [tuple(f) for f in data.get("capture_failures", [])]
        return cls(**data)

    def table(self) -> str:
        rows = [("MoE layer", "kind", "d_model", "d_ff", "experts", "top-k", "router", "captured by")]
        rows += [(r.name, f"{r.kind}/{r.activation}", str(r.d_model), str(r.d_ff), str(r.num_experts),
                  str(r.top_k), r.router, r.capture) for r in self.regions]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def __str__(self) -> str:
        out = [f"moeify: {len(self.regions)} FFN region(s) of {self.model_class} converted", self.table(), ""]
        out.append(f"parameters: {self.params_before:,} dense -> {self.params_after:,} MoE "
                   f"({self.params_after / max(self.params_before, 1):.2f}x); "
                   f"active per token: {self.active_params_per_token:,}")
        if self.max_abs_diff is not None:
            promise = "function preserving" if self.function_preserving else "not function preserving by design"
            out.append(f"outputs at init vs dense: max |diff| = {self.max_abs_diff:.3g} ({promise})")
        for note in self.notes:
            out.append(f"note: {note}")
        if self.skipped:
            out.append(f"skipped ({len(self.skipped)}):")
            out += [f"  - {s}" for s in self.skipped]
        if self.capture_failures:
            out.append("not traceable as a whole (their children were traced instead):")
            out += [f"  - {m}: {why}" for m, why in self.capture_failures]
        return "\n".join(out)
