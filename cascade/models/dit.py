"""Video Diffusion Transformer on latent spacetime patches.

DiT (Peebles & Xie 2023) blocks with adaLN-Zero conditioning, on ViViT (Arnab et al. 2021)
tubelet tokens, with factorised space-time attention (ViViT model 3: spatial attention within a
frame, then temporal attention across frames at one position) or full spacetime attention,
3D rotary positions (RoFormer, Su et al. 2021, one frequency band per axis) or 3D sin-cos, and text
cross-attention to the frozen encoder's tokens (PixArt-alpha style). The network is
`net(x_t, t, cond) -> prediction`, called by the shared diffusion core. Sequence parallelism
(DeepSpeed-Ulysses, cascade/parallel.py): `VideoDiT.sequence_parallel(group)` makes the forward
run on this rank's frames and gather the prediction.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint

from cascade.config import DiTConfig
from cascade.parallel import gather_frames, ulysses_attention
from kernels.attention import cross_attention, spacetime_attention
from cascade.models.layers import (gated, modulated_linear, sincos_1d, timestep_embedding,
                                   weight_and_bias)



def grid_positions(T: int, H: int, W: int, device, t0: int = 0) -> torch.Tensor:
    """(T*H*W, 3) integer (t, h, w) positions of the token grid, frame-major; frames t0..t0+T-1
    (t0: a sequence-parallel shard's first frame)."""
    t, h, w = torch.meshgrid(torch.arange(t0, t0 + T, device=device), torch.arange(H, device=device),
                             torch.arange(W, device=device), indexing="ij")
    return torch.stack([t, h, w], dim=-1).reshape(-1, 3)


class Rope3D(nn.Module):
    """3D rotary position embedding: head_dim split in three bands (time, height, width).

    Dims (2j, 2j+1) form the complex number x_2j + i x_2j+1, rotated by position * inv_freq
    (RoFormer eq. 34); the dims past the three bands pass through (a rotation by 0). The rotation is
    one complex multiply over all D/2 pairs, with the unit phases computed once per forward for q
    and k of every block, instead of slicing, stacking and concatenating per attention call.

    scale multiplies the positions (position interpolation, Chen et al. 2023). At scale 1 the top
    frequency turns one token by 1 rad, so on a small grid offsets alias: +3 and -3 tokens differ
    by 2 pi - 6 = 0.28 rad (the far edges of a 4-token frame look alike, above or below), and frames
    0 and 6 of 8 nearly coincide (6 rad). A scale below pi / (longest axis - 1) keeps every offset
    of the grid under pi on every band (0.4 on 8 frames: 7 x 0.4 = 2.8 rad)."""

    def __init__(self, head_dim: int, base: float = 10000.0, scale: float = 1.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head dim (dit.hidden / dit.heads), got {head_dim}")
        if not (scale > 0 and math.isfinite(scale)):
            raise ValueError(f"dit.rope_scale must be a positive number, got {scale}")
        self.band = 2 * (head_dim // 6)                                 # rotated dims per axis
        self.head_dim = head_dim
        self.scale = scale
        self.register_buffer("inv_freq", 1.0 / base ** (torch.arange(0, self.band, 2).float() / self.band),
                             persistent=False)

    def phases(self, T, H, W, device, t0: int = 0) -> torch.Tensor:
        """(T, S, D/2) complex unit phases exp(i * angle) of frames t0..t0+T-1; 1 on the
        pass-through pairs."""
        pos = grid_positions(T, H, W, device, t0).float() * self.scale  # (N, 3)
        ang = (pos[:, :, None] * self.inv_freq.to(device)[None, None]).reshape(T, H * W, -1)
        ang = F.pad(ang, (0, self.head_dim // 2 - ang.shape[-1]))       # (T, S, D/2)
        return torch.polar(torch.ones_like(ang), ang)

    def forward(self, x: torch.Tensor, phases: torch.Tensor) -> torch.Tensor:
        """x: (B, T, S, ..., D), any strides with a unit last stride; phases: (T, S, D/2) ->
        rotated x, contiguous, x's dtype."""
        return _rotate(x, phases)


def _rotate(x: torch.Tensor, phases: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x (B, T, S, ..., D) times phases (T, S, D/2) as D/2 complex numbers; into `out` if given."""
    B, T, S, *mid, D = x.shape
    z = torch.view_as_complex(x.float().unflatten(-1, (D // 2, 2)))         # (B, T, S, ..., D/2)
    ph = phases.view(T, S, *[1] * len(mid), D // 2)
    if out is None:
        return torch.view_as_real(z * ph).flatten(-2).to(x.dtype)
    torch.mul(z, ph, out=torch.view_as_complex(out.unflatten(-1, (D // 2, 2))))
    return out


class RopeQKV(torch.autograd.Function):
    """(q, k, v) from the fused projection qkv (B, T, S, 3, h, d): q and k rotated (contiguous), v a
    view. The backward writes dq * conj(phase), dk * conj(phase) and dv straight into one
    (B, T, S, 3, h, d) gradient, where split/unbind's autograd would stack and then concatenate it
    (two extra copies of the largest activation: 100 ms of a 4.1 s width-512 step on one CPU thread).
    q_scale multiplies q's phases: the attention's 1/sqrt(d) applied by the rotation for free, so
    attention needs no scaled copy of q."""

    @staticmethod
    def forward(ctx, qkv, phases, q_scale=1.0):                          # (B, T, S, 3, h, d), (T, S, d/2)
        ctx.save_for_backward(phases)
        ctx.qkv_meta = (qkv.shape, qkv.dtype, qkv.device, q_scale)
        return (_rotate(qkv[:, :, :, 0], phases * q_scale), _rotate(qkv[:, :, :, 1], phases),
                qkv[:, :, :, 2])

    @staticmethod
    def backward(ctx, dq, dk, dv):
        (phases,) = ctx.saved_tensors
        conj = phases.conj().resolve_conj()
        shape, dtype, device, q_scale = ctx.qkv_meta                     # any of dq, dk, dv may be None
        g = torch.empty(shape, dtype=dtype, device=device)              # (B, T, S, 3, h, d)
        for i, (d, ph) in enumerate(((dq, conj * q_scale), (dk, conj))):
            if d is None:
                g[:, :, :, i].zero_()
            elif g.dtype == torch.float32:                               # strided d read in place
                pairs = d.stride(-1) == 1 and all(st % 2 == 0 for st in d.stride()[:-1])
                _rotate(d if pairs else d.contiguous(), ph, out=g[:, :, :, i])
            else:                                                        # rotated in fp32 (_rotate)
                g[:, :, :, i].copy_(_rotate(d, ph))
        if dv is None:
            g[:, :, :, 2].zero_()
        else:
            g[:, :, :, 2].copy_(dv)
        return g, None, None


def window_attention(q, k, v, window: tuple[int, int, int], hw: tuple[int, int], scale=None):
    """W.A.L.T (Gupta et al. 2023, Sec. 3.3) window attention: q, k, v (B, T, S, h, d) on a token
    grid T x H x W (hw = (H, W), S = H * W) -> (B, T, S, h, d), each token attending only to the
    tokens of its non-overlapping (wt, wh, ww) window. A window wider than the grid is clipped to
    it (one window covering everything is full attention); a grid the window does not divide is
    a ValueError."""
    B, T, S, heads, d = q.shape
    H, W = hw
    wt, wh, ww = (min(a, n) for a, n in zip(window, (T, H, W)))
    if T % wt or H % wh or W % ww:
        raise ValueError(f"dit.window: the {T}x{H}x{W} token grid is not divisible by the window "
                         f"{wt}x{wh}x{ww} (choose a size that is a multiple of window x patch)")
    split = "b (nt wt) (nh wh nw ww) h d -> (b nt nh nw) 1 (wt wh ww) h d"
    dims = dict(wt=wt, wh=wh, ww=ww, nh=H // wh, nw=W // ww)
    o = spacetime_attention(*(rearrange(a, split, **dims) for a in (q, k, v)), mode="spatial",
                            scale=scale)                                  # each window a "frame"
    return rearrange(o, "(b nt nh nw) 1 (wt wh ww) h d -> b (nt wt) (nh wh nw ww) h d", b=B, **dims)


class SelfAttention(nn.Module):
    """adaLN-modulated fused QKV projection, attention over `mode` (spatial | temporal | full) by the
    kernels, and the output projection added to the residual stream under the adaLN-Zero gate:
    x + gate * proj(attn(LN(x) * (1 + scale) + shift)).

    sp_group (set by VideoDiT.sequence_parallel): x holds this rank's frames of the sequence, and
    temporal / full attention runs over all of them through Ulysses' all-to-alls."""

    sp_group = None
    inject = None                # editing: a cascade.injection.SourceAttention sees (q, k) first

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden)
        self.proj = nn.Linear(cfg.hidden, cfg.hidden)

    def forward(self, x, shift, scale, gate, mode, rope: Rope3D | None, phases, layout=None, hw=None):
        """mode: spatial | temporal | full, or a window (t, h, w) of tokens (`window_attention`
        on the grid T x hw)."""
        B, T, S, C = x.shape                                             # shift, scale, gate: (B, C)
        qkv = modulated_linear(x.reshape(B, T * S, C), shift, scale, self.qkv,
                               layout).view(B, T, S, 3, self.heads, C // self.heads)
        attn_scale = None                                                # the default 1/sqrt(d)
        if rope is not None:
            q, k, v = RopeQKV.apply(qkv, phases, (C // self.heads) ** -0.5)  # 3 x (B, T, S, h, d)
            attn_scale = 1.0                                             # q came pre-scaled
        else:
            q, k, v = qkv.unbind(3)                                      # strided views, no copy
        if self.inject is not None:
            q, k = self.inject(q, k)
        if self.sp_group is not None and (layout is not None or not isinstance(mode, str)):
            raise ValueError("train.sequence_parallel: sequence parallelism does not take "
                             "train.pack_tokens or dit.attention=window")
        if layout is not None:                     # packed (1, 1, total, ...): varlen, per clip
            o = layout.attention(*(a.reshape(T * S, self.heads, -1) for a in (q, k, v)), mode, attn_scale)
        elif self.sp_group is not None:            # frames sharded over the sp group (Ulysses)
            o = ulysses_attention(q, k, v, mode, self.sp_group, scale=attn_scale)
        elif not isinstance(mode, str):
            o = window_attention(q, k, v, mode, hw, scale=attn_scale)        # (B, T, S, h, d)
        else:
            o = spacetime_attention(q, k, v, mode=mode, scale=attn_scale)  # (B, T, S, h, d)
        return gated(x, gate, o.reshape(B, T, S, C), self.proj, layout)


class CrossAttention(nn.Module):
    """Queries from video tokens, keys/values from text tokens plus one learned null token that is
    always visible (so a fully dropped prompt still has a key to attend to)."""

    inject = None                # editing: a cascade.injection.SourceAttention sees q first

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.heads = cfg.heads
        self.q = nn.Linear(cfg.hidden, cfg.hidden)
        self.kv = nn.Linear(cfg.hidden, 2 * cfg.hidden)
        self.proj = nn.Linear(cfg.hidden, cfg.hidden)

    def forward(self, x, text, mask):
        B, N, C = x.shape
        s = (C // self.heads) ** -0.5                                    # 1/sqrt(d) in q's weights:
        w, b = weight_and_bias(self.q)                                   # (a LoRA layer: W + BA)
        q = F.linear(x, w * s, b * s).view(B, N, self.heads, C // self.heads)
        if self.inject is not None:
            q, = self.inject(q)
        k, v = self.kv(text).view(B, text.shape[1], 2, self.heads, C // self.heads).unbind(2)
        o = cross_attention(q, k, v, key_mask=mask, scale=1.0)           # no scaled copy of q
        return self.proj(o.reshape(B, N, C))


class AttentionPool(nn.Module):
    """One learned query attending over the projected text tokens (key mask respected) -> a vector
    added to the time embedding, so adaLN sees the words the encoder's mean pooling dilutes
    (Imagen's attention-pooled text embedding, Saharia et al. 2022 App. E / imagen-pytorch).
    Measured on the tiny base: MiniLM's mean-pooled vectors of "... moving left ..." and "...
    moving right ..." have cosine 0.986 (red vs green: 0.908). With this pooling the keyframes'
    colour accuracy rose from 0.78 to 0.97 (5000 steps); the direction words were still ignored
    until the motion loss (cascade.diffusion.motion_loss)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.heads = cfg.heads
        self.query = nn.Parameter(torch.randn(1, 1, cfg.hidden) * 0.02)
        self.kv = nn.Linear(cfg.hidden, 2 * cfg.hidden)
        self.proj = nn.Linear(cfg.hidden, cfg.hidden)

    def forward(self, text, mask):                                       # (B, L, C), (B, L) bool
        B, L, C = text.shape
        q = self.query.expand(B, 1, C).view(B, 1, self.heads, C // self.heads)
        k, v = self.kv(text).view(B, L, 2, self.heads, C // self.heads).unbind(2)
        return self.proj(cross_attention(q, k, v, key_mask=mask).reshape(B, C))  # (B, C)


class DiTBlock(nn.Module):
    """adaLN-Zero block (DiT eq. in Sec. 3.2): x + gate * f(LN(x) * (1 + scale) + shift)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        # factorised: spatial, then temporal; full: one spacetime attention; hybrid: full spacetime
        # attention, then temporal (the factorised block's parameters, so it can start from one);
        # window (W.A.L.T): a spatial window, then a spatiotemporal window, which a 1-frame
        # input (an image) skips: its temporal layer is the identity; global: factorised, then a
        # full spacetime attention of its own (adaLN-Zero gated, so it can be grown into a
        # factorised export at zero: `VideoDiT.grow_state`)
        self.factorised = cfg.attention in ("factorised", "hybrid", "window", "global")
        self.window = cfg.attention == "window"
        self.first_mode = {"factorised": "spatial", "global": "spatial",
                           "window": (1, *cfg.window_spatial)}.get(cfg.attention, "full")
        self.second_mode = tuple(cfg.window_spacetime) if self.window else "temporal"
        self.attn = SelfAttention(cfg)                                   # spatial, or full
        self.temporal = SelfAttention(cfg) if self.factorised else None
        self.glob = SelfAttention(cfg) if cfg.attention == "global" else None
        self.norm_cross = nn.LayerNorm(cfg.hidden, eps=1e-6)
        self.cross = CrossAttention(cfg)
        hidden = int(cfg.hidden * cfg.mlp_ratio)
        # exact (erf) GELU: on CPU its forward + backward take 39 ms against 53 ms for DiT's tanh
        # approximation on a 4096 x 2048 activation (1 thread); the two differ by < 1e-3
        self.mlp = nn.Sequential(nn.Linear(cfg.hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, cfg.hidden))
        # adaLN rows: (shift, scale, gate) per layer: first attention, [temporal,] MLP, [global]
        self.n_mod = (9 if self.factorised else 6) + (3 if self.glob is not None else 0)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(cfg.hidden, self.n_mod * cfg.hidden))

    def forward(self, x, c, text, mask, rope, phases, layout=None, hw=None):
        """x (B, T, S, C), c (B, C); packed (layout, cascade.models.packing): x (1, 1, total, C)
        and c, text, mask per clip, the modulations spread to the tokens of each clip."""
        B, T, S, C = x.shape
        mods = self.ada(c).view(-1, self.n_mod, C)                       # (B or clips, n_mod, C)
        if layout is not None:
            mods = layout.per_token(mods)                                # (total, n_mod, C)
        mods = mods.unbind(1)                                            # shift, scale, gate: (B, C)
        if self.window and layout is not None:
            raise ValueError("train.pack_tokens: packing does not take dit.attention=window")
        x = self.attn(x, *mods[0:3], self.first_mode, rope, phases, layout, hw)
        if self.factorised and not (self.window and T == 1):
            x = self.temporal(x, *mods[3:6], self.second_mode, rope, phases, layout, hw)
        if self.glob is not None:
            x = self.glob(x, *mods[9:12], "full", rope, phases, layout, hw)
        q = self.norm_cross(x.reshape(B, T * S, C))
        if layout is None:
            x = x + self.cross(q, text, mask).view(B, T, S, C)
        else:                                                            # each clip its own text
            x = x + layout.from_clips(self.cross(layout.to_clips(q[0]), text, mask)).view(B, T, S, C)
        sh, sc, g = mods[6:9] if self.factorised else mods[3:6]
        fc1, act, fc2 = self.mlp
        h = act(modulated_linear(x.reshape(B, T * S, C), sh, sc, fc1, layout))
        return gated(x, g, h, fc2, layout)                               # x + g * fc2(h)


class FinalLayer(nn.Module):
    def __init__(self, cfg: DiTConfig, out_channels: int):
        super().__init__()
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(cfg.hidden, 2 * cfg.hidden))
        self.linear = nn.Linear(cfg.hidden, cfg.patch_t * cfg.patch_h * cfg.patch_w * out_channels)

    def forward(self, x, c, layout=None):
        sh, sc = self.ada(c).chunk(2, dim=-1)
        if layout is not None:
            sh, sc = layout.per_token(sh), layout.per_token(sc)          # (total, C)
        return modulated_linear(x, sh, sc, self.linear, layout)


class FramePosition(nn.Module):
    """Absolute in-frame position, added to every token beside the relative 3D RoPE: sin / cos of
    pi * k * u (k = 1..freqs) for the token centre's u = (i + 1/2) / n along the frame's height and
    width, through a zero-initialised linear (a model fine-tuned from one without it starts as it).
    RoPE alone is translation-equivariant: the network cannot tell the frame's border from its
    middle, and the tiny base let objects run off one edge and come back in at the other. The
    features are fractions of the frame, so any frame size gets them (NaViT's fractional
    positions, Dehghani et al. 2023, Sec. 3.1)."""

    def __init__(self, cfg: "DiTConfig", freqs: int = 4):
        super().__init__()
        self.freqs = freqs
        self.proj = nn.Linear(4 * freqs, cfg.hidden)

    def forward(self, Hp: int, Wp: int, device) -> torch.Tensor:
        """-> (Hp * Wp, hidden)."""
        k = torch.arange(1, self.freqs + 1, device=device, dtype=torch.float32) * math.pi
        u = [(torch.arange(n, device=device, dtype=torch.float32) + 0.5) / n for n in (Hp, Wp)]
        fy, fx = (torch.cat([torch.sin(a[:, None] * k), torch.cos(a[:, None] * k)], 1) for a in u)
        feats = torch.cat([fy[:, None].expand(Hp, Wp, -1), fx[None].expand(Hp, Wp, -1)], -1)
        return self.proj(feats.reshape(Hp * Wp, -1).to(self.proj.weight.dtype))   # (S, C)


class VideoDiT(nn.Module):
    """net(x (B, C, T, H, W), t (B,), cond {text (B, L, Dt), text_mask (B, L), pooled (B, Dt)}).

    cond_frames=True (interp stage, Video LDM Sec. 3.1.2; the base stage prompted with frames,
    cascade/conditions.py): cond also holds frames (B, C, T, H, W), the noise-augmented given
    latents at their slots (zeros elsewhere), frame_mask (B, 1, T, H, W) or (B, 1, T, 1, 1), 1 at
    the given slots, and aug_t (B,), their augmentation level. The input tokens are made from
    concat(x, frames, mask) along channels; aug_t gets its own timestep MLP, added to the time
    embedding (conditioning augmentation, Ho et al. 2022 CDM Sec. 3)."""

    sp_group = None                    # sequence parallelism: see `sequence_parallel`

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        pt, ph, pw = cfg.patch_t, cfg.patch_h, cfg.patch_w
        # interp stage: noisy latents + keyframe latents at their slots + a 0/1 frame mask (Video LDM)
        self.in_channels = cfg.in_channels * 2 + 1 if cfg.cond_frames else cfg.in_channels
        self.out_channels = cfg.in_channels * (2 if cfg.learn_sigma else 1)
        self.patch = nn.Linear(self.in_channels * pt * ph * pw, cfg.hidden)   # tubelet embedding
        self.t_embed = nn.Sequential(nn.Linear(256, cfg.hidden), nn.SiLU(), nn.Linear(cfg.hidden, cfg.hidden))
        self.aug_embed = nn.Sequential(nn.Linear(256, cfg.hidden), nn.SiLU(),
                                       nn.Linear(cfg.hidden, cfg.hidden)) if cfg.cond_frames else None
        self.pooled_embed = nn.Linear(cfg.text_dim, cfg.hidden)
        self.text_proj = nn.Sequential(nn.Linear(cfg.text_dim, cfg.hidden), nn.GELU(),
                                       nn.Linear(cfg.hidden, cfg.hidden))
        self.null_token = nn.Parameter(torch.randn(1, 1, cfg.hidden) * 0.02)
        if cfg.text_pool not in ("mean", "attention"):
            raise ValueError(f"dit.text_pool: '{cfg.text_pool}' is not one of mean, attention")
        self.text_pool = AttentionPool(cfg) if cfg.text_pool == "attention" else None
        self.rope = Rope3D(cfg.hidden // cfg.heads, scale=cfg.rope_scale) if cfg.pos == "rope" else None
        self.frame_pos = FramePosition(cfg) if cfg.frame_pos else None
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.final = FinalLayer(cfg, self.out_channels)
        self.initialize()

    def initialize(self):
        """DiT's init: xavier linears, zero adaLN modulations and zero output layer (adaLN-Zero)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.t_embed[0].weight, std=0.02)
        nn.init.normal_(self.t_embed[2].weight, std=0.02)
        if self.aug_embed is not None:
            nn.init.normal_(self.aug_embed[0].weight, std=0.02)
            nn.init.normal_(self.aug_embed[2].weight, std=0.02)   # (grow_state zeroes it instead)
        for blk in self.blocks:
            nn.init.zeros_(blk.ada[-1].weight)
            nn.init.zeros_(blk.ada[-1].bias)
            nn.init.zeros_(blk.cross.proj.weight)
        nn.init.zeros_(self.final.ada[-1].weight)
        nn.init.zeros_(self.final.ada[-1].bias)
        nn.init.zeros_(self.final.linear.weight)
        if self.frame_pos is not None:
            nn.init.zeros_(self.frame_pos.proj.weight)

    def sequence_parallel(self, group) -> None:
        """DeepSpeed-Ulysses (cascade/parallel.py) over `group` (None: off). `forward` then keeps
        this rank's T/P latent frames of x (and of cond's frames / frame_mask), at their global RoPE
        or sin-cos positions; spatial attention, adaLN, cross-attention and the MLP run on them
        locally, temporal and full attention through `ulysses_attention`, and the prediction's
        frames are gathered (`gather_frames`: backward, this rank's slice), so the caller sees the
        whole clip's prediction and each rank's parameter gradients are its frames' share."""
        self.sp_group = group
        for m in self.modules():
            if isinstance(m, SelfAttention):
                m.sp_group = group

    def shard(self, x, cond) -> tuple[torch.Tensor, dict, int]:
        """x (B, C, T, H, W) -> (this rank's T/P frames, cond with its frames / frame_mask cut the
        same way, the shard's first token frame)."""
        P, r = dist.get_world_size(self.sp_group), dist.get_rank(self.sp_group)
        T, Tp = x.shape[2], x.shape[2] // self.cfg.patch_t
        if Tp % P:
            raise ValueError(f"train.sequence_parallel: {Tp} latent token frames are not divisible "
                             f"by sp={P}")
        cut = lambda a: a.narrow(2, r * (T // P), T // P) if a.shape[2] == T else a   # noqa: E731
        cond = {**cond, **{k: cut(cond[k]) for k in ("frames", "frame_mask") if k in cond}}
        return cut(x), cond, r * (Tp // P)

    def zero_init_keys(self) -> list[str]:
        """Parameters that start at zero when an export of a model without them is grown into this
        one (`grow_state`): the in-frame position's projection, and the last layer of the frame
        conditions' augmentation embedding (its output starts at 0, its first layer keeps its init
        so gradients reach it)."""
        keys = [f"frame_pos.proj.{n}" for n in ("weight", "bias")] if self.frame_pos is not None else []
        if self.aug_embed is not None:
            keys += [f"aug_embed.2.{n}" for n in ("weight", "bias")]
        return keys

    def grow_state(self, state: dict) -> tuple[dict, list[str]]:
        """An export's state dict made to fit this model where this one only adds zero-started
        parts: the in-frame position (dit.frame_pos), and frame conditions (dit.cond_frames) on a
        model trained without them: the tubelet embedding's new input columns (the given frames
        and their mask, after x's in the channel-major token) start at zero, the augmentation
        embedding's output too, so the grown model gives the old one's output bit for bit until
        it is trained (Open-Sora 2.0 / ControlNet's zero-initialised condition inputs). A
        factorised export grown into dit.attention=global: each block's global attention starts
        as a copy of its first (spatial) one, under adaLN rows that start at zero (gate 0: no
        output until trained). -> (state, the names grown)."""
        own, state, grown = self.state_dict(), dict(state), []
        zero = set(self.zero_init_keys())
        for k in own:
            if k not in state and (k in zero or k.startswith("aug_embed.")):
                state[k] = torch.zeros_like(own[k]) if k in zero else own[k]
                grown.append(k)
        for k in own:                                  # global attention: from the spatial one
            if ".glob." in k and k not in state and k.replace(".glob.", ".attn.") in state:
                state[k] = state[k.replace(".glob.", ".attn.")].clone()
                grown.append(k)
        for i, blk in enumerate(self.blocks):          # ... and its adaLN rows, appended at zero
            for n in ("weight", "bias"):
                k = f"blocks.{i}.ada.1.{n}"
                w = state.get(k)
                if blk.glob is not None and w is not None and w.shape[0] == own[k].shape[0] - 3 * self.cfg.hidden:
                    state[k] = torch.cat([w, w.new_zeros(3 * self.cfg.hidden, *w.shape[1:])])
                    grown.append(f"{k} (3 x {self.cfg.hidden} rows)")
        w = state.get("patch.weight")
        if w is not None and w.shape[0] == own["patch.weight"].shape[0] and \
                w.shape[1] < own["patch.weight"].shape[1]:
            pad = own["patch.weight"].shape[1] - w.shape[1]
            state["patch.weight"] = torch.cat([w, w.new_zeros(w.shape[0], pad)], 1)
            grown.append(f"patch.weight ({pad} input columns)")
        return state, grown

    def check_shape(self, T: int, H: int, W: int) -> None:
        c = self.cfg
        if T % c.patch_t or H % c.patch_h or W % c.patch_w:
            raise ValueError(f"latent size {T}x{H}x{W} is not divisible by the patch size "
                             f"{c.patch_t}x{c.patch_h}x{c.patch_w}")

    def concat_frames(self, x, cond):
        """x (B, C, T, H, W) -> concat(x, cond["frames"], cond["frame_mask"]) (B, 2C+1, T, H, W)."""
        missing = [k for k in ("frames", "frame_mask", "aug_t") if k not in cond]
        if missing:
            raise ValueError(f"VideoDiT with cond_frames=True needs cond keys {missing} "
                             f"(see cascade.stages.interp_condition)")
        frames, mask = cond["frames"], cond["frame_mask"]
        if frames.shape != x.shape:
            raise ValueError(f"cond['frames'] must have the shape of x {tuple(x.shape)}, "
                             f"got {tuple(frames.shape)}")
        B, _, T, H, W = x.shape
        return torch.cat([x, frames.to(x.dtype), mask.to(x.dtype).expand(B, 1, T, H, W)], dim=1)

    def embed(self, x, cond, t0: int = 0):
        """x (B, C, T, H, W) -> tokens (B, Tp, S, hidden) with their positions: (tokens, RoPE
        phases (Tp, S, d/2) or None); the interp stage's keyframes are concatenated first.
        t0: the first token frame's index (a sequence-parallel shard of a longer clip)."""
        c = self.cfg
        B, _, T, H, W = x.shape
        self.check_shape(T, H, W)
        if c.cond_frames:
            x = self.concat_frames(x, cond)                                # (B, 2C+1, T, H, W)
        if x.shape[1] != self.in_channels:
            raise ValueError(f"expected {self.in_channels} input channels, got {x.shape[1]}")
        Tp, Hp, Wp = T // c.patch_t, H // c.patch_h, W // c.patch_w
        tok = rearrange(x, "b c (t pt) (h ph) (w pw) -> b t (h w) (c pt ph pw)",
                        pt=c.patch_t, ph=c.patch_h, pw=c.patch_w)
        h = self.patch(tok)                                                # (B, Tp, S, C)
        phases = None
        if self.rope is not None:
            phases = self.rope.phases(Tp, Hp, Wp, x.device, t0)               # (Tp, S, d/2) complex
        else:
            pos = grid_positions(Tp, Hp, Wp, x.device, t0)
            d = c.hidden // 3 // 2 * 2
            pe = torch.cat([sincos_1d(pos[:, i], d) for i in range(3)], -1)
            h = h + F.pad(pe, (0, c.hidden - 3 * d)).view(1, Tp, Hp * Wp, c.hidden).to(h.dtype)
        if self.frame_pos is not None:
            h = h + self.frame_pos(Hp, Wp, x.device).to(h.dtype)              # (S, C) to every frame
        return h, phases

    def condition(self, t, cond, dtype):
        """-> (emb (B, C) for adaLN, text tokens (B, 1 + L, C) with the null token first, their
        mask (B, 1 + L))."""
        B = t.shape[0]
        emb = self.t_embed(timestep_embedding(t, 256).to(dtype)) + self.pooled_embed(cond["pooled"])
        if self.aug_embed is not None:
            emb = emb + self.aug_embed(timestep_embedding(cond["aug_t"], 256).to(dtype))
        text = torch.cat([self.null_token.expand(B, -1, -1), self.text_proj(cond["text"])], dim=1)
        mask = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=t.device),
                          cond["text_mask"].bool()], dim=1)                # (B, 1 + L)
        if self.text_pool is not None:
            emb = emb + self.text_pool(text, mask)                          # (B, C)
        return emb, text, mask

    def run_blocks(self, h, emb, text, mask, phases, layout=None, hw=None):
        ckpt = self.cfg.checkpoint and torch.is_grad_enabled()              # dit.checkpoint: per block
        for blk in self.blocks:
            if ckpt:                                   # activations recomputed in the backward
                h = checkpoint(blk, h, emb, text, mask, self.rope, phases, layout, hw, use_reentrant=False)
            else:
                h = blk(h, emb, text, mask, self.rope, phases, layout, hw)
        return h

    def unpatch(self, out, Tp, Hp, Wp):
        """(B, Tp * Hp * Wp, p * Cout) -> (B, Cout, T, H, W)."""
        c = self.cfg
        return rearrange(out, "b (t h w) (c pt ph pw) -> b c (t pt) (h ph) (w pw)",
                         t=Tp, h=Hp, w=Wp, pt=c.patch_t, ph=c.patch_h, pw=c.patch_w)

    def forward(self, x, t, cond):
        c = self.cfg
        t0 = 0
        if self.sp_group is not None:             # Ulysses: this rank's frames (sequence_parallel)
            self.check_shape(*x.shape[2:])
            x, cond, t0 = self.shard(x, cond)                               # (B, C, T/P, H, W)
        B, _, T, H, W = x.shape
        h, phases = self.embed(x, cond, t0)                                # (B, Tp, S, C)
        emb, text, mask = self.condition(t, cond, h.dtype)
        Tp, Hp, Wp = T // c.patch_t, H // c.patch_h, W // c.patch_w
        h = self.run_blocks(h, emb, text, mask, phases, hw=(Hp, Wp))
        out = self.final(h.reshape(B, Tp * Hp * Wp, c.hidden), emb)        # (B, N, p*Cout)
        out = self.unpatch(out, Tp, Hp, Wp)                                # (B, Cout, T, H, W)
        return out if self.sp_group is None else gather_frames(out, self.sp_group, dim=2)

    def forward_packed(self, xs: list[torch.Tensor], t, cond, row_len: int) -> list[torch.Tensor]:
        """NaViT packing (cascade.models.packing): clips xs[i] (C, T_i, H_i, W_i) of any shapes,
        t (n,), cond batched over the n clips -> per clip its prediction (Cout, T_i, H_i, W_i).
        Every clip keeps its own positions (3D RoPE, in-frame position) and conditioning; its
        tokens attend only to its own (varlen attention); the result equals `forward` on each
        clip alone, up to float rounding (tests/models/test_packing.py)."""
        from cascade.models.packing import PackedLayout
        if self.sp_group is not None:
            raise ValueError("train.pack_tokens: packing does not take train.sequence_parallel > 1")
        if self.cfg.cond_frames:
            raise ValueError("train.pack_tokens: packing is for the base DiT (the interp stage's "
                             "keyframe inputs are not packed)")
        c = self.cfg
        grids, toks, phases, = [], [], []
        for x in xs:
            h, ph = self.embed(x[None], {})                               # (1, Tp, S, C)
            grids.append((h.shape[1], x.shape[2] // c.patch_h, x.shape[3] // c.patch_w))
            toks.append(h.reshape(-1, c.hidden))                          # (N_i, C)
            if ph is not None:
                phases.append(ph.reshape(-1, ph.shape[-1]))              # (N_i, d/2)
        layout = PackedLayout(grids, row_len, xs[0].device)
        h = layout.pack(toks).view(1, 1, layout.total, c.hidden)           # (1, 1, total, C)
        ph = layout.pack(phases, 1.0).view(1, layout.total, -1) if phases else None
        emb, text, mask = self.condition(t, cond, h.dtype)               # per clip
        h = self.run_blocks(h, emb, text, mask, ph, layout)
        out = self.final(h.view(1, layout.total, c.hidden), emb, layout)[0]  # (total, p*Cout)
        return [self.unpatch(o[None], *g)[0] for o, g in zip(layout.unpack(out), grids)]
