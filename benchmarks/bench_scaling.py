"""Benchmark: how cost grows. (a) Separable space-time attention against full spacetime attention
as T and H*W grow; (b) the cascade against one model making the final video directly.

    python -m benchmarks.bench_scaling [--smoke] [--reps 3] [--parts attention,cascade]

(a) attention: the kernels' reference (kernels.attention.spacetime_attention_ref: SDPA, the path
    the models take on a CPU) on q, k, v of shape (1, T, S, 4 heads, 32) (the tiny DiT's heads), in
    the models' layout. Factorised = spatial (within each frame) + temporal (across frames at each
    position), as one DiT block runs them; full = one attention over all T*S tokens. Forward under
    torch.inference_mode, best of --reps; FLOPs from DESIGN.md's formula (4 * batch * heads *
    seq^2 * head_dim): factorised 4hD (T S^2 + S T^2) against full 4hD (T S)^2, so full costs
    T*S / (S + T) times more. Sweeps: T = 4..32 at 16x16 tokens per frame, and H*W = 8x8..32x32 at
    16 frames.

(b) cascade: the embedded default's final video (configs/cascade/tiny_full.yaml: 29 frames of
    64x64) made two ways, each from text, with the same sampler and guidance:
      cascade  base (8 keyframes of 8x8 latents, 25 steps, CFG) -> interp (4 groups of 9 frames,
               15 steps, CFG) -> VAE decode (29 frames of 32x32) -> SR x2 (29 frames of 64x64 in
               10 windows of 4 frames, 10 steps);
      direct   one DiT of the base's family and size (width 128, depth 4, factorised attention,
               patch 1x2x2) on the final video's latents, 29 frames of 16x16 (the tiny VAE's 4x
               spatial compression of 64x64), 25 steps with CFG, then the VAE decodes 29 frames of
               64x64. This is the cheapest direct model one could pick (a model that has to make
               the whole video alone would in practice be wider than the cascade's base), so the
               ratio it gives is a lower bound on the cascade's advantage.
    Compute is measured, not estimated: FlopCounterMode over real Pipeline calls at 1 and at 2
    steps per stage gives each stage's fixed and per-step FLOPs, scaled to the real step counts.
    Time: one full call of each after a 1-step warm-up (best of --reps). Random weights (the cost
    does not depend on them).
Results: markdown tables, CSVs and PNGs in benchmarks/results/ (scaling_attention, scaling_cascade).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bench_sample import PROMPT, sampling_settings
from benchmarks.cases import REPO, STAGE_SIZES, export_random
from benchmarks.common import (bench_args, flop_counter, grouped_bar_plot, parse_args,
                               reference_kernels, report, time_fn)

HEADS, HEAD_DIM = 4, 32


# ----------------------------------------------------------------------------- (a) attention

def attention_rows(shapes, reps: int) -> list[dict]:
    from kernels.attention import spacetime_attention_ref
    rows = []
    for sweep, T, side in shapes:
        S = side * side
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, T, S, HEADS, HEAD_DIM, generator=g) for _ in range(3))

        def factorised():
            spacetime_attention_ref(q, k, v, "spatial")
            spacetime_attention_ref(q, k, v, "temporal")

        def full():
            spacetime_attention_ref(q, k, v, "full")

        flops = {"factorised": 4 * HEADS * HEAD_DIM * (T * S * S + S * T * T),
                 "full": 4 * HEADS * HEAD_DIM * (T * S) ** 2}
        times = {}
        for name, fn in (("factorised", factorised), ("full", full)):
            with torch.inference_mode():
                times[name] = time_fn(fn, warmup=1, reps=reps)
        for name in ("factorised", "full"):
            rows.append({"sweep": sweep, "T": T, "H*W": f"{side}x{side}", "tokens": T * S,
                         "attention": name, "GFLOP": flops[name] / 1e9, "ms": times[name] * 1e3,
                         "GFLOP/s": flops[name] / times[name] / 1e9,
                         "full / factorised time": times["full"] / times["factorised"],
                         "full / factorised FLOPs": flops["full"] / flops["factorised"]})
    return rows


def attention_plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, sweep, x in zip(axes, ("T", "H*W"), ("T", "tokens")):
        for name in ("factorised", "full"):
            pts = [r for r in rows if r["sweep"] == sweep and r["attention"] == name]
            ax.plot([r[x] for r in pts], [r["ms"] for r in pts], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("frames T (16x16 tokens each)" if sweep == "T" else "tokens T*H*W (T = 16)")
        ax.set_ylabel("forward ms")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"attention forward time, factorised vs full ({HEADS} heads x {HEAD_DIM})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- (b) cascade vs direct

class StageFlops:
    """Per-stage FLOPs of Pipeline calls: wraps each stage network's forward (and the VAE's
    decode_latents) to add the FLOPs counted while it runs to its stage's tally; the rest of the
    call (the text encoder, the samplers' arithmetic) goes to "text + other"."""

    def __init__(self, pipe):
        self.counter = flop_counter()
        self.tally: dict[str, int] = {}
        for name in ("base", "interp", "sr"):
            st = getattr(pipe, name)
            if st is not None:
                self._wrap(st.net, "forward", name)
        self._wrap(pipe.vae, "decode_latents", "vae")

    def _wrap(self, obj, method, name):
        inner = getattr(obj, method)

        def counted(*a, **kw):
            before = self.counter.get_total_flops()
            out = inner(*a, **kw)
            self.tally[name] = self.tally.get(name, 0) + self.counter.get_total_flops() - before
            return out
        setattr(obj, method, counted)

    def run(self, fn) -> dict[str, int]:
        self.tally = {}
        with self.counter, reference_kernels():
            fn()
        total = self.counter.get_total_flops()
        self.counter = flop_counter()                   # a fresh count for the next run
        return {**self.tally, "text + other": total - sum(self.tally.values())}


def pipeline_cost(name: str, folder: Path, settings: dict, reps: int) -> list[dict]:
    """Rows per stage: FLOPs (fixed + per step x steps, from counted runs at 1 and 2 steps),
    seconds of a full call, and the totals."""
    from cascade.pipeline import Pipeline, StageSampling
    pipe = Pipeline(folder)
    tally = StageFlops(pipe)

    def at(steps):
        s = {k: StageSampling(steps, v.guidance, v.sampler) for k, v in settings.items()}
        return lambda: pipe(PROMPT, seed=0, progress=False, **s)

    pipe.text.clear_cache()
    one = tally.run(at(1))
    pipe.text.clear_cache()
    two = tally.run(at(2))
    best, total_s, res = {}, float("inf"), None
    for _ in range(reps):
        pipe.text.clear_cache()
        tic = time.perf_counter()
        res = pipe(PROMPT, seed=0, progress=False, **settings)
        total_s = min(total_s, time.perf_counter() - tic)
        for k, v in res.timings.items():
            best[k] = min(best.get(k, float("inf")), v)
    rows, total = [], 0.0
    for stage in one:
        per_step = two[stage] - one[stage]
        steps = (settings[stage].steps or getattr(pipe, stage).cfg.diffusion.steps) \
            if stage in settings else 1                              # None: the stage's config
        flops = one[stage] + (steps - 1) * per_step
        total += flops
        rows.append({"route": name, "stage": stage, "steps": steps if stage in settings else "",
                     "GFLOP/step": per_step / 1e9 if stage in settings else "",
                     "GFLOP": flops / 1e9, "s": best.get(stage, ""), "compute share %": 0.0})
    for r in rows:
        r["compute share %"] = 100 * r["GFLOP"] * 1e9 / total
    rows.append({"route": name, "stage": "total", "steps": "", "GFLOP/step": "",
                 "GFLOP": total / 1e9, "s": total_s, "compute share %": 100.0,
                 "output (C, T, H, W)": "x".join(map(str, res.video.shape[1:]))})
    return rows


def direct_stages(root: Path, size: str, frames: int, factor: int = 2) -> Path:
    """A stages folder with the cascade's VAE and a base-family DiT on the final video's latents
    (frames x (factor x the base's latent size)), from the `size` configs of STAGE_SIZES."""
    from cascade.config import load_config
    sizes = STAGE_SIZES[size]
    base = load_config(REPO / "configs" / "tiny" / "base.yaml", sizes["base"])
    d = base.dit
    h, w, H, W = d.height * factor, d.width * factor, base.data.height * factor, base.data.width * factor
    export_random(root, "vae", sizes["vae"] + [f"data.height={H}", f"data.width={W}"], seed=0)
    export_random(root, "base", sizes["base"] + [
        f"data.frames={frames}", f"data.height={H}", f"data.width={W}", f"dit.frames={frames}",
        f"dit.height={h}", f"dit.width={w}"], seed=1)
    return root


def cascade_rows(size: str, settings: dict, reps: int, tmp: Path) -> list[dict]:
    from benchmarks.cases import random_stages
    cascade = pipeline_cost("cascade", random_stages(tmp / "cascade", size), settings, reps)
    out = cascade[-1]["output (C, T, H, W)"]
    C, T, H, W = map(int, out.split("x"))
    from cascade.config import load_config
    sr_scale = load_config(REPO / "configs" / "tiny" / "sr.yaml", STAGE_SIZES[size]["sr"]).sr.scale
    direct = pipeline_cost("direct", direct_stages(tmp / "direct", size, T, sr_scale),
                           {"base": settings["base"]}, reps)
    if direct[-1]["output (C, T, H, W)"] != out:
        raise RuntimeError(f"the direct model makes {direct[-1]['output (C, T, H, W)']}, "
                           f"the cascade {out}: not the same video")
    rows = cascade + direct
    ratio_f = direct[-1]["GFLOP"] / cascade[-1]["GFLOP"]
    ratio_t = direct[-1]["s"] / cascade[-1]["s"]
    rows.append({"route": "direct / cascade", "stage": "total", "GFLOP": ratio_f, "s": ratio_t})
    return rows


def cascade_plot(rows, path):
    pts = [r for r in rows if r["route"] in ("cascade", "direct") and r["stage"] != "total"]
    grouped_bar_plot(pts, "stage", "route", "GFLOP", path, log=True,
                     title="compute to the same final video, per stage (GFLOP)")


def main(argv=None):
    p = bench_args(__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3, help="timed runs (best of); the cascade part: 1")
    p.add_argument("--parts", default="attention,cascade")
    args = parse_args(p, argv)
    parts = args.parts.split(",")
    reps = 1 if args.smoke else args.reps
    results = {}
    if "attention" in parts:
        shapes = [("T", 2, 4), ("T", 4, 4), ("H*W", 4, 2)] if args.smoke else \
            [("T", t, 16) for t in (4, 8, 16, 32)] + [("H*W", 16, s) for s in (8, 16, 32)]
        rows = attention_rows(shapes, reps)
        notes = [f"fp32, forward, q/k/v (1, T, H*W, {HEADS}, {HEAD_DIM}), kernels' reference (SDPA), "
                 f"best of {reps}; FLOPs: 4 * heads * seq^2 * head_dim per sequence."]
        results["attention"] = report("scaling_attention", "Factorised vs full spacetime attention",
                                      rows, args.out, notes, attention_plot)
    if "cascade" in parts:
        size = "smoke" if args.smoke else "tiny"
        settings = sampling_settings(REPO / "configs" / "cascade" / "tiny_full.yaml")
        if args.smoke:
            from cascade.pipeline import StageSampling
            settings = {k: StageSampling(3, v.guidance, v.sampler) for k, v in settings.items()}
        with tempfile.TemporaryDirectory() as tmp:
            rows = cascade_rows(size, settings, 1, Path(tmp))
        ratio = rows[-1]
        notes = [f"fp32, 1 video, steps: base {settings['base'].steps}, interp "
                 f"{settings['interp'].steps}, sr {settings['sr'].steps} (the direct model: the "
                 f"base's {settings['base'].steps}); GFLOP measured with FlopCounterMode at 1 and 2 "
                 f"steps per stage and scaled; seconds: one full call after a warm-up.",
                 f"direct / cascade: {ratio['GFLOP']:.2f}x the compute, {ratio['s']:.2f}x the time."]
        results["cascade"] = report("scaling_cascade", "The cascade vs one model making the final "
                                    "video directly", rows, args.out, notes, cascade_plot)
    return results


if __name__ == "__main__":
    main()
