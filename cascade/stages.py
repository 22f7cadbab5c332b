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
from safetensors.torch import load_file

from cascade.config import ConfigError, StageConfig, load_config


def sample_generators(seed: int, indices: list[int]) -> list[torch.Generator]:
    """One CPU generator per sample, seeded by (seed, global sample index)."""
    return [torch.Generator().manual_seed(seed * 1_000_003 + 7919 * i + 1) for i in indices]


def per_sample_randn(gens, shape) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=g) for g in gens])    # (B, *shape)


def per_sample_rand(gens) -> torch.Tensor:
    return torch.cat([torch.rand(1, generator=g) for g in gens])           # (B,)


def load_export(folder: str | Path, expect_stage: str | None = None):
    """An exported stage folder (config.yaml + model.safetensors) -> (StageConfig, state dict)."""
    folder = Path(folder)
    cfg_path, weights = folder / "config.yaml", folder / "model.safetensors"
    for p in (cfg_path, weights):
        if not p.is_file():
            raise FileNotFoundError(f"missing checkpoint file: {p}")
    cfg = load_config(cfg_path)
    if expect_stage and cfg.stage != expect_stage:
        raise ConfigError(f"{folder}: holds a '{cfg.stage}' stage, expected '{expect_stage}'")
    return cfg, load_file(str(weights))


def load_vae(folder: str | Path, device="cpu"):
    """A frozen, eval-mode VideoVAE from its export folder."""
    from cascade.models.vae import VideoVAE
    cfg, state = load_export(folder, "vae")
    vae = VideoVAE(cfg.vae)
    vae.load_state_dict(state)
    return vae.eval().requires_grad_(False).to(device), cfg


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


class BaseStage:
    """Keyframe DiT on VAE latents, text-conditioned, trained with the shared diffusion loss."""

    def __init__(self, cfg: StageConfig, device="cpu"):
        from cascade.diffusion import Diffusion
        from cascade.models.dit import VideoDiT
        from cascade.text import TextEncoder
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
        self.text = TextEncoder.from_config(cfg.text).to(device)
        if self.text.dim != cfg.dit.text_dim:
            raise ConfigError(f"dit.text_dim: {cfg.dit.text_dim} does not match the text encoder's "
                              f"width {self.text.dim}")
        self.diffusion = Diffusion(cfg.diffusion)
        self.net = VideoDiT(cfg.dit)

    def to(self, device):
        self.vae.to(device)
        self.text.to(device)
        return self

    @torch.no_grad()
    def prepare(self, batch, gens, device) -> dict:
        x0 = self.vae.encode_latents(batch["video"].to(device))               # (B, Cz, T', h, w)
        cond = self.text(batch["caption"])
        null = self.text.null(len(gens))
        drop = (per_sample_rand(gens) < self.cfg.diffusion.cond_drop).to(device)  # CFG dropout
        for k in cond:
            m = drop.view(-1, *([1] * (cond[k].dim() - 1)))
            cond[k] = torch.where(m, null[k].to(cond[k].dtype), cond[k])
        t = per_sample_rand(gens).to(device)
        noise = per_sample_randn(gens, x0.shape[1:]).to(device)
        return {"x0": x0, "t": t, "noise": noise, **cond}

    def loss(self, net, inputs):
        cond = {k: inputs[k] for k in ("text", "text_mask", "pooled")}
        loss = self.diffusion.loss(net, inputs["x0"], cond, t=inputs["t"], noise=inputs["noise"])
        return loss, {"mse": loss.detach()}


STAGE_CLASSES = {"vae": VAEStage, "base": BaseStage}


def build_stage(cfg: StageConfig, device="cpu"):
    if cfg.stage == "base":
        return BaseStage(cfg, device)
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
