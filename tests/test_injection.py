"""Attention injection for editing (cascade/injection.py): the source's maps reach every attention
layer of the edit in order, through every guidance branch, only at the steps asked for; given
its own maps the network's output is unchanged; and `Conditions.edit` refuses what cannot work
in one line."""
import pytest
import torch

from cascade.config import DiTConfig, DiffusionConfig
from cascade.diffusion import Diffusion, guided_denoiser, time_grid
from cascade.injection import SourceAttention
from cascade.models.dit import CrossAttention, SelfAttention, VideoDiT

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


def tiny():
    """A tiny DiT with every zero-initialised layer given weights (so each path reaches the output)
    and its conditions: (net, cond, uncond, x (1, 4, 3, 8, 8))."""
    torch.manual_seed(0)
    net = VideoDiT(DiTConfig(in_channels=4, hidden=32, depth=2, heads=2,
                             frames=3, height=8, width=8, text_dim=16)).eval()
    for p in net.parameters():
        if p.abs().sum() == 0:
            p.data.normal_(0, 0.05)
    text = lambda s: {"text": torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(s)),  # noqa: E731
                      "text_mask": torch.ones(1, 5, dtype=torch.bool),
                      "pooled": torch.randn(1, 16, generator=torch.Generator().manual_seed(s + 1))}
    return net, text(1), text(7), torch.randn(1, 4, 3, 8, 8)


def layers(net):
    return sum(isinstance(m, (SelfAttention, CrossAttention)) for m in net.modules())


@torch.no_grad()
def test_own_maps_change_nothing_in_every_guidance_branch():
    """Recorded on (x, cond) at batch 1 and injected into a guided call on the same x (two
    branches batched as 2, both with cond, so that each branch's own maps are the source's):
    the output is the unhooked guided output; injected from another x, it is not."""
    net, cond, _, x = tiny()
    diffusion = Diffusion(DiffusionConfig())
    guided = guided_denoiser(net, cond, cond, 3.0, diffusion)
    source = guided_denoiser(net, cond, None, 1.0, diffusion)
    t = torch.full((1,), 0.7)
    want = guided(x, t)
    inj = SourceAttention(1.0)
    for src_x, same in ((x, True), (torch.randn_like(x), False)):
        with inj.hooked(net):
            inj.mode = "record"
            source(src_x, t)
            assert len(inj.saved) == layers(net) == 3 * 2      # spatial, temporal, cross per block
            inj.mode, inj.i = "inject", 0
            got = guided(x, t)
            assert inj.i == len(inj.saved)                      # every layer took its own maps
        assert torch.allclose(got, want, atol=1e-5) == same
    assert all(m.inject is None for m in net.modules() if hasattr(m, "inject"))   # unhooked after


@torch.no_grad()
def test_self_attention_only_leaves_cross_attention_alone():
    net, cond, _, x = tiny()
    inj = SourceAttention(1.0, cross=False)
    with inj.hooked(net):
        inj.mode = "record"
        net(x, torch.full((1,), 0.5), cond)
        assert len(inj.saved) == 2 * 2 and all(len(s) == 2 for s in inj.saved)


@torch.no_grad()
def test_inversion_records_the_grid_and_sampling_injects_the_first_share():
    """`Diffusion.invert(states=...)` keeps x_t at every time of the sampling grid; `sample(...,
    reference=...)` runs the source at exactly the first round(fraction x steps) of them (noise
    first); fraction 0 is the plain edit."""
    net, cond, uncond, x = tiny()
    diffusion = Diffusion(DiffusionConfig())
    steps = 8
    plain = diffusion.invert(net, x, cond, steps=steps)
    runs = {}
    for fraction in (0.0, 0.5, 1.0):
        ref = SourceAttention(fraction)
        noise = diffusion.invert(net, x, cond, steps=steps, states=ref)
        assert torch.equal(noise, plain)                        # recording changes nothing
        times = sorted((SourceAttention.key(t) for t in time_grid(steps)[:-1]), reverse=True)
        assert sorted(ref.states, reverse=True) == times and ref.cond is cond
        runs[fraction] = diffusion.sample(net, noise, cond, uncond, steps=steps, guidance=2.0,
                                          sampler="ddim", start=(noise, 1.0), start_noised=True,
                                          reference=ref)
        assert ref.injected == times[:round(fraction * steps)]
    assert not torch.allclose(runs[0.0], runs[1.0], atol=1e-4)  # the maps moved the edit


def test_edit_conditions_refuse_injection_without_inversion_in_one_line():
    from cascade.conditions import Conditions
    video = torch.zeros(3, 5, 8, 8)
    with pytest.raises(ValueError, match="needs --inversion ddim"):
        Conditions.edit(video, 0.6, "none", None, 0.5)
    with pytest.raises(ValueError, match=r"--inject: must be a finite number in 0\.\.1"):
        Conditions.edit(video, 1.0, "ddim", "a red circle", 1.5)
    assert Conditions.edit(video, 1.0, "ddim", "a red circle", 0.5).inject == 0.5
    with pytest.raises(ValueError, match="no self-attention"):
        with SourceAttention(0.5).hooked(torch.nn.Linear(2, 2)):
            pass
