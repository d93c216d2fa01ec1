"""Worker for tests/test_distributed.py: 2 processes (gloo on CPU) started by the test with `launch`.

Processes are forked from the test process (torch already imported: starting them takes well
under a second instead of ~10 s for torchrun on a 2-core machine); each sets up the default
process group from the same environment variables torchrun sets.

`run`: for each case, forward + backward + gradient sync on this rank's half of a fixed global
batch, written to OUT_DIR/<case>_rank<r>.safetensors (outputs, losses, synced gradients gathered
to full size).
`train`: a few SGD steps with gradient clipping (the norms to OUT_DIR/norms_rank<r>.safetensors), saved
as one single-process checkpoint OUT_DIR/ckpt_ep; then
OUT_DIR/ckpt_1proc (written by the test) loaded onto 2 ranks and run on this rank's batch.
`fail`: rank 1 raises in the middle of a step while rank 0 waits in a collective.
The single-process reference lives in the test, not here.
"""

from __future__ import annotations

import importlib.util
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import socket
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.device_mesh import init_device_mesh

import moeify
from moeify import distributed as moe_dist
from moeify.errors import MoeifyError

ROOT = Path(__file__).resolve().parent.parent
CONFIG = dict(num_experts=4, top_k=2, router_bias=True, init="copy_noise", init_noise=0.2)
GLOBAL_BATCH, SEQ, WORLD = 4, 16, 2
CASES = ("balanced", "rank1_empty")
TRAIN_STEPS, LR, MOMENTUM = 3, 0.5, 0.9
CLIP = 0.05  # below every step's gradient norm: each step is clipped (the test checks that it was)


def gpt_example():
    spec = importlib.util.spec_from_file_location("_ep_gpt", ROOT / "examples" / "gpt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def converted(case: str):
    """The converted GPT of `case` (same weights on every process: seeded build and conversion)."""
    gpt = gpt_example()
    result = moeify.convert(gpt.build_model(), moeify.MoEConfig(**CONFIG), verify=False)
    if case == "rank1_empty":
        # experts 2 and 3 (rank 1's half under 2-way EP) never win a top-2 slot
        for layer in moeify.moe_layers(result.model).values():
            with torch.no_grad():
                layer.router.gate.bias[2:] = -30.0
    return result, gpt


def global_batch(step: int) -> torch.Tensor:
    return torch.randint(0, 256, (GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(100 + step))


def micro_batch(step: int, rank: int, world: int = WORLD) -> torch.Tensor:
    per = GLOBAL_BATCH // world
    return global_batch(step)[rank * per:(rank + 1) * per]


def step_loss(model, gpt, idx):
    logits = model(idx)
    aux = moeify.aux_loss(model)
    return logits, aux, gpt.lm_loss(logits, idx) + aux


def run(out: Path) -> None:
    moe_dist.init_from_env(timeout_s=60)
    for case in CASES:
        one_step(case, out, None)
    refusals(out)
    moe_dist.shutdown()


def refusals(out: Path) -> None:
    """What expert_parallel refuses, each error message written to refused_<what>_rank<r>.txt."""
    rank = dist.get_rank()
    gpt = gpt_example()
    odd = moeify.convert(gpt.build_model(), moeify.MoEConfig(**{**CONFIG, "num_experts": 3}), verify=False)
    bare, _ = converted("balanced")
    for module in bare.model.modules():  # as if converted by a moeify without the AnnotateSharding pass
        gm = module.__dict__.get("_moeify_graph_module")
        for node in [] if gm is None else gm.graph.nodes:
            node.meta.pop("moeify_sharding", None)
    twice = moe_dist.expert_parallel(converted("balanced")[0].model).model
    skewed, _ = converted("balanced")  # rank 1 starts from other weights
    if rank == 1:
        with torch.no_grad():
            next(skewed.model.parameters()).add_(1.0)
    layers = moeify.convert(gpt.build_model(), moeify.MoEConfig(**{**CONFIG, "layers": (rank,)}), verify=False)
    for what, model in (("odd", odd.model), ("bare", bare.model), ("twice", twice), ("weights", skewed.model),
                        ("layers", layers.model)):
        try:
            moe_dist.expert_parallel(model)
            message = "accepted"
        except MoeifyError as exc:
            message = f"{type(exc).__name__}: {exc}"
        (out / f"refused_{what}_rank{rank}.txt").write_text(message)
    # as a per-rank LayerDrop: rank r runs only block r's MoE (each rank's tokens met the other layer's experts)
    ep = moe_dist.expert_parallel(converted("balanced")[0].model)
    block = ep.model.blocks[rank]
    try:
        block.mlp(torch.randn(2, 5, *block.ln2.normalized_shape))
        message = "accepted"
    except MoeifyError as exc:
        message = f"{type(exc).__name__}: {exc}"
    (out / f"refused_layerdrop_rank{rank}.txt").write_text(message)


def hybrid(out: Path) -> None:
    """4 ranks as a (dp, ep) = (2, 2) mesh: experts split over ep, replicated over dp."""
    moe_dist.init_from_env(timeout_s=60)
    one_step("hybrid", out, init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "ep")))
    moe_dist.shutdown()


def one_step(case: str, out: Path, mesh) -> None:
    """Forward, backward and gradient sync on this rank's micro-batch; results to <case>_rank<r>.safetensors."""
    rank, world = dist.get_rank(), dist.get_world_size()
    result, gpt = converted(case)
    ep = moe_dist.expert_parallel(result.model, mesh, inplace=True)
    rows = []  # rows this rank's experts computed, per layer (0 when they received no token)
    gathers = []  # per layer: whether combine kept the gather path (the plan's inverse_N) across the all-to-all
    for layer in moeify.moe_layers(ep.model).values():
        layer.experts.register_forward_pre_hook(lambda m, args, rows=rows: rows.append(args[0].shape[0]))
        layer.combine.register_forward_pre_hook(
            lambda m, args, gathers=gathers: gathers.append(args[1].inverse_N is not None))
    logits, aux, loss = step_loss(ep.model, gpt, micro_batch(0, rank, world))
    loss.backward()
    ep.sync_gradients()
    grads = {n: p.grad for n, p in ep.model.named_parameters() if p.grad is not None}
    for name in ep.expert_parameter_names():  # gather expert gradients to full size for comparison
        parts = [torch.empty_like(grads[name]) for _ in range(ep.groups.ep_size)]
        dist.all_gather(parts, grads[name].contiguous(), group=ep.groups.ep)
        grads[name] = torch.cat(parts)
    tensors = {"logits": logits.detach(), "aux": aux.detach(), "loss": loss.detach(),
               "expert_rows": torch.tensor(rows), "combine_gathers": torch.tensor(gathers),
               "fwd_bytes": torch.tensor(ep.meter.forward_bytes),
               "remote_bytes": torch.tensor(ep.meter.forward_remote_bytes)}
    tensors.update({f"grad.{n}": g.contiguous() for n, g in grads.items()})
    save_file(tensors, str(out / f"{case}_rank{rank}.safetensors"))


def train(out: Path) -> None:
    moe_dist.init_from_env(timeout_s=60)
    rank = dist.get_rank()
    result, gpt = converted("balanced")
    # a (dp, ep) = (1, 2) DeviceMesh here, the default process group elsewhere: both ways in
    mesh = init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("dp", "ep"))
    ep = moe_dist.expert_parallel(result.model, mesh, inplace=True)
    opt = torch.optim.SGD(ep.model.parameters(), lr=LR, momentum=MOMENTUM)
    norms = []
    for step in range(TRAIN_STEPS):
        opt.zero_grad()
        step_loss(ep.model, gpt, micro_batch(step, rank))[2].backward()
        ep.sync_gradients()
        norms.append(ep.clip_grad_norm_(CLIP))
        opt.step()
    save_file({"norms": torch.stack(norms)}, str(out / f"norms_rank{rank}.safetensors"))
    ep.save(result, out / "ckpt_ep")
    try:  # saving again without force fails on rank 0; every rank must raise rather than wait
        ep.save(result, out / "ckpt_ep")
    except MoeifyError as exc:
        (out / f"save_again_rank{rank}.txt").write_text(f"{type(exc).__name__}: {exc}")

    _, ep1 = moe_dist.load(out / "ckpt_1proc", model=gpt.build_model())
    with torch.no_grad():
        logits = ep1.model(micro_batch(TRAIN_STEPS, rank))
    save_file({"logits": logits}, str(out / f"loaded_rank{rank}.safetensors"))
    resume(out, ep, opt, gpt)
    moe_dist.shutdown()


def resume(out: Path, ep, opt, gpt) -> None:
    """The optimizer state gathered to one-process layout and saved beside the checkpoint; a fresh 2-rank
    model loads both and takes the next step exactly as the run that never stopped."""
    rank = dist.get_rank()
    state = ep.optimizer_state_dict(opt)
    if rank == 0:
        torch.save(state, out / "optimizer.pt")
    dist.barrier()
    _, again = moe_dist.load(out / "ckpt_ep", model=gpt.build_model())
    opt_again = torch.optim.SGD(again.model.parameters(), lr=LR, momentum=MOMENTUM)
    again.load_optimizer_state_dict(opt_again, torch.load(out / "optimizer.pt", weights_only=True))
    for run, optimizer in ((ep, opt), (again, opt_again)):
        optimizer.zero_grad()
        step_loss(run.model, gpt, micro_batch(TRAIN_STEPS, rank))[2].backward()
        run.sync_gradients()
        run.clip_grad_norm_(CLIP)
        optimizer.step()
    diffs = [(a - b).abs().max() for a, b in zip(ep.model.parameters(), again.model.parameters(), strict=True)]
    save_file({"resume_diff": torch.stack(diffs).max()}, str(out / f"resumed_rank{rank}.safetensors"))


def fail(out: Path) -> None:
    moe_dist.init_from_env(timeout_s=30)
    rank = dist.get_rank()
    result, gpt = converted("balanced")
    ep = moe_dist.expert_parallel(result.model, inplace=True)
    logits, aux, loss = step_loss(ep.model, gpt, micro_batch(0, rank))
    if rank == 1:
        raise RuntimeError("injected failure on rank 1 during the step")
    loss.backward()  # rank 0 blocks in the backward all-to-all, waiting for rank 1
    ep.sync_gradients()
    (out / "rank0_finished").write_text("rank 0 should not get here")


def _entry(rank: int, world: int, port: int, scenario: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        {"run": run, "hybrid": hybrid, "train": train, "fail": fail}[scenario](Path(out))
    except BaseException:
        # the parent reports the rank that failed first (like torchrun's "root cause")
        Path(out, f"error_rank{rank}.txt").write_text(f"{time.time()!r}\n{traceback.format_exc()}")
        os._exit(1)
    os._exit(0)  # skip atexit handlers inherited from the forked test process


class RankFailed(RuntimeError):
    pass


def launch(scenario: str, out: Path, timeout_s: float = 120.0, grace_s: float = 2.0, world: int = WORLD) -> None:
    """Run `scenario` on `world` forked processes. Raises RankFailed with the first failing rank's traceback.

    When one rank fails, the others get `grace_s` to fail on their own, then are killed: a dead
    rank never leaves the run hanging.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_entry, args=(r, world, port, scenario, str(out))) for r in range(world)]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + timeout_s
    try:
        while any(p.is_alive() for p in procs):
            if any(p.exitcode not in (None, 0) for p in procs):
                mp_connection.wait([p.sentinel for p in procs if p.is_alive()], timeout=grace_s)
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{scenario}: the {world} processes did not finish within {timeout_s} s")
            mp_connection.wait([p.sentinel for p in procs], timeout=0.2)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join()
    errors = sorted((float(text.split("\n", 1)[0]), r, text.split("\n", 1)[1])
                    for r in range(world) if (f := Path(out, f"error_rank{r}.txt")).exists()
                    for text in [f.read_text()])
    if errors:
        _, rank, tb = errors[0]
        raise RankFailed(f"rank {rank} failed first:\n{tb}")
    bad = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0]
    if bad:
        raise RankFailed(f"ranks exited abnormally (rank, exit code): {bad}")
