"""Benchmark: seconds per video of each stage and of the whole cascade, prompt to final frames.

    python -m benchmarks.bench_sample [--smoke] [--reps 1] [--sizes tiny,larger] [--stages DIR ...]

Runs cascade.pipeline.Pipeline (text -> base keyframes -> interp -> VAE decode -> SR) with the
embedded default's sampling settings (configs/cascade/tiny_full.yaml: base 25 DPM-Solver++(2M)
steps at guidance 4, interp 15 steps, SR 10 steps with the stages' own guidance), one video,
after a warm-up call at 1 step per stage, best of --reps per stage. The stages are randomly
initialised and exported in-process (sampling cost does not depend on the weights), or taken from
--stages DIR (e.g. runs/tiny once it holds all four trained stages):
  tiny    the embedded default (configs/tiny/*.yaml): 8 latent keyframes of 8x8 -> interp (K=3,
          r=4) -> 29 latent frames -> 29 frames of 32x32 -> SR x2 -> 29 frames of 64x64;
  larger  the same networks at twice the resolution: 16x16 latents, 29 frames of 128x128.
Per stage: seconds per video and the peak memory it adds (Result.memory: CPU peak RSS increase,
GPU max_memory_allocated); base includes the text encoder (one encoding per prompt, shared by
every stage). The "cascade" row is the wall time of the whole call. Results: a markdown table, a
CSV and a PNG in benchmarks/results/.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from benchmarks.cases import REPO, random_stages
from benchmarks.common import bench_args, grouped_bar_plot, parse_args, report

PROMPT = "a red circle moving left on a blue background"


def sampling_settings(cascade_yaml: Path) -> dict:
    """base / interp / sr StageSampling from a cascade YAML's sample section, as cascade sample
    reads it (base: steps / guidance / sampler; interp, sr: their own sections, then their stage
    configs). Only that section is read, with the CLI's schema for it."""
    from omegaconf import OmegaConf

    from cascade.cli import SampleDefaults
    from cascade.pipeline import StageSampling
    raw = OmegaConf.load(cascade_yaml).get("sample", {})
    s = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SampleDefaults), raw))
    return {"base": StageSampling(s.steps, s.guidance, s.sampler),
            "interp": StageSampling(**asdict(s.interp)), "sr": StageSampling(**asdict(s.sr))}


def run_size(name: str, folder: Path, settings: dict, reps: int, device) -> list[dict]:
    from cascade.pipeline import Pipeline, StageSampling
    pipe = Pipeline(folder, device)
    warm = {k: StageSampling(1, v.guidance, v.sampler) for k, v in settings.items()}
    pipe(PROMPT, seed=0, progress=False, **warm)                          # warm-up, 1 step per stage
    pipe.text.clear_cache()
    best, memory, total, res = {}, {}, float("inf"), None
    for i in range(reps):
        pipe.text.clear_cache()                                           # the prompt is encoded each time
        tic = time.perf_counter()
        res = pipe(PROMPT, seed=i, progress=False, **settings)
        total = min(total, time.perf_counter() - tic)
        for k, v in res.timings.items():
            best[k] = min(best.get(k, float("inf")), v)
            memory[k] = max(memory.get(k, 0), res.memory.get(k, 0))
    shapes = {"base": res.stages["keyframes_latent"], "interp": res.stages.get("interp_latent"),
              "vae": res.stages["lowres"], "sr": res.stages["final"]}
    steps = {k: v.steps or getattr(pipe, k).cfg.diffusion.steps            # None: the stage's config
             for k, v in settings.items() if getattr(pipe, k) is not None}
    rows = []
    for k, sec in best.items():
        rows.append({"size": name, "stage": k, "steps": steps.get(k, ""),
                     "output (C, T, H, W)": "x".join(map(str, shapes[k].shape[1:])),
                     "s/video": sec, "share %": 100 * sec / total, "peak MiB": memory[k] / 2**20})
    rows.append({"size": name, "stage": "cascade", "steps": "",
                 "output (C, T, H, W)": "x".join(map(str, res.video.shape[1:])),
                 "s/video": total, "share %": 100.0, "peak MiB": max(memory.values()) / 2**20})
    return rows


def main(argv=None):
    p = bench_args(__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=1, help="timed calls per size (best of, per stage)")
    p.add_argument("--sizes", default="tiny,larger", help="comma-separated: tiny, larger")
    p.add_argument("--stages", type=Path, action="append", default=None,
                   help="a stages folder of trained stages to time instead of random ones; repeat to "
                        "time several side by side in one run (e.g. the shipped weights and new ones)")
    p.add_argument("--cascade", type=Path, default=REPO / "configs" / "cascade" / "tiny_full.yaml",
                   help="cascade YAML whose sample section sets the steps and guidance")
    args = parse_args(p, argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    settings = sampling_settings(args.cascade)
    sizes = ["smoke"] if args.smoke else args.sizes.split(",")
    if args.smoke:
        from cascade.pipeline import StageSampling
        settings = {k: StageSampling(2, v.guidance, v.sampler) for k, v in settings.items()}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.stages is not None:
            for folder in args.stages:
                rows += run_size(f"{folder}", folder, settings, args.reps, device)
        else:
            for size in sizes:
                folder = random_stages(Path(tmp) / size, size)
                rows += run_size(size, folder, settings, 1 if args.smoke else args.reps, device)
                print(f"  {size}: {rows[-1]['s/video']:.3g} s/video", flush=True)
    notes = [f"fp32, 1 video, seconds per video best of {args.reps} after a 1-step warm-up; steps "
             f"from {Path(args.cascade).name} (base {settings['base'].steps}, interp "
             f"{settings['interp'].steps}, sr {settings['sr'].steps}); "
             + ("trained stages." if args.stages else "randomly initialised stages (same cost).")
             + " base includes the text encoder; peak MiB: memory the stage adds "
             + ("(max_memory_allocated)." if device.type == "cuda" else "(peak RSS increase).")]

    def plot(rows, path):
        grouped_bar_plot(rows, "stage", "size", "s/video", path, log=True,
                         title="sampling: seconds per video, per stage")

    report("sample", "Sampling: seconds per video per stage and for the whole cascade", rows,
           args.out, notes, plot)
    return rows


if __name__ == "__main__":
    main()
