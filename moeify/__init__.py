"""moeify: turn the dense FFNs of a PyTorch model into sparsely gated Mixture-of-Experts layers.

    import moeify
    result = moeify.convert(model, moeify.MoEConfig(num_experts=8, top_k=2), example_inputs=(x,))
    result.model, result.report
    loss = task_loss + moeify.aux_loss(result.model)
    with moeify.token_mask(result.model, attention_mask): ...   # padding left out of the aux losses
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import TYPE_CHECKING, Any

# The public names and the module each lives in. They load on first use (PEP 562), so `moeify --help`
# and the CLI's argument errors come before torch is imported, and a Ctrl-C while it loads is click's
# one-line "Aborted!" rather than a traceback from inside the import.
_PUBLIC = {
    "MoEConfig": "moeify.config", "ConversionResult": "moeify.convert", "convert": "moeify.convert",
    "moe_layers": "moeify.convert", "DistillConfig": "moeify.distill", "distill": "moeify.distill",
    "distillation_loss": "moeify.distill", "MoeifyError": "moeify.errors", "aux_loss": "moeify.losses",
    "aux_losses": "moeify.losses", "token_mask": "moeify.losses", "export_onnx": "moeify.onnx_export",
    "load": "moeify.serialization", "save": "moeify.serialization", "format_stats": "moeify.stats",
    "router_stats": "moeify.stats",
}
__all__ = ["ConversionResult", "DistillConfig", "MoEConfig", "MoeifyError", "aux_loss", "aux_losses", "convert",
           "distill", "distillation_loss", "export_onnx", "format_stats", "load", "moe_layers", "router_stats", "save",
           "token_mask"]  # the keys of _PUBLIC, spelled out for linters


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")  # `moeify.ooc.convert_checkpoint` after `import moeify`
    raise AttributeError(f"module 'moeify' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))


class _Package(types.ModuleType):
    """Importing a submodule sets it on its package; `moeify.convert` and `moeify.distill` stay the
    functions of those names (`from moeify.convert import ...` is unaffected)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if not (name in _PUBLIC and isinstance(value, types.ModuleType)):
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:  # what type checkers and IDEs see
    from moeify.config import MoEConfig
    from moeify.convert import ConversionResult, convert, moe_layers
    from moeify.distill import DistillConfig, distill, distillation_loss
    from moeify.errors import MoeifyError
    from moeify.losses import aux_loss, aux_losses, token_mask
    from moeify.onnx_export import export_onnx
    from moeify.serialization import load, save
    from moeify.stats import format_stats, router_stats

__version__ = "0.1.0"
