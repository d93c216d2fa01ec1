"""Reusable CPU memory for the stacked expert weight gradients that the loop backward returns.

Autograd hands a parameter the gradient tensor a backward returns (it takes it over when nothing
else holds it), and `optimizer.zero_grad()` drops it again before the next step. A stacked expert
gradient is E times a dense weight (32 MiB at d_model 512, d_ff 2048, 8 experts in float32), and
glibc maps a block that large fresh for every allocation and unmaps it on free: every step the
kernel faults those pages in and zeroes them before the backward may write them. On the 2-core
benchmark machine that costs about 8 ms per 32 MiB against 1 ms to write warm pages, more than the
matmuls that fill the buffer when each expert has few tokens (see benchmarks/results/moe_layer.txt).

`GradBuffers` keeps the pages of each buffer it handed out and gives them out again once the
tensor built on them is gone. It watches each tensor through a weak reference to its storage, so it
never keeps a gradient alive and never hands out memory that anyone can still see.
"""

from __future__ import annotations

import mmap
import threading
from collections.abc import Sequence

import torch
from torch.multiprocessing.reductions import StorageWeakRef

# Below this size glibc recycles freed blocks from its heap: nothing to gain.
MIN_BYTES = 1 << 20
# Buffers one experts module keeps at most (w1, w2, w3 need three; the rest covers gradients the
# user still holds when the next backward runs). Past it, buffers come from the allocator.
MAX_SLOTS = 8
# The attribute of a weight tensor that holds its own pool (see `GradBuffers.of_weight`).
WEIGHT_ATTR = "_moeify_grad_buffers"


class _Slot:
    """One anonymous mapping and a weak reference to the storage currently built on it."""

    def __init__(self, nbytes: int) -> None:
        flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
        self.memory = mmap.mmap(-1, nbytes, flags=flags) if flags else mmap.mmap(-1, nbytes)
        self.nbytes = nbytes
        self.user: StorageWeakRef | None = None

    def free(self) -> bool:
        return self.user is None or self.user.expired()

    def tensor(self, like: torch.Tensor) -> torch.Tensor:
        t = torch.frombuffer(self.memory, dtype=like.dtype, count=like.numel()).view(like.shape)
        self.user = StorageWeakRef(t.untyped_storage())
        return t


class GradBuffers:
    """A small per-module pool of uninitialised CPU tensors on pages that stay mapped between steps."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._slots: list[_Slot] = []

    def empty_like(self, like: torch.Tensor, zero_rows: Sequence[int] = ()) -> torch.Tensor:
        """A contiguous tensor shaped and typed like `like`, on reused pages when one is free.

        Uninitialised except `t[i]` for i in `zero_rows`, which are written with zeros. (Handing
        those pages back to the kernel instead, MADV_DONTNEED, measured 3.8x the ideal against 2.2x
        at T=1 with routing that changes every step: the next step faults them in again.)
        """
        t = self._take(like)
        if t is None:
            t = torch.empty(like.shape, dtype=like.dtype, device=like.device)
        for i in zero_rows:
            t[i].zero_()
        return t

    def _take(self, like: torch.Tensor) -> torch.Tensor | None:
        if like.device.type != "cpu" or like.nbytes < MIN_BYTES:
            return None
        with self._lock:
            slot = next((s for s in self._slots if s.nbytes == like.nbytes and s.free()), None)
            if slot is None and len(self._slots) < MAX_SLOTS:
                try:
                    slot = _Slot(like.nbytes)
                except OSError:  # no mapping to be had: the allocator's memory will do
                    return None
                self._slots.append(slot)
            return None if slot is None else slot.tensor(like)

    def clear(self) -> None:
        """Forget every mapping; one a live tensor still uses is unmapped when that tensor dies."""
        with self._lock:
            self._slots.clear()

    @property
    def nbytes(self) -> int:
        """Bytes of memory the pool holds mapped (in use or free)."""
        return sum(s.nbytes for s in self._slots)

    @staticmethod
    def of_weight(w: torch.Tensor) -> GradBuffers | None:
        """The pool of a leaf weight's gradients, kept on the tensor itself, created on first use: for
        the grouped custom ops, which torch.compile runs with no module at hand to hold one. It lives
        and dies with the weight; `release_weight` empties it. None for a non-leaf (a cast copy made
        anew every step: nothing to reuse)."""
        if not w.is_leaf:
            return None
        pool = w.__dict__.get(WEIGHT_ATTR)
        if pool is None:
            pool = w.__dict__[WEIGHT_ATTR] = GradBuffers()
        return pool

    @staticmethod
    def release_weight(w: torch.Tensor) -> None:
        pool = w.__dict__.get(WEIGHT_ATTR)
        if pool is not None:
            pool.clear()

    # A copied or pickled module starts with an empty pool (mappings can be neither).
    def __deepcopy__(self, memo: dict) -> GradBuffers:
        return GradBuffers()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()
