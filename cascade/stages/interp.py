"""The interp stage: latent frame interpolation (Video LDM, Blattmann et al. 2023, Sec. 3.1.2),
a DiT of the base stage's family conditioned on keyframe latents placed at their frame slots with
a 0/1 mask, noise-augmented (conditioning augmentation)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cascade.config import ConfigError, StageConfig, interp_frames_error
from cascade.stages.base import FRAME_KEYS, BaseStage
from cascade.stages.common import CACHED_TEXT


def keyframe_count(frames: int, rate: int) -> int:
    """K for an interpolation target of N = (K-1)*rate + 1 frames; ValueError for any other N
    (interp cannot reach it: there would be frames after the last keyframe)."""
    err = interp_frames_error(frames, rate)
    if err:
        raise ValueError(f"interp: {err}")
    return (frames - 1) // rate + 1


def interp_condition(keyframes: torch.Tensor, rate: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Video LDM's interpolation input (Blattmann et al. 2023, Sec. 3.1.2): K keyframe latents
    placed at frames 0, r, ..., (K-1)r of an N = (K-1)*r + 1 frame clip, zeros elsewhere, and the
    0/1 mask of those slots. Used by training (keyframes cut from a clip) and by sampling (the
    base stage's keyframes).

    keyframes (B, C, K, h, w), K >= 2 -> frames (B, C, N, h, w), mask (B, 1, N, h, w)."""
    if keyframes.dim() != 5:
        raise ValueError(f"interp_condition: keyframes must be (B, C, K, h, w), got {tuple(keyframes.shape)}")
    B, C, K, h, w = keyframes.shape
    if rate < 1 or K < 2:
        raise ValueError(f"interp_condition: needs K >= 2 keyframes and rate >= 1, got K={K}, rate={rate}")
    N = (K - 1) * rate + 1
    frames = keyframes.new_zeros(B, C, N, h, w)
    frames[:, :, ::rate] = keyframes
    mask = keyframes.new_zeros(B, 1, N, h, w)
    mask[:, :, ::rate] = 1
    return frames, mask                                                   # (B, C, N, h, w), (B, 1, N, h, w)


def keyframe_lerp(keyframes: torch.Tensor, rate: int) -> torch.Tensor:
    """Keyframes (B, C, K, h, w) linearly interpolated in time to N = (K-1)*rate + 1 frames (exact
    at the slots 0, r, 2r, ...): the baseline interp must beat, and what interp.residual adds to."""
    B, C, K, h, w = keyframes.shape
    return F.interpolate(keyframes, size=((K - 1) * rate + 1, h, w), mode="trilinear",
                         align_corners=True)                               # (B, C, N, h, w)


def keyframe_groups(n: int, K: int) -> list[int]:
    """Start indices of the groups of K consecutive keyframes (out of n) that an interp model of K
    keyframes fills in: groups overlap by one keyframe, [0, K-1], [K-1, 2K-2], ...; when (n-1) is
    not a multiple of K-1 the last group is moved back to end at keyframe n-1 (it overlaps its
    neighbour by more than one keyframe). ValueError when n < K (the model cannot take fewer)."""
    if K < 2:
        raise ValueError(f"interp: an interp model needs K >= 2 keyframes, got K={K}")
    if n < K:
        raise ValueError(f"interp: {n} keyframes are fewer than the interp model's K={K}")
    starts = list(range(0, n - K + 1, K - 1))
    if starts[-1] != n - K:
        starts.append(n - K)
    return starts


class InterpStage(BaseStage):
    """Latent frame interpolation DiT (Video LDM Sec. 3.1.2; the DiT family of the base stage).

    From a clip of N = (K-1)*r + 1 latent frames the keyframes 0, r, ..., (K-1)r are noise-augmented
    to a per-sample level t_aug ~ U(0, interp.aug_max) (conditioning augmentation, so the stage is
    robust to the base stage's imperfect keyframes), placed at their slots with a 0/1 mask, and
    given to the network with t_aug (VideoDiT with cond_frames=True). Text is dropped for CFG as
    in the base stage; the keyframes never are. At sampling the keyframes are augmented to the
    fixed level interp.aug_sample (`keyframe_condition` builds the network's input both times).

    Loss: the shared diffusion loss on ALL N frames, keyframe slots included (not mask-weighted):
    at the slots the net learns to reproduce the clean keyframe from its augmented copy, which
    keeps one loss for every stage and lets sampling keep the network's own (denoised) keyframes.

    interp.residual: the diffused signal is (x - keyframe_lerp(clean keyframes)) * residual_scale,
    added back at sampling, as the SR stage's residual. With per-frame latents, linear
    interpolation is already close (tiny cascade: 30.9 dB against 31.2 for the VAE's own
    reconstruction), and a stage that diffuses x itself scored 30.5 dB, below it."""

    name, network = "interp", "dit"
    cond_keys = CACHED_TEXT + FRAME_KEYS
    GROUPS_PER_CALL = 8        # sampling: groups per network batch (a long video's memory stays flat)

    def __init__(self, cfg: StageConfig, device="cpu"):
        if not cfg.dit.cond_frames:
            raise ConfigError("dit.cond_frames: the interp stage needs dit.cond_frames=true")
        super().__init__(cfg, device)                 # frozen VAE, latent-shape check, text, DiT

    def _setup(self, cfg, net, text) -> None:
        super()._setup(cfg, net, text)
        self.rate = cfg.interp.rate
        self.keyframes = keyframe_count(cfg.dit.frames, self.rate)        # K

    # ------------------------------------------------------------------------- conditioning

    def keyframe_condition(self, aug_keys: torch.Tensor, aug_t: torch.Tensor) -> dict:
        """The network's keyframe input: augmented keyframes (B, C, K, h, w) at their slots, their
        mask, and the augmentation level aug_t (B,)."""
        frames, mask = interp_condition(aug_keys, self.rate)   # (B, C, N, h, w), (B, 1, N, h, w)
        return {"frames": frames, "frame_mask": mask, "aug_t": aug_t}

    def to_target(self, x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """What is diffused: x itself, or with interp.residual its scaled residual over the lerp of
        the clean keyframes. x (B, C, N, h, w), keys (B, C, K, h, w)."""
        i = self.cfg.interp
        return (x - keyframe_lerp(keys, self.rate)) * i.residual_scale if i.residual else x

    def from_target(self, y: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """`to_target` undone: a sample of the diffused signal -> latent frames."""
        i = self.cfg.interp
        return keyframe_lerp(keys, self.rate) + y / i.residual_scale if i.residual else y

    # ------------------------------------------------------------------------- training

    @torch.no_grad()
    def prepare(self, batch, gens, device) -> dict:
        inputs = super().prepare(batch, gens, device)  # x0 (B, C, N, h, w), t, noise, text (CFG)
        keys = inputs["x0"][:, :, ::self.rate]                                # (B, C, K, h, w)
        aug_t = gens.rand().to(device) * self.cfg.interp.aug_max          # (B,) ~ U(0, aug_max)
        aug_keys, _ = self.diffusion.noise_augment(keys, aug_t, gens)     # each row its own noise
        inputs["x0"] = self.to_target(inputs["x0"], keys)
        return {**inputs, **self.keyframe_condition(aug_keys, aug_t)}

    # ------------------------------------------------------------------------- sampling

    def sample(self, keys: torch.Tensor, cond: dict, uncond: dict, sampling, generator,
               progress: bool, known: tuple | None = None) -> torch.Tensor:
        """One interp pass: latent keyframes (B, C, n, h, w) -> (B, C, (n-1)*r + 1, h, w).

        The model fills K keyframes into N = (K-1)*r + 1 frames (n and K may differ): it fills
        between consecutive keyframes in groups of K overlapping by one (`keyframe_groups`), all
        groups of all videos sampled as one batch; each output frame is taken from the first group
        that covers it, and every keyframe slot (every r-th frame) holds the keyframe itself.
        The keyframes are noise-augmented once to interp.aug_sample (a keyframe shared by two
        groups gets the same noise in both); the unconditional branch of classifier-free guidance
        carries the same frames / frame_mask / aug_t with only the text nulled.

        known: (latents (B, C, (n-1)*r + 1, h, w), mask (B, (n-1)*r + 1)): frames between the
        keyframes that a frame prompt gives (cascade/conditions.py). Each group's sampler keeps
        them on its path (`keep_known`: the network sees them noised to each level, RePaint's
        known region) and they are the output's frames there."""
        from cascade.diffusion import _randn
        K, r, level = self.keyframes, self.rate, self.cfg.interp.aug_sample
        B, C, n, h, w = keys.shape
        starts = keyframe_groups(n, K)                                   # G groups
        G, N = len(starts), (K - 1) * r + 1
        aug, _ = self.diffusion.noise_augment(keys, level, generator=generator)   # (B, C, n, h, w)
        group = lambda x: torch.stack([x[:, :, s:s + K] for s in starts], 1).flatten(0, 1)  # noqa: E731
        frames = self.keyframe_condition(group(aug), torch.full((B * G,), float(level),
                                                                device=keys.device))
        per_group = torch.arange(B, device=keys.device).repeat_interleave(G)
        c = {**{k: v[per_group] for k, v in cond.items()}, **frames}
        u = {**{k: v[per_group] for k, v in uncond.items()}, **frames}   # only the text nulled
        keep = None
        if known is not None:                      # each group's slice of the given frames
            lat, mask = known[0].to(keys), known[1].to(keys)[:, None, :, None, None]
            span = lambda x: torch.stack([x[:, :, s * r:s * r + N] for s in starts], 1).flatten(0, 1)  # noqa: E731
            keep = (self.to_target(span(lat), group(keys)), span(mask))
        filled = []                                # GROUPS_PER_CALL groups a call: flat memory
        for g0 in range(0, G, self.GROUPS_PER_CALL):
            gs = range(g0, min(G, g0 + self.GROUPS_PER_CALL))
            rows = torch.tensor([b * G + g for b in range(B) for g in gs], device=keys.device)
            noise = _randn((len(rows), C, N, h, w), keys, generator)    # len(gs) rows from each video's stream
            pick = lambda d: {k: v[rows] for k, v in d.items()}          # noqa: E731
            kc = (keep[0][rows], keep[1][rows]) if keep is not None else None
            y = self.denoise(noise, pick(c), pick(u), sampling, generator, progress, known=kc)
            filled.append(self.from_target(y, group(keys)[rows]).view(B, len(gs), C, N, h, w))
        filled = torch.cat(filled, 1)                                    # (B, G, C, N, h, w)
        video = keys.new_zeros(B, C, (n - 1) * r + 1, h, w)
        covered = 0                                                      # frames [0, covered) written
        for g, s in enumerate(starts):
            lo = s * r
            video[:, :, covered:lo + N] = filled[:, g, :, covered - lo:]
            covered = lo + N
        video[:, :, ::r] = keys                                          # the keyframes themselves
        if known is not None:                                            # the given frames themselves
            m = known[1].to(video)[:, None, :, None, None]
            video = m * known[0].to(video) + (1 - m) * video
        return video
