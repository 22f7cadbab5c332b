"""A sampled video depends only on (its prompt, the seed, its index among that prompt's videos):
not on the other prompts of the call or the prompt file, nor on its position there; the same
command twice writes the same bytes (the random tiny cascade of test_pipeline.py)."""
import hashlib

import pytest
import torch
from test_pipeline import full, stages  # noqa: F401  (fixtures, reused)

from cascade.cli import main
from cascade.pipeline import Pipeline
from cascade.seeding import RowGenerators, stream_seed

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py

P = "a red circle moving left on a blue background"
Q = "a green square moving up on a white background"
R = "a yellow cross standing still on a black background"
ANCESTRAL = {"steps": 2, "sampler": "euler_ancestral"}     # fresh noise every step, from the streams


def test_row_generators_draw_each_row_from_its_own_stream():
    a = RowGenerators.keyed([(0, P, 0, "base"), (0, Q, 0, "base")]).randn((4, 3))
    b = RowGenerators.keyed([(0, Q, 0, "base")]).randn((2, 3))
    assert torch.equal(a[2:], b)                              # Q's rows whoever stands beside it
    assert not torch.equal(a[:2], a[2:])
    assert stream_seed(0, P, 0, "base") == stream_seed(0, P, 0, "base") != stream_seed(1, P, 0, "base")
    with pytest.raises(ValueError, match="do not split"):
        RowGenerators([1, 2]).randn((3, 1))


def test_video_does_not_depend_on_the_other_prompts(full):  # noqa: F811
    pipe = Pipeline(full)
    kw = dict(seed=7, base=ANCESTRAL, interp=ANCESTRAL, sr=ANCESTRAL, progress=False)
    alone = pipe(P, num_videos=2, **kw)
    among = pipe([Q, P, R], num_videos=2, **kw)               # P's videos are rows 2 and 3
    for name, out in alone.stages.items():
        assert torch.equal(out, among.stages[name][2:4]), name
    assert not torch.equal(alone.video[0], alone.video[1])    # its two videos differ
    again = pipe(P, num_videos=2, **kw)
    assert torch.equal(again.video, alone.video)
    other_seed = pipe(P, num_videos=2, **{**kw, "seed": 8})
    assert not torch.equal(other_seed.video, alone.video)
    batched = pipe([Q, P, R], num_videos=2, batch_size=4, **kw)   # faster, equal up to rounding
    assert torch.allclose(batched.video, among.video, atol=1e-4)


def _digests(folder):
    return {p.name.split("_", 1)[1]: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in folder.glob("*.mp4")}


def test_same_command_same_bytes_and_prompt_file_order(full, tmp_path, capsys):  # noqa: F811
    runs = {}
    for name, lines in (("a", [P, Q]), ("b", [P, Q]), ("c", [R, Q, P])):
        prompts = tmp_path / f"{name}.txt"
        prompts.write_text("\n".join(lines) + "\n")
        out = tmp_path / name
        rc = main(["sample", "--prompt-file", str(prompts), "--stages", str(full), "--out", str(out),
                   "--steps", "2", "--sampler", "euler_ancestral", "--seed", "3", "--no-progress"])
        assert rc == 0, capsys.readouterr().out
        runs[name] = out
    assert _digests(runs["a"]) == _digests(runs["b"])          # the same command twice
    assert (runs["a"] / "contact_sheet.png").read_bytes() == (runs["b"] / "contact_sheet.png").read_bytes()
    a, c = _digests(runs["a"]), _digests(runs["c"])
    assert len(a) == 2 and all(c[k] == v for k, v in a.items())   # P and Q wherever they stand
