"""Collect the auxiliary losses that each MoE layer recorded during the model's last forward, and
leave padding out of them (`token_mask`)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from moeify.errors import TokenMaskError, expect_type
from moeify.moe.layer import MoELayer
from moeify.moe.router import TokenMask


def aux_losses(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """Per layer, the weighted aux losses of the last forward: {layer name: {loss name: tensor}}."""
    expect_type(model, nn.Module, "the model", "pass the converted model (result.model)")
    return {name: dict(m.aux.last_losses) for name, m in model.named_modules() if isinstance(m, MoELayer)}


def aux_loss(model: nn.Module, *, dense_ok: bool = False) -> torch.Tensor:
    """Weighted sum of every MoE layer's aux losses from the last forward (a scalar with grad).

    Add it to the task loss. Zero (without grad) when the model has no MoE layer, all coefficients
    are zero, or the forward ran with autograd off (`torch.no_grad()`, as in inference): routers then
    compute no losses, since nothing can train on them. A model without MoE layers warns (the dense
    model passed by mistake) unless `dense_ok`: a loop that trains dense models too (a dense baseline,
    a dense student distilled from the MoE).
    """
    expect_type(dense_ok, bool, "dense_ok", "pass True or False")
    total = None
    layers = aux_losses(model)
    if not layers and not dense_ok:
        warnings.warn(f"moeify.aux_loss: {type(model).__name__} has no MoE layer, so its aux loss is 0; pass the "
                      "converted model (result.model), or dense_ok=True in a loop that trains dense models too",
                      UserWarning, stacklevel=2)
    for losses in layers.values():
        for value in losses.values():
            total = value if total is None else total + value
    if total is None:
        param = next(model.parameters(), None)
        return torch.zeros((), device=None if param is None else param.device)
    return total


def _encoder_and_decoder(model: nn.Module, layers: dict[str, MoELayer]) -> tuple[str, str] | None:
    """The names of an encoder-decoder's two stacks under `model` (Hugging Face's get_encoder() and
    get_decoder(), else `encoder` and `decoder` children) when both hold MoE layers; else None."""
    stacks: tuple[object, object] = (getattr(model, "encoder", None), getattr(model, "decoder", None))
    if callable(getattr(model, "get_encoder", None)) and callable(getattr(model, "get_decoder", None)):
        try:
            stacks = (model.get_encoder(), model.get_decoder())  # a decoder-only model returns itself as encoder
        except Exception:  # noqa: BLE001 - a model's own accessor; without it there are no stacks to name
            return None
    names = {id(m): name for name, m in model.named_modules()}
    encoder, decoder = (names.get(id(m)) if isinstance(m, nn.Module) else None for m in stacks)
    if not encoder or not decoder or encoder.startswith(f"{decoder}.") or decoder.startswith(f"{encoder}."):
        return None
    holds = [any(name.startswith(f"{stack}.") for name in layers) for stack in (encoder, decoder)]
    return (encoder, decoder) if all(holds) else None


@contextmanager
def token_mask(model: nn.Module, mask: torch.Tensor) -> Iterator[None]:
    """Within the block, the MoE layers under `model` leave the tokens where `mask` is 0 (padding) out of
    their aux losses, router statistics and expert capacity:

        with moeify.token_mask(model, batch["attention_mask"]):
            out = model(**batch)
        loss = out.loss + moeify.aux_loss(model)

    Padding is still routed and computed (its outputs are the model's business, as with attention), but
    the load-balancing, z-, importance and load losses are over the counted tokens only, capacity
    (`capacity_factor`, expert choice) is sized for them and gives padding only the slots they leave,
    and `router_stats` counts them alone.

    `mask` (bool, or 0/1 of any dtype, such as an attention mask) has one entry per token of each MoE
    layer's input, in the order the layer flattens its leading dims (row-major: a (B, S) mask for a
    (B, S, D) input; a sequence-first layer needs the (S, B) mask). Every MoE layer under `model` must see
    that many tokens, laid out as the mask when the layer's input has as many leading dims (a (B, S)
    mask given to a sequence-first (S, B, D) layer is refused), or its forward raises `TokenMaskError`:
    mask an encoder-decoder's two stacks apart, `token_mask(model.encoder, src_mask)` and
    `token_mask(model.decoder, tgt_mask)`; given a model whose encoder and decoder both hold MoE layers,
    it raises at once (at equal lengths the decoder would take the encoder's mask unnoticed). A
    flattened (B*S,) mask cannot be told apart from its order.

    The backward may run after the block: a forward that activation checkpointing recomputes there
    uses the mask of the layer's last forward (run each forward's backward before the next forward, as
    training loops do). A copy or pickle of the model made inside the block carries no mask.
    """
    if not isinstance(model, nn.Module) and isinstance(getattr(model, "model", None), nn.Module):
        model = model.model  # a ConversionResult
    if not isinstance(mask, torch.Tensor):
        raise TokenMaskError(f"token_mask takes a tensor, not {type(mask).__name__}: pass the batch's attention "
                             "mask (1 for tokens, 0 for padding)")
    if mask.is_meta or mask.is_complex():
        raise TokenMaskError(f"the token mask is a {'meta' if mask.is_meta else mask.dtype} tensor: pass the batch's "
                             "0/1 attention mask as a real tensor with values")
    if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
        raise TokenMaskError("the token mask holds values other than 0 and 1 (an additive attention mask?): pass "
                             "the 0/1 attention mask, 1 for tokens and 0 for padding")
    keep_T = mask.detach().reshape(-1).to(torch.bool, copy=True)  # a snapshot: later edits of `mask` change nothing
    layers = {name: m for name, m in model.named_modules() if isinstance(m, MoELayer)}
    if not layers:
        raise TokenMaskError(f"{type(model).__name__} holds no MoE layer: pass the converted model "
                             "(moeify.convert(...).model) or the submodule holding its MoE layers")
    stacks = _encoder_and_decoder(model, layers)
    if stacks is not None:  # one mask cannot fit both: at equal lengths the decoder took the encoder's silently
        encoder, decoder = stacks
        raise TokenMaskError(f"{type(model).__name__} has MoE layers in its encoder ({encoder}) and its decoder "
                             f"({decoder}), which see different tokens: mask each apart, token_mask(model.{encoder}, "
                             f"attention_mask) and token_mask(model.{decoder}, decoder_attention_mask)")
    with _masks_set(layers, lambda name: TokenMask(keep_T, name or "MoELayer", tuple(mask.shape))):
        yield


@contextmanager
def without_token_masks(model: nn.Module) -> Iterator[None]:
    """Every MoE layer under `model` counts every token within the block, whatever `token_mask` block
    encloses it (an ONNX export's checks run the model at other batch sizes)."""
    with _masks_set({name: m for name, m in model.named_modules() if isinstance(m, MoELayer)}, lambda name: None):
        yield


@contextmanager
def _masks_set(layers: dict[str, MoELayer], mask_of) -> Iterator[None]:
    """Give each layer's router `mask_of(its name)` within the block, and its own mask back after it."""
    previous = {name: layer.router.token_mask for name, layer in layers.items()}
    for name, layer in layers.items():
        layer.router.token_mask = mask_of(name)
    try:
        yield
    finally:
        for name, layer in layers.items():
            layer.router.token_mask = previous[name]
