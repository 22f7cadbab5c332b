"""The models, inputs and random stage folders the end-to-end benchmarks share.

A `Spec` is one network with its inputs: `build()` makes the module (seeded), `inputs()` the
tensors of one call, `call(module, inputs)` runs it and returns the output tensor. Ours and the
diffusers peers are built from one set of numbers (width, depth, heads, patch, tokens, text length
and width), so a row of bench_peers compares the same work; the parameter counts show where the
architectures still differ.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

REPO = Path(__file__).resolve().parents[1]
TEXT_LEN, TEXT_DIM = 24, 384            # the tiny configs' MiniLM tokens: length and width


@dataclass
class Spec:
    name: str                            # "ours", "Latte", ...
    build: Callable[[], nn.Module]
    inputs: Callable[[], tuple]
    call: Callable[[nn.Module, tuple], torch.Tensor]
    tokens: int = 0                      # tokens (DiT) or positions (conv nets) per sample
    note: str = ""
    extra: dict = field(default_factory=dict)


def seeded(fn, seed=0):
    def build():
        torch.manual_seed(seed)
        return fn()
    return build


def text_cond(B: int, L: int = TEXT_LEN, dim: int = TEXT_DIM, seed: int = 1) -> dict:
    """A text condition as cascade.text gives it: token states, an all-True mask, pooled."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(B, L, dim, generator=g)
    return {"text": text, "text_mask": torch.ones(B, L, dtype=torch.bool), "pooled": text.mean(1)}


def randomize_zero_init(net: nn.Module) -> nn.Module:
    """A random net that is not all-zero at the output (adaLN-Zero, zero output convs), so a
    benchmark's backward pass has gradients everywhere."""
    for p in net.parameters():
        if p.abs().sum() == 0:
            p.data.normal_(0, 0.02)
    return net


# ----------------------------------------------------------------------------- the base DiT and its peers

def dit_config(width: int, heads: int, depth: int = 4, frames: int = 16, size: int = 32,
               patch: int = 2, channels: int = 4, attention: str = "factorised", **kw):
    from cascade.config import DiTConfig
    return DiTConfig(in_channels=channels, hidden=width, depth=depth, heads=heads, patch_t=1,
                     patch_h=patch, patch_w=patch, frames=frames, height=size, width=size,
                     attention=attention, text_dim=TEXT_DIM, **kw)


def dit_specs(width: int, heads: int, depth: int = 4, frames: int = 16, size: int = 32,
              patch: int = 2, channels: int = 4, B: int = 1, peers=("Latte", "CogVideoX")) -> list[Spec]:
    """Our VideoDiT (factorised attention, RoPE) and the diffusers peers at one set of numbers:
    B videos of `frames` latent frames of size x size x channels, patch 1 x patch x patch,
    `depth` blocks of `width` channels and `heads` heads, text of TEXT_LEN x TEXT_DIM.

    Latte (Ma et al. 2024; diffusers LatteTransformer3DModel, its Latte-1 block settings:
    adaLN-single, GELU-tanh MLP, cross-attention in the spatial blocks): `depth` spatial + `depth`
    temporal blocks, i.e. the same factorisation as one of our blocks (which has spatial and
    temporal attention and one MLP; Latte has an MLP in each half). CogVideoX (Yang et al. 2024;
    CogVideoXTransformer3DModel, v1.0 settings: 3D sin-cos positions, no temporal patching):
    `depth` expert blocks of full 3D attention over text + video tokens."""
    from cascade.models.dit import VideoDiT
    tokens = frames * (size // patch) ** 2
    g = torch.Generator().manual_seed(2)
    x = torch.randn(B, channels, frames, size, size, generator=g)
    t = torch.rand(B, generator=g)
    cond = text_cond(B)

    def ours():
        return randomize_zero_init(VideoDiT(dit_config(width, heads, depth, frames, size, patch, channels)))

    specs = [Spec("ours", seeded(ours), lambda: (x, t, cond), lambda m, a: m(*a), tokens)]
    if "Latte" in peers:
        def latte():
            from diffusers import LatteTransformer3DModel
            return LatteTransformer3DModel(
                num_attention_heads=heads, attention_head_dim=width // heads, in_channels=channels,
                out_channels=channels, num_layers=depth, cross_attention_dim=width,
                attention_bias=True, sample_size=size, patch_size=patch,
                activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
                caption_channels=TEXT_DIM, video_length=frames)
        steps = (t * 999).long()
        specs.append(Spec("Latte", seeded(latte), lambda: (x, steps, cond["text"]),
                          lambda m, a: m(a[0], timestep=a[1], encoder_hidden_states=a[2],
                                         return_dict=False)[0], tokens))
    if "CogVideoX" in peers:
        def cogvideox():
            from diffusers import CogVideoXTransformer3DModel
            return CogVideoXTransformer3DModel(
                num_attention_heads=heads, attention_head_dim=width // heads, in_channels=channels,
                out_channels=channels, time_embed_dim=width, text_embed_dim=TEXT_DIM,
                num_layers=depth, sample_width=size, sample_height=size, sample_frames=frames,
                patch_size=patch, temporal_compression_ratio=1, max_text_seq_length=TEXT_LEN)
        xf = x.transpose(1, 2).contiguous()                              # (B, F, C, H, W): its layout
        steps = (t * 999).long()
        specs.append(Spec("CogVideoX", seeded(cogvideox), lambda: (xf, steps, cond["text"]),
                          lambda m, a: m(a[0], encoder_hidden_states=a[2], timestep=a[1],
                                         return_dict=False)[0], tokens, "full 3D attention"))
    return specs


# ----------------------------------------------------------------------------- the SR U-Net and its peer

def unet_specs(channels: int = 16, mults=(1, 2, 2), heads: int = 2, groups: int = 8,
               frames: int = 8, size: int = 64, B: int = 1, peers=("UNet3D",)) -> list[Spec]:
    """Our VideoUNet (the SR stage: x_t and the upsampled low-res video concatenated, 6 channels
    in, 3 out; (2+1)D convs; temporal + cross attention at the lowest level only) and diffusers'
    UNet3DConditionModel (ModelScope T2V) with the same channels per level, res-blocks per level,
    groups, heads, text width and resolution, cross-attention at the same (lowest) level. Its
    architecture still adds a temporal transformer after conv_in, four temporal convs per
    res-block, attention in the mid block, and one more res-block per decoder level."""
    from cascade.config import UNetConfig
    from cascade.models.unet import VideoUNet
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, 3, frames, size, size, generator=g)
    low = torch.randn(B, 3, frames, size, size, generator=g)
    t = torch.rand(B, generator=g)
    cond = {**text_cond(B), "lowres": low, "aug_t": torch.full((B,), 0.1)}
    n = len(mults)
    cfg = UNetConfig(in_channels=3, channels=channels, channel_mults=list(mults), num_res_blocks=1,
                     attn_levels=[n - 1], heads=heads, text_dim=TEXT_DIM, groups=groups)
    specs = [Spec("ours", seeded(lambda: randomize_zero_init(VideoUNet(cfg))), lambda: (x, t, cond),
                  lambda m, a: m(*a), frames * size * size)]
    if "UNet3D" in peers:
        def unet3d():
            from diffusers import UNet3DConditionModel
            return UNet3DConditionModel(
                sample_size=size, in_channels=6, out_channels=3,
                down_block_types=("DownBlock3D",) * (n - 1) + ("CrossAttnDownBlock3D",),
                up_block_types=("CrossAttnUpBlock3D",) + ("UpBlock3D",) * (n - 1),
                block_out_channels=tuple(channels * m for m in mults), layers_per_block=1,
                norm_num_groups=groups, cross_attention_dim=TEXT_DIM,
                attention_head_dim=heads)          # diffusers' name for the number of heads here
        xin = torch.cat([x, low], 1)
        steps = (t * 999).long()
        specs.append(Spec("UNet3D", seeded(unet3d), lambda: (xin, steps, cond["text"]),
                          lambda m, a: m(a[0], a[1], encoder_hidden_states=a[2], return_dict=False)[0],
                          frames * size * size))
    return specs


# ----------------------------------------------------------------------------- the VAE and its peers

def vae_specs(channels: int = 32, mults=(1, 2, 2), latent: int = 4, groups: int = 8,
              frames: int = 8, size: int = 64, B: int = 1, frame_encoder: bool = False,
              decoder_conv: str = "3d", peers=("CogVideoX-VAE", "SVD-VAE")) -> list[Spec]:
    """Our VideoVAE (encode, sample, decode) against diffusers' video autoencoders with the same
    widths per level, res-blocks, latent channels and groups, on the same clip, no temporal
    compression (the tiny VAE has none): AutoencoderKLCogVideoX (causal 3D convs: the peer of
    ours with its causal 3D encoder) and AutoencoderKLTemporalDecoder (Stable Video Diffusion:
    per-frame 2D encoder, decoder of 2D blocks with temporal convs: the peer of ours with
    frame_encoder=True and decoder_conv="2+1d")."""
    from cascade.config import VAEConfig
    from cascade.models.vae import VideoVAE
    g = torch.Generator().manual_seed(4)
    x = torch.rand(B, 3, frames, size, size, generator=g) * 2 - 1
    chs = tuple(channels * m for m in mults)
    n = len(mults)
    cfg = VAEConfig(channels=channels, channel_mults=list(mults), temporal_down=[False] * (n - 1),
                    num_res_blocks=1, latent_channels=latent, groups=groups,
                    frame_encoder=frame_encoder, decoder_conv=decoder_conv)
    pos = frames * size * size
    specs = [Spec("ours", seeded(lambda: VideoVAE(cfg)), lambda: (x,),
                  lambda m, a: m(a[0], sample=True)[0], pos)]
    if "CogVideoX-VAE" in peers:
        def cog():
            from diffusers import AutoencoderKLCogVideoX
            return AutoencoderKLCogVideoX(
                down_block_types=("CogVideoXDownBlock3D",) * n, up_block_types=("CogVideoXUpBlock3D",) * n,
                block_out_channels=chs, latent_channels=latent, layers_per_block=1,
                norm_num_groups=groups, temporal_compression_ratio=1,
                sample_height=size, sample_width=size)
        specs.append(Spec("CogVideoX-VAE", seeded(cog), lambda: (x,),
                          lambda m, a: m(a[0], sample_posterior=True, return_dict=False)[0], pos))
    if "SVD-VAE" in peers:
        def svd():
            from diffusers import AutoencoderKLTemporalDecoder
            return AutoencoderKLTemporalDecoder(
                down_block_types=("DownEncoderBlock2D",) * n, block_out_channels=chs,
                layers_per_block=1, latent_channels=latent, sample_size=size)
        xf = x.transpose(1, 2).reshape(B * frames, 3, size, size)        # (B*F, 3, H, W): its layout
        specs.append(Spec("SVD-VAE", seeded(svd), lambda: (xf,),
                          lambda m, a: m(a[0], sample_posterior=True, num_frames=frames,
                                         return_dict=False)[0], pos, "groups fixed at 32 by diffusers"))
    return specs


def param_count(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ----------------------------------------------------------------------------- random stage folders

# per-stage config overrides on configs/tiny/<stage>.yaml for the sampling benchmarks' sizes
STAGE_SIZES = {
    # the embedded default, as configs/cascade/tiny_full.yaml trains it
    "tiny": {"vae": [], "base": [], "interp": [], "sr": []},
    # the same networks at twice the resolution: 16x16 latents (64x64 px), SR to 128x128
    "larger": {"vae": ["data.height=64", "data.width=64"],
               "base": ["data.height=64", "data.width=64", "dit.height=16", "dit.width=16"],
               "interp": ["data.height=64", "data.width=64", "dit.height=16", "dit.width=16"],
               "sr": ["data.height=128", "data.width=128"]},
    # toy networks for the tests (seconds)
    "smoke": {"vae": ["data.frames=4", "data.height=16", "data.width=16", "vae.channels=8",
                      "vae.channel_mults=[1,2]", "vae.temporal_down=[false]", "vae.groups=4"],
              "base": ["data.frames=4", "data.height=16", "data.width=16", "dit.hidden=32",
                       "dit.depth=1", "dit.heads=2", "dit.frames=4", "dit.height=8", "dit.width=8"],
              "interp": ["data.frames=5", "data.height=16", "data.width=16", "interp.rate=2",
                         "dit.hidden=32", "dit.depth=1", "dit.heads=2", "dit.frames=5",
                         "dit.height=8", "dit.width=8"],
              "sr": ["data.height=32", "data.width=32", "unet.channels=8", "unet.channel_mults=[1,2]",
                     "unet.attn_levels=[1]", "unet.heads=2", "unet.groups=4"]},
}


def export_random(root: Path, stage: str, overrides: list[str] = (), seed: int = 0,
                  config: Path | None = None) -> Path:
    """A randomly initialised stage exported as `cascade train` exports one (config.yaml +
    model.safetensors in root/stage/export), from configs/tiny/<stage>.yaml + overrides (or
    `config`): sampling cost does not depend on the weights, so no training is needed."""
    from safetensors.torch import save_file

    from cascade.config import load_config, save_config
    cfg = load_config(config or REPO / "configs" / "tiny" / f"{stage}.yaml", list(overrides))
    torch.manual_seed(seed)
    if stage == "vae":
        from cascade.models.vae import VideoVAE
        net = VideoVAE(cfg.vae)
    elif stage == "sr":
        from cascade.models.unet import VideoUNet
        net = randomize_zero_init(VideoUNet(cfg.unet))
    else:
        from cascade.models.dit import VideoDiT
        net = randomize_zero_init(VideoDiT(cfg.dit))
    folder = Path(root) / stage / "export"
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "model.safetensors"))
    save_config(cfg, folder / "config.yaml")
    return folder


def random_stages(root: Path, size: str, stages=("vae", "base", "interp", "sr")) -> Path:
    """A stages folder of randomly initialised stages at one of STAGE_SIZES."""
    for i, stage in enumerate(stages):
        export_random(root, stage, STAGE_SIZES[size][stage], seed=i)
    return Path(root)
