"""The shipped weights make the same videos as they did when the reference was written.

weights/tiny (vae, base, interp, sr: the whole cascade) samples three prompts, 4 steps per stage,
seed 0, one video each, batch_size 1, on one thread. Compared with tests/data/regression.safetensors:
the base keyframe latents and the interp latents (fp32, within 1e-6), a few fp32 statistics of
the decoded low-res video and of the final video (within 1e-6), and the SHA-256 of the final
video as uint8 (cascade.video_io.to_uint8, what an mp4 is written from: equal bytes).

The reference was written by the code before issue 16's refactor (stage classes shared by
training and sampling). Regenerate it only when a change is meant to change the videos:

    OMP_NUM_THREADS=1 python -m tests.test_regression --write
"""
from __future__ import annotations

import hashlib
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
TOL = 1e-6

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


def outputs() -> dict[str, torch.Tensor]:
    """The tensors the reference holds, made by the code as it is now: per prompt i,
    keyframes_latent_i (Cz, Kb, h, w), interp_latent_i (Cz, T', h, w), stats_i (8,) = mean, std,
    min, max of the low-res video then of the final video, and sha256_i (32,) uint8."""
    from cascade.pipeline import Pipeline
    from cascade.video_io import to_uint8
    pipe = Pipeline(WEIGHTS)
    out = {}
    for i, prompt in enumerate(PROMPTS):
        res = pipe(prompt, seed=0, steps=4, num_videos=1, batch_size=1, progress=False)
        s = res.stages
        out[f"keyframes_latent_{i}"] = s["keyframes_latent"][0].float().contiguous()
        out[f"interp_latent_{i}"] = s["interp_latent"][0].float().contiguous()
        stats = [f(s[k][0].double()) for k in ("lowres", "final")
                 for f in (torch.mean, torch.std, torch.min, torch.max)]
        out[f"stats_{i}"] = torch.stack(stats).float()
        digest = hashlib.sha256(to_uint8(res.video[0]).tobytes()).digest()
        out[f"sha256_{i}"] = torch.frombuffer(bytearray(digest), dtype=torch.uint8).clone()
    return out


def write(path: Path = REFERENCE) -> None:
    from safetensors.torch import save_file
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(outputs(), str(path))
    print(f"wrote {path} ({path.stat().st_size} bytes)")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The outputs, made in a fresh interpreter on one thread, as a `cascade sample` process makes
    them: earlier tests in this pytest process change process-wide state (after the in-process
    DeepSpeed runs of tests/test_parallel.py the interp latents moved by 9e-6), which says nothing
    about the code under test."""
    from safetensors.torch import load_file
    if not (WEIGHTS / "sr" / "model.safetensors").is_file():
        pytest.skip("weights/tiny is not in this checkout")
    path = tmp_path_factory.mktemp("regression") / "made.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--write", str(path)], cwd=REPO,
                   env=env, check=True, timeout=600, capture_output=True)
    return load_file(str(path))


def test_shipped_weights_make_the_reference_videos(made):
    from safetensors.torch import load_file
    ref = load_file(str(REFERENCE))
    assert set(made) == set(ref)
    for name in sorted(ref):
        if name.startswith("sha256"):
            assert torch.equal(made[name], ref[name]), f"{name}: the final uint8 video changed"
        else:
            assert made[name].shape == ref[name].shape, name
            err = (made[name] - ref[name]).abs().max().item()
            assert err <= TOL, f"{name}: max abs difference {err:.3g} > {TOL}"


if __name__ == "__main__":
    if not 1 <= len(sys.argv) - 1 <= 2 or sys.argv[1] != "--write":
        sys.exit("usage: python -m tests.test_regression --write [PATH]")
    torch.set_num_threads(1)
    write(Path(sys.argv[2]) if len(sys.argv) == 3 else REFERENCE)
