"""The CPU expert kernels of cpu_kernels.c: compiled on first use, cached, and called through ctypes.

Shape legend: N rows sorted by expert, E experts, O rows and K columns of one expert's weight.

The expert loop (expert_loop.py) hands all experts' products to one kernel call when every expert
has few rows (see `expert_loop.KERNEL_MAX_ROWS`); with more, oneDNN and MKL are as fast. The kernels
are float32, CPU, AVX-512 or else AVX2 with FMA (`-march=native` decides which the build holds).
They are built with the system C compiler ($CC, else `cc`) into a per-user cache
($MOEIFY_CACHE_DIR, else $XDG_CACHE_HOME/moeify, else ~/.cache/moeify), keyed by the source, the
flags and the CPU's feature flags, so a home directory shared between machines never loads a build
for another CPU. The library links OpenMP by soname, which torch has already loaded: the kernels
share torch's thread pool and follow `torch.set_num_threads`.

When no kernel can be had (no compiler, neither AVX-512 nor AVX2, MOEIFY_CPU_KERNELS=0), the loop
uses torch's matmuls: same results to rounding, slower with few rows per expert. `status()` says
which, and why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared")
ABI = 3  # moe_kernels_abi() of the source this wrapper calls
ENV_SWITCH = "MOEIFY_CPU_KERNELS"  # "0": never build or use the kernels

_log = logging.getLogger(__name__)


def _cache_dir() -> Path:
    if os.environ.get("MOEIFY_CACHE_DIR"):
        return Path(os.environ["MOEIFY_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "moeify"


def _cpu_flags() -> str:
    """The CPU's feature flags (Linux), part of the cache key of a -march=native build."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return sys.platform


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


@dataclass(frozen=True)
class Kernels:
    """The loaded library; each method checks what the C code would otherwise read out of bounds."""

    lib: ctypes.CDLL
    path: Path

    @property
    def vector_width(self) -> int:
        """float32 lanes per vector of this build: 16 (AVX-512) or 8 (AVX2)."""
        return self.lib.moe_kernels_vector_width()

    def dot(self, off_E1: torch.Tensor, x_NK: torch.Tensor, w_EOK: torch.Tensor, b_EO: torch.Tensor | None,
            out_NO: torch.Tensor) -> torch.Tensor:
        """out[r] = w[e] @ x[r] + b[e] for the rows r of each expert e."""
        E, n_out, n_in = w_EOK.shape
        _check(off_E1, E, (x_NK, n_in), (out_NO, n_out), w=w_EOK, b=b_EO)
        self.lib.moe_dot(torch.get_num_threads(), E, off_E1.data_ptr(), n_out, n_in, x_NK.data_ptr(), x_NK.stride(0),
                         w_EOK.data_ptr(), w_EOK.stride(0), w_EOK.stride(1), _ptr(b_EO),
                         0 if b_EO is None else b_EO.stride(0), out_NO.data_ptr(), out_NO.stride(0))
        return out_NO

    def axpy(self, off_E1: torch.Tensor, g_NO: torch.Tensor, w_EOK: torch.Tensor, out_NK: torch.Tensor,
             accumulate: bool = False) -> torch.Tensor:
        """out[r] (+)= g[r] @ w[e] for the rows r of each expert e (an input gradient)."""
        E, n_out, n_in = w_EOK.shape
        _check(off_E1, E, (g_NO, n_out), (out_NK, n_in), w=w_EOK)
        self.lib.moe_axpy(torch.get_num_threads(), E, off_E1.data_ptr(), n_out, n_in, g_NO.data_ptr(), g_NO.stride(0),
                          w_EOK.data_ptr(), w_EOK.stride(0), w_EOK.stride(1), out_NK.data_ptr(), out_NK.stride(0),
                          int(accumulate))
        return out_NK

    def outer(self, off_E1: torch.Tensor, g_NO: torch.Tensor, x_NK: torch.Tensor, out_EOK: torch.Tensor,
              accumulate: bool = False) -> torch.Tensor:
        """out[e] (+)= g[rows of e].T @ x[rows of e] (a weight gradient); zeros for experts without rows."""
        E, n_out, n_in = out_EOK.shape
        _check(off_E1, E, (g_NO, n_out), (x_NK, n_in), w=out_EOK)
        self.lib.moe_outer(torch.get_num_threads(), E, off_E1.data_ptr(), n_out, n_in, g_NO.data_ptr(), g_NO.stride(0),
                           x_NK.data_ptr(), x_NK.stride(0), out_EOK.data_ptr(), out_EOK.stride(0),
                           out_EOK.stride(1), int(accumulate))
        return out_EOK

    def grad(self, off_E1: torch.Tensor, g_NO: torch.Tensor, x_NK: torch.Tensor, w_EOK: torch.Tensor,
             dx_NK: torch.Tensor, dw_EOK: torch.Tensor, accumulate_dx: bool = False,
             accumulate_dw: bool = False) -> torch.Tensor:
        """`axpy` and `outer` in one pass over the weights: dx[r] (+)= g[r] @ w[e] and
        dw[e] (+)= g[rows of e].T @ x[rows of e] (zeros for experts without rows); returns dx."""
        E, n_out, n_in = w_EOK.shape
        _check(off_E1, E, (g_NO, n_out), (x_NK, n_in), (dx_NK, n_in), w=w_EOK)
        _check(off_E1, E, w=dw_EOK)
        if dw_EOK.shape != w_EOK.shape:
            raise ValueError(f"the weight gradient must have the weights' shape {tuple(w_EOK.shape)}, "
                             f"got {tuple(dw_EOK.shape)}")
        self.lib.moe_grad(torch.get_num_threads(), E, off_E1.data_ptr(), n_out, n_in, g_NO.data_ptr(), g_NO.stride(0),
                          x_NK.data_ptr(), x_NK.stride(0), w_EOK.data_ptr(), w_EOK.stride(0), w_EOK.stride(1),
                          dx_NK.data_ptr(), dx_NK.stride(0), dw_EOK.data_ptr(), dw_EOK.stride(0), dw_EOK.stride(1),
                          int(accumulate_dx), int(accumulate_dw))
        return dx_NK


def _check(off_E1: torch.Tensor, E: int, *rows: tuple[torch.Tensor, int], w: torch.Tensor,
           b: torch.Tensor | None = None) -> None:
    if off_E1.dtype != torch.int64 or off_E1.device.type != "cpu" or off_E1.shape != (E + 1,) \
            or not off_E1.is_contiguous():
        raise ValueError(f"expert offsets must be a contiguous CPU int64 tensor of {E + 1}, got {off_E1}")
    n = int(off_E1[-1])
    for t, width in rows:
        if t.dtype != torch.float32 or t.device.type != "cpu" or t.dim() != 2 or t.stride(1) != 1 \
                or t.shape[0] < n or t.shape[1] != width:
            raise ValueError(f"expected a float32 CPU (>= {n}, {width}) tensor with unit column stride, got "
                             f"{t.dtype} {tuple(t.shape)} strides {t.stride()} on {t.device}")
    for t in (w, b):
        if t is not None and (t.dtype != torch.float32 or t.device.type != "cpu" or t.stride(-1) != 1):
            raise ValueError(f"expected float32 CPU weights with unit last stride, got {t.dtype} strides "
                             f"{t.stride()} on {t.device}")


def _declare(lib: ctypes.CDLL) -> None:
    i, i64, p = ctypes.c_int, ctypes.c_int64, ctypes.c_void_p
    lib.moe_kernels_abi.restype = i
    lib.moe_kernels_vector_width.restype = i
    lib.moe_dot.argtypes = [i, i, p, i64, i64, p, i64, p, i64, i64, p, i64, p, i64]
    lib.moe_axpy.argtypes = [i, i, p, i64, i64, p, i64, p, i64, i64, p, i64, i]
    lib.moe_outer.argtypes = [i, i, p, i64, i64, p, i64, p, i64, p, i64, i64, i]
    lib.moe_grad.argtypes = [i, i, p, i64, i64, p, i64, p, i64, p, i64, i64, p, i64, p, i64, i64, i, i]
    for name in ("moe_dot", "moe_axpy", "moe_outer", "moe_grad"):
        getattr(lib, name).restype = None


def build(cache_dir: Path, compiler: str, flags: tuple[str, ...] = FLAGS) -> Path:
    """The compiled library's path, compiling it when the cache has no build for this source, these
    flags and this CPU. Written under a temporary name and renamed, so a concurrent build or a crash
    never leaves a half-written library where a loader would find it. Raises OSError or
    CalledProcessError. (Other flags than FLAGS: the tests build the AVX2 kernels on an AVX-512 CPU.)"""
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), compiler.encode(),
                                     _cpu_flags().encode()])).hexdigest()[:16]
    path = cache_dir / f"moe_cpu_kernels-{key}.so"
    if path.exists():
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=cache_dir)
    os.close(fd)
    try:
        subprocess.run([compiler, *flags, "-o", tmp, str(SOURCE)], check=True, capture_output=True, text=True,
                       timeout=120)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


@functools.cache
def _load(cache_dir: str, compiler: str) -> Kernels | str:
    """The kernels, or why there are none (built and loaded at most once per process and setting)."""
    if sys.platform != "linux":
        return f"built only on Linux, not {sys.platform}"
    try:
        return open_library(build(Path(cache_dir), compiler))
    except subprocess.CalledProcessError as e:
        lines = (e.stderr or "").strip().splitlines()
        detail = next((ln for ln in lines if "error" in ln), lines[-1] if lines else "")
        return f"{compiler} failed: {detail.strip()}"
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"cannot build with {compiler!r}: {e}"


def open_library(path: Path) -> Kernels | str:
    """A built library's kernels, or why it cannot serve them (a build of another version)."""
    lib = ctypes.CDLL(str(path))
    _declare(lib)
    if lib.moe_kernels_abi() != ABI:
        return f"{path} is a build of another version (ABI {lib.moe_kernels_abi()}, expected {ABI})"
    return Kernels(lib, path)


def _lookup() -> Kernels | str:
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return f"turned off ({ENV_SWITCH}=0)"
    found = _load(str(_cache_dir()), os.environ.get("CC") or "cc")
    if isinstance(found, str):
        _log_once(found)
    return found


@functools.cache
def _log_once(reason: str) -> None:
    _log.info("moeify's CPU expert kernels are unavailable (%s); torch's matmuls run the experts", reason)


def kernels() -> Kernels | None:
    """The kernels, or None when they cannot be had on this machine (see `status`)."""
    found = _lookup()
    return None if isinstance(found, str) else found


def status() -> str:
    """One line: the library in use, or why the experts run on torch's matmuls."""
    found = _lookup()
    return f"CPU expert kernels: {found if isinstance(found, str) else found.path}"
