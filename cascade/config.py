"""Typed configs for every stage of the cascade, read with OmegaConf (structured).

One `StageConfig` describes one trainable stage (vae, base, ...): its data, its network, its
diffusion core and its training loop. A YAML file in configs/ fills it; `key=value` overrides on
the command line change it. An unknown key or a bad value stops with a one-line error naming it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key and the problem."""


@dataclass
class DataConfig:
    kind: str = "synthetic"   # synthetic | folder
    frames: int = 8           # frames per clip (pixel space)
    height: int = 32
    width: int = 32
    fps: float = 8.0          # clips are sampled at this frame rate from real videos
    root: str = ""            # folder of videos (kind=folder)
    manifest: str = ""        # CSV or JSONL with columns path, caption (kind=folder)
    seed: int = 0             # the synthetic stream is deterministic by seed
    image_fraction: float = 0.0  # W.A.L.T joint training: share of 1-frame clips (0 = video only)


@dataclass
class TextConfig:
    encoder: str = "minilm"   # "minilm" (packaged default), a hub name (cached) or a local path
    max_length: int = 32      # tokens, padded / truncated
    dim: int = 384            # width of the token embeddings the encoder gives


@dataclass
class VAEConfig:
    """Causal 3D-conv KL autoencoder (LDM, with causal time as in MAGVIT-2 / Open-Sora)."""
    in_channels: int = 3
    channels: int = 32                             # width of the first level
    channel_mults: list[int] = field(default_factory=lambda: [1, 2, 2])  # one per level
    temporal_down: list[bool] = field(default_factory=lambda: [False, False])  # per downsampling (len(mults)-1)
    num_res_blocks: int = 1
    latent_channels: int = 4
    groups: int = 8                                # GroupNorm groups
    kl_weight: float = 1.0e-6
    lpips_weight: float = 0.1
    lpips_pretrained: bool = True                  # False: random backbone (tests, offline machines)
    decoder_only: bool = False                     # Video LDM temporal fine-tuning: encoder frozen


@dataclass
class DiTConfig:
    """Video DiT on latent tubelets (DiT, ViViT); a named size fills width/depth/heads."""
    size: str = ""              # "" (explicit numbers below) or a registry name: S, B, L, XL
    in_channels: int = 4        # latent channels
    hidden: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    patch_t: int = 1            # tubelet size in frames
    patch_h: int = 2
    patch_w: int = 2
    frames: int = 8             # latent frames the model is trained on (positions extend past it)
    height: int = 8             # latent height
    width: int = 8              # latent width
    attention: str = "factorised"   # factorised (spatial then temporal in each block) | full
    pos: str = "rope"           # rope (3D RoPE) | sincos
    text_dim: int = 384
    cond_frames: bool = False   # interp stage: extra input channels for keyframe latents + mask
    learn_sigma: bool = False


@dataclass
class DiffusionConfig:
    schedule: str = "cosine"        # cosine | shifted_cosine
    shift: float = 1.0              # shifted_cosine: log-SNR shift = 2*log(shift)
    prediction: str = "v"           # v | eps | x0
    min_snr_gamma: float = 5.0      # min-SNR-gamma loss weighting (0 = off)
    cond_drop: float = 0.1          # classifier-free guidance: text dropped with this probability
    sampler: str = "dpmpp_2m"       # ddim | dpmpp_2m | euler_ancestral
    steps: int = 25
    guidance: float = 4.0


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 8             # micro batch per process
    grad_accum: int = 1
    lr: float = 3.0e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    warmup: int = 50
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    ema_warmup: bool = True         # decay ramps as min(decay, (1+n)/(10+n)) so short runs still track
    zero_stage: int = 0             # DeepSpeed ZeRO stage 0..3
    precision: str = "fp32"         # fp32 | bf16 | fp16 (bf16/fp16 on GPUs)
    log_every: int = 10
    ckpt_every: int = 200
    keep_ckpts: int = 2
    out_dir: str = "runs/stage"
    seed: int = 0
    resume: bool = True             # resume from the latest checkpoint in out_dir if one exists
    vae_dir: str = ""               # latent stages: folder of the trained VAE export
    num_workers: int = 0


@dataclass
class StageConfig:
    stage: str = "vae"              # vae | base | interp | sr
    data: DataConfig = field(default_factory=DataConfig)
    text: TextConfig = field(default_factory=TextConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    dit: DiTConfig = field(default_factory=DiTConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


STAGES = ("vae", "base")
CHOICES = {
    "data.kind": ("synthetic", "folder"),
    "dit.attention": ("factorised", "full"),
    "dit.pos": ("rope", "sincos"),
    "diffusion.schedule": ("cosine", "shifted_cosine"),
    "diffusion.prediction": ("v", "eps", "x0"),
    "diffusion.sampler": ("ddim", "dpmpp_2m", "euler_ancestral"),
    "train.precision": ("fp32", "bf16", "fp16"),
}


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def validate(cfg: StageConfig) -> StageConfig:
    """Check values the types cannot: choices, positivity, divisibility. Raises ConfigError."""
    if cfg.stage not in STAGES:
        raise ConfigError(f"stage: '{cfg.stage}' is not one of {', '.join(STAGES)}")
    for key, choices in CHOICES.items():
        if _get(cfg, key) not in choices:
            raise ConfigError(f"{key}: '{_get(cfg, key)}' is not one of {', '.join(choices)}")
    for key in ("data.frames", "data.height", "data.width", "train.steps", "train.batch_size",
                "train.grad_accum", "dit.hidden", "dit.depth", "dit.heads", "vae.channels",
                "vae.latent_channels", "diffusion.steps"):
        if _get(cfg, key) <= 0:
            raise ConfigError(f"{key}: must be positive, got {_get(cfg, key)}")
    if not 0 <= cfg.train.zero_stage <= 3:
        raise ConfigError(f"train.zero_stage: must be 0..3, got {cfg.train.zero_stage}")
    if len(cfg.vae.temporal_down) != len(cfg.vae.channel_mults) - 1:
        raise ConfigError(f"vae.temporal_down: needs {len(cfg.vae.channel_mults) - 1} entries "
                          f"(one per downsampling), got {len(cfg.vae.temporal_down)}")
    down = 2 ** (len(cfg.vae.channel_mults) - 1)
    for axis in ("height", "width"):
        if _get(cfg.data, axis) % down:
            raise ConfigError(f"data.{axis}: {_get(cfg.data, axis)} is not divisible by the VAE's "
                              f"spatial downsampling {down}")
    d = cfg.dit
    if d.hidden % d.heads:
        raise ConfigError(f"dit.hidden: {d.hidden} is not divisible by dit.heads={d.heads}")
    if d.height % d.patch_h or d.width % d.patch_w or d.frames % d.patch_t:
        raise ConfigError(f"dit: latent size {d.frames}x{d.height}x{d.width} is not divisible by the "
                          f"patch size {d.patch_t}x{d.patch_h}x{d.patch_w}")
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] = (),
                schema=StageConfig):
    """YAML file + `key=value` overrides -> a validated dataclass instance.

    Unknown keys and values of the wrong type raise ConfigError with the key's name.
    """
    base = OmegaConf.structured(schema)
    try:
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file not found: {path}")
            base = OmegaConf.merge(base, OmegaConf.load(path))
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override '{item}' is not of the form key=value")
        if overrides:
            base = OmegaConf.merge(base, OmegaConf.from_dotlist(list(overrides)))
        if schema is StageConfig:
            _apply_dit_size(base)
        cfg = OmegaConf.to_object(base)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or ""
        msg = str(e).splitlines()[0]
        raise ConfigError(f"{key}: {msg}" if key else msg) from None
    return validate(cfg) if schema is StageConfig else cfg


def _apply_dit_size(cfg) -> None:
    """A named DiT size fills hidden/depth/heads (the registry lives beside the model)."""
    if not cfg.dit.size:
        return
    from cascade.models.dit import DIT_SIZES
    if cfg.dit.size not in DIT_SIZES:
        raise ConfigError(f"dit.size: '{cfg.dit.size}' is not one of {', '.join(DIT_SIZES)}")
    for k, v in DIT_SIZES[cfg.dit.size].items():
        cfg.dit[k] = v


def save_config(cfg, path: str | Path) -> None:
    Path(path).write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
