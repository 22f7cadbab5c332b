"""Benchmark: our networks against the diffusers peers on the same work, in one run.

    python -m benchmarks.bench_peers [--smoke] [--reps 5] [--only dit128,dit512,sr,vae,vae_frame]

Cases (fp32, batch 1, text of 24 tokens x 384 as the tiny configs' MiniLM gives):
  dit128, dit512  the base VideoDiT (factorised space-time attention, 3D RoPE) against diffusers'
                  LatteTransformer3DModel (factorised) and CogVideoXTransformer3DModel (full 3D
                  attention) at width 128 (4 heads) and 512 (8 heads), 4 layers, 16 frames of 32x32
                  latents with 4 channels, patch 2: 4096 tokens;
  sr              the SR VideoUNet (the tiny SR config: widths 16, 32, 32, attention at the lowest
                  level) against diffusers' UNet3DConditionModel at the same widths, on 8 frames of
                  64x64 (x_t and the upsampled low-res video: 6 channels in);
  vae             the causal 3D VideoVAE (widths 32, 64, 64, one res-block per level, latent 4,
                  GroupNorm with 8 groups; encode, sample, decode) against AutoencoderKLCogVideoX
                  (causal 3D convs too) at the same widths, on 8 frames of 64x64;
  vae_frame       the VideoVAE with vae.frame_encoder and vae.decoder_conv=2+1d (per-frame
                  encoder; decoder of (2+1)D convs, causal in time) against
                  AutoencoderKLTemporalDecoder (Stable Video Diffusion's: per-frame 2D encoder,
                  decoder of 2D blocks with temporal convs).
                  (The tiny VAE runs 16, 32, 32 without GroupNorm; SVD's autoencoder fixes 32
                  groups, so the cases use widths it accepts, and ours keeps its GroupNorm to do
                  the same work as the peers.)
Every model is built from the same numbers (cases.py); the parameter counts in the table show where
the architectures still differ. Per model: forward (torch.inference_mode) and forward+backward
wall time, best of --reps after a warm-up; "forward+backward" is a whole training step: backward of
the mean square of the output and a fused AdamW step (as cascade train; the update is about 1% of
the step); the FLOPs of one forward (FlopCounterMode, CPU attention included), and the peak memory
each pass adds (CPU: the peak RSS increase; GPU: max_memory_allocated). Ratios are peer / ours: above 1 means the peer
is slower (or uses more memory). Results: a markdown table, a CSV and a PNG in benchmarks/results/.

Peers are benchmark-only dependencies (`pip install -e '.[bench]'`); without diffusers the script
prints a notice and reports our rows alone.
"""
from __future__ import annotations

import time

import torch

from benchmarks.cases import dit_specs, param_count, unet_specs, vae_specs
from benchmarks.common import (bench_args, flop_counter, grouped_bar_plot, optional_import,
                               parse_args, peak_memory, peer_notice, reference_kernels, report,
                               to_device)


def forward_fn(model, spec, args):
    def run():
        with torch.inference_mode():
            spec.call(model, args)
    return run


def train_step_fn(model, spec, args):
    """Forward, backward of the mean square of the output, fused AdamW step (as cascade.train)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step():
        opt.zero_grad(set_to_none=True)
        spec.call(model, args).float().square().mean().backward()
        opt.step()
    return step


def timed(fn, reps: int) -> tuple[float, float, int]:
    """(best seconds of `reps`, FLOPs, peak bytes) of fn: one warm-up run under the FLOP counter
    (with the kernels' references; on a GPU one more warm-up runs the Triton kernels), then `reps`
    timed runs, the first of which also measures the peak memory (it starts from a
    trimmed heap, so it is rarely the fastest)."""
    with flop_counter() as counter, reference_kernels():                   # Triton counts 0 FLOPs
        fn()
    if torch.cuda.is_available():
        fn()                                                             # compiles the Triton kernels
    times = []

    def run():
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)

    peak = peak_memory(run)                       # the first timed run (the heap trim is not timed)
    for _ in range(reps - 1):
        run()
    return min(times), counter.get_total_flops(), peak


def measure(case: str, spec, reps: int, device) -> dict:
    """One row: the model's size, forward and training-step time, FLOPs and peak memory."""
    model = spec.build().to(device)
    args = to_device(spec.inputs(), device)
    row = {"case": case, "model": spec.name, "params M": param_count(model) / 1e6}
    model.eval()
    fwd, fwd_flops, fwd_peak = timed(forward_fn(model, spec, args), reps)
    model.train()
    both, both_flops, both_peak = timed(train_step_fn(model, spec, args), reps)
    row.update({"GFLOP fwd": fwd_flops / 1e9, "fwd s": fwd, "fwd+bwd s": both,
                "fwd peak MiB": fwd_peak / 2**20, "fwd+bwd peak MiB": both_peak / 2**20,
                "GFLOP fwd+bwd": both_flops / 1e9, "GFLOP/s fwd+bwd": both_flops / both / 1e9})
    if spec.note:
        row["note"] = spec.note
    return row


def profile(case: str, spec, device, rows: int = 25) -> str:
    """torch.profiler table (self CPU time) of one training step of spec, after a warm-up."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    model = spec.build().to(device).train()
    step = train_step_fn(model, spec, to_device(spec.inputs(), device))
    step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=acts, record_shapes=False) as prof:
        step()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return (f"## {case} {spec.name}: one training step (fwd + bwd + AdamW)\n\n"
            + prof.key_averages().table(sort_by=key, row_limit=rows))


def with_ratios(rows: list[dict]) -> list[dict]:
    """Adds peer / ours ratios (time forward, time forward+backward, peak memory forward+backward)
    against the "ours" row of each case."""
    out = []
    for r in rows:
        ours = next(o for o in rows if o["case"] == r["case"] and o["model"] == "ours")
        r = dict(r)
        for key, col in (("fwd s", "fwd: peer/ours"), ("fwd+bwd s", "fwd+bwd: peer/ours"),
                         ("fwd+bwd peak MiB", "memory: peer/ours")):
            r[col] = r[key] / ours[key] if ours[key] > 0 and r[key] > 0 else ""
        out.append(r)
    cols = ["case", "model", "params M", "GFLOP fwd", "fwd s", "fwd+bwd s", "fwd: peer/ours",
            "fwd+bwd: peer/ours", "fwd peak MiB", "fwd+bwd peak MiB", "memory: peer/ours",
            "GFLOP/s fwd+bwd", "note"]
    return [{c: r.get(c, "") for c in cols} for r in out]


def cases(smoke: bool, peers: bool) -> dict:
    """name -> list of Spec. Smoke: the same models at toy sizes (seconds)."""
    dit_peers = ("Latte", "CogVideoX") if peers else ()
    if smoke:
        return {"dit": dit_specs(32, 2, depth=1, frames=2, size=8, peers=dit_peers),
                "sr": unet_specs(8, (1, 2), heads=2, groups=4, frames=2, size=16,
                                 peers=("UNet3D",) if peers else ()),
                "vae": vae_specs(32, (1, 2), frames=2, size=16,
                                 peers=("CogVideoX-VAE",) if peers else ()),
                "vae_frame": vae_specs(32, (1, 2), frames=2, size=16, frame_encoder=True,
                                       decoder_conv="2+1d",
                                       peers=("SVD-VAE",) if peers else ())}
    return {"dit128": dit_specs(128, 4, peers=dit_peers),
            "dit512": dit_specs(512, 8, peers=dit_peers),
            "sr": unet_specs(16, (1, 2, 2), heads=2, groups=8, frames=8, size=64,
                             peers=("UNet3D",) if peers else ()),
            "vae": vae_specs(32, (1, 2, 2), frames=8, size=64,
                             peers=("CogVideoX-VAE",) if peers else ()),
            "vae_frame": vae_specs(32, (1, 2, 2), frames=8, size=64, frame_encoder=True,
                                   decoder_conv="2+1d",
                                   peers=("SVD-VAE",) if peers else ())}


def plot(rows, path):
    grouped_bar_plot(rows, "case", "model", "fwd+bwd: peer/ours", path, log=True, reference=1.0,
                     title="forward+backward time, peer / ours (> 1: ours is faster)")


def main(argv=None):
    p = bench_args(__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5, help="timed runs per pass (best of)")
    p.add_argument("--only", default="", help="comma-separated case names (default: all)")
    p.add_argument("--profile", default="", metavar="CASE[:MODEL]",
                   help="instead of the table: print a torch.profiler table of one training step "
                        "of CASE's model (default ours), e.g. --profile dit512 or dit128:Latte")
    args = parse_args(p, argv)
    reps = 1 if args.smoke else args.reps
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    have_peers = optional_import("diffusers") is not None
    notes = [] if have_peers else [peer_notice("diffusers")]
    for n in notes:
        print(n)
    if args.profile:
        case, _, model = args.profile.partition(":")
        spec = next(s for s in cases(args.smoke, have_peers)[case] if s.name == (model or "ours"))
        text = profile(case, spec, device)
        print(text)
        return text
    rows = []
    for case, specs in cases(args.smoke, have_peers).items():
        if args.only and case not in args.only.split(","):
            continue
        for spec in specs:
            torch.manual_seed(0)
            rows.append(measure(case, spec, reps, device))
            print(f"  {case} {spec.name}: fwd {rows[-1]['fwd s']:.3g} s, "
                  f"fwd+bwd {rows[-1]['fwd+bwd s']:.3g} s", flush=True)
    rows = with_ratios(rows)
    notes.append(f"fp32, batch 1, best of {reps} after a warm-up; fwd+bwd: forward, backward and a "
                 f"fused AdamW step; ratios are peer / ours (> 1: ours "
                 f"is faster or smaller); peak memory: what each pass adds on top of weights and "
                 f"inputs ({'max_memory_allocated' if device.type == 'cuda' else 'peak RSS increase'}).")
    report("peers", "Our networks against the diffusers peers, same work, one run", rows, args.out,
           notes, plot)
    return rows


if __name__ == "__main__":
    main()
