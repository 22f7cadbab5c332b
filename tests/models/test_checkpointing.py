"""Activation checkpointing (dit.checkpoint, unet.checkpoint): the same outputs and parameter
gradients as without it, fewer bytes saved for the backward."""
import copy
import dataclasses

import pytest
import torch

from cascade.models.dit import VideoDiT
from cascade.models.unet import VideoUNet
from tests.models import test_dit, test_unet

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves for the backward while fn() runs."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total[0]


def run(net, x, t, cond):
    net.zero_grad(set_to_none=True)
    y, nbytes = saved_bytes(lambda: net(x, t, cond))
    (y.square().mean() + y.mean()).backward()
    return y.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}, nbytes


def compare(plain, ckpt, x, t, cond):
    y0, g0, b0 = run(plain, x, t, cond)
    y1, g1, b1 = run(ckpt, x, t, cond)
    torch.testing.assert_close(y1, y0, rtol=0, atol=0)
    assert g0.keys() == g1.keys() and len(g0) == len(list(plain.parameters()))
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-6, atol=1e-7, msg=k)
    return b0, b1


@pytest.mark.parametrize("attention", ["factorised", "full"])
def test_dit_checkpoint_same_outputs_and_grads(attention):
    torch.manual_seed(0)
    plain = VideoDiT(test_dit.tiny_cfg(attention=attention, depth=3))
    test_dit.randomize_zero_init(plain)
    ckpt = copy.deepcopy(plain)
    ckpt.cfg = dataclasses.replace(plain.cfg, checkpoint=True)
    x, t, cond = torch.randn(2, 4, 4, 6, 6), torch.rand(2), test_dit.cond()
    b0, b1 = compare(plain, ckpt, x, t, cond)
    assert b1 < 0.5 * b0, (b0, b1)                       # only each block's inputs are kept
    with torch.no_grad():                                # inference is not affected
        torch.testing.assert_close(ckpt(x, t, cond), plain(x, t, cond), rtol=0, atol=0)


def test_unet_checkpoint_same_outputs_and_grads():
    torch.manual_seed(0)
    plain = VideoUNet(test_unet.tiny_cfg())
    test_unet.randomize_zero_init(plain)
    ckpt = copy.deepcopy(plain)
    for m in ckpt.modules():
        if hasattr(m, "checkpoint") and isinstance(m.checkpoint, bool):
            m.checkpoint = True
    assert VideoUNet(test_unet.tiny_cfg(checkpoint=True)).down[0].res[0].checkpoint
    x, t, cond = test_unet.inputs(B=2, T=3)
    b0, b1 = compare(plain, ckpt, x, t, cond)
    assert b1 < 0.8 * b0, (b0, b1)
