"""moeify.trainer.MoETrainer: transformers.Trainer with the MoE aux losses, against a plain training loop."""

from __future__ import annotations

import pytest
import torch

import moeify

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from moeify.trainer import MoETrainer  # noqa: E402 - after the skips


def _tiny_llama():
    torch.manual_seed(0)
    dense = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2)).eval()
    ids = torch.randint(0, 64, (1, 12))
    # every example the same sequence: however Trainer shuffles and groups them, each micro-batch is alike
    result = moeify.convert(dense, moeify.MoEConfig(num_experts=4, top_k=2, load_balance_coef=1.0),
                            example_inputs=(ids,), example_kwargs={"use_cache": False})
    return result.model, ids


def _trained(trainer_class, model, ids, tmp_path, batch, accumulation):
    data = [{"input_ids": ids[0], "labels": ids[0]} for _ in range(8)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation, use_cpu=True, report_to=[], save_strategy="no",
        lr_scheduler_type="constant", max_grad_norm=0.0, logging_strategy="no", disable_tqdm=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    trainer_class(model=model, args=args, train_dataset=data, optimizers=(optimizer, None)).train()
    return _snapshot(model)


def _plain_loop(model, ids, accumulation):
    """One SGD step: each micro-batch's (task loss + aux loss) / accumulation, summed in backward."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    batch = ids.expand(8 // accumulation, -1)
    for _ in range(accumulation):
        out = model(input_ids=batch, labels=batch, use_cache=False)
        ((out.loss + moeify.aux_loss(model)) / accumulation).backward()
    optimizer.step()
    return _snapshot(model)


class _AuxAddedAsIs(transformers.Trainer):  # the recipe the README gave before
    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kwargs)
        loss = loss + moeify.aux_loss(model)
        return (loss, outputs) if return_outputs else loss


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _restore(model, state):
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(state[n])


def _max_diff(a, b):
    return max((a[n] - b[n]).abs().max().item() for n in a)


@pytest.mark.parametrize("accumulation", [1, 4])
def test_moe_trainer_takes_the_plain_loops_step(tmp_path, accumulation):
    """Llama takes num_items_in_batch, so Trainer does not divide its loss by the micro-batch count; the aux
    loss added as it was counted 4 times over with 4 micro-batches (router gradient 1.76 against 0.48)."""
    model, ids = _tiny_llama()
    start = _snapshot(model)
    want = _plain_loop(model, ids, accumulation)
    moved = _max_diff(want, start)
    assert moved > 1e-3  # the step moved the weights, routers included
    assert max((want[n] - start[n]).abs().max().item() for n in want if "router" in n) > 1e-4
    _restore(model, start)
    got = _trained(MoETrainer, model, ids, tmp_path, 8 // accumulation, accumulation)
    assert _max_diff(got, want) < 1e-5 * max(1.0, moved)
    if accumulation > 1:
        _restore(model, start)
        naive = _trained(_AuxAddedAsIs, model, ids, tmp_path, 8 // accumulation, accumulation)
        assert _max_diff(naive, want) > 100 * _max_diff(got, want) + 1e-6
