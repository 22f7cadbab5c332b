"""Benchmark: video autoencoders on content no one here made (quality, not speed).

    python -m benchmarks.bench_vae --vae NAME=EXPORT ... [--config configs/tiny/vae_natural.yaml]
        [--peers cogvideox,svd,ltx] [--peer-steps N] [--natural data/natural] [--lavfi data/lavfi]

Each autoencoder reconstructs (posterior mode) three sets of 8-frame clips at the config's size:
  natural held-out   camera moves over the photographs `cascade data natural` holds out of training
  other source       the same, over matplotlib's photograph only (a source the training never saw)
  lavfi              ffmpeg's own test patterns (`cascade data lavfi`: testsrc2, mandelbrot, life,
                     cellauto, gradients, smptehdbars, sierpinski), drawn by ffmpeg
and is scored by PSNR (dB), temporal error (cascade.losses.temporal_error: flicker, 8-bit levels)
and LPIPS (cascade.evaluate.load_lpips: the VGG trunk when the torch cache has it, else a random
trunk: compare LPIPS only within one table). Rows: every --vae export, bilinear down-up at the same
spatial compression (the baseline a VAE must beat), and the diffusers peers (CogVideoX's, SVD's
and LTX-Video's autoencoders) built at the same spatial compression and latent channels, each at the
width whose parameter count is nearest the config's VAE (`build_peer`; noted under the table),
trained here for --peer-steps (default: the config's train.steps) on the config's data with the
same loss (L1 + L2 + KL), optimizer, schedule and EMA as `cascade train`. Peers need diffusers
(`pip install -e '.[bench]'`). --pca K adds a linear code: K principal components of the pixel
patches; --per-pattern adds one set per lavfi pattern.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from einops import rearrange

from benchmarks.common import bench_args, grouped_bar_plot, optional_import, parse_args, report

REPO = Path(__file__).resolve().parents[1]


def clip_set(root: Path, manifest: Path, frames: int, H: int, W: int, fps: float, source=None):
    """Clips of a manifest (optionally only rows whose source column is `source`) -> (N, 3, T, H, W)."""
    import csv

    from cascade.data.video_folder import VideoFolder
    rows = list(csv.DictReader(open(manifest)))
    if source is not None:
        keep = [r for r in rows if r.get("source") == source]
        sub = manifest.with_name(f".{manifest.stem}_{source}.csv")
        with open(sub, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(keep)
        manifest = sub
    ds = VideoFolder(root, manifest, frames, H, W, fps=fps)
    return torch.stack([ds[i]["video"] for i in range(len(ds))])


def bilinear(factor: int):
    import torch.nn.functional as F

    def run(x):                                                           # (B, 3, T, H, W)
        B, C, T, H, W = x.shape
        f = x.transpose(1, 2).reshape(B * T, C, H, W)
        small = F.interpolate(f, scale_factor=1 / factor, mode="bilinear", antialias=True, align_corners=False)
        up = F.interpolate(small, size=(H, W), mode="bilinear", align_corners=False)
        return up.reshape(B, T, C, H, W).transpose(1, 2)
    return run


def ours(folder):
    from cascade.stages import load_vae
    vae, _ = load_vae(folder)
    return lambda x: vae(x, sample=False)[0]


def pca_code(train: torch.Tensor, factor: int, k: int):
    """A linear patch code: the k principal components of the training clips' factor x factor x 3
    pixel patches (the latent size of a VAE with k channels at 1/factor of the side), as a
    reconstruction function of clips (N, 3, T, H, W): project each patch and back."""
    def patches(x):                                                       # -> (N T H/f W/f, 3 f f)
        return rearrange(x, "n c t (h i) (w j) -> (n t h w) (c i j)", i=factor, j=factor)
    flat = patches(train)
    mean = flat.mean(0)
    basis = torch.linalg.svd(flat - mean, full_matrices=False).Vh[:k]      # (k, 3 f f)

    def run(x):
        N, _, T, H, W = x.shape
        code = (patches(x) - mean) @ basis.T @ basis + mean
        return rearrange(code, "(n t h w) (c i j) -> n c t (h i) (w j)", n=N, t=T, h=H // factor,
                         i=factor, j=factor)
    return run


# ----------------------------------------------------------------------------- the peers

PEERS = ("cogvideox", "svd", "ltx")


def peer_model(kind: str, vcfg, width: int):
    """A diffusers peer at base width `width`, the config's spatial compression and latent channels,
    no temporal compression: CogVideoX's and SVD's autoencoders as 2x downsampling levels (widths
    width x the config's level multipliers, or 1, 2, 2 where the config patchifies), LTX-Video's as
    its patchify (patch = the whole spatial factor) and one level of `width`."""
    f = vcfg.spatial_factor()
    n = int(math.log2(f)) + 1                                                # levels for f
    mults = list(vcfg.channel_mults) if vcfg.patch == 1 else [1] + [2] * (n - 1)
    chs = [width * m for m in mults]
    if kind == "cogvideox":
        from diffusers import AutoencoderKLCogVideoX
        return AutoencoderKLCogVideoX(
            down_block_types=("CogVideoXDownBlock3D",) * n, up_block_types=("CogVideoXUpBlock3D",) * n,
            block_out_channels=tuple(chs), latent_channels=vcfg.latent_channels, layers_per_block=1,
            norm_num_groups=vcfg.groups or 1, temporal_compression_ratio=1)
    if kind == "svd":
        from diffusers import AutoencoderKLTemporalDecoder
        return AutoencoderKLTemporalDecoder(down_block_types=("DownEncoderBlock2D",) * n,
                                            block_out_channels=tuple(32 * math.ceil(c / 32) for c in chs),
                                            layers_per_block=1, latent_channels=vcfg.latent_channels)
    if kind == "ltx":
        from diffusers import AutoencoderKLLTXVideo
        lpb = (vcfg.num_res_blocks, 1)
        return AutoencoderKLLTXVideo(
            latent_channels=vcfg.latent_channels, block_out_channels=(width,),
            down_block_types=("LTXVideoDownBlock3D",), decoder_block_out_channels=(width,),
            layers_per_block=lpb, decoder_layers_per_block=lpb, spatio_temporal_scaling=(False,),
            decoder_spatio_temporal_scaling=(False,), decoder_inject_noise=(False, False),
            downsample_type=("conv",), upsample_residual=(False,), upsample_factor=(1,),
            patch_size=f, patch_size_t=1)
    raise ValueError(f"--peers: '{kind}' is not one of {', '.join(PEERS)}")


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def build_peer(kind: str, vcfg, params: int):
    """(the peer whose base width gives the parameter count nearest `params`, ours; a note). SVD's
    widths are rounded up to multiples of 32 (diffusers fixes 32 GroupNorm groups)."""
    widths = range(32, 257, 32) if kind == "svd" else range(8, 257, 8)
    best = min(widths, key=lambda w: abs(n_params(peer_model(kind, vcfg, w)) - params))
    model = peer_model(kind, vcfg, best)
    return model, f"width {best}, {n_params(model) / 1e6:.2f} M parameters (ours {params / 1e6:.2f} M)"


def peer_forward(kind: str, model, x, sample: bool):
    """(reconstruction (B, 3, T, H, W), posterior) in the peer's own layout."""
    B, _, T, H, W = x.shape
    if kind in ("cogvideox", "ltx"):
        post = model.encode(x).latent_dist
        z = post.sample() if sample else post.mode()
        return model.decode(z).sample, post
    xf = x.transpose(1, 2).reshape(B * T, 3, H, W)
    post = model.encode(xf).latent_dist
    z = post.sample() if sample else post.mode()
    y = model.decode(z, num_frames=T).sample
    return y.reshape(B, T, 3, H, W).transpose(1, 2), post


def train_peer(kind: str, model, cfg, steps: int, out: Path):
    """Train a peer as `cascade train` trains ours (data, loss, AdamW, schedule, EMA) -> the EMA model."""
    import copy

    from cascade.data import build_dataset, collate
    from cascade.data.buckets import BucketSampler
    from cascade.train import EMA, StepSampler, lr_lambda
    torch.manual_seed(cfg.train.seed)
    data = build_dataset(cfg.data)
    t = copy.deepcopy(cfg.train)
    t.steps = steps
    cfg2 = copy.deepcopy(cfg)
    cfg2.train = t
    sampler = BucketSampler(data.bucket_members, len(data.buckets), len(data), cfg2, 0, 0, 1) \
        if cfg.data.buckets else StepSampler(cfg2, 0, 0, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=tuple(t.betas), fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t))
    ema = EMA(model, t.ema_decay, t.ema_warmup)
    tic = time.perf_counter()
    for step, idx in enumerate(sampler):
        x = collate([data[i] for i in idx])["video"]
        y, post = peer_forward(kind, model, x, sample=True)
        err = y - x
        kl = post.kl().flatten(1).sum(1).mean() if post.kl().dim() > 1 else post.kl().mean()
        loss = err.abs().mean() + cfg.vae.l2_weight * err.square().mean() + cfg.vae.kl_weight * kl / x[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        sched.step()
        ema.update(model)
        if (step + 1) % 100 == 0:
            print(f"    {kind} step {step + 1}/{steps}: loss {loss.item():.4f} "
                  f"({time.perf_counter() - tic:.0f} s)", flush=True)
    model.load_state_dict(ema.state())
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out)
    return model.eval()


# ----------------------------------------------------------------------------- scoring

@torch.no_grad()
def score(fn, clips: torch.Tensor, lp) -> dict:
    from cascade.evaluate import lpips_frames
    from cascade.losses import psnr, temporal_error
    recon = torch.cat([fn(c).clamp(-1, 1) for c in clips.split(4)])
    out = {"psnr": float(psnr(clips, recon).mean()), "temporal": float(temporal_error(clips, recon).mean())}
    if lp is not None:
        out["lpips"] = float(lpips_frames(lp, recon, clips).mean())
    return out


def main(argv=None):
    p = bench_args(__doc__.splitlines()[0])
    p.add_argument("--vae", action="append", default=[], metavar="NAME=EXPORT", help="a VAE export to score")
    p.add_argument("--config", type=Path, default=REPO / "configs/tiny/vae_natural.yaml",
                   help="the data, size and training settings (peers train on it)")
    p.add_argument("--natural", type=Path, default=REPO / "data/natural", help="cascade data natural's folder")
    p.add_argument("--lavfi", type=Path, default=REPO / "data/lavfi", help="cascade data lavfi's folder")
    p.add_argument("--peers", default=",".join(PEERS), help="comma-separated diffusers peers ('' for none)")
    p.add_argument("--peer-steps", type=int, help="peer training steps (default: train.steps)")
    p.add_argument("--peer-dir", type=Path, default=REPO / "runs/peers", help="trained peers are kept here")
    p.add_argument("--lpips", default="auto", choices=("auto", "pretrained", "random", "off"))
    p.add_argument("--per-pattern", action="store_true", help="also one set per lavfi pattern "
                   "(lavfi: testsrc2, ...)")
    p.add_argument("--pca", type=int, default=0, metavar="K", help="also a linear code: the K principal "
                   "components of the training clips' pixel patches at the spatial factor (0: none)")
    args = parse_args(p, argv)
    from cascade.config import load_config
    from cascade.evaluate import load_lpips
    overrides = ["train.steps=3", "data.buckets=[]"] if args.smoke else []
    cfg = load_config(args.config, overrides + [f"data.root={args.natural}",
                                                f"data.manifest={args.natural / 'train.csv'}",
                                                f"data.val_manifest={args.natural / 'val.csv'}"])
    d = cfg.data
    sets = {"natural held-out": clip_set(args.natural, args.natural / "val.csv", d.frames, d.height, d.width, d.fps),
            "other source": clip_set(args.natural, args.natural / "val.csv", d.frames, d.height, d.width,
                                     d.fps, source="grace_hopper"),
            "lavfi": clip_set(args.lavfi, args.lavfi / "lavfi.csv", d.frames, d.height, d.width, d.fps)}
    if args.per_pattern:
        from cascade.data.natural import LAVFI
        sets.update({f"lavfi: {src}": clip_set(args.lavfi, args.lavfi / "lavfi.csv", d.frames, d.height,
                                               d.width, d.fps, source=src) for src in LAVFI})
    lp, lp_name = load_lpips(args.lpips)
    models = {name: ours(folder) for name, folder in (v.split("=", 1) for v in args.vae)}
    f = cfg.vae.spatial_factor()
    models[f"bilinear x{f}"] = bilinear(f)
    if args.pca:
        train_clips = clip_set(args.natural, args.natural / "train.csv", d.frames, d.height, d.width, d.fps)
        models[f"PCA {args.pca} of {f}x{f}x3 patches"] = pca_code(train_clips, f, args.pca)
    notes = {}
    peers = [k for k in args.peers.split(",") if k]
    if peers and optional_import("diffusers") is None:
        print("diffusers is not installed (pip install -e '.[bench]'): no peer rows")
        peers = []
    steps = args.peer_steps or cfg.train.steps
    from cascade.models.vae import VideoVAE
    params = n_params(VideoVAE(cfg.vae))
    import hashlib                                      # a peer is reused only on the data it was trained on
    data_tag = hashlib.sha256(Path(d.manifest).read_bytes()).hexdigest()[:8] if peers else ""
    if cfg.vae.l2_weight != 1.0:                        # ... and with the loss it was trained with
        data_tag += f"_l2x{cfg.vae.l2_weight:g}"
    for kind in peers:
        model, note = build_peer(kind, cfg.vae, params)
        path = args.peer_dir / f"{args.config.stem}_{kind}_{n_params(model)}_{steps}_{data_tag}.pt"
        if path.is_file() and not args.smoke:
            model.load_state_dict(torch.load(path, weights_only=True))
            model.eval()
        else:
            print(f"  training the {kind} peer ({note}) for {steps} steps", flush=True)
            model = train_peer(kind, model, cfg, steps, path if not args.smoke else args.out / f"{kind}.pt")
        models[f"{kind} (diffusers, {steps} steps)"] = lambda x, m=model, k=kind: peer_forward(k, m, x, False)[0]
        notes[kind] = note
    rows = []
    for name, fn in models.items():
        for set_name, clips in sets.items():
            rows.append({"model": name, "set": set_name, "clips": len(clips), **score(fn, clips, lp)})
        print(f"  {name}: " + ", ".join(f"{r['set']} {r['psnr']:.2f} dB" for r in rows[-len(sets):]), flush=True)
    text = [f"clips of {d.frames} frames at {d.height}x{d.width} ({args.config.name}); LPIPS: {lp_name}.",
            *(f"{k}: {v}" for k, v in notes.items() if v)]

    def plot(rows, path):
        grouped_bar_plot(rows, "set", "model", "psnr", path, title="reconstruction PSNR (dB)")

    report("vae", "Video autoencoders on content no one here made: PSNR, temporal error, LPIPS",
           rows, args.out, text, plot)
    return rows


if __name__ == "__main__":
    main()
