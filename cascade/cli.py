"""The `cascade` command: train a stage, train a whole cascade, sample a prompt to mp4.

    cascade train configs/tiny/vae.yaml train.steps=500      one stage, DeepSpeed
    cascade train-cascade configs/cascade/tiny.yaml           every stage of a cascade, in order
    cascade sample "a red circle moving left on a blue background"

Errors a user can cause (a bad config key, a missing checkpoint, an empty prompt) end with one
line naming the problem and exit status 2.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CASCADE = REPO / "configs" / "cascade" / "tiny.yaml"


@dataclass
class StageRun:
    config: str = ""                     # a stage YAML, relative to the repository root
    overrides: list[str] = field(default_factory=list)


@dataclass
class SampleDefaults:
    steps: int = 25
    guidance: float = 4.0
    sampler: str = "dpmpp_2m"


@dataclass
class CascadeConfig:
    """A cascade: where its stages live and the `cascade train` runs that make them, in order."""
    name: str = "tiny"
    stages_dir: str = "runs/tiny"
    train: list[StageRun] = field(default_factory=list)
    sample: SampleDefaults = field(default_factory=SampleDefaults)


def load_cascade(path) -> CascadeConfig:
    from cascade.config import load_config
    return load_config(path, schema=CascadeConfig)


def train_cascade(path, extra: list[str] = (), progress: bool = True) -> Path:
    """Run each stage's training in order (skipping stages whose export already exists)."""
    from cascade.config import load_config
    from cascade.train import train
    cc = load_cascade(path)
    for run in cc.train:
        cfg = load_config(REPO / run.config if not Path(run.config).is_absolute() else run.config,
                          list(run.overrides) + list(extra))
        if (Path(cfg.train.out_dir) / "export" / "model.safetensors").is_file():
            print(f"[{cfg.stage}] already trained: {cfg.train.out_dir}/export")
            continue
        print(f"[{cfg.stage}] cascade train {run.config} {' '.join(run.overrides)}")
        train(cfg, progress=progress)
    return Path(cc.stages_dir)


def cmd_train(args) -> None:
    from cascade.config import load_config
    from cascade.train import train
    train(load_config(args.config, args.overrides), progress=not args.no_progress)


def cmd_train_cascade(args) -> None:
    train_cascade(args.config, args.overrides, progress=not args.no_progress)


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompt file not found: {path}")
        lines = path.read_text().splitlines()
        kept = [ln.strip() for ln in lines if ln.strip()]
        if len(kept) < len(lines):
            print(f"{path}: skipped {len(lines) - len(kept)} empty line(s)")
        prompts += kept
    if not prompts:
        raise ValueError("empty prompt: give a prompt or --prompt-file")
    for p in prompts:
        if not p.strip():
            raise ValueError("empty prompt: give the video a description")
    return prompts


def cmd_sample(args) -> None:
    import torch

    from cascade.pipeline import Pipeline, stage_folder
    from cascade.video_io import contact_sheet, write_mp4
    prompts = read_prompts(args)
    cc = load_cascade(args.cascade)
    stages = Path(args.stages or cc.stages_dir)
    if args.stages is None:
        try:
            stage_folder(stages, "base")
        except FileNotFoundError:
            print(f"no trained stages in {stages}: training the {cc.name} cascade first "
                  f"(once; later samples reuse it)")
            train_cascade(args.cascade)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tic = time.perf_counter()
    pipe = Pipeline(stages, device)
    res = pipe(prompts, seed=args.seed, steps=args.steps or cc.sample.steps,
               guidance=args.guidance if args.guidance is not None else cc.sample.guidance,
               sampler=args.sampler or cc.sample.sampler, num_videos=args.num_videos)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (video, prompt) in enumerate(zip(res.video, res.prompts)):
        path = out / f"{i:03d}_{slug(prompt)}.mp4"
        write_mp4(video, path, fps=pipe.fps)
        paths.append(path)
    sheet = contact_sheet(res.video, out / "contact_sheet.png", captions=res.prompts)
    for p in paths:
        print(f"wrote {p}")
    print(f"wrote {sheet}")
    print("stage    seconds")
    for name, sec in res.timings.items():
        print(f"{name:<8} {sec:7.2f}")
    print(f"total    {time.perf_counter() - tic:7.2f}")


def slug(text: str, n: int = 40) -> str:
    s = "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")
    return "_".join(filter(None, s.split("_")))[:n]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cascade", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train one stage with DeepSpeed")
    t.add_argument("config", help="a stage YAML, e.g. configs/tiny/vae.yaml")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(fn=cmd_train)
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
    s.add_argument("--steps", type=int)
    s.add_argument("--guidance", type=float)
    s.add_argument("--sampler", choices=("ddim", "dpmpp_2m", "euler_ancestral"))
    s.add_argument("--num-videos", type=int, default=1)
    s.set_defaults(fn=cmd_sample)
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
    try:
        args.fn(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"cascade {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
