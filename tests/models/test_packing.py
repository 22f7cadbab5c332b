"""NaViT packing in the DiT: clips of different shapes in rows of one sequence give what each
clip gives alone, no token sees another clip, and the packed loss and gradients are those of
the clips run one by one."""
from pathlib import Path

import pytest
import torch

from cascade.config import load_config
from cascade.diffusion import Diffusion
from cascade.models.dit import VideoDiT
from cascade.models.packing import PackedLayout, first_fit

REPO = Path(__file__).resolve().parents[2]
SHAPES = [(8, 4, 8, 8), (8, 2, 8, 12), (8, 4, 12, 8), (8, 1, 8, 8)]   # latents: 64, 48, 96, 16 tokens
ROW = 120                                                             # 2 rows, 8 padding tokens each

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


def tiny(attention="factorised", extra=()):
    cfg = load_config(REPO / "configs/tiny/base.yaml", [
        "dit.hidden=32", "dit.depth=2", "dit.heads=2", "dit.text_dim=16", "dit.frames=4",
        f"dit.attention={attention}", "dit.frame_pos=true", "diffusion.motion_weight=2.0", *extra])
    torch.manual_seed(0)
    net = VideoDiT(cfg.dit)
    for p in net.parameters():                       # give the zero-initialised layers weights
        if p.abs().sum() == 0:
            p.data.normal_(0, 0.05)
    return cfg, net


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(s, generator=g) for s in SHAPES]
    n = len(xs)
    cond = {"text": torch.randn(n, 5, 16, generator=g), "pooled": torch.randn(n, 16, generator=g),
            "text_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]])}
    return xs, torch.rand(n, generator=g), cond


def one(cond, i):
    return {k: v[i:i + 1] for k, v in cond.items()}


def test_first_fit_rows_and_layout():
    assert first_fit([64, 48, 96, 16], 120) == [[2, 3], [0, 1]]
    lay = PackedLayout([(4, 4, 4), (2, 4, 6), (4, 6, 4), (1, 4, 4)], ROW)
    assert lay.total == 240 and int(lay.real.sum()) == 224
    assert lay.cu["spatial"][-1] == lay.cu["temporal"][-1] == lay.cu["full"][-1] == 240
    assert sorted(lay.t_perm.tolist()) == list(range(240))
    with pytest.raises(ValueError, match="a clip of 96 tokens does not fit a row of 64"):
        first_fit([64, 96], 64)


@pytest.mark.parametrize("attention", ["factorised", "hybrid", "full"])
def test_packed_equals_each_clip_alone_and_never_leaks(attention):
    _, net = tiny(attention)
    xs, t, cond = inputs()
    with torch.no_grad():
        packed = net.forward_packed(xs, t, cond, ROW)
        for i, x in enumerate(xs):
            alone = net(x[None], t[i:i + 1], one(cond, i))[0]
            torch.testing.assert_close(packed[i], alone, rtol=1e-4, atol=1e-5)
        changed = [x.clone() for x in xs]
        changed[0] = torch.randn_like(changed[0]) * 3                       # clip 0 shares row 2 with 1
        cond2 = {k: v.clone() for k, v in cond.items()}
        cond2["text"][0] += 1.0
        again = net.forward_packed(changed, t, cond2, ROW)
    assert not torch.allclose(again[0], packed[0])
    for i in (1, 2, 3):                                                    # no other clip moved at all
        torch.testing.assert_close(again[i], packed[i], rtol=0, atol=1e-6)


def test_packed_loss_and_gradients_equal_the_clips_one_by_one():
    cfg, net = tiny("factorised")
    diff = Diffusion(cfg.diffusion)
    xs, t, cond = inputs(2)
    g = torch.Generator().manual_seed(3)
    noises = [torch.randn(x.shape, generator=g) for x in xs]
    loss = diff.packed_loss(net, xs, cond, t, noises, ROW)
    loss.backward()
    packed_grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad()
    ref = sum(diff.loss(net, x[None], one(cond, i), t=t[i:i + 1], noise=noises[i][None])
              for i, x in enumerate(xs)) / len(xs)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for n, p in net.named_parameters():
        torch.testing.assert_close(packed_grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


# ----------------------------------------------------------------------------- window attention

def test_window_covering_everything_is_spatial_then_full_attention():
    """W.A.L.T windows: windows wider than the grid are clipped to it, so the window model equals
    the same weights run with spatial, then full spacetime attention."""
    _, win = tiny("window", ["dit.window_spatial=[64,64]", "dit.window_spacetime=[64,64,64]"])
    _, ref = tiny("factorised")
    ref.load_state_dict(win.state_dict())
    for blk in ref.blocks:
        blk.first_mode, blk.second_mode = "spatial", "full"
    xs, t, cond = inputs()
    with torch.no_grad():
        for i in (0, 2):
            torch.testing.assert_close(win(xs[i][None], t[i:i + 1], one(cond, i)),
                                       ref(xs[i][None], t[i:i + 1], one(cond, i)), rtol=1e-5, atol=1e-6)


def test_window_attention_stays_inside_its_window():
    from cascade.models.dit import window_attention
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 6 * 8, 2, 8, generator=g) for _ in range(3))   # T=4, 6x8 grid
    out = window_attention(q, k, v, (2, 3, 4), (6, 8))
    k2, v2 = k.clone(), v.clone()
    k2[:, :2, :3] += 5.0                            # tokens of window (t<2, y=0, x<3)
    v2[:, :2, :3] -= 5.0
    out2 = window_attention(q, k2, v2, (2, 3, 4), (6, 8))
    moved = (out2 - out).abs().amax(dim=(3, 4)).view(4, 6, 8) > 0
    inside = torch.zeros(4, 6, 8, dtype=torch.bool)
    inside[:2, :3, :4] = True
    assert moved[inside].all() and not moved[~inside].any()
    with pytest.raises(ValueError, match="6x8 token grid is not divisible by the window 1x4x4"):
        window_attention(q[:, :1], k[:, :1], v[:, :1], (1, 4, 4), (6, 8))


def test_window_image_skips_the_spatiotemporal_layer():
    _, net = tiny("window", ["dit.window_spatial=[2,2]", "dit.window_spacetime=[2,2,2]"])
    x, t, cond = torch.randn(1, 8, 1, 8, 8), torch.rand(1), one(inputs()[2], 0)
    with torch.no_grad():
        clip = torch.randn(1, 8, 4, 8, 8)
        before, video = net(x, t, cond), net(clip, t, cond)
        for blk in net.blocks:                      # the temporal layer's weights do not matter
            blk.temporal.qkv.weight.add_(1.0)
        torch.testing.assert_close(net(x, t, cond), before, rtol=0, atol=0)
        assert not torch.allclose(net(clip, t, cond), video)          # a video's does
