"""From a prompt to frames: the cascade's inference path, built from a folder of exported stages.

    prompt -> text encoder -> base keyframe DiT (latent) -> VAE decode -> frames

A stages folder holds one sub-folder per stage (`vae/`, `base/`), each with the `config.yaml` and
`model.safetensors` that `cascade train` exports (directly or in an `export/` sub-folder).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cascade.stages import load_export, load_vae

STAGE_NAMES = ("vae", "base")


def stage_folder(root: str | Path, stage: str) -> Path:
    """root/stage/export or root/stage, whichever holds an export; a clear error if neither."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"stages folder not found: {root}")
    for cand in (root / stage / "export", root / stage):
        if (cand / "model.safetensors").is_file():
            return cand
    raise FileNotFoundError(f"stages folder {root} has no '{stage}' stage "
                            f"(expected {root / stage}/model.safetensors)")


@dataclass
class Result:
    video: torch.Tensor                    # (N, 3, T, H, W) in [-1, 1]
    prompts: list[str]
    stages: dict = field(default_factory=dict)   # name -> intermediate output
    timings: dict = field(default_factory=dict)  # name -> seconds


class Pipeline:
    """`Pipeline(folder)(prompt)` -> Result with the decoded frames."""

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu"):
        from cascade.diffusion import Diffusion
        from cascade.models.dit import VideoDiT
        from cascade.text import TextEncoder
        self.device = torch.device(device)
        self.vae, self.vae_cfg = load_vae(stage_folder(folder, "vae"), self.device)
        self.base_cfg, state = load_export(stage_folder(folder, "base"), "base")
        self.base = VideoDiT(self.base_cfg.dit)
        self.base.load_state_dict(state)
        self.base.eval().requires_grad_(False).to(self.device)
        self.text = TextEncoder.from_config(self.base_cfg.text).to(self.device)
        self.diffusion = Diffusion(self.base_cfg.diffusion)

    @property
    def fps(self) -> float:
        return self.base_cfg.data.fps

    @torch.inference_mode()
    def __call__(self, prompts: str | list[str], seed: int = 0, steps: int | None = None,
                 guidance: float | None = None, sampler: str | None = None, num_videos: int = 1,
                 progress: bool = True) -> Result:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        for p in prompts:
            if not p or not p.strip():
                raise ValueError("empty prompt: give the video a description")
        prompts = [p for p in prompts for _ in range(num_videos)]
        d = self.base_cfg.dit
        timings = {}
        tic = time.perf_counter()
        cond = self.text(prompts)                                         # computed once per prompt
        uncond = self.text.null(len(prompts))
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn(len(prompts), d.in_channels, d.frames, d.height, d.width, generator=gen)
        latents = self.diffusion.sample(self.base, noise.to(self.device), cond, uncond, steps=steps,
                                        guidance=guidance, sampler=sampler, progress=progress)
        timings["base"] = time.perf_counter() - tic
        tic = time.perf_counter()
        video = self.vae.decode_latents(latents).clamp(-1, 1)             # (N, 3, T, H, W)
        timings["vae"] = time.perf_counter() - tic
        return Result(video=video.float().cpu(), prompts=prompts,
                      stages={"keyframes_latent": latents.cpu()}, timings=timings)
