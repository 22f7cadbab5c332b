"""Parallel training on CPU: ZeRO-3 (parameters partitioned over the ranks) follows the loss curve of
1 process and exports the same EMA weights; ZeRO-3 with activation checkpointing on the DiT and
U-Net stages trains exactly like plain data parallelism; DeepSpeed-Ulysses sequence parallelism
(attention, the DiT, `cascade train` with ZeRO-2) gives what 1 process gives."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cascade.config import load_config
from tests.test_stages_cascade import TINY_BASE, assets, stage_cfg  # noqa: F401  (module fixture)
from tests.test_train import TINY_VAE, assert_trained_close, clean_env, read_log, run_cli

REPO = Path(__file__).resolve().parents[1]


def test_two_processes_zero3_match_one_process(tmp_path):
    """deepspeed launcher, 2 CPU processes x batch 4 with ZeRO-3 == 1 process x batch 8: the same
    losses, and the same exported EMA weights (gathered from the partitions), through a resume."""
    args = [str(REPO / "configs/tiny/vae.yaml"), *TINY_VAE, "train.steps=8", "train.ckpt_every=4",
            "train.zero_stage=3", "train.schedule=constant"]    # constant: a 4-step run, then resumed to 8
    one = run_cli(["train", *args, "train.batch_size=8", f"train.out_dir={tmp_path / 'one'}",
                   "--no-progress"])
    out1, _ = one.communicate(timeout=300)
    assert one.returncode == 0, out1
    launcher = Path(sys.executable).with_name("deepspeed")

    def two(steps):
        return subprocess.run([str(launcher), "--num_gpus", "2", "--no_local_rank", "--master_port",
                               str(29500 + (os.getpid() + steps) % 1000), "--module", "cascade.cli",
                               "train", *args, f"train.steps={steps}", "train.batch_size=4",
                               f"train.out_dir={tmp_path / 'two'}", "--no-progress"],
                              cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=400)
    for steps in (4, 8):                               # the second run resumes from step 4
        r = two(steps)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resumed from" in r.stdout + r.stderr
    a, b = read_log(tmp_path / "one" / "log.csv"), read_log(tmp_path / "two" / "log.csv")
    assert len(a) == len(b) == 8
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=2e-4, abs=1e-6), (ra["step"], ra, rb)
    assert_trained_close(load_file(str(tmp_path / "one" / "export" / "model.safetensors")),
                         load_file(str(tmp_path / "two" / "export" / "model.safetensors")), lr=3e-3)


@pytest.mark.parametrize("stage, ckpt", [("base", "dit.checkpoint=true"), ("sr", "unet.checkpoint=true")])
def test_zero3_with_checkpointing_trains_like_zero0(stage, ckpt, assets, tmp_path):  # noqa: F811
    """The DiT and U-Net read child weights inside fused ops (ZeRO-3 leaf modules gather them)."""
    from cascade.train import train
    logs, exports = [], []
    for zero, extra in ((0, []), (3, [ckpt])):
        out = tmp_path / f"z{zero}"
        cfg = stage_cfg(stage, assets, ["train.steps=3", "train.ckpt_every=100", f"train.zero_stage={zero}",
                                        f"train.out_dir={out}", *extra])
        exports.append(load_file(str(train(cfg, progress=False) / "model.safetensors")))
        logs.append(read_log(out / "log.csv"))
    for ra, rb in zip(*logs):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4, abs=1e-6), (ra, rb)
    for k in exports[0]:
        torch.testing.assert_close(exports[1][k], exports[0][k], rtol=1e-4, atol=1e-6, msg=k)


def _ulysses_worker(rank, world, port, q, k, v, g, results):
    import torch.distributed as dist
    from cascade.parallel import shard_frames, ulysses_attention
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        out = {}
        for mode in ("spatial", "temporal", "full"):
            ql, kl, vl = (shard_frames(t, None).clone().requires_grad_() for t in (q, k, v))
            o = ulysses_attention(ql, kl, vl, mode)
            (o * shard_frames(g, None)).sum().backward()
            out[mode] = [t.detach() for t in (o, ql.grad, kl.grad, vl.grad)]
        results[rank] = out
    finally:
        dist.destroy_process_group()


def test_ulysses_attention_two_processes_match_one():
    """2 gloo ranks, frames sharded: each mode's output and q/k/v gradients equal the unsharded
    attention's, frame slice by frame slice (all-to-all to head shards and back)."""
    import socket
    import torch.multiprocessing as mp
    from kernels.attention import spacetime_attention
    g0 = torch.Generator().manual_seed(0)
    B, T, S, h, d = 2, 6, 5, 4, 8
    q, k, v, g = (torch.randn(B, T, S, h, d, generator=g0) for _ in range(4))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    with ctx.Manager() as m:
        results = m.dict()
        mp.start_processes(_ulysses_worker, args=(2, port, q, k, v, g, results), nprocs=2,
                           join=True, start_method="spawn")
        results = dict(results)
    for mode in ("spatial", "temporal", "full"):
        qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
        o = spacetime_attention(qr, kr, vr, mode=mode)
        (o * g).sum().backward()
        want = [o.detach(), qr.grad, kr.grad, vr.grad]
        for rank in range(2):
            for name, got, ref in zip(("out", "dq", "dk", "dv"), results[rank][mode], want):
                torch.testing.assert_close(got, ref.chunk(2, dim=1)[rank], rtol=1e-5, atol=1e-6,
                                           msg=f"{mode} {name} rank {rank}")


# ----------------------------------------------------------------------------- Ulysses in the DiT

def _dit_cases():
    """name -> (DiTConfig, weights, x, t, cond, g): tiny DiTs with every zero-initialised weight
    randomised (so every path carries gradient), 4 latent frames (2 per rank)."""
    from cascade.config import DiTConfig
    from cascade.models.dit import VideoDiT
    from tests.test_stages_cascade import randomize_zero_init
    base = dict(in_channels=4, hidden=32, depth=2, heads=2, frames=4, height=4, width=4, text_dim=16)
    variants = {"factorised": {}, "full_sincos": dict(attention="full", pos="sincos"),
                "hybrid_ckpt": dict(attention="hybrid", checkpoint=True, text_pool="attention"),
                "interp": dict(cond_frames=True, frame_pos=True)}
    g0 = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g0)                      # noqa: E731
    cases = {}
    for name, extra in variants.items():
        cfg = DiTConfig(**base, **extra)
        torch.manual_seed(0)
        net = VideoDiT(cfg)
        randomize_zero_init(net)
        B, L = 2, 3
        cond = dict(text=rnd(B, L, 16), pooled=rnd(B, 16),
                    text_mask=torch.tensor([[True, True, False], [True, False, False]]))
        if cfg.cond_frames:
            cond.update(frames=rnd(B, 4, 4, 4, 4), frame_mask=(rnd(B, 1, 4, 1, 1) > 0).float(),
                        aug_t=torch.rand(B, generator=g0))
        cases[name] = (cfg, net.state_dict(), rnd(B, 4, 4, 4, 4), torch.rand(B, generator=g0), cond,
                       rnd(B, 4, 4, 4, 4))
    return cases


def _dit_loss(pred, g):
    """A loss of the whole prediction that also reads differences across the shards' border
    (as diffusion.motion_weight's frame differences do)."""
    return (pred * g).sum() + pred.diff(dim=2).square().sum()


def _dit_forward_backward(cfg, state, x, t, cond, g, group=None):
    from cascade.models.dit import VideoDiT
    net = VideoDiT(cfg)
    net.load_state_dict(state)
    net.sequence_parallel(group)
    pred = net(x, t, cond)
    _dit_loss(pred, g).backward()
    return pred.detach(), {k: p.grad.clone() for k, p in net.named_parameters()}


def _dit_worker(rank, world, port, cases, results):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results[rank] = {name: _dit_forward_backward(*case, group=dist.group.WORLD)
                         for name, case in cases.items()}
    finally:
        dist.destroy_process_group()


def test_dit_sequence_parallel_two_processes_match_one():
    """VideoDiT with its 4 latent frames sharded over 2 gloo ranks (VideoDiT.sequence_parallel):
    factorised, full (sin-cos positions), hybrid (with activation checkpointing) and the interp
    DiT (keyframe inputs, in-frame positions) give every rank the 1-process prediction, and the
    ranks' parameter gradients sum to the 1-process gradients of the same loss."""
    import socket
    import torch.multiprocessing as mp
    cases = _dit_cases()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.get_context("spawn").Manager() as m:
        results = m.dict()
        mp.start_processes(_dit_worker, args=(2, port, cases, results), nprocs=2, join=True,
                           start_method="spawn")
        results = dict(results)
    for name, case in cases.items():
        pred, grads = _dit_forward_backward(*case)
        for rank in range(2):
            torch.testing.assert_close(results[rank][name][0], pred, rtol=1e-4, atol=1e-5,
                                       msg=f"{name}: prediction on rank {rank}")
        for k, want in grads.items():
            got = results[0][name][1][k] + results[1][name][1][k]
            assert want.abs().sum() > 0, (name, k)                    # every weight is reached
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=f"{name}: grad of {k}")


def test_sequence_parallel_config_errors(assets):  # noqa: F811
    """train.sequence_parallel's one-line errors: each names the key and the problem."""
    from cascade.config import ConfigError
    from cascade.train import train
    for extra, words in ((["train.sequence_parallel=0"], "must be >= 1"),
                         (["train.sequence_parallel=4"], "dit.heads=2 is not divisible"),
                         (["train.sequence_parallel=2", "dit.frames=3", "data.frames=3"],
                          "3 latent token frames"),
                         (["train.sequence_parallel=2", "dit.attention=window"], "window"),
                         (["train.sequence_parallel=2", "train.pack_tokens=64"], "pack_tokens"),
                         (["train.sequence_parallel=2", "data.image_fraction=0.5"], "1-frame")):
        with pytest.raises(ConfigError, match=words) as e:
            stage_cfg("base", assets, extra)
        assert str(e.value).startswith("train.sequence_parallel: ") and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="not the 'sr' stage"):
        stage_cfg("sr", assets, ["train.sequence_parallel=2"])
    cfg = stage_cfg("base", assets, ["train.sequence_parallel=2"])   # valid, but 1 process here
    with pytest.raises(ConfigError, match="2 does not divide the 1 processes"):
        train(cfg, progress=False)


def test_sequence_parallel_train_two_processes_match_one(assets, tmp_path):  # noqa: F811
    """`cascade train` of a tiny base stage (hybrid attention, motion loss across the shards'
    border) with train.sequence_parallel=2 and ZeRO-2 on 2 processes (data-parallel world 1: the
    same batch of 4) logs the losses of 1 process without sequence parallelism and exports the
    same EMA weights."""
    from cascade.train import train
    extra = ["train.steps=3", "train.ckpt_every=100", "dit.attention=hybrid", "dit.depth=2",
             "diffusion.motion_weight=0.5"]
    one = train(stage_cfg("base", assets, [*extra, f"train.out_dir={tmp_path / 'one'}"]), progress=False)
    launcher = Path(sys.executable).with_name("deepspeed")
    args = [*TINY_BASE, f"text.encoder={assets / 'text'}", f"train.vae_dir={assets / 'vae'}", *extra,
            "train.sequence_parallel=2", "train.zero_stage=2", f"train.out_dir={tmp_path / 'two'}"]
    r = subprocess.run([str(launcher), "--num_gpus", "2", "--no_local_rank", "--master_port",
                        str(30500 + os.getpid() % 1000), "--module", "cascade.cli", "train",
                        str(REPO / "configs/tiny/base.yaml"), *args, "--no-progress"],
                       cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a, b = read_log(tmp_path / "one" / "log.csv"), read_log(tmp_path / "two" / "log.csv")
    assert len(a) == len(b) == 3
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4, abs=1e-6), (ra["step"], ra, rb)
        assert rb["samples_per_s"] > 0
    assert_trained_close(load_file(str(one / "model.safetensors")),
                         load_file(str(tmp_path / "two" / "export" / "model.safetensors")),
                         lr=2e-3)                                        # TINY_BASE's train.lr
