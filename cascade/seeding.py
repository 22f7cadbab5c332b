"""Seeded random streams: one per purpose and per video (sampling) or per sample (training).

Sampling: a video is drawn from generators keyed by (seed, its prompt, its index among that
prompt's videos, the purpose: base noise, interp pass, sr) (`RowGenerators.keyed`): the same prompt
with the same seed gives the same video whatever other prompts share its batch or its prompt file,
and wherever it stands there.

Training: a sample's draws (condition dropout, t, noise, augmentation) come from a generator seeded
by (train.seed, its global sample index) (`sample_generators`), so a sample's noise is the same
whatever the number of processes: 1 process on a batch of 8 and 2 processes on 4 each see the
same noise and give the same loss curve.

Both are one `RowGenerators`: one CPU generator per batch row (group), each row drawn from its own.
"""
from __future__ import annotations

import hashlib

import torch


def stream_seed(*key) -> int:
    """A 63-bit seed from any key of strings and ints (SHA-256 of its repr: stable across
    processes and Python versions, unlike hash())."""
    digest = hashlib.sha256(repr(key).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class RowGenerators:
    """One CPU torch.Generator per batch row group: `randn(shape)` draws shape[0] / n consecutive
    rows from each of the n generators, so row i's numbers come from its own stream only. Passed
    where a torch.Generator is accepted (`diffusion._randn` asks for `.randn`); iterating gives the
    generators themselves."""

    device = torch.device("cpu")

    def __init__(self, seeds: list[int]):
        if not seeds:
            raise ValueError("RowGenerators: needs at least one seed")
        self.gens = [torch.Generator().manual_seed(s) for s in seeds]

    @classmethod
    def keyed(cls, keys: list[tuple]) -> "RowGenerators":
        return cls([stream_seed(*k) for k in keys])

    def __len__(self) -> int:
        return len(self.gens)

    def __iter__(self):
        return iter(self.gens)

    def randn(self, shape, dtype=torch.float32) -> torch.Tensor:
        """Standard normal noise of `shape`; shape[0] must be a multiple of the generator count."""
        n = len(self.gens)
        if shape[0] % n:
            raise ValueError(f"RowGenerators: {shape[0]} rows do not split over {n} generators")
        rows = (shape[0] // n, *shape[1:])
        return torch.cat([torch.randn(rows, generator=g, dtype=dtype) for g in self.gens])

    def rand(self) -> torch.Tensor:
        """One uniform number in [0, 1) from each generator: (n,)."""
        return torch.cat([torch.rand(1, generator=g) for g in self.gens])              # (n,)


def sample_generators(seed: int, indices) -> RowGenerators:
    """Training's streams: one generator per sample, seeded by (seed, global sample index)."""
    return RowGenerators([seed * 1_000_003 + 7919 * i + 1 for i in indices])
