"""Sequence parallelism for the DiT stages: DeepSpeed-Ulysses (Jacobs et al. 2023).

The token sequence (B, T, S, heads, d) is sharded along time over an sp group of P ranks: each
holds T/P frames. Spatial attention (within a frame) needs nothing from the other ranks and runs
locally. Temporal and full attention need every frame: an all-to-all turns the sequence-sharded
q, k, v (B, T/P, S, h, d) into head-sharded ones (B, T, S, h/P, d) (each rank: all tokens, h/P
heads), attention runs, and the inverse all-to-all brings the output back to (B, T/P, S, h, d).
Both all-to-alls are autograd functions whose backward is the inverse all-to-all, so gradients
flow exactly as in one process. Heads must divide by P, frames by P.

Status: the attention primitive and its 2-process test (tests/test_parallel.py); wiring it into
VideoDiT / cascade train (train.sequence_parallel, data-parallel group = world / sp) is not done.
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
