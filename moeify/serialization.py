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


def check_output(out_path: str | os.PathLike, *, force: bool = False, directory: bool = True) -> Path:
    """Refuse an output path moeify may not create or replace (before any work is done).

    `force` replaces an existing output only where that cannot destroy anything else: a directory
    output must be a moeify output (it holds plan.json) or empty, a file output must be a file, and
    neither may be a symbolic link, the working directory or one of its parents.
    """
    out = Path(out_path)
    what = "directory" if directory else "file"
    if out.is_symlink():
        raise SerializationError(f"{out} is a symbolic link: pass the path it points to, or another output {what}")
    if not out.exists():
        base = next((p for p in out.parents if p.exists()), Path("."))
        if not base.is_dir():
            raise SerializationError(f"{base} is a file, so {out} cannot be created under it: choose another output")
        return out
    if not force:
        raise SerializationError(f"{out} already exists: choose another output or pass --force (force=True)")
    resolved, cwd = out.resolve(), Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise SerializationError(f"{out} is the working directory or one of its parents, which --force will not "
                                 f"replace: choose a new output {what}")
    if directory and not out.is_dir():
        raise SerializationError(f"{out} is a file, not an output directory: remove it yourself or choose another "
                                 "output")
    if not directory and out.is_dir():
        raise SerializationError(f"{out} is a directory: pass a file path for the output")
    if directory and not (out / "plan.json").is_file() and any(out.iterdir()):
        raise SerializationError(f"{out} is not empty and holds no plan.json, so it is no moeify output: --force "
                                 "replaces only a moeify output or an empty directory; choose another output")
    return out


def _umask() -> int:
    """The process umask, read without changing it where /proc says it (Linux)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: the classic read, which sets it for an instant
    os.umask(mask)
    return mask


def _publish(tmp: Path, out: Path) -> None:
    """Give `tmp` (a directory tree or a file) the modes a plain write would have (temporary names are
    private), then rename it to `out`, replacing what `check_output` allowed."""
    mask = _umask()
    for path in [tmp, *(tmp.rglob("*") if tmp.is_dir() else [])]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)
    if out.is_dir() and not out.is_symlink():
        shutil.rmtree(out)
    os.replace(tmp, out)


def _write(out_path: str | os.PathLike, fill, force: bool, directory: bool) -> Path:
    out = check_output(out_path, force=force, directory=directory)
    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if directory:
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        else:
            fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
            os.close(fd)
            tmp = Path(name)
        fill(tmp)
        _publish(tmp, out)
    except BaseException as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        for parent in created:  # innermost first; only the directories this call made, and only if empty
            try:
                parent.rmdir()
            except OSError:
                break
        if isinstance(exc, OSError) and not isinstance(exc, MoeifyError):
            raise SerializationError(f"cannot write {out}: {exc.strerror or exc}; choose a writable output "
                                     "path") from exc
        raise
    return out


def write_atomically(out_dir: str | os.PathLike, fill, *, force: bool = False) -> Path:
    """Create the directory `out_dir` by filling (`fill(tmp)`) a temporary sibling and renaming it at the end;
    on any failure nothing is left (not even the parents this call created)."""
    return _write(out_dir, fill, force, directory=True)


def write_file_atomically(path: str | os.PathLike, fill, *, force: bool = False) -> Path:
    """`write_atomically` for a single file: `fill(tmp)` writes the temporary file."""
    return _write(path, fill, force, directory=False)


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
