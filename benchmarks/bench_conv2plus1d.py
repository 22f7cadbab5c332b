"""Benchmark: the Triton (2+1)D conv (fused forward: h never leaves the chip) against the same Triton
kernels as two conv3d launches, the unfused cuDNN pair (conv2plus1d_ref) and its torch.compile.

    python -m benchmarks.bench_conv2plus1d [--dtype bf16] [--B 1 --T 16 --H 128 --W 128]

Cases are the SR U-Net's space-time separable convs (Imagen Video): k = kt = 3, 'same' padding, at
the widths where the fusion is on (Cmid <= 64: bandwidth-bound) and one where it is off (128).
For each pass (forward, backward, both): milliseconds, TFLOP/s (forward 2 * positions * (Cmid*Cin*k*k
+ Cout*Cmid*kt), backward twice that; the fused backward also recomputes h, not counted), peak GPU
memory (the fused path keeps no h for the backward) and the speed relative to the cuDNN pair.
Results: a markdown table, a CSV and a PNG in benchmarks/results/.

Without a GPU it prints the notice, times nothing, and checks outputs and gradients on small shapes
in Triton's interpreter (within 2x PyTorch's own error + a floor, as the tests do).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel is decorated

import argparse  # noqa: E402

from benchmarks.bench_conv3d import DTYPES, check, cpu_check, measure, report  # noqa: E402
from benchmarks.common import NO_GPU_NOTICE, machine_header  # noqa: E402
from kernels.conv2plus1d import _Conv2plus1d, conv2plus1d, conv2plus1d_ref  # noqa: E402


def separable_flops(B, cin, cmid, cout, T, H, W, k, kt):
    """Forward FLOPs: the spatial k x k conv plus the temporal kt conv, 'same' sizes."""
    return 2 * B * T * H * W * (cmid * cin * k * k + cout * cmid * kt)


def separable_inputs(B, cin, cmid, cout, T, H, W, k, kt, dtype, device, channels_last=False):
    x = torch.randn(B, cin, T, H, W, device=device, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last_3d)
    ws = torch.randn(cmid, cin, 1, k, k, device=device, dtype=dtype) / (cin * k * k) ** 0.5
    wt = torch.randn(cout, cmid, kt, 1, 1, device=device, dtype=dtype) / (cmid * kt) ** 0.5
    bs = torch.randn(cmid, device=device, dtype=dtype)
    bt = torch.randn(cout, device=device, dtype=dtype)
    return [t.requires_grad_() for t in (x, ws, bs, wt, bt)]


def separable_impls(causal):
    """name -> fn(x, ws, bs, wt, bt)."""
    ref = lambda *a: conv2plus1d_ref(*a, causal=causal)  # noqa: E731
    return {"triton": lambda *a: conv2plus1d(*a, causal=causal, backend="triton"),
            "triton two launches": lambda *a: _Conv2plus1d.apply(*a, causal, False),
            "cudnn pair": ref,
            "compiled reference": torch.compile(ref, dynamic=False)}


def benchmark(args, dtype, device="cuda"):
    B, T, H, W = args.B, args.T, args.H, args.W
    cases = [  # name, Cin, Cmid, Cout, causal, channels_last
        ("C=32", 32, 32, 32, False, False),
        ("C=64", 64, 64, 64, False, False),
        ("C=64 causal channels_last", 64, 64, 64, True, True),
        ("C=128 (unfused)", 128, 128, 128, False, False),
    ]
    rows = []
    for name, cin, cmid, cout, causal, cl in cases:
        inputs = separable_inputs(B, cin, cmid, cout, T, H, W, 3, 3, dtype, device, cl)
        impls = separable_impls(causal)
        with torch.no_grad():
            y = impls["triton"](*inputs)
            ref = conv2plus1d_ref(*(t.float() for t in inputs), causal=causal)
            err = (y.float() - ref).abs().max()
        print(f"{name}: Triton forward max |error| vs fp32 reference {err:.3g}")
        flops = separable_flops(B, cin, cmid, cout, T, H, W, 3, 3)
        rows += measure(f"{name} {T}x{H}x{W}", impls, inputs,
                        {"forward": flops, "backward": 2 * flops, "both": 3 * flops},
                        "TFLOP/s", "cudnn pair")
        del inputs, y, ref
    return rows


CPU_CASES = [  # name, B, Cin, Cmid, Cout, T, H, W, k, kt, causal, dtype, channels_last
    ("3x3 + kt3", 1, 3, 20, 16, 5, 13, 13, 3, 3, False, torch.float32, False),
    ("3x3 + kt3 causal, channels_last", 1, 20, 16, 20, 5, 9, 9, 3, 3, True, torch.float16, True),
]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--T", type=int, default=16)
    p.add_argument("--H", type=int, default=128)
    p.add_argument("--W", type=int, default=128)
    args = p.parse_args()
    torch.manual_seed(0)
    print(machine_header())
    title = "(2+1)D conv: Triton fused vs two launches, cuDNN pair, torch.compile"
    if not torch.cuda.is_available():
        print(NO_GPU_NOTICE)
        rows = []
        for name, B, cin, cmid, cout, T, H, W, k, kt, causal, dtype, cl in CPU_CASES:
            inputs = separable_inputs(B, cin, cmid, cout, T, H, W, k, kt, dtype, "cpu", cl)
            impls = separable_impls(causal)
            rows.append(check(name, impls["triton"], impls["cudnn pair"], inputs))
            rows.append(check(name + " (two launches)", impls["triton two launches"],
                              impls["cudnn pair"], inputs))
        return cpu_check("conv2plus1d", title, rows)
    rows = benchmark(args, DTYPES[args.dtype])
    report("conv2plus1d", rows, "TFLOP/s", f"{title} ({args.dtype})")


if __name__ == "__main__":
    main()
