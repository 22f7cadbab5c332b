"""The `cascade` command: train a stage, train a whole cascade, sample a prompt to mp4, evaluate.

    cascade train configs/tiny/vae.yaml train.steps=500      one stage, DeepSpeed
    cascade train-cascade configs/cascade/tiny.yaml           every stage of a cascade, in order
    cascade export runs/tiny/base --out exports/base_now     a checkpoint's EMA weights, exported
    cascade merge-adapter adapters/x --stage weights/tiny/base --out merged/base   fold a LoRA in
    cascade data natural --out data/natural                  clips over shipped photographs (VAE)
    cascade serve                                             the local web app on 127.0.0.1:7860
    cascade plot runs/a runs/b --out loss.png                 loss curves side by side
    cascade tune clip.mp4 "a red circle moving left on a blue background" --out adapters/clip
    cascade edit clip.mp4 "a green circle moving left on a blue background" --adapter adapters/clip
    cascade sample "a red circle moving left on a blue background"
    cascade eval --stages runs/tiny --num-prompts 32 --out outputs/eval
    cascade cache configs/tiny/base.yaml --out caches/base     encode the data once (data.kind=cache)
    cascade caption videos/ --model PATH                      recaption a folder (DALL-E 3)
    cascade plan configs/cascade/gpu256.yaml --zero 3 --world 8   training memory per GPU

Errors a user can cause (a bad config key, a missing checkpoint, an empty prompt) end with one
line naming the problem and exit status 2.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from cascade.registry import EDIT_INJECT, LONG_MODES, SAMPLER_NAMES

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CASCADE = REPO / "configs" / "cascade" / "tiny_full.yaml"


@dataclass
class StageRun:
    config: str = ""                     # a stage YAML, relative to the repository root
    overrides: list[str] = field(default_factory=list)


@dataclass
class StageDefaults:
    """Sampling defaults of one later stage; None = the stage's own config.diffusion."""
    steps: Optional[int] = None
    guidance: Optional[float] = None
    sampler: Optional[str] = None


@dataclass
class SampleDefaults:
    """`cascade sample` defaults: steps / guidance / sampler of the base stage; interp and sr
    take theirs from their own sections (or their configs). Flags override all of them."""
    steps: int = 25
    guidance: float = 4.0
    sampler: str = "dpmpp_2m"
    interp: StageDefaults = field(default_factory=StageDefaults)
    sr: StageDefaults = field(default_factory=StageDefaults)


@dataclass
class CascadeConfig:
    """A cascade: where its stages live and the `cascade train` runs that make them, in order."""
    name: str = "tiny"
    stages_dir: str = "runs/tiny"
    weights_dir: str = ""                # the trained stages the repository ships (relative to it)
    train: list[StageRun] = field(default_factory=list)
    sample: SampleDefaults = field(default_factory=SampleDefaults)


def load_cascade(path) -> CascadeConfig:
    from cascade.config import load_config
    return load_config(path, schema=CascadeConfig)


def _run_config(run: StageRun, extra: list[str] = ()):
    from cascade.config import load_config
    return load_config(REPO / run.config if not Path(run.config).is_absolute() else run.config,
                       list(run.overrides) + list(extra))


def cascade_stages(cc: CascadeConfig) -> list[str]:
    """The stage names (vae, base, interp, sr) a cascade trains, in order, each once (a stage may
    take several runs, e.g. a continuation from an earlier run's export)."""
    return list(dict.fromkeys(_run_config(run).stage for run in cc.train))


def train_cascade(path, extra: list[str] = (), progress: bool = True,
                  only: list[str] | None = None) -> Path:
    """Run each stage's training in order (skipping stages whose export already exists, and
    stages not named in `only` when it is given)."""
    from cascade.train import train
    cc = load_cascade(path)
    for run in cc.train:
        cfg = _run_config(run, extra)
        if only is not None and cfg.stage not in only:
            continue
        if (Path(cfg.train.out_dir) / "export" / "model.safetensors").is_file():
            print(f"[{cfg.stage}] already trained: {cfg.train.out_dir}/export")
            continue
        print(f"[{cfg.stage}] cascade train {run.config} {' '.join(run.overrides)}")
        train(cfg, progress=progress)
    return Path(cc.stages_dir)


def find_stages(args, cc: CascadeConfig, wanted: set[str], train: bool = True) -> Path:
    """Where sampling reads its stages: --stages when given; else the cascade's stages_dir when it
    holds every wanted stage (the user's own training); else the shipped weights_dir when it does;
    else stages_dir, trained on first use (once; later runs reuse it) when `train`, or an error."""
    from cascade.pipeline import has_stage
    if args.stages is not None:
        return Path(args.stages)
    stages = Path(cc.stages_dir)
    need = [s for s in cascade_stages(cc) if s in wanted]
    if all(has_stage(stages, s) for s in need):
        return stages
    shipped = REPO / cc.weights_dir if cc.weights_dir else None
    if shipped is not None and all(has_stage(shipped, s) for s in need):
        print(f"using the trained {cc.name} stages shipped in {shipped} "
              f"(yours go to {stages}: cascade train-cascade <cascade yaml>)")
        return shipped
    missing = [s for s in need if not has_stage(stages, s)]
    if not train:
        raise FileNotFoundError(f"no trained {', '.join(missing)} stage(s) in {stages} nor in the "
                                f"shipped weights: pass --stages, or train with cascade train-cascade")
    print(f"no trained {', '.join(missing)} stage(s) in {stages}: training the {cc.name} "
          f"cascade first (once; later samples reuse it)")
    train_cascade(args.cascade, only=missing)
    return stages


def cmd_train(args) -> None:
    from cascade.config import load_config
    from cascade.train import train
    train(load_config(args.config, args.overrides), progress=not args.no_progress)


def cmd_export(args) -> None:
    from cascade.train import export_checkpoint
    export_checkpoint(args.run, args.out, args.step)


def cmd_tune(args) -> None:
    """`cascade tune VIDEO CAPTION --out DIR`: a one-shot LoRA adapter of the base (Tune-A-Video)."""
    from cascade.pipeline import stage_folder
    from cascade.tuning import tune
    cc = load_cascade(args.cascade)
    stages = find_stages(args, cc, {"vae", "base"}, train=False)
    out = tune(args.video, args.caption, args.out, stage_folder(stages, "base"),
               stage_folder(stages, "vae"), steps=args.steps, rank=args.rank, lr=args.lr,
               seed=args.seed, progress=not args.no_progress)
    print(f"wrote {out} (cascade edit {args.video} \"<edited prompt>\" --adapter {out})")


def cmd_edit(args) -> None:
    """`cascade edit VIDEO PROMPT`: the video edited with the prompt through the cascade (DDIM
    inversion from its caption, or SDEdit), the edit and a contact sheet of input and edit."""
    import torch

    from cascade.adapters import parse_adapter_arg
    from cascade.conditions import Conditions, fit
    from cascade.pipeline import Pipeline, format_table
    from cascade.tuning import tuned_caption
    from cascade.video_io import contact_sheet, read_video_tensor, resample_fps, write_mp4
    check_sampling_args(args)
    prompt = read_prompts(argparse.Namespace(prompt=[args.prompt], prompt_file=None))[0]
    out = writable_folder(args.out)
    video, rate = read_video_tensor(args.video)
    adapters = [parse_adapter_arg(a) for a in args.adapter or []]
    caption = args.caption or next((c for c in (tuned_caption(a) for a, _ in adapters) if c), None)
    inject = args.inject if args.inject is not None else EDIT_INJECT if args.inversion == "ddim" else 0.0
    conditions = Conditions.edit(video, args.strength, args.inversion, caption, inject)  # checks first
    cc = load_cascade(args.cascade)
    stages = find_stages(args, cc, {"vae", "base", "interp", "sr"})
    pipe = Pipeline(stages, "cuda" if torch.cuda.is_available() else "cpu", adapters=adapters)
    passes = 1 if pipe.interp is not None else 0
    fps = pipe.fps * (pipe.interp.cfg.interp.rate ** passes if passes else 1)
    conditions.video = resample_fps(video, rate, fps)
    per_stage = resolve_sampling(args, cc)
    if args.inversion == "ddim" and per_stage["base"].sampler != "ddim":
        per_stage["base"].sampler = "ddim"                 # the inverse of the inversion
    res = pipe(prompt, seed=args.seed, **per_stage, frames=args.frames, conditions=conditions,
               progress=not args.no_progress)
    name = f"edit_{slug(prompt)}"
    path = write_mp4(res.video[0], out / f"{name}.mp4", fps=res.fps)
    src = fit(conditions.video[:, :res.video.shape[2]], *res.video.shape[3:])
    sheet = contact_sheet([src, res.video[0]], out / f"{name}.png",
                          captions=[f"input: {caption or args.video}", f"edit: {prompt}"])
    print(f"wrote {path}\nwrote {sheet}")
    print(format_table(res))


def cmd_plot(args) -> None:
    """`cascade plot RUN... --out loss.png`: loss curves from the runs' log.csv; with
    `--eval STEP=EVAL_DIR ...`: the eval's accuracies against training steps; with `--samples`:
    one preview of every sample sheet of a run, stacked over steps."""
    from cascade.dashboard import learning_sheet, plot_eval_curve, plot_runs
    if args.samples:
        if len(args.runs) != 1:
            raise ValueError("cascade plot --samples: give one RUN folder")
        print(f"wrote {learning_sheet(args.runs[0], args.out, args.row)}")
    elif args.eval:
        points = {}
        for item in args.eval:
            step, sep, folder = item.partition("=")
            if not sep or not step.isdigit():
                raise ValueError(f"--eval: '{item}' is not STEP=EVAL_DIR")
            points[int(step)] = folder
        print(f"wrote {plot_eval_curve(points, args.out)}")
    elif not args.runs:
        raise ValueError("cascade plot: give RUN folders or --eval STEP=EVAL_DIR")
    else:
        print(f"wrote {plot_runs(args.runs, args.out, tuple(args.columns.split(',')), args.smooth)}")


def cmd_serve(args) -> None:
    """`cascade serve`: the local web app (cascade/serve.py) over the cascade's stages."""
    from cascade.serve import serve
    cc = load_cascade(args.cascade)
    stages = find_stages(args, cc, {"vae", "base", "interp", "sr"})
    sampling = {k: vars(v) for k, v in resolve_sampling(args, cc).items()}
    print(f"cascade serve: http://{args.host}:{args.port} (stages {stages}; Ctrl-C stops)")
    serve(stages, sampling, host=args.host, port=args.port)


def cmd_data(args) -> None:
    """`cascade data natural|lavfi --out DIR`: clip folders no one here drew (cascade/data/natural.py)."""
    from cascade.data.natural import PHOTOGRAPHS, TRAIN_PHOTOS, lavfi_clips, natural_clips
    if args.kind == "natural":
        out = natural_clips(args.out, seed=args.seed, per_photo=args.clips, progress=not args.no_progress,
                            train_photos=PHOTOGRAPHS if args.photographs_only else TRAIN_PHOTOS)
        print(f"wrote {out}/train.csv and {out}/val.csv (held-out photographs only in val)")
    else:
        out = lavfi_clips(args.out)
        print(f"wrote {out}/lavfi.csv")


def cmd_merge_adapter(args) -> None:
    """`cascade merge-adapter ADAPTER --stage EXPORT --out DIR`: a stage export with the adapter
    folded in (scale --scale), written as `cascade train` exports."""
    from cascade.adapters import merge, parse_adapter_arg, read_adapter
    from cascade.stages import load_export
    from cascade.train import export
    folder, scale = parse_adapter_arg(args.adapter)
    cfg, state = load_export(args.stage)
    _, config, tensors = read_adapter(folder, cfg, args.stage)
    out = export(cfg, merge(state, config, tensors, args.scale * scale), Path(args.out))
    print(f"wrote {out} ({args.stage} with {folder} at scale {args.scale * scale:g})")


def cmd_train_cascade(args) -> None:
    train_cascade(args.config, args.overrides, progress=not args.no_progress)


def read_prompts(args) -> list[str]:
    """The prompts of the command line, then those of --prompt-file (one a line; lines with
    nothing to read skipped), checked as the Pipeline checks them (cascade.text.check_prompts)."""
    from cascade.text import check_prompts, has_text
    prompts = list(args.prompt or [])
    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompt file not found: {path}")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise ValueError(f"prompt file {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        kept = [ln.strip() for ln in lines if has_text(ln)]
        if len(kept) < len(lines):
            print(f"{path}: skipped {len(lines) - len(kept)} empty line(s)")
        prompts += kept
    if not prompts:
        raise ValueError("empty prompt: give a prompt or --prompt-file")
    return check_prompts(prompts)


def _stage_sampling(args, stage: str):
    """--<stage>-steps/-guidance/-sampler; None where not given (then --steps etc. apply)."""
    from cascade.sampling import StageSampling
    return StageSampling(*(getattr(args, f"{stage}_{k}") for k in ("steps", "guidance", "sampler")))


def resolve_sampling(args, cc: CascadeConfig) -> dict:
    """{stage: StageSampling} for base, interp, sr. Each stage: --<stage>-* > --steps/--guidance/
    --sampler > the cascade's sample defaults (its `sample` section for base, sample.interp /
    sample.sr) > the stage's own config (the None left over: `sampling.resolve_sampling`)."""
    from cascade.sampling import StageSampling, resolve_sampling as resolve
    every = StageSampling(args.steps, args.guidance, args.sampler)
    defaults = {"base": StageSampling(cc.sample.steps, cc.sample.guidance, cc.sample.sampler),
                "interp": StageSampling(**vars(cc.sample.interp)),
                "sr": StageSampling(**vars(cc.sample.sr))}
    out = {name: resolve(_stage_sampling(args, name), every, default)
           for name, default in defaults.items()}
    if getattr(args, "autoguidance", None) is not None:
        out["base"].autoguidance = args.autoguidance
    if getattr(args, "long", None) is not None:
        out["base"].long = args.long
    if getattr(args, "image_guidance", None) is not None:
        out["base"].image_guidance = args.image_guidance
    if getattr(args, "window_steps", None) is not None:
        out["base"].window_steps = args.window_steps
    return out


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """--steps/--guidance/--sampler (every stage) and --<stage>-steps/-guidance/-sampler."""
    samplers = SAMPLER_NAMES
    p.add_argument("--steps", type=int, help="sampling steps of every stage")
    p.add_argument("--guidance", type=float, help="guidance scale of every stage")
    p.add_argument("--sampler", choices=samplers, help="sampler of every stage")
    for stage in ("base", "interp", "sr"):
        p.add_argument(f"--{stage}-steps", type=int, help=f"the {stage} stage's steps")
        p.add_argument(f"--{stage}-guidance", type=float, help=f"the {stage} stage's guidance")
        p.add_argument(f"--{stage}-sampler", choices=samplers, help=f"the {stage} stage's sampler")
    p.add_argument("--autoguidance", type=float, help="the base's autoguidance weight: its guide "
                   "model (base/guide) steers away from its errors; 1 = off (default: the base "
                   "config's diffusion.autoguidance)")
    p.add_argument("--image-guidance", type=float, help="image scale of the base's three-way "
                   "guidance when frames are given (default: the base config's cond.image_guidance)")
    p.add_argument("--long", choices=LONG_MODES, help="a text-only video longer than the base's "
                   "window: plan (its keyframes spread over the whole video first, then filled "
                   "between) or chain (window after window, each continuing the last) (default: the "
                   "base config's diffusion.long; --extend and --connect chain from their frames)")
    p.add_argument("--window-steps", type=int, help="a long video's base windows after the first "
                   "sample with these steps (default: the base config's diffusion.window_steps; "
                   "0 there: the base's steps)")


MAX_SIZE = 16384        # pixels of `cascade sample --height / --width`


def check_sampling_args(args) -> None:
    """Sampling numbers a user can mistype, checked before anything is loaded or allocated:
    finite, in range (the Pipeline's own bounds); one-line ValueError naming the flag."""
    from cascade.pipeline import MAX_FRAMES, MAX_VIDEOS
    from cascade.sampling import MAX_GUIDANCE, MAX_STEPS, check_number
    for stage in ("", "base_", "interp_", "sr_"):
        flag = "--" + stage.replace("_", "-")
        check_number(f"{flag}steps", getattr(args, f"{stage}steps", None), 1, MAX_STEPS, integer=True)
        check_number(f"{flag}guidance", getattr(args, f"{stage}guidance", None), 0, MAX_GUIDANCE)
    check_number("--frames", getattr(args, "frames", None), 1, MAX_FRAMES, integer=True)
    for axis in ("height", "width"):
        size = getattr(args, axis, None)
        if size is not None and not 1 <= size <= MAX_SIZE:
            raise ValueError(f"--{axis}: must be 1..{MAX_SIZE} pixels, got {size}")
    check_number("--num-videos", getattr(args, "num_videos", None), 1, MAX_VIDEOS, integer=True)
    check_number("--extend", getattr(args, "extend", None), 1, MAX_FRAMES, integer=True)
    check_number("--image-guidance", getattr(args, "image_guidance", None), 0, MAX_GUIDANCE)
    check_number("--autoguidance", getattr(args, "autoguidance", None), 0, MAX_GUIDANCE)
    check_number("--window-steps", getattr(args, "window_steps", None), 1, MAX_STEPS, integer=True)
    strength = getattr(args, "strength", None)
    if strength is not None and not (math.isfinite(strength) and 0 < strength <= 1):
        raise ValueError(f"--strength: must be in (0, 1], got {strength}")


def writable_folder(path: str | Path, flag: str = "--out") -> Path:
    """Make the output folder and prove it takes a file, before any sampling: a path that is a
    file, or a folder that is read-only, is a one-line error naming it."""
    import tempfile
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{flag}: {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except (OSError, ValueError) as e:                 # ValueError: a NUL byte in the path
        raise ValueError(f"{flag}: cannot write to {out} ({getattr(e, 'strerror', None) or e})") from None
    return out


def read_frame_prompt(args):
    """The sample flags' frame prompt, read and checked before any model loads: the images and
    videos (with their frame rates) and the task; `conditions_from_args` finishes it once the
    output's frame rate is known. One-line errors for unreadable files and flags that do not go
    together. -> a dict of what was read, or None for text only."""
    from cascade.video_io import read_image, read_video_tensor
    uses = [name for name, on in (("--extend", args.extend is not None), ("--connect", args.connect),
                                  ("--strength", args.strength is not None), ("--loop", args.loop))
            if on]
    if len(uses) > 1:
        raise ValueError(f"{' and '.join(uses)}: choose one task")
    if args.backward and args.extend is None:
        raise ValueError("--backward: goes with --video ... --extend N")
    if (args.extend is not None or args.connect or args.strength is not None) and not args.video:
        raise ValueError(f"{uses[0]}: needs --video (the clip to {uses[0][2:]})")
    if args.video and not uses:
        raise ValueError("--video: say what to do with it: --extend N, --connect B.mp4 or --strength S")
    if (args.image or args.last_image) and uses and uses != ["--loop"]:
        raise ValueError(f"--image / --last-image: not with {uses[0]}")
    if args.loop and args.last_image:
        raise ValueError("--last-image: not with --loop (a loop ends on its first frame)")
    got = {"image": read_image(args.image) if args.image else None,
           "last": read_image(args.last_image) if args.last_image else None,
           "video": read_video_tensor(args.video) if args.video else None,
           "b": read_video_tensor(args.connect) if args.connect else None}
    if got["b"] is not None and got["b"][0].shape[2:] != got["video"][0].shape[2:]:
        (b, _), (a, _) = got["b"], got["video"]
        raise ValueError(f"--connect: {args.connect} is {b.shape[3]}x{b.shape[2]}, the --video "
                         f"{a.shape[3]}x{a.shape[2]}: connect clips of one size")
    return got if any(v is not None for v in got.values()) or args.loop else None


def conditions_from_args(args, got, fps: float):
    """`read_frame_prompt`'s inputs -> the Conditions (cascade/conditions.py), videos resampled
    to the output's `fps`; None for text only."""
    from cascade.conditions import Conditions
    from cascade.video_io import resample_fps
    if got is None:
        return None
    video = resample_fps(*got["video"], fps) if got["video"] is not None else None
    if args.extend is not None:
        c = Conditions.extend(video, args.extend, args.backward)
    elif args.connect:
        c = Conditions.connect(video, resample_fps(*got["b"], fps))
    elif args.strength is not None:
        c = Conditions.edit(video, args.strength)
    elif args.loop:
        c = Conditions.loop(got["image"])
    elif got["image"] is None:
        c = Conditions("i2v", {-1: got["last"]})
    else:
        c = Conditions.image_to_video(got["image"], got["last"])
    c.keep_input = args.keep_input
    return c


def cmd_sample(args) -> None:
    """`cascade sample`: check the flags, load the stages, extend the prompts if asked, sample, and
    write each video, its prompt and the contact sheet (one command's steps in order, ~65 lines)."""
    import torch

    from cascade.pipeline import Pipeline, format_table
    from cascade.video_io import contact_sheet, write_mp4
    check_sampling_args(args)
    prompts = read_prompts(args)
    out = writable_folder(args.out)
    frame_prompt = read_frame_prompt(args)
    extender = None
    if args.extend_prompt or args.extend_model:        # DALL-E 3 / Make-A-Video prompt extension
        from cascade.prompt_extend import PromptExtender
        extender = PromptExtender(args.extend_model)    # a bad --extend-model fails before loading
        if extender.lm is None:
            for p in prompts:                          # so does a prompt the rules cannot extend
                extender(p)
    cc = load_cascade(args.cascade)
    wanted = {"vae", "base"} | ({"interp"} if not args.no_interp else set()) \
        | ({"sr"} if not args.no_sr else set())
    stages = find_stages(args, cc, wanted)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tic = time.perf_counter()
    from cascade.adapters import parse_adapter_arg
    pipe = Pipeline(stages, device, use_interp=False if args.no_interp else None,
                    use_sr=False if args.no_sr else None,
                    adapters=[parse_adapter_arg(a) for a in args.adapter or []])
    per_stage = resolve_sampling(args, cc)
    passes = args.interp_passes if args.interp_passes is not None else (1 if pipe.interp else 0)
    rate = pipe.interp.cfg.interp.rate if pipe.interp is not None else 1
    conditions = conditions_from_args(args, frame_prompt, pipe.fps * rate ** passes)
    short = {}                                         # extended prompt -> the user's prompt
    if extender is not None:
        text = getattr(pipe, "text", None)             # the added words fit its max_length
        extended_prompts = []
        for p in prompts:
            e = extender(p, getattr(text, "tokenizer", None), getattr(text, "max_length", None))
            print(f"prompt: {p} -> {e}")
            short.setdefault(e, p)
            extended_prompts.append(e)
        prompts = extended_prompts
    res = pipe(prompts, seed=args.seed, num_videos=args.num_videos, batch_size=args.batch_size,
               **per_stage, interp_passes=args.interp_passes, frames=args.frames,
               height=args.height, width=args.width, progress=not args.no_progress,
               conditions=conditions)
    if not torch.isfinite(res.video).all():            # never write black videos over good ones
        raise ValueError(f"sampling gave non-finite values (check the sampling flags and the "
                         f"stages in {stages}); nothing was written to {out}")
    paths, extended = [], []
    for i, (video, prompt) in enumerate(zip(res.video, res.prompts)):
        name = f"{i:03d}_{slug(short.get(prompt, prompt))}"
        paths.append(write_mp4(video, out / f"{name}.mp4", fps=res.fps))
        if extender is not None:                  # the text the video was made from, beside it
            (out / f"{name}.txt").write_text(prompt + "\n")
            paths.append(out / f"{name}.txt")
            extended.append({"video": f"{name}.mp4", "prompt": short[prompt], "extended": prompt,
                             "extender": extender.name})
        if args.save_stages:                      # each stage's output, decoded, per video
            for stage in ("keyframes", "interp", "lowres", "final"):
                if stage in res.stages:
                    (out / name).mkdir(exist_ok=True)
                    paths.append(write_mp4(res.stages[stage][i], out / name / f"{stage}.mp4",
                                           fps=res.stage_fps[stage]))
    if extended:
        import json
        (out / "prompts.json").write_text(json.dumps(extended, indent=1) + "\n")
        paths.append(out / "prompts.json")
    sheet = contact_sheet(res.video, out / "contact_sheet.png", captions=res.prompts)
    for p in paths:
        print(f"wrote {p}")
    print(f"wrote {sheet}")
    print(format_table(res))
    print(f"total    {time.perf_counter() - tic:8.2f}   (loading included)")


def cmd_eval(args) -> None:
    import torch

    from cascade.evaluate import default_prompts, evaluate, markdown, write_report
    check_sampling_args(args)
    writable_folder(args.out)
    cc = load_cascade(args.cascade)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # the user's own prompts (each must be in the domain: evaluate checks) or the domain's
    prompts = args.prompt or default_prompts(args.num_prompts, args.seed)
    if args.task != "t2v":
        if args.videos_per_prompt != 1:
            raise ValueError("--videos-per-prompt: only for --task t2v")
        return eval_task(args, cc, prompts, device)
    report = evaluate(find_stages(args, cc, {"vae", "base"}, train=False), prompts,
                      seed=args.seed, sampling=resolve_sampling(args, cc), batch_size=args.batch_size,
                      heldout=args.heldout, lpips=args.lpips, device=device,
                      size=(args.height, args.width), progress=not args.no_progress,
                      videos_per_prompt=args.videos_per_prompt)
    print(markdown(report))
    for path in write_report(report, args.out):
        print(f"wrote {path}")


def eval_task(args, cc, prompts, device) -> None:
    """`cascade eval --task T`: cascade/evaluate_tasks.py's measures, a table, task.json and a
    contact sheet of the first videos in --out."""
    import json

    from cascade.evaluate import _plain
    from cascade.evaluate_tasks import evaluate_task
    from cascade.video_io import contact_sheet
    report = evaluate_task(find_stages(args, cc, {"vae", "base"}, train=False), args.task, prompts,
                           args.seed, resolve_sampling(args, cc), device, args.frames,
                           progress=not args.no_progress, methods=tuple(args.edit_methods.split(",")),
                           tune_steps=args.tune_steps, strengths=args.edit_strengths,
                           inject=args.inject)
    summary = report["summary"] if args.task in ("edit", "invert") else {args.task: report["summary"]}
    cols = sorted({k for row in summary.values() for k in row})
    print("| " + " | ".join(["run", *cols]) + " |\n|" + "---|" * (len(cols) + 1))
    for name, row in summary.items():
        print("| " + " | ".join([name, *(f"{row.get(c, float('nan')):.3f}" for c in cols)]) + " |")
    out = Path(args.out)
    (out / "task.json").write_text(json.dumps(_plain({k: v for k, v in report.items() if k != "videos"}),
                                              indent=1) + "\n")
    print(f"wrote {out / 'task.json'}")
    if report["videos"]:
        print(f"wrote {contact_sheet(report['videos'], out / 'samples.png', captions=report['prompts'][:len(report['videos'])])}")


def cmd_cache(args) -> None:
    from cascade.cache import build_cache
    from cascade.config import load_config
    cfg = load_config(args.config, args.overrides)
    out = args.out or f"{cfg.train.out_dir.rstrip('/')}_cache"
    build_cache(cfg, out, samples=args.samples, shard_size=args.shard_size,
                batch_size=args.batch_size, progress=not args.no_progress)


def cmd_caption(args) -> None:
    from cascade.caption import caption_folder
    caption_folder(args.folder, args.model, frames=args.frames, batch_size=args.batch_size,
                   out=args.out, manifest=args.manifest, mode=args.mode,
                   max_new_tokens=args.max_new_tokens, progress=not args.no_progress)


def slug(text: str, n: int = 40) -> str:
    s = "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")
    return "_".join(filter(None, s.split("_")))[:n]


def build_parser() -> argparse.ArgumentParser:
    """Every sub-command and flag of `cascade`, in one flat list that reads like --help (long by
    design: splitting it would scatter the flags of one command)."""
    p = argparse.ArgumentParser(prog="cascade", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train one stage with DeepSpeed")
    t.add_argument("config", help="a stage YAML, e.g. configs/tiny/vae.yaml")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(fn=cmd_train)
    ex = sub.add_parser("export", help="export the EMA weights of a run's checkpoint (the newest, "
                                       "or --step) while or after it trains")
    ex.add_argument("run", help="a train.out_dir")
    ex.add_argument("--out", required=True, help="the export folder to write")
    ex.add_argument("--step", type=int, help="the checkpoint's step (default: the newest intact one)")
    ex.set_defaults(fn=cmd_export)
    pt = sub.add_parser("plot", help="loss curves of one or several runs to a PNG, from their log.csv")
    pt.add_argument("runs", nargs="*", help="train.out_dir folders (or log.csv files)")
    pt.add_argument("--eval", action="append", metavar="STEP=EVAL_DIR",
                    help="instead: a cascade eval --out folder at a training step (repeat: a curve)")
    pt.add_argument("--samples", action="store_true", help="instead: one preview row of every "
                    "sample sheet the RUN wrote (train.sample_every), stacked over steps")
    pt.add_argument("--row", type=int, default=0, help="--samples: which preview (sheet row)")
    pt.add_argument("--out", default="outputs/loss.png")
    pt.add_argument("--columns", default="loss,lr", help="comma-separated log.csv columns, a panel each")
    pt.add_argument("--smooth", type=int, default=20, help="running-mean window in steps")
    pt.set_defaults(fn=cmd_plot)
    sv = sub.add_parser("serve", help="a local web app over the cascade: text to video and every "
                                      "task prompted with frames, per-stage settings, downloads")
    sv.add_argument("--stages", help="folder of exported stages (default: the cascade's)")
    sv.add_argument("--cascade", default=str(DEFAULT_CASCADE), help="cascade YAML (sampling defaults)")
    sv.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this "
                    "machine only; another address warns)")
    sv.add_argument("--port", type=int, default=7860)
    add_sampling_flags(sv)
    sv.set_defaults(fn=cmd_serve)
    da = sub.add_parser("data", help="build a clip folder: natural (camera moves over the "
                                     "photographs installed packages ship) or lavfi (ffmpeg's test patterns)")
    da.add_argument("kind", choices=("natural", "lavfi"))
    da.add_argument("--out", required=True, help="the folder to write (clips and manifests)")
    da.add_argument("--seed", type=int, default=0)
    da.add_argument("--clips", type=int, default=24, help="natural: training clips per photograph")
    da.add_argument("--photographs-only", action="store_true", help="natural: leave out the six "
                    "graphic images (text, page, checkerboard, colour wheel, logo, silhouette)")
    da.add_argument("--no-progress", action="store_true")
    da.set_defaults(fn=cmd_data)
    tu = sub.add_parser("tune", help="one-shot tuning (Tune-A-Video): a LoRA adapter of the base "
                                     "stage fitted to one captioned clip, for cascade edit")
    tu.add_argument("video", help="the clip (any size and frame rate)")
    tu.add_argument("caption", help="what the clip shows")
    tu.add_argument("--out", required=True, help="the adapter folder to write")
    tu.add_argument("--stages", help="folder of exported stages (default: the cascade's)")
    tu.add_argument("--cascade", default=str(DEFAULT_CASCADE), help="cascade YAML")
    tu.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    tu.add_argument("--rank", type=int, default=4, help="LoRA rank (default 4)")
    tu.add_argument("--lr", type=float, default=1e-3)
    tu.add_argument("--seed", type=int, default=0)
    tu.add_argument("--no-progress", action="store_true")
    tu.set_defaults(fn=cmd_tune)
    ed = sub.add_parser("edit", help="edit a video with a prompt: DDIM inversion (with --adapter "
                                     "from cascade tune) or SDEdit, through the whole cascade")
    ed.add_argument("video", help="the clip to edit")
    ed.add_argument("prompt", help="the edited prompt")
    ed.add_argument("--caption", help="the clip's own caption, which inversion uses (default: "
                                      "the one cascade tune recorded in --adapter)")
    ed.add_argument("--adapter", action="append", metavar="DIR[:SCALE]", help="LoRA adapter(s)")
    ed.add_argument("--inversion", choices=("ddim", "none"), default="ddim", help="ddim: invert "
                    "the clip with its caption, sample back with the prompt; none: SDEdit")
    ed.add_argument("--strength", type=float, default=1.0, help="the noise level the edit starts "
                    "from, in (0, 1] (default 1 with ddim inversion; SDEdit: try 0.6)")
    ed.add_argument("--inject", type=float, help="ddim inversion: the share of sampling steps, "
                    "from the noisy end, given the source's attention maps (Plug-and-Play, "
                    f"cascade/injection.py), keeping its layout and motion; 0: off (default {EDIT_INJECT})")
    ed.add_argument("--stages", help="folder of exported stages (default: the cascade's)")
    ed.add_argument("--cascade", default=str(DEFAULT_CASCADE), help="cascade YAML")
    ed.add_argument("--out", default="outputs")
    ed.add_argument("--seed", type=int, default=0)
    ed.add_argument("--frames", type=int, help="frames to edit (default: one clip)")
    add_sampling_flags(ed)
    ed.add_argument("--no-progress", action="store_true")
    ed.set_defaults(fn=cmd_edit)
    ma = sub.add_parser("merge-adapter", help="fold a LoRA adapter into the stage export it was "
                                              "trained on, writing a new export")
    ma.add_argument("adapter", help="the adapter folder (DIR or DIR:SCALE)")
    ma.add_argument("--stage", required=True, help="the stage export it adapts")
    ma.add_argument("--out", required=True, help="the merged export folder to write")
    ma.add_argument("--scale", type=float, default=1.0, help="the adapter's weight (default 1)")
    ma.set_defaults(fn=cmd_merge_adapter)
    tc = sub.add_parser("train-cascade", help="train every stage of a cascade, in order")
    tc.add_argument("config", nargs="?", default=str(DEFAULT_CASCADE))
    tc.add_argument("overrides", nargs="*", help="key=value overrides applied to every stage")
    tc.add_argument("--no-progress", action="store_true")
    tc.set_defaults(fn=cmd_train_cascade)
    s = sub.add_parser("sample", help="sample prompt(s) to mp4 + a PNG contact sheet")
    s.add_argument("prompt", nargs="*")
    s.add_argument("--prompt-file", help="one prompt per line (empty lines skipped)")
    s.add_argument("--stages", help="folder of exported stages (default: the cascade's, trained "
                                    "on first use)")
    s.add_argument("--cascade", default=str(DEFAULT_CASCADE), help="cascade YAML")
    s.add_argument("--out", default="outputs")
    s.add_argument("--seed", type=int, default=0)
    add_sampling_flags(s)
    s.add_argument("--num-videos", type=int, default=1)
    s.add_argument("--batch-size", type=int, default=1, help="videos sampled together (faster for "
                   "many; 1, the default, gives each video the same bytes in any command)")
    s.add_argument("--interp-passes", type=int, choices=(1, 2), help="run interp once (default) "
                   "or twice (frame rate x r^2)")
    s.add_argument("--height", type=int, help="output height in pixels (default: the trained size; "
                   "a multiple of the VAE x sr x patch factor, up to 4x the trained size)")
    s.add_argument("--width", type=int, help="output width in pixels (as --height)")
    s.add_argument("--frames", type=int, help="frames of the output video (default: what the base "
                   "stage was trained on, through interp)")
    s.add_argument("--image", help="animate this image: it is the video's first frame (any size "
                   "or mode; resized and centre-cropped to the output)")
    s.add_argument("--last-image", help="this image is the video's last frame (with --image: "
                   "first and last)")
    s.add_argument("--video", help="an input clip for --extend, --connect or --strength")
    s.add_argument("--extend", type=int, metavar="N", help="make N new frames after --video "
                   "(--backward: before it), written as one video with it")
    s.add_argument("--backward", action="store_true", help="--extend before the clip")
    s.add_argument("--connect", metavar="B", help="make the frames leading from the end of "
                   "--video to the start of this clip, written as one video")
    s.add_argument("--loop", action="store_true", help="a video that ends where it starts "
                   "(from --image when given)")
    s.add_argument("--keep-input", action="store_true", help="write the given image / video frames "
                   "unchanged (default: rendered by the VAE and SR like the cascade's own, so no "
                   "join shows)")
    s.add_argument("--strength", type=float, help="edit --video (SDEdit): noise it to this level "
                   "in (0, 1] and denoise with the prompt; low keeps more of it")
    s.add_argument("--adapter", action="append", metavar="DIR[:SCALE]", help="a LoRA adapter "
                   "(cascade train ... train.lora.rank=R, cascade tune) folded into its stage at "
                   "SCALE (default 1); repeat for several")
    s.add_argument("--no-interp", action="store_true", help="skip the interp stage")
    s.add_argument("--no-sr", action="store_true", help="skip the super-resolution stage")
    s.add_argument("--save-stages", action="store_true", help="also write each video's keyframes, "
                   "interp, lowres and final mp4s in a folder per video")
    s.add_argument("--extend-prompt", action="store_true", help="rewrite each prompt into a "
                   "detailed one first (DALL-E 3): with --extend-model, else rule-based for the "
                   "embedded domain; printed and saved beside the video")
    s.add_argument("--extend-model", help="a local causal LM folder (or cached hub name) for "
                   "--extend-prompt; implies it")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(fn=cmd_sample)
    e = sub.add_parser("eval", help="measure a trained cascade on the synthetic domain: prompt "
                                    "adherence, temporal consistency, per-stage quality, ablations")
    e.add_argument("--stages", help="folder of exported stages (default: the cascade's)")
    e.add_argument("--cascade", default=str(DEFAULT_CASCADE), help="cascade YAML (sampling defaults)")
    e.add_argument("--num-prompts", type=int, default=32, help="prompts covering the domain")
    e.add_argument("--seed", type=int, default=0, help="picks the prompts, the noise, the truth clips")
    e.add_argument("--prompt", action="append", help="evaluate this prompt instead of --num-prompts "
                   "of the domain's (repeatable; it must name a colour, shape, motion and background "
                   "the analyser reads)")
    e.add_argument("--videos-per-prompt", type=int, default=1, help="videos per prompt, those of "
                   "cascade sample --num-videos N: how often the cascade gets a prompt right")
    e.add_argument("--out", default="outputs/eval")
    add_sampling_flags(e)
    e.add_argument("--batch-size", type=int, default=8, help="prompts per pipeline call")
    e.add_argument("--height", type=int, help="sample at this output height (as cascade sample)")
    e.add_argument("--width", type=int, help="sample at this output width (as cascade sample)")
    e.add_argument("--heldout", type=int, default=8, help="held-out clips per stage for the "
                   "per-stage quality (0: skip it)")
    e.add_argument("--lpips", choices=("auto", "pretrained", "random", "off"), default="auto",
                   help="LPIPS trunk: auto = ImageNet VGG when in the torch hub cache, else random")
    e.add_argument("--task", default="t2v", choices=("t2v", "i2v", "extend", "connect", "loop",
                                                      "long", "edit", "invert"),
                   help="what to measure: text to video (default), or a frame-prompted task "
                        "(cascade/evaluate_tasks.py)")
    e.add_argument("--frames", type=int, help="--task long: the videos' frame count")
    e.add_argument("--edit-methods", default="sdedit,inversion,injected,tuned,tuned_injected",
                   help="--task edit: comma-separated sdedit, inversion, injected (inversion with the "
                   "source's attention, cascade edit --inject), tuned (Tune-A-Video: a LoRA per clip "
                   "first), tuned_injected")
    e.add_argument("--tune-steps", type=int, default=100, help="--task edit, tuned: LoRA steps per clip")
    e.add_argument("--edit-strengths", default="0.2,0.4,0.6,0.8,1.0",
                   type=lambda s: tuple(float(x) for x in s.split(",")),
                   help="--task edit: the SDEdit strengths (comma-separated, each in (0, 1])")
    e.add_argument("--inject", type=float, default=EDIT_INJECT, help="--task edit, injected and "
                   f"tuned_injected: the share of steps given the source's attention (default {EDIT_INJECT})")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(fn=cmd_eval)
    c = sub.add_parser("cache", help="encode a stage's data set once (VAE latents + text) for "
                                     "training with data.kind=cache")
    c.add_argument("config", help="a base or interp stage YAML, e.g. configs/tiny/base.yaml")
    c.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.seed=3")
    c.add_argument("--out", help="cache folder (default: <train.out_dir>_cache)")
    c.add_argument("--samples", type=int, help="samples to encode (default: every clip of a "
                   "folder; synthetic: the config's whole run, steps x batch x grad_accum)")
    c.add_argument("--shard-size", type=int, default=256, help="samples per shard")
    c.add_argument("--batch-size", type=int, help="clips per encoder call (default: train.batch_size)")
    c.add_argument("--no-progress", action="store_true")
    c.set_defaults(fn=cmd_cache)
    cap = sub.add_parser("caption", help="recaption a folder of videos with a local captioning "
                                         "model (DALL-E 3): a JSONL of new + original captions")
    cap.add_argument("folder", help="folder of videos (its captions.jsonl / .csv gives the originals)")
    cap.add_argument("--model", help="a local transformers image-to-text model folder or cached hub name")
    cap.add_argument("--manifest", help="manifest of the clips and their original captions "
                     "(default: captions.jsonl or captions.csv in the folder, else every video)")
    cap.add_argument("--frames", type=int, default=3, help="frames per clip, first to last")
    cap.add_argument("--mode", choices=("frames", "tile"), default="frames", help="caption each "
                     "frame and join, or tile the frames into one image")
    cap.add_argument("--batch-size", type=int, default=4, help="clips per generate call")
    cap.add_argument("--max-new-tokens", type=int, default=30)
    cap.add_argument("--out", help="output JSONL (default: <folder>/captions_recaptioned.jsonl)")
    cap.add_argument("--no-progress", action="store_true")
    cap.set_defaults(fn=cmd_caption)
    pl = sub.add_parser("plan", help="per-stage training memory per rank (parameters, optimizer "
                                     "state, measured activations) and which GPU sizes fit")
    pl.add_argument("config", help="a cascade YAML (every stage) or one stage YAML")
    pl.add_argument("--gpu-memory", default="24,80,141", help="GPU sizes in GiB, comma-separated")
    pl.add_argument("--zero", type=int, choices=(0, 1, 2, 3), help="ZeRO stage (default: each config's)")
    pl.add_argument("--sp", type=int, default=1, help="sequence-parallel degree (DiT stages)")
    pl.add_argument("--checkpointing", choices=("on", "off"), help="activation checkpointing "
                    "(default: each config's dit/unet.checkpoint)")
    pl.add_argument("--world", type=int, default=1, help="ranks (GPUs) in all")
    pl.add_argument("--batch", type=int, help="micro batch per rank (default: train.batch_size)")
    pl.set_defaults(fn=lambda a: __import__("cascade.plan", fromlist=["main"]).main(a))
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    # key=value overrides may come after flags; the deepspeed launcher may add --local_rank=N
    rest = [r for r in rest if not r.startswith("--local_rank")]
    extra = [r for r in rest if "=" in r and not r.startswith("-")]
    if len(extra) < len(rest) or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    from cascade.config import ConfigError
    import torch
    if not torch.cuda.is_available():
        from cascade.heap import keep_freed_memory
        keep_freed_memory()                          # large CPU tensors reuse freed pages (heap.py)
    try:
        args.fn(args)
    except (ConfigError, FileNotFoundError, ValueError, FloatingPointError) as e:
        print(f"cascade {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:                         # a full disk, a read-only folder: one line
        where = f"{e.filename}: " if e.filename else ""
        print(f"cascade {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    finally:
        leave_process_group()
    return 0


def leave_process_group() -> None:
    """Destroy the process group of a multi-process `cascade train` (a launched rank about to
    exit), so the gloo threads are joined before the interpreter exits: left to the exit, a rank
    of a 2-process run may abort after its work is done ("terminate called without an active
    exception"). A 1-process group stays: in-process callers (the tests) train again after main()
    returns, and DeepSpeed keeps its own handle on the group."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.destroy_process_group()               # no barrier: train() ends on one, and a failed
                                                   # rank must not wait for the others


if __name__ == "__main__":
    sys.exit(main())
