"""Training dashboards: TensorBoard event files beside log.csv, sample sheets from the EMA weights
every train.sample_every steps, and `cascade plot` (loss curves of runs to a PNG from their logs).

The event files (RUN/tensorboard, `tensorboard --logdir RUN`) get every column of log.csv under
train/ (the loss and its terms, grad norm, learning rate, samples/s, NaN skips), the bucket
histogram once as text, and each sample sheet as an image. Rank 0 writes. A resumed run opens them
with purge_step = its first new step, so the steps after the checkpoint it resumes from, which it
trains again, are not shown twice (as log.csv is cut back).

Sample sheets (RUN/samples/stepNNNNNN.png): what the stage makes of fixed inputs, with the EMA
weights (what an export would hold): the VAE reconstructs held-out clips (truth above, its
reconstruction below), the base samples fixed prompts' keyframes (decoded by its VAE), interp
fills held-out clips' keyframes, SR upsamples held-out clips.
"""
from __future__ import annotations

import copy
import csv
import math
from pathlib import Path

import torch

PREVIEW = 4          # videos per sample sheet
PREVIEW_STEPS = 20   # sampling steps of the diffusion stages' previews


class Dashboard:
    """TensorBoard writer of one run (rank 0; a no-op elsewhere)."""

    def __init__(self, out: Path, start: int, enabled: bool):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=str(Path(out) / "tensorboard"),
                                        purge_step=start + 1 if start else None)

    def scalars(self, row: dict) -> None:
        if self.writer is None:
            return
        step = int(row["step"])
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                self.writer.add_scalar(f"train/{k}", v, step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def image(self, tag: str, png: Path, step: int) -> None:
        if self.writer is None:
            return
        import numpy as np
        from PIL import Image
        self.writer.add_image(tag, np.asarray(Image.open(png).convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


@torch.no_grad()
def preview(stage, cfg, ema_state: dict) -> tuple[torch.Tensor, list[str]]:
    """The stage's outputs on fixed inputs with the EMA weights -> (videos (N, 3, T, H, W), captions)."""
    from cascade.data import build_dataset
    from cascade.seeding import RowGenerators
    from cascade.stages import stage_network
    net = copy.deepcopy(stage.net) if cfg.train.lora.rank else stage_network(cfg)
    net.load_state_dict(ema_state)
    net.eval()
    dev = next(stage.net.parameters()).device
    net.to(dev)
    gens = RowGenerators(list(range(PREVIEW)))
    sampling = {"steps": PREVIEW_STEPS}
    if cfg.stage == "vae":
        data = build_dataset(cfg.data, split="val")
        clips = torch.stack([data[i]["video"] for i in range(PREVIEW)]).to(dev)
        recon = net(clips, sample=False)[0].clamp(-1, 1)
        return torch.cat([clips, recon]).cpu(), ["truth"] * PREVIEW + ["reconstruction"] * PREVIEW
    live = stage.net
    stage.net = net                                    # the stage's own sampling, EMA weights
    try:
        if cfg.stage == "base":
            from cascade.data.synthetic import balanced_prompts
            prompts = balanced_prompts(PREVIEW, 0) if cfg.data.kind == "synthetic" else \
                [build_dataset(cfg.data)[i]["caption"] for i in range(PREVIEW)]
            d = cfg.dit
            latents = stage.sample((PREVIEW, d.in_channels, d.frames, d.height, d.width),
                                   *stage.encode_text(prompts), sampling, gens, False)
            return stage.vae.decode_latents(latents).clamp(-1, 1).cpu(), prompts
        data = build_dataset(cfg.data, split="val")
        items = [data[i] for i in range(PREVIEW)]
        clips, captions = torch.stack([s["video"] for s in items]).to(dev), [s["caption"] for s in items]
        cond = stage.encode_text(captions)
        if cfg.stage == "interp":
            keys = stage.vae.encode_latents(clips)[:, :, ::stage.rate]
            out = stage.vae.decode_latents(stage.sample(keys, *cond, sampling, gens, False)).clamp(-1, 1)
        else:
            from cascade.stages import downsample_video
            low = downsample_video(clips, cfg.sr.scale, cfg.sr.downsample)
            out = stage.sample(low, *cond, sampling, gens, False)
        return out.cpu(), captions
    finally:
        stage.net = live


def sample_sheet(stage, cfg, ema_state: dict, out: Path, step: int, board: Dashboard) -> Path:
    """Write RUN/samples/stepNNNNNN.png (and show it in TensorBoard)."""
    from cascade.video_io import contact_sheet
    videos, captions = preview(stage, cfg, ema_state)
    path = contact_sheet(videos, Path(out) / "samples" / f"step{step:06d}.png", captions=captions)
    board.image("samples", path, step)
    return path


# ----------------------------------------------------------------------------- cascade plot

def read_log(path: Path) -> dict[str, list[float]]:
    """log.csv -> {column: values} (numbers only; a cut-off last row is skipped)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    cols: dict[str, list[float]] = {}
    for r in rows:
        try:
            vals = {k: float(v) for k, v in r.items() if v not in (None, "")}
        except ValueError:
            continue
        for k, v in vals.items():
            cols.setdefault(k, []).append(v)
    return cols


def save_figure(fig, out: str | Path) -> Path:
    """Write a matplotlib figure to a PNG (its folder made) and close it."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_runs(runs: list[str | Path], out: str | Path, columns=("loss", "lr"), smooth: int = 20) -> Path:
    """Loss curves (and the learning rate) of one or several runs (each a train.out_dir or its
    log.csv) side by side in one PNG: each column a panel, each run a line (a running mean of
    `smooth` steps over the raw values in light)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    logs = {}
    for run in runs:
        path = Path(run) / "log.csv" if Path(run).is_dir() else Path(run)
        if not path.is_file():
            raise FileNotFoundError(f"cascade plot: no log.csv in {run}")
        logs[str(run)] = read_log(path)
    cols = [c for c in columns if any(c in log for log in logs.values())]
    if not cols:
        raise ValueError(f"cascade plot: none of the runs logs {', '.join(columns)}")
    fig, axes = plt.subplots(1, len(cols), figsize=(5.5 * len(cols), 3.6), dpi=100, squeeze=False)
    for ax, col in zip(axes[0], cols):
        for name, log in logs.items():
            if col not in log:
                continue
            x, y = np.array(log["step"]), np.array(log[col])
            line, = ax.plot(x, y, alpha=0.25, lw=0.8)
            if len(y) >= smooth > 1:
                k = np.ones(smooth) / smooth
                ax.plot(x[smooth - 1:], np.convolve(y, k, "valid"), color=line.get_color(), lw=1.6,
                        label=Path(name).name or name)
            else:
                line.set_alpha(1.0)
                line.set_label(Path(name).name or name)
        ax.set_xlabel("step")
        ax.set_title(col)
        if col == "loss":
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    return save_figure(fig, out)



def plot_eval_curve(points: dict[int, str | Path], out: str | Path,
                    metrics=("colour", "shape", "motion", "one_object", "all")) -> Path:
    """The eval's accuracies against training steps (the evidence that more steps still help,
    issue 26): `points` maps a step to a `cascade eval --out` folder (its eval.json; the first
    variant, the full cascade as evaluated)."""
    import json

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = {}
    for step, folder in sorted(points.items()):
        path = Path(folder) / "eval.json" if Path(folder).is_dir() else Path(folder)
        if not path.is_file():
            raise FileNotFoundError(f"cascade plot: no eval.json in {folder}")
        rows[step] = json.loads(path.read_text())["variants"][0]
    fig, ax = plt.subplots(figsize=(6.5, 3.8), dpi=100)
    steps = list(rows)
    for m in metrics:
        ax.plot(steps, [rows[s][m] for s in steps], marker="o", label=m.replace("_", " "))
    ax.set_xlabel("training step")
    ax.set_ylabel("fraction of prompts")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return save_figure(fig, out)


def learning_sheet(run: str | Path, out: str | Path, row: int = 0) -> Path:
    """One preview's row of every sample sheet a run wrote (RUN/samples/stepNNNNNN.png, made every
    `train.sample_every` steps from the EMA weights), stacked in step order with the step beside
    each: the same prompt and noise at every step, so the picture is the model learning."""
    import re

    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    from cascade.config import load_config
    from cascade.video_io import SHEET_PAD
    run = Path(run)
    sheets = sorted((run / "samples").glob("step*.png"))
    if not sheets:
        raise FileNotFoundError(f"cascade plot --samples: no sample sheets in {run}/samples "
                                f"(train with train.sample_every=N)")
    n_rows = PREVIEW * (2 if load_config(run / "config.yaml").stage == "vae" else 1)
    if not 0 <= row < n_rows:
        raise ValueError(f"cascade plot --row: {row} is not a row of the {n_rows}-row sheets")
    strips = []
    for path in sheets:
        sheet = np.asarray(Image.open(path).convert("RGB"))
        h = (sheet.shape[0] - SHEET_PAD) // n_rows                          # caption + cell + pad
        strips.append(sheet[SHEET_PAD + row * h: SHEET_PAD + (row + 1) * h - SHEET_PAD])
    label_w, width = 64, max(s.shape[1] for s in strips)
    canvas = np.full((sum(s.shape[0] for s in strips), label_w + width, 3), 24, np.uint8)
    image = Image.fromarray(canvas)
    draw, font, y = ImageDraw.Draw(image), ImageFont.load_default(), 0
    for path, strip in zip(sheets, strips):
        image.paste(Image.fromarray(strip), (label_w, y))
        step = int(re.sub(r"\D", "", path.stem))
        draw.text((SHEET_PAD, y + strip.shape[0] // 2), f"{step:,}", fill=(235, 235, 235), font=font)
        y += strip.shape[0]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    return out
