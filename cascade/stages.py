"""What each trainable stage of the cascade is: its network, its frozen helpers, and its loss.

A stage turns a data batch into tensors (`prepare`, no gradients: frozen encoders, noise draws) and
those tensors into a loss (`loss`, the only part DeepSpeed differentiates). All randomness of a
sample is drawn from a generator seeded by (seed, global sample index), so a sample's noise is the
same whatever the number of processes: 1 process on a batch of 8 and 2 processes on 4 each see the
same noise and give the same loss curve.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from cascade.config import ConfigError, StageConfig, interp_frames_error, load_config


def sample_generators(seed: int, indices: list[int]) -> list[torch.Generator]:
    """One CPU generator per sample, seeded by (seed, global sample index)."""
    return [torch.Generator().manual_seed(seed * 1_000_003 + 7919 * i + 1) for i in indices]


def per_sample_randn(gens, shape) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=g) for g in gens])    # (B, *shape)


def per_sample_rand(gens) -> torch.Tensor:
    return torch.cat([torch.rand(1, generator=g) for g in gens])           # (B,)


def text_condition(text, captions: list[str], gens, cond_drop: float, device,
                   cond: dict | None = None) -> dict:
    """Frozen text encoding with classifier-free-guidance dropout (Ho & Salimans 2022, Alg. 1):
    each sample's {text, text_mask, pooled} is replaced by the null condition with probability
    cond_drop, decided by one uniform draw from the sample's generator. `cond`: the encodings
    already made (a cascade cache batch), used instead of running the encoder."""
    cond = text(captions) if cond is None else {k: v.to(device) for k, v in cond.items()}
    null = text.null(len(gens))
    drop = (per_sample_rand(gens) < cond_drop).to(device)                   # (B,)
    for k in cond:
        m = drop.view(-1, *([1] * (cond[k].dim() - 1)))
        cond[k] = torch.where(m, null[k].to(cond[k].dtype), cond[k])
    return cond


def noise_augment_per_sample(diffusion, x, t_aug, gens) -> torch.Tensor:
    """Diffusion.noise_augment with each sample's noise from its own generator (so a sample's
    augmentation does not depend on the batch it is in). x (B, ...), t_aug (B,) -> (B, ...)."""
    return torch.cat([diffusion.noise_augment(x[i:i + 1], t_aug[i:i + 1], g)[0]
                      for i, g in enumerate(gens)])


def stage_network(cfg: StageConfig) -> nn.Module:
    """The network a stage's config describes (untrained): VideoVAE, VideoDiT or VideoUNet."""
    if cfg.stage == "vae":
        from cascade.models.vae import VideoVAE
        return VideoVAE(cfg.vae)
    if cfg.stage == "sr":
        from cascade.models.unet import VideoUNet
        return VideoUNet(cfg.unet)
    from cascade.models.dit import VideoDiT
    return VideoDiT(cfg.dit)


def state_mismatch(want: dict, have: dict) -> str | None:
    """One line on how the tensors `have` differ from the shapes `want` ({name: tensor}), or
    None when the names and shapes agree: the first difference and how many more there are."""
    problems = []
    for k, v in want.items():
        if k not in have:
            problems.append(f"'{k}' is missing")
        elif tuple(have[k].shape) != tuple(v.shape):
            problems.append(f"'{k}' is {tuple(have[k].shape)}, the config makes {tuple(v.shape)}")
    problems += [f"'{k}' is not in the config's network" for k in have if k not in want]
    if not problems:
        return None
    more = f" (and {len(problems) - 1} more difference(s))" if len(problems) > 1 else ""
    return problems[0] + more


def read_safetensors(path: str | Path) -> dict:
    """A safetensors file -> {name: tensor}; a truncated or foreign file is a one-line
    ValueError naming it."""
    try:
        return load_file(str(path))
    except Exception as e:                              # safetensors' SafetensorError, OSError, ...
        if isinstance(e, FileNotFoundError):
            raise
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{path}: not a readable safetensors file ({msg}); it may be truncated "
                         f"or damaged: export it again") from None


def load_export(folder: str | Path, expect_stage: str | None = None):
    """An exported stage folder (config.yaml + model.safetensors) -> (StageConfig, state dict).

    Its files are first checked against the SHA-256s of its SHA256SUMS when it has one
    (cascade/checksums.py; exports before checksums load unchecked), so a changed or half-copied
    file is one line naming it. The weights are then checked against the network the config
    describes (built on the meta device, no memory), so a config that does not match its weights
    is one line naming the first tensor that differs, not a page of load_state_dict errors."""
    from cascade.checksums import verify_checksums
    folder = Path(folder)
    cfg_path, weights = folder / "config.yaml", folder / "model.safetensors"
    for p in (cfg_path, weights):
        if not p.is_file():
            raise FileNotFoundError(f"missing checkpoint file: {p}")
    verify_checksums(folder)
    cfg = load_config(cfg_path)
    if expect_stage and cfg.stage != expect_stage:
        raise ConfigError(f"{folder}: holds a '{cfg.stage}' stage, expected '{expect_stage}'")
    state = read_safetensors(weights)
    with torch.device("meta"):
        want = stage_network(cfg).state_dict()
    diff = state_mismatch(want, state)
    if diff:
        raise ConfigError(f"{cfg_path} does not match {weights.name}: {diff}")
    return cfg, state


def load_vae(folder: str | Path, device="cpu"):
    """A frozen, eval-mode VideoVAE from its export folder."""
    from cascade.models.vae import VideoVAE
    cfg, state = load_export(folder, "vae")
    vae = VideoVAE(cfg.vae)
    vae.load_state_dict(state)
    return vae.eval().requires_grad_(False).to(device), cfg


def load_text_encoder(cfg: StageConfig, net: str, device):
    """The stage's frozen text encoder, checked against the width its network (`net`: dit | unet)
    was configured for."""
    from cascade.text import TextEncoder
    text = TextEncoder.from_config(cfg.text).to(device)
    want = getattr(cfg, net).text_dim
    if text.dim != want:
        raise ConfigError(f"{net}.text_dim: {want} does not match the text encoder's width {text.dim}")
    return text


class VAEStage:
    """Causal 3D KL autoencoder trained with L1 + LPIPS + KL (LDM)."""

    def __init__(self, cfg: StageConfig):
        from cascade.losses import VAELoss
        from cascade.models.vae import VideoVAE
        self.cfg = cfg
        self.net = VideoVAE(cfg.vae)
        self.loss_fn = VAELoss(cfg.vae)

    def to(self, device):
        self.loss_fn.to(device)
        return self

    def prepare(self, batch, gens, device) -> dict:
        video = batch["video"].to(device)                                    # (B, 3, T, H, W)
        zshape = self.net.latent_shape(*video.shape[2:])                     # (Cz, T', h, w)
        return {"video": video, "noise": per_sample_randn(gens, zshape).to(device)}

    def loss(self, net, inputs):
        post = net.encode(inputs["video"])
        z = post.mean + post.std * inputs["noise"]                           # reparameterised sample
        recon = net.decode(z)
        return self.loss_fn(inputs["video"], recon, post)

    @torch.no_grad()
    def finalize(self, state: dict, clips: int = 32) -> tuple[dict, dict]:
        """Before export: set the latent scale to 1/std of the latents (LDM Sec. 4.3.2) and measure
        held-out reconstruction PSNR, both on `clips` clips of the validation split."""
        from cascade.data import build_dataset
        from cascade.models.vae import VideoVAE
        vae = VideoVAE(self.cfg.vae)
        vae.load_state_dict(state)
        vae.eval()
        data = build_dataset(self.cfg.data, split="val")
        videos = torch.stack([data[i]["video"] for i in range(clips)])       # (N, 3, T, H, W)
        scale = vae.calibrate_scale(videos.split(8))
        return vae.state_dict(), {**vae_heldout_metrics(vae, videos), "latent_scale": scale}


@torch.no_grad()
def vae_heldout_metrics(vae, videos: torch.Tensor) -> dict:
    """Reconstruction (posterior mode) of held-out clips (N, 3, T, H, W): mean PSNR in dB and the
    temporal error (flicker, 8-bit levels; cascade.losses.temporal_error)."""
    from cascade.losses import psnr, temporal_error
    recon = torch.cat([vae(v, sample=False)[0] for v in videos.split(8)])
    out = {"heldout_psnr_db": psnr(videos, recon).mean().item()}
    if videos.shape[2] > 1:
        out["heldout_temporal_error"] = temporal_error(videos, recon).mean().item()
    return out


CACHED_TEXT = ("text", "text_mask", "pooled")     # a cascade cache batch's text encodings


class BaseStage:
    """Keyframe DiT on VAE latents, text-conditioned, trained with the shared diffusion loss."""

    def __init__(self, cfg: StageConfig, device="cpu"):
        from cascade.diffusion import Diffusion
        from cascade.models.dit import VideoDiT
        self.cfg = cfg
        if not cfg.train.vae_dir:
            raise ConfigError("train.vae_dir: the base stage needs the folder of a trained VAE export")
        self.vae, _ = load_vae(cfg.train.vae_dir, device)
        d = cfg.data
        expect = tuple(self.vae.latent_shape(d.frames, d.height, d.width))  # (Cz, T', h, w)
        got = (cfg.dit.in_channels, cfg.dit.frames, cfg.dit.height, cfg.dit.width)
        if got != expect:
            raise ConfigError(f"dit: (in_channels, frames, height, width) = {got} does not match the "
                              f"VAE latent of {d.frames}x{d.height}x{d.width} clips, {expect}")
        if cfg.train.pack_tokens:                  # every bucket's clip must fit one row
            for i, b in enumerate(cfg.data.buckets or [[d.frames, d.height, d.width]]):
                _, T, h, w = self.vae.latent_shape(*b)
                n = (T // cfg.dit.patch_t) * (h // cfg.dit.patch_h) * (w // cfg.dit.patch_w)
                if n > cfg.train.pack_tokens:
                    raise ConfigError(f"train.pack_tokens: a {'x'.join(map(str, b))} clip makes {n} "
                                      f"tokens, more than a row of {cfg.train.pack_tokens}")
        sp = cfg.train.sequence_parallel
        for b in cfg.data.buckets if sp > 1 else []:   # Ulysses shards each bucket's token frames
            Tp = self.vae.latent_shape(*b)[1] // cfg.dit.patch_t
            if Tp % sp:
                raise ConfigError(f"train.sequence_parallel: a {'x'.join(map(str, b))} bucket makes "
                                  f"{Tp} latent token frames, not divisible by {sp}")
        self.text = load_text_encoder(cfg, "dit", device)
        self.diffusion = Diffusion(cfg.diffusion)
        self.net = VideoDiT(cfg.dit)

    def to(self, device):
        self.vae.to(device)
        self.text.to(device)
        return self

    @torch.no_grad()
    def prepare(self, batch, gens, device) -> dict:
        """A batch of clips, or of their cached encodings (cascade cache: latent_mean, text, ...;
        the encoders are skipped and the inputs are the same as encoding the clips here)."""
        cached = "latent_mean" in batch
        packed = self.cfg.train.pack_tokens > 0 and not cached    # NaViT: a list of clips of any shapes
        if cached:                                 # the posterior's mode, scaled (encode_latents)
            x0 = batch["latent_mean"].to(device) * self.vae.scaling_factor    # (B, Cz, T', h, w)
        elif packed:                               # each clip encoded at its own shape
            x0 = [self.vae.encode_latents(v[None].to(device))[0] for v in batch["video"]]
        else:
            x0 = self.vae.encode_latents(batch["video"].to(device))           # (B, Cz, T', h, w)
        cond = text_condition(self.text, batch["caption"], gens, self.cfg.diffusion.cond_drop, device,
                              {k: batch[k] for k in CACHED_TEXT} if cached else None)
        t = per_sample_rand(gens).to(device)
        if packed:                                 # the same draws as per_sample_randn, per clip
            noise = [torch.randn(x.shape, generator=g).to(device) for x, g in zip(x0, gens)]
        else:
            noise = per_sample_randn(gens, x0.shape[1:]).to(device)
        return {"x0": x0, "t": t, "noise": noise, **cond}

    def loss(self, net, inputs):
        cond = {k: inputs[k] for k in ("text", "text_mask", "pooled")}
        if isinstance(inputs["x0"], list):         # packed (train.pack_tokens)
            loss = self.diffusion.packed_loss(net, inputs["x0"], cond, inputs["t"], inputs["noise"],
                                              self.cfg.train.pack_tokens)
        else:
            loss = self.diffusion.loss(net, inputs["x0"], cond, t=inputs["t"], noise=inputs["noise"])
        return loss, {"mse": loss.detach()}


# ----------------------------------------------------------------------------- interp

def keyframe_count(frames: int, rate: int) -> int:
    """K for an interpolation target of N = (K-1)*rate + 1 frames; ValueError for any other N
    (interp cannot reach it: there would be frames after the last keyframe)."""
    err = interp_frames_error(frames, rate)
    if err:
        raise ValueError(f"interp: {err}")
    return (frames - 1) // rate + 1


def interp_condition(keyframes: torch.Tensor, rate: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Video LDM's interpolation input (Blattmann et al. 2023, Sec. 3.1.2): K keyframe latents
    placed at frames 0, r, ..., (K-1)r of an N = (K-1)*r + 1 frame clip, zeros elsewhere, and the
    0/1 mask of those slots. Used by training (keyframes cut from a clip) and by sampling (the
    base stage's keyframes).

    keyframes (B, C, K, h, w), K >= 2 -> frames (B, C, N, h, w), mask (B, 1, N, h, w)."""
    if keyframes.dim() != 5:
        raise ValueError(f"interp_condition: keyframes must be (B, C, K, h, w), got {tuple(keyframes.shape)}")
    B, C, K, h, w = keyframes.shape
    if rate < 1 or K < 2:
        raise ValueError(f"interp_condition: needs K >= 2 keyframes and rate >= 1, got K={K}, rate={rate}")
    N = (K - 1) * rate + 1
    frames = keyframes.new_zeros(B, C, N, h, w)
    frames[:, :, ::rate] = keyframes
    mask = keyframes.new_zeros(B, 1, N, h, w)
    mask[:, :, ::rate] = 1
    return frames, mask                                                   # (B, C, N, h, w), (B, 1, N, h, w)


def keyframe_lerp(keyframes: torch.Tensor, rate: int) -> torch.Tensor:
    """Keyframes (B, C, K, h, w) linearly interpolated in time to N = (K-1)*rate + 1 frames (exact
    at the slots 0, r, 2r, ...): the baseline interp must beat, and what interp.residual adds to."""
    B, C, K, h, w = keyframes.shape
    return F.interpolate(keyframes, size=((K - 1) * rate + 1, h, w), mode="trilinear",
                         align_corners=True)                               # (B, C, N, h, w)


class InterpStage(BaseStage):
    """Latent frame interpolation DiT (Video LDM Sec. 3.1.2; the DiT family of the base stage).

    From a clip of N = (K-1)*r + 1 latent frames the keyframes 0, r, ..., (K-1)r are noise-augmented
    to a per-sample level t_aug ~ U(0, interp.aug_max) (conditioning augmentation, so the stage is
    robust to the base stage's imperfect keyframes), placed at their slots with a 0/1 mask, and
    given to the network with t_aug (VideoDiT with cond_frames=True). Text is dropped for CFG as
    in the base stage; the keyframes never are.

    Loss: the shared diffusion loss on ALL N frames, keyframe slots included (not mask-weighted):
    at the slots the net learns to reproduce the clean keyframe from its augmented copy, which
    keeps one loss for every stage and lets sampling keep the network's own (denoised) keyframes.

    interp.residual: the diffused signal is (x - keyframe_lerp(clean keyframes)) * residual_scale,
    added back at sampling, as the SR stage's residual. With per-frame latents, linear
    interpolation is already close (tiny cascade: 30.9 dB against 31.2 for the VAE's own
    reconstruction), and a stage that diffuses x itself scored 30.5 dB, below it."""

    def __init__(self, cfg: StageConfig, device="cpu"):
        if not cfg.dit.cond_frames:
            raise ConfigError("dit.cond_frames: the interp stage needs dit.cond_frames=true")
        if not cfg.train.vae_dir:
            raise ConfigError("train.vae_dir: the interp stage needs the folder of a trained VAE export")
        super().__init__(cfg, device)                 # frozen VAE, latent-shape check, text, DiT
        self.keyframes = keyframe_count(cfg.dit.frames, cfg.interp.rate)

    @torch.no_grad()
    def prepare(self, batch, gens, device) -> dict:
        inputs = super().prepare(batch, gens, device)  # x0 (B, C, N, h, w), t, noise, text (CFG)
        r = self.cfg.interp.rate
        keys = inputs["x0"][:, :, ::r]                                    # (B, C, K, h, w)
        aug_t = per_sample_rand(gens).to(device) * self.cfg.interp.aug_max  # (B,) ~ U(0, aug_max)
        frames, mask = interp_condition(noise_augment_per_sample(self.diffusion, keys, aug_t, gens), r)
        i = self.cfg.interp
        if i.residual:
            inputs["x0"] = (inputs["x0"] - keyframe_lerp(keys, r)) * i.residual_scale
        return {**inputs, "frames": frames, "frame_mask": mask, "aug_t": aug_t}

    def loss(self, net, inputs):
        cond = {k: inputs[k] for k in ("text", "text_mask", "pooled", "frames", "frame_mask", "aug_t")}
        loss = self.diffusion.loss(net, inputs["x0"], cond, t=inputs["t"], noise=inputs["noise"])
        return loss, {"mse": loss.detach()}


# ----------------------------------------------------------------------------- sr

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


class SRStage:
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

    def __init__(self, cfg: StageConfig, device="cpu"):
        from cascade.diffusion import Diffusion
        from cascade.models.unet import VideoUNet
        self.cfg = cfg
        if cfg.unet.in_channels != 3:
            raise ConfigError(f"unet.in_channels: the sr stage works on RGB pixels (3), "
                              f"got {cfg.unet.in_channels}")
        self.text = load_text_encoder(cfg, "unet", device)
        self.diffusion = Diffusion(cfg.diffusion)
        self.net = VideoUNet(cfg.unet)

    def to(self, device):
        self.text.to(device)
        return self

    def lowres(self, video: torch.Tensor) -> torch.Tensor:
        """High-res video (B, 3, T, H, W) -> its low-res version upsampled back to H x W."""
        from cascade.models.unet import upsample_video
        s = self.cfg.sr
        return upsample_video(downsample_video(video, s.scale, s.downsample), s.scale)

    @torch.no_grad()
    def prepare(self, batch, gens, device) -> dict:
        x0 = batch["video"].to(device)                                    # (B, 3, T, H, W)
        cond = text_condition(self.text, batch["caption"], gens, self.cfg.diffusion.cond_drop, device)
        t = per_sample_rand(gens).to(device)
        noise = per_sample_randn(gens, x0.shape[1:]).to(device)
        aug_t = per_sample_rand(gens).to(device) * self.cfg.sr.aug_max     # (B,) ~ U(0, aug_max)
        up = self.lowres(x0)
        lowres = noise_augment_per_sample(self.diffusion, up, aug_t, gens)
        s = self.cfg.sr
        target = (x0 - up) * s.residual_scale if s.residual else x0       # what is diffused
        return {"x0": target, "t": t, "noise": noise, **cond, "lowres": lowres, "aug_t": aug_t}

    def loss(self, net, inputs):
        cond = {k: inputs[k] for k in ("text", "text_mask", "pooled", "lowres", "aug_t")}
        loss = self.diffusion.loss(net, inputs["x0"], cond, t=inputs["t"], noise=inputs["noise"])
        return loss, {"mse": loss.detach()}


STAGE_CLASSES = {"vae": VAEStage, "base": BaseStage, "interp": InterpStage, "sr": SRStage}


def build_stage(cfg: StageConfig, device="cpu"):
    if cfg.stage in ("base", "interp", "sr"):
        return STAGE_CLASSES[cfg.stage](cfg, device)
    return STAGE_CLASSES[cfg.stage](cfg).to(device)


class StageLoss(nn.Module):
    """The module DeepSpeed wraps: only the trainable network is registered (frozen helpers are
    kept outside, so checkpoints hold nothing but the network)."""

    def __init__(self, stage):
        super().__init__()
        self.net = stage.net
        self._stage = [stage]

    def forward(self, inputs):
        return self._stage[0].loss(self.net, inputs)
