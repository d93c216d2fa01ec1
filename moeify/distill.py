"""Distil a (sparse) teacher back into a dense student, as in Switch Transformers §4.

Shape legend: T tokens (all leading dims flattened), V classes (vocabulary).

    loss = teacher_weight * soft(student, teacher) + (1 - teacher_weight) * CE(student, labels)

`soft` is ``KL(p_teacher^tau || p_student^tau) * tau^2`` (Hinton et al.; `soft_loss="kl"`) or the
cross-entropy to the teacher's soft targets (`"ce"`: the same gradient, plus the teacher's entropy).
Switch used teacher_weight 0.25 with the student initialised from the dense checkpoint the teacher
was upcycled from (`moeify.distill` copies it; the caller's model is not touched).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moeify.errors import ConfigError, DistillError
from moeify.losses import aux_loss

# labels that mark a position to leave out (padding), as F.cross_entropy and Hugging Face models take them
IGNORE_INDEX = -100

SOFT_LOSSES = ("kl", "ce")


@dataclass(frozen=True)
class DistillConfig:
    """How the student's loss mixes the teacher's soft targets with the hard labels."""

    teacher_weight: float = 0.25
    temperature: float = 1.0
    soft_loss: str = "kl"
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0

    def __post_init__(self) -> None:
        def fail(name, fix):
            raise ConfigError(f"DistillConfig.{name}={getattr(self, name)!r} is invalid: {fix}")

        if not (isinstance(self.teacher_weight, (int, float)) and 0.0 <= self.teacher_weight <= 1.0):
            fail("teacher_weight", "use a number in [0, 1] (Switch used 0.25)")
        tau = self.temperature
        if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
            fail("temperature", "use a finite number > 0 (1.0 keeps the teacher's distribution)")
        if self.soft_loss not in SOFT_LOSSES:
            fail("soft_loss", f"choose one of {', '.join(SOFT_LOSSES)}")
        if not self.lr > 0:
            fail("lr", "use a learning rate > 0")
        if self.weight_decay < 0:
            fail("weight_decay", "use a number >= 0")
        if self.grad_clip is not None and not self.grad_clip > 0:
            fail("grad_clip", "use a number > 0, or None for no clipping")


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      config: DistillConfig | None = None) -> torch.Tensor:
    """The mixed loss for logits of shape (..., V) and integer labels of shape (...), mean over the labelled
    tokens: positions labelled IGNORE_INDEX (-100, padding, as F.cross_entropy and Hugging Face use it) count in
    neither term; with none labelled the loss is 0."""
    cfg = config or DistillConfig()
    if student_logits.shape != teacher_logits.shape:
        raise ConfigError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                          f"{tuple(teacher_logits.shape)} differ: the two models must share the output vocabulary")
    if labels.shape != student_logits.shape[:-1]:
        raise ConfigError(f"labels {tuple(labels.shape)} do not match the logits' leading shape "
                          f"{tuple(student_logits.shape[:-1])}")
    V = student_logits.shape[-1]
    s_TV = student_logits.reshape(-1, V).float()
    t_TV = teacher_logits.reshape(-1, V).float().detach()
    labels_T = labels.reshape(-1)
    keep_T = labels_T != IGNORE_INDEX
    if not bool(keep_T.all()):
        if not bool(keep_T.any()):
            return s_TV.sum() * 0.0  # nothing labelled: no loss, and a graph to call backward on
        s_TV, t_TV, labels_T = s_TV[keep_T], t_TV[keep_T], labels_T[keep_T]
    hard = F.cross_entropy(s_TV, labels_T)
    if cfg.teacher_weight == 0:
        return hard
    tau = cfg.temperature
    log_ps_TV = F.log_softmax(s_TV / tau, dim=-1)
    log_pt_TV = F.log_softmax(t_TV / tau, dim=-1)
    soft_ce = -(log_pt_TV.exp() * log_ps_TV).sum(-1).mean()
    if cfg.soft_loss == "kl":
        soft_ce = soft_ce - (-(log_pt_TV.exp() * log_pt_TV).sum(-1).mean())  # KL = CE - H(teacher)
    # tau^2 keeps the soft term's gradient scale independent of the temperature (Hinton et al. 2015)
    return cfg.teacher_weight * tau * tau * soft_ce + (1.0 - cfg.teacher_weight) * hard


def distill(student: nn.Module, teacher: nn.Module, batches: Iterable[tuple], *, config: DistillConfig | None = None,
            lr_at: Callable[[int], float] | None = None, optimizer: torch.optim.Optimizer | None = None,
            on_step: Callable[[int, nn.Module, float], None] | None = None, inplace: bool = False) -> nn.Module:
    """Train a copy of `student` on `(inputs, labels)` batches against `teacher`'s soft targets.

    `inputs` is a tensor, a tuple of forward arguments or a dict of keyword arguments; both models
    return logits of shape labels.shape + (V,), as a tensor or as the `.logits` of an output (Hugging
    Face models; a causal LM's labels are then the next tokens, aligned with the logits). The
    student's own MoE aux losses (if it has MoE layers) are added.
    `lr_at(step)` sets the learning rate per step (default: `config.lr` throughout); `on_step(step,
    student, loss)` is called after each step (e.g. to evaluate). Returns the trained student.
    """
    cfg = config or DistillConfig()
    student = student if inplace else copy.deepcopy(student)
    teacher_mode = teacher.training
    teacher.eval()  # the teacher's soft targets come from its inference behaviour (no dropout, eval capacity)
    opt = optimizer or torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    student.train()
    try:
        for step, batch in enumerate(batches):
            inputs, labels = _inputs_and_labels(step, batch)
            if isinstance(inputs, Mapping):  # keyword inputs ({"input_ids": ..., "attention_mask": ...})
                args, kwargs = (), dict(inputs)
            else:
                args, kwargs = (inputs if isinstance(inputs, tuple) else (inputs,)), {}
            if lr_at is not None:
                for group in opt.param_groups:
                    group["lr"] = lr_at(step)
            with torch.no_grad():
                teacher_logits = _logits(teacher(*args, **kwargs), "teacher")
            student_logits = _logits(student(*args, **kwargs), "student")
            loss = distillation_loss(student_logits, teacher_logits, labels, cfg) + aux_loss(student, dense_ok=True)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip is not None:
                nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
            opt.step()
            if on_step is not None:
                on_step(step, student, float(loss.detach()))
    finally:
        teacher.train(teacher_mode)
    return student


def _inputs_and_labels(step: int, batch: object) -> tuple[object, torch.Tensor]:
    """`batch` as (inputs, labels), refused in one line when it is not such a pair: a bare tensor would
    be unpacked row by row, its first row taken as the inputs and its second as the labels."""
    pair = isinstance(batch, (tuple, list)) and len(batch) == 2
    if pair and isinstance(batch[1], torch.Tensor):
        return batch[0], batch[1]
    if isinstance(batch, torch.Tensor):
        what = f"a tensor of shape {tuple(batch.shape)}"
    elif pair:
        what = f"a pair whose labels are a {type(batch[1]).__name__}, not a tensor"
    else:
        what = f"a {type(batch).__name__}" + (f" of {len(batch)}" if isinstance(batch, (tuple, list)) else "")
    raise DistillError(f"distill's batch {step} is {what}: give (inputs, labels) pairs, such as zip(inputs, labels) "
                       "or a DataLoader over TensorDataset(inputs, labels)")


def _logits(output: object, which: str) -> torch.Tensor:
    """A model's logits: the output itself, or its `.logits` (a Hugging Face ModelOutput)."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise DistillError(f"the {which} returns a {type(output).__name__}: distill needs its logits, a tensor or an "
                       "output with .logits (as Hugging Face models return)")
