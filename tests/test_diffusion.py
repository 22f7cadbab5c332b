"""Tests of the shared diffusion core (cascade/diffusion.py).

The sampler tests use data whose exact denoiser is known: x0 ~ N(mu, s^2 I) gives
E[x0 | x_t] = mu + alpha s^2 / (alpha^2 s^2 + sigma^2) (x_t - alpha mu), so a sampler run with it
must return samples of mean mu and std s, up to its own discretisation error.
"""
import math

import pytest
import torch

from cascade.config import DiffusionConfig
from cascade.diffusion import (PREDICTIONS, SAMPLERS, Diffusion, alpha_sigma, drop_condition,
                               flow_shift, guided_denoiser, logsnr_cosine, logsnr_shifted_cosine,
                               min_snr_weight, pred_from_x0_eps, t_from_logsnr, time_grid,
                               vp_levels, x0_eps_from_pred)

FLOW = DiffusionConfig(parameterisation="flow", min_snr_gamma=0.0)

MU, S = 0.7, 0.3


def gaussian_net(diffusion: Diffusion, calls: list | None = None):
    """The exact network for x0 ~ N(MU, S^2 I), answering in `diffusion.prediction`'s space. It is
    given the network's time: t (VP) or the flow's shifted t' = sigma."""
    def net(x_t, t, cond):
        if calls is not None:
            calls.append(x_t.shape[0])
        levels = (1 - t, t) if diffusion.flow else alpha_sigma(diffusion.logsnr(t))
        alpha, sigma = (a.view(-1, *[1] * (x_t.dim() - 1)) for a in levels)
        x0 = MU + alpha * S**2 / (alpha**2 * S**2 + sigma**2) * (x_t - alpha * MU)
        return pred_from_x0_eps(x0, (x_t - alpha * x0) / sigma, alpha, sigma, diffusion.prediction)
    return net


def standard_noise(shape, seed=0):
    """N(0, I) noise standardised to sample mean 0 and std 1 exactly: a deterministic sampler is
    then an affine map of it, and the output's moments measure the sampler, not Monte Carlo."""
    z = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return (z - z.mean()) / z.std()


# ----------------------------------------------------------------------------- schedules

def test_schedule_endpoints_monotone_and_variance_preserving():
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    ls = logsnr_cosine(t)
    assert ls[0].item() == pytest.approx(15, abs=1e-6) and ls[-1].item() == pytest.approx(-15, abs=1e-6)
    assert logsnr_cosine(torch.tensor(0.5, dtype=torch.float64)).item() == pytest.approx(0, abs=1e-9)
    assert (ls.diff() < 0).all()
    alpha, sigma = alpha_sigma(ls)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(t))
    # away from the ends: the Nichol & Dhariwal form -2 log tan(pi t / 2), t squeezed by the clamp
    assert logsnr_cosine(torch.tensor(0.3, dtype=torch.float64)).item() == pytest.approx(
        -2 * math.log(math.tan(math.pi * 0.3 / 2)), abs=5e-3)


def test_shifted_schedule_sign_and_inverse():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    torch.testing.assert_close(logsnr_shifted_cosine(t, 1.0), logsnr_cosine(t))
    torch.testing.assert_close(logsnr_shifted_cosine(t, 4.0), logsnr_cosine(t) - 2 * math.log(4.0))
    assert (logsnr_shifted_cosine(t, 2.0) < logsnr_cosine(t)).all()          # shift > 1: noisier
    for shift in (1.0, 0.5, 4.0):
        torch.testing.assert_close(t_from_logsnr(logsnr_shifted_cosine(t, shift), shift), t)
    d = Diffusion(DiffusionConfig(schedule="shifted_cosine", shift=2.0))
    torch.testing.assert_close(d.logsnr(t), logsnr_shifted_cosine(t, 2.0))


def test_time_grid_counts_steps():
    ts = time_grid(7)
    assert ts.shape == (8,) and ts[0] == 1 and ts[-1] == 0 and (ts.diff() < 0).all()
    with pytest.raises(ValueError):
        time_grid(0)


# ----------------------------------------------------------------------------- parameterisations

@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_conversions_round_trip(prediction):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 5, 3, generator=g)
    alpha, sigma = (a.view(-1, 1) for a in alpha_sigma(torch.linspace(-6, 6, 5)))
    x_t = alpha * x0 + sigma * eps
    pred = pred_from_x0_eps(x0, eps, alpha, sigma, prediction)
    x0_back, eps_back = x0_eps_from_pred(pred, x_t, alpha, sigma, prediction)
    torch.testing.assert_close(x0_back, x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(eps_back, eps, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pred_from_x0_eps(x0, eps, alpha, sigma, "v"), alpha * eps - sigma * x0)


# ----------------------------------------------------------------------------- loss

@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_loss_zero_for_oracle(prediction):
    d = Diffusion(DiffusionConfig(prediction=prediction))
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 6, 4, 3, generator=g)
    t = torch.rand(6, generator=g)

    def oracle(x_t, t_, cond):
        alpha, sigma = (a.view(-1, 1, 1) for a in alpha_sigma(d.logsnr(t_)))
        return pred_from_x0_eps(x0, noise, alpha, sigma, prediction)
    assert d.loss(oracle, x0, {}, t=t, noise=noise).item() == 0.0


def test_min_snr_weights_match_formula():
    logsnr = torch.tensor([-10.0, -1.0, 0.0, math.log(5.0), 3.0, 12.0], dtype=torch.float64)
    snr, gamma = logsnr.exp(), 5.0
    clipped = torch.minimum(snr, torch.tensor(gamma, dtype=torch.float64))
    torch.testing.assert_close(min_snr_weight(logsnr, gamma, "v"), clipped / (snr + 1))
    torch.testing.assert_close(min_snr_weight(logsnr, gamma, "eps"), clipped / snr)
    torch.testing.assert_close(min_snr_weight(logsnr, gamma, "x0"), clipped)
    torch.testing.assert_close(min_snr_weight(logsnr, 0.0, "v"), torch.ones_like(logsnr))
    # the loss is the weighted MSE: a network answering zeros pays w * mean(target^2)
    d = Diffusion(DiffusionConfig(prediction="v", min_snr_gamma=gamma))
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(2, 8, 5, generator=g)
    t = torch.rand(8, generator=g)
    ls = d.logsnr(t)
    alpha, sigma = (a.view(-1, 1) for a in alpha_sigma(ls))
    target = alpha * noise - sigma * x0
    expect = (min_snr_weight(ls, gamma, "v") * target.square().mean(1)).mean()
    got = d.loss(lambda x, t_, c: torch.zeros_like(x), x0, {}, t=t, noise=noise)
    torch.testing.assert_close(got, expect)


def test_min_snr_loss_is_the_same_in_every_prediction_space():
    """min(snr, gamma) * ||x0 - x0_hat||^2 whichever space the network answers in (Hang et al.)."""
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(2, 16, 7, generator=g)
    t = torch.rand(16, generator=g)
    shrink = lambda x_t, t_: 0.5 * x_t                      # any x0 guess, shared by all three
    losses = []
    for prediction in PREDICTIONS:
        d = Diffusion(DiffusionConfig(prediction=prediction, min_snr_gamma=5.0))

        def net(x_t, t_, cond):
            alpha, sigma = (a.view(-1, 1) for a in alpha_sigma(d.logsnr(t_)))
            x0_hat = shrink(x_t, t_)
            return pred_from_x0_eps(x0_hat, (x_t - alpha * x0_hat) / sigma, alpha, sigma, prediction)
        losses.append(d.loss(net, x0, {}, t=t, noise=noise))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=0)
    torch.testing.assert_close(losses[2], losses[0], rtol=1e-4, atol=0)


def test_loss_reproducible_with_generator():
    d = Diffusion(DiffusionConfig())
    x0 = torch.randn(4, 3, 2, 5)
    net = lambda x, t, c: 0.3 * x
    a = d.loss(net, x0, {}, generator=torch.Generator().manual_seed(7))
    b = d.loss(net, x0, {}, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    t = torch.rand(4, generator=g)                          # drawn t first, then noise
    c = d.loss(net, x0, {}, t=t, noise=torch.randn(x0.shape, generator=g))
    assert a.item() == b.item() == c.item()


@pytest.mark.parametrize("cfg", [DiffusionConfig(prediction="v"), FLOW], ids=["vp", "flow"])
def test_loss_decreases_for_a_tiny_model(cfg):
    torch.manual_seed(0)
    d = Diffusion(cfg)

    class Tiny(torch.nn.Module):                          # v_hat = a(t) x_t + b(t)
        def __init__(self):
            super().__init__()
            self.mlp = torch.nn.Sequential(torch.nn.Linear(3, 32), torch.nn.SiLU(), torch.nn.Linear(32, 2))

        def forward(self, x_t, t, cond):
            f = torch.stack([t, torch.sin(math.pi * t), torch.cos(math.pi * t)], 1)
            a, b = self.mlp(f).unbind(1)                    # (B,), (B,)
            return a[:, None] * x_t + b[:, None]

    net = Tiny()
    data = lambda n, g: MU + S * torch.randn(n, 8, generator=g)
    evaluate = lambda f: d.loss(f, data(512, torch.Generator().manual_seed(9)), {},
                                generator=torch.Generator().manual_seed(10)).item()
    before, floor = evaluate(net), evaluate(gaussian_net(d))  # floor: the exact denoiser's loss
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(11)
    for _ in range(300):
        loss = d.loss(net, data(64, g), {}, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = evaluate(net)
    assert after < 0.5 * before and after < 1.05 * floor, (before, after, floor)


# ----------------------------------------------------------------------------- guidance

def cond_net(calls):
    def net(x_t, t, cond):
        calls.append(x_t.shape[0])
        return x_t * cond["scale"].view(-1, 1) + cond["mask"].float().sum(1, keepdim=True) * t[:, None]
    return net


def test_guidance_scale_one_and_batched_equals_separate_calls():
    d = Diffusion(DiffusionConfig(prediction="v"))
    B = 3
    cond = {"scale": torch.tensor([0.5, 1.0, 2.0]), "mask": torch.ones(B, 4, dtype=torch.bool)}
    uncond = {"scale": torch.zeros(1), "mask": torch.zeros(1, 4, dtype=torch.bool)}   # batch 1
    x, t = torch.randn(B, 6), torch.tensor([0.2, 0.5, 0.9])
    calls = []
    net = cond_net(calls)
    plain = d.denoise(net, x, t, cond)
    torch.testing.assert_close(guided_denoiser(net, cond, uncond, 1.0, d)(x, t), plain)
    torch.testing.assert_close(guided_denoiser(net, cond, None, 4.0, d)(x, t), plain)
    calls.clear()
    guided = guided_denoiser(net, cond, uncond, 4.0, d)(x, t)
    assert calls == [2 * B]                                  # one batched call
    x0_u = d.denoise(net, x, t, {k: v.expand(B, *v.shape[1:]) for k, v in uncond.items()})
    torch.testing.assert_close(guided, x0_u + 4.0 * (plain - x0_u))


def test_guidance_interval_guides_only_inside_it():
    """guidance_interval (lo, hi): the guided combination at t in [lo, hi], the plain
    conditional prediction (one call of batch B) outside; a bad interval is a one-line error."""
    d = Diffusion(DiffusionConfig(prediction="v"))
    B = 2
    cond = {"scale": torch.tensor([0.5, 2.0]), "mask": torch.ones(B, 4, dtype=torch.bool)}
    uncond = {"scale": torch.zeros(1), "mask": torch.zeros(1, 4, dtype=torch.bool)}
    x = torch.randn(B, 6)
    calls = []
    net = cond_net(calls)
    den = guided_denoiser(net, cond, uncond, 4.0, d, (0.3, 0.6))
    for t, inside in ((0.2, False), (0.35, True), (0.55, True), (0.9, False)):
        tt = torch.full((B,), t)
        calls.clear()
        got = den(x, tt)
        assert calls == ([2 * B] if inside else [B])
        ref = guided_denoiser(net, cond, uncond, 4.0 if inside else 1.0, d)(x, tt)
        torch.testing.assert_close(got, ref)
    with pytest.raises(ValueError, match="guidance_interval"):
        guided_denoiser(net, cond, uncond, 4.0, d, (0.7, 0.2))


def test_autoguidance_adds_the_models_lead_over_its_guide():
    """Autoguidance (Karras et al. 2024): x0 = the CFG combination + (w - 1) (x0(txt) - x0_guide(txt)),
    inside and outside the guidance interval, one guide call of batch B a step; w = 1 or no guide
    is the plain guided denoiser, and a guide equal to the model changes nothing."""
    d = Diffusion(DiffusionConfig(prediction="v"))
    B = 2
    cond = {"scale": torch.tensor([0.5, 2.0]), "mask": torch.ones(B, 4, dtype=torch.bool)}
    uncond = {"scale": torch.zeros(1), "mask": torch.zeros(1, 4, dtype=torch.bool)}
    x = torch.randn(B, 6)
    calls, guide_calls = [], []
    net, guide = cond_net(calls), cond_net(guide_calls)

    def bad(x_t, t, c):                                      # another model: half the text's pull
        return guide(x_t, t, {**c, "scale": 0.5 * c["scale"]})
    for t in (0.2, 0.5):
        tt = torch.full((B,), t)
        plain = guided_denoiser(net, cond, uncond, 4.0, d, (0.3, 1.0))(x, tt)
        guide_calls.clear()
        got = guided_denoiser(net, cond, uncond, 4.0, d, (0.3, 1.0), guide=bad, guide_weight=2.5)(x, tt)
        assert guide_calls == [B]
        lead = d.denoise(net, x, tt, cond) - d.denoise(bad, x, tt, cond)
        assert lead.abs().max() > 0.01
        torch.testing.assert_close(got, plain + 1.5 * lead)
        for off in (guided_denoiser(net, cond, uncond, 4.0, d, (0.3, 1.0), guide=bad, guide_weight=1.0),
                    guided_denoiser(net, cond, uncond, 4.0, d, (0.3, 1.0), guide=net, guide_weight=3.0)):
            torch.testing.assert_close(off(x, tt), plain)


def test_drop_condition():
    B = 5
    cond = {"text": torch.randn(B, 3, 2), "mask": torch.ones(B, 3, dtype=torch.bool)}
    for null in ({"text": torch.zeros(1, 3, 2), "mask": torch.zeros(1, 3, dtype=torch.bool)},
                 {"text": torch.zeros(B, 3, 2), "mask": torch.zeros(B, 3, dtype=torch.bool)}):
        kept = drop_condition(cond, null, 0.0)
        assert all(torch.equal(kept[k], cond[k]) for k in cond)
        dropped = drop_condition(cond, null, 1.0)
        assert all(torch.equal(dropped[k], null[k].expand_as(cond[k])) for k in cond)
    half = drop_condition(cond, null, 0.5, generator=torch.Generator().manual_seed(4))
    again = drop_condition(cond, null, 0.5, generator=torch.Generator().manual_seed(4))
    dropped = ~half["mask"].any(1)                           # (B,) rows given the null condition
    assert 0 < dropped.sum() < B and torch.equal(half["text"], again["text"])
    assert (half["text"][dropped] == 0).all()
    assert torch.equal(half["text"][~dropped], cond["text"][~dropped])


# ----------------------------------------------------------------------------- samplers, Gaussian data

@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("sampler,steps,tol", [("ddim", 100, 1e-2), ("dpmpp_2m", 25, 2e-3)])
def test_deterministic_samplers_on_gaussian_data(prediction, sampler, steps, tol):
    d = Diffusion(DiffusionConfig(prediction=prediction))
    denoise = guided_denoiser(gaussian_net(d), {}, None, 1.0, d)
    x = SAMPLERS[sampler](denoise, standard_noise((8, 512)), time_grid(steps))
    assert abs(x.mean().item() - MU) < 1e-3
    assert abs(x.std().item() - S) < tol


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_ancestral_sampler_on_gaussian_data(prediction):
    d = Diffusion(DiffusionConfig(prediction=prediction))
    denoise = guided_denoiser(gaussian_net(d), {}, None, 1.0, d)
    g = torch.Generator().manual_seed(5)
    x = SAMPLERS["euler_ancestral"](denoise, torch.randn(8, 4096, generator=g), time_grid(400), generator=g)
    assert abs(x.mean().item() - MU) < 5e-3                  # Monte Carlo: S / sqrt(32768) = 1.7e-3
    assert abs(x.std().item() - S) < 1e-2                    # bias ~3.5e-3 at 400 steps, MC ~1.2e-3


def test_dpmpp_2m_beats_ddim_at_few_steps():
    d = Diffusion(DiffusionConfig(prediction="v"))
    denoise = guided_denoiser(gaussian_net(d), {}, None, 1.0, d)
    noise = standard_noise((4, 256))
    for steps in (5, 10, 25):
        err = {name: abs(SAMPLERS[name](denoise, noise, time_grid(steps)).std().item() - S)
               for name in ("ddim", "dpmpp_2m")}
        assert err["dpmpp_2m"] <= err["ddim"], (steps, err)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_diffusion_sample_counts_calls_and_reproduces_sampler(sampler):
    d = Diffusion(DiffusionConfig(prediction="v", sampler=sampler, steps=12, guidance=1.0))
    noise = standard_noise((4, 64))
    calls = []
    x = d.sample(gaussian_net(d, calls), noise, {}, generator=torch.Generator().manual_seed(6))
    evals = 2 * 12 - 1 if sampler == "heun" else 12          # Heun: two per step but the last
    assert calls == [4] * evals                              # steps = network evaluations
    ref = SAMPLERS[sampler](guided_denoiser(gaussian_net(d), {}, None, 1.0, d), noise, time_grid(12),
                            generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(x, ref)
    # guided: still `steps` calls, each on the doubled batch
    calls = []
    cond = {"scale": torch.ones(4), "mask": torch.ones(4, 2, dtype=torch.bool)}
    uncond = {"scale": torch.zeros(4), "mask": torch.zeros(4, 2, dtype=torch.bool)}
    d.sample(cond_net(calls), noise, cond, uncond, steps=5, guidance=3.0, progress=True,
             generator=torch.Generator().manual_seed(6))
    assert calls == [8] * (9 if sampler == "heun" else 5)


def test_noise_augment():
    d = Diffusion(DiffusionConfig())
    x = MU + S * torch.randn(4, 3, 4096, generator=torch.Generator().manual_seed(8))
    clean, t0 = d.noise_augment(x, 0.0, generator=torch.Generator().manual_seed(0))
    assert t0.shape == (4,) and torch.equal(clean, x)                # level 0: the signal itself
    t_aug = torch.tensor([0.1, 0.4, 0.7, 1.0])
    noisy, t_back = d.noise_augment(x, t_aug, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t_back, t_aug)
    alpha, sigma = alpha_sigma(d.logsnr(t_aug))
    torch.testing.assert_close(noisy.mean((1, 2)), alpha * MU, atol=2e-2, rtol=0)
    torch.testing.assert_close(noisy.std((1, 2)), (alpha**2 * S**2 + sigma**2).sqrt(), atol=2e-2, rtol=0)


def test_motion_loss_is_zero_for_the_oracle_and_sees_only_frame_differences():
    """diffusion.motion_weight: the term is 0 for the exact x0, 0 for an x0 estimate off by the
    same offset in every frame, and 1/2 of the frame-difference error otherwise (a known case)."""
    from cascade.diffusion import motion_loss
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(2, 2, 3, 4, 4, generator=g), torch.randn(2, 2, 3, 4, 4, generator=g)
    t = torch.rand(2, generator=g)
    d = Diffusion(DiffusionConfig(prediction="v", motion_weight=1.0))

    def oracle(x_t, t_, cond):
        alpha, sigma = (a.view(-1, 1, 1, 1, 1) for a in alpha_sigma(d.logsnr(t_)))
        return pred_from_x0_eps(x0, noise, alpha, sigma, "v")
    assert d.loss(oracle, x0, {}, t=t, noise=noise).item() < 1e-10
    assert motion_loss(x0 + 0.7, x0).item() < 1e-12                     # a still offset: no motion error
    shifted = x0.clone()
    shifted[:, :, 2] += 1.0                                              # last frame moved by 1
    assert abs(motion_loss(shifted, x0).item() - 1.0 / 2) < 1e-6         # one of two differences off by 1



# ----------------------------------------------------------------------------- rectified flow

def test_flow_path_shift_and_conversions():
    """x_t = (1 - t') x0 + t' eps, velocity eps - x0; the shift lowers the log-SNR by 2 log(shift)
    at every t, and with shift_tokens it grows as sqrt(elements / shift_tokens)."""
    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    d = Diffusion(FLOW)
    alpha, sigma, lam = d.levels(t)
    torch.testing.assert_close(alpha, 1 - t)
    torch.testing.assert_close(sigma, t)
    torch.testing.assert_close(2 * lam, 2 * torch.log((1 - t) / t))
    shifted = Diffusion(DiffusionConfig(parameterisation="flow", shift=3.0))
    torch.testing.assert_close(shifted.logsnr(t), d.logsnr(t) - 2 * math.log(3.0))
    torch.testing.assert_close(shifted.net_time(t), flow_shift(t, 3.0))
    sized = Diffusion(DiffusionConfig(parameterisation="flow", shift=2.0, shift_tokens=64))
    assert sized.shift_for(torch.zeros(1, 4, 4, 4, 4)) == pytest.approx(2.0)
    assert sized.shift_for(torch.zeros(1, 4, 16, 4, 4)) == pytest.approx(4.0)   # 4x the tokens: 2x
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 5, 3, generator=g)
    a, s = (1 - t[:5].float()).view(-1, 1), t[:5].float().view(-1, 1)
    u = pred_from_x0_eps(x0, eps, a, s, "velocity")
    torch.testing.assert_close(u, eps - x0)
    back = x0_eps_from_pred(u, a * x0 + s * eps, a, s, "velocity")
    torch.testing.assert_close(back[0], x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(back[1], eps, atol=1e-5, rtol=1e-5)


def test_flow_training_times_are_logit_normal_and_oracle_loss_is_zero():
    d = Diffusion(DiffusionConfig(parameterisation="flow", flow_logit_mean=0.5, flow_logit_std=0.8))
    t = d.draw_t(torch.Generator().manual_seed(1), 20000)
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item() - 0.5) < 0.02 and abs(logit.std().item() - 0.8) < 0.02
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(2, 6, 4, 3, generator=g)
    assert d.loss(lambda x_t, t_, c: noise - x0, x0, {}, noise=noise, generator=g).item() == 0.0


# measured max |x - (MU + S z)| x ~1.5; most of it is the last step, which lands on the denoiser's
# E[x0 | x_t] (for these data a shrunk estimate), as every sampler here does
FLOW_TOL = {("euler", 200): (0.018, 0.04), ("heun", 20): (0.02, 0.19), ("dpmpp_2m", 25): (0.02, 0.13)}


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("sampler,steps", list(FLOW_TOL))
def test_flow_samplers_follow_the_exact_flow(sampler, steps, shift):
    """Gaussian data x0 ~ N(MU, S^2): the flow's marginals are N((1 - t') MU, (1 - t')^2 S^2 + t'^2),
    and its ODE is the affine map x_t = (1 - t') MU + sqrt((1 - t')^2 S^2 + t'^2) z, so from noise
    z every sample must land near MU + S z (each element, not only the moments); halving the
    step shrinks Euler's error about 2x (first order) and Heun's about 4x (second order)."""
    d = Diffusion(DiffusionConfig(parameterisation="flow", shift=shift))
    z = standard_noise((4, 512))
    den = guided_denoiser(gaussian_net(d), {}, None, 1.0, d)
    err = lambda n: (SAMPLERS[sampler](den, z, time_grid(n)) - (MU + S * z)).abs().max().item()  # noqa: E731
    fine = err(steps)
    assert fine < FLOW_TOL[sampler, steps][shift == 3.0], fine
    if sampler != "dpmpp_2m":
        order = {"euler": 1, "heun": 2}[sampler]
        assert fine < 1.5 * err(steps // 2) / 2 ** order


def test_flow_ancestral_on_gaussian_data():
    d = Diffusion(DiffusionConfig(parameterisation="flow"))
    g = torch.Generator().manual_seed(5)
    x = SAMPLERS["euler_ancestral"](guided_denoiser(gaussian_net(d), {}, None, 1.0, d),
                                    torch.randn(8, 4096, generator=g), time_grid(400), generator=g)
    assert abs(x.mean().item() - MU) < 5e-3 and abs(x.std().item() - S) < 1e-2


def test_vp_levels_wraps_a_hand_written_schedule():
    den = lambda x, t: torch.zeros_like(x)                       # noqa: E731
    den.levels = vp_levels(logsnr_cosine)
    assert SAMPLERS["ddim"](den, torch.ones(2, 3), time_grid(3)).abs().max() == 0
    with pytest.raises(TypeError, match="levels"):
        SAMPLERS["ddim"](lambda x, t: x, torch.ones(2, 3), time_grid(3))


def test_flow_config_errors():
    from cascade.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="diffusion.prediction"):
        load_config(None, ["diffusion.parameterisation=flow", "diffusion.prediction=eps"])
    with pytest.raises(ConfigError, match="diffusion.parameterisation"):
        load_config(None, ["diffusion.parameterisation=sde"])
    with pytest.raises(ConfigError, match="diffusion.shift"):
        load_config(None, ["diffusion.shift=0"])


# ----------------------------------------------------------------------------- inversion

def test_inversion_is_exact_for_a_single_point_data_set():
    """Data = one point c: the exact denoiser answers c everywhere, so every DDIM path is a straight
    line to c and inversion then sampling returns c exactly, at any step count, on both paths."""
    from cascade.diffusion import invert_ddim
    c = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    for cfg in (DiffusionConfig(), FLOW):
        d = Diffusion(cfg)
        den = lambda x, t: c.expand_as(x)                                 # noqa: E731
        den.levels = d.levels
        for steps in (3, 10):
            z = invert_ddim(den, c, time_grid(steps).flip(0))
            torch.testing.assert_close(SAMPLERS["ddim"](den, z, time_grid(steps)), c, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cfg", [DiffusionConfig(prediction="v"), DiffusionConfig(prediction="eps"), FLOW],
                         ids=["v", "eps", "flow"])
def test_inversion_of_gaussian_data_converges_to_the_exact_noise(cfg):
    """x0 ~ N(MU, S^2): the flow's ODE maps noise z to MU + S z (VP paths too), so inverting x0
    must give (x0 - MU) / S, and inverting then sampling must give x0 back; both errors fall
    with the steps (measured, max |error| at 10 / 40 / 160 steps: v 0.10 / 0.14 / 0.045 and
    0.24 / 0.097 / 0.028; the first step, which asks the network at the next level, dominates
    the inverted noise at few steps)."""
    d = Diffusion(cfg)
    x0 = MU + S * standard_noise((4, 256), seed=3)
    errs = []
    for steps in (10, 40, 160):
        z = d.invert(gaussian_net(d), x0, {}, steps=steps)
        back = d.sample(gaussian_net(d), z, {}, steps=steps, guidance=1.0, sampler="ddim")
        errs.append(((z - (x0 - MU) / S).abs().max().item(), (back - x0).abs().max().item()))
    assert errs[-1][0] < 0.6 * errs[0][0] and errs[-1][1] < 0.3 * errs[0][1], errs
    assert errs[2][1] < errs[1][1] < errs[0][1] and errs[-1][1] < 0.04, errs
