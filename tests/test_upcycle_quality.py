"""benchmarks/upcycle_quality.py runs end to end and writes its outputs (the pipeline, not the quality claim)."""

import importlib.util
import json
import math

import pytest
import torch

from tests.conftest import ROOT

OUTPUTS = ("upcycle_quality.json", "upcycle_quality.txt", "loss_curves.png", "upcycle_utilization.png")


def load_benchmark(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # as when run as a script: benchutil beside it
    spec = importlib.util.spec_from_file_location("_bench_upcycle_quality", ROOT / "benchmarks" / "upcycle_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(tmp_path, monkeypatch, extra):
    """A --quick run with the repository root moved to tmp_path: its default results folder is
    benchmarks/results/quick there (a pipeline check replaced the full run's committed results)."""
    bench = load_benchmark(monkeypatch)
    monkeypatch.setattr(bench, "RESULTS", tmp_path / "benchmarks" / "results")
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--quick", "--threads", "1", *extra]) == 0
    finally:
        torch.set_num_threads(threads)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["benchmarks"]
    assert [p.name for p in (tmp_path / "benchmarks" / "results").iterdir()] == ["quick"]
    tmp_path = tmp_path / "benchmarks" / "results" / "quick"
    for name in OUTPUTS:
        assert (tmp_path / name).is_file() and (tmp_path / name).stat().st_size > 0, name
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind
    return bench, json.loads((tmp_path / "upcycle_quality.json").read_text())


def check_payload(bench, data, seeds, n, m):
    assert data["seeds_done"] == seeds and len(data["runs"]) == seeds
    for run_ in data["runs"]:
        curves = run_["curves"]
        assert curves["pretrain"]["steps"][0] == 0 and curves["pretrain"]["steps"][-1] == n
        for arm in ("dense", "upcycled_top2", "upcycled_switch", "distilled"):
            assert curves[arm]["steps"][0] == n and curves[arm]["steps"][-1] == n + m, arm
        assert curves["moe_scratch"]["steps"][0] == 0 and curves["moe_scratch"]["steps"][-1] == n + m
        assert all(math.isfinite(v) for c in curves.values() for v in c["values"])
        assert set(run_["tokens_per_s"]) >= set(bench.ARMS) and all(v > 0 for v in run_["tokens_per_s"].values())
        # upcycling with init=copy is function preserving: the arms start where the dense checkpoint ended
        assert curves["upcycled_top2"]["values"][0] == pytest.approx(curves["pretrain"]["values"][-1], abs=1e-4)
        assert run_["params"]["upcycled_top2"]["total"] > run_["params"]["dense"]
    for arm in bench.ARMS:
        assert arm in data["summary"] and math.isfinite(data["summary"][arm]["mean"])
    assert data["corpus"]["train_bytes"] > 0 and data["corpus"]["val_bytes"] > 0


def test_tiny_pipeline_writes_outputs(tmp_path, monkeypatch):
    extra = ["--dense-steps", "2", "--moe-steps", "2", "--eval-every", "2", "--eval-windows", "2",
             "--corpus-bytes", "20000", "--seeds", "2"]
    bench, data = run(tmp_path, monkeypatch, extra)
    check_payload(bench, data, seeds=2, n=2, m=2)
    text = (tmp_path / "benchmarks" / "results" / "quick" / "upcycle_quality.txt").read_text()
    assert "(b) upcycled top-2 beats (a)" in text and "distillation" in text


@pytest.mark.slow
def test_quick_mode_writes_outputs(tmp_path, monkeypatch):
    bench, data = run(tmp_path, monkeypatch, [])
    q = bench.QUICK
    check_payload(bench, data, seeds=q["seeds"], n=q["dense_steps"], m=q["moe_steps"])
