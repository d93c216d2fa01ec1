"""`moeify.save` / `moeify.load`: weights in safetensors plus a JSON plan, written atomically.

    out/
      plan.json          format, version, config, converted regions, report, model source
      model.safetensors  the converted model's state (shared tensors stored once)
      model_source.py    a copy of the model file the conversion came from (when it came from one)

`load` re-applies the plan to a freshly built dense model (given, or rebuilt from the recorded
source) and then loads the weights. No pickle is ever read.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from safetensors.torch import load_model, save_model
from torch import nn

from moeify.config import MoEConfig
from moeify.errors import MoeifyError, SerializationError
from moeify.report import ConversionReport
from moeify.source import ModelSource

PLAN_FORMAT = "moeify-plan"
PLAN_VERSION = 1


def write_atomically(out_dir: str | os.PathLike, fill, *, force: bool = False) -> Path:
    """Create `out_dir` by filling a temporary sibling directory and renaming it at the end."""
    out = Path(out_dir)
    if out.exists() and not force:
        raise SerializationError(f"{out} already exists: choose another output or pass --force (force=True)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        fill(tmp)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def plan_of(result) -> dict[str, Any]:
    """What plan.json records of a `ConversionResult` (`save` and the out-of-core conversion write it)."""
    return {
        "format": PLAN_FORMAT, "version": PLAN_VERSION, "config": result.config.to_dict(),
        "regions": result.regions, "none_inputs": {k: sorted(v) for k, v in sorted(result.none_inputs.items())},
        "report": result.report.to_dict(), "source": None if result.source is None else dict(result.source),
        "model_class": result.report.model_class,
    }


def save(result, out_dir: str | os.PathLike, *, force: bool = False) -> Path:
    """Save a `ConversionResult` (from `moeify.convert`)."""
    source = result.source

    def fill(tmp: Path) -> None:
        plan = plan_of(result)
        if source is not None:
            if source["kind"] == "file":
                shutil.copyfile(source["target"], tmp / "model_source.py")
                plan["source"]["copied_to"] = "model_source.py"
        save_model(result.model, str(tmp / "model.safetensors"))
        (tmp / "plan.json").write_text(json.dumps(plan, indent=2, sort_keys=True))

    return write_atomically(out_dir, fill, force=force)


def read_plan(out_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(out_dir) / "plan.json"
    if not path.is_file():
        raise SerializationError(f"{out_dir} has no plan.json: pass a directory written by moeify.save or "
                                 "moeify convert")
    try:
        plan = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SerializationError(f"{path} is not valid JSON ({exc}); re-run the conversion") from exc
    if plan.get("format") != PLAN_FORMAT or plan.get("version") != PLAN_VERSION:
        raise SerializationError(f"{path} is not a moeify plan of version {PLAN_VERSION}; re-run the conversion")
    return plan


def rebuild_dense(out_dir: str | os.PathLike, plan: dict[str, Any]) -> nn.Module:
    source = plan.get("source")
    if not source:
        raise SerializationError(f"{out_dir} records no model source: call moeify.load(path, model=dense_model)")
    if source.get("copied_to"):
        spec = ModelSource("file", str(Path(out_dir) / source["copied_to"]), source["name"])
    else:
        spec = ModelSource(source["kind"], source["target"], source["name"])
    model, _ = spec.build()
    return model


def load(out_dir: str | os.PathLike, model: nn.Module | None = None):
    """Rebuild a saved conversion. Returns a `ConversionResult` whose `.model` holds the saved weights."""
    from moeify.convert import convert, set_calls_per_forward  # local: convert imports this package's siblings

    plan = read_plan(out_dir)
    cfg = MoEConfig.from_dict(plan["config"])
    dense = model if model is not None else rebuild_dense(out_dir, plan)
    try:
        result = convert(dense, cfg, only=plan["regions"], none_inputs=plan.get("none_inputs", {}), verify=False)
    except MoeifyError as exc:
        raise SerializationError(f"cannot re-apply the plan in {out_dir}: {exc}") from exc
    weights = Path(out_dir) / "model.safetensors"
    if not weights.is_file():
        raise SerializationError(f"{out_dir} has no model.safetensors: the save did not finish; save again")
    missing, unexpected = load_model(result.model, str(weights), strict=False)
    if missing or unexpected:
        raise SerializationError(f"{weights} does not fit the re-applied plan (missing {list(missing)[:5]}, "
                                 f"unexpected {list(unexpected)[:5]}): was the dense model built with the same sizes?")
    result.report = ConversionReport.from_dict(plan["report"])
    set_calls_per_forward(result.model, result.report)
    result.source = plan.get("source")
    return result
