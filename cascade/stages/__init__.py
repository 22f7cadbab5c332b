"""The cascade's stages, one class each, used by `cascade train` and by the Pipeline alike.

    vae.py     VAEStage     causal 3D KL autoencoder (LDM); decodes latents at sampling
    base.py    BaseStage    keyframe DiT on VAE latents: noise -> latent keyframes
    interp.py  InterpStage  Video LDM interpolation DiT: keyframes at their slots + mask -> frames
    sr.py      SRStage      Imagen Video SSR U-Net: upsampled, augmented low-res video -> high-res
    common.py  export loading, the text encoder and its CFG dropout, DiffusionStage (shared part)

A stage is built from a config for training (`build_stage(cfg)`: its network untrained, its frozen
helpers loaded) or from an export folder for sampling (`Stage.from_export(folder)`). Training:
`prepare(batch, gens, device)` turns a data batch into tensors (no gradients: frozen encoders,
noise draws from each sample's own generator, `seeding.sample_generators`) and `loss(net, inputs)`
those into a loss (the only part DeepSpeed differentiates, through `StageLoss`). Sampling:
`sample(...)` is the stage's step of the cascade; the conditioning it needs (interp's keyframe
slots, masks and augmentation; sr's upsampling and augmentation) is written once, in the class,
for both.
"""
from cascade.seeding import sample_generators
from cascade.stages.base import BaseStage
from cascade.stages.common import (CACHED_TEXT, DiffusionStage, StageLoss, load_export,
                                   load_network, load_text_encoder, read_safetensors,
                                   stage_network, state_mismatch, text_condition, text_key)
from cascade.stages.interp import (InterpStage, interp_condition, keyframe_count, keyframe_groups,
                                   keyframe_lerp)
from cascade.stages.sr import SRStage, downsample_video
from cascade.stages.vae import VAEStage, load_vae, vae_heldout_metrics

STAGE_CLASSES = {"vae": VAEStage, "base": BaseStage, "interp": InterpStage, "sr": SRStage}


def build_stage(cfg, device="cpu"):
    """The stage a config describes, for training (its network untrained, its helpers loaded)."""
    if cfg.stage in ("base", "interp", "sr"):
        return STAGE_CLASSES[cfg.stage](cfg, device)
    return STAGE_CLASSES[cfg.stage](cfg).to(device)


__all__ = ["BaseStage", "CACHED_TEXT", "DiffusionStage", "InterpStage", "SRStage", "STAGE_CLASSES",
           "StageLoss", "VAEStage", "build_stage", "downsample_video", "interp_condition",
           "keyframe_count", "keyframe_groups", "keyframe_lerp", "load_export", "load_network",
           "load_text_encoder", "load_vae", "read_safetensors", "sample_generators",
           "stage_network", "state_mismatch", "text_condition", "text_key", "vae_heldout_metrics"]
