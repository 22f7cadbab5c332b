"""The shared diffusion core: schedules, parameterisations, loss, guidance, samplers.

Notation (Kingma et al. 2021 "VDM"; Salimans & Ho 2022; diffusers' DDIM `step` maps the same way):

    t in [0, 1]            time; t=1 is pure noise, t=0 is data
    logsnr = log(alpha^2 / sigma^2)          the schedule is a function t -> logsnr
    alpha^2 = sigmoid(logsnr), sigma^2 = sigmoid(-logsnr)      variance preserving: alpha^2 + sigma^2 = 1
    x_t = alpha * x0 + sigma * eps                             forward process q(x_t | x0)
    v   = alpha * eps - sigma * x0                             v-prediction (Imagen Video)
    lambda = logsnr / 2 = log(alpha / sigma)                   DPM-Solver's half log-SNR
    D(x_t, t) = E[x0 | x_t]                                    the denoiser every sampler calls

Rectified flow (Liu et al. 2022; Esser et al. 2024, "SD3"), diffusion.parameterisation=flow: the
straight path x_t = (1 - t') x0 + t' eps, i.e. alpha = 1 - t', sigma = t' (not variance
preserving), t' = shift(t) the time shifted towards noise (SD3 eq. 23, `flow_shift`), the network
given t' and predicting the velocity u = dx_t/dt' = eps - x0 ("velocity": x0 = x_t - t' u, eps =
x_t + (1 - t') u), trained on logit-normal t (SD3 Sec. 3.1) with the plain velocity MSE.
Every sampler reads (alpha, sigma) from the path, so DDIM, DPM-Solver++(2M), ancestral and Heun
run on either; DDIM is exactly Euler's method on the flow's ODE (x_s = x_t + (s' - t') u).

Every stage's network is called as `net(x_t, t, cond) -> prediction` with t a (B,) tensor in
[0, 1] and cond a dict of tensors batched along dim 0; the prediction is v, eps or x0 by config.

Samplers share one signature, `sampler(denoise, x, ts, generator=None, progress=False) -> x0`
(k-diffusion style). `denoise(x, t) -> x0_hat` carries the path it was built with as
`denoise.levels` ((t, x) -> (alpha, sigma, lambda), x giving the sample shape the flow's shift
may depend on); `guided_denoiser` sets it, hand-written denoisers must too (`vp_levels` wraps a
log-SNR schedule).
A step whose next time is exactly 0 lands on the data: it returns the denoised x0.
"""
from __future__ import annotations

import functools
import math

import torch
from tqdm.auto import tqdm

from cascade.config import DiffusionConfig
from cascade.registry import SAMPLER_NAMES

LOGSNR_MIN, LOGSNR_MAX = -15.0, 15.0
PREDICTIONS = ("v", "eps", "x0")           # what a VP network answers; a flow network: "velocity"
PARAMETERISATIONS = ("vp", "flow")


# ----------------------------------------------------------------------------- schedules

def _cosine_t_range(logsnr_min: float, logsnr_max: float) -> tuple[float, float]:
    """Angles u = atan(exp(-logsnr/2)) at the clamped ends: the cosine schedule is t -> u linearly."""
    return math.atan(math.exp(-0.5 * logsnr_max)), math.atan(math.exp(-0.5 * logsnr_min))


def logsnr_cosine(t: torch.Tensor, logsnr_min: float = LOGSNR_MIN,
                  logsnr_max: float = LOGSNR_MAX) -> torch.Tensor:
    """Cosine schedule (Nichol & Dhariwal 2021) in log-SNR form, -2 log tan(pi t / 2), with t mapped
    into the range where logsnr stays in [logsnr_min, logsnr_max] (Hoogeboom et al. 2023, simple
    diffusion, Alg. 1): logsnr(0) = logsnr_max, logsnr(1) = logsnr_min, logsnr(1/2) = 0."""
    u_min, u_max = _cosine_t_range(logsnr_min, logsnr_max)
    return -2.0 * torch.log(torch.tan(u_min + t * (u_max - u_min)))


def logsnr_shifted_cosine(t: torch.Tensor, shift: float = 1.0) -> torch.Tensor:
    """Shifted cosine (simple diffusion, Sec. 3.1): logsnr_cosine(t) + 2 log(1 / shift).

    Sign: shift > 1 lowers the log-SNR at every t (noisier), as a resolution of shift x the base
    resolution needs (simple diffusion's shift is base/res = 1/shift). The whole range moves with
    it: logsnr(0) = 15 - 2 log(shift), logsnr(1) = -15 - 2 log(shift)."""
    return logsnr_cosine(t) - 2.0 * math.log(shift)


def t_from_logsnr(logsnr: torch.Tensor, shift: float = 1.0) -> torch.Tensor:
    """Inverse of `logsnr_shifted_cosine` (shift=1: of `logsnr_cosine`), clamped to [0, 1]."""
    u_min, u_max = _cosine_t_range(LOGSNR_MIN, LOGSNR_MAX)
    u = torch.atan(torch.exp(-0.5 * (logsnr + 2.0 * math.log(shift))))
    return ((u - u_min) / (u_max - u_min)).clamp(0.0, 1.0)


def alpha_sigma(logsnr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, sigma) with alpha^2 = sigmoid(logsnr), sigma^2 = sigmoid(-logsnr)."""
    return torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()


def flow_shift(t: torch.Tensor, shift: float) -> torch.Tensor:
    """The flow's time shifted towards noise (SD3 eq. 23): t' = s t / (1 + (s - 1) t). Its
    log-SNR, 2 log((1 - t') / t'), is the unshifted one minus 2 log(s): the same sign and size
    as `logsnr_shifted_cosine`'s shift."""
    return shift * t / (1 + (shift - 1) * t)


def vp_levels(logsnr_fn):
    """A variance-preserving path as the samplers read it, (t, x) -> (alpha, sigma, lambda), from
    a log-SNR schedule t -> logsnr (x unused)."""
    def levels(t, x=None):
        logsnr = logsnr_fn(t)
        return (*alpha_sigma(logsnr), logsnr / 2)
    return levels


def partial_grid(steps: int, strength: float, device=None) -> torch.Tensor:
    """The times from `strength` down to 0 in round(steps * strength) equal steps (at least one):
    where an edit starts (`Diffusion.sample`'s start) and inversion stops (`Diffusion.invert`)."""
    if not 0 < strength <= 1:
        raise ValueError(f"strength: must be in (0, 1], got {strength}")
    if strength == 1:
        return time_grid(steps, device)
    return torch.linspace(strength, 0.0, max(1, round(steps * strength)) + 1, device=device)


def time_grid(steps: int, device=None) -> torch.Tensor:
    """Default sampling grid: `steps` + 1 times uniform from 1 to 0, i.e. `steps` network calls."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return torch.linspace(1.0, 0.0, steps + 1, device=device)  # (steps+1,)


# ----------------------------------------------------------------------------- parameterisations

def x0_eps_from_pred(pred, x_t, alpha, sigma, prediction: str):
    """A network output of kind `prediction` -> (x0, eps); alpha, sigma broadcast against x_t.

    v:   x0 = alpha x_t - sigma v,     eps = sigma x_t + alpha v    (Salimans & Ho 2022, Sec. 4)
    eps: x0 = (x_t - sigma eps) / alpha
    x0:  eps = (x_t - alpha x0) / sigma
    velocity (the flow path, alpha + sigma = 1): x0 = x_t - sigma u, eps = x_t + alpha u
    """
    if prediction == "v":
        return alpha * x_t - sigma * pred, sigma * x_t + alpha * pred
    if prediction == "velocity":
        return x_t - sigma * pred, x_t + alpha * pred
    if prediction == "eps":
        return (x_t - sigma * pred) / alpha, pred
    if prediction == "x0":
        return pred, (x_t - alpha * pred) / sigma
    raise ValueError(f"prediction must be one of {PREDICTIONS}, got '{prediction}'")


def pred_from_x0_eps(x0, eps, alpha, sigma, prediction: str):
    """(x0, eps) -> the network's target of kind `prediction` (v = alpha eps - sigma x0; the
    flow's velocity = eps - x0)."""
    if prediction == "v":
        return alpha * eps - sigma * x0
    if prediction == "velocity":
        return eps - x0
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    raise ValueError(f"prediction must be one of {PREDICTIONS}, got '{prediction}'")


def min_snr_weight(logsnr: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """Min-SNR-gamma loss weight (Hang et al. 2023, eq. 8 and its v/eps forms), per sample.

    The weight on the MSE in the prediction's space that equals min(snr, gamma) * ||x0 - x0_hat||^2:
    v: min(snr, gamma) / (snr + 1);  eps: min(snr, gamma) / snr;  x0: min(snr, gamma);
    velocity (flow, x0 error = sigma x velocity error): min(snr, gamma) / (1 + sqrt(snr))^2.
    gamma <= 0 turns weighting off (plain MSE in the prediction's space)."""
    if gamma <= 0:
        return torch.ones_like(logsnr)
    snr = logsnr.exp()
    clipped = snr.clamp(max=gamma)
    if prediction == "velocity":                         # sigma = 1 / (1 + alpha / sigma)
        return clipped / (1 + (0.5 * logsnr).exp()) ** 2
    return {"v": clipped / (snr + 1), "eps": clipped / snr, "x0": clipped}[prediction]


def motion_loss(x0_hat: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Mean square error of the frame differences x[:, :, t+1] - x[:, :, t] of the x0 estimate,
    unweighted over noise levels: at high noise, where min-SNR weights the plain loss near 0 and
    the frames are hidden, it still asks the network for the motion the prompt names (the tiny
    base ignored its direction words without it: README)."""                # (B, C, T, h, w) each
    d_hat, d = x0_hat.diff(dim=2), x0.float().diff(dim=2)
    return (d_hat - d).square().mean()


def _bcast(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return a.reshape(-1, *([1] * (x.dim() - 1)))  # (B,) -> (B, 1, ..., 1)


def _randn(shape, like: torch.Tensor, generator=None) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device (reproducible), moved to `like`'s.
    generator: a torch.Generator, None, or per-row generators (`seeding.RowGenerators`)."""
    if hasattr(generator, "randn"):
        return generator.randn(shape, like.dtype).to(like.device)
    dev = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=dev, dtype=like.dtype).to(like.device)


# ----------------------------------------------------------------------------- the core

class Diffusion:
    """The path (a VP schedule or the rectified flow), the prediction type of one stage, and what is
    built from them."""

    def __init__(self, cfg: DiffusionConfig):
        if cfg.parameterisation not in PARAMETERISATIONS:
            raise ValueError(f"diffusion.parameterisation: '{cfg.parameterisation}' is not one of "
                             f"{', '.join(PARAMETERISATIONS)}")
        if cfg.prediction not in PREDICTIONS:
            raise ValueError(f"diffusion.prediction: '{cfg.prediction}' is not one of {PREDICTIONS}")
        self.flow = cfg.parameterisation == "flow"
        if self.flow and cfg.prediction != "v":
            raise ValueError(f"diffusion.prediction: a rectified-flow network predicts the velocity "
                             f"eps - x0 (prediction v), got '{cfg.prediction}'")
        if cfg.schedule == "cosine":
            self.vp_logsnr = logsnr_cosine                                # t -> logsnr
        elif cfg.schedule == "shifted_cosine":
            self.vp_logsnr = functools.partial(logsnr_shifted_cosine, shift=cfg.shift)
        else:
            raise ValueError(f"diffusion.schedule: '{cfg.schedule}' is not one of cosine, shifted_cosine")
        if cfg.sampler not in SAMPLERS:
            raise ValueError(f"diffusion.sampler: '{cfg.sampler}' is not one of {', '.join(SAMPLERS)}")
        self.cfg = cfg
        self.prediction = "velocity" if self.flow else cfg.prediction

    # ------------------------------------------------------------------------- the path

    def shift_for(self, x: torch.Tensor | None) -> float:
        """The flow's time shift for samples shaped like x (B, C, *dims): diffusion.shift, times
        sqrt(n / shift_tokens) when diffusion.shift_tokens > 0, n = prod(dims) the elements per
        channel (SD3 Sec. 5.3.2: sqrt(m / n); a longer or larger video is noised more)."""
        c = self.cfg
        if c.shift_tokens <= 0 or x is None:
            return c.shift
        return c.shift * math.sqrt(math.prod(x.shape[2:]) / c.shift_tokens)

    def levels(self, t: torch.Tensor, x: torch.Tensor | None = None):
        """(alpha, sigma, lambda = log(alpha / sigma)) at times t for samples shaped like x."""
        if self.flow:
            tp = flow_shift(t, self.shift_for(x))
            return 1 - tp, tp, torch.log1p(-tp) - torch.log(tp)
        logsnr = self.vp_logsnr(t)
        return (*alpha_sigma(logsnr), logsnr / 2)

    def logsnr(self, t: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """log(alpha^2 / sigma^2) at times t (the flow's is -inf at t = 1 and +inf at 0)."""
        return 2 * self.levels(t, x)[2]

    def net_time(self, t: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """The time the network is given: t (VP), the shifted flow time t' = sigma (flow)."""
        return flow_shift(t, self.shift_for(x)) if self.flow else t

    def _alpha_sigma(self, t, x):
        alpha, sigma, _ = self.levels(t, x)                                # (B,), (B,)
        return _bcast(alpha, x), _bcast(sigma, x)

    def draw_t(self, generator=None, n: int | None = None, device=None) -> torch.Tensor:
        """Training times, one per sample: U[0, 1) (VP), or logit-normal for the flow (sigmoid of
        N(flow_logit_mean, flow_logit_std^2), SD3 Sec. 3.1: the middle times, where the velocity
        is hardest, drawn most). generator: RowGenerators (one draw from each row's stream), or a
        torch.Generator / None with n."""
        rows = hasattr(generator, "rand")
        if self.flow:
            z = generator.randn((len(generator),)) if rows else \
                torch.randn(n, generator=generator, device=generator.device if generator else device)
            t = torch.sigmoid(self.cfg.flow_logit_mean + self.cfg.flow_logit_std * z)
        else:
            t = generator.rand() if rows else \
                torch.rand(n, generator=generator, device=generator.device if generator else device)
        return t.to(device) if device is not None else t                    # (n,)

    def q_sample(self, x0, t, noise):
        """x_t = alpha_t x0 + sigma_t eps (forward process q(x_t | x0))."""
        alpha, sigma = self._alpha_sigma(t, x0)
        return alpha * x0 + sigma * noise

    def denoise(self, net, x_t, t, cond):
        """D(x_t, t) = x0_hat: one network call, its output converted to x0."""
        alpha, sigma = self._alpha_sigma(t, x_t)
        pred = net(x_t, self.net_time(t, x_t), cond)
        return x0_eps_from_pred(pred, x_t, alpha, sigma, self.prediction)[0]

    # ------------------------------------------------------------------------- training

    def loss(self, net, x0, cond, t=None, noise=None, generator=None):
        """Training loss: batch mean of w(t) * ||pred - target||^2 (mean over the non-batch dims),
        target in the prediction's space, w the min-SNR-gamma weight (`min_snr_weight`).

        t (`draw_t`) and noise ~ N(0, I) are drawn (t first, then noise, from `generator` when
        given) unless passed in."""
        if t is None:
            t = self.draw_t(generator, x0.shape[0], x0.device)            # (B,)
        if noise is None:
            noise = _randn(x0.shape, x0, generator)                        # (B, ...)
        x_t = self.q_sample(x0, t, noise)
        return self.loss_of(net(x_t, self.net_time(t, x0), cond).float(), x0, x_t, noise, t)

    def loss_of(self, pred, x0, x_t, noise, t):
        """The loss of a prediction `pred` for x_t (B, ...) made from (x0, noise) at times t (B,):
        batch mean of the min-SNR-weighted MSE in the prediction's space, plus the motion loss."""
        alpha, sigma = self._alpha_sigma(t, x0)
        target = pred_from_x0_eps(x0, noise, alpha, sigma, self.prediction)
        mse = (pred - target.float()).square().flatten(1).mean(1)          # (B,)
        weight = min_snr_weight(self.logsnr(t, x0), self.cfg.min_snr_gamma, self.prediction)
        loss = (weight * mse).mean()
        if self.cfg.motion_weight > 0 and x0.dim() == 5 and x0.shape[2] > 1:
            loss = loss + self.cfg.motion_weight * motion_loss(
                x0_eps_from_pred(pred, x_t, alpha, sigma, self.prediction)[0], x0)
        return loss

    def packed_loss(self, net, x0s: list, cond, t, noises: list, row_len: int):
        """`loss` for clips of different shapes packed into rows (NaViT; the network's
        forward_packed): x0s, noises per clip (C, T_i, H_i, W_i), t (n,), cond batched over the n
        clips. The same value as the mean of `loss` on each clip alone: each clip's MSE is a mean
        over its own elements, min-SNR weighted, and its motion loss its own; the padding tokens
        (the mask PackedLayout.real) never reach it: forward_packed returns each clip's tokens only."""
        x_ts = [self.q_sample(x0[None], t[i:i + 1], e[None])[0]             # (C, T_i, H_i, W_i)
                for i, (x0, e) in enumerate(zip(x0s, noises))]
        t_net = torch.cat([self.net_time(t[i:i + 1], x0[None]) for i, x0 in enumerate(x0s)])
        preds = net.forward_packed(x_ts, t_net, cond, row_len)
        return sum(self.loss_of(p[None].float(), x0[None], x_t[None], e[None], t[i:i + 1])
                   for i, (p, x0, x_t, e) in enumerate(zip(preds, x0s, x_ts, noises))) / len(x0s)

    def noise_augment(self, x_cond, t_aug, generator=None):
        """Conditioning augmentation (Ho et al. 2022, CDM Sec. 3; Imagen Video Sec. 2.5): noise the
        conditioning signal to level t_aug with this path; the network also gets t_aug.
        t_aug: (B,) tensor or a float for the whole batch; 0 leaves a row clean. Returns
        (x_noisy, t_aug (B,))."""
        B = x_cond.shape[0]
        t_aug = torch.as_tensor(t_aug, dtype=torch.float32, device=x_cond.device)
        t_aug = t_aug.expand(B) if t_aug.dim() == 0 else t_aug             # (B,)
        noisy = self.q_sample(x_cond, t_aug, _randn(x_cond.shape, x_cond, generator))
        clean = _bcast(t_aug == 0, x_cond)                 # level 0: the signal itself (a VP path
        return torch.where(clean, x_cond, noisy), t_aug     # has sigma 5.5e-4 at t = 0, not 0)

    # ------------------------------------------------------------------------- sampling

    @torch.no_grad()
    def sample(self, net, noise, cond, uncond=None, steps=None, guidance=None, sampler=None,
               progress=False, generator=None, guidance_interval=None, image_guidance=None,
               null_image=None, known=None, start=None, start_noised=False, reference=None,
               guide=None, autoguidance=None):
        """Draw x0 from noise at t=1: the guided denoiser run by a sampler over `time_grid(steps)`.
        None falls back to the config's steps / guidance / sampler / guidance_interval /
        autoguidance; image_guidance with null_image: three-way guidance; guide: the bad model of
        autoguidance (`guided_denoiser`).

        known: (values, mask) broadcastable to x: entries the result must equal (`keep_known`).
        start: (x0_source, strength) for SDEdit (Meng et al. 2022): the source noised with `noise`
        to t = strength and denoised from there over the grid's last round(steps * strength)
        steps, so a strength of 1 is sampling from pure noise and 0.3 keeps the source's layout;
        start_noised: the source is already at that level (`invert` to `strength`), used as is.
        reference: a `cascade.injection.SourceAttention` the source was inverted with: its
        attention maps are given to the first steps (attention injection)."""
        steps = self.cfg.steps if steps is None else steps
        guidance = self.cfg.guidance if guidance is None else guidance
        interval = self.cfg.guidance_interval if guidance_interval is None else guidance_interval
        sampler = self.cfg.sampler if sampler is None else sampler
        autoguidance = self.cfg.autoguidance if autoguidance is None else autoguidance
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler: '{sampler}' is not one of {', '.join(SAMPLERS)}")
        denoise = guided_denoiser(net, cond, uncond, guidance, self, interval, image_guidance,
                                  null_image, guide, autoguidance)
        if known is not None:
            denoise = keep_known(denoise, *known)
        if reference is not None:
            denoise = reference.wrap(denoise, net, self)
        ts, x = time_grid(steps, noise.device), noise
        if start is not None:
            source, strength = start
            ts = partial_grid(steps, strength, noise.device)
            x = source.to(noise) if start_noised else \
                self.q_sample(source.to(noise), ts[0].expand(noise.shape[0]), noise)
        return SAMPLERS[sampler](denoise, x, ts, generator=generator, progress=progress)

    @torch.no_grad()
    def invert(self, net, x0, cond, uncond=None, steps=None, guidance=1.0, progress=False,
               guidance_interval=None, strength: float = 1.0, states=None):
        """Data -> noise by DDIM inversion (`invert_ddim`) over `time_grid(steps)` reversed (to
        t = strength over the same grid as `sample`'s start), with the guided denoiser (guidance
        1: the conditional prediction alone, as Tune-A-Video inverts; no autoguidance, which
        makes the path far from invertible: 17.6 dB against 35.4 for the shipped base's red circle
        at 400 steps), so that `sample(..., sampler="ddim")` from the result with the same steps
        (and no autoguidance) gives about x0 back. states: a
        `cascade.injection.SourceAttention` that keeps every x_t on the way and `cond`, for the
        edit's attention injection."""
        steps = self.cfg.steps if steps is None else steps
        interval = self.cfg.guidance_interval if guidance_interval is None else guidance_interval
        denoise = guided_denoiser(net, cond, uncond, guidance, self, interval)
        if states is not None:
            states.cond = cond
        return invert_ddim(denoise, x0, partial_grid(steps, strength, x0.device).flip(0),
                           progress=progress, states=states)


def keep_known(denoise, values: torch.Tensor, mask: torch.Tensor):
    """A denoiser whose x0 estimate is `values` where `mask` is set (values, mask broadcast to x):
    the samplers then carry those entries along the path of their own noise (DDIM: x_s = alpha_s
    values + sigma_s eps, the network seeing them noised to every level, as RePaint's known
    region, Lugmayr et al. 2022) and land on them exactly at t = 0. The given frames of a
    frame prompt (cascade/conditions.py) and a window's context frames stay as given."""
    def wrapped(x, t):
        x0 = denoise(x, t)
        m = mask.to(x0.dtype)
        return m * values.to(x0) + (1 - m) * x0
    wrapped.levels = denoise.levels
    return wrapped


# ----------------------------------------------------------------------------- guidance

def guided_denoiser(net, cond: dict, uncond: dict | None, scale: float, diffusion: Diffusion,
                    interval=(0.0, 1.0), image_scale: float | None = None,
                    null_image: dict | None = None, guide=None, guide_weight: float = 1.0):
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6) as a denoiser D(x, t) -> x0_hat:

        x0_hat = x0_uncond + scale * (x0_cond - x0_uncond)

    cond and uncond go through the network in ONE call: x, t and every cond tensor concatenated
    along dim 0 (uncond tensors of batch 1 are broadcast). Combined in x0 space, which is the same
    as combining v or eps: each is affine in the other with the same (x_t, t) coefficients and the
    guidance weights sum to 1. scale == 1 or uncond None: a single unguided call.

    Three-way guidance for a model prompted with text and frames (InstructPix2Pix, Brooks et al.
    2023, eq. 3; Open-Sora 2.0's text and image scales): with image_scale set (not None, not 1)
    and null_image (the frame inputs of "nothing given", replacing those keys), uncond keeps the
    frames and a third branch drops both:

        x0_hat = x0(-, -) + image_scale (x0(-, img) - x0(-, -)) + scale (x0(txt, img) - x0(-, img))

    interval (lo, hi): guidance only at the steps whose t lies in [lo, hi], the conditional
    prediction alone elsewhere (Kynkaanniemi et al. 2024: guidance at high noise levels pushes
    samples to a few layouts; on the tiny base it drew second objects).

    Autoguidance (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself"):
    with a guide network (a smaller or less-trained model of the same data, conditioning and
    parameterisation) and guide_weight w != 1, at every step

        x0_hat += (w - 1) (x0(txt) - x0_guide(txt))

    the direction in which the model is better than its bad version, which pushes samples away
    from the errors both make, the bad one more (on the tiny base: empty videos, split objects).
    w = 1 or guide None: off; with scale 1 it is their paper's autoguidance alone."""
    three = uncond is not None and null_image is not None and image_scale not in (None, 1)
    guided = uncond is not None and (scale != 1 or three)
    if guided and set(uncond) != set(cond):
        raise ValueError(f"uncond keys {sorted(uncond)} differ from cond keys {sorted(cond)}")
    lo, hi = interval
    if not 0 <= lo <= hi <= 1:
        raise ValueError(f"guidance_interval: need 0 <= lo <= hi <= 1, got {list(interval)}")
    branches = [cond, uncond] + ([{**uncond, **null_image}] if three else [])
    auto = guide is not None and guide_weight != 1

    def guided_x0(x, t):                                                     # -> (x0_hat, x0(txt))
        if not guided or not lo <= float(t[0]) <= hi:
            x0 = diffusion.denoise(net, x, t, cond)
            return x0, x0
        B, n = x.shape[0], len(branches)
        both = {k: torch.cat([b[k].expand(B, *b[k].shape[1:]) for b in branches]) for k in cond}
        x0 = diffusion.denoise(net, torch.cat([x] * n), torch.cat([t] * n), both).chunk(n)  # n x (B, ...)
        if three:
            return x0[2] + image_scale * (x0[1] - x0[2]) + scale * (x0[0] - x0[1]), x0[0]
        return x0[1] + scale * (x0[0] - x0[1]), x0[0]

    def denoise(x, t):
        x0, x0_cond = guided_x0(x, t)
        if auto:
            x0 = x0 + (guide_weight - 1) * (x0_cond - diffusion.denoise(guide, x, t, cond))
        return x0

    denoise.levels = diffusion.levels
    return denoise


def drop_condition(cond: dict, null_cond: dict, p: float, generator=None) -> dict:
    """Condition dropout for classifier-free guidance training (Ho & Salimans 2022, Alg. 1): each
    sample's cond is replaced, with probability p, by the null condition (every key; null_cond
    rows of batch 1 or B). generator: a torch.Generator, or a seeding.RowGenerators (one draw
    from each sample's own stream: training). Returns a new dict."""
    B = next(iter(cond.values())).shape[0]
    if hasattr(generator, "rand"):                                       # RowGenerators
        drop = generator.rand() < p                                      # (B,)
    else:
        dev = generator.device if generator is not None else None
        drop = torch.rand(B, generator=generator, device=dev) < p          # (B,)
    out = {}
    for k, c in cond.items():
        null = null_cond[k].to(c.device, c.dtype).expand(B, *c.shape[1:])
        out[k] = torch.where(_bcast(drop.to(c.device), c), null, c)
    return out


# ----------------------------------------------------------------------------- samplers

def _levels(denoise, ts, x):
    """alpha_i, sigma_i, lambda_i at every grid time for samples shaped like x, in float64 (exact
    enough near t=0 and 1)."""
    if not hasattr(denoise, "levels"):
        raise TypeError("denoise must carry its path as `denoise.levels` ((t, x) -> (alpha, sigma, "
                        "lambda)); build it with guided_denoiser, or vp_levels for a log-SNR schedule")
    return denoise.levels(ts.double(), x)                                 # 3 x (N+1,)


def _loop(ts, progress, name):
    return tqdm(range(len(ts) - 1), desc=name, disable=not progress, leave=False)


@torch.no_grad()
def sample_ddim(denoise, x, ts, generator=None, progress=False):
    """DDIM, eta = 0 (Song et al. 2021, eq. 12): deterministic, first order in the probability flow.

    For t = ts[i] -> s = ts[i+1]:
        1. x0_hat  = D(x_t, t)
        2. eps_hat = (x_t - alpha_t x0_hat) / sigma_t
        3. x_s     = alpha_s x0_hat + sigma_s eps_hat            (s = 0: x_s = x0_hat)
    """
    alpha, sigma, _ = _levels(denoise, ts, x)
    for i in _loop(ts, progress, "ddim"):
        x0 = denoise(x, ts[i].expand(x.shape[0]))
        if ts[i + 1] == 0:
            x = x0
            continue
        eps = (x - alpha[i] * x0) / sigma[i]
        x = alpha[i + 1] * x0 + sigma[i + 1] * eps
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoise, x, ts, generator=None, progress=False):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): second-order multistep in lambda = logsnr / 2.

    For t = ts[i] -> s = ts[i+1], h = lambda_s - lambda_t:
        1. x0_hat = D(x_t, t)
        2. D = x0_hat on the first step; else, with r = h_prev / h,
           D = (1 + 1/(2r)) x0_hat - 1/(2r) x0_hat_prev
        3. x_s = (sigma_s / sigma_t) x_t - alpha_s (e^{-h} - 1) D  (s = 0: x_s = x0_hat)
    """
    alpha, sigma, lam = _levels(denoise, ts, x)
    x0_prev = h_prev = None
    for i in _loop(ts, progress, "dpmpp_2m"):
        x0 = denoise(x, ts[i].expand(x.shape[0]))
        if ts[i + 1] == 0:
            x = x0
            continue
        h = lam[i + 1] - lam[i]
        if x0_prev is None:
            d = x0
        else:
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
        x = (sigma[i + 1] / sigma[i]) * x - alpha[i + 1] * torch.expm1(-h) * d
        x0_prev, h_prev = x0, h
    return x


@torch.no_grad()
def sample_euler_ancestral(denoise, x, ts, generator=None, progress=False):
    """Ancestral sampling (Ho et al. 2020, eq. 6-7 with x0 = D(x_t, t); = DDIM with eta = 1), written
    as k-diffusion's euler_ancestral: a deterministic step down to sigma_down, then fresh noise of
    std sigma_up, sigma_down^2 + sigma_up^2 = sigma_s^2. Stochastic: draws from `generator`.

    For t = ts[i] -> s = ts[i+1]:
        1. x0_hat     = D(x_t, t),  eps_hat = (x_t - alpha_t x0_hat) / sigma_t
        2. sigma_down = sigma_s^2 alpha_t / (alpha_s sigma_t)   (= sigma_s e^{-(lambda_s - lambda_t)})
           sigma_up   = sqrt(sigma_s^2 - sigma_down^2)          (the std of q(x_s | x_t, x0))
        3. x_s = alpha_s x0_hat + sigma_down eps_hat + sigma_up z,  z ~ N(0, I)  (s = 0: x_s = x0_hat)
    """
    alpha, sigma, _ = _levels(denoise, ts, x)
    for i in _loop(ts, progress, "euler_ancestral"):
        x0 = denoise(x, ts[i].expand(x.shape[0]))
        if ts[i + 1] == 0:
            x = x0
            continue
        eps = (x - alpha[i] * x0) / sigma[i]
        sigma_down = sigma[i + 1] ** 2 * alpha[i] / (alpha[i + 1] * sigma[i])
        sigma_up = (sigma[i + 1] ** 2 - sigma_down ** 2).clamp(min=0).sqrt()
        x = alpha[i + 1] * x0 + sigma_down * eps + sigma_up * _randn(x.shape, x, generator)
    return x


@torch.no_grad()
def sample_heun(denoise, x, ts, generator=None, progress=False):
    """Heun's method (Karras et al. 2022, Alg. 1), second order, on the probability-flow ODE
    written as a rectified flow: any path x_t = alpha x0 + sigma eps is, in y = x / (alpha + sigma)
    and u = sigma / (alpha + sigma), the straight path y = (1 - u) x0 + u eps with velocity
    eps - x0 (for the flow itself y = x and u = t'), so the step is defined at t = 1 (alpha = 0)
    too. Two network calls per step, one on the last.

    For t = ts[i] -> s = ts[i+1], c = alpha + sigma:
        1. x0_1 = D(x_t, t),  d_1 = eps_1 - x0_1                       (s = 0: x_s = x0_1)
        2. y_e = y_t + (u_s - u_t) d_1                                 (Euler: this is DDIM's x_s)
        3. x0_2 = D(c_s y_e, s),  d_2 = eps_2 - x0_2
        4. x_s = c_s (y_t + (u_s - u_t) (d_1 + d_2) / 2)
    """
    alpha, sigma, _ = _levels(denoise, ts, x)
    c = alpha + sigma
    u = sigma / c
    for i in _loop(ts, progress, "heun"):
        x0 = denoise(x, ts[i].expand(x.shape[0]))
        if ts[i + 1] == 0:
            x = x0
            continue
        d1 = (x - alpha[i] * x0) / sigma[i] - x0
        y, du = x / c[i], u[i + 1] - u[i]
        x_e = c[i + 1] * (y + du * d1)
        x0_e = denoise(x_e, ts[i + 1].expand(x.shape[0]))
        d2 = (x_e - alpha[i + 1] * x0_e) / sigma[i + 1] - x0_e
        x = c[i + 1] * (y + du * (d1 + d2) / 2)
    return x


@torch.no_grad()
def invert_ddim(denoise, x, ts, generator=None, progress=False, states=None):
    """Deterministic DDIM inversion (Song et al. 2021, eq. 13 run from data to noise; Tune-A-Video
    and null-text inversion use it): the DDIM step with time running up, ts from 0 to 1, so that
    `sample_ddim` over the reversed grid maps the result back to about x. Not exact by design: each
    step reuses the prediction at its start (the sampler uses the one at its other end), an error
    that shrinks with the step (tests/test_diffusion.py measures it).

    For t = ts[i] -> s = ts[i+1] (t < s):
        1. x0_hat = D(x_t, t), eps_hat = (x_t - alpha_t x0_hat) / sigma_t; at t = 0 the network
           is asked at s instead (it never saw exact data, and eps is undefined there)
        2. x_s = alpha_s x0' + sigma_s eps_hat, x0' = (x_t - sigma_t eps_hat) / alpha_t
    Returns x at ts[-1] (noise when ts[-1] = 1). states: anything with `record_state(t, x)`,
    given every x_s on the way (`cascade.injection.SourceAttention`)."""
    alpha, sigma, _ = _levels(denoise, ts, x)
    for i in _loop(ts, progress, "ddim inversion"):
        j = i + 1 if sigma[i] < 1e-3 else i                                # data: ask at the next level
        x0 = denoise(x, ts[j].expand(x.shape[0]))
        eps = (x - alpha[j] * x0) / sigma[j]
        x = alpha[i + 1] * (x - sigma[i] * eps) / alpha[i] + sigma[i + 1] * eps
        if states is not None:
            states.record_state(ts[i + 1], x)
    return x


INVERSIONS = {"ddim": invert_ddim}


# by name; "euler" is DDIM: for the rectified flow (alpha = 1 - t', sigma = t') the DDIM step is
# exactly Euler's x_s = x_t + (s' - t')(eps - x0), the flow models' usual first-order sampler
SAMPLERS = dict(zip(SAMPLER_NAMES, (sample_ddim, sample_dpmpp_2m, sample_euler_ancestral,
                                    sample_ddim, sample_heun)))
