"""Benchmark: LoRA fine-tuning against full fine-tuning of the same stage, ratios in one run.

    python -m benchmarks.bench_lora [--smoke] [--ranks 4,16] [--steps 20] [--stages base,sr]

For each stage network (the embedded default's base DiT and SR U-Net, configs/tiny) it trains one
fixed batch with the stage's diffusion loss and fused AdamW, as `cascade train` does, once with
every weight trainable and once per LoRA rank (cascade/adapters.py: PEFT adapters on the
attention projections, train.lora.targets' default), and reports the trainable parameters, the
bytes of gradients and optimizer state (Adam's two moments, read off the optimizer), and the
median seconds per step, each also as a ratio to full fine-tuning.
"""
from __future__ import annotations

import statistics
import time

import torch

from benchmarks.cases import REPO
from benchmarks.common import bench_args, grouped_bar_plot, parse_args, report


def stage_batch(stage: str, smoke: bool):
    """(network factory, loss function(net)) for one stage at the embedded default's size."""
    from cascade.config import load_config
    from cascade.diffusion import Diffusion
    over = ["dit.hidden=32", "dit.depth=1", "dit.heads=2"] if smoke and stage == "base" else \
        ["unet.channels=8", "unet.channel_mults=[1,2]", "unet.attn_levels=[1]", "unet.heads=2",
         "unet.groups=4", "data.height=16", "data.width=16"] if smoke else []
    cfg = load_config(REPO / "configs" / "tiny" / f"{stage}.yaml", over)
    g = torch.Generator().manual_seed(0)
    B, L = (2 if smoke else cfg.train.batch_size), cfg.text.max_length
    text = {"text": torch.randn(B, L, cfg.text.dim, generator=g),
            "text_mask": torch.ones(B, L, dtype=torch.bool), "pooled": torch.randn(B, cfg.text.dim, generator=g)}
    if stage == "base":
        from cascade.models.dit import VideoDiT
        d = cfg.dit
        x0 = torch.randn(B, d.in_channels, d.frames, d.height, d.width, generator=g)
        make, cond = (lambda: VideoDiT(d)), text
    else:
        from cascade.models.unet import VideoUNet
        x0 = torch.randn(B, 3, cfg.data.frames, cfg.data.height, cfg.data.width, generator=g)
        make = lambda: VideoUNet(cfg.unet)                                # noqa: E731
        cond = {**text, "lowres": torch.randn(x0.shape, generator=g), "aug_t": torch.zeros(B)}
    diffusion = Diffusion(cfg.diffusion)
    t, noise = torch.rand(B, generator=g), torch.randn(x0.shape, generator=g)
    return make, lambda net: diffusion.loss(net, x0, cond, t=t, noise=noise)


def run(stage: str, rank: int, steps: int, smoke: bool) -> dict:
    from cascade.adapters import add_lora
    from cascade.config import LoRAConfig
    make, loss_fn = stage_batch(stage, smoke)
    torch.manual_seed(0)
    net = make()
    if rank:
        net = add_lora(net, LoRAConfig(rank=rank))
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    times = []
    for i in range(steps + 1):                                            # the first step: warm-up
        tic = time.perf_counter()
        loss_fn(net).backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        if i:
            times.append(time.perf_counter() - tic)
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                if torch.is_tensor(t) and t.dim() > 0)
    grads = sum(p.numel() * p.element_size() for p in params)
    return {"stage": stage, "mode": f"LoRA r={rank}" if rank else "full", "trainable": sum(p.numel() for p in params),
            "total": sum(p.numel() for p in net.parameters()), "grad + Adam MiB": (state + grads) / 2**20,
            "s/step": statistics.median(times)}


def main(argv=None):
    p = bench_args(__doc__.splitlines()[0])
    p.add_argument("--ranks", default="4,16", help="comma-separated LoRA ranks")
    p.add_argument("--steps", type=int, default=10, help="timed steps per mode (median)")
    p.add_argument("--stages", default="base,sr", help="comma-separated: base, sr")
    args = parse_args(p, argv)
    ranks = [int(r) for r in args.ranks.split(",")]
    steps = 2 if args.smoke else args.steps
    rows = []
    for stage in args.stages.split(","):
        full = run(stage, 0, steps, args.smoke)
        rows.append(full)
        for r in ranks:
            rows.append(run(stage, r, steps, args.smoke))
        for row in rows[-len(ranks) - 1:]:
            row["trainable ratio"] = row["trainable"] / full["trainable"]
            row["memory ratio"] = row["grad + Adam MiB"] / full["grad + Adam MiB"]
            row["time ratio"] = row["s/step"] / full["s/step"]
        print(f"  {stage}: " + ", ".join(f"{r['mode']} {r['s/step']:.3f} s" for r in rows[-len(ranks) - 1:]),
              flush=True)
    notes = [f"fp32, fused AdamW, one fixed batch of the stage's training size, median of {steps} "
             f"steps after a warm-up; LoRA on the attention projections (qkv, proj, q, kv). Memory: "
             f"gradients + Adam moments of the trainable weights (the frozen weights and the "
             f"activations are the same in both)."]

    def plot(rows, path):
        grouped_bar_plot([{**r, "what": "time ratio"} for r in rows] + [{**r, "what": "memory ratio", "time ratio": r["memory ratio"]} for r in rows],
                         "mode", "what", "time ratio", path, reference=1.0,
                         title="LoRA against full fine-tuning (ratio)")

    report("lora", "LoRA against full fine-tuning: trainable parameters, optimizer memory, step time",
           rows, args.out, notes, plot)
    return rows


if __name__ == "__main__":
    main()
