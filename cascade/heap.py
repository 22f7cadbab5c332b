"""The C heap under PyTorch's CPU tensors (glibc malloc): keeping freed memory, trimming it.

PyTorch's CPU allocator calls posix_memalign for every tensor, without a cache. glibc serves a
request of 32 MiB or more (its largest mmap threshold) from a fresh mmap and unmaps it on free, so
every large activation of a training step (a 4096 x 2048 fp32 MLP activation is 32 MiB) is
page-faulted in again, zeroed by the kernel, on its first write: on one CPU thread a 4096 x 512 x
2048 matmul into a fresh output runs at 147 against 184 GFLOP/s into a reused one. Serving every
request from the heap and keeping its freed pages (mallopt M_MMAP_MAX 0, M_TRIM_THRESHOLD at its
largest) reuses them instead, as the caching allocators CPU training stacks preload do (tcmalloc,
jemalloc: torch.backends.xeon.run_cpu). The cost: the process keeps its peak heap mapped.

Measured on the width-512 DiT training step of benchmarks/bench_utilisation (1 thread): with glibc's
defaults every step faults 400-900 MiB of pages in (getrusage minor faults); with the heap kept the
third and later steps fault none (posix_memalign pads each request, so a freed chunk serves the
next same-size tensor only once its neighbours have merged: two steps) and the step ran 3.41 s
against 3.70-3.83 s; the process's resident memory settled 63 MiB above glibc's peak.
"""
from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4                                   # glibc's malloc.h
ENV = "CASCADE_KEEP_HEAP"                                               # "0" turns it off


def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:                                                     # not glibc (macOS, musl)
        return None


def keep_freed_memory(enable: bool | None = None) -> bool:
    """Serve large CPU tensors from the heap and keep freed pages for reuse (see the module
    docstring). enable=None: on unless the environment sets CASCADE_KEEP_HEAP=0. Call it before the
    large tensors exist (cascade train / sample / eval and the benchmarks do, on a CPU). Returns
    whether glibc took the setting (False elsewhere, or when turned off)."""
    if enable is None:
        enable = os.environ.get(ENV, "1") != "0"
    libc = _libc()
    if not enable or libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def malloc_trim() -> None:
    """Return the heap's free pages to the OS (glibc; a no-op elsewhere): a memory meter calls it
    before it starts, or a stage that reuses pages an earlier stage freed reads as adding none."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
