"""The names the project's parts are chosen by, defined once: the cascade's stages, the DiT's model
sizes (DiT, Peebles & Xie 2023, Table 1) and the samplers. No model and no torch here, so the
config, the CLI and the models read them without importing one another."""
from __future__ import annotations

STAGES = ("vae", "base", "interp", "sr")           # in cascade order of training folders
REQUIRED_STAGES = ("vae", "base")                  # a stages folder needs these; interp, sr optional
DIFFUSION_STAGES = ("base", "interp", "sr")        # the stages that sample (steps, guidance, sampler)

DIT_SIZES = {                                      # dit.size: fills hidden / depth / heads
    "S": dict(hidden=384, depth=12, heads=6),
    "B": dict(hidden=768, depth=12, heads=12),
    "L": dict(hidden=1024, depth=24, heads=16),
    "XL": dict(hidden=1152, depth=28, heads=16),
}

# cascade.diffusion.SAMPLERS implements each ("euler": DDIM, which is Euler's method for the flow)
SAMPLER_NAMES = ("ddim", "dpmpp_2m", "euler_ancestral", "euler", "heun")
LONG_MODES = ("plan", "chain")    # how a long video's keyframes are made (cascade/stages/base.py)

# cascade edit --inject: the share of an inverted edit's sampling steps given the source's
# attention maps (cascade/injection.py; measured in docs/editing.md)
EDIT_INJECT = 0.4
