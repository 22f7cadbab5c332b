"""The DiT through the Triton kernels (interpreter on CPU) against the PyTorch reference path.

The model calls only the public kernel functions; CASCADE_KERNELS picks their implementation at
call time (kernels/dispatch.py). Odd token grid (3 frames of 3x5 tokens: S = 15), head_dim 24, a
padded text mask and a fully dropped prompt, forward and every parameter gradient.
"""
import pytest
import torch

import kernels.attention as attention
from cascade.config import DiTConfig
from cascade.models.dit import VideoDiT
from kernels.dispatch import interpreting

pytestmark = pytest.mark.skipif(not interpreting(), reason="needs TRITON_INTERPRET=1 (CPU tensors)")


def tiny_model(attention_mode):
    torch.manual_seed(0)
    cfg = DiTConfig(hidden=72, depth=1, heads=3, text_dim=16, in_channels=4, frames=3, height=6,
                    width=10, patch_t=1, patch_h=2, patch_w=2, attention=attention_mode)
    m = VideoDiT(cfg)
    for p in m.parameters():                    # give the adaLN-Zero / zero-init layers weights
        if p.abs().sum() == 0:
            p.data.normal_(0, 0.05)
    return m


def inputs(B=2, L=5, D=16):
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, 3:] = False                         # padding
    mask[1] = False                             # a dropped prompt: only the null token is visible
    cond = dict(text=torch.randn(B, L, D, generator=g), text_mask=mask, pooled=torch.randn(B, D, generator=g))
    x = torch.randn(B, 4, 3, 6, 10, generator=g)   # frames 3, latent 6x10, patch 2 -> 3 x 15 tokens
    return x, torch.rand(B, generator=g), cond


def run(m, x, t, cond):
    """Forward, then backward of a fixed random projection of the output -> (y, dx, {name: grad})."""
    m.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y = m(x, t, cond)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    (y * w).sum().backward()
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in m.named_parameters()}


@pytest.mark.parametrize("attention_mode", ["factorised", "full"])
def test_dit_triton_kernels_match_reference(attention_mode, monkeypatch):
    m = tiny_model(attention_mode)
    x, t, cond = inputs()

    monkeypatch.setenv("CASCADE_KERNELS", "torch")
    y_ref, dx_ref, g_ref = run(m, x, t, cond)

    monkeypatch.setenv("CASCADE_KERNELS", "triton")
    launches = []                                     # prove the flash kernels ran, not the reference
    for name in ("_attn_fwd", "_attn_bwd"):
        real = getattr(attention, name)                # its last argument is the _Problem
        spy = lambda *a, _f=real, _n=name, **k: launches.append((_n, a[-1].kind)) or _f(*a, **k)  # noqa: E731
        monkeypatch.setattr(attention, name, spy)
    y, dx, g = run(m, x, t, cond)

    kinds = {"factorised": {"spatial", "temporal", "cross"}, "full": {"full", "cross"}}[attention_mode]
    assert {k for n, k in launches if n == "_attn_fwd"} == kinds
    assert {k for n, k in launches if n == "_attn_bwd"} == kinds
    tol = dict(rtol=1e-4, atol=1e-5)                  # fp32; the interpreter's dots are IEEE fp32
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(dx, dx_ref, **tol)
    assert g.keys() == g_ref.keys()
    for name in g_ref:
        assert g_ref[name].abs().sum() > 0, name      # every parameter is on a live path
        torch.testing.assert_close(g[name], g_ref[name], **tol, msg=lambda s, n=name: f"{n}: {s}")
