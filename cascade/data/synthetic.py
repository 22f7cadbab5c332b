"""The embedded default data set: procedurally drawn text-video pairs.

"a red circle moving left on a blue background": one anti-aliased shape of a named colour moves in a
named direction across a plain background. Every sample is computed from (seed, index) alone, so
sample i is the same in any process, worker or world size, and the set never runs out.

Edges are anti-aliased analytically: each shape is a signed distance field d (in pixels, negative
inside) and a pixel's coverage is clamp(0.5 - d, 0, 1), the area of a pixel-wide box filter under a
straight edge. That keeps the clips reconstructible by a small VAE (no aliasing staircase).
"""
from __future__ import annotations

import math
import re

import numpy as np
import torch
from torch.utils.data import Dataset

from cascade.data.buckets import parse_buckets

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = {                      # name -> RGB (0..255), well separated
    "red": (220, 30, 30),
    "orange": (250, 130, 20),
    "yellow": (245, 225, 40),
    "green": (30, 170, 60),
    "blue": (30, 70, 220),
    "purple": (150, 50, 200),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
BACKGROUNDS = {                  # name -> RGB; a background never has the object's colour
    "black": COLOURS["black"],
    "white": COLOURS["white"],
    "gray": (128, 128, 128),
    "blue": COLOURS["blue"],
    "green": COLOURS["green"],
}
MOTIONS = ("moving left", "moving right", "moving up", "moving down", "standing still")
DIRECTIONS = {                   # motion -> unit (dx, dy) in image coordinates (y points down)
    "moving left": (-1.0, 0.0), "moving right": (1.0, 0.0),
    "moving up": (0.0, -1.0), "moving down": (0.0, 1.0), "standing still": (0.0, 0.0),
}
MIN_CONTRAST = 100.0             # smallest RGB distance between an object and its background
SIZE_RANGE = (0.12, 0.22)        # object "radius" as a fraction of min(H, W)
SPEED_RANGE = (0.04, 0.08)       # displacement per frame at REF_FPS, as a fraction of the motion axis
REF_FPS = 8.0                    # the frame rate clips are drawn at by default (data.fps scales speed)


def _allowed_backgrounds(colour: str) -> list[str]:
    c = np.array(COLOURS[colour], float)
    return [b for b, rgb in BACKGROUNDS.items()
            if b != colour and np.linalg.norm(c - np.array(rgb, float)) >= MIN_CONTRAST]


ALLOWED_BACKGROUNDS = {c: _allowed_backgrounds(c) for c in COLOURS}   # colour -> background names


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def make_caption(shape: str, colour: str, motion: str, background: str) -> str:
    """The caption grammar that `parse_caption` inverts."""
    return f"{_article(colour)} {colour} {shape} {motion} on {_article(background)} {background} background"


_CAPTION_RE = re.compile(
    r"^an? (?P<colour>\w+) (?P<shape>\w+) (?P<motion>{}) on an? (?P<background>\w+) background$".format(
        "|".join(MOTIONS)))


def parse_caption(caption: str) -> dict:
    """Caption of this domain -> dict(shape, colour, motion, background). Raises ValueError."""
    m = _CAPTION_RE.match(caption.strip().lower())
    if (m is None or m["shape"] not in SHAPES or m["colour"] not in COLOURS
            or m["background"] not in BACKGROUNDS):
        raise ValueError(f"not a caption of the synthetic domain: '{caption}'")
    return m.groupdict()


def sample_meta(rng: np.random.Generator) -> dict:
    """Draw the discrete factors of one clip: shape, colour, motion, background."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    motion = MOTIONS[rng.integers(len(MOTIONS))]
    allowed = ALLOWED_BACKGROUNDS[colour]
    background = allowed[rng.integers(len(allowed))]
    return {"shape": shape, "colour": colour, "motion": motion, "background": background}


def random_prompts(n: int, seed: int = 0) -> list[str]:
    """n captions of the synthetic domain, deterministic by seed."""
    rng = np.random.default_rng((seed, 7))
    return [make_caption(**sample_meta(rng)) for _ in range(n)]


def balanced_prompts(n: int, seed: int = 0) -> list[str]:
    """n captions that cover the domain evenly, deterministic by seed: shapes, colours and motions
    each go through a fresh random order of their whole vocabulary before any repeats (so any n
    consecutive captions name each shape, colour and motion n/len(vocab) times, +-1), and each
    caption's background cycles through the ones its colour allows."""
    rng = np.random.default_rng((seed, 11))

    def cycle(vocab):                      # a random permutation, again and again
        out = []
        while len(out) < n:
            out += [vocab[i] for i in rng.permutation(len(vocab))]
        return out[:n]

    shapes, colours, motions = cycle(SHAPES), cycle(list(COLOURS)), cycle(MOTIONS)
    seen = {c: int(rng.integers(len(ALLOWED_BACKGROUNDS[c]))) for c in COLOURS}  # per-colour offset
    prompts = []
    for shape, colour, motion in zip(shapes, colours, motions):
        allowed = ALLOWED_BACKGROUNDS[colour]
        prompts.append(make_caption(shape, colour, motion, allowed[seen[colour] % len(allowed)]))
        seen[colour] += 1
    return prompts


def place(meta: dict, rng: np.random.Generator, frames: int, height: int, width: int,
          time_scale: float = 1.0) -> dict:
    """Discrete factors (shape, colour, motion, background) -> the same dict plus size, speed, start
    and velocity in pixels (per frame), drawn from rng for a clip of `frames` frames of height x
    width: object size and speed vary; the start is chosen so the object stays in frame over the
    whole clip, and the travel is clamped to the room there is (so long clips stay in frame too).
    time_scale: the clip's frame rate over REF_FPS, the rate SPEED_RANGE is measured at; a clip at
    4x the rate shows the same motion in 4x the frames (the interpolation stage trains on those)."""
    meta = _place(meta, rng, (frames - 1) / time_scale + 1, height, width)
    meta["velocity"] = tuple(v / time_scale for v in meta["velocity"])
    meta["speed"] /= time_scale
    return meta


def _place(meta: dict, rng: np.random.Generator, frames: float, height: int, width: int) -> dict:
    meta = dict(meta)
    T, H, W = frames, height, width
    size = float(rng.uniform(*SIZE_RANGE) * min(H, W))
    margin = 1.2 * size + 0.5                          # keeps (almost) every shape in frame
    dx, dy = DIRECTIONS[meta["motion"]]
    axis_len = W if dx else H
    room = max(axis_len - 2 * margin, 0.0)             # travel available along the motion axis
    speed = float(rng.uniform(*SPEED_RANGE) * axis_len) if (dx or dy) else 0.0
    if T > 1:
        speed = min(speed, room / (T - 1))
    travel = speed * max(T - 1, 0)
    # start anywhere that leaves room for the whole travel in the direction of motion
    x0 = _uniform(rng, min(margin, W / 2) + travel * (dx < 0), max(W - margin, W / 2) - travel * (dx > 0))
    y0 = _uniform(rng, min(margin, H / 2) + travel * (dy < 0), max(H - margin, H / 2) - travel * (dy > 0))
    meta.update(size=size, speed=speed, start=(x0, y0), velocity=(speed * dx, speed * dy))
    return meta


def _box(px, py, bx, by):
    """Signed distance to an axis-aligned box of half extents (bx, by) centred at 0."""
    qx, qy = px.abs() - bx, py.abs() - by
    outside = torch.sqrt(qx.clamp(min=0) ** 2 + qy.clamp(min=0) ** 2)
    return outside + torch.maximum(qx, qy).clamp(max=0)


def _triangle(px, py, r):
    """Signed distance to an upward equilateral triangle, centroid at 0, circumradius r
    (Inigo Quilez's sdEquilateralTriangle with y flipped to point up on screen)."""
    k = math.sqrt(3.0)
    a = r * k / 2                                         # half the side length
    x, y = px.abs() - a, -py + a / k
    fold = x + k * y > 0
    x, y = torch.where(fold, (x - k * y) / 2, x), torch.where(fold, (-k * x - y) / 2, y)
    x = x - x.clamp(-2 * a, 0)
    return -torch.sqrt(x * x + y * y) * torch.sign(y)


def shape_sdf(shape: str, px: torch.Tensor, py: torch.Tensor, r: float) -> torch.Tensor:
    """Signed distance (pixels, < 0 inside) of `shape` of size r centred at 0; px, py offsets."""
    if shape == "circle":
        return torch.sqrt(px * px + py * py) - r
    if shape == "square":
        return _box(px, py, 0.85 * r, 0.85 * r)
    if shape == "diamond":
        return (px.abs() + py.abs() - 1.2 * r) / math.sqrt(2.0)
    if shape == "triangle":
        return _triangle(px, py, 1.35 * r)
    if shape == "cross":
        return torch.minimum(_box(px, py, r, 0.38 * r), _box(px, py, 0.38 * r, r))
    raise ValueError(f"unknown shape '{shape}'")


def loop_place(meta: dict, frames: int, height: int, width: int, period: int = 0,
               rng: np.random.Generator | None = None) -> dict:
    """A placed clip (`place`) made a loop of `frames` frames: a moving object crosses the frame
    once over `period` frames (0: frames - 1) and wraps around (what leaves at one edge comes back
    at the other, `render`), so with the default period its last frame is its first, the frame
    the loop task gives twice; a standing object stays as it is. The only loop of an object moving
    one way there is. A longer period than the clip: a part of a loop (the interp stage's clips);
    with `rng` it starts anywhere along its motion axis (a torus has no edge), so a part shows the
    object cut by the frame's edge as often as the whole loop does (`place`'s start, kept away from
    the edges, almost never let a short part reach them). A whole loop keeps `place`'s start: it
    passes every position whatever its phase."""
    meta = dict(meta, loop=True)
    dx, dy = DIRECTIONS[meta["motion"]]
    period = period or frames - 1
    if (dx or dy) and period > 0:
        speed = (width if dx else height) / period
        meta.update(speed=speed, velocity=(speed * dx, speed * dy))
        if rng is not None and period > frames - 1:                        # a part of a loop
            x0, y0 = meta["start"]
            along = float(rng.uniform(0, width if dx else height))
            meta["start"] = (along, y0) if dx else (x0, along)
    return meta


def torus_offset(d: torch.Tensor, n: float) -> torch.Tensor:
    """Offsets d (pixels) on a frame side of n pixels taken to the nearest copy on a torus,
    in [-n/2, n/2): where a loop's shape is drawn and read (`render`, `evaluate.analyse`)."""
    return torch.remainder(d + n / 2, n) - n / 2


def render(meta: dict, frames: int, height: int, width: int) -> torch.Tensor:
    """meta (with size, start, velocity in pixels) -> video (3, T, H, W) in [-1, 1]. A loop
    (`loop_place`) is drawn on a torus: the shape also at one frame's width (height) either side."""
    t = torch.arange(frames, dtype=torch.float32)                          # (T,)
    cx = meta["start"][0] + meta["velocity"][0] * t                         # (T,)
    cy = meta["start"][1] + meta["velocity"][1] * t                         # (T,)
    ys = torch.arange(height, dtype=torch.float32) + 0.5                    # pixel centres
    xs = torch.arange(width, dtype=torch.float32) + 0.5
    px = xs.view(1, 1, width) - cx.view(frames, 1, 1)                       # (T, 1, W)
    py = ys.view(1, height, 1) - cy.view(frames, 1, 1)                      # (T, H, 1)
    if meta.get("loop"):                                                    # the nearest copy
        px, py = torus_offset(px, width), torus_offset(py, height)
    px, py = px.expand(frames, height, width), py.expand(frames, height, width)
    cover = (0.5 - shape_sdf(meta["shape"], px, py, meta["size"])).clamp(0, 1)  # (T, H, W)
    fg = torch.tensor(COLOURS[meta["colour"]], dtype=torch.float32).view(3, 1, 1, 1) / 127.5 - 1
    bg = torch.tensor(BACKGROUNDS[meta["background"]], dtype=torch.float32).view(3, 1, 1, 1) / 127.5 - 1
    return bg + (fg - bg) * cover.unsqueeze(0)                              # (3, T, H, W)


def _uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, max(lo, hi)))          # max(): rounding can make hi a hair < lo


class SyntheticVideos(Dataset):
    """Map-style, "infinite" data set of (video, caption, meta), a pure function of (seed, index).

    Each sample: random discrete factors (`sample_meta`), then size, speed and start (`place`).
    T=1 gives an image (its first frame). loops: the share of clips that are loops (`loop_place`,
    crossing the frame in loop_period frames), drawn from a stream of their own (every other clip
    is the same as with loops=0).
    """

    def __init__(self, frames: int, height: int, width: int, seed: int = 0, fps: float = REF_FPS,
                 buckets: list | None = None, loops: float = 0.0, loop_period: int = 0):
        if min(frames, height, width, fps) <= 0:
            raise ValueError(f"frames, height, width, fps must be positive, got {frames}, {height}, "
                             f"{width}, {fps}")
        self.frames, self.height, self.width, self.seed = frames, height, width, seed
        self.time_scale = fps / REF_FPS                  # motion per frame shrinks at higher fps
        self.loops, self.loop_period = loops, loop_period
        self.buckets = parse_buckets(buckets) if buckets else []   # any index renders at any bucket
        self.bucket_members = None

    def __len__(self) -> int:
        return 2 ** 31

    def meta(self, index: int) -> dict:
        """The full description of sample `index`: discrete factors + size, speed, start (pixels)."""
        return self._meta(int(index), self.frames, self.height, self.width)

    def _meta(self, index: int, T: int, H: int, W: int) -> dict:
        rng = np.random.default_rng((self.seed, index))
        meta = place(sample_meta(rng), rng, T, H, W, self.time_scale)
        loop_rng = np.random.default_rng((self.seed, index, 0x100B))
        if self.loops and loop_rng.random() < self.loops:
            meta = loop_place(meta, T, H, W, self.loop_period, loop_rng)
        return meta

    def __getitem__(self, index) -> dict:
        """index: an int, or (int, bucket) from a BucketSampler: the clip at the bucket's shape."""
        index, bucket = index if isinstance(index, tuple) else (index, None)
        T, H, W = self.buckets[bucket] if bucket is not None else (self.frames, self.height, self.width)
        meta = self._meta(int(index), T, H, W)
        video = render(meta, T, H, W)                                        # (3, T, H, W)
        caption = make_caption(meta["shape"], meta["colour"], meta["motion"], meta["background"])
        return {"video": video, "caption": caption, "meta": meta}
