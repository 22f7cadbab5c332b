"""cascade plan: the per-rank memory of a training step, its activations measured on the meta
device, agrees with a real CPU step (torch's MemTracker: every live tensor, by category) of the
same tiny config, with and without checkpointing; ZeRO and sequence parallelism divide what they
should; the gpu256 cascade is planned stage by stage."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cascade.config import load_config
from cascade.plan import GiB, build_net, plan_stage, step_inputs

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py

TINY = {
    "base": ["dit.hidden=64", "dit.depth=3", "dit.heads=4", "dit.frames=4", "dit.height=16",
             "dit.width=16", "text.max_length=8", "train.batch_size=2"],
    "sr": ["unet.channels=8", "unet.channel_mults=[1,2]", "unet.attn_levels=[1]", "unet.heads=2",
           "unet.groups=4", "data.frames=3", "data.height=32", "data.width=32", "text.max_length=8",
           "train.batch_size=2"],
}


def measured_step_peak(cfg) -> float:
    """Peak bytes of every tensor alive during a real CPU forward + backward + AdamW step."""
    from torch.distributed._tools.mem_tracker import MemTracker
    torch.manual_seed(0)
    net = build_net(cfg, "cpu", torch.float32)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)
    args, _ = step_inputs(cfg, cfg.train.batch_size, "cpu", torch.float32)
    net(*args).square().mean().backward()              # the optimizer state exists from here on
    opt.step()
    opt.zero_grad()
    mt = MemTracker()
    mt.track_external(net, opt)
    with mt:
        net(*args).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return mt.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]


@pytest.mark.parametrize("stage", ["base", "sr"])
@pytest.mark.parametrize("ckpt", [False, True])
def test_plan_matches_a_measured_cpu_step(stage, ckpt):
    key = "dit" if stage == "base" else "unet"
    cfg = load_config(REPO / f"configs/tiny/{stage}.yaml", TINY[stage] + [f"{key}.checkpoint={str(ckpt).lower()}"])
    plan = plan_stage(cfg, zero=0, world=1)
    assert plan.checkpointing == ckpt and plan.params == sum(p.numel() for p in build_net(cfg, "meta", torch.float32).parameters())
    peak = measured_step_peak(cfg)
    assert plan.total == pytest.approx(peak, rel=0.2), (plan, peak)
    if ckpt:                                           # checkpointing lowers what the plan reports
        assert plan.act_bytes < 0.8 * plan_stage(cfg, zero=0, world=1, checkpointing=False).act_bytes


def test_zero_and_sequence_parallel_divide_their_share():
    cfg = load_config(REPO / "configs/tiny/base.yaml", TINY["base"] + ["train.precision=bf16"])
    p0 = plan_stage(cfg, zero=0, world=8)
    assert (p0.param_bytes, p0.grad_bytes, p0.optim_bytes) == (2 * p0.params, 2 * p0.params, 12 * p0.params)
    p3 = plan_stage(cfg, zero=3, world=8, sp=2)        # ZeRO over all 8 ranks (sp groups included)
    assert (p3.param_bytes, p3.grad_bytes, p3.optim_bytes) == (p0.params / 4, p0.params / 4, 1.5 * p0.params)
    assert p3.act_bytes == pytest.approx(p0.act_bytes / 2)
    assert plan_stage(cfg, zero=0, world=1, batch=4).act_bytes == pytest.approx(2 * p0.act_bytes, rel=0.05)


def test_cli_plans_every_stage_of_gpu256():
    r = subprocess.run([sys.executable, "-m", "cascade.cli", "plan", "configs/cascade/gpu256.yaml",
                        "--zero", "2", "--world", "8", "--gpu-memory", "24,80,141"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert "fits 24G" in lines[1] and "fits 141G" in lines[1]
    rows = {ln.split()[0]: ln.split() for ln in lines[3:]}
    assert set(rows) == {"vae", "base"}
    assert rows["base"][1].endswith("M") and float(rows["base"][1][:-1]) > 500     # DiT-XL/2
    assert all(c in ("yes", "no") for r_ in rows.values() for c in r_[-3:])
    bad = subprocess.run([sys.executable, "-m", "cascade.cli", "plan", "configs/cascade/gpu256.yaml",
                          "--sp", "3", "--world", "8"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "not divisible" in bad.stderr
