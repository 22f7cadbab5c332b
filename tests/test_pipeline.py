"""Prompt -> mp4 through exported stages, and the one-line errors a user can cause."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cascade.cli import main
from cascade.config import StageConfig, load_config, save_config
from cascade.pipeline import Pipeline
from cascade.video_io import read_video

REPO = Path(__file__).resolve().parents[1]


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
    dit = VideoDiT(bcfg.dit)
    for p in dit.parameters():                     # a random net that is not all-zero at the output
        if p.abs().sum() == 0:
            p.data.normal_(0, 0.02)
    export_random(bcfg, dit, root / "base")
    return root


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
