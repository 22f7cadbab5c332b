"""A data set encoded once: VAE posteriors and frozen text encodings, read back for training.

`cascade cache <stage config>` (cascade/cache.py) runs the stage's data set through its frozen
VAE and text encoder once and writes the outputs to a folder; the base and interp stages then
train from it with `data.kind=cache data.root=<folder>` and skip both encoders every step.

The folder:

    cache.json                 the manifest (written last, replaced whole): what the cache was
                               made from (the data config, the VAE export's path and the sha256
                               of its weights, the text encoder's name / max_length / dim), the
                               number of samples, and the complete shards with bytes + sha256
    shard-00000.safetensors    samples [0, S): latent_mean, latent_std (n, Cz, T', h, w) of the
                               VAE posterior (unscaled; training multiplies by the VAE's latent
                               scale, as encode_latents does), caption_index (n,), and the shard's
                               distinct captions' text (u, L, D), text_mask (u, L), pooled (u, D);
                               the captions themselves in the safetensors metadata

A shard is written under a temporary name and renamed into place, and enters the manifest only
once it is whole, so a kill mid-write leaves a shard that is either absent or not listed: a rerun
redoes it. A listed shard is read only when its size and sha256 match the manifest; anything else
is a one-line error naming the shard (never a half-read tensor).

A sample is {"latent_mean", "latent_std", "text", "text_mask", "pooled", "caption", "meta"}: the
stages' `prepare` recognise "latent_mean" and skip the encoders. Index i reads sample i mod N, so
a run longer than the cache walks it again (the same clips, fresh diffusion noise).
"""
from __future__ import annotations

import hashlib
import json
import struct
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import load as load_bytes
from torch.utils.data import Dataset

from cascade.checksums import file_sha256

MANIFEST = "cache.json"
VERSION = 1
CACHEABLE_STAGES = ("base", "interp")       # the latent stages; vae and sr train on pixels


class CacheError(ValueError):
    """A cache that cannot be used (damaged, incomplete, made with other encoders); one line."""


def vae_fingerprint(vae_dir: str | Path) -> dict:
    """The VAE export a cache is made with: its folder, the sha256 of its weights file and its
    bottleneck (kl: latent_mean / latent_std are the posterior's; vq, fsq: the codes, std 0)."""
    from cascade.config import load_config
    weights = Path(vae_dir) / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"missing checkpoint file: {weights}")
    cfg = Path(vae_dir) / "config.yaml"
    bottleneck = load_config(cfg).vae.bottleneck if cfg.is_file() else "kl"
    return {"path": str(Path(vae_dir).resolve()), "sha256": file_sha256(weights),
            "bottleneck": bottleneck}


def text_fingerprint(text_cfg) -> dict:
    """The text encoder a cache is made with, as the stage config names it."""
    return {"encoder": str(text_cfg.encoder), "max_length": int(text_cfg.max_length),
            "dim": int(text_cfg.dim)}


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def read_manifest(root: str | Path) -> dict:
    """root/cache.json -> dict; a missing or unreadable manifest is a one-line CacheError."""
    path = Path(root) / MANIFEST
    if not Path(root).is_dir():
        raise FileNotFoundError(f"data.root: cache folder not found: {root} (make it with "
                                f"cascade cache <stage config> --out {root})")
    if not path.is_file():
        raise CacheError(f"data.root: {root} is not a cache (no {MANIFEST}; make one with "
                         f"cascade cache <stage config> --out {root})")
    try:
        manifest = json.loads(path.read_text())
        manifest["shards"], manifest["samples"]                              # noqa: B018
    except (ValueError, KeyError, TypeError):
        raise CacheError(f"{path} is damaged: rerun cascade cache to rebuild it") from None
    if manifest.get("version") != VERSION:
        raise CacheError(f"{path}: cache version {manifest.get('version')} is not {VERSION}: "
                         f"rerun cascade cache")
    return manifest


def write_manifest(root: str | Path, manifest: dict) -> None:
    """Written whole to a temporary name, then renamed: a kill leaves the previous manifest."""
    path = Path(root) / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    tmp.replace(path)


def check_compatible(manifest: dict, cfg, root: str | Path) -> None:
    """Refuse (CacheError, one line naming both) to train `cfg` from a cache made with another
    VAE, text encoder or clip size, for a stage that does not train on latents, or from an
    incomplete cache."""
    if cfg.stage not in CACHEABLE_STAGES:
        raise CacheError(f"data.kind=cache: the {cfg.stage} stage trains on pixels; only "
                         f"{' and '.join(CACHEABLE_STAGES)} train from a cache")
    if not cfg.train.vae_dir:
        raise CacheError(f"train.vae_dir: the {cfg.stage} stage needs the folder of the VAE "
                         f"export the cache {root} was made with ({manifest['vae']['path']})")
    have = vae_fingerprint(cfg.train.vae_dir)
    made = manifest["vae"]
    if have["sha256"] != made["sha256"]:
        raise CacheError(f"data.root: the cache {root} was made with the VAE {made['path']} "
                         f"(sha256 {made['sha256'][:12]}), train.vae_dir is {have['path']} "
                         f"(sha256 {have['sha256'][:12]}): rerun cascade cache with this VAE")
    want, made_t = text_fingerprint(cfg.text), manifest["text"]
    if want != made_t:
        fmt = "{encoder} (max_length {max_length}, dim {dim})".format
        raise CacheError(f"data.root: the cache {root} was made with the text encoder "
                         f"{fmt(**made_t)}, this config's is {fmt(**want)}: rerun cascade cache "
                         f"with this text encoder")
    src = manifest["data"]
    for key in ("frames", "height", "width"):
        if getattr(cfg.data, key) != src[key]:
            raise CacheError(f"data.{key}: {getattr(cfg.data, key)} differs from the cache "
                             f"{root}'s {src[key]} (clips of {src['frames']}x{src['height']}x"
                             f"{src['width']})")
    done = len(manifest["shards"])
    if not manifest.get("complete") or done < manifest["num_shards"]:
        raise CacheError(f"data.root: the cache {root} is incomplete ({done} of "
                         f"{manifest['num_shards']} shards): rerun cascade cache to finish it")


def safetensors_metadata(data: bytes) -> dict:
    """The __metadata__ of a safetensors file held in memory."""
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]).get("__metadata__", {})


def read_shard(root: str | Path, entry: dict) -> tuple[dict, list[str]]:
    """A listed shard -> (tensors, captions), read only if its bytes and sha256 match the
    manifest entry; otherwise a one-line CacheError naming the shard."""
    path = Path(root) / entry["file"]
    if not path.is_file():
        raise CacheError(f"cache shard {path} is missing: rerun cascade cache to redo it")
    data = path.read_bytes()
    if len(data) != entry["bytes"]:
        why = f"half-written: {len(data)} of {entry['bytes']} bytes"
    elif hashlib.sha256(data).hexdigest() != entry["sha256"]:
        why = "damaged: its sha256 is not the manifest's"
    else:
        return load_bytes(data), json.loads(safetensors_metadata(data)["captions"])
    raise CacheError(f"cache shard {path} is {why}: rerun cascade cache to redo it")


class LatentCache(Dataset):
    """Samples of a `cascade cache` folder (see the module docstring), index i -> sample i mod N."""

    def __init__(self, root: str | Path, keep_shards: int = 4):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        m = self.manifest
        if not m.get("complete"):
            raise CacheError(f"data.root: the cache {root} is incomplete ({len(m['shards'])} of "
                             f"{m['num_shards']} shards): rerun cascade cache to finish it")
        self.samples, self.shard_size = int(m["samples"]), int(m["shard_size"])
        for k in range(m["num_shards"]):                 # cheap: sizes now, checksums on read
            entry = m["shards"].get(str(k))
            path = self.root / entry["file"] if entry else self.root / shard_name(k)
            size = path.stat().st_size if path.is_file() else 0
            if entry is None or size != entry["bytes"]:
                raise CacheError(f"cache shard {path} is missing or half-written ({size} of "
                                 f"{entry['bytes'] if entry else '?'} bytes): rerun cascade "
                                 f"cache to redo it")
        self.keep = keep_shards
        self._shards: OrderedDict[int, tuple[dict, list[str]]] = OrderedDict()

    def __len__(self) -> int:
        return self.samples

    def _shard(self, k: int):
        if k not in self._shards:
            self._shards[k] = read_shard(self.root, self.manifest["shards"][str(k)])
            while len(self._shards) > self.keep:
                self._shards.popitem(last=False)
        self._shards.move_to_end(k)
        return self._shards[k]

    def __getitem__(self, index: int) -> dict:
        i = int(index) % self.samples
        k, j = divmod(i, self.shard_size)
        t, captions = self._shard(k)
        c = int(t["caption_index"][j])
        return {"latent_mean": t["latent_mean"][j], "latent_std": t["latent_std"][j],   # (Cz, T', h, w)
                "text": t["text"][c], "text_mask": t["text_mask"][c], "pooled": t["pooled"][c],
                "caption": captions[c], "meta": {"cache_index": i}}


def source_config(manifest: dict):
    """The DataConfig the cache was made from (held-out clips for evaluation come from it)."""
    from cascade.config import DataConfig
    known = DataConfig.__dataclass_fields__
    return DataConfig(**{k: v for k, v in manifest["data"].items() if k in known})
