import pytest
import torch

from moeify import MoEConfig, aux_loss
from moeify.capture import trace
from moeify.convert import dense_ffn
from moeify.moe.build import build_moe_layer
from moeify.passes.find_ffn_regions import FindFFNRegions
from moeify.passes.insert_aux_loss import InsertAuxLoss
from moeify.passes.rewrite_to_moe import RewriteToMoE
from tests.test_rewrite_to_moe import TwoFFN


def test_inserts_one_aux_node_per_layer_and_losses_reach_the_router():
    gm = trace(TwoFFN())
    cfg = MoEConfig(num_experts=4, top_k=2, load_balance_coef=0.5, z_loss_coef=0.1)
    RewriteToMoE(FindFFNRegions()(gm).analysis, lambda r, g: build_moe_layer(cfg, dense_ffn(r, g)))(gm)
    result = InsertAuxLoss()(gm)
    aux_nodes = [n for n in gm.graph.nodes if n.meta.get("moeify", {}).get("role") == "aux"]
    assert len(aux_nodes) == 2 and len(result.changes) == 2
    assert all(n.args[0].meta["moeify"]["role"] == "router" for n in aux_nodes)
    again = InsertAuxLoss()(gm)  # idempotent: a second run skips, and says so
    assert not again.modified and len(again.skipped) == 2
    seen = {}
    for name in ("moe_fc1", "moe_up"):
        gm.get_submodule(f"{name}.router").register_forward_pre_hook(
            lambda m, args, name=name: seen.update({name: args[0].detach()}))
    gm(torch.randn(4, 8))
    loss = aux_loss(gm)
    # Switch eq. 4 (E * sum_i f_i P_i, top-2 assignments) and ST-MoE z-loss, from each router's input
    want = 0.0
    for name, x in seen.items():
        logits = x.double() @ gm.get_submodule(f"{name}.router.gate").weight.detach().double().T
        probs = logits.softmax(-1)
        chosen = probs.topk(2, dim=-1).indices
        f = torch.bincount(chosen.flatten(), minlength=4) / chosen.numel()
        want += 0.5 * 4 * (f * probs.mean(0)).sum().item() + 0.1 * logits.logsumexp(-1).pow(2).mean().item()
    assert len(seen) == 2 and loss.item() == pytest.approx(want, rel=1e-5)
    loss.backward()
    assert gm.get_submodule("moe_fc1.router.gate").weight.grad.abs().sum() > 0
