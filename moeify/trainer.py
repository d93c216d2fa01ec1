"""`MoETrainer`: a Hugging Face `transformers.Trainer` that also trains the MoE layers' auxiliary losses.

A Hugging Face model's `out.loss` is its task loss only, and `Trainer` optimises that alone: without
this the balancing loss, z-loss and Shazeer's losses are silently not trained.

    from moeify.trainer import MoETrainer
    trainer = MoETrainer(model=result.model, args=TrainingArguments(...), train_dataset=...)

Importing this module imports transformers (and Trainer needs accelerate: `pip install moeify[hf]`).
"""

from __future__ import annotations

from typing import Any

import transformers

from moeify.losses import aux_loss


class MoETrainer(transformers.Trainer):
    """`Trainer` whose training loss is the task loss plus `moeify.aux_loss(model)` of the same forward.

    Under gradient accumulation Trainer divides each micro-batch's loss by the number of micro-batches,
    unless the task loss is already normalised over the whole accumulated batch (a model that takes
    `num_items_in_batch`, as Llama and GPT-2 do, or a `compute_loss_func`): then it leaves the loss as
    it is. The aux loss of a micro-batch is a mean over that micro-batch, so it is divided by the
    number of micro-batches in that case, and weighs what it weighs without accumulation (added as it
    is, it counted that many times over)."""

    def compute_loss(self, model, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        aux = aux_loss(model)
        if self._task_loss_spans_accumulation(num_items_in_batch):
            aux = aux / self.current_gradient_accumulation_steps
        loss = loss + aux
        return (loss, outputs) if return_outputs else loss

    def _task_loss_spans_accumulation(self, num_items_in_batch: Any) -> bool:
        """Whether `training_step` leaves the loss undivided by the micro-batch count (its own rule)."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is not None:
            return bool(scaled)
        return bool((self.model_accepts_loss_kwargs and num_items_in_batch is not None)
                    or self.compute_loss_func is not None)


__all__ = ["MoETrainer"]
