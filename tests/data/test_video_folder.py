"""VideoFolder: manifests, fps resampling, resizing, and skipping bad files without raising."""
import json
import logging

import numpy as np
import pytest
import torch

from cascade.config import DataConfig
from cascade.data import build_dataset, collate
from cascade.data.video_folder import VideoFolder
from cascade.video_io import write_mp4

STEP = 8   # brightness step per source frame: frame index i is drawn with value 8*i


def _ramp(T, H=48, W=64):
    return np.stack([np.full((H, W, 3), STEP * i, np.uint8) for i in range(T)])  # (T, H, W, 3)


def _index(video):
    """Recover the source frame index of each clip frame from its brightness."""
    return ((video[:, :, 8, 8].mean(0) + 1) * 127.5 / STEP).round().long().tolist()


@pytest.fixture
def folder(tmp_path):
    write_mp4(_ramp(30), tmp_path / "long.mp4", fps=24)                   # 1.25 s at 24 fps
    write_mp4(_ramp(5), tmp_path / "clips" / "short.mp4", fps=24)          # shorter than a clip
    (tmp_path / "corrupt.mp4").write_bytes(b"\x00garbage\xff" * 300)
    entries = [("long.mp4", "a bright ramp"), ("corrupt.mp4", "broken"),
               ("missing.mp4", "not there"), ("clips/short.mp4", "a short ramp")]
    with open(tmp_path / "m.jsonl", "w") as f:
        for p, c in entries:
            f.write(json.dumps({"path": p, "caption": c}) + "\n")
    with open(tmp_path / "m.csv", "w") as f:
        f.write("path,caption\n" + "".join(f'{p},"{c}"\n' for p, c in entries))
    return tmp_path


@pytest.mark.parametrize("manifest", ["m.jsonl", "m.csv"])
def test_samples_and_skips(folder, manifest, caplog):
    with caplog.at_level(logging.WARNING):
        ds = VideoFolder(folder, folder / manifest, frames=4, height=16, width=16, fps=8, seed=0)
        samples = [ds[i] for i in range(8)]                                # never raises
    assert len(ds) == 2                                                     # the bad rows leave the index
    for s in samples:
        assert s["video"].shape == (3, 4, 16, 16)
        assert s["video"].min() >= -1 and s["video"].max() <= 1
        assert s["caption"] in ("a bright ramp", "a short ramp")
    assert [s["caption"] for s in samples] == ["a bright ramp", "a short ramp"] * 4
    assert sorted(r for r, _ in ds.skipped) == [f"{manifest}:{k + (manifest == 'm.csv')}" for k in (2, 3)]
    assert ds.summary() == "2 of 4 manifest rows skipped (1 file not found, 1 unreadable)"
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 2 and any("corrupt.mp4" in w for w in warned)
    assert all("\n" not in w for w in warned)


def test_fps_resampling_takes_every_third_frame(folder):
    ds = VideoFolder(folder, "m.jsonl", frames=4, height=16, width=16, fps=8, seed=0)
    for i in (0, 4, 8, 12):                                                 # all land on long.mp4
        idx = _index(ds[i]["video"])
        assert np.diff(idx).tolist() == [3, 3, 3], idx
        assert ds[i]["meta"]["path"].endswith("long.mp4")
    starts = {_index(ds[i]["video"])[0] for i in (0, 4, 8, 12, 16, 20)}
    assert len(starts) > 1                                                  # start varies with index
    native = VideoFolder(folder, "m.jsonl", frames=4, height=16, width=16, fps=24, seed=0)
    assert np.diff(_index(native[0]["video"])).tolist() == [1, 1, 1]


def test_short_video_is_padded_with_its_last_frame(folder):
    ds = VideoFolder(folder, "m.jsonl", frames=4, height=16, width=16, fps=8, seed=0)
    s = ds[3]
    assert _index(s["video"]) == [0, 3, 4, 4] and s["meta"]["padded"] == 2


def test_deterministic_by_seed_and_index(folder):
    a = VideoFolder(folder, "m.jsonl", frames=4, height=16, width=16, fps=8, seed=0)
    b = VideoFolder(folder, "m.csv", frames=4, height=16, width=16, fps=8, seed=0)
    assert torch.equal(a[4]["video"], b[4]["video"])


def test_resize_shorter_side_and_centre_crop(tmp_path):
    frame = np.zeros((48, 96, 3), np.uint8)
    frame[:, :24] = 255                                                     # left quarter white
    write_mp4(np.stack([frame] * 3), tmp_path / "wide.mp4", fps=8)
    (tmp_path / "m.jsonl").write_text(json.dumps({"path": "wide.mp4", "caption": "wide"}) + "\n")
    v = VideoFolder(tmp_path, "m.jsonl", frames=2, height=16, width=16, fps=8)[0]["video"]
    assert v.shape == (3, 2, 16, 16)
    assert v.max() < -0.8                                                   # 48x96 -> 16x32 -> crop middle 16: all dark


def test_all_bad_raises_one_clear_error(tmp_path):
    (tmp_path / "bad.mp4").write_bytes(b"junk" * 100)
    (tmp_path / "m.jsonl").write_text('{"path": "bad.mp4", "caption": "x"}\n{"path": "gone.mp4", "caption": "y"}\n')
    with pytest.raises(ValueError, match="none of the 2 videos"):
        VideoFolder(tmp_path, tmp_path / "m.jsonl", frames=2, height=8, width=8, fps=8)


def test_manifest_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        VideoFolder(tmp_path, tmp_path / "nope.csv", 2, 8, 8)
    (tmp_path / "m.csv").write_text("path,text\na.mp4,hello\n")
    with pytest.raises(ValueError, match="missing column.*caption"):
        VideoFolder(tmp_path, tmp_path / "m.csv", 2, 8, 8)
    (tmp_path / "m.jsonl").write_text('{"path": "a.mp4"}\n')
    with pytest.raises(ValueError, match="m.jsonl:1: missing key.*caption"):
        VideoFolder(tmp_path, tmp_path / "m.jsonl", 2, 8, 8)


def test_build_dataset_folder(folder):
    cfg = DataConfig(kind="folder", root=str(folder), manifest="m.csv", frames=4, height=16, width=16,
                     val_fraction=0.0)
    ds = build_dataset(cfg)
    assert isinstance(ds, VideoFolder)
    batch = collate([ds[0], ds[3]])
    assert batch["video"].shape == (2, 3, 4, 16, 16) and batch["meta"][1]["path"].endswith("short.mp4")
    with pytest.raises(ValueError, match="data.manifest"):
        build_dataset(DataConfig(kind="folder", root=str(folder)))
