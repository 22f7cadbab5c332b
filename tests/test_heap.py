"""cascade.heap: large CPU tensors reuse freed heap pages once keep_freed_memory() ran (glibc)."""
import json
import subprocess
import sys

import pytest

from cascade.heap import _libc, keep_freed_memory

# A training step's pattern in a fresh process (the pytest process's heap has the history of
# every earlier test, pages malloc_trim handed back included): large tensors allocated, written and
# freed, round after round; minor page faults per round, then RSS before and after malloc_trim.
ROUNDS = r"""
import json, resource, torch
from cascade.heap import keep_freed_memory, malloc_trim
def faults(): return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def rss_mib():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) / 1024
kept = keep_freed_memory(True)
per_round = []
for _ in range(12):
    f0 = faults()
    a = torch.ones(10 << 20)                                            # 40 MiB
    b = torch.ones(8 << 20) * a[:8 << 20]                               # 32 MiB
    c = torch.ones(12 << 20)                                            # 48 MiB
    del a, b, c
    per_round.append(faults() - f0)
before = rss_mib()
malloc_trim()
print(json.dumps({"kept": kept, "faults": per_round, "trimmed_mib": before - rss_mib()}))
"""


def test_env_turns_it_off(monkeypatch):
    monkeypatch.setenv("CASCADE_KEEP_HEAP", "0")
    assert keep_freed_memory() is False


def test_a_repeated_step_stops_page_faulting():
    """120 MiB per round in tensors over glibc's largest mmap threshold: with glibc's defaults
    every round faults all 30720 pages in again. After keep_freed_memory the rounds reuse the
    heap's pages: after a few rounds (posix_memalign's padding leaves a freed chunk a little short
    of the next request until neighbours merge; three to seven rounds in ten fresh processes here)
    the rounds fault in nothing. malloc_trim then hands
    the pages back."""
    if _libc() is None:
        pytest.skip("glibc only: elsewhere keep_freed_memory is a no-op by design")
    out = subprocess.run([sys.executable, "-c", ROUNDS], capture_output=True, text=True,
                         check=True).stdout
    got = json.loads(out.strip().splitlines()[-1])
    assert got["kept"]
    assert max(got["faults"][-3:]) < 1000, got["faults"]                # glibc's own: 30720
    assert got["trimmed_mib"] > 64                                      # trimmed: handed back
