"""Prompt -> mp4 through exported stages, and the one-line errors a user can cause."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cascade.cli import main
from cascade.config import StageConfig, load_config, save_config
from cascade.pipeline import Pipeline, StageSampling, keyframe_groups
from cascade.video_io import read_video

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a red circle moving left on a blue background"


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


def randomize_zero_init(net: torch.nn.Module) -> torch.nn.Module:
    """A random net that is not all-zero at the output (adaLN-Zero, zero output convs)."""
    for p in net.parameters():
        if p.abs().sum() == 0:
            p.data.normal_(0, 0.02)
    return net


def export_random(cfg: StageConfig, net: torch.nn.Module, folder: Path) -> Path:
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "model.safetensors"))
    save_config(cfg, folder / "config.yaml")
    return folder


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """A stages folder with a random tiny VAE and a random tiny base DiT (tiny text encoder)."""
    from cascade.models.dit import VideoDiT
    from cascade.models.vae import VideoVAE
    from cascade.text import tiny_text_encoder
    root = tmp_path_factory.mktemp("stages")
    enc = tiny_text_encoder(dim=32, max_length=16)
    enc.model.save_pretrained(root / "text")
    enc.tokenizer.save_pretrained(root / "text")
    common = ["data.frames=4", "data.height=16", "data.width=16", "vae.channels=8",
              "vae.channel_mults=[1,2]", "vae.temporal_down=[false]", "vae.groups=4"]
    vcfg = load_config(REPO / "configs/tiny/vae.yaml", common)
    torch.manual_seed(0)
    export_random(vcfg, VideoVAE(vcfg.vae), root / "vae" / "export")
    bcfg = load_config(REPO / "configs/tiny/base.yaml", common + [
        f"text.encoder={root / 'text'}", "text.dim=32", "text.max_length=16", "dit.text_dim=32",
        "dit.hidden=32", "dit.depth=1", "dit.heads=2", "dit.frames=4", "dit.height=8", "dit.width=8"])
    export_random(bcfg, randomize_zero_init(VideoDiT(bcfg.dit)), root / "base")
    return root


@pytest.fixture(scope="module")
def full(stages, tmp_path_factory):
    """The whole cascade: the `stages` folder's vae and base (4 latent keyframes of 8x8 -> 16x16
    pixels) plus a random tiny interp DiT (K=3 keyframes at rate 2: 5 frames) and a random tiny
    SR U-Net (x2: 32x32 frames, windows of 4 frames overlapping by 1), both guided (scale 2)."""
    from cascade.models.dit import VideoDiT
    from cascade.models.unet import VideoUNet
    root = tmp_path_factory.mktemp("full")
    for name in ("vae", "base"):
        (root / name).symlink_to(stages / name)
    text = [f"text.encoder={stages / 'text'}", "text.dim=32", "text.max_length=16",
            "diffusion.guidance=2.0"]
    torch.manual_seed(1)
    icfg = load_config(REPO / "configs/tiny/interp.yaml", text + [
        "data.frames=5", "data.height=16", "data.width=16", "interp.rate=2", "dit.text_dim=32",
        "dit.hidden=32", "dit.depth=1", "dit.heads=2", "dit.frames=5", "dit.height=8", "dit.width=8"])
    export_random(icfg, randomize_zero_init(VideoDiT(icfg.dit)), root / "interp" / "export")
    scfg = load_config(REPO / "configs/tiny/sr.yaml", text + [
        "data.height=32", "data.width=32", "sr.scale=2", "sr.window=4", "sr.overlap=1",
        "unet.channels=8", "unet.channel_mults=[1,2]", "unet.attn_levels=[1]", "unet.heads=2",
        "unet.groups=4", "unet.text_dim=32"])
    export_random(scfg, randomize_zero_init(VideoUNet(scfg.unet)), root / "sr")
    return root


@pytest.fixture(scope="module")
def full_run(full):
    """One run of the whole cascade (1 video, 2 steps per stage), shared by the tests that read it."""
    pipe = Pipeline(full)
    return pipe, pipe(PROMPT, seed=5, steps=2, progress=False)


def test_pipeline_returns_frames(stages):
    pipe = Pipeline(stages)
    res = pipe(["a red circle moving left on a blue background", "a green square"], seed=1, steps=3,
               num_videos=2, progress=False)
    assert res.video.shape == (4, 3, 4, 16, 16)
    assert res.video.abs().max() <= 1
    assert set(res.timings) == {"base", "vae"}
    again = pipe("a red circle moving left on a blue background", seed=1, steps=3, progress=False)
    torch.testing.assert_close(again.video[0], res.video[0])   # same seed, same video


def test_cli_sample_writes_mp4_and_contact_sheet(stages, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving left on a blue background\n\n  \na blue square moving up\n")
    rc = main(["sample", "a yellow triangle moving right", "--prompt-file", str(prompts), "--stages",
               str(stages), "--out", str(tmp_path / "out"), "--steps", "2", "--seed", "3"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "skipped 2 empty line(s)" in out
    mp4s = sorted((tmp_path / "out").glob("*.mp4"))
    assert len(mp4s) == 3
    frames, fps = read_video(mp4s[0])
    assert frames.shape == (4, 16, 16, 3) and fps == pytest.approx(8)
    assert (tmp_path / "out" / "contact_sheet.png").is_file()
    assert "total" in out


@pytest.mark.parametrize("argv, message", [
    (["sample", "   "], "empty prompt"),
    (["sample", "a cat", "--stages", "/nonexistent/stages"], "stages folder not found"),
    (["train", str(REPO / "configs/tiny/vae.yaml"), "train.stepz=3"], "train.stepz"),
    (["train", str(REPO / "configs/tiny/vae.yaml"), "data.height=30"], "data.height: 30 is not divisible"),
    (["train", str(REPO / "configs/tiny/vae.yaml"), "train.steps=many"], "train.steps"),
    (["train", "configs/nope.yaml"], "config file not found"),
    (["sample", "a cat", "--height", "-16"], "--height: must be 1..16384 pixels, got -16"),
    (["train", str(REPO / "configs/tiny/base.yaml"), "data.buckets=[[8,32,20]]"],
     "data.buckets[0]: 32x20 is not divisible by 8x8"),
    (["train", str(REPO / "configs/tiny/base.yaml"), "train.vae_dir=/nonexistent"],
     "missing checkpoint file"),
])
def test_bad_input_gives_one_line_error(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_missing_stage_in_folder(stages, tmp_path, capsys):
    (tmp_path / "vae").symlink_to(stages / "vae")
    assert main(["sample", "a red circle", "--stages", str(tmp_path)]) == 2
    assert "has no 'base' stage" in capsys.readouterr().err


def test_autoguidance_from_the_exports_guide(stages, tmp_path, capsys):
    """A base export with a guide/ subfolder samples with autoguidance (Karras et al. 2024): the
    model as its own guide gives the video without it, another guide changes it; autoguidance with
    no guide, and a guide with other inputs, are one-line errors."""
    import shutil

    from cascade.config import ConfigError
    from cascade.models.dit import VideoDiT
    root = tmp_path / "ag"
    root.mkdir()
    (root / "vae").symlink_to(stages / "vae")
    shutil.copytree(stages / "base", root / "base")
    shutil.copytree(stages / "base", root / "base" / "guide")
    pipe = Pipeline(root)
    off = pipe(PROMPT, seed=1, steps=3, progress=False, base={"autoguidance": 1.0}).video
    own = pipe(PROMPT, seed=1, steps=3, progress=False, base={"autoguidance": 3.0}).video
    torch.testing.assert_close(own, off, atol=1e-4, rtol=0)       # x0 + 2 (x0(txt) - x0(txt))
    gcfg = load_config(root / "base" / "config.yaml")
    torch.manual_seed(7)
    shutil.rmtree(root / "base" / "guide")
    export_random(gcfg, randomize_zero_init(VideoDiT(gcfg.dit)), root / "base" / "guide")
    other = Pipeline(root)(PROMPT, seed=1, steps=3, progress=False, base={"autoguidance": 3.0}).video
    assert (other - off).abs().max() > 1e-3
    with pytest.raises(ValueError, match="autoguidance 2.0 needs a guide model in .*guide"):
        Pipeline(stages)(PROMPT, seed=1, steps=2, progress=False, base={"autoguidance": 2.0})
    assert main(["sample", PROMPT, "--stages", str(stages), "--out", str(tmp_path / "o"),
                 "--steps", "2", "--autoguidance", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()            # (after the text encoder's load report)
    assert "needs a guide model" in err[-1] and sum("needs a guide" in e for e in err) == 1, err
    flow = load_config(root / "base" / "config.yaml", ["diffusion.parameterisation=flow",
                                                      "diffusion.min_snr_gamma=0"])
    save_config(flow, root / "base" / "guide" / "config.yaml")
    with pytest.raises(ConfigError, match="guide's diffusion.parameterisation is 'flow'"):
        Pipeline(root)


def test_train_guide_puts_the_guide_in_the_export(stages, tmp_path):
    """train.guide: the export gets a copy of that export as guide/, which sampling then loads."""
    from cascade.stages.common import load_export, load_guide
    from cascade.train import export
    cfg, state = load_export(stages / "base")
    cfg.train.guide = str(stages / "base")
    out = export(cfg, state, tmp_path / "export")
    assert (out / "guide" / "model.safetensors").is_file() and load_guide(out, cfg) is not None


# ----------------------------------------------------------------------------- the whole cascade

def test_keyframe_groups():
    assert keyframe_groups(8, 3) == [0, 2, 4, 5]           # the last group moved back to end on 7
    assert keyframe_groups(29, 3) == [2 * i for i in range(14)]
    assert keyframe_groups(3, 3) == [0] and keyframe_groups(4, 2) == [0, 1, 2]
    with pytest.raises(ValueError, match="2 keyframes are fewer than the interp model's K=3"):
        keyframe_groups(2, 3)


def test_full_cascade_shapes_and_stage_outputs(full_run):
    pipe, res = full_run
    assert pipe.stages == ["base", "interp", "vae", "sr"] and pipe.interp_keyframes == 3
    # 4 base keyframes, K=3, r=2: groups at 0 and 1 -> (4-1)*2+1 = 7 frames; x2 resolution
    assert res.video.shape == (1, 3, 7, 32, 32) and res.video.abs().max() <= 1
    st = res.stages
    assert st["keyframes_latent"].shape == (1, 8, 4, 8, 8)
    assert st["keyframes"].shape == (1, 3, 4, 16, 16)
    assert st["interp_latent"].shape == (1, 8, 7, 8, 8)
    assert st["interp"].shape == st["lowres"].shape == (1, 3, 7, 16, 16)
    assert torch.equal(st["final"], res.video)
    assert torch.equal(st["interp_latent"][:, :, ::2], st["keyframes_latent"])   # keyframe slots
    assert not torch.allclose(st["interp_latent"][:, :, 1::2], torch.zeros(1))   # filled in between
    assert res.fps == 16 and res.stage_fps["keyframes"] == 8 and res.stage_fps["final"] == 16
    assert list(res.timings) == list(res.memory) == ["base", "interp", "vae", "sr"]
    assert all(isinstance(m, int) and m >= 0 for m in res.memory.values()) and res.memory_kind


def test_two_interp_passes_and_per_stage_sampling(full, full_run):
    pipe, res = full_run
    two = pipe(PROMPT, seed=5, steps=2, interp_passes=2, progress=False,
               interp=StageSampling(steps=1), sr={"steps": 1, "guidance": 1.0, "sampler": "ddim"})
    # pass 2 takes pass 1's 7 frames as keyframes: groups at 0, 2, 4 -> (7-1)*2+1 = 13 frames
    assert two.video.shape == (1, 3, 13, 32, 32) and two.fps == 32
    assert two.stages["interp_latent"].shape == (1, 8, 13, 8, 8)
    assert torch.equal(two.stages["keyframes_latent"], res.stages["keyframes_latent"])  # same seed
    with pytest.raises(ValueError, match="unknown key"):
        pipe(PROMPT, sr={"step": 1}, progress=False)


def test_ablations_share_the_seed(full, full_run):
    _, res = full_run
    no_sr = Pipeline(full, use_sr=False)
    assert no_sr.sr is None and no_sr.stages == ["base", "interp", "vae"]
    low = no_sr(PROMPT, seed=5, steps=2, progress=False)
    assert low.video.shape == (1, 3, 7, 16, 16) and set(low.timings) == {"base", "interp", "vae"}
    torch.testing.assert_close(low.video, res.stages["lowres"])   # each stage has its own generator
    no_interp = Pipeline(full, use_interp=False)
    keys = no_interp(PROMPT, seed=5, steps=2, progress=False)
    assert keys.video.shape == (1, 3, 4, 32, 32) and set(keys.timings) == {"base", "vae", "sr"}
    assert "interp" not in keys.stages and keys.fps == 8
    torch.testing.assert_close(keys.stages["lowres"], res.stages["keyframes"])


def test_asking_for_an_absent_stage(stages):
    for name in ("interp", "sr"):
        with pytest.raises(FileNotFoundError, match=f"has no '{name}' stage"):
            Pipeline(stages, **{f"use_{name}": True})
    pipe = Pipeline(stages)
    assert pipe.interp is None and pipe.sr is None and pipe.stages == ["base", "vae"]
    with pytest.raises(ValueError, match="interp_passes=1 needs the interp stage"):
        pipe(PROMPT, interp_passes=1, progress=False)


def test_unreachable_frame_counts(full_run):
    pipe, _ = full_run
    with pytest.raises(ValueError, match=r"cannot make 6 frames .* use 5, 7, 9"):
        pipe(PROMPT, frames=6, progress=False)
    with pytest.raises(ValueError, match="cannot make 3 frames .*needs >= 3 base keyframes"):
        pipe(PROMPT, frames=3, progress=False)       # 2 keyframes: fewer than the interp's K=3
    with pytest.raises(ValueError, match="cannot make 11 frames .* use 9, 13, 17"):
        pipe(PROMPT, frames=11, interp_passes=2, progress=False)
    with pytest.raises(ValueError, match="interp_passes must be 0, 1 or 2"):
        pipe(PROMPT, interp_passes=3, progress=False)


def test_any_size_and_unreachable_sizes(full_run):
    """--height / --width: the base samples latents of that size (RoPE and fractional in-frame
    positions take any size); interp and sr follow; sizes the factors cannot make are one line."""
    pipe, _ = full_run
    res = pipe(PROMPT, seed=5, steps=1, height=32, width=48, progress=False)
    assert res.video.shape == (1, 3, 7, 32, 48)                 # vae x2, sr x2: 8x12 latents
    assert res.stages["keyframes_latent"].shape[-2:] == (8, 12)
    assert torch.isfinite(res.video).all()
    with pytest.raises(ValueError, match=r"--height: the cascade cannot make 36 px \(not a multiple of 8 "
                                         r"= VAE x2 x sr x2 x patch 2\); use 8, 16, 24, 32, \.\.\. up to 128"):
        pipe(PROMPT, height=36, progress=False)
    with pytest.raises(ValueError, match=r"--width: the cascade cannot make 256 px \(more than 4x the "
                                         r"trained 32 px\)"):
        pipe(PROMPT, width=256, progress=False)


def test_cli_full_cascade_save_stages_and_table(full, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["sample", PROMPT, "--stages", str(full), "--out", str(out), "--steps", "2",
               "--sr-steps", "1", "--interp-guidance", "1.5", "--save-stages", "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0, text
    (mp4,) = out.glob("*.mp4")
    name = mp4.stem                                       # 000_<prompt slug>
    frames, fps = read_video(mp4)
    assert frames.shape == (7, 32, 32, 3) and fps == pytest.approx(16)
    expect = {"keyframes": ((4, 16, 16, 3), 8), "interp": ((7, 16, 16, 3), 16),
              "lowres": ((7, 16, 16, 3), 16), "final": ((7, 32, 32, 3), 16)}
    assert sorted(p.name for p in (out / name).iterdir()) == sorted(f"{k}.mp4" for k in expect)
    for stage, (shape, rate) in expect.items():
        frames, fps = read_video(out / name / f"{stage}.mp4")
        assert frames.shape == shape and fps == pytest.approx(rate), stage
    table = text[text.index("stage"):].splitlines()
    assert table[0].split() == ["stage", "seconds", "peak", "MiB"]
    assert [ln.split()[0] for ln in table[1:5]] == ["base", "interp", "vae", "sr"]
    assert all(len(ln.split()) == 3 for ln in table[1:5]) and "peak memory:" in table[5]
    assert table[6].startswith("total")


def test_cli_ablations_and_unreachable_frames(full, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["sample", PROMPT, "--stages", str(full), "--out", str(out), "--base-steps", "1",
               "--no-interp", "--no-sr", "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0, text
    frames, fps = read_video(next(out.glob("*.mp4")))
    assert frames.shape == (4, 16, 16, 3) and fps == pytest.approx(8)
    assert [ln.split()[0] for ln in text[text.index("stage"):].splitlines()[1:3]] == ["base", "vae"]
    assert main(["sample", PROMPT, "--stages", str(full), "--frames", "6", "--out", str(out),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]   # after transformers' loading bar
    assert err.startswith("cascade sample: error: frames: the cascade cannot make 6 frames"), err
    assert main(["sample", PROMPT, "--stages", str(full), "--no-interp", "--interp-passes", "2",
                 "--out", str(out), "--no-progress"]) == 2
    assert "interp_passes=2 needs the interp stage" in capsys.readouterr().err


def test_tiny_cascades_list_their_stages():
    from cascade.cli import cascade_stages, load_cascade
    assert cascade_stages(load_cascade(REPO / "configs/cascade/tiny.yaml")) == ["vae", "base"]
    cc = load_cascade(REPO / "configs/cascade/tiny_full.yaml")
    assert cascade_stages(cc) == ["vae", "base", "interp", "sr"]
    assert cc.sample.steps == 20 and cc.sample.sr.steps == 3 and cc.sample.interp.guidance == 1.0


def test_cli_stage_sampling_precedence(full, tmp_path, monkeypatch):
    """--<stage>-X > --X > the cascade's sample defaults (base; sample.interp / sample.sr) > the
    stage's config (None reaches the pipeline)."""
    seen = {}

    def fake_call(self, prompts, **kw):
        seen.update(kw)
        raise ValueError("stop")

    monkeypatch.setattr(Pipeline, "__call__", fake_call)
    argv = ["sample", PROMPT, "--stages", str(full), "--out", str(tmp_path), "--no-progress",
            "--cascade", str(REPO / "configs/cascade/tiny_full.yaml")]
    assert main(argv + ["--guidance", "3", "--interp-steps", "4", "--sr-sampler", "ddim"]) == 2
    assert seen["base"] == StageSampling(20, 3.0, "euler_ancestral")
    assert seen["interp"] == StageSampling(4, 3.0, None)
    assert seen["sr"] == StageSampling(3, 3.0, "ddim")
    assert main(argv + ["--steps", "2", "--base-guidance", "1.5", "--interp-passes", "2"]) == 2
    assert seen["base"] == StageSampling(2, 1.5, "euler_ancestral") and seen["interp_passes"] == 2
    assert seen["interp"] == seen["sr"] == StageSampling(2, 1.0, None)


def test_find_stages_prefers_own_then_shipped_then_trains(full, tmp_path, monkeypatch):
    """--stages; else stages_dir when complete; else the shipped weights_dir; else train."""
    import argparse

    from cascade import cli
    trained = []
    monkeypatch.setattr(cli, "train_cascade", lambda path, only=None, **kw: trained.append(only))
    yaml = tmp_path / "c.yaml"
    own = tmp_path / "own"

    def find(stages=None, weights=""):
        yaml.write_text((REPO / "configs/cascade/tiny_full.yaml").read_text()
                        .replace("stages_dir: runs/tiny", f"stages_dir: {own}")
                        .replace("weights_dir: weights/tiny", f"weights_dir: '{weights}'"))
        args = argparse.Namespace(stages=stages, cascade=str(yaml))
        return cli.find_stages(args, cli.load_cascade(yaml), {"vae", "base", "interp", "sr"})

    assert find(stages=str(full)) == full and not trained
    assert find(weights=str(full)) == full and not trained                    # shipped
    assert find(weights="") == own and trained == [["vae", "base", "interp", "sr"]]
    own.mkdir()
    for name in ("vae", "base", "interp", "sr"):
        (own / name).symlink_to(full / name)
    assert find(weights=str(tmp_path / "nowhere")) == own and len(trained) == 1


def test_sr_residual_is_scaled_back(full, monkeypatch):
    """sr.residual with sr.residual_scale c: the sampled signal is c * (x - upsample(low-res)),
    so the output is upsample(low-res) + sample / c (a sampler returning a constant shows it)."""
    from cascade.models.unet import upsample_video
    pipe = Pipeline(full, use_interp=False)
    pipe.sr.cfg.sr.residual, pipe.sr.cfg.sr.residual_scale = True, 4.0
    monkeypatch.setattr(pipe.sr, "denoise", lambda z, *a, **k: torch.full_like(z, 0.4))
    low = torch.rand(1, 3, 5, 16, 16) * 1.6 - 0.8
    out = pipe.sr.sample(low, *pipe.sr.encode_text([PROMPT]), None, torch.Generator(), False)
    torch.testing.assert_close(out, (upsample_video(low, 2) + 0.1).clamp(-1, 1))


@pytest.fixture(scope="module")
def full_flow(full, tmp_path_factory):
    """The `full` cascade's weights with every diffusion stage read as a rectified flow."""
    from cascade.pipeline import stage_folder
    root = tmp_path_factory.mktemp("flow")
    (root / "vae").symlink_to(stage_folder(full, "vae"))
    for name in ("base", "interp", "sr"):
        src = stage_folder(full, name)
        cfg = load_config(src / "config.yaml", ["diffusion.parameterisation=flow",
                                                "diffusion.shift=2.0", "diffusion.shift_tokens=64"])
        (root / name).mkdir()
        (root / name / "model.safetensors").symlink_to(src / "model.safetensors")
        save_config(cfg, root / name / "config.yaml")
    return root


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp_2m", "euler_ancestral"])
def test_flow_cascade_samples_with_every_sampler(full_flow, sampler):
    """base, interp (keyframe augmentation) and sr (low-res augmentation) all run as flows, with
    a size-dependent shift (diffusion.shift_tokens), through the one sampler signature."""
    pipe = Pipeline(full_flow)
    assert all(s.diffusion.flow for s in pipe.diffusion_stages())
    res = pipe(PROMPT, seed=2, steps=3, sampler=sampler, progress=False)
    assert res.video.shape == (1, 3, 7, 32, 32) and torch.isfinite(res.video).all()
    again = pipe(PROMPT, seed=2, steps=3, sampler=sampler, progress=False)
    assert torch.equal(again.video, res.video)
