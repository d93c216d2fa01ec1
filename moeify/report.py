"""What a conversion did: regions converted (and how each was captured), candidates refused with
the reason, parameter counts, and the function-preservation check."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from typing import Any, get_type_hints

from moeify.annotations import fits
from moeify.config import INF_JSON
from moeify.errors import SerializationError
from moeify.passes.infra import Skip


def describe_json(value: Any) -> str:
    """What a JSON value is, in words, for a message: `an array`, `the number 5`, `the string 'x'`."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the string {value if len(value) <= 40 else value[:37] + '...'!r}"
    return "an array" if isinstance(value, list | tuple) else "an object" if isinstance(value, dict) else \
        type(value).__name__


def _fields_from(cls: type, data: Any, where: str) -> dict[str, Any]:
    """The fields of dataclass `cls` found in the JSON object `data`, each checked against its annotation;
    keys `cls` does not have are left out (see `ConversionReport.from_dict`)."""
    if not isinstance(data, dict):
        raise SerializationError(f"{where} is {describe_json(data)}, not an object: re-run the conversion")
    fields = dataclasses.fields(cls)
    missing = [f.name for f in fields if f.name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise SerializationError(f"{where} has no {', '.join(map(repr, missing))}: re-run the conversion")
    hints = get_type_hints(cls)
    for f in fields:
        if f.name in data and not fits(data[f.name], hints[f.name]):
            raise SerializationError(f"{where}'s {f.name!r} is {describe_json(data[f.name])}, not {f.type}: "
                                     "re-run the conversion")
    return {f.name: data[f.name] for f in fields if f.name in data}


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
    calls_per_forward: int = 1  # >1: its module runs several times per forward (reused across depth)


def describe_sharding(sharding: dict[str, Any]) -> str:
    """`RegionReport.sharding` ({role: annotation}) in one line."""
    parts = []
    experts = sharding.get("experts", {})
    if experts.get("placement") == "shard":
        dims = sorted({(p["dim"], p["mesh_dim"]) for p in experts["params"].values()})
        where = ", ".join(f"dim {d} over '{m}'" for d, m in dims)
        parts.append(f"experts {'/'.join(experts['params'])} sharded on {where}")
    exchanges = [role for role, a in sharding.items() if a.get("collective")]
    if exchanges:
        meshes = sorted({sharding[r]["mesh_dim"] for r in exchanges})
        colls = sorted({sharding[r]["collective"] for r in exchanges})
        parts.append(f"{'/'.join(colls)} at {' and '.join(exchanges)} over {', '.join(repr(m) for m in meshes)}")
    replicated = [role for role, a in sharding.items() if a.get("placement") == "replicate" and a.get("params")]
    if replicated:
        parts.append(f"{' and '.join(replicated)} replicated")
    if sharding.get("aux", {}).get("reduction"):
        parts.append(f"aux losses over the {sharding['aux']['reduction'].replace('_', ' ')}")
    return "; ".join(parts)


# The printed report names this many modules that did not trace as a whole (an expected event in
# transformers models, where each module class fails for its own reason); the rest are counted.
SHOWN_CAPTURE_FAILURES = 3


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
    max_abs_diff: float | None = None  # outputs at init vs the dense model, on the example inputs (inf: a NaN in one)
    function_preserving: bool | None = None  # the config promises equality at init
    notes: list[str] = field(default_factory=list)
    converted_from: list[str] = field(default_factory=list)  # moeify MoE layers the converted model already held

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["skipped"] = [asdict(s) for s in self.skipped]
        data["capture_failures"] = [list(f) for f in self.capture_failures]
        if data["max_abs_diff"] == math.inf:  # strict JSON has no Infinity
            data["max_abs_diff"] = INF_JSON
        return data

    @classmethod
    def from_dict(cls, data: Any) -> ConversionReport:
        """The report `to_dict` wrote. A missing or mistyped field is a SerializationError; a key this
        moeify does not know is ignored, so that a report a later moeify wrote with one more fact still
        loads (a report only describes the conversion; the config, which decides what is built, is strict)."""
        if isinstance(data, dict) and data.get("max_abs_diff") == INF_JSON:
            data = {**data, "max_abs_diff": math.inf}
        kept = _fields_from(cls, data, "the report")
        kept["regions"] = [RegionReport(**_fields_from(RegionReport, r, f"the report's regions[{i}]"))
                           for i, r in enumerate(kept.get("regions", []))]
        kept["skipped"] = [Skip(**_fields_from(Skip, s, f"the report's skipped[{i}]"))
                           for i, s in enumerate(kept.get("skipped", []))]
        kept["capture_failures"] = [tuple(f) for f in kept.get("capture_failures", [])]
        return cls(**kept)

    def table(self) -> str:
        rows = [("MoE layer", "kind", "d_model", "d_ff", "experts", "top-k", "router", "captured by")]
        rows += [(r.name, f"{r.kind}/{r.activation}" if r.activation else r.kind, str(r.d_model), str(r.d_ff or "-"),
                  str(r.num_experts),
                  str(r.top_k), r.router, r.capture) for r in self.regions]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def sharding_lines(self) -> list[str]:
        """One line per distinct expert-parallel layout (from the AnnotateSharding pass), naming its layers."""
        by_layout: dict[str, list[str]] = {}
        for r in self.regions:
            if r.sharding:
                by_layout.setdefault(describe_sharding(r.sharding), []).append(r.name)
        return [f"{', '.join(names)}: {layout}" for layout, names in by_layout.items()]

    def __str__(self) -> str:
        out = [f"moeify: {len(self.regions)} FFN region(s) of {self.model_class} converted", self.table(), ""]
        out.append(f"parameters: {self.params_before:,} dense -> {self.params_after:,} MoE "
                   f"({self.params_after / max(self.params_before, 1):.2f}x); "
                   f"active per token: {self.active_params_per_token:,}")
        if self.max_abs_diff is not None:
            promise = "function preserving" if self.function_preserving else "not promised by the config: see note"
            out.append(f"outputs at init vs dense: max |diff| = {self.max_abs_diff:.3g} ({promise})")
        else:
            out.append("outputs at init vs dense: not checked (no example inputs, or verify=False)")
        sharding = self.sharding_lines()
        if sharding:
            out.append("expert-parallel sharding:")
            out += [f"  - {line}" for line in sharding]
        for region in self.regions:
            out += [f"note: {region.name}: {note}" for note in region.notes]
        for note in self.notes:
            out.append(f"note: {note}")
        if self.skipped:
            out.append(f"skipped ({len(self.skipped)}):")
            out += [f"  - {s}" for s in self.skipped]
        if self.capture_failures:
            shown = self.capture_failures[:SHOWN_CAPTURE_FAILURES]
            out.append(f"not traceable as a whole ({len(self.capture_failures)}; their children were traced "
                       "instead):")
            out += [f"  - {m}: {why}" for m, why in shown]
            if len(self.capture_failures) > len(shown):
                out.append(f"  ... and {len(self.capture_failures) - len(shown)} more (`moeify inspect` lists "
                           "them all, as does report.capture_failures)")
        return "\n".join(out)
