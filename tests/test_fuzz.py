"""Property-based input fuzzing (hypothesis) of the command line and the Python API: prompts,
frame counts, sampling numbers, output paths and manifests. Every case ends in a one-line error
of the type the CLI prints as one line (ValueError and its subclasses, FileNotFoundError), or in
the right result - never another exception. The properties test the checks, not sampling; three
real end-to-end calls close the file."""
import csv
import json
import os
import re
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cascade.cli import main, read_prompts, writable_folder
from cascade.data.video_folder import VideoFolder, read_manifest
from cascade.diffusion import SAMPLERS
from cascade.pipeline import MAX_FRAMES, MAX_GUIDANCE, MAX_STEPS, MAX_VIDEOS, Pipeline, StageSampling
from cascade.text import check_prompts, has_text
from test_pipeline import stages  # noqa: F401  (fixture, reused)

# few examples, no deadline (a timing is never asserted), the same examples on every run, and no
# example database written into the checkout
FUZZ = settings(max_examples=30, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
REFUSED = (ValueError, FileNotFoundError)      # what cascade.cli.main prints as one line

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


def one_line(e: BaseException) -> str:
    msg = str(e)
    assert msg and len(msg.splitlines()) == 1, repr(msg)
    return msg


def refused(fn, *args, **kwargs):
    """fn's result, or the one-line message of a REFUSED error (any other exception fails)."""
    try:
        return fn(*args, **kwargs), None
    except REFUSED as e:
        return None, one_line(e)


# ----------------------------------------------------------------------------- prompts

WEIRD = ["", " ", "\n\t ", "\x00", "\x00\x01\x7f", "\u200b\u200b", "\u3000", "红色的圆向左移动",
         "кружок движется влево", "دائرة حمراء", "🎈 a red balloon", "a\x1b[31m red\x1b[0m circle",
         "a red\ncircle", "a 'quoted', \"comma\" prompt"]
prompt_text = st.one_of(st.text(max_size=40), st.sampled_from(WEIRD),
                        st.text(min_size=1, max_size=8).map(lambda s: s * 700))   # very long


@FUZZ
@given(st.one_of(prompt_text, st.lists(prompt_text, max_size=4), st.tuples(prompt_text),
                 st.integers(), st.none(), st.binary(max_size=8), st.lists(st.integers(), max_size=2)))
def test_prompts_are_kept_or_refused_in_one_line(prompts):
    out, err = refused(check_prompts, prompts)
    items = [prompts] if isinstance(prompts, str) else list(prompts) if isinstance(prompts, (list, tuple)) else None
    readable = bool(items) and all(isinstance(p, str) and any(c.isprintable() and not c.isspace() for c in p)
                                   for p in items)
    if readable:
        assert err is None and out == items                   # unchanged: long ones are cut later
    else:
        assert out is None and re.search(r"prompt", err)


@FUZZ
@given(st.lists(prompt_text, max_size=5), st.sampled_from([b"", b"\xff\xfe bad utf-8", b"\r\n\x85"]))
def test_prompt_files_are_read_or_refused_in_one_line(tmp_path, lines, tail):
    path = Path(tempfile.mkstemp(dir=tmp_path, suffix=".txt")[1])
    data = "\n".join(lines).encode("utf-8") + tail
    path.write_bytes(data)
    out, err = refused(read_prompts, SimpleNamespace(prompt=[], prompt_file=str(path)))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        assert out is None and f"prompt file {path}: not UTF-8 text" in err
        return
    want = [ln.strip() for ln in text.splitlines() if has_text(ln)]
    assert (out, err) == (want, None) if want else (out is None and "empty prompt" in err)


# ----------------------------------------------------------------------------- sampling numbers

class Reached(Exception):
    """Raised where sampling would begin: every check before it passed."""


numbers = st.one_of(st.none(), st.integers(-3, 5000), st.sampled_from([float("nan"), float("inf"), -0.5]))
guidances = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True), st.floats(-1, 120))


def bad_int(v, hi):
    return v is not None and not (isinstance(v, int) and 1 <= v <= hi)


def bad_float(v):
    return v is not None and not (v == v and 0 <= v <= MAX_GUIDANCE)       # nan != nan


@FUZZ
@given(steps=numbers, guidance=guidances, frames=numbers, videos=numbers, batch=numbers,
       stage=st.sampled_from(["base", "interp", "sr"]), sampler=st.sampled_from([None, "ddim", "euler", "heun", "euler_maruyama", ""]))
def test_api_sampling_numbers_are_checked_before_sampling(stages, steps, guidance, frames, videos, batch, stage,  # noqa: F811
                                                          sampler):
    pipe = api_pipeline(stages)
    per_stage = {"guidance": guidance, "sampler": sampler}
    kwargs = dict(steps=steps, frames=frames, num_videos=1 if videos is None else videos,
                  batch_size=1 if batch is None else batch, progress=False, **{stage: per_stage})
    out, err = refused(run_until_sampling, pipe, "a red circle", **kwargs)
    bad = [bad_int(kwargs["num_videos"], MAX_VIDEOS), bad_int(kwargs["batch_size"], MAX_VIDEOS),
           bad_int(frames, MAX_FRAMES), bad_int(steps, MAX_STEPS), bad_float(guidance),
           sampler is not None and sampler not in SAMPLERS]
    if any(bad):
        assert out is None, kwargs
        first = ["num_videos", "batch_size", "frames", "steps", f"{stage}.guidance", f"{stage}.sampler"][bad.index(True)]
        assert err.startswith(f"{first}:"), (err, kwargs)
    elif err is not None:                                      # in range, but not a count the cascade makes
        assert frames is not None and err.startswith("frames: the cascade cannot make"), err
    else:
        assert out == "reached"


_PIPES = {}


def api_pipeline(folder) -> Pipeline:
    if folder not in _PIPES:
        _PIPES[folder] = Pipeline(folder)
    return _PIPES[folder]


def run_until_sampling(pipe, *args, **kwargs):
    def stop(*a, **k):
        raise Reached
    pipe._run = stop
    try:
        pipe(*args, **kwargs)
    except Reached:
        return "reached"
    finally:
        del pipe._run
    raise AssertionError("the pipeline returned without sampling")


@FUZZ
@given(steps=numbers, guidance=guidances, frames=numbers, videos=numbers,
       flag=st.sampled_from(["", "base-", "interp-", "sr-"]))
def test_cli_sampling_flags_are_one_line_before_loading(tmp_path, monkeypatch, capsys, steps, guidance, frames,
                                                        videos, flag):
    def reached(*a, **k):
        raise Reached
    monkeypatch.setattr("cascade.pipeline.Pipeline", reached)
    argv = ["sample", "a red circle", "--stages", str(tmp_path), "--out", str(tmp_path / "o")]
    for name, v in ((f"--{flag}steps", steps), (f"--{flag}guidance", guidance), ("--frames", frames),
                    ("--num-videos", videos)):
        if v is not None:
            argv += [f"{name}={v}"]
    capsys.readouterr()
    try:
        rc = main(argv)
    except Reached:
        rc = None
    except SystemExit as e:                                    # argparse: not a number of its type
        rc = e.code
        assert rc == 2 and "invalid" in capsys.readouterr().err
        assert any(isinstance(v, float) for v in (steps, frames, videos))
        return
    bad = [bad_int(steps, MAX_STEPS), bad_float(guidance), bad_int(frames, MAX_FRAMES), bad_int(videos, MAX_VIDEOS)]
    if any(bad):
        assert rc == 2
        err = one_line(capsys.readouterr().err.strip())
        first = [f"--{flag}steps", f"--{flag}guidance", "--frames", "--num-videos"][bad.index(True)]
        assert err.startswith(f"cascade sample: error: {first}:"), err
    else:
        assert rc is None                                      # reached loading the stages


# ----------------------------------------------------------------------------- frame counts

@FUZZ
@given(frames=st.integers(-4, 400), s=st.sampled_from([1, 2, 4]), r=st.sampled_from([2, 3, 4]),
       K=st.sampled_from([2, 3, 5]), pt=st.sampled_from([1, 2]), passes=st.sampled_from([0, 1, 2]))
def test_frame_counts_are_reachable_or_refused_with_reachable_ones(frames, s, r, K, pt, passes):
    pipe = SimpleNamespace(vae=SimpleNamespace(temporal_factor=s), interp_keyframes=K,
                           interp=SimpleNamespace(cfg=SimpleNamespace(interp=SimpleNamespace(rate=r))),
                           base_cfg=SimpleNamespace(dit=SimpleNamespace(patch_t=pt)))
    step, k_min = s * r ** passes, (max(K, 2) if passes else 1)
    possible = [k for k in range(k_min, max(frames, 1) + 1) if k % pt == 0 and 1 + step * (k - 1) == frames]
    kb, err = refused(Pipeline.keyframes_for, pipe, frames, passes)
    if possible:
        assert err is None and kb == possible[0]
    else:
        assert kb is None and err.startswith(f"frames: the cascade cannot make {frames} frames")
        suggested = [int(n) for n in re.search(r"use ([\d, ]+), \.\.\.", err)[1].split(", ")]
        assert suggested and all(Pipeline.keyframes_for(pipe, n, passes) for n in suggested)


# ----------------------------------------------------------------------------- output paths

name = st.text(st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/"), min_size=1,
               max_size=12).filter(lambda n: n not in (".", "..") and len(n.encode()) < 200)


@FUZZ
@given(parts=st.lists(name, min_size=1, max_size=3), case=st.sampled_from(["new", "exists", "file", "under a file",
                                                                            "read-only", "too long", "nul"]))
def test_output_paths_are_made_writable_or_refused(tmp_path, parts, case):
    base = Path(tempfile.mkdtemp(dir=tmp_path))
    path = base.joinpath(*parts)
    if case == "exists":
        path.mkdir(parents=True)
    elif case in ("file", "under a file"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("not a folder")
        path = path if case == "file" else path / "sub"
    elif case == "read-only":
        path = base / "ro" / path.relative_to(base)
        (base / "ro").mkdir()
        (base / "ro").chmod(0o555)
    elif case == "too long":
        path = path / ("x" * 300)
    elif case == "nul":
        path = base / (parts[0] + "\x00")
    with pytest.MonkeyPatch.context() as mp:
        if case == "read-only" and os.geteuid() == 0:     # root writes anyway: the OS's answer for others
            def denied(*a, **k):
                raise PermissionError(13, "Permission denied", str(path))
            mp.setattr(Path, "mkdir", denied)
        out, err = refused(writable_folder, path)
    (base / "ro").chmod(0o755) if (base / "ro").exists() else None
    if case in ("new", "exists"):
        assert err is None and out == path and path.is_dir() and not list(path.glob(".write-test-*"))
    elif case == "file":
        assert out is None and err == f"--out: {path} is a file, not a folder"
    else:
        assert out is None and err.startswith(f"--out: cannot write to {path}"), err


# ----------------------------------------------------------------------------- manifests

CLIPS = ["clip one.mp4", 'say "hi", then.mp4', "it's, a clip.mp4", "红色 圆.mp4", "sub dir/x y.mp4"]


@pytest.fixture(scope="module")
def video_root(tmp_path_factory):
    from cascade.video_io import write_mp4
    import numpy as np
    root = tmp_path_factory.mktemp("videos")
    for i, c in enumerate(CLIPS):
        write_mp4(np.full((2, 8, 8, 3), 40 * i, np.uint8), root / c, fps=8)
    return root


captions = st.one_of(st.text(max_size=30), st.sampled_from(["", "   ", "\x00", 'a "quoted", comma caption',
                                                           "two\nlines", "il était, \"une\" fois", "红色的圆"]))
inside = st.one_of(st.sampled_from(CLIPS), st.sampled_from(["missing clip.mp4", "sub dir/../clip one.mp4",
                                                            "./clip one.mp4", "sub dir/"]))
outside = st.sampled_from(["../clip one.mp4", "sub dir/../../x.mp4", "/etc/passwd", "..", "/clip one.mp4",
                           "a/b/../../../c.mp4"])
row = st.tuples(st.one_of(inside, inside, inside, outside), captions)


def write_manifest(folder: Path, rows, fmt: str) -> Path:
    path = Path(tempfile.mkstemp(dir=folder, suffix=f".{fmt}")[1])
    if fmt == "csv":
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["path", "caption"])
            w.writerows(rows)
    else:
        path.write_text("".join(json.dumps({"path": p, "caption": c}) + "\n" for p, c in rows), encoding="utf-8")
    return path


def is_outside(p: str) -> bool:
    norm = os.path.normpath(p)
    return os.path.isabs(p) or norm == ".." or norm.startswith("../")


@FUZZ
@given(rows=st.lists(row, min_size=1, max_size=5), fmt=st.sampled_from(["csv", "jsonl"]))
def test_manifests_round_trip_and_outside_paths_are_refused(video_root, tmp_path, rows, fmt):
    manifest = write_manifest(tmp_path, rows, fmt)
    read, err = refused(read_manifest, manifest)
    assert err is None
    assert [(r["path"], r["caption"]) for r in read] == [(p, c or None) if fmt == "csv" else (p, c) for p, c in rows]
    data, err = refused(VideoFolder, video_root, manifest, frames=2, height=8, width=8)
    first_outside = next((i for i, (p, _) in enumerate(rows) if is_outside(p)), None)
    usable = [p for p, c in rows if c and has_text(c) and (video_root / p).is_file()]
    if first_outside is not None:
        assert data is None and f"{manifest.name}:" in err, err
        assert f"path {rows[first_outside][0]!r} is outside data.root {video_root}" in err, err
    elif not usable:
        assert data is None and err.startswith("data: none of the") and str(manifest) in err, err
    else:
        assert err is None and len(data) == len(usable) and len(data.skipped) == len(rows) - len(usable)
        assert {os.path.normpath(str(e["path"])) for e in data.entries} == \
            {os.path.normpath(str(video_root / p)) for p in usable}


@pytest.mark.parametrize("text, message", [
    ("path,caption\n" + '"a.mp4","' + "x" * 200_000 + '"\n', "not valid CSV (field larger than field limit"),
    (b"path,caption\na.mp4,\xff\xfe\n", "not UTF-8 text"),
    ("path;caption\na.mp4;x\n", "missing column(s) path, caption"),
    ('{"path": "a.mp4"}\n', "missing key(s) caption"),
    ('{"path": 3, "caption": "x"}\n', "path must be a string"),
    ('{"path": "a.mp4", "caption": "x"\n', "not valid JSON"),
    ("path,caption\n", "no entries"),
])
def test_broken_manifests_are_one_line_naming_the_file(tmp_path, text, message):
    suffix = ".jsonl" if str(text).startswith("{") else ".csv"
    path = tmp_path / f"m{suffix}"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError) as e:
        read_manifest(path)
    assert message in one_line(e.value) and str(path) in str(e.value)


# ----------------------------------------------------------------------------- end to end (3 real runs)

def test_api_samples_non_latin_control_and_very_long_prompts(stages):  # noqa: F811
    pipe = api_pipeline(stages)
    prompts = ["红色的圆向左移动 \x1b[0m\x00 on blue", "a red circle " * 400]
    res = pipe(prompts, seed=0, steps=1, progress=False)
    assert res.video.shape == (2, 3, 4, 16, 16) and torch.isfinite(res.video).all()
    with pytest.raises(ValueError, match="guidance: must be a finite number"):
        pipe(prompts, steps=1, guidance=float("nan"), progress=False)


def test_cli_writes_into_a_new_folder_with_spaces_and_unicode(stages, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "new folder" / "vidéos ✓"
    assert main(["sample", "кружок, \"quoted\" 'prompt'", "--stages", str(stages), "--out", str(out),
                 "--steps", "1", "--no-progress"]) == 0, capsys.readouterr().err
    assert len(list(out.glob("*.mp4"))) == 1 and (out / "contact_sheet.png").is_file()


def test_a_hostile_manifest_yields_its_good_clips(video_root, tmp_path):
    rows = [("clip one.mp4", 'a "quoted", comma caption'), ("sub dir/x y.mp4", "红色的圆"),
            ("it's, a clip.mp4", "   "), ("missing.mp4", "x")]
    data = VideoFolder(video_root, write_manifest(tmp_path, rows, "csv"), frames=2, height=8, width=8)
    assert len(data) == 2 and [why for _, why in data.skipped] == ["no caption", "file not found"]
    sample = data[1]
    assert sample["caption"] == "红色的圆" and sample["video"].shape == (3, 2, 8, 8)
