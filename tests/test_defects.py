"""Defects a new user met: pickles on resume, NaN sampling flags, tracebacks instead of one line,
and runs that lost or mixed up what they had written. Each test failed before its fix."""
import errno
import json
import logging
import os
import re
import shutil
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from cascade.cli import main
from cascade.config import ConfigError, load_config, save_config

REPO = Path(__file__).resolve().parents[1]
TINY_VAE = [
    "data.frames=4", "data.height=16", "data.width=16",
    "vae.channels=8", "vae.channel_mults=[1,2]", "vae.temporal_down=[false]", "vae.groups=4",
    "vae.latent_channels=4", "vae.lpips_weight=0.0", "vae.lpips_pretrained=false",
    "train.batch_size=2", "train.lr=3e-3", "train.warmup=1", "train.log_every=1",
    "train.ckpt_every=4", "train.keep_ckpts=2",
]

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


def train_argv(out, *extra):
    return ["train", str(REPO / "configs/tiny/vae.yaml"), *TINY_VAE, f"train.out_dir={out}",
            "--no-progress", *extra]


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def log_steps(run: Path) -> list[int]:
    import csv
    with open(run / "log.csv") as f:
        return [int(r["step"]) for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def run8(tmp_path_factory):
    """A finished 8-step run: checkpoints step4 and step8, log.csv, export."""
    out = tmp_path_factory.mktemp("run") / "run8"
    assert main(train_argv(out, "train.steps=8")) == 0
    assert sorted(p.name for p in (out / "checkpoints").glob("step*")) == ["step4", "step8"]
    return out


@pytest.fixture
def run(run8, tmp_path):
    """A copy of run8 to damage."""
    return Path(shutil.copytree(run8, tmp_path / "run"))


# ----------------------------------------------------------------------------- 1: no pickles on resume

class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def plant_pickle(folder: Path, marker: Path) -> Path:
    """Replace the DeepSpeed model file with one that runs code when unpickled, state.json's
    sizes updated as an attacker would."""
    target = folder / "mp_rank_00_model_states.pt"
    sd = torch.load(target, weights_only=True)
    sd["extra"] = Evil(marker)
    torch.save(sd, target)
    if (folder / "state.json").is_file():
        state = json.loads((folder / "state.json").read_text())
        state["files"][target.name] = target.stat().st_size
        (folder / "state.json").write_text(json.dumps(state))
    return target


def test_resume_never_runs_a_checkpoints_pickle(run, tmp_path, capsys):
    marker = tmp_path / "pwned"
    plant_pickle(run / "checkpoints" / "step8", marker)
    rc = main(train_argv(run, "train.steps=10"))                          # falls back to step4
    assert not marker.exists()
    assert rc == 0
    out = capsys.readouterr().out
    assert f"resumed from {run}/checkpoints/step4" in out
    assert log_steps(run) == list(range(1, 11))


def test_weights_only_load_refuses_the_planted_object(run, tmp_path):
    marker = tmp_path / "pwned"
    plant_pickle(run / "checkpoints" / "step8", marker)
    from cascade.train import CheckpointError, weights_only_load
    with pytest.raises(CheckpointError, match="refuses"):
        weights_only_load(run / "checkpoints" / "step8" / "mp_rank_00_model_states.pt")
    assert not marker.exists()


def test_resume_with_only_a_planted_checkpoint_is_one_line(run, tmp_path, capsys):
    marker = tmp_path / "pwned"
    shutil.rmtree(run / "checkpoints" / "step4")
    plant_pickle(run / "checkpoints" / "step8", marker)
    assert main(train_argv(run, "train.steps=10")) == 2
    assert "no usable checkpoint" in one_line(capsys)
    assert not marker.exists()


# ----------------------------------------------------------------------------- 5: nothing lost on resume

def test_log_does_not_repeat_steps_after_the_checkpoint(run, capsys):
    """As if killed after logging step 8 but before its checkpoint: step8 gone, latest = step4."""
    shutil.rmtree(run / "checkpoints" / "step8")
    (run / "checkpoints" / "latest").write_text("step4")
    assert main(train_argv(run, "train.steps=8")) == 0
    assert f"resumed from {run}/checkpoints/step4" in capsys.readouterr().out
    assert log_steps(run) == list(range(1, 9))


@pytest.mark.parametrize("damage", ["truncate model", "random ema", "no state"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous(run, damage, capsys, caplog):
    step8 = run / "checkpoints" / "step8"
    if damage == "truncate model":
        f = step8 / "mp_rank_00_model_states.pt"
        f.write_bytes(f.read_bytes()[:5000])
    elif damage == "random ema":
        (step8 / "ema.safetensors").write_bytes(os.urandom(4000))
    else:                                       # a run before state.json: the model file truncated
        (step8 / "state.json").unlink(missing_ok=True)
        f = step8 / "mp_rank_00_model_states.pt"
        f.write_bytes(f.read_bytes()[:-3000])
    with caplog.at_level(logging.WARNING):
        assert main(train_argv(run, "train.steps=8")) == 0
    assert f"resumed from {run}/checkpoints/step4" in capsys.readouterr().out
    assert any("step8 cannot be used" in r.getMessage() for r in caplog.records)
    assert log_steps(run) == list(range(1, 9))


def test_resume_with_another_architecture_is_one_line_and_keeps_config(run, capsys):
    before = (run / "config.yaml").read_text()
    assert main(train_argv(run, "train.steps=10", "vae.channels=16")) == 2
    assert "another model" in one_line(capsys)
    assert (run / "config.yaml").read_text() == before


def test_failing_train_does_not_overwrite_the_runs_config(run, capsys):
    before = (run / "config.yaml").read_text()
    (run / "bad.jsonl").write_text('{"path": "gone.mp4", "caption": "x"}\n')
    assert main(train_argv(run, "train.steps=10", "data.kind=folder", f"data.root={run}",
                           "data.manifest=bad.jsonl")) == 2
    assert "none of" in one_line(capsys)
    assert (run / "config.yaml").read_text() == before


def test_nan_loss_is_one_line(tmp_path, monkeypatch, capsys):
    from cascade.stages import VAEStage
    real = VAEStage.loss

    def nan_loss(self, net, inputs):
        loss, logs = real(self, net, inputs)
        return loss * float("nan"), logs
    monkeypatch.setattr(VAEStage, "loss", nan_loss)
    assert main(train_argv(tmp_path / "nan", "train.steps=2", "train.max_bad_steps=0")) == 2
    assert "loss became nan at step 1" in one_line(capsys)       # the NaN guard's limit: tests/test_nan_guard.py
    assert not (tmp_path / "nan" / "config.yaml").exists()


def test_full_disk_while_checkpointing_is_one_line_and_keeps_the_previous(run, monkeypatch, capsys):
    from cascade import train as train_mod

    def full(self, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    monkeypatch.setattr(train_mod.EMA, "save", full)
    assert main(train_argv(run, "train.steps=12")) == 2
    err = one_line(capsys)
    assert "No space left on device" in err and "step12" in err
    assert (run / "checkpoints" / "latest").read_text() == "step8"
    assert not (run / "checkpoints" / "step12").exists()


# ----------------------------------------------------------------------------- 5: exports

def test_export_is_replaced_whole_with_the_users_umask(tmp_path, monkeypatch):
    from cascade.train import export
    cfg = load_config(REPO / "configs/tiny/vae.yaml", TINY_VAE)
    state = {"w": torch.ones(3)}
    old_mask = os.umask(0o022)
    try:
        folder = export(cfg, state, tmp_path / "export", {"psnr": 1.0})
        for p in (folder / "model.safetensors", folder / "config.yaml", folder / "metrics.json",
                  folder / "SHA256SUMS"):
            assert stat.S_IMODE(p.stat().st_mode) == 0o644, p
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755
        export(cfg, {"w": torch.zeros(3)}, folder)                         # no metrics this time
        assert sorted(p.name for p in folder.iterdir()) == ["SHA256SUMS", "config.yaml", "model.safetensors"]

        import cascade.train as train_mod

        def broken(cfg, path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        monkeypatch.setattr(train_mod, "save_config", broken)
        with pytest.raises(OSError):
            export(cfg, {"w": torch.full((3,), 7.0)}, folder, {"psnr": 2.0})
    finally:
        os.umask(old_mask)
    from safetensors.torch import load_file
    assert torch.equal(load_file(str(folder / "model.safetensors"))["w"], torch.zeros(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]       # no temporary folders left


# ----------------------------------------------------------------------------- 4: config and weight files

@pytest.mark.parametrize("text, message", [
    ("train:\n  steps: [1, 2\n", "not valid YAML (line"),
    ("- stage: vae\n- data: {}\n", "top level must be a mapping"),
])
def test_bad_yaml_is_one_line_naming_the_file(tmp_path, text, message, capsys):
    path = tmp_path / "stage.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(path)
    assert main(["train", str(path)]) == 2
    err = one_line(capsys)
    assert message in err and str(path) in err


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """vae + base exports (random tiny nets, tiny text encoder)."""
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
    bcfg = load_config(REPO / "configs/tiny/base.yaml", common + [
        f"text.encoder={root / 'text'}", "text.dim=32", "text.max_length=16", "dit.text_dim=32",
        "dit.hidden=32", "dit.depth=1", "dit.heads=2", "dit.frames=4", "dit.height=8", "dit.width=8"])
    torch.manual_seed(0)
    for name, cfg, net in (("vae", vcfg, VideoVAE(vcfg.vae)), ("base", bcfg, VideoDiT(bcfg.dit))):
        (root / name).mkdir()
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(root / name / "model.safetensors"))
        save_config(cfg, root / name / "config.yaml")
    return root


@pytest.mark.parametrize("damage", ["truncated", "random bytes", "config shapes"])
def test_bad_stage_files_are_one_line(stages, tmp_path, damage, capsys):
    root = Path(shutil.copytree(stages, tmp_path / "stages", symlinks=True))
    if damage == "truncated":
        f = root / "vae" / "model.safetensors"
        f.write_bytes(f.read_bytes()[:3000])
        want = str(f)
    elif damage == "random bytes":
        f = root / "base" / "model.safetensors"
        f.write_bytes(os.urandom(5000))
        want = str(f)
    else:
        cfg = load_config(root / "base" / "config.yaml", ["dit.hidden=64", "dit.heads=2"])
        save_config(cfg, root / "base" / "config.yaml")
        want = "does not match model.safetensors"
    assert main(["sample", "a red circle", "--stages", str(root), "--out", str(tmp_path / "o"),
                 "--steps", "1", "--no-progress"]) == 2
    assert want in one_line(capsys)


# ----------------------------------------------------------------------------- 2 + 4: sampling flags, --out

class NoPipeline:
    def __init__(self, *a, **k):
        raise AssertionError("sampling started")


def fake_pipeline(video):
    class Fake:                                        # what the CLI reads of a Pipeline
        interp, fps = None, 8.0

        def __init__(self, *a, **k):
            pass

        def __call__(self, prompts, **k):
            return SimpleNamespace(video=video, prompts=list(prompts), fps=8.0, stages={}, stage_fps={})
    return Fake


@pytest.mark.parametrize("flags, message", [
    (["--guidance", "nan"], "--guidance: must be a finite number"),
    (["--guidance", "inf"], "--guidance: must be a finite number"),
    (["--guidance=-1"], "--guidance"),
    (["--base-guidance", "nan"], "--base-guidance"),
    (["--sr-guidance=-inf"], "--sr-guidance"),
    (["--steps", "0"], "--steps: must be 1.."),
    (["--interp-steps", "1000000"], "--interp-steps"),
    (["--frames", "100001"], "--frames: must be 1.."),
    (["--frames", "0"], "--frames"),
    (["--num-videos", "0"], "--num-videos"),
])
def test_bad_sampling_numbers_are_one_line_before_loading(flags, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("cascade.pipeline.Pipeline", NoPipeline)
    assert main(["sample", "a red circle", "--stages", str(tmp_path), "--out", str(tmp_path / "o"),
                 *flags]) == 2
    assert message in one_line(capsys)
    assert not (tmp_path / "o").exists()


def test_non_finite_videos_are_not_written(tmp_path, monkeypatch, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "contact_sheet.png").write_bytes(b"a good sheet")
    monkeypatch.setattr("cascade.pipeline.Pipeline", fake_pipeline(torch.full((1, 3, 2, 8, 8), float("nan"))))
    assert main(["sample", "a red circle", "--stages", str(tmp_path), "--out", str(out)]) == 2
    assert "non-finite" in one_line(capsys)
    assert (out / "contact_sheet.png").read_bytes() == b"a good sheet"
    assert not list(out.glob("*.mp4"))


def test_out_that_is_a_file_is_one_line_before_sampling(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("cascade.pipeline.Pipeline", NoPipeline)
    (tmp_path / "o").write_text("not a folder")
    assert main(["sample", "a red circle", "--stages", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "is a file" in one_line(capsys)


def test_read_only_out_is_checked_before_sampling(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("cascade.pipeline.Pipeline", NoPipeline)
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    if os.geteuid() == 0:                      # root writes anyway: the OS's answer for everyone else
        import tempfile

        def denied(*a, dir=None, **k):
            raise PermissionError(errno.EACCES, "Permission denied", str(dir))
        monkeypatch.setattr(tempfile, "NamedTemporaryFile", denied)
    try:
        assert main(["sample", "a red circle", "--stages", str(tmp_path), "--out", str(out)]) == 2
    finally:
        out.chmod(0o755)
    assert "cannot write to" in one_line(capsys)


def test_full_disk_while_writing_videos_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("cascade.pipeline.Pipeline", fake_pipeline(torch.zeros(1, 3, 2, 8, 8)))

    def full(video, path, fps=8.0):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    monkeypatch.setattr("cascade.video_io.write_mp4", full)
    assert main(["sample", "a red circle", "--stages", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "No space left on device" in one_line(capsys)


# ----------------------------------------------------------------------------- 6: long prompts

def test_long_prompt_cut_is_said_once(caplog):
    from cascade.text import tiny_text_encoder
    enc = tiny_text_encoder(dim=32, max_length=8)
    with caplog.at_level(logging.WARNING, logger="cascade.text"):
        enc(["a red circle"])
        assert not caplog.records                                           # short: nothing said
        enc(["a red circle moving left on a blue background, slowly, then faster and faster"])
        enc(["a green square moving up on a white background with a very long tail of words"])
    cut = [r.getMessage() for r in caplog.records if "cut" in r.getMessage()]
    assert len(cut) == 1 and "max_length" in cut[0], cut
    other = tiny_text_encoder(dim=32, max_length=8)                         # per encoder
    with caplog.at_level(logging.WARNING, logger="cascade.text"):
        other(["a green square moving up on a white background with a very long tail of words"])
    assert len([r for r in caplog.records if "cut" in r.getMessage()]) == 2
