"""`cascade eval`: the analyser reads ground truth right and wrong clips as wrong; the command runs
end to end on tiny random cascades (the stage folders of test_pipeline.py)."""
import csv
import json

import pytest
import torch
from test_pipeline import full, stages  # noqa: F401  (fixtures, reused)

from cascade.cli import main
from cascade.data import HELDOUT_SEED_OFFSET
from cascade.data.synthetic import SyntheticVideos, make_caption, render
from cascade.evaluate import (FACTORS, adherence, analyse, frame_diff, generate_variants,
                              still_threshold, truth_clip)
from cascade.pipeline import Pipeline

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


@pytest.mark.parametrize("frames, height, width", [(8, 32, 32), (4, 64, 64), (9, 32, 48)])
def test_analyser_reads_ground_truth(frames, height, width):
    """Held-out ground-truth clips: colour, motion, background all right; shape too (measured:
    1.0 on 200 clips at each of these sizes and at 16x16)."""
    ds = SyntheticVideos(frames, height, width, seed=HELDOUT_SEED_OFFSET + 17)
    n = 40
    right = {f: 0 for f in FACTORS}
    for i in range(n):
        s = ds[i]
        checks = adherence(s["video"], s["caption"])
        for f in FACTORS:
            right[f] += checks[f]
    assert right["colour"] == right["motion"] == right["background"] == n, right
    assert right["shape"] >= 0.95 * n, right


def test_analyser_time_scale_and_truth_clip():
    """A 29-frame clip at 4x the data frame rate moves 1/4 as far per frame: read with
    time_scale=4 it is still moving; the frozen first frame repeated is standing still."""
    prompt = "a purple cross moving up on a white background"
    clip = truth_clip(prompt, 29, 64, 64, time_scale=4, seed=3)                 # (3, 29, 64, 64)
    got = analyse(clip, time_scale=4)
    assert (got["colour"], got["shape"], got["motion"], got["background"]) == (
        "purple", "cross", "moving up", "white")
    frozen = clip[:, :1].expand_as(clip)
    assert analyse(frozen, time_scale=4)["motion"] == "standing still"
    slow = frame_diff(clip[None]) / frame_diff(truth_clip(prompt, 8, 64, 64, seed=3)[None])
    assert 0.15 < float(slow) < 0.4                                             # about 1/4 per frame
    assert still_threshold(8, 32) == pytest.approx(0.14)                        # half of 4% x 7 frames


def test_analyser_reports_what_is_drawn_not_the_prompt():
    meta = SyntheticVideos(8, 32, 32, seed=5).meta(0)
    meta.update(shape="circle", colour="red", background="blue", motion="moving left",
                velocity=(-1.5, 0.0))
    prompt = make_caption("circle", "red", "moving left", "blue")
    assert all(adherence(render(meta, 8, 32, 32), prompt)[f] for f in FACTORS)
    recoloured = render({**meta, "colour": "yellow"}, 8, 32, 32)
    checks = adherence(recoloured, prompt)
    assert checks["analysis"]["colour"] == "yellow" and not checks["colour"]
    assert checks["shape"] and checks["motion"] and checks["background"]
    reversed_ = render(meta, 8, 32, 32).flip(1)                                 # time runs backwards
    assert analyse(reversed_)["motion"] == "moving right"
    square = adherence(render({**meta, "shape": "square"}, 8, 32, 32), prompt)
    assert square["analysis"]["shape"] == "square" and not square["shape"]
    blank = torch.full((3, 8, 32, 32), -1.0)                                    # no object at all
    assert analyse(blank)["colour"] is None and not adherence(blank, prompt)["colour"]


def test_ablations_from_one_run_equal_separate_pipelines(full):  # noqa: F811
    """no sr / keyframes only are read off the full run: the same videos as pipelines without
    those stages (each stage has its own seeded generator)."""
    prompts = ["a red circle moving left on a blue background",
               "a green square moving up on a white background"]
    got = generate_variants(Pipeline(full), prompts, seed=3, sampling={"steps": 1}, batch_size=2)
    assert list(got) == ["full", "no interp", "no sr", "keyframes only"]
    for name, kw in (("no interp", {"use_interp": False}), ("no sr", {"use_sr": False}),
                     ("keyframes only", {"use_interp": False, "use_sr": False})):
        ref = Pipeline(full, **kw)(prompts, seed=3, steps=1, batch_size=2, progress=False)
        assert torch.equal(got[name][0], ref.video), name
    assert got["full"][1] == 2 and got["keyframes only"][1] == 1                 # time scales (rate 2)


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_cli_eval_full_cascade(full, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "eval"
    rc = main(["eval", "--stages", str(full), "--num-prompts", "3", "--batch-size", "2", "--steps", "1",
               "--heldout", "2", "--lpips", "random", "--out", str(out), "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0, text
    for name in ("eval.json", "eval.csv", "eval.png", "samples.png"):
        assert (out / name).is_file(), name
    rows = read_csv(out / "eval.csv")
    assert [r["variant"] for r in rows] == ["full", "no interp", "no sr", "keyframes only", "ground truth",
                                               "autoencoded truth"]
    assert rows[5]["size"] == "32x32" and rows[5]["stages"] == "rendered > vae > sr (the ceiling)"
    assert rows[0]["size"] == "32x32" and rows[0]["frames"] == "7"            # 4 keyframes -> 7, x2 sr
    assert rows[3]["size"] == "16x16" and rows[3]["frames"] == "4"
    assert rows[4]["frame_diff_ratio"] == "1.0" and rows[4]["colour"] == "1.0"
    report = json.loads((out / "eval.json").read_text())
    assert set(report["stages"]) == {"vae", "interp", "sr"}
    assert {"psnr", "baseline_bilinear_psnr"} <= set(report["stages"]["sr"])
    assert "random trunk" in report["info"]["lpips"] and len(report["videos"]["full"]) == 3
    for variant in ("| full |", "| no interp |", "| no sr |", "| keyframes only |", "| ground truth |",
                    "| autoencoded truth |"):
        assert variant in text
    assert "random trunk" in text


def test_cli_eval_base_only_skips_what_is_missing(stages, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "eval"
    rc = main(["eval", "--stages", str(stages), "--num-prompts", "2", "--steps", "1", "--heldout", "1",
               "--lpips", "off", "--out", str(out), "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert [r["variant"] for r in read_csv(out / "eval.csv")] == ["full", "ground truth", "autoencoded truth"]
    assert "skipped interp" in text and "skipped sr" in text
    assert set(json.loads((out / "eval.json").read_text())["stages"]) == {"vae"}


def test_cli_eval_at_a_non_square_size(stages, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "eval"
    rc = main(["eval", "--stages", str(stages), "--num-prompts", "2", "--steps", "1", "--heldout", "0",
               "--lpips", "off", "--height", "16", "--width", "24", "--out", str(out), "--no-progress"])
    assert rc == 0, capsys.readouterr().out
    rows = read_csv(out / "eval.csv")
    assert [r["size"] for r in rows] == ["16x24"] * 3                    # the truth rendered there too


def test_cli_eval_one_prompt_many_videos_are_those_of_sample(stages, tmp_path, capsys):  # noqa: F811
    """--prompt P --videos-per-prompt N scores the N videos `cascade sample P --num-videos N` makes
    (the same noise: same videos in the same process), one analysis per video."""
    prompt, out = "a red circle moving left on a blue background", tmp_path / "eval"
    rc = main(["eval", "--stages", str(stages), "--prompt", prompt, "--videos-per-prompt", "3",
               "--steps", "1", "--heldout", "0", "--lpips", "off", "--out", str(out), "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "fractions of 3 videos (1 prompts x 3)" in text
    report = json.loads((out / "eval.json").read_text())
    assert report["info"]["videos_per_prompt"] == 3 and report["info"]["num_prompts"] == 1
    got = report["videos"]["full"]
    assert [v["prompt"] for v in got] == [prompt] * 3
    assert len({json.dumps(v["analysis"]) for v in got}) == 3           # three noises, not one
    from cascade.evaluate import evaluate
    one = {s: {"steps": 1} for s in ("base", "interp", "sr")}
    report = evaluate(stages, [prompt], sampling=one, heldout=0, lpips="off", progress=False,
                      videos_per_prompt=3)
    videos = Pipeline(stages)(prompt, num_videos=3, steps=1, progress=False).video
    assert torch.equal(report.samples, videos)


@pytest.mark.parametrize("argv, message", [
    (["eval", "--stages", "/nonexistent/stages"], "stages folder not found"),
    (["eval", "--num-prompts", "0"], "--num-prompts must be >= 1"),
    (["eval", "--prompt", "a red circle moving left on a blue background", "--videos-per-prompt", "0"],
     "--videos-per-prompt"),
    (["eval", "--prompt", "a dog running"], "not a caption of the synthetic domain"),
    (["eval", "--task", "i2v", "--videos-per-prompt", "2"], "only for --task t2v"),
])
def test_eval_errors_in_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_analyser_counts_objects_per_frame():
    """Rendered clips hold one object in every frame (1.0 on 200 held-out clips at 8x32^2,
    4x64^2, 9x32x48, 8x16^2 and 29x64^2, measured); a second copy, a split and a fade-out do not;
    a wobbling track has jitter, a rendered one none."""
    meta = SyntheticVideos(8, 32, 32, seed=5).meta(0)
    meta.update(shape="circle", colour="red", background="blue", motion="moving left",
                velocity=(-1.5, 0.0), size=5.0, start=(22.0, 16.0))
    clip = render(meta, 8, 32, 32)                                              # (3, 8, 32, 32)
    got = analyse(clip)
    assert got["one_object"] and got["objects"] == [1] * 8 and got["track_jitter"] < 1e-3
    second = render({**meta, "start": (22.0, 4.5)}, 8, 32, 32)                  # a copy above it
    two = clip.clone()
    two[:, 4:] = torch.maximum(clip[:, 4:], second[:, 4:])                      # appears mid-video
    got = analyse(two)
    assert got["objects"] == [1, 1, 1, 1, 2, 2, 2, 2] and not got["one_object"]
    faded = clip.clone()
    faded[:, 6:] = clip[:, :1, :1, :1]                                          # background only
    assert analyse(faded)["objects"][6:] == [0, 0] and not analyse(faded)["one_object"]
    split = clip.clone()
    split[:, :, :, 16:18] = clip[:, :1, :1, :1].expand(3, 8, 32, 2)             # a cut down the middle
    assert not analyse(split)["one_object"]
    wobble = torch.stack([render({**meta, "start": (22.0, 16.0 + 3 * (t % 2))}, 8, 32, 32)[:, t]
                          for t in range(8)], 1)
    assert analyse(wobble)["track_jitter"] > 0.03
