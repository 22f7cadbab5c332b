"""The VAE and the SR U-Net through the Triton kernels (interpreter on CPU) against the PyTorch
reference path, and a short VAE training run through the kernels.

Both models call only the public kernel functions, and CASCADE_KERNELS picks their implementation
at call time (kernels/dispatch.py), so one model instance is run twice from the same weights:
CASCADE_KERNELS=torch, then CASCADE_KERNELS=triton. The kernels' launchers are wrapped by counting
spies (the autograd Functions look them up as module globals at call time), which proves that
every conv, norm and attention of the model ran in Triton, forward and backward, and that none
ran under the torch setting.

Cost. The interpreter pays per executed tl operation, not per element: a 3x3x3 conv3d costs about
the same at 8x8 as at 4x4 pixels (one 256-position tile), and the group norm pays per (frame,
group). Shapes are therefore as small as still exercises every path (odd T through the causal
temporal down/upsampling, several groups per norm, padded text), and the interpreter's integer
overflow sanitizer (a per-add/mul debugging check that compiled GPU kernels do not run; it doubles
the interpreter's time here) is switched off for this module; tests/kernels/ keep it on.
"""
import collections
import dataclasses

import pytest
import torch

import kernels.attention as k_attention
import kernels.conv2plus1d as k_conv2plus1d
import kernels.conv3d as k_conv3d
import kernels.group_norm_silu as k_gn
from cascade.config import UNetConfig, VAEConfig
from cascade.data.synthetic import SyntheticVideos
from cascade.models import unet as unet_mod
from cascade.models import vae as vae_mod
from cascade.models.unet import VideoUNet
from cascade.models.vae import VideoVAE
from kernels.dispatch import interpreting

# CPU tensors through Triton need the interpreter (tests/conftest.py turns it on where no GPU is)
pytestmark = pytest.mark.skipif(not interpreting(), reason="needs TRITON_INTERPRET=1 (CPU tensors)")

TOL = dict(rtol=1e-4, atol=1e-5)  # fp32; the interpreter's dots are IEEE fp32


@pytest.fixture(autouse=True, scope="module")
def fast_interpreter():
    """One torch thread (these tensors are tiny; a second thread only adds synchronisation on the
    shared 2-core machine) and no integer-overflow sanitizer in Triton's interpreter."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    builder, options = None, None
    try:
        import triton.runtime.interpreter as interp
        builder = interp.interpreter_builder
        options = builder.options
        builder.options = dataclasses.replace(options, sanitize_overflow=False)
    except (ImportError, AttributeError, TypeError):  # another Triton: keep its defaults
        builder = None
    yield
    if builder is not None:
        builder.options = options
    torch.set_num_threads(n)


# (module, launcher) pairs: the functions the autograd Functions call for every launch
LAUNCHERS = [
    (k_conv3d, "_conv3d_fwd"), (k_conv3d, "_conv3d_bwd_dx"), (k_conv3d, "_conv3d_bwd_dw"),
    (k_conv2plus1d, "_conv2plus1d_fwd_fused"), (k_conv2plus1d, "_conv3d_fwd"),
    (k_conv2plus1d, "_conv3d_bwd_dx"), (k_conv2plus1d, "_conv3d_bwd_dw"),
    (k_gn, "_gn_fwd"), (k_gn, "_gn_bwd"),
    (k_attention, "_attn_fwd"), (k_attention, "_attn_bwd"),
]


def spy_launchers(monkeypatch):
    """Wrap every launcher; returns a Counter of "module.launcher" (attention: ":kind" added)."""
    calls = collections.Counter()
    for mod, name in LAUNCHERS:
        real = getattr(mod, name)
        key = f"{mod.__name__.split('.')[-1]}.{name}"

        def spy(*a, _real=real, _key=key, **k):
            kind = getattr(a[-1], "kind", None) if _key.startswith("attention") else None
            calls[_key if kind is None else f"{_key}:{kind}"] += 1
            return _real(*a, **k)
        monkeypatch.setattr(mod, name, spy)
    return calls


def count(model, cls):
    return sum(isinstance(m, cls) for m in model.modules())


def run(model, x, forward):
    """forward(model, x) -> tuple of outputs; backward of a fixed random projection of them, each
    weight divided by sqrt(numel) so that parameter gradients are O(1) and atol 1e-5 stays about
    1e-5 of their scale -> (outputs, dx, {name: grad})."""
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    outs = forward(model, x)
    g = torch.Generator().manual_seed(2)
    sum((o * torch.randn(o.shape, generator=g)).sum() / o.numel() ** 0.5 for o in outs).backward()
    return ([o.detach() for o in outs], x.grad,
            {n: p.grad.clone() for n, p in model.named_parameters()})


def assert_match(ref, got):
    (y_ref, dx_ref, g_ref), (y, dx, g) = ref, got
    for a, b in zip(y, y_ref):
        torch.testing.assert_close(a, b, **TOL)
    torch.testing.assert_close(dx, dx_ref, **TOL)
    assert g.keys() == g_ref.keys()
    for name in g_ref:
        assert g_ref[name].abs().sum() > 0, name  # every parameter is on a live path
        torch.testing.assert_close(g[name], g_ref[name], **TOL, msg=lambda s, n=name: f"{n}: {s}")


# ----------------------------------------------------------------------------------------------
# VAE
# ----------------------------------------------------------------------------------------------

def tiny_vae(**kw):
    torch.manual_seed(0)
    cfg = dict(channels=4, channel_mults=[1, 2], temporal_down=[True], num_res_blocks=0,
               latent_channels=4, groups=2, lpips_weight=0.0, lpips_pretrained=False)
    cfg.update(kw)
    return VideoVAE(VAEConfig(**cfg))


def vae_forward(m, x):
    post = m.encode(x)
    return post.mean, post.logvar, m.decode(post.mean)


def test_vae_triton_kernels_match_reference(monkeypatch):
    m = tiny_vae()
    x = torch.rand(1, 3, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1  # odd T
    calls = spy_launchers(monkeypatch)

    monkeypatch.setenv("CASCADE_KERNELS", "torch")
    ref = run(m, x, vae_forward)
    assert not calls                                     # the reference path launched nothing

    monkeypatch.setenv("CASCADE_KERNELS", "triton")
    got = run(m, x, vae_forward)
    n_conv, n_norm = count(m, vae_mod.CausalConv3d), count(m, vae_mod.GroupNormSiLU)
    n_attn = count(m, vae_mod.FrameAttention)
    assert min(n_conv, n_norm, n_attn) > 0
    assert calls == {                                    # every layer ran in Triton, both ways
        "conv3d._conv3d_fwd": n_conv, "conv3d._conv3d_bwd_dx": n_conv,
        "conv3d._conv3d_bwd_dw": n_conv, "group_norm_silu._gn_fwd": n_norm,
        "group_norm_silu._gn_bwd": n_norm, "attention._attn_fwd:spatial": n_attn,
        "attention._attn_bwd:spatial": n_attn}, calls
    assert got[0][2].shape == x.shape and got[0][0].shape == (1, 4, 2, 4, 4)
    assert_match(ref, got)


def training_run(m, x, steps=6, lr=1e-2):
    """Adam on the L1 reconstruction of the posterior mean -> the loss at each step."""
    opt = torch.optim.Adam(m.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = (m.decode(m.encode(x).mean) - x).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_vae_training_through_triton_kernels_matches_reference(monkeypatch):
    x = SyntheticVideos(3, 8, 8, seed=0)[0]["video"][None]          # (1, 3, 3, 8, 8), odd T
    calls = spy_launchers(monkeypatch)
    curves, models = {}, {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("CASCADE_KERNELS", backend)
        models[backend] = tiny_vae()                                 # the same init (seeded)
        curves[backend] = training_run(models[backend], x)
        if backend == "torch":
            assert not calls
    m = models["triton"]                                 # every step ran every layer in Triton
    n_conv, n_norm = count(m, vae_mod.CausalConv3d), count(m, vae_mod.GroupNormSiLU)
    assert calls["conv3d._conv3d_fwd"] == calls["conv3d._conv3d_bwd_dw"] == 6 * n_conv
    assert calls["group_norm_silu._gn_fwd"] == calls["group_norm_silu._gn_bwd"] == 6 * n_norm
    assert calls["attention._attn_bwd:spatial"] == 6 * count(m, vae_mod.FrameAttention)
    for name, losses in curves.items():
        assert losses[-1] < 0.8 * losses[0], (name, losses)
    torch.testing.assert_close(torch.tensor(curves["triton"]), torch.tensor(curves["torch"]),
                               rtol=1e-4, atol=0.0, msg=lambda s: f"{s}\n{curves}")
    # and so do the weights after the sixth update, as one vector of updates: single weights whose
    # gradient is near 0 by cancellation get Adam steps of up to lr from fp32 noise, and the
    # attention's key bias is left out (softmax is shift-invariant along the keys: its gradient
    # is 0 up to that noise, so it moves by +-lr either way; the loss does not see it)
    def updates(m):
        init = dict(tiny_vae().named_parameters())
        out = []
        for name, p in m.named_parameters():
            d = (p - init[name]).detach()
            out.append((d.view(3, -1)[[0, 2]] if name.endswith("qkv.bias") else d).flatten())
        return torch.cat(out)
    got, want = updates(models["triton"]), updates(models["torch"])
    assert (got - want).norm() <= 1e-4 * want.norm(), ((got - want).norm(), want.norm())


# ----------------------------------------------------------------------------------------------
# SR U-Net
# ----------------------------------------------------------------------------------------------

def tiny_unet():
    torch.manual_seed(0)
    m = VideoUNet(UNetConfig(channels=8, channel_mults=[1, 2], attn_levels=[1], heads=2,
                             text_dim=16, groups=2))
    torch.manual_seed(1)
    for p in m.parameters():                             # give the zero-init layers weights
        if p.abs().sum() == 0:
            p.data.normal_(0, 0.1)
    return m


def unet_inputs(B=1, T=3, H=4, W=4, L=5, D=16):
    g = torch.Generator().manual_seed(3)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[:, 3:] = False                                  # padding (the null token stays visible)
    cond = dict(text=torch.randn(B, L, D, generator=g), text_mask=mask,
                pooled=torch.randn(B, D, generator=g), lowres=torch.randn(B, 3, T, H, W, generator=g),
                aug_t=torch.rand(B, generator=g))
    return torch.randn(B, 3, T, H, W, generator=g), torch.rand(B, generator=g), cond


def test_unet_triton_kernels_match_reference(monkeypatch):
    m = tiny_unet()
    x, t, cond = unet_inputs()
    forward = lambda m, x: (m(x, t, cond),)              # noqa: E731
    calls = spy_launchers(monkeypatch)

    monkeypatch.setenv("CASCADE_KERNELS", "torch")
    ref = run(m, x, forward)
    assert not calls

    monkeypatch.setenv("CASCADE_KERNELS", "triton")
    got = run(m, x, forward)
    n_conv, n_c21 = count(m, unet_mod.Conv), count(m, unet_mod.Conv2plus1d)
    n_norm, n_tmp = count(m, unet_mod.Norm), count(m, unet_mod.TemporalAttention)
    n_cross = count(m, unet_mod.CrossAttention)
    assert min(n_conv, n_c21, n_norm, n_tmp, n_cross) > 0
    # Conv2plus1d: fused forward (h stays on chip); the backward recomputes h with one conv3d
    # launch, then dW of the temporal and the spatial conv, dh and dx (x requires grad here)
    assert calls == {
        "conv3d._conv3d_fwd": n_conv, "conv3d._conv3d_bwd_dx": n_conv,
        "conv3d._conv3d_bwd_dw": n_conv,
        "conv2plus1d._conv2plus1d_fwd_fused": n_c21, "conv2plus1d._conv3d_fwd": n_c21,
        "conv2plus1d._conv3d_bwd_dx": 2 * n_c21, "conv2plus1d._conv3d_bwd_dw": 2 * n_c21,
        "group_norm_silu._gn_fwd": n_norm, "group_norm_silu._gn_bwd": n_norm,
        "attention._attn_fwd:temporal": n_tmp, "attention._attn_bwd:temporal": n_tmp,
        "attention._attn_fwd:cross": n_cross, "attention._attn_bwd:cross": n_cross}, calls
    assert got[0][0].shape == x.shape
    assert_match(ref, got)
