"""Video files and pictures: mp4 in and out (PyAV, H.264) and PNG contact sheets.

Conventions: a float video is a tensor/array (3, T, H, W) in [-1, 1] (what the models produce);
a uint8 video is (T, H, W, 3) (what files hold). Writes go to a temporary file in the target
folder and are renamed into place, so an interrupted write never replaces a good file with a
broken one.
"""
from __future__ import annotations

import math
import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

SHEET_PAD = 4          # pixels between and around contact-sheet cells
SHEET_CAPTION_H = 14   # height of the caption band above each row (when captions are given)
SHEET_MIN_SIZE = 96    # tiny frames are upscaled (nearest) until their shorter side reaches this


class VideoError(ValueError):
    """A video file that cannot be decoded; the message names the file."""


def to_uint8(video) -> np.ndarray:
    """A video -> uint8 array (T, H, W, 3).

    float tensor/array (3, T, H, W) or (3, H, W) in [-1, 1] -> converted (values clamped);
    uint8 (T, H, W, 3) or (H, W, 3) -> returned as is (an image becomes a 1-frame video).
    """
    if isinstance(video, torch.Tensor):
        video = video.detach().cpu()
        if video.dtype != torch.uint8:
            video = video.float()
        video = video.numpy()
    video = np.asarray(video)
    if video.dtype == np.uint8:
        if video.ndim == 3:
            video = video[None]                                            # (1, H, W, 3)
        if video.ndim != 4 or video.shape[-1] != 3:
            raise ValueError(f"uint8 video must be (T, H, W, 3), got {tuple(video.shape)}")
        return np.ascontiguousarray(video)
    if video.ndim == 3:
        video = video[:, None]                                              # (3, 1, H, W)
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"float video must be (3, T, H, W) in [-1, 1], got {tuple(video.shape)}")
    video = np.clip((video.astype(np.float32) + 1) * 127.5, 0, 255).round().astype(np.uint8)
    return np.ascontiguousarray(video.transpose(1, 2, 3, 0))               # (T, H, W, 3)


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_mp4(frames, path: str | Path, fps: float = 8.0, crf: int = 18, lossless: bool = False) -> Path:
    """Write a video as H.264 (libx264, yuv420p) mp4. Odd sizes are padded to even (edge pixels).
    lossless: RGB H.264 at qp 0 (libx264rgb): decoded frames equal the input exactly (data sets).

    frames: uint8 (T, H, W, 3) or float (3, T, H, W) in [-1, 1]. Returns the path written.
    x264's lossy output is not always the same bytes for the same frames (the first encodes of a
    process differed from later ones, decoded up to a level apart on average, measured): where
    bytes must repeat (a data set), write lossless."""
    video = to_uint8(frames)                                                # (T, H, W, 3)
    T, H, W, _ = video.shape
    video = np.pad(video, ((0, 0), (0, H % 2), (0, W % 2), (0, 0)), mode="edge")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    rate = Fraction(fps).limit_denominator(1001)
    try:
        with av.open(str(tmp), mode="w", format="mp4") as out:
            stream = out.add_stream("libx264rgb" if lossless else "libx264", rate=rate)
            stream.width, stream.height = video.shape[2], video.shape[1]
            stream.pix_fmt = "rgb24" if lossless else "yuv420p"
            stream.codec_context.time_base = 1 / rate
            stream.options = {"qp": "0"} if lossless else {"crf": str(crf)}
            for i, frame in enumerate(video):
                vf = av.VideoFrame.from_ndarray(frame, format="rgb24")
                vf.pts = i
                out.mux(stream.encode(vf))
            out.mux(stream.encode())                                       # flush
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def read_video(path: str | Path) -> tuple[np.ndarray, float]:
    """All frames of a video file -> (uint8 (T, H, W, 3), fps).

    Raises FileNotFoundError for a missing file and VideoError for one that cannot be decoded.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video not found: {path}")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError("no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    except Exception as e:                                                  # any decoder failure
        raise VideoError(f"cannot read video {path}: {_first_line(e)}") from None
    if not frames:
        raise VideoError(f"cannot read video {path}: no frames decoded")
    return np.stack(frames), float(rate) if rate else 0.0                  # (T, H, W, 3)


def read_image(path: str | Path) -> torch.Tensor:
    """An image file of any mode PIL reads (PNG, JPEG, palette, greyscale, RGBA: alpha dropped)
    -> float (3, H, W) in [-1, 1]. FileNotFoundError for a missing file, VideoError (one line)
    for one that is not an image."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"))                            # (H, W, 3) uint8
    except Exception as e:
        raise VideoError(f"cannot read image {path}: {_first_line(e)}") from None
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 127.5 - 1


def read_video_tensor(path: str | Path) -> tuple[torch.Tensor, float]:
    """A video file -> (float (3, T, H, W) in [-1, 1], its frame rate or 0 where it says none)."""
    frames, rate = read_video(path)                                         # (T, H, W, 3)
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2).float() / 127.5 - 1, rate


def resample_fps(video: torch.Tensor, rate: float, fps: float) -> torch.Tensor:
    """A video (3, T, H, W) at `rate` frames per second -> at `fps` (the nearest frame for each
    new time); unchanged where either rate is unknown (0) or they agree."""
    if not (rate and fps) or abs(rate - fps) < 1e-3:
        return video
    T = video.shape[1]
    n = max(1, int(round(T * fps / rate)))
    idx = np.minimum(np.round(np.arange(n) * rate / fps).astype(int), T - 1)
    return video[:, torch.from_numpy(idx)]


def _as_video_list(videos) -> list[np.ndarray]:
    if isinstance(videos, (list, tuple)):
        return [to_uint8(v) for v in videos]
    if isinstance(videos, (torch.Tensor, np.ndarray)) and videos.ndim == 5:
        return [to_uint8(v) for v in videos]                               # (B, 3, T, H, W) or (B, T, H, W, 3)
    return [to_uint8(videos)]


def _fit_text(draw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def contact_sheet(videos, path: str | Path, captions: list[str] | None = None,
                  max_frames: int = 8, min_size: int = SHEET_MIN_SIZE) -> Path:
    """Save a PNG grid: one row per video, one column per frame (at most max_frames, evenly
    spaced), an optional caption above each row. Frames are upscaled by an integer factor
    (nearest) until their shorter side reaches min_size.

    videos: (B, 3, T, H, W) float in [-1, 1], a list of videos (any form `to_uint8` takes), or
    one video. Size: width = PAD + cols*(cell_w + PAD), height = PAD + rows*(CAP + cell_h + PAD).
    """
    vids = _as_video_list(videos)
    if not vids:
        raise ValueError("contact_sheet: no videos given")
    if captions is not None and len(captions) != len(vids):
        raise ValueError(f"contact_sheet: {len(captions)} captions for {len(vids)} videos")
    rows = []
    for v in vids:
        T, H, W, _ = v.shape
        if T > max_frames:
            v = v[np.linspace(0, T - 1, max_frames).round().astype(int)]
        s = max(1, math.ceil(min_size / min(H, W)))
        rows.append(v.repeat(s, axis=1).repeat(s, axis=2))                # (t, H*s, W*s, 3)
    cols = max(r.shape[0] for r in rows)
    cell_h, cell_w = max(r.shape[1] for r in rows), max(r.shape[2] for r in rows)
    cap = SHEET_CAPTION_H if captions is not None else 0
    pad = SHEET_PAD
    sheet = np.full((pad + len(rows) * (cap + cell_h + pad), pad + cols * (cell_w + pad), 3), 24, np.uint8)
    for i, r in enumerate(rows):
        y = pad + i * (cap + cell_h + pad) + cap
        for j, frame in enumerate(r):
            x = pad + j * (cell_w + pad)
            sheet[y:y + frame.shape[0], x:x + frame.shape[1]] = frame
    image = Image.fromarray(sheet)
    if captions is not None:
        draw, font = ImageDraw.Draw(image), ImageFont.load_default()
        for i, text in enumerate(captions):
            y = pad + i * (cap + cell_h + pad)
            draw.text((pad, y), _fit_text(draw, str(text), font, image.width - 2 * pad),
                      fill=(235, 235, 235), font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
