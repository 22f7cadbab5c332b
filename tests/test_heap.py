"""cascade.heap: large CPU tensors reuse freed heap pages once keep_freed_memory() ran (glibc)."""
import resource

import pytest
import torch

from cascade.heap import _libc, keep_freed_memory, malloc_trim


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def test_env_turns_it_off(monkeypatch):
    monkeypatch.setenv("CASCADE_KEEP_HEAP", "0")
    assert keep_freed_memory() is False


def test_a_repeated_step_stops_page_faulting():
    """A training step's pattern (large tensors allocated, written and freed, again and again),
    120 MiB per round in tensors over glibc's largest mmap threshold: with glibc's defaults every
    round faults all 30720 pages in again. After keep_freed_memory the rounds reuse the heap's
    pages: after a few rounds (posix_memalign's padding leaves a freed chunk a little short of the
    next request until neighbours merge) a round faults in nothing. malloc_trim then hands the
    pages back."""
    if _libc() is None:
        pytest.skip("glibc only: elsewhere keep_freed_memory is a no-op by design")
    assert keep_freed_memory(True)
    faults = []
    for _ in range(6):
        f0 = _minor_faults()
        a = torch.ones(10 << 20)                                         # 40 MiB
        b = torch.ones(8 << 20) * a[:8 << 20]                            # 32 MiB
        c = torch.ones(12 << 20)                                         # 48 MiB
        del a, b, c
        faults.append(_minor_faults() - f0)
    assert faults[-1] < 1000, faults                                    # glibc's own: 30720
    before = _rss_mib()
    malloc_trim()
    assert _rss_mib() < before - 64                                     # trimmed: handed back
