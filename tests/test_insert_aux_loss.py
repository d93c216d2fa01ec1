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


class SharedDepth(torch.nn.Module):
    """One FFN applied at every depth (weights shared across layers)."""

    def __init__(self, depth: int = 3):
        super().__init__()
        self.fc1, self.act, self.fc2 = torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8)
        self.depth = depth

    def forward(self, x):
        for _ in range(self.depth):
            x = x + self.fc2(self.act(self.fc1(x)))
        return x


def test_a_layer_called_at_every_depth_sums_its_losses_over_the_calls():
    torch.manual_seed(0)
    gm = trace(SharedDepth())
    cfg = MoEConfig(num_experts=4, top_k=2, load_balance_coef=0.5, z_loss_coef=0.1)
    rewrite = RewriteToMoE(FindFFNRegions()(gm).analysis, lambda r, g: build_moe_layer(cfg, dense_ffn(r, g)))
    rewrite(gm)
    result = InsertAuxLoss()(gm)
    assert list(rewrite.installed) == ["moe"] and len(result.changes) == 1
    aux_nodes = [n for n in gm.graph.nodes if n.meta.get("moeify", {}).get("role") == "aux"]
    assert len(aux_nodes) == 3 and gm.get_submodule("moe.aux").calls_per_forward == 3
    inputs = []
    gm.get_submodule("moe.router").register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach()))
    x = torch.randn(5, 8)
    for _ in range(2):  # a second forward replaces the first one's records, it does not add to them
        inputs.clear()
        gm(x)
    loss = aux_loss(gm)
    want = 0.0  # each call's losses from its own router input (Switch eq. 4 + z-loss), summed
    weight = gm.get_submodule("moe.router.gate").weight.detach().double()
    for x_TD in inputs:
        logits = x_TD.double() @ weight.T
        probs = logits.softmax(-1)
        chosen = probs.topk(2, dim=-1).indices
        f = torch.bincount(chosen.flatten(), minlength=4) / chosen.numel()
        want += 0.5 * 4 * (f * probs.mean(0)).sum().item() + 0.1 * logits.logsumexp(-1).pow(2).mean().item()
    assert len(inputs) == 3 and loss.item() == pytest.approx(want, rel=1e-5)
    stats = gm.get_submodule("moe.aux").last_stats
    assert int(stats["num_tokens"]) == 15 and int(stats["tokens_per_expert"].sum()) == 30
