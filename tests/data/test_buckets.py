"""Aspect-ratio / duration buckets: assignment, same-bucket batches, determinism by (seed, step),
resume drawing the same batches, and training the VAE and the base stage on a folder of videos of
mixed sizes, lengths and frame rates (portrait, landscape, a 1-frame image, a broken file)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cascade.config import ConfigError, load_config
from cascade.data import build_dataset
from cascade.data.buckets import BucketSampler, assign, data_position, parse_buckets
from cascade.data.synthetic import make_caption, place, render, sample_meta
from cascade.video_io import write_mp4

REPO = Path(__file__).resolve().parents[2]
BUCKETS = "data.buckets=[[4,16,16],[4,12,16],[4,16,12],[1,16,16]]"
TINY_VAE = ["vae.channels=8", "vae.channel_mults=[1,2]", "vae.temporal_down=[false]", "vae.groups=4",
            "vae.latent_channels=4", "vae.lpips_weight=0.0", "vae.lpips_pretrained=false",
            "train.batch_size=2", "train.lr=3e-3", "train.warmup=1", "train.log_every=1"]

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


def test_assign_nearest_aspect_then_longest_then_resolution():
    b = parse_buckets([[8, 32, 32], [8, 24, 32], [8, 32, 24], [1, 32, 32], [16, 32, 32], [8, 64, 64]])
    assert assign(240, 320, 100, b, 0.25) == (1, "")            # 4:3 landscape
    assert assign(320, 240, 100, b, 0.25) == (2, "")            # 3:4 portrait
    assert assign(40, 40, 100, b, 0.25) == (4, "")              # square: the longest it fills
    assert assign(70, 70, 9, b, 0.25) == (5, "")                # 8 frames: the nearest resolution
    assert assign(100, 100, 1, b, 0.25) == (3, "")              # an image: the 1-frame bucket
    idx, why = assign(100, 400, 50, b, 0.25)                     # 4:1 is cropped too much everywhere
    assert idx is None and "data.bucket_max_crop=0.25" in why
    with pytest.raises(ValueError, match=r"data.buckets\[1\]"):
        parse_buckets([[8, 32, 32], [8, 32]])


def test_bucket_table_config_errors():
    cfg = REPO / "configs/tiny/base.yaml"
    with pytest.raises(ConfigError, match=r"data.buckets\[0\]: 30x32 is not divisible by 8x8"):
        load_config(cfg, ["data.buckets=[[8,30,32]]"])
    with pytest.raises(ConfigError, match=r"data.buckets\[1\]: \[8, -1, 4\] is not"):
        load_config(cfg, ["data.buckets=[[8,32,32],[8,-1,4]]"])
    with pytest.raises(ConfigError, match="data.bucket_max_crop"):
        load_config(cfg, ["data.bucket_max_crop=1.5"])


def _clip(shape, colour, motion, T, H, W, seed):
    rng = np.random.default_rng(seed)
    meta = place({"shape": shape, "colour": colour, "motion": motion, "background": "black"},
                 rng, T, H, W)
    video = render(meta, T, H, W)                                             # (3, T, H, W)
    return ((video.permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy(), \
        make_caption(shape, colour, motion, "black")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Landscape, portrait, square, wide, a 1-frame image, a broken file and one too short."""
    root = tmp_path_factory.mktemp("mixed")
    specs = [("land.mp4", 24, 48, 64, 12), ("port.mp4", 24, 64, 48, 15), ("square.mp4", 30, 40, 40, 24),
             ("wide.mp4", 20, 36, 64, 10), ("still.mp4", 1, 32, 32, 8), ("land2.mp4", 16, 24, 32, 8)]
    rows = []
    for k, (name, T, H, W, fps) in enumerate(specs):
        frames, caption = _clip("circle", ("red", "green", "blue")[k % 3], "moving right", T, H, W, k)
        write_mp4(frames, root / name, fps=fps)
        rows.append({"path": name, "caption": caption})
    (root / "broken.mp4").write_bytes(b"\x00not a video\xff" * 200)
    rows.append({"path": "broken.mp4", "caption": "a broken file"})
    (root / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "val.jsonl").write_text(json.dumps(rows[-2]) + "\n")      # the VAE's held-out clip
    return root


def folder_cfg(folder, stage, extra=()):
    common = ["data.kind=folder", f"data.root={folder}", "data.manifest=m.jsonl", "data.fps=8",
              "data.frames=4", "data.height=16", "data.width=16", "data.val_manifest=val.jsonl", BUCKETS,
              "data.bucket_max_crop=0.3"]
    return load_config(REPO / f"configs/tiny/{stage}.yaml", common + TINY_VAE + list(extra))


def test_folder_videos_go_to_their_buckets(folder):
    ds = build_dataset(folder_cfg(folder, "vae").data)
    names = {Path(e["path"]).name: e["bucket"] for e in ds.entries}
    assert names == {"land.mp4": 1, "port.mp4": 2, "square.mp4": 0, "wide.mp4": 1, "still.mp4": 3,
                     "land2.mp4": 1}
    assert [r for r, _ in ds.skipped] == ["m.jsonl:7"]                    # the broken file
    assert ds.bucket_members == [[2], [0, 3, 5], [1], [4]]
    for b, (T, H, W) in enumerate(ds.buckets):
        j = ds.bucket_members[b][0]
        assert ds[(j, b)]["video"].shape == (3, T, H, W)


def test_nothing_admitted_is_one_line(folder):
    cfg = folder_cfg(folder, "vae", ["data.buckets=[[64,16,16]]"])
    with pytest.raises(ValueError) as e:
        build_dataset(cfg.data)
    msg = str(e.value)
    assert "\n" not in msg and "fit data.buckets" in msg and "6 no bucket" in msg


def test_sampler_same_bucket_deterministic_resumable_and_world_invariant(folder):
    cfg = folder_cfg(folder, "vae", ["train.steps=12", "train.batch_size=2", "train.grad_accum=2"])
    ds = build_dataset(cfg.data)
    draw = lambda start, rank=0, world=1: list(BucketSampler(ds.bucket_members, len(ds.buckets), len(ds),
                                                             cfg, start, rank, world))
    full = draw(0)
    assert len(full) == 24 and full == draw(0)                              # by (seed, step, micro)
    for batch in full:
        assert len({b for _, b in batch}) == 1                               # one bucket per batch
        assert all(i % len(ds) in ds.bucket_members[b] for i, b in batch)
    assert draw(5) == full[5 * 2:]                                           # resumed at step 5
    assert len({b for batch in full for _, b in batch}) >= 3                 # buckets do vary
    # 2 ranks of batch 1 walk the same global batches as 1 rank of batch 2
    cfg1 = folder_cfg(folder, "vae", ["train.steps=12", "train.batch_size=1", "train.grad_accum=2"])
    two = [BucketSampler(ds.bucket_members, len(ds.buckets), len(ds), cfg1, 0, r, 2) for r in (0, 1)]
    assert [a + b for a, b in zip(*map(list, two))] == full
    # another seed draws other batches; the checkpoint records the table
    other = folder_cfg(folder, "vae", ["train.steps=12", "train.batch_size=2", "train.grad_accum=2",
                                       "data.seed=5"])
    assert list(BucketSampler(ds.bucket_members, 4, len(ds), other, 0, 0, 1)) != full
    assert data_position(cfg, ds)["sampler"] == "buckets"


def test_synthetic_buckets_render_each_shape():
    cfg = load_config(REPO / "configs/tiny/vae.yaml", [BUCKETS, "train.batch_size=3"])
    ds = build_dataset(cfg.data)
    for batch in BucketSampler(None, 4, len(ds), cfg, 0, 0, 1).global_batch(0, 0), [(7, 1), (7, 2)]:
        for i, b in batch:
            assert ds[(i, b)]["video"].shape == (3, *ds.buckets[b])
    assert build_dataset(cfg.data, split="val")[0]["video"].shape == (3, 8, 32, 32)   # val: one shape


def _log_losses(path):
    lines = path.read_text().splitlines()
    return [float(r.split(",")[1]) for r in lines[1:]]


def test_train_vae_and_base_on_buckets_and_resume_exactly(folder, tmp_path, capsys):
    from cascade.train import train
    vae = train(folder_cfg(folder, "vae", [f"train.out_dir={tmp_path / 'vae'}", "train.steps=4",
                                           "train.ckpt_every=100"]), progress=False)
    out = capsys.readouterr().out
    assert "data: buckets 4x16x16: 1, 4x12x16: 3, 4x16x12: 1, 1x16x16: 1" in out
    assert "1 of 7 manifest rows skipped (1 unreadable)" in out
    base = ["text.encoder=minilm", "dit.in_channels=4", "dit.hidden=32", "dit.depth=1", "dit.heads=2", "dit.frames=4",
            "dit.height=8", "dit.width=8", f"train.vae_dir={vae}", "train.ckpt_every=3",
            "train.schedule=constant"]      # the lr of step k must not depend on train.steps
    full = train(folder_cfg(folder, "base", base + [f"train.out_dir={tmp_path / 'full'}",
                                                    "train.steps=6"]), progress=False)
    assert (full / "model.safetensors").is_file()
    cut = tmp_path / "cut"                                   # 3 steps, then resumed to 6
    train(folder_cfg(folder, "base", base + [f"train.out_dir={cut}", "train.steps=3"]), progress=False)
    train(folder_cfg(folder, "base", base + [f"train.out_dir={cut}", "train.steps=6"]), progress=False)
    assert "resumed from" in capsys.readouterr().out
    a, b = _log_losses(tmp_path / "full" / "log.csv"), _log_losses(cut / "log.csv")
    assert len(a) == len(b) == 6
    np.testing.assert_allclose(a, b, rtol=1e-5)              # the same batches, noise and weights
    with pytest.raises(ValueError, match="another data stream"):
        train(folder_cfg(folder, "base", base + [f"train.out_dir={cut}", "train.steps=9",
                                                  "data.buckets=[[4,16,16]]"]), progress=False)


def test_train_base_packed_on_mixed_shapes(folder, tmp_path, capsys):
    """train.pack_tokens: each micro batch mixes buckets, packed into rows of 64 tokens."""
    from cascade.train import train
    vae = train(folder_cfg(folder, "vae", [f"train.out_dir={tmp_path / 'vae'}", "train.steps=1",
                                           "train.ckpt_every=100"]), progress=False)
    cfg = folder_cfg(folder, "base", [
        "text.encoder=minilm", "dit.in_channels=4", "dit.hidden=32", "dit.depth=1", "dit.heads=2",
        "dit.frames=4", "dit.height=8", "dit.width=8", f"train.vae_dir={vae}", "train.steps=3",
        "train.batch_size=4", "train.pack_tokens=64", f"train.out_dir={tmp_path / 'packed'}"])
    ds = build_dataset(cfg.data)
    batch = BucketSampler(ds.bucket_members, 4, len(ds), cfg, 0, 0, 1, mixed=True).global_batch(0, 0)
    assert len({b for _, b in batch}) > 1                                  # shapes mixed in a batch
    export = train(cfg, progress=False)
    losses = _log_losses(tmp_path / "packed" / "log.csv")
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert (export / "model.safetensors").is_file()
    with pytest.raises(ConfigError, match="pack_tokens: a 4x16x16 clip makes 64 tokens, more than a row of 32"):
        train(folder_cfg(folder, "base", [
            "text.encoder=minilm", "dit.in_channels=4", "dit.hidden=32", "dit.depth=1", "dit.heads=2",
            "dit.frames=4", "dit.height=8", "dit.width=8", f"train.vae_dir={vae}", "train.steps=3",
            "train.batch_size=4", "train.pack_tokens=32", f"train.out_dir={tmp_path / 'small'}"]),
            progress=False)
