"""The synthetic text-video set: deterministic, in range, captions that say what is drawn."""

import numpy as np
import pytest
import torch

from cascade.config import DataConfig
from cascade.data import build_dataset, collate
from cascade.data.synthetic import (ALLOWED_BACKGROUNDS, BACKGROUNDS, COLOURS, MOTIONS, SHAPES,
                                    SyntheticVideos, balanced_prompts, parse_caption, random_prompts)


def test_deterministic_by_seed_and_index():
    a, b = SyntheticVideos(8, 32, 32, seed=0), SyntheticVideos(8, 32, 32, seed=0)
    for i in (0, 7, 123456, 2**31 - 1):
        assert torch.equal(a[i]["video"], b[i]["video"])
        assert a[i]["caption"] == b[i]["caption"]
    assert not torch.equal(a[0]["video"], a[1]["video"])
    assert not torch.equal(a[0]["video"], SyntheticVideos(8, 32, 32, seed=1)[0]["video"])
    assert len(a) >= 2**31


@pytest.mark.parametrize("shape", [(8, 32, 32), (1, 32, 32), (5, 16, 48), (16, 24, 24)])
def test_shape_and_range(shape):
    ds = SyntheticVideos(*shape, seed=3)
    for i in range(20):
        s = ds[i]
        v = s["video"]
        assert v.shape == (3, *shape) and v.dtype == torch.float32
        assert v.min() >= -1 and v.max() <= 1
        assert isinstance(s["caption"], str) and s["caption"]


def test_captions_parse_back_and_cover_the_vocab():
    ds = SyntheticVideos(4, 16, 16)
    seen = {k: set() for k in ("shape", "colour", "motion", "background")}
    for i in range(600):
        s = ds[i]
        parsed = parse_caption(s["caption"])
        assert parsed == {k: s["meta"][k] for k in parsed}
        assert s["meta"]["colour"] != s["meta"]["background"]
        for k in seen:
            seen[k].add(s["meta"][k])
    assert seen == {"shape": set(SHAPES), "colour": set(COLOURS), "motion": set(MOTIONS),
                    "background": set(BACKGROUNDS)}
    with pytest.raises(ValueError):
        parse_caption("a cat playing the piano")
    assert parse_caption("an orange square moving up on a gray background")["colour"] == "orange"


def test_background_and_object_colours():
    ds = SyntheticVideos(4, 32, 32)
    for i in range(50):
        s = ds[i]
        u8 = ((s["video"] + 1) * 127.5).round()                            # (3, T, H, W)
        bg = torch.tensor(BACKGROUNDS[s["meta"]["background"]], dtype=torch.float32)
        fg = torch.tensor(COLOURS[s["meta"]["colour"]], dtype=torch.float32)
        assert torch.equal(u8[:, 0, 0, 0], bg)                             # a corner shows the background
        assert ((u8[:, 0] - fg.view(3, 1, 1)).abs().amax(0) < 1).any()     # the object colour is drawn


def _centroids(s):
    """Centroid (x, y) per frame of the pixels that have the object's colour."""
    fg = torch.tensor(COLOURS[s["meta"]["colour"]], dtype=torch.float32).view(3, 1, 1, 1)
    u8 = (s["video"] + 1) * 127.5
    hit = (u8 - fg).abs().amax(0) < 20                                      # (T, H, W)
    ys, xs = torch.meshgrid(torch.arange(hit.shape[1]), torch.arange(hit.shape[2]), indexing="ij")
    n = hit.sum((1, 2)).float()
    assert (n > 4).all(), "object not visible in some frame"
    return (hit * xs).sum((1, 2)) / n, (hit * ys).sum((1, 2)) / n, n


def test_motion_is_visible_in_the_named_direction():
    ds = SyntheticVideos(8, 32, 32, seed=5)
    for i in range(100):
        s = ds[i]
        cx, cy, n = _centroids(s)
        dx, dy = float(cx[-1] - cx[0]), float(cy[-1] - cy[0])
        motion = s["meta"]["motion"]
        along = {"moving left": -dx, "moving right": dx, "moving up": -dy, "moving down": dy}
        if motion == "standing still":
            assert abs(dx) < 1e-6 and abs(dy) < 1e-6
        else:
            assert along[motion] > 5, (s["caption"], dx, dy)                # clearly visible (px)
            across = dy if motion in ("moving left", "moving right") else dx
            assert abs(across) < 1.0                                        # pixel-level jitter only
        assert n[-1] > 0.8 * n[0]                                           # stays in frame


def test_random_prompts():
    p = random_prompts(20, seed=4)
    assert p == random_prompts(20, seed=4) and p != random_prompts(20, seed=5)
    assert len(p) == 20 and all(parse_caption(c) for c in p)


def test_balanced_prompts_cover_the_domain_evenly():
    p = balanced_prompts(40, seed=1)
    assert p == balanced_prompts(40, seed=1) and p != balanced_prompts(40, seed=2)
    parsed = [parse_caption(c) for c in p]
    for key, vocab in (("shape", SHAPES), ("colour", COLOURS), ("motion", MOTIONS)):
        counts = [sum(m[key] == v for m in parsed) for v in vocab]
        assert max(counts) - min(counts) <= 1 and min(counts) >= 5, (key, counts)
    assert all(m["background"] in ALLOWED_BACKGROUNDS[m["colour"]] for m in parsed)
    assert {m["background"] for m in parsed} == set(BACKGROUNDS)


def test_build_dataset_splits_and_collate():
    cfg = DataConfig(frames=4, height=16, width=16, seed=2)
    train, val = build_dataset(cfg), build_dataset(cfg, "val")
    assert not torch.equal(train[0]["video"], val[0]["video"])
    assert torch.equal(train[3]["video"], SyntheticVideos(4, 16, 16, seed=2)[3]["video"])
    batch = collate([train[i] for i in range(3)])
    assert batch["video"].shape == (3, 3, 4, 16, 16)
    assert len(batch["caption"]) == 3 and len(batch["meta"]) == 3
    with pytest.raises(ValueError, match="split"):
        build_dataset(cfg, "bogus")
    np.testing.assert_array_equal(batch["video"][1].numpy(), train[1]["video"].numpy())


def test_fps_scales_the_motion_per_frame():
    """A clip at 4x the frame rate shows the same motion in 4x the frames: its frames 0, 4, 8 are
    the 8-fps clip's frames 0, 1, 2 (what the interpolation stage learns to fill in)."""
    slow = SyntheticVideos(3, 32, 32, seed=4, fps=8)
    fast = SyntheticVideos(9, 32, 32, seed=4, fps=32)
    for i in range(6):
        torch.testing.assert_close(fast[i]["video"][:, ::4], slow[i]["video"], atol=1e-5, rtol=0)
        assert fast[i]["caption"] == slow[i]["caption"]
