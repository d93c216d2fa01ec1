"""moeify.plots: utilisation shares against an independent top-k count, PNG outputs, bad input."""

import subprocess
import sys

import numpy as np
import pytest
import torch

import moeify
from moeify.errors import ConfigError
from moeify.plots import plot_loss_curves, plot_utilization, plot_utilization_from_dir, utilization_matrix
from moeify.stats import LayerStats
from tests.conftest import ROOT, load_example

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def is_png(path):
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC


def test_matrix_from_stats_rows_is_share_of_assignments():
    rows = [LayerStats("a", [3, 1, 0, 4], 4, 0.0, 1.0, [3, 1, 0, 4]),
            LayerStats("b", [2, 2, 2, 2], 4, 0.0, 1.0, [2, 2, 2, 2])]
    names, share = utilization_matrix(rows)
    assert names == ["a", "b"]
    for row, got in zip(rows, share, strict=True):
        counts = np.array(row.tokens_per_expert, dtype=float)
        np.testing.assert_allclose(got, counts / counts.sum())


@pytest.mark.parametrize("router,top_k", [("topk", 2), ("switch", 1)])
def test_heatmap_of_converted_gpt_matches_independent_topk_count(tmp_path, router, top_k):
    gpt = load_example("gpt")
    model = moeify.convert(gpt.build_model(), moeify.MoEConfig(num_experts=4, top_k=top_k, router=router)).model
    layers = moeify.moe_layers(model)
    with torch.no_grad():  # spread the routers so several experts get tokens
        for layer in layers.values():
            layer.router.gate.weight.normal_(0, 1.0)
    seen = {}
    hooks = [layer.router.register_forward_hook(lambda m, args, out, n=name: seen.__setitem__(n, args[0].detach()))
             for name, layer in layers.items()]
    model.eval()
    with torch.no_grad():
        model(*gpt.example_inputs())
    for h in hooks:
        h.remove()
    names, share = utilization_matrix(model)
    assert names == list(layers)
    for name, got in zip(names, share, strict=True):
        x = seen[name].double().numpy()
        logits = x @ layers[name].router.gate.weight.detach().double().numpy().T
        chosen = np.argsort(-logits, axis=1)[:, :top_k]  # softmax is monotone: top-k of the logits
        want = np.bincount(chosen.ravel(), minlength=4) / chosen.size
        np.testing.assert_allclose(got, want, atol=1e-12)
    out = plot_utilization(model, tmp_path / "sub" / "util.png")
    assert is_png(out) and not list(out.parent.glob(".*"))  # no temporary file left behind


def test_heatmap_from_saved_conversion_uses_its_example_inputs(tmp_path):
    gpt = load_example("gpt")
    result = moeify.convert(gpt.build_model(), moeify.MoEConfig(num_experts=4, top_k=2))
    result.source = {"kind": "file", "target": str(ROOT / "examples" / "gpt.py"), "name": "build_model"}
    moeify.save(result, tmp_path / "out")
    assert is_png(plot_utilization_from_dir(tmp_path / "out", tmp_path / "util.png"))
    assert is_png(plot_utilization_from_dir(tmp_path / "out", tmp_path / "util2.png",
                                            inputs=(torch.zeros(1, 5, dtype=torch.long),)))
    result.source = None
    moeify.save(result, tmp_path / "nosource")
    with pytest.raises(moeify.MoeifyError, match="source"):
        plot_utilization_from_dir(tmp_path / "nosource", tmp_path / "util3.png")


def test_loss_curves_with_seed_bands(tmp_path):
    curves = {"dense": {"steps": [0, 10, 20], "values": [[3.0, 2.5, 2.2], [3.1, 2.6, 2.1]]},
              "moe": {"steps": [0, 10, 20], "values": [3.0, 2.4, 2.0]}}
    assert is_png(plot_loss_curves(curves, tmp_path / "loss.png", marks={"upcycle": 10}))
    assert is_png(plot_loss_curves(curves, tmp_path / "zoom.png", marks={"upcycle": 10}, zoom_from=10))


@pytest.mark.parametrize("call,match", [
    (lambda p: plot_loss_curves({}, p / "x.png"), "no curves"),
    (lambda p: plot_loss_curves({"a": {"steps": [0, 1], "values": [1.0]}}, p / "x.png"), "one value per step"),
    (lambda p: plot_loss_curves({"a": {"steps": [0], "values": [1.0]}}, p / "x.jpg"), r"\.png"),
    (lambda p: plot_utilization(load_example("mlp").build_model(), p / "x.png"), "no MoE layer"),
    (lambda p: plot_utilization([LayerStats("a", [1, 1], 2, 0.0, 0.0, [1, 1]),
                                 LayerStats("b", [1, 1, 1], 3, 0.0, 0.0, [1, 1, 1])], p / "x.png"),
     "different expert counts"),
])
def test_bad_input_is_a_typed_error(tmp_path, call, match):
    with pytest.raises(ConfigError, match=match):
        call(tmp_path)


def test_import_has_no_matplotlib_side_effect():
    code = "import sys, moeify.plots; sys.exit('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_missing_matplotlib_is_a_typed_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import raise ImportError
    with pytest.raises(moeify.MoeifyError, match="pip install matplotlib"):
        plot_loss_curves({"a": {"steps": [0], "values": [1.0]}}, tmp_path / "x.png")


def test_unwritable_plot_path_is_a_typed_error_and_leaves_nothing(tmp_path):
    from moeify.errors import SerializationError

    (tmp_path / "afile").write_text("a file")
    curves = {"a": {"steps": [0, 1], "values": [1.0, 0.5]}}
    with pytest.raises(SerializationError, match="afile is a file, so .* cannot be created under it"):
        plot_loss_curves(curves, tmp_path / "afile" / "x.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
    assert plot_loss_curves(curves, tmp_path / "new" / "x.png").stat().st_size > 0
