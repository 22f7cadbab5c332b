"""Stage-by-stage training with DeepSpeed: `cascade train configs/<stage>.yaml key=value ...`.

One loop for every stage: deepspeed.initialize (ZeRO stage from config, gradient clipping,
bf16/fp16 on GPUs), an EMA of the network's weights, a progress bar with loss and throughput, a CSV
log, DeepSpeed checkpoints every N steps (resumed from the newest intact one, read weights-only:
no pickle runs code), and the EMA weights exported to safetensors with the stage's YAML beside
them for inference.

Runs on CPU (gloo, single process or under the `deepspeed` launcher) and on GPUs (nccl). The data a
process sees is fixed by (step, rank): global sample indices step*G + ... with G the global batch,
so 1 process and 2 processes train on the same samples. With train.sequence_parallel = P
(DeepSpeed-Ulysses, cascade/parallel.py) the P consecutive ranks of an sp group are one
data-parallel replica: "rank" and "world" of the data are rank // P and world // P.
"""
from __future__ import annotations

import csv
import errno
import functools
import json
import logging
import math
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
# DeepSpeed's import probes for CUDA and logs it; on a CPU machine that is noise, not news.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

import deepspeed  # noqa: E402
from deepspeed.utils import logger as ds_logger  # noqa: E402
import torch.distributed as dist  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from tqdm import tqdm  # noqa: E402

from cascade.checksums import write_checksums  # noqa: E402
from cascade.config import StageConfig, last_step, save_config  # noqa: E402
from cascade.data import build_dataset, collate  # noqa: E402
from cascade.data.buckets import BucketSampler, data_position, histogram  # noqa: E402
from cascade.parallel import data_parallel, sequence_parallel_group  # noqa: E402
from cascade.seeding import sample_generators  # noqa: E402
from cascade.stages import StageLoss, build_stage  # noqa: E402


ds_logger.setLevel(logging.WARNING)                 # keep DeepSpeed's INFO lines off the progress bar
# ZeRO-3 calls torch's all_gather_into_tensor / reduce_scatter_tensor, deprecated in torch 2.14: noise
warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).* deprecated",
                        category=FutureWarning)
log = logging.getLogger(__name__)
# the batch tensors with a time axis at dim 2: clips, or their cached latents (cascade cache; the
# VAE is causal with per-frame norms, so latent frame 0 is the encoding of frame 0 alone)
FRAME_KEYS = ("video", "latent_mean", "latent_std")
CHECKPOINT_STATE = "state.json"                     # written last: a checkpoint folder without it is incomplete


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from (damaged, unsafe, another model); one line."""


def init_distributed() -> tuple[int, int]:
    """Join (or create, for a plain single process) the process group: gloo on CPU, nccl on GPU."""
    if not dist.is_initialized():
        for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(k, v)
        if "MASTER_PORT" not in os.environ:
            import socket
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(s.getsockname()[1])
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   verbose=False)
    return dist.get_rank(), dist.get_world_size()


def ds_config(cfg: StageConfig, world: int) -> dict:
    t = cfg.train
    return {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.batch_size * t.grad_accum * world,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16"},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


def zero3_params(net: torch.nn.Module) -> list:
    """The parameters ZeRO-3 has partitioned across the ranks (each rank holds a slice: ds_id)."""
    return [p for p in net.parameters() if hasattr(p, "ds_id")]


def gathered(net: torch.nn.Module):
    """Context in which net's ZeRO-3 partitioned parameters are whole on every rank (read-only:
    changes are not written back); a no-op without ZeRO-3."""
    import contextlib
    params = zero3_params(net)
    if not params:
        return contextlib.nullcontext()
    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def zero3_leaf_modules(net: torch.nn.Module) -> None:
    """ZeRO-3 gathers a module's own parameters in its forward hook; modules that read a child's
    weights directly (F.linear(x, self.q.weight * s), the fused LayerNorm-modulate-linear, the
    gated projection) would see empty partitions. Making the blocks that do so ZeRO-3 leaves
    gathers all their parameters at once when the block runs."""
    from deepspeed.utils import set_z3_leaf_modules
    from cascade.models import dit, unet
    classes = [dit.DiTBlock, dit.FinalLayer, dit.AttentionPool, unet.ResBlock, unet.TemporalAttention,
               unet.CrossAttention]
    present = [c for c in classes if any(isinstance(m, c) for m in net.modules())]
    if present:
        set_z3_leaf_modules(net, present)


class EMA:
    """Exponential moving average of the trainable weights (Polyak). With warm-up the decay is
    min(decay, (1 + n) / (10 + n)) at update n, so a short run's EMA is not stuck at its init."""

    def __init__(self, net: torch.nn.Module, decay: float, warmup: bool = True):
        self.decay, self.warmup, self.updates = decay, warmup, 0
        with gathered(net):                            # ZeRO-3: the full tensors, not this rank's part
            self.shadow = {k: v.detach().clone().float() for k, v in net.state_dict().items()}

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, net: torch.nn.Module) -> bool:
        """Move the average towards net's weights; False (and nothing changed) when a weight is
        not finite, so a step that broke the weights never reaches the EMA."""
        d = self.current_decay()
        with gathered(net):                            # ZeRO-3: every rank keeps the full EMA
            state = net.state_dict()
            floats = [k for k, v in state.items() if v.dtype.is_floating_point]
            weights = [state[k].detach().float() for k in floats]
            if weights and not torch.isfinite(torch.stack(torch._foreach_norm(weights, float("inf")))).all():
                return False
            torch._foreach_lerp_([self.shadow[k] for k in floats], weights, 1 - d)  # one fused pass
            for k, v in state.items():
                if not v.dtype.is_floating_point:
                    self.shadow[k].copy_(v)
        self.updates += 1
        return True

    def state(self) -> dict:
        return {k: v.contiguous() for k, v in self.shadow.items()}

    def save(self, path: Path) -> None:
        save_file(self.state(), str(path), metadata={"updates": str(self.updates)})
        chmod_default(path)

    def load(self, path: Path) -> None:
        from safetensors import safe_open
        self.shadow = {k: v.float() for k, v in load_file(str(path)).items()}
        with safe_open(str(path), "pt") as f:
            self.updates = int(f.metadata()["updates"])


SKIP_STEP = "cascade_skip_step"          # set on the optimizer while the NaN guard skips a step


class GuardedLambdaLR(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR that stays put on a step the NaN guard skips (as DeepSpeed's own overflow skips
    do): the schedule counts applied updates, as if the bad batch had not been there."""

    def step(self, *args, **kwargs):
        if getattr(self.optimizer, SKIP_STEP, False):
            return
        super().step(*args, **kwargs)


class NonFiniteGuard:
    """The NaN/inf guard: a step whose loss or gradient is not finite on any process is skipped
    whole - the optimizer's step is a no-op (weights, Adam moments and step count unchanged), the
    LR schedule does not advance (GuardedLambdaLR) and train() leaves the EMA alone - and counted.

    The gradient check is a hook on every parameter that sees its local gradient as backward
    makes it, before DeepSpeed reduces or partitions it, so it holds at every ZeRO stage. fp16
    (grads=False) leaves gradient overflows to DeepSpeed's loss scaler, which skips those itself.
    `decide` runs before the last micro batch's engine.step() and agrees across processes."""

    def __init__(self, net: torch.nn.Module, opt, device, grads: bool = True):
        self.opt = opt
        self.bad_grad = torch.zeros((), dtype=torch.bool, device=device)
        if grads:
            for p in net.parameters():
                if p.requires_grad:
                    p.register_hook(self._check)
        step = opt.step                            # after the LR scheduler has wrapped it

        @functools.wraps(step)                     # keeps the scheduler's mark on it
        def gated(*args, **kwargs):
            return None if getattr(opt, SKIP_STEP, False) else step(*args, **kwargs)
        opt.step = gated

    def _check(self, grad: torch.Tensor) -> None:
        torch.logical_or(self.bad_grad, ~torch.isfinite(grad).all(), out=self.bad_grad)

    def decide(self, loss_finite: bool, world: int) -> str | None:
        """Why this step is skipped ('the loss', 'a gradient' is not finite), or None."""
        flags = torch.stack([torch.tensor(not loss_finite, device=self.bad_grad.device),
                             self.bad_grad]).float()
        if world > 1:
            dist.all_reduce(flags)
        self.bad_grad.zero_()
        why = "the loss" if flags[0] > 0 else "a gradient" if flags[1] > 0 else None
        setattr(self.opt, SKIP_STEP, why is not None)
        return why


def umask() -> int:
    """The process's umask (read without changing it where Linux says it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def chmod_default(path: Path) -> None:
    """The mode a plain open() would have given (safetensors writes 0600; mkdtemp makes 0700)."""
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~umask())


def swap_paths(a: Path, b: Path) -> bool:
    """Exchange two existing paths in one step: renameat2(RENAME_EXCHANGE) (Linux >= 3.15, glibc
    >= 2.28), so there is no moment at which neither exists. False where the system or the file
    system cannot (the caller then renames twice)."""
    import ctypes
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def export(cfg: StageConfig, state: dict, folder: Path, metrics: dict | None = None) -> Path:
    """Weights -> folder/model.safetensors, the stage config -> folder/config.yaml (and the
    stage's held-out metrics -> folder/metrics.json), and the SHA-256 of each -> folder/SHA256SUMS
    (cascade/checksums.py; load_export verifies them). The folder is replaced as a whole: all of
    it is written to a temporary folder beside it, which then takes its place in one rename
    (`swap_paths`), so the config, metrics and weights always come from the same export and a kill
    at any moment leaves the old export or the new one, never a mix and never none. Where the
    system cannot swap, the old folder is renamed aside first; a kill between the two renames
    leaves it aside, and the next export puts it back before it starts. With train.guide, that
    export is copied in as folder/guide (the model's autoguidance guide, cascade/stages/common.py)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    aside = sorted(folder.parent.glob(f".{folder.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if aside and not (folder.exists() or folder.is_symlink()):
        aside.pop().rename(folder)                                          # killed between renames
    for stale in (*folder.parent.glob(f".{folder.name}.tmp-*"), *aside):
        shutil.rmtree(stale, ignore_errors=True)                            # a killed export's leftovers
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    old = None
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"))
        save_config(cfg, tmp / "config.yaml")
        if metrics:
            (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        write_checksums(tmp)
        if cfg.train.guide:
            from cascade.stages.common import GUIDE
            shutil.copytree(cfg.train.guide, tmp / GUIDE)
        for p in (*tmp.iterdir(), tmp):
            chmod_default(p)
        if not (folder.exists() or folder.is_symlink()):
            tmp.rename(folder)
        elif swap_paths(tmp, folder):
            old = tmp                                                       # now holds the old export
        else:
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            folder.rename(old)
            tmp.rename(folder)
    except BaseException:                      # (nothing raises after a swap: old is not tmp here)
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not folder.exists():
            old.rename(folder)                                              # put the old one back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() and not old.is_symlink() else old.unlink()
    return folder


def step_indices(step: int, micro: int, rank: int, cfg: StageConfig, world: int) -> list[int]:
    """Global sample indices of one micro batch: fixed by (step, micro, rank), not by world size
    alone, so every process count walks the same global batches."""
    mb, ga = cfg.train.batch_size, cfg.train.grad_accum
    start = (step * ga + micro) * mb * world + rank * mb
    return list(range(start, start + mb))


class StepSampler:
    """Batch sampler yielding the index lists of steps start..steps-1 for this rank."""

    def __init__(self, cfg, start, rank, world):
        self.cfg, self.start, self.rank, self.world = cfg, start, rank, world

    def __iter__(self):
        for step in range(self.start, last_step(self.cfg.train)):
            for micro in range(self.cfg.train.grad_accum):
                yield step_indices(step, micro, self.rank, self.cfg, self.world)

    def __len__(self):
        return (last_step(self.cfg.train) - self.start) * self.cfg.train.grad_accum


def lr_lambda(t) -> callable:
    """Linear warm-up over t.warmup steps, then constant or a cosine decay to t.min_lr_ratio x lr at
    t.steps (SGDR, Loshchilov & Hutter 2017; what most diffusion and autoencoder recipes use)."""
    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / max(1, t.warmup))
        if t.schedule == "constant":
            return warm
        progress = min(1.0, step / max(1, t.steps))
        return warm * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
    return factor


def image_step(seed: int, step: int, fraction: float) -> bool:
    """Joint image-video training (W.A.L.T, Gupta et al. 2023: an image is a 1-frame video): a
    `fraction` of the steps train on the first frame of each clip. Decided by (seed, step) alone, so
    every process and a resumed run agree."""
    if fraction <= 0:
        return False
    return torch.rand(1, generator=torch.Generator().manual_seed(seed * 1_000_003 + step)).item() < fraction


def init_weights(net: torch.nn.Module, folder: str, stage: str) -> None:
    """Load an exported stage's weights into net before training (a checkpoint resume replaces
    them later). Parts this model adds at zero (`VideoDiT.grow_state`: the in-frame position,
    frame-condition inputs, a global attention) are grown and named; any other missing or mismatched tensor is a
    one-line error naming it."""
    from cascade.stages import load_export
    _, state = load_export(folder, expect_stage=stage)
    own = net.state_dict()
    if hasattr(net, "grow_state"):
        state, grown = net.grow_state(state)
        if grown:
            print(f"train.init_from: {len(grown)} tensor(s) grown beyond {folder} (zero-started, "
                  f"or a global attention copied from its block's spatial one): "
                  f"{', '.join(grown)}")
    for k, v in own.items():
        if k not in state:
            raise ValueError(f"train.init_from: {folder} has no tensor '{k}' (a different model?)")
        if state[k].shape != v.shape:
            raise ValueError(f"train.init_from: '{k}' is {tuple(state[k].shape)} in {folder}, "
                             f"{tuple(v.shape)} in this model's config")
    net.load_state_dict({k: state[k] for k in own})


def _safe_globals() -> list:
    """The plain DeepSpeed classes its checkpoints hold besides tensors and containers (ZeRO's
    loss scaler, fragment addresses, stage enum): the only objects weights-only loading may build."""
    allowed = []
    for module, names in (("deepspeed.runtime.fp16.loss_scaler", ("LossScaler", "DynamicLossScaler")),
                          ("deepspeed.utils.tensor_fragment", ("fragment_address",)),
                          ("deepspeed.runtime.zero.config", ("ZeroStageEnum",))):
        try:
            mod = __import__(module, fromlist=list(names))
        except ImportError:
            continue
        allowed += [getattr(mod, n) for n in names if hasattr(mod, n)]
    return allowed


def weights_only_load(path, map_location=None, mmap: bool = False):
    """torch.load(weights_only=True): PyTorch's restricted unpickler, which builds tensors,
    containers and the classes of `_safe_globals` and refuses every other global, so a
    checkpoint file cannot run code. Anything it refuses or cannot read is a CheckpointError."""
    import zipfile
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True,
                              mmap=mmap and zipfile.is_zipfile(path))
    except Exception as e:
        msg = (str(e).strip().splitlines() or [type(e).__name__])
        unsafe = [ln.strip() for ln in msg if "Unsupported global" in ln or "GLOBAL" in ln]
        why = (f"holds a Python object that weights-only loading refuses to build ({unsafe[0]})"
               if unsafe else f"cannot be read ({type(e).__name__}: {msg[0][:200]})")
        raise CheckpointError(f"{path} {why}") from None


def checkpoint_tags(ckpt_dir: Path) -> list[str]:
    """Complete checkpoints, newest first: folders stepN holding state.json (written last), and,
    from runs before it existed, folders up to the one `latest` names."""
    latest = None
    try:
        latest = int((ckpt_dir / "latest").read_text().strip().removeprefix("step"))
    except (OSError, ValueError):
        pass
    tags = []
    for p in ckpt_dir.glob("step*"):
        n = p.name.removeprefix("step")
        if p.is_dir() and n.isdigit() and ((p / CHECKPOINT_STATE).is_file()
                                           or (latest is not None and int(n) <= latest)):
            tags.append((int(n), p.name))
    return [tag for _, tag in sorted(tags, reverse=True)]


def check_checkpoint(folder: Path, net: torch.nn.Module | dict) -> None:
    """Raise CheckpointError unless folder is an intact checkpoint of this network: its state.json
    sizes match the files, its EMA reads, DeepSpeed's files load weights-only. A checkpoint of
    another architecture raises with `other_model = True` set on the error."""
    from cascade.stages import read_safetensors, state_mismatch
    state_path = folder / CHECKPOINT_STATE
    if state_path.is_file():
        try:
            state = json.loads(state_path.read_text())
            sizes = state["files"]
        except (ValueError, KeyError, TypeError):
            raise CheckpointError(f"{state_path} is damaged") from None
        for name, size in sizes.items():
            have = (folder / name).stat().st_size if (folder / name).is_file() else 0
            if have != size:
                raise CheckpointError(f"{folder / name} is missing or truncated ({have} of {size} bytes)")
    try:
        ema = read_safetensors(folder / "ema.safetensors")
    except (OSError, ValueError) as e:
        raise CheckpointError(str(e)) from None
    diff = state_mismatch(net if isinstance(net, dict) else net.state_dict(), ema)
    if diff:
        err = CheckpointError(f"train.resume: {folder} is a checkpoint of another model ({diff}): "
                              f"train into a new train.out_dir, or set train.resume=false to start over")
        err.other_model = True
        raise err
    for f in sorted(folder.glob("*.pt")):
        weights_only_load(f, map_location="cpu", mmap=True)


def resume(engine, ema: EMA, net: torch.nn.Module, ckpt_dir: Path, rank: int, world: int,
           device, data: dict | None = None) -> tuple[int, int]:
    """Load the newest intact checkpoint (a damaged one is passed over with a warning, falling back
    to the previous kept one) and return its step and the steps the NaN guard had skipped by then;
    (0, 0) when there is none. Every DeepSpeed file is
    read with weights_only_load: a copied or downloaded run folder cannot run code on resume."""
    tags = checkpoint_tags(ckpt_dir) if ckpt_dir.is_dir() else []
    problems = []
    for tag in tags:
        reason, other = None, False
        try:
            check_checkpoint(ckpt_dir / tag, ema.shadow if zero3_params(net) else net)  # ZeRO-3: full shapes
        except CheckpointError as e:
            reason, other = str(e), getattr(e, "other_model", False)
        if world > 1:                                    # every process resumes from the same one
            flags = torch.tensor([reason is not None, other], dtype=torch.float32, device=device)
            dist.all_reduce(flags)
            if flags[0] > 0 and reason is None:
                reason = "not intact on another process"
            other = other or bool(flags[1] > 0)
        if other:
            raise CheckpointError(reason if reason else f"train.resume: {ckpt_dir / tag} is a "
                                  f"checkpoint of another model")
        if reason is None:
            loader = engine.checkpoint_engine.load
            engine.checkpoint_engine.load = weights_only_load           # never weights_only=False
            try:
                path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
            finally:
                engine.checkpoint_engine.load = loader
            if path is None:
                raise CheckpointError(f"DeepSpeed could not load the checkpoint {ckpt_dir / tag}")
            step = int(client["step"])
            if data is not None and client.get("data") and client["data"] != data:  # another stream
                raise CheckpointError(f"train.resume: {ckpt_dir / tag} was written with another data "
                                      f"stream ({client['data']}, now {data}): the resumed run would "
                                      f"draw other batches; restore data.buckets / data.seed or use "
                                      f"a new train.out_dir")
            ema.load(ckpt_dir / tag / "ema.safetensors")
            if problems and rank == 0:
                print(f"warning: resumed from an older checkpoint than the newest "
                      f"({'; '.join(problems)})")
            return step, int(client.get("bad_steps", 0))
        problems.append(f"{tag}: {reason}")
        if rank == 0:
            log.warning("checkpoint %s cannot be used (%s); trying the previous one", ckpt_dir / tag, reason)
    if problems:
        raise CheckpointError(f"train.resume: no usable checkpoint in {ckpt_dir} ({problems[0]}"
                              f"{f'; and {len(problems) - 1} more' if len(problems) > 1 else ''}): "
                              f"set train.resume=false to start over")
    return 0, 0


def trim_log(path: Path, last_step: int) -> None:
    """Drop log.csv rows past `last_step` (steps after the checkpoint a run resumes from, which it
    trains again) and a row a kill cut short; rewritten whole, then renamed."""
    if not path.is_file():
        return
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return
    header, body = rows[0], rows[1:]
    col = header.index("step") if "step" in header else 0
    keep = [r for r in body if len(r) == len(header) and r[col].isdigit() and int(r[col]) <= last_step]
    if len(keep) == len(body):
        return
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as f:
        csv.writer(f).writerows([header, *keep])
    tmp.replace(path)


def train(cfg: StageConfig, progress: bool = True) -> Path:
    """Train one stage to cfg.train.steps (or train.stop_at); returns the export folder of its EMA
    weights. (The step loop is written out here, about 60 lines, so one function reads as the
    whole run.)

    What a failure leaves: the run's config.yaml is written only once a training step has run
    (a run that fails while starting leaves the folder as it was), log.csv is cut back to the
    checkpoint a resumed run starts from, and the export folder is replaced whole at the end."""
    rank, world = init_distributed()
    t = cfg.train
    sp_group = sequence_parallel_group(t.sequence_parallel)   # before any work: a bad sp is one line
    dp_rank, dp_world = data_parallel(rank, world, t.sequence_parallel)
    out = Path(t.out_dir)
    ckpt_dir = out / "checkpoints"
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() \
        else torch.device("cpu")
    dataset = load_data(cfg, rank)                     # first: a bad data folder fails in a second
    skipped = len(getattr(dataset, "skipped", ()))
    torch.manual_seed(t.seed)                                            # same init on every rank
    stage = build_stage(cfg, device)
    net = stage.net.to(device)
    engine, sched, guard, ema = build_engine(cfg, stage, net, device, world, sp_group)

    position = data_position(cfg, dataset)              # with the step: where the data stream is
    start, bad_steps = resume(engine, ema, net, ckpt_dir, rank, world, device, position) \
        if t.resume else (0, 0)
    if start and rank == 0:
        print(f"resumed from {ckpt_dir}/step{start}")
    log_path = out / "log.csv"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        trim_log(log_path, start)                      # the steps past the checkpoint run again
    from cascade.dashboard import Dashboard, sample_sheet
    board = Dashboard(out, start, enabled=rank == 0 and t.tensorboard)
    if cfg.data.buckets and getattr(dataset, "bucket_members", None) is not None:
        board.text("data/buckets", histogram(dataset.bucket_members, dataset.buckets))

    sampler = BucketSampler(dataset.bucket_members, len(dataset.buckets), len(dataset), cfg, start,
                            dp_rank, dp_world, mixed=t.pack_tokens > 0) if cfg.data.buckets \
        else StepSampler(cfg, start, dp_rank, dp_world)     # packing: each clip its own bucket
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=t.num_workers)
    end = last_step(t)
    bar = tqdm(total=end, initial=start, disable=not (progress and rank == 0),
               desc=f"train {cfg.stage}", dynamic_ncols=True)
    batches = iter(loader)
    global_batch = t.batch_size * t.grad_accum * dp_world
    tic = time.perf_counter()
    for step in range(start, end):
        totals, why = train_step(engine, stage, guard, batches, cfg, step, rank, world, device)
        if why is None and engine.was_step_applied() and not ema.update(net):
            raise FloatingPointError(f"the weights became non-finite at step {step + 1} (its loss "
                                     f"and gradients were finite; {kept_checkpoint(ckpt_dir)}; a "
                                     f"lower train.lr may help)")
        if why is not None:
            bad_steps = skip_step(why, totals, bad_steps + 1, step, t, ckpt_dir, rank)
        elapsed = time.perf_counter() - tic
        tic = time.perf_counter()
        row = {"step": step + 1, **totals, "lr": sched.get_last_lr()[0],
               "samples_per_s": global_batch / max(elapsed, 1e-9), "skipped": bad_steps}
        norm = engine.get_global_grad_norm() if hasattr(engine, "get_global_grad_norm") else None
        if norm is not None:
            row["grad_norm"] = float(norm)
        if rank == 0:
            if step == start:                          # a step ran: this config is the run's now
                save_config(cfg, out / "config.yaml")
            write_log_row(log_path, row)
            board.scalars(row)
            if t.sample_every and ((step + 1) % t.sample_every == 0 or step + 1 == end):
                sample_sheet(stage, cfg, ema.state(), out, step + 1, board)
            if (step + 1) % t.log_every == 0 or step == start:
                bar.set_postfix(loss=f"{totals['loss']:.4f}", it_s=f"{1 / max(elapsed, 1e-9):.2f}",
                                samples_s=f"{row['samples_per_s']:.1f}")
        bar.update(1)
        if (step + 1) % t.ckpt_every == 0 or step + 1 == end:
            save_checkpoint(engine, ema, ckpt_dir, step + 1, rank, t.keep_ckpts, cfg, bad_steps, position)
    bar.close()
    board.close()
    export_dir = out / "export"
    if rank == 0:
        export_run(cfg, stage, ema, export_dir)
        if len(getattr(dataset, "skipped", ())) > skipped:            # more found while training
            print(f"data: {dataset.summary()} (by this process)")
    if world > 1:
        dist.barrier()
    return export_dir


def export_run(cfg: StageConfig, stage, ema: EMA, export_dir: Path) -> None:
    """The EMA weights, finalized by the stage where it has a finalize step (the VAE's latent
    scale and held-out PSNR), exported with their metrics; a LoRA run exports its adapters
    (cascade/adapters.py)."""
    state, metrics = ema.state(), {}
    if cfg.train.lora.rank:
        from cascade.adapters import export_adapter
        export_adapter(cfg, state, export_dir, cfg.train.init_from)
        print(f"exported the EMA LoRA adapters (rank {cfg.train.lora.rank}) to {export_dir}")
        return
    if hasattr(stage, "finalize"):
        state, metrics = stage.finalize(state)
    export(cfg, state, export_dir, metrics)
    print(f"exported EMA weights to {export_dir}" + "".join(f"; {k} {v:.4g}" for k, v in metrics.items()))


def export_checkpoint(run: str | Path, out: str | Path, step: int | None = None) -> Path:
    """The EMA weights of a run's checkpoint (the newest intact one, or `step`) exported to `out`
    as `cascade train` exports at its end (config.yaml, model.safetensors, SHA256SUMS; a VAE
    finalized with its latent scale and held-out metrics), so a long run's progress can be
    sampled, evaluated or kept while it trains. One-line errors for a missing run or step."""
    from cascade.config import load_config
    from cascade.stages import build_stage, read_safetensors
    ckpts = Path(run) / "checkpoints"
    tags = checkpoint_tags(ckpts) if ckpts.is_dir() else []
    if not tags:
        raise FileNotFoundError(f"no complete checkpoint in {ckpts}")
    tag = tags[0] if step is None else f"step{step}"
    if tag not in tags:
        raise FileNotFoundError(f"{ckpts} has no complete checkpoint {tag} (it has {', '.join(tags)})")
    cfg = load_config(ckpts / tag / "config.yaml")
    state = read_safetensors(ckpts / tag / "ema.safetensors")
    metrics = {}
    if cfg.train.lora.rank:
        from cascade.adapters import export_adapter
        folder = export_adapter(cfg, state, Path(out), cfg.train.init_from)
        print(f"exported the EMA LoRA adapters of {ckpts / tag} to {folder}")
        return folder
    if cfg.stage == "vae":
        state, metrics = build_stage(cfg).finalize(state)
    folder = export(cfg, state, Path(out), metrics)
    print(f"exported the EMA weights of {ckpts / tag} to {folder}")
    return folder


def load_data(cfg: StageConfig, rank: int):
    """The stage's training data set, checked before any model is built (a cache against this
    stage's encoders, a VAE folder's held-out split), with its skipped rows and bucket histogram
    printed on rank 0."""
    dataset = build_dataset(cfg.data)
    if cfg.data.kind == "cache":                       # made with this stage's VAE and text encoder?
        from cascade.data.cache import check_compatible
        check_compatible(dataset.manifest, cfg, cfg.data.root)
    if cfg.stage == "vae" and cfg.data.kind == "folder":
        build_dataset(cfg.data, split="val")           # the held-out clips of finalize, checked now
    if rank == 0 and getattr(dataset, "skipped", ()):
        print(f"data: {dataset.summary()}")
    if rank == 0 and cfg.data.buckets:                 # frames x height x width: videos
        members = dataset.bucket_members
        print("data: buckets " + (histogram(members, dataset.buckets) if members is not None else
                                  f"{', '.join('x'.join(map(str, b)) for b in dataset.buckets)} "
                                  f"(synthetic: every clip renders at any bucket)"))
    return dataset


def build_engine(cfg: StageConfig, stage, net: torch.nn.Module, device, world: int, sp_group):
    """net (the stage's network, on device) made ready to train -> (DeepSpeed engine, its LR
    scheduler, the NaN guard, the EMA): sequence parallelism, train.init_from, compile, AdamW,
    ZeRO-3's leaf modules, deepspeed.initialize."""
    t = cfg.train
    if sp_group is not None:
        net.sequence_parallel(sp_group)                # the DiT runs on this rank's frames
    if t.init_from:
        init_weights(net, t.init_from, cfg.stage)
    if t.guide:                                # checked now, copied in at export
        from cascade.stages.common import load_export
        load_export(t.guide, cfg.stage)
    if t.lora.rank:                                # only the adapters train (cascade/adapters.py)
        from cascade.adapters import add_lora
        net = add_lora(net, t.lora)
    if t.compile:                              # in place: state_dict keys (EMA, export) unchanged
        net.compile()
    params = [p for p in net.parameters() if p.requires_grad]
    # fused: one kernel per step over all parameters (CPU and CUDA), not a dozen ops per tensor
    opt = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay,
                            fused=True)
    sched = GuardedLambdaLR(opt, lr_lambda(t))
    guard = NonFiniteGuard(net, opt, device, grads=t.precision != "fp16")
    if t.zero_stage == 3:
        zero3_leaf_modules(net)
    engine, opt, _, sched = deepspeed.initialize(model=StageLoss(stage), optimizer=opt,
                                                 lr_scheduler=sched, config=ds_config(cfg, world))
    return engine, sched, guard, EMA(net, t.ema_decay, t.ema_warmup)


def skip_step(why: str, totals: dict, bad_steps: int, step: int, t, ckpt_dir: Path, rank: int) -> int:
    """The NaN guard skipped a step (`why`: what was not finite): one line on rank 0 and the new
    count, or a one-line FloatingPointError once more than train.max_bad_steps were skipped."""
    if bad_steps > t.max_bad_steps:
        raise FloatingPointError(
            f"{why} became {'non-finite' if why != 'the loss' else totals['loss']} at step "
            f"{step + 1}: {bad_steps} step(s) skipped for a non-finite loss or gradient, "
            f"more than train.max_bad_steps={t.max_bad_steps} ({kept_checkpoint(ckpt_dir)}; "
            f"a lower train.lr or train.grad_clip may help)")
    if rank == 0:
        tqdm.write(f"step {step + 1}: {why} is not finite: step skipped ({bad_steps} of at "
                   f"most train.max_bad_steps={t.max_bad_steps})")
    return bad_steps


def train_step(engine, stage, guard: NonFiniteGuard, batches, cfg: StageConfig, step: int, rank: int,
               world: int, device) -> tuple[dict, str | None]:
    """One optimizer step over train.grad_accum micro batches -> (the losses averaged over micro
    batches and processes, why the NaN guard skipped the step or None).

    Sequence parallel (sp = train.sequence_parallel > 1): the sp ranks of a group draw the same
    samples (data-parallel rank and world), each loss is the whole clip's, and each rank's
    gradients are its frames' share of it; DeepSpeed averages gradients over all `world` ranks,
    so the backward loss is sp x the loss: the result is the mean over the world / sp replicas."""
    t, totals, loss_finite, why = cfg.train, {}, True, None
    sp = t.sequence_parallel
    dp_rank, dp_world = data_parallel(rank, world, sp)
    for micro in range(t.grad_accum):
        batch = next(batches)
        if image_step(t.seed, step, cfg.data.image_fraction):              # W.A.L.T joint training
            batch = {**batch, **{k: [v[:, :1] for v in batch[k]] if isinstance(batch[k], list)
                                 else batch[k][:, :, :1] for k in FRAME_KEYS if k in batch}}
        gens = sample_generators(t.seed, step_indices(step, micro, dp_rank, cfg, dp_world))
        inputs = stage.prepare(batch, gens, device)
        loss, logs = engine(inputs)
        engine.backward(loss * sp if sp > 1 else loss)  # logged: the loss itself
        values = {"loss": float(loss.detach()), **{k: float(v) for k, v in logs.items()}}
        loss_finite = loss_finite and math.isfinite(values["loss"])
        if micro == t.grad_accum - 1:
            why = guard.decide(loss_finite, world)     # before the optimizer step, on every process
        engine.step()
        for k, v in values.items():
            totals[k] = totals.get(k, 0.0) + v / t.grad_accum
    if world > 1:                        # mean over processes (an sp group's are equal)
        vec = torch.tensor(list(totals.values()), dtype=torch.float64)
        dist.all_reduce(vec)
        totals = dict(zip(totals, (vec / world).tolist()))
    return totals, why


def kept_checkpoint(ckpt_dir: Path) -> str:
    tags = checkpoint_tags(ckpt_dir) if ckpt_dir.is_dir() else []
    return f"the checkpoint {ckpt_dir / tags[0]} is kept" if tags else "no checkpoint was written"


def write_log_row(path: Path, row: dict) -> None:
    """Append a row to log.csv; a log begun by an older version keeps its own columns."""
    new = not path.is_file()
    fields = list(row)
    if not new:
        with path.open(newline="") as f:
            fields = next(csv.reader(f), None) or fields
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})


def save_checkpoint(engine, ema: EMA, ckpt_dir: Path, step: int, rank: int, keep: int,
                    cfg: StageConfig | None = None, bad_steps: int = 0, data: dict | None = None) -> None:
    """DeepSpeed checkpoint (model, optimizer, scheduler, step) + the EMA and the stage config
    beside it, then state.json (the step and every file's size: a truncated file is found without
    reading it). The `latest` pointer moves only after all of it is written, so a kill mid-save
    leaves the previous one usable. A write that fails (a full disk) removes the partial folder
    and raises a one-line OSError; the previous checkpoints are kept."""
    tag = f"step{step}"
    folder = ckpt_dir / tag
    if rank == 0 and folder.exists():              # a killed save's partial folder: none of its files
        shutil.rmtree(folder, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step, "bad_steps": bad_steps, "data": data or {}},
                               save_latest=False)
        if dist.is_initialized():
            dist.barrier()                             # every process's files are written
        if rank == 0:
            ema.save(folder / "ema.safetensors")
            if cfg is not None:
                save_config(cfg, folder / "config.yaml")
            files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
            tmp = folder / f".{CHECKPOINT_STATE}.tmp"
            tmp.write_text(json.dumps({"step": step, "files": files}, indent=1) + "\n")
            tmp.replace(folder / CHECKPOINT_STATE)
            tmp = ckpt_dir / "latest.tmp"
            tmp.write_text(tag)
            tmp.replace(ckpt_dir / "latest")
    except (OSError, RuntimeError) as e:
        if rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        try:
            free = f"; {shutil.disk_usage(ckpt_dir).free / 2**20:.0f} MiB free there"
        except OSError:
            free = ""
        code = getattr(e, "errno", None) or errno.EIO
        raise OSError(code, f"cannot write the checkpoint {folder} ({msg}{free}); the previous "
                            f"checkpoints are kept") from None
    if rank == 0:
        tags = sorted((p for p in ckpt_dir.glob("step*") if p.is_dir() and p.name[4:].isdigit()),
                      key=lambda p: int(p.name[4:]))
        for old in tags[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
