"""`cascade eval`: how well a trained cascade does on the embedded synthetic domain.

Four measurements, each written to the --out folder (eval.json, eval.csv, eval.png, samples.png):

1. Prompt adherence. For N prompts that cover the domain (`balanced_prompts`) each generated video is
   read by a plain, deterministic analyser (`analyse`, no learned model) that recovers the
   background colour, the object's colour, shape and motion; a factor is right when it matches the
   prompt. The analyser is checked on rendered ground truth (a "ground truth" row, and the tests);
   the same truth through the VAE and SR (an "autoencoded truth" row) is the most a base can get
   through these stages.
2. Temporal consistency: mean |frame t+1 - frame t| and frame-to-frame LPIPS, each also as a ratio to
   the same statistic on ground-truth clips of the same prompts (same frames, size and frame rate).
   Ratio < 1: the video changes less than the truth (a frozen object), > 1: more (flicker).
3. Per-stage quality on held-out clips (each stage's own data config, its validation split): VAE
   reconstruction PSNR / LPIPS; interp PSNR from the true keyframe latents (with a latent-lerp
   baseline); SR PSNR from the stage's own downsampling of true clips (with a bilinear baseline).
4. Ablations: the adherence and consistency row for the full cascade and with stages removed.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from cascade.data.synthetic import (BACKGROUNDS, COLOURS, MIN_CONTRAST, SHAPES, SIZE_RANGE,
                                    SPEED_RANGE, balanced_prompts, parse_caption, place, render,
                                    shape_sdf, torus_offset)

FACTORS = ("colour", "shape", "motion", "background")
# what a viewer sees beside the prompt's factors: exactly one object in every frame (no split, no
# second copy, no fade-out), and a smooth track (`analyse`)
PERMANENCE = ("one_object",)

# ----------------------------------------------------------------------------- the analyser


@lru_cache(maxsize=None)
def shape_area(shape: str) -> float:
    """Area of `shape` at size r=1 (area = shape_area * r^2), measured on a rendered 256^2 grid of
    the domain's own signed distance field (so it matches `render` exactly)."""
    r, n = 64.0, 256
    c = torch.arange(n, dtype=torch.float64) + 0.5 - n / 2
    cover = (0.5 - shape_sdf(shape, c.view(1, n), c.view(n, 1), r)).clamp(0, 1)   # (n, n)
    return float(cover.sum()) / r ** 2


def still_threshold(frames: float, size: int) -> float:
    """Largest displacement over a clip, as a fraction of the image side, that counts as standing
    still: half the smallest travel a moving ground-truth object makes in a clip of `frames`
    frames (at the data frame rate) and `size` pixels. SyntheticVideos moves an object by
    SPEED_RANGE[0] = 4% of the axis per frame at least, unless the clip is so long that the travel
    is clamped to the room left by the margins (1.2 * the largest SIZE_RANGE size + half a pixel
    on each side)."""
    room = 1.0 - 2 * (1.2 * SIZE_RANGE[1] + 0.5 / size)
    return 0.5 * min(SPEED_RANGE[0] * max(frames - 1, 0.0), room)


def _nearest(rgb: torch.Tensor, names: dict) -> str:
    table = torch.tensor(list(names.values()), dtype=torch.float32)              # (n, 3)
    return list(names)[int((table - rgb).norm(dim=1).argmin())]


# Template blurs (pixels). On ground truth downsampled 2x and upsampled back (bilinear, as soft as
# an SR input) at 32x32, shape accuracy was 0.85 with sharp templates only and 0.90 with these.
BLUR_SIGMAS = (0.0, 0.75, 1.5)


def _blurs(image: torch.Tensor) -> torch.Tensor:
    """image (H, W) -> (len(BLUR_SIGMAS), H, W): the image under separable Gaussian blurs."""
    out = [image]
    for sigma in BLUR_SIGMAS[1:]:
        k = torch.arange(-math.ceil(3 * sigma), math.ceil(3 * sigma) + 1, dtype=torch.float32)
        k = torch.exp(-0.5 * (k / sigma) ** 2)
        k = k / k.sum()
        x = torch.nn.functional.conv2d(image[None, None], k.view(1, 1, 1, -1), padding=(0, len(k) // 2))
        x = torch.nn.functional.conv2d(x, k.view(1, 1, -1, 1), padding=(len(k) // 2, 0))
        out.append(x[0, 0])
    return torch.stack(out)


# A separate object is a 4-connected region of object-coloured pixels (farther than MIN_CONTRAST/2
# from the background) whose area is at least this fraction of the smallest object the domain
# draws (the smallest shape at SIZE_RANGE[0]); smaller specks are noise, not objects.
MIN_OBJECT_FRACTION = 0.2


def min_object_area(height: int, width: int) -> float:
    """Pixels a region must cover to count as an object in a height x width frame."""
    r = SIZE_RANGE[0] * min(height, width)
    return MIN_OBJECT_FRACTION * min(shape_area(s) for s in SHAPES) * r * r


def count_objects(mask: torch.Tensor, min_area: float, wrap: bool = False) -> torch.Tensor:
    """mask (T, H, W) bool -> (T,) the number of 4-connected regions of at least min_area pixels
    in each frame (scipy.ndimage.label per frame). wrap: the frame is a torus (a loop's object
    leaving at one edge is the same object coming back at the other): regions touching across
    opposite edges are one."""
    from scipy import ndimage
    counts = []
    for frame in mask.numpy():
        labels, n = ndimage.label(frame)                       # 4-connectivity (the default)
        if wrap:
            parent = list(range(n + 1))

            def root(a):
                while parent[a] != a:
                    a = parent[a]
                return a
            for a, b in [*zip(labels[:, 0], labels[:, -1]), *zip(labels[0], labels[-1])]:
                if a and b:
                    parent[root(a)] = root(b)
            labels = np.array([root(i) for i in range(n + 1)])[labels]
        sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
        counts.append(int((sizes >= min_area).sum()))
    return torch.tensor(counts)


def _circular_track(mass: torch.Tensor, n: int, seen: torch.Tensor) -> torch.Tensor:
    """The centroid on a circle of n pixels per frame, unwrapped over the frames that show the
    object (a loop's object crossing an edge keeps going): mass (T, n) -> (T,) pixels."""
    theta = 2 * math.pi * (torch.arange(n, dtype=torch.float32) + 0.5) / n
    ang = torch.remainder(torch.atan2((mass * theta.sin()).sum(1), (mass * theta.cos()).sum(1)),
                          2 * math.pi)                                               # (T,) in [0, 2 pi)
    ang[seen] = torch.from_numpy(np.unwrap(ang[seen].numpy())).float()
    return ang * n / (2 * math.pi)


def analyse(video: torch.Tensor, time_scale: float = 1.0, still: float | None = None,
            wrap: bool = False) -> dict:
    """Read one synthetic-domain video: video (3, T, H, W) in [-1, 1] -> dict with the named
    factors colour, shape, motion, background (None where no object was found) and the numbers
    behind them. Any T, H, W. time_scale: frames of this video per frame at the data frame rate
    (4 after one interp pass at rate 4), so motion is judged per unit of time, not per frame.
    still: the standing-still threshold (fraction of the side) instead of `still_threshold`'s for
    a clip of this length (a part of a longer video moves only its share of the video's travel).
    wrap: a loop's frame is a torus (`synthetic.loop_place`): objects are counted across opposite
    edges, the centroid is the circular mean unwrapped over time, templates wrap around.
    (The numbered steps below are one analysis; kept in one function, ~65 lines, to read in order.)

    1. background: the per-channel median of the border pixels of every frame (the object covers
       at most ~15% of a frame and rarely the border) -> nearest of BACKGROUNDS.
    2. object: pixels farther than MIN_CONTRAST/2 from the background (the domain keeps an object
       >= MIN_CONTRAST away from its background); its colour is the median of the core of those
       pixels (distance >= 3/4 of the 90th percentile, away from anti-aliased edges) -> nearest of
       COLOURS. Each pixel's coverage a in [0, 1] is its projection on the background->object
       colour line (exact for the domain's anti-aliasing, which mixes the two colours).
    3. motion: the coverage-weighted centroid per frame, a least-squares line through it over
       time; the displacement over the clip (fraction of the image side) below
       `still_threshold` is "standing still", else the larger axis and its sign name the direction.
    4. permanence: per frame, the number of separate objects (`count_objects`: connected regions
       of object pixels above `min_object_area`); one_object is True when every frame has exactly
       one. track_jitter: the RMS distance of the per-frame centroids from the motion's fitted
       line, as a fraction of the image side (0 for a rendered clip, which moves at constant
       velocity; a jumping or wobbling object scores high).
    5. shape: per frame, each shape's template is rendered with the domain's own distance field at
       the object's centroid, sized so its area equals the object's (`shape_area`), and compared
       with the coverage map by soft IoU (sum min / sum max), the template also blurred at each of
       BLUR_SIGMAS (the best blur counts: decoded and upsampled frames have soft edges); the best
       mean IoU over frames names the shape. Templates rather than hand-set descriptor thresholds:
       they are calibrated by construction, at every resolution.
    """
    x = (video.float().clamp(-1, 1) + 1) * 127.5                                   # (3, T, H, W), 0..255
    _, T, H, W = x.shape
    border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, :, 0], x[:, :, :, -1]], 2)   # (3, T, 2W+2H)
    bg = border.flatten(1).median(1).values                                          # (3,)
    out = {"background": _nearest(bg, BACKGROUNDS), "background_rgb": bg.tolist(),
           "colour": None, "shape": None, "motion": None}
    dist = (x - bg.view(3, 1, 1, 1)).norm(dim=0)                                     # (T, H, W)
    rough = dist > MIN_CONTRAST / 2
    objects = count_objects(rough, min_object_area(H, W), wrap)                      # (T,)
    out.update(objects=objects.tolist(), one_object=bool((objects == 1).all()), track_jitter=None)
    if not rough.any():
        return out
    core = rough & (dist >= 0.75 * dist[rough].quantile(0.9))
    obj = x[:, core].median(1).values                                                # (3,)
    out.update(colour=_nearest(obj, COLOURS), colour_rgb=obj.tolist())
    d = obj - bg
    cover = (torch.einsum("cthw,c->thw", x - bg.view(3, 1, 1, 1), d) / d.dot(d)).clamp(0, 1)  # (T, H, W)
    cover = cover * rough                                                            # noise-free outside
    area = cover.flatten(1).sum(1)                                                   # (T,)
    ys = torch.arange(H, dtype=torch.float32) + 0.5
    xs = torch.arange(W, dtype=torch.float32) + 0.5
    seen = area > 0.5                                                                # frames with an object
    if wrap:
        cx, cy = _circular_track(cover.sum(1), W, seen), _circular_track(cover.sum(2), H, seen)
    else:
        cx = (cover.sum(1) * xs).sum(1) / area.clamp_min(1e-6)                       # (T,)
        cy = (cover.sum(2) * ys).sum(1) / area.clamp_min(1e-6)                       # (T,)

    # motion: slope of the centroid per data frame, times the clip's length in data frames
    frames = (T - 1) / time_scale + 1
    t = torch.arange(T, dtype=torch.float32)[seen] / time_scale
    if len(t) >= 2 and t.var() > 0:
        tc = t - t.mean()
        vx = float((tc * cx[seen]).sum() / tc.square().sum())                        # pixels per data frame
        vy = float((tc * cy[seen]).sum() / tc.square().sum())
        rx = cx[seen] - cx[seen].mean() - vx * tc                                    # off the line, pixels
        ry = cy[seen] - cy[seen].mean() - vy * tc
        out["track_jitter"] = float(((rx / W).square() + (ry / H).square()).mean().sqrt())
    else:
        vx = vy = 0.0
    dx, dy = vx * (frames - 1) / W, vy * (frames - 1) / H                            # fractions of the side
    thresh = still_threshold(frames, min(H, W)) if still is None else still
    if max(abs(dx), abs(dy)) < thresh:
        motion = "standing still"
    elif abs(dx) >= abs(dy):
        motion = "moving right" if dx > 0 else "moving left"
    else:
        motion = "moving down" if dy > 0 else "moving up"                           # y points down
    out.update(motion=motion, displacement=(dx, dy), still_threshold=thresh)

    # shape: soft IoU with each rendered template, averaged over the frames that show the object
    iou = {}
    for shape in SHAPES:
        scores = []
        for i in torch.nonzero(seen).flatten().tolist():
            r = math.sqrt(float(area[i]) / shape_area(shape))
            px, py = xs.view(1, W) - cx[i], ys.view(H, 1) - cy[i]
            if wrap:                                                                 # the nearest copy
                px, py = torus_offset(px, W), torus_offset(py, H)
            tmpl = (0.5 - shape_sdf(shape, px.expand(H, W), py.expand(H, W), r)).clamp(0, 1)  # (H, W)
            tmpl = _blurs(tmpl)                                                      # (n, H, W)
            inter = torch.minimum(tmpl, cover[i]).flatten(1).sum(1)                 # (n,)
            union = torch.maximum(tmpl, cover[i]).flatten(1).sum(1)
            scores.append(float((inter / union).max()))
        iou[shape] = sum(scores) / len(scores) if scores else 0.0
    out.update(shape=max(iou, key=iou.get), shape_iou=iou)
    return out


def adherence(video: torch.Tensor, prompt: str, time_scale: float = 1.0) -> dict:
    """analyse() one video and compare with its prompt -> {factor: bool, one_object: bool} + the
    analysis."""
    want, got = parse_caption(prompt), analyse(video, time_scale)
    return {**{f: got[f] == want[f] for f in FACTORS}, "one_object": got["one_object"],
            "analysis": got}


# ----------------------------------------------------------------------------- ground truth, consistency

def truth_clip(prompt: str, frames: int, height: int, width: int, time_scale: float = 1.0,
               seed: int = 0, index: int = 0) -> torch.Tensor:
    """A ground-truth clip of `prompt` drawn as SyntheticVideos draws one (size, speed, start from
    `place`, deterministic by seed and index), with `frames` frames at time_scale x the data frame
    rate (so it spans (frames-1)/time_scale + 1 data frames) -> (3, T, H, W) in [-1, 1]."""
    rng = np.random.default_rng((seed, 13, index))
    meta = place(parse_caption(prompt), rng, frames, height, width, time_scale)
    return render(meta, frames, height, width)


def truth_clips(prompts: list[str], frames: int, height: int, width: int, time_scale: float = 1.0,
                seed: int = 0) -> torch.Tensor:
    """`truth_clip` of each prompt (index = its position) -> (N, 3, T, H, W)."""
    return torch.stack([truth_clip(p, frames, height, width, time_scale, seed, i)
                        for i, p in enumerate(prompts)])


def frame_diff(videos: torch.Tensor) -> torch.Tensor:
    """Mean |frame t+1 - frame t| per video, in [0, 1] pixel units: (B, 3, T, H, W) -> (B,);
    nan for one-frame videos."""
    if videos.shape[2] < 2:
        return torch.full((videos.shape[0],), float("nan"))
    return (videos[:, :, 1:] - videos[:, :, :-1]).abs().flatten(1).mean(1) / 2


def load_lpips(mode: str = "auto"):
    """(LPIPS model or None, a description of its backbone). mode: pretrained (the ImageNet VGG
    trunk from the torch hub cache; error if absent), random (random trunk: only relative
    comparisons mean anything), auto (pretrained when its file is there, else random), off."""
    from cascade.losses import LPIPS_NET, build_lpips
    if mode == "off":
        return None, "off"
    if mode not in ("auto", "pretrained", "random"):
        raise ValueError(f"lpips: '{mode}' is not one of auto, pretrained, random, off")
    if mode in ("auto", "pretrained"):
        try:
            return build_lpips(True), f"{LPIPS_NET} (ImageNet-pretrained trunk)"
        except FileNotFoundError:
            if mode == "pretrained":
                raise
    return build_lpips(False), f"{LPIPS_NET} (random trunk: compare values only with each other)"


@torch.inference_mode()
def lpips_frames(model, a: torch.Tensor, b: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """LPIPS between matching frames of two videos: (B, 3, T, H, W) x2 -> (B,) mean over frames."""
    B, T = a.shape[0], a.shape[2]
    fa, fb = (v.transpose(1, 2).flatten(0, 1).float() for v in (a, b))          # (B*T, 3, H, W)
    dev = next(model.parameters()).device
    d = torch.cat([model(x.to(dev), y.to(dev)).flatten().cpu()
                   for x, y in zip(fa.split(chunk), fb.split(chunk))])           # (B*T,)
    return d.view(B, T).mean(1)


LPIPS_PAIRS = 8            # frame pairs per video that frame-to-frame LPIPS sees (a VGG pass each)


def frame_lpips(model, videos: torch.Tensor, pairs: int = LPIPS_PAIRS) -> torch.Tensor:
    """Frame-to-frame LPIPS per video (B, 3, T, H, W) -> (B,), the mean over at most `pairs`
    evenly spaced pairs (t, t+1); nan for one-frame videos."""
    T = videos.shape[2]
    if T < 2:
        return torch.full((videos.shape[0],), float("nan"))
    t = torch.linspace(0, T - 2, min(T - 1, pairs)).round().long()               # first frames
    return lpips_frames(model, videos[:, :, t], videos[:, :, t + 1])


def score_videos(name: str, videos: torch.Tensor, prompts: list[str], time_scale: float, lp,
                 seed: int = 0, truths: torch.Tensor | None = None) -> tuple[dict, list[dict]]:
    """One table row for videos (N, 3, T, H, W) of `prompts`: the fraction of videos whose colour,
    shape, motion, background (and all four) match the prompt, the fraction with exactly one
    object in every frame (one_object; "all" needs it too), the mean track jitter (fraction of the
    side, over videos with an object), and the temporal statistics, each also as the ratio to
    ground-truth clips of the same prompts (`truth_clip`, same T, H, W and time_scale; pass
    `truths` to reuse them). Returns (row, per-video analyses)."""
    N, _, T, H, W = videos.shape
    if truths is None:
        truths = truth_clips(prompts, T, H, W, time_scale, seed)
    checks = [adherence(v, p, time_scale) for v, p in zip(videos, prompts)]
    row = {"variant": name, "frames": T, "size": f"{H}x{W}"}
    for f in FACTORS + PERMANENCE:
        row[f] = sum(c[f] for c in checks) / N
    row["all"] = sum(all(c[f] for f in FACTORS + PERMANENCE) for c in checks) / N
    jitter = [c["analysis"]["track_jitter"] for c in checks if c["analysis"]["track_jitter"] is not None]
    row["track_jitter"] = sum(jitter) / len(jitter) if jitter else float("nan")
    diff, true_diff = frame_diff(videos), frame_diff(truths)
    row["frame_diff"] = float(diff.mean())
    row["frame_diff_ratio"] = float(diff.mean() / true_diff.mean())
    if lp is not None:
        lpd, true_lpd = frame_lpips(lp, videos), frame_lpips(lp, truths)
        row["frame_lpips"] = float(lpd.mean())
        row["frame_lpips_ratio"] = float(lpd.mean() / true_lpd.mean())
    per_video = [{"prompt": p, **{f: c[f] for f in FACTORS + PERMANENCE}, "analysis": _plain(c["analysis"]),
                  "frame_diff": float(d)} for p, c, d in zip(prompts, checks, diff)]
    return row, per_video


def _plain(d: dict) -> dict:
    """A dict of floats / strings / lists for JSON (tuples to lists, rounded floats)."""
    def conv(v):
        if isinstance(v, float):
            return None if math.isnan(v) else round(v, 4)
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v
    return conv(d)


# ----------------------------------------------------------------------------- generation, ablations

def generate_variants(pipe, prompts: list[str], seed: int, sampling: dict, batch_size: int,
                      bar=None, num_videos: int = 1) -> dict:
    """Sample `prompts` through the cascade and its ablations -> {variant: (videos, time_scale)}.
    sampling: keyword arguments of the pipeline call (base= / interp= / sr= StageSampling, or
    steps= ...). time_scale: the videos' frame rate over the base stage's (`analyse`).

    Each stage draws from its own generator seeded from the call's seed (see Pipeline), so the
    base keyframes and the interp output of one full run ARE the "keyframes only" and "no sr"
    videos: one run gives full, no sr and keyframes only; "no interp" (sr on the keyframes) takes
    a second run with interp_passes=0. Prompts go in batches of batch_size (each video's noise
    keyed by (seed, its prompt, its index among the prompt's num_videos): `Pipeline`, so a prompt's
    videos are those of `cascade sample PROMPT --num-videos N --seed S`; prompt-major order).
    Variants exist only where the folder has the stages: no interp / no sr need both interp and
    sr; keyframes only needs one of them (else it is the full cascade)."""
    has_i, has_s = pipe.interp is not None, pipe.sr is not None
    parts: dict[str, list] = {}
    scale: dict[str, float] = {}
    for i in range(0, len(prompts), batch_size):
        chunk, s = prompts[i:i + batch_size], seed
        res = pipe(chunk, seed=s, **sampling, num_videos=num_videos, batch_size=batch_size,
                   progress=False)
        got = {"full": (res.video, res.fps)}
        if has_i and has_s:
            got["no sr"] = (res.stages["lowres"], res.stage_fps["lowres"])
        if has_i or has_s:
            got["keyframes only"] = (res.stages["keyframes"], res.stage_fps["keyframes"])
        if bar is not None:
            bar.update()
        if has_i and has_s:
            res2 = pipe(chunk, seed=s, **sampling, interp_passes=0, num_videos=num_videos,
                        batch_size=batch_size, progress=False)
            got["no interp"] = (res2.video, res2.fps)
            if bar is not None:
                bar.update()
        for name, (v, fps) in got.items():
            parts.setdefault(name, []).append(v)
            scale[name] = fps / pipe.fps
    order = [n for n in ("full", "no interp", "no sr", "keyframes only") if n in parts]
    return {n: (torch.cat(parts[n]), scale[n]) for n in order}


# ----------------------------------------------------------------------------- per-stage quality

def _heldout(data_cfg, clips: int) -> tuple[torch.Tensor, list[str]]:
    """The first `clips` clips of a stage's validation split -> (videos (N, 3, T, H, W), captions)."""
    from cascade.data import build_dataset
    data = build_dataset(data_cfg, split="val")
    items = [data[i] for i in range(clips)]
    return torch.stack([s["video"] for s in items]), [s["caption"] for s in items]


def _snr_db(x, ref) -> float:
    """Mean over clips of 10 log10(||ref||^2 / ||x - ref||^2): x, ref (N, ...) latents, whose
    range has no fixed peak for a PSNR."""
    err = (x.float() - ref.float()).square().flatten(1).mean(1)
    return float((10 * torch.log10(ref.float().square().flatten(1).mean(1) / err.clamp_min(1e-12))).mean())


def _mean_psnr(a, b) -> float:
    from cascade.losses import psnr
    return float(psnr(a.cpu(), b.cpu()).mean())


@torch.inference_mode()
def stage_quality(pipe, sampling: dict, clips: int = 8, seed: int = 0, lp=None) -> dict:
    """Each stage's quality on `clips` held-out clips of its own data config (validation split),
    sampled as `sampling` {stage: StageSampling} says -> {stage: {metric: value}}.

    vae:    reconstruction (posterior mode) PSNR, and LPIPS per frame when lp is given.
    interp: the true clip encoded, its keyframe latents (slots 0, r, 2r, ...) interpolated by the
            stage, decoded: PSNR against the true frames; baselines: the keyframe latents
            interpolated linearly in time, and the VAE reconstruction (the ceiling). Also the
            in-between latents' SNR against the true latents (dB; uncapped by the decoder) and the
            share of decoded clips with one object in every frame (`analyse`), each beside lerp's.
    sr:     the true clip brought down as the stage's training does (`downsample_video`, sr.scale
            and sr.downsample), super-resolved: PSNR against the truth; baseline: bilinear
            upsampling (`upsample_video`, what the stage is conditioned on)."""
    from cascade.models.unet import upsample_video
    from cascade.stages import downsample_video, keyframe_lerp
    dev, out = pipe.device, {}
    vae = pipe.vae
    videos, _ = _heldout(pipe.vae_cfg.data, clips)
    recon = vae(videos.to(dev), sample=False)[0].clamp(-1, 1).cpu()             # (N, 3, T, H, W)
    out["vae"] = {"psnr": _mean_psnr(recon, videos)}
    if lp is not None:
        out["vae"]["lpips"] = float(lpips_frames(lp, recon, videos).mean())
    if pipe.interp is not None:
        st = pipe.interp
        videos, captions = _heldout(st.cfg.data, clips)
        z = vae.encode_latents(videos.to(dev))                                   # (N, C, F, h, w)
        r = st.cfg.interp.rate
        keys = z[:, :, ::r]                                                      # (N, C, K, h, w)
        gen = torch.Generator().manual_seed(seed)
        filled = st.sample(keys, *st.encode_text(captions), sampling["interp"], gen,
                           False)                                                # (N, C, F, h, w)
        lerp = keyframe_lerp(keys, r)                                             # (N, C, F, h, w)
        dec = lambda x: vae.decode_latents(x).clamp(-1, 1)  # noqa: E731
        frames = {"": dec(filled), "baseline_lerp_": dec(lerp), "vae_ceiling_": dec(z)}
        out["interp"] = {f"{k}psnr": _mean_psnr(v, videos) for k, v in frames.items()}
        # the stage itself, not capped by the decoder: the in-between latents against the true
        # ones, and what a viewer counts (one object in every decoded frame)
        between = torch.ones(z.shape[2], dtype=torch.bool)
        between[::r] = False
        out["interp"]["latent_snr_db"] = _snr_db(filled[:, :, between], z[:, :, between])
        out["interp"]["baseline_lerp_latent_snr_db"] = _snr_db(lerp[:, :, between], z[:, :, between])
        for k, v in frames.items():
            out["interp"][f"{k}one_object"] = sum(analyse(x)["one_object"] for x in v.cpu()) / len(v)
    if pipe.sr is not None:
        st = pipe.sr
        videos, captions = _heldout(st.cfg.data, clips)
        low = downsample_video(videos, st.cfg.sr.scale, st.cfg.sr.downsample)     # (N, 3, T, H/s, W/s)
        gen = torch.Generator().manual_seed(seed)
        up = st.sample(low.to(dev), *st.encode_text(captions), sampling["sr"], gen,
                       False)                                                    # (N, 3, T, H, W)
        out["sr"] = {"psnr": _mean_psnr(up, videos),
                     "baseline_bilinear_psnr": _mean_psnr(upsample_video(low, st.cfg.sr.scale), videos)}
    return out


# ----------------------------------------------------------------------------- the whole evaluation

@dataclass
class EvalReport:
    rows: list[dict]            # one per variant, then "ground truth"
    stages: dict                # stage -> {metric: value}
    skipped: list[str]          # what could not be measured, and why
    info: dict                  # prompts, seed, sampling, lpips backbone, stages folder
    videos: dict                # variant -> per-video analyses
    samples: torch.Tensor       # the full cascade's videos (N, 3, T, H, W), for a contact sheet


def evaluate(folder, prompts: list[str], seed: int = 0, sampling: dict | None = None,
             batch_size: int = 8, heldout: int = 8, lpips: str = "auto", device="cpu",
             size: tuple = (None, None), progress: bool = True, videos_per_prompt: int = 1) -> EvalReport:
    """Run every measurement on the cascade in `folder` (see the module docstring). size: the
    videos' (height, width) in pixels, None for the trained size (the analyser reads any).
    videos_per_prompt: videos sampled per prompt (those of `cascade sample --num-videos`), each
    scored: how often the cascade gets one prompt right."""
    from tqdm.auto import tqdm

    from cascade.pipeline import MAX_VIDEOS, Pipeline
    from cascade.registry import DIFFUSION_STAGES
    from cascade.sampling import StageSampling, check_number, resolve_sampling
    if not prompts:
        raise ValueError("eval: needs at least one prompt (--num-prompts >= 1)")
    check_number("--videos-per-prompt", videos_per_prompt, 1, MAX_VIDEOS, integer=True)
    if batch_size < 1 or heldout < 0:
        raise ValueError(f"eval: --batch-size must be >= 1 and --heldout >= 0, got {batch_size}, "
                         f"{heldout}")
    for p in prompts:
        parse_caption(p)                                     # the analyser reads this domain only
    sampling = {s: StageSampling.of((sampling or {}).get(s)) for s in DIFFUSION_STAGES}
    pipe = Pipeline(folder, device)
    lp, lp_name = load_lpips(lpips)
    has_i, has_s = pipe.interp is not None, pipe.sr is not None
    skipped = [f"{s}: no {Path(folder) / s} stage" for s, has in (("interp", has_i), ("sr", has_s))
               if not has]
    if not (has_i and has_s):
        skipped.append("ablations: " + ("no stage to remove (base + vae only)" if not (has_i or has_s)
                                        else "no interp / no sr need both interp and sr"))
    chunks = -(-len(prompts) // batch_size)
    bar = tqdm(total=chunks * (1 + (has_i and has_s)) + 1 + (heldout > 0), desc="eval",
               disable=not progress)
    bar.set_postfix_str("sampling")
    variants = generate_variants(pipe, prompts, seed, {**sampling, "height": size[0], "width": size[1]},
                                 batch_size, bar, videos_per_prompt)
    per_video = [p for p in prompts for _ in range(videos_per_prompt)]       # a prompt per video
    bar.set_postfix_str("scoring")
    rows, videos = [], {}
    for name, (v, ts) in variants.items():
        truths = truth_clips(per_video, *v.shape[2:], ts, seed)                    # (N, 3, T, H, W)
        row, videos[name] = score_videos(name, v, per_video, ts, lp, seed, truths)
        row["stages"] = _stage_chain(name, has_i, has_s)
        rows.append(row)
        if name == "full":
            full_truths, full_ts = truths, ts
    row, videos["ground truth"] = score_videos("ground truth", full_truths, per_video, full_ts, lp, seed,
                                               full_truths)
    row["stages"] = "rendered (analyser check)"
    rows.append(row)
    row, videos["autoencoded truth"] = score_videos(
        "autoencoded truth", autoencoded_truths(pipe, per_video, full_truths, seed, sampling), per_video,
        full_ts, lp, seed, full_truths)
    row["stages"] = "rendered > vae" + (" > sr" if has_s else "") + " (the ceiling)"
    rows.append(row)
    bar.update()
    stages = {}
    if heldout > 0:
        bar.set_postfix_str("stage quality")
        stages = stage_quality(pipe, sampling, heldout, seed, lp)
        bar.update()
    else:
        skipped.append("stage quality: --heldout 0")
    bar.close()
    info = {"stages_folder": str(folder), "seed": seed, "num_prompts": len(prompts),
            "videos_per_prompt": videos_per_prompt, "prompts": per_video,
            "size": list(size),
            "batch_size": batch_size, "heldout_clips": heldout, "lpips": lp_name, "device": str(device),
            "sampling": {st.name: vars(resolve_sampling(sampling[st.name], config=st.cfg.diffusion))
                         for st in pipe.diffusion_stages()}}
    return EvalReport(rows, stages, skipped, info, videos, variants["full"][0])


def autoencoded_truths(pipe, prompts: list[str], truths: torch.Tensor, seed: int,
                       sampling: dict) -> torch.Tensor:
    """Ground-truth clips (N, 3, T, H, W) at the full variant's size -> as the cascade renders its
    own frames (`Pipeline.render_input`): brought to the VAE's size as SR's training does,
    encoded, decoded and super-resolved. Scored, they are the ceiling a base can reach through
    these VAE and SR stages: a shape the analyser misses here is lost by the autoencoder (or SR),
    not by the generator (through the tiny VAE shipped before 2026-12-06, 17-18 of 19 crosses read
    as diamonds or circles: docs/tiny-cascade.md)."""
    from cascade.sampling import resolve_sampling
    from cascade.seeding import RowGenerators
    sr = None if pipe.sr is None else resolve_sampling(sampling["sr"], config=pipe.sr.cfg.diffusion)
    return torch.cat([pipe.render_input(t, pipe.encode([p]), sr,
                                        RowGenerators.keyed([(seed, p, i, "autoencoded truth")]), False)
                      for i, (p, t) in enumerate(zip(prompts, truths))]).cpu()


def _stage_chain(variant: str, has_i: bool, has_s: bool) -> str:
    use_i = has_i and variant in ("full", "no sr")
    use_s = has_s and variant in ("full", "no interp")
    return " > ".join(["base"] + ["interp"] * use_i + ["vae"] + ["sr"] * use_s)


# ----------------------------------------------------------------------------- output

COLUMNS = ("variant", "stages", "frames", "size", *FACTORS, *PERMANENCE, "all", "track_jitter",
           "frame_diff", "frame_diff_ratio", "frame_lpips", "frame_lpips_ratio")


def _fmt(v) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.3f}"
    return str(v)


def markdown(report: EvalReport) -> str:
    """The report as markdown: the variants table, the per-stage table, what was skipped."""
    cols = [c for c in COLUMNS if any(c in r for r in report.rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in report.rows]
    lines.append("")
    n, k = report.info["num_prompts"], report.info.get("videos_per_prompt", 1)
    of = f"{n * k} videos ({n} prompts x {k})" if k > 1 else f"{n} prompts"
    lines.append(f"Accuracies are fractions of {of}; one_object: exactly "
                 f"one object in every frame (\"all\" needs it and the four factors); track_jitter: "
                 f"RMS of the centroids off their fitted line, fraction of the side; frame_diff: mean "
                 f"|frame t+1 - frame t| in [0, 1] units; *_ratio: over ground-truth clips of the same "
                 f"prompts. LPIPS: {report.info['lpips']}.")
    if report.stages:
        lines += ["", "| stage | metric | value |", "|---|---|---|"]
        for stage, metrics in report.stages.items():
            lines += [f"| {stage} | {k} | {_fmt(v)} |" for k, v in metrics.items()]
        lines.append(f"\nPer-stage quality on {report.info['heldout_clips']} held-out clips of each "
                     f"stage's own data config (validation split); PSNR in dB.")
    for s in report.skipped:
        lines.append(f"- skipped {s}")
    return "\n".join(lines)


def bar_chart(rows: list[dict], path: Path) -> Path:
    """Accuracy per factor (and all four at once), one bar per variant -> PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    metrics = (*FACTORS, *PERMANENCE, "all")
    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=100)
    width = 0.8 / len(rows)
    for j, r in enumerate(rows):
        xs = [i + (j - (len(rows) - 1) / 2) * width for i in range(len(metrics))]
        truth = r["variant"] == "ground truth"                                  # the analyser's check
        ax.bar(xs, [r[m] for m in metrics], width, label=r["variant"], color="0.7" if truth else None)
    ax.set_xticks(range(len(metrics)), metrics)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("fraction of prompts")
    ax.set_title("prompt adherence per variant (analyser on generated videos)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(report: EvalReport, out: str | Path) -> list[Path]:
    """eval.json (everything), eval.csv (one row per variant), eval.png (accuracy bars) and
    samples.png (a contact sheet of the full cascade's first videos) in `out`."""
    from cascade.video_io import contact_sheet
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    info = report.info
    js = out / "eval.json"
    js.write_text(json.dumps(_plain({"info": info, "variants": report.rows, "stages": report.stages,
                                     "skipped": report.skipped, "videos": report.videos}), indent=1))
    cs = out / "eval.csv"
    cols = [c for c in COLUMNS if any(c in r for r in report.rows)]
    with open(cs, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(_plain({"rows": report.rows})["rows"])
    png = bar_chart(report.rows, out / "eval.png")
    n = min(8, len(info["prompts"]))
    sheet = contact_sheet(report.samples[:n], out / "samples.png", captions=info["prompts"][:n])
    return [js, cs, png, sheet]


def default_prompts(n: int, seed: int = 0) -> list[str]:
    """The evaluation prompts: n captions covering the domain evenly (`balanced_prompts`)."""
    if n < 1:
        raise ValueError(f"eval: --num-prompts must be >= 1, got {n}")
    return balanced_prompts(n, seed)
