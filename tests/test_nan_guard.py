"""The NaN/inf guard of cascade train: a step whose loss or gradient is not finite is skipped (no
optimizer update, no LR-schedule step, no EMA update), counted in log.csv, and the run stops with
one line once more than train.max_bad_steps were skipped."""
import csv
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from cascade.cli import main
from cascade.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
# the tiniest VAE run: 2 frames of 8x8, 4 channels, one level (about 0.05 s a step)
TINIEST = ["data.frames=2", "data.height=8", "data.width=8", "vae.channels=4", "vae.channel_mults=[1]",
           "vae.temporal_down=[]", "vae.latent_channels=2", "vae.lpips_weight=0.0",
           "vae.lpips_pretrained=false", "train.batch_size=1", "train.warmup=1", "train.schedule=constant",
           "train.ckpt_every=1", "train.keep_ckpts=10"]

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


def run(out, *extra) -> int:
    return main(["train", str(REPO / "configs/tiny/vae.yaml"), *TINIEST, f"train.out_dir={out}",
                 "--no-progress", *extra])


class NanGrad(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose every gradient is NaN."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def poison(monkeypatch, steps: set[int], where: str) -> None:
    """Make the loss (where='loss') or every gradient (where='grad') NaN at these 1-based steps."""
    from cascade.stages import VAEStage
    real, calls = VAEStage.loss, [0]

    def loss(self, net, inputs):
        calls[0] += 1
        value, logs = real(self, net, inputs)
        if calls[0] in steps:
            value = value * float("nan") if where == "loss" else NanGrad.apply(value)
        return value, logs
    monkeypatch.setattr(VAEStage, "loss", loss)


def checkpoint(run_dir: Path, step: int) -> dict:
    from cascade.train import weights_only_load
    folder = run_dir / "checkpoints" / f"step{step}"
    sd = weights_only_load(folder / "mp_rank_00_model_states.pt", map_location="cpu")
    with safe_open(str(folder / "ema.safetensors"), "pt") as f:
        updates = f.metadata()["updates"]
    return {"module": sd["module"], "adam": sd["optimizer"]["state"],
            "lr": sd["lr_scheduler"]["last_epoch"], "ema": load_file(str(folder / "ema.safetensors")),
            "ema_updates": updates}


def assert_same(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}/{k}")
    else:
        assert a == b, where


def log_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "log.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "run"
    assert run(out, "train.steps=2") == 0
    return out


@pytest.mark.parametrize("where", ["loss", "grad"])
def test_a_skipped_step_changes_nothing(clean, tmp_path, monkeypatch, where, capsys):
    """Step 3 is NaN: the state after it (weights, Adam moments and step counts, LR schedule, EMA
    and its update count) is bit for bit the state after step 2 of a clean run."""
    poison(monkeypatch, {3}, where)
    out = tmp_path / "nan"
    assert run(out, "train.steps=3") == 0
    said = capsys.readouterr().out
    assert f"step 3: {'the loss' if where == 'loss' else 'a gradient'} is not finite: step skipped" in said
    assert_same(checkpoint(out, 3), checkpoint(clean, 2))
    assert_same(checkpoint(out, 2), checkpoint(clean, 2))        # and steps 1-2 were the clean ones
    rows = log_rows(out)
    assert [r["skipped"] for r in rows] == ["0", "0", "1"]
    assert (rows[2]["loss"] == "nan") == (where == "loss")
    exported = load_file(str(out / "export" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in exported.values())


def test_run_stops_after_max_bad_steps(tmp_path, monkeypatch, capsys):
    poison(monkeypatch, {2, 4}, "loss")
    out = tmp_path / "nan"
    assert run(out, "train.steps=6", "train.max_bad_steps=1") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "the loss became nan at step 4: 2 step(s) skipped" in err and "max_bad_steps=1" in err
    assert f"{out}/checkpoints/step3 is kept" in err
    assert [(r["step"], r["skipped"]) for r in log_rows(out)] == [("1", "0"), ("2", "1"), ("3", "1")]
    assert not (out / "export").exists()
    ema = load_file(str(out / "checkpoints" / "step3" / "ema.safetensors"))
    assert all(torch.isfinite(v).all() for v in ema.values())


def test_skipped_count_survives_resume(tmp_path, monkeypatch, capsys):
    """The count is kept in the checkpoint: a resumed run does not get a fresh allowance."""
    poison(monkeypatch, {1}, "loss")
    out = tmp_path / "nan"
    assert run(out, "train.steps=2", "train.max_bad_steps=1") == 0
    poison(monkeypatch, {1}, "loss")                               # step 3 of the resumed run
    assert run(out, "train.steps=3", "train.max_bad_steps=1") == 2
    assert "at step 3: 2 step(s) skipped" in capsys.readouterr().err


def test_max_bad_steps_is_validated():
    with pytest.raises(ConfigError, match="train.max_bad_steps: must be >= 0"):
        load_config(REPO / "configs/tiny/vae.yaml", ["train.max_bad_steps=-1"])


def test_ema_refuses_non_finite_weights():
    from cascade.train import EMA
    net = torch.nn.Linear(3, 2)
    ema = EMA(net, 0.9)
    before = {k: v.clone() for k, v in ema.shadow.items()}
    with torch.no_grad():
        net.weight[0, 0] = float("inf")
    assert ema.update(net) is False
    assert_same(ema.shadow, before)
    assert ema.updates == 0
