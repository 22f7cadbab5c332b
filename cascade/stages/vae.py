"""The vae stage: a causal 3D KL autoencoder (LDM; temporally aware decoder, Video LDM), trained
with L1 + LPIPS + KL; at sampling it decodes the latent frames to pixels."""
from __future__ import annotations

from pathlib import Path

import torch

from cascade.config import StageConfig
from cascade.stages.common import load_network


def load_vae(folder: str | Path, device="cpu"):
    """A frozen, eval-mode VideoVAE from its export folder -> (VideoVAE, StageConfig)."""
    return load_network(folder, "vae", device)


class VAEStage:
    """Causal 3D KL autoencoder trained with L1 + LPIPS + KL (LDM)."""

    name = "vae"

    def __init__(self, cfg: StageConfig):
        from cascade.losses import VAELoss
        from cascade.models.vae import VideoVAE
        self.cfg = cfg
        self.net = VideoVAE(cfg.vae)
        self.loss_fn = VAELoss(cfg.vae)

    @classmethod
    def from_export(cls, folder: str | Path, device="cpu") -> "VAEStage":
        """The stage for sampling: the exported VAE, frozen (no loss, no LPIPS network)."""
        stage = cls.__new__(cls)
        stage.net, stage.cfg = load_vae(folder, device)
        return stage

    def to(self, device):
        self.loss_fn.to(device)
        return self

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent frames (B, Cz, T', h, w) -> pixel frames (B, 3, 1 + s(T'-1), H, W) in [-1, 1]."""
        return self.net.decode_latents(z).clamp(-1, 1)

    def prepare(self, batch, gens, device) -> dict:
        video = batch["video"].to(device)                                    # (B, 3, T, H, W)
        zshape = self.net.latent_shape(*video.shape[2:])                     # (Cz, T', h, w)
        return {"video": video, "noise": gens.randn((len(gens), *zshape)).to(device)}

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
