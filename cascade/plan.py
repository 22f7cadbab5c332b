"""Memory plan of a cascade's training: `cascade plan configs/cascade/gpu256.yaml --zero 2 --world 8`.

Per stage, per rank, for one training step (one micro batch):
- parameters, gradients and optimizer state. Mixed precision (bf16/fp16) as DeepSpeed runs it:
  16-bit params (2 B) and grads (2 B) on the GPU, AdamW's fp32 master copy and two moments
  (12 B); fp32 training: 4 B params, 4 B grads, 8 B moments. ZeRO partitions them over all
  `world` ranks, the ranks of an sp group included (they hold the same parameters; cascade.train
  gives DeepSpeed the whole world, as DeepSpeed-Ulysses' sequence-data-parallel group does):
  stage 1 the optimizer state, stage 2 also the gradients, stage 3 also the parameters;
- activations: the bytes autograd keeps for the backward, measured, not modelled: the stage's
  network is built on the meta device (no memory, no compute) and one forward runs on meta inputs
  of the training shape under torch.autograd.graph.saved_tensors_hooks, which sees every tensor
  saved for the backward (counted once per storage; parameters excluded). With checkpointing,
  what a step keeps is measured on the same run: the activations outside the checkpointed blocks,
  the blocks' inputs, and one block's own activations (recomputed in the backward, one at a time).
  DeepSpeed-Ulysses sequence parallelism (DiT stages, train.sequence_parallel) shards every
  token activation over the sp ranks: divided by sp (the replicated text and time embeddings
  and the gathered prediction are small beside them). Not counted: the frozen VAE / text encoder / LPIPS helpers of a stage,
  the backward's transient buffers, the CUDA context and allocator fragmentation, which is why
  a stage "fits" only under HEADROOM of a GPU's memory.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

GiB = 2 ** 30
HEADROOM = 0.85                       # a plan fits a GPU when it needs at most this share of it
DEFAULT_GPUS = (24, 80, 141)          # GiB: a 24 GB card, A100/H100 80 GB, H200 141 GB


@dataclass
class StagePlan:
    stage: str
    params: int                       # parameter count (trainable)
    param_bytes: float                # per rank
    grad_bytes: float
    optim_bytes: float
    act_bytes: float                  # saved activations of one micro batch, per rank
    batch: int
    sp: int
    checkpointing: bool

    @property
    def total(self) -> float:
        return self.param_bytes + self.grad_bytes + self.optim_bytes + self.act_bytes


class SavedBytes:
    """Counts the bytes autograd saves for the backward (once per storage, parameters excluded),
    and, for the modules in `blocks`, each block's own share and the bytes of its inputs."""

    def __init__(self, params, blocks=()):
        self.skip = {p.untyped_storage()._cdata for p in params}
        self.seen: set = set()
        self.total = 0
        self.block_saved: list[int] = []
        self.block_inputs: list[int] = []
        self._hooks = []
        for b in blocks:
            self._hooks.append(b.register_forward_pre_hook(self._enter))
            self._hooks.append(b.register_forward_hook(self._leave))

    def _bytes(self, t: torch.Tensor) -> int:
        st = t.untyped_storage()
        if st._cdata in self.skip or st._cdata in self.seen:
            return 0
        self.seen.add(st._cdata)
        return st.nbytes()

    def pack(self, t):
        self.total += self._bytes(t)
        return t

    def _enter(self, module, args):
        self._start = self.total
        # the block's first argument is the residual stream checkpointing keeps; the others
        # (embedding, text) are shared by every block and are already counted outside
        x = args[0]
        self.block_inputs.append(x.untyped_storage().nbytes() if torch.is_tensor(x) else 0)

    def _leave(self, module, args, out):
        self.block_saved.append(self.total - self._start)

    def close(self):
        for h in self._hooks:
            h.remove()

    def activations(self, checkpointing: bool) -> int:
        if not checkpointing or not self.block_saved:
            return self.total
        outside = self.total - sum(self.block_saved)
        return outside + sum(self.block_inputs) + max(self.block_saved)


def _dtype(cfg) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision, torch.float32)


def step_inputs(cfg, batch: int, device, dtype):
    """(args of the network's forward, the block classes) at the stage's training shape."""
    mk = lambda *s: torch.randn(*s, device=device, dtype=dtype)        # noqa: E731
    if cfg.stage == "vae":
        d = cfg.data
        return (mk(batch, 3, d.frames, d.height, d.width),), ()
    L = cfg.text.max_length
    if cfg.stage == "sr":
        from cascade.models.unet import ResBlock
        d, u = cfg.data, cfg.unet
        x = mk(batch, u.in_channels, d.frames, d.height, d.width)
        cond = dict(text=mk(batch, L, u.text_dim), pooled=mk(batch, u.text_dim), lowres=mk(*x.shape),
                    text_mask=torch.ones(batch, L, dtype=torch.bool, device=device),
                    aug_t=torch.rand(batch, device=device, dtype=dtype))
        return (x, torch.rand(batch, device=device, dtype=dtype), cond), (ResBlock,)
    from cascade.models.dit import DiTBlock
    c = cfg.dit
    x = mk(batch, c.in_channels, c.frames, c.height, c.width)
    cond = dict(text=mk(batch, L, c.text_dim), pooled=mk(batch, c.text_dim),
                text_mask=torch.ones(batch, L, dtype=torch.bool, device=device))
    if c.cond_frames:
        cond.update(frames=mk(*x.shape), frame_mask=mk(batch, 1, c.frames, 1, 1),
                    aug_t=torch.rand(batch, device=device, dtype=dtype))
    return (x, torch.rand(batch, device=device, dtype=dtype), cond), (DiTBlock,)


def build_net(cfg, device, dtype):
    from cascade.stages import stage_network
    with torch.device(device):
        net = stage_network(cfg)
    return net.to(dtype)


def measure_activations(cfg, batch: int, checkpointing: bool, device="meta", dtype=None,
                        backward: bool = False) -> int:
    """Saved-for-backward bytes of one training forward of cfg's network at batch `batch`
    (the network's own checkpoint switches are off here: checkpointing is accounted from the
    block measurements, see SavedBytes.activations)."""
    dtype = dtype or _dtype(cfg)
    cfg = _no_checkpoint(cfg)
    net = build_net(cfg, device, dtype)
    args, block_types = step_inputs(cfg, batch, device, dtype)
    blocks = [m for m in net.modules() if block_types and isinstance(m, block_types)]
    counter = SavedBytes(net.parameters(), blocks)
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
        out = net(*args)
        out = out[0] if isinstance(out, tuple) else out
        loss = out.float().square().mean()
    counter.close()
    if backward:
        loss.backward()
    return counter.activations(checkpointing)


def _no_checkpoint(cfg):
    return dataclasses.replace(cfg, dit=dataclasses.replace(cfg.dit, checkpoint=False),
                               unet=dataclasses.replace(cfg.unet, checkpoint=False))


def state_bytes(n_params: int, precision: str, zero: int, dp: int) -> tuple[float, float, float]:
    """(params, grads, optimizer state) bytes per rank under ZeRO `zero` over dp ranks."""
    half = precision in ("bf16", "fp16")
    p, g, o = (2, 2, 12) if half else (4, 4, 8)
    return (n_params * p / (dp if zero >= 3 else 1), n_params * g / (dp if zero >= 2 else 1),
            n_params * o / (dp if zero >= 1 else 1))


def plan_stage(cfg, zero: int | None = None, sp: int = 1, checkpointing: bool | None = None,
               world: int = 1, batch: int | None = None) -> StagePlan:
    zero = cfg.train.zero_stage if zero is None else zero
    if checkpointing is None:
        checkpointing = cfg.dit.checkpoint if cfg.stage in ("base", "interp") else \
            cfg.unet.checkpoint if cfg.stage == "sr" else False
    if cfg.stage == "vae":
        checkpointing = False                           # no checkpoint switch in the VAE
    if cfg.stage not in ("base", "interp"):
        sp = 1                                          # Ulysses shards the DiT's token sequence only
    if world % sp:
        raise ValueError(f"--world {world} is not divisible by --sp {sp}")
    batch = batch or cfg.train.batch_size
    net = build_net(_no_checkpoint(cfg), "meta", _dtype(cfg))
    n = sum(p.numel() for p in net.parameters() if p.requires_grad)
    pb, gb, ob = state_bytes(n, cfg.train.precision, zero, world)    # ZeRO: over the whole world
    act = measure_activations(cfg, batch, checkpointing) / sp
    return StagePlan(cfg.stage, n, pb, gb, ob, act, batch, sp, checkpointing)


def cascade_configs(path) -> list:
    """The stage configs a cascade YAML trains (the last run of each stage), or one stage YAML."""
    from cascade.cli import _run_config, load_cascade
    from cascade.config import load_config
    text = Path(path).read_text()
    if "\nstage:" in "\n" + text:
        return [load_config(path)]
    cfgs = {}
    for run in load_cascade(path).train:
        cfg = _run_config(run)
        cfgs[cfg.stage] = cfg
    return list(cfgs.values())


def table(plans: list[StagePlan], gpus, zero: int, world: int) -> str:
    g = lambda b: f"{b / GiB:.2f}"                     # noqa: E731
    head = ["stage", "params", "param GiB", "grad GiB", "optim GiB", "act GiB", "total GiB",
            "batch", "sp", "ckpt"] + [f"fits {m}G" for m in gpus]
    rows = [[p.stage, f"{p.params / 1e6:.1f}M", g(p.param_bytes), g(p.grad_bytes), g(p.optim_bytes),
             g(p.act_bytes), g(p.total), str(p.batch), str(p.sp), "on" if p.checkpointing else "off"]
            + ["yes" if p.total <= HEADROOM * m * GiB else "no" for m in gpus] for p in plans]
    w = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    line = lambda r: "  ".join(c.rjust(w[i]) if i else c.ljust(w[i]) for i, c in enumerate(r))  # noqa
    return "\n".join([f"per rank, one training step, ZeRO {zero}, world {world} "
                      f"(fits: total <= {HEADROOM:.0%} of the GPU)", line(head),
                      line(["-" * x for x in w]), *map(line, rows)])


def main(args: argparse.Namespace) -> None:
    gpus = [float(x) for x in args.gpu_memory.split(",")] if args.gpu_memory else list(DEFAULT_GPUS)
    gpus = [int(x) if x == int(x) else x for x in gpus]
    plans = []
    for cfg in cascade_configs(args.config):
        ck = None if args.checkpointing is None else args.checkpointing == "on"
        plans.append(plan_stage(cfg, args.zero, args.sp, ck, args.world, args.batch))
    zero = args.zero if args.zero is not None else "(each config's train.zero_stage)"
    print(table(plans, gpus, zero, args.world))
