import pytest
import torch

import kernels.attention as attention
from cascade.config import ConfigError, DiTConfig, load_config
from cascade.models import dit as dit_mod
from cascade.models.dit import Rope3D, RopeQKV, VideoDiT
from cascade.models.layers import gated_linear
from cascade.registry import DIT_SIZES

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]


def tiny_cfg(**kw):
    base = dict(hidden=48, depth=2, heads=3, text_dim=16, frames=4, height=6, width=6)
    base.update(kw)
    return DiTConfig(**base)


def cond(B=2, L=5, D=16, empty_row=True):
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, 3:] = False
    if empty_row:
        mask[-1] = False                       # a fully dropped prompt: only the null token is seen
    return dict(text=torch.randn(B, L, D), text_mask=mask, pooled=torch.randn(B, D))


def randomize_zero_init(m):
    """Give the adaLN-Zero / zero-init layers weights, so every path is exercised."""
    torch.manual_seed(1)
    for p in m.parameters():
        if p.abs().sum() == 0:
            p.data.normal_(0, 0.05)


@pytest.mark.parametrize("attention_mode", ["factorised", "full", "hybrid", "global"])
@pytest.mark.parametrize("pos", ["rope", "sincos"])
def test_shapes_and_zero_init(attention_mode, pos):
    m = VideoDiT(tiny_cfg(attention=attention_mode, pos=pos))
    x = torch.randn(2, 4, 4, 6, 6)
    y = m(x, torch.rand(2), cond())
    assert y.shape == x.shape
    assert torch.all(y == 0)                   # adaLN-Zero: the output layer starts at zero
    randomize_zero_init(m)
    y = m(x, torch.rand(2), cond())
    assert torch.isfinite(y).all() and y.abs().sum() > 0


def test_other_sizes_than_trained():
    m = VideoDiT(tiny_cfg(patch_t=1))
    randomize_zero_init(m)
    x = torch.randn(1, 4, 3, 10, 4)            # positions are computed per call
    assert m(x, torch.rand(1), cond(B=1, empty_row=False)).shape == x.shape


def test_patch_divisibility_error():
    m = VideoDiT(tiny_cfg())
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        m(torch.randn(1, 4, 4, 7, 6), torch.rand(1), cond(B=1))


def test_config_rejects_indivisible_latent():
    with pytest.raises(ConfigError, match="not divisible by the patch size"):
        load_config(REPO / "configs/tiny/base.yaml", ["dit.height=7"])


def test_text_and_time_change_output():
    m = VideoDiT(tiny_cfg())
    randomize_zero_init(m)
    x, t, c = torch.randn(2, 4, 4, 6, 6), torch.rand(2), cond(empty_row=False)
    y = m(x, t, c)
    c2 = dict(c, text=torch.randn_like(c["text"]))
    assert not torch.allclose(m(x, t, c2), y)
    assert not torch.allclose(m(x, t + 0.3, c), y)


def test_models_call_the_kernel_functions(monkeypatch):
    calls = []
    real_st, real_x = attention.spacetime_attention, attention.cross_attention
    monkeypatch.setattr(dit_mod, "spacetime_attention",
                        lambda *a, **k: calls.append(k.get("mode")) or real_st(*a, **k))
    monkeypatch.setattr(dit_mod, "cross_attention", lambda *a, **k: calls.append("cross") or real_x(*a, **k))
    m = VideoDiT(tiny_cfg(depth=1))
    m(torch.randn(1, 4, 4, 6, 6), torch.rand(1), cond(B=1))
    assert calls == ["spatial", "temporal", "cross"]


def test_spatial_attention_is_within_frame():
    """A factorised model without temporal mixing paths (depth 1, temporal gate zero) keeps
    frames independent: changing frame 0 leaves the other frames' outputs unchanged."""
    m = VideoDiT(tiny_cfg(depth=1))
    randomize_zero_init(m)
    blk = m.blocks[0]
    with torch.no_grad():                       # zero the temporal branch's gate (chunk 5 of 9)
        C = m.cfg.hidden
        blk.ada[-1].weight[5 * C:6 * C] = 0
        blk.ada[-1].bias[5 * C:6 * C] = 0
    x, t, c = torch.randn(1, 4, 4, 6, 6), torch.rand(1), cond(B=1)
    y = m(x, t, c)
    x2 = x.clone()
    x2[:, :, 0] += 1
    y2 = m(x2, t, c)
    assert not torch.allclose(y[:, :, 0], y2[:, :, 0])
    torch.testing.assert_close(y[:, :, 1:], y2[:, :, 1:])


def test_hybrid_takes_factorised_weights_and_mixes_frames_in_its_first_attention():
    """dit.attention=hybrid has the factorised model's parameters (same state dict), and with the
    temporal gate zeroed its first attention still carries frame 0 to the other frames, which a
    factorised model's spatial attention cannot (test above)."""
    fact = VideoDiT(tiny_cfg(depth=1))
    randomize_zero_init(fact)
    hyb = VideoDiT(tiny_cfg(depth=1, attention="hybrid"))
    hyb.load_state_dict(fact.state_dict())                 # strict: same keys, same shapes
    with torch.no_grad():
        C = hyb.cfg.hidden
        hyb.blocks[0].ada[-1].weight[5 * C:6 * C] = 0
        hyb.blocks[0].ada[-1].bias[5 * C:6 * C] = 0
    x, t, c = torch.randn(1, 4, 4, 6, 6), torch.rand(1), cond(B=1)
    x2 = x.clone()
    x2[:, :, 0] += 1
    assert not torch.allclose(hyb(x, t, c)[:, :, 1:], hyb(x2, t, c)[:, :, 1:])


def test_rope_scale_interpolates_positions():
    """dit.rope_scale s: the phases at position p are those of position s * p at scale 1 (position
    interpolation), so scale 0.5 at (t, h, w) = (2, 2, 2) equals scale 1 at (1, 1, 1); a bad scale
    is one line."""
    half, full = Rope3D(24, scale=0.5).phases(3, 3, 3, "cpu"), Rope3D(24).phases(3, 3, 3, "cpu")
    torch.testing.assert_close(half[2, 2 * 3 + 2], full[1, 1 * 3 + 1])
    with pytest.raises(ValueError, match="dit.rope_scale"):
        Rope3D(24, scale=0.0)


def test_rope_is_relative():
    """RoPE: <R(p) q, R(p') k> depends only on p - p' (RoFormer eq. 16)."""
    rope = Rope3D(24)
    ang = rope.phases(5, 4, 4, "cpu")                                   # (T, S, D/2)
    q = torch.randn(24).expand(1, 5, 16, 1, 24)
    k = torch.randn(24).expand(1, 5, 16, 1, 24)
    rq, rk = rope(q, ang)[0, :, :, 0], rope(k, ang)[0, :, :, 0]          # (T, S, D)
    # token (t=1, h=1, w=1) vs (t=0, h=0, w=0), and (t=3, h=2, w=3) vs (t=2, h=1, w=2)
    a = (rq[1, 1 * 4 + 1] * rk[0, 0]).sum()
    b = (rq[3, 2 * 4 + 3] * rk[2, 1 * 4 + 2]).sum()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    c = (rq[3, 2 * 4 + 3] * rk[1, 1 * 4 + 2]).sum()                      # a different offset
    assert not torch.allclose(a, c)


def block_params(C, mlp=4):
    attn = 4 * C * C + 4 * C                                              # qkv + proj
    cross = 4 * C * C + 4 * C + 2 * C                                     # q, kv, proj, its LayerNorm
    mlp_p = 2 * mlp * C * C + mlp * C + C
    return attn, cross, mlp_p


@pytest.mark.parametrize("size", list(DIT_SIZES))
def test_size_registry_param_counts_on_meta(size):
    """The registry's models, built on the meta device, have the parameter count the formula gives."""
    s = DIT_SIZES[size]
    cfg = DiTConfig(size=size, **s, in_channels=8, frames=5, height=32, width=32, text_dim=384)
    with torch.device("meta"):
        m = VideoDiT(cfg)
    n = sum(p.numel() for p in m.parameters())
    C, L, Dt, p = s["hidden"], s["depth"], 384, 8 * 1 * 2 * 2
    attn, cross, mlp_p = block_params(C)
    block = 2 * attn + cross + mlp_p + (C * 9 * C + 9 * C)
    expect = (L * block + (p * C + C) + (256 * C + C + C * C + C) + (Dt * C + C)
              + (Dt * C + C + C * C + C) + C + (C * 2 * C + 2 * C) + (C * p + p))
    assert n == expect
    assert m.blocks[0].attn.qkv.weight.device.type == "meta"


def test_gpu_scale_config_builds_on_meta():
    cfg = load_config(REPO / "configs/gpu256/base.yaml")
    assert (cfg.dit.hidden, cfg.dit.depth, cfg.dit.heads) == (1152, 28, 16)
    with torch.device("meta"):
        m = VideoDiT(cfg.dit)
    n = sum(p.numel() for p in m.parameters())
    assert 0.9e9 < n < 1.2e9, n                  # DiT-XL/2 (675 M) + temporal attention + cross-attention


def test_rope_qkv_and_gated_linear_match_plain_autograd():
    """The hand-written backwards (RopeQKV, GatedLinear) give the outputs and gradients of the plain ops."""
    g = torch.Generator().manual_seed(0)
    B, T, S, h, d = 2, 3, 5, 2, 12
    rope = Rope3D(d)
    phases = rope.phases(T, 1, S, "cpu")                                 # (T, S, d/2)
    qkv = torch.randn(B, T, S, 3, h, d, generator=g, requires_grad=True)
    w = torch.randn(3, B, T, S, h, d, generator=g)
    # gradients arrive contiguous, or strided as from temporal attention's (b s) h t d layout
    for perm in ((0, 1, 2, 3, 4), (0, 2, 3, 1, 4)):
        wp = [w[i].permute(perm).contiguous() for i in range(3)]       # dq = wp permuted back
        loss = lambda q, k, v: sum((t.permute(perm) * wp[i]).sum()  # noqa: E731
                                   for i, t in enumerate((q, k, v)))
        loss(*RopeQKV.apply(qkv, phases, 0.3)).backward()                 # q pre-scaled by 0.3
        ours, qkv.grad = qkv.grad, None
        loss(rope(qkv[:, :, :, 0], phases) * 0.3, rope(qkv[:, :, :, 1], phases),
             qkv[:, :, :, 2]).backward()
        torch.testing.assert_close(ours, qkv.grad)
        qkv.grad = None

    x = torch.randn(B, T, S, 8, generator=g, requires_grad=True)
    o = torch.randn(B, T, S, 6, generator=g, requires_grad=True)
    gate = torch.randn(B, 8, generator=g, requires_grad=True)
    lin = torch.nn.Linear(6, 8)
    grad = torch.randn(B, T, S, 8, generator=g)
    leaves = (x, gate, o, lin.weight, lin.bias)
    out = gated_linear(x, gate, o, lin)
    out.backward(grad)
    ours = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    ref = x + gate[:, None, None] * lin(o)
    ref.backward(grad)
    torch.testing.assert_close(out, ref)
    for a, t in zip(ours, leaves):
        torch.testing.assert_close(a, t.grad)


def test_attention_text_pool_reaches_adaln():
    """dit.text_pool=attention: one token's change moves the time embedding (adaLN) even with the
    pooled vector and the cross-attention held fixed; masked tokens do not count."""
    m = VideoDiT(tiny_cfg(text_pool="attention"))
    assert VideoDiT(tiny_cfg()).text_pool is None
    c = cond(empty_row=False)
    text = m.text_proj(c["text"])                                       # (B, L, C)
    mask = c["text_mask"]
    a = m.text_pool(text, mask)                                          # (B, C)
    changed = text.clone()
    changed[:, 1] += 1.0                                                 # a visible token
    assert not torch.allclose(m.text_pool(changed, mask), a)
    hidden = text.clone()
    hidden[0, 4] += 1.0                                                  # masked in row 0
    torch.testing.assert_close(m.text_pool(hidden, mask)[0], a[0])
    with pytest.raises(ValueError, match="text_pool"):
        VideoDiT(tiny_cfg(text_pool="max"))


def test_frame_pos_starts_as_the_model_without_it_and_knows_the_borders():
    """dit.frame_pos: zero-initialised (a model without it loads into one with it and gives the
    same output); once trained, the same content at another place in the frame gives another
    output (RoPE alone is blind to where the borders are); fractional, so any frame size works."""
    torch.manual_seed(0)
    plain = VideoDiT(tiny_cfg())
    randomize_zero_init(plain)
    grown = VideoDiT(tiny_cfg(frame_pos=True))
    state, names = grown.grow_state(plain.state_dict())
    grown.load_state_dict(state)
    assert names == grown.zero_init_keys() == ["frame_pos.proj.weight", "frame_pos.proj.bias"]
    x, t, c = torch.zeros(1, 4, 4, 6, 6), torch.full((1,), 0.5), cond(B=1, empty_row=False)
    x[..., 0:2, 0:2] = 1.0                                         # a blob in the top-left patch
    moved = torch.roll(x, shifts=(2, 2), dims=(3, 4))              # the same blob one patch over
    assert torch.equal(grown(x, t, c), plain(x, t, c))
    grown.frame_pos.proj.weight.data.normal_(0, 0.5)
    a, b = grown(x, t, c), grown(moved, t, c)
    assert not torch.allclose(torch.roll(a, (2, 2), (3, 4)), b, atol=1e-4)
    assert grown.frame_pos(3, 5, "cpu").shape == (15, 48)          # any frame size


def test_global_attention_starts_as_the_factorised_model():
    """dit.attention=global: a factorised export grown into it (its spatial attention copied into
    each block's global one, whose adaLN rows start at zero) gives the same output to the bit;
    once the global layer's gate opens, the output changes."""
    torch.manual_seed(0)
    plain = VideoDiT(tiny_cfg())
    randomize_zero_init(plain)
    grown = VideoDiT(tiny_cfg(attention="global"))
    state, names = grown.grow_state(plain.state_dict())
    grown.load_state_dict(state)
    assert "blocks.1.glob.qkv.weight" in names and "blocks.1.ada.1.weight (3 x 48 rows)" in names
    torch.testing.assert_close(grown.blocks[1].glob.qkv.weight, plain.blocks[1].attn.qkv.weight)
    x, t, c = torch.randn(1, 4, 4, 6, 6), torch.full((1,), 0.5), cond(B=1, empty_row=False)
    assert torch.equal(grown(x, t, c), plain(x, t, c))
    grown.blocks[0].ada[-1].bias.data[-3 * 48:].normal_(0, 0.5)     # the global layer's gate opens
    assert not torch.allclose(grown(x, t, c), plain(x, t, c), atol=1e-3)
