"""Benchmark: long videos, seconds per output frame and peak memory as the frame count grows.

    python -m benchmarks.bench_long [--smoke] [--frames 29,57,113,225] [--stages DIR] [--long plan|chain]

A long video (cascade sample --frames N beyond the base's clip) is made window by window: base
keyframes in windows of dit.frames with cond.k_max keyframes of context (BaseStage.sample_windows;
--long: planned first or chained, `window_schedule`, default the base config's diffusion.long),
interp in groups of K keyframes, the VAE decode in windows of 16 latent frames with 16 of context,
SR in windows of sr.window frames; so time should grow linearly with the frames (seconds per
output frame flat, within 1.3x across the counts) and peak memory should stay flat. Stages: the
embedded default's networks randomly initialised (the base with dit.cond_frames=true; cost does
not depend on the weights), or --stages DIR. Sampling: the tiny cascade's defaults
(configs/cascade/tiny_full.yaml), one video, after a 1-step warm-up.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bench_sample import PROMPT, sampling_settings
from benchmarks.cases import REPO, STAGE_SIZES, export_random
from benchmarks.common import bench_args, grouped_bar_plot, parse_args, report
from cascade.registry import LONG_MODES


def stages_folder(root: Path, size: str) -> Path:
    """Random stages of `size` with a base trained for frame prompts (its long-video context)."""
    for i, stage in enumerate(("vae", "base", "interp", "sr")):
        extra = ["dit.cond_frames=true", "cond.k_max=2" if size == "smoke" else "cond.k_max=4"] \
            if stage == "base" else []
        export_random(root, stage, [*STAGE_SIZES[size][stage], *extra], seed=i)
    return root


def main(argv=None):
    p = bench_args(__doc__.splitlines()[0])
    p.add_argument("--frames", default="29,57,113,225", help="comma-separated output frame counts")
    p.add_argument("--stages", type=Path, default=None, help="trained stages to time instead")
    p.add_argument("--cascade", type=Path, default=REPO / "configs" / "cascade" / "tiny_full.yaml")
    p.add_argument("--long", choices=LONG_MODES, default=None, help="how the keyframes are made")
    p.add_argument("--window-steps", type=int, default=None,
                   help="steps of the base windows after the first (default: the base config's)")
    args = parse_args(p, argv)
    from cascade.pipeline import Pipeline, StageSampling
    settings = sampling_settings(args.cascade)
    settings["base"].long = args.long
    settings["base"].window_steps = args.window_steps
    counts = [int(n) for n in args.frames.split(",")]
    if args.smoke:
        settings = {k: StageSampling(1, v.guidance, v.sampler) for k, v in settings.items()}
        counts = [7, 13, 25]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.stages or stages_folder(Path(tmp), "smoke" if args.smoke else "tiny")
        pipe = Pipeline(folder, device)
        pipe(PROMPT, seed=0, frames=counts[0], progress=False,
             **{k: StageSampling(1, v.guidance, v.sampler) for k, v in settings.items()})   # warm-up
        for n in counts:
            tic = time.perf_counter()
            res = pipe(PROMPT, seed=1, frames=n, progress=False, **settings)
            sec = time.perf_counter() - tic
            rows.append({"frames": res.video.shape[2], "keyframes": res.stages["keyframes_latent"].shape[2],
                         "s": sec, "s/frame": sec / res.video.shape[2],
                         **{f"{k} s": v for k, v in res.timings.items()},
                         **{f"{k} MiB": v / 2**20 for k, v in res.memory.items()},
                         "peak MiB": max(res.memory.values()) / 2**20})
            print(f"  {n} frames: {sec:.2f} s, {rows[-1]['s/frame']:.3f} s/frame", flush=True)
    per_frame = [r["s/frame"] for r in rows]
    notes = [f"fp32, one video per count; sampling from {args.cascade.name}, long videos: "
             f"{args.long or 'as the base config says'}, windows after the first at "
             f"{args.window_steps or 'the base steps'}; "
             + ("trained stages." if args.stages else "randomly initialised stages (same cost).")
             + " peak MiB: the largest memory a stage added "
             + ("(max_memory_allocated)." if device.type == "cuda" else "(peak RSS increase)."),
             f"seconds per output frame: max / min = {max(per_frame) / min(per_frame):.2f} "
             f"(linear time: <= 1.3); peak memory max / min = "
             f"{max(r['peak MiB'] for r in rows) / max(1e-9, min(r['peak MiB'] for r in rows)):.2f}"]

    def plot(rows, path):
        grouped_bar_plot([{**r, "series": "s/frame", "n": str(r["frames"])} for r in rows],
                         "n", "series", "s/frame", path, title="long videos: seconds per output frame")

    report("long", "Long videos: seconds per output frame and peak memory", rows, args.out, notes, plot)
    return rows


if __name__ == "__main__":
    main()
