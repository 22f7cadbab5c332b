"""mp4 write/read round trip, atomic writes, contact sheets."""
import numpy as np
import pytest
import torch
from PIL import Image

from cascade.video_io import (SHEET_CAPTION_H, SHEET_PAD, VideoError, contact_sheet, read_video,
                              to_uint8, write_mp4)


def _gradient(T=12, H=32, W=32):
    y, x = np.mgrid[0:H, 0:W]
    frames = np.zeros((T, H, W, 3), np.uint8)
    for t in range(T):
        frames[t, ..., 0] = (x * 6 + t * 10) % 256
        frames[t, ..., 1] = y * 6
        frames[t, ..., 2] = 128
    return frames


def test_round_trip(tmp_path):
    frames = _gradient()
    path = write_mp4(frames, tmp_path / "new" / "dir" / "a.mp4", fps=24)   # folders are created
    video, fps = read_video(path)
    assert video.shape == frames.shape and video.dtype == np.uint8
    assert fps == pytest.approx(24)
    assert np.abs(video.astype(float) - frames).mean() < 4


def test_float_input_odd_size_and_fractional_fps(tmp_path):
    video = torch.rand(3, 5, 31, 33) * 2 - 1                               # (3, T, H, W)
    path = write_mp4(video, tmp_path / "b.mp4", fps=7.5)
    out, fps = read_video(path)
    assert out.shape == (5, 32, 34, 3)                                      # padded to even
    assert fps == pytest.approx(7.5)
    one, _ = read_video(write_mp4(torch.zeros(3, 1, 16, 16), tmp_path / "one.mp4", fps=8))
    assert one.shape == (1, 16, 16, 3) and abs(int(one.mean()) - 128) <= 2


def test_to_uint8():
    v = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 1, 4).expand(3, 1, 1, 4)
    u = to_uint8(v)
    assert u.shape == (1, 1, 4, 3) and u[0, 0, :, 0].tolist() == [0, 128, 255, 255]
    assert to_uint8(np.zeros((4, 4, 3), np.uint8)).shape == (1, 4, 4, 3)
    with pytest.raises(ValueError):
        to_uint8(torch.zeros(4, 2, 8, 8))


def test_unreadable_files(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all" * 50)
    with pytest.raises(VideoError) as e:
        read_video(bad)
    assert "bad.mp4" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        read_video(tmp_path / "missing.mp4")


def test_interrupted_write_keeps_the_old_file(tmp_path):
    path = write_mp4(_gradient(T=3), tmp_path / "c.mp4", fps=8)
    before = path.read_bytes()
    with pytest.raises(Exception):
        write_mp4(_gradient(T=3), path, fps=8, crf="banana")                # encoder fails mid-write
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.mp4"]                # no temp file left


def test_contact_sheet(tmp_path):
    videos = torch.rand(2, 3, 10, 32, 32) * 2 - 1                           # (B, 3, T, H, W)
    path = contact_sheet(videos, tmp_path / "s" / "sheet.png", captions=["a red circle", "a cross"])
    img = Image.open(path)
    cell = 96                                                               # 32 px upscaled 3x
    assert img.size == (SHEET_PAD + 8 * (cell + SHEET_PAD),
                        SHEET_PAD + 2 * (SHEET_CAPTION_H + cell + SHEET_PAD))
    arr = np.asarray(img)
    first = to_uint8(videos[0])[0]                                          # (32, 32, 3)
    y0 = SHEET_PAD + SHEET_CAPTION_H
    np.testing.assert_array_equal(arr[y0:y0 + cell:3, SHEET_PAD:SHEET_PAD + cell:3], first)
    # a list of uint8 videos, no captions, fewer frames than max_frames
    path = contact_sheet([np.zeros((3, 8, 8, 3), np.uint8)], tmp_path / "t.png")
    assert Image.open(path).size == (SHEET_PAD + 3 * (96 + SHEET_PAD), SHEET_PAD + 96 + SHEET_PAD)
