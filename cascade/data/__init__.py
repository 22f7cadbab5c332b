"""Data sets of text-video pairs and their batching.

Every data set yields {"video": (3, T, H, W) in [-1, 1], "caption": str, "meta": dict} and is a
pure function of (seed, index), so a sample is the same in any process or world size.
"""
from __future__ import annotations

import torch

from cascade.config import ConfigError, DataConfig
from cascade.data.synthetic import SyntheticVideos
from cascade.data.video_folder import VideoFolder

SPLITS = ("train", "val")
HELDOUT_SEED_OFFSET = 1_000_003   # the synthetic held-out split draws from a disjoint seed stream


def build_dataset(data_cfg: DataConfig, split: str = "train"):
    """DataConfig -> data set. split="train" takes data.buckets' shapes when it lists any;
    split="val" keeps data.frames x height x width (held-out clips stack): synthetic uses
    seed + 1_000_003; a folder gives its held-out videos (data.val_manifest, else the
    data.val_fraction of the manifest's rows that split="train" leaves out), never its training clips."""
    if split not in SPLITS:
        raise ValueError(f"split: '{split}' is not one of {', '.join(SPLITS)}")
    d = data_cfg
    if d.kind == "synthetic":
        seed = d.seed + (HELDOUT_SEED_OFFSET if split == "val" else 0)
        return SyntheticVideos(d.frames, d.height, d.width, seed=seed, fps=d.fps,
                               buckets=d.buckets if split == "train" else None,
                               loops=d.loops if split == "train" else 0.0, loop_period=d.loop_period)
    if d.kind == "folder":
        for key in ("root", "manifest"):
            if not getattr(d, key):
                raise ConfigError(f"data.{key}: needed when data.kind=folder")
        common = dict(frames=d.frames, height=d.height, width=d.width, fps=d.fps, seed=d.seed)
        if split == "train" and d.buckets:         # held-out clips: one shape, so they stack
            common.update(buckets=d.buckets, bucket_max_crop=d.bucket_max_crop)
        if split == "train" and d.recaption_ratio > 0:   # held-out clips keep their own captions
            if not d.recaption_manifest:
                raise ConfigError("data.recaption_manifest: needed when data.recaption_ratio > 0 "
                                  "(make one with cascade caption <folder>)")
            common.update(recaption_manifest=d.recaption_manifest, recaption_ratio=d.recaption_ratio)
        if d.val_manifest:                         # held-out videos listed apart: train on all
            manifest = d.val_manifest if split == "val" else d.manifest
            folder = VideoFolder(d.root, manifest, **common)
        else:
            folder = VideoFolder(d.root, d.manifest, split=split, val_fraction=d.val_fraction, **common)
        if split == "train" and d.mix_synthetic > 0:
            return MixedVideos(folder, d.mix_synthetic, d.seed, d.fps)
        return folder
    if d.kind == "cache":                          # cascade cache: latents + text, encoded once
        from cascade.data.cache import LatentCache, read_manifest, source_config
        if not d.root:
            raise ConfigError("data.root: needed when data.kind=cache (the cascade cache folder)")
        if split == "val":                         # held-out clips: from the data it was made of
            return build_dataset(source_config(read_manifest(d.root)), split="val")
        return LatentCache(d.root)
    raise ConfigError(f"data.kind: '{d.kind}' is not one of synthetic, folder, cache")


class MixedVideos(torch.utils.data.Dataset):
    """A folder data set with a share of its samples replaced by embedded-domain clips
    (data.mix_synthetic): sample i is synthetic when a uniform draw from (seed, i) falls below
    `ratio`, rendered at the shape the folder's clip i has (its bucket's), so batches still stack
    and buckets still hold. Everything else (length, buckets, skipped rows) is the folder's."""

    def __init__(self, folder, ratio: float, seed: int, fps: float):
        self.folder, self.ratio, self.seed, self.fps = folder, ratio, seed, fps

    def __getattr__(self, name):                   # bucket_members, buckets, skipped, summary ...
        return getattr(self.__dict__["folder"], name)

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index) -> dict:
        import numpy as np
        i = index[0] if isinstance(index, tuple) else index
        if np.random.default_rng((self.seed, 0x5EED, int(i))).random() >= self.ratio:
            return self.folder[index]
        if isinstance(index, tuple):               # a bucket's shape
            T, H, W = self.folder.buckets[index[1]]
        else:
            T, H, W = self.folder.frames, self.folder.height, self.folder.width
        return SyntheticVideos(T, H, W, seed=self.seed + 7, fps=self.fps)[int(i)]


def collate(batch: list[dict]) -> dict:
    """List of samples -> {"video": (B, 3, T, H, W), "caption": list[str], "meta": list[dict]};
    a cached sample's tensors (latent_mean, text, ...) are stacked the same way. Clips of
    different shapes (a packed batch, train.pack_tokens) stay a list of (3, T_i, H_i, W_i)."""
    out = {k: torch.stack([b[k] for b in batch]) if len({b[k].shape for b in batch}) == 1
           else [b[k] for b in batch] for k, v in batch[0].items() if torch.is_tensor(v)}
    return {**out, "caption": [b["caption"] for b in batch], "meta": [b["meta"] for b in batch]}


__all__ = ["SyntheticVideos", "VideoFolder", "build_dataset", "collate"]
