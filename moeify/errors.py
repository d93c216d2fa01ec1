"""Typed errors. Every error moeify raises derives from :class:`MoeifyError`.

Each message says what went wrong, where (module name, graph node or option), and how to fix it,
on one line, so the CLI can print it as is.
"""

from __future__ import annotations

import textwrap


class MoeifyError(Exception):
    """Root of every error moeify raises on purpose."""


class ConfigError(MoeifyError, ValueError):
    """A configuration value is invalid."""


class UnknownFieldError(ConfigError, TypeError):
    """A config was given a field it does not have (a TypeError too, as for any unknown keyword)."""


class CaptureError(MoeifyError):
    """The model (or a part of it) could not be captured as a graph."""


class TracedPathError(MoeifyError, TypeError):
    """A converted forward was called without an argument its trace was taken with (the dense forward
    does something else when it is None)."""


class NoFFNRegionError(MoeifyError):
    """No FFN region matched; the message names the nearest candidates and why they were refused."""


class PassError(MoeifyError):
    """A graph pass failed; the message names the pass and the passes that ran before it."""


class PreconditionError(PassError):
    """A pass was given a graph it cannot work on."""


class PostconditionError(PassError):
    """A pass produced a graph that breaks its own contract."""


class VerificationError(MoeifyError):
    """The converted model does not compute what the dense model computed."""


class ModelSourceError(MoeifyError):
    """A model file or factory could not be loaded (missing file, missing function, it raised)."""


class ExampleInputsError(MoeifyError, ValueError):
    """The example inputs do not run on the dense model."""


class CheckpointingError(MoeifyError, RuntimeError):
    """The MoE layers ran under a gradient checkpointing that their aux losses cannot train through."""


class SerializationError(MoeifyError):
    """A saved conversion could not be written or read."""


class ExportError(MoeifyError):
    """An ONNX export was refused or failed its check."""


class DistributedError(MoeifyError):
    """Expert parallelism was set up wrongly (sizes, process groups)."""


class DistillError(MoeifyError, ValueError):
    """A distillation batch is not an (inputs, labels) pair."""


class TransformError(MoeifyError, RuntimeError):
    """An MoE layer ran under a torch.func transform it cannot support (vmap: routing sizes each expert's
    batch from the data)."""


class TokenMaskError(MoeifyError, ValueError):
    """A token mask does not fit the tokens an MoE layer saw (see `moeify.token_mask`)."""


class ArgumentTypeError(MoeifyError, TypeError):
    """A public function was given an argument of the wrong kind (the model's factory for the model)."""


def expect_type(value: object, kind: type | tuple[type, ...], what: str, fix: str) -> None:
    """Raise ArgumentTypeError naming `what`, what it got and `fix` unless `value` is a `kind`."""
    if not isinstance(value, kind):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise ArgumentTypeError(f"{what} must be a {names}, not {type(value).__name__}: {fix}")


def one_line(exc: BaseException, limit: int = 200) -> str:
    """`Type: message` of an exception moeify did not raise, on one line: its first non-empty line, and
    the next one too when the first only announces it (ends with ':'), cut at a word within `limit`."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = " ".join(lines[:2]) if len(lines) > 1 and lines[0].endswith(":") else (lines[0] if lines else "")
    return textwrap.shorten(f"{type(exc).__name__}: {text}", width=limit, placeholder=" ...")
