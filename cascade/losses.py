"""Training loss of the video autoencoder, and PSNR for evaluating it.

LDM (Rombach et al. 2022, App. G; taming-transformers' LPIPSWithDiscriminator without the GAN),
plus an L2 reconstruction term (VQ-VAE's, van den Oord et al. 2017: a Gaussian decoder's -log p(x|z)):
    L = |x - D(z)|_1 + l2_weight |x - D(z)|^2 + lpips_weight LPIPS(x, D(z)) + kl_weight KL(q(z|x) || N(0, I)).
Why L2 too: with L1 alone the tiny VAE learned the flat-colour synthetic clips far more slowly
(measured on 32x32 images after 600 steps: 19.9 dB with L1, 25.6 dB with L1 + L2): L1's gradient has
the same size on the many almost-right background pixels as on the wrong edge pixels, L2 weights
the edges, and PSNR is an L2 measure.
Weights follow LDM's convention: kl_weight multiplies the KL summed over a sample's latent against a
reconstruction summed over its pixels. Here both are divided by the pixel count, so the logged L1 and
LPIPS are per-pixel / per-frame means and the logged KL is the per-sample sum.
LPIPS (Zhang et al. 2018) runs per frame with frames folded into the batch, on at most
`LPIPS_FRAMES` evenly spaced frames of each clip (the first included), frozen, VGG trunk as in LDM.
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.nn as nn

from cascade.config import VAEConfig

LPIPS_NET = "vgg"          # LDM's choice; 'alex' is cheaper
LPIPS_FRAMES = 4           # frames per clip that LPIPS sees
_TORCHVISION_FILES = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth"}


def build_lpips(pretrained: bool, net: str = LPIPS_NET) -> nn.Module:
    """Frozen lpips.LPIPS. pretrained: ImageNet trunk from the torch hub cache (never downloaded)
    plus the linear heads shipped inside the lpips package. Not pretrained: random trunk, the same
    packaged heads, no file outside the package read and no network access (pnet_rand=True)."""
    import lpips
    if pretrained:
        path = os.path.join(torch.hub.get_dir(), "checkpoints", _TORCHVISION_FILES[net])
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"LPIPS needs the pretrained {net} trunk at {path} (not found; nothing is "
                f"downloaded): copy it there, or train with vae.lpips_pretrained=false (random trunk) "
                f"or vae.lpips_weight=0")
    with warnings.catch_warnings():                  # torchvision's 'pretrained=' deprecation notes
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=not pretrained, verbose=False)
    return model.eval().requires_grad_(False)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of videos (or images) in [-1, 1], measured in [0, 1]: per sample, mean over all
    its pixels -> (B,). Identical samples give inf."""
    a01, b01 = (a.float().clamp(-1, 1) + 1) / 2, (b.float().clamp(-1, 1) + 1) / 2
    mse = (a01 - b01).pow(2).flatten(1).mean(1)                             # (B,)
    return 10 * torch.log10(1.0 / mse)


def temporal_error(x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Flicker of a reconstruction: mean |(r_t+1 - r_t) - (x_t+1 - x_t)| over consecutive frames,
    in 8-bit levels, per sample -> (B,). 0 when the reconstruction changes exactly as the video does
    (a constant error per frame costs nothing; an error that jumps between frames does). The
    quantity Video LDM's temporal decoder fine-tuning lowers (Blattmann et al. 2023, Sec. 3.1.1)."""
    dx, dr = x.float().diff(dim=2), recon.float().clamp(-1, 1).diff(dim=2)  # (B, 3, T-1, H, W)
    return (dr - dx).abs().flatten(1).mean(1) * 127.5


def _frames(video: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return video[:, :, idx].transpose(1, 2).flatten(0, 1)                   # (B*n, 3, H, W)


class VAELoss(nn.Module):
    """forward(video, recon, posterior) -> (loss, {"l1", "l2", "lpips", "kl"}) with detached logs."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.l2_weight, self.kl_weight, self.lpips_weight = cfg.l2_weight, cfg.kl_weight, cfg.lpips_weight
        self.lpips = build_lpips(cfg.lpips_pretrained) if cfg.lpips_weight > 0 else None

    def train(self, mode: bool = True):
        super().train(mode)
        if self.lpips is not None:
            self.lpips.eval()                                                # frozen, always eval
        return self

    def forward(self, video, recon, posterior):                             # (B, 3, T, H, W) x2
        err = recon - video                                                  # (B, 3, T, H, W)
        l1, l2 = err.abs().mean(), err.square().mean()
        kl = posterior.kl()                                                  # (B,); 0 for vq / fsq
        loss = l1 + self.l2_weight * l2 + self.kl_weight * kl.mean() / video[0].numel()
        extra = {}
        if hasattr(posterior, "aux_loss"):                                   # vq: commitment (fsq: 0)
            loss = loss + posterior.aux_loss
            extra = {"commit": posterior.aux_loss.detach(), **posterior.stats()}
        lp = torch.zeros((), device=video.device)
        if self.lpips is not None:
            T = video.shape[2]
            idx = torch.linspace(0, T - 1, min(T, LPIPS_FRAMES), device=video.device).round().long()
            lp = self.lpips(_frames(recon, idx), _frames(video, idx)).mean()
            loss = loss + self.lpips_weight * lp
        return loss, {"l1": l1.detach(), "l2": l2.detach(), "lpips": lp.detach(), "kl": kl.mean().detach(),
                      **extra}
