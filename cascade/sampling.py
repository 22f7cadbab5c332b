"""How a diffusion stage is sampled (steps, guidance, sampler, guidance interval), checked and
resolved in one place.

Each field is taken from the first level that sets it, most specific first: the stage's own
setting in the call (Pipeline(..., interp={...}), --interp-steps), the call's (steps=, --steps),
the cascade YAML's `sample` section (the CLI), and last the stage's config.diffusion
(`resolve_sampling(..., config=)`). Imports no model.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields, replace

MAX_STEPS = 1000        # sampling steps per stage (the schedules are trained on continuous t)
MAX_GUIDANCE = 100.0    # classifier-free guidance scale: 0 (unconditional) .. this


def check_number(name: str, value, lo, hi, integer: bool = False) -> None:
    """A sampling number a caller can get wrong (steps, guidance, frames, ...): None passes;
    anything but a finite number in lo..hi (an int, not a bool, when `integer`) is a one-line
    ValueError naming it, raised before anything is allocated."""
    if value is None:
        return
    number = isinstance(value, numbers.Integral if integer else numbers.Real) and not isinstance(value, bool)
    if number and (integer or math.isfinite(value)) and lo <= value <= hi:
        return
    raise ValueError(f"{name}: must be {lo}..{hi}, got {value!r}" if integer else
                     f"{name}: must be a finite number in {lo:g}..{hi:g}, got {value!r}")


@dataclass
class StageSampling:
    """How one diffusion stage is sampled; None = the next level down (`resolve_sampling`)."""
    steps: int | None = None
    guidance: float | None = None
    sampler: str | None = None
    guidance_interval: tuple | None = None      # (lo, hi): guided only at t in [lo, hi]
    image_guidance: float | None = None         # frame prompts: the image scale of three-way guidance
    autoguidance: float | None = None           # the weight of the guide model (1: off; Karras et al. 2024)
    long: str | None = None                     # the base's keyframes beyond one window: plan | chain
    window_steps: int | None = None             # steps of a long video's windows after the first

    @classmethod
    def of(cls, value) -> "StageSampling":
        """None, a dict with some of steps / guidance / sampler, or a StageSampling."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = set(value) - {f.name for f in fields(cls)}
            if unknown:
                raise ValueError(f"stage sampling: unknown key(s) {sorted(unknown)} "
                                 f"(use steps, guidance, sampler, guidance_interval, image_guidance, "
                                 f"autoguidance, long, window_steps)")
            return cls(**value)
        raise TypeError(f"stage sampling must be None, a dict or a StageSampling, got {type(value)}")

    def check(self, where: str = "") -> "StageSampling":
        """Itself, once its set fields are in range (one-line ValueError naming where + field)."""
        from cascade.registry import LONG_MODES, SAMPLER_NAMES as SAMPLERS
        check_number(f"{where}steps", self.steps, 1, MAX_STEPS, integer=True)
        check_number(f"{where}window_steps", self.window_steps, 1, MAX_STEPS, integer=True)
        check_number(f"{where}guidance", self.guidance, 0, MAX_GUIDANCE)
        check_number(f"{where}image_guidance", self.image_guidance, 0, MAX_GUIDANCE)
        check_number(f"{where}autoguidance", self.autoguidance, 0, MAX_GUIDANCE)
        if self.long is not None and self.long not in LONG_MODES:
            raise ValueError(f"{where}long: {self.long!r} is not one of {', '.join(LONG_MODES)}")
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise ValueError(f"{where}sampler: {self.sampler!r} is not one of {', '.join(SAMPLERS)}")
        if self.guidance_interval is not None:
            lo_hi = self.guidance_interval
            if not (isinstance(lo_hi, (tuple, list)) and len(lo_hi) == 2):
                raise ValueError(f"{where}guidance_interval: must be (lo, hi), got {lo_hi!r}")
            for v in lo_hi:
                check_number(f"{where}guidance_interval", v, 0, 1)
            if lo_hi[0] > lo_hi[1]:
                raise ValueError(f"{where}guidance_interval: needs lo <= hi, got {list(lo_hi)}")
        return self

    def over(self, other: "StageSampling") -> "StageSampling":
        """This one's set fields, the other's where this one has None."""
        return replace(other, **{f.name: getattr(self, f.name) for f in fields(self)
                                 if getattr(self, f.name) is not None})


def resolve_sampling(*levels, config=None) -> StageSampling:
    """The sampling of one stage: each field from the first of `levels` (StageSampling, dict or
    None; most specific first) that sets it, then from `config` (a DiffusionConfig: steps,
    guidance, sampler, guidance_interval, autoguidance, long, window_steps) when given; without a config what no level sets stays
    None (the CLI resolves the cascade YAML's level before the stages are loaded)."""
    out = StageSampling()
    for level in reversed(levels):
        out = StageSampling.of(level).over(out)
    if config is not None:
        base = StageSampling(config.steps, config.guidance, config.sampler,
                             config.guidance_interval, autoguidance=config.autoguidance,
                             long=config.long, window_steps=config.window_steps or None)
        out = out.over(base)
    return out
