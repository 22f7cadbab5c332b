"""Prompting with frames: what a video is given besides its text, as one object every stage reads.

Sora prompts its model with images and videos (animating an image, extending a video forward or
backward, connecting two videos, looping, editing); Video LDM makes long videos with a keyframe
model that is also a prediction model conditioned on context frames. Here all of it is one
`Conditions`: the given frames (output pixel frame index -> image) and the task. The Pipeline hands
it to every stage, and each maps it to its own frames (`plan`): the base stage gets the given
latent keyframes (a mask and the clean latents through zero-initialised input channels,
dit.cond_frames), the interp stage keeps a given frame that falls between keyframes as one more
known frame, the VAE decode and the SR stage put the given frames back. A new task is a new way
of filling the object.

Training (`training_mask`): the base draws a condition type per sample (cascade.config.CondConfig)
so one model does text-to-video and every task.
"""
from __future__ import annotations

import torch

from cascade.config import COND_TYPES, CondConfig


def training_mask(c: CondConfig, gens, frames: int) -> torch.Tensor:
    """Which latent frames each training sample is given: a condition type drawn per sample at
    c's rates (one uniform from its own stream; first_k / last_k draw k in 2..k_max, clipped to
    frames - 1, with a second) -> (B, frames) float 0/1. A 1-frame clip (an image step) is given
    nothing: its one frame would be the answer."""
    rates = torch.tensor([getattr(c, k) for k in COND_TYPES], dtype=torch.float64)
    edges = (rates / rates.sum()).cumsum(0)                                # (n_types,)
    u, v = gens.rand(), gens.rand()                                        # (B,), (B,)
    mask = torch.zeros(len(u), frames)
    if frames < 2:
        return mask
    k_hi = max(1, min(c.k_max, frames - 1))                               # never every frame
    for i, (ui, vi) in enumerate(zip(u.tolist(), v.tolist())):
        kind = COND_TYPES[min(int((edges < ui).sum()), len(COND_TYPES) - 1)]
        k = k_hi if k_hi < 2 else 2 + min(int(vi * (k_hi - 1)), k_hi - 2)  # 2..k_hi
        if kind in ("first", "first_last"):
            mask[i, 0] = 1
        if kind in ("last", "first_last"):
            mask[i, -1] = 1
        if kind == "first_k":
            mask[i, :k] = 1
        if kind == "last_k":
            mask[i, -k:] = 1
    return mask                                                            # (B, T)
