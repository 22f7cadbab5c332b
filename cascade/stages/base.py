"""The base stage: a keyframe DiT on VAE latents (DiT / Sora; Video LDM's keyframe model),
text-conditioned, trained with the shared diffusion loss; at sampling it draws the K latent
keyframes from noise."""
from __future__ import annotations

import torch

from cascade.config import ConfigError, StageConfig
from cascade.stages.common import CACHED_TEXT, DiffusionStage, load_text_encoder, text_condition
from cascade.stages.vae import load_vae


class BaseStage(DiffusionStage):
    """Keyframe DiT on VAE latents, text-conditioned, trained with the shared diffusion loss.

    Training (`BaseStage(cfg)`): the frozen VAE of train.vae_dir encodes the clips, the frozen text
    encoder their captions (dropped for CFG). Sampling (`from_export`): noise -> keyframe latents."""

    name, network = "base", "dit"

    def __init__(self, cfg: StageConfig, device="cpu"):
        from cascade.models.dit import VideoDiT
        if not cfg.train.vae_dir:
            raise ConfigError(f"train.vae_dir: the {cfg.stage} stage needs the folder of a trained "
                              f"VAE export")
        self.vae, _ = load_vae(cfg.train.vae_dir, device)
        self._check_latents(cfg)
        self._setup(cfg, VideoDiT(cfg.dit), load_text_encoder(cfg, "dit", device))

    def _check_latents(self, cfg: StageConfig) -> None:
        """The DiT's grid is the VAE latent of the data's clips; packed rows and sequence-parallel
        shards fit every bucket (one-line ConfigErrors naming the key)."""
        d = cfg.data
        expect = tuple(self.vae.latent_shape(d.frames, d.height, d.width))  # (Cz, T', h, w)
        got = (cfg.dit.in_channels, cfg.dit.frames, cfg.dit.height, cfg.dit.width)
        if got != expect:
            raise ConfigError(f"dit: (in_channels, frames, height, width) = {got} does not match the "
                              f"VAE latent of {d.frames}x{d.height}x{d.width} clips, {expect}")
        if cfg.train.pack_tokens:                  # every bucket's clip must fit one row
            for b in cfg.data.buckets or [[d.frames, d.height, d.width]]:
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

    def to(self, device):
        self.vae.to(device)
        self.text.to(device)
        return self

    # ------------------------------------------------------------------------- training

    @torch.no_grad()
    def prepare(self, batch, gens, device) -> dict:
        """A batch of clips, or of their cached encodings (cascade cache: latent_mean, text, ...;
        the encoders are skipped and the inputs are the same as encoding the clips here).
        gens: the batch's RowGenerators (`seeding.sample_generators`)."""
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
        t = self.diffusion.draw_t(gens, device=device)                    # (B,)
        if packed:                                 # the same draws as gens.randn, per clip
            noise = [torch.randn(x.shape, generator=g).to(device) for x, g in zip(x0, gens)]
        else:
            noise = gens.randn((len(gens), *x0.shape[1:])).to(device)
        return {"x0": x0, "t": t, "noise": noise, **cond}

    def loss(self, net, inputs):
        if isinstance(inputs["x0"], list):         # packed (train.pack_tokens)
            cond = {k: inputs[k] for k in CACHED_TEXT}
            loss = self.diffusion.packed_loss(net, inputs["x0"], cond, inputs["t"], inputs["noise"],
                                              self.cfg.train.pack_tokens)
            return loss, {"mse": loss.detach()}
        return super().loss(net, inputs)

    # ------------------------------------------------------------------------- sampling

    def sample(self, shape: tuple, cond: dict, uncond: dict, sampling, generator, progress: bool):
        """Latent keyframes (B, Cz, Kb, h, w) = shape from noise drawn from `generator` (each
        video's own stream, `seeding.RowGenerators`)."""
        from cascade.diffusion import _randn
        like = next(self.net.parameters())                                 # float32, the net's device
        noise = _randn(shape, like.new_empty(()), generator)
        return self.denoise(noise, cond, uncond, sampling, generator, progress)   # (B, Cz, Kb, h, w)
