"""cascade data natural / lavfi (cascade/data/natural.py) and data.mix_synthetic: deterministic by
seed (the decoded frames exactly: lossless mp4), never a held-out photograph in the training set,
one-line errors for what is missing."""
import csv
import shutil
import sys
from pathlib import Path

import pytest
import torch

from cascade.data.natural import (HELDOUT_PHOTOS, PHOTOGRAPHS, TRAIN_PHOTOS, camera_clip, natural_clips,
                                  photo)

needs_skimage = pytest.mark.skipif(__import__("importlib").util.find_spec("skimage") is None,
                                   reason="the optional extra: pip install -e '.[natural]'")


def rows(path):
    return list(csv.DictReader(open(path)))


@needs_skimage
def test_clips_are_deterministic_and_held_out_photographs_stay_out(tmp_path):
    a = natural_clips(tmp_path / "a", seed=3, per_photo=1, heldout_per_photo=1, progress=False)
    b = natural_clips(tmp_path / "b", seed=3, per_photo=1, heldout_per_photo=1, progress=False)
    train, val = rows(a / "train.csv"), rows(a / "val.csv")
    assert {r["source"] for r in train} == set(TRAIN_PHOTOS)
    assert {r["source"] for r in val} == set(HELDOUT_PHOTOS)
    assert not any(r["path"].startswith("val/") for r in train)
    from cascade.video_io import read_video
    for r in train + val:                                  # lossless: the frames exactly
        x, _ = read_video(a / r["path"])
        assert (x == read_video(b / r["path"])[0]).all(), r["path"]
    assert train == rows(b / "train.csv")
    import numpy as np
    name, k = train[0]["source"], 0
    clip, _ = camera_clip(photo(name), 9, 64, 64, np.random.default_rng((3, 0, 0, k)))
    from cascade.video_io import to_uint8
    assert (read_video(a / train[0]["path"])[0] == to_uint8(clip)).all()   # as rendered
    from cascade.cli import main                           # the photographs alone: the same clips
    assert main(["data", "natural", "--out", str(tmp_path / "p"), "--seed", "3", "--clips", "1",
                 "--photographs-only", "--no-progress"]) == 0
    photos = rows(tmp_path / "p" / "train.csv")
    assert {r["source"] for r in photos} == set(PHOTOGRAPHS) and photos == train[:len(photos)]
    with pytest.raises(ValueError, match="both a training and a held-out"):
        natural_clips(tmp_path / "c", train_photos=("astronaut", "chelsea"), progress=False)
    import numpy as np
    img = photo("astronaut")
    one, m1 = camera_clip(img, 5, 16, 16, np.random.default_rng(0))
    two, m2 = camera_clip(img, 5, 16, 16, np.random.default_rng(0))
    other, _ = camera_clip(img, 5, 16, 16, np.random.default_rng(1))
    assert torch.equal(one, two) and m1 == m2 and not torch.equal(one, other)
    assert one.shape == (3, 5, 16, 16) and one.abs().max() <= 1


def test_a_missing_package_or_program_is_one_line(tmp_path, monkeypatch):
    from cascade.data.natural import lavfi_clips
    monkeypatch.setitem(sys.modules, "skimage", None)                     # import fails
    monkeypatch.setitem(sys.modules, "skimage.data", None)
    with pytest.raises(ValueError, match="needs scikit-image"):
        photo("astronaut")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match="needs the ffmpeg program"):
        lavfi_clips(tmp_path)


@needs_skimage
def test_mix_synthetic_replaces_a_share_of_samples(tmp_path):
    from cascade.config import load_config
    from cascade.data import build_dataset
    natural_clips(tmp_path, per_photo=1, heldout_per_photo=1, progress=False)
    cfg = load_config(None, ["data.kind=folder", f"data.root={tmp_path}",
                             f"data.manifest={tmp_path / 'train.csv'}", f"data.val_manifest={tmp_path / 'val.csv'}",
                             "data.mix_synthetic=0.5", "data.height=16", "data.width=16", "data.frames=4"])
    ds = build_dataset(cfg.data)
    caps = [ds[i]["caption"] for i in range(len(ds))]
    synthetic = sum("photograph" not in c for c in caps)
    assert 0.2 < synthetic / len(caps) < 0.8
    assert all(ds[i]["video"].shape == (3, 4, 16, 16) for i in range(4))
    val = build_dataset(cfg.data, "val")
    assert all("photograph" in val[i]["caption"] for i in range(len(val)))   # val unmixed


@needs_skimage
def test_every_photograph_loads_as_rgb_in_unit_range():
    """Grey, binary (horse) and RGBA (logo, composited on white) images all become (3, H, W) in [0, 1]."""
    for name in TRAIN_PHOTOS + HELDOUT_PHOTOS:
        img = photo(name)
        assert img.dim() == 3 and img.shape[0] == 3 and 0 <= img.min() and img.max() <= 1, name
    horse, logo = photo("horse"), photo("logo")
    assert set(horse.unique().tolist()) == {0.0, 1.0}          # bool -> black and white, not 0 and 1/255
    assert logo[:, 0, 0].tolist() == [1.0, 1.0, 1.0]           # transparent corner -> white


@needs_skimage
def test_shipped_natural_vae_beats_bilinear_on_held_out_photographs():
    """weights/tiny-natural/vae (issue 27): bench_vae measured 30.92 dB against bilinear's 24.02 on
    the 24 held-out clips (+6.9); on these 6 camera moves over the held-out photographs it was
    6.1 dB ahead. Bound: +3 dB, the issue's target."""
    import numpy as np

    from benchmarks.bench_vae import bilinear, ours
    from cascade.losses import psnr
    clips = torch.stack([camera_clip(photo(n), 8, 32, 32, np.random.default_rng((0, 1, i, k)))[0]
                         for i, n in enumerate(HELDOUT_PHOTOS) for k in range(2)])     # (6, 3, 8, 32, 32)
    with torch.no_grad():
        folder = Path(__file__).resolve().parents[2] / "weights" / "tiny-natural" / "vae"
        vae = psnr(ours(folder)(clips), clips).mean().item()
        lin = psnr(bilinear(4)(clips), clips).mean().item()
    assert vae >= lin + 3.0, (vae, lin)
