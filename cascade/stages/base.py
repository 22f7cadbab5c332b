"""The base stage: a keyframe DiT on VAE latents (DiT / Sora; Video LDM's keyframe model),
text-conditioned, trained with the shared diffusion loss; at sampling it draws the K latent
keyframes from noise."""
from __future__ import annotations

from dataclasses import replace
import math

import torch

from cascade.config import ConfigError, StageConfig
from cascade.sampling import StageSampling, resolve_sampling
from cascade.stages.common import CACHED_TEXT, DiffusionStage, load_text_encoder, text_condition

FRAME_KEYS = ("frames", "frame_mask", "aug_t")   # the network's frame-condition inputs (dit.cond_frames)
from cascade.stages.vae import load_vae


class BaseStage(DiffusionStage):
    """Keyframe DiT on VAE latents, text-conditioned, trained with the shared diffusion loss.

    Training (`BaseStage(cfg)`): the frozen VAE of train.vae_dir encodes the clips, the frozen text
    encoder their captions (dropped for CFG). Sampling (`from_export`): noise -> keyframe latents.

    dit.cond_frames (prompting with frames, cascade/conditions.py): each training sample is also
    given some of its own latent frames, by a condition type drawn at cfg.cond's rates, noise-
    augmented to t_aug ~ U(0, cond.aug_max) and placed at their slots with a mask (the interp
    stage's input layout); the loss is the shared one on every frame, as interp's."""

    name, network = "base", "dit"

    def __init__(self, cfg: StageConfig, device="cpu"):
        from cascade.models.dit import VideoDiT
        if not cfg.train.vae_dir:
            raise ConfigError(f"train.vae_dir: the {cfg.stage} stage needs the folder of a trained "
                              f"VAE export")
        self.vae, _ = load_vae(cfg.train.vae_dir, device)
        self._check_latents(cfg)
        self._setup(cfg, VideoDiT(cfg.dit), load_text_encoder(cfg, "dit", device))

    def _setup(self, cfg, net, text) -> None:
        super()._setup(cfg, net, text)
        self.frame_prompts = cfg.dit.cond_frames and cfg.stage == "base"
        if self.frame_prompts:
            self.cond_keys = CACHED_TEXT + FRAME_KEYS

    def _check_latents(self, cfg: StageConfig) -> None:
        """The DiT's grid is the VAE latent of the data's clips; packed rows and sequence-parallel
        shards fit every bucket (one-line ConfigErrors naming the key)."""
        d = cfg.data
        expect = tuple(self.vae.latent_shape(d.frames, d.height, d.width))  # (Cz, T', h, w)
        got = (cfg.dit.in_channels, cfg.dit.frames, cfg.dit.height, cfg.dit.width)
        if got != expect:
            raise ConfigError(f"dit: (in_channels, frames, height, width) = {got} does not match the "
                              f"VAE latent of {d.frames}x{d.height}x{d.width} clips, {expect}")
        if cfg.train.pack_tokens:                  # every bucket's clip must fit one row
            for b in cfg.data.buckets or [[d.frames, d.height, d.width]]:
                _, T, h, w = self.vae.latent_shape(*b)
                n = (T // cfg.dit.patch_t) * (h // cfg.dit.patch_h) * (w // cfg.dit.patch_w)
                if n > cfg.train.pack_tokens:
                    raise ConfigError(f"train.pack_tokens: a {'x'.join(map(str, b))} clip makes {n} "
                                      f"tokens, more than a row of {cfg.train.pack_tokens}")
        sp = cfg.train.sequence_parallel
        for b in cfg.data.buckets if sp > 1 else []:   # Ulysses shards each bucket's token frames
            Tp = self.vae.latent_shape(*b)[1] // cfg.dit.patch_t
            if Tp % sp:
                raise ConfigError(f"train.sequence_parallel: a {'x'.join(map(str, b))} bucket makes "
                                  f"{Tp} latent token frames, not divisible by {sp}")

    def to(self, device):
        self.vae.to(device)
        self.text.to(device)
        return self

    # ------------------------------------------------------------------------- training

    @torch.no_grad()
    def prepare(self, batch, gens, device) -> dict:
        """A batch of clips, or of their cached encodings (cascade cache: latent_mean, text, ...;
        the encoders are skipped and the inputs are the same as encoding the clips here).
        gens: the batch's RowGenerators (`seeding.sample_generators`)."""
        cached = "latent_mean" in batch
        packed = self.cfg.train.pack_tokens > 0 and not cached    # NaViT: a list of clips of any shapes
        if cached:                                 # the posterior's mode, scaled (encode_latents)
            x0 = batch["latent_mean"].to(device) * self.vae.scaling_factor    # (B, Cz, T', h, w)
        elif packed:                               # each clip encoded at its own shape
            x0 = [self.vae.encode_latents(v[None].to(device))[0] for v in batch["video"]]
        else:
            x0 = self.vae.encode_latents(batch["video"].to(device))           # (B, Cz, T', h, w)
        cond = text_condition(self.text, batch["caption"], gens, self.cfg.diffusion.cond_drop, device,
                              {k: batch[k] for k in CACHED_TEXT} if cached else None)
        t = self.diffusion.draw_t(gens, device=device)                    # (B,)
        if packed:                                 # the same draws as gens.randn, per clip
            noise = [torch.randn(x.shape, generator=g).to(device) for x, g in zip(x0, gens)]
        else:
            noise = gens.randn((len(gens), *x0.shape[1:])).to(device)
        if self.frame_prompts:
            loops = [bool(m.get("loop")) for m in batch.get("meta", [])]
            cond.update(self.training_frames(x0, gens, loops))
        return {"x0": x0, "t": t, "noise": noise, **cond}

    def training_frames(self, x0: torch.Tensor, gens, loops: list[bool] = ()) -> dict:
        """The frame prompt of each training sample (`conditions.training_mask`): its given latent
        frames, noise-augmented, at their slots, their mask and the augmentation level (0 where
        nothing is given). A loop clip (data.loops) is always given its first and last frame, the
        loop task's prompt, so a text-only video never learns to wrap around. x0 (B, C, T, h, w)
        -> frames, frame_mask (B, 1, T, 1, 1), aug_t (B,)."""
        from cascade.conditions import training_mask
        mask = training_mask(self.cfg.cond, gens, x0.shape[2]).to(x0.device)   # (B, T)
        for i in [i for i, loop in enumerate(loops) if loop]:
            mask[i] = 0
            mask[i, 0] = mask[i, -1] = 1
        aug_t = gens.rand().to(x0.device) * self.cfg.cond.aug_max * (mask.sum(1) > 0)
        aug, _ = self.diffusion.noise_augment(x0, aug_t, gens)            # each row its own noise
        mask = mask[:, None, :, None, None]                                # (B, 1, T, 1, 1)
        return {"frames": aug * mask, "frame_mask": mask, "aug_t": aug_t}

    def loss(self, net, inputs):
        if isinstance(inputs["x0"], list):         # packed (train.pack_tokens)
            cond = {k: inputs[k] for k in CACHED_TEXT}
            loss = self.diffusion.packed_loss(net, inputs["x0"], cond, inputs["t"], inputs["noise"],
                                              self.cfg.train.pack_tokens)
            return loss, {"mse": loss.detach()}
        return super().loss(net, inputs)

    # ------------------------------------------------------------------------- sampling

    def sample(self, shape: tuple, cond: dict, uncond: dict, sampling, generator, progress: bool,
               given: tuple | None = None, start: tuple | None = None, backward: bool = False,
               reference=None):
        """Latent keyframes (B, Cz, Kb, h, w) = shape from noise drawn from `generator` (each
        video's own stream, `seeding.RowGenerators`).

        given: (latents (B, Cz, Kb, h, w), mask (B, Kb)), the keyframes a frame prompt fixes
        (cascade/conditions.py), or None. A base trained with dit.cond_frames takes them noise-
        augmented to cond.aug_sample through its frame inputs (zeros and level 0 when nothing is
        given: its text-to-video branch), guided three-way when cond.image_guidance says so; the
        sampler keeps the given keyframes on its path and lands on them exactly
        (`diffusion.keep_known`). start: (source keyframes, strength) for SDEdit. More keyframes
        than dit.frames: `sample_windows` (backward: its windows fill from the end)."""
        from cascade.diffusion import _randn
        if shape[2] > self.cfg.dit.frames:
            if reference is not None:
                raise ValueError(f"--inject: {shape[2]} keyframes are more than the base's "
                                 f"{self.cfg.dit.frames} (one window); use fewer --frames")
            return self.sample_windows(shape, cond, uncond, sampling, generator, progress, given,
                                       start, backward)
        like = next(self.net.parameters())                                 # float32, the net's device
        noise = _randn(shape, like.new_empty(()), generator)
        null = None
        if given is not None and not self.frame_prompts:
            raise ValueError(f"this base stage was not trained for frame prompts (dit.cond_frames="
                             f"false): it cannot be given frames (fine-tune it with "
                             f"dit.cond_frames=true, README)")
        known = None
        if self.frame_prompts:
            frames, null = self.frame_inputs(given, noise, generator)
            cond, uncond = {**cond, **frames}, {**uncond, **frames}
        if given is not None:                      # kept along the sampler's path, exact at t = 0
            known = (given[0], given[1].to(noise.dtype)[:, None, :, None, None])
        null = null if given is not None else None     # nothing given: no image term to guide
        return self.denoise(noise, cond, uncond, sampling, generator, progress, null, known,
                            start, reference)                              # (B, Cz, Kb, h, w)

    @torch.no_grad()
    def invert(self, latents: torch.Tensor, cond: dict, uncond: dict, sampling, strength: float = 1.0,
               progress: bool = False, states=None) -> torch.Tensor:
        """Keyframe latents (B, Cz, Kb, h, w) -> the same at noise level `strength` by DDIM
        inversion with their caption's `cond` at guidance 1 (Tune-A-Video; `Diffusion.invert`), over
        the sampling's steps: `sample(..., start=(result, strength, True))` with the DDIM sampler
        and the same steps gives about them back (an edited prompt: the edit). states: a
        `cascade.injection.SourceAttention` to keep the way for the edit's attention injection."""
        if latents.shape[2] > self.cfg.dit.frames:
            raise ValueError(f"--inversion ddim: {latents.shape[2]} keyframes are more than the base's "
                             f"{self.cfg.dit.frames} (one window); use fewer --frames")
        s = resolve_sampling(sampling, config=self.cfg.diffusion)
        if self.frame_prompts:                     # nothing given: the text-only branch
            null, _ = self.frame_inputs(None, latents, None)
            cond, uncond = {**cond, **null}, {**uncond, **null}
        return self.diffusion.invert(self.net, latents, cond, uncond, steps=s.steps, guidance=1.0,
                                     progress=progress, strength=strength, states=states)

    def sample_windows(self, shape: tuple, cond: dict, uncond: dict, sampling, generator,
                       progress: bool, given: tuple | None = None, start: tuple | None = None,
                       backward: bool = False) -> torch.Tensor:
        """Keyframes beyond the base's dit.frames (W), window by window (`window_schedule`): each
        window of W keyframes holds up to cond.k_max keyframes already made or given as its frame
        prompt; they stay in latent space (no decode and re-encode) and are kept exactly. A text-
        only long video with the sampling's `long` = plan first makes W keyframes spread over the
        whole video. Windows are sampled one after the other, each drawing its noise from the
        videos' streams, so the cost grows linearly with the keyframes. The given mask must be the
        same for every video (a call's conditions are). Chained windows after the first sample
        without autoguidance: with it their joins jumped (long videos, seed 0: seam 1.92 against
        1.28 with the guide in the first window only, 1.35 with none); planned ones keep it (seeds
        0 / 1: seam 1.38 / 1.46 against 1.41 / 1.50 without it after the plan). -> (B, Cz, Kb, h, w)."""
        if not self.frame_prompts:
            raise ValueError(f"frames: {shape[2]} keyframes are more than this base's "
                             f"{self.cfg.dit.frames}, and it was not trained for frame prompts "
                             f"(dit.cond_frames), which long videos take their context from")
        B, Cz, Kb, h, w = shape
        W, C = self.cfg.dit.frames, min(self.cfg.cond.k_max, self.cfg.dit.frames - 1)
        dev = next(self.net.parameters()).device
        latents = torch.zeros(shape, device=dev) if given is None else given[0].to(dev).clone().float()
        known = torch.zeros(Kb, dtype=torch.bool) if given is None else given[1][0].bool().clone()
        plan = self.plans(sampling, given, start, backward)
        steps = resolve_sampling(sampling, config=self.cfg.diffusion).window_steps  # None: the steps
        for n, (win, made) in enumerate(window_schedule(known.tolist(), W, C, backward, plan)):
            mask = known[win].float().expand(B, W)
            g = (latents[:, :, win], mask) if known[win].any() else None
            st = (start[0][:, :, win], start[1]) if start is not None else None
            s = sampling if n == 0 or plan else replace(StageSampling.of(sampling), autoguidance=1.0)
            if n and steps:
                s = replace(StageSampling.of(s), steps=steps)
            out = self.sample((B, Cz, W, h, w), cond, uncond, s, generator, progress, g, st).float()
            keep = [win.index(k) for k in made]
            latents[:, :, made] = out[:, :, keep]
            known[made] = True
        return latents

    def plans(self, sampling, given=None, start=None, backward: bool = False) -> bool:
        """Whether `sample_windows` plans a video first (`window_schedule`): text only (no given
        frames, no SDEdit start, forward) with the sampling's `long` (else the config's) plan;
        frame prompts chain from their given frames."""
        return (resolve_sampling(sampling, config=self.cfg.diffusion).long == "plan" and given is None
                and start is None and not backward)

    def frame_inputs(self, given, like: torch.Tensor, generator) -> tuple[dict, dict]:
        """The network's frame inputs for `given` (None: nothing given) and those of "nothing
        given" (three-way guidance's null branch): frames (B, C, Kb, h, w), frame_mask
        (B, 1, Kb, 1, 1), aug_t (B,)."""
        B, _, Kb = like.shape[:3]
        null = {"frames": torch.zeros_like(like), "frame_mask": like.new_zeros(B, 1, Kb, 1, 1),
                "aug_t": like.new_zeros(B)}
        if given is None:
            return null, null
        latents, mask = given[0].to(like), given[1].to(like)               # (B, C, Kb, h, w), (B, Kb)
        level = self.cfg.cond.aug_sample * (mask.sum(1) > 0).to(like)      # (B,)
        aug, aug_t = self.diffusion.noise_augment(latents, level, generator)
        mask = mask[:, None, :, None, None]
        return {"frames": aug * mask, "frame_mask": mask, "aug_t": aug_t}, null


def window_schedule(known: list[bool], W: int, C: int, backward: bool = False,
                    plan: bool = False) -> list[tuple[list[int], list[int]]]:
    """The windows that make a video's unknown keyframes with a base of W keyframes, in sampling
    order: [(the window's W keyframe indices, the unknown ones it makes)]. Each window takes up to
    C keyframes before its first unknown one as context (backward: after its last), Video LDM's
    prediction model; a forward window keeps only the unknown keyframes before the last known one
    it holds (those after it are made again by the next window, with that keyframe in its context).

    plan (a text-only long video: nothing known): NUWA-XL's coarse to fine ("Diffusion over
    Diffusion", Yin et al. 2023). A first window spreads its W keyframes over the whole video;
    finer lattices follow, each holding the coarser one with its gaps divided evenly, the finest
    (every keyframe) dividing them by W - C (4); each is filled by the windows above, run over
    the lattice's keyframes as if they were consecutive: a window holds C made keyframes of
    context, the new ones after them and the next coarser keyframe, an evenly spaced clip with its
    past and its goal. The video's course is laid down once: an object's motion is spread over the
    whole video, as in the data's long clips (`synthetic.place` keeps the whole path in frame),
    instead of running out of the frame after two windows."""
    known, Kb, out = list(known), len(known), []
    if plan and not any(known) and Kb > W:
        f, r, levels = W - C, (Kb - 1) / (W - 1), 0                     # r: the plan's spacing
        while r > f:                                                      # r -> r / f ... -> f -> 1
            r, levels = r / f, levels + 1
        divide = [math.ceil(r)] + [f] * (levels - 1) if levels else []    # each coarse lattice's gaps by
        lattice = _spread([0, Kb - 1], W - 1)                             # the plan: W keyframes
        for k in divide:
            out += _fill(lattice, known, W, C, False, reach=True)
            lattice = _spread(lattice, k)
        out += _fill(lattice, known, W, C, False, reach=True)
    return out + _fill(list(range(Kb)), known, W, C, backward, reach=bool(plan))


def _spread(points: list[int], k: int) -> list[int]:
    """points (sorted keyframe indices) with each gap divided into k even parts (rounded)."""
    out = set(points)
    for p, q in zip(points, points[1:]):
        out.update(p + (2 * i * (q - p) + k) // (2 * k) for i in range(1, k))
    return sorted(out)


def _fill(lattice: list[int], known: list[bool], W: int, C: int, backward: bool,
          reach: bool) -> list[tuple[list[int], list[int]]]:
    """`window_schedule`'s windows over the keyframes `lattice` (taken as consecutive), marking
    what they make in `known`; nothing known: one window of its first W. reach: a window that
    would stop short of the next known keyframe moves up to it, keeping less context."""
    out, L = [], len(lattice)
    while not all(known[k] for k in lattice):
        unknown = [i for i in range(L) if not known[lattice[i]]]
        if backward:
            a = max(0, min(L, unknown[-1] + 1 + C) - W)
        else:
            u0 = unknown[0]
            a = min(max(0, u0 - C), L - W)
            nxt = next((i for i in range(u0, L) if known[lattice[i]]), None)   # the next known one
            if reach and nxt is not None and a + W <= nxt and nxt - W + 1 <= u0 - 1:
                a = nxt - W + 1
        win = lattice[a:a + W]
        last = None if backward else max((k for k in win if known[k] and k > lattice[u0]), default=None)
        made = [k for k in win if not known[k] and (last is None or k < last)]
        out.append((win, made))
        for k in made:
            known[k] = True
    return out


def window_joins(Kb: int, W: int, C: int, plan: bool) -> list[int]:
    """The keyframes of a text-only video of Kb keyframes made by another window than the keyframe
    before them (`window_schedule`): where a seam could show."""
    owner = [0] * Kb
    for n, (_, made) in enumerate(window_schedule([False] * Kb, W, C, False, plan)):
        for k in made:
            owner[k] = n
    return [k for k in range(1, Kb) if owner[k] != owner[k - 1]]
