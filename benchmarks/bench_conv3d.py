"""Benchmark: the Triton implicit-GEMM conv3d against F.conv3d (cuDNN), the reference (the unfused
PyTorch sequence: F.pad + cuDNN for causal convs) and torch.compile of the reference.

    python -m benchmarks.bench_conv3d [--dtype bf16] [--B 1 --C 128 --T 17 --H 64 --W 64]

Cases are the video VAE's convs (causal 3x3x3, a strided downsampling conv, the 3-channel stem), in
channels-first and channels_last_3d layouts. For each pass (forward, backward, both): milliseconds,
TFLOP/s (forward 2 * positions * Cout * Cin * kt*kh*kw, backward twice that), peak GPU memory and
the speed relative to cuDNN. "cudnn" runs F.conv3d with symmetric padding for the causal cases:
the same shapes and FLOPs, without the causal F.pad copy (the fastest a cuDNN conv could be).
Results: a markdown table, a CSV and a PNG in benchmarks/results/.

Without a GPU it prints the notice, times nothing, and checks the kernels' outputs and gradients on
small shapes in Triton's interpreter (within 2x PyTorch's own error + a floor, as the tests do).

The measuring and checking helpers below are shared with bench_conv2plus1d and bench_norms.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel is decorated

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402

import torch.nn.functional as F  # noqa: E402

from benchmarks.common import (NO_GPU_NOTICE, bar_plot, machine_header, markdown_table,  # noqa: E402
                               peak_memory, time_fn, write_csv)
from kernels.conv3d import conv3d, conv3d_ref  # noqa: E402

RESULTS = Path(__file__).parent / "results"
PASSES = ("forward", "backward", "both")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
FLOOR = {torch.float32: 1e-5, torch.float16: 2.5e-4, torch.bfloat16: 2e-3}  # as in the tests


# ---------------------------------------------------------------- shared measuring and checking

def runner(fn, inputs, pass_):
    """A zero-argument callable for one pass: forward (inference), backward (over a kept graph), both."""
    if pass_ == "forward":
        def run():
            with torch.no_grad():
                return fn(*inputs)
        return run
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    out = fn(*inputs)
    d_out = torch.randn_like(out)
    if pass_ == "backward":
        return lambda: torch.autograd.grad(out, leaves, d_out, retain_graph=True)
    out = None                                   # frees the graph (backward returned above)
    return lambda: torch.autograd.grad(fn(*inputs), leaves, d_out)


def measure(case, impls, inputs, work, unit, baseline):
    """Rows of (case, pass, impl, ms, <unit>, peak MiB, vs <baseline>) for every impl and pass.
    work: pass -> FLOPs (unit TFLOP/s) or bytes (unit GB/s)."""
    scale = 1e12 if unit == "TFLOP/s" else 1e9
    rows = []
    for pass_ in PASSES:
        block = []
        for name, fn in impls.items():
            row = {"case": case, "pass": pass_, "impl": name}
            try:
                run = runner(fn, inputs, pass_)
                seconds = time_fn(run, warmup=3, reps=10)
                row.update({"ms": seconds * 1e3, unit: work[pass_] / seconds / scale,
                            "peak MiB": peak_memory(run) / 2**20})
            except torch.cuda.OutOfMemoryError:
                row["ms"] = "OOM"
            except Exception as e:  # a peer that cannot run this case (compile error, no kernel)
                row.update({"ms": "n/a", "note": (str(e).splitlines() or [type(e).__name__])[0][:60]})
            run = None  # frees a kept graph before the next implementation
            torch.cuda.empty_cache()
            block.append(row)
        base = next((r["ms"] for r in block if r["impl"] == baseline), None)
        for r in block:
            ok = isinstance(r["ms"], float) and isinstance(base, float)
            r[f"vs {baseline}"] = base / r["ms"] if ok else ""
        rows += block
    keys = ("case", "pass", "impl", "ms", unit, "peak MiB", f"vs {baseline}", "note")
    return [{k: r.get(k, "") for k in keys} for r in rows]


def _forward_backward(fn, inputs, d_out):
    out = fn(*inputs)
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    return [out, *torch.autograd.grad(out, leaves, d_out.to(out.dtype))]


def check(case, triton_fn, ref_fn, inputs):
    """One row: the largest absolute error of the Triton output and gradients against the reference
    on fp32 copies of the inputs ("max err triton"), PyTorch's own error at the inputs' precision
    ("max err torch"), and whether every tensor's error is within twice PyTorch's plus a floor (the
    tests' rule)."""
    dtype = next(t.dtype for t in inputs if isinstance(t, torch.Tensor))

    def leaves(cast):
        return [cast(t).detach().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t
                for t in inputs]

    d_out = torch.randn(ref_fn(*inputs).shape, device=inputs[0].device)
    got = _forward_backward(triton_fn, leaves(lambda t: t), d_out)
    same = _forward_backward(ref_fn, leaves(lambda t: t.clone()), d_out)
    golden = _forward_backward(ref_fn, leaves(lambda t: t.float()), d_out)
    err = ref_err = 0.0
    ok = True
    for a, s, g in zip(got, same, golden):
        e, r = (a.float() - g).abs().max().item(), (s.float() - g).abs().max().item()
        ok &= e <= 2 * r + FLOOR[dtype] * max(1.0, g.abs().max().item())
        err, ref_err = max(err, e), max(ref_err, r)
    return {"case": case, "dtype": str(dtype).replace("torch.", ""), "tensors": len(got),
            "max err triton": err, "max err torch": ref_err,
            "within 2x + floor": "yes" if ok else "NO"}


def report(name, rows, value, title):
    """Print the table and write benchmarks/results/<name>.{md,csv,png} (no PNG without a value)."""
    table = markdown_table(rows)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.md").write_text(f"# {title}\n\n{machine_header()}\n\n{table}\n")
    write_csv(rows, RESULTS / f"{name}.csv")
    if value and any(isinstance(r.get(value), float) for r in rows):
        for r in rows:
            r["label"] = f"{r['case']} | {r['pass']} | {r['impl']}"
        bar_plot(rows, "label", value, RESULTS / f"{name}.png", title)
        for r in rows:
            del r["label"]
    print(f"wrote {RESULTS / name}.md, .csv" + (", .png" if value else ""))


def cpu_check(name, title, rows):
    """The no-GPU path: notice, correctness rows, files; exit status 1 if a check failed."""
    report(name, rows, None, title + " (interpreter correctness, no timings)")
    if any(r["within 2x + floor"] != "yes" for r in rows):
        raise SystemExit(1)


# ---------------------------------------------------------------- conv3d cases

def conv_flops(x_shape, w_shape, out_shape):
    """Forward FLOPs of a conv: 2 * output positions * Cout * Cin * kt*kh*kw."""
    B, _, TO, HO, WO = out_shape
    cout, cin, kt, kh, kw = w_shape
    return 2 * B * TO * HO * WO * cout * cin * kt * kh * kw


def conv_inputs(B, cin, cout, T, H, W, k, dtype, device, channels_last=False, bias=True):
    x = torch.randn(B, cin, T, H, W, device=device, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last_3d)
    w = torch.randn(cout, cin, *k, device=device, dtype=dtype) / (cin * k[0] * k[1] * k[2]) ** 0.5
    b = torch.randn(cout, device=device, dtype=dtype) if bias else None
    return [t if t is None else t.requires_grad_() for t in (x, w, b)]


def conv_impls(stride, padding, causal, k):
    """name -> fn(x, w, b): Triton, cuDNN, the reference and its torch.compile."""
    sym = ((k[0] - 1) // 2 if causal else padding[0], padding[1], padding[2])  # same T' as causal
    ref = lambda x, w, b: conv3d_ref(x, w, b, stride, padding, causal)  # noqa: E731
    return {"triton": lambda x, w, b: conv3d(x, w, b, stride, padding, causal, backend="triton"),
            "cudnn": lambda x, w, b: F.conv3d(x, w, b, stride, sym),
            "reference": ref,
            "compiled reference": torch.compile(ref, dynamic=False)}


def gpu_cases(args):
    """(name, B, Cin, Cout, T, H, W, k, stride, padding, causal, channels_last): the VAE's convs."""
    B, C, T, H, W = args.B, args.C, args.T, args.H, args.W
    return [
        ("causal 3x3x3", B, C, C, T, H, W, (3, 3, 3), 1, (0, 1, 1), True, False),
        ("causal 3x3x3 channels_last", B, C, C, T, H, W, (3, 3, 3), 1, (0, 1, 1), True, True),
        ("3x3x3 stride (1,2,2)", B, C, C, T, H, W, (3, 3, 3), (1, 2, 2), 1, False, False),
        ("causal 3x3x3 stem", B, 3, C, T, 2 * H, 2 * W, (3, 3, 3), 1, (0, 1, 1), True, False),
    ]


def benchmark(args, dtype, device="cuda"):
    rows = []
    for name, B, cin, cout, T, H, W, k, stride, padding, causal, cl in gpu_cases(args):
        inputs = conv_inputs(B, cin, cout, T, H, W, k, dtype, device, cl)
        stride3, pad3 = [v if isinstance(v, tuple) else (v,) * 3 for v in (stride, padding)]
        impls = conv_impls(stride3, pad3, causal, k)
        with torch.no_grad():
            y = impls["triton"](*inputs)
            err = (y.float() - conv3d_ref(*inputs, stride3, pad3, causal, upcast=True)).abs().max()
        print(f"{name}: output {tuple(y.shape)}, Triton forward max |error| vs fp32 reference {err:.3g}")
        flops = conv_flops(inputs[0].shape, inputs[1].shape, y.shape)
        case = f"{name} {cin}->{cout} {T}x{H}x{W}"
        rows += measure(case, impls, inputs, {"forward": flops, "backward": 2 * flops,
                                              "both": 3 * flops}, "TFLOP/s", "cudnn")
        del inputs, y
    return rows


CPU_CASES = [  # name, B, Cin, Cout, T, H, W, k, stride, padding, causal, dtype, channels_last
    ("asym stride (1,2,1) pad (1,0,1)", 1, 3, 20, 5, 13, 13, (3, 3, 3), (1, 2, 1), (1, 0, 1), False,
     torch.float32, False),
    ("causal stride (2,2,1), channels_last", 1, 20, 16, 5, 13, 13, (3, 3, 3), (2, 2, 1), (1, 1, 0),
     True, torch.float16, True),
]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--C", type=int, default=128)
    p.add_argument("--T", type=int, default=17)
    p.add_argument("--H", type=int, default=64)
    p.add_argument("--W", type=int, default=64)
    args = p.parse_args()
    torch.manual_seed(0)
    print(machine_header())
    title = "conv3d: Triton implicit GEMM vs cuDNN, reference, torch.compile"
    if not torch.cuda.is_available():
        print(NO_GPU_NOTICE)
        rows = []
        for name, B, cin, cout, T, H, W, k, stride, padding, causal, dtype, cl in CPU_CASES:
            inputs = conv_inputs(B, cin, cout, T, H, W, k, dtype, "cpu", cl)
            impls = conv_impls(stride, padding, causal, k)
            rows.append(check(name, impls["triton"], impls["reference"], inputs))
        return cpu_check("conv3d", title, rows)
    rows = benchmark(args, DTYPES[args.dtype])
    report("conv3d", rows, "TFLOP/s", f"{title} ({args.dtype})")


if __name__ == "__main__":
    main()
