"""The interp and sr stages, training side: conditioning layout, determinism, gradients, and a
short DeepSpeed run of each that lowers the loss (tiny random VAE and tiny text encoder)."""
import csv
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cascade.config import ConfigError, load_config, save_config
from cascade.data import build_dataset, collate
from cascade.stages import (InterpStage, build_stage, interp_condition, keyframe_count,
                            sample_generators)

REPO = Path(__file__).resolve().parents[1]
TEXT = ["text.dim=32", "text.max_length=16"]
PIXELS = ["data.height=16", "data.width=16"]
TINY_INTERP = PIXELS + TEXT + [
    "data.frames=5", "interp.rate=2", "interp.aug_max=0.3",
    "dit.hidden=32", "dit.depth=1", "dit.heads=2", "dit.text_dim=32",
    "dit.frames=5", "dit.height=8", "dit.width=8",
    "train.batch_size=4", "train.lr=2e-3", "train.warmup=1", "train.log_every=1",
]
TINY_BASE = PIXELS + TEXT + [
    "data.frames=4", "dit.hidden=32", "dit.depth=1", "dit.heads=2", "dit.text_dim=32",
    "dit.frames=4", "dit.height=8", "dit.width=8",
    "train.batch_size=4", "train.lr=2e-3", "train.warmup=1", "train.log_every=1",
]
TINY_SR = PIXELS + TEXT + [
    "data.frames=3", "sr.scale=2", "sr.aug_max=0.3",
    "unet.channels=8", "unet.channel_mults=[1,2]", "unet.attn_levels=[1]", "unet.heads=2",
    "unet.groups=4", "unet.text_dim=32",
    "train.batch_size=4", "train.lr=2e-3", "train.warmup=1", "train.log_every=1",
]


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A random tiny VAE export (8 channels, 2x spatial, no temporal compression) and a tiny
    random text encoder, both saved in a temporary folder."""
    from cascade.models.vae import VideoVAE
    from cascade.text import tiny_text_encoder
    root = tmp_path_factory.mktemp("assets")
    enc = tiny_text_encoder(dim=32, max_length=16)
    enc.model.save_pretrained(root / "text")
    enc.tokenizer.save_pretrained(root / "text")
    vcfg = load_config(REPO / "configs/tiny/vae.yaml", PIXELS + [
        "data.frames=5", "vae.channels=8", "vae.channel_mults=[1,2]", "vae.temporal_down=[false]",
        "vae.groups=4"])
    torch.manual_seed(0)
    vae = VideoVAE(vcfg.vae)
    (root / "vae").mkdir()
    state = {k: v.contiguous() for k, v in vae.state_dict().items()}
    save_file(state, str(root / "vae" / "model.safetensors"))
    save_config(vcfg, root / "vae" / "config.yaml")
    return root


def stage_cfg(name, assets, extra=()):
    base = {"base": TINY_BASE, "interp": TINY_INTERP, "sr": TINY_SR}[name]
    return load_config(REPO / f"configs/tiny/{name}.yaml", base + [
        f"text.encoder={assets / 'text'}", f"train.vae_dir={assets / 'vae'}", *extra])


def batch_of(cfg, indices):
    ds = build_dataset(cfg.data)
    return collate([ds[i] for i in indices]), sample_generators(cfg.train.seed, indices)


def randomize_zero_init(net):
    """Give the zero-initialised layers (adaLN-Zero, output convs) weights, so every path carries
    gradient and every input reaches the output."""
    torch.manual_seed(1)
    for p in net.parameters():
        if p.abs().sum() == 0:
            p.data.normal_(0, 0.05)


# ----------------------------------------------------------------------------- interp condition

def test_interp_condition_slots_and_mask():
    keys = torch.randn(2, 4, 3, 2, 5)                                   # (B, C, K=3, h, w)
    frames, mask = interp_condition(keys, rate=4)
    assert frames.shape == (2, 4, 9, 2, 5) and mask.shape == (2, 1, 9, 2, 5)
    slots = [0, 4, 8]
    assert torch.equal(frames[:, :, slots], keys)
    others = [i for i in range(9) if i not in slots]
    assert torch.all(frames[:, :, others] == 0)
    assert mask[0, 0, :, 0, 0].tolist() == [1, 0, 0, 0, 1, 0, 0, 0, 1]
    assert torch.all(mask == mask[:1, :1, :, :1, :1])                   # same for every sample / pixel
    assert keyframe_count(9, 4) == 3 and keyframe_count(5, 2) == 3 and keyframe_count(2, 1) == 2


@pytest.mark.parametrize("frames, rate", [(10, 4), (8, 4), (4, 4), (1, 4), (6, 0)])
def test_unreachable_frame_counts_rejected(frames, rate):
    with pytest.raises(ValueError, match="interp: "):
        keyframe_count(frames, rate)


def test_interp_config_errors(assets):
    with pytest.raises(ConfigError, match=r"dit.frames: 10 frames are not \(K-1\)\*rate\+1"):
        load_config(REPO / "configs/tiny/interp.yaml", ["dit.frames=10"])
    with pytest.raises(ConfigError, match="dit.cond_frames: must be true"):
        load_config(REPO / "configs/tiny/interp.yaml", ["dit.cond_frames=false"])
    load_config(REPO / "configs/tiny/base.yaml", ["dit.cond_frames=true"])   # frame prompts
    with pytest.raises(ConfigError, match="interp.aug_max"):
        load_config(REPO / "configs/tiny/interp.yaml", ["interp.aug_max=1.5"])
    with pytest.raises(ValueError, match="needs K >= 2 keyframes"):
        interp_condition(torch.zeros(1, 4, 1, 2, 2), 4)
    # data frames whose latent is not the DiT's 5 frames (the tiny VAE has no temporal compression)
    with pytest.raises(ConfigError, match="does not match the VAE latent"):
        InterpStage(stage_cfg("interp", assets, ["data.frames=9"]))


def test_sr_config_errors():
    with pytest.raises(ConfigError, match="data.height: 18 .* not divisible by sr.scale=4"):
        load_config(REPO / "configs/tiny/sr.yaml", ["sr.scale=4", "data.height=18"])
    with pytest.raises(ConfigError, match="sr.overlap"):
        load_config(REPO / "configs/tiny/sr.yaml", ["sr.window=4", "sr.overlap=4"])
    with pytest.raises(ConfigError, match="unet.attn_levels"):
        load_config(REPO / "configs/tiny/sr.yaml", ["unet.attn_levels=[3]"])
    with pytest.raises(ConfigError, match="sr.downsample"):
        load_config(REPO / "configs/tiny/sr.yaml", ["sr.downsample=nearest"])


def test_tiny_configs_build():
    from cascade.models.dit import VideoDiT
    from cascade.models.unet import VideoUNet
    icfg = load_config(REPO / "configs/tiny/interp.yaml")
    assert keyframe_count(icfg.dit.frames, icfg.interp.rate) == 3
    dit = VideoDiT(icfg.dit)
    assert dit.in_channels == 2 * 8 + 1 and dit.aug_embed is not None
    scfg = load_config(REPO / "configs/tiny/sr.yaml")
    VideoUNet(scfg.unet)
    assert scfg.data.height // scfg.sr.scale == 32              # the tiny VAE's output size


# ----------------------------------------------------------------------------- prepare / loss

@pytest.mark.parametrize("name", ["interp", "sr"])
def test_prepare_shapes_and_determinism(name, assets):
    cfg = stage_cfg(name, assets)
    stage = build_stage(cfg)
    batch, gens = batch_of(cfg, [3, 4, 5])
    a = stage.prepare(batch, gens, "cpu")
    b = stage.prepare(batch, sample_generators(cfg.train.seed, [3, 4, 5]), "cpu")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k                               # same gens -> same tensors
    # a sample's tensors do not depend on its batch-mates
    one, g1 = batch_of(cfg, [4])
    c = stage.prepare(one, g1, "cpu")
    for k in ("x0", "noise", "t", "aug_t", "frames" if name == "interp" else "lowres"):
        torch.testing.assert_close(c[k][0], a[k][1], rtol=1e-5, atol=1e-5)
    other = stage.prepare(batch, sample_generators(cfg.train.seed + 1, [3, 4, 5]), "cpu")
    assert not torch.equal(other["noise"], a["noise"]) and not torch.equal(other["aug_t"], a["aug_t"])
    B = 3
    aug_max = cfg.interp.aug_max if name == "interp" else cfg.sr.aug_max
    assert a["aug_t"].shape == (B,) and torch.all((a["aug_t"] >= 0) & (a["aug_t"] <= aug_max))
    if name == "interp":
        assert a["x0"].shape == (B, 8, 5, 8, 8) == a["noise"].shape == a["frames"].shape
        assert a["frame_mask"].shape == (B, 1, 5, 8, 8)
        assert a["frame_mask"][0, 0, :, 0, 0].tolist() == [1, 0, 1, 0, 1]
        assert torch.all(a["frames"][:, :, [1, 3]] == 0)
        assert not torch.allclose(a["frames"][:, :, ::2], a["x0"][:, :, ::2])
    else:
        assert a["x0"].shape == (B, 3, 3, 16, 16) == a["noise"].shape == a["lowres"].shape
        assert not torch.allclose(a["lowres"], a["x0"])


def test_sr_residual_diffuses_what_the_upsampling_misses(assets):
    """sr.residual: the diffused x0 is the clip minus its upsampled low-res version; with
    sr.residual=false it is the clip itself (the same batch, generators and conditioning)."""
    cfgs = {r: stage_cfg("sr", assets, [f"sr.residual={str(r).lower()}", "sr.aug_max=0.0",
                                         "sr.residual_scale=1.0"])
            for r in (True, False)}
    batch, _ = batch_of(cfgs[True], [1, 2])
    out = {r: build_stage(c).prepare(batch, sample_generators(0, [1, 2]), "cpu") for r, c in cfgs.items()}
    up = build_stage(cfgs[True]).lowres(batch["video"])
    torch.testing.assert_close(out[False]["x0"], batch["video"])
    torch.testing.assert_close(out[True]["x0"], batch["video"] - up)
    torch.testing.assert_close(out[True]["lowres"], out[False]["lowres"])
    assert out[True]["x0"].abs().mean() < 0.5 * out[False]["x0"].abs().mean()
    scaled = stage_cfg("sr", assets, ["sr.residual=true", "sr.residual_scale=4.0", "sr.aug_max=0.0"])
    x0 = build_stage(scaled).prepare(batch, sample_generators(0, [1, 2]), "cpu")["x0"]
    torch.testing.assert_close(x0, 4.0 * (batch["video"] - up))           # sr.residual_scale


def test_interp_residual_diffuses_what_the_lerp_misses(assets):
    """interp.residual: x0 is (clip latents - linear interpolation of its keyframes) * scale, zero
    at the keyframe slots; the conditioning is unchanged."""
    from cascade.stages import keyframe_lerp
    over = ["interp.aug_max=0.0", "interp.residual_scale=4.0"]
    cfgs = {r: stage_cfg("interp", assets, over + [f"interp.residual={str(r).lower()}"]) for r in (True, False)}
    batch, _ = batch_of(cfgs[True], [1, 2])
    out = {r: build_stage(c).prepare(batch, sample_generators(0, [1, 2]), "cpu") for r, c in cfgs.items()}
    z, r = out[False]["x0"], cfgs[True].interp.rate
    torch.testing.assert_close(out[True]["x0"], 4.0 * (z - keyframe_lerp(z[:, :, ::r], r)))
    assert out[True]["x0"][:, :, ::r].abs().max() < 1e-5
    torch.testing.assert_close(out[True]["frames"], out[False]["frames"])


@pytest.mark.parametrize("name", ["interp", "sr"])
def test_augmentation_level_is_applied(name, assets):
    """aug_max=0: the conditioning is the clean signal (up to the schedule's sigma(0) ~ 5e-4)."""
    key = f"{name}.aug_max=0.0"
    cfg = stage_cfg(name, assets, [key] + (["interp.residual=false"] if name == "interp" else []))
    stage = build_stage(cfg)
    batch, gens = batch_of(cfg, [0, 1])
    x = stage.prepare(batch, gens, "cpu")
    assert torch.all(x["aug_t"] == 0)
    if name == "interp":
        torch.testing.assert_close(x["frames"][:, :, ::2], x["x0"][:, :, ::2], atol=5e-3, rtol=0)
    else:
        v = batch["video"]                                  # x0 may be the residual (sr.residual)
        torch.testing.assert_close(x["lowres"], stage.lowres(v), atol=5e-3, rtol=0)
        # the low-res input: 2x2 block means (area), bilinearly upsampled back to 16x16
        from cascade.models.unet import upsample_video
        blocks = torch.nn.functional.avg_pool3d(v, (1, 2, 2))                  # (B, 3, T, 8, 8)
        torch.testing.assert_close(stage.lowres(v), upsample_video(blocks, 2))
        assert (stage.lowres(v) - v).abs().max() > 0.1                       # detail is lost


@pytest.mark.parametrize("name", ["interp", "sr"])
def test_loss_finite_and_backward_reaches_every_parameter(name, assets):
    cfg = stage_cfg(name, assets, ["diffusion.cond_drop=0.0"])
    stage = build_stage(cfg)
    randomize_zero_init(stage.net)
    batch, gens = batch_of(cfg, [0, 1])
    loss, logs = stage.loss(stage.net, stage.prepare(batch, gens, "cpu"))
    assert loss.dim() == 0 and torch.isfinite(loss) and "mse" in logs
    loss.backward()
    dead = [n for n, p in stage.net.named_parameters()
            if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert not dead, dead
    assert not any(p.requires_grad for p in stage.text.parameters())
    if name == "interp":
        assert not any(p.requires_grad for p in stage.vae.parameters())


@pytest.mark.parametrize("name", ["interp", "sr"])
def test_no_parameter_is_dead_at_the_real_init(name, assets):
    """From the real (zero-output) init, every parameter gets a gradient within three steps (a
    zero layer opens the path behind it after one step; adaLN-Zero needs two). A regression: the
    U-Net's output conv once had both halves zeroed, and neither ever received a gradient."""
    cfg = stage_cfg(name, assets, ["diffusion.cond_drop=0.0"])
    stage = build_stage(cfg)
    opt = torch.optim.SGD(stage.net.parameters(), lr=0.1)
    batch, gens = batch_of(cfg, [0, 1])
    inputs = stage.prepare(batch, gens, "cpu")
    reached = set()
    for _ in range(3):
        opt.zero_grad()
        stage.loss(stage.net, inputs)[0].backward()
        reached |= {n for n, p in stage.net.named_parameters()
                    if p.grad is not None and p.grad.abs().sum() > 0}
        opt.step()
    dead = [n for n, _ in stage.net.named_parameters() if n not in reached]
    assert not dead, dead


@pytest.mark.parametrize("name", ["interp", "sr"])
def test_conditioning_inputs_change_output(name, assets):
    cfg = stage_cfg(name, assets)
    stage = build_stage(cfg)
    randomize_zero_init(stage.net)
    batch, gens = batch_of(cfg, [0, 1])
    x = stage.prepare(batch, gens, "cpu")
    keys = ["text", "text_mask", "pooled", "aug_t"]
    keys += ["frames", "frame_mask"] if name == "interp" else ["lowres"]
    cond = {k: x[k] for k in keys}
    net = stage.net.eval()
    with torch.no_grad():
        y = net(x["noise"], x["t"], cond)
        assert y.shape == x["x0"].shape
        y_aug = net(x["noise"], x["t"], dict(cond, aug_t=(cond["aug_t"] + 0.4).clamp(max=1)))
        assert not torch.allclose(y_aug, y)                             # the aug level is an input
        k = "frames" if name == "interp" else "lowres"
        assert not torch.allclose(net(x["noise"], x["t"], dict(cond, **{k: cond[k] + 0.5})), y)
        if name == "interp":
            flipped = dict(cond, frame_mask=1 - cond["frame_mask"])
            assert not torch.allclose(net(x["noise"], x["t"], flipped), y)
            with pytest.raises(ValueError, match="needs cond keys"):
                net(x["noise"], x["t"], {k: cond[k] for k in ("text", "text_mask", "pooled")})


# ----------------------------------------------------------------------------- training

def read_log(path):
    with open(path) as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


@torch.no_grad()
def held_out_loss(stage, net, cfg, n=16):
    """The stage's loss on fixed held-out samples, noise and times (mean of 4 batches)."""
    total = 0.0
    for start in range(10_000, 10_000 + n, 4):
        batch, gens = batch_of(cfg, list(range(start, start + 4)))
        total += float(stage.loss(net, stage.prepare(batch, gens, "cpu"))[0]) / (n // 4)
    return total


FLOW = ["diffusion.parameterisation=flow", "diffusion.min_snr_gamma=0.0"]


@pytest.mark.parametrize("name, steps, ratio, extra", [
    ("base", 40, 0.8, []), ("interp", 40, 0.8, []), ("sr", 200, 0.9, []),
    ("base", 40, 0.8, FLOW), ("interp", 40, 0.8, FLOW), ("sr", 100, 0.9, FLOW),
    ("base", 40, 0.8, ["dit.cond_frames=true"])],
    ids=["base", "interp", "sr", "base-flow", "interp-flow", "sr-flow", "base-frame-prompts"])
def test_short_training_run_lowers_the_loss(name, steps, ratio, extra, assets, tmp_path):
    """A DeepSpeed run of a few seconds; the exported EMA weights beat the init on held-out samples
    (measured before sr.residual_scale: interp 0.38x after 40 steps, sr 0.80x after 120; with
    the residual x10, sr 0.91x after 120, so it runs 200)."""
    from safetensors.torch import load_file
    from cascade.train import train
    cfg = stage_cfg(name, assets, [f"train.out_dir={tmp_path}", f"train.steps={steps}",
                                   f"train.ckpt_every={steps}", "train.ema_decay=0.9", *extra])
    export = train(cfg, progress=False)
    rows = read_log(tmp_path / "log.csv")
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert all(r["loss"] == r["loss"] for r in rows)                    # finite
    first, last = (sum(r["loss"] for r in rows[s]) / 8 for s in (slice(0, 8), slice(-8, None)))
    assert last < first, (first, last)
    # the exported EMA weights beat the initial weights on held-out samples
    cfg2 = load_config(export / "config.yaml")
    assert cfg2.stage == name
    stage = build_stage(cfg2)
    init = held_out_loss(stage, stage.net, cfg2)
    stage.net.load_state_dict(load_file(str(export / "model.safetensors")))
    trained = held_out_loss(stage, stage.net, cfg2)
    assert trained < ratio * init, (init, trained)
