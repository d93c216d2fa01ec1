"""Pass infrastructure: a pass maps a GraphModule to a PassResult that says what it changed and
what it refused, and why; a manager runs passes in order and names the failing pass.

Modelled on torch.fx's pass infra and onnx-ir's `_pass_infra`, with one difference: a result
records *what* changed (`changes`) and every candidate left alone (`skipped`, with reason and fix),
not only whether something changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

from moeify.errors import PassError, PostconditionError, PreconditionError


@dataclass(frozen=True)
class Skip:
    """A candidate a pass left alone: where, why, and how to make it eligible."""

    where: str
    reason: str
    fix: str = ""

    def __str__(self) -> str:
        return f"{self.where or '<model>'}: {self.reason}" + (f" ({self.fix})" if self.fix else "")


@dataclass
class PassResult:
    graph_module: fx.GraphModule
    modified: bool
    changes: list[str] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    analysis: Any = None  # what an analysis pass found (e.g. the FFN regions)


class GraphPass:
    """Base class. Subclasses implement `call`; `requires`/`ensures` raise Pre/PostconditionError."""

    in_place = True

    @property
    def name(self) -> str:
        return type(self).__name__

    def requires(self, gm: fx.GraphModule) -> None:  # noqa: B027 - optional hook
        pass

    def ensures(self, gm: fx.GraphModule) -> None:  # noqa: B027 - optional hook
        pass

    def call(self, gm: fx.GraphModule) -> PassResult:
        raise NotImplementedError

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        self.requires(gm)
        result = self.call(gm)
        if result.modified:
            result.graph_module.graph.lint()
            result.graph_module.recompile()
        self.ensures(result.graph_module)
        return result


@dataclass
class PassLog:
    """What every pass of one manager run did, in order."""

    results: list[tuple[str, PassResult]] = field(default_factory=list)

    @property
    def changes(self) -> list[str]:
        return [f"{name}: {c}" for name, r in self.results for c in r.changes]

    @property
    def skipped(self) -> list[Skip]:
        return [s for _, r in self.results for s in r.skipped]


class PassManager:
    def __init__(self, passes: list[GraphPass]) -> None:
        self.passes = list(passes)

    def __call__(self, gm: fx.GraphModule, where: str = "") -> tuple[fx.GraphModule, PassLog]:
        log = PassLog()
        for p in self.passes:
            try:
                result = p(gm)
            except (PreconditionError, PostconditionError):
                raise
            except Exception as exc:
                done = ", ".join(name for name, _ in log.results) or "none"
                raise PassError(f"pass {p.name} failed on {where or '<root>'} after [{done}]: "
                                f"{type(exc).__name__}: {exc}") from exc
            log.results.append((p.name, result))
            gm = result.graph_module
        return gm, log
