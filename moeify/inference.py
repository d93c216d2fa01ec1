"""Open an onnxruntime session on the GPU when there is one, else on the CPU, and say which.

    session = moeify.inference.open_session("model.onnx")
    print(session.describe())          # e.g. "onnxruntime 1.31.1 on CUDAExecutionProvider"
    logits, = session.run({"idx": ids.numpy()})   # or onnxruntime's order: session.run(None, {...})
    session.get_inputs()                # the rest of the onnxruntime.InferenceSession, as it is

onnxruntime-gpu silently falls back to the CPU when CUDA cannot be loaded; `open_session` reads back
the providers the session really got, so `provider` is the truth, and `fallback_reason` says why
the preferred provider was not used. onnxruntime also logs that failed load (a red
"Failed to load library libonnxruntime_providers_cuda.so" line) through its process-wide default
logger, whatever the session options say; with `quiet` that logger is raised to FATAL while the
session is created.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from moeify.errors import ExportError, one_line

DEFAULT_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")
ORT_DEFAULT_SEVERITY = 2  # onnxruntime's default logger level (WARNING); it has no getter to read it back
ORT_FATAL = 4


@dataclass
class Session:
    session: Any  # onnxruntime.InferenceSession
    provider: str  # the execution provider the session actually runs on
    fallback_reason: str | None = None

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.session.get_inputs()]

    def run(self, first: Any, second: Any = None) -> list[Any]:
        """The outputs (a list of arrays) for the inputs `feeds` ({input name: array}): `run(feeds)`,
        `run(feeds, output_names)`, or in onnxruntime's own order, `run(output_names, feeds)` with None
        for every output."""
        feeds, names = (first, second) if isinstance(first, dict) else (second, first)
        if not isinstance(feeds, dict):
            raise ExportError(f"run() takes the inputs as a dict {{input name: array}} (the model's inputs: "
                              f"{', '.join(self.input_names)}), got {type(feeds).__name__}")
        return self.session.run(None if names is None else list(names), feeds)

    def __getattr__(self, name: str) -> Any:
        """Everything else of the onnxruntime session (get_inputs(), get_outputs(), run_with_iobinding ...)."""
        if name == "session":  # not set yet (copy, unpickling): no session to ask
            raise AttributeError(name)
        return getattr(self.session, name)

    def describe(self) -> str:
        import onnxruntime as ort

        text = f"onnxruntime {ort.__version__} on {self.provider}"
        return text + (f" ({self.fallback_reason})" if self.fallback_reason else "")


def open_session(model: str | os.PathLike | bytes, *, providers: Sequence[str] = DEFAULT_PROVIDERS,
                 threads: int | None = None, quiet: bool = True) -> Session:
    """An InferenceSession on the first of `providers` that works (CUDA first by default)."""
    import onnxruntime as ort

    if not isinstance(model, bytes) and not os.path.isfile(model):
        what = "is a directory, not an ONNX file" if os.path.isdir(model) else "does not exist"
        raise ExportError(f"ONNX model {model} {what}: export one with `moeify export`")
    available = set(ort.get_available_providers())
    wanted = [p for p in providers if p in available]
    if not wanted:
        raise ExportError(f"none of the execution providers {list(providers)} is available in this onnxruntime "
                          f"(it has {sorted(available)}): install onnxruntime-gpu for CUDA, or ask for the CPU")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if quiet:
        options.log_severity_level = 3  # the CUDA-provider load failure is reported via fallback_reason
    # a provider library that fails to load is logged (as an ERROR) by the default logger, not the session's
    silence_load = quiet and any(p != "CPUExecutionProvider" for p in wanted)
    source = model if isinstance(model, bytes) else os.fspath(model)
    if silence_load:
        ort.set_default_logger_severity(ORT_FATAL)
    try:
        session = ort.InferenceSession(source, options, providers=wanted)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own pybind types (InvalidProtobuf, Fail)
        where = "the model" if isinstance(model, bytes) else model
        if "external data" in str(exc).lower():
            fix = ("its weights are in a .data file beside the exported model (external data): keep the two files "
                   "together, under the names they were exported with, and open the model by its path")
        else:
            fix = "export it again with `moeify export`"
        raise ExportError(f"onnxruntime cannot load {where} ({one_line(exc)}): {fix}") from exc
    finally:
        if silence_load:
            ort.set_default_logger_severity(ORT_DEFAULT_SEVERITY)
    got = session.get_providers()[0]
    reason = None
    if providers and got != providers[0]:
        if providers[0] not in available:
            reason = f"{providers[0]} is not in this onnxruntime build"
        else:
            reason = (f"{providers[0]} could not be loaded (no GPU or CUDA/cuDNN libraries missing"
                      + ("; quiet=False shows onnxruntime's error" if silence_load else "") + ")")
    return Session(session, got, reason)


__all__ = ["DEFAULT_PROVIDERS", "Session", "open_session"]
