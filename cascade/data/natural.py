"""Natural pictures with no download: camera-motion clips over the photographs installed packages
ship, and clips of ffmpeg's own test-pattern generators, for proving the video autoencoder on
content no one here drew (`cascade data natural`, `cascade data lavfi`).

Photographs: scikit-image's bundled data images (the optional extra `pip install -e '.[natural]'`)
and matplotlib's sample photo. TRAIN_PHOTOS are 13 of the photographs (PHOTOGRAPHS) and six graphic
images (GRAPHICS: printed text, a scanned page, a checkerboard, a colour wheel, the logo, a
silhouette), and make the training clips; HELDOUT_PHOTOS
(two of scikit-image's, and matplotlib's Grace Hopper: a source the training never saw) make the
validation clips only, and `natural_clips` refuses to put one in the training set.

A clip is a camera move over a random window of a photograph: a pan (the window slides), a zoom
(it shrinks or grows about its centre) or a slow rotation, rendered by bilinear sampling from the
photograph first brought down (antialiased) to about twice the clip's resolution, so frames are
sharp but not aliased. Every clip is a pure function of (seed, photograph, clip index). Written as
lossless H.264 mp4 (decoded, the frames exactly; lossy x264 does not repeat its bytes run to run)
with a manifest (path, caption, source) the video-folder loader reads (data.kind=folder):
train.csv and val.csv in the output folder.

ffmpeg's lavfi sources (testsrc2, mandelbrot, life, cellauto, gradients, smptehdbars, sierpinski)
are drawn by ffmpeg itself (Debian's ffmpeg; none of it is ours): `lavfi_clips` writes them the
same way, for measurement only.
"""
from __future__ import annotations

import csv
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

PHOTOGRAPHS = ("astronaut", "coffee", "hubble_deep_field", "immunohistochemistry", "retina",
               "motorcycle", "camera", "brick", "grass", "gravel", "moon", "coins", "clock")
GRAPHICS = ("text", "page", "checkerboard", "colorwheel", "logo", "horse")   # flat colour, edges, text
TRAIN_PHOTOS = PHOTOGRAPHS + GRAPHICS
HELDOUT_PHOTOS = ("chelsea", "rocket", "grace_hopper")
SUBJECTS = {"astronaut": "an astronaut", "coffee": "a cup of coffee", "hubble_deep_field":
            "galaxies in deep space", "immunohistochemistry": "stained tissue under a microscope",
            "retina": "a retina", "motorcycle": "a motorcycle", "camera": "a cameraman",
            "brick": "a brick wall", "grass": "grass", "gravel": "gravel", "moon": "the moon's surface",
            "coins": "old coins", "clock": "a clock", "text": "printed text", "page": "a printed page",
            "checkerboard": "a checkerboard", "colorwheel": "a colour wheel", "logo": "a logo",
            "horse": "a horse's silhouette", "chelsea": "a cat", "rocket": "a rocket on its pad",
            "grace_hopper": "a woman in uniform"}
MOTIONS = ("pans left", "pans right", "pans up", "pans down", "zooms in", "zooms out",
           "rotates clockwise", "rotates counterclockwise")
DEFAULT_SIZES = ((9, 64, 64), (9, 48, 64), (9, 64, 48))
LAVFI = ("testsrc2", "mandelbrot", "life", "cellauto", "gradients", "smptehdbars", "sierpinski")


def photo(name: str) -> torch.Tensor:
    """A shipped photograph -> float (3, H, W) in [0, 1]; one line naming a missing package."""
    if name == "grace_hopper":
        from matplotlib import cbook
        from PIL import Image
        with cbook.get_sample_data("grace_hopper.jpg") as f:
            rgb = np.asarray(Image.open(f).convert("RGB"))
    else:
        try:
            import skimage.data as data
        except ImportError:
            raise ValueError("cascade data natural: needs scikit-image, which ships the photographs "
                             "(pip install -e '.[natural]', or pip install scikit-image)") from None
        rgb = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
    rgb = np.asarray(rgb)
    if rgb.dtype == bool:                                        # horse: a binary silhouette
        rgb = rgb.astype(np.uint8) * 255
    if rgb.ndim == 3 and rgb.shape[2] == 4:                      # logo: RGBA, composited on white
        a = rgb[..., 3:].astype(np.float32) / 255.0
        rgb = (rgb[..., :3] * a + 255.0 * (1 - a)).round().astype(np.uint8)
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[..., None], 3, axis=2)
    return torch.from_numpy(rgb[..., :3].astype(np.float32) / 255.0).permute(2, 0, 1)


def camera_clip(image: torch.Tensor, frames: int, height: int, width: int,
                rng: np.random.Generator) -> tuple[torch.Tensor, str]:
    """One camera move over `image` (3, H, W) -> (clip (3, frames, height, width) in [-1, 1], the
    motion's words)."""
    _, H, W = image.shape
    motion = MOTIONS[int(rng.integers(len(MOTIONS)))]
    side = float(rng.uniform(0.3, 0.6)) * min(H, W)                       # window height in pixels
    aspect = width / height
    half = np.array([side * aspect / 2, side / 2])                         # (x, y) half extents
    travel = float(rng.uniform(0.15, 0.35)) * side                         # pan distance, pixels
    zoom = float(rng.uniform(1.2, 1.6))
    angle = math.radians(float(rng.uniform(8, 20)))
    reach = half * (zoom if motion == "zooms out" else 1) * (1.45 if "rotates" in motion else 1)
    reach = reach + (travel if "pans" in motion else 0)
    lo, hi = reach, np.array([W, H]) - reach
    centre = np.array([rng.uniform(lo[0], max(lo[0], hi[0])), rng.uniform(lo[1], max(lo[1], hi[1]))])
    # bring the photograph down to about 2x the clip's pixels per window pixel (antialiased)
    f = min(1.0, 2.0 * height / side)
    small = F.interpolate(image[None], scale_factor=f, mode="bilinear", antialias=True,
                          align_corners=False)[0] if f < 1 else image
    sh, sw = small.shape[1:]
    ys, xs = torch.linspace(-1, 1, height), torch.linspace(-1, 1, width)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    out = []
    for k in range(frames):
        u = k / max(1, frames - 1)
        c, s, a = centre.copy(), 1.0, 0.0
        d = {"pans left": (-1, 0), "pans right": (1, 0), "pans up": (0, -1), "pans down": (0, 1)}
        if motion in d:
            c = c + travel * (u - 0.5) * np.array(d[motion])
        elif motion == "zooms in":
            s = zoom ** (-u)
        elif motion == "zooms out":
            s = zoom ** u
        else:
            a = angle * (u - 0.5) * (1 if motion == "rotates clockwise" else -1)
        px = gx * half[0] * s
        py = gy * half[1] * s
        rx = px * math.cos(a) - py * math.sin(a) + c[0]                     # photograph pixels
        ry = px * math.sin(a) + py * math.cos(a) + c[1]
        grid = torch.stack([rx * f / sw * 2 - 1, ry * f / sh * 2 - 1], -1)[None].float()
        out.append(F.grid_sample(small[None], grid, mode="bilinear", padding_mode="border",
                                 align_corners=False)[0])
    return torch.stack(out, 1).clamp(0, 1) * 2 - 1, motion


def natural_clips(out: str | Path, seed: int = 0, per_photo: int = 24, heldout_per_photo: int = 8,
                  sizes=DEFAULT_SIZES, fps: float = 8.0, train_photos=TRAIN_PHOTOS,
                  heldout_photos=HELDOUT_PHOTOS, progress: bool = True) -> Path:
    """Write the clips and out/train.csv, out/val.csv (path, caption, source). -> out."""
    from tqdm.auto import tqdm

    from cascade.video_io import write_mp4
    leak = sorted(set(train_photos) & set(heldout_photos))
    if leak:
        raise ValueError(f"natural: {', '.join(leak)} cannot be both a training and a held-out photograph")
    out = Path(out)
    jobs = [("train", p, i, per_photo) for i, p in enumerate(train_photos)] + \
           [("val", p, i, heldout_per_photo) for i, p in enumerate(heldout_photos)]
    rows = {"train": [], "val": []}
    bar = tqdm(total=sum(j[3] for j in jobs), desc="natural clips", disable=not progress)
    for split, name, i, n in jobs:
        image = photo(name)
        (out / split).mkdir(parents=True, exist_ok=True)
        for k in range(n):
            T, H, W = sizes[k % len(sizes)]
            rng = np.random.default_rng((seed, 0 if split == "train" else 1, i, k))
            clip, motion = camera_clip(image, T, H, W, rng)
            rel = f"{split}/{name}_{k:03d}.mp4"
            write_mp4(clip, out / rel, fps=fps, lossless=True)
            rows[split].append([rel, f"a photograph of {SUBJECTS[name]}, the camera {motion}", name])
            bar.update()
    bar.close()
    for split, r in rows.items():
        with open(out / f"{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows([["path", "caption", "source"], *r])
    return out


def lavfi_clips(out: str | Path, frames: int = 9, size: tuple = (64, 64), fps: float = 8.0,
                clips_per_source: int = 4) -> Path:
    """Clips of ffmpeg's lavfi test sources (drawn by ffmpeg) -> out/*.mp4 and out/lavfi.csv.
    A missing ffmpeg is one line naming it."""
    exe = shutil.which("ffmpeg")
    if exe is None:
        raise FileNotFoundError("cascade data lavfi: needs the ffmpeg program (Debian: apt-get "
                                "install ffmpeg)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    H, W = size
    rows = []
    for src in LAVFI:
        for k in range(clips_per_source):
            rel = f"{src}_{k}.mp4"
            args = {"testsrc2": "", "mandelbrot": f":start_scale={2.5 / (1 + k)}",
                    "life": f":seed={k}:mold=10:ratio=0.3", "cellauto": f":rule={(30, 90, 110, 150)[k % 4]}",
                    "gradients": f":seed={k}:speed=0.05", "smptehdbars": "", "sierpinski": f":seed={k}"}[src]
            start = k * frames / fps                                       # a later window each
            cmd = [exe, "-v", "error", "-y", "-f", "lavfi", "-i", f"{src}=size={W * 2}x{H * 2}:rate={fps}{args}",
                   "-ss", f"{start}", "-frames:v", str(frames), "-vf", f"scale={W}:{H}:flags=area",
                   "-pix_fmt", "yuv420p", "-c:v", "libx264", "-crf", "18", str(out / rel)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode:
                raise ValueError(f"ffmpeg could not draw {src}: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
            rows.append([rel, f"a {src} test pattern", src])
    with open(out / "lavfi.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", "caption", "source"], *rows])
    return out
