"""Choose which found FFN regions to convert, from `MoEConfig` selection fields.

    regions (model order) -> filter targets/exclude regexes on the owner name, and task heads
                          -> keep indices in `layers` -> keep every `every_n`-th   => selected, skipped

Every region not selected is returned as a Skip with the rule that dropped it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from moeify.config import MoEConfig
from moeify.passes.infra import Skip


def plan_regions(names: Sequence[str], cfg: MoEConfig,
                 heads: Mapping[int, str] | None = None) -> tuple[list[int], list[Skip]]:
    """`names`: each region's owner module name, in model order. `heads`: the regions that look like a task
    head rather than a block's FFN (index -> why), left out unless `targets` are given (then they choose).
    Returns selected indices and skips."""
    skipped: list[Skip] = []
    eligible: list[int] = []
    for i, name in enumerate(names):
        excluded = next((p for p in cfg.exclude if re.search(p, name)), None)
        if excluded is not None:
            skipped.append(Skip(name, f"excluded by exclude regex {excluded!r}", "remove it from MoEConfig.exclude"))
        elif cfg.targets and not any(re.search(p, name) for p in cfg.targets):
            skipped.append(Skip(name, f"matches none of targets {list(cfg.targets)}", "add a regex to targets"))
        elif not cfg.targets and heads and i in heads:
            skipped.append(Skip(name, f"a task head, not a block's FFN: {heads[i]}",
                                "name it in targets, with the blocks' FFNs, to convert it too"))
        else:
            eligible.append(i)
    selected = []
    for position, i in enumerate(eligible):
        if cfg.layers is not None and position not in cfg.layers:
            skipped.append(Skip(names[i], f"FFN layer {position} is not in layers={list(cfg.layers)}"))
        elif (position % cfg.every_n) != cfg.every_n - 1:
            skipped.append(Skip(names[i], f"every_n={cfg.every_n} converts FFN layers {cfg.every_n - 1}, "
                                          f"{2 * cfg.every_n - 1}, ...; this is layer {position}"))
        else:
            selected.append(i)
    if cfg.layers is not None:
        missing = sorted(set(cfg.layers) - set(range(len(eligible))))
        if missing:
            skipped.append(Skip("layers", f"no FFN layer(s) {missing}: only {len(eligible)} eligible",
                                f"use indices 0..{len(eligible) - 1}"))
    return selected, skipped
