"""Benchmark: the fused Triton GroupNorm + SiLU and LayerNorm + adaLN modulate against the unfused
PyTorch sequences (their references: F.group_norm + F.silu; F.layer_norm, multiply, add) and
torch.compile of those references.

    python -m benchmarks.bench_norms [--dtype bf16]

Cases: GroupNorm + SiLU on the video VAE's activations (B=1, C=128, T=17, 64x64, 32 groups, both
layouts, and per frame as the VAE normalises) and the SR U-Net's (B=2, C=256, 16 frames of 32x32,
per frame); LayerNorm + modulate on DiT tokens
(DiT-XL width 1152, DiT-B width 768). Both are bandwidth-bound (about 10 FLOP per element), so the
figure of merit is GB/s over the minimum traffic: forward reads x and writes y (2 tensors),
backward reads x and dy and writes dx (3), both 5. Also milliseconds, peak GPU memory and the
speed relative to the unfused reference. Results: a markdown table, a CSV and a PNG in
benchmarks/results/.

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
from kernels.group_norm_silu import group_norm_silu, group_norm_silu_ref  # noqa: E402
from kernels.layer_norm_modulate import layer_norm_modulate, layer_norm_modulate_ref  # noqa: E402


def gn_inputs(shape, dtype, device, channels_last=False):
    x = torch.randn(shape, device=device, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last_3d)
    C = shape[1]
    w = 1 + 0.1 * torch.randn(C, device=device)  # fp32 affine, as nn.GroupNorm under autocast
    b = 0.1 * torch.randn(C, device=device)
    return [t.requires_grad_() for t in (x, w, b)]


def gn_impls(groups, per_frame=False):
    """per_frame: the reference folds the frames into the batch (two transposed copies, as the
    models' "(b t) c h w" rearrange does); the Triton kernels read the frames in place."""
    ref = lambda x, w, b: group_norm_silu_ref(x, groups, w, b, per_frame=per_frame)  # noqa: E731
    return {"triton": lambda x, w, b: group_norm_silu(x, groups, w, b, backend="triton",
                                                      per_frame=per_frame),
            "reference": ref, "compiled reference": torch.compile(ref, dynamic=False)}


def ln_inputs(B, N, C, dtype, device):
    x = torch.randn(B, N, C, device=device, dtype=dtype)
    mod = (0.5 * torch.randn(B, 2 * C, device=device, dtype=dtype)).requires_grad_()
    return [x.requires_grad_(), mod]  # shift, scale: chunks of one adaLN projection, as in DiT


def ln_impls():
    def split(fn):
        return lambda x, mod: fn(x, *mod.chunk(2, dim=1))
    return {"triton": split(lambda x, sh, sc: layer_norm_modulate(x, sh, sc, backend="triton")),
            "reference": split(layer_norm_modulate_ref),
            "compiled reference": torch.compile(split(layer_norm_modulate_ref), dynamic=False)}


def traffic(numel, element_size):
    """Minimum bytes per pass: x and y forward; x, dy and dx backward."""
    n = numel * element_size
    return {"forward": 2 * n, "backward": 3 * n, "both": 5 * n}


GN_CASES = [  # name, shape, groups, channels_last, per_frame
    ("GN+SiLU VAE", (1, 128, 17, 64, 64), 32, False, False),
    ("GN+SiLU VAE channels_last", (1, 128, 17, 64, 64), 32, True, False),
    ("GN+SiLU VAE per frame", (1, 128, 17, 64, 64), 32, False, True),
    ("GN+SiLU SR U-Net per frame", (2, 256, 16, 32, 32), 32, False, True),
]
LN_CASES = [("LN+modulate DiT-XL", (4, 4096, 1152)), ("LN+modulate DiT-B", (8, 1024, 768))]


def benchmark(args, dtype, device="cuda"):
    rows = []
    for name, shape, groups, cl, per_frame in GN_CASES:
        inputs = gn_inputs(shape, dtype, device, cl)
        impls = gn_impls(groups, per_frame)
        with torch.no_grad():
            x, w, b = inputs
            ref = group_norm_silu_ref(x, groups, w, b, upcast=True, per_frame=per_frame)
            err = (impls["triton"](*inputs).float() - ref).abs().max()
        print(f"{name}: Triton forward max |error| vs fp32 reference {err:.3g}")
        rows += measure(f"{name} {tuple(shape)}", impls, inputs,
                        traffic(inputs[0].numel(), inputs[0].element_size()), "GB/s", "reference")
        del inputs
    for name, (B, N, C) in LN_CASES:
        inputs = ln_inputs(B, N, C, dtype, device)
        impls = ln_impls()
        with torch.no_grad():
            x, mod = inputs
            err = (impls["triton"](*inputs).float()
                   - layer_norm_modulate_ref(x, *mod.chunk(2, dim=1), upcast=True)).abs().max()
        print(f"{name}: Triton forward max |error| vs fp32 reference {err:.3g}")
        rows += measure(f"{name} ({B}, {N}, {C})", impls, inputs,
                        traffic(inputs[0].numel(), inputs[0].element_size()), "GB/s", "reference")
        del inputs
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    args = p.parse_args()
    torch.manual_seed(0)
    print(machine_header())
    title = "GroupNorm+SiLU and LayerNorm+modulate: Triton fused vs unfused PyTorch, torch.compile"
    if not torch.cuda.is_available():
        print(NO_GPU_NOTICE)
        rows = []
        for name, shape, groups, dtype, cl, per_frame in [
                ("GN+SiLU", (2, 20, 5, 13, 13), 4, torch.float32, False, False),
                ("GN+SiLU channels_last per frame", (2, 20, 5, 13, 13), 5, torch.float16, True, True)]:
            impls = gn_impls(groups, per_frame)
            inputs = gn_inputs(shape, dtype, "cpu", cl)
            rows.append(check(name, impls["triton"], impls["reference"], inputs))
        for name, (B, N, C), dtype in [("LN+modulate", (2, 37, 24), torch.float32),
                                       ("LN+modulate", (3, 70, 20), torch.float16)]:
            impls = ln_impls()
            inputs = ln_inputs(B, N, C, dtype, "cpu")
            rows.append(check(name, impls["triton"], impls["reference"], inputs))
        return cpu_check("norms", title, rows)
    rows = benchmark(args, DTYPES[args.dtype])
    report("norms", rows, "GB/s", f"{title} ({args.dtype})")


if __name__ == "__main__":
    main()
