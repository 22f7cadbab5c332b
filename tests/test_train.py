"""Training through DeepSpeed on CPU: the loss falls, a killed run resumes exactly, and 2 processes
(ZeRO-2, gloo) follow the same loss curve as 1 process on the same global batch.

"Exactly" is what one machine promises in one process layout: the resumed run and the
uninterrupted one run the same kernels in the same order (same CPU, same thread count, same
ranks), so their losses and weights agree to float rounding of the same operations. Across
process layouts (1 process against 2 ranks) the gradients are summed in another order: the
losses agree within rel 2e-4 and the weights within `assert_trained_close`."""
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cascade.config import load_config

REPO = Path(__file__).resolve().parents[1]
TINY_VAE = [
    "data.frames=4", "data.height=16", "data.width=16",
    "vae.channels=8", "vae.channel_mults=[1,2]", "vae.temporal_down=[false]", "vae.groups=4",
    "vae.latent_channels=4", "vae.lpips_weight=0.0", "vae.lpips_pretrained=false",
    "train.batch_size=4", "train.lr=3e-3", "train.warmup=1", "train.log_every=1",
]


def read_log(path):
    with open(path) as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def clean_env():
    """The parent's environment without its own process-group variables (an in-process run in
    this pytest session set them) and without the interpreter switch."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    for k in ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK", "TRITON_INTERPRET"):
        env.pop(k, None)
    return env


def run_cli(args, **kw):
    env = clean_env()
    return subprocess.Popen([sys.executable, "-m", "cascade.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_short_run_lowers_loss_and_exports(tmp_path):
    from cascade.train import train
    cfg = load_config(REPO / "configs/tiny/vae.yaml",
                      TINY_VAE + [f"train.out_dir={tmp_path}", "train.steps=40", "train.ckpt_every=40"])
    export = train(cfg, progress=False)
    rows = read_log(tmp_path / "log.csv")
    assert [r["step"] for r in rows] == list(range(1, 41))
    first, last = sum(r["loss"] for r in rows[:5]) / 5, sum(r["loss"] for r in rows[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    assert (export / "model.safetensors").is_file() and (export / "config.yaml").is_file()
    assert load_config(export / "config.yaml").vae.channels == 8


def test_killed_run_resumes_from_last_checkpoint(tmp_path):
    common = ["train", str(REPO / "configs/tiny/vae.yaml"), *TINY_VAE, "train.steps=30",
              "train.ckpt_every=4", "train.keep_ckpts=3", "--no-progress"]
    full = run_cli(common + [f"train.out_dir={tmp_path / 'full'}"])
    out, _ = full.communicate(timeout=300)
    assert full.returncode == 0, out

    killed_dir = tmp_path / "killed"
    proc = run_cli(common + [f"train.out_dir={killed_dir}"])
    log = killed_dir / "log.csv"
    deadline = time.time() + 240
    while time.time() < deadline:                      # kill once a checkpoint is behind us
        if log.is_file() and len(log.read_text().splitlines()) > 11:
            break
        if proc.poll() is not None:
            pytest.fail("training ended before it could be killed:\n" + proc.stdout.read())
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_rows = read_log(log)
    last_ckpt = int((killed_dir / "checkpoints" / "latest").read_text().removeprefix("step"))
    assert 8 <= last_ckpt < 30 and len(killed_rows) < 30

    resumed = run_cli(common + [f"train.out_dir={killed_dir}"])
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert f"resumed from {killed_dir}/checkpoints/step{last_ckpt}" in out
    rows = read_log(log)
    assert [r["step"] for r in rows] == list(range(1, 31))   # steps past the checkpoint not repeated
    after = [r for r in rows if r["step"] > last_ckpt]
    assert after[0]["step"] == last_ckpt + 1 and after[-1]["step"] == 30
    ref = {r["step"]: r for r in read_log(tmp_path / "full" / "log.csv")}
    for r in after:                                    # same data, noise, weights and optimizer state
        assert r["loss"] == pytest.approx(ref[r["step"]]["loss"], rel=1e-5, abs=1e-7)
        assert r["lr"] == pytest.approx(ref[r["step"]]["lr"])
    from safetensors.torch import load_file
    a = load_file(str(tmp_path / "full" / "export" / "model.safetensors"))
    b = load_file(str(killed_dir / "export" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_two_processes_zero2_match_one_process(tmp_path):
    """deepspeed launcher, 2 CPU processes x batch 4 with ZeRO-2 == 1 process x batch 8."""
    args = [str(REPO / "configs/tiny/vae.yaml"), *TINY_VAE, "train.steps=12", "train.ckpt_every=100",
            "train.zero_stage=2"]
    one = run_cli(["train", *args, "train.batch_size=8", f"train.out_dir={tmp_path / 'one'}",
                   "--no-progress"])
    out1, _ = one.communicate(timeout=300)
    assert one.returncode == 0, out1
    env = clean_env()
    launcher = Path(sys.executable).with_name("deepspeed")
    two = subprocess.run([str(launcher), "--num_gpus", "2", "--no_local_rank", "--master_port",
                          str(29500 + os.getpid() % 1000), "--module", "cascade.cli", "train", *args,
                          "train.batch_size=4", f"train.out_dir={tmp_path / 'two'}", "--no-progress"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    a, b = read_log(tmp_path / "one" / "log.csv"), read_log(tmp_path / "two" / "log.csv")
    assert len(a) == len(b) == 12
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=2e-4, abs=1e-6), (ra["step"], ra, rb)



def assert_trained_close(a: dict, b: dict, lr: float, rtol: float = 1e-3, atol: float = 1e-5,
                         share: float = 1e-3) -> None:
    """Two runs' exported weights {name: tensor} trained in different process layouts (1 process
    against 2 ranks: gradients summed in another order) agree: per tensor, at most `share` of the
    elements outside rtol / atol, and none further apart than `lr`. Not every element within
    rtol: Adam divides each gradient by its own running RMS, so an element whose gradient is near
    zero takes a step of about lr whose sign its rounding decides (measured, the ZeRO-3 VAE run of
    test_parallel.py: 1 element of the 6912 of one conv weight 3.9e-5 apart, every other within
    1e-5 + 1e-3 |w|)."""
    assert a.keys() == b.keys()
    for k in a:
        assert b[k].shape == a[k].shape and b[k].numel() > 0, k
        diff = (b[k].float() - a[k].float()).abs()
        off = (diff > atol + rtol * a[k].float().abs()).float().mean().item()
        assert off <= share, f"{k}: {off:.3%} of the elements differ by more than rtol={rtol}, atol={atol}"
        assert diff.max().item() <= lr, f"{k}: an element moved {diff.max().item():.3g}, more than lr={lr}"

def test_image_step_fraction_and_determinism():
    from cascade.train import image_step
    picks = [image_step(0, s, 0.25) for s in range(2000)]
    assert 0.2 < sum(picks) / len(picks) < 0.3
    assert picks == [image_step(0, s, 0.25) for s in range(2000)]          # same on every rank
    assert not any(image_step(0, s, 0.0) for s in range(100))
    assert all(image_step(0, s, 1.0) for s in range(100))


def test_decoder_only_finetune_from_an_export(tmp_path):
    """vae.decoder_only + train.init_from (Video LDM's temporal decoder fine-tuning): training
    starts from the export's weights, the encoder stays exactly as it was, the decoder moves, and
    the latent scale is the export's (the latents the later stages read do not change)."""
    from safetensors.torch import load_file
    from cascade.config import ConfigError
    from cascade.models.vae import VideoVAE
    from cascade.train import export, train
    base = load_config(REPO / "configs/tiny/vae.yaml", TINY_VAE + ["data.image_fraction=0.5"])
    torch.manual_seed(1)
    start = VideoVAE(base.vae).state_dict()
    start["scaling_factor"].fill_(0.8125)                                  # no data's own 1 / std
    export(base, start, tmp_path / "init", {})
    cfg = load_config(REPO / "configs/tiny/vae.yaml", TINY_VAE + [
        "vae.decoder_only=true", f"train.init_from={tmp_path / 'init'}", "train.ema_decay=0.0",
        "train.ema_warmup=false", "train.steps=3", "train.ckpt_every=3", f"train.out_dir={tmp_path / 'ft'}"])
    out = load_file(str(train(cfg, progress=False) / "model.safetensors"))
    enc = [k for k in start if k.startswith("encoder.")]
    dec = [k for k in start if k.startswith("decoder.") and k.endswith("weight")]
    assert enc and all(torch.equal(out[k], start[k]) for k in enc)
    assert any(not torch.equal(out[k], start[k]) for k in dec)
    assert float(out["scaling_factor"]) == 0.8125
    wide = load_config(REPO / "configs/tiny/vae.yaml", TINY_VAE + [
        "vae.channels=16", f"train.init_from={tmp_path / 'init'}", f"train.out_dir={tmp_path / 'w'}"])
    with pytest.raises(ValueError, match="train.init_from"):
        train(wide, progress=False)
    with pytest.raises(ConfigError, match="data.image_fraction"):
        load_config(REPO / "configs/tiny/interp.yaml", ["data.image_fraction=0.2"])


def test_compile_flag_compiles_the_network_in_place(tmp_path, monkeypatch):
    """train.compile=true: nn.Module.compile on the stage's network (keys of the export unchanged)."""
    from cascade.train import train
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(type(self).__name__))
    cfg = load_config(REPO / "configs/tiny/vae.yaml", TINY_VAE + [
        "train.compile=true", "train.steps=1", "train.ckpt_every=1", f"train.out_dir={tmp_path}"])
    train(cfg, progress=False)
    assert compiled == ["VideoVAE"]


def test_stop_at_ends_part_way_along_the_schedule_and_resumes_to_its_end(tmp_path):
    """train.stop_at: the run ends (checkpoint, export) at that step with the learning rates of the
    whole train.steps schedule; the same run with stop_at unset resumes there and ends at train.steps."""
    from cascade.config import ConfigError
    from cascade.train import train
    common = TINY_VAE + [f"train.out_dir={tmp_path}", "train.steps=12", "train.schedule=cosine",
                         "train.warmup=1", "train.ckpt_every=100"]
    export = train(load_config(REPO / "configs/tiny/vae.yaml", common + ["train.stop_at=5"]), progress=False)
    rows = read_log(tmp_path / "log.csv")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step5"
    assert (export / "model.safetensors").is_file()
    train(load_config(REPO / "configs/tiny/vae.yaml", common), progress=False)
    rows = read_log(tmp_path / "log.csv")
    assert [r["step"] for r in rows] == list(range(1, 13))
    lrs = [r["lr"] for r in rows]                      # one cosine over 12 steps, no restart at 6
    assert all(a > b for a, b in zip(lrs[1:], lrs[2:])), lrs
    with pytest.raises(ConfigError, match="train.stop_at"):
        load_config(REPO / "configs/tiny/vae.yaml", common + ["train.stop_at=13"])
