"""Real videos: a folder of files plus a manifest of (path, caption), decoded with PyAV.

A sample is a clip of `frames` frames at `fps` (resampled by timestamps from the source rate),
resized on its shorter side and centre-cropped to height x width, in the same form as the
synthetic set: {"video": (3, T, H, W) in [-1, 1], "caption": str, "meta": {"path": ..., ...}}.
The clip's start is drawn from (seed, index), so a sample is the same in any process; an index
past the end wraps around the manifest with a fresh start, so an index stream that keeps
growing (train.py's global sample indices) sees new windows of each video on every pass.

Bad files never stop training: a missing, unreadable or corrupt file (or an entry with an empty
caption) is skipped, recorded in `dataset.skipped` (per process), logged once as a warning, and
the next entry is used instead. A video shorter than the clip is padded by repeating its last
frame. Only when no entry at all can be read does `__getitem__` raise.
"""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import av
import numpy as np
import torch
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

COLUMNS = ("path", "caption")


def read_manifest(path: str | Path) -> list[dict]:
    """CSV (header with path, caption) or JSONL ({"path": ..., "caption": ...} per line) -> rows."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    suffix = path.suffix.lower()
    rows = []
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"manifest {path}: missing column(s) {', '.join(missing)} "
                                 f"(the header needs {', '.join(COLUMNS)})")
            rows = [{"path": r["path"] or "", "caption": r["caption"] or ""} for r in reader]
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
                    raise ValueError(f"manifest {path}:{lineno}: missing key(s) {', '.join(missing)}")
                rows.append({"path": str(obj["path"]), "caption": str(obj["caption"])})
    else:
        raise ValueError(f"manifest {path}: must be .csv or .jsonl")
    if not rows:
        raise ValueError(f"manifest {path}: no entries")
    return rows


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
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        src_fps = float(rate) if rate else (fps or 25.0)
        fps = fps or src_fps
        tb = stream.time_base
        t0 = float(stream.start_time * tb) if stream.start_time is not None and tb else 0.0
        if stream.duration and tb:
            duration = float(stream.duration * tb)
        elif container.duration:
            duration = container.duration / av.time_base
        else:
            duration = stream.frames / src_fps if stream.frames else 0.0
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


class VideoFolder(Dataset):
    """Text-video pairs from files listed in a manifest (CSV or JSONL, paths relative to root)."""

    def __init__(self, root: str | Path, manifest: str | Path, frames: int, height: int, width: int,
                 fps: float = 8.0, seed: int = 0):
        self.root = Path(root)
        manifest = Path(manifest)
        if not manifest.is_absolute() and not manifest.is_file() and (self.root / manifest).is_file():
            manifest = self.root / manifest                                 # relative to root
        self.manifest = manifest
        self.entries = read_manifest(manifest)
        self.frames, self.height, self.width, self.fps, self.seed = frames, height, width, fps, seed
        self.skipped: list[str] = []       # paths skipped in this process, in order found
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.entries)

    def _skip(self, j: int, path: Path, reason: str) -> None:
        self._bad.add(j)
        self.skipped.append(str(path))
        log.warning("skipping video %s: %s", path, reason)

    def __getitem__(self, index: int) -> dict:
        n = len(self.entries)
        index = int(index) % n if index < 0 else int(index)
        u = float(np.random.default_rng((self.seed, index)).random())
        for k in range(n):
            j = (index + k) % n
            if j in self._bad:
                continue
            entry = self.entries[j]
            path = self.root / entry["path"]
            if not entry["caption"].strip():
                self._skip(j, path, "empty caption")
                continue
            if not path.is_file():
                self._skip(j, path, "file not found")
                continue
            try:
                clip, info = decode_clip(path, self.frames, self.fps, self.height, self.width, u)
            except Exception as e:                                          # corrupt: never raise
                self._skip(j, path, _first_line(e))
                continue
            video = torch.from_numpy(clip).permute(3, 0, 1, 2).float() / 127.5 - 1  # (3, T, H, W)
            return {"video": video, "caption": entry["caption"], "meta": {"path": str(path), **info}}
        raise RuntimeError(f"VideoFolder: none of the {n} videos listed in {self.manifest} can be "
                           f"read (see the warnings above)")
