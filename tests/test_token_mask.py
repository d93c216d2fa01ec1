"""`moeify.token_mask`: padding left out of the aux losses, router statistics and expert capacity.

The reference is independent of the masking code: the same layer run on the counted tokens alone
(an MoE routes every token on its own, so the counted tokens' routing, losses and statistics must be
exactly those of a batch that holds only them).
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moeify
from moeify.errors import TokenMaskError
from moeify.moe.build import DenseFFN, build_moe_layer

D, FF, E = 8, 16, 4


def perturbed_layer(seed=0, **cfg):
    """An upcycled layer with randomised experts and router, so that outputs and losses depend on routing."""
    g = torch.Generator().manual_seed(seed)
    dense = DenseFFN("gelu", torch.randn(FF, D, generator=g) / 3, torch.randn(D, FF, generator=g) / 4,
                     torch.randn(FF, generator=g), torch.randn(D, generator=g))
    layer = build_moe_layer(moeify.MoEConfig(num_experts=E, **cfg), dense)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return layer


def padded_batch(seed=0, lengths=(5, 2, 4), seq=6):
    """x (B, S, D) and a right-padded 0/1 attention mask (B, S) with the given lengths."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), seq, D, generator=g)
    mask = (torch.arange(seq) < torch.tensor(lengths).unsqueeze(-1)).long()
    return x, mask


def run(layer, x):
    """Output, weighted losses and statistics of one forward."""
    out = layer(x)
    return out, dict(layer.aux.last_losses), dict(layer.aux.last_stats)


ALL_LOSSES = dict(load_balance_coef=0.1, z_loss_coef=0.01, importance_coef=0.1)
ROUTERS = {
    "topk": dict(router="topk", top_k=2, **ALL_LOSSES),
    "topk-then-softmax": dict(router="topk", top_k=2, softmax_before_topk=False, **ALL_LOSSES),
    "switch": dict(router="switch", top_k=1, **ALL_LOSSES),
    "noisy": dict(router="noisy_topk", top_k=2, load_coef=0.1, **ALL_LOSSES),
    "hierarchical": dict(top_k=1, num_groups=2, group_top_k=2, **ALL_LOSSES),
    "noisy-hierarchical": dict(router="noisy_topk", top_k=1, num_groups=2, group_top_k=1, load_coef=0.1, **ALL_LOSSES),
    "expert-choice": dict(router="expert_choice", top_k=2, **ALL_LOSSES),
    "switch-capacity": dict(router="switch", top_k=1, capacity_factor=1.0, **ALL_LOSSES),
    "topk-capacity-gate": dict(router="topk", top_k=2, capacity_factor=0.75, drop_policy="gate", **ALL_LOSSES),
    "topk-capacity-choice": dict(router="topk", top_k=2, capacity_factor=0.75, drop_policy="choice", **ALL_LOSSES),
    "topk-capacity-position": dict(router="topk", top_k=2, capacity_factor=0.75, drop_policy="position", **ALL_LOSSES),
}


@pytest.fixture
def row_wise_noise(monkeypatch):
    """Noise that is a function of each token's own logits, so the noisy routers draw the same noise for
    a token whether or not padding shares its batch (torch's RNG draws by position)."""
    monkeypatch.setattr(torch, "randn_like", lambda t, **kw: torch.sin(1000.0 * t))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(ROUTERS))
def test_masked_batch_equals_the_counted_tokens_alone(name, training, row_wise_noise):
    """Losses, statistics and the counted tokens' outputs under the mask are those of the counted tokens
    run alone, for every router, with and without capacity limits (padding only takes spare slots)."""
    layer = perturbed_layer(**ROUTERS[name]).train(training)
    x, mask = padded_batch()
    with moeify.token_mask(layer, mask):
        out, masked_losses, masked_stats = run(layer, x)
    alone_out, alone_losses, alone_stats = run(layer, x[mask.bool()])

    assert masked_losses.keys() == alone_losses.keys() and len(masked_losses) >= 3
    for key in masked_losses:
        torch.testing.assert_close(masked_losses[key], alone_losses[key], rtol=1e-5, atol=1e-6, msg=key)
    assert masked_stats.keys() == alone_stats.keys()
    for key in masked_stats:
        torch.testing.assert_close(masked_stats[key], alone_stats[key], rtol=1e-5, atol=1e-6, msg=key)
    torch.testing.assert_close(out[mask.bool()], alone_out, rtol=1e-5, atol=1e-6)


def test_padding_changes_the_unmasked_losses():
    """The masked losses are not the unmasked ones (the test above would pass with no mask only if
    padding changed nothing)."""
    layer = perturbed_layer(**ROUTERS["topk"])
    x, mask = padded_batch()
    _, plain, stats = run(layer, x)
    with moeify.token_mask(layer, mask):
        _, masked, masked_stats = run(layer, x)
    assert not torch.allclose(plain["load_balance"], masked["load_balance"])
    assert stats["num_tokens"] == mask.numel() and masked_stats["num_tokens"] == mask.sum()


def test_expert_choice_never_picks_padding():
    layer = perturbed_layer(**ROUTERS["expert-choice"])
    x, mask = padded_batch()
    x[~mask.bool()] *= 100  # padding the router would prefer, if it could see it
    picked = []
    layer.dispatch.register_forward_hook(lambda m, args, out: picked.append(args[1].token_N))
    with moeify.token_mask(layer, mask):
        layer(x)
    assert mask.reshape(-1)[picked[0]].all()


def test_capacity_gives_padding_only_spare_slots():
    """Padding queued first in token order (left padding) still loses its slots to the counted tokens."""
    layer = perturbed_layer(**ROUTERS["switch-capacity"])
    x, mask = padded_batch(lengths=(2, 2, 2))
    mask = mask.flip(-1)  # left padding: every sequence starts with its padding
    kept = []
    layer.dispatch.register_forward_hook(lambda m, args, out: kept.append(args[1].token_N))
    with moeify.token_mask(layer, mask):
        out, _, stats = run(layer, x)
    counted = mask.reshape(-1).bool()
    alone_out, _, alone_stats = run(layer, x[mask.bool()])
    torch.testing.assert_close(out[mask.bool()], alone_out)
    kept_counted = counted[kept[0]].sum()
    assert kept_counted == alone_stats["tokens_per_expert"].sum()
    assert stats["dropped_fraction"] == pytest.approx(1 - kept_counted.item() / counted.sum().item())


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(D, FF), nn.Linear(FF, D)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(x)))


class EncoderDecoder(nn.Module):
    """Two stacks that see different numbers of tokens, as an encoder and a decoder do."""

    def __init__(self):
        super().__init__()
        self.encoder, self.decoder = Stack(), Stack()

    def forward(self, src, tgt):
        return self.decoder(tgt + self.encoder(src).mean(1, keepdim=True))


def converted_encoder_decoder():
    torch.manual_seed(0)
    src, tgt = torch.randn(2, 5, D), torch.randn(2, 3, D)
    result = moeify.convert(EncoderDecoder(), moeify.MoEConfig(num_experts=E, top_k=2), example_inputs=(src, tgt))
    return result.model, src, tgt


def test_each_stack_takes_its_own_mask():
    model, src, tgt = converted_encoder_decoder()
    src_mask, tgt_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]), torch.tensor([[1, 0, 0], [1, 1, 0]])
    with moeify.token_mask(model.encoder, src_mask), moeify.token_mask(model.decoder, tgt_mask):
        out = model(src, tgt)
        (out.sum() + moeify.aux_loss(model)).backward()
    tokens = {row.layer.partition(".")[0]: row.num_tokens for row in moeify.router_stats(model)}
    assert tokens == {"encoder": 8, "decoder": 3}
    for layer in moeify.moe_layers(model).values():
        assert layer.router.token_mask is None  # the block is over
        assert layer.router.gate.weight.grad is not None


def test_a_mask_that_does_not_fit_names_the_layer():
    model, src, tgt = converted_encoder_decoder()
    with pytest.raises(TokenMaskError, match=r"10 entries but MoE layer 'moe' sees 6 tokens.*model\.encoder"):
        with moeify.token_mask(model.decoder, torch.ones(2, 5)):
            model(src, tgt)
    assert all(layer.router.token_mask is None for layer in moeify.moe_layers(model).values())  # restored


def test_one_mask_for_an_encoder_and_a_decoder_is_refused_at_once():
    """At equal lengths the encoder's mask fitted the decoder's layers and was applied to them silently. The
    refusal comes on entering the block, before any forward, so the lengths no longer matter."""
    torch.manual_seed(0)
    src, tgt = torch.randn(2, 5, D), torch.randn(2, 5, D)
    model = moeify.convert(EncoderDecoder(), moeify.MoEConfig(num_experts=E, top_k=2), example_inputs=(src, tgt)).model
    with pytest.raises(TokenMaskError, match=r"MoE layers in its encoder \(encoder\) and its decoder \(decoder\).*"
                                             r"token_mask\(model\.encoder, attention_mask\)"):
        with moeify.token_mask(model, torch.ones(2, 5)):
            pass  # refused on entry, before any forward


def test_a_hugging_face_seq2seq_model_names_its_stacks():
    import transformers

    cfg = transformers.BartConfig(vocab_size=64, d_model=32, encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_layers=1,
                                  decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4)
    ids = torch.randint(3, 64, (2, 6))
    model = moeify.convert(transformers.BartForConditionalGeneration(cfg).eval(), moeify.MoEConfig(num_experts=E),
                           example_inputs=(ids,), example_kwargs={"decoder_input_ids": ids}).model
    with pytest.raises(TokenMaskError, match=r"token_mask\(model\.model\.encoder, attention_mask\) and "
                                             r"token_mask\(model\.model\.decoder, decoder_attention_mask\)"):
        with moeify.token_mask(model, torch.ones(2, 6)):
            pass
    mask = torch.ones(2, 6)
    with moeify.token_mask(model.model.encoder, mask), moeify.token_mask(model.model.decoder, mask):
        model(ids, decoder_input_ids=ids)
    decoder_only = moeify.convert(transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4)), moeify.MoEConfig(num_experts=E), example_inputs=(ids,)).model
    with moeify.token_mask(decoder_only, mask):  # its get_encoder() is the model itself: one stack
        decoder_only(ids)


@pytest.mark.parametrize("mask, message", [
    (torch.tensor([[0.0, float("-inf")]]), "other than 0 and 1"),
    ([[1, 0]], "takes a tensor, not list"),
    (torch.ones(2, 3, dtype=torch.complex64), "complex64 tensor"),
    (torch.ones(2, 3, device="meta"), "meta tensor"),
])
def test_bad_masks_are_refused(mask, message):
    with pytest.raises(TokenMaskError, match=message):
        with moeify.token_mask(perturbed_layer(router="topk", top_k=2), mask):
            pass


def test_a_one_entry_mask_names_its_size_in_the_singular():
    layer = perturbed_layer(router="topk", top_k=2)
    with pytest.raises(TokenMaskError, match="has 1 entry but MoE layer 'MoELayer' sees 3 tokens"):
        with moeify.token_mask(layer, torch.ones(1)):
            layer(torch.randn(3, D))


def test_a_model_without_moe_layers_is_refused():
    with pytest.raises(TokenMaskError, match="holds no MoE layer"):
        with moeify.token_mask(Stack(), torch.ones(3)):
            pass


def test_hf_bert_padding_is_left_out_of_every_layer():
    """A padded batch through Hugging Face BERT (its FFN split across two modules): every MoE layer
    counts the attention mask's tokens, capacity is sized for them, and the losses train the routers."""
    from conftest import load_example

    bert = load_example("hf_bert")
    cfg = moeify.MoEConfig(num_experts=E, router="switch", top_k=1, capacity_factor=1.0)
    model = moeify.convert(bert.build_model(), cfg, example_inputs=bert.example_inputs()).model.train()
    ids = torch.randint(1, bert.VOCAB, (3, 12), generator=torch.Generator().manual_seed(1))
    mask = (torch.arange(12) < torch.tensor([[12], [7], [3]])).long()
    with moeify.token_mask(model, mask):
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    (hidden[mask.bool()].sum() + moeify.aux_loss(model)).backward()
    rows = moeify.router_stats(model)
    assert len(rows) == 4
    capacity = -(-int(mask.sum()) // E)  # ceil(T * k * 1.0 / E), T the counted tokens
    for row in rows:
        assert row.num_tokens == mask.sum()
        assert sum(row.tokens_per_expert) <= mask.sum() and max(row.tokens_per_expert) <= capacity
    assert all(layer.router.gate.weight.grad.abs().sum() > 0 for layer in moeify.moe_layers(model).values())


@pytest.mark.parametrize("name", ["topk", "noisy", "noisy-hierarchical"])
def test_a_masked_dropless_layer_compiles_whole(name, row_wise_noise):
    """The mask enters the losses as masked sums (no data-dependent shapes): fullgraph compiles, and
    the compiled losses equal the eager ones."""
    layer = perturbed_layer(**ROUTERS[name])
    x, mask = padded_batch()
    with moeify.token_mask(layer, mask):
        eager_out, eager_losses, _ = run(layer, x)
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
        out = compiled(x)
    torch.testing.assert_close(out, eager_out)
    for key, value in layer.aux.last_losses.items():
        torch.testing.assert_close(value, eager_losses[key], msg=key)


def masked_step(model, x, mask, checkpoint):
    """Forward inside the block, backward after it (as a training loop runs them); the gradients."""
    model.zero_grad(set_to_none=True)
    with moeify.token_mask(model, mask):
        out = torch.utils.checkpoint.checkpoint(model, x, use_reentrant=False) if checkpoint else model(x)
    (out.square().mean() + moeify.aux_loss(model)).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["topk", "switch-capacity", "expert-choice"])
def test_checkpoint_recompute_after_the_block_uses_the_forwards_mask(name):
    """Non-reentrant checkpointing recomputes the forward inside the backward, after the block has
    ended: the recompute must route and weigh as the forward did (it raised CheckpointError, or with
    no loss to tell, silently trained on another routing)."""
    layer = perturbed_layer(**ROUTERS[name])
    x, mask = padded_batch()
    mask = mask.flip(-1)  # left padding: capacity then differs with and without the mask
    plain = masked_step(layer, x, mask, checkpoint=False)
    recomputed = masked_step(layer, x, mask, checkpoint=True)
    assert plain.keys() == recomputed.keys() and len(plain) >= 4
    for key in plain:
        torch.testing.assert_close(recomputed[key], plain[key], msg=key)


def test_a_copy_made_inside_the_block_carries_no_mask():
    import copy
    import pickle

    layer = perturbed_layer(**ROUTERS["topk"])
    x, mask = padded_batch()
    with moeify.token_mask(layer, mask):
        copies = [copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))]
    for twin in copies:
        assert twin.router.token_mask is None
        twin(x)
        assert twin.aux.last_stats["num_tokens"] == x.shape[0] * x.shape[1]


def test_the_mask_is_a_snapshot():
    """Editing the mask in place after the block changes neither the statistics nor the backward."""
    layer = perturbed_layer(**ROUTERS["topk"])
    x, mask = padded_batch()
    keep = mask.bool()
    with moeify.token_mask(layer, keep):
        out = layer(x)
    keep.fill_(True)
    (out.sum() + moeify.aux_loss(layer)).backward()
    assert layer.aux.last_stats["num_tokens"] == mask.sum()


def test_a_conversion_result_is_taken_for_its_model():
    torch.manual_seed(0)
    x = torch.randn(2, 5, D)
    result = moeify.convert(Stack(), moeify.MoEConfig(num_experts=E, top_k=2), example_inputs=(x,))
    with moeify.token_mask(result, torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])):
        result.model(x)
    assert moeify.router_stats(result.model)[0].num_tokens == 8


def test_a_batch_first_mask_on_a_sequence_first_layer_is_refused():
    """nn.Transformer's key padding masks are (B, S) even for sequence-first layers: the layout, not only
    the count, is checked where the layer's input has as many leading dims as the mask."""
    layer = perturbed_layer(router="topk", top_k=2)
    x_SBD, mask_BS = torch.randn(6, 3, D), padded_batch()[1]
    with pytest.raises(TokenMaskError, match=r"is \(3, 6\) but .* laid out \(6, 3\).*sequence-first: pass the mask "
                                             "transposed"):
        with moeify.token_mask(layer, mask_BS):
            layer(x_SBD)
    with moeify.token_mask(layer, mask_BS.T):
        _, masked, stats = run(layer, x_SBD)
    _, alone, _ = run(layer, x_SBD[mask_BS.T.bool()])
    assert stats["num_tokens"] == mask_BS.sum()
    torch.testing.assert_close(masked["load_balance"], alone["load_balance"])


def test_a_converted_sequence_first_encoder_checks_the_layout():
    torch.manual_seed(0)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(D, 2, FF, dropout=0.0), 1, enable_nested_tensor=False)
    x_SBD = torch.randn(6, 3, D)
    model = moeify.convert(encoder, moeify.MoEConfig(num_experts=E, top_k=2), example_inputs=(x_SBD,)).model
    mask_BS = padded_batch()[1]
    with pytest.raises(TokenMaskError, match="sequence-first"):
        with moeify.token_mask(model, mask_BS):
            model(x_SBD)
    with moeify.token_mask(model, mask_BS.T):
        model(x_SBD)
    assert moeify.router_stats(model)[0].num_tokens == mask_BS.sum()
