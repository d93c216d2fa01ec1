"""Out-of-core upcycling: a dense safetensors checkpoint in, a moeify checkpoint out, one layer in memory.

    dense.safetensors (pread) + dense model built on meta  ->  out/plan.json + out/model.safetensors

The checkpoint is one .safetensors file, or a Hugging Face sharded one: its
model.safetensors.index.json (the name -> shard map), or the folder holding either.

The module structure comes from running `moeify.convert` on the dense model built on the meta
device (no weights are allocated): it gives the converted state dict's names, shapes and dtypes,
the plan and the report. `model.safetensors` is then written in one pass: the header is computed
from those shapes first, then every tensor is appended in header order. Untouched tensors are copied
byte for byte from the dense file (kernel-side copies, nothing held in Python); each MoE layer is
built from its region's dense weights alone, written, and dropped before the next one, so peak
memory is about one layer whatever the model's size.

Bit-identical to `moeify.convert` + `moeify.save`: the layers are built by the same
`build_moe_layer` with one generator seeded with `cfg.seed`, consumed per region in the same (model)
order. For `init="copy"` on plain nn.Linear regions a fast path skips building the experts: an
expert tensor is then the dense tensor's bytes repeated E times, copied file to file; only the
router (which consumes the generator) is built.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from moeify.capture import observe_none_inputs
from moeify.config import MoEConfig
from moeify.convert import (
    ConversionResult,
    convert,
    find_regions,
    function_preserving,
    moe_layers,
    region_builder,
)
from moeify.errors import ModelSourceError, MoeifyError, SerializationError, one_line
from moeify.moe.build import make_router
from moeify.serialization import DTYPE_OF, DTYPES, write_atomically, write_plan
from moeify.source import ModelSource

# parameters a layer built by `build_moe_layer` for init="copy" can hold; anything else -> generic path
FAST_EXPERT_KEYS = ("w1_EFD", "w2_EDF", "w3_EFD", "b1_EF", "b2_ED", "b3_EF")
FAST_ROUTER_KEYS = ("router.gate.weight", "router.gate.bias")
COPY_CHUNK = 64 << 20


def _nbytes(dtype: torch.dtype, shape) -> int:
    return math.prod(int(s) for s in shape) * dtype.itemsize


class _LiveBytes:
    """`live_bytes` / `peak_live_bytes`: the bytes of tensors handed out and still referenced, a bound
    on what conversion holds from the dense checkpoint at any moment."""

    live_bytes = peak_live_bytes = 0

    def _track(self, tensor: torch.Tensor, nbytes: int) -> torch.Tensor:
        self.live_bytes += nbytes
        self.peak_live_bytes = max(self.peak_live_bytes, self.live_bytes)
        weakref.finalize(tensor, self._released, nbytes)
        return tensor

    def _released(self, nbytes: int) -> None:
        self.live_bytes -= nbytes


class SafetensorsReader(_LiveBytes):
    """Reads single tensors (or raw byte ranges) of a safetensors file without loading the rest.

    Every tensor's byte range is checked against its dtype and shape and against the file's size when
    the file is opened, so a truncated or corrupt file fails there, before anything is written.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise SerializationError(f"dense checkpoint {self.path} does not exist: pass a .safetensors file, a "
                                     "sharded checkpoint's model.safetensors.index.json, or the folder holding either")
        self._file = open(self.path, "rb")  # noqa: SIM115 - closed by close() / context manager
        try:
            head = self._file.read(8)
            size = int.from_bytes(head, "little") if len(head) == 8 else -1
            header = json.loads(self._file.read(size)) if 0 < size < (100 << 20) else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            header = None
        if not isinstance(header, dict):
            self._file.close()
            raise SerializationError(f"{self.path} is not a safetensors file (bad header); pass a .safetensors file")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.entries: dict[str, dict[str, Any]] = header
        self.data_start = 8 + size
        self.file_bytes = os.fstat(self._file.fileno()).st_size
        try:
            for name, entry in self.entries.items():
                self._check_entry(name, entry)
        except BaseException:
            self._file.close()
            raise

    def _check_entry(self, name: str, entry: Any) -> None:
        try:
            begin, end = (int(v) for v in entry["data_offsets"])
            shape = [int(s) for s in entry["shape"]]
            dtype = entry["dtype"]
        except (TypeError, KeyError, ValueError):
            raise SerializationError(f"{self.path} is not a safetensors file (bad header entry for tensor {name!r}); "
                                     "pass a .safetensors file") from None
        if not 0 <= begin <= end or any(s < 0 for s in shape) or \
                (dtype in DTYPE_OF and end - begin != _nbytes(DTYPE_OF[dtype], shape)):
            raise SerializationError(f"{self.path} is corrupt: tensor {name!r} is {dtype} {shape} but its data_offsets "
                                     f"{begin}..{end} do not hold that; re-save the checkpoint")
        if self.data_start + end > self.file_bytes:
            raise self.truncation_error(name, self.file_bytes)

    def truncation_error(self, name: str, has: int) -> SerializationError:
        """The error for tensor `name` whose bytes run past `has`, where the file ends."""
        start, end = self.span(name)
        return SerializationError(f"{self.path} is truncated: tensor {name!r} needs bytes {start}..{end} but the file "
                                  f"has {has}; re-save the checkpoint")

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def dtype(self, name: str) -> torch.dtype:
        dtype = self.entries[name]["dtype"]
        if dtype not in DTYPE_OF:
            raise SerializationError(f"{self.path}: tensor {name!r} has dtype {dtype}, which moeify cannot read; save "
                                     f"it as one of {', '.join(DTYPE_OF)}")
        return DTYPE_OF[dtype]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def span(self, name: str) -> tuple[int, int]:
        """Absolute (start, end) byte offsets of a tensor's data in the file."""
        begin, end = self.entries[name]["data_offsets"]
        return self.data_start + begin, self.data_start + end

    def get_tensor(self, name: str) -> torch.Tensor:
        start, end = self.span(name)
        dtype, shape = self.dtype(name), self.shape(name)
        if end == start:
            return torch.empty(shape, dtype=dtype)
        buf = bytearray(end - start)
        self._file.seek(start)
        got = self._file.readinto(buf)
        if got != len(buf):  # the file shrank after it was opened
            raise self.truncation_error(name, start + got)
        return self._track(torch.frombuffer(buf, dtype=dtype).reshape(shape), len(buf))

    def fileno(self) -> int:
        return self._file.fileno()

    def reader_for(self, name: str) -> SafetensorsReader:
        """The file holding tensor `name`: this one."""
        return self


INDEX_NAME = "model.safetensors.index.json"


class ShardedReader(_LiveBytes):
    """A Hugging Face sharded checkpoint read as one: `weight_map` of the index names each tensor's shard.

    Every shard is opened (and so checked, see SafetensorsReader) up front, and every tensor the index
    names must be in its shard; `reader_for(name)` gives the shard, for file-to-file copies.
    """

    def __init__(self, index: str | os.PathLike,
                 shard_factory: Callable[[Path], SafetensorsReader] = SafetensorsReader) -> None:
        self.path = Path(index)
        try:
            weight_map = json.loads(self.path.read_text())["weight_map"]
            if not (isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())):
                raise TypeError
        except (OSError, ValueError, KeyError, TypeError):
            raise SerializationError(f"{self.path} is not a safetensors index (no weight_map of tensor -> shard file); "
                                     f"pass the checkpoint's {INDEX_NAME}") from None
        self._shards: dict[str, SafetensorsReader] = {}
        try:
            for file in dict.fromkeys(weight_map.values()):
                shard = self.path.parent / file
                if Path(file).is_absolute() or ".." in Path(file).parts or not shard.is_file():
                    raise SerializationError(f"{self.path} names shard {file}, which is not a file beside it: "
                                             "download every shard of the checkpoint into one folder")
                self._shards[file] = shard_factory(shard)
            for name, file in weight_map.items():
                if name not in self._shards[file].entries:
                    raise SerializationError(f"{self.path} places {name!r} in {file}, which does not hold it: "
                                             "download the checkpoint again")
        except BaseException:
            self.close()
            raise
        self._shard_of = {name: self._shards[file] for name, file in weight_map.items()}
        self.entries = {name: shard.entries[name] for name, shard in self._shard_of.items()}

    def __enter__(self) -> ShardedReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for shard in self._shards.values():
            shard.close()

    def reader_for(self, name: str) -> SafetensorsReader:
        return self._shard_of[name]

    def dtype(self, name: str) -> torch.dtype:
        return self._shard_of[name].dtype(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shard_of[name].shape(name)

    def get_tensor(self, name: str) -> torch.Tensor:
        tensor = self._shard_of[name].get_tensor(name)
        return self._track(tensor, tensor.nbytes)


Checkpoint = SafetensorsReader | ShardedReader


def open_checkpoint(path: Path) -> Checkpoint:
    """A reader for a .safetensors file, a sharded checkpoint's index, or a folder holding either."""
    if path.is_dir():
        for name in (INDEX_NAME, "model.safetensors"):
            if (path / name).is_file():
                return open_checkpoint(path / name)
        raise SerializationError(f"{path} holds neither model.safetensors nor {INDEX_NAME}: pass the checkpoint file "
                                 "or its index")
    return ShardedReader(path) if path.suffix == ".json" else SafetensorsReader(path)


class StreamingWriter:
    """Writes a safetensors file whose header is fixed up front: tensors are appended in header order."""

    def __init__(self, path: str | os.PathLike, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None) -> None:
        header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
        offset = 0
        self.order: list[tuple[str, int]] = []
        for name, dtype, shape in entries:
            n = _nbytes(dtype, shape)
            header[name] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            self.order.append((name, n))
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format pads the header so tensor data is 8-byte aligned
        self.total_bytes = 8 + len(raw) + offset
        self._file = open(path, "wb")  # noqa: SIM115 - closed by close()
        self._file.write(len(raw).to_bytes(8, "little") + raw)
        self._next = 0

    def _expect(self, name: str) -> int:
        if self._next >= len(self.order) or self.order[self._next][0] != name:
            want = self.order[self._next][0] if self._next < len(self.order) else "<end>"
            raise SerializationError(f"streaming writer: got {name!r} but the header's next tensor is {want!r}")
        n = self.order[self._next][1]
        self._next += 1
        return n

    def write_tensor(self, name: str, tensor: torch.Tensor) -> None:
        n = self._expect(name)
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        if data.numel() != n:
            raise SerializationError(f"streaming writer: {name!r} has {data.numel()} bytes, the header says {n}")
        if n:
            self._file.write(memoryview(data.numpy()))

    def copy_range(self, name: str, reader: Checkpoint, src: str, repeat: int = 1) -> None:
        """Append `src`'s bytes from `reader` `repeat` times as tensor `name` (file to file, in the kernel)."""
        n = self._expect(name)
        reader = reader.reader_for(src)
        start, end = reader.span(src)
        if (end - start) * repeat != n:
            raise SerializationError(f"streaming writer: {src!r} x{repeat} does not fill {name!r}")
        self._file.flush()
        out_fd, in_fd = self._file.fileno(), reader.fileno()
        for _ in range(repeat):
            pos = start
            while pos < end:
                size = min(COPY_CHUNK, end - pos)
                try:
                    done = os.copy_file_range(in_fd, out_fd, size, pos)
                except OSError:  # e.g. EXDEV (another file system) or no kernel support: copy through user space
                    done = os.write(out_fd, os.pread(in_fd, size, pos))
                if done <= 0:  # end of the input (a full disk raises OSError): the file shrank after it was opened
                    raise reader.truncation_error(src, pos)
                pos += done
        # copy_file_range moved the fd's offset; keep Python's buffered file object in step
        self._file.seek(os.lseek(out_fd, 0, os.SEEK_CUR))

    def close(self, check: bool = True) -> None:
        """Close the file; `check=False` while another error propagates (it, not this one, is the cause)."""
        try:
            if check and self._next != len(self.order):
                raise SerializationError(f"streaming writer closed after {self._next} of {len(self.order)} tensors")
        finally:
            self._file.close()


@dataclass
class _Unit:
    """One step of the write: a dense tensor copied through, or one whole MoE layer."""

    kind: str  # "dense" | "moe"
    name: str  # state-dict key (dense) or MoE layer name (moe)
    keys: list[str]  # state-dict keys written by this unit, in file order
    fast: bool = False
    found: Any = None  # moe: the region (from `find_regions`) the layer is built from


@dataclass
class _Plan:
    """What `_write` writes, all of it checked against the checkpoint before the output is created."""

    units: list[_Unit]
    entries: list[tuple[str, torch.dtype, tuple[int, ...]]]  # the output's header, in file order
    metadata: dict[str, str]
    sources: dict[str, str]  # every name the write reads -> its name in the checkpoint (a tied alias maybe)


class _Modules:
    """The `get_submodule` of a graph module, over materialised copies of a region's Linears."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules

    def get_submodule(self, name: str) -> nn.Module:
        return self.modules[name]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else (prefix or name)


def _meta_model(model: nn.Module | Callable[[], nn.Module]) -> nn.Module:
    if isinstance(model, nn.Module):
        return model
    try:
        with torch.device("meta"):
            return model()
    except MoeifyError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's factory: one line naming it and the fix
        raise ModelSourceError(f"the model factory failed on the meta device ({one_line(exc)}): out-of-core "
                               "conversion builds the architecture without weights and reads them from the "
                               "checkpoint, so build it from a config (transformers: "
                               "AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))), not with "
                               "from_pretrained or code that reads tensor values") from exc


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, list[str]]]:
    """Shared (tied) tensors stored once, as `safetensors.torch.save_model` does: the sorted-first name is kept.

    Meta tensors have no storage to compare, so sharing is read from object identity (tied parameters
    are the same object). Returns (kept state, metadata removed->kept, aliases name->all its tied names).
    """
    groups: dict[int, list[str]] = {}
    for name, t in state.items():
        groups.setdefault(id(t), []).append(name)
    kept: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}
    aliases: dict[str, list[str]] = {}
    keep_of = {}
    for names in groups.values():
        keep = sorted(names)[0]
        for n in names:
            aliases[n] = sorted(names)
            keep_of[n] = keep
            if n != keep:
                metadata[n] = keep
    for name, t in state.items():
        if keep_of[name] == name:
            kept[name] = t
    return kept, metadata, aliases


def convert_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, config: MoEConfig | None = None,
                       *, model: nn.Module | Callable[[], nn.Module], source: ModelSource | str | None = None,
                       force: bool = False, fast: bool = True,
                       reader_factory: Callable[[Path], Checkpoint] = open_checkpoint,
                       example_inputs: tuple = (), example_kwargs: dict[str, Any] | None = None,
                       ) -> ConversionResult:
    """Upcycle the dense `checkpoint` into `out_dir` (plan.json + model.safetensors) layer by layer.

    `checkpoint`: a .safetensors file, a sharded checkpoint's model.safetensors.index.json, or the
    folder holding either (see `open_checkpoint`).
    `model`: the dense model built on the meta device, or a factory called under
    `torch.device("meta")` (no weights are allocated); it must match the checkpoint's names,
    shapes and dtypes. `source`: how `moeify.load` rebuilds the dense model (recorded in the plan;
    a model file is copied next to it), a `ModelSource` or its spec as `moeify.convert` takes it
    (`model.py[:NAME]`, `package.module:factory`). `fast=False` builds every layer with `build_moe_layer`
    even where raw copies would do (the tests compare both). `example_inputs` / `example_kwargs`: run once
    on the meta device to see which optional inputs the model leaves None (`observe_none_inputs`), as the
    in-memory conversion does on its example: a decoder-only XGLM or BartForCausalLM layer takes
    encoder_hidden_states, which traced as a tensor hides the FFN or makes it required. A model whose
    forward needs values (`.item()`) cannot run there: the report notes it, and those inputs trace as
    given. Returns the `ConversionResult` whose `.model` lives on the meta device.
    """
    cfg = config or MoEConfig()
    if source is not None and not isinstance(source, ModelSource):
        source = ModelSource.parse(source).check(defines=True)
    dense = _meta_model(model)
    # copy_noise needs real weights (noise std): the structure is the same as with plain copy
    struct_cfg = dataclasses.replace(cfg, init="copy") if cfg.init == "copy_noise" else cfg
    none_inputs, why = _none_inputs_on_meta(dense, tuple(example_inputs), dict(example_kwargs or {}))
    result = convert(dense, struct_cfg, verify=False, none_inputs=none_inputs)
    result.config = cfg
    result.report.function_preserving = function_preserving(cfg)
    if why:
        result.report.notes.append(why)
    if source is not None:
        result.source = source.to_dict()
    found, _, _ = find_regions(dense, result.none_inputs)
    region_of = {f.key: f for f in found}
    layers = moe_layers(result.model)

    with reader_factory(Path(checkpoint)) as reader:
        # every check (file size, names, dtypes, shapes) is done here, before the output is created
        planned = _plan(reader, result, dense, region_of, layers, cfg, fast)

        def fill(tmp: Path) -> None:
            _write(reader, tmp / "model.safetensors", planned, dense, cfg)
            write_plan(result, tmp)

        write_atomically(out_dir, fill, force=force)
    return result


def _none_inputs_on_meta(dense: nn.Module, args: tuple, kwargs: dict[str, Any]
                         ) -> tuple[dict[str, frozenset[str]] | None, str | None]:
    """`observe_none_inputs` of the meta-device model on the example moved there: (what it saw, None), or
    (None, why not) when the forward cannot run on the meta device; (None, None) without an example."""
    if not (args or kwargs):
        return None, None
    args, kwargs = pytree.tree_map_only(torch.Tensor, lambda t: t.to("meta"), (args, kwargs))
    try:
        return observe_none_inputs(dense, args, kwargs), None
    except Exception as exc:  # noqa: BLE001 - whatever the forward raises on meta tensors
        return None, (f"the example inputs did not run on the meta device ({one_line(exc, limit=120)}): optional "
                      "inputs were traced as tensors; convert in memory if an FFN is missing")


def _plan(reader: Checkpoint, result: ConversionResult, dense: nn.Module, region_of: dict,
          layers: dict[str, nn.Module], cfg: MoEConfig, fast: bool) -> _Plan:
    state, metadata, aliases = _dedupe(result.model.state_dict(keep_vars=True))
    dense_aliases = _dedupe(dense.state_dict(keep_vars=True))[2]
    regions = result.report.regions  # in build order: the order the generator is consumed in
    build_order = [r.name for r in regions]
    for name in build_order:
        if name not in layers:
            raise SerializationError(f"out-of-core conversion: layer {name} of the report is not in the model")

    def layer_of(key: str) -> str | None:
        for name in layers:
            if key.startswith(name + "."):
                return name
        return None

    # slots in state-dict order; MoE slots are then filled in build order (same positions)
    units: list[_Unit] = []
    seen: set[str] = set()
    for key in state:
        owner = layer_of(key)
        if owner is None:
            units.append(_Unit("dense", key, [key]))
        elif owner not in seen:
            seen.add(owner)
            units.append(_Unit("moe", owner, []))
    moe_iter = iter(build_order)
    for unit in units:
        if unit.kind == "moe":
            unit.name = next(moe_iter)
            local = [k[len(unit.name) + 1:] for k in state if k.startswith(unit.name + ".")]
            unit.found = region_of[tuple(sorted(next(r.linears for r in regions if r.name == unit.name)))]
            unit.fast = fast and _fast_ok(cfg, local, unit.found, dense)
            if unit.fast:  # file order = the order the values are produced in
                local = [f"experts.{k}" for k in FAST_EXPERT_KEYS if f"experts.{k}" in local] + \
                        [k for k in FAST_ROUTER_KEYS if k in local]
            unit.keys = [f"{unit.name}.{k}" for k in local]

    entries = [(key, state[key].dtype, tuple(state[key].shape)) for unit in units for key in unit.keys]
    sources = {}  # dense tensors copied through, and the dense FFN tensors every MoE layer is built from
    for unit in units:
        if unit.kind == "dense":
            sources[unit.name] = _source_name(reader, unit.name, state[unit.name], aliases.get(unit.name, [unit.name]))
        else:
            for name, t in _region_tensors(unit.found, dense).items():
                sources[name] = _source_name(reader, name, t, dense_aliases.get(name, [name]))
    return _Plan(units, entries, metadata, sources)


def _write(reader: Checkpoint, path: Path, plan: _Plan, dense: nn.Module, cfg: MoEConfig) -> None:
    writer = StreamingWriter(path, plan.entries, plan.metadata or None)
    generator = torch.Generator().manual_seed(cfg.seed)
    try:
        for unit in plan.units:
            if unit.kind == "dense":
                writer.copy_range(unit.name, reader, plan.sources[unit.name])
            elif unit.fast:
                _write_fast(writer, reader, unit, plan.sources, cfg, generator)
            else:
                _write_built(writer, reader, unit, plan.sources, dense, cfg, generator)
    except BaseException:
        writer.close(check=False)  # the error in flight is the cause; the caller removes the half-written output
        raise
    writer.close()


def _same_bytes(reader: Checkpoint, a: str, b: str) -> bool:
    """Whether tensors `a` and `b` hold the same dtype and bytes, read COPY_CHUNK at a time (the whole tensors,
    an embedding and its tied head, would be two copies of the model's largest tensor in memory)."""
    if reader.dtype(a) != reader.dtype(b) or reader.shape(a) != reader.shape(b):
        return False
    (fa, (pa, end)), (fb, (pb, _)) = [(reader.reader_for(n), reader.reader_for(n).span(n)) for n in (a, b)]
    while pa < end:
        size = min(COPY_CHUNK, end - pa)
        chunk_a, chunk_b = os.pread(fa.fileno(), size, pa), os.pread(fb.fileno(), size, pb)
        for name, f, pos, chunk in ((a, fa, pa, chunk_a), (b, fb, pb, chunk_b)):
            if len(chunk) != size:  # the file shrank after it was opened
                raise f.truncation_error(name, pos + len(chunk))
        if chunk_a != chunk_b:
            return False
        pa, pb = pa + size, pb + size
    return True


def _source_name(reader: Checkpoint, key: str, meta: torch.Tensor, names: list[str]) -> str:
    """The checkpoint's name of `key` (or of a tensor tied to it), checked against the meta model's `meta`."""
    present = [name for name in names if name in reader.entries]
    src = present[0] if present else None
    for other in present[1:]:  # tied in the model, stored apart: one value would silently replace the other
        if not _same_bytes(reader, src, other):
            raise SerializationError(
                f"{reader.path}: the model ties {src} and {other} (one tensor), but the checkpoint holds different "
                "values for them: build the model untied, as the checkpoint was trained (transformers: "
                "tie_word_embeddings=False), or pass a checkpoint of this model")
    if src is None:
        prefix = _prefix_hint(reader, key)
        if prefix is not None:
            raise SerializationError(f"checkpoint {reader.path} has no tensor {key!r} that the model needs, but "
                                     f"{prefix}: build the model class the checkpoint was saved from (a base model "
                                     "against a task model: GPT2Model and GPT2LMHeadModel, BertModel and "
                                     "BertForMaskedLM)")
        raise SerializationError(f"checkpoint {reader.path} has no tensor {key!r} that the model needs: pass the "
                                 "dense model's checkpoint (saved from the same architecture, e.g. with "
                                 "safetensors.torch.save_model)")
    if reader.dtype(src) != meta.dtype or reader.shape(src) != tuple(meta.shape):
        raise SerializationError(
            f"{reader.path}: {src} is {reader.dtype(src)} {list(reader.shape(src))} but the model built on meta has "
            f"{meta.dtype} {list(meta.shape)}: build the model with the checkpoint's sizes and dtype, or pass this "
            "model's checkpoint")
    return src


def _prefix_hint(reader: Checkpoint, key: str) -> str | None:
    """How the checkpoint's names differ from the model's by a leading prefix, when they do for `key`:
    Hugging Face base and task models name the same tensors with and without `transformer.` / `bert.`."""
    parts = key.split(".")
    for i in range(1, len(parts)):  # the model's name has a prefix the checkpoint's lacks
        if ".".join(parts[i:]) in reader.entries:
            return f"it has {'.'.join(parts[i:])!r}: its names lack the model's prefix {'.'.join(parts[:i]) + '.'!r}"
    longer = next((name for name in reader.entries if name.endswith(f".{key}")), None)
    if longer is not None:  # the checkpoint's names have a prefix the model's lack
        return f"it has {longer!r}: its names carry a prefix {longer[:-len(key)]!r} the model's lack"
    return None


def _linear_names(found) -> dict[str, str]:
    return {role: _join(found.unit.path, name) for role, name in found.region.linears.items()}


def _region_tensors(found, dense: nn.Module) -> dict[str, torch.Tensor]:
    """The dense tensors a region's MoE layer is made from, by full name: what both write paths read."""
    return {f"{full}.{k}": p for full in _linear_names(found).values()
            for k, p in dense.get_submodule(full).named_parameters(recurse=False)}


def _fast_ok(cfg: MoEConfig, local: list[str], found, dense: nn.Module) -> bool:
    allowed = {f"experts.{k}" for k in FAST_EXPERT_KEYS} | set(FAST_ROUTER_KEYS)
    if cfg.init != "copy" or not set(local) <= allowed or "gate_up" in found.region.linears:
        return False  # (a fused gate/up Linear is split row-wise: the built path does that)
    mods = [dense.get_submodule(n) for n in _linear_names(found).values()]
    return all(type(m) is nn.Linear for m in mods) and len({m.weight.dtype for m in mods}) == 1


def _write_fast(writer: StreamingWriter, reader: Checkpoint, unit: _Unit, sources: dict[str, str],
                cfg: MoEConfig, generator: torch.Generator) -> None:
    names = _linear_names(unit.found)
    gated = unit.found.region.kind == "gated"
    src = {"w1_EFD": (names["gate"] if gated else names["fc1"], "weight"),
           "w2_EDF": (names["down"] if gated else names["fc2"], "weight"),
           "w3_EFD": (names.get("up"), "weight"),
           "b1_EF": (names["gate"] if gated else names["fc1"], "bias"),
           "b2_ED": (names["down"] if gated else names["fc2"], "bias"),
           "b3_EF": (names.get("up"), "bias")}
    router = None
    for key in unit.keys:
        local = key[len(unit.name) + 1:]
        if local.startswith("experts."):
            linear, what = src[local.removeprefix("experts.")]
            writer.copy_range(key, reader, sources[f"{linear}.{what}"], repeat=cfg.num_experts)
        else:
            if router is None:  # built after the experts, as build_moe_layer does (copy draws nothing)
                w1 = sources[f"{src['w1_EFD'][0]}.weight"]
                router = make_router(cfg, reader.shape(w1)[1], generator, reader.dtype(w1))
            writer.write_tensor(key, router.get_parameter(local.removeprefix("router.")))
    if router is None:
        raise SerializationError(f"{unit.name}: no router parameters to write; the fast path expects a router")


def _write_built(writer: StreamingWriter, reader: Checkpoint, unit: _Unit, sources: dict[str, str],
                 dense: nn.Module, cfg: MoEConfig, generator: torch.Generator) -> None:
    found = unit.found
    modules = {}
    for name in found.region.linears.values():
        full = _join(found.unit.path, name)
        sub = copy.deepcopy(dense.get_submodule(full))
        values = {k: reader.get_tensor(sources[f"{full}.{k}"]) for k, _ in sub.named_parameters(recurse=False)}
        sub.load_state_dict(values, assign=True, strict=False)
        modules[name] = sub
    layer = region_builder(cfg, generator)(found.region, _Modules(modules))  # as `convert` builds it
    del modules
    state = layer.state_dict()
    for key in unit.keys:
        writer.write_tensor(key, state[key[len(unit.name) + 1:]])
