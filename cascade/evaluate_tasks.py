"""`cascade eval --task`: how well the cascade does what it is prompted with besides text
(cascade/conditions.py), on the embedded domain, where every attribute can be read back.

For each prompt a ground-truth clip is rendered (`evaluate.truth_clip`) long enough for the task,
the task's inputs are cut from it (the image of i2v, the clip extend continues, the two clips
connect joins, the clip edit changes), the cascade runs, and the video written is measured:

    given_psnr   the given frames in the video against the input frames (dB; inf: exact, with
                 Conditions.keep_input)
    ceiling_psnr the same frames rendered by the VAE and SR alone (`rendered_psnr`): the ceiling
                 a given frame written as rendered (the default) is within 1 dB of
    seam         the frame difference across each join (input -> clip, given -> made, window ->
                 window, the loop's last -> first) over the mean difference of the video's other frames: 1 is
                 a join no viewer can find, > 1.5 a jump (the target is <= 1.5)
    one_object   exactly one object in every frame; colour / motion: the analyser's factors
    kept         extend, long: the same colour and motion after the join as before it
    drift        extend, long: the object's mean colour over the last 8 frames against the first
                 8 (8-bit levels; the target is <= 10)
    moves        i2v, loop, over the prompts that ask for motion: the object moves (not a still
                 video) the way the prompt says (a loop is read on a torus, `analyse(wrap=True)`:
                 its object may leave at one edge and come back at the other)
    invert       DDIM inversion of a clip's keyframes with its caption, then DDIM sampling back
                 with the same prompt (the base alone, guidance 1), at INVERT_STEPS steps: the
                 round trip's latent SNR (dB) against the clip's keyframe latents and the decoded
                 keyframes' PSNR against the VAE's own reconstruction of them
    edit         per method and strength: the edited attribute reads as the new prompt's, the
                 others as the source's, and the track's mean distance from the source's
                 (fraction of the side). Methods (EDIT_METHODS): sdedit (the clip noised with fresh
                 noise to S, a curve over EDIT_STRENGTHS), inversion (its keyframes DDIM-inverted
                 with its own caption, sampled back with DDIM and the edited prompt), injected
                 (inversion, the source's attention maps given to the first EDIT_INJECT of the
                 steps, cascade/injection.py), tuned (inversion after Tune-A-Video's one-shot
                 tuning: a LoRA fitted to the clip first, cascade/tuning.py), tuned_injected
                 (both)
"""
from __future__ import annotations

import math

import numpy as np
import torch

from cascade.conditions import Conditions, fit
from cascade.data.synthetic import (BACKGROUNDS, COLOURS, SHAPES, make_caption, parse_caption,
                                    place, render)
from cascade.evaluate import FACTORS, analyse, still_threshold
from cascade.registry import EDIT_INJECT
from cascade.sampling import check_number

TASKS = ("i2v", "extend", "connect", "loop", "long", "edit", "invert")
INVERT_STEPS = (10, 25, 50, 100)
EDIT_STRENGTHS = (0.2, 0.4, 0.6, 0.8, 1.0)
EDIT_METHODS = ("sdedit", "inversion", "injected", "tuned", "tuned_injected")
EDITS = ("colour", "shape", "background", "direction")


def truth(prompt: str, frames: int, H: int, W: int, time_scale: float, seed: int, i: int) -> torch.Tensor:
    """A rendered clip of `prompt` with `frames` frames at time_scale x the data rate (3, T, H, W)."""
    rng = np.random.default_rng((seed, 17, i))
    return render(place(parse_caption(prompt), rng, frames, H, W, time_scale), frames, H, W)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a.float() - b.float()) / 2).square().mean().item()             # [-1, 1] -> [0, 1]
    return float("inf") if mse == 0 else 10 * math.log10(1 / mse)


def seam_ratio(video: torch.Tensor, joins: list[int]) -> float:
    """video (3, T, H, W); joins: frames j whose difference from frame j - 1 is a join -> the
    largest join difference over the mean of the other consecutive differences."""
    d = (video[:, 1:] - video[:, :-1]).abs().flatten(2).mean((0, 2))        # (T-1,): d[j-1] = |f_j - f_{j-1}|
    at = [j - 1 for j in joins if 1 <= j < video.shape[1]]
    rest = torch.ones(len(d), dtype=torch.bool)
    rest[at] = False
    base = d[rest].mean().clamp_min(1e-6)
    return float(max(d[a] for a in at) / base) if at else float("nan")


def part_still(video: torch.Tensor, part: slice, rate: float) -> float:
    """The standing-still threshold for `part` of video (3, T, H, W): the whole video's
    (`still_threshold`), scaled by the part's share of its length. A part of a long clip moves only
    that share of the clip's travel (`synthetic.place` fits the whole path in frame); with each
    part's own threshold the data's own 113-frame clips read "standing still" before the first join
    in 11 of 32 prompts (seed 0), and "kept" failed on the ground truth."""
    T, size = video.shape[1], min(video.shape[2:])
    lo, hi, _ = part.indices(T)
    return still_threshold((T - 1) / rate + 1, size) * (hi - lo - 1) / max(T - 1, 1)


def loop_seam(video: torch.Tensor) -> float:
    """The last -> first difference over the mean consecutive difference of a looping video."""
    wrapped = torch.cat([video, video[:, :1]], 1)
    return seam_ratio(wrapped, [wrapped.shape[1] - 1])


def object_colour(video: torch.Tensor, frames: slice) -> np.ndarray | None:
    """The object's median colour (0..255) over some frames, or None without an object."""
    a = analyse(video[:, frames])
    return np.array(a["colour_rgb"]) if a["colour"] is not None else None


def drift(video: torch.Tensor, n: int = 8) -> float:
    """Object colour over the last n frames against the first n, in 8-bit levels (max channel)."""
    a, b = object_colour(video, slice(0, n)), object_colour(video, slice(-n, None))
    return float("nan") if a is None or b is None else float(np.abs(a - b).max())


def edited_prompt(prompt: str, what: str, rng: np.random.Generator) -> str:
    """The prompt with one attribute changed to another valid value."""
    m = parse_caption(prompt)
    if what == "colour":
        m["colour"] = rng.choice([c for c in COLOURS if c != m["colour"] and c != m["background"]])
    elif what == "shape":
        m["shape"] = rng.choice([s for s in SHAPES if s != m["shape"]])
    elif what == "background":
        m["background"] = rng.choice([b for b in BACKGROUNDS if b != m["background"] and b != m["colour"]])
    else:
        flip = {"moving left": "moving right", "moving right": "moving left", "moving up": "moving down",
                "moving down": "moving up", "standing still": "moving right"}
        m["motion"] = flip[m["motion"]]
    return make_caption(m["shape"], m["colour"], m["motion"], m["background"])


def track(video: torch.Tensor) -> torch.Tensor | None:
    """Per-frame object centroid (T, 2) as fractions of the side, from the analyser's coverage."""
    from cascade.evaluate import MIN_CONTRAST
    x = (video.float().clamp(-1, 1) + 1) * 127.5
    _, T, H, W = x.shape
    border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, :, 0], x[:, :, :, -1]], 2)
    bg = border.flatten(1).median(1).values
    obj = ((x - bg.view(3, 1, 1, 1)).norm(dim=0) > MIN_CONTRAST / 2).float()  # (T, H, W)
    area = obj.flatten(1).sum(1)
    if (area == 0).any():
        return None
    ys, xs = torch.arange(H) + 0.5, torch.arange(W) + 0.5
    return torch.stack([(obj.sum(1) * xs).sum(1) / area / W, (obj.sum(2) * ys).sum(1) / area / H], 1)


def rendered_psnr(pipe, prompt: str, frames: torch.Tensor, sampling: dict, seed: int) -> float:
    """The VAE + SR ceiling of given frames (3, T, H, W): their PSNR after the cascade renders
    them (`Pipeline.render_input`), what a given frame written as rendered is measured against."""
    from cascade.sampling import StageSampling, resolve_sampling
    cfg = (pipe.sr or pipe.base).cfg.diffusion
    sr = resolve_sampling(StageSampling.of(sampling.get("sr")), config=cfg)
    out = pipe.render_input(frames, pipe.encode([prompt]), sr, torch.Generator().manual_seed(seed), False)
    return psnr(out[0], frames)


def run_task(pipe, task: str, prompt: str, i: int, seed: int, sampling: dict, length: int | None,
             strength: float | None = None, edit: str | None = None, method: str = "sdedit",
             inject: float = EDIT_INJECT) -> dict:
    """One video of `task` for `prompt` -> its measures (see the module docstring)."""
    H, W = (s * pipe.vae.spatial_factor * (pipe.sr.cfg.sr.scale if pipe.sr is not None else 1)
            for s in pipe.latent_size_for(None, None))
    passes = 1 if pipe.interp is not None else 0
    rate = pipe.interp.cfg.interp.rate if passes else 1
    clip_len = pipe.reachable(1 + rate * (pipe.base_cfg.dit.frames - 1), passes)
    kw = dict(seed=seed, progress=False, **sampling)
    out: dict = {"prompt": prompt}
    if task == "i2v":
        src = truth(prompt, clip_len, H, W, rate, seed, i)
        v = pipe(prompt, conditions=Conditions.image_to_video(src[:, 0]), **kw).video[0]
        out.update(given_psnr=psnr(v[:, 0], src[:, 0]), seam=seam_ratio(v, [1]),
                   ceiling_psnr=rendered_psnr(pipe, prompt, src[:, :1], sampling, seed))
        joins, parts = [1], None
    elif task == "extend":
        src = truth(prompt, 2 * clip_len - 1, H, W, rate, seed, i)        # room for the continuation
        n_in = clip_len
        c = Conditions.extend(src[:, :n_in], clip_len - 1)
        v = pipe(prompt, conditions=c, **kw).video[0]
        n_pre = pipe.plan(c, passes, pipe.latent_size_for(None, None)).prefix.shape[1]  # input before the clip
        out.update(given_psnr=psnr(v[:, :n_in], src[:, :n_in]), seam=seam_ratio(v, [n_pre, n_in]),
                   ceiling_psnr=rendered_psnr(pipe, prompt, src[:, :n_in], sampling, seed))
        joins, parts = [n_in], (slice(0, n_in), slice(n_in, None))
    elif task == "connect":
        src = truth(prompt, 3 * clip_len - 2, H, W, rate, seed, i)
        a, b = src[:, :clip_len], src[:, 2 * clip_len - 2:]
        v = pipe(prompt, conditions=Conditions.connect(a, b), **kw).video[0]
        j1, j2 = clip_len, v.shape[1] - b.shape[1] + 1                   # given -> made, clip -> b[1:]
        out.update(given_psnr=min(psnr(v[:, :clip_len], a), psnr(v[:, -b.shape[1]:], b)),
                   seam=seam_ratio(v, [j1 - 1, j1, j2 - 1, j2]),              # and a[:-1] -> clip, made -> b[0]
                   ceiling_psnr=min(rendered_psnr(pipe, prompt, x, sampling, seed) for x in (a, b)))
        joins, parts = [j1, j2], None
    elif task == "loop":
        v = pipe(prompt, conditions=Conditions.loop(), **kw).video[0]
        out.update(seam=loop_seam(v))
        joins, parts = [], None
    elif task == "long":
        from cascade.stages.base import window_joins
        res = pipe(prompt, frames=length, **kw)
        v = res.video[0]
        step = pipe.vae.temporal_factor * rate ** passes
        Wk, C = pipe.base_cfg.dit.frames, min(pipe.base_cfg.cond.k_max, pipe.base_cfg.dit.frames - 1)
        joins = [step * k for k in window_joins((v.shape[1] - 1) // step + 1, Wk, C,
                                                 pipe.base.plans(kw.get("base")))]
        out.update(seam=seam_ratio(v, joins) if joins else float("nan"))
        parts = (slice(0, step * Wk), slice(step * Wk, None)) if joins else None  # the first window's
    else:                                                                  # edit
        src = truth(prompt, clip_len, H, W, rate, seed, i)
        new = edited_prompt(prompt, edit, np.random.default_rng((seed, 23, i)))
        inv = "none" if method == "sdedit" else "ddim"
        if inv == "ddim":                                                  # inversion's inverse
            from dataclasses import replace

            from cascade.sampling import StageSampling
            kw["base"] = replace(StageSampling.of(kw.get("base")), sampler="ddim")
        c = Conditions.edit(src, strength, inv, prompt, inject if method.endswith("injected") else 0.0)
        v = pipe(new, conditions=c, **kw).video[0]
        want, got, orig = parse_caption(new), analyse(v, rate), parse_caption(prompt)
        key = "motion" if edit == "direction" else edit
        others = [f for f in FACTORS if f != key]
        a, b = track(v), track(src)
        out.update(edited=got[key] == want[key], others_kept=all(got[f] == orig[f] for f in others),
                   track_distance=float((a - b).norm(dim=1).mean()) if a is not None and b is not None
                   else float("nan"), new_prompt=new)
        return out
    a = analyse(v, rate, wrap=task == "loop")                              # a loop may wrap around
    want = parse_caption(prompt)
    out.update(one_object=a["one_object"], colour=a["colour"] == want["colour"],
               motion=a["motion"] == want["motion"], frames=v.shape[1])
    if task in ("i2v", "loop"):                                            # prompts that ask for motion
        out["moves"] = (a["motion"] == want["motion"]) if want["motion"] != "standing still" else None
    if parts is not None and task in ("extend", "long"):
        before, after = (analyse(v[:, part], rate, part_still(v, part, rate)) for part in parts)
        out["kept"] = before["colour"] == after["colour"] and before["motion"] == after["motion"]
        out["drift"] = drift(v)
    out["video"] = v
    return out


def summarise(rows: list[dict]) -> dict:
    """Mean of every numeric or boolean measure over the rows (nan-aware; inf PSNR kept as inf)."""
    keys = list(dict.fromkeys(k for r in rows for k in r                   # a key None in some rows too
                              if isinstance(r[k], (bool, int, float)) and k != "frames"))
    out = {}
    for k in keys:
        vals = [float(r[k]) for r in rows if r.get(k) is not None and not (isinstance(r[k], float) and math.isnan(r[k]))]
        out[k] = sum(vals) / len(vals) if vals else float("nan")
    if "seam" in keys:
        seams = [r["seam"] for r in rows if not math.isnan(r["seam"])]
        out["seam_ok"] = sum(s <= 1.5 for s in seams) / len(seams) if seams else float("nan")
    if "drift" in keys:
        drifts = [r["drift"] for r in rows if not math.isnan(r["drift"])]
        out["drift_ok"] = sum(d <= 10 for d in drifts) / len(drifts) if drifts else float("nan")
    return out


@torch.no_grad()
def invert_rows(pipe, prompts: list[str], seed: int, steps=INVERT_STEPS, progress: bool = True) -> list[dict]:
    """`invert` (see the module docstring): per prompt and step count, the round trip's errors."""
    from tqdm.auto import tqdm

    from cascade.sampling import StageSampling
    from cascade.stages import downsample_video
    base, vae = pipe.base, pipe.vae
    d = base.cfg.data
    rows = []
    for i, p in enumerate(tqdm(prompts, desc="eval invert", disable=not progress)):
        clip = truth(p, d.frames, d.height, d.width, 1.0, seed, i)[None]    # keyframes at the base's rate
        z = vae.encode_latents(clip)                                       # (1, Cz, Kb, h, w)
        ref = vae.decode_latents(z).clamp(-1, 1)
        cond, uncond = base.encode_text([p])
        for n in steps:
            sampling = StageSampling(n, 1.0, "ddim", autoguidance=1.0)   # as the inversion
            noise = base.invert(z, cond, uncond, sampling)
            back = base.sample(z.shape, cond, uncond, sampling, None, False, start=(noise, 1.0, True))
            err = (back - z).square().mean()
            rows.append({"prompt": p, "steps": n,
                         "latent_snr_db": float(10 * torch.log10(z.square().mean() / err.clamp_min(1e-12))),
                         "psnr_db": psnr(vae.decode_latents(back).clamp(-1, 1), ref),
                         "noise_std": float(noise.std())})
    return rows


def _groups(rows: list[dict]) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault((r["method"], r["edit"], r["strength"]), []).append(r)
    return out


def edit_rows(pipe, folder, prompts, seed, kw, methods, tune_steps, progress,
              strengths=EDIT_STRENGTHS, inject: float = EDIT_INJECT) -> list[dict]:
    """Every prompt's clip edited in each attribute by each method (see the module docstring)."""
    import tempfile

    from tqdm.auto import tqdm

    from cascade.pipeline import Pipeline, stage_folder
    from cascade.tuning import tune
    from cascade.video_io import write_mp4
    rows = []
    bar = tqdm(total=len(prompts) * len(EDITS) * sum(len(strengths) if m == "sdedit" else 1
                                                     for m in methods), desc="eval edit",
               disable=not progress)
    for i, p in enumerate(prompts):
        tuned = None
        for method in methods:
            target = pipe
            if method.startswith("tuned") and tuned is None:             # one LoRA per clip
                with tempfile.TemporaryDirectory() as tmp:
                    H, W = (x * pipe.vae.spatial_factor * (pipe.sr.cfg.sr.scale if pipe.sr else 1)
                            for x in pipe.latent_size_for(None, None))
                    passes = 1 if pipe.interp is not None else 0
                    rate = pipe.interp.cfg.interp.rate if passes else 1
                    clip_len = pipe.reachable(1 + rate * (pipe.base_cfg.dit.frames - 1), passes)
                    clip = truth(p, clip_len, H, W, rate, seed, i)           # the clip run_task edits
                    video = write_mp4(clip, f"{tmp}/clip.mp4", fps=pipe.fps * rate)
                    adapter = tune(video, p, f"{tmp}/adapter", stage_folder(folder, "base"),
                                   stage_folder(folder, "vae"), steps=tune_steps, seed=seed,
                                   progress=False)
                    tuned = Pipeline(folder, pipe.device, adapters=[str(adapter)])
            if method.startswith("tuned"):
                target = tuned
            for e in EDITS:
                for s in (strengths if method == "sdedit" else (1.0,)):
                    rows.append({**run_task(target, "edit", p, i, seed, dict(kw), None, s, e, method,
                                            inject),
                                 "strength": s, "edit": e, "method": method})
                    bar.update()
    bar.close()
    return rows


def evaluate_task(folder, task: str, prompts: list[str], seed: int = 0, sampling: dict | None = None,
                  device="cpu", length: int | None = None, progress: bool = True,
                  methods=EDIT_METHODS, tune_steps: int = 100, strengths=EDIT_STRENGTHS,
                  inject: float = EDIT_INJECT) -> dict:
    """Every prompt through `task` on the cascade in `folder` -> {"rows": per video, "summary":
    means, "videos": the first 8 videos (for a contact sheet)}; edit: one summary per method,
    attribute and strength (sdedit: the curve over S; the others from S = 1). tuned and
    tuned_injected fit one LoRA (`tuning.tune`, tune_steps) to each clip first; strengths: the
    SDEdit curve's; inject: the injected methods' share of steps."""
    from tqdm.auto import tqdm

    from cascade.pipeline import Pipeline
    if task not in TASKS:
        raise ValueError(f"--task: '{task}' is not one of t2v, {', '.join(TASKS)}")
    pipe = Pipeline(folder, device)
    kw = {k: v for k, v in (sampling or {}).items() if v is not None}
    if task == "invert":
        rows = invert_rows(pipe, prompts, seed, progress=progress)
        summary = {f"{n} steps": summarise([r for r in rows if r["steps"] == n]) for n in INVERT_STEPS}
    elif task != "edit":
        rows = [{**run_task(pipe, task, p, i, seed, kw, length)}
                for i, p in enumerate(tqdm(prompts, desc=f"eval {task}", disable=not progress))]
        summary = summarise(rows)
    else:
        bad = [m for m in methods if m not in EDIT_METHODS]
        if bad:
            raise ValueError(f"--edit-methods: {', '.join(bad)} not among {', '.join(EDIT_METHODS)}")
        if not strengths or not all(0 < s <= 1 for s in strengths):
            raise ValueError(f"--edit-strengths: each must be in (0, 1], got {list(strengths)}")
        check_number("--inject", inject, 0, 1)
        rows = edit_rows(pipe, folder, prompts, seed, kw, methods, tune_steps, progress, strengths,
                         inject)
        summary = {f"{m} {e} S={s}": summarise(g) for (m, e, s), g in _groups(rows).items()}
    videos = [r.pop("video") for r in rows if "video" in r][:8]
    return {"task": task, "seed": seed, "rows": rows, "summary": summary, "videos": videos,
            "prompts": [r["prompt"] for r in rows][:8]}
