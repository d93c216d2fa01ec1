"""moeify.convert on the core examples x routers: function preservation, gradients, aux loss, training."""

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moeify
from moeify.errors import NoFFNRegionError, VerificationError
from tests.conftest import ROOT, enable_checkpointing, load_example

EXAMPLES = ["mlp", "gpt", "llama"]
ROUTERS = [dict(router="topk", top_k=2), dict(router="switch", top_k=1)]


def loss_of(out):
    return out.float().pow(2).mean()


@pytest.mark.parametrize("name", EXAMPLES)
@pytest.mark.parametrize("router", ROUTERS, ids=lambda r: r["router"])
def test_function_preserving_gradients_and_aux(name, router):
    ex = load_example(name)
    dense = ex.build_model()
    (x,) = ex.example_inputs()
    before = copy.deepcopy(dense.state_dict())
    result = moeify.convert(dense, moeify.MoEConfig(num_experts=4, **router), example_inputs=(x,))
    model = result.model
    # the caller's model is untouched
    assert all(torch.equal(before[k], v) for k, v in dense.state_dict().items())
    assert isinstance(model, type(dense))  # same class (owners get a subclass with the rewritten forward)
    # equal outputs at init, checked independently of the report
    model.eval(), dense.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), dense(x), atol=1e-5, rtol=1e-5)
    assert result.report.max_abs_diff <= 1e-5 and len(result.report.regions) == 2
    # one backward: router and every selected expert get gradients; aux loss positive and finite
    model.train()
    out = model(x)
    aux = moeify.aux_loss(model)
    assert torch.isfinite(aux) and aux.item() > 0
    (loss_of(out) + aux).backward()
    for name_, layer in moeify.moe_layers(model).items():
        assert layer.router.gate.weight.grad.abs().sum() > 0, name_
        used = layer.aux.last_stats["tokens_per_expert"] > 0
        grad_E = layer.experts.w1_EFD.grad.flatten(1).abs().sum(1)
        assert (grad_E[used] > 0).all(), name_
        assert (grad_E[~used] == 0).all(), name_


def test_no_ffn_region_names_nearest_candidates():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 4))
    with pytest.raises(NoFFNRegionError) as info:
        moeify.convert(model, moeify.MoEConfig(num_experts=2, top_k=1))
    assert "0: feeds" in str(info.value) and "Tanh" in str(info.value)


def test_selection_that_matches_nothing_is_an_error():
    dense = load_example("gpt").build_model()
    with pytest.raises(NoFFNRegionError, match="selected none"):
        moeify.convert(dense, moeify.MoEConfig(num_experts=2, top_k=1, targets=("nothing-here",)))


@pytest.mark.parametrize("broken", [2.0, float("nan")])
def test_verification_catches_a_broken_conversion(broken, monkeypatch):
    from moeify.passes import rewrite_to_moe

    ex = load_example("mlp")
    monkeypatch.setattr(rewrite_to_moe, "unflatten_tokens",
                        lambda y, x: broken * y.reshape(*x.shape[:-1], y.shape[-1]))
    with pytest.raises(VerificationError, match="dense model.s by (inf|[0-9])"):
        moeify.convert(ex.build_model(), moeify.MoEConfig(num_experts=2, top_k=1), example_inputs=ex.example_inputs())


class ScaledFFN(torch.nn.Module):
    """An FFN whose output is large (as mT5's logits) and, with `noise`, drawn at random (as ViT-MAE's mask)."""

    def __init__(self, scale: float = 1.0, noise: bool = False):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(16, 64), torch.nn.Linear(64, 16)
        self.scale, self.noise = scale, noise

    def forward(self, x):
        y = self.fc2(torch.nn.functional.gelu(self.fc1(x))) * self.scale
        return y + torch.rand_like(y) if self.noise else y


def test_verification_tolerance_scales_with_the_outputs():
    torch.manual_seed(0)
    x = torch.randn(64, 16)
    result = moeify.convert(ScaledFFN(scale=1e4), moeify.MoEConfig(num_experts=4, top_k=2), example_inputs=(x,))
    assert result.report.max_abs_diff > 1e-5  # float32 rounding at this scale: above atol, within rtol


def test_verification_runs_both_models_from_one_rng_state_and_restores_the_callers():
    torch.manual_seed(0)
    x, dense = torch.randn(8, 16), ScaledFFN(noise=True)
    state = torch.get_rng_state()
    result = moeify.convert(dense, moeify.MoEConfig(num_experts=4, top_k=2), example_inputs=(x,))
    assert result.report.max_abs_diff <= 1e-5
    assert torch.equal(torch.get_rng_state(), state)


def test_copy_noise_is_reported_not_function_preserving():
    ex = load_example("mlp")
    cfg = moeify.MoEConfig(num_experts=4, top_k=2, init="copy_noise", init_noise=0.05)
    result = moeify.convert(ex.build_model(), cfg,
                            example_inputs=ex.example_inputs())
    assert result.report.function_preserving is False and result.report.max_abs_diff > 0
    assert any("does not promise the dense function" in n for n in result.report.notes)


@pytest.mark.parametrize("factors, says", [
    ((1.0, None), "(tokens over an expert's capacity (capacity factor 1) are dropped)"),
    ((1.0, math.inf), "(in training, tokens over an expert's capacity (capacity factor 1) are dropped; evaluation "
                      "is dropless)"),
    ((None, 0.5), "(tokens over an expert's capacity (capacity factor 0.5) are dropped)")])
def test_the_capacity_note_names_the_mode_that_drops(factors, says):
    """With a dropless eval factor the note said tokens are dropped next to a figure measured in eval mode,
    where none are."""
    ex = load_example("gpt")
    train, evaluation = factors
    cfg = moeify.MoEConfig(num_experts=4, top_k=1, router="switch", capacity_factor=train,
                           eval_capacity_factor=evaluation)
    report = moeify.convert(ex.build_model(), cfg, example_inputs=ex.example_inputs()).report
    (note,) = [n for n in report.notes if "does not promise" in n]
    assert says in note and note.endswith("on the example inputs, in eval mode")


def test_report_counts_parameters():
    ex = load_example("gpt")
    dense = ex.build_model()
    r = moeify.convert(dense, moeify.MoEConfig(num_experts=4, top_k=2)).report
    d, f = 64, 256
    ffn = 2 * d * f + f + d
    assert r.params_before == sum(p.numel() for p in dense.parameters())
    assert r.params_after == r.params_before + 2 * (3 * ffn + 4 * d)  # +3 expert copies and a router per layer
    assert r.active_params_per_token == r.params_before + 2 * (ffn + 4 * d)  # top-2: one extra expert per layer


def test_training_loss_falls():
    ex = load_example("gpt")
    torch.manual_seed(0)
    model = moeify.convert(ex.build_model(vocab_size=32, d_model=32, n_layers=2, n_heads=2),
                           moeify.MoEConfig(num_experts=4, top_k=2, seed=0)).model
    g = torch.Generator().manual_seed(0)
    pattern = torch.randint(0, 32, (8,), generator=g)
    data = pattern.repeat(4, 6)  # periodic sequences: learnable
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        loss = ex.lm_loss(model(data), data)
        opt.zero_grad()
        (loss + moeify.aux_loss(model)).backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses[::8]


def test_two_regions_in_one_owner_are_reported_under_their_own_layers():
    from tests.test_rewrite_to_moe import TwoFFN

    x = torch.randn(3, 8)
    r = moeify.convert(TwoFFN(), moeify.MoEConfig(num_experts=2, top_k=1), example_inputs=(x,)).report
    assert [(reg.name, reg.linears) for reg in r.regions] == [("moe_fc1", ["fc1", "fc2"]), ("moe_up", ["up", "down"])]


@pytest.mark.parametrize("training", [False, True])
def test_new_layers_take_the_mode_of_the_model(example, training):
    """Without this a converted eval model (verify=False, or moeify.load) ran its MoE layers in training
    mode: expert dropout, router noise and train capacity active at inference."""
    ex = example("gpt")
    model = ex.build_model().train(training)
    result = moeify.convert(model, moeify.MoEConfig(num_experts=4, top_k=2), verify=False)
    assert {m.training for m in result.model.modules()} == {training}


def test_the_callers_module_modes_are_left_as_they_were(example):
    """Verification runs both models in eval mode; afterwards each module has its own mode back (a
    frozen part kept in eval inside a training model stays in eval)."""
    ex = example("gpt")
    model = ex.build_model().train()
    frozen = [m for name, m in model.named_modules() if name.endswith("ln_f") or name.endswith("wte")]
    for m in frozen:
        m.eval()
    before = {name: m.training for name, m in model.named_modules()}
    assert set(before.values()) == {True, False}
    moeify.convert(model, moeify.MoEConfig(num_experts=4, top_k=2), example_inputs=ex.example_inputs())
    assert {name: m.training for name, m in model.named_modules()} == before


def test_a_region_found_twice_is_kept_once_and_partial_overlaps_are_refused():
    from types import SimpleNamespace

    from moeify.convert import _distinct_regions

    def region(owner, *linears, how="fx: submodule"):
        return SimpleNamespace(owner=owner, key=tuple(sorted(linears)), unit=SimpleNamespace(how=how))

    first, again = region("a", "a.fc1", "a.fc2"), region("b", "a.fc1", "a.fc2", how="wired")
    other = region("d", "d.fc1")
    kept, skipped = _distinct_regions([first, again, other])
    assert (kept, skipped) == ([first, other], [])  # the same region found again is dropped without a word
    partner = region("c", "a.fc2", "c.up")  # shares fc2: converting either takes a Linear the other calls
    kept, skipped = _distinct_regions([first, again, partner, other])
    assert kept == [other]
    assert [s.where for s in skipped] == ["a", "c"]
    assert "also take part in the region a.fc2, c.up" in skipped[0].reason


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(x)))


class _Reused(torch.nn.Module):
    """ALBERT's shape: one block module run at every depth by a forward that does not trace."""

    def __init__(self):
        super().__init__()
        self.block = _Block()

    def forward(self, x):
        if x.sum() > 1e9:  # breaks symbolic tracing
            x = x * 0
        for _ in range(3):
            x = self.block(x)
        return x


def test_a_module_run_at_every_depth_sums_its_aux_losses_over_its_calls(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    cfg = moeify.MoEConfig(num_experts=4, top_k=2, load_balance_coef=0.5, z_loss_coef=0.1)
    result = moeify.convert(_Reused(), cfg, example_inputs=(x,))
    (region,) = result.report.regions
    assert region.calls_per_forward == 3 and "runs 3 times per forward" in region.notes[-1]
    moeify.save(result, tmp_path / "out")
    for model in (result.model, moeify.load(tmp_path / "out", model=_Reused()).model):
        for _ in range(2):  # the second forward's calls replace the first one's
            loss, want = _aux_loss_and_reference(model, lambda model=model: model(x))
            assert loss == pytest.approx(want, rel=1e-5)


def _aux_loss_and_reference(model, run) -> tuple[float, float]:
    """moeify.aux_loss after `run()` (one or more forwards of `model`, or of its `block` alone),
    against each of the layer's router calls since the last forward of `model` began: its Switch
    eq. 4 (coef 0.5) + z-loss (coef 0.1) from its own router input, summed."""
    layer = model.block.moe
    inputs = []
    hook = layer.router.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach()))
    try:
        run()
    finally:
        hook.remove()
    want = 0.0
    for x_TD in inputs[-3:]:
        logits = x_TD.double() @ layer.router.gate.weight.detach().double().T
        probs = logits.softmax(-1)
        f = torch.bincount(probs.topk(2, dim=-1).indices.flatten(), minlength=4) / (2 * len(x_TD))
        want += 0.5 * 4 * (f * probs.mean(0)).sum().item() + 0.1 * logits.logsumexp(-1).pow(2).mean().item()
    assert len(inputs) >= 3
    return moeify.aux_loss(model).item(), want


def test_a_module_run_at_every_depth_counts_its_calls_without_an_example_forward():
    """verify=False (and the out-of-core conversion) run no example forward: the first forward of the
    converted model still sums over all its calls, and teaches the layer its count for calls of the
    block made outside a forward of the model."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    cfg = moeify.MoEConfig(num_experts=4, top_k=2, load_balance_coef=0.5, z_loss_coef=0.1)
    model = moeify.convert(_Reused(), cfg, example_inputs=(x,), verify=False).model
    recorder = model.block.moe.aux
    assert recorder.calls_per_forward == 1
    loss, want = _aux_loss_and_reference(model, lambda: model(x))
    assert loss == pytest.approx(want, rel=1e-5) and recorder.calls_per_forward == 3
    # outside a forward of the model (a submodule called directly), every 3 calls make one forward
    y = x.clone()
    loss, want = _aux_loss_and_reference(model, lambda: [model.block(y) for _ in range(6)])
    assert loss == pytest.approx(want, rel=1e-5) and len(recorder._records) == 3
    model.block(y)  # the first call of the next 3 starts over
    assert len(recorder._records) == 1


class _LayerDrop(torch.nn.Module):
    """wav2vec2's and HuBERT's shape: training skips each layer with some probability (LayerDrop)."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([_Block(), _Block()])
        self.skip: set[int] = set()  # the layers this forward drops (drawn at random in the real models)

    def forward(self, x):
        for i, block in enumerate(self.blocks):
            if not (self.training and i in self.skip):
                x = block(x)
        return x


def test_a_layer_the_forward_skips_adds_no_loss_of_an_earlier_step():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    model = moeify.convert(_LayerDrop(), moeify.MoEConfig(num_experts=4, top_k=2), example_inputs=(x,)).model.train()
    model(x).square().mean().add(moeify.aux_loss(model)).backward()  # frees the step's graph
    assert [r.layer for r in moeify.router_stats(model)] == ["blocks.0.moe", "blocks.1.moe"]
    model.skip = {0}
    model(x)
    assert set(moeify.aux_losses(model)["blocks.0.moe"]) == set()  # not the first step's losses
    assert [r.layer for r in moeify.router_stats(model)] == ["blocks.1.moe"]
    loss = moeify.aux_loss(model)
    loss.backward()  # the first step's graph is not reached again
    want = sum(moeify.aux_losses(model)["blocks.1.moe"].values())
    assert loss.item() == pytest.approx(want.item())
    model.skip = set()
    model(x)  # the skipped layer reports again once it runs
    assert all(moeify.aux_losses(model).values())


def test_bf16_model_verifies_within_its_precision_and_a_real_difference_still_fails():
    from moeify.convert import output_diffs

    torch.manual_seed(0)
    dense = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 16)).bfloat16()
    x = torch.randn(32, 16).bfloat16()
    result = moeify.convert(dense, moeify.MoEConfig(num_experts=4, top_k=2), example_inputs=(x,))
    assert result.report.max_abs_diff is not None  # checked, and within bf16's rounding
    with torch.no_grad():
        y = dense(x)
    scaled = torch.nn.Sequential(dense, ScaleBy(1.1))  # off by 10%: some 13 bf16 epsilons
    assert output_diffs([y], scaled, (x,), {}, atol=1e-5)[1] > 0
    assert output_diffs([y], dense, (x,), {}, atol=1e-5)[1] <= 0


class ScaleBy(torch.nn.Module):
    def __init__(self, s: float) -> None:
        super().__init__()
        self.s = s

    def forward(self, x):
        return x * self.s


def test_example_inputs_may_be_one_bare_tensor_and_must_run():
    from moeify.errors import ExampleInputsError

    ex = load_example("mlp")
    (x,) = ex.example_inputs()
    result = moeify.convert(ex.build_model(), moeify.MoEConfig(num_experts=2, top_k=1), example_inputs=x)
    assert result.report.max_abs_diff <= 1e-5
    with pytest.raises(ExampleInputsError, match=r"example inputs do not run on the dense .*RuntimeError"):
        moeify.convert(ex.build_model(), moeify.MoEConfig(num_experts=2, top_k=1), example_inputs=(x[:, :3],))


@pytest.mark.parametrize("source, needle", [
    ("nosuch.py", "does not exist"), ("nosuch_pkg.models:build", "cannot import nosuch_pkg.models"),
    # read without running the file: it was accepted, and the saved output failed to load
    (str(ROOT / "examples" / "gpt.py") + ":nosuch", r"gpt.py defines no 'nosuch': name its factory after a colon "
                                                    r"\(defined there: .*build_model"),
    (123, r"source=123 is not a model spec: pass a string")])
def test_a_source_that_cannot_load_is_refused_at_convert(source, needle):
    from moeify.errors import ModelSourceError

    with pytest.raises(ModelSourceError, match=needle):
        moeify.convert(load_example("mlp").build_model(), moeify.MoEConfig(num_experts=2, top_k=1), source=source)


def test_a_meta_model_cannot_be_verified_and_says_what_to_do():
    from moeify.errors import ExampleInputsError

    with torch.device("meta"):
        dense = load_example("mlp").build_model()
    x = torch.randn(2, 16)
    with pytest.raises(ExampleInputsError, match="meta device.*convert-checkpoint"):
        moeify.convert(dense, moeify.MoEConfig(num_experts=2, top_k=1), example_inputs=(x,))
    assert moeify.convert(dense, moeify.MoEConfig(num_experts=2, top_k=1), verify=False).report.regions


@pytest.mark.parametrize("name, build", [("gpt", "build_model"), ("hf_causal_lm", "build_opt")])
def test_a_trained_model_deepcopies_and_pickles(name, build):
    """After a training step (the layers hold graph tensors of their losses); the rewritten owners'
    classes are made at conversion, so pickle rebuilds them from the dense class and the graph."""
    import pickle

    from moeify.distributed import sharding_annotations

    ex = load_example(name)
    model = moeify.convert(getattr(ex, build)(), moeify.MoEConfig(num_experts=4, top_k=2)).model
    x = torch.randint(0, 64, (2, 8))
    out = model(x)
    logits = out if isinstance(out, torch.Tensor) else out.logits
    (loss_of(logits) + moeify.aux_loss(model)).backward()
    for again in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert moeify.aux_loss(again) == 0  # a copy starts without the original's last forward
        model.eval(), again.eval()
        with torch.no_grad():
            want, got = model(x), again(x)
        want, got = (want, got) if isinstance(want, torch.Tensor) else (want.logits, got.logits)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert sharding_annotations(again) == sharding_annotations(model) != {}
        again.train()
        out = again(x)
        (loss_of(out if isinstance(out, torch.Tensor) else out.logits) + moeify.aux_loss(again)).backward()
        assert all(p.grad is not None for n, p in again.named_parameters() if "router" in n)
        model.train()


@pytest.mark.parametrize("reentrant", [False, True])
def test_reentrant_checkpointing_is_refused_not_trained_without_aux_losses(reentrant):
    """Reentrant checkpointing runs the layers with autograd off (no losses) and again in backward:
    the balancing losses would silently read 0 and never train the router."""
    from moeify.errors import CheckpointingError

    model = moeify.convert(load_example("hf_causal_lm").build_llama(), moeify.MoEConfig(num_experts=4, top_k=2)).model
    enable_checkpointing(model, reentrant)
    model.train()
    x = torch.randint(0, 64, (2, 8))
    loss = loss_of(model(x, use_cache=False).logits) + moeify.aux_loss(model)
    if reentrant:
        with pytest.raises(CheckpointingError, match="use_reentrant=False"):
            loss.backward()
    else:
        assert moeify.aux_loss(model).item() > 0
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "router" in n)


def test_transformer_encoder_with_a_padding_mask_converts_and_runs():
    """In eval with a padding mask, nn.TransformerEncoder's fused nested-tensor path read the removed
    linear1 (AttributeError); the dense model's fast path also zeroes padded positions, where the
    layer-by-layer path computes values, so verification compares with the fast path off."""
    torch.manual_seed(0)
    dense = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(16, 4, 64, dropout=0.0, batch_first=True),
                                        2, enable_nested_tensor=True).eval()
    x, pad = torch.randn(2, 5, 16), torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 3:] = True
    result = moeify.convert(dense, moeify.MoEConfig(num_experts=4, top_k=2), example_inputs=(x,),
                            example_kwargs={"src_key_padding_mask": pad})
    assert result.report.max_abs_diff <= 1e-5
    with torch.no_grad():
        got, want = result.model(x, src_key_padding_mask=pad), dense(x, src_key_padding_mask=pad)
    torch.testing.assert_close(got[~pad], want[~pad], atol=1e-5, rtol=1e-5)


class _TwoFFNs(torch.nn.Module):
    def __init__(self, d_out: int = 8) -> None:
        super().__init__()
        self.a = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
        self.b = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, d_out))

    def forward(self, x):
        return self.b(self.a(x))


def test_report_notes_untied_weights_heads_and_torchscript():
    tied = _TwoFFNs()
    tied.b[0].weight = tied.a[0].weight
    report = moeify.convert(tied, moeify.MoEConfig(num_experts=2, top_k=1)).report
    assert any("a.0 shares parameters with b.0.weight" in n for r in report.regions for n in r.notes)
    assert "note: a.moe: a.0 shares parameters" in str(report)
    head = moeify.convert(_TwoFFNs(d_out=3), moeify.MoEConfig(num_experts=2, top_k=1)).report
    assert [n for r in head.regions for n in r.notes if "it may be a head" in n] == \
        ["it maps 8 features to 3, which a transformer FFN does not: it may be a head; MoEConfig(exclude=...) keeps "
         "it dense"]
    scripted = _TwoFFNs()
    scripted.a = torch.jit.script(scripted.a)
    report = moeify.convert(scripted, moeify.MoEConfig(num_experts=2, top_k=1)).report
    assert [r.owner for r in report.regions] == ["b"]
    assert any(s.where == "a" and "TorchScript" in s.reason for s in report.skipped)


def test_a_dict_of_example_inputs_is_keyword_inputs():
    """example_inputs={"input_ids": ..., "attention_mask": ...} as a model file's example_inputs() may
    return it: iterated as a sequence, the model was called with the names (AttributeError on a str)."""
    import transformers

    from moeify.errors import ExampleInputsError

    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64)
    torch.manual_seed(0)
    bert = transformers.BertModel(config).eval()
    ids, mask = torch.randint(0, 64, (2, 7)), torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    result = moeify.convert(bert, moeify.MoEConfig(num_experts=4, top_k=2), example_inputs=inputs)
    assert result.report.max_abs_diff is not None and result.report.max_abs_diff < 1e-5
    with torch.no_grad():
        torch.testing.assert_close(result.model.eval()(**inputs).last_hidden_state, bert(**inputs).last_hidden_state,
                                   atol=1e-5, rtol=1e-5)
    with pytest.raises(ExampleInputsError, match="in one of them"):
        moeify.convert(bert, moeify.MoEConfig(num_experts=4, top_k=2), example_inputs=inputs,
                       example_kwargs={"token_type_ids": torch.zeros_like(ids)})


def test_arguments_of_the_wrong_kind_are_typed_errors_that_say_the_fix(tmp_path):
    """Likely mistakes (the factory for the model, result.model for the result, None for stats rows) raised
    AttributeError / TypeError from deep inside; each is one MoeifyError naming what to pass."""
    from moeify.errors import ArgumentTypeError, MoeifyError

    ex = load_example("mlp")
    cfg = moeify.MoEConfig(num_experts=2, top_k=1)
    result = moeify.convert(ex.build_model(), {"num_experts": 2, "top_k": 1}, example_inputs=ex.example_inputs())
    assert result.config == cfg  # a dict of the config's fields is taken as the config
    calls = [
        (lambda: moeify.convert(ex.build_model, cfg), r"convert's model must be a Module, not function: pass the "
                                                      r"dense model itself \(build_model\(\), not build_model\)"),
        (lambda: moeify.convert(ex.build_model(), "big"), "convert's config must be a MoEConfig or NoneType, not str"),
        (lambda: moeify.convert(ex.build_model(), cfg, verify="yes"), "verify must be a bool, not str"),
        (lambda: moeify.save(result.model, tmp_path / "a"), r"save's result must be a ConversionResult, not MLP: "
                                                            r"pass what moeify.convert returned, not its .model"),
        (lambda: moeify.save(result, 123), "save's out_dir must be a str or PathLike, not int"),
        (lambda: moeify.load(tmp_path / "a", model=ex.build_model), "load's model must be a Module or NoneType, not "
                                                                    "function"),
        (lambda: moeify.aux_loss("x"), r"the model must be a Module, not str: pass the converted model"),
        (lambda: moeify.router_stats(None), "the model must be a Module, not NoneType"),
        (lambda: moeify.format_stats(None), r"format_stats' rows must be a list or tuple, not NoneType: pass what "
                                            r"moeify.router_stats\(model\) returned"),
    ]
    for call, message in calls:
        with pytest.raises(ArgumentTypeError, match=message):
            call()
    assert issubclass(ArgumentTypeError, MoeifyError) and issubclass(ArgumentTypeError, TypeError)
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("head", ["ElectraForPreTraining", "ElectraForSequenceClassification"])
def test_task_heads_stay_dense_by_default(head):
    """ELECTRA's discriminator_predictions and classification head are Linear -> act -> Linear too; they were
    upcycled along with the encoder's FFNs. Outside the repeated blocks and mapping the width down, they now
    stay dense with a reason, and targets converts them where wanted."""
    import transformers

    torch.manual_seed(0)
    config = transformers.ElectraConfig(vocab_size=64, embedding_size=16, hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=4, intermediate_size=64, num_labels=3)
    dense = getattr(transformers, head)(config).eval()
    ids = torch.randint(0, 64, (2, 7))
    result = moeify.convert(dense, moeify.MoEConfig(num_experts=4, top_k=2), example_inputs=(ids,))
    head_name = {"ElectraForPreTraining": "discriminator_predictions", "ElectraForSequenceClassification":
                 "classifier"}[head]
    assert sorted(moeify.moe_layers(result.model)) == [f"electra.encoder.layer.{i}.output.moe" for i in range(2)]
    (skip,) = [s for s in result.report.skipped if s.where == head_name]
    assert skip.reason.startswith("a task head, not a block's FFN: outside the repeated blocks the other FFNs sit "
                                  "in, and maps width 32 to ")
    chosen = moeify.convert(dense, moeify.MoEConfig(num_experts=4, top_k=2, targets=("encoder", head_name)),
                            example_inputs=(ids,))
    assert f"{head_name}.moe" in moeify.moe_layers(chosen.model) and chosen.report.max_abs_diff <= 1e-5


def test_a_model_with_experts_of_its_own_says_what_was_converted():
    """Qwen2-MoE: its shared expert is a dense gated FFN and is upcycled; its own experts are not FFN regions.
    The report said nothing of them, and counted them all as active per token."""
    import transformers

    torch.manual_seed(0)
    config = transformers.Qwen2MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                                         shared_expert_intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                                         num_key_value_heads=2, num_experts=4, num_experts_per_tok=2)
    ids = torch.randint(0, 64, (2, 7))
    result = moeify.convert(transformers.Qwen2MoeForCausalLM(config).eval(), moeify.MoEConfig(num_experts=4, top_k=2),
                            example_inputs=(ids,), example_kwargs={"use_cache": False})
    assert list(moeify.moe_layers(result.model)) == ["model.layers.0.mlp.shared_expert.moe"]
    (note,) = [n for n in result.report.notes if "mixture-of-experts modules of its own" in n]
    assert "Qwen2MoeSparseMoeBlock" in note and "only its dense FFNs were converted" in note
    # the shared expert sits inside the model's own MoE block: named, with the way to keep it dense
    assert "1 sit inside its own MoE blocks (model.layers.0.mlp.shared_expert: shared experts" in note
    assert "MoEConfig(exclude=...) keeps them dense" in note
    plain = moeify.convert(load_example("gpt").build_model(), moeify.MoEConfig(num_experts=4, top_k=2), verify=False)
    assert not any("of its own" in n for n in plain.report.notes)


@dataclasses.dataclass
class _Out:
    logits: torch.Tensor


class _DataclassOut(nn.Module):
    def __init__(self, as_dataclass: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.mlp, self.as_dataclass = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8)), as_dataclass

    def forward(self, x):
        y = x + self.mlp(x)
        return _Out(y) if self.as_dataclass else "no tensor here"


def test_verification_compares_the_tensors_of_a_dataclass_output():
    """A dataclass output held no tensor the check could see: it compared nothing and reported 0 moved
    (0.632 in the audit's model). A capacity that drops tokens must show its real difference."""
    x = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(1))
    dense = _DataclassOut()
    cfg = moeify.MoEConfig(num_experts=4, top_k=1, router="switch", capacity_factor=0.25)
    result = moeify.convert(dense, cfg, example_inputs=(x,))
    with torch.no_grad():
        moved = (result.model.eval()(x).logits - dense(x).logits).abs().max().item()
    assert moved > 0.01 and result.report.max_abs_diff == pytest.approx(moved)


def test_an_output_with_no_tensor_is_refused_rather_than_checked_against_nothing():
    x = torch.randn(2, 4, 8)
    with pytest.raises(VerificationError, match="output holds no tensor .* verify=False"):
        moeify.convert(_DataclassOut(as_dataclass=False), moeify.MoEConfig(num_experts=4), example_inputs=(x,))
    moeify.convert(_DataclassOut(as_dataclass=False), moeify.MoEConfig(num_experts=4), example_inputs=(x,),
                   verify=False)


def test_converting_a_converted_model_says_so():
    """It listed the attention Linears as the nearest candidates, and not that the FFNs were MoE layers already."""
    ex = load_example("gpt")
    result = moeify.convert(ex.build_model(), moeify.MoEConfig(num_experts=4), example_inputs=ex.example_inputs())
    with pytest.raises(NoFFNRegionError, match=r"has 2 MoE layer\(s\) .* converted already; convert the dense model"):
        moeify.convert(result.model, moeify.MoEConfig(num_experts=4), example_inputs=ex.example_inputs())


class _SelfTiedFFN(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return x + self.fc(F.gelu(self.fc(x)))


def test_a_linear_used_twice_inside_one_ffn_is_noted_as_an_untied_copy():
    """fc(gelu(fc(x))) converts to experts with separate fc1 and fc2 (function preserved at init): a tie
    between two FFNs was noted, one inside an FFN was not."""
    x = torch.randn(3, 8)
    result = moeify.convert(_SelfTiedFFN(), moeify.MoEConfig(num_experts=2, top_k=1), example_inputs=(x,))
    (region,) = result.report.regions
    assert region.notes == ["fc is the FFN's fc1 and its fc2: each expert gets a copy for each, so that tie is not "
                            "kept"]
