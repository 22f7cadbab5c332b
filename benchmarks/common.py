"""Shared helpers for the benchmark scripts: machine header, honest timing, peak memory, FLOP
counting, tables and plots.

Speed is reported as ratios measured in one run (DESIGN.md); on a machine with no GPU the kernel
benchmarks say so and only check correctness, while the end-to-end benchmarks (bench_train,
bench_sample, bench_peers, bench_utilisation, bench_scaling) time the models on the CPU.
"""
from __future__ import annotations

import argparse
import csv
import importlib
import math
import os
import platform
import time
from contextlib import contextmanager
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"

NO_GPU_NOTICE = ("No CUDA GPU on this machine: Triton kernels are checked for correctness in the "
                 "interpreter only; no GPU timings are reported.")


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo; platform.processor() elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_header() -> str:
    """One markdown line naming the machine and library versions (diffusers when installed)."""
    import triton
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    peers = "".join(f", {name} {mod.__version__}" for name in ("diffusers",)
                    if (mod := optional_import(name)) is not None)
    heap = "" if torch.cuda.is_available() else \
        f", C heap: {'freed memory kept' if _HEAP['kept'] else 'glibc defaults'} (--heap)"
    return (f"machine: {platform.machine()} {cpu_name()}, {torch.get_num_threads()} threads, "
            f"{gpu}{heap}; torch {torch.__version__}, triton {triton.__version__}{peers}, "
            f"python {platform.python_version()}")


def optional_import(name: str):
    """The module, or None when it is not installed (benchmark-only peers: the `bench` extra)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def peer_notice(name: str) -> str:
    return (f"{name} is not installed: its peer rows are skipped "
            f"(pip install -e '.[bench]' installs the benchmark peers)")


def to_device(x, device):
    """Tensors in x (nested dicts, tuples, lists) moved to device; anything else as it is."""
    if torch.is_tensor(x):
        return x.to(device)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, device) for v in x)
    return x


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


def peak_memory(fn, device: str | torch.device | None = None) -> int:
    """Peak bytes fn adds while it runs.

    GPU: torch.cuda.max_memory_allocated over what was allocated before. CPU (Linux): the peak
    RSS increase, measured as cascade.pipeline.PeakMemory measures a stage (VmHWM reset through
    /proc after malloc_trim, so freed heap pages are not silently reused); -1 where it cannot be.
    Weights and inputs allocated before the call are not counted."""
    device = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    if device.type != "cuda":
        from cascade.pipeline import PeakMemory
        meter = PeakMemory(device)
        if "VmHWM" not in meter.kind:
            return -1
        with meter("fn"):
            fn()
        return meter.memory["fn"]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def flop_counter():
    """torch.utils.flop_counter.FlopCounterMode (display off) that also counts the CPU's fused
    attention: PyTorch's registry has formulas for the GPU SDPA kernels only, so on a CPU
    scaled_dot_product_attention counts 0 FLOPs unless its CPU kernels get the same formulas
    (forward 4*B*H*Lq*Lk*D, backward 2.5x), and the in-place GEMMs (baddbmm_, addmm_: the DiT's
    gated projection accumulates into the residual) that the registry leaves at 0."""
    from torch.utils import flop_counter as fcm
    aten = torch.ops.aten
    fwd, bwd = (aten._scaled_dot_product_flash_attention_for_cpu,
                aten._scaled_dot_product_flash_attention_for_cpu_backward)
    if fwd not in fcm.flop_registry:
        @fcm.register_flop_formula(fwd)
        def _sdpa_cpu(q, k, v, *args, out_shape=None, **kwargs) -> int:
            return fcm.sdpa_flop_count(q, k, v)

        @fcm.register_flop_formula(bwd)
        def _sdpa_cpu_bwd(grad_out, q, k, v, *args, out_shape=None, **kwargs) -> int:
            return fcm.sdpa_backward_flop_count(grad_out, q, k, v)
    if aten.baddbmm_ not in fcm.flop_registry:
        @fcm.register_flop_formula([aten.baddbmm_, aten.addmm_])
        def _gemm_inplace(self, a, b, *args, out_shape=None, **kwargs) -> int:
            return 2 * math.prod(a) * b[-1]                          # (.., m, k) @ (.., k, n)
    return fcm.FlopCounterMode(display=False)


@contextmanager
def reference_kernels():
    """Run the models' kernels as their PyTorch references (CASCADE_KERNELS=torch) for a while:
    FlopCounterMode sees aten ops only, so a Triton kernel (a GPU's path) would count 0 FLOPs;
    the reference does the same arithmetic. On a CPU the references run anyway."""
    old = os.environ.get("CASCADE_KERNELS")
    os.environ["CASCADE_KERNELS"] = "torch"
    try:
        yield
    finally:
        if old is None:
            del os.environ["CASCADE_KERNELS"]
        else:
            os.environ["CASCADE_KERNELS"] = old


def count_flops(fn) -> int:
    """FLOPs of one call of fn, counted by flop_counter() (matmuls, convs, attention) with the
    kernels' references (reference_kernels)."""
    with flop_counter() as counter, reference_kernels():
        fn()
    return counter.get_total_flops()


def bench_args(description: str) -> argparse.ArgumentParser:
    """The arguments every end-to-end benchmark takes: --smoke (smallest case, seconds, for the
    tests), --out (results folder), --threads (torch CPU threads; default: as the environment
    sets them, e.g. OMP_NUM_THREADS). Parse with parse_args, which applies --threads."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--smoke", action="store_true",
                   help="smallest configuration, one repeat: checks that the script runs (seconds)")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the .md, .csv and .png")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--heap", choices=("keep", "default"), default="keep",
                   help="CPU: keep: large tensors reuse freed heap pages, as cascade train and "
                        "sample run (cascade.heap); default: glibc's own (mmap per large tensor). "
                        "Process-wide, from the first benchmark that sets it")
    return p


_HEAP = {"kept": False}


def parse_args(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not torch.cuda.is_available() and args.heap == "keep" and not _HEAP["kept"]:
        from cascade.heap import keep_freed_memory
        _HEAP["kept"] = keep_freed_memory(True)
    return args


def report(name: str, title: str, rows: list[dict], out: Path, notes: list[str] = (),
           plot=None) -> str:
    """Print and write one benchmark's table: <out>/<name>.md (title, machine header, notes,
    table), <out>/<name>.csv, and <out>/<name>.png drawn by plot(rows, path) when given."""
    table = markdown_table(rows)
    text = "\n\n".join([f"# {title}", machine_header(), *notes, table]) + "\n"
    print(text)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(text)
    write_csv(rows, out / f"{name}.csv")
    files = [f"{name}.md", f"{name}.csv"]
    if plot is not None and rows:
        plot(rows, out / f"{name}.png")
        files.append(f"{name}.png")
    print(f"wrote {', '.join(str(out / f) for f in files)}")
    return text


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)"
    cols = list(dict.fromkeys(k for r in rows for k in r))          # every column, first-seen order
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def write_csv(rows: list[dict], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not rows:
        return
    cols = list(dict.fromkeys(k for r in rows for k in r))          # every column, first-seen order
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
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


def grouped_bar_plot(rows: list[dict], group: str, series: str, value: str, path: str | Path,
                     title: str = "", log: bool = False, reference: float | None = None) -> None:
    """Horizontal bars of rows[value], one cluster per rows[group], one colour per rows[series];
    reference draws a vertical line (a ratio of 1, say)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in rows if isinstance(r.get(value), (int, float))]
    groups = list(dict.fromkeys(str(r[group]) for r in rows))
    names = list(dict.fromkeys(str(r[series]) for r in rows))
    h = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(9, 0.3 * len(rows) + 0.6 * len(groups) + 1.5))
    for i, n in enumerate(names):
        ys, vs = [], []
        for r in rows:
            if str(r[series]) == n:
                ys.append(groups.index(str(r[group])) + (i - (len(names) - 1) / 2) * h)
                vs.append(r[value])
        ax.barh(ys, vs, height=h, label=n)
    ax.set_yticks(range(len(groups)), groups)
    ax.invert_yaxis()
    if log:
        ax.set_xscale("log")
    if reference is not None:
        ax.axvline(reference, color="k", lw=0.8, ls="--")
    ax.set_xlabel(value)
    ax.set_title(title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def line_plot(series: dict[str, tuple[list, list]], xlabel: str, ylabel: str, path: str | Path,
              title: str = "", logx: bool = True, logy: bool = True) -> None:
    """One line per series name -> (xs, ys); log axes by default."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xscale("log" if logx else "linear")
    ax.set_yscale("log" if logy else "linear")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize="small")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
