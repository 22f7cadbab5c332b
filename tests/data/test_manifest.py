"""Manifests as users write them: captions that are not strings, paths that leave data.root,
bad rows at the end, and a held-out split that is really held out."""
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from cascade.cli import main
from cascade.config import DataConfig
from cascade.data import build_dataset
from cascade.data.video_folder import VideoFolder
from cascade.video_io import write_mp4

REPO = Path(__file__).resolve().parents[2]


def clip(path: Path, value: int) -> None:
    write_mp4(np.full((3, 16, 16, 3), value, np.uint8), path, fps=8)


def jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def seven(tmp_path):
    """Seven good clips, captions clip0..clip6."""
    for i in range(7):
        clip(tmp_path / f"c{i}.mp4", 30 * i)
    return tmp_path


def test_non_string_captions_are_skipped_not_stringified(seven):
    jsonl(seven / "m.jsonl", [{"path": "c0.mp4", "caption": "clip0"},
                              {"path": "c1.mp4", "caption": None},
                              {"path": "c2.mp4", "caption": 5},
                              {"path": "c3.mp4", "caption": ["a", "list"]},
                              {"path": "c4.mp4", "caption": "clip4"}])
    ds = VideoFolder(seven, "m.jsonl", frames=2, height=8, width=8)
    assert len(ds) == 2
    assert {ds[i]["caption"] for i in range(6)} == {"clip0", "clip4"}
    assert [r for r, why in ds.skipped if why == "no caption"] == ["m.jsonl:2", "m.jsonl:3", "m.jsonl:4"]
    assert ds.summary() == "3 of 5 manifest rows skipped (3 no caption)"


@pytest.mark.parametrize("bad", ["/etc/hostname", "../outside.mp4", "sub/../../outside.mp4"])
def test_paths_outside_root_are_refused_naming_the_row(tmp_path, bad):
    root = tmp_path / "root"
    root.mkdir()
    clip(root / "ok.mp4", 100)
    clip(tmp_path / "outside.mp4", 200)
    jsonl(root / "m.jsonl", [{"path": "ok.mp4", "caption": "fine"}, {"path": bad, "caption": "escape"}])
    with pytest.raises(ValueError, match=r"m.jsonl:2: path .* is outside data.root") as e:
        VideoFolder(root, "m.jsonl", frames=2, height=8, width=8)
    assert "\n" not in str(e.value)
    (root / "m.csv").write_text(f"path,caption\nok.mp4,fine\n{bad},escape\n")
    with pytest.raises(ValueError, match=r"m.csv:3: path .* is outside data.root"):
        VideoFolder(root, "m.csv", frames=2, height=8, width=8)
    (root / "sub").mkdir()
    clip(root / "sub" / "in.mp4", 50)                                       # '..' that stays inside is fine
    jsonl(root / "in.jsonl", [{"path": "sub/../ok.mp4", "caption": "fine"}])
    assert len(VideoFolder(root, "in.jsonl", frames=2, height=8, width=8)) == 1


def test_bad_rows_leave_the_index_so_samples_spread_evenly(seven):
    rows = [{"path": f"c{i}.mp4", "caption": f"clip{i}"} for i in range(7)]
    (seven / "broken.mp4").write_bytes(b"\x00junk" * 200)
    rows += [{"path": "gone.mp4", "caption": "x"}, {"path": "broken.mp4", "caption": "y"},
             {"path": "c0.mp4", "caption": ""}]                            # three bad rows at the end
    jsonl(seven / "m.jsonl", rows)
    ds = VideoFolder(seven, "m.jsonl", frames=2, height=8, width=8)
    counts = Counter(ds[i]["caption"] for i in range(70))
    assert counts == {f"clip{i}": 10 for i in range(7)}, counts             # 1/7 each, not 4/10 for one
    assert ds.summary() == "3 of 10 manifest rows skipped (1 no caption, 1 file not found, 1 unreadable)"


def test_folder_heldout_split_is_not_the_training_clips(seven):
    jsonl(seven / "m.jsonl", [{"path": f"c{i}.mp4", "caption": f"clip{i}"} for i in range(7)])
    cfg = DataConfig(kind="folder", root=str(seven), manifest="m.jsonl", frames=2, height=8, width=8,
                     val_fraction=0.3)
    train, val = build_dataset(cfg), build_dataset(cfg, split="val")
    tr = {str(e["path"]) for e in train.entries}
    va = {str(e["path"]) for e in val.entries}
    assert len(va) == 3 and len(tr) == 4 and not tr & va
    assert {e["caption"] for e in train.entries} | {e["caption"] for e in val.entries} == \
        {f"clip{i}" for i in range(7)}
    # the split follows the paths, not the row order
    jsonl(seven / "r.jsonl", [{"path": f"c{i}.mp4", "caption": f"clip{i}"} for i in reversed(range(7))])
    again = build_dataset(DataConfig(**{**vars(cfg), "manifest": "r.jsonl"}), split="val")
    assert {str(e["path"]) for e in again.entries} == va
    # a manifest of its own for the held-out videos: all of the main one trains
    jsonl(seven / "v.jsonl", [{"path": "c6.mp4", "caption": "held"}])
    jsonl(seven / "t.jsonl", [{"path": f"c{i}.mp4", "caption": f"clip{i}"} for i in range(6)])
    cfg2 = DataConfig(**{**vars(cfg), "manifest": "t.jsonl", "val_manifest": "v.jsonl"})
    assert len(build_dataset(cfg2)) == 6 and len(build_dataset(cfg2, split="val")) == 1
    with pytest.raises(ValueError, match="no held-out videos"):
        build_dataset(DataConfig(**{**vars(cfg), "val_fraction": 0.0}), split="val")


def test_training_on_a_folder_prints_the_skipped_count(seven, tmp_path, capsys):
    jsonl(seven / "m.jsonl", [{"path": f"c{i}.mp4", "caption": f"clip{i}"} for i in range(4)]
          + [{"path": "gone.mp4", "caption": "x"}, {"path": "c5.mp4", "caption": None}])
    argv = ["train", str(REPO / "configs/tiny/vae.yaml"), "data.kind=folder", f"data.root={seven}",
            "data.manifest=m.jsonl", "data.val_fraction=0.25", "data.frames=2", "data.height=16",
            "data.width=16", "vae.channels=8", "vae.channel_mults=[1,2]", "vae.temporal_down=[false]",
            "vae.groups=4", "vae.lpips_weight=0.0", "vae.lpips_pretrained=false", "train.batch_size=2",
            "train.steps=1", "train.ckpt_every=1", f"train.out_dir={tmp_path / 'run'}", "--no-progress"]
    assert main(argv) == 0
    assert "data: 2 of 6 manifest rows skipped (1 no caption, 1 file not found)" in capsys.readouterr().out


def test_folder_where_nothing_reads_is_one_line(tmp_path, capsys):
    (tmp_path / "bad.mp4").write_bytes(b"junk" * 100)
    jsonl(tmp_path / "m.jsonl", [{"path": "bad.mp4", "caption": "x"}, {"path": "gone.mp4", "caption": "y"}])
    argv = ["train", str(REPO / "configs/tiny/vae.yaml"), "data.kind=folder", f"data.root={tmp_path}",
            "data.manifest=m.jsonl", f"train.out_dir={tmp_path / 'run'}", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "none of" in err and "m.jsonl" in err, err
