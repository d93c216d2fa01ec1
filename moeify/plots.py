"""PNG plots: per-layer expert utilisation heatmaps and loss curves.

matplotlib is imported inside the functions (it is slow to import and only plotting needs it) and
used through `matplotlib.figure.Figure`, never `pyplot`, so no global figure state or backend is
touched. Every file is written under a temporary name in the target directory, then renamed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moeify.errors import ConfigError, MoeifyError
from moeify.stats import LayerStats, router_stats


def _figure(**kwargs):
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise MoeifyError("plotting needs matplotlib, which is not installed: pip install matplotlib") from exc
    return Figure(**kwargs)


def check_plot_path(path: str | os.PathLike) -> Path:
    """Refuse a path a plot cannot be written to, before any work: the CLI's `--plot` is checked first."""
    from moeify.serialization import check_output

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ConfigError(f"plot path {path} must end in .png: moeify writes PNG images")
    return check_output(path, force=True, directory=False)


def _save(fig, path: str | os.PathLike) -> Path:
    """Write the figure as a PNG, atomically; an existing image at `path` is replaced."""
    from moeify.serialization import write_file_atomically

    path = check_plot_path(path)
    return write_file_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"),
                                 force=True)


def utilization_matrix(model_or_stats: nn.Module | Sequence[LayerStats]) -> tuple[list[str], list[list[float]]]:
    """(layer names, rows of per-expert token shares) from a model's last forward or from stats rows."""
    rows = router_stats(model_or_stats) if isinstance(model_or_stats, nn.Module) else list(model_or_stats)
    if not rows:
        raise ConfigError("no MoE layer has router statistics: run a forward of the converted model on some inputs "
                          "before plotting its utilisation")
    widths = {len(r.tokens_per_expert) for r in rows}
    if len(widths) != 1:
        raise ConfigError(f"MoE layers have different expert counts {sorted(widths)}: plot them separately")
    return [r.layer for r in rows], [r.share for r in rows]


def plot_utilization(model_or_stats: nn.Module | Sequence[LayerStats], path: str | os.PathLike, *,
                     title: str | None = None) -> Path:
    """Heatmap (layers x experts) of the share of token assignments each expert got in the last forward."""
    names, share = utilization_matrix(model_or_stats)
    num_experts = len(share[0])
    fig = _figure(figsize=(1.2 + 0.55 * num_experts, 1.0 + 0.45 * len(names)))
    ax = fig.add_subplot()
    uniform = 1.0 / num_experts
    # colour scale centred on the balanced share so over- and under-used experts stand out alike
    im = ax.imshow(share, cmap="RdBu_r", vmin=0.0, vmax=2 * uniform, aspect="auto")
    for i, row in enumerate(share):
        for e, v in enumerate(row):
            ax.text(e, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(num_experts))
    ax.set_yticks(range(len(names)), labels=names, fontsize=8)
    ax.set_xlabel("expert")
    ax.set_title(title or f"share of tokens per expert (balanced = {uniform:.3f})", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04)
    return _save(fig, path)


def _as_runs(values: Any) -> list[list[float]]:
    if len(values) and isinstance(values[0], (list, tuple)):
        return [list(map(float, v)) for v in values]
    return [list(map(float, values))]


def plot_loss_curves(curves: Mapping[str, Mapping[str, Sequence]], path: str | os.PathLike, *,
                     title: str = "validation loss", xlabel: str = "step", ylabel: str = "loss (nats/token)",
                     marks: Mapping[str, float] | None = None, zoom_from: float | None = None) -> Path:
    """One line per curve; several runs (seeds) of a curve are drawn as their mean and min..max band.

    `curves`: ``{label: {"steps": [...], "values": [...] or [[run 1...], [run 2...]]}}``.
    `marks`: vertical lines ``{label: x}`` (e.g. where upcycling started). `zoom_from`: add a right
    panel showing only steps >= zoom_from, scaled to those values (late differences are small next
    to the early drop of the loss).
    """
    if not curves:
        raise ConfigError("plot_loss_curves got no curves: pass {label: {'steps': [...], 'values': [...]}}")
    series = []
    for label, curve in curves.items():
        steps = [float(x) for x in curve["steps"]]
        runs = _as_runs(curve["values"])
        if any(len(r) != len(steps) for r in runs):
            raise ConfigError(f"curve {label!r}: every run needs one value per step ({len(steps)})")
        cols = list(zip(*runs, strict=True))
        name = label if len(runs) == 1 else f"{label} (mean of {len(runs)})"
        series.append((name, steps, [sum(c) / len(c) for c in cols], [min(c) for c in cols], [max(c) for c in cols],
                       len(runs) > 1))
    fig = _figure(figsize=(12 if zoom_from is not None else 7, 4.2))
    axes = [fig.add_subplot(1, 2 if zoom_from is not None else 1, i + 1) for i in range(1 + (zoom_from is not None))]
    for k, ax in enumerate(axes):
        lo_x = zoom_from if k == 1 else float("-inf")
        shown = []
        for name, steps, mean, low, high, band in series:
            keep = [i for i, x in enumerate(steps) if x >= lo_x]
            if not keep:
                ax.plot([], [], label=name)  # keeps colours and legend entries aligned across panels
                continue
            xs, ys, lows, highs = ([v[i] for i in keep] for v in (steps, mean, low, high))
            (line,) = ax.plot(xs, ys, label=name, marker="." if k == 1 else None)
            if band:
                ax.fill_between(xs, lows, highs, color=line.get_color(), alpha=0.2, linewidth=0)
            shown += lows + highs
        if k == 1 and shown:
            pad = 0.05 * (max(shown) - min(shown) or 1.0)
            ax.set_ylim(min(shown) - pad, max(shown) + pad)
        for label, x in (marks or {}).items():
            ax.axvline(x, color="grey", linestyle=":", linewidth=1)
            ax.annotate(label, (x, 1.0), xycoords=("data", "axes fraction"), fontsize=7, ha="left", va="top")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title if k == 0 else f"zoom: steps >= {zoom_from:g}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=8)
    return _save(fig, path)


def plot_utilization_from_dir(out_dir: str | os.PathLike, path: str | os.PathLike,
                              inputs: tuple | None = None, kwargs: dict | None = None) -> Path:
    """Load a saved conversion, run one forward (eval, no grad) and plot its utilisation heatmap.

    `inputs`/`kwargs` default to ``example_inputs()`` of the saved ``model_source.py`` (or of the
    recorded source module).
    """
    from moeify.serialization import load, saved_example_inputs

    result = load(out_dir)
    if inputs is None and kwargs is None:
        inputs, kwargs = saved_example_inputs(out_dir)
    model = result.model.eval()
    with torch.no_grad():
        model(*(inputs or ()), **(kwargs or {}))
    return plot_utilization(model, path, title=f"{Path(out_dir).name}: share of tokens per expert")
