"""Shared test helpers: load an example module by name (examples/ is not a package)."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def load_example(name: str):
    path = ROOT / "examples" / f"{name}.py"
    mod_name = f"_example_{name}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    spec.loader.exec_module(module)
    return module


def enable_checkpointing(model, reentrant: bool) -> None:
    """transformers' gradient checkpointing under its current name (the old one warns: gone in v6)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})


@pytest.fixture
def example():
    return load_example


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny test tensors run faster on one thread, and CI's two cores stay free for multi-process tests."""
    torch.set_num_threads(1)
