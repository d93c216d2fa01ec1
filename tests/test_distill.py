"""moeify.distill: the mixed loss against the formula transcribed in numpy, training, config errors."""

import numpy as np
import pytest
import torch
from torch import nn

import moeify
from moeify.distill import DistillConfig, distill, distillation_loss
from moeify.errors import ConfigError


def np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def reference_loss(s, t, y, w, tau, soft):
    """Switch §4 / Hinton: w * tau^2 * soft(teacher^tau, student^tau) + (1 - w) * CE(student, y), per-token mean."""
    s, t = s.reshape(-1, s.shape[-1]).astype(np.float64), t.reshape(-1, t.shape[-1]).astype(np.float64)
    y = y.reshape(-1)
    s, t, y = s[y != -100], t[y != -100], y[y != -100]  # unlabelled positions (padding) count in neither term
    hard = -np_log_softmax(s)[np.arange(len(y)), y].mean()
    lps, lpt = np_log_softmax(s / tau), np_log_softmax(t / tau)
    pt = np.exp(lpt)
    soft_v = (pt * (lpt - lps)).sum(-1).mean() if soft == "kl" else -(pt * lps).sum(-1).mean()
    return w * tau * tau * soft_v + (1 - w) * hard


@pytest.mark.parametrize("w,tau,soft", [(0.25, 1.0, "kl"), (0.25, 2.0, "kl"), (0.5, 1.0, "ce"),
                                        (1.0, 1.0, "kl"), (0.0, 1.0, "kl"), (0.25, 0.5, "ce")])
def test_loss_matches_numpy_formula(w, tau, soft):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g) * 2, torch.randn(2, 5, 11, generator=g) * 2
    y = torch.randint(0, 11, (2, 5), generator=g)
    got = distillation_loss(s, t, y, DistillConfig(teacher_weight=w, temperature=tau, soft_loss=soft))
    want = reference_loss(s.numpy(), t.numpy(), y.numpy(), w, tau, soft)
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("w", [0.25, 1.0])
def test_positions_labelled_minus_100_count_in_neither_term(w):
    """Padding labelled -100: the hard term ignored it (F.cross_entropy) while the soft term averaged over
    it too (2.4635 instead of 2.5034 in the audit's case); all -100 gave NaN even at teacher_weight 1."""
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(3, 7, 11, generator=g) * 2, torch.randn(3, 7, 11, generator=g) * 2
    y = torch.randint(0, 11, (3, 7), generator=g)
    y[0, 4:], y[2, 1:] = -100, -100
    cfg = DistillConfig(teacher_weight=w)
    got = distillation_loss(s, t, y, cfg)
    assert got.item() == pytest.approx(reference_loss(s.numpy(), t.numpy(), y.numpy(), w, 1.0, "kl"), rel=1e-5)
    keep = y != -100
    assert got.item() == pytest.approx(distillation_loss(s[keep], t[keep], y[keep], cfg).item(), rel=1e-6)
    s.requires_grad_(True)
    none = distillation_loss(s, t, torch.full_like(y, -100), cfg)
    none.backward()
    assert none.item() == 0.0 and bool((s.grad == 0).all())


def test_soft_loss_gradient_does_not_reach_teacher():
    s, t = torch.randn(4, 7, requires_grad=True), torch.randn(4, 7, requires_grad=True)
    distillation_loss(s, t, torch.zeros(4, dtype=torch.long)).backward()
    assert s.grad is not None and t.grad is None


def _mlp(seed, out_scale=1.0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8))
    with torch.no_grad():
        model[2].weight.mul_(out_scale)
    return model


@pytest.mark.parametrize("teacher_kind", ["dense", "moe"])
def test_distill_moves_student_towards_teacher_and_leaves_caller_model(teacher_kind):
    teacher = _mlp(1, out_scale=4.0)  # a confident teacher: far from the near-uniform untrained student
    if teacher_kind == "moe":
        teacher = moeify.convert(teacher, moeify.MoEConfig(num_experts=4, top_k=2)).model
        with torch.no_grad():  # make the experts differ so the teacher is not just the dense MLP
            for layer in moeify.moe_layers(teacher).values():
                layer.experts.w1_EFD.add_(torch.randn_like(layer.experts.w1_EFD) * 0.3)
    student = _mlp(2)
    before = [p.clone() for p in student.parameters()]
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(32, 8, generator=g) for _ in range(40)]
    probe = torch.randn(256, 8, generator=g)

    def kl_to_teacher(model):
        with torch.no_grad():
            return distillation_loss(model(probe), teacher(probe), torch.zeros(256, dtype=torch.long),
                                     DistillConfig(teacher_weight=1.0)).item()

    with torch.no_grad():
        batches = [(x, teacher(x).argmax(-1)) for x in xs]
    trained = distill(student, teacher, batches, config=DistillConfig(teacher_weight=0.75, lr=1e-2))
    assert kl_to_teacher(trained) < 0.5 * kl_to_teacher(student)
    assert all(torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True))
    assert trained is not student and teacher.training  # the teacher's mode is restored


@pytest.mark.parametrize("kwargs", [dict(teacher_weight=1.5), dict(teacher_weight=-0.1), dict(temperature=0.0),
                                    dict(temperature=float("inf")), dict(soft_loss="mse"), dict(lr=0.0),
                                    dict(weight_decay=-1.0), dict(grad_clip=0.0)])
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        DistillConfig(**kwargs)


def test_shape_mismatch_is_a_typed_error():
    with pytest.raises(ConfigError, match="vocabulary"):
        distillation_loss(torch.randn(3, 5), torch.randn(3, 6), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ConfigError, match="labels"):
        distillation_loss(torch.randn(3, 5), torch.randn(3, 5), torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("batch, says", [
    (torch.randint(0, 4, (2, 8)), r"batch 0 is a tensor of shape \(2, 8\)"),  # rows would become inputs, labels
    ((torch.randn(2, 8), torch.randn(2, 8), torch.zeros(2)), "batch 0 is a tuple of 3"),
    ((torch.randn(2, 8), [0, 1]), "labels are a list, not a tensor"),
    ({"x": torch.randn(2, 8)}, "batch 0 is a dict"),
])
def test_a_batch_that_is_not_an_inputs_labels_pair_is_refused(batch, says):
    from moeify.errors import DistillError

    student, teacher = _mlp(2), _mlp(1)
    with pytest.raises(DistillError, match=says + r": give \(inputs, labels\) pairs"):
        distill(student, teacher, [batch])
    x = torch.randn(2, 8)  # a DataLoader's [inputs, labels] list is a pair
    distill(student, teacher, [[x, torch.zeros(2, dtype=torch.long)]])


def test_distill_takes_hugging_face_models_and_keyword_inputs():
    """A Hugging Face upcycled teacher and its dense student: outputs with .logits, inputs as a dict
    (AttributeError: 'CausalLMOutputWithCrossAttentions' object has no attribute 'shape' before)."""
    import transformers

    from moeify.errors import DistillError

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50, n_positions=32, n_embd=32, n_layer=1, n_head=2)
    dense = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 50, (2, 9))
    teacher = moeify.convert(dense, moeify.MoEConfig(num_experts=4, top_k=2), example_inputs=(ids,)).model
    with torch.no_grad():  # a teacher that is no longer the dense model
        for layer in moeify.moe_layers(teacher).values():
            layer.experts.w1_EFD.add_(torch.randn_like(layer.experts.w1_EFD) * 0.3)
    batches = [({"input_ids": ids[:, :-1], "attention_mask": torch.ones_like(ids[:, :-1])}, ids[:, 1:])] * 5

    def kl(model):
        with torch.no_grad():
            return distillation_loss(model(ids[:, :-1]).logits, teacher(ids[:, :-1]).logits, ids[:, 1:],
                                     DistillConfig(teacher_weight=1.0)).item()

    student = distill(dense, teacher, batches, config=DistillConfig(teacher_weight=1.0, lr=1e-2))
    assert isinstance(student, transformers.GPT2LMHeadModel) and kl(student) < kl(dense)
    class Scores(nn.Module):
        def forward(self, x):
            return {"scores": x}

    with pytest.raises(DistillError, match="the teacher returns a dict: distill needs its logits"):
        distill(dense, Scores(), [(ids, ids)])
