"""From a prompt to frames: the cascade's inference path, built from a folder of exported stages.

    prompt -> text encoder (once) -> base keyframe DiT (latent keyframes)
           -> interp DiT (latent, once or twice: r or r^2 x the frame rate)
           -> VAE decode (pixels) -> sr U-Net (pixels, sr.scale x the resolution) -> frames

A stages folder holds one sub-folder per stage (`vae/`, `base/`, and optionally `interp/`, `sr/`),
each with the `config.yaml` and `model.safetensors` that `cascade train` exports (directly or in an
`export/` sub-folder). vae and base are required; interp and sr are used when present (or when
asked for, and then they must be there).
"""
from __future__ import annotations

import math
import numbers
import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch

from cascade.config import ConfigError
from cascade.heap import malloc_trim
from cascade.seeding import RowGenerators
from cascade.stages import interp_condition, keyframe_count, keyframe_lerp, load_export, load_vae
from cascade.text import check_prompts

STAGE_NAMES = ("vae", "base", "interp", "sr")
REQUIRED_STAGES = ("vae", "base")
DIFFUSION_STAGES = ("base", "interp", "sr")
MAX_EXTENT = 4          # an output axis may be up to 4x the trained size (Pipeline.latent_size_for)
MAX_STEPS = 1000        # sampling steps per stage (the schedules are trained on continuous t)
MAX_GUIDANCE = 100.0    # classifier-free guidance scale: 0 (unconditional) .. this
MAX_FRAMES = 4096       # output frames (Pipeline(frames=), cascade sample --frames)
MAX_VIDEOS = 1024       # videos per prompt, and per batch


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


def has_stage(root: str | Path, stage: str) -> bool:
    try:
        stage_folder(root, stage)
        return True
    except FileNotFoundError:
        return False


@dataclass
class StageSampling:
    """How one diffusion stage is sampled; None = the next level down (the pipeline call's
    steps / guidance / sampler, then the stage's own config.diffusion)."""
    steps: int | None = None
    guidance: float | None = None
    sampler: str | None = None
    guidance_interval: tuple | None = None      # (lo, hi): guided only at t in [lo, hi]

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
                                 f"(use steps, guidance, sampler, guidance_interval)")
            return cls(**value)
        raise TypeError(f"stage sampling must be None, a dict or a StageSampling, got {type(value)}")

    def check(self, where: str = "") -> "StageSampling":
        """Itself, once its set fields are in range (one-line ValueError naming where + field)."""
        from cascade.diffusion import SAMPLERS
        check_number(f"{where}steps", self.steps, 1, MAX_STEPS, integer=True)
        check_number(f"{where}guidance", self.guidance, 0, MAX_GUIDANCE)
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


@dataclass
class Result:
    """What a pipeline call returns. Videos are float (N, 3, T, H, W) in [-1, 1], on the CPU.

    stages: every stage's output, name -> tensor:
        keyframes_latent  the base stage's latent keyframes (N, Cz, Kb, h, w)
        keyframes         those keyframes decoded (at the base frame rate)
        interp_latent     the interp stage's latent frames (N, Cz, (Kb-1)*r^passes + 1, h, w)
        interp            those frames decoded                          (only when interp ran)
        lowres            the video before super-resolution (= interp, or keyframes without interp)
        final             the output video (= lowres without sr) - the same tensor as `video`
    timings: seconds per stage that ran, of base (text encoding included: it is shared by all
        stages and computed once), interp, vae (every decode), sr.
    memory: bytes per stage, measured as `memory_kind` says (see `PeakMemory`).
    fps: the frame rate of `video` (base fps x r^passes); stage_fps: the same per stage output."""
    video: torch.Tensor                    # (N, 3, T, H, W) in [-1, 1]
    prompts: list[str]
    stages: dict = field(default_factory=dict)   # name -> intermediate output
    timings: dict = field(default_factory=dict)  # name -> seconds
    memory: dict = field(default_factory=dict)   # name -> bytes (peak, see memory_kind)
    memory_kind: str = ""
    fps: float = 8.0
    stage_fps: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- measurement

def _proc_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Linux >= 4.0: writing 5 to /proc/self/clear_refs resets the peak RSS (VmHWM) to the RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _proc_status_kb("VmHWM") is not None
    except OSError:
        return False


def _ru_maxrss_bytes() -> int:
    kb_or_b = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb_or_b if sys.platform == "darwin" else kb_or_b * 1024      # Linux reports kB


class PeakMemory:
    """Seconds and peak memory of named stages: `with meter("base"): ...`; repeated names add
    their seconds and keep the larger peak.

    On a GPU: torch.cuda.max_memory_allocated after reset_peak_memory_stats, i.e. the peak of the
    tensors allocated while the stage ran (weights of every loaded stage included).
    On a CPU (Linux): the process's peak RSS (VmHWM, reset per stage through /proc/self/clear_refs)
    minus its RSS when the stage began (after glibc's malloc_trim hands freed heap pages back, so
    reused pages count): the memory the stage added at its peak. Elsewhere: the
    increase of resource.getrusage's lifetime peak RSS, which is 0 for a stage that stays below an
    earlier stage's peak."""

    def __init__(self, device: torch.device):
        self.device = device
        self.timings: dict[str, float] = {}
        self.memory: dict[str, int] = {}
        if device.type == "cuda":
            self.kind = "torch.cuda.max_memory_allocated (peak while the stage ran)"
        elif _reset_peak_rss():
            self.kind = "peak RSS increase (/proc VmHWM reset per stage; psutil has no per-stage peak)"
        else:
            self.kind = "peak RSS increase (resource.getrusage ru_maxrss, lifetime peak)"

    @contextmanager
    def __call__(self, name: str):
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif "VmHWM" in self.kind:
            malloc_trim()
            _reset_peak_rss()
            start = (_proc_status_kb("VmRSS") or 0) * 1024
        else:
            start = _ru_maxrss_bytes()
        tic = time.perf_counter()
        yield
        if cuda:
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif "VmHWM" in self.kind:
            peak = max(0, (_proc_status_kb("VmHWM") or 0) * 1024 - start)
        else:
            peak = max(0, _ru_maxrss_bytes() - start)
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - tic
        self.memory[name] = max(self.memory.get(name, 0), peak)


# ----------------------------------------------------------------------------- interp groups

def keyframe_groups(n: int, K: int) -> list[int]:
    """Start indices of the groups of K consecutive keyframes (out of n) that an interp model of K
    keyframes fills in: groups overlap by one keyframe, [0, K-1], [K-1, 2K-2], ...; when (n-1) is
    not a multiple of K-1 the last group is moved back to end at keyframe n-1 (it overlaps its
    neighbour by more than one keyframe). ValueError when n < K (the model cannot take fewer)."""
    if K < 2:
        raise ValueError(f"interp: an interp model needs K >= 2 keyframes, got K={K}")
    if n < K:
        raise ValueError(f"interp: {n} keyframes are fewer than the interp model's K={K}")
    starts = list(range(0, n - K + 1, K - 1))
    if starts[-1] != n - K:
        starts.append(n - K)
    return starts


# ----------------------------------------------------------------------------- the pipeline

@dataclass
class _Stage:
    name: str
    cfg: object                # StageConfig
    net: torch.nn.Module
    diffusion: object          # Diffusion
    text_key: tuple            # which shared text encoder feeds it


class Pipeline:
    """`Pipeline(folder)(prompt)` -> Result with the decoded frames and every stage's output.

    Pipeline(folder, device, use_interp=None, use_sr=None): vae and base are required; interp and
    sr are loaded when their folders hold an export (None = auto), skipped when False, and required
    when True (FileNotFoundError naming the stage). Stages that share a text encoder (the same
    text.encoder and text.max_length, the usual case) share one instance, and each prompt is
    encoded once per call for all of them."""

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu",
                 use_interp: bool | None = None, use_sr: bool | None = None):
        self.device = torch.device(device)
        self.folder = Path(folder)
        self.vae, self.vae_cfg = load_vae(stage_folder(folder, "vae"), self.device)
        self._encoders: dict[tuple, torch.nn.Module] = {}
        self.base = self._load("base")
        self.base_cfg = self.base.cfg
        self.text = self._encoders[self.base.text_key]
        self.interp = self.sr = None
        self.interp_keyframes = None                              # K of the interp model
        for name, use in (("interp", use_interp), ("sr", use_sr)):
            if use or (use is None and has_stage(folder, name)):
                setattr(self, name, self._load(name))
        if self.interp is not None:
            icfg = self.interp.cfg
            self.interp_keyframes = keyframe_count(icfg.dit.frames, icfg.interp.rate)  # K
            if icfg.dit.in_channels != self.base_cfg.dit.in_channels:
                raise ConfigError(f"{self.folder}/interp: dit.in_channels={icfg.dit.in_channels} does "
                                  f"not match the base stage's latents ({self.base_cfg.dit.in_channels})")

    def _load(self, name: str) -> _Stage:
        from cascade.diffusion import Diffusion
        from cascade.text import TextEncoder
        cfg, state = load_export(stage_folder(self.folder, name), name)
        if name == "sr":
            from cascade.models.unet import VideoUNet
            net, text_dim = VideoUNet(cfg.unet), cfg.unet.text_dim
        else:
            from cascade.models.dit import VideoDiT
            net, text_dim = VideoDiT(cfg.dit), cfg.dit.text_dim
        net.load_state_dict(state)
        net.eval().requires_grad_(False).to(self.device)
        key = (cfg.text.encoder, cfg.text.max_length)
        if key not in self._encoders:
            self._encoders[key] = TextEncoder.from_config(cfg.text).to(self.device)
        if self._encoders[key].dim != text_dim:
            raise ConfigError(f"{self.folder}/{name}: the network's text_dim={text_dim} does not match "
                              f"its text encoder's width {self._encoders[key].dim}")
        return _Stage(name, cfg, net, Diffusion(cfg.diffusion), key)

    @property
    def fps(self) -> float:
        """The base stage's frame rate (of its keyframes)."""
        return self.base_cfg.data.fps

    @property
    def stages(self) -> list[str]:
        """The stages this pipeline runs, in order."""
        return ["base"] + ["interp"] * (self.interp is not None) + ["vae"] + ["sr"] * (self.sr is not None)

    def keyframes_for(self, frames: int, passes: int) -> int:
        """The number of base keyframes Kb whose cascade output has `frames` frames:
        frames = 1 + s * (Kb - 1) * r^passes (s the VAE's temporal compression, r interp's rate).
        ValueError naming the reachable counts when there is none."""
        s = self.vae.temporal_factor
        r = self.interp.cfg.interp.rate if passes else 1
        step = s * r ** passes
        k_min = max(self.interp_keyframes, 2) if passes else 1
        pt = self.base_cfg.dit.patch_t
        kb = (frames - 1) // step + 1 if frames >= 1 and (frames - 1) % step == 0 else None
        if kb is None or kb < k_min or kb % pt:
            ok = [1 + step * (k - 1) for k in range(k_min, k_min + 12) if k % pt == 0][:3]
            why = (f"interp at rate {r}, {passes} pass(es), needs >= {k_min} base keyframes"
                   if passes else "no interp")
            raise ValueError(f"frames: the cascade cannot make {frames} frames ({why}, VAE temporal "
                             f"compression {s}: frames = 1 + {step}*(keyframes-1); use "
                             f"{', '.join(map(str, ok))}, ...)")
        return kb

    def latent_size_for(self, height: int | None, width: int | None) -> tuple[int, int]:
        """The base latent size (h, w) whose cascade output is height x width pixels (None: the
        base stage's trained size on that axis). The output is h * f pixels high, f the VAE's
        spatial factor times sr.scale (when sr runs); h must be divisible by the DiTs' patch and
        the SR U-Net's input by its downsampling; each axis may extend to MAX_EXTENT x the
        trained token grid (RoPE and the fractional in-frame position take any size, but a
        model has seen only offsets up to its trained size: NaViT Sec. 3.4 extrapolates to about
        that). ValueError naming the axis and the sizes it can take."""
        d = self.base_cfg.dit
        dits = [self.base_cfg.dit] + ([self.interp.cfg.dit] if self.interp is not None else [])
        f = self.vae.spatial_factor * (self.sr.cfg.sr.scale if self.sr is not None else 1)
        out = []
        for axis, want, trained, patch in (("height", height, d.height, "patch_h"),
                                           ("width", width, d.width, "patch_w")):
            if want is None:
                out.append(trained)
                continue
            p = math.lcm(*(getattr(c, patch) * (math.lcm(c.window_spatial[axis == "width"],
                                                         c.window_spacetime[1 + (axis == "width")])
                                                if c.attention == "window" else 1) for c in dits))
            if self.sr is not None:                                   # the U-Net's input size
                down = 2 ** (len(self.sr.cfg.unet.channel_mults) - 1)
                p = math.lcm(p, down // math.gcd(down, f)) if down > 1 else p
            step, hi = f * p, MAX_EXTENT * trained * f
            if want < step or want % step or want > hi:
                why = (f"more than {MAX_EXTENT}x the trained {trained * f} px" if want > hi else
                       f"not a multiple of {step} = VAE x{self.vae.spatial_factor}"
                       f"{f' x sr x{self.sr.cfg.sr.scale}' if self.sr is not None else ''} x patch {p}")
                ok = ", ".join(str(step * k) for k in range(1, 5) if step * k <= hi)
                raise ValueError(f"--{axis}: the cascade cannot make {want} px ({why}); use {ok}, ... "
                                 f"up to {hi}")
            out.append(want // f)
        return out[0], out[1]

    # ------------------------------------------------------------------------- the call

    @torch.inference_mode()
    def __call__(self, prompts: str | list[str], seed: int = 0, steps: int | None = None,
                 guidance: float | None = None, sampler: str | None = None, num_videos: int = 1, *,
                 base: StageSampling | dict | None = None, interp: StageSampling | dict | None = None,
                 sr: StageSampling | dict | None = None, interp_passes: int | None = None,
                 frames: int | None = None, height: int | None = None, width: int | None = None,
                 batch_size: int = 1, progress: bool = True) -> Result:
        """Sample `num_videos` videos per prompt: text -> base -> interp -> VAE decode -> sr.

        steps / guidance / sampler apply to every diffusion stage; `base`, `interp`, `sr`
        (StageSampling or a dict of the same fields) override them per stage; whatever is None
        falls back to that stage's config.diffusion.

        interp_passes: 1 (default when the interp stage is loaded) multiplies the frame rate by
        its rate r, 2 by r^2 (pass 2 interpolates the output of pass 1), 0 skips interp.
        frames: the output's frame count; None = the base stage's trained keyframe count.
        height, width: the output's size in pixels; None = what the trained base latents give
        (`latent_size_for` says which sizes a cascade can make).

        Frame counts. The base stage samples Kb latent keyframes. Interp, whose model fills K
        keyframes into N = (K-1)*r + 1 frames (K, r from its config; Kb and K may differ), fills
        between consecutive base keyframes in groups of K keyframes overlapping by one
        (`keyframe_groups`: [0..K-1], [K-1..2K-2], ...; a last group that would run past the last
        keyframe is moved back to end on it). All groups of all videos are sampled as one batch;
        each output frame is taken from the first group that covers it, and every keyframe slot
        (every r-th frame, the frames groups share) holds the keyframe itself, so one pass gives
        (Kb-1)*r + 1 frames (8 keyframes, K=3, r=4: groups at 0, 2, 4, 5 -> 29 frames). Pass 2
        treats those frames as keyframes the same way: (Kb-1)*r^2 + 1 frames (113). Interp needs
        Kb >= K (ValueError otherwise). The VAE then decodes T latent frames to 1 + s*(T-1).

        Conditioning. Interp: the keyframe latents are noise-augmented once to interp.aug_sample
        (so a keyframe shared by two groups gets the same noise in both), placed at their slots
        with `interp_condition`, and given with the level aug_t; the unconditional branch of
        classifier-free guidance carries the same frames / frame_mask / aug_t with only the text
        nulled. SR: the decoded video is upsampled by sr.scale (`upsample_video`, bilinear),
        noise-augmented to sr.aug_sample (aug_t given to the net; uncond again nulls only text),
        and sampled in overlapping temporal windows of sr.window frames (sr.overlap shared,
        cross-faded by `windowed`), a fixed noise video sliced per window.

        Randomness: every video draws from its own CPU generators, one per stage (base, each
        interp pass, sr), seeded from (seed, its prompt, its index among that prompt's
        num_videos, the stage) (`seeding.RowGenerators`): a video does not depend on the other
        prompts of the call nor on its position among them, and a seed gives the same base
        keyframes with or without the later stages. batch_size: videos sampled together. At 1
        (the default) a video's bytes are the same in any call; larger batches run faster on
        many videos and differ from it by float rounding only (GEMMs of other sizes: about 1e-5
        in [-1, 1], measured on the tiny cascade)."""
        from tqdm.auto import tqdm
        prompts = check_prompts(prompts)
        check_number("num_videos", num_videos, 1, MAX_VIDEOS, integer=True)
        check_number("batch_size", batch_size, 1, MAX_VIDEOS, integer=True)
        check_number("frames", frames, 1, MAX_FRAMES, integer=True)
        passes = (1 if self.interp is not None else 0) if interp_passes is None else interp_passes
        if passes not in (0, 1, 2):
            raise ValueError(f"interp_passes must be 0, 1 or 2, got {passes}")
        if passes and self.interp is None:
            raise ValueError(f"interp_passes={passes} needs the interp stage, which this pipeline "
                             f"did not load (no {self.folder}/interp, or use_interp=False)")
        call = StageSampling(steps, guidance, sampler).check()
        sampling = {name: StageSampling.of(v).check(f"{name}.").over(call)
                    for name, v in (("base", base), ("interp", interp), ("sr", sr))}
        d = self.base_cfg.dit
        kb = d.frames if frames is None else self.keyframes_for(frames, passes)
        size = self.latent_size_for(height, width)                  # (h, w) base latents
        if passes:
            keyframe_groups(kb, self.interp_keyframes)               # fail before sampling
        videos = [(p, k) for p in prompts for k in range(num_videos)]  # (prompt, its video index)
        chunks = [videos[i:i + batch_size] for i in range(0, len(videos), batch_size)]
        meter = PeakMemory(self.device)
        bar = tqdm(total=len(chunks) * (2 + passes + (self.sr is not None)), desc="cascade",
                   disable=not progress, leave=False)

        def step(name):
            bar.set_postfix_str(name)
            return meter(name)

        parts = [self._run(chunk, seed, kb, size, passes, sampling, step, bar, progress)
                 for chunk in chunks]
        bar.close()
        stages = {k: torch.cat([part[k] for part in parts]).float().cpu() for k in parts[0]}
        fps = self.fps * (self.interp.cfg.interp.rate ** passes if passes else 1)
        stage_fps = {k: fps for k in stages}
        stage_fps["keyframes"] = stage_fps["keyframes_latent"] = self.fps
        return Result(video=stages["final"], prompts=[p for p, _ in videos], stages=stages,
                      timings=meter.timings, memory=meter.memory, memory_kind=meter.kind, fps=fps,
                      stage_fps=stage_fps)

    def _run(self, videos: list[tuple], seed: int, kb: int, size: tuple[int, int], passes: int,
             sampling: dict, step, bar, progress: bool) -> dict:
        """The cascade on one batch of videos [(prompt, index)] -> {stage output name: tensor}
        (see Result.stages); step(name) meters a stage, bar counts them."""
        prompts = [p for p, _ in videos]
        B, d = len(prompts), self.base_cfg.dit

        def streams(purpose: str) -> RowGenerators:                 # one stream per video and purpose
            return RowGenerators.keyed([(seed, p, k, purpose) for p, k in videos])

        out: dict[str, torch.Tensor] = {}
        with step("base"):
            conds = {}                                               # text encoded once per prompt
            for key, enc in self._encoders.items():
                if any(s is not None and s.text_key == key for s in (self.base, self.interp, self.sr)):
                    conds[key] = (enc(prompts), enc.null(B))
            cond, uncond = conds[self.base.text_key]
            gen = streams("base")
            noise = gen.randn((B, d.in_channels, kb, *size))
            latents = self._sample(self.base, noise.to(self.device), cond, uncond, sampling["base"],
                                   gen, progress)                    # (B, Cz, Kb, h, w)
        bar.update()
        out["keyframes_latent"] = latents
        for i in range(passes):
            with step("interp"):
                gen = streams(f"interp pass {i}")
                latents = self._interpolate(latents, *conds[self.interp.text_key],
                                            sampling["interp"], gen, progress)
            bar.update()
        with step("vae"):
            decode = lambda z: self.vae.decode_latents(z).clamp(-1, 1)  # noqa: E731
            video = decode(latents)                                  # (B, 3, T, H, W)
            out["keyframes"] = decode(out["keyframes_latent"]) if passes else video
        bar.update()
        if passes:
            out["interp_latent"], out["interp"] = latents, video
        out["lowres"] = video
        if self.sr is not None:
            with step("sr"):
                gen = streams("sr")
                video = self._super_resolve(video, *conds[self.sr.text_key], sampling["sr"], gen,
                                            progress)                # (B, 3, T, sH, sW)
            bar.update()
        out["final"] = video
        return out

    def _sample(self, stage: _Stage, noise, cond, uncond, sampling: StageSampling, gen, progress):
        return stage.diffusion.sample(stage.net, noise, cond, uncond, steps=sampling.steps,
                                      guidance=sampling.guidance, sampler=sampling.sampler,
                                      guidance_interval=sampling.guidance_interval,
                                      progress=progress, generator=gen)

    def _interpolate(self, keys, cond, uncond, sampling, gen, progress):
        """One interp pass: keys (B, C, n, h, w) latent keyframes -> (B, C, (n-1)*r + 1, h, w)."""
        from cascade.diffusion import _randn
        st, K = self.interp, self.interp_keyframes
        r, aug_level = st.cfg.interp.rate, st.cfg.interp.aug_sample
        B, C, n, h, w = keys.shape
        starts = keyframe_groups(n, K)                               # G groups
        G, N = len(starts), (K - 1) * r + 1
        aug, _ = st.diffusion.noise_augment(keys, aug_level, generator=gen)   # (B, C, n, h, w)
        groups = torch.stack([aug[:, :, s:s + K] for s in starts], 1).flatten(0, 1)  # (B*G, C, K, h, w)
        slots, mask = interp_condition(groups, r)                    # (B*G, C, N, h, w), (B*G, 1, N, h, w)
        aug_t = torch.full((B * G,), float(aug_level), device=keys.device)
        per_group = torch.arange(B, device=keys.device).repeat_interleave(G)
        frames_cond = {"frames": slots, "frame_mask": mask, "aug_t": aug_t}
        c = {**{k: v[per_group] for k, v in cond.items()}, **frames_cond}
        u = {**{k: v[per_group] for k, v in uncond.items()}, **frames_cond}   # only the text nulled
        noise = _randn((B * G, C, N, h, w), keys, gen)               # G groups from each video's stream
        filled = self._sample(st, noise, c, u, sampling, gen, progress)   # (B*G, C, N, h, w)
        if st.cfg.interp.residual:                                   # added to the clean keys' lerp
            clean = torch.stack([keys[:, :, s:s + K] for s in starts], 1).flatten(0, 1)
            filled = keyframe_lerp(clean, r) + filled / st.cfg.interp.residual_scale
        filled = filled.view(B, G, C, N, h, w)
        video = keys.new_zeros(B, C, (n - 1) * r + 1, h, w)
        covered = 0                                                  # frames [0, covered) written
        for g, s in enumerate(starts):
            lo = s * r
            video[:, :, covered:lo + N] = filled[:, g, :, covered - lo:]
            covered = lo + N
        video[:, :, ::r] = keys                                      # the keyframes themselves
        return video

    def _super_resolve(self, video, cond, uncond, sampling, gen, progress):
        """Imagen Video SSR: video (B, 3, T, H, W) -> (B, 3, T, sH, sW), windowed in time."""
        from cascade.diffusion import _randn
        from cascade.models.unet import upsample_video, windowed
        st = self.sr
        s = st.cfg.sr
        up = upsample_video(video, s.scale)                          # (B, 3, T, sH, sW)
        lowres, aug_t = st.diffusion.noise_augment(up, s.aug_sample, generator=gen)
        noise = _randn(up.shape, up, gen)                             # one noise video, sliced per window

        def clip(x):                                                 # (B, 6, Tw, sH, sW)
            low, z = x[:, :3].contiguous(), x[:, 3:].contiguous()
            extra = {"lowres": low, "aug_t": aug_t}
            return self._sample(st, z, {**cond, **extra}, {**uncond, **extra}, sampling, gen, progress)

        out = windowed(clip, torch.cat([lowres, noise], 1), s.window, s.overlap)
        if s.residual:                                               # added back to the input
            out = up + out / s.residual_scale
        return out.clamp(-1, 1)


def format_table(result: Result) -> str:
    """The closing table of a call: each stage's seconds and peak memory (MiB)."""
    lines = [f"{'stage':<8} {'seconds':>8} {'peak MiB':>9}"]
    for name, sec in result.timings.items():
        lines.append(f"{name:<8} {sec:8.2f} {result.memory.get(name, 0) / 2 ** 20:9.1f}")
    lines.append(f"peak memory: {result.memory_kind}")
    return "\n".join(lines)

