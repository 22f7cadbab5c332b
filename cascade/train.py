"""Stage-by-stage training with DeepSpeed: `cascade train configs/<stage>.yaml key=value ...`.

One loop for every stage: deepspeed.initialize (ZeRO stage from config, gradient clipping,
bf16/fp16 on GPUs), an EMA of the network's weights, a progress bar with loss and throughput, a CSV
log, DeepSpeed checkpoints every N steps (resumed from the latest), and the EMA weights exported to
safetensors with the stage's YAML beside them for inference.

Runs on CPU (gloo, single process or under the `deepspeed` launcher) and on GPUs (nccl). The data a
process sees is fixed by (step, rank): global sample indices step*G + ... with G the global batch,
so 1 process and 2 processes train on the same samples.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
# DeepSpeed's import probes for CUDA and logs it; on a CPU machine that is noise, not news.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

import deepspeed  # noqa: E402
from deepspeed.utils import logger as ds_logger  # noqa: E402
import torch.distributed as dist  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from tqdm import tqdm  # noqa: E402

from cascade.config import StageConfig, save_config  # noqa: E402
from cascade.data import build_dataset, collate  # noqa: E402
from cascade.stages import StageLoss, build_stage, sample_generators  # noqa: E402


ds_logger.setLevel(logging.WARNING)                 # keep DeepSpeed's INFO lines off the progress bar


def init_distributed() -> tuple[int, int]:
    """Join (or create, for a plain single process) the process group: gloo on CPU, nccl on GPU."""
    if not dist.is_initialized():
        for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(k, v)
        if "MASTER_PORT" not in os.environ:
            import socket
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(s.getsockname()[1])
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   verbose=False)
    return dist.get_rank(), dist.get_world_size()


def ds_config(cfg: StageConfig, world: int) -> dict:
    t = cfg.train
    return {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.batch_size * t.grad_accum * world,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16"},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


class EMA:
    """Exponential moving average of the trainable weights (Polyak). With warm-up the decay is
    min(decay, (1 + n) / (10 + n)) at update n, so a short run's EMA is not stuck at its init."""

    def __init__(self, net: torch.nn.Module, decay: float, warmup: bool = True):
        self.decay, self.warmup, self.updates = decay, warmup, 0
        self.shadow = {k: v.detach().clone().float() for k, v in net.state_dict().items()}

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, net: torch.nn.Module) -> None:
        d = self.current_decay()
        state = net.state_dict()
        floats = [k for k, v in state.items() if v.dtype.is_floating_point]
        torch._foreach_lerp_([self.shadow[k] for k in floats],               # one fused pass
                             [state[k].detach().float() for k in floats], 1 - d)
        for k, v in state.items():
            if not v.dtype.is_floating_point:
                self.shadow[k].copy_(v)
        self.updates += 1

    def state(self) -> dict:
        return {k: v.contiguous() for k, v in self.shadow.items()}

    def save(self, path: Path) -> None:
        save_file(self.state(), str(path), metadata={"updates": str(self.updates)})

    def load(self, path: Path) -> None:
        from safetensors import safe_open
        self.shadow = {k: v.float() for k, v in load_file(str(path)).items()}
        with safe_open(str(path), "pt") as f:
            self.updates = int(f.metadata()["updates"])


def export(cfg: StageConfig, state: dict, folder: Path, metrics: dict | None = None) -> Path:
    """Weights -> folder/model.safetensors, the stage config -> folder/config.yaml (and the
    stage's held-out metrics -> folder/metrics.json). Each file is written whole, then renamed."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "model.safetensors.tmp"
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    tmp.replace(folder / "model.safetensors")
    save_config(cfg, folder / "config.yaml")
    if metrics:
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return folder


def step_indices(step: int, micro: int, rank: int, cfg: StageConfig, world: int) -> list[int]:
    """Global sample indices of one micro batch: fixed by (step, micro, rank), not by world size
    alone, so every process count walks the same global batches."""
    mb, ga = cfg.train.batch_size, cfg.train.grad_accum
    start = (step * ga + micro) * mb * world + rank * mb
    return list(range(start, start + mb))


class StepSampler:
    """Batch sampler yielding the index lists of steps start..steps-1 for this rank."""

    def __init__(self, cfg, start, rank, world):
        self.cfg, self.start, self.rank, self.world = cfg, start, rank, world

    def __iter__(self):
        for step in range(self.start, self.cfg.train.steps):
            for micro in range(self.cfg.train.grad_accum):
                yield step_indices(step, micro, self.rank, self.cfg, self.world)

    def __len__(self):
        return (self.cfg.train.steps - self.start) * self.cfg.train.grad_accum


def lr_lambda(t) -> callable:
    """Linear warm-up over t.warmup steps, then constant or a cosine decay to t.min_lr_ratio x lr at
    t.steps (SGDR, Loshchilov & Hutter 2017; what most diffusion and autoencoder recipes use)."""
    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / max(1, t.warmup))
        if t.schedule == "constant":
            return warm
        progress = min(1.0, step / max(1, t.steps))
        return warm * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
    return factor


def image_step(seed: int, step: int, fraction: float) -> bool:
    """Joint image-video training (W.A.L.T, Gupta et al. 2023: an image is a 1-frame video): a
    `fraction` of the steps train on the first frame of each clip. Decided by (seed, step) alone, so
    every process and a resumed run agree."""
    if fraction <= 0:
        return False
    return torch.rand(1, generator=torch.Generator().manual_seed(seed * 1_000_003 + step)).item() < fraction


def init_weights(net: torch.nn.Module, folder: str, stage: str) -> None:
    """Load an exported stage's weights into net before training (a checkpoint resume replaces
    them later). A missing or mismatched tensor is a one-line error naming it."""
    from cascade.stages import load_export
    _, state = load_export(folder, expect_stage=stage)
    own = net.state_dict()
    for k, v in own.items():
        if k not in state:
            raise ValueError(f"train.init_from: {folder} has no tensor '{k}' (a different model?)")
        if state[k].shape != v.shape:
            raise ValueError(f"train.init_from: '{k}' is {tuple(state[k].shape)} in {folder}, "
                             f"{tuple(v.shape)} in this model's config")
    net.load_state_dict({k: state[k] for k in own})


def latest_step(ckpt_dir: Path) -> int | None:
    latest = ckpt_dir / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    if not (ckpt_dir / tag).is_dir():
        raise FileNotFoundError(f"checkpoint '{tag}' named in {latest} is missing")
    return int(tag.removeprefix("step"))


def train(cfg: StageConfig, progress: bool = True) -> Path:
    """Train one stage to cfg.train.steps; returns the export folder of its EMA weights."""
    rank, world = init_distributed()
    t = cfg.train
    out = Path(t.out_dir)
    ckpt_dir = out / "checkpoints"
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() \
        else torch.device("cpu")
    torch.manual_seed(t.seed)                                            # same init on every rank
    stage = build_stage(cfg, device)
    net = stage.net.to(device)
    if t.init_from:
        init_weights(net, t.init_from, cfg.stage)
    if t.compile:                              # in place: state_dict keys (EMA, export) unchanged
        net.compile()
    params = [p for p in net.parameters() if p.requires_grad]
    # fused: one kernel per step over all parameters (CPU and CUDA), not a dozen ops per tensor
    opt = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay,
                            fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t))
    engine, opt, _, sched = deepspeed.initialize(model=StageLoss(stage), optimizer=opt,
                                                 lr_scheduler=sched, config=ds_config(cfg, world))
    ema = EMA(net, t.ema_decay, t.ema_warmup)

    start = 0
    if t.resume and latest_step(ckpt_dir) is not None:
        _, client = engine.load_checkpoint(str(ckpt_dir))
        start = client["step"]
        ema.load(ckpt_dir / f"step{start}" / "ema.safetensors")
        if rank == 0:
            print(f"resumed from {ckpt_dir}/step{start}")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")

    dataset = build_dataset(cfg.data)
    loader = DataLoader(dataset, batch_sampler=StepSampler(cfg, start, rank, world), collate_fn=collate,
                        num_workers=t.num_workers)
    log_path = out / "log.csv"
    bar = tqdm(total=t.steps, initial=start, disable=not (progress and rank == 0),
               desc=f"train {cfg.stage}", dynamic_ncols=True)
    batches = iter(loader)
    global_batch = t.batch_size * t.grad_accum * world
    tic = time.perf_counter()
    for step in range(start, t.steps):
        totals: dict[str, float] = {}
        for micro in range(t.grad_accum):
            batch = next(batches)
            if image_step(t.seed, step, cfg.data.image_fraction):              # W.A.L.T joint training
                batch = {**batch, "video": batch["video"][:, :, :1]}
            gens = sample_generators(t.seed, step_indices(step, micro, rank, cfg, world))
            inputs = stage.prepare(batch, gens, device)
            loss, logs = engine(inputs)
            engine.backward(loss)
            engine.step()
            for k, v in {"loss": loss.detach(), **logs}.items():
                totals[k] = totals.get(k, 0.0) + float(v) / t.grad_accum
        ema.update(net)
        if world > 1:                                                    # mean over processes
            vec = torch.tensor(list(totals.values()), dtype=torch.float64)
            dist.all_reduce(vec)
            totals = dict(zip(totals, (vec / world).tolist()))
        if not math.isfinite(totals["loss"]):
            raise FloatingPointError(f"loss became {totals['loss']} at step {step + 1}")
        elapsed = time.perf_counter() - tic
        tic = time.perf_counter()
        row = {"step": step + 1, **totals, "lr": sched.get_last_lr()[0],
               "samples_per_s": global_batch / max(elapsed, 1e-9)}
        if rank == 0:
            write_log_row(log_path, row)
            if (step + 1) % t.log_every == 0 or step == start:
                bar.set_postfix(loss=f"{totals['loss']:.4f}", it_s=f"{1 / max(elapsed, 1e-9):.2f}",
                                samples_s=f"{row['samples_per_s']:.1f}")
        bar.update(1)
        if (step + 1) % t.ckpt_every == 0 or step + 1 == t.steps:
            save_checkpoint(engine, ema, ckpt_dir, step + 1, rank, t.keep_ckpts)
    bar.close()
    export_dir = out / "export"
    if rank == 0:
        state, metrics = ema.state(), {}
        if hasattr(stage, "finalize"):             # e.g. the VAE's latent scale and held-out PSNR
            state, metrics = stage.finalize(state)
        export(cfg, state, export_dir, metrics)
        print(f"exported EMA weights to {export_dir}" +
              "".join(f"; {k} {v:.4g}" for k, v in metrics.items()))
    if world > 1:
        dist.barrier()
    return export_dir


def write_log_row(path: Path, row: dict) -> None:
    new = not path.is_file()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})


def save_checkpoint(engine, ema: EMA, ckpt_dir: Path, step: int, rank: int, keep: int) -> None:
    """DeepSpeed checkpoint (model, optimizer, scheduler, step) + the EMA beside it. The `latest`
    pointer moves only after both are written, so a kill mid-save leaves the previous one usable."""
    tag = f"step{step}"
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step}, save_latest=False)
    if rank == 0:
        ema.save(ckpt_dir / tag / "ema.safetensors")
        tmp = ckpt_dir / "latest.tmp"
        tmp.write_text(tag)
        tmp.replace(ckpt_dir / "latest")
        tags = sorted((p for p in ckpt_dir.glob("step*") if p.is_dir()),
                      key=lambda p: int(p.name.removeprefix("step")))
        for old in tags[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
