"""Causal 3D-convolution KL autoencoder for video: the latent space of the base and interp stages.

LDM (Rombach et al. 2022, Sec. 3.1 and App. G): a convolutional encoder E maps x to the moments of a
diagonal Gaussian q(z|x), a decoder D maps z back; trained with L1 + LPIPS + a tiny KL to N(0, I)
(cascade/losses.py), and the latents are rescaled by 1/std before diffusion ("scale factor", Sec. 4.3.2).
Here every convolution is 3D and causal in time as in MAGVIT-v2 (Yu et al. 2023, Sec. 3.1): time is
padded only on the past side, so latent frame t sees pixel frames <= t * temporal_factor, the first
frame is encoded alone, and an image is a 1-frame video (W.A.L.T's joint image-video latent).

Frame counts. Each temporal downsampling is a causal stride-2 conv, T -> 1 + (T - 1) // 2, and the
decoder's temporal upsampling inverts it exactly, T' -> 1 + 2 (T' - 1). With s = temporal_factor
= 2 ** sum(temporal_down), the valid clip lengths are T = 1 + k * s (k >= 0): 1, 5, 9, ... for s = 4.
Others raise ValueError. With no temporal compression (s = 1) every T is valid. Pixel frame f lives
in latent slot ceil(f / s): slot 0 is frame 0 alone, slot t holds frames s(t-1)+1 .. s t.

Normalisation. GroupNorm (per frame) sits inside the residual branches only: LDM also normalises
right before each output conv, but a GroupNorm there removes every frame's mean and scale, i.e. its
absolute colours, which on flat-colour frames are most of the content (measured on the synthetic
shapes, 32x32 images, 600 steps: 21.5 -> 25.6 dB without it). Even inside the branches it slows
learning on such frames badly (8-frame clips, 1200 steps: 21.4 dB with GroupNorm, 27.8 dB
without), so `groups = 0` turns it off (SiLU alone); natural video keeps LDM's GroupNorm.

Convolutions and GroupNorm(+SiLU) run only through the public kernel functions (kernels/), so the
Triton kernels replace them on a GPU with no change here. `decoder_only` freezes the encoder for
Video LDM's (Blattmann et al. 2023, Sec. 3.1.1) fine-tuning of the decoder on video.

`frame_encoder` makes the encoder per-frame (1 x 3 x 3 kernels) while the decoder stays causal 3D,
as Video LDM's image encoder with a temporally aware decoder. With a causal 3D encoder a latent
frame is partly a code of the frames before it (tiny VAE: a frame encoded alone differs from the
same frame encoded in its clip by half the latents' std), which a small diffusion model must then
learn to generate; per-frame latents are plain images in time. `decoder_conv = "2+1d"` factorises
the decoder's convs (1 x 3 x 3 per frame, then causal 3 x 1 x 1: SVD's temporal decoder is built
the same way, 2D blocks with temporal convs), 2.25x fewer taps than the full 3 x 3 x 3.

`shortcut` adds DC-AE's residual autoencoding (Chen et al. 2024, "Deep Compression Autoencoder",
Sec. 3.1): every down- and upsampling, and the bottleneck on both sides, gets a parameter-free
path beside its conv: space-to-channel (2 x 2 pixels into channels, then channels averaged in
groups to the output width) going down, channel-to-space (channels repeated, then spread over
2 x 2 pixels) going up; in time, every other frame going down and nearest frames going up, as the
causal stride-2 conv and the causal upsampling count frames. The convs then learn a residual over
a path that already carries the picture, which DC-AE found makes high-compression autoencoders
far easier to optimise. No parameters: an export without shortcuts keeps its state dict.

`patch` folds p x p pixels into channels before the first conv and unfolds the last conv's p^2 x 3
channels back into pixels (LTX-Video's patchify, HaCohen et al. 2024, Sec. 2.1), so the network
runs at 1/p of the side: the same compute buys p^2 times the width. Beside the deep path a linear
1 x 1 conv maps each latent's f x f pixel patch (f the spatial factor; in time, the frame its slot
ends on) to the latent (the encoder's mean) and each latent back to its patch (the decoder's
output, over its slot's frames): a linear patch code, which PCA shows is already most of the answer
(8 components of 4 x 4 x 3 patches: 26.5 dB on the held-out photographs' clips, against 24.0 for
bilinear x4), so the deep path learns only the residual.
"""
from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from cascade.config import VAEConfig
from cascade.models.layers import Conv2plus1d, conv_params
from kernels.attention import spacetime_attention
from kernels.conv3d import conv3d
from kernels.group_norm_silu import group_norm_silu


def _triple(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v, v)


class CausalConv3d(nn.Module):
    """3D convolution, causal in time (past-side padding of kt - 1 frames), 'same' in space.
    Parameters initialised as nn.Conv3d's; the forward calls kernels.conv3d.conv3d."""

    def __init__(self, cin: int, cout: int, kernel=3, stride=1):
        super().__init__()
        k = _triple(kernel)
        self.stride, self.padding = _triple(stride), (0, k[1] // 2, k[2] // 2)
        self.weight, self.bias = conv_params(cout, cin, *k)                  # (Cout, Cin, kt, kh, kw), as nn.Conv3d

    def forward(self, x):                                                    # (B, Cin, T, H, W)
        return conv3d(x, self.weight, self.bias, self.stride, self.padding, causal=True)


def level_widths(cfg: VAEConfig) -> list[int]:
    """The width of each level, finest first (cfg.channels x cfg.channel_mults)."""
    return [cfg.channels * m for m in cfg.channel_mults]


def space_to_channel(x: torch.Tensor, cout: int, temporal: bool = False) -> torch.Tensor:
    """DC-AE's down shortcut: (B, C, T, H, W) -> (B, cout, T', H/2, W/2), 4C channels averaged in
    groups of 4C / cout (T' = 1 + (T - 1) // 2, the frames 0, 2, 4, ..., where time halves)."""
    if temporal:
        x = x[:, :, ::2]
    return channel_average(rearrange(x, "b c t (h i) (w j) -> b (c i j) t h w", i=2, j=2), cout)


def channel_to_space(x: torch.Tensor, cout: int, temporal: bool = False) -> torch.Tensor:
    """DC-AE's up shortcut: (B, C, T, H, W) -> (B, cout, T', 2H, 2W), channels repeated to 4 cout
    and spread over 2 x 2 pixels (T' = 1 + 2 (T - 1), nearest in time, where time doubles)."""
    x = rearrange(channel_repeat(x, 4 * cout), "b (c i j) t h w -> b c t (h i) (w j)", i=2, j=2)
    return x.repeat_interleave(2, dim=2)[:, :, 1:] if temporal else x


def channel_average(x: torch.Tensor, cout: int) -> torch.Tensor:
    """(B, C, ...) -> (B, cout, ...): channels averaged in groups of C / cout (DC-AE's bottleneck
    shortcut into the latent; channel_repeat is its inverse out of it)."""
    return x.unflatten(1, (cout, -1)).mean(2)


def channel_repeat(x: torch.Tensor, cout: int) -> torch.Tensor:
    return x.repeat_interleave(cout // x.shape[1], dim=1)                    # (B, cout, ...)


class Downsample(CausalConv3d):
    """The encoder's stride-2 causal conv (stride 2 in time too where `temporal`), plus DC-AE's
    space-to-channel shortcut where `shortcut` (module docstring). Its parameters are the conv's."""

    def __init__(self, ch: int, kt: int, temporal: bool, shortcut: bool):
        super().__init__(ch, ch, (kt, 3, 3), stride=(2 if temporal else 1, 2, 2))
        self.temporal, self.shortcut = temporal, shortcut

    def forward(self, x):                                                    # (B, C, T, H, W)
        y = super().forward(x)                                               # (B, C, T', H/2, W/2)
        return y + space_to_channel(x, x.shape[1], self.temporal) if self.shortcut else y


class GroupNormSiLU(nn.Module):
    """SiLU(GroupNorm(x)) (or GroupNorm alone) through kernels.group_norm_silu; affine, eps 1e-6 (LDM).
    Statistics per frame (frames folded into the batch): a norm over T would leak the future into
    the past and break causality, and an image would be normalised unlike a video's first frame.
    groups = 0: no normalisation (SiLU alone), for flat-colour data (module docstring)."""

    def __init__(self, groups: int, channels: int, silu: bool = True):
        super().__init__()
        if groups < 0 or (groups and channels % groups):
            raise ValueError(f"vae.groups: {groups} must be 0 (no GroupNorm) or divide every "
                             f"layer's width ({channels} here)")
        self.groups, self.silu = groups, silu
        self.weight = nn.Parameter(torch.ones(channels)) if groups else None
        self.bias = nn.Parameter(torch.zeros(channels)) if groups else None

    def forward(self, x):                                                    # (B, C, T, H, W)
        if not self.groups:
            return F.silu(x) if self.silu else x
        T = x.shape[2]
        y = rearrange(x, "b c t h w -> (b t) c h w")                         # (B*T, C, H, W)
        y = group_norm_silu(y, self.groups, self.weight, self.bias, 1e-6, self.silu)
        return rearrange(y, "(b t) c h w -> b c t h w", t=T)


def causal_conv(cin: int, cout: int, kt: int = 3, separable: bool = False) -> nn.Module:
    """A kt x 3 x 3 causal conv, or (separable) its (2+1)D factorisation: 1 x 3 x 3 per frame, then
    a causal kt x 1 x 1 in time (9 + 3 instead of 27 taps per channel pair)."""
    if separable and kt > 1:
        return Conv2plus1d(cin, cout, 3, kt, causal=True)
    return CausalConv3d(cin, cout, (kt, 3, 3))


class ResBlock(nn.Module):
    """x + conv(GN-SiLU(conv(GN-SiLU(x)))), kt x 3 x 3 causal convs (kt = 1: per frame; separable:
    (2+1)D); 1x1x1 skip when widths differ."""

    def __init__(self, cin: int, cout: int, groups: int, kt: int = 3, separable: bool = False):
        super().__init__()
        self.norm1, self.conv1 = GroupNormSiLU(groups, cin), causal_conv(cin, cout, kt, separable)
        self.norm2, self.conv2 = GroupNormSiLU(groups, cout), causal_conv(cout, cout, kt, separable)
        self.skip = CausalConv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):                                                    # (B, Cin, T, H, W)
        h = self.conv1(self.norm1(x))
        return self.skip(x) + self.conv2(self.norm2(h))                      # (B, Cout, T, H, W)


class FrameAttention(nn.Module):
    """LDM's mid-block self-attention, within each frame (spatial), so causality in time holds.

    Its input is always normalised, also with groups = 0 (then one group: each frame's features
    to zero mean, unit variance): without it the q.k logits grow unbounded and the attention's
    backward turned NaN mid-run (tiny VAE, step 539 at lr 2e-3). In this residual branch the norm
    does not remove the frame's colours from the main path."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.heads = next(h for h in range(1, ch + 1) if ch % h == 0 and ch // h <= 128)
        self.norm = GroupNormSiLU(groups or 1, ch, silu=False)
        self.qkv, self.out = CausalConv3d(ch, 3 * ch, 1), CausalConv3d(ch, ch, 1)

    def forward(self, x):                                                    # (B, C, T, H, W)
        H, W = x.shape[-2:]
        qkv = rearrange(self.qkv(self.norm(x)), "b (k n d) t h w -> k b t (h w) n d",
                        k=3, n=self.heads)                                   # 3 x (B, T, HW, n, d)
        o = spacetime_attention(qkv[0], qkv[1], qkv[2], mode="spatial")      # (B, T, HW, n, d)
        return x + self.out(rearrange(o, "b t (h w) n d -> b (n d) t h w", h=H, w=W))


class MidBlock(nn.Sequential):
    def __init__(self, ch: int, groups: int, kt: int = 3, separable: bool = False):
        super().__init__(ResBlock(ch, ch, groups, kt, separable), FrameAttention(ch, groups),
                         ResBlock(ch, ch, groups, kt, separable))


class Upsample(nn.Module):
    """Nearest 2x in space, and causally in time (T -> 1 + 2 (T - 1): the first frame is not
    repeated, as MAGVIT-v2's causal decoder), then a 3x3x3 causal conv that also narrows to the
    next level's width (LDM narrows one res-block later; narrowing here halves the cost of the
    widest conv at the finer resolution, which on CPU is the decoder's most expensive layer)."""

    def __init__(self, cin: int, cout: int, temporal: bool, separable: bool = False,
                 shortcut: bool = False):
        super().__init__()
        self.temporal, self.conv = temporal, causal_conv(cin, cout, 3, separable)
        self.shortcut, self.cout = shortcut, cout

    def forward(self, x):                                                    # (B, C, T, H, W)
        y = x.repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2)      # (B, C, T, 2H, 2W)
        if self.temporal:
            y = y.repeat_interleave(2, dim=2)[:, :, 1:]                      # (B, C, 2T-1, 2H, 2W)
        y = self.conv(y)                                                     # (B, Cout, T', 2H, 2W)
        return y + channel_to_space(x, self.cout, self.temporal) if self.shortcut else y


class Encoder(nn.Module):
    """Causal 3D encoder; with `frame_encoder` every kernel is 1 x 3 x 3, so each latent frame is
    the code of its own pixel frame alone (Video LDM's per-frame image encoder, Sec. 3.1.1)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chs = level_widths(cfg)
        kt = 1 if cfg.frame_encoder else 3
        self.patch = cfg.patch
        self.conv_in = CausalConv3d(cfg.in_channels * cfg.patch ** 2, chs[0], (kt, 3, 3))
        blocks, cin = [], chs[0]
        for i, ch in enumerate(chs):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(cin, ch, cfg.groups, kt))
                cin = ch
            if i < len(chs) - 1:                                             # stride-2 conv downsampling
                blocks.append(Downsample(ch, kt, cfg.temporal_down[i], cfg.shortcut))
        self.blocks = nn.Sequential(*blocks, MidBlock(cin, cfg.groups, kt))
        moments = 2 if cfg.bottleneck == "kl" else 1                        # (mean, logvar) or codes
        self.conv_out = CausalConv3d(cin, moments * cfg.latent_channels, (kt, 3, 3))
        self.shortcut, self.latent_channels = cfg.shortcut, cfg.latent_channels
        self.f, self.s = cfg.spatial_factor(), cfg.temporal_factor()
        self.linear = CausalConv3d(cfg.in_channels * self.f ** 2, cfg.latent_channels, 1) \
            if cfg.patch > 1 else None                                       # the linear patch code

    def forward(self, x):                                                    # (B, 3, T, H, W)
        pixels = x
        x = rearrange(x, "b c t (h i) (w j) -> b (c i j) t h w", i=self.patch, j=self.patch)
        h = self.blocks(self.conv_in(x))                                     # (B, C, T', h, w)
        out = self.conv_out(F.silu(h))                                       # (B, 2Cz or Cz, T', h, w)
        cz = self.latent_channels                                            # the mean (kl) or codes get these
        if self.shortcut:
            out = torch.cat([out[:, :cz] + channel_average(h, cz), out[:, cz:]], 1)
        if self.linear is not None:                                          # each latent's f x f patch of
            patches = rearrange(pixels[:, :, ::self.s], "b c t (h i) (w j) -> b (c i j) t h w",
                                i=self.f, j=self.f)                          # the frame its slot ends on
            out = torch.cat([out[:, :cz] + self.linear(patches), out[:, cz:]], 1)
        return out


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chs = level_widths(cfg)
        cin = chs[-1]
        sep = cfg.decoder_conv == "2+1d"
        self.shortcut = cfg.shortcut
        blocks = [causal_conv(cfg.latent_channels, cin, 3, sep), MidBlock(cin, cfg.groups, 3, sep)]
        for i in reversed(range(len(chs))):
            for _ in range(cfg.num_res_blocks + 1):                          # one more than the encoder (LDM)
                blocks.append(ResBlock(cin, chs[i], cfg.groups, 3, sep))
                cin = chs[i]
            if i > 0:                                                        # mirrors downsampling i - 1
                blocks.append(Upsample(cin, chs[i - 1], cfg.temporal_down[i - 1], sep, cfg.shortcut))
                cin = chs[i - 1]
        self.blocks = nn.Sequential(*blocks)
        self.patch = cfg.patch
        self.conv_out = causal_conv(cin, cfg.in_channels * cfg.patch ** 2, 3, sep)
        self.f, self.s = cfg.spatial_factor(), cfg.temporal_factor()
        self.linear = CausalConv3d(cfg.latent_channels, cfg.in_channels * self.f ** 2, 1) \
            if cfg.patch > 1 else None                                       # the linear patch code

    def forward(self, z):                                                    # (B, Cz, T', h, w)
        h = self.blocks[0](z)                                                # (B, C, T', h, w)
        if self.shortcut:
            h = h + channel_repeat(z, h.shape[1])
        out = self.conv_out(F.silu(self.blocks[1:](h)))                      # (B, 3 p^2, T, H/p, W/p)
        out = rearrange(out, "b (c i j) t h w -> b c t (h i) (w j)", i=self.patch, j=self.patch)
        if self.linear is not None:                                          # each latent's f x f patch,
            lin = rearrange(self.linear(z), "b (c i j) t h w -> b c t (h i) (w j)", i=self.f, j=self.f)
            out = out + lin.repeat_interleave(self.s, dim=2)[:, :, self.s - 1:]  # on its slot's frames
        return out


class DiagonalGaussian:
    """q(z|x) = N(mean, diag(exp(logvar))) from the encoder's moments (LDM's KL-reg. autoencoder)."""

    def __init__(self, moments: torch.Tensor):                              # (B, 2Cz, ...)
        self.mean, logvar = moments.chunk(2, dim=1)                          # (B, Cz, ...) each
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std, self.var = torch.exp(0.5 * self.logvar), torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype,
                            device=self.mean.device)
        return self.mean + self.std * noise                                  # reparameterised

    def mode(self) -> torch.Tensor:
        return self.mean

    def reparameterise(self, noise: torch.Tensor) -> torch.Tensor:
        """mean + std * noise: the training sample for given standard normal noise."""
        return self.mean + self.std * noise

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) summed over each sample's latent elements -> (B,)."""
        kl = 0.5 * (self.mean ** 2 + self.var - 1.0 - self.logvar)
        return kl.flatten(1).sum(1)


class VideoVAE(nn.Module):
    """VideoVAE(cfg): video (B, 3, T, H, W) in [-1, 1] <-> latent (B, Cz, T', H/f, W/f)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        if len(cfg.temporal_down) != len(cfg.channel_mults) - 1:
            raise ValueError(f"vae.temporal_down: needs {len(cfg.channel_mults) - 1} entries "
                             f"(one per downsampling), got {len(cfg.temporal_down)}")
        if cfg.decoder_conv not in ("3d", "2+1d"):
            raise ValueError(f"vae.decoder_conv: '{cfg.decoder_conv}' is not one of 3d, 2+1d")
        if cfg.frame_encoder and any(cfg.temporal_down):
            raise ValueError("vae.frame_encoder: a per-frame encoder cannot compress time; "
                             "set vae.temporal_down to all false")
        if cfg.bottleneck not in ("kl", "vq", "fsq"):
            raise ValueError(f"vae.bottleneck: '{cfg.bottleneck}' is not one of kl, vq, fsq")
        if cfg.shortcut:
            chs = level_widths(cfg)
            ups = all(4 * b % a == 0 for a, b in zip(chs[1:], chs[:-1]))    # cin -> cout going up
            if not ups or chs[-1] % cfg.latent_channels:
                raise ValueError(f"vae.shortcut: widths {chs} and {cfg.latent_channels} latent "
                                 "channels do not fit DC-AE's shortcuts (4 x each level's width "
                                 "must be a multiple of the next one's, the last of the latent's)")
        self.cfg = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        # vq / fsq (cascade/models/quantize.py): the encoder's output quantized, not sampled
        self.quantizer = None
        if cfg.bottleneck != "kl":
            from cascade.models.quantize import Quantizer
            self.quantizer = Quantizer(cfg)
        self.register_buffer("scaling_factor", torch.tensor(1.0))           # LDM's 1/std of latents
        if cfg.decoder_only:
            self.encoder.requires_grad_(False)

    @property
    def spatial_factor(self) -> int:
        return self.cfg.spatial_factor()

    @property
    def temporal_factor(self) -> int:
        return self.cfg.temporal_factor()

    @property
    def latent_scale(self) -> float:
        return float(self.scaling_factor)

    def latent_shape(self, frames: int, h: int, w: int) -> tuple[int, int, int, int]:
        """(Cz, T', h', w') of the latent of a frames x h x w clip; ValueError if it does not fit."""
        s, f = self.temporal_factor, self.spatial_factor
        if frames < 1 or (frames - 1) % s:
            raise ValueError(f"VideoVAE: {frames} frames do not fit temporal compression {s}: "
                             f"use 1 + k*{s} frames (1, {1 + s}, {1 + 2 * s}, ...)")
        if h % f or w % f:
            raise ValueError(f"VideoVAE: size {h}x{w} is not divisible by the spatial factor {f}")
        return self.cfg.latent_channels, 1 + (frames - 1) // s, h // f, w // f

    def encode(self, video: torch.Tensor, seed: int | None = None):         # (B, 3, T, H, W)
        """q(z|x): a DiagonalGaussian (kl) or the Quantized codes (vq, fsq; seed: the quantizer's
        dead-code restarts) over (B, Cz, T', h, w)."""
        self.latent_shape(*video.shape[2:])                                  # validates T, H, W
        return self._bottleneck(self.encoder(video), seed)

    def _bottleneck(self, h: torch.Tensor, seed: int | None = None):
        return DiagonalGaussian(h) if self.quantizer is None else self.quantizer(h, seed)

    def decode(self, z: torch.Tensor) -> torch.Tensor:                      # (B, Cz, T', h, w)
        return self.decoder(z)                                               # (B, 3, 1+s(T'-1), H, W)

    def forward(self, video: torch.Tensor, sample: bool = True, generator=None):
        posterior = self.encode(video)
        z = posterior.sample(generator) if sample else posterior.mode()      # (B, Cz, T', h, w)
        return self.decode(z), posterior                                     # (B, 3, T, H, W)

    def encode_image(self, image: torch.Tensor):                            # (B, 3, H, W)
        self.latent_shape(1, *image.shape[-2:])
        return self._bottleneck(self.encoder(image.unsqueeze(2))[:, :, 0])   # over (B, Cz, h, w)

    def decode_image(self, z: torch.Tensor) -> torch.Tensor:                # (B, Cz, h, w)
        return self.decoder(z.unsqueeze(2))[:, :, 0]                         # (B, 3, H, W)

    # latent diffusion interface: latents normalised to about unit std (LDM Sec. 4.3.2)
    def encode_latents(self, video: torch.Tensor, sample: bool = False, generator=None):
        post = self.encode(video)
        z = post.sample(generator) if sample else post.mode()                # (B, Cz, T', h, w)
        return z * self.scaling_factor

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:              # (B, Cz, T', h, w)
        return self.decode(z / self.scaling_factor)                          # (B, 3, T, H, W)

    @torch.no_grad()
    def calibrate_scale(self, videos) -> float:
        """Set scaling_factor = 1 / std of the posterior means of `videos`: a (B, 3, T, H, W) tensor
        or an iterable of such batches. Returns the new factor."""
        batches = [videos] if torch.is_tensor(videos) else videos
        means = torch.cat([self.encode(v.to(self.scaling_factor.device)).mean.flatten()
                           for v in batches])
        self.scaling_factor.fill_(1.0 / means.float().std().clamp_min(1e-8).item())
        return self.latent_scale
