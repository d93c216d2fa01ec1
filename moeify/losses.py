"""Collect the auxiliary losses that each MoE layer recorded during the model's last forward."""

from __future__ import annotations

import torch
from torch import nn

from moeify.moe.layer import MoELayer


def aux_losses(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """Per layer, the weighted aux losses of the last forward: {layer name: {loss name: tensor}}."""
    return {name: dict(m.aux.last_losses) for name, m in model.named_modules() if isinstance(m, MoELayer)}


def aux_loss(model: nn.Module) -> torch.Tensor:
    """Weighted sum of every MoE layer's aux losses from the last forward (a scalar with grad).

    Add it to the task loss. Zero (without grad) when the model has no MoE layer, all
    coefficients are zero, or the forward ran with autograd off (`torch.no_grad()`, as in
    inference): routers then compute no losses, since nothing can train on them.
    """
    total = None
    for losses in aux_losses(model).values():
        for value in losses.values():
            total = value if total is None else total + value
    if total is None:
        param = next(model.parameters(), None)
        return torch.zeros((), device=None if param is None else param.device)
    return total
