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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from moeify.config import MoEConfig
from moeify.errors import ModelSourceError, MoeifyError, SerializationError, expect_type, one_line
from moeify.report import ConversionReport, describe_json
from moeify.source import ModelSource

PLAN_FORMAT = "moeify-plan"
PLAN_VERSION = 1
# safetensors' dtype names
DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
DTYPE_OF = {v: k for k, v in DTYPES.items()}


def check_output(out_path: str | os.PathLike, *, force: bool = False, directory: bool = True) -> Path:
    """Refuse an output path moeify may not create or replace (before any work is done).

    `force` replaces an existing output only where that cannot destroy anything else: a directory
    output must be a moeify output (it holds plan.json) or empty, a file output must be a file, and
    neither may be a symbolic link, the working directory or one of its parents.
    """
    if not str(out_path).strip():
        raise SerializationError("the output path is empty: name the output to write (-o PATH)")
    out = Path(out_path)
    try:
        return _check_output(out, force, directory)
    except OSError as exc:  # the path itself is unusable (too long a name, no permission to look)
        raise SerializationError(f"cannot use {out} as an output: {exc.strerror or exc}; choose another path") from exc


def _check_output(out: Path, force: bool, directory: bool) -> Path:
    what = "directory" if directory else "file"
    if ".." in out.parts or out.name in ("", "."):
        # where the path lands once its missing parents exist: `new/../old` is `old`, which exists, though
        # the file system asked about `new/../old` while `new` is missing says it does not
        named = out.name not in ("", ".", "..")
        out = Path(os.path.realpath(out.parent if named else out)) / (out.name if named else "")
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
    if not (out.is_dir() and not out.is_symlink()):
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))  # the previous output, until the swap
    os.replace(out, old / out.name)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old / out.name, out)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _write(out_path: str | os.PathLike, fill, force: bool, directory: bool, companions: Sequence[str] = ()) -> Path:
    out = check_output(out_path, force=force, directory=directory)
    for name in companions:
        check_output(out.parent / name, force=force, directory=False)
    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    tmp = stage = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if directory:
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        elif companions:  # the file and its companions side by side in a private directory
            stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
            tmp = stage / out.name
        else:
            fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
            os.close(fd)
            tmp = Path(name)
        fill(tmp)
        written = {name for name in companions if (tmp.parent / name).exists()}
        for name in written:  # first, so that whoever finds the file finds what it refers to
            _publish(tmp.parent / name, out.parent / name)
        _publish(tmp, out)
        for name in set(companions) - written:  # a replaced output's (force let it pass)
            (out.parent / name).unlink(missing_ok=True)
        if stage is not None:
            stage.rmdir()
    except BaseException as exc:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
        elif tmp is not None and tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp is not None:
            tmp.unlink(missing_ok=True)
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


def write_file_atomically(path: str | os.PathLike, fill, *, force: bool = False,
                          companions: Sequence[str] = ()) -> Path:
    """`write_atomically` for a single file: `fill(tmp)` writes the temporary file.

    `companions`: names of files that belong beside `path` (an ONNX model's external weights). `fill`
    may write them next to `tmp`, in a private temporary directory; they are renamed into place
    before the file itself, and `force` is needed to replace them as for the file. One that `fill`
    does not write is removed where it exists (an earlier output's, which `force` allowed to replace).
    """
    return _write(path, fill, force, directory=False, companions=companions)


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
    from moeify.convert import ConversionResult  # local: convert imports this module

    expect_type(result, ConversionResult, "save's result", "pass what moeify.convert returned, not its .model")
    expect_type(out_dir, (str, os.PathLike), "save's out_dir", "pass a folder path")
    meta = next((name for name, t in result.model.state_dict().items() if t.is_meta), None)
    if meta is not None:
        raise SerializationError(f"the model's parameters are on the meta device (such as {meta!r}), which holds "
                                 "no values to save: materialise the weights first, or upcycle a dense checkpoint "
                                 "with `moeify convert-checkpoint` (moeify.ooc.convert_checkpoint)")

    def fill(tmp: Path) -> None:
        save_model(result.model, str(tmp / "model.safetensors"))
        write_plan(result, tmp)

    return write_atomically(out_dir, fill, force=force)


SOURCE_COPY = "model_source.py"


def write_plan(result, tmp: Path) -> None:
    """plan.json into the directory being filled, with a copy of the model file the conversion came from
    (when it came from one) and the folder it was in, whose modules the copy may import."""
    plan = plan_of(result)
    source = plan["source"]
    if source is not None and source["kind"] == "file":
        shutil.copyfile(source["target"], tmp / SOURCE_COPY)
        source["copied_to"] = SOURCE_COPY
        source["folder"] = str(Path(source["target"]).resolve().parent)
    (tmp / "plan.json").write_text(json.dumps(plan, indent=2, sort_keys=True, allow_nan=False))


def saved_source(out_dir: str | os.PathLike, plan: dict[str, Any]) -> ModelSource | None:
    """Where a saved conversion's dense model comes from: its copy of the model file (importing modules
    beside the original, when that folder still exists), or the recorded import; None if nowhere."""
    source = plan.get("source")
    if not source:
        return None
    if source.get("copied_to"):
        copy = Path(out_dir) / source["copied_to"]
        if not copy.is_file():
            raise SerializationError(f"{out_dir} has lost {source['copied_to']}, the copy of the model file it was "
                                     "converted from: call moeify.load(path, model=dense_model) with the dense "
                                     "model built as for the conversion")
        return ModelSource("file", str(copy), source["name"], beside=source.get("folder"))
    return ModelSource(source["kind"], source["target"], source["name"])


def _drop_ignored_fields(config: Any) -> Any:
    """A saved config without the init_noise it ignored: earlier moeify accepted init_noise with an init other
    than copy_noise (where it changes nothing), which MoEConfig now refuses. The saved weights do not depend on it."""
    if isinstance(config, Mapping) and config.get("init", MoEConfig.init) != "copy_noise":
        return {k: v for k, v in config.items() if k != "init_noise"}
    return config


def read_plan(out_dir: str | os.PathLike) -> dict[str, Any]:
    """plan.json of a saved conversion, its layout checked (`check_plan`)."""
    path = Path(out_dir) / "plan.json"
    if not path.is_file():
        raise SerializationError(f"{out_dir} has no plan.json: pass a directory written by moeify.save or "
                                 "moeify convert")
    try:
        plan = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise SerializationError(f"{path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
                                 f"{exc.start}): the file was damaged; re-run the conversion") from exc
    except json.JSONDecodeError as exc:
        raise SerializationError(f"{path} is not valid JSON ({exc}); re-run the conversion") from exc
    except OSError as exc:
        raise SerializationError(f"cannot read {path}: {exc.strerror or exc}; make it readable") from exc
    check_plan(path, plan)
    return plan


_MISSING = object()


def _is_names(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def check_plan(path: Path, plan: Any) -> None:
    """Refuse a plan whose layout is not what `plan_of` writes: a JSON object of this format and version
    whose keys have their JSON types (the report's own fields are checked by `ConversionReport.from_dict`).
    `none_inputs` may be absent (plans written before it was recorded); `source` may be absent or null."""
    if not isinstance(plan, dict):
        raise SerializationError(f"{path} holds {describe_json(plan)}, not a JSON object: re-run the conversion")
    if plan.get("format") != PLAN_FORMAT or plan.get("version") != PLAN_VERSION:
        raise SerializationError(f"{path} is not a moeify plan of version {PLAN_VERSION}; re-run the conversion")

    def refuse(where: str, value: Any, expected: str) -> NoReturn:
        found = "missing" if value is _MISSING else describe_json(value)
        raise SerializationError(f"{path}: {where} is {found} (expected {expected}): the plan was damaged; "
                                 "re-run the conversion")

    for key in ("config", "report"):
        if not isinstance(plan.get(key), dict):
            refuse(repr(key), plan.get(key, _MISSING), "an object")
    regions = plan.get("regions", _MISSING)
    if not isinstance(regions, list):
        refuse("'regions'", regions, "a list of regions, each a list of module names")
    for i, names in enumerate(regions):
        if not names or not _is_names(names):
            refuse(f"'regions'[{i}]", names, "a non-empty list of module names")
    none_inputs = plan.get("none_inputs", {})
    if not isinstance(none_inputs, dict):
        refuse("'none_inputs'", none_inputs, "an object of module path to a list of input names")
    for owner, names in none_inputs.items():
        if not _is_names(names):
            refuse(f"'none_inputs'[{owner!r}]", names, "a list of input names")
    source = plan.get("source")
    if source is None:
        return
    if not isinstance(source, dict):
        refuse("'source'", source, "null or an object with kind, target and name")
    for key in ("kind", "target", "name"):
        if not isinstance(source.get(key), str):
            refuse(f"'source'[{key!r}]", source.get(key, _MISSING), "a string")
    if source["kind"] not in ("file", "import"):
        refuse("'source'['kind']", source["kind"], "'file' or 'import'")
    copied = source.get("copied_to")
    if copied is not None and not (isinstance(copied, str) and copied and Path(copied).name == copied):
        refuse("'source'['copied_to']", copied, f"the name of a file in {path.parent}")


def saved_example_inputs(out_dir: str | os.PathLike) -> tuple[tuple, dict]:
    """(args, kwargs) from ``example_inputs()`` of a saved conversion's model source (its model_source.py)."""
    from moeify.source import example_inputs_of

    source = saved_source(out_dir, read_plan(out_dir))
    in_python = "in Python, run moeify.router_stats or moeify.export_onnx on moeify.load(out_dir{}).model with inputs"
    if source is None:
        raise ModelSourceError(f"{out_dir} records no model source to take example_inputs() from (it was saved from "
                               f"Python without source=): {in_python.format(', model=dense')} of your own")
    return example_inputs_of(source.load_module(), source.target, otherwise=f"{in_python.format('')} of your own")


def rebuild_dense(out_dir: str | os.PathLike, plan: dict[str, Any]) -> nn.Module:
    spec = saved_source(out_dir, plan)
    if spec is None:
        raise SerializationError(f"{out_dir} records no model source (it was saved from Python without source=): "
                                 "load it in Python with moeify.load(path, model=dense_model), or convert with "
                                 "source='model.py' (the CLI's `moeify convert model.py` records it)")
    model, _ = spec.build()
    return model


def _file_layout(weights: Path) -> dict[str, tuple[list[int], torch.dtype | None]]:
    """Name -> (shape, safetensors dtype) of every tensor in a safetensors file, from its header (checked
    to cover the file)."""
    if not weights.is_file():
        raise SerializationError(f"{weights.parent} has no model.safetensors: the save did not finish; save again")
    try:
        with safe_open(str(weights), framework="pt") as f:
            return {name: (list(f.get_slice(name).get_shape()), DTYPE_OF.get(f.get_slice(name).get_dtype()))
                    for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise SerializationError(f"{weights} is not a readable safetensors file ({one_line(exc)}): it was cut "
                                 "short or damaged; re-run the conversion") from exc


def _open_weights(path: Path):
    """(the file, a reader) for load(weights=...): a safetensors file, a sharded checkpoint's index, or a
    folder holding either."""
    from moeify.ooc import open_checkpoint  # local: ooc imports this module

    if not path.exists():
        raise SerializationError(f"weights {path} does not exist: pass a save_pretrained folder, its "
                                 "model.safetensors, or its model.safetensors.index.json")
    reader = open_checkpoint(path)
    return reader.path, reader


def _fit_to_layout(model: nn.Module, layout: dict[str, tuple[list[int], torch.dtype | None]], path: Path) -> None:
    """Check every tensor the file holds for the model against the model's shape, and give the model's
    floating tensors the file's floating dtype."""
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name not in layout:
            continue
        shape, saved = layout[name]
        if list(tensor.shape) != shape:
            raise SerializationError(f"{path} does not fit the re-applied plan: {name!r} is {shape} in "
                                     f"the file but {list(tensor.shape)} in the model rebuilt from the plan: was "
                                     "the dense model built with the same sizes (and plan.json left as saved)?")
        if saved is not None and saved != tensor.dtype and saved.is_floating_point and tensor.is_floating_point():
            # in the dtype it was saved in: a model.bfloat16() saved came back float32 from the float32
            # dense model the source builds (and a float32 router in a bfloat16 model stays float32)
            with torch.no_grad():
                tensor.data = tensor.data.to(saved)


def _load_saved(model: nn.Module, path: Path) -> None:
    """The model.safetensors that moeify.save wrote (tied tensors stored once, as save_model does)."""
    try:
        missing, unexpected = load_model(model, str(path), strict=False)
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise SerializationError(f"cannot load {path} into the re-applied plan ({one_line(exc)}): re-run the "
                                 "conversion") from exc
    if missing or unexpected:
        raise SerializationError(f"{path} does not fit the re-applied plan (missing {list(missing)[:5]}, "
                                 f"unexpected {list(unexpected)[:5]}): was the dense model built with the same sizes?")


def _load_checkpoint(model: nn.Module, reader, path: Path) -> None:
    """Copy a checkpoint's tensors into the model, one at a time. A tensor the checkpoint lacks must
    share its memory with one it holds (tied weights); a tensor the model lacks is refused."""
    state = model.state_dict(keep_vars=True)
    unexpected = [name for name in reader.entries if name not in state]
    held = {state[name].data_ptr() for name in reader.entries if name in state}
    missing = [name for name, t in state.items() if name not in reader.entries and t.data_ptr() not in held]
    if unexpected and any(".moe." in name for name in missing) and not any(".moe." in name for name in unexpected):
        raise SerializationError(f"{path} looks like the dense model's checkpoint: it holds no MoE weights "
                                 f"({len(missing)} missing, e.g. {missing[0]}) and the Linears the conversion replaced "
                                 f"(e.g. {unexpected[0]}); pass a checkpoint saved after the conversion, or leave "
                                 "weights out to load the conversion's own")
    if missing or unexpected:
        raise SerializationError(f"{path} does not fit the plan of this conversion (missing {missing[:3]}, "
                                 f"unexpected {unexpected[:3]}): pass a checkpoint of the model this plan converted")
    with torch.no_grad():
        for name in reader.entries:
            state[name].copy_(reader.get_tensor(name))


def load(out_dir: str | os.PathLike, model: nn.Module | None = None, *,
         weights: str | os.PathLike | None = None):
    """Rebuild a saved conversion. Returns a `ConversionResult` whose `.model` holds the saved weights.

    `weights`: take the weights from elsewhere than `out_dir`'s model.safetensors: a checkpoint of the
    converted model saved later, such as a `save_pretrained` folder that transformers' Trainer wrote
    while training it (its model.safetensors, or model.safetensors.index.json when sharded, or such a
    file itself). The plan still comes from `out_dir`. A weight the checkpoint leaves out is refused
    unless it is tied to one it holds (a language model's head, which save_pretrained does not store).

    Everything that can be checked without running the model source is checked first: the plan, its
    config and report, and the weights file's header."""
    from moeify.convert import convert, moe_layers, set_calls_per_forward  # local: convert imports this package

    expect_type(out_dir, (str, os.PathLike), "load's out_dir", "pass the folder moeify.save or moeify convert wrote")
    expect_type(model, (nn.Module, type(None)), "load's model",
                "pass the dense model itself (build_model(), not build_model), or None to rebuild it from the saved "
                "model source")
    plan = read_plan(out_dir)
    plan_path = Path(out_dir) / "plan.json"
    try:
        cfg = MoEConfig.from_dict(_drop_ignored_fields(plan["config"]))
        report = ConversionReport.from_dict(plan["report"])
    except MoeifyError as exc:
        raise SerializationError(f"{plan_path}: {exc}") from exc
    if weights is None:
        path = Path(out_dir) / "model.safetensors"
        layout, reader = _file_layout(path), None
    else:
        path, reader = _open_weights(Path(weights))
        layout = {name: (list(reader.shape(name)), reader.dtype(name)) for name in reader.entries}
    try:
        dense = model if model is not None else rebuild_dense(out_dir, plan)
        held = moe_layers(dense)
        missing = [name for name in report.converted_from if name not in held]
        if missing:
            raise SerializationError(f"{out_dir} holds a conversion of a model that was converted already (its MoE "
                                     f"layers {', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''} are not in "
                                     f"the {'model given' if model is not None else 'model rebuilt from its source'}): "
                                     "pass model= the model it was converted from (moeify.load of the first "
                                     "conversion's output, then .model)")
        try:
            result = convert(dense, cfg, only=plan["regions"], none_inputs=plan.get("none_inputs", {}), verify=False)
        except MoeifyError as exc:
            raise SerializationError(f"cannot re-apply the plan in {out_dir}: {exc}") from exc
        _fit_to_layout(result.model, layout, path)
        if reader is None:
            _load_saved(result.model, path)
        else:
            _load_checkpoint(result.model, reader, path)
    finally:
        if reader is not None:
            reader.close()
    result.report = report
    set_calls_per_forward(result.model, result.report)
    result.source = plan.get("source")
    return result
