"""The shipped weights make the same videos as they did when the reference was written, within
what another CPU, BLAS build or thread count moves them.

weights/tiny (vae, base, interp, sr: the whole cascade) samples three prompts, 4 steps per stage,
seed 0, one video each, batch_size 1, on one thread. Compared with tests/data/regression.safetensors:
the base keyframe latents, what the interp stage adds to them, eight fp32 statistics of the decoded low-res and
of the final video, and the final video as uint8 (cascade.video_io.to_uint8, what an mp4 is
written from).

The bounds (BOUNDS) hold across machines, not bit equality: which SIMD and BLAS kernels a CPU
picks changes float rounding (the reference before this one was written on another machine: a
2-core Xeon made interp latents 8.9e-6 away from it, this AMD EPYC 3.1e-5). How they were measured (`python -m tests.test_regression --measure`, which prints
the table): the outputs were made in fresh processes under each of
    2 threads instead of 1;
    ATEN_CPU_CAPABILITY=default and =avx2 (PyTorch's non-vectorised and AVX2 kernels instead of
        AVX-512), with MKL_ENABLE_INSTRUCTIONS=AVX2 and DNNL_MAX_CPU_ISA=AVX2 (the BLAS and
        oneDNN of an older CPU);
    torch.backends.mkldnn disabled (PyTorch's own convolutions instead of oneDNN's);
    batch_size 3 instead of 1 (other GEMM shapes and float orders);
and compared with the reference. On this machine (AMD EPYC, torch 2.14.1, 2026-12-06, the wide
flow base with the 17,500-step decoder shipped that day) the worst of them moved the keyframe
latents by 2.3e-6 relative (max |diff| / max |ref|; non-vectorised ATen kernels), interp's residual
by 2.5e-5 (the same), the video statistics by 9e-7 (AVX2), and no uint8 value by more than 1
level. The bounds are 130x, 20x and 110x those (3e-4, 5e-4, 1e-4), and at most 0.5% of the uint8
values more than one level off, none by more than 8. `test_the_bounds_catch_a_changed_weight`
shows they still catch a change: one layer per stage scaled by 1.001 moved the keyframes by
1.0e-3 (base MLP), interp's residual by 2.2e-3 (an attention projection), the statistics by
9.3e-4 (the VAE's last conv) and 6.2e-4 (SR's last conv), each over 3x its bound.

The base samples here at guidance 2.5 at every step (BASE_SAMPLING), not at its config's default
(4.5 at t >= 0.4): at 4 steps the stronger guidance carries rounding much further (the same
variations moved the keyframes by 5.6e-5, interp's residual by 1.8e-4 and the statistics by
3.5e-4, against a 1.001 change of SR's last conv at 5.8e-4), so no bound could tell rounding from
a changed weight. It samples without autoguidance too (its guide, base/guide, is
weights/tiny-flow/base, checked by its own SHA256SUMS when it loads; the autoguided denoiser is
tests/test_diffusion.py's and test_pipeline.py's). The weights and every other code path are the
same; the default sampling itself is measured by `cascade eval` (docs/tiny-cascade.md).

The reference was last rewritten on 2026-12-07 for the VAE decoder's stage 5 (trained on objects
cut by the frame's edge), after the base with a global attention grown into it
(dit.attention=global, docs/tiny-cascade.md); the bounds are the ones measured above.

Regenerate the reference only when a change is meant to change the videos:

    OMP_NUM_THREADS=1 python -m tests.test_regression --write
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / "weights" / "tiny"
REFERENCE = Path(__file__).resolve().parent / "data" / "regression.safetensors"
PROMPTS = ("a red circle moving left on a blue background",
           "a green square moving up on a white background",
           "a yellow triangle moving right on a gray background")
# relative bounds (max |made - ref| / max |ref|) and the uint8 video's: see the docstring
BOUNDS = {"keyframes_latent": 3e-4, "interp_residual": 5e-4, "stats": 1e-4}
VIDEO_LEVELS, VIDEO_SHARE, VIDEO_MAX = 1, 0.005, 8
# the base's guidance, fixed here rather than read from its config (see the docstring)
BASE_SAMPLING = {"guidance": 2.5, "guidance_interval": (0.0, 1.0), "autoguidance": 1.0}
# fresh-process variations measured by --measure: name -> (environment, threads, batch_size, mkldnn)
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "DNNL_MAX_CPU_ISA": "AVX2"}
VARIATIONS = {"2 threads": ({}, 2, 1, True),
              "AVX2 kernels, BLAS and oneDNN": (AVX2, 1, 1, True),
              "non-vectorised ATen kernels": ({"ATEN_CPU_CAPABILITY": "default"}, 1, 1, True),
              "oneDNN off": ({}, 1, 1, False),
              "batch_size 3": ({}, 1, 3, True)}
# one layer per stage, scaled by 1.001 in test_the_bounds_catch_a_changed_weight
PERTURBED = {"base": "blocks.1.mlp.2.weight", "interp": "blocks.2.attn.proj.weight",
             "vae": "decoder.conv_out.weight", "sr": "conv_out.ws"}

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


def outputs(pipe=None, batch_size: int = 1) -> dict[str, torch.Tensor]:
    """The tensors the reference holds, made by the code as it is now: per prompt i,
    keyframes_latent_i (Cz, Kb, h, w), interp_latent_i (Cz, T', h, w), stats_i (8,) = mean, std,
    min, max of the low-res video then of the final video, and video_i (T, H, W, 3) uint8."""
    from cascade.pipeline import Pipeline
    from cascade.video_io import to_uint8
    pipe = Pipeline(WEIGHTS) if pipe is None else pipe
    res = pipe(list(PROMPTS), seed=0, steps=4, num_videos=1, batch_size=batch_size, progress=False,
               base=BASE_SAMPLING)
    s, out = res.stages, {}
    for i in range(len(PROMPTS)):
        out[f"keyframes_latent_{i}"] = s["keyframes_latent"][i].float().contiguous()
        out[f"interp_latent_{i}"] = s["interp_latent"][i].float().contiguous()
        stats = [f(s[k][i].double()) for k in ("lowres", "final")
                 for f in (torch.mean, torch.std, torch.min, torch.max)]
        out[f"stats_{i}"] = torch.stack(stats).float()
        out[f"video_{i}"] = torch.from_numpy(to_uint8(res.video[i]))
    return out


def differences(made: dict, ref: dict) -> dict[str, float]:
    """Per kind of output, the worst over the prompts: keyframe latents, stats and interp_residual
    (what the interp stage adds to the keyframes' linear interpolation: the interp latents are
    mostly that lerp, which hides interp's own part) as max |diff| / max |ref|; the video as
    video_share (share of uint8 values more than VIDEO_LEVELS off) and video_max (the largest
    difference in levels)."""
    from cascade.stages.interp import keyframe_lerp
    if set(made) != set(ref):
        raise AssertionError(f"outputs {sorted(made)} differ from the reference's {sorted(ref)}")
    made, ref, out = dict(made), dict(ref), {}
    for d in (made, ref):
        for i in range(len(PROMPTS)):
            keys = d[f"keyframes_latent_{i}"]
            rate = (d[f"interp_latent_{i}"].shape[1] - 1) // (keys.shape[1] - 1)
            d[f"interp_residual_{i}"] = d.pop(f"interp_latent_{i}") - keyframe_lerp(keys[None], rate)[0]
    for name in sorted(ref):
        kind = name.rsplit("_", 1)[0]
        a, b = made[name], ref[name]
        if a.shape != b.shape:
            raise AssertionError(f"{name}: shape {tuple(a.shape)} != the reference's {tuple(b.shape)}")
        if kind == "video":
            d = (a.int() - b.int()).abs()
            vals = {"video_share": (d > VIDEO_LEVELS).float().mean().item(), "video_max": d.max().item()}
        else:
            vals = {kind: ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()}
        for k, v in vals.items():
            out[k] = max(out.get(k, 0.0), v)
    return out


def violations(made: dict, ref: dict) -> list[str]:
    """What lies outside the bounds, one line each (empty: the videos are the reference's)."""
    d = differences(made, ref)
    bad = [f"{k}: relative difference {d[k]:.3g} > {b:g}" for k, b in BOUNDS.items() if d[k] > b]
    if d["video_share"] > VIDEO_SHARE:
        bad.append(f"video: {d['video_share']:.3%} of the uint8 values are more than {VIDEO_LEVELS} "
                   f"level(s) off (at most {VIDEO_SHARE:.1%})")
    if d["video_max"] > VIDEO_MAX:
        bad.append(f"video: a value is {d['video_max']:.0f} levels off (at most {VIDEO_MAX})")
    return bad


def write(path: Path = REFERENCE, batch_size: int = 1) -> None:
    from safetensors.torch import save_file
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(outputs(batch_size=batch_size), str(path))
    print(f"wrote {path} ({path.stat().st_size} bytes)")


def made_in_fresh_process(path: Path, env: dict | None = None, threads: int = 1, batch_size: int = 1,
                          mkldnn: bool = True) -> dict:
    """outputs() made by `python tests/test_regression.py --write path` in a new interpreter (as a
    `cascade sample` process makes them) under the environment and settings given."""
    from safetensors.torch import load_file
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), **(env or {})}
    args = [sys.executable, str(Path(__file__).resolve()), "--write", str(path),
            f"--threads={threads}", f"--batch-size={batch_size}"] + ([] if mkldnn else ["--no-mkldnn"])
    subprocess.run(args, cwd=REPO, env=env, check=True, timeout=600, capture_output=True)
    return load_file(str(path))


def measure() -> None:
    """Print how far each variation (VARIATIONS) moves the outputs from the reference."""
    import tempfile
    from safetensors.torch import load_file
    ref = load_file(str(REFERENCE))
    with tempfile.TemporaryDirectory() as tmp:
        rows = {"same settings": made_in_fresh_process(Path(tmp) / "same.safetensors")}
        for name, (env, threads, bs, mkldnn) in VARIATIONS.items():
            rows[name] = made_in_fresh_process(Path(tmp) / "v.safetensors", env, threads, bs, mkldnn)
    print(f"{'variation':<32} {'keyframes':>10} {'interp':>10} {'stats':>10} {'video >1':>9} {'max':>4}")
    for name, made in rows.items():
        d = differences(made, ref)
        print(f"{name:<32} {d['keyframes_latent']:10.3g} {d['interp_residual']:10.3g} "
              f"{d['stats']:10.3g} {d['video_share']:9.3%} {d['video_max']:4.0f}")


@pytest.fixture(scope="module")
def reference():
    from safetensors.torch import load_file
    if not (WEIGHTS / "sr" / "model.safetensors").is_file():
        pytest.skip("weights/tiny is not in this checkout")
    return load_file(str(REFERENCE))


def test_shipped_weights_make_the_reference_videos(reference, tmp_path):
    """Made in a fresh interpreter on one thread, as a `cascade sample` process makes them."""
    made = made_in_fresh_process(tmp_path / "made.safetensors")
    bad = violations(made, reference)
    assert not bad, "the shipped weights' videos changed: " + "; ".join(bad)


@pytest.mark.parametrize("stage", PERTURBED)
def test_the_bounds_catch_a_changed_weight(reference, stage):
    """One layer of one stage scaled by 1.001 (in this process: the bounds also cover what
    process-wide state moves) is caught, so the looser bounds still see real changes."""
    from cascade.pipeline import Pipeline
    pipe = Pipeline(WEIGHTS)
    net = pipe.vae if stage == "vae" else getattr(pipe, stage).net
    with torch.no_grad():
        net.get_parameter(PERTURBED[stage]).mul_(1.001)
    assert violations(outputs(pipe), reference), f"scaling {stage}'s {PERTURBED[stage]} by 1.001 " \
                                                 f"was not caught"


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(prog="python -m tests.test_regression")
    ap.add_argument("--write", nargs="?", const=str(REFERENCE), metavar="PATH")
    ap.add_argument("--measure", action="store_true", help="print the variations' differences")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--no-mkldnn", action="store_true")
    a = ap.parse_args()
    if bool(a.write) == a.measure:
        sys.exit("usage: python -m tests.test_regression --write [PATH] | --measure")
    torch.set_num_threads(a.threads)
    torch.backends.mkldnn.enabled = not a.no_mkldnn
    if a.measure:
        measure()
    else:
        write(Path(a.write), a.batch_size)
