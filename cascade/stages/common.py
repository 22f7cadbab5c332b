"""What every stage shares: loading an export folder, the frozen text encoder and its
classifier-free-guidance dropout, and `DiffusionStage`, the part of base / interp / sr that is
the same (a network, its Diffusion, its text encoder; sampling through the shared core)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file

from cascade.config import ConfigError, StageConfig, load_config
from cascade.sampling import resolve_sampling

CACHED_TEXT = ("text", "text_mask", "pooled")     # the text encodings (a cascade cache batch's too)


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
    try:
        with torch.device("meta"):                                        # shapes only, no memory
            want = stage_network(cfg).state_dict()
    except RuntimeError:                 # a module that reads values as it builds (the VQ codebook's)
        want = stage_network(cfg).state_dict()
    diff = state_mismatch(want, state)
    if diff:
        raise ConfigError(f"{cfg_path} does not match {weights.name}: {diff}")
    return cfg, state


def load_network(folder: str | Path, stage: str, device="cpu"):
    """A frozen, eval-mode network from its export folder -> (network, StageConfig)."""
    cfg, state = load_export(folder, stage)
    net = stage_network(cfg)
    net.load_state_dict(state)
    return net.eval().requires_grad_(False).to(device), cfg


GUIDE = "guide"          # an export's subfolder holding its autoguidance model
TASKS_DIR = "tasks"      # an export's subfolder of task adapters: tasks/TASK, a LoRA used for that task alone


def load_guide(folder: str | Path, cfg: StageConfig, device="cpu"):
    """The autoguidance model of an export (Karras et al. 2024): folder/guide, an export of the same
    stage trained on the same data, smaller or shorter, taking the same inputs -> the frozen network,
    or None where there is no such folder. A guide that cannot stand in for the model (another
    stage, parameterisation, text encoder or frame inputs) is a one-line ConfigError."""
    path = Path(folder) / GUIDE
    if not path.is_dir():
        return None
    net, gcfg = load_network(path, cfg.stage, device)
    same = {"diffusion.parameterisation": lambda c: c.diffusion.parameterisation,
            "text": text_key, "dit.cond_frames": lambda c: c.dit.cond_frames,
            "dit.in_channels": lambda c: c.dit.in_channels}
    for name, get in same.items():
        if get(gcfg) != get(cfg):
            raise ConfigError(f"{path}: the guide's {name} is {get(gcfg)!r}, the model's "
                              f"{get(cfg)!r}; autoguidance needs a guide with the same inputs")
    return net


def text_key(cfg: StageConfig) -> tuple:
    """Stages whose text encoders agree on this key share one encoder (and one encoding)."""
    return (cfg.text.encoder, cfg.text.max_length)


def load_text_encoder(cfg: StageConfig, net: str, device, encoders: dict | None = None,
                      where: str = ""):
    """The stage's frozen text encoder, checked against the width its network (`net`: dit | unet)
    was configured for. encoders: {text_key: encoder} already loaded, reused and added to."""
    from cascade.text import TextEncoder
    encoders = {} if encoders is None else encoders
    key = text_key(cfg)
    if key not in encoders:
        encoders[key] = TextEncoder.from_config(cfg.text).to(device)
    text, want = encoders[key], getattr(cfg, net).text_dim
    if text.dim != want:
        raise ConfigError(f"{where}{net}.text_dim: {want} does not match the text encoder's width "
                          f"{text.dim}")
    return text


def text_condition(text, captions: list[str], gens, cond_drop: float, device,
                   cond: dict | None = None) -> dict:
    """Frozen text encoding with classifier-free-guidance dropout (Ho & Salimans 2022, Alg. 1):
    each sample's {text, text_mask, pooled} is replaced by the null condition with probability
    cond_drop, decided by one uniform draw from the sample's generator (`gens`: RowGenerators).
    `cond`: the encodings already made (a cascade cache batch), used instead of the encoder."""
    from cascade.diffusion import drop_condition
    cond = text(captions) if cond is None else {k: v.to(device) for k, v in cond.items()}
    return drop_condition(cond, text.null(len(gens)), cond_drop, gens)


class DiffusionStage:
    """What base, interp and sr share: `net(x_t, t, cond)` under one `Diffusion`, conditioned on
    text from a frozen encoder. Built for training by the subclass's constructor (from a config)
    or for sampling by `from_export` (a folder that `cascade train` exported)."""

    name = ""               # the stage's name in a stages folder and in configs
    network = ""            # which config section holds the network: dit | unet
    cond_keys = CACHED_TEXT  # the inputs the network's cond takes
    guide = None            # the autoguidance model: from_export loads the export's guide/
    folder = None           # the export it was loaded from

    def _setup(self, cfg: StageConfig, net: nn.Module, text) -> None:
        from cascade.diffusion import Diffusion
        self.cfg, self.net, self.text = cfg, net, text
        self.text_key = text_key(cfg)
        self.diffusion = Diffusion(cfg.diffusion)

    @classmethod
    def from_export(cls, folder: str | Path, device="cpu", encoders: dict | None = None):
        """The stage for sampling: its exported network (frozen, eval mode) and its text encoder,
        taken from `encoders` ({text_key: encoder}) when one is there already, else loaded there."""
        net, cfg = load_network(folder, cls.name, device)
        stage = cls.__new__(cls)
        stage._setup(cfg, net, load_text_encoder(cfg, cls.network, device, encoders, f"{folder}: "))
        stage.guide, stage.folder = load_guide(folder, cfg, device), Path(folder)
        return stage

    def encode_text(self, prompts: list[str]) -> tuple[dict, dict]:
        """The prompts' text condition and the null condition (batch 1) for guidance."""
        return self.text(prompts), self.text.null(len(prompts))

    def denoise(self, noise, cond: dict, uncond: dict, sampling, generator, progress: bool,
                null_image: dict | None = None, known=None, start=None, reference=None):
        """The network's sample from `noise` at t = 1, through the shared diffusion core, sampled
        as `sampling` says and, where it says None, as the stage's config.diffusion does.
        null_image: the frame inputs of "nothing given", for three-way guidance at the sampling's
        image_guidance (the stage's cond.image_guidance where it says None); known, start: what
        `Diffusion.sample` keeps as given and where an edit starts, (x, strength) or (x,
        strength, True) for an x already at that level (inverted); reference: the source's
        attention for an edit (`cascade.injection.SourceAttention`)."""
        s = resolve_sampling(sampling, config=self.cfg.diffusion)
        image = s.image_guidance if s.image_guidance is not None else self.cfg.cond.image_guidance
        if s.autoguidance != 1 and self.guide is None:
            raise ValueError(f"{self.name}: autoguidance {s.autoguidance} needs a guide model in "
                             f"{self.folder or 'the export'}/{GUIDE} (an export of the same stage, "
                             f"smaller or less trained); 1 turns it off")
        return self.diffusion.sample(self.net, noise, cond, uncond, steps=s.steps,
                                     guidance=s.guidance, sampler=s.sampler,
                                     guidance_interval=s.guidance_interval,
                                     progress=progress, generator=generator,
                                     image_guidance=image if null_image is not None else None,
                                     null_image=null_image, known=known,
                                     start=start[:2] if start is not None else None,
                                     start_noised=start is not None and len(start) > 2 and start[2],
                                     reference=reference, guide=self.guide,
                                     autoguidance=s.autoguidance)

    def loss(self, net, inputs):
        """The shared diffusion loss on prepared inputs (x0, t, noise and `cond_keys`)."""
        cond = {k: inputs[k] for k in self.cond_keys}
        loss = self.diffusion.loss(net, inputs["x0"], cond, t=inputs["t"], noise=inputs["noise"])
        return loss, {"mse": loss.detach()}


class StageLoss(nn.Module):
    """The module DeepSpeed wraps: only the trainable network is registered (frozen helpers are
    kept outside, so checkpoints hold nothing but the network)."""

    def __init__(self, stage):
        super().__init__()
        self.net = stage.net
        self._stage = [stage]

    def forward(self, inputs):
        return self._stage[0].loss(self.net, inputs)
