"""The CLI through click's test runner: the happy path, and every bad input (exit code, one-line message,
nothing written)."""

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import moeify
from moeify.cli import main
from moeify.errors import ModelSourceError

ROOT = Path(__file__).resolve().parent.parent
GPT = str(ROOT / "examples" / "gpt.py")


MLP_PATH = str(ROOT / "examples" / "mlp.py")


def run(*args):
    return CliRunner().invoke(main, list(args))


def test_inspect_lists_regions_and_refusals(tmp_path):
    r = run("inspect", GPT)
    assert r.exit_code == 0, r.output
    assert "2 FFN region(s)" in r.output and "blocks.1.mlp" in r.output and "skipped (" in r.output
    # a task head is listed as found, and skipped as convert skips it (convert's report says "skipped" too)
    electra = write(tmp_path, "electra.py", "import transformers\ndef build_model():\n    return "
                    "transformers.ElectraForPreTraining(transformers.ElectraConfig(vocab_size=64, embedding_size=16, "
                    "hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64))\n")
    r = run("inspect", electra)
    assert r.exit_code == 0, r.output
    assert "3 FFN region(s)" in r.output
    assert "  - discriminator_predictions: a task head, not a block's FFN" in r.output
    # a model file named without .py is Python too (it failed with "'NoneType' object has no attribute 'loader'")
    bare = tmp_path / "model_without_extension"
    bare.write_text((ROOT / "examples" / "gpt.py").read_text())
    r = run("inspect", str(bare))
    assert r.exit_code == 0 and "2 FFN region(s)" in r.output, r.output
    r = run("inspect", str(tmp_path))
    assert r.exit_code == 2 and r.output == f"error: model file {tmp_path} is a directory: pass the path to a .py " \
                                            "file that defines build_model()\n", r.output
    # nothing found and nothing skipped: why, as convert says it (it printed an empty table)
    cnn = write(tmp_path, "cnn.py", "import torch\ndef build_model():\n    return torch.nn.Sequential("
                "torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3))\n")
    r = run("inspect", cnn)
    assert r.exit_code == 0, r.output
    assert r.output == "Sequential: 0 FFN regions: no Linear layer was seen in the parts of the model that trace\n"


def test_convert_writes_plan_and_weights(tmp_path):
    out = tmp_path / "out"
    r = run("convert", GPT, "-o", str(out), "--num-experts", "4", "--top-k", "1", "--router", "switch")
    assert r.exit_code == 0, r.output
    assert "blocks.0.mlp.moe" in r.output and "function preserving" in r.output
    plan = json.loads((out / "plan.json").read_text())
    assert plan["config"]["router"] == "switch" and plan["config"]["num_experts"] == 4
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "model_source.py", "plan.json"]


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


NO_FFN = "import torch\ndef build_model():\n    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh())\n" \
         "def example_inputs():\n    return (torch.randn(2, 4),)\n"
RAISES = "raise RuntimeError('boom at import')\n"
NO_BUILD = "import torch\nmodel_factory = 3\n"
NO_EXAMPLES = "import torch\ndef build_model():\n    return torch.nn.Sequential(" \
              "torch.nn.Linear(4, 8), torch.nn.ReLU(), " \
              "torch.nn.Linear(8, 4))\n"


@pytest.mark.parametrize("source, extra, needle", [
    (None, [], "does not exist"),
    (RAISES, [], "raised while loading: RuntimeError: boom at import"),
    (NO_BUILD, [], "defines no 'build_model'"),
    ("", [], "defines no 'build_model': define build_model() returning the dense nn.Module, or name one after a "
             "colon (callables found: none)"),
    (NO_FFN, [], "no FFN region found"),
    (NO_EXAMPLES, [], "defines no example_inputs()"),
    # config errors in the CLI's spelling (the API's says MoEConfig.num_experts=1, top_k=1, router='topk')
    (NO_EXAMPLES, ["--num-experts", "1"], "error: --num-experts 1 is invalid"),
    (NO_EXAMPLES, ["--no-verify", "--router", "nope"], "--router nope is invalid"),
    (NO_EXAMPLES, ["--no-verify", "--router", "switch"], "--top-k 2 (the default) is invalid: the switch router is "
                                                         "top-1: set --top-k 1 or use --router topk"),
    (NO_EXAMPLES, ["--no-verify", "--router", "switch", "--top-k", "3"], "error: --top-k 3 is invalid: the switch"),
    # a --config file's value is named as the file spells it, and where it comes from
    (NO_EXAMPLES, ["--no-verify", "--config", "{tmp}/k0.json"], "error: top_k=0 (from {tmp}/k0.json) is invalid: use "
                                                                "an integer >= 1"),
    (NO_EXAMPLES, ["--no-verify", "--config", "{tmp}/k0.json", "--top-k", "-1"], "error: --top-k -1 is invalid"),
    (NO_EXAMPLES, ["--no-verify", "--config", "{tmp}/layers.json"], 'error: layers=[-1] (from {tmp}/layers.json) is '
                                                                    "invalid"),
    (NO_EXAMPLES, ["--no-verify", "--layers", "0", "--layers", "-1"], "error: --layers 0 --layers -1 is invalid"),
    (NO_EXAMPLES, ["--no-verify", "--config", "{tmp}/policy.json"], 'error: drop_policy="gate" (from '
                                                                    '{tmp}/policy.json) is invalid'),
    # the check names the factor that is set (it named capacity_factor, the default None, for either)
    (NO_EXAMPLES, ["--no-verify", "--router", "expert_choice", "--eval-capacity-factor", "1"],
     "error: --eval-capacity-factor 1.0 is invalid: expert_choice sets each expert's capacity itself"),
    # a file holding no JSON object: a TypeError (exit 1) once the file's keys were read for the messages
    (NO_EXAMPLES, ["--no-verify", "--config", "{tmp}/five.json"], "error: config file {tmp}/five.json holds a number, "
                                                                  "not a JSON object of MoEConfig fields"),
    (NO_EXAMPLES, ["--no-verify", "--config", "{tmp}/list.json", "--top-k", "1"], "holds an array, not a JSON object"),
    (NO_EXAMPLES, ["--no-verify", "--split-method", "cluster"], "set --init split"),
    (NO_EXAMPLES, ["--no-verify", "--config", "missing.json"], "config file missing.json does not exist"),
])
def test_bad_input_is_one_line_nonzero_and_writes_nothing(tmp_path, source, extra, needle):
    model = write(tmp_path, "model.py", source) if source is not None else str(tmp_path / "absent.py")
    out = tmp_path / "out"
    for name, text in {"k0": '{"top_k": 0}', "layers": '{"layers": [-1]}', "five": "5", "list": "[1]",
                       "policy": '{"drop_policy": "gate"}'}.items():
        (tmp_path / f"{name}.json").write_text(text)
    r = run("convert", model, "-o", str(out), *(a.format(tmp=tmp_path) for a in extra))
    assert r.exit_code == 2, r.output
    assert needle.format(tmp=tmp_path) in r.output
    assert r.output.strip().count("\n") == 0 and r.output.startswith("error: ")
    assert not out.exists()
    assert not any(p.name.startswith(".out.") for p in tmp_path.iterdir())  # no temp dirs left


def test_cli_spelling_names_where_the_value_came_from():
    from moeify.cli import cli_spelling

    origins = {"top_k": "the default", "num_experts": "from cfg.json"}.get
    message = "MoEConfig.top_k=2 is invalid: set top_k=1"
    assert cli_spelling(message, lambda name: origins(name, "")) == "--top-k 2 (the default) is invalid: set --top-k 1"
    message = "MoEConfig.num_experts=1 is invalid: use num_experts=2"
    assert cli_spelling(message, lambda name: origins(name, "")) == "num_experts=1 (from cfg.json) is invalid: use " \
                                                                    "--num-experts 2"


@pytest.mark.parametrize("args, needle", [
    (["convert", MLP_PATH, "-o", "{tmp}/o", "--top-k", "abc"], "'--top-k': 'abc' is not a valid integer"),
    (["convert", MLP_PATH, "-o", "{tmp}/afile"], "afile' is a file"),
    (["export", "{tmp}/nothere", "-o", "{tmp}/x.onnx"], "'OUT_DIR': Directory '{tmp}/nothere' does not exist"),
    (["export", "{tmp}", "-o", "{tmp}/x.onnx", "--mode", "bogus"], "'bogus' is not one of 'fused', 'portable'"),
    (["convert-checkpoint", MLP_PATH, "{tmp}/nothere.safetensors", "-o", "{tmp}/o"], "does not exist"),
    (["bogus"], "No such command 'bogus'"),
])
def test_argument_errors_click_finds_are_one_line_too(tmp_path, args, needle):
    (tmp_path / "afile").write_text("mine")
    r = run(*(a.format(tmp=tmp_path) for a in args))
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error: ") and r.output.strip().count("\n") == 0, r.output
    assert needle.format(tmp=tmp_path) in r.output and "--help` lists what it takes" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_existing_output_needs_force(tmp_path):
    model = write(tmp_path, "model.py", NO_EXAMPLES)
    out = tmp_path / "out"
    args = ("convert", model, "-o", str(out), "--no-verify", "--num-experts", "2", "--top-k", "1")
    assert run(*args).exit_code == 0
    (out / "extra.txt").write_text("left by the user")
    r = run(*args)
    assert r.exit_code == 2 and "--force" in r.output
    assert (out / "extra.txt").exists()
    r = run(*args, "--force")
    assert r.exit_code == 0, r.output
    assert not (out / "extra.txt").exists() and (out / "plan.json").exists()


@pytest.mark.parametrize("target, needle", [
    ("other", "holds no plan.json, so it is no moeify output"),
    (".", "the working directory or one of its parents"),
    ("..", "the working directory or one of its parents"),
    ("link", "is a symbolic link"),
    ("afile/out", "is a file, so afile/out cannot be created under it"),
    ("a" * 300, "File name too long"),
])
def test_force_replaces_only_a_moeify_output(tmp_path, monkeypatch, target, needle):
    model = write(tmp_path, "model.py", NO_EXAMPLES)
    work = tmp_path / "work"
    (work / "other").mkdir(parents=True)
    (work / "other" / "data.txt").write_text("precious")
    (work / "afile").write_text("a file")
    (work / "link").symlink_to(work / "other")
    monkeypatch.chdir(work)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    r = run("convert", model, "-o", target, "--no-verify", "--force")
    assert r.exit_code == 2, r.output
    assert needle in r.output and r.output.count("\n") == 1
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing deleted, nothing left


def test_outputs_get_the_umask_modes(tmp_path):
    import os

    model = write(tmp_path, "model.py", NO_EXAMPLES)
    old = os.umask(0o027)
    try:
        assert run("convert", model, "-o", str(tmp_path / "out"), "--no-verify", "--num-experts", "2").exit_code == 0
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o750  # mkdtemp made it 0o700
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()} == {0o640}


def test_unexpected_error_is_one_line_exit_1(tmp_path):
    bad_inputs = NO_EXAMPLES + "def example_inputs():\n    return (torch.randn(2, 7),)\n"
    r = run("convert", write(tmp_path, "model.py", bad_inputs), "-o", str(tmp_path / "out"))
    assert r.exit_code in (1, 2) and r.output.startswith("error: ") and r.output.count("\n") == 1, r.output
    assert not (tmp_path / "out").exists()


def test_debug_shows_traceback(tmp_path):
    args = ["convert", str(tmp_path / "absent.py"), "-o", str(tmp_path / "o")]
    r = CliRunner().invoke(main, ["--debug", *args])
    # the typed error itself propagates (with its traceback), not the one-line exit 2 of the default mode
    assert r.exit_code != 0 and isinstance(r.exception, ModelSourceError), repr(r.exception)
    assert r.exc_info[2] is not None
    plain = CliRunner().invoke(main, args)
    assert plain.exit_code == 2 and isinstance(plain.exception, SystemExit)


def test_help_and_argument_errors_come_before_torch_loads():
    """`import moeify` and the CLI module load no torch (the public names load on first use): `moeify
    --help` answers at once and a Ctrl-C while torch loads inside a command is click's "Aborted!", not a
    traceback from the import. The functions `moeify.convert` / `moeify.distill` stay functions after
    their modules are imported."""
    import subprocess
    import sys

    probe = ("import sys, moeify, moeify.cli; assert 'torch' not in sys.modules, 'torch loaded'; "
             "import moeify.convert, moeify.distill; "
             "assert callable(moeify.convert) and moeify.convert.__module__ == 'moeify.convert'; "
             "assert moeify.distill.__name__ == 'distill' and moeify.MoEConfig.__name__ == 'MoEConfig'; "
             "assert sorted(moeify.__all__) == sorted(moeify._PUBLIC) and set(moeify.__all__) <= set(dir(moeify)); "
             # submodules the README calls through the package after a plain `import moeify`
             "assert callable(moeify.ooc.convert_checkpoint) and callable(moeify.plots.plot_utilization); "
             "assert callable(moeify.inference.open_session); "
             "assert not hasattr(moeify, 'nosuch') and not hasattr(moeify, '_private')")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_every_config_field_is_an_option():
    import dataclasses

    from moeify.config import MoEConfig

    help_text = run("convert", "--help").output
    flat = " ".join(help_text.split())  # click wraps the help
    for f in dataclasses.fields(MoEConfig):
        if f.name != "version":
            assert "--" + f.name.replace("_", "-") in help_text
            # each says what it does, not only its name (it was "MoEConfig.targets (default ())")
            assert len(f.metadata["help"].split()) >= 4 and " ".join(f.metadata["help"].split()[:4]) in flat, f.name


def test_none_on_the_command_line_overrides_a_config_files_value(tmp_path):
    """Fields that may be None take `none` (any case) or `null`: `--expert-dropout None` was 'not a valid float',
    so a --config file's value could not be reset from the command line."""
    from moeify.cli import build_config, main

    option = {p.name: p for p in main.commands["convert"].params}
    def parse(name, text):
        return option[name].type.convert(text, option[name], None)

    (tmp_path / "c.json").write_text(json.dumps({"expert_dropout": 0.1, "capacity_factor": 1.25, "num_groups": 2,
                                                 "num_experts": 8}))
    given = {"expert_dropout": parse("expert_dropout", "None"), "capacity_factor": parse("capacity_factor", "null"),
             "num_groups": parse("num_groups", "none")}
    cfg = build_config(str(tmp_path / "c.json"), given)
    assert (cfg.expert_dropout, cfg.capacity_factor, cfg.num_groups, cfg.num_experts) == (None, None, None, 8)
    kept = build_config(str(tmp_path / "c.json"), {"expert_dropout": None})  # not given: the file's value
    assert (kept.expert_dropout, kept.capacity_factor) == (0.1, 1.25)
    assert parse("capacity_factor", "inf") == float("inf") and parse("num_groups", "4") == 4
    r = run("convert", MLP, "-o", str(tmp_path / "o"), "--capacity-factor", "lots")
    assert r.exit_code == 2 and "'lots' is not a number or none" in r.output and not (tmp_path / "o").exists()


MLP = str(ROOT / "examples" / "mlp.py")


@pytest.fixture(scope="module")
def mlp_out(tmp_path_factory):
    """The MLP example converted once by the CLI (4 experts, top-2), for the tests that only read it."""
    out = tmp_path_factory.mktemp("mlp") / "out"
    assert run("convert", MLP, "-o", str(out), "--num-experts", "4", "--top-k", "2").exit_code == 0
    return out


def test_export_fused_and_refusal_without_file(tmp_path, mlp_out):
    out = mlp_out
    onnx_path = tmp_path / "m.onnx"
    r = run("export", str(out), "-o", str(onnx_path), "--mode", "fused")
    assert r.exit_code == 0, r.output
    assert onnx_path.is_file()
    import onnx

    ops = [n.op_type for n in onnx.load(str(onnx_path)).graph.node if n.domain == "com.microsoft"]
    assert ops == ["MoE", "MoE"]
    before = onnx_path.stat().st_mtime_ns
    r = run("export", str(out), "-o", str(onnx_path), "--mode", "fused")  # an existing file needs --force
    assert r.exit_code == 2 and "--force" in r.output and onnx_path.stat().st_mtime_ns == before
    assert run("export", str(out), "-o", str(onnx_path), "--mode", "fused", "--force").exit_code == 0
    assert onnx_path.stat().st_mtime_ns != before
    gelu = tmp_path / "gpt"
    assert run("convert", GPT, "-o", str(gelu), "--num-experts", "2", "--top-k", "1").exit_code == 0
    r = run("export", str(gelu), "-o", str(tmp_path / "g.onnx"), "--mode", "fused")
    assert r.exit_code == 2 and "gelu" in r.output.lower() and r.output.startswith("error: ")
    assert not (tmp_path / "g.onnx").exists()


def test_export_external_data(tmp_path, mlp_out):
    out = mlp_out
    r = run("export", str(out), "-o", str(tmp_path / "m.onnx"), "--external-data")
    assert r.exit_code == 0, r.output
    assert "m.onnx.data beside m.onnx" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert run("export", str(out), "-o", str(tmp_path / "s.onnx"), "--single-file").exit_code == 0
    assert not (tmp_path / "s.onnx.data").exists()


def test_export_names_the_graphs_outputs(tmp_path, mlp_out):
    import onnx

    out = mlp_out
    r = run("export", str(out), "-o", str(tmp_path / "m.onnx"), "--output-name", "scores")
    assert r.exit_code == 0, r.output
    assert [o.name for o in onnx.load(str(tmp_path / "m.onnx")).graph.output] == ["scores"]
    assert "outputs: scores[batch, " in r.output
    r = run("export", str(out), "-o", str(tmp_path / "n.onnx"), "--output-name", "a", "--output-name", "b")
    assert r.exit_code == 2 and r.output.startswith("error: output_names has 2 name(s) but the model returns 1")
    assert not (tmp_path / "n.onnx").exists()


def test_export_and_stats_take_the_weights_of_a_later_checkpoint(tmp_path, mlp_out):
    """--weights: the plan from OUT_DIR, the weights of a checkpoint written after training (a folder
    holding model.safetensors, as save_pretrained writes); the ONNX model computes the trained model."""
    import onnxruntime as ort
    from safetensors.torch import save_file

    import moeify
    from tests.conftest import load_example

    out = mlp_out
    trained = moeify.load(out).model.eval()
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.05 * torch.randn_like(p))
    (tmp_path / "ckpt").mkdir()
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, tmp_path / "ckpt" / "model.safetensors")
    for weights, name in ((["--weights", str(tmp_path / "ckpt")], "trained.onnx"), ([], "plan.onnx")):
        r = run("export", str(out), "-o", str(tmp_path / name), *weights)
        assert r.exit_code == 0, r.output
    (x,) = load_example("mlp").example_inputs()
    with torch.no_grad():
        want = trained(x).numpy()
    got = {name: ort.InferenceSession(str(tmp_path / name), providers=["CPUExecutionProvider"]).run(
        None, {"x": x.numpy()})[0] for name in ("trained.onnx", "plan.onnx")}
    assert abs(got["trained.onnx"] - want).max() < 1e-5 < abs(got["plan.onnx"] - want).max()
    r = run("stats", str(out), "--weights", str(tmp_path / "nowhere"))
    assert r.exit_code == 2 and r.output.startswith("error: ") and "nowhere" in r.output
    assert run("stats", str(out), "--weights", str(tmp_path / "ckpt")).exit_code == 0


BF16_MLP = ("import torch\nfrom torch import nn\n\n\ndef build_model():\n    torch.manual_seed(0)\n"
            "    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)).bfloat16()\n\n\n"
            "def example_inputs():\n    return (torch.randn(4, 8).bfloat16(),)\n")


def test_export_of_a_bfloat16_conversion_goes_through_float32(tmp_path):
    """The CLI cannot call model.float() for the user: it exports the loaded copy in float32 and says so."""
    out = tmp_path / "out"
    assert run("convert", write(tmp_path, "bf16.py", BF16_MLP), "-o", str(out), "--num-experts", "2").exit_code == 0
    r = run("export", str(out), "-o", str(tmp_path / "m.onnx"))
    assert r.exit_code == 0, r.output
    assert "the saved weights are bfloat16: exported in float32" in r.output
    import onnx

    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    assert {t.data_type for t in graph.initializer} - {onnx.TensorProto.INT64} == {onnx.TensorProto.FLOAT}


def test_export_dtype_float16_casts_the_weights_and_inputs_keeping_the_routers_float32(tmp_path):
    """`moeify export --dtype float16`: the graph takes and returns float16, holds the experts in float16 and
    the router in float32, and runs on onnxruntime like the float16 PyTorch model."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    out = tmp_path / "out"
    assert run("convert", write(tmp_path, "bf16.py", BF16_MLP), "-o", str(out), "--num-experts", "2").exit_code == 0
    r = run("export", str(out), "-o", str(tmp_path / "m.onnx"), "--dtype", "float16")
    assert r.exit_code == 0, r.output
    assert "the saved weights are bfloat16: exported in float16" in r.output
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    kinds = {t.name: t.data_type for t in graph.initializer}
    assert kinds["moe.router.gate.weight"] == onnx.TensorProto.FLOAT
    assert kinds["moe.experts.w1_EFD"] == kinds["moe.experts.w2_EDF"] == onnx.TensorProto.FLOAT16
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert [i.type for i in session.get_inputs()] == [o.type for o in session.get_outputs()] == ["tensor(float16)"]
    model = moeify.load(out).model.half()  # the reference written out, not export's own cast_model
    for layer in moeify.moe_layers(model).values():
        layer.router.float()
    x = torch.randn(3, 8).half()
    with torch.no_grad():
        want = model(x).float().numpy()
    got = session.run(None, {"input": x.numpy()})[0].astype(np.float32)
    assert np.abs(got - want).max() <= 2 * torch.finfo(torch.float16).eps * np.abs(want).max()
    assert run("export", str(out), "-o", str(tmp_path / "b.onnx"), "--dtype", "bfloat16").exit_code == 2


def test_convert_checkpoint_out_of_core_matches_in_memory(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from tests.conftest import load_example

    dense = load_example("llama").build_model()
    ckpt = tmp_path / "dense.safetensors"
    save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, str(ckpt))
    llama = str(ROOT / "examples" / "llama.py")
    args = ["--num-experts", "4", "--top-k", "2"]
    r = run("convert-checkpoint", llama, str(ckpt), "-o", str(tmp_path / "ooc"), *args)
    assert r.exit_code == 0, r.output
    assert run("convert", llama, "-o", str(tmp_path / "mem"), *args).exit_code == 0
    a = load_file(str(tmp_path / "ooc" / "model.safetensors"))
    b = load_file(str(tmp_path / "mem" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a sharded checkpoint, given as its folder: the same output
    state = load_file(str(ckpt))
    keys = sorted(state)
    (tmp_path / "sharded").mkdir()
    halves = {"a.safetensors": keys[::2], "b.safetensors": keys[1::2]}
    for name, part in halves.items():
        save_file({k: state[k] for k in part}, str(tmp_path / "sharded" / name))
    weight_map = {k: name for name, part in halves.items() for k in part}
    (tmp_path / "sharded" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    r = run("convert-checkpoint", llama, str(tmp_path / "sharded"), "-o", str(tmp_path / "ooc_sharded"), *args)
    assert r.exit_code == 0, r.output
    c = load_file(str(tmp_path / "ooc_sharded" / "model.safetensors"))
    assert c.keys() == b.keys() and all(torch.equal(c[k], b[k]) for k in c)


def test_convert_checkpoint_runs_the_model_file_once(tmp_path):
    """The file ran twice (once for example_inputs(), again for the model): import-time work and side effects
    happened twice."""
    from safetensors.torch import save_model

    counter = tmp_path / "runs.txt"
    model_py = write(tmp_path, "m.py", f"import pathlib, torch\nfrom torch import nn\n"
                     f"p = pathlib.Path({str(counter)!r}); p.write_text(p.read_text() + 'x' if p.exists() else 'x')\n"
                     "def build_model():\n    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))\n"
                     "def example_inputs():\n    return (torch.randn(3, 8),)\n")
    save_model(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)), str(tmp_path / "d.safetensors"))
    r = run("convert-checkpoint", model_py, str(tmp_path / "d.safetensors"), "-o", str(tmp_path / "o"),
            "--num-experts", "2")
    assert r.exit_code == 0, r.output
    assert counter.read_text() == "x"


def test_model_file_imports_its_siblings(tmp_path):
    (tmp_path / "layers.py").write_text("import torch\nclass MLP(torch.nn.Sequential):\n    def __init__(self):\n"
                                        "        super().__init__(torch.nn.Linear(4, 8), torch.nn.ReLU(), "
                                        "torch.nn.Linear(8, 4))\n")
    model = write(tmp_path, "model.py", "from layers import MLP\ndef build_model():\n    return MLP()\n")
    r = run("convert", model, "-o", str(tmp_path / "out"), "--no-verify", "--num-experts", "2")
    assert r.exit_code == 0, r.output
    import sys

    import moeify

    assert str(tmp_path) not in sys.path  # only while the file loads and builds
    sys.modules.pop("layers", None)
    # the saved copy (out/model_source.py) imports them from the original's folder
    assert moeify.load(tmp_path / "out").model is not None
    sys.modules.pop("layers", None)


def test_cli_spelling_of_config_fields_in_messages():
    from moeify.cli import cli_spelling

    assert cli_spelling("convert with capacity_factor=None (dropless); preserve_scale=False") == \
        "convert with no --capacity-factor (dropless); --no-preserve-scale"
    assert cli_spelling("group_top_k=3 and num_layers=2, dynamic=False") == "--group-top-k 3 and num_layers=2, " \
                                                                            "dynamic=False"  # not config fields


def test_stats_and_export_without_example_inputs_say_what_works_there(tmp_path):
    """They suggested --no-verify, an option of convert only; stats checks its --plot path before the work."""
    model = write(tmp_path, "model.py", NO_EXAMPLES)
    out = tmp_path / "out"
    assert run("convert", model, "-o", str(out), "--no-verify", "--num-experts", "2", "--top-k", "1").exit_code == 0
    for args in (("stats", str(out)), ("export", str(out), "-o", str(tmp_path / "m.onnx"))):
        r = run(*args)
        assert r.exit_code == 2 and "defines no example_inputs()" in r.output, r.output
        assert "--no-verify" not in r.output and "in Python, run moeify.router_stats or moeify.export_onnx" in r.output
    r = run("stats", str(out), "--plot", str(tmp_path / "util.txt"))
    assert r.exit_code == 2 and r.output == f"error: plot path {tmp_path / 'util.txt'} must end in .png: moeify " \
                                            "writes PNG images\n", r.output


def test_export_takes_dynamic_axes_and_atol(tmp_path, mlp_out):
    """The README's fix for inputs whose axes are guessed wrong (dynamic_axes) had no CLI spelling."""
    out = mlp_out
    r = run("export", str(out), "-o", str(tmp_path / "m.onnx"), "--dynamic-axes", '{"x": {"0": "rows"}}')
    assert r.exit_code == 0, r.output
    assert "inputs: x[rows, 16]" in r.output
    r = run("export", str(out), "-o", str(tmp_path / "s.onnx"), "--dynamic-axes", '{"x": {}}')
    assert r.exit_code == 0 and "no dynamic axis: checked at the example shape only" in r.output, r.output
    r = run("export", str(out), "-o", str(tmp_path / "n.onnx"), "--dynamic-axes", '{"x": [0]}')
    assert r.exit_code == 2 and r.output.startswith("error: --dynamic-axes '{\"x\": [0]}' is not a JSON object")
    r = run("export", str(out), "-o", str(tmp_path / "n.onnx"), "--atol", "0")  # float32 rounding: ~1e-7
    assert r.exit_code == 2 and "(> atol 0)" in r.output, r.output
    assert not (tmp_path / "n.onnx").exists()
    r = run("export", str(out), "-o", str(tmp_path / "n.onnx"), "--atol", "-1")  # refused before exporting
    assert r.exit_code == 2 and r.output == ("error: atol=-1.0 is invalid (CLI: --atol): use a finite number >= 0, "
                                             "the largest |onnxruntime - PyTorch| the check accepts\n"), r.output
    assert not (tmp_path / "n.onnx").exists()


def test_an_empty_output_path_is_named_as_such(tmp_path, monkeypatch):
    """-o '' said that the working directory already exists."""
    monkeypatch.chdir(tmp_path)
    for args in (("convert", MLP, "-o", ""), ("export", str(tmp_path), "-o", "")):
        r = run(*args)
        assert r.exit_code == 2, r.output
        assert r.output == "error: the output path is empty: name the output to write (-o PATH)\n", r.output
    assert list(tmp_path.iterdir()) == []


def test_export_static_with_dynamic_axes_is_refused_naming_the_flags(tmp_path):
    """It named only the API's dynamic_axes and dynamic=False, after loading the conversion."""
    r = run("export", str(tmp_path), "-o", str(tmp_path / "m.onnx"), "--static", "--dynamic-axes", '{"x": {"0": "b"}}')
    assert r.exit_code == 2 and r.output == ("error: dynamic_axes was given with dynamic=False (CLI: --dynamic-axes "
                                             "with --static), which fixes every axis: drop one of them\n"), r.output
    assert list(tmp_path.iterdir()) == []  # refused before reading the (here empty) conversion folder


def test_a_reader_that_goes_away_stops_the_command_quietly():
    """`moeify inspect model.py | head -1`: the closed pipe was reported as an unforeseen error (exit 1);
    now the command stops as cat does, with SIGPIPE's status and nothing on stderr."""
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-m", "moeify.cli", "inspect", str(ROOT / "examples" / "gpt.py")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    p.stdout.close()  # before the command writes its first line
    err = p.stderr.read()
    assert p.wait() == 141 and err == b"", err
