"""A short fine-tune of the upcycled pretrained MiniLM on a tiny sentiment set shipped in
tests/data: the task loss plus moeify.aux_loss (over the unpadded tokens) must fall, and the routers
must receive gradient."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import load_example

import moeify

DATA = Path(__file__).parent / "data" / "sentiment.tsv"


def _examples() -> tuple[list[str], torch.Tensor]:
    rows = [line.split("\t") for line in DATA.read_text().splitlines() if line and not line.startswith("#")]
    return [text for _, text in rows], torch.tensor([int(label) for label, _ in rows])


@pytest.mark.slow  # ~3 CPU-minutes (72M parameters after upcycling, grouped_mm on CPU)
def test_converted_minilm_finetune_loss_falls():
    minilm = load_example("minilm")
    torch.manual_seed(0)
    texts, labels = _examples()
    ids, mask = minilm.example_inputs(texts)
    result = moeify.convert(minilm.build_model(), moeify.MoEConfig(num_experts=8, top_k=2, seed=0))
    model = result.model.train()
    head = torch.nn.Linear(model.config.hidden_size, 2)
    params = [*model.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=5e-5)
    order = torch.Generator().manual_seed(0)
    routers = [layer.router for layer in moeify.moe_layers(model).values()]
    losses, aux, router_grads = [], [], []
    for _ in range(30):
        batch = torch.randperm(len(texts), generator=order)[:16]
        with moeify.token_mask(model, mask[batch]):  # padding left out of the aux losses
            logits = head(minilm.mean_pooled(model, ids[batch], mask[batch]))
        task = F.cross_entropy(logits, labels[batch])
        extra = moeify.aux_loss(model)
        (task + extra).backward()
        router_grads.append(min(r.gate.weight.grad.abs().sum().item() for r in routers))
        opt.step()
        opt.zero_grad()
        losses.append(task.item())
        aux.append(extra.item())
    assert all(a > 0 for a in aux)  # load-balance and z losses were recorded on every step
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"MiniLM MoE fine-tune: task loss {first:.3f} -> {last:.3f}, aux {aux[0]:.4f} -> {aux[-1]:.4f}")
    assert last < 0.7 * first
    assert len(routers) == 6 and all(g > 0 for g in router_grads)  # every router got gradient on every step
