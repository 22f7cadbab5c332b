"""VideoVAE: shapes and valid frame counts, causality in time, the Gaussian posterior, frozen
encoder, kernel calls, latent scaling, and a short training run that lowers the loss."""
import math

import pytest
import torch
import torch.nn as nn

from cascade.config import VAEConfig
from cascade.losses import VAELoss
from cascade.models import vae as vae_mod
from cascade.models.vae import CausalConv3d, DiagonalGaussian, GroupNormSiLU, VideoVAE


def tiny_cfg(**kw):
    base = dict(channels=8, channel_mults=[1, 2], temporal_down=[False], groups=4, latent_channels=4,
                lpips_weight=0.0, lpips_pretrained=False)
    base.update(kw)
    return VAEConfig(**base)


def video(B=2, T=5, H=16, W=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, 3, T, H, W, generator=g) * 2 - 1


@pytest.mark.parametrize("mults,tdown,T,latent_T", [
    ([1, 2], [False], 6, 6),                 # no temporal compression: any T
    ([1, 2], [True], 5, 3),                  # 1 + (5 - 1) // 2
    ([1, 2, 2], [True, True], 9, 3),         # temporal factor 4
    ([1, 2, 2], [False, True], 1, 1),        # an image is a 1-frame video
])
def test_shapes(mults, tdown, T, latent_T):
    torch.manual_seed(0)
    m = VideoVAE(tiny_cfg(channel_mults=mults, temporal_down=tdown))
    H = W = 16
    f = 2 ** (len(mults) - 1)
    assert m.spatial_factor == f and m.temporal_factor == 2 ** sum(tdown)
    assert m.latent_shape(T, H, W) == (4, latent_T, H // f, W // f)
    recon, post = m(video(T=T))
    assert post.mean.shape == post.std.shape == (2, 4, latent_T, H // f, W // f)
    assert recon.shape == (2, 3, T, H, W)
    assert m.decode(post.mode()).shape == (2, 3, T, H, W)


def test_invalid_frame_counts_rejected():
    m = VideoVAE(tiny_cfg(channel_mults=[1, 2, 2], temporal_down=[True, True]))
    for T in (2, 4, 6, 8):
        with pytest.raises(ValueError, match=r"1 \+ k\*4"):
            m.encode(video(B=1, T=T))
    with pytest.raises(ValueError, match="spatial factor"):
        m.encode(video(B=1, T=5, H=18))
    assert m.latent_shape(13, 16, 16)[1] == 4


def test_image_is_a_one_frame_video():
    torch.manual_seed(0)
    m = VideoVAE(tiny_cfg(temporal_down=[True])).eval()
    img = video(T=1)[:, :, 0]                                               # (B, 3, H, W)
    post = m.encode_image(img)
    assert post.mean.shape == (2, 4, 8, 8)
    torch.testing.assert_close(post.mean, m.encode(img.unsqueeze(2)).mean[:, :, 0])
    assert m.decode_image(post.mode()).shape == img.shape


@pytest.mark.parametrize("shortcut, patch", [(False, 1), (True, 1), (False, 2)])
@pytest.mark.parametrize("tdown", [[False, False], [True, False], [True, True]])
def test_causality(tdown, shortcut, patch):
    """Pixel frame f lives in latent slot ceil(f / s): changing it leaves every earlier slot of the
    latent unchanged, and changing latent slot t leaves every pixel frame of earlier slots unchanged
    (also through DC-AE's shortcuts, which take frames 0, 2, ... going down, and through the
    patchify's linear patch code)."""
    torch.manual_seed(0)
    m = VideoVAE(tiny_cfg(channel_mults=[1, 2, 2], temporal_down=tdown, shortcut=shortcut,
                          patch=patch)).eval()
    s, T = m.temporal_factor, 9
    x = video(B=1, T=T, H=8 * patch, W=8 * patch)
    with torch.no_grad():
        z = m.encode(x).mean                                                # (1, Cz, T', 2, 2)
        torch.testing.assert_close(z[:, :, :1], m.encode(x[:, :, :1]).mean)  # first frame alone
        for f in (1, 4, 5, 8):
            x2 = x.clone()
            x2[:, :, f] = -x2[:, :, f]
            z2 = m.encode(x2).mean
            slot = math.ceil(f / s)
            torch.testing.assert_close(z2[:, :, :slot], z[:, :, :slot])
            assert not torch.allclose(z2[:, :, slot], z[:, :, slot])
        y = m.decode(z)
        for t in range(1, z.shape[2]):
            z2 = z.clone()
            z2[:, :, t] += 1.0
            y2 = m.decode(z2)
            first = s * (t - 1) + 1                                         # first frame of slot t
            torch.testing.assert_close(y2[:, :, :first], y[:, :, :first])
            assert not torch.allclose(y2[:, :, first], y[:, :, first])


def test_kl_of_standard_normal_is_zero():
    post = DiagonalGaussian(torch.zeros(3, 8, 2, 4, 4))                     # mean 0, logvar 0
    assert torch.equal(post.kl(), torch.zeros(3))
    assert post.sample().shape == (3, 4, 2, 4, 4)
    shifted = DiagonalGaussian(torch.cat([torch.ones(1, 4, 1, 2, 2), torch.zeros(1, 4, 1, 2, 2)], 1))
    torch.testing.assert_close(shifted.kl(), torch.tensor([0.5 * 16]))     # 0.5 * mu^2 per element


def test_loss_backward_reaches_the_model():
    torch.manual_seed(0)
    cfg = tiny_cfg(lpips_weight=0.1)
    m, loss_fn = VideoVAE(cfg), VAELoss(cfg)
    x = video(B=1, T=3)
    loss, logs = loss_fn(x, *m(x))
    loss.backward()
    assert set(logs) == {"l1", "l2", "lpips", "kl"} and logs["lpips"] > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    assert not any(p.requires_grad for p in loss_fn.parameters())         # LPIPS frozen


def test_decoder_only_freezes_the_encoder():
    m = VideoVAE(tiny_cfg(decoder_only=True))
    assert not any(p.requires_grad for p in m.encoder.parameters())
    assert all(p.requires_grad for p in m.decoder.parameters())
    recon, post = m(video(B=1, T=2))
    (recon.square().mean() + post.kl().mean()).backward()
    assert all(p.grad is None for p in m.encoder.parameters())


def test_model_calls_the_kernel_functions(monkeypatch):
    calls = {"conv": 0, "norm": 0, "attn": 0}
    real_conv, real_norm, real_attn = vae_mod.conv3d, vae_mod.group_norm_silu, vae_mod.spacetime_attention

    def conv(*a, **k):
        assert k.get("causal") is True
        calls["conv"] += 1
        return real_conv(*a, **k)

    monkeypatch.setattr(vae_mod, "conv3d", conv)
    monkeypatch.setattr(vae_mod, "group_norm_silu",
                        lambda *a, **k: calls.__setitem__("norm", calls["norm"] + 1) or real_norm(*a, **k))
    monkeypatch.setattr(vae_mod, "spacetime_attention",
                        lambda *a, **k: calls.__setitem__("attn", calls["attn"] + 1) or real_attn(*a, **k))
    m = VideoVAE(tiny_cfg())
    assert not any(isinstance(mod, (nn.Conv3d, nn.Conv2d, nn.GroupNorm)) for mod in m.modules())
    m(video(B=1, T=2))
    assert calls["conv"] == sum(isinstance(mod, CausalConv3d) for mod in m.modules())
    assert calls["norm"] == sum(isinstance(mod, GroupNormSiLU) for mod in m.modules())
    assert calls["attn"] == 2                                               # encoder and decoder mid


def test_groups_zero_turns_groupnorm_off(monkeypatch):
    """groups=0: no GroupNorm anywhere but before the two mid-block attentions (one group there)."""
    seen = []
    real = vae_mod.group_norm_silu
    monkeypatch.setattr(vae_mod, "group_norm_silu", lambda x, g, *a, **k: seen.append(g) or real(x, g, *a, **k))
    m = VideoVAE(tiny_cfg(groups=0))
    recon, post = m(video(B=1, T=2))
    assert recon.shape == (1, 3, 2, 16, 16)
    assert seen == [1, 1]                                                   # encoder and decoder mid
    for bad in (3, -1):                                                     # 3 does not divide 8
        with pytest.raises(ValueError, match="vae.groups"):
            VideoVAE(tiny_cfg(groups=bad))


def test_latent_scaling():
    torch.manual_seed(0)
    m = VideoVAE(tiny_cfg()).eval()
    x = video(B=3, T=2)
    assert m.latent_scale == 1.0
    with torch.no_grad():
        scale = m.calibrate_scale([x[:2], x[2:]])
        assert scale == pytest.approx(1.0 / m.encode(x).mean.std().item(), rel=1e-5)
        assert "scaling_factor" in m.state_dict()                           # exported with the weights
        z = m.encode_latents(x)
        assert z.std().item() == pytest.approx(1.0, rel=1e-4)
        torch.testing.assert_close(z, m.encode(x).mean * scale)
        torch.testing.assert_close(m.decode_latents(z), m.decode(m.encode(x).mean), atol=1e-5, rtol=1e-4)


def test_short_training_run_lowers_the_loss():
    torch.manual_seed(0)
    cfg = tiny_cfg(temporal_down=[True])
    m, loss_fn = VideoVAE(cfg), VAELoss(cfg)
    # smooth moving blobs: a learnable batch, fixed
    t = torch.arange(5).view(1, 5, 1, 1)
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    cx = torch.tensor([4.0, 8.0, 11.0, 6.0]).view(4, 1, 1, 1) + t
    blob = torch.exp(-((xx - cx) ** 2 + (yy - 8) ** 2) / 12)                # (4, 5, 16, 16)
    x = torch.stack([blob * 2 - 1, -blob, blob.flip(-1)], 1)                # (4, 3, 5, 16, 16)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss, _ = loss_fn(x, *m(x))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses


def test_frame_encoder_codes_each_frame_alone():
    """vae.frame_encoder: a frame's latent is the same alone or inside its clip (Video LDM's
    per-frame encoder); the causal 3D encoder's is not."""
    x = video(B=1, T=4)
    for frame_encoder in (True, False):
        torch.manual_seed(0)
        m = VideoVAE(tiny_cfg(frame_encoder=frame_encoder)).eval()
        with torch.no_grad():
            clip = m.encode(x).mean                                          # (1, Cz, 4, h, w)
            alone = torch.cat([m.encode(x[:, :, t:t + 1]).mean for t in range(4)], dim=2)
        same = torch.allclose(clip, alone, atol=1e-5)
        assert same == frame_encoder
    with pytest.raises(ValueError, match="frame_encoder"):
        VideoVAE(tiny_cfg(frame_encoder=True, temporal_down=[True]))


def test_separable_decoder_is_causal_and_cheaper():
    """vae.decoder_conv=2+1d: (2+1)D convs in the decoder, still causal in time, fewer weights."""
    torch.manual_seed(0)
    full = VideoVAE(tiny_cfg(frame_encoder=True))
    sep = VideoVAE(tiny_cfg(frame_encoder=True, decoder_conv="2+1d"))
    n = lambda m: sum(p.numel() for p in m.decoder.parameters())  # noqa: E731
    assert n(sep) < 0.6 * n(full)
    z = torch.randn(1, 4, 5, 8, 8)
    with torch.no_grad():
        y = sep.decode(z)
        z2 = z.clone()
        z2[:, :, 3:] += 1.0                                                   # change the future only
        y2 = sep.decode(z2)
    assert y.shape == (1, 3, 5, 16, 16)
    torch.testing.assert_close(y[:, :, :3], y2[:, :, :3])
    assert (y[:, :, 3:] - y2[:, :, 3:]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="decoder_conv"):
        VideoVAE(tiny_cfg(decoder_conv="3D"))


def test_dc_ae_shortcuts():
    """vae.shortcut (DC-AE): space-to-channel and channel-to-space are exact inverses at 4x the
    width; a 2 x 2 block of one value goes down to that value and comes back up as the block; the
    shortcuts add no parameters (an export without them keeps its state dict) and give the shapes
    of the plain VAE; widths that do not fit are one line."""
    x = torch.randn(2, 3, 5, 4, 6)
    torch.testing.assert_close(vae_mod.channel_to_space(vae_mod.space_to_channel(x, 12), 3), x)
    flat = torch.arange(6.0).view(1, 6, 1, 1, 1).expand(1, 6, 3, 2, 2)     # every 2 x 2 block one value
    down = vae_mod.space_to_channel(flat, 6, temporal=True)                  # (1, 6, 2, 1, 1): frames 0, 2
    assert down.shape == (1, 6, 2, 1, 1)
    torch.testing.assert_close(down.flatten(1, 2), torch.arange(6.0).repeat_interleave(2).view(1, 12, 1, 1))
    up = vae_mod.channel_to_space(down, 6, temporal=True)                    # (1, 6, 3, 2, 2)
    torch.testing.assert_close(up, flat)
    torch.manual_seed(0)
    plain = VideoVAE(tiny_cfg(channel_mults=[1, 2, 2], temporal_down=[True, False]))
    torch.manual_seed(0)
    short = VideoVAE(tiny_cfg(channel_mults=[1, 2, 2], temporal_down=[True, False], shortcut=True))
    assert plain.state_dict().keys() == short.state_dict().keys()
    short.load_state_dict(plain.state_dict())
    v = video(B=1, T=5)
    with torch.no_grad():
        assert short.encode(v).mean.shape == plain.encode(v).mean.shape == (1, 4, 3, 4, 4)
        assert not torch.allclose(short.encode(v).mean, plain.encode(v).mean)
        assert short(v)[0].shape == v.shape
    with pytest.raises(ValueError, match="vae.shortcut"):
        VideoVAE(tiny_cfg(channels=6, channel_mults=[1, 2, 3], temporal_down=[False, False],
                           groups=0, latent_channels=4, shortcut=True))


def test_patchify_and_its_linear_patch_code():
    """vae.patch (LTX-Video's patchify): p x p pixels fold into channels before the first conv and
    out of the last, so the spatial factor is p x 2^(levels - 1); beside the deep path a 1 x 1
    linear map takes each patch to its latent and back. Known answer: with the deep path's output
    convs zeroed and both linear maps the identity (48 latent channels = 3 x 4 x 4), any video comes
    back exactly. patch < 1 is a one-line config error."""
    from cascade.config import ConfigError, load_config
    torch.manual_seed(0)
    for patch, mults, f in ((4, [1], 4), (2, [1, 2], 4)):
        m = VideoVAE(tiny_cfg(channel_mults=mults, temporal_down=[False] * (len(mults) - 1), patch=patch))
        assert m.spatial_factor == f and m.latent_shape(3, 16, 24) == (4, 3, 16 // f, 24 // f)
        recon, post = m(video(B=1, T=3, H=16, W=24))
        assert recon.shape == (1, 3, 3, 16, 24) and post.mean.shape == (1, 4, 3, 4, 6)
    m = VideoVAE(tiny_cfg(channel_mults=[1], temporal_down=[], patch=4, latent_channels=48)).eval()
    with torch.no_grad():
        for conv in (m.encoder.conv_out, m.decoder.conv_out):
            conv.weight.zero_()
            conv.bias.zero_()
        for lin in (m.encoder.linear, m.decoder.linear):
            lin.weight.copy_(torch.eye(48).view(48, 48, 1, 1, 1))
            lin.bias.zero_()
        x = video(B=2, T=3, H=8, W=12)
        torch.testing.assert_close(m(x, sample=False)[0], x)
    repo = __import__("pathlib").Path(__file__).resolve().parents[2]
    with pytest.raises(ConfigError, match="vae.patch: must be >= 1"):
        load_config(repo / "configs/tiny/vae.yaml", ["vae.patch=0"])
    with pytest.raises(ConfigError, match="not divisible by the VAE's spatial downsampling 16"):
        load_config(repo / "configs/tiny/vae.yaml", ["vae.patch=4", "data.height=40"])
