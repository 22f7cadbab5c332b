"""Discrete bottlenecks of the video autoencoder (vae.bottleneck: vq | fsq), beside LDM's KL.

VQ (van den Oord et al. 2017, "Neural Discrete Representation Learning"): each latent vector is
replaced by its nearest codebook entry, the decoder's gradient passes straight through to the
encoder, a commitment loss (weight vae.commitment) pulls the encoder towards its codes, and the
codebook follows its assigned vectors by exponential moving averages (Sec. 3.1 / App. A.1 of the
paper; decay vae.codebook_decay) with codes unused for a while restarted from the batch (the
common "dead code" practice, threshold vae.dead_code_threshold). FSQ (Mentzer et al. 2023,
"Finite Scalar Quantization"): each latent channel is bounded and rounded to one of L levels
(vae.fsq_levels, one per channel), straight-through; no codebook to learn, so none collapses.

Both come from vector-quantize-pytorch (lucidrains), the implementation most video tokenizer
work builds on: it has the EMA updates, dead-code restarts and distributed codebook sync we would
otherwise rewrite. Its dead-code restarts draw from torch's global generator: `Quantizer.forward`
takes a seed so a resumed run draws the same restarts (cascade/stages/vae.py passes one per step).

The latent the base and interp stages diffuse is the quantized code vector (continuous values),
so they train on it unchanged. Codebook usage (the share of codes a batch uses) and perplexity
(exp of the code histogram's entropy) are logged each step; `Quantizer.usage` measures them on
held-out clips at export, where a share below vae.min_code_usage warns of a collapsed codebook.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn


class Quantized:
    """A quantizer's output in the posterior's interface (`DiagonalGaussian`): mode() and sample()
    are the code vectors (B, Cz, T', h, w); aux_loss the commitment loss (0 for FSQ); kl() zeros."""

    def __init__(self, z: torch.Tensor, indices: torch.Tensor, aux_loss: torch.Tensor, codes: int):
        self.mean, self.indices, self.aux_loss, self.codes = z, indices, aux_loss, codes
        self.std = torch.zeros_like(z)                       # a code is exact (cascade cache: std 0)

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator=None) -> torch.Tensor:
        return self.mean

    def reparameterise(self, noise=None) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        return self.mean.new_zeros(self.mean.shape[0])

    def stats(self) -> dict:
        """usage: share of the codebook this batch used; perplexity: exp(entropy) of its codes."""
        counts = torch.bincount(self.indices.flatten(), minlength=self.codes).float()
        p = counts / counts.sum()
        entropy = -(p[p > 0] * p[p > 0].log()).sum()
        return {"code_usage": (counts > 0).float().mean().detach(), "perplexity": entropy.exp().detach()}


class Quantizer(nn.Module):
    """vae.bottleneck vq or fsq over Cz-channel latents: forward((B, Cz, T', h, w), seed) -> Quantized."""

    def __init__(self, cfg):
        super().__init__()
        from vector_quantize_pytorch import FSQ, VectorQuantize
        self.kind, c = cfg.bottleneck, cfg.latent_channels
        if self.kind == "vq":
            self.q = VectorQuantize(dim=c, codebook_size=cfg.codebook_size, decay=cfg.codebook_decay,
                                    commitment_weight=cfg.commitment,
                                    threshold_ema_dead_code=cfg.dead_code_threshold)
            self.codes = cfg.codebook_size
        else:
            levels = list(cfg.fsq_levels) or [5] * c
            if len(levels) != c:
                raise ValueError(f"vae.fsq_levels: needs one level count per latent channel "
                                 f"({c}), got {len(levels)}")
            self.q = FSQ(levels=levels)
            self.codes = math.prod(levels)

    def forward(self, h: torch.Tensor, seed: int | None = None) -> Quantized:
        B, C = h.shape[:2]
        flat = h.flatten(2).transpose(1, 2)                                  # (B, N, Cz)
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            out = self.q(flat.float())
        if self.kind == "vq":
            z, idx, loss = out
        else:
            (z, idx), loss = out, h.new_zeros(())
        z = z.transpose(1, 2).reshape(h.shape).to(h.dtype)                   # (B, Cz, T', h, w)
        return Quantized(z, idx, loss, self.codes)

    @torch.no_grad()
    def usage(self, latents: torch.Tensor) -> dict:
        """Code usage on pre-quantizer latents (B, Cz, ...) of held-out clips (eval mode: no
        codebook update): share of the codebook used (VQ), or the mean share of each channel's
        levels used (FSQ, whose codebook is the product of the levels), and perplexity."""
        was = self.training
        self.eval()
        q = self(latents)
        self.train(was)
        stats = {k: float(v) for k, v in q.stats().items()}
        if self.kind == "fsq":
            levels = self.q._levels.tolist()
            codes = q.mean.flatten(2)                                        # (B, Cz, N) in [-1, 1]
            stats["code_usage"] = sum(len(torch.unique(codes[:, i])) / n for i, n in enumerate(levels)) / len(levels)
        return stats
