"""Expert parallelism on 2 CPU processes (gloo) against the same model on one process.

Reference: the converted GPT with local dispatch on this process, accumulating the gradients of
the two ranks' micro-batches (each loss / 2): the loss convention `moeify.distributed` documents.
The 2-rank side runs in forked processes (tests/ep_worker.py) and writes its results to files.
"""

import importlib.util
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import moeify
from moeify.errors import DistributedError

pytest.importorskip("torch.distributed")
if not torch.distributed.is_available() or sys.platform != "linux":
    pytest.skip("needs torch.distributed with gloo and fork (Linux)", allow_module_level=True)

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_ep_worker", HERE / "ep_worker.py")
worker = importlib.util.module_from_spec(_spec)
sys.modules["_ep_worker"] = worker
_spec.loader.exec_module(worker)

ATOL = 1e-5


def reference_step(case: str, world: int = worker.WORLD):
    """One process, local dispatch: per rank's micro-batch, logits/aux/loss; gradients accumulated."""
    result, gpt = worker.converted(case)
    model = result.model
    per_rank = []
    for rank in range(world):
        logits, aux, loss = worker.step_loss(model, gpt, worker.micro_batch(0, rank, world))
        (loss / world).backward()
        stats = [layer.aux.last_stats["tokens_per_expert"].clone() for layer in moeify.moe_layers(model).values()]
        per_rank.append({"logits": logits.detach(), "aux": aux.detach(), "loss": loss.detach(), "tokens": stats})
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return per_rank, grads


def reference_training():
    result, gpt = worker.converted("balanced")
    opt = torch.optim.SGD(result.model.parameters(), lr=worker.LR, momentum=worker.MOMENTUM)
    result.norms = []
    for step in range(worker.TRAIN_STEPS):
        opt.zero_grad()
        for rank in range(worker.WORLD):
            loss = worker.step_loss(result.model, gpt, worker.micro_batch(step, rank))[2]
            (loss / worker.WORLD).backward()
        result.norms.append(torch.nn.utils.clip_grad_norm_(result.model.parameters(), worker.CLIP))
        opt.step()
    result.optimizer = opt
    return result, gpt


@pytest.fixture(scope="module")
def trained():
    return reference_training()


@pytest.fixture(scope="module")
def ep_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ep")
    worker.launch("run", out)
    return out


@pytest.fixture(scope="module")
def ep_train(tmp_path_factory, trained):
    out = tmp_path_factory.mktemp("ep_train")
    moeify.save(trained[0], out / "ckpt_1proc")  # for the 1 -> 2 ranks direction
    worker.launch("train", out)
    return out


@pytest.mark.parametrize("case", worker.CASES)
def test_outputs_aux_and_gradients_match_one_process(ep_run, case):
    per_rank, ref_grads = reference_step(case)
    ranks = [load_file(str(ep_run / f"{case}_rank{r}.safetensors")) for r in range(worker.WORLD)]
    for got, ref in zip(ranks, per_rank, strict=True):
        torch.testing.assert_close(got["logits"], ref["logits"], atol=ATOL, rtol=0)
        torch.testing.assert_close(got["aux"], ref["aux"], atol=ATOL, rtol=0)
        torch.testing.assert_close(got["loss"], ref["loss"], atol=ATOL, rtol=0)
    got_grads = {k[len("grad."):]: v for k, v in ranks[0].items() if k.startswith("grad.")}
    assert sorted(got_grads) == sorted(ref_grads)
    for name, ref in ref_grads.items():
        torch.testing.assert_close(got_grads[name], ref, atol=ATOL, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
        other = ranks[1][f"grad.{name}"]  # replicas agree after the sync
        torch.testing.assert_close(other, got_grads[name], atol=ATOL, rtol=0)

    # bytes handed to all_to_all in the forward, over both ranks: dispatch sends every assignment's row
    # (tokens * k rows of D float32) and combine sends each back, per layer
    layers, t_local, k, d = 2, worker.GLOBAL_BATCH // worker.WORLD * worker.SEQ, worker.CONFIG["top_k"], 64
    assert sum(int(r["fwd_bytes"]) for r in ranks) == 2 * (worker.WORLD * t_local) * k * d * 4 * layers

    # dropless top-k gives every token k rows: combine gathers them back (the plan's inverse_N survives the
    # all-to-all) instead of scatter-adding, on every rank and layer
    assert all(r["combine_gathers"].tolist() == [True] * layers for r in ranks)

    tokens_per_expert = sum(sum(r["tokens"]) for r in per_rank)  # both layers, both micro-batches
    rows = [r["expert_rows"].tolist() for r in ranks]
    if case == "rank1_empty":
        assert tokens_per_expert[2:].sum() == 0  # the reference routes nothing to experts 2, 3
        assert rows[1] == [0] * layers  # so rank 1's experts computed no row...
        assert rows[0] == [2 * t_local * k] * layers  # ...and rank 0's computed every row of both ranks
        # rank 1 sends all its rows to rank 0 (dispatch), rank 0 sends them back (combine); nothing else leaves
        assert [int(r["remote_bytes"]) for r in ranks] == [t_local * k * d * 4 * layers] * 2
        assert ref_grads["blocks.0.mlp.moe.experts.w1_EFD"][2:].abs().max() == 0
    else:
        assert (tokens_per_expert > 0).all()
        assert all(n > 0 for r in rows for n in r)
        assert sum(sum(r) for r in rows) == 2 * t_local * k * layers


@pytest.mark.parametrize("what, message", [
    ("odd", "has 3 experts, not divisible by the expert-parallel size 2"),
    ("bare", "carry no sharding annotations"),
    ("twice", "is already expert-parallel"),
    ("weights", "rank 1's weights differ from rank 0's"),  # trained apart silently before
    ("layers", "rank 1 has other MoE layers or sizes than rank 0"),  # tokens met the wrong experts before
    ("layerdrop", "while rank {other} is in layer {other}: every rank must run the same MoE layers"),  # 3.0 off
])
def test_expert_parallel_refusals(ep_run, what, message):
    for rank in range(worker.WORLD):
        text = (ep_run / f"refused_{what}_rank{rank}.txt").read_text()
        assert text.startswith("DistributedError") and message.format(other=1 - rank) in text, text


def test_hybrid_dp2_ep2_mesh_matches_one_process(tmp_path):
    """4 ranks, (dp, ep) = (2, 2): expert gradients averaged over dp replicas and scaled by 1/ep."""
    worker.launch("hybrid", tmp_path, world=4)
    per_rank, ref_grads = reference_step("hybrid", world=4)
    ranks = [load_file(str(tmp_path / f"hybrid_rank{r}.safetensors")) for r in range(4)]
    for got, ref in zip(ranks, per_rank, strict=True):
        for key in ("logits", "aux", "loss"):
            torch.testing.assert_close(got[key], ref[key], atol=ATOL, rtol=0)
    for got in ranks:
        for name, ref in ref_grads.items():
            torch.testing.assert_close(got[f"grad.{name}"], ref, atol=ATOL, rtol=0,
                                       msg=lambda m, n=name: f"{n}: {m}")


def test_checkpoint_after_training_equals_one_process(ep_train, trained):
    ref = trained[0].model.state_dict()
    got = load_file(str(ep_train / "ckpt_ep" / "model.safetensors"))
    assert set(got) < set(ref) and len(got) == len(ref) - 1  # the tied embedding/head weight is stored once
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, ref[name], atol=ATOL, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
    # and the 2-rank checkpoint loads on one process with moeify.load
    gpt = trained[1]
    loaded = moeify.load(ep_train / "ckpt_ep", model=gpt.build_model()).model
    idx = worker.micro_batch(worker.TRAIN_STEPS, 0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx), trained[0].model(idx), atol=ATOL, rtol=0)


def test_optimizer_state_gathers_to_one_process_and_resumes(ep_train, trained):
    """ExpertParallel.optimizer_state_dict: the momentum of every parameter, the experts' gathered over
    the 2 ranks, equals one process's after the same training; saved with torch.save and loaded with
    weights_only=True into a fresh 2-rank model (load_optimizer_state_dict), the next step is the one
    the uninterrupted run takes."""
    got = torch.load(ep_train / "optimizer.pt", weights_only=True)
    want = trained[0].optimizer.state_dict()
    assert got["state"].keys() == want["state"].keys() and got["param_groups"] == want["param_groups"]
    names = [n for n, _ in trained[0].model.named_parameters()]
    experts = [i for i, n in enumerate(names) if ".experts." in n]
    assert experts and all(got["state"][i]["momentum_buffer"].shape[0] == 4 for i in experts)  # all 4 experts
    for index, entry in want["state"].items():
        torch.testing.assert_close(got["state"][index]["momentum_buffer"], entry["momentum_buffer"], atol=ATOL,
                                   rtol=0, msg=lambda m, n=names[index]: f"{n}: {m}")
    for rank in range(worker.WORLD):
        assert load_file(str(ep_train / f"resumed_rank{rank}.safetensors"))["resume_diff"].item() == 0


def test_gradient_clipping_uses_the_whole_models_norm(ep_train, trained):
    """ExpertParallel.clip_grad_norm_ gives every rank the norm one process computes (torch's, called on
    a rank, saw its own expert shard: the ranks clipped their replicated weights by different factors);
    the checkpoint test above checks the clipped training itself."""
    want = torch.stack(trained[0].norms)
    assert bool((want > worker.CLIP).all())  # every step was clipped
    for rank in range(worker.WORLD):
        got = load_file(str(ep_train / f"norms_rank{rank}.safetensors"))["norms"]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_failed_save_raises_on_every_rank(ep_train):
    rank0 = (ep_train / "save_again_rank0.txt").read_text()
    rank1 = (ep_train / "save_again_rank1.txt").read_text()
    assert rank0.startswith("SerializationError") and "already exists" in rank0
    assert rank1.startswith("DistributedError") and "rank 0 could not write" in rank1


def test_one_process_checkpoint_loads_on_two_ranks(ep_train, trained):
    for rank in range(worker.WORLD):
        got = load_file(str(ep_train / f"loaded_rank{rank}.safetensors"))["logits"]
        with torch.no_grad():
            ref = trained[0].model(worker.micro_batch(worker.TRAIN_STEPS, rank))
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


def test_failing_rank_fails_the_run_within_bound(tmp_path):
    start = time.monotonic()
    with pytest.raises(worker.RankFailed, match="rank 1 failed first") as info:
        worker.launch("fail", tmp_path, timeout_s=120)
    elapsed = time.monotonic() - start
    assert "RuntimeError: injected failure on rank 1 during the step" in str(info.value)
    assert not (tmp_path / "rank0_finished").exists()
    assert elapsed < 60, f"the run took {elapsed:.1f} s to fail"


def test_expert_parallel_refuses_without_process_group(example):
    ex = example("gpt")
    result = moeify.convert(ex.build_model(), moeify.MoEConfig(num_experts=4, top_k=2), verify=False)
    from moeify.distributed import expert_parallel

    with pytest.raises(DistributedError, match="not initialised"):
        expert_parallel(result.model)


@pytest.mark.slow
def test_torchrun_example_trains_and_its_checkpoint_loads_on_one_process(tmp_path, example):
    """examples/train_expert_parallel.py under torchrun (2 ranks): loss falls; the checkpoint loads on 1 process."""
    import os
    import re
    import subprocess

    out = tmp_path / "gpt_ep"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE.parent / "examples" / "train_expert_parallel.py"), "--steps", "30", "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"lm loss (\d+\.\d+)", run.stdout)]
    assert len(losses) >= 2 and losses[-1] < losses[0] - 1.0, run.stdout
    loaded = moeify.load(out, model=example("gpt").build_model()).model
    assert all(layer.experts.num_experts == 4 for layer in moeify.moe_layers(loaded).values())
    idx = torch.arange(32).remainder(256).unsqueeze(0)
    with torch.no_grad():
        assert torch.isfinite(loaded(idx)).all()
