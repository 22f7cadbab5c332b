import pytest
import torch
import torch.nn as nn

import kernels.attention as attention
import kernels.conv2plus1d as k_conv2plus1d
import kernels.conv3d as k_conv3d
import kernels.group_norm_silu as k_gn
from cascade.models import unet as unet_mod
from cascade.models.unet import UNetConfig, VideoUNet, blend_weights, upsample_video, windowed


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


def tiny_cfg(**kw):
    base = dict(channels=8, channel_mults=[1, 2, 2], attn_levels=[2], heads=2, text_dim=16, groups=4)
    base.update(kw)
    return UNetConfig(**base)


def inputs(B=2, T=3, H=8, W=12, L=5, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, 3:] = False                                  # padding
    mask[-1] = False                                     # a dropped prompt: only the null token
    x = torch.randn(B, 3, T, H, W, generator=g)
    cond = dict(text=torch.randn(B, L, D, generator=g), text_mask=mask, pooled=torch.randn(B, D, generator=g),
                lowres=torch.randn(B, 3, T, H, W, generator=g), aug_t=torch.rand(B, generator=g))
    return x, torch.rand(B, generator=g), cond


def randomize_zero_init(m):
    torch.manual_seed(1)
    for p in m.parameters():
        if p.abs().sum() == 0:
            p.data.normal_(0, 0.1)


@pytest.mark.parametrize("T", [1, 5, 8])
def test_shapes_and_zero_init(T):
    m = VideoUNet(tiny_cfg())
    x, t, cond = inputs(T=T)
    y = m(x, t, cond)
    assert y.shape == x.shape
    assert torch.all(y == 0)                             # zero-initialised output conv
    randomize_zero_init(m)
    y = m(x, t, cond)
    assert y.shape == x.shape and torch.isfinite(y).all() and y.abs().sum() > 0


def test_backward_reaches_every_parameter():
    m = VideoUNet(tiny_cfg())
    randomize_zero_init(m)
    x, t, cond = inputs(B=1, T=2)
    cond["text_mask"][:] = True
    m(x, t, cond).square().mean().backward()
    dead = [n for n, p in m.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead


def spy(monkeypatch, calls):
    """Replace the kernel functions unet.py (and the shared layers it uses) imported by counting
    wrappers; record each call."""
    import cascade.models.layers as layers_mod
    for name in ("conv3d", "conv2plus1d", "group_norm_silu", "spacetime_attention", "cross_attention"):
        mod = layers_mod if name == "conv2plus1d" else unet_mod
        real = getattr(mod, name)

        def wrapper(*a, _real=real, _name=name, **k):
            calls.append((_name, a, k))
            return _real(*a, **k)
        monkeypatch.setattr(mod, name, wrapper)


def test_models_call_the_kernel_functions(monkeypatch):
    m = VideoUNet(tiny_cfg())
    assert not [mod for mod in m.modules() if isinstance(mod, (nn.Conv2d, nn.Conv3d, nn.GroupNorm))]
    calls = []
    spy(monkeypatch, calls)
    m(*inputs())
    n = {name: sum(c[0] == name for c in calls) for name in
         ("conv3d", "conv2plus1d", "group_norm_silu", "spacetime_attention", "cross_attention")}
    count = lambda cls: sum(isinstance(mod, cls) for mod in m.modules())  # noqa: E731
    assert n["conv2plus1d"] == count(unet_mod.Conv2plus1d) == 2 * count(unet_mod.ResBlock) + 2
    assert n["conv3d"] == count(unet_mod.Conv) > 0
    assert n["group_norm_silu"] == count(unet_mod.Norm) > 0
    assert n["spacetime_attention"] == count(unet_mod.TemporalAttention) > 0
    assert n["cross_attention"] == count(unet_mod.CrossAttention) > 0


@pytest.mark.parametrize("attn_levels", [[2], [1], [0, 2], []])
def test_attention_only_at_attn_levels(monkeypatch, attn_levels):
    cfg = tiny_cfg(attn_levels=attn_levels, num_res_blocks=2)
    m = VideoUNet(cfg)
    calls = []
    spy(monkeypatch, calls)
    T, H, W = 3, 8, 12
    m(*inputs(T=T, H=H, W=W))
    temporal = [c for c in calls if c[0] == "spacetime_attention"]
    assert all(c[2]["mode"] == "temporal" for c in temporal)
    tokens = lambda i: (H >> i) * (W >> i)               # noqa: E731  positions at level i
    last = len(cfg.channel_mults) - 1
    per_level = {i: 2 * cfg.num_res_blocks + (2 if i == last else 0) for i in attn_levels}  # down, up, mid
    got = {}
    for _, (q, k, v), _ in temporal:
        assert q.shape[1] == T                           # the sequence is the frames
        level = next(i for i in range(last + 1) if tokens(i) == q.shape[2])
        got[level] = got.get(level, 0) + 1
    assert got == per_level
    cross = [c[1][0].shape[1] for c in calls if c[0] == "cross_attention"]
    assert sorted(cross) == sorted(T * tokens(i) for i, n in per_level.items() for _ in range(n))


def test_every_input_changes_the_output():
    m = VideoUNet(tiny_cfg())
    randomize_zero_init(m)
    x, t, cond = inputs()
    cond["text_mask"][-1, :2] = True                     # let the text reach both samples
    y = m(x, t, cond)
    g = torch.Generator().manual_seed(5)
    for key in ("text", "pooled", "lowres", "aug_t"):
        other = dict(cond, **{key: cond[key] + 0.5 * torch.randn(cond[key].shape, generator=g)})
        y2 = m(x, t, other)
        assert not torch.allclose(y2, y), key
    assert not torch.allclose(m(x, (t + 0.3) % 1, cond), y)
    assert not torch.allclose(m(x + 0.5, t, cond), y)
    mask = cond["text_mask"].clone()
    mask[0, 1] = False
    assert not torch.allclose(m(x, t, dict(cond, text_mask=mask))[0], y[0])


@pytest.mark.parametrize("kt,attn,mixes", [(1, [], False), (3, [], True), (1, [2], True)])
def test_frames_mix_only_through_temporal_layers(kt, attn, mixes):
    """No temporal conv and no temporal attention: each frame is processed on its own (norms are
    per frame); either temporal path alone lets a change in frame 0 reach the other frames."""
    m = VideoUNet(tiny_cfg(temporal_kernel=kt, attn_levels=attn))
    randomize_zero_init(m)
    x, t, cond = inputs(T=4)
    y = m(x, t, cond)
    x2 = x.clone()
    x2[:, :, 0] += 1
    y2 = m(x2, t, cond)
    assert not torch.allclose(y[:, :, 0], y2[:, :, 0])
    assert torch.allclose(y[:, :, 1:], y2[:, :, 1:], atol=1e-6) != mixes


class Blocks(nn.Module):
    """The net's building blocks in the order it uses them (the whole net in the interpreter takes
    ~15 s; test_whole_net_triton_on_gpu covers it on a GPU)."""

    def __init__(self, cfg):
        super().__init__()
        self.res = unet_mod.ResBlock(4, 8, cfg, emb_dim=16)
        self.temporal, self.cross = unet_mod.TemporalAttention(8, cfg), unet_mod.CrossAttention(8, cfg)
        self.down = unet_mod.Conv(8, 8, 3, stride=2)

    def forward(self, x, emb, text, mask):
        return self.down(self.cross(self.temporal(self.res(x, emb)), text, mask))


def run_backends(m, args, monkeypatch):
    """Forward and backward with CASCADE_KERNELS=torch, then triton -> {backend: (y, grads)}."""
    out = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("CASCADE_KERNELS", backend)
        m.zero_grad(set_to_none=True)
        y = m(*args)
        (y * torch.linspace(-1, 1, y.numel(), device=y.device).view_as(y)).sum().backward()
        out[backend] = (y.detach(), {n: p.grad.clone() for n, p in m.named_parameters()})
    return out


def assert_backends_close(out, **tol):
    torch.testing.assert_close(out["triton"][0], out["torch"][0], **tol)
    for name, g in out["torch"][1].items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(out["triton"][1][name], g, **tol, msg=lambda s, n=name: f"{n}: {s}")


def test_blocks_triton_kernels_match_reference(monkeypatch):
    """Res-block ((2+1)D convs, GN-SiLU, adaGN, 1x1 skip), temporal and cross attention and the
    stride-2 conv through the Triton kernels (interpreter on CPU) against the reference path."""
    m = Blocks(tiny_cfg(groups=2, heads=2, text_dim=16))
    randomize_zero_init(m)
    g = torch.Generator().manual_seed(3)
    mask = torch.tensor([[True, True, True, False, False]])
    args = (torch.randn(1, 4, 3, 4, 6, generator=g), torch.randn(1, 16, generator=g),
            torch.randn(1, 5, 16, generator=g), mask)
    launches = []
    for mod, name in ((attention, "_attn_fwd"), (k_conv3d, "_conv3d_fwd"), (k_gn, "_gn_fwd"),
                      (k_conv2plus1d, "_conv2plus1d_fwd_fused")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _r=real, _n=name, **k: launches.append(_n) or _r(*a, **k))
    out = run_backends(m, args, monkeypatch)
    assert {"_attn_fwd", "_conv3d_fwd", "_gn_fwd", "_conv2plus1d_fwd_fused"} <= set(launches)
    assert_backends_close(out, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_whole_net_triton_on_gpu(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)   # IEEE fp32 convs on both paths
    m = VideoUNet(tiny_cfg(channels=32, groups=8)).cuda()
    randomize_zero_init(m)
    x, t, cond = inputs(T=5, H=16, W=24)
    args = (x.cuda(), t.cuda(), {k: v.cuda() for k, v in cond.items()})
    out = run_backends(m, args, monkeypatch)
    assert_backends_close(out, rtol=1e-3, atol=1e-4)


def test_input_errors():
    m = VideoUNet(tiny_cfg())                            # 3 levels: H, W divisible by 4
    x, t, cond = inputs(H=8, W=10)
    with pytest.raises(ValueError, match="not divisible by 4"):
        m(x, t, cond)
    x, t, cond = inputs()
    with pytest.raises(ValueError, match="lowres"):
        m(x, t, dict(cond, lowres=cond["lowres"][:, :, :2]))
    with pytest.raises(ValueError, match="attn_levels"):
        VideoUNet(tiny_cfg(attn_levels=[3]))
    with pytest.raises(ValueError, match="groups=3"):
        VideoUNet(tiny_cfg(groups=3))


# ---------------------------------------------------------------------------------------------
# upsample_video, windowed
# ---------------------------------------------------------------------------------------------

def test_upsample_video_is_bilinear_per_frame():
    v = torch.randn(2, 3, 4, 5, 7)
    y = upsample_video(v, 4)
    assert y.shape == (2, 3, 4, 20, 28)
    frame = torch.nn.functional.interpolate(v[:, :, 2], scale_factor=4, mode="bilinear", align_corners=False)
    torch.testing.assert_close(y[:, :, 2], frame)
    const = upsample_video(torch.full((1, 3, 2, 3, 3), 0.7), 2)
    torch.testing.assert_close(const, torch.full((1, 3, 2, 6, 6), 0.7))


COMBOS = [(1, 4, 1), (3, 4, 2), (4, 4, 3), (5, 4, 0), (7, 4, 1), (8, 4, 2), (10, 4, 3), (9, 5, 2), (13, 6, 2),
          (16, 8, 4), (6, 1, 0)]


@pytest.mark.parametrize("T,window,overlap", COMBOS)
def test_windowed_identity_and_per_frame_op(T, window, overlap):
    v = torch.randn(2, 3, T, 4, 6)
    seen = []
    ident = windowed(lambda c: seen.append(c.shape[2]) or c, v, window, overlap)
    torch.testing.assert_close(ident, v, rtol=1e-6, atol=1e-7)
    assert all(n == min(T, window) for n in seen)
    op = lambda c: upsample_video(c, 2) * 2 - 1          # noqa: E731  per frame, changes the size
    torch.testing.assert_close(windowed(op, v, window, overlap), op(v), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("T,window,overlap", COMBOS)
def test_windowed_weights_sum_to_one_without_seams(T, window, overlap):
    const = torch.full((1, 2, T, 3, 3), 0.37)
    torch.testing.assert_close(windowed(lambda c: c, const, window, overlap), const, rtol=1e-6, atol=0)
    if T <= window:
        return
    starts, w = blend_weights(T, window, overlap)        # (n, window)
    assert starts[0] == 0 and starts[-1] == T - window
    assert all(0 < b - a <= window - overlap for a, b in zip(starts, starts[1:]))   # overlap kept
    share = torch.zeros(len(starts), T + 2, dtype=torch.float64)   # each window's share of each frame
    for k, s in enumerate(starts):
        share[k, 1 + s:1 + s + window] = w[k]
    torch.testing.assert_close(share.sum(0)[1:-1], torch.ones(T, dtype=torch.float64))
    share[0, 0], share[-1, -1] = share[0, 1], share[-1, -2]         # the video's ends are not seams
    ramp = min(overlap, (window - 1) // 2)                           # the trapezoid's ramp length
    assert share.diff(dim=1).abs().max() <= 1 / (ramp + 1) + 1e-9   # overlap 0: hard cuts (step 1)


def test_blend_weights_trapezoid():
    starts, w = blend_weights(10, 6, 2)                  # two windows, 0..5 and 4..9, overlap 2
    assert starts == [0, 4]
    torch.testing.assert_close(w[0], torch.tensor([1, 1, 1, 1, 2 / 3, 1 / 3], dtype=torch.float64))
    torch.testing.assert_close(w[1], torch.tensor([1 / 3, 2 / 3, 1, 1, 1, 1], dtype=torch.float64))
    starts, w = blend_weights(9, 3, 0)
    assert starts == [0, 3, 6] and torch.all(w == 1)


def test_windowed_errors():
    v = torch.randn(1, 3, 8, 2, 2)
    for window, overlap in [(4, 4), (4, 5), (0, 0), (4, -1)]:
        with pytest.raises(ValueError, match="0 <= overlap < window"):
            windowed(lambda c: c, v, window, overlap)
    with pytest.raises(ValueError, match="returned 3 frames for a 4-frame window"):
        windowed(lambda c: c[:, :, :3], v, 4, 1)


def test_groups_zero_normalises_only_the_attention_inputs(monkeypatch):
    """unet.groups=0: no GroupNorm in the res-blocks nor before the output conv (flat-colour frames
    keep their colours); the temporal and cross attention inputs still get one-group norms."""
    seen = []
    real = unet_mod.group_norm_silu
    monkeypatch.setattr(unet_mod, "group_norm_silu", lambda x, g, *a, **k: seen.append(g) or real(x, g, *a, **k))
    net = VideoUNet(tiny_cfg(groups=0))
    x, t, cond = inputs()
    assert net(x, t, cond).shape == x.shape
    n_attn = sum(isinstance(m, (unet_mod.TemporalAttention, unet_mod.CrossAttention)) for m in net.modules())
    assert seen == [1] * n_attn and n_attn > 0
