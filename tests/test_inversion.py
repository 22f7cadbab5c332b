"""DDIM inversion on the shipped base (weights/tiny): inverting a rendered clip's keyframes with its
caption and sampling back with the same prompt returns them, and more steps return them better
(cascade/evaluate_tasks.py's `invert`, whose table over 10 / 25 / 50 / 100 steps is in docs/)."""
from pathlib import Path

import pytest

WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "tiny"
pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


@pytest.mark.skipif(not (WEIGHTS / "base" / "model.safetensors").is_file(), reason="no weights/tiny")
def test_round_trip_error_falls_as_steps_grow():
    """Per clip the round trip need not improve at every step count: with the shipped base the red
    circle's latent SNR went 24.5, 28.0, 16.0, 13.3, 21.8, 29.2, 35.4 dB at 5, 10, 25, 50, 100,
    200, 400 steps, and the green square's 23.7, 12.0, 29.1, 20.4, 33.0, 40.1, 46.7: a round trip
    that lands near another sample and comes back as the steps shrink the inversion's error (the
    same base 3,000 steps earlier gave the red circle 25.2 dB at both 5 and 200 steps, hence 400
    here). What holds for every clip: many steps give the keyframes back better than few, and well."""
    from cascade.evaluate_tasks import invert_rows
    from cascade.pipeline import Pipeline
    pipe = Pipeline(WEIGHTS, use_interp=False, use_sr=False)
    prompts = ["a red circle moving left on a blue background", "a green square moving up on a white background"]
    rows = invert_rows(pipe, prompts, seed=0, steps=(5, 400), progress=False)
    for p in prompts:
        snr = {r["steps"]: r["latent_snr_db"] for r in rows if r["prompt"] == p}
        assert snr[5] < snr[400], (p, snr)
        assert snr[400] > 28, (p, snr)                    # the round trip gives the keyframes back
