"""Shared helpers for the benchmark scripts: machine header, honest timing, tables and plots.

Speed is reported as ratios measured in one run (DESIGN.md); on a machine with no GPU the kernel
benchmarks say so and only check correctness.
"""
from __future__ import annotations

import csv
import platform
import time
from pathlib import Path

import torch

NO_GPU_NOTICE = ("No CUDA GPU on this machine: Triton kernels are checked for correctness in the "
                 "interpreter only; no GPU timings are reported.")


def machine_header() -> str:
    """One markdown line naming the machine and library versions."""
    import triton
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"machine: {platform.machine()} {platform.processor() or ''} "
            f"{torch.get_num_threads()} threads, {gpu}; torch {torch.__version__}, "
            f"triton {triton.__version__}, python {platform.python_version()}")


def time_fn(fn, warmup: int = 2, reps: int = 5) -> float:
    """Best-of-`reps` wall time in seconds (CUDA-synchronised on a GPU)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def peak_memory(fn) -> int:
    """Peak bytes allocated on the GPU while running fn (CPU: not measured, returns -1)."""
    if not torch.cuda.is_available():
        return -1
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)"
    cols = list(rows[0])
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def write_csv(rows: list[dict], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not rows:
        return
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def bar_plot(rows: list[dict], label: str, value: str, path: str | Path, title: str = "") -> None:
    """A horizontal bar chart of rows[value] by rows[label], saved as PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in rows if isinstance(r.get(value), (int, float))]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.5))
    ax.barh([str(r[label]) for r in rows], [r[value] for r in rows])
    ax.set_xlabel(value)
    ax.set_title(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
