"""cascade cache: a data set encoded once (VAE posteriors + text encodings) trains the base and
interp stages exactly as encoding on the fly does; other encoders and half-written shards are
refused in one line, and a rerun resumes."""
import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cascade.cache import build_cache
from cascade.cli import main
from cascade.config import load_config, save_config
from cascade.data import build_dataset, collate
from cascade.data.cache import CacheError, LatentCache, check_compatible

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


def export_vae(folder: Path, seed: int) -> Path:
    from cascade.models.vae import VideoVAE
    cfg = load_config(REPO / "configs/tiny/vae.yaml", TINY[:3] + VAE)
    torch.manual_seed(seed)
    vae = VideoVAE(cfg.vae)
    vae.scaling_factor.fill_(1.7)
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(folder / "model.safetensors"))
    save_config(cfg, folder / "config.yaml")
    return folder


TINY = ["data.frames=4", "data.height=16", "data.width=16"]
VAE = ["vae.channels=8", "vae.channel_mults=[1,2]", "vae.temporal_down=[false]", "vae.groups=4"]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A random tiny VAE export (and a second one, other weights) and a tiny text encoder."""
    from cascade.text import tiny_text_encoder
    root = tmp_path_factory.mktemp("parts")
    enc = tiny_text_encoder(dim=32, max_length=16)
    enc.model.save_pretrained(root / "text")
    enc.tokenizer.save_pretrained(root / "text")
    export_vae(root / "vae", seed=0)
    export_vae(root / "vae_other", seed=1)
    return root


def base_cfg(parts, out, *extra, stage="base"):
    dit = ["dit.text_dim=32", "dit.hidden=32", "dit.depth=1", "dit.heads=2", "dit.height=8", "dit.width=8"]
    if stage == "base":
        path, shape = "configs/tiny/base.yaml", TINY + ["dit.frames=4"]
    else:
        path, shape = "configs/tiny/interp.yaml", ["data.frames=5", "data.height=16", "data.width=16",
                                                   "interp.rate=2", "dit.frames=5"]
    return load_config(REPO / path, shape + dit + [
        f"text.encoder={parts / 'text'}", "text.dim=32", "text.max_length=16",
        f"train.vae_dir={parts / 'vae'}", f"train.out_dir={out}", "train.batch_size=4",
        "train.steps=3", "train.warmup=1", "train.log_every=1", "train.ckpt_every=100",
        "data.seed=5", *extra])


def losses(path):
    with open(path) as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def test_cache_trains_like_encoding_on_the_fly(parts, tmp_path):
    """Same config, same samples: the cached run's losses equal the on-the-fly run's."""
    from cascade.train import train
    fly = base_cfg(parts, tmp_path / "fly")
    cache = build_cache(fly, tmp_path / "cache", shard_size=5, progress=False)
    manifest = json.loads((cache / "cache.json").read_text())
    assert manifest["samples"] == 12 and manifest["num_shards"] == 3 and manifest["complete"]
    assert manifest["vae"]["path"] == str((parts / "vae").resolve())
    assert manifest["text"] == {"encoder": str(parts / "text"), "max_length": 16, "dim": 32}
    assert sorted(p.name for p in cache.glob("shard-*")) == [f"shard-0000{k}.safetensors" for k in range(3)]
    data = LatentCache(cache)
    s = data[7]
    assert s["latent_mean"].shape == (8, 4, 8, 8) and s["text"].shape == (16, 32)
    assert s["caption"] == build_dataset(fly.data)[7]["caption"]
    train(fly, progress=False)
    cached = base_cfg(parts, tmp_path / "cached", "data.kind=cache", f"data.root={cache}")
    train(cached, progress=False)
    a, b = losses(tmp_path / "fly" / "log.csv"), losses(tmp_path / "cached" / "log.csv")
    assert len(a) == len(b) == 3
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-4, atol=1e-6)


def test_interp_prepare_from_cache_equals_on_the_fly(parts, tmp_path):
    from cascade.stages import build_stage, sample_generators
    cfg = base_cfg(parts, tmp_path / "run", stage="interp")
    cache = build_cache(cfg, tmp_path / "cache", samples=6, shard_size=4, progress=False)
    stage = build_stage(cfg)
    clips, cached = build_dataset(cfg.data), LatentCache(cache)
    fly = stage.prepare(collate([clips[i] for i in (4, 5)]), sample_generators(0, [4, 5]), "cpu")
    got = stage.prepare(collate([cached[i] for i in (4, 5)]), sample_generators(0, [4, 5]), "cpu")
    assert set(got) == set(fly)
    for k in fly:
        torch.testing.assert_close(got[k], fly[k], rtol=1e-4, atol=1e-5, msg=k)


def test_cli_cache_refuses_another_vae_or_text_encoder(parts, tmp_path, capsys):
    cfg_path = tmp_path / "base.yaml"
    save_config(base_cfg(parts, tmp_path / "run"), cfg_path)
    assert main(["cache", str(cfg_path), "--out", str(tmp_path / "cache"), "--samples", "4",
                 "--no-progress"]) == 0
    assert "4 samples in 1 shard(s)" in capsys.readouterr().out
    use = ["data.kind=cache", f"data.root={tmp_path / 'cache'}", "--no-progress"]
    rc = main(["train", str(cfg_path), *use, f"train.vae_dir={parts / 'vae_other'}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert str((parts / "vae").resolve()) in err and str((parts / "vae_other").resolve()) in err
    rc = main(["train", str(cfg_path), *use, "text.max_length=12"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "max_length 16" in err and "max_length 12" in err
    rc = main(["train", str(cfg_path), *use, "stage=vae"])
    assert rc == 2 and "trains on pixels" in capsys.readouterr().err
    # another config into the same folder is refused, not mixed in
    rc = main(["cache", str(cfg_path), "--out", str(tmp_path / "cache"), "--samples", "5", "--no-progress"])
    assert rc == 2 and "samples" in capsys.readouterr().err


def test_half_written_shard_is_refused_then_redone(parts, tmp_path, capsys):
    cfg = base_cfg(parts, tmp_path / "run")
    cache = build_cache(cfg, tmp_path / "cache", samples=9, shard_size=4, progress=False)
    good = (cache / "shard-00001.safetensors").read_bytes()
    before = LatentCache(cache)[5]["latent_mean"]
    (cache / "shard-00001.safetensors").write_bytes(good[:len(good) // 2])    # killed mid-write
    with pytest.raises(CacheError, match="shard-00001.*half-written"):
        LatentCache(cache)
    flipped = bytearray(good)
    flipped[-3] ^= 0xFF                                                     # same size, damaged
    (cache / "shard-00001.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(CacheError, match="shard-00001.*sha256"):
        LatentCache(cache)[5]
    # a run killed after writing a shard's temporary file, before it was renamed and listed
    manifest = json.loads((cache / "cache.json").read_text())
    del manifest["shards"]["2"]
    manifest["complete"] = False
    (cache / "cache.json").write_text(json.dumps(manifest))
    (cache / "shard-00002.safetensors").unlink()
    (cache / ".shard-00002.safetensors.tmp-1234").write_bytes(b"partial")
    with pytest.raises(CacheError, match="incomplete"):
        check_compatible(manifest, cfg, cache)
    capsys.readouterr()
    build_cache(cfg, cache, samples=9, shard_size=4, progress=False)     # the rerun resumes
    out = capsys.readouterr().out
    assert "1 listed shard(s)" in out and "resuming" in out and "1 of 3 shards done" in out
    assert not list(cache.glob(".shard-*"))
    assert (cache / "shard-00001.safetensors").read_bytes() == good
    torch.testing.assert_close(LatentCache(cache)[5]["latent_mean"], before)
    check_compatible(json.loads((cache / "cache.json").read_text()), cfg, cache)


def test_image_steps_from_cache_equal_first_frames_on_the_fly(parts, tmp_path):
    """W.A.L.T image steps (data.image_fraction) slice a cached batch's latents to frame 0: the
    same inputs as encoding the clips' first frames (the VAE is causal, norms per frame)."""
    from cascade.stages import build_stage, sample_generators
    from cascade.train import FRAME_KEYS
    cfg = base_cfg(parts, tmp_path / "run")
    cache = build_cache(cfg, tmp_path / "cache", samples=4, progress=False)
    stage = build_stage(cfg)
    first = lambda b: {**b, **{k: b[k][:, :, :1] for k in FRAME_KEYS if k in b}}   # noqa: E731
    clips, cached = build_dataset(cfg.data), LatentCache(cache)
    fly = stage.prepare(first(collate([clips[i] for i in range(4)])), sample_generators(0, range(4)), "cpu")
    got = stage.prepare(first(collate([cached[i] for i in range(4)])), sample_generators(0, range(4)), "cpu")
    assert got["x0"].shape[2] == 1
    for k in fly:
        torch.testing.assert_close(got[k], fly[k], rtol=1e-4, atol=1e-5, msg=k)
