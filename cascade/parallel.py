"""Sequence parallelism for the DiT stages: DeepSpeed-Ulysses (Jacobs et al. 2023).

The token sequence (B, T, S, heads, d) is sharded along time over an sp group of P ranks: each
holds T/P frames. Spatial attention (within a frame) needs nothing from the other ranks and runs
locally. Temporal and full attention need every frame: an all-to-all turns the sequence-sharded
q, k, v (B, T/P, S, h, d) into head-sharded ones (B, T, S, h/P, d) (each rank: all tokens, h/P
heads), attention runs, and the inverse all-to-all brings the output back to (B, T/P, S, h, d).
Both all-to-alls are autograd functions whose backward is the inverse all-to-all, so gradients
flow exactly as in one process. Heads must divide by P, frames by P.

Training (train.sequence_parallel = P, cascade/train.py): consecutive ranks form an sp group
(`sequence_parallel_group`) and one data-parallel replica (`data_parallel`: rank // P of world // P),
so the ranks of a group draw the same samples, t and noise. VideoDiT.forward (given the group by
`VideoDiT.sequence_parallel`) takes the whole clip's x_t, keeps this rank's frames, runs its
blocks on them (RoPE at the frames' global positions; adaLN, cross-attention and MLP local;
attention through `ulysses_attention`) and gathers the prediction's frames (`gather_frames`), so
the loss is the whole clip's on every rank. Each rank's parameter gradients are then its frames'
share of the clip's gradient; DeepSpeed averages them over the whole world, so the backward loss
is scaled by P (the world mean of P-scaled shares is the mean over the data-parallel replicas of
the sum over each group). ZeRO partitions over the whole world.

Status: done for the base and interp stages; dit.attention=window and train.pack_tokens refuse
sp > 1. Tests: tests/test_parallel.py (attention, the DiT's outputs and gradients, and a
2-process `cascade train` with ZeRO-2 against 1 process, all with 2 gloo ranks).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from kernels.attention import spacetime_attention


def _all_to_all(x: torch.Tensor, scatter: int, gather: int, group) -> torch.Tensor:
    """Split x along `scatter` into P chunks, send chunk i to rank i, concatenate what arrives
    along `gather` (rank order)."""
    P = dist.get_world_size(group)
    if P == 1:
        return x
    chunks = [c.contiguous() for c in x.chunk(P, dim=scatter)]
    out = [torch.empty_like(chunks[0]) for _ in range(P)]
    dist.all_to_all(out, chunks, group=group)
    return torch.cat(out, dim=gather)


class AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scatter, gather, group):
        ctx.args = (scatter, gather, group)
        return _all_to_all(x, scatter, gather, group)

    @staticmethod
    def backward(ctx, grad):
        scatter, gather, group = ctx.args
        return _all_to_all(grad, gather, scatter, group), None, None, None


def seq_to_heads(x: torch.Tensor, group=None) -> torch.Tensor:
    """(B, T/P, S, h, d) sequence-sharded -> (B, T, S, h/P, d) head-sharded."""
    return AllToAll.apply(x, 3, 1, group)


def heads_to_seq(x: torch.Tensor, group=None) -> torch.Tensor:
    """(B, T, S, h/P, d) head-sharded -> (B, T/P, S, h, d) sequence-sharded."""
    return AllToAll.apply(x, 1, 3, group)


def ulysses_attention(q, k, v, mode: str, group=None, scale=None) -> torch.Tensor:
    """spacetime_attention over a time-sharded sequence: q, k, v (B, T/P, S, h, d) on each rank
    of `group` -> (B, T/P, S, h, d), equal to the unsharded attention's slice of frames."""
    P = dist.get_world_size(group) if dist.is_initialized() else 1
    if mode == "spatial" or P == 1:                  # within a frame: local
        return spacetime_attention(q, k, v, mode=mode, scale=scale)
    if q.shape[3] % P:
        raise ValueError(f"sequence parallel: {q.shape[3]} heads are not divisible by sp={P}")
    q, k, v = (seq_to_heads(t, group) for t in (q, k, v))
    return heads_to_seq(spacetime_attention(q, k, v, mode=mode, scale=scale), group)


def shard_frames(x: torch.Tensor, group=None, dim: int = 1) -> torch.Tensor:
    """This rank's T/P frames of x along dim."""
    P = dist.get_world_size(group) if dist.is_initialized() else 1
    if x.shape[dim] % P:
        raise ValueError(f"sequence parallel: {x.shape[dim]} frames are not divisible by sp={P}")
    return x.chunk(P, dim=dim)[dist.get_rank(group) if P > 1 else 0]


class GatherFrames(torch.autograd.Function):
    """All-gather of the frame shards along `dim` (rank order). Backward: this rank's slice of the
    gradient, not a sum over ranks: every rank computes the same loss from the gathered tensor, so
    the gradient of that one loss with respect to this rank's shard is its slice."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.args = (dim, dist.get_rank(group), dist.get_world_size(group))
        parts = [torch.empty_like(x) for _ in range(ctx.args[2])]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad):
        dim, rank, P = ctx.args
        return grad.chunk(P, dim=dim)[rank].contiguous(), None, None


def gather_frames(x: torch.Tensor, group=None, dim: int = 1) -> torch.Tensor:
    """The whole sequence from every rank's T/P frames: (.., T/P, ..) -> (.., T, ..) along dim."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return x
    return GatherFrames.apply(x, dim, group)


def data_parallel(rank: int, world: int, sp: int) -> tuple[int, int]:
    """(data-parallel rank, data-parallel world size) of a global rank: ranks g*sp .. g*sp+sp-1 are
    the sp group g, one replica of the data-parallel training, drawing the samples of rank g."""
    return rank // sp, world // sp


def sequence_parallel_group(sp: int):
    """The process group of this rank's sp consecutive ranks (None for sp = 1). Every rank must call
    it (torch.distributed.new_group is collective). A world that sp does not divide is a ConfigError."""
    from cascade.config import ConfigError
    if sp <= 1:
        return None
    rank, world = dist.get_rank(), dist.get_world_size()
    if world % sp:
        raise ConfigError(f"train.sequence_parallel: {sp} does not divide the {world} processes")
    mine = None
    for g in range(world // sp):
        ranks = list(range(g * sp, (g + 1) * sp))
        group = dist.new_group(ranks)
        if rank in ranks:
            mine = group
    return mine
