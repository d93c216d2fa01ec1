"""An offline English corpus for quality experiments: the docstrings of Python's standard library.

Why this text: it is real English prose written by people (with some code examples mixed in), it
ships with every Python interpreter, so a fresh CI machine has it after installing nothing, and it
is deterministic for a given Python version (the corpus records the version and a sha256).

What exactly: every ``*.py`` file under ``sysconfig.get_paths()["stdlib"]`` in sorted path order,
skipping ``site-packages``, test suites (``test``/``tests``/``idle_test`` directories) and files that
do not parse; from each, the module, class and function docstrings in source order, cleaned with
``inspect.cleandoc``, kept when at least `min_chars` long and pure ASCII. Docstrings are joined
with a blank line. Split: docstring number ``i`` goes to validation when ``i % val_every ==
val_every - 1``, to training otherwise, so both halves span the whole library. Tokens are bytes
(vocab 256).
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from moeify.errors import ConfigError

SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


@dataclass(frozen=True)
class Corpus:
    """Train/validation bytes (uint8 tensors) and where they came from."""

    train: torch.Tensor
    val: torch.Tensor
    description: dict

    def __post_init__(self) -> None:
        if self.train.numel() < 2 or self.val.numel() < 2:
            raise ConfigError("the corpus has fewer than 2 train or validation bytes: raise max_bytes")


def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, UnicodeDecodeError):
        return []  # a few stdlib files are templates or use newer syntax: not part of the corpus
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    nodes.sort(key=lambda n: getattr(n, "lineno", 0))  # source order, module docstring first
    out = []
    for node in nodes:
        doc = ast.get_docstring(node, clean=False)
        if doc:
            out.append(inspect.cleandoc(doc))
    return out


def stdlib_files(root: Path | None = None) -> list[Path]:
    root = Path(root or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise ConfigError(f"the Python standard library directory {root} does not exist: pass another root")
    return [p for p in sorted(root.rglob("*.py")) if not SKIP_DIRS & set(p.relative_to(root).parts[:-1])]


def stdlib_docstrings(max_bytes: int = 4_000_000, *, min_chars: int = 200, val_every: int = 10,
                      root: Path | None = None) -> Corpus:
    """The standard library's docstrings as byte tokens, cut at `max_bytes` in file order."""
    if max_bytes < 1000:
        raise ConfigError(f"max_bytes={max_bytes} is too small for a corpus: use at least 1000")
    if val_every < 2:
        raise ConfigError(f"val_every={val_every} must be >= 2 (every val_every-th docstring is validation)")
    docs: list[str] = []
    total = 0
    files = stdlib_files(root)
    used_files = 0
    for path in files:
        if total >= max_bytes:
            break
        used_files += 1
        for doc in _docstrings(path):
            if len(doc) >= min_chars and doc.isascii():
                docs.append(doc)
                total += len(doc) + 2
    train_docs = [d for i, d in enumerate(docs) if i % val_every != val_every - 1]
    val_docs = [d for i, d in enumerate(docs) if i % val_every == val_every - 1]
    train_b = "\n\n".join(train_docs).encode("ascii")
    val_b = "\n\n".join(val_docs).encode("ascii")
    description = {
        "source": "docstrings of the Python standard library (module, class, function), ASCII, >= "
                  f"{min_chars} chars, sorted file order, first ~{max_bytes} bytes",
        "stdlib": str(root or sysconfig.get_paths()["stdlib"]), "python": sys.version.split()[0],
        "files_read": used_files, "docstrings": len(docs), "split": f"docstring i is validation iff i % {val_every} "
        f"== {val_every - 1}", "train_bytes": len(train_b), "val_bytes": len(val_b),
        "sha256": hashlib.sha256(train_b + b"\0" + val_b).hexdigest(), "tokenizer": "bytes (vocab 256)",
    }
    as_tensor = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8).clone()  # noqa: E731
    return Corpus(as_tensor(train_b), as_tensor(val_b), description)


def batch_at(data: torch.Tensor, step: int, *, batch_size: int, seq_len: int, seed: int) -> torch.Tensor:
    """The (batch_size, seq_len) int64 windows for training step `step`.

    A pure function of (seed, step): every arm of an experiment that reaches step t sees the same
    tokens, whatever it did before.
    """
    if data.numel() <= seq_len:
        raise ConfigError(f"seq_len={seq_len} is longer than the data ({data.numel()} bytes): use a shorter seq_len")
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, data.numel() - seq_len, (batch_size,), generator=g)
    return torch.stack([data[s:s + seq_len] for s in starts.tolist()]).long()


def eval_windows(data: torch.Tensor, *, num: int, seq_len: int) -> torch.Tensor:
    """`num` evenly spaced, non-overlapping (where possible) windows: the fixed validation set."""
    if data.numel() <= seq_len:
        raise ConfigError(f"seq_len={seq_len} is longer than the validation data ({data.numel()} bytes)")
    stride = max(1, (data.numel() - seq_len) // num)
    return torch.stack([data[i * stride:i * stride + seq_len] for i in range(num)]).long()
