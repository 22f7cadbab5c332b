"""NaViT "Patch n' Pack" (Dehghani et al. 2023) for the video DiT: clips of different shapes packed
into rows of one token sequence, attention kept inside each clip through kernels.varlen_attention.

Token order: rows one after another; in a row its clips back to back, then padding up to the row
length; a clip's tokens in (t, h, w) order (frame-major). A clip's frame is then one contiguous
run of tokens (spatial attention: one varlen example per frame), the clip one run (full
attention); temporal attention permutes the tokens to position-major order first (one example
per spatial position, of the clip's T tokens) and back after. Padding tokens form examples of
their own, take no conditioning, and are masked out of the loss (`real`), so no token ever
attends across clips (NaViT Sec. 2.1: "masked self attention").
"""
from __future__ import annotations

import torch

from kernels.attention import varlen_attention

MODES = ("spatial", "temporal", "full")


def first_fit(sizes: list[int], row_len: int) -> list[list[int]]:
    """Clip token counts -> rows of clip ids, first-fit decreasing (NaViT's greedy packing);
    ValueError naming a clip longer than a row."""
    rows, room = [], []
    for c in sorted(range(len(sizes)), key=lambda c: -sizes[c]):
        if sizes[c] > row_len:
            raise ValueError(f"train.pack_tokens: a clip of {sizes[c]} tokens does not fit a row of "
                             f"{row_len}; raise train.pack_tokens or drop the bucket")
        for r, free in enumerate(room):
            if sizes[c] <= free:
                rows[r].append(c)
                room[r] -= sizes[c]
                break
        else:
            rows.append([c])
            room.append(row_len - sizes[c])
    return [sorted(r) for r in rows]


class PackedLayout:
    """Where every clip's tokens lie in the packed sequence, and the varlen examples of each
    attention mode. grids: per clip its token grid (Tp, Hp, Wp); row_len: tokens per row."""

    def __init__(self, grids: list[tuple[int, int, int]], row_len: int, device=None):
        self.grids, self.row_len = [tuple(g) for g in grids], row_len
        self.n = n = len(grids)
        self.sizes = [T * H * W for T, H, W in self.grids]
        self.rows = first_fit(self.sizes, row_len)
        self.total = len(self.rows) * row_len
        self.starts = [0] * n
        segs = {m: [] for m in MODES}
        order_t, pos = [], 0
        for r, row in enumerate(self.rows):
            for c in row:
                T, H, W = self.grids[c]
                S = H * W
                self.starts[c] = pos
                segs["spatial"] += [S] * T
                segs["temporal"] += [T] * S
                segs["full"].append(T * S)
                order_t.append(pos + torch.arange(T * S).view(T, S).t().flatten())  # position-major
                pos += T * S
            pad = (r + 1) * row_len - pos
            if pad:
                for m in MODES:
                    segs[m].append(pad)
                order_t.append(torch.arange(pos, pos + pad))
                pos += pad
        self.clip_id = torch.full((self.total,), n, dtype=torch.long)     # n: padding
        for c in range(n):
            self.clip_id[self.starts[c]:self.starts[c] + self.sizes[c]] = c
        self.real = self.clip_id < n                                      # (total,) the loss mask
        self.cu = {m: torch.tensor([0] + segs[m]).cumsum(0).to(torch.int32) for m in MODES}
        self.max_len = {m: max(segs[m]) for m in MODES}
        self.t_perm = torch.cat(order_t)                                  # (total,)
        width = max(self.sizes)
        self.clip_tokens = torch.full((n, width), -1, dtype=torch.long)   # (n, Nmax), -1 past a clip
        for c in range(n):
            self.clip_tokens[c, :self.sizes[c]] = torch.arange(self.starts[c], self.starts[c] + self.sizes[c])
        if device is not None:
            self.to(device)

    def to(self, device) -> "PackedLayout":
        for k in ("clip_id", "real", "t_perm", "clip_tokens"):
            setattr(self, k, getattr(self, k).to(device))
        self.cu = {m: v.to(device) for m, v in self.cu.items()}
        return self

    # ------------------------------------------------------------------ tokens in and out
    def pack(self, parts: list[torch.Tensor], fill=0.0) -> torch.Tensor:
        """Per clip (N_c, ...) -> (total, ...), `fill` at the padding."""
        out = parts[0].new_full((self.total, *parts[0].shape[1:]), fill)
        for c, p in enumerate(parts):
            out[self.starts[c]:self.starts[c] + self.sizes[c]] = p
        return out

    def unpack(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(total, ...) -> per clip (N_c, ...)."""
        return [x[s:s + n] for s, n in zip(self.starts, self.sizes)]

    def per_token(self, per_clip: torch.Tensor) -> torch.Tensor:
        """(n, ...) per clip -> (total, ...): each token its clip's row, zeros for the padding."""
        return torch.cat([per_clip, per_clip.new_zeros(1, *per_clip.shape[1:])])[self.clip_id]

    def to_clips(self, x: torch.Tensor) -> torch.Tensor:
        """(total, C) -> (n, Nmax, C): each clip's tokens in a row of its own, zero-padded (for the
        cross-attention to each clip's own text)."""
        idx = self.clip_tokens.clamp(min=0)
        return x[idx] * (self.clip_tokens >= 0)[..., None].to(x.dtype)

    def from_clips(self, y: torch.Tensor) -> torch.Tensor:
        """(n, Nmax, C) -> (total, C), zeros at the padding tokens."""
        keep = self.clip_tokens >= 0
        out = y.new_zeros(self.total, y.shape[-1])
        return out.index_copy(0, self.clip_tokens[keep], y[keep])

    # ------------------------------------------------------------------ attention
    def attention(self, q, k, v, mode: str, scale=None) -> torch.Tensor:
        """q, k, v (total, h, d) -> (total, h, d), attending within each clip's frames (spatial),
        positions (temporal) or whole clip (full)."""
        if mode not in MODES:
            raise ValueError(f"packed attention: mode '{mode}' is not one of {', '.join(MODES)}")
        if mode == "temporal":
            q, k, v = (x[self.t_perm] for x in (q, k, v))
        o = varlen_attention(q.contiguous(), k.contiguous(), v.contiguous(), self.cu[mode],
                             self.max_len[mode], scale=scale)
        if mode == "temporal":
            o = torch.empty_like(o).index_copy(0, self.t_perm, o)
        return o
