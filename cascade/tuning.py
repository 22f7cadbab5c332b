"""One-shot tuning (Tune-A-Video, Wu et al. 2023): a LoRA adapter on the base stage fitted to ONE
text-video pair, so that DDIM inversion of that video and sampling with an edited prompt keep its
layout and motion while the prompt changes what it says (cascade edit).

Tune-A-Video tunes the query projections of spatial and cross attention and a new temporal
attention (500 steps on Stable Diffusion). Our DiT has temporal attention already and fuses q, k
and v in one projection, so the default adapter sits on the self-attention projections (spatial
and temporal, "qkv") and the cross-attention queries ("q"), rank 4, trained with the project's own
trainer (`cascade train ... train.lora.rank`) on the one clip: its frames at the base's frame rate
and size, random starts within it, the caption dropped 10% of the time as in the base's training.
"""
from __future__ import annotations

import csv
import json
import shutil
import tempfile
from pathlib import Path

TUNE_TARGETS = ["qkv", "q"]
TUNED = "tuned_on"          # the key cascade_adapter.json keeps the clip and caption under


def tune(video: str | Path, caption: str, out: str | Path, base: str | Path, vae: str | Path,
         steps: int = 200, rank: int = 4, lr: float = 1e-3, batch_size: int = 4, seed: int = 0,
         run_dir: str | Path | None = None, progress: bool = True) -> Path:
    """Fit a LoRA adapter of the base export `base` (its latents from the VAE export `vae`) to
    the clip `video` captioned `caption`, and write it to `out` (cascade/adapters.py's format,
    with the clip and caption recorded for `cascade edit`). -> out."""
    from cascade.checksums import write_checksums
    from cascade.config import load_config
    from cascade.stages import load_export
    from cascade.text import check_prompts
    from cascade.train import train
    from cascade.video_io import read_video_tensor, resample_fps, write_mp4
    caption = check_prompts([caption])[0]
    cfg, _ = load_export(base, expect_stage="base")
    d = cfg.data
    clip, rate = read_video_tensor(video)
    clip = resample_fps(clip, rate, d.fps)
    from cascade.conditions import fit
    clip = fit(clip, d.height, d.width)                                    # (3, T, H, W)
    out = Path(out)
    run = Path(run_dir) if run_dir else Path(tempfile.mkdtemp(prefix=".tune-", dir=out.parent
                                                               if out.parent.exists() else None))
    data = run / "data"
    data.mkdir(parents=True, exist_ok=True)
    write_mp4(clip, data / "clip.mp4", fps=d.fps)
    with open(data / "captions.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", "caption"], ["clip.mp4", caption]])
    overrides = [
        "data.kind=folder", f"data.root={data}", f"data.manifest={data / 'captions.csv'}",
        "data.val_fraction=0.0", "data.buckets=[]", "data.image_fraction=0.0", "data.recaption_ratio=0.0",
        f"train.init_from={base}", f"train.vae_dir={vae}",
        f"train.out_dir={run / 'run'}", f"train.steps={steps}", f"train.batch_size={batch_size}",
        f"train.lr={lr}", "train.warmup=10", "train.schedule=constant", f"train.ckpt_every={steps}",
        "train.ema_decay=0.9", f"train.seed={seed}", f"train.lora.rank={rank}",
        f"train.lora.targets=[{','.join(TUNE_TARGETS)}]", "train.pack_tokens=0",
        "train.sequence_parallel=1", "train.zero_stage=0"]
    tcfg = load_config(Path(base) / "config.yaml", overrides)
    export = train(tcfg, progress=progress)
    meta = json.loads((export / "cascade_adapter.json").read_text())
    meta[TUNED] = {"video": str(video), "caption": caption, "steps": steps}
    (export / "cascade_adapter.json").write_text(json.dumps(meta, indent=1) + "\n")
    write_checksums(export)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(export, out)
    if not run_dir:
        shutil.rmtree(run, ignore_errors=True)
    return out


def tuned_caption(adapter: str | Path) -> str | None:
    """The caption an adapter from `tune` was fitted with (None for other adapters)."""
    meta = Path(adapter) / "cascade_adapter.json"
    if not meta.is_file():
        return None
    return json.loads(meta.read_text()).get(TUNED, {}).get("caption")
