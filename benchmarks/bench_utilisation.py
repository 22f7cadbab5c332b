"""Benchmark: how much of the machine a training step uses, measured in one run.

    python -m benchmarks.bench_utilisation [--smoke] [--reps 5] [--peers Latte,CogVideoX]

1. The machine's practical fp32 limit: the best FLOP/s of a large square matmul (torch.mm of
   n x n fp32 matrices, 2 n^3 FLOPs, n = 1024, 2048, 4096), best of --reps after a warm-up.
2. One training step of the base VideoDiT (forward, backward of the mean square of the output,
   fused AdamW step: what cascade train runs per micro-batch) at width 128 (4 heads) and 512 (8
   heads), 4 layers, 16 frames of 32x32 latents with 4 channels, patch 2, batch 1 (the shapes of
   bench_peers), and the same step of the peer LatteTransformer3DModel (and CogVideoX with
   --peers). FLOPs are counted by FlopCounterMode over one step (matmuls, attention: the CPU's
   fused attention included; the optimizer's elementwise work and the norms are not FLOPs in this
   count, as in the usual model-FLOPs utilisation).
3. The step and the n x n matmul of step 1 that ran fastest are timed in turn, one of each per
   repeat (--reps repeats after a warm-up): the best step and the best matmul of those repeats come
   from the same minutes. This machine's speed drifts by 10% and more over minutes (neighbours on
   the host), so a matmul timed minutes before the steps can read 10% faster or slower than the
   machine ran them; the table shows both.
Utilisation = step FLOPs / best step seconds / best matmul FLOP/s of the same repeats. Results: a
markdown table, a CSV and a PNG in benchmarks/results/.
"""
from __future__ import annotations

import time

import torch

from benchmarks.bench_peers import train_step_fn
from benchmarks.cases import dit_specs, param_count
from benchmarks.common import (bench_args, count_flops, grouped_bar_plot, optional_import,
                               parse_args, peer_notice, report, to_device)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def gemm_fn(n: int, device):
    """One n x n x n fp32 matmul into a reused output, and its FLOPs."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    out = torch.empty(n, n, device=device)
    return (lambda: torch.mm(a, b, out=out)), 2 * n ** 3


def best_seconds(fns, reps: int, device) -> list[float]:
    """Best wall seconds of each fn in fns, timed in turn (fns[0], fns[1], ... per repeat), after
    one warm-up call of each."""
    best = [float("inf")] * len(fns)
    for fn in fns:
        fn()
    for _ in range(reps):
        for i, fn in enumerate(fns):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def gemm_rate(n: int, reps: int, device) -> float:
    """FLOP/s of an n x n x n fp32 matmul, best of `reps` after one warm-up."""
    fn, flops = gemm_fn(n, device)
    return flops / best_seconds([fn], reps, device)[0]


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
    n_peak = max(gemm, key=gemm.get)
    rows = [{"what": f"fp32 matmul {n}x{n}x{n}", "model": "torch.mm", "width": "",
             "params M": "", "GFLOP/step": 2 * n ** 3 / 1e9, "step s": 2 * n ** 3 / r,
             "GFLOP/s": r / 1e9, "matmul GFLOP/s, same repeats": "", "% of matmul": 100 * r / peak}
            for n, r in gemm.items()]
    print(f"matmul: {peak / 1e9:.1f} GFLOP/s (best of sizes {sizes}: {n_peak})", flush=True)

    shapes = [(32, 2, dict(depth=1, frames=2, size=8))] if args.smoke else \
        [(128, 4, {}), (512, 8, {})]
    mm, mm_flops = gemm_fn(n_peak, device)
    for width, heads, kw in shapes:
        for spec in dit_specs(width, heads, peers=peers, **kw):
            torch.manual_seed(0)
            model = spec.build().to(device).train()
            step = train_step_fn(model, spec, to_device(spec.inputs(), device))
            flops = count_flops(step)
            seconds, mm_s = best_seconds([step, mm], reps, device)
            rate, mm_rate = flops / seconds, mm_flops / mm_s
            rows.append({"what": "train step (fwd+bwd+AdamW)", "model": spec.name, "width": width,
                         "params M": param_count(model) / 1e6, "GFLOP/step": flops / 1e9,
                         "step s": seconds, "GFLOP/s": rate / 1e9,
                         "matmul GFLOP/s, same repeats": mm_rate / 1e9,
                         "% of matmul": 100 * rate / mm_rate})
            print(f"  width {width} {spec.name}: {seconds:.3g} s/step, {rate / 1e9:.1f} GFLOP/s, "
                  f"{100 * rate / mm_rate:.0f}% of the matmul timed in turn with it "
                  f"({mm_rate / 1e9:.1f} GFLOP/s; {100 * rate / peak:.0f}% of the first)",
                  flush=True)
            del model, step
    notes.append(f"fp32, best of {reps} after a warm-up. '% of matmul': a step row's FLOP/s "
                 f"over the best FLOP/s of the {n_peak}^3 matmul timed in turn with that step "
                 f"(same repeats); the matmul rows: over the best of the sizes "
                 f"({peak / 1e9:.1f} GFLOP/s), timed before the steps. Step: batch 1, "
                 + ("toy shapes (--smoke)" if args.smoke else
                    "16 frames of 32x32x4 latents, patch 2 (4096 tokens), 4 layers, text 24 x 384."))

    def plot(rows, path):
        pts = [dict(r, label=f"{r['model']} width {r['width']}") for r in rows if r["width"] != ""]
        grouped_bar_plot(pts, "label", "what", "% of matmul", path,
                         title="training step FLOP/s as % of the fp32 matmul timed in turn with it")

    report("utilisation", "Training-step FLOP/s against the machine's fp32 matmul, one run", rows,
           args.out, notes, plot)
    return rows


if __name__ == "__main__":
    main()
