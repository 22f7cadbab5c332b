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
    """DataConfig -> data set. split="val": synthetic uses seed + 1_000_003; a folder gives its
    held-out videos (data.val_manifest, else the data.val_fraction of the manifest's rows that
    split="train" leaves out), never its training clips."""
    if split not in SPLITS:
        raise ValueError(f"split: '{split}' is not one of {', '.join(SPLITS)}")
    d = data_cfg
    if d.kind == "synthetic":
        seed = d.seed + (HELDOUT_SEED_OFFSET if split == "val" else 0)
        return SyntheticVideos(d.frames, d.height, d.width, seed=seed, fps=d.fps)
    if d.kind == "folder":
        for key in ("root", "manifest"):
            if not getattr(d, key):
                raise ConfigError(f"data.{key}: needed when data.kind=folder")
        common = dict(frames=d.frames, height=d.height, width=d.width, fps=d.fps, seed=d.seed)
        if d.val_manifest:                         # held-out videos listed apart: train on all
            manifest = d.val_manifest if split == "val" else d.manifest
            return VideoFolder(d.root, manifest, **common)
        return VideoFolder(d.root, d.manifest, split=split, val_fraction=d.val_fraction, **common)
    raise ConfigError(f"data.kind: '{d.kind}' is not one of synthetic, folder")


def collate(batch: list[dict]) -> dict:
    """List of samples -> {"video": (B, 3, T, H, W), "caption": list[str], "meta": list[dict]}."""
    return {"video": torch.stack([b["video"] for b in batch]),
            "caption": [b["caption"] for b in batch],
            "meta": [b["meta"] for b in batch]}


__all__ = ["SyntheticVideos", "VideoFolder", "build_dataset", "collate"]
