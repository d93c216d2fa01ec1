"""Helpers shared by the benchmark scripts: this process's memory counters, and the results file."""

from __future__ import annotations

import os
from pathlib import Path


def status_bytes(field: str) -> int:
    """`field` of /proc/self/status (e.g. "VmRSS", "VmHWM") in bytes, or -1 where it is unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return -1


def write_results(path: str | os.PathLike, text: str) -> Path:
    """Write a results file whole or not at all: a temporary name in the same folder, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def cuda_graph_of(step):
    """`step` (a fwd+bwd with no host sync) captured as a CUDA graph; returns the graph's replay. Warmed up on a
    side stream first, as capture requires; the step's grads then live in the graph's memory, and each replay
    recomputes them from the same input tensors."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay
