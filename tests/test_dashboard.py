"""Training dashboards (cascade/dashboard.py): TensorBoard event files read back, sample sheets
from the EMA weights, no duplicate steps after a resume, and cascade plot of two runs."""
import shutil

import pytest

from tests.test_stages_cascade import assets, stage_cfg  # noqa: F401  (module fixture)
from tests.test_train import REPO, TINY_VAE

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


def scalars(run, tag="train/loss"):
    """[(step, value)] of one tag, read back from the run's event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)], acc


def vae_cfg(out, extra=()):
    from cascade.config import load_config
    return load_config(REPO / "configs/tiny/vae.yaml", [*TINY_VAE, f"train.out_dir={out}",
                                                        "train.schedule=constant", *extra])


def test_event_files_and_sample_sheets(tmp_path):
    from cascade.train import train
    train(vae_cfg(tmp_path, ["train.steps=4", "train.sample_every=2"]), progress=False)
    loss, acc = scalars(tmp_path)
    assert [s for s, _ in loss] == [1, 2, 3, 4]
    tags = acc.Tags()
    assert {"train/lr", "train/samples_per_s", "train/skipped", "train/l1"} <= set(tags["scalars"])
    assert [e.step for e in acc.Images("samples")] == [2, 4]
    assert (tmp_path / "samples" / "step000002.png").is_file()
    from PIL import Image

    from cascade.cli import main
    from cascade.dashboard import PREVIEW
    from cascade.video_io import SHEET_PAD
    strip = tmp_path / "learning.png"                                   # one preview over the steps
    assert main(["plot", str(tmp_path), "--samples", "--row", "1", "--out", str(strip)]) == 0
    sheet = Image.open(tmp_path / "samples" / "step000002.png")
    rows = 2 * PREVIEW                                                   # the VAE's: truth, reconstruction
    assert Image.open(strip).height == 2 * ((sheet.height - SHEET_PAD) // rows - SHEET_PAD)
    assert main(["plot", str(tmp_path), "--samples", "--row", str(rows), "--out", str(strip)]) == 2


def test_resume_appends_without_duplicate_steps(tmp_path):
    """A run killed after logging steps past its last checkpoint (here: the step-4 checkpoint
    removed) resumes from step 2; its event files then hold each step once."""
    from cascade.train import train
    train(vae_cfg(tmp_path, ["train.steps=4", "train.ckpt_every=2"]), progress=False)
    shutil.rmtree(tmp_path / "checkpoints" / "step4")
    (tmp_path / "checkpoints" / "latest").write_text("step2")
    train(vae_cfg(tmp_path, ["train.steps=6", "train.ckpt_every=2"]), progress=False)
    loss, _ = scalars(tmp_path)
    assert [s for s, _ in loss] == [1, 2, 3, 4, 5, 6]


def test_base_preview_and_cascade_plot(assets, tmp_path, capsys):  # noqa: F811
    from cascade.cli import main
    from cascade.train import train
    for name in ("a", "b"):
        train(stage_cfg("base", assets, [f"train.out_dir={tmp_path / name}", "train.steps=2",
                                         "train.sample_every=2", "train.log_every=1"]), progress=False)
    assert (tmp_path / "a" / "samples" / "step000002.png").is_file()
    out = tmp_path / "loss.png"
    assert main(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    assert out.stat().st_size > 0
    assert main(["plot", str(tmp_path / "nothing"), "--out", str(out)]) == 2
    assert "no log.csv" in capsys.readouterr().err


def test_cascade_export_of_a_checkpoint(tmp_path, capsys):
    """cascade export RUN [--step N] --out DIR: a checkpoint's EMA weights as an export a stage
    loads; a missing run or step is one line."""
    from cascade.cli import main
    from cascade.stages import load_export
    from cascade.train import train
    train(vae_cfg(tmp_path / "run", ["train.steps=2", "train.ckpt_every=1", "train.keep_ckpts=2"]),
          progress=False)
    assert main(["export", str(tmp_path / "run"), "--step", "1", "--out", str(tmp_path / "e1")]) == 0
    cfg, state = load_export(tmp_path / "e1")
    assert cfg.stage == "vae" and "latent_scale" in (tmp_path / "e1" / "metrics.json").read_text()
    capsys.readouterr()
    assert main(["export", str(tmp_path / "run"), "--step", "9", "--out", str(tmp_path / "e9")]) == 2
    assert "no complete checkpoint step9" in capsys.readouterr().err


def test_plot_of_eval_accuracies_against_steps(tmp_path, capsys):
    """cascade plot --eval STEP=DIR ...: the eval's accuracies over training steps (issue 26's
    curve); a folder without eval.json or a malformed item is one line."""
    import json

    from cascade.cli import main
    for step, acc in ((1000, 0.5), (2000, 0.75)):
        d = tmp_path / f"e{step}"
        d.mkdir()
        row = {m: acc for m in ("colour", "shape", "motion", "one_object", "all")}
        (d / "eval.json").write_text(json.dumps({"variants": [row]}))
    out = tmp_path / "curve.png"
    assert main(["plot", "--eval", f"1000={tmp_path / 'e1000'}", "--eval", f"2000={tmp_path / 'e2000'}",
                 "--out", str(out)]) == 0
    assert out.stat().st_size > 0
    assert main(["plot", "--eval", f"3000={tmp_path}", "--out", str(out)]) == 2
    assert "no eval.json" in capsys.readouterr().err
    assert main(["plot", "--eval", "e1000", "--out", str(out)]) == 2
    assert "not STEP=EVAL_DIR" in capsys.readouterr().err
