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
import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from cascade.conditions import Conditions
from cascade.config import ConfigError
from cascade.heap import malloc_trim
from cascade.injection import SourceAttention
from cascade.sampling import MAX_GUIDANCE, MAX_STEPS, StageSampling, check_number, resolve_sampling
from cascade.seeding import RowGenerators
from cascade.stages import BaseStage, InterpStage, SRStage, VAEStage, keyframe_groups
from cascade.text import check_prompts

__all__ = ["Conditions", "MAX_GUIDANCE", "MAX_STEPS", "Pipeline", "Result", "StageSampling", "check_number",
           "keyframe_groups", "resolve_sampling"]          # re-exported: where callers import them

MAX_EXTENT = 4          # an output axis may be up to 4x the trained size (Pipeline.latent_size_for)
MAX_FRAMES = 4096       # output frames (Pipeline(frames=), cascade sample --frames)
MAX_VIDEOS = 1024       # videos per prompt, and per batch


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


def task_adapters(export: str | Path) -> dict[str, Path]:
    """The task adapters of a diffusion stage's export: {task: the adapter} for each folder
    export/tasks/TASK naming a task of `Conditions` (cascade/conditions.py), the adapter being
    that folder or its export/ (a LoRA run trained there: `train.out_dir=<base export>/tasks/loop`).
    A folder named after no task is a one-line error (its adapter would never be used)."""
    from cascade.conditions import TASKS
    from cascade.stages.common import TASKS_DIR
    root = Path(export) / TASKS_DIR
    found = {p.name: p for p in sorted(root.iterdir()) if p.is_dir()} if root.is_dir() else {}
    for name in found:
        if name not in TASKS:
            raise ConfigError(f"{root / name}: not a task ({', '.join(TASKS)}); a task adapter's "
                              f"folder is named after the task it is used for")
    return {k: p / "export" if (p / "export").is_dir() else p for k, p in found.items()}


@dataclass
class Result:
    """What a pipeline call returns. Videos are float (N, 3, T, H, W) in [-1, 1], on the CPU.

    stages: every stage's output, name -> tensor:
        keyframes_latent  the base stage's latent keyframes (N, Cz, Kb, h, w)
        keyframes         those keyframes decoded (at the base frame rate)
        interp_latent     the interp stage's latent frames (N, Cz, (Kb-1)*r^passes + 1, h, w)
        interp            those frames decoded                          (only when interp ran)
        lowres            the video before super-resolution (= interp, or keyframes without interp)
                          (interp and lowres of an extend or connect, unless keep_input: the
                          written frames, the input's decoded with the clip's; `with_input`)
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


# ----------------------------------------------------------------------------- the pipeline

class Pipeline:
    """`Pipeline(folder)(prompt)` -> Result with the decoded frames and every stage's output.

    Pipeline(folder, device, use_interp=None, use_sr=None): vae and base are required; interp and
    sr are loaded when their folders hold an export (None = auto), skipped when False, and required
    when True (FileNotFoundError naming the stage). Each stage is the class `cascade train` trains
    (cascade/stages/), built from its export: `pipe.base`, `pipe.interp`, `pipe.sr` (None when not
    loaded) and `pipe.vae_stage`; `pipe.vae` is the VAE network. Stages that share a text encoder
    (the same text.encoder and text.max_length, the usual case) share one instance
    (`pipe.encoders`), and each prompt is encoded once per call for all of them."""

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu",
                 use_interp: bool | None = None, use_sr: bool | None = None,
                 adapters: list | None = None):
        self.device = torch.device(device)
        self.folder = Path(folder)
        self.vae_stage = VAEStage.from_export(stage_folder(folder, "vae"), self.device)
        self.vae, self.vae_cfg = self.vae_stage.net, self.vae_stage.cfg
        self.encoders: dict[tuple, torch.nn.Module] = {}          # text_key -> shared TextEncoder
        self.base = BaseStage.from_export(stage_folder(folder, "base"), self.device, self.encoders)
        self.base_cfg = self.base.cfg
        self.text = self.base.text
        self.interp = self.sr = None
        for name, use, cls in (("interp", use_interp, InterpStage), ("sr", use_sr, SRStage)):
            if use or (use is None and has_stage(folder, name)):
                setattr(self, name, cls.from_export(stage_folder(folder, name), self.device,
                                                    self.encoders))
        self.interp_keyframes = self.interp.keyframes if self.interp is not None else None  # K
        self.task_nets: dict[tuple, torch.nn.Module] = {}            # (stage, task) -> net, adapter folded in
        for adapter in adapters or []:                               # (folder, scale) or a folder
            self.add_adapter(*((adapter, 1.0) if isinstance(adapter, (str, Path)) else adapter))
        self.task_adapters = {(name, task): path for name in ("base", "interp", "sr")
                              if getattr(self, name) is not None
                              for task, path in task_adapters(stage_folder(folder, name)).items()}
        if self.interp is not None:
            icfg = self.interp.cfg
            if icfg.dit.in_channels != self.base_cfg.dit.in_channels:
                raise ConfigError(f"{self.folder}/interp: dit.in_channels={icfg.dit.in_channels} does "
                                  f"not match the base stage's latents ({self.base_cfg.dit.in_channels})")

    def add_adapter(self, path: str | Path, scale: float = 1.0) -> str:
        """Fold a LoRA adapter (cascade/adapters.py) into the stage it was trained for, at
        `scale`; refused in one line when this pipeline's stage is another stage, architecture or
        export than the one it was trained on. -> the stage's name."""
        from cascade.adapters import merge, read_adapter
        import json
        meta_path = Path(path) / "cascade_adapter.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"--adapter {path}: not an adapter folder (no cascade_adapter.json)")
        name = json.loads(meta_path.read_text())["stage"]
        stage = getattr(self, name, None) if name != "vae" else None
        if stage is None:
            raise ValueError(f"adapter {path} is for the '{name}' stage, which {self.folder} does not "
                             f"load")
        _, config, tensors = read_adapter(path, stage.cfg, stage_folder(self.folder, name))
        net = stage.net
        net.load_state_dict(merge(net.state_dict(), config, tensors, scale))
        self.task_nets.clear()                                       # task nets start from this one
        return name

    @contextmanager
    def task_weights(self, task: str, name: str = "base"):
        """Stage `name` with its task adapter folded in while the block runs, where its export has
        one for `task` (STAGE/tasks/TASK, `task_adapters`); the stage as it is otherwise. The
        text-only output never changes: a task adapter is trained on that task's clips alone (loop:
        `data.loops=1`, every clip a loop; the base gives it its first and last frame) and used
        only there."""
        path = self.task_adapters.get((name, task))
        if path is None:
            yield
            return
        stage = getattr(self, name)
        if (name, task) not in self.task_nets:                       # once per pipeline
            import copy

            from cascade.adapters import merge, read_adapter
            _, config, tensors = read_adapter(path, stage.cfg, stage_folder(self.folder, name))
            net = copy.deepcopy(stage.net)
            net.load_state_dict(merge(net.state_dict(), config, tensors))
            self.task_nets[name, task] = net
        plain, stage.net = stage.net, self.task_nets[name, task]
        try:
            yield
        finally:
            stage.net = plain

    @property
    def fps(self) -> float:
        """The base stage's frame rate (of its keyframes)."""
        return self.base_cfg.data.fps

    @property
    def stages(self) -> list[str]:
        """The stages this pipeline runs, in order."""
        return ["base"] + ["interp"] * (self.interp is not None) + ["vae"] + ["sr"] * (self.sr is not None)

    def diffusion_stages(self) -> list:
        """The loaded diffusion stage objects, in cascade order (base, then interp, sr if loaded)."""
        return [s for s in (self.base, self.interp, self.sr) if s is not None]

    def encode(self, prompts: list[str]) -> dict[tuple, tuple[dict, dict]]:
        """Each prompt encoded once per distinct text encoder: {text_key: (cond, uncond)}."""
        return {key: enc.encode_text(prompts) for key, enc in
                {s.text_key: s for s in self.diffusion_stages()}.items()}

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
                 batch_size: int = 1, progress: bool = True,
                 conditions: Conditions | None = None) -> Result:
        """Sample `num_videos` videos per prompt: text -> base -> interp -> VAE decode -> sr.

        conditions: what every video is prompted with besides text (cascade/conditions.py: an
        image to animate, a video to extend / connect / edit, a loop); None is text only. Its
        given frames go to every stage (`_given`); the video returned holds the extended or
        connected input too.

        steps / guidance / sampler apply to every diffusion stage; `base`, `interp`, `sr`
        (StageSampling or a dict of the same fields) override them per stage; whatever is None
        falls back to that stage's config.diffusion (`sampling.resolve_sampling`).

        interp_passes: 1 (default when the interp stage is loaded) multiplies the frame rate by
        its rate r, 2 by r^2 (pass 2 interpolates the output of pass 1), 0 skips interp.
        frames: the output's frame count; None = the base stage's trained keyframe count. More
        keyframes than the base's window make a long video: base={"long": "plan"} (the default,
        `diffusion.long`) lays the whole video's course down in a first window and fills between,
        "chain" continues window after window (`stages.base.window_schedule`); frame prompts
        (extend, connect) always chain from their given frames.
        height, width: the output's size in pixels; None = what the trained base latents give
        (`latent_size_for` says which sizes a cascade can make).

        Frame counts: the base stage samples Kb latent keyframes; one interp pass makes
        (Kb-1)*r + 1 frames of them (`InterpStage.sample`: groups of the model's K keyframes,
        8 keyframes, K=3, r=4 -> 29 frames), pass 2 (Kb-1)*r^2 + 1 (113); interp needs Kb >= K.
        The VAE then decodes T latent frames to 1 + s*(T-1). How interp and sr are conditioned:
        `InterpStage.sample`, `SRStage.sample`.

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
        passes = self._check_call(num_videos, batch_size, frames, interp_passes)
        call = StageSampling(steps, guidance, sampler).check()
        sampling = {name: resolve_sampling(StageSampling.of(v).check(f"{name}."), call)
                    for name, v in (("base", base), ("interp", interp), ("sr", sr))}
        if frames is not None and conditions is None:
            self.keyframes_for(frames, passes)                      # an unreachable count: its error
        size = self.latent_size_for(height, width)                  # (h, w) base latents
        plan = self.plan(conditions or Conditions(), passes, size, frames)
        kb = self.keyframes_for(plan.length, passes)
        given = self._given(plan, passes, kb)
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

        parts = [self._run(chunk, seed, kb, size, passes, sampling, step, bar, progress, plan, given)
                 for chunk in chunks]
        bar.close()
        stages = {k: torch.cat([part[k] for part in parts]).float().cpu() for k in parts[0]}
        fps = self.fps * (self.interp.cfg.interp.rate ** passes if passes else 1)
        stage_fps = {k: fps for k in stages}
        stage_fps["keyframes"] = stage_fps["keyframes_latent"] = self.fps
        return Result(video=stages["final"], prompts=[p for p, _ in videos], stages=stages,
                      timings=meter.timings, memory=meter.memory, memory_kind=meter.kind, fps=fps,
                      stage_fps=stage_fps)

    # ------------------------------------------------------------------------- frame prompts

    def reachable(self, n: int, passes: int) -> int:
        """The smallest frame count >= n this cascade makes with `passes` interp passes."""
        s = self.vae.temporal_factor
        step = s * (self.interp.cfg.interp.rate ** passes if passes else 1)
        k_min = max(self.interp_keyframes, 2) if passes else 1
        kb = max(k_min, -(-(max(n, 1) - 1) // step) + 1)
        kb += -kb % self.base_cfg.dit.patch_t
        return 1 + step * (kb - 1)

    def plan(self, conditions: Conditions, passes: int, size: tuple, frames: int | None = None):
        """The call's conditions resolved against this cascade (`conditions.plan`): frame counts,
        the given frames at the output size (size: the base latent (h, w))."""
        from cascade.conditions import plan
        s = self.vae.temporal_factor
        step = s * (self.interp.cfg.interp.rate ** passes if passes else 1)
        f = self.vae.spatial_factor * (self.sr.cfg.sr.scale if self.sr is not None else 1)
        context = min(self.base_cfg.cond.k_max, self.base_cfg.dit.frames - 1) \
            if self.base.frame_prompts else 1
        default = 1 + step * (self.base_cfg.dit.frames - 1)
        out = plan(conditions, lambda n: self.reachable(n, passes), step, context, default,
                   (size[0] * f, size[1] * f), frames)
        if (out.given or out.loop or out.source is not None) and not self.base.frame_prompts \
                and out.source is None:
            raise ValueError(f"{conditions.task}: the base stage in {self.folder} was not trained "
                             f"for frame prompts (dit.cond_frames=false); use one that was, such as "
                             f"the shipped weights/tiny")
        return out

    @torch.no_grad()
    def _given(self, plan, passes: int, kb: int) -> dict:
        """The plan's given frames for each stage: {"keys": (latents (1, Cz, Kb, h, w), mask
        (1, Kb)) for the base, "interp": [(latents, mask) per pass at its output frames],
        "lowres": (frames (1, 3, F, h', w'), mask (1, F)) the VAE output keeps, "final": the same
        at the output size for sr, "source": the edit's source keyframes (1, Cz, Kb, h, w)}.
        Each given image is brought to the low resolution as SR's training does and encoded on
        its own (Open-Sora 2.0: no leakage between frames); an output frame f is latent frame
        f / s, then base keyframe j / r^passes when that divides, else a known frame of the interp
        pass whose output first holds it."""
        s, F = self.vae.temporal_factor, plan.length
        r = self.interp.cfg.interp.rate if passes else 1
        low = self.lowres_of
        out = {}
        if plan.source is not None:
            lat = self.vae_stage.encode(low(plan.source[None].to(self.device)))  # (1, Cz, T', h, w)
            out["source"] = lat[:, :, ::r ** passes]
        if not plan.given:
            return out
        frames = torch.stack([plan.given[f] for f in sorted(plan.given)], 1)[None].to(self.device)
        lowres = low(frames)                                              # (1, 3, n, h', w')
        lat = torch.cat([self.vae_stage.encode(lowres[:, :, i:i + 1]) for i in range(lowres.shape[2])], 2)
        Cz, (h, w) = lat.shape[1], lat.shape[3:]
        keys = (lat.new_zeros(1, Cz, kb, h, w), lat.new_zeros(1, kb))
        n_out = [(kb - 1) * r ** (i + 1) + 1 for i in range(passes)]      # each pass's frames
        interp = [(lat.new_zeros(1, Cz, n, h, w), lat.new_zeros(1, n)) for n in n_out]
        full = (frames.new_zeros(1, 3, F, *frames.shape[3:]), frames.new_zeros(1, F))
        small = (lowres.new_zeros(1, 3, F, *lowres.shape[3:]), lowres.new_zeros(1, F))
        for i, f in enumerate(sorted(plan.given)):
            if f % s:
                raise ValueError(f"frames: frame {f} cannot be given: the VAE codes {s} frames in "
                                 f"one latent frame (give frames at multiples of {s})")
            j = f // s
            for buf, val in ((full, frames[:, :, i]), (small, lowres[:, :, i])):
                buf[0][:, :, f], buf[1][:, f] = val, 1
            level = next((p for p in range(passes + 1) if j % r ** (passes - p) == 0))
            if level == 0:                                                # a base keyframe
                keys[0][:, :, j // r ** passes], keys[1][:, j // r ** passes] = lat[:, :, i], 1
            else:                                                         # known to interp pass `level`
                k = j // r ** (passes - level)
                interp[level - 1][0][:, :, k], interp[level - 1][1][:, k] = lat[:, :, i], 1
        out.update(keys=keys if keys[1].any() else None, interp=interp, lowres=small, final=full)
        return out

    def _check_call(self, num_videos, batch_size, frames, interp_passes) -> int:
        """The call's counts checked (one-line ValueErrors naming them) -> the interp passes."""
        check_number("num_videos", num_videos, 1, MAX_VIDEOS, integer=True)
        check_number("batch_size", batch_size, 1, MAX_VIDEOS, integer=True)
        check_number("frames", frames, 1, MAX_FRAMES, integer=True)
        passes = (1 if self.interp is not None else 0) if interp_passes is None else interp_passes
        if passes not in (0, 1, 2):
            raise ValueError(f"interp_passes must be 0, 1 or 2, got {passes}")
        if passes and self.interp is None:
            raise ValueError(f"interp_passes={passes} needs the interp stage, which this pipeline "
                             f"did not load (no {self.folder}/interp, or use_interp=False)")
        return passes

    def _run(self, videos: list[tuple], seed: int, kb: int, size: tuple[int, int], passes: int,
             sampling: dict, step, bar, progress: bool, plan=None, given=None) -> dict:
        """The cascade on one batch of videos [(prompt, index)] -> {stage output name: tensor}
        (see Result.stages); step(name) meters a stage, bar counts them. plan, given: the frame
        prompt (`plan`, `_given`), the same for every video."""
        prompts = [p for p, _ in videos]
        B, given = len(prompts), given or {}
        keep = plan is None or plan.keep_input                       # given frames written unchanged
        rows = lambda pair: None if pair is None else tuple(  # noqa: E731  (batch 1 -> B)
            t.expand(B, *t.shape[1:]) for t in pair)

        def streams(purpose: str) -> RowGenerators:                 # one stream per video and purpose
            return RowGenerators.keyed([(seed, p, k, purpose) for p, k in videos])

        out: dict[str, torch.Tensor] = {}
        task = "loop" if plan is not None and plan.loop else None    # the tasks with adapters
        with step("base"):                                           # text encoded once per prompt
            conds = self.encode(prompts)
            shape = (B, self.base_cfg.dit.in_channels, kb, *size)
            keys = rows(given.get("keys"))
            if plan is not None and plan.loop:                       # the last keyframe is the first
                if keys is None:                                     # from a text-only first pass
                    first = self.base.sample(shape, *conds[self.base.text_key], sampling["base"],
                                             streams("loop first keyframe"), progress)
                    keys = (torch.zeros(shape, device=first.device), first.new_zeros(B, kb))
                    keys[0][:, :, 0], keys[1][:, 0] = first[:, :, 0], 1
                keys = (keys[0].clone(), keys[1].clone())
                keys[0][:, :, -1], keys[1][:, -1] = keys[0][:, :, 0], 1
            start = reference = None
            if "source" in given:                                    # an edit of the source's keyframes
                source = rows((given["source"],))[0]
                start = (source, plan.strength)
                if plan.inversion == "ddim":                         # inverted with its own caption
                    sampling = {**sampling, "base": replace(StageSampling.of(sampling["base"]),
                                                            autoguidance=1.0)}  # as inverted
                    caption = self.base.encode_text([plan.caption] * B)
                    reference = SourceAttention(plan.inject) if plan.inject else None
                    start = (self.base.invert(source, *caption, sampling["base"], plan.strength,
                                              progress, reference), plan.strength, True)
            with self.task_weights(task):
                latents = self.base.sample(shape, *conds[self.base.text_key], sampling["base"],
                                           streams("base"), progress, keys, start,
                                           plan.backward if plan is not None else False, reference)
        bar.update()
        out["keyframes_latent"] = latents
        for i in range(passes):
            with step("interp"), self.task_weights(task, "interp"):
                known = rows(given["interp"][i]) if "interp" in given else None
                known = known if known is not None and known[1].any() else None
                latents = self.interp.sample(latents, *conds[self.interp.text_key], sampling["interp"],
                                             streams(f"interp pass {i}"), progress, known)
            bar.update()
        joint = not keep and self.vae.temporal_factor == 1 and any(  # the input decoded with the clip
            x is not None and x.shape[1] for x in (plan.prefix, plan.suffix))
        with step("vae"):
            video = self.vae_stage.decode(self.with_input(latents, plan) if joint else latents)
            out["keyframes"] = self.vae_stage.decode(out["keyframes_latent"]) if passes or joint else video
            if "lowres" in given and keep:                           # the given frames themselves
                frames, m = rows(given["lowres"])
                m = m.to(video)[:, None, :, None, None]
                video = m * frames.to(video) + (1 - m) * video
        bar.update()
        if passes:
            out["interp_latent"], out["interp"] = latents, video
        out["lowres"] = video
        if self.sr is not None:
            with step("sr"):
                video = self.sr.sample(video, *conds[self.sr.text_key], sampling["sr"], streams("sr"),
                                       progress, rows(given.get("final")) if keep else None)
            bar.update()                                             # (B, 3, T, sH, sW)
        if plan is None or joint:                                    # (B, 3, F, sH, sW): as written
            out["final"] = video
            return out
        around = {k: getattr(plan, k) for k in ("prefix", "suffix")}
        if not keep:                                                 # the input's frames rendered apart
            around = {k: v if v is None or not v.shape[1] else
                      self.render_input(v, conds, sampling["sr"], streams(f"render {k}"), progress)
                      for k, v in around.items()}
        out["final"] = self.assemble(video, plan, **around)
        return out

    def lowres_of(self, video: torch.Tensor) -> torch.Tensor:
        """Output-size frames (B, 3, T, H, W) -> the VAE's size, as SR's training brings them down."""
        from cascade.stages import downsample_video
        if self.sr is None:
            return video
        return downsample_video(video, self.sr.cfg.sr.scale, self.sr.cfg.sr.downsample)

    @torch.no_grad()
    def with_input(self, latents: torch.Tensor, plan) -> torch.Tensor:
        """The clip's latents (B, Cz, T, h, w) cut as written (`Plan.written`), with the input's frames
        (the plan's prefix / suffix) encoded before / after them: one latent video, decoded and
        super-resolved as one, so the input joins the new frames with no seam (the causal decoder
        and SR's overlapping windows see across the join). For a VAE without temporal compression,
        where latent frames are pixel frames; `render_input` renders the input apart otherwise."""
        B = latents.shape[0]
        enc = lambda x: self.vae_stage.encode(self.lowres_of(x[None].to(self.device))).expand(  # noqa: E731
            B, -1, -1, -1, -1)
        parts = [plan.written(latents)]
        if plan.prefix is not None and plan.prefix.shape[1]:
            parts.insert(0, enc(plan.prefix))
        if plan.suffix is not None and plan.suffix.shape[1]:
            parts.append(enc(plan.suffix))
        return torch.cat(parts, 2)                                   # (B, Cz, F, h, w)

    @torch.no_grad()
    def render_input(self, video: torch.Tensor, conds: dict, sampling, generator,
                     progress: bool) -> torch.Tensor:
        """Input frames (3, T, H, W) at the output size -> as the cascade renders its own
        (B, 3, T, H, W), B the rows of `conds`: brought to the low resolution as SR's training does,
        encoded, decoded (the VAE's error) and super-resolved (SR's), so that the frames written
        beside the cascade's have the same look (Conditions.keep_input). A VAE that codes s frames
        in one latent frame gets the first frame repeated in front to 1 + s k frames, cut after."""
        s, T = self.vae.temporal_factor, video.shape[1]
        pad = -(T - 1) % s
        x = self.lowres_of(torch.cat([video[:, :1].expand(-1, pad, -1, -1), video], 1)[None].to(self.device))
        x = self.vae_stage.decode(self.vae_stage.encode(x))                   # (1, 3, pad + T, h, w)
        cond, uncond = conds[self.sr.text_key] if self.sr is not None else conds[self.base.text_key]
        B = next(iter(cond.values())).shape[0]
        x = x.expand(B, -1, -1, -1, -1)
        if self.sr is not None:
            x = self.sr.sample(x, cond, uncond, sampling, generator, progress)  # (B, 3, pad + T, H, W)
        return x[:, :, pad:]

    @staticmethod
    def assemble(video: torch.Tensor, plan, prefix=None, suffix=None) -> torch.Tensor:
        """The cascade's frames (B, 3, F, H, W) -> the video written: cut to the frames asked for
        (extend: from the end when backward), the loop's repeated last frame dropped, the input's
        prefix / suffix frames put around it (given: as rendered, (B, 3, T, H, W); else the
        plan's own, unchanged)."""
        B = video.shape[0]
        prefix = plan.prefix if prefix is None else prefix
        suffix = plan.suffix if suffix is None else suffix
        parts = [plan.written(video)]
        rows = lambda x: (x if x.dim() == 5 else x[None]).to(video).expand(B, -1, -1, -1, -1)  # noqa: E731
        if prefix is not None and prefix.shape[-3]:
            parts.insert(0, rows(prefix))
        if suffix is not None and suffix.shape[-3]:
            parts.append(rows(suffix))
        return torch.cat(parts, 2)


def format_table(result: Result) -> str:
    """The closing table of a call: each stage's seconds and peak memory (MiB)."""
    lines = [f"{'stage':<8} {'seconds':>8} {'peak MiB':>9}"]
    for name, sec in result.timings.items():
        lines.append(f"{name:<8} {sec:8.2f} {result.memory.get(name, 0) / 2 ** 20:9.1f}")
    lines.append(f"peak memory: {result.memory_kind}")
    return "\n".join(lines)

