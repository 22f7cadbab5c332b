"""The source's attention carried into its edit (attention injection).

Editing by DDIM inversion samples back from the source's inverted noise with the edited prompt,
but guidance at the edit's scale moves the layout away from the source's: on the embedded domain
a colour edit by inversion alone changes the colour every time and moves the object's track by
0.18 of the frame (docs/editing.md). Plug-and-Play (Tumanyan et al. 2023, Sec. 4) keeps the
structure by running the source alongside the edit and giving the edit the source's
self-attention maps (its queries and keys) in the first part of sampling, while the values (what
the tokens carry: colour, texture) stay the edit's; Prompt-to-Prompt (Hertz et al. 2022) keeps it
through the cross-attention maps; FateZero (Qi et al. 2023) stores the maps during the inversion
itself, and diffusers' CogVideoX DDIM inversion script shares the reference's keys and values for
the same reason. Here:

    1. the inversion (`Diffusion.invert`) records the source's latent x_t at every time of the
       grid (`states`) and the condition it was inverted with (`cond`: its caption);
    2. at each of the first `fraction` of the edit's sampling steps, the denoiser first runs the
       network on the source's x_t with that condition, each self-attention layer (spatial and
       temporal alike) saving its (q, k) after the rotary positions and each cross-attention
       layer its queries;
    3. then runs the edit (every guidance branch) with each layer's saved tensors in place of
       its own: the source's self-attention pattern over the edit's values, and the source's
       tokens asking the edited prompt (whose keys and values are the edit's: where the new
       words enter).

Measured (docs/editing.md, colour edits of rendered clips): self-attention alone at half the
steps moved the track 0.128 (8 clips); with the cross-attention queries too, 0.096 (16 clips;
inversion alone 0.177). On 32 clips x 3 seeds the share trades the edit against the path: at 0.4
(the default, registry.EDIT_INJECT) 94-100% of colours change at track 0.098-0.104, at 0.5 84-91%
at 0.062-0.096; a colour lost is an object that fades out in some frame."""
from __future__ import annotations

from contextlib import contextmanager

import torch

from cascade.sampling import check_number


class SourceAttention:
    """The source's inversion states and its attention maps, shared with the edit's first
    `fraction` (in [0, 1]) of sampling steps: every self-attention's (q, k) and, with `cross`,
    every cross-attention's queries (the maps to the edited prompt's tokens are then the
    source's tokens asking). Give it to `Diffusion.invert(states=...)` (with the cond used) and
    then to `Diffusion.sample(reference=...)` over the same grid."""

    def __init__(self, fraction: float, cross: bool = True):
        check_number("--inject", fraction, 0, 1)
        self.fraction = float(fraction)
        self.cross = cross                                   # the cross-attention's queries too
        self.states: dict[float, torch.Tensor] = {}          # t -> the source's x_t (B, ...)
        self.cond: dict | None = None                        # what it was inverted with
        self.mode: str | None = None                         # None | record | inject
        self.saved: list[tuple[torch.Tensor, ...]] = []
        self.i = 0
        self.injected: list[float] = []                      # the times the edit took the maps at

    @staticmethod
    def key(t) -> float:
        """A time as the states are keyed (t: a number, or a tensor whose entries are equal)."""
        return round(float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t), 6)

    def record_state(self, t, x: torch.Tensor) -> None:
        self.states[self.key(t)] = x.detach().clone()

    def __call__(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Called by every attention layer hooked with what decides its maps, in call order:
        self-attention (q, k), (B, T, S, h, d) each; cross-attention (q,), (B, N, h, d)."""
        if self.mode == "record":
            self.saved.append(xs)
        elif self.mode == "inject":
            if self.i >= len(self.saved):
                raise RuntimeError("attention injection: the edit ran more attention layers than "
                                   "the source")
            src = self.saved[self.i]
            self.i += 1
            q, qs = xs[0], src[0]
            if q.shape[1:] != qs.shape[1:] or q.shape[0] % qs.shape[0]:
                raise ValueError(f"attention injection: the edit's tokens {tuple(q.shape)} do not "
                                 f"match the source's {tuple(qs.shape)}")
            n = q.shape[0] // qs.shape[0]                    # guidance branches, batched as cat
            return tuple(a.repeat((n,) + (1,) * (a.dim() - 1)) for a in src)
        return xs

    @contextmanager
    def hooked(self, net):
        """Every self-attention layer of `net` (and cross-attention layer, with `cross`) calls
        this object while inside."""
        from cascade.models.dit import CrossAttention, SelfAttention
        kinds = (SelfAttention, CrossAttention) if self.cross else SelfAttention
        layers = [m for m in net.modules() if isinstance(m, kinds)]
        if not layers:
            raise ValueError(f"--inject: the base network ({type(net).__name__}) has no "
                             f"self-attention layers to share")
        for m in layers:
            m.inject = self
        try:
            yield
        finally:
            for m in layers:
                m.inject = None
            self.mode, self.saved, self.i = None, [], 0

    def wrap(self, denoise, net, diffusion):
        """`denoise(x, t)` with the source's maps injected at the first `fraction` of the times
        the inversion recorded (noise first); the rest as it was."""
        from cascade.diffusion import guided_denoiser
        if self.cond is None or not self.states:
            raise ValueError("attention injection: the source was not inverted with these states "
                             "(give the same object to invert first)")
        times = sorted(self.states, reverse=True)
        inject = set(times[:round(self.fraction * len(times))])
        source = guided_denoiser(net, self.cond, None, 1.0, diffusion)

        def wrapped(x, t):
            key = self.key(t)
            if key not in inject:
                return denoise(x, t)
            ref = self.states[key]
            self.injected.append(key)
            with self.hooked(net):
                self.mode = "record"
                source(ref, t[:ref.shape[0]] if isinstance(t, torch.Tensor) and t.dim() else t)
                self.mode, self.i = "inject", 0
                return denoise(x, t)
        wrapped.levels = denoise.levels
        return wrapped
