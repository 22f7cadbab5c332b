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

from dataclasses import dataclass, field

import torch

from cascade.config import COND_TYPES, CondConfig
from cascade.sampling import check_number


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


# ----------------------------------------------------------------------------- sampling

TASKS = ("t2v", "i2v", "extend", "connect", "loop", "long", "edit")


@dataclass
class Conditions:
    """What a call is prompted with besides text, for every video of the call. Images and videos
    are float tensors in [-1, 1], image (3, H, W), video (3, T, H, W), of any size: the Pipeline
    resizes and centre-crops them to the output as the data path does (`fit`).

    Build one with a constructor: `image_to_video`, `extend`, `connect`, `loop`, `edit`; or
    Conditions() for text only (a long video is text only with more frames). `frames` lists the
    given frames as output frame index -> image (a negative index counts from the end).

    keep_input: False (the default) writes the given frames and the input video's frames as the
    cascade renders them (VAE, then SR), as Open-Sora and Sora decode their conditioned latents
    with the rest: the whole video then has one look and no join shows (a crisp input beside the
    cascade's softer frames is a visible step at every join; docs/prompting.md measures it).
    They are then the input within the VAE + SR error. True writes them unchanged, to the bit."""
    task: str = "t2v"
    frames: dict = field(default_factory=dict)     # output frame index -> image (3, H, W)
    video: torch.Tensor | None = None              # extend / edit: the input video; connect: a
    video_b: torch.Tensor | None = None            # connect: b
    new_frames: int = 0                            # extend: frames made beyond the input
    backward: bool = False                         # extend: the new frames come before the input
    strength: float | None = None                  # edit: the noise level it starts from, in (0, 1]
    inversion: str = "none"                        # edit: none (SDEdit: noised with fresh noise) | ddim
    caption: str | None = None                     # edit with ddim inversion: the input's own caption
    inject: float = 0.0                            # edit with ddim inversion: steps given the source's attention
    keep_input: bool = False                       # write the given / input frames unchanged

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task: '{self.task}' is not one of {', '.join(TASKS)}")

    @classmethod
    def image_to_video(cls, image: torch.Tensor, last: torch.Tensor | None = None,
                       keep_input: bool = False) -> "Conditions":
        """The image is the video's first frame (and `last` its last one)."""
        return cls("i2v", {0: image, **({-1: last} if last is not None else {})}, keep_input=keep_input)

    @classmethod
    def extend(cls, video: torch.Tensor, new_frames: int, backward: bool = False,
               keep_input: bool = False) -> "Conditions":
        """`new_frames` frames after the video (before it: backward), written with it as one."""
        if not (isinstance(new_frames, int) and new_frames >= 1):
            raise ValueError(f"extend: the number of new frames must be >= 1, got {new_frames!r}")
        return cls("extend", video=video, new_frames=new_frames, backward=backward, keep_input=keep_input)

    @classmethod
    def connect(cls, a: torch.Tensor, b: torch.Tensor, keep_input: bool = False) -> "Conditions":
        """The frames that lead from the end of a to the start of b, written as a + them + b."""
        return cls("connect", video=a, video_b=b, keep_input=keep_input)

    @classmethod
    def loop(cls, image: torch.Tensor | None = None, keep_input: bool = False) -> "Conditions":
        """A video that ends where it starts (from `image`, or from a first text-only keyframe)."""
        return cls("loop", {0: image} if image is not None else {}, keep_input=keep_input)

    @classmethod
    def edit(cls, video: torch.Tensor, strength: float, inversion: str = "none",
             caption: str | None = None, inject: float = 0.0) -> "Conditions":
        """Edit the video with the call's prompt from noise level `strength`: inversion none is
        SDEdit (Meng et al. 2022: noised with fresh noise), ddim inverts its keyframes with their
        `caption` to that level (Tune-A-Video; `Diffusion.invert`) and samples back with DDIM;
        inject (ddim only): the share of those steps, from the noisy end, that take the source's
        attention maps (Plug-and-Play; cascade/injection.py), keeping its layout and motion."""
        if not (isinstance(strength, (int, float)) and 0 < strength <= 1):
            raise ValueError(f"--strength: must be in (0, 1], got {strength!r}")
        if inversion not in ("none", "ddim"):
            raise ValueError(f"--inversion: '{inversion}' is not one of none, ddim")
        if inversion == "ddim" and not (caption and caption.strip()):
            raise ValueError("--inversion ddim: needs the input video's own caption (--caption, or "
                             "an adapter from cascade tune, which records it)")
        check_number("--inject", inject, 0, 1)
        if inject and inversion != "ddim":
            raise ValueError("--inject: attention injection needs --inversion ddim (the source's "
                             "attention comes from its inversion)")
        return cls("edit", video=video, strength=float(strength), inversion=inversion, caption=caption,
                   inject=float(inject))


def fit(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """An image (3, H, W) or video (3, T, H, W) in [-1, 1] -> the output size: the shorter side
    resized (area when shrinking, bilinear when growing), then a centre crop, as the data path's
    `_resize_crop` does; (3, T, height, width)."""
    import torch.nn.functional as F
    if x.dim() == 3:
        x = x[:, None]
    if x.dim() != 4 or x.shape[0] != 3:
        raise ValueError(f"an image must be (3, H, W) and a video (3, T, H, W), got {tuple(x.shape)}")
    _, T, H, W = x.shape
    scale = max(height / H, width / W)
    nh, nw = max(height, round(H * scale)), max(width, round(W * scale))
    frames = x.float().transpose(0, 1)                                     # (T, 3, H, W)
    if (nh, nw) != (H, W):
        mode = "area" if scale < 1 else "bilinear"
        frames = F.interpolate(frames, size=(nh, nw), mode=mode,
                               **({} if mode == "area" else {"align_corners": False}))
    top, left = (nh - height) // 2, (nw - width) // 2
    return frames[:, :, top:top + height, left:left + width].transpose(0, 1).clamp(-1, 1)


@dataclass
class Plan:
    """A call's Conditions resolved against one cascade (`plan`): what the cascade makes and what
    is given in it, in the cascade's own output frames.

    length: frames the cascade makes; given: output frame -> image (3, H, W) at the output size;
    prefix / suffix: input frames written before / after them unchanged (extend, connect);
    backward: keyframe windows fill from the end; loop: the last frame is tied to the first
    and dropped from the output; source, strength, inversion, caption, inject: edit; keep_input:
    the given frames and the prefix / suffix are written unchanged (else as the cascade renders
    them)."""
    length: int
    given: dict = field(default_factory=dict)
    prefix: torch.Tensor | None = None             # (3, T, H, W)
    suffix: torch.Tensor | None = None
    backward: bool = False
    loop: bool = False
    source: torch.Tensor | None = None             # (3, length, H, W)
    strength: float | None = None
    inversion: str = "none"
    caption: str | None = None
    inject: float = 0.0
    cut: int | None = None                         # frames of `length` kept (extend: the rounding up cut off)
    keep_input: bool = False

    def written(self, x: torch.Tensor) -> torch.Tensor:
        """The cascade's frames (B, C, length, ...) -> those the video keeps: cut to `cut` (from
        the end when backward), the loop's repeated last frame dropped."""
        if self.cut is not None:
            x = x[:, :, -self.cut:] if self.backward else x[:, :, :self.cut]
        return x[:, :, :-1] if self.loop else x


def plan(c: Conditions, reachable, step: int, context: int, default_length: int, size: tuple,
         length: int | None = None) -> Plan:
    """Conditions -> Plan for a cascade whose keyframes are `step` output frames apart, whose
    base stage takes up to `context` given keyframes of context, and which makes the frame
    counts `reachable(n)` rounds up to. size: (H, W) of the output.

      i2v     the images at frames 0 (and -1) of a clip of `length` (default: one clip)
      extend  the input's last 1 + step * (context - 1) frames (fewer if it is shorter) given at
              the start of a clip of them + new_frames (rounded up to a reachable count, then
              cut); the rest of the input is the prefix (backward: mirrored, the suffix)
      connect a's last frame and b's first given as the first and last frame of one clip; a's
              other frames the prefix, b's the suffix
      loop    frame 0 (an image, or the Pipeline's first text-only keyframe) given again as the
              last frame, which is dropped: the video's last frame leads into its first
      long    text only over `length` frames (keyframe windows)
      edit    the input video (its first `length` frames) noised to `strength`
    """
    out = _plan(c, reachable, step, context, default_length, size, length)
    out.keep_input = c.keep_input
    return out


def _plan(c: Conditions, reachable, step: int, context: int, default_length: int, size: tuple,
          length: int | None = None) -> Plan:
    H, W = size
    if c.task in ("extend", "connect", "edit") and c.video is None:
        raise ValueError(f"{c.task}: needs an input video")
    video = fit(c.video, H, W) if c.video is not None else None
    if c.task == "extend":
        n_in = video.shape[1]
        if n_in < 1 + step:
            raise ValueError(f"extend: the input video has {n_in} frame(s); its motion needs at least "
                             f"{1 + step} (two keyframes, {step} frames apart) to be continued")
        keep = min(n_in, 1 + step * (max(1, context) - 1))               # context frames
        total = reachable(keep + c.new_frames)
        ctx = video[:, n_in - keep:] if not c.backward else video[:, :keep]
        first = 0 if not c.backward else total - keep
        given = {first + i: ctx[:, i] for i in range(keep)}
        rest = video[:, :n_in - keep] if not c.backward else video[:, keep:]
        return Plan(total, given, backward=c.backward, cut=keep + c.new_frames,
                    **({"prefix": rest} if not c.backward else {"suffix": rest}))
    if c.task == "connect":
        if c.video_b is None:
            raise ValueError("connect: needs a second video")
        b = fit(c.video_b, H, W)
        total = reachable(length or default_length)
        return Plan(total, {0: video[:, -1], total - 1: b[:, 0]}, prefix=video[:, :-1],
                    suffix=b[:, 1:])
    total = reachable(length or default_length)
    given = {(i if i >= 0 else total + i): fit(img, H, W)[:, 0] for i, img in c.frames.items()}
    if any(not 0 <= i < total for i in given):
        raise ValueError(f"frames: a condition at frame {sorted(c.frames)} is outside the "
                         f"{total} frames the cascade makes")
    if c.task == "loop":
        return Plan(total, given, loop=True)
    if c.task == "edit":
        if video.shape[1] < total:
            raise ValueError(f"edit: the input video has {video.shape[1]} frames, fewer than the "
                             f"{total} the cascade makes: give --frames with at most "
                             f"{video.shape[1]} (it makes 1 + {step} x k frames)")
        return Plan(total, source=video[:, :total], strength=c.strength, inversion=c.inversion,
                    caption=c.caption, inject=c.inject)
    return Plan(total, given)
