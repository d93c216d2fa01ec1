"""Read this process's memory counters from /proc/self/status (Linux), shared by the benchmarks."""

from __future__ import annotations


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
