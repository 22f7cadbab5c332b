"""`cascade cache <stage config> [key=value ...] --out DIR`: encode a data set once for training.

The base and interp stages run every clip through the frozen VAE encoder and every caption
through the frozen text encoder on every step (stages.BaseStage.prepare). Neither changes during
training, so their outputs can be computed once: this writes the stage's data set (its `data:`
section: synthetic or a folder of videos) as VAE posteriors (mean and std) and text encodings
(tokens, mask, pooled) in safetensors shards, the layout and the guarantees of
cascade/data/cache.py. Training then reads them with `data.kind=cache data.root=DIR` and
refuses a cache made with another VAE or text encoder.

Which samples: indices 0..N-1 of the training split, the same (seed, index) samples a run on
the fly reads first. N (`--samples`): by default every clip of a folder once, or for the
synthetic stream the samples of the config's whole run (train.steps x batch x grad_accum, one
process), so a run from the cache trains on exactly the clips of the same run on the fly.

Resumable: complete shards already in the manifest (size and sha256 checked) are kept; a shard
killed mid-write never got its final name or its manifest entry and is encoded again.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from cascade.checksums import file_sha256
from cascade.config import ConfigError, StageConfig
from cascade.data.cache import (CACHEABLE_STAGES, MANIFEST, VERSION, CacheError, read_manifest,
                                shard_name, text_fingerprint, vae_fingerprint, write_manifest)


def default_samples(cfg: StageConfig, dataset) -> int:
    if cfg.data.kind == "synthetic":
        return cfg.train.steps * cfg.train.batch_size * cfg.train.grad_accum
    return len(dataset)


def _fingerprint(manifest: dict) -> dict:
    """What must agree for a rerun to resume into an existing cache."""
    return {k: manifest[k] for k in ("version", "data", "vae", "text", "samples", "shard_size",
                                     "latent_shape")}


def _shard_ok(root: Path, entry: dict | None) -> bool:
    if not entry:
        return False
    path = root / entry["file"]
    return (path.is_file() and path.stat().st_size == entry["bytes"]
            and file_sha256(path) == entry["sha256"])


@torch.no_grad()
def encode_shard(dataset, indices: list[int], vae, text, batch_size: int, device) -> tuple[dict, list[str]]:
    """Samples `indices` -> the shard's tensors and its distinct captions."""
    from cascade.data import collate
    means, stds, captions = [], [], []
    for s in range(0, len(indices), batch_size):
        batch = collate([dataset[i] for i in indices[s:s + batch_size]])
        post = vae.encode(batch["video"].to(device))                     # over (b, Cz, T', h, w)
        means.append(post.mean.float().cpu())
        stds.append(post.std.float().cpu())
        captions += batch["caption"]
    distinct = list(dict.fromkeys(captions))
    cond = {k: [] for k in ("text", "text_mask", "pooled")}
    for s in range(0, len(distinct), batch_size):
        enc = text(distinct[s:s + batch_size])
        for k in cond:
            cond[k].append(enc[k].cpu())
    where = {c: i for i, c in enumerate(distinct)}
    tensors = {"latent_mean": torch.cat(means), "latent_std": torch.cat(stds),  # (n, Cz, T', h, w)
               "caption_index": torch.tensor([where[c] for c in captions], dtype=torch.int64),
               "sample_index": torch.tensor(indices, dtype=torch.int64),
               **{k: torch.cat(v).contiguous() for k, v in cond.items()}}   # (u, L, D), (u, L), (u, D)
    return tensors, distinct


def build_cache(cfg: StageConfig, out: str | Path, samples: int | None = None,
                shard_size: int = 256, batch_size: int | None = None, device=None,
                progress: bool = True) -> Path:
    """Encode cfg's training data into `out` (see the module docstring); returns `out`. One loop
    over the shards with its resume and fingerprint checks beside it (~80 lines, read in order)."""
    import json

    from cascade.data import build_dataset
    from cascade.stages import load_vae
    from cascade.text import TextEncoder
    if cfg.stage not in CACHEABLE_STAGES:
        raise ConfigError(f"cascade cache: the {cfg.stage} stage trains on pixels; only "
                          f"{' and '.join(CACHEABLE_STAGES)} train from a cache")
    if cfg.data.kind == "cache":
        raise ConfigError("data.kind: the config already reads a cache; give the config of the "
                          "data it should encode (synthetic or folder)")
    if not cfg.train.vae_dir:
        raise ConfigError(f"train.vae_dir: the {cfg.stage} stage's cache needs the folder of a "
                          f"trained VAE export")
    if shard_size < 1 or (samples is not None and samples < 1):
        raise ValueError(f"cascade cache: --samples and --shard-size must be positive, got "
                         f"{samples} and {shard_size}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out: {out} is a file, not a folder")
    dataset = build_dataset(cfg.data)
    n = samples or default_samples(cfg, dataset)
    vae_fp = vae_fingerprint(cfg.train.vae_dir)
    vae, _ = load_vae(cfg.train.vae_dir, device)
    latent_shape = list(vae.latent_shape(cfg.data.frames, cfg.data.height, cfg.data.width))
    num_shards = -(-n // shard_size)
    manifest = {"version": VERSION, "stage": cfg.stage, "data": dataclasses.asdict(cfg.data),
                "vae": vae_fp, "text": text_fingerprint(cfg.text), "samples": n,
                "shard_size": shard_size, "num_shards": num_shards,
                "latent_shape": latent_shape, "complete": False, "shards": {}}
    manifest = json.loads(json.dumps(manifest))             # as it reads back (lists, not tuples)
    if (out / MANIFEST).is_file():
        try:
            old = read_manifest(out)
        except CacheError:
            old = None                                       # a damaged manifest: start over
        if old is not None and _fingerprint(old) != _fingerprint(manifest):
            diff = [k for k in _fingerprint(manifest) if old.get(k) != manifest[k]]
            raise CacheError(f"--out: {out} holds a cache of other settings ({', '.join(diff)} "
                             f"differ): choose another --out folder or remove it")
        if old is not None:
            manifest["shards"] = {k: e for k, e in old["shards"].items() if _shard_ok(out, e)}
            if len(manifest["shards"]) < len(old["shards"]):
                print(f"cache: {len(old['shards']) - len(manifest['shards'])} listed shard(s) in "
                      f"{out} are damaged: encoding them again")
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".shard-*.tmp*"):                  # a killed run's half-written shard
        stale.unlink()
    text = TextEncoder.from_config(cfg.text).to(device)
    todo = [k for k in range(num_shards) if str(k) not in manifest["shards"]]
    if len(todo) < num_shards:
        print(f"cache: resuming {out}: {num_shards - len(todo)} of {num_shards} shards done")
    bs = batch_size or cfg.train.batch_size
    bar = tqdm(total=n, initial=n - sum(min(shard_size, n - k * shard_size) for k in todo),
               desc=f"cache {cfg.stage}", unit="clip", disable=not progress, dynamic_ncols=True)
    for k in todo:
        indices = list(range(k * shard_size, min(n, (k + 1) * shard_size)))
        tensors, captions = encode_shard(dataset, indices, vae, text, bs, device)
        final = out / shard_name(k)
        tmp = out / f".{final.name}.tmp-{os.getpid()}"
        save_file(tensors, str(tmp), metadata={"captions": json.dumps(captions)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        tmp.replace(final)                                   # whole, or not there at all
        manifest["shards"][str(k)] = {"file": final.name, "start": indices[0], "count": len(indices),
                                      "bytes": final.stat().st_size, "sha256": file_sha256(final)}
        write_manifest(out, manifest)                        # listed only once complete
        bar.update(len(indices))
    bar.close()
    manifest["complete"] = True
    skipped = getattr(dataset, "summary", lambda: "")()
    if skipped:
        manifest["skipped"] = skipped
    write_manifest(out, manifest)
    size = sum(e["bytes"] for e in manifest["shards"].values())
    print(f"cache: {n} samples in {num_shards} shard(s), {size / 2**20:.1f} MiB, in {out} "
          f"(train with data.kind=cache data.root={out})")
    return out
