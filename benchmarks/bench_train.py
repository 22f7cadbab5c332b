"""Benchmark: one training step of every stage (vae, base, interp, sr) at two scales.

    python -m benchmarks.bench_train [--smoke] [--reps 3] [--scales tiny,small]

A step is what `cascade train` runs per micro-batch, without DeepSpeed's bookkeeping and the data
loader: the stage's loss on a batch (the VAE's L1 + L2 + KL; the shared diffusion loss with min-SNR
weighting for base, interp and sr, with their conditioning: text tokens, keyframe slots and mask,
the noise-augmented low-res video), backward, and a fused AdamW step. Inputs are random tensors of
the shapes the stage's data gives (latents for base and interp, so no VAE runs in their step; the
text encoder's states for the text), so the step measures the network alone.

Scales: tiny = configs/tiny/<stage>.yaml as they are (their batch sizes); small = the same stages
at twice the width (and 6 blocks instead of 4 for the DiTs) and 4-8x the tokens per sample
(64x64 pixels, 16x16 latents, SR to 128x128; see SMALL below), the next size a CPU can still train.
Per step: seconds (best of --reps after a warm-up), samples/s, tokens/s (a DiT token is a latent
patch; for the VAE and the SR U-Net a token is a pixel position t, h, w of the input), GFLOP per
step (FlopCounterMode), and the peak memory the step adds (CPU: peak RSS increase, GPU:
max_memory_allocated). Results: a markdown table, a CSV and a PNG in benchmarks/results/.
"""
from __future__ import annotations

import torch

from benchmarks.bench_peers import timed
from benchmarks.cases import REPO, randomize_zero_init, text_cond
from benchmarks.common import bench_args, grouped_bar_plot, parse_args, report, to_device

STAGES = ("vae", "base", "interp", "sr")

# config overrides per scale; tiny keeps configs/tiny as it is
SMALL = {
    "vae": ["data.frames=8", "data.height=64", "data.width=64", "vae.channels=32",
            "train.batch_size=4"],
    "base": ["data.frames=16", "data.height=64", "data.width=64", "dit.frames=16", "dit.height=16",
             "dit.width=16", "dit.hidden=256", "dit.heads=4", "dit.depth=6", "train.batch_size=4"],
    "interp": ["data.frames=9", "data.height=64", "data.width=64", "dit.frames=9", "dit.height=16",
               "dit.width=16", "dit.hidden=256", "dit.heads=4", "dit.depth=6", "train.batch_size=4"],
    "sr": ["data.frames=8", "data.height=128", "data.width=128", "unet.channels=32",
           "train.batch_size=2"],
}
SMOKE = {
    "vae": ["data.frames=2", "data.height=16", "data.width=16", "vae.channels=8",
            "vae.channel_mults=[1,2]", "vae.temporal_down=[false]", "train.batch_size=1"],
    "base": ["data.frames=2", "dit.frames=2", "dit.height=4", "dit.width=4", "dit.hidden=32",
             "dit.depth=1", "dit.heads=2", "train.batch_size=1"],
    "interp": ["data.frames=5", "interp.rate=2", "dit.frames=5", "dit.height=4", "dit.width=4",
               "dit.hidden=32", "dit.depth=1", "dit.heads=2", "train.batch_size=1"],
    "sr": ["data.frames=2", "data.height=16", "data.width=16", "unet.channels=8",
           "unet.channel_mults=[1,2]", "unet.attn_levels=[1]", "unet.groups=4",
           "train.batch_size=1"],
}


def stage_step(name: str, overrides: list[str]):
    """(config, network, inputs, loss(net, inputs), tokens per sample) of one stage."""
    from cascade.config import load_config
    cfg = load_config(REPO / "configs" / "tiny" / f"{name}.yaml", overrides)
    B, d = cfg.train.batch_size, cfg.data
    g = torch.Generator().manual_seed(5)
    if name == "vae":
        from cascade.seeding import RowGenerators
        from cascade.stages import VAEStage
        stage = VAEStage(cfg)
        video = torch.rand(B, 3, d.frames, d.height, d.width, generator=g) * 2 - 1
        inputs = stage.prepare({"video": video}, RowGenerators(list(range(B))), "cpu")  # as the trainer
        return cfg, stage.net, inputs, lambda net, x: stage.loss(net, x)[0], d.frames * d.height * d.width
    from cascade.diffusion import Diffusion
    diffusion = Diffusion(cfg.diffusion)
    cond = text_cond(B, cfg.text.max_length, cfg.text.dim)
    t = torch.rand(B, generator=g)
    if name in ("base", "interp"):
        from cascade.models.dit import VideoDiT
        c = cfg.dit
        net = randomize_zero_init(VideoDiT(c))
        x0 = torch.randn(B, c.in_channels, c.frames, c.height, c.width, generator=g)
        tokens = c.frames // c.patch_t * (c.height // c.patch_h) * (c.width // c.patch_w)
        if name == "interp":
            from cascade.stages import interp_condition
            frames, mask = interp_condition(x0[:, :, ::cfg.interp.rate], cfg.interp.rate)
            cond = {**cond, "frames": frames, "frame_mask": mask, "aug_t": torch.full((B,), 0.1)}
    else:
        from cascade.models.unet import VideoUNet
        net = randomize_zero_init(VideoUNet(cfg.unet))
        x0 = torch.rand(B, 3, d.frames, d.height, d.width, generator=g) * 2 - 1
        cond = {**cond, "lowres": x0 + 0.1 * torch.randn(x0.shape, generator=g),
                "aug_t": torch.full((B,), 0.1)}
        tokens = d.frames * d.height * d.width
    noise = torch.randn(x0.shape, generator=g)
    inputs = {"x0": x0, "t": t, "noise": noise, "cond": cond}
    return cfg, net, inputs, \
        lambda net, x: diffusion.loss(net, x["x0"], x["cond"], t=x["t"], noise=x["noise"]), tokens


def train_step(net, inputs, loss_fn, lr: float):
    """The step: loss, backward, fused AdamW (as cascade.train)."""
    opt = torch.optim.AdamW(net.parameters(), lr=lr, fused=True)

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(net, inputs).backward()
        opt.step()
    return step


def describe(name: str, cfg) -> str:
    d = cfg.data
    if name == "vae":
        v = cfg.vae
        return f"{d.frames}x{d.height}x{d.width} px, widths {[v.channels * m for m in v.channel_mults]}"
    if name == "sr":
        u = cfg.unet
        return f"{d.frames}x{d.height}x{d.width} px, widths {[u.channels * m for m in u.channel_mults]}"
    c = cfg.dit
    return f"{c.frames}x{c.height}x{c.width} latents, width {c.hidden}, depth {c.depth}"


def main(argv=None):
    p = bench_args(__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3, help="timed steps (best of)")
    p.add_argument("--scales", default="tiny,small")
    p.add_argument("--stages", default=",".join(STAGES))
    args = parse_args(p, argv)
    reps = 1 if args.smoke else args.reps
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    scales = {"smoke": SMOKE} if args.smoke else \
        {s: {"tiny": {}, "small": SMALL}[s] for s in args.scales.split(",")}
    rows = []
    for scale, overrides in scales.items():
        for name in args.stages.split(","):
            torch.manual_seed(0)
            cfg, net, inputs, loss_fn, tokens = stage_step(name, overrides.get(name, []))
            net = net.to(device).train()
            inputs = to_device(inputs, device)
            seconds, flops, peak = timed(train_step(net, inputs, loss_fn, cfg.train.lr), reps)
            B = cfg.train.batch_size
            rows.append({"scale": scale, "stage": name, "shape": describe(name, cfg), "batch": B,
                         "params M": sum(p.numel() for p in net.parameters()) / 1e6,
                         "step s": seconds, "samples/s": B / seconds,
                         "tokens/s": B * tokens / seconds, "GFLOP/step": flops / 1e9,
                         "GFLOP/s": flops / seconds / 1e9, "peak MiB": peak / 2**20})
            print(f"  {scale} {name}: {seconds:.3g} s/step", flush=True)
            del net, inputs
    notes = [f"fp32, best of {reps} steps after a warm-up; forward + backward + fused AdamW, no "
             f"DeepSpeed, no data loading, random inputs of the stage's shapes; tokens: latent "
             f"patches (DiT) or pixel positions (VAE, SR); peak MiB: memory a step adds "
             f"({'max_memory_allocated' if device.type == 'cuda' else 'peak RSS increase'})."]

    def plot(rows, path):
        grouped_bar_plot(rows, "stage", "scale", "samples/s", path, log=True,
                         title="training throughput per stage (samples/s)")

    report("train", "Training step per stage", rows, args.out, notes, plot)
    return rows


if __name__ == "__main__":
    main()
