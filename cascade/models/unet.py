"""Spatial super-resolution (SSR) network of the cascade: a text-conditioned video U-Net.

U-Net (Ronneberger et al. 2015): an encoder of res-blocks and 2x downsamplings, a decoder that
upsamples and concatenates the encoder's features of the same resolution (skip connections).
Imagen Video (Ho et al. 2022, Sec. 2) makes it a video network with space-time separable blocks:
every conv is (2+1)D (a k x k conv per frame, then a temporal conv), and temporal self-attention
(across frames at one position) runs only at the lowest resolutions, where it is cheap; the SSR
stage sees the bilinearly upsampled low-res video concatenated to x_t along channels, noise-augmented,
with the augmentation level as an extra input (conditioning augmentation, Ho et al. 2021 "Cascaded
Diffusion Models", Sec. 3.2). Text enters as in Imagen (Saharia et al. 2022): the pooled embedding
added to the time embedding, and cross-attention to the tokens at the attention levels. Each
res-block is modulated by the embedding as ADM's adaptive GroupNorm (Dhariwal & Nichol 2021):
GN(h) * (1 + scale) + shift. GroupNorm statistics are per frame (frames folded into the batch), so
an image is normalised like one frame of a video and no norm mixes frames.

Convs, norms and attention run only through the public kernel functions (kernels/), so the Triton
kernels replace them on a GPU with no change here. `net(x_t, t, cond) -> prediction`, as every stage.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint

from cascade.config import UNetConfig
from cascade.models.layers import Conv2plus1d, conv_params, sincos_1d, timestep_embedding
from kernels.attention import cross_attention, spacetime_attention
from kernels.conv3d import conv3d
from kernels.group_norm_silu import group_norm_silu


class Conv(nn.Module):
    """kt x k x k conv through kernels.conv3d, 'same' padding; stride 2 in space for downsampling."""

    def __init__(self, cin: int, cout: int, k: int = 1, kt: int = 1, stride: int = 1, zero=False):
        super().__init__()
        self.weight, self.bias = conv_params(cout, cin, kt, k, k, zero)
        self.stride, self.padding = (1, stride, stride), (kt // 2, k // 2, k // 2)

    def forward(self, x):                                                # (B, Cin, T, H, W)
        return conv3d(x, self.weight, self.bias, self.stride, self.padding)


class Norm(nn.Module):
    """GroupNorm (+ SiLU) per frame through kernels.group_norm_silu. groups = 0: no normalisation
    (SiLU alone, or identity): a per-frame GroupNorm removes each frame's absolute colours, which on
    flat-colour video are most of what SR must reproduce (the VAE's finding, cascade/models/vae.py;
    measured here: with groups 8 the tiny SR's one-step x0 estimate at t = 0.9 scored 17.9 dB
    while its own bilinear input scored 29.4)."""

    def __init__(self, groups: int, ch: int, silu: bool = True, affine: bool = True):
        super().__init__()
        self.groups, self.silu = groups, silu
        self.weight = nn.Parameter(torch.ones(ch)) if affine and groups else None
        self.bias = nn.Parameter(torch.zeros(ch)) if affine and groups else None

    def forward(self, x):                                                # (B, C, T, H, W)
        if not self.groups:
            return F.silu(x) if self.silu else x
        return group_norm_silu(x, self.groups, self.weight, self.bias, silu=self.silu,
                               per_frame=True)                               # frames read in place


class ResBlock(nn.Module):
    """skip(x) + conv2(SiLU(adaGN(conv1(GN-SiLU(x)), emb))): (2+1)D convs, 1x1 skip when widths differ."""

    def __init__(self, cin: int, cout: int, cfg: UNetConfig, emb_dim: int):
        super().__init__()
        kt = cfg.temporal_kernel
        self.norm1, self.conv1 = Norm(cfg.groups, cin), Conv2plus1d(cin, cout, 3, kt)
        self.emb = nn.Linear(emb_dim, 2 * cout)                           # FiLM scale, shift
        self.norm2 = Norm(cfg.groups, cout, silu=False, affine=False)
        self.conv2 = Conv2plus1d(cout, cout, 3, kt, zero=True)            # block starts as identity
        self.skip = Conv(cin, cout) if cin != cout else nn.Identity()
        self.checkpoint = cfg.checkpoint                                 # unet.checkpoint

    def forward(self, x, emb):                                           # (B, Cin, T, H, W), (B, E)
        if self.checkpoint and torch.is_grad_enabled():                  # recomputed in the backward
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x, emb):
        h = self.conv1(self.norm1(x))                                    # (B, Cout, T, H, W)
        scale, shift = self.emb(F.silu(emb))[:, :, None, None, None].chunk(2, dim=1)
        h = F.silu(self.norm2(h) * (1 + scale) + shift)
        return self.skip(x) + self.conv2(h)


class TemporalAttention(nn.Module):
    """Self-attention across the T frames at each position (Imagen Video's temporal attention),
    with sin-cos frame positions added to the normalised input (attention alone ignores order)."""

    def __init__(self, ch: int, cfg: UNetConfig):
        super().__init__()
        self.heads = cfg.heads
        self.norm = Norm(cfg.groups or 1, ch, silu=False)                # always: bounded q.k logits
        self.qkv, self.proj = Conv(ch, 3 * ch), Conv(ch, ch, zero=True)

    def forward(self, x):                                                # (B, C, T, H, W)
        B, C, T, H, W = x.shape
        pos = sincos_1d(torch.arange(T, device=x.device), C).to(x.dtype)  # (T, C)
        h = self.norm(x) + pos.t()[None, :, :, None, None]
        q, k, v = rearrange(self.qkv(h), "b (k n d) t h w -> k b t (h w) n d", k=3, n=self.heads)
        o = spacetime_attention(q, k, v, mode="temporal")                # (B, T, HW, n, d)
        return x + self.proj(rearrange(o, "b t (h w) n d -> b (n d) t h w", h=H))


class CrossAttention(nn.Module):
    """Video tokens attend to the text tokens (+ the always-visible null token), as in Imagen."""

    def __init__(self, ch: int, cfg: UNetConfig):
        super().__init__()
        self.heads = cfg.heads
        self.norm = Norm(cfg.groups or 1, ch, silu=False)
        self.q, self.proj = Conv(ch, ch), Conv(ch, ch, zero=True)
        self.kv = nn.Linear(cfg.text_dim, 2 * ch)

    def forward(self, x, text, mask):                                    # (B, C, T, H, W), (B, L, Dt)
        B, C, T, H, W = x.shape
        q = rearrange(self.q(self.norm(x)), "b (n d) t h w -> b (t h w) n d", n=self.heads)
        k, v = self.kv(text).view(B, text.shape[1], 2, self.heads, C // self.heads).unbind(2)
        o = cross_attention(q, k, v, key_mask=mask)                      # (B, THW, n, d)
        return x + self.proj(rearrange(o, "b (t h w) n d -> b (n d) t h w", t=T, h=H))


class Level(nn.Module):
    """num_res_blocks res-blocks at one resolution, each followed by temporal + cross attention
    when the level is an attention level."""

    def __init__(self, cin: int, ch: int, cfg: UNetConfig, emb_dim: int, attn: bool, n: int):
        super().__init__()
        self.res = nn.ModuleList(ResBlock(cin if i == 0 else ch, ch, cfg, emb_dim) for i in range(n))
        self.temporal = nn.ModuleList(TemporalAttention(ch, cfg) for _ in range(n)) if attn else None
        self.cross = nn.ModuleList(CrossAttention(ch, cfg) for _ in range(n)) if attn else None

    def forward(self, h, emb, text, mask):
        for i, res in enumerate(self.res):
            h = res(h, emb)
            if self.temporal is not None:
                h = self.cross[i](self.temporal[i](h), text, mask)
        return h


class VideoUNet(nn.Module):
    """net(x_t (B, 3, T, H, W), t (B,), cond) -> (B, 3, T, H, W), cond = {text (B, L, Dt),
    text_mask (B, L) bool, pooled (B, Dt), lowres (B, 3, T, H, W) upsampled and noise-augmented,
    aug_t (B,) augmentation level in [0, 1]}. H, W divisible by 2 ** (len(channel_mults) - 1)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        chs = [cfg.channels * m for m in cfg.channel_mults]
        n_levels = len(chs)
        if any(not 0 <= i < n_levels for i in cfg.attn_levels):
            raise ValueError(f"unet.attn_levels: {cfg.attn_levels} must be level indices "
                             f"in 0..{n_levels - 1}")
        for ch in chs:
            if (cfg.groups and ch % cfg.groups) or ch % cfg.heads or ch // cfg.heads > 128:
                raise ValueError(f"unet: a level's {ch} channels must divide into groups={cfg.groups} "
                                 f"and heads={cfg.heads} of at most 128 channels")
        self.cfg, self.factor = cfg, 2 ** (n_levels - 1)
        E = 4 * cfg.channels                                             # embedding width
        mlp = lambda: nn.Sequential(nn.Linear(256, E), nn.SiLU(), nn.Linear(E, E))  # noqa: E731
        self.t_embed, self.aug_embed = mlp(), mlp()
        self.pooled_embed = nn.Linear(cfg.text_dim, E)
        self.null_token = nn.Parameter(torch.randn(1, 1, cfg.text_dim) * 0.02)
        self.conv_in = Conv2plus1d(2 * cfg.in_channels, chs[0], 3, cfg.temporal_kernel)
        nrb, attn = cfg.num_res_blocks, set(cfg.attn_levels)
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        for i, ch in enumerate(chs):
            self.down.append(Level(chs[max(i - 1, 0)], ch, cfg, E, i in attn, nrb))
            if i < n_levels - 1:
                self.downsample.append(Conv(ch, ch, 3, stride=2))        # 2x down in space
        self.mid = Level(chs[-1], chs[-1], cfg, E, n_levels - 1 in attn, 2)
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i in reversed(range(n_levels)):
            self.up.append(Level(2 * chs[i], chs[i], cfg, E, i in attn, nrb))   # after the skip concat
            if i > 0:
                self.upsample.append(Conv(chs[i], chs[i - 1], 3))         # after nearest 2x
        self.norm_out = Norm(cfg.groups, chs[0])
        # the net starts at 0: the temporal half is zero, the spatial half is not (zeroing both
        # would leave neither a gradient, since each one's gradient is carried by the other)
        self.conv_out = Conv2plus1d(chs[0], cfg.in_channels, 3, cfg.temporal_kernel, zero=True)

    def forward(self, x, t, cond):
        B, C, T, H, W = x.shape
        if C != self.cfg.in_channels or cond["lowres"].shape != x.shape:
            raise ValueError(f"x_t and cond['lowres'] must both be (B, {self.cfg.in_channels}, T, H, W), "
                             f"got {tuple(x.shape)} and {tuple(cond['lowres'].shape)}")
        if H % self.factor or W % self.factor:
            raise ValueError(f"frame size {H}x{W} is not divisible by {self.factor} "
                             f"(2 ** (len(channel_mults) - 1))")
        emb = (self.t_embed(timestep_embedding(t, 256).to(x.dtype))
               + self.aug_embed(timestep_embedding(cond["aug_t"], 256).to(x.dtype))
               + self.pooled_embed(cond["pooled"]))                      # (B, E)
        text = torch.cat([self.null_token.expand(B, -1, -1).to(x.dtype), cond["text"]], dim=1)
        mask = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=x.device),
                          cond["text_mask"].bool()], dim=1)              # (B, 1 + L)
        h = self.conv_in(torch.cat([x, cond["lowres"]], dim=1))           # (B, C0, T, H, W)
        skips = []
        for i, level in enumerate(self.down):
            h = level(h, emb, text, mask)                                # (B, C_i, T, H/2^i, W/2^i)
            skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        h = self.mid(h, emb, text, mask)
        for j, level in enumerate(self.up):
            h = level(torch.cat([h, skips.pop()], dim=1), emb, text, mask)
            if j < len(self.upsample):
                h = self.upsample[j](h.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1))
        return self.conv_out(self.norm_out(h))                           # (B, 3, T, H, W)


def upsample_video(video: torch.Tensor, scale: int) -> torch.Tensor:
    """Bilinear per-frame upsampling (align_corners=False): (B, C, T, h, w) -> (B, C, T, h*s, w*s).
    Imagen Video's SSR conditioning: the low-res video brought to the output resolution."""
    B, C, T, h, w = video.shape
    y = F.interpolate(rearrange(video, "b c t h w -> (b t) c h w"), scale_factor=scale,
                      mode="bilinear", align_corners=False)              # (B*T, C, h*s, w*s)
    return rearrange(y, "(b t) c h w -> b c t h w", t=T)


def blend_weights(T: int, window: int, overlap: int) -> tuple[list[int], torch.Tensor]:
    """Temporal windows over T > window frames and their cross-fade weights -> (starts, (n, window)).

    The fewest windows that overlap by >= `overlap` frames, spread evenly from frame 0 to T - 1 (T
    need not be a multiple of the stride window - overlap). Each window's weight is a trapezoid:
    linear ramps over `overlap` frames at both ends, 1 in between, normalised by the sum of the
    weights of the windows covering each frame, so the weights at every frame sum to 1."""
    n = math.ceil((T - overlap) / (window - overlap))                    # >= 2 windows
    starts = [round(i * (T - window) / (n - 1)) for i in range(n)]      # gaps <= window - overlap
    i = torch.arange(window, dtype=torch.float64)
    ramp = torch.clamp(torch.minimum(i + 1, window - i) / (overlap + 1), max=1.0)   # (window,) > 0
    total = torch.zeros(T, dtype=torch.float64)
    for s in starts:
        total[s:s + window] += ramp
    return starts, torch.stack([ramp / total[s:s + window] for s in starts])       # (n, window)


def windowed(fn, video: torch.Tensor, window: int, overlap: int, with_start: bool = False) -> torch.Tensor:
    """Apply fn ((B, C, Tw, ...) -> (B, C', Tw, ...)) to overlapping temporal windows of video
    (B, C, T, ...) and cross-fade the results with blend_weights, so long videos are processed in
    clips without seams (fn may change channels and frame size, not the frame count).
    T <= window: one call on the whole video. with_start: fn(window, its first frame's index)."""
    if window < 1 or not 0 <= overlap < window:
        raise ValueError(f"windowed: need window >= 1 and 0 <= overlap < window, "
                         f"got window={window}, overlap={overlap}")
    T = video.shape[2]
    call = (lambda x, s: fn(x, s)) if with_start else (lambda x, s: fn(x))  # noqa: E731
    if T <= window:
        return call(video, 0)
    starts, weights = blend_weights(T, window, overlap)                  # (n, window)
    out = None
    for s, w in zip(starts, weights):
        y = call(video[:, :, s:s + window], s)                           # (B, C', window, ...)
        if y.shape[2] != window:
            raise ValueError(f"windowed: fn returned {y.shape[2]} frames for a {window}-frame window")
        if out is None:
            out = y.new_zeros(y.shape[:2] + (T,) + y.shape[3:])          # (B, C', T, ...)
        out[:, :, s:s + window] += y * w.to(y).view(-1, *[1] * (y.dim() - 3))
    return out
