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

from cascade.registry import DIT_SIZES, LONG_MODES, SAMPLER_NAMES, STAGES


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
    val_manifest: str = ""    # kind=folder: a manifest of held-out videos (same root) for held-out metrics
    val_fraction: float = 0.05  # kind=folder without val_manifest: this share of the rows (>= 1) held out of training
    seed: int = 0             # the synthetic stream is deterministic by seed
    image_fraction: float = 0.0  # W.A.L.T joint training: share of 1-frame clips (0 = video only)
    recaption_manifest: str = ""  # kind=folder: a `cascade caption` manifest (path, caption, original_caption)
    recaption_ratio: float = 0.0  # share of samples that take the recaption, by (seed, index) (DALL-E 3: 0.95)
    # [[frames, height, width], ...] pixels: train at these shapes, one per batch (cascade/data/buckets.py);
    # empty: every clip is data.frames x data.height x data.width
    buckets: list[list[int]] = field(default_factory=list)
    bucket_max_crop: float = 0.25  # a bucket may cut away at most this share of a video's picture
    mix_synthetic: float = 0.0     # kind=folder: this share of training samples are embedded-domain clips (by seed, index)
    loops: float = 0.0             # synthetic: this share of clips loop (wrap around; the base gives them first and last)
    loop_period: int = 0           # frames a loop takes to cross the frame (0: the clip's frames - 1, its last = its first)


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
    l2_weight: float = 1.0                         # loss: L1 + l2_weight L2 (PSNR is L2)
    lpips_weight: float = 0.1
    lpips_pretrained: bool = True                  # False: random backbone (tests, offline machines)
    decoder_only: bool = False                     # Video LDM temporal fine-tuning: encoder frozen
    frame_encoder: bool = False                    # encoder kernels 1x3x3: each latent frame codes its own frame
    decoder_conv: str = "3d"                       # 3d (kt x 3 x 3) | 2+1d (1x3x3 then causal 3x1x1)
    bottleneck: str = "kl"                         # kl (LDM) | vq (VQ-VAE) | fsq (cascade/models/quantize.py)
    codebook_size: int = 1024                      # vq: codes
    codebook_decay: float = 0.99                   # vq: EMA decay of the codebook updates
    commitment: float = 0.25                       # vq: commitment loss weight (beta in VQ-VAE eq. 3)
    dead_code_threshold: float = 2.0               # vq: a code used less than this (EMA count) is restarted
    fsq_levels: list[int] = field(default_factory=list)   # fsq: levels per latent channel ([]: 5 each)
    min_code_usage: float = 0.05                   # vq / fsq: held-out code usage below this warns of collapse
    shortcut: bool = False                         # DC-AE's parameter-free space<->channel shortcuts (vae.py)
    patch: int = 1                                 # pixels p x p folded into channels first (LTX-Video's patchify)

    def spatial_factor(self) -> int:
        """Pixels per latent along a side: the patch, then 2 per level after the first."""
        return self.patch * 2 ** (len(self.channel_mults) - 1)

    def temporal_factor(self) -> int:
        """Pixel frames per latent frame after the first: 2 per downsampling in time."""
        return 2 ** sum(bool(t) for t in self.temporal_down)


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
    attention: str = "factorised"   # factorised (spatial then temporal in each block) | full | hybrid (full, then temporal) | global (factorised, then full)
                                    # | window (W.A.L.T: spatial window, then spatiotemporal window)
    window_spatial: list[int] = field(default_factory=lambda: [4, 4])       # attention=window: tokens (h, w)
    window_spacetime: list[int] = field(default_factory=lambda: [2, 4, 4])  # attention=window: tokens (t, h, w)
    pos: str = "rope"           # rope (3D RoPE) | sincos
    rope_scale: float = 1.0     # RoPE positions x this (dit.Rope3D: < 1 stops small grids aliasing)
    frame_pos: bool = False     # + absolute in-frame position (dit.FramePosition): where the borders are
    text_dim: int = 384
    cond_frames: bool = False   # extra input channels for given latents + mask (interp: keyframes; base: frame prompts)
    learn_sigma: bool = False
    text_pool: str = "mean"     # the text vector added to the time embedding: mean (the encoder's
                                # pooled output) | attention (also a learned attention pooling of the tokens)
    checkpoint: bool = False    # activation checkpointing per block (recomputed in the backward)


@dataclass
class UNetConfig:
    """Video U-Net of the SR stage (Imagen Video SSR); the network lives in cascade/models/unet.py."""
    in_channels: int = 3
    channels: int = 32                  # width of the first (highest-resolution) level
    channel_mults: list[int] = field(default_factory=lambda: [1, 2, 4])   # one per level
    num_res_blocks: int = 1             # per level, encoder and decoder
    attn_levels: list[int] = field(default_factory=lambda: [2])  # levels with temporal + cross attention
    heads: int = 4
    text_dim: int = 384
    groups: int = 8                     # GroupNorm groups
    temporal_kernel: int = 3            # kt of the (2+1)D convs (1: no temporal conv)
    checkpoint: bool = False            # activation checkpointing per res-block (recomputed in the backward)


@dataclass
class InterpConfig:
    """Temporal interpolation in latent space (Video LDM, Blattmann et al. 2023, Sec. 3.1.2).

    The stage's dit.frames N = (K-1)*rate + 1 latent frames; K keyframes sit at frames 0, r, 2r, ..."""
    rate: int = 4                   # r: frames per keyframe interval (r-1 new frames between two keys)
    aug_max: float = 0.3            # training: keyframes noise-augmented to t_aug ~ U(0, aug_max)
    aug_sample: float = 0.1         # sampling: the fixed augmentation level of the keyframes
    residual: bool = False          # diffuse x - the keyframes' linear interpolation (stages.InterpStage)
    residual_scale: float = 1.0     # residual: diffuse it times this (~ 1 / its std)


@dataclass
class CondConfig:
    """Prompting with frames (cascade/conditions.py; Sora's image and video prompts, Video LDM's
    context frames): a base stage with dit.cond_frames trains on a condition type drawn per sample
    at these rates (normalised; Open-Sora 2.0 weights its types the same way), so one model does
    text-to-video and every task prompted with frames. Types name the latent frames given:
    none (text only; the image branch of guidance), first, last, first_last (connect, loop),
    first_k / last_k (extend, long videos: k drawn from 2..k_max)."""
    none: float = 0.4
    first: float = 0.25
    last: float = 0.05
    first_last: float = 0.1
    first_k: float = 0.15
    last_k: float = 0.05
    k_max: int = 4                  # first_k / last_k: up to this many latent frames (at most T - 1)
    aug_max: float = 0.2            # training: given latents noise-augmented to t_aug ~ U(0, aug_max)
    aug_sample: float = 0.05        # sampling: their fixed augmentation level
    image_guidance: float = 1.0     # sampling: image scale of the three-way guidance (1: two-way, text only)


COND_TYPES = ("none", "first", "last", "first_last", "first_k", "last_k")


@dataclass
class SRConfig:
    """Spatial super-resolution in pixel space (Imagen Video SSR, with conditioning augmentation)."""
    scale: int = 2                  # high-res = scale x low-res (data.height/width are the high res)
    downsample: str = "area"        # training: how the low-res input is made (area | bilinear, antialiased)
    aug_max: float = 0.3            # training: low-res input noise-augmented to t_aug ~ U(0, aug_max)
    aug_sample: float = 0.1         # sampling: the fixed augmentation level of the low-res input
    window: int = 8                 # sampling: temporal window in frames (longer videos: windowed)
    overlap: int = 2                # sampling: frames shared by neighbouring windows
    residual: bool = False          # diffuse x - upsampled low-res instead of x (stages.SRStage)
    residual_scale: float = 1.0     # residual: diffuse (x - up) * this (~ 1 / its std, as LDM's latent scale)


@dataclass
class DiffusionConfig:
    parameterisation: str = "vp"    # vp (variance preserving: schedule + prediction) | flow (rectified flow, velocity)
    schedule: str = "cosine"        # vp: cosine | shifted_cosine
    shift: float = 1.0              # shifted_cosine and flow: log-SNR lowered by 2*log(shift) (> 1: noisier)
    shift_tokens: int = 0           # flow: shift x sqrt(n / this) for samples of n elements per channel (0: fixed)
    flow_logit_mean: float = 0.0    # flow: training t = sigmoid(N(mean, std^2)) (SD3's logit-normal)
    flow_logit_std: float = 1.0
    prediction: str = "v"           # v | eps | x0 (flow: v, the velocity eps - x0)
    min_snr_gamma: float = 5.0      # min-SNR-gamma loss weighting (0 = off)
    motion_weight: float = 0.0      # + this x MSE of the x0 estimate's frame differences (video stages)
    cond_drop: float = 0.1          # classifier-free guidance: text dropped with this probability
    sampler: str = "dpmpp_2m"       # ddim | dpmpp_2m | euler_ancestral
    steps: int = 25
    guidance: float = 4.0
    # guidance only where lo <= t <= hi, a plain conditional call elsewhere (Kynkaanniemi et al.
    # 2024, "Applying guidance in a limited interval"): guidance at high noise makes layouts
    guidance_interval: list[float] = field(default_factory=lambda: [0.0, 1.0])
    # autoguidance (Karras et al. 2024): + (this - 1) x (conditional - the guide's conditional), the
    # guide a smaller or less-trained export of the same stage in the export's guide/ (1: off)
    autoguidance: float = 1.0
    # keyframes beyond one window (a long video, the base stage): plan (a first window spans the
    # whole video, windows then fill between its keyframes; NUWA-XL's coarse to fine) | chain
    # (window after window, each continuing the last: Video LDM's prediction) (cascade/stages/base.py)
    long: str = "plan"
    # steps of a long video's windows after its first (0: `steps`): a window with its context and
    # its goal given is a narrower problem than the first (cascade/stages/base.py sample_windows)
    window_steps: int = 0


@dataclass
class LoRAConfig:
    """LoRA fine-tuning of a DiT or U-Net stage (cascade/adapters.py, through PEFT)."""
    rank: int = 0                   # 0: train every weight; > 0: only adapters of this rank
    alpha: float = 0.0              # scaling = alpha / rank (0: alpha = rank, scaling 1)
    dropout: float = 0.0            # on the adapters' input (not applied inside the fused kernels)
    # module-name suffixes (PEFT target_modules): the DiT's self-attention qkv / proj (spatial and
    # temporal), cross-attention q / kv / proj; the U-Net's attention projections have the same
    # names; add "mlp.0", "mlp.2" for the DiT's MLPs
    targets: list[str] = field(default_factory=lambda: ["qkv", "proj", "q", "kv"])


@dataclass
class TrainConfig:
    steps: int = 1000
    stop_at: int = 0                # end the run (checkpoint, export) at this step of the train.steps schedule (0: at train.steps)
    batch_size: int = 8             # micro batch per process
    grad_accum: int = 1
    lr: float = 3.0e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    warmup: int = 50
    schedule: str = "constant"      # constant | cosine (decay to min_lr_ratio x lr at the last step)
    min_lr_ratio: float = 0.02
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    ema_warmup: bool = True         # decay ramps as min(decay, (1+n)/(10+n)) so short runs still track
    zero_stage: int = 0             # DeepSpeed ZeRO stage 0..3
    sequence_parallel: int = 1      # DiT stages: DeepSpeed-Ulysses degree; sp consecutive ranks share each sample, 1/sp of its frames each (cascade/parallel.py)
    precision: str = "fp32"         # fp32 | bf16 | fp16 (bf16/fp16 on GPUs)
    log_every: int = 10
    tensorboard: bool = True        # event files in out_dir/tensorboard beside log.csv (cascade/dashboard.py)
    sample_every: int = 0           # a sample sheet from the EMA weights every this many steps (0: off)
    ckpt_every: int = 200
    keep_ckpts: int = 2
    pack_tokens: int = 0            # base stage: pack each micro batch's clips (any shapes) into rows of this many tokens (NaViT); 0: off
    max_bad_steps: int = 10         # steps skipped for a non-finite loss or gradient before the run stops (0: at the first)
    out_dir: str = "runs/stage"
    seed: int = 0
    resume: bool = True             # resume from the latest checkpoint in out_dir if one exists
    vae_dir: str = ""               # latent stages: folder of the trained VAE export
    init_from: str = ""             # start from this stage export's weights (e.g. vae.decoder_only fine-tuning)
    guide: str = ""                 # an export of the same stage copied into the export as guide/ (autoguidance)
    lora: LoRAConfig = field(default_factory=LoRAConfig)   # rank > 0: train LoRA adapters on init_from
    compile: bool = False           # torch.compile the network (measured on CPU: 1.07x at DiT width 128, 26 s to compile)
    num_workers: int = 0


@dataclass
class StageConfig:
    stage: str = "vae"              # vae | base | interp | sr
    data: DataConfig = field(default_factory=DataConfig)
    text: TextConfig = field(default_factory=TextConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    dit: DiTConfig = field(default_factory=DiTConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    interp: InterpConfig = field(default_factory=InterpConfig)
    cond: CondConfig = field(default_factory=CondConfig)
    sr: SRConfig = field(default_factory=SRConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


CHOICES = {
    "data.kind": ("synthetic", "folder", "cache"),   # cache: data.root = a `cascade cache` folder
    "dit.attention": ("factorised", "full", "hybrid", "window", "global"),
    "vae.bottleneck": ("kl", "vq", "fsq"),
    "dit.pos": ("rope", "sincos"),
    "diffusion.parameterisation": ("vp", "flow"),
    "diffusion.schedule": ("cosine", "shifted_cosine"),
    "diffusion.prediction": ("v", "eps", "x0"),
    "diffusion.sampler": SAMPLER_NAMES,
    "diffusion.long": LONG_MODES,
    "train.precision": ("fp32", "bf16", "fp16"),
    "train.schedule": ("constant", "cosine"),
    "sr.downsample": ("area", "bilinear"),
}


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def last_step(t) -> int:
    """The step a run ends at: train.stop_at where set (a run that stops part way along a longer
    learning-rate schedule, continued later from its export), else train.steps."""
    return t.stop_at or t.steps


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
    if not 0 <= cfg.data.val_fraction < 1:
        raise ConfigError(f"data.val_fraction: must be in [0, 1), got {cfg.data.val_fraction}")
    if not 0 <= cfg.data.image_fraction <= 1:
        raise ConfigError(f"data.image_fraction: must be in [0, 1], got {cfg.data.image_fraction}")
    if not 0 <= cfg.data.mix_synthetic < 1 or (cfg.data.mix_synthetic and cfg.data.kind != "folder"):
        raise ConfigError(f"data.mix_synthetic: must be in [0, 1) and goes with data.kind=folder, "
                          f"got {cfg.data.mix_synthetic} with {cfg.data.kind}")
    if cfg.diffusion.window_steps < 0:
        raise ConfigError(f"diffusion.window_steps: must be >= 0 (0: diffusion.steps), got "
                          f"{cfg.diffusion.window_steps}")
    if cfg.data.loop_period < 0:
        raise ConfigError(f"data.loop_period: must be >= 0 (0: the clip's own length), got {cfg.data.loop_period}")
    if not 0 <= cfg.data.loops <= 1 or (cfg.data.loops and cfg.data.kind != "synthetic"):
        raise ConfigError(f"data.loops: must be in [0, 1] and goes with data.kind=synthetic, got "
                          f"{cfg.data.loops} with {cfg.data.kind}")
    if not 0 <= cfg.data.recaption_ratio <= 1:
        raise ConfigError(f"data.recaption_ratio: must be in [0, 1], got {cfg.data.recaption_ratio}")
    if cfg.data.image_fraction and cfg.stage == "interp":
        raise ConfigError("data.image_fraction: the interp stage cannot train on 1-frame clips")
    _validate_buckets(cfg)
    if cfg.train.pack_tokens < 0:
        raise ConfigError(f"train.pack_tokens: must be >= 0 (0: no packing), got {cfg.train.pack_tokens}")
    if cfg.train.pack_tokens and cfg.stage != "base":
        raise ConfigError(f"train.pack_tokens: packing is for the base stage's DiT, not the "
                          f"'{cfg.stage}' stage (use data.buckets there)")
    if not 0 <= cfg.train.stop_at <= cfg.train.steps:
        raise ConfigError(f"train.stop_at: must be in 0..train.steps ({cfg.train.steps}; 0: run to "
                          f"train.steps), got {cfg.train.stop_at}")
    if cfg.train.max_bad_steps < 0:
        raise ConfigError(f"train.max_bad_steps: must be >= 0, got {cfg.train.max_bad_steps}")
    if not 0 <= cfg.train.zero_stage <= 3:
        raise ConfigError(f"train.zero_stage: must be 0..3, got {cfg.train.zero_stage}")
    _validate_sequence_parallel(cfg)
    if len(cfg.vae.temporal_down) != len(cfg.vae.channel_mults) - 1:
        raise ConfigError(f"vae.temporal_down: needs {len(cfg.vae.channel_mults) - 1} entries "
                          f"(one per downsampling), got {len(cfg.vae.temporal_down)}")
    if cfg.vae.patch < 1:
        raise ConfigError(f"vae.patch: must be >= 1, got {cfg.vae.patch}")
    down = cfg.vae.spatial_factor()
    for axis in ("height", "width"):
        if cfg.stage != "sr" and _get(cfg.data, axis) % down:              # sr has no VAE
            raise ConfigError(f"data.{axis}: {_get(cfg.data, axis)} is not divisible by the VAE's "
                              f"spatial downsampling {down}")
    d = cfg.dit
    if d.hidden % d.heads:
        raise ConfigError(f"dit.hidden: {d.hidden} is not divisible by dit.heads={d.heads}")
    if d.height % d.patch_h or d.width % d.patch_w or d.frames % d.patch_t:
        raise ConfigError(f"dit: latent size {d.frames}x{d.height}x{d.width} is not divisible by the "
                          f"patch size {d.patch_t}x{d.patch_h}x{d.patch_w}")
    if len(d.window_spatial) != 2 or len(d.window_spacetime) != 3 or \
            min(*d.window_spatial, *d.window_spacetime) < 1:
        raise ConfigError(f"dit.window_spatial / dit.window_spacetime: need [h, w] and [t, h, w] of "
                          f"positive token counts, got {list(d.window_spatial)}, {list(d.window_spacetime)}")
    if cfg.stage == "interp" and not d.cond_frames:
        raise ConfigError("dit.cond_frames: must be true for the 'interp' stage (it takes the "
                          "keyframe latents as input)")
    if cfg.stage == "base" and d.cond_frames:
        _validate_cond(cfg)
    _validate_diffusion(cfg.diffusion)
    _validate_lora(cfg)
    if cfg.stage == "interp":
        _validate_interp(cfg)
    if cfg.stage == "sr":
        _validate_sr(cfg)
    return cfg


def _validate_cond(cfg: StageConfig) -> None:
    """cond: rates that make a distribution, sizes the base's frames can take."""
    c = cfg.cond
    rates = [getattr(c, k) for k in COND_TYPES]
    if min(rates) < 0 or sum(rates) <= 0:
        raise ConfigError(f"cond: the condition-type rates ({', '.join(COND_TYPES)}) must be >= 0 "
                          f"and not all 0, got {rates}")
    if c.k_max < 1:
        raise ConfigError(f"cond.k_max: must be >= 1 (a clip of T latent frames is given at most "
                          f"T - 1 of them), got {c.k_max}")
    for key in ("aug_max", "aug_sample"):
        if not 0.0 <= getattr(c, key) <= 1.0:
            raise ConfigError(f"cond.{key}: must be in [0, 1], got {getattr(c, key)}")
    if c.image_guidance < 0:
        raise ConfigError(f"cond.image_guidance: must be >= 0, got {c.image_guidance}")
    if not cfg.diffusion.autoguidance >= 0:
        raise ConfigError(f"diffusion.autoguidance: must be >= 0, got {cfg.diffusion.autoguidance}")
    if cfg.train.pack_tokens:
        raise ConfigError("train.pack_tokens: packing does not take dit.cond_frames (frame prompts)")


def _validate_lora(cfg: StageConfig) -> None:
    lo = cfg.train.lora
    if lo.rank < 0:
        raise ConfigError(f"train.lora.rank: must be >= 0 (0: no adapters), got {lo.rank}")
    if lo.rank == 0:
        return
    if cfg.stage == "vae":
        raise ConfigError("train.lora.rank: adapters are for the diffusion stages (base, interp, "
                          "sr), not the vae")
    if not cfg.train.init_from:
        raise ConfigError("train.lora.rank: LoRA adapts a trained stage: set train.init_from to "
                          "its export folder")
    if not lo.targets:
        raise ConfigError("train.lora.targets: needs at least one module name")
    if lo.alpha < 0 or not 0 <= lo.dropout < 1:
        raise ConfigError(f"train.lora: alpha must be >= 0 and dropout in [0, 1), got "
                          f"{lo.alpha}, {lo.dropout}")


def _validate_diffusion(d: DiffusionConfig) -> None:
    import math
    for key in ("shift", "flow_logit_std"):
        v = getattr(d, key)
        if not (math.isfinite(v) and v > 0):
            raise ConfigError(f"diffusion.{key}: must be a positive number, got {v}")
    if d.shift_tokens < 0:
        raise ConfigError(f"diffusion.shift_tokens: must be >= 0 (0: a fixed shift), got {d.shift_tokens}")
    if d.parameterisation == "flow" and d.prediction != "v":
        raise ConfigError(f"diffusion.prediction: a rectified-flow network predicts the velocity "
                          f"eps - x0 (prediction v), got '{d.prediction}'")


def _validate_sequence_parallel(cfg: StageConfig) -> None:
    """train.sequence_parallel (DeepSpeed-Ulysses): what the DiT's sharding of frames and heads
    needs. That it divides the number of processes is checked when they start (cascade.train)."""
    sp, d = cfg.train.sequence_parallel, cfg.dit
    if sp < 1:
        raise ConfigError(f"train.sequence_parallel: must be >= 1 (1: off), got {sp}")
    if sp == 1:
        return
    why = None
    if cfg.stage not in ("base", "interp"):
        why = f"it shards the DiT's frames (base, interp stages), not the '{cfg.stage}' stage's"
    elif d.heads % sp:
        why = f"dit.heads={d.heads} is not divisible by it"
    elif (d.frames // d.patch_t) % sp:
        why = f"the {d.frames // d.patch_t} latent token frames (dit.frames / dit.patch_t) are not divisible by it"
    elif d.attention == "window":
        why = "dit.attention=window is not supported with it"
    elif cfg.train.pack_tokens:
        why = "train.pack_tokens is not supported with it"
    elif cfg.data.image_fraction:
        why = "data.image_fraction: a 1-frame clip cannot be sharded over frames"
    if why:
        raise ConfigError(f"train.sequence_parallel: {sp}: {why}")


def _validate_buckets(cfg: StageConfig) -> None:
    """data.buckets: [frames, height, width] entries whose sizes the stage's networks can take."""
    from cascade.data.buckets import parse_buckets
    d = cfg.data
    if not 0 <= d.bucket_max_crop < 1:
        raise ConfigError(f"data.bucket_max_crop: must be in [0, 1), got {d.bucket_max_crop}")
    try:
        buckets = parse_buckets(d.buckets)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if buckets and d.kind == "cache":
        raise ConfigError("data.buckets: a cache holds one shape; bucket the data it is made from")
    spatial = 1 if cfg.stage == "sr" else cfg.vae.spatial_factor()
    if cfg.stage in ("base", "interp"):
        spatial = (spatial * cfg.dit.patch_h, spatial * cfg.dit.patch_w)
    else:
        spatial = (spatial, spatial)
    for i, (T, H, W) in enumerate(buckets):
        if H % spatial[0] or W % spatial[1]:
            raise ConfigError(f"data.buckets[{i}]: {H}x{W} is not divisible by {spatial[0]}x{spatial[1]} "
                              f"(the VAE's downsampling x the patch size)")
        if cfg.stage == "interp" and interp_frames_error(T, cfg.interp.rate):
            raise ConfigError(f"data.buckets[{i}]: {interp_frames_error(T, cfg.interp.rate)}")
        if cfg.stage in ("base", "interp") and T % cfg.dit.patch_t:
            raise ConfigError(f"data.buckets[{i}]: {T} frames are not divisible by dit.patch_t="
                              f"{cfg.dit.patch_t}")


def interp_frames_error(frames: int, rate: int) -> str | None:
    """Why `frames` cannot be an interpolation target at this rate (None if it can): the target
    must hold K >= 2 keyframes at 0, r, ..., (K-1)r and nothing past the last, N = (K-1)*r + 1."""
    if rate < 1:
        return f"rate must be >= 1, got {rate}"
    if frames < rate + 1 or (frames - 1) % rate:
        ok = ", ".join(str(k * rate + 1) for k in (1, 2, 3))
        return (f"{frames} frames are not (K-1)*rate+1 with K >= 2 keyframes at rate {rate} "
                f"(use {ok}, ...)")
    return None


def _validate_interp(cfg: StageConfig) -> None:
    i = cfg.interp
    if i.rate < 1:
        raise ConfigError(f"interp.rate: must be >= 1, got {i.rate}")
    for key in ("aug_max", "aug_sample"):
        if not 0.0 <= getattr(i, key) <= 1.0:
            raise ConfigError(f"interp.{key}: must be in [0, 1], got {getattr(i, key)}")
    if i.residual_scale <= 0:
        raise ConfigError(f"interp.residual_scale: must be positive, got {i.residual_scale}")
    err = interp_frames_error(cfg.dit.frames, i.rate)
    if err:
        raise ConfigError(f"dit.frames: {err}")


def _validate_sr(cfg: StageConfig) -> None:
    s, u = cfg.sr, cfg.unet
    if s.scale < 1:
        raise ConfigError(f"sr.scale: must be >= 1, got {s.scale}")
    for key in ("aug_max", "aug_sample"):
        if not 0.0 <= getattr(s, key) <= 1.0:
            raise ConfigError(f"sr.{key}: must be in [0, 1], got {getattr(s, key)}")
    if s.residual_scale <= 0:
        raise ConfigError(f"sr.residual_scale: must be positive, got {s.residual_scale}")
    if s.window < 1 or not 0 <= s.overlap < s.window:
        raise ConfigError(f"sr.overlap: need sr.window >= 1 and 0 <= sr.overlap < sr.window, got "
                          f"window={s.window}, overlap={s.overlap}")
    for key in ("unet.channels", "unet.heads", "unet.num_res_blocks", "unet.temporal_kernel"):
        if _get(cfg, key) <= 0:
            raise ConfigError(f"{key}: must be positive, got {_get(cfg, key)}")
    if u.groups < 0:
        raise ConfigError(f"unet.groups: must be 0 (no GroupNorm) or positive, got {u.groups}")
    if not u.channel_mults:
        raise ConfigError("unet.channel_mults: needs at least one level")
    if any(not 0 <= lvl < len(u.channel_mults) for lvl in u.attn_levels):
        raise ConfigError(f"unet.attn_levels: {u.attn_levels} must be level indices in "
                          f"0..{len(u.channel_mults) - 1}")
    for m in u.channel_mults:
        ch = u.channels * m
        if m <= 0 or (u.groups and ch % u.groups) or ch % u.heads or ch // u.heads > 128:
            raise ConfigError(f"unet.channel_mults: a level's {ch} channels must divide into "
                              f"unet.groups={u.groups} and unet.heads={u.heads} of at most 128 channels")
    down = 2 ** (len(u.channel_mults) - 1)
    for axis in ("height", "width"):
        size = getattr(cfg.data, axis)
        if size % s.scale:
            raise ConfigError(f"data.{axis}: {size} (the high resolution) is not divisible by "
                              f"sr.scale={s.scale}")
        if size % down:
            raise ConfigError(f"data.{axis}: {size} is not divisible by the U-Net's downsampling {down}")


def load_config(path: str | Path | None = None, overrides: list[str] = (),
                schema=StageConfig):
    """YAML file + `key=value` overrides -> a validated dataclass instance.

    Unknown keys and values of the wrong type raise ConfigError with the key's name.
    """
    base = OmegaConf.structured(schema)
    try:
        if path is not None:
            path = Path(path)
            base = OmegaConf.merge(base, read_yaml(path))
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


def read_yaml(path: str | Path):
    """A YAML file whose top level is a mapping -> DictConfig; anything else (missing, not
    YAML, not text, a list or a scalar at the top) is a one-line ConfigError naming the file."""
    import yaml
    from omegaconf import DictConfig
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a YAML text file (it is not UTF-8)") from None
    if not isinstance(loaded, DictConfig):
        kind = "a list" if isinstance(loaded, list) or type(loaded).__name__ == "ListConfig" \
            else type(loaded).__name__
        raise ConfigError(f"{path}: the top level must be a mapping of keys (stage:, data:, "
                          f"train:, ...), got {kind}")
    return loaded


def _apply_dit_size(cfg) -> None:
    """A named DiT size fills hidden/depth/heads (cascade.registry.DIT_SIZES)."""
    if not cfg.dit.size:
        return
    if cfg.dit.size not in DIT_SIZES:
        raise ConfigError(f"dit.size: '{cfg.dit.size}' is not one of {', '.join(DIT_SIZES)}")
    for k, v in DIT_SIZES[cfg.dit.size].items():
        cfg.dit[k] = v


def save_config(cfg, path: str | Path) -> None:
    """Write the config's YAML whole, then rename it into place (a kill mid-write leaves the
    previous file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    tmp.replace(path)
