"""The sr stage: spatial super-resolution in pixel space (Imagen Video SSR, Ho et al. 2022
Sec. 2-2.5), a (2+1)D conv U-Net conditioned on the bilinearly upsampled low-res video,
noise-augmented, with the augmentation level as an input."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cascade.config import ConfigError, StageConfig
from cascade.stages.common import CACHED_TEXT, DiffusionStage, load_text_encoder, text_condition


def downsample_video(video: torch.Tensor, scale: int, mode: str = "area") -> torch.Tensor:
    """Per-frame downsampling by an integer factor: (B, C, T, H, W) -> (B, C, T, H/s, W/s).
    area: the mean of each s x s block; bilinear: antialiased bilinear (PIL-like)."""
    B, C, T, H, W = video.shape
    if H % scale or W % scale:
        raise ValueError(f"downsample_video: frame size {H}x{W} is not divisible by {scale}")
    x = video.transpose(1, 2).reshape(B * T, C, H, W)
    if mode == "area":
        y = F.avg_pool2d(x, scale)
    elif mode == "bilinear":
        y = F.interpolate(x, size=(H // scale, W // scale), mode="bilinear", align_corners=False,
                          antialias=True)
    else:
        raise ValueError(f"downsample_video: mode '{mode}' is not one of area, bilinear")
    return y.reshape(B, T, C, H // scale, W // scale).transpose(1, 2)     # (B, C, T, H/s, W/s)


class SRStage(DiffusionStage):
    """Spatial super-resolution in pixel space (Imagen Video SSR, Ho et al. 2022 Sec. 2-2.5).

    The batch's video at data.height x data.width is x0; the conditioning is that video brought
    down by sr.scale (area or antialiased bilinear) and back up with `upsample_video` (bilinear),
    noise-augmented to a per-sample t_aug ~ U(0, sr.aug_max) (CDM conditioning augmentation, the
    level given to the net as cond["aug_t"]). Text as in the base stage, dropped for CFG. Loss:
    the shared diffusion loss. At sampling the low-res video is upsampled the same way and
    augmented to the fixed level sr.aug_sample.

    sr.residual: the diffused signal is the residual x - upsample(low-res) (as in residual
    refinement, Whang et al. 2022, "Deblurring via Stochastic Refinement"), added back to the
    clean upsampled video at sampling, so the stage starts from bilinear quality. Measured on the
    tiny SR: with plain x the net learnt to lean on x_t, not its low-res input (one-step x0
    estimate 18 dB at t = 0.9 against the input's own 29 dB after 1500 steps).

    sr.residual_scale: the residual is mostly zero with sharp edges (std 0.054 on the synthetic
    shapes at 64x64, against 0.69 for the frames), so at most noise levels of the schedule it is
    invisible and the net learns little there (min-SNR weights them near 0): 1500 steps gave a
    one-step sample of 17.6 dB, 3 steps 27.4 dB, below the bilinear input's 30.4 dB. Diffusing
    the residual times ~1/std puts it at the scale the schedule is made for (LDM's latent scale)."""

    name, network = "sr", "unet"
    cond_keys = CACHED_TEXT + ("lowres", "aug_t")

    def __init__(self, cfg: StageConfig, device="cpu"):
        from cascade.models.unet import VideoUNet
        if cfg.unet.in_channels != 3:
            raise ConfigError(f"unet.in_channels: the sr stage works on RGB pixels (3), "
                              f"got {cfg.unet.in_channels}")
        self._setup(cfg, VideoUNet(cfg.unet), load_text_encoder(cfg, "unet", device))

    def to(self, device):
        self.text.to(device)
        return self

    # ------------------------------------------------------------------------- conditioning

    def upsample(self, video: torch.Tensor) -> torch.Tensor:
        """Low-res video (B, 3, T, H, W) -> bilinearly upsampled (B, 3, T, sH, sW)."""
        from cascade.models.unet import upsample_video
        return upsample_video(video, self.cfg.sr.scale)

    def lowres(self, video: torch.Tensor) -> torch.Tensor:
        """High-res video (B, 3, T, H, W) -> its low-res version upsampled back to H x W."""
        s = self.cfg.sr
        return self.upsample(downsample_video(video, s.scale, s.downsample))

    def to_target(self, x: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """What is diffused: x, or with sr.residual (x - up) * sr.residual_scale."""
        s = self.cfg.sr
        return (x - up) * s.residual_scale if s.residual else x

    def from_target(self, y: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """`to_target` undone: a sample of the diffused signal -> the video."""
        s = self.cfg.sr
        return up + y / s.residual_scale if s.residual else y

    # ------------------------------------------------------------------------- training

    @torch.no_grad()
    def prepare(self, batch, gens, device) -> dict:
        x0 = batch["video"].to(device)                                    # (B, 3, T, H, W)
        cond = text_condition(self.text, batch["caption"], gens, self.cfg.diffusion.cond_drop, device)
        t = self.diffusion.draw_t(gens, device=device)                    # (B,)
        noise = gens.randn(x0.shape).to(device)
        aug_t = gens.rand().to(device) * self.cfg.sr.aug_max              # (B,) ~ U(0, aug_max)
        up = self.lowres(x0)
        lowres, _ = self.diffusion.noise_augment(up, aug_t, gens)         # each row its own noise
        return {"x0": self.to_target(x0, up), "t": t, "noise": noise, **cond, "lowres": lowres,
                "aug_t": aug_t}

    # ------------------------------------------------------------------------- sampling

    def sample(self, video: torch.Tensor, cond: dict, uncond: dict, sampling, generator,
               progress: bool, known: tuple | None = None) -> torch.Tensor:
        """Video (B, 3, T, H, W) -> (B, 3, T, sH, sW) in [-1, 1]: upsampled (`upsample`),
        noise-augmented to sr.aug_sample (aug_t given to the net; the unconditional branch nulls
        only the text), and sampled in overlapping temporal windows of sr.window frames
        (sr.overlap shared, cross-faded by `windowed`); each frame's noise from its own stream
        (seeded per video from `generator`), the upsampling and augmentation made per window.

        known: (frames (B, 3, T, sH, sW), mask (B, T)): full-resolution frames a frame prompt
        gives (cascade/conditions.py). The sampler keeps them on its path (`keep_known`, so the
        frames beside them are made seeing them) and they are the output's frames there."""
        from cascade.models.unet import windowed
        from cascade.seeding import stream_seed
        s = self.cfg.sr
        B, _, T, H, W = video.shape
        shape = (6, H * s.scale, W * s.scale)      # a frame's augmentation (0-2) and sampling noise
        # every frame's noise comes from its own stream, seeded once per video from `generator`:
        # a frame two windows share sees the same noise in both, and nothing the length of the
        # video is held but the output (memory stays flat as videos grow)
        draw = getattr(generator, "gens", None) or [generator] * B
        seeds = [int(torch.randint(2 ** 62, (1,), generator=g)) for g in draw]
        level = torch.full((B,), float(s.aug_sample), device=video.device)

        def clip(frames, start):                                           # (B, 1, Tw, 1, 1) placeholder
            Tw = frames.shape[2]
            noise = torch.stack([torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(
                stream_seed(seed, start + t))) for t in range(Tw)], 1) for seed in seeds]).to(video)
            up = self.upsample(video[:, :, start:start + Tw])              # (B, 3, Tw, sH, sW)
            alpha, sigma = self.diffusion._alpha_sigma(level, up)
            low = up if s.aug_sample == 0 else alpha * up + sigma * noise[:, :3]   # noise_augment
            extra = {"lowres": low, "aug_t": level}
            keep = None
            if known is not None:                  # the given frames' target, and their mask
                m = known[1][:, start:start + Tw].to(up)[:, None, :, None, None]
                keep = (self.to_target(known[0][:, :, start:start + Tw].to(up), up), m)
            y = self.denoise(noise[:, 3:].contiguous(), {**cond, **extra}, {**uncond, **extra},
                             sampling, generator, progress, known=keep)
            return self.from_target(y, up)

        out = windowed(clip, video.new_zeros(B, 1, T, 1, 1), s.window, s.overlap, with_start=True)
        out.clamp_(-1, 1)
        if known is not None:                      # the given frames themselves
            for b, t in known[1].bool().nonzero().tolist():
                out[b, :, t] = known[0][b, :, t].to(out)
        return out
