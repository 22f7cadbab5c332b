"""Aspect-ratio and duration buckets (Sora's "native aspect ratios", Open-Sora's bucket sampler).

A stage's config lists the shapes it trains at, `data.buckets: [[frames, height, width], ...]`
(pixels). Each video goes to the bucket nearest its own aspect ratio, and among those the
longest one it can fill at data.fps, then the one nearest its own resolution; it is resized to
cover the bucket and centre-cropped, and a bucket whose aspect ratio would crop away more than
`data.bucket_max_crop` of the picture is not a candidate. A video that no bucket admits is
skipped (named in the log); a table that admits none of the videos is a one-line error.

Batches hold one bucket each: `BucketSampler` draws, for every (step, micro batch), a bucket
(with probability proportional to its videos; the synthetic set: uniformly), then the global
batch's videos from it, from an RNG seeded by (seed, step, micro) alone. The data position is the
step, so a run resumed from a checkpoint draws exactly the batches an uninterrupted run would;
the checkpoint records the table (`data_position`) and a resume with another table is refused.
"""
from __future__ import annotations

import hashlib
import json
import math

import numpy as np

from cascade.config import last_step

BUCKET_STREAM = 0xB0C    # a seed word of its own: the bucket draws are apart from the clips' starts


def parse_buckets(table) -> list[tuple[int, int, int]]:
    """[[T, H, W], ...] -> [(T, H, W), ...]; ValueError naming the entry that is not 3 positive ints."""
    out = []
    for i, b in enumerate(table or []):
        b = list(b) if hasattr(b, "__iter__") else [b]
        if len(b) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in b):
            raise ValueError(f"data.buckets[{i}]: {b} is not [frames, height, width] of positive integers")
        out.append(tuple(b))
    if len(set(out)) != len(out):
        raise ValueError(f"data.buckets: lists a shape twice ({out})")
    return out


def crop_fraction(h: int, w: int, bucket: tuple[int, int, int]) -> float:
    """Share of an h x w picture cut away when it is resized to cover the bucket and centre-cropped."""
    a, b = h / w, bucket[1] / bucket[2]
    return 1.0 - min(a / b, b / a)


def assign(h: int, w: int, frames: int, buckets: list[tuple[int, int, int]],
           max_crop: float) -> tuple[int | None, str]:
    """A video of h x w pixels with `frames` frames at data.fps -> (bucket index, '') or
    (None, why no bucket admits it). Nearest aspect ratio first, then the longest bucket it fills,
    then the nearest resolution (|log area ratio|)."""
    fits = [i for i, b in enumerate(buckets) if b[0] <= frames]
    if not fits:
        shortest = min(b[0] for b in buckets)
        return None, f"{frames} frame(s) at data.fps, shorter than every bucket (the shortest has {shortest})"
    ok = [i for i in fits if crop_fraction(h, w, buckets[i]) <= max_crop + 1e-9]
    if not ok:
        return None, (f"{w}x{h} (w x h) would lose more than data.bucket_max_crop={max_crop} to "
                      f"every bucket's aspect ratio")

    def key(i):
        T, H, W = buckets[i]
        return (round(abs(math.log((h / w) / (H / W))), 6), -T, abs(math.log((H * W) / (h * w))))
    return min(ok, key=key), ""


def histogram(members: list[list[int]], buckets: list[tuple[int, int, int]]) -> str:
    """'8x32x32: 12, 8x32x48: 5' (frames x height x width: videos), every bucket listed."""
    return ", ".join(f"{T}x{H}x{W}: {len(m)}" for (T, H, W), m in zip(buckets, members))


class BucketSampler:
    """Batch sampler of same-bucket micro batches for this rank: yields [(index, bucket), ...]
    (mixed=True, for packing: each clip of a batch draws its own bucket).

    members: per bucket, the dataset entries it holds (a folder), or None when every entry can
    take every bucket (the synthetic set). The index of draw g of entry j is g * n + j (n entries),
    so index % n names the entry and each draw gets its own clip start; synthetic indices are g.
    The global batch of (step, micro) is drawn once and split across ranks, so every world size
    walks the same global batches."""

    def __init__(self, members: list[list[int]] | None, n_buckets: int, n_entries: int, cfg,
                 start: int, rank: int, world: int, mixed: bool = False):
        self.members, self.n_buckets, self.n, self.mixed = members, n_buckets, n_entries, mixed
        self.cfg, self.start, self.rank, self.world = cfg, start, rank, world
        sizes = np.array([len(m) for m in members], float) if members else np.ones(n_buckets)
        if sizes.sum() == 0:
            raise ValueError("data.buckets: no bucket holds a video")
        self.p = sizes / sizes.sum()

    def global_batch(self, step: int, micro: int) -> list[tuple[int, int]]:
        """The (index, bucket) pairs of one global micro batch (every rank's), by (seed, step, micro)."""
        t = self.cfg.train
        B = t.batch_size * self.world
        rng = np.random.default_rng((self.cfg.data.seed, step, micro, BUCKET_STREAM))
        g0 = (step * t.grad_accum + micro) * B                   # global draw numbers g0 .. g0+B-1
        if self.mixed:                                           # packing: every clip its own bucket
            bs = [int(b) for b in rng.choice(self.n_buckets, size=B, p=self.p)]
            if self.members is None:
                return [(g0 + k, b) for k, b in enumerate(bs)]
            return [((g0 + k) * self.n + self.members[b][int(rng.integers(len(self.members[b])))], b)
                    for k, b in enumerate(bs)]
        b = int(rng.choice(self.n_buckets, p=self.p))
        if self.members is None:
            return [(g0 + k, b) for k in range(B)]
        m = self.members[b]
        pick = rng.permutation(len(m))[:B] if len(m) >= B else rng.integers(len(m), size=B)
        return [((g0 + k) * self.n + m[int(j)], b) for k, j in enumerate(pick)]

    def __iter__(self):
        mb = self.cfg.train.batch_size
        for step in range(self.start, last_step(self.cfg.train)):
            for micro in range(self.cfg.train.grad_accum):
                yield self.global_batch(step, micro)[self.rank * mb:(self.rank + 1) * mb]

    def __len__(self):
        return (last_step(self.cfg.train) - self.start) * self.cfg.train.grad_accum


def data_position(cfg, dataset) -> dict:
    """What a checkpoint records of the data stream besides its step: the sampler, the seed and a
    digest of the bucket table and its members (a resume with other ones would draw other batches)."""
    if not cfg.data.buckets:
        return {"sampler": "steps", "seed": cfg.data.seed}
    members = getattr(dataset, "bucket_members", None)
    digest = hashlib.sha256(json.dumps([list(map(list, parse_buckets(cfg.data.buckets))), members,
                                        cfg.data.bucket_max_crop]).encode()).hexdigest()[:16]
    return {"sampler": "buckets, mixed (packing)" if cfg.train.pack_tokens else "buckets",
            "seed": cfg.data.seed, "buckets": digest}
