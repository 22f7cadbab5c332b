"""Real videos: a folder of files plus a manifest of (path, caption), decoded with PyAV.

A sample is a clip of `frames` frames at `fps` (resampled by timestamps from the source rate),
resized on its shorter side and centre-cropped to height x width, in the same form as the
synthetic set: {"video": (3, T, H, W) in [-1, 1], "caption": str, "meta": {"path": ..., ...}}.
The clip's start is drawn from (seed, index), so a sample is the same in any process; an index
past the end wraps around the manifest with a fresh start, so an index stream that keeps
growing (train.py's global sample indices) sees new windows of each video on every pass.

Bad files never stop training: at construction every entry is checked (a caption that is a
non-empty string, a path inside `root`, a file that opens and decodes a frame); the ones that fail
are left out of the index (so their samples spread over the good files, not onto their
neighbours), recorded in `dataset.skipped` as (row, reason), logged one line each, and counted
in `dataset.summary()`. A manifest path that is absolute or leaves `root` through '..' is refused
(ValueError naming the row): a manifest never opens files outside its folder. A file that passed
the check but fails to decode later is skipped the same way at run time and its sample is drawn
from another good file (chosen by (seed, index), not the next row). A video shorter than the clip
is padded by repeating its last frame. When no entry can be read the constructor raises a
one-line ValueError naming the manifest.

Splits: `split="train"` leaves out the held-out rows, `split="val"` has only them (a share
`val_fraction` of the usable rows, at least one, picked by a hash of their paths, so the split is
the same in every process and does not move when rows are reordered); `split="all"` has every row.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
from pathlib import Path

import av
import numpy as np
import torch
from torch.utils.data import Dataset

from cascade.data.buckets import assign, parse_buckets
from cascade.text import has_text

log = logging.getLogger(__name__)

COLUMNS = ("path", "caption")


def read_manifest(path: str | Path) -> list[dict]:
    """CSV (header with path, caption) or JSONL ({"path": ..., "caption": ...} per line) -> rows
    {"path": str, "caption": str | None, "row": "<manifest>:<line>"}. A caption that is not a
    string (JSON null, a number, a list) is None: the row has no caption (skipped, not "None")."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    suffix = path.suffix.lower()
    rows = []
    try:
        if suffix == ".csv":
            with open(path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
                if missing:
                    raise ValueError(f"manifest {path}: missing column(s) {', '.join(missing)} "
                                     f"(the header needs {', '.join(COLUMNS)})")
                start = reader.line_num + 1                # a quoted field may span lines
                for r in reader:
                    rows.append({"path": r["path"] or "", "caption": r["caption"] or None,
                                 "row": f"{path.name}:{start}"})
                    start = reader.line_num + 1
        elif suffix in (".jsonl", ".ndjson"):
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"manifest {path}:{lineno}: not valid JSON ({e.msg})") from None
                    missing = [c for c in COLUMNS if not isinstance(obj, dict) or c not in obj]
                    if missing:
                        raise ValueError(f"manifest {path}:{lineno}: missing key(s) "
                                         f"{', '.join(missing)}")
                    if not isinstance(obj["path"], str):
                        raise ValueError(f"manifest {path}:{lineno}: path must be a string, got "
                                         f"{json.dumps(obj['path'])}")
                    caption = obj["caption"] if isinstance(obj["caption"], str) else None
                    rows.append({"path": obj["path"], "caption": caption,
                                 "row": f"{path.name}:{lineno}"})
        else:
            raise ValueError(f"manifest {path}: must be .csv or .jsonl")
    except UnicodeDecodeError as e:
        raise ValueError(f"manifest {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except csv.Error as e:                             # e.g. a field over csv's 128 KiB limit
        raise ValueError(f"manifest {path}: not valid CSV ({e})") from None
    if not rows:
        raise ValueError(f"manifest {path}: no entries")
    return rows


def check_inside(root: Path, rel: str, row: str) -> Path:
    """root / rel, refusing a path that is absolute or leaves root through '..' (ValueError
    naming the manifest row). Checked on the path as written: links inside root are the user's."""
    if not rel:
        raise ValueError(f"manifest {row}: empty path")
    p = Path(rel)
    norm = os.path.normpath(rel)
    if p.is_absolute() or p.drive or norm == ".." or norm.startswith(".." + os.sep):
        raise ValueError(f"manifest {row}: path {rel!r} is outside data.root {root} (absolute "
                         f"paths and '..' are refused: list the videos relative to data.root)")
    return root / p


def heldout_rows(paths: list[str], fraction: float) -> set[int]:
    """Indices of the held-out rows: the ceil(fraction * n) rows (at least 1 when fraction > 0)
    whose sha1(path) is smallest. Empty when fraction is 0 or fewer than 2 rows are given."""
    if fraction <= 0 or len(paths) < 2:
        return set()
    k = min(len(paths) - 1, max(1, math.ceil(fraction * len(paths))))
    order = sorted(range(len(paths)), key=lambda i: hashlib.sha1(paths[i].encode()).hexdigest())
    return set(order[:k])


def stream_timing(container, stream, fps: float) -> tuple[float, float, float]:
    """-> (source frame rate, first timestamp, duration), in frames per second and seconds."""
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    src_fps = float(rate) if rate else (fps or 25.0)
    tb = stream.time_base
    t0 = float(stream.start_time * tb) if stream.start_time is not None and tb else 0.0
    if stream.duration and tb:
        duration = float(stream.duration * tb)
    elif container.duration:
        duration = container.duration / av.time_base
    else:
        duration = stream.frames / src_fps if stream.frames else 0.0
    return src_fps, t0, duration


def probe_video(path: Path, fps: float = 0.0) -> dict:
    """Raise if the file has no video stream or no frame decodes (the construction-time check);
    else {height, width, frames}: the frame size and how many frames a clip at `fps` (0: the
    source rate) can take from it (1 for a still image)."""
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        for frame in container.decode(stream):
            src_fps, _, duration = stream_timing(container, stream, fps)
            fps = fps or src_fps
            frames = int(math.floor(max(0.0, duration - 1 / src_fps) * fps + 1e-6)) + 1
            return {"height": frame.height, "width": frame.width, "frames": frames}
    raise ValueError("no frames decoded")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _pick_nearest(decoded, targets: np.ndarray) -> tuple[list, int]:
    """Stream of (time, frame) -> the frame nearest each target time (targets sorted).
    Targets past the last frame get the last frame; returns (frames, number padded)."""
    picked, prev, k = [], None, 0
    for t, frame in decoded:
        while k < len(targets) and targets[k] <= t:
            near_prev = prev is not None and targets[k] - prev[0] < t - targets[k]
            picked.append(prev[1] if near_prev else frame)
            k += 1
        prev = (t, frame)
        if k == len(targets):
            break
    if prev is None:
        raise ValueError("no frames decoded")
    padded = len(targets) - k
    picked += [prev[1]] * padded
    return picked, padded


def _resize_crop(frame, height: int, width: int) -> np.ndarray:
    """av.VideoFrame -> uint8 (height, width, 3): shorter side resized (area filter), centre crop."""
    h, w = frame.height, frame.width
    scale = max(height / h, width / w)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    rgb = frame.reformat(width=nw, height=nh, format="rgb24", interpolation="AREA").to_ndarray()
    top, left = (nh - height) // 2, (nw - width) // 2
    return rgb[top:top + height, left:left + width]                        # (H, W, 3)


def decode_clip(path: str | Path, frames: int, fps: float, height: int, width: int,
                u: float = 0.0) -> tuple[np.ndarray, dict]:
    """Decode `frames` frames at `fps` (0: the source rate) starting at fraction u in [0, 1) of
    the room the video leaves -> (uint8 (T, H, W, 3), info dict with start seconds, padded)."""
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        src_fps, t0, duration = stream_timing(container, stream, fps)
        fps = fps or src_fps
        tb = stream.time_base
        room = max(0.0, duration - 1 / src_fps - (frames - 1) / fps)        # latest possible start
        start = u * room
        targets = t0 + start + np.arange(frames) / fps                      # (T,) seconds
        if start > 0 and tb:
            container.seek(int((t0 + start) / tb), stream=stream)           # keyframe at/before
        half = 0.5 / src_fps

        def timed():
            last, yielded = None, False
            for i, f in enumerate(container.decode(stream)):
                t = float(f.time) if f.time is not None else t0 + i / src_fps
                if t >= targets[0] - half - 1e-6:
                    yielded = True
                    yield t, f
                last = (t, f)
            if not yielded and last is not None:                            # duration overstated
                yield last

        picked, padded = _pick_nearest(timed(), targets)
        cache = {}
        out = [cache.setdefault(id(f), _resize_crop(f, height, width)) for f in picked]
    return np.stack(out), {"start": start, "padded": padded}               # (T, H, W, 3)


RECAPTION_STREAM = 0x5EC      # a third seed word: the recaption draw is apart from the clip start's


def read_recaptions(root: Path, manifest: str | Path) -> dict[str, str]:
    """A `cascade caption` manifest (JSONL of path, caption, original_caption; paths relative to
    root) -> {normalised path: new caption}; rows without a caption are left out."""
    manifest = Path(manifest)
    if not manifest.is_absolute() and not manifest.is_file() and (root / manifest).is_file():
        manifest = root / manifest                                          # relative to root
    if not manifest.is_file():
        raise FileNotFoundError(f"data.recaption_manifest: not found: {manifest}")
    rows = read_manifest(manifest)
    for r in rows:
        check_inside(root, r["path"], r["row"])
    return {os.path.normpath(r["path"]): r["caption"] for r in rows
            if r["caption"] and has_text(r["caption"])}


class VideoFolder(Dataset):
    """Text-video pairs from files listed in a manifest (CSV or JSONL, paths relative to root)."""

    def __init__(self, root: str | Path, manifest: str | Path, frames: int, height: int, width: int,
                 fps: float = 8.0, seed: int = 0, split: str = "all", val_fraction: float = 0.0,
                 recaption_manifest: str | Path | None = None, recaption_ratio: float = 0.0,
                 buckets: list | None = None, bucket_max_crop: float = 0.25):
        """Every row checked once, cheapest check first (caption, place, file, decode, bucket),
        then the split: the construction-time checks of the module docstring, in order."""
        if split not in ("all", "train", "val"):
            raise ValueError(f"split: '{split}' is not one of all, train, val")
        self.root = Path(root)
        manifest = Path(manifest)
        if not manifest.is_absolute() and not manifest.is_file() and (self.root / manifest).is_file():
            manifest = self.root / manifest                                 # relative to root
        self.manifest = manifest
        self.frames, self.height, self.width, self.fps, self.seed = frames, height, width, fps, seed
        self.split = split
        self.skipped: list[tuple[str, str]] = []   # (row, reason) of every row left out, in order
        rows = read_manifest(manifest)
        self.rows = len(rows)
        usable = []                                # cheap checks first: caption, place, existence
        for r in rows:
            path = check_inside(self.root, r["path"], r["row"])
            if r["caption"] is None or not has_text(r["caption"]):     # the text encoder's test
                self._skip(r, path, "no caption")
            elif not path.is_file():
                self._skip(r, path, "file not found")
            else:
                usable.append({**r, "path": path})
        held = heldout_rows([str(r["path"].relative_to(self.root)) for r in usable], val_fraction)
        if split == "val" and not held:
            raise ValueError(f"manifest {manifest}: no held-out videos ({len(usable)} usable, "
                             f"data.val_fraction={val_fraction}): set data.val_manifest to a "
                             f"manifest of other videos, or data.val_fraction > 0 with at least 2 "
                             f"videos (held-out metrics are never measured on training clips)")
        if split != "all":                         # train without a hold-out possible: every row
            usable = [r for i, r in enumerate(usable) if (i in held) == (split == "val")]
        self.entries = []
        self.buckets = parse_buckets(buckets) if buckets else []
        for r in usable:                           # then every file must open and decode a frame
            try:
                info = probe_video(r["path"], fps)
            except Exception as e:                                          # corrupt: never raise
                self._skip(r, r["path"], _first_line(e))
                continue
            if self.buckets:                       # the bucket nearest its aspect ratio and length
                b, why = assign(info["height"], info["width"], info["frames"], self.buckets,
                                bucket_max_crop)
                if b is None:
                    self._skip(r, r["path"], f"no bucket: {why}")
                    continue
                r = {**r, "bucket": b}
            self.entries.append(r)
        # per bucket, the entries it holds (cascade.data.buckets.BucketSampler)
        self.bucket_members = [[j for j, e in enumerate(self.entries) if e["bucket"] == b]
                               for b in range(len(self.buckets))] if self.buckets else None
        self._bad: set[int] = set()
        self.recaptions, self.recaption_ratio = {}, float(recaption_ratio)
        if recaption_manifest and recaption_ratio > 0:
            self.recaptions = read_recaptions(self.root, recaption_manifest)
        if not self.entries:
            what = f"the {split} split of " if split != "all" else ""
            table = " or fit data.buckets" if self.buckets else ""
            raise ValueError(f"data: none of {what}the {self.rows} videos listed in {manifest} can "
                             f"be read{table} ({self.summary()}; see the warnings above)")

    def __len__(self) -> int:
        return len(self.entries)

    def summary(self) -> str:
        """'N of M rows skipped (k no caption, ...)' or '' when none was."""
        if not self.skipped:
            return ""
        reasons = dict.fromkeys(("no caption", "file not found", "no bucket", "unreadable"), 0)
        for _, why in self.skipped:
            key = why if why in ("no caption", "file not found") else \
                "no bucket" if why.startswith("no bucket") else "unreadable"
            reasons[key] = reasons.get(key, 0) + 1
        detail = ", ".join(f"{n} {k}" for k, n in reasons.items() if n)
        return f"{len(self.skipped)} of {self.rows} manifest rows skipped ({detail})"

    def _skip(self, row: dict, path: Path, reason: str) -> None:
        self.skipped.append((row["row"], reason))
        log.warning("skipping video %s (%s): %s", path, row["row"], reason)

    def caption(self, entry: dict, index: int) -> tuple[str, bool]:
        """The sample's caption: its recaption (`cascade caption`) for a share recaption_ratio of
        the samples, decided by (seed, index) alone (DALL-E 3 Sec. 3.4 mixes synthetic and original
        captions, 95:5), else the manifest's own; and whether it is the recaption."""
        new = self.recaptions.get(os.path.normpath(str(entry["path"].relative_to(self.root))))
        if new is None or self.recaption_ratio <= 0:
            return entry["caption"], False
        u = float(np.random.default_rng((self.seed, index, RECAPTION_STREAM)).random())
        return (new, True) if u < self.recaption_ratio else (entry["caption"], False)

    def __getitem__(self, index) -> dict:
        """index: an int, or (int, bucket) from a BucketSampler: the clip at that bucket's shape
        (its entry is index % len, one of the bucket's; a bad file is replaced from the same bucket)."""
        index, bucket = index if isinstance(index, tuple) else (index, None)
        n = len(self.entries)
        index = int(index) % n if index < 0 else int(index)
        T, H, W = self.buckets[bucket] if bucket is not None else (self.frames, self.height, self.width)
        pool = self.bucket_members[bucket] if bucket is not None else range(n)
        rng = np.random.default_rng((self.seed, index))
        u = float(rng.random())
        j = index % n
        for _ in range(n):
            if j not in self._bad:
                entry = self.entries[j]
                try:
                    clip, info = decode_clip(entry["path"], T, self.fps, H, W, u)
                except Exception as e:                                      # corrupt: never raise
                    self._bad.add(j)
                    self._skip(entry, entry["path"], _first_line(e))
                else:
                    video = torch.from_numpy(clip).permute(3, 0, 1, 2).float() / 127.5 - 1  # (3, T, H, W)
                    caption, recaptioned = self.caption(entry, index)
                    return {"video": video, "caption": caption,
                            "meta": {"path": str(entry["path"]), "recaptioned": recaptioned, **info}}
            good = [k for k in pool if k not in self._bad]
            if not good:
                break
            j = good[int(rng.integers(len(good)))]      # another good file, by (seed, index)
        raise RuntimeError(f"VideoFolder: none of the {n} videos listed in {self.manifest} can be "
                           f"read (see the warnings above)")
