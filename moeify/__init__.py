"""moeify: turn the dense FFNs of a PyTorch model into sparsely gated Mixture-of-Experts layers.

    import moeify
    result = moeify.convert(model, moeify.MoEConfig(num_experts=8, top_k=2), example_inputs=(x,))
    result.model, result.report
    loss = task_loss + moeify.aux_loss(result.model)
    with moeify.token_mask(result.model, attention_mask): ...   # padding left out of the aux losses
"""

from moeify.config import MoEConfig
from moeify.convert import ConversionResult, convert, moe_layers
from moeify.distill import DistillConfig, distill, distillation_loss
from moeify.errors import MoeifyError
from moeify.losses import aux_loss, aux_losses, token_mask
from moeify.onnx_export import export_onnx
from moeify.serialization import load, save
from moeify.stats import format_stats, router_stats

__all__ = ["ConversionResult", "DistillConfig", "MoEConfig", "MoeifyError", "aux_loss", "aux_losses", "convert",
           "distill", "distillation_loss", "export_onnx", "format_stats", "load", "moe_layers", "router_stats", "save",
           "token_mask"]
__version__ = "0.1.0"
