"""Benchmark: how much of the machine a training step uses, measured in one run.

    python -m benchmarks.bench_utilisation [--smoke] [--reps 5] [--peers Latte,CogVideoX]

1. The machine's practical fp32 limit: the best FLOP/s of a large square matmul (torch.mm of
   n x n fp32 matrices, 2 n^3 FLOPs, n = 1024, 2048, 4096), best of --reps after a warm-up.
2. One training step of the base VideoDiT (forward, backward of the mean square of the output,
   fused AdamW step: what cascade train runs per micro-batch) at width 128 (4 heads) and 512 (8
   heads), 4 layers, 16 frames of 32x32 latents with 4 channels, patch 2, batch 1 (the shapes of
   bench_peers), and the same step of the peer LatteTransformer3DModel (and CogVideoX with
   --peers), best of --reps after a warm-up. It is bench_peers' "fwd+bwd" measurement: run in one
   process after bench_peers (as run_all does), the rows are reused, not measured twice. FLOPs are counted by FlopCounterMode over the step
   (matmuls, attention: the CPU's fused attention included; the optimizer's elementwise work and the
   norms are not FLOPs in this count, as in the usual model-FLOPs utilisation).
Utilisation = step FLOPs / step seconds / the matmul's FLOP/s. Results: a markdown table, a CSV and
a PNG in benchmarks/results/.
"""
from __future__ import annotations

import time

import torch

from benchmarks.bench_peers import measure
from benchmarks.cases import dit_specs
from benchmarks.common import (bench_args, grouped_bar_plot, optional_import, parse_args,
                               peer_notice, report)


def gemm_rate(n: int, reps: int, device) -> float:
    """FLOP/s of an n x n x n fp32 matmul, best of `reps` after one warm-up."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    out = torch.empty(n, n, device=device)
    torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def main(argv=None):
    p = bench_args(__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5, help="timed runs (best of)")
    p.add_argument("--peers", default="Latte", help="comma-separated peers: Latte, CogVideoX, or none")
    args = parse_args(p, argv)
    reps = 1 if args.smoke else args.reps
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    notes = []
    peers = tuple(x for x in args.peers.split(",") if x and x != "none")
    if peers and optional_import("diffusers") is None:
        notes.append(peer_notice("diffusers"))
        print(notes[-1])
        peers = ()

    sizes = (256, 512) if args.smoke else (1024, 2048, 4096)
    gemm = {n: gemm_rate(n, reps, device) for n in sizes}
    peak = max(gemm.values())
    rows = [{"what": f"fp32 matmul {n}x{n}x{n}", "model": "torch.mm", "width": "",
             "params M": "", "GFLOP/step": 2 * n ** 3 / 1e9, "step s": 2 * n ** 3 / r,
             "GFLOP/s": r / 1e9, "% of matmul": 100 * r / peak} for n, r in gemm.items()]
    print(f"matmul: {peak / 1e9:.1f} GFLOP/s (best of sizes {sizes})", flush=True)

    shapes = [(32, 2, dict(depth=1, frames=2, size=8))] if args.smoke else \
        [(128, 4, {}), (512, 8, {})]
    for width, heads, kw in shapes:
        for spec in dit_specs(width, heads, peers=peers, **kw):
            torch.manual_seed(0)
            m = measure(f"dit{width}", spec, reps, device)                # bench_peers' rows, if run
            seconds, flops = m["fwd+bwd s"], m["GFLOP fwd+bwd"] * 1e9
            rate = flops / seconds
            rows.append({"what": "train step (fwd+bwd+AdamW)", "model": spec.name, "width": width,
                         "params M": m["params M"], "GFLOP/step": flops / 1e9,
                         "step s": seconds, "GFLOP/s": rate / 1e9, "% of matmul": 100 * rate / peak})
            print(f"  width {width} {spec.name}: {seconds:.3g} s/step, {rate / 1e9:.1f} GFLOP/s, "
                  f"{100 * rate / peak:.0f}% of matmul", flush=True)
    notes.append(f"fp32, best of {reps} after a warm-up; '% of matmul' is the step's FLOP/s over the "
                 f"best matmul FLOP/s of this run ({peak / 1e9:.1f} GFLOP/s). Step: batch 1, "
                 + ("toy shapes (--smoke)" if args.smoke else
                    "16 frames of 32x32x4 latents, patch 2 (4096 tokens), 4 layers, text 24 x 384."))

    def plot(rows, path):
        pts = [dict(r, label=f"{r['model']} width {r['width']}") for r in rows if r["width"] != ""]
        grouped_bar_plot(pts, "label", "what", "% of matmul", path,
                         title=f"training step FLOP/s as % of fp32 matmul ({peak / 1e9:.0f} GFLOP/s)")

    report("utilisation", "Training-step FLOP/s against the machine's fp32 matmul, one run", rows,
           args.out, notes, plot)
    return rows


if __name__ == "__main__":
    main()
