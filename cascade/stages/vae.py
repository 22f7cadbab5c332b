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

    DECODE_WINDOW, DECODE_HALO = 16, 16     # latent frames per decode call, and context before each

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent frames (B, Cz, T', h, w) -> pixel frames (B, 3, 1 + s(T'-1), H, W) in [-1, 1].

        A long video (T' > DECODE_WINDOW + DECODE_HALO, no temporal compression) is decoded in windows of
        DECODE_WINDOW frames, each with the DECODE_HALO frames before it as context (the decoder
        is causal: a frame sees only earlier ones), so memory stays flat as videos grow. Measured
        on the tiny VAE: a change to one latent frame moves the decoded frame 16 frames later by
        4e-3 and 20 later by 3e-4 (in [-1, 1]): the halo's cut is below one 8-bit level."""
        T = z.shape[2]
        if T <= self.DECODE_WINDOW + self.DECODE_HALO or self.net.temporal_factor != 1:
            return self.net.decode_latents(z).clamp(-1, 1)
        parts = []
        for a in range(0, T, self.DECODE_WINDOW):
            lo = max(0, a - self.DECODE_HALO)
            out = self.net.decode_latents(z[:, :, lo:a + self.DECODE_WINDOW])
            parts.append(out[:, :, a - lo:].clamp(-1, 1))
        return torch.cat(parts, 2)

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Pixel frames (B, 3, T, H, W) in [-1, 1] -> scaled latents (the posterior's mode), as
        the latent stages were trained on."""
        return self.net.encode_latents(video)

    def prepare(self, batch, gens, device) -> dict:
        video = batch["video"].to(device)                                    # (B, 3, T, H, W)
        zshape = self.net.latent_shape(*video.shape[2:])                     # (Cz, T', h, w)
        seed = int(gens.rand()[0] * 2 ** 31)                                 # a quantizer's restarts
        return {"video": video, "noise": gens.randn((len(gens), *zshape)).to(device),
                "seed": torch.tensor(seed)}

    def loss(self, net, inputs):
        post = net.encode(inputs["video"], int(inputs["seed"]))
        z = post.reparameterise(inputs["noise"])                             # KL: a sample; vq/fsq: the codes
        recon = net.decode(z)
        return self.loss_fn(inputs["video"], recon, post)

    @torch.no_grad()
    def finalize(self, state: dict, clips: int = 32) -> tuple[dict, dict]:
        """Before export: set the latent scale to 1/std of the latents (LDM Sec. 4.3.2) and measure
        held-out reconstruction PSNR, both on `clips` clips of the validation split. A decoder-only
        fine-tune keeps the scale it started from: its encoder, and so the latents the later stages
        were trained on, are unchanged (recalibrated on another data seed's clips it would move by
        the sampling noise of 32 clips, 0.7% measured, and shift every stage's latents)."""
        from cascade.data import build_dataset
        from cascade.models.vae import VideoVAE
        vae = VideoVAE(self.cfg.vae)
        vae.load_state_dict(state)
        vae.eval()
        data = build_dataset(self.cfg.data, split="val")
        videos = torch.stack([data[i]["video"] for i in range(min(clips, len(data)))])  # (N, 3, T, H, W)
        scale = vae.latent_scale if self.cfg.vae.decoder_only else vae.calibrate_scale(videos.split(8))
        metrics = {**vae_heldout_metrics(vae, videos), "latent_scale": scale}
        if vae.quantizer is not None:                  # codebook collapse is named, not silent
            h = torch.cat([vae.encoder(v) for v in videos.split(8)])
            usage = vae.quantizer.usage(h)
            metrics.update(heldout_code_usage=usage["code_usage"], heldout_perplexity=usage["perplexity"])
            if usage["code_usage"] < self.cfg.vae.min_code_usage:
                print(f"warning: codebook collapse: the held-out clips use {usage['code_usage']:.1%} "
                      f"of the {self.cfg.vae.bottleneck} codes (below vae.min_code_usage="
                      f"{self.cfg.vae.min_code_usage:.0%}; perplexity {usage['perplexity']:.1f})")
        return vae.state_dict(), metrics


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
