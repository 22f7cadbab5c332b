"""DDIM inversion on the shipped base (weights/tiny): inverting a rendered clip's keyframes with its
caption and sampling back with the same prompt returns them, and more steps return them better
(cascade/evaluate_tasks.py's `invert`, whose table over 10 / 25 / 50 / 100 steps is in docs/)."""
from pathlib import Path

import pytest

WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "tiny"
pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


@pytest.mark.skipif(not (WEIGHTS / "base" / "model.safetensors").is_file(), reason="no weights/tiny")
def test_round_trip_error_falls_as_steps_grow():
    from cascade.evaluate_tasks import invert_rows
    from cascade.pipeline import Pipeline
    pipe = Pipeline(WEIGHTS, use_interp=False, use_sr=False)
    prompts = ["a red circle moving left on a blue background", "a green square moving up on a white background"]
    rows = invert_rows(pipe, prompts, seed=0, steps=(5, 20, 60), progress=False)
    snr = {n: sum(r["latent_snr_db"] for r in rows if r["steps"] == n) / 2 for n in (5, 20, 60)}
    assert snr[5] < snr[20] < snr[60], snr
    assert snr[60] > 10, snr                          # the round trip gives the keyframes back
