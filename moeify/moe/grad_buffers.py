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
import sys
import threading

import torch
from torch.multiprocessing.reductions import StorageWeakRef

# Below this size glibc recycles freed blocks from its heap: nothing to gain.
MIN_BYTES = 1 << 20
# Buffers one experts module keeps at most (w1, w2, w3 need three; the rest covers gradients the
# user still holds when the next backward runs). Past it, buffers come from the allocator.
MAX_SLOTS = 8


# Linux drops MADV_DONTNEED pages of a private anonymous mapping and maps zeros on the next touch;
# other systems may keep the old contents, so zeros are written there.
_RELEASE_ZEROES = sys.platform == "linux" and hasattr(mmap, "MADV_DONTNEED")


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

    def zero_rows(self, t: torch.Tensor, rows: list[int]) -> None:
        """t[i] = 0 for i in rows, where `t` is this slot's tensor.

        On Linux the whole pages inside a row are handed back to the kernel (MADV_DONTNEED), which
        maps zero pages there on the next touch: an idle expert's slice costs nothing unless it is
        read or written later. At T=1 (six of eight experts idle) this measured 1.4x the ideal
        against 1.7-1.9x for writing the zeros. Elsewhere, and at unaligned edges, zeros are written.
        """
        row_bytes = t[0].nbytes if t.dim() else 0
        for i in rows:
            start, end = i * row_bytes, (i + 1) * row_bytes
            first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
            last = end // mmap.PAGESIZE * mmap.PAGESIZE
            flat = t[i].view(-1)
            if not _RELEASE_ZEROES or last <= first:
                flat.zero_()
                continue
            self.memory.madvise(mmap.MADV_DONTNEED, first, last - first)
            flat[: (first - start) // t.element_size()].zero_()
            flat[(last - start) // t.element_size():].zero_()


class GradBuffers:
    """A small per-module pool of uninitialised CPU tensors on pages that stay mapped between steps."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._slots: list[_Slot] = []

    def empty_like(self, like: torch.Tensor, zero_rows: list[int] = ()) -> torch.Tensor:
        """A contiguous tensor shaped and typed like `like`, on reused pages when one is free.

        Uninitialised except `t[i]` for i in `zero_rows`, which read zero.
        """
        taken = self._take(like)
        if taken is None:
            t = torch.empty(like.shape, dtype=like.dtype, device=like.device)
            for i in zero_rows:
                t[i].zero_()
            return t
        slot, t = taken
        slot.zero_rows(t, list(zero_rows))
        return t

    def _take(self, like: torch.Tensor) -> tuple[_Slot, torch.Tensor] | None:
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
            return None if slot is None else (slot, slot.tensor(like))

    def clear(self) -> None:
        """Forget every mapping; one a live tensor still uses is unmapped when that tensor dies."""
        with self._lock:
            self._slots.clear()

    @property
    def nbytes(self) -> int:
        """Bytes of memory the pool holds mapped (in use or free)."""
        return sum(s.nbytes for s in self._slots)

    # A copied or pickled module starts with an empty pool (mappings can be neither).
    def __deepcopy__(self, memo: dict) -> GradBuffers:
        return GradBuffers()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()
