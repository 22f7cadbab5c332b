"""Prompting with frames: the training draw of condition types, the base stage's frame inputs,
a zero-started conditioned base that equals the text-only one, and given keyframes kept exactly."""
import pytest
import torch

from cascade.config import COND_TYPES, CondConfig, ConfigError
from cascade.conditions import training_mask
from cascade.seeding import sample_generators
from tests.test_stages_cascade import assets, batch_of, stage_cfg  # noqa: F401  (module fixture)

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py
COND = ["dit.cond_frames=true"]


def kind_of(row: torch.Tensor) -> str:
    T, on = len(row), row.nonzero().flatten().tolist()
    if not on:
        return "none"
    if on == [0]:
        return "first"
    if on == [T - 1]:
        return "last"
    if on == [0, T - 1]:
        return "first_last"
    return "first_k" if on[0] == 0 else "last_k"


def test_training_mask_draws_the_types_at_their_rates():
    c = CondConfig(none=0.2, first=0.3, last=0.1, first_last=0.1, first_k=0.2, last_k=0.1, k_max=4)
    mask = training_mask(c, sample_generators(0, range(4000)), 8)
    kinds = [kind_of(r) for r in mask]
    for k in COND_TYPES:
        share = kinds.count(k) / len(kinds)
        assert abs(share - getattr(c, k)) < 0.03, (k, share)
    ks = {int(r.sum()) for r, k in zip(mask, kinds) if k in ("first_k", "last_k")}
    assert ks == {2, 3, 4}                                               # k in 2..k_max
    again = training_mask(c, sample_generators(0, range(4000)), 8)
    assert torch.equal(mask, again)                                      # each sample's own stream
    assert training_mask(c, sample_generators(0, range(8)), 1).sum() == 0  # an image step: nothing


def test_base_prepare_gives_frames_of_the_clip(assets):  # noqa: F811
    from cascade.stages import build_stage
    cfg = stage_cfg("base", assets, COND + ["cond.none=0", "cond.first=1", "cond.last=0",
                                           "cond.first_last=0", "cond.first_k=0", "cond.last_k=0",
                                           "cond.aug_max=0.0"])
    stage = build_stage(cfg)
    batch, gens = batch_of(cfg, [0, 1, 2, 3])
    x = stage.prepare(batch, gens, "cpu")
    assert x["frame_mask"].shape == (4, 1, 4, 1, 1)
    assert (x["frame_mask"][:, 0, 0] == 1).all() and (x["frame_mask"][:, 0, 1:] == 0).all()
    assert torch.equal(x["frames"][:, :, 0], x["x0"][:, :, 0])          # level 0: the frame itself
    assert (x["frames"][:, :, 1:] == 0).all()
    loss, _ = stage.loss(stage.net, x)
    assert torch.isfinite(loss)


def test_loop_clips_wrap_around_and_are_given_first_and_last(assets):  # noqa: F811
    """data.loops: a share of clips whose moving object crosses the frame once and wraps around
    (last frame = first); the other clips are unchanged, and a loop clip is always given its first
    and last frame (never text only, so text-only videos do not learn to wrap)."""
    from cascade.data.synthetic import SyntheticVideos
    from cascade.evaluate import analyse
    from cascade.stages import build_stage
    plain, looped = SyntheticVideos(8, 32, 32, seed=3), SyntheticVideos(8, 32, 32, seed=3, loops=0.5)
    loops = [i for i in range(40) if looped.meta(i).get("loop")]
    assert 10 <= len(loops) <= 30
    for i in range(40):
        a, b = looped[i], plain[i]
        if i not in loops:
            assert torch.equal(a["video"], b["video"])                   # the same stream otherwise
            continue
        v, meta = a["video"], a["meta"]
        assert (v[:, -1] - v[:, 0]).abs().max() < 1e-4                   # ends where it starts
        got = analyse(v, wrap=True)
        assert got["one_object"] and got["motion"] == meta["motion"], (a["caption"], got["objects"])
        assert got["shape"] == meta["shape"]
        if meta["motion"] != "standing still":
            moved = max(abs(d) for d in got["displacement"])
            assert 0.9 < moved < 1.1                                     # once across the frame
    cfg = stage_cfg("base", assets, COND + ["cond.none=1", "cond.first=0", "cond.last=0",
                                           "cond.first_last=0", "cond.first_k=0", "cond.last_k=0"])
    stage = build_stage(cfg)
    batch, gens = batch_of(cfg, [0, 1, 2, 3])
    batch["meta"][1]["loop"] = batch["meta"][3]["loop"] = True
    mask = stage.prepare(batch, gens, "cpu")["frame_mask"][:, 0, :, 0, 0]   # (B, T)
    assert [kind_of(r) for r in mask] == ["none", "first_last", "none", "first_last"]
    part = SyntheticVideos(9, 32, 32, seed=3, fps=32, loops=1.0, loop_period=28)   # interp's clips
    cut = moving = 0
    for i in range(40):
        m = part.meta(i)
        if m["motion"] != "standing still":
            assert abs(abs(sum(m["velocity"])) - 32 / 28) < 1e-6           # a part of a 28-frame loop
            v, moving = part[i]["video"], moving + 1                         # (3, T, H, W)
            cut += bool(((v - v[:, :, :1, :1]).abs().amax(0)[:, :, [0, -1]] > 0.5).any() or
                        ((v - v[:, :, :1, -1:]).abs().amax(0)[:, [0, -1]] > 0.5).any())
    assert cut >= 0.6 * moving    # the object cut by the frame's edge (23 of 29; 9 from place's start)
    from cascade.config import load_config
    with pytest.raises(ConfigError, match="data.loops"):
        load_config(None, ["stage=base", "data.loops=1.5"])
    with pytest.raises(ConfigError, match="data.loop_period"):
        load_config(None, ["stage=base", "data.loop_period=-1"])


def test_cond_config_errors():
    from cascade.config import load_config
    with pytest.raises(ConfigError, match="cond: the condition-type rates"):
        load_config(None, ["stage=base", *COND, "cond.none=-1"])
    with pytest.raises(ConfigError, match="cond.k_max"):
        load_config(None, ["stage=base", *COND, "cond.k_max=0"])
    with pytest.raises(ConfigError, match="dit.cond_frames"):
        load_config(None, ["stage=interp", "dit.cond_frames=false", "dit.frames=9"])


def test_zero_started_conditioned_base_gives_the_text_only_output_bit_for_bit(assets):  # noqa: F811
    """A base export without frame inputs grown into one with them (train.init_from does this:
    VideoDiT.grow_state) samples the same keyframes, to the bit, when nothing is given; given
    keyframes come out exactly as given."""
    from cascade.models.dit import VideoDiT
    from cascade.seeding import RowGenerators
    from cascade.stages import BaseStage
    from cascade.stages.common import load_text_encoder
    from tests.test_stages_cascade import randomize_zero_init
    plain_cfg, cond_cfg = stage_cfg("base", assets), stage_cfg("base", assets, COND)
    plain, grown = BaseStage.__new__(BaseStage), BaseStage.__new__(BaseStage)
    torch.manual_seed(0)
    plain_net = VideoDiT(plain_cfg.dit)
    randomize_zero_init(plain_net)
    grown_net = VideoDiT(cond_cfg.dit)
    state, names = grown_net.grow_state(plain_net.state_dict())
    assert "aug_embed.2.weight" in names and any(n.startswith("patch.weight") for n in names)
    grown_net.load_state_dict(state)
    text = load_text_encoder(plain_cfg, "dit", "cpu")
    plain._setup(plain_cfg, plain_net.eval(), text)
    grown._setup(cond_cfg, grown_net.eval(), text)
    cond, uncond = plain.encode_text(["a red circle moving left", "a green square moving up"])
    shape = (2, plain_cfg.dit.in_channels, 4, 8, 8)
    streams = lambda: RowGenerators([1, 2])                               # noqa: E731
    for sampler in ("ddim", "dpmpp_2m", "euler_ancestral"):
        sampling = {"steps": 3, "sampler": sampler, "guidance": 2.0}
        a = plain.sample(shape, cond, uncond, sampling, streams(), False)
        b = grown.sample(shape, cond, uncond, sampling, streams(), False)
        assert torch.equal(a, b), sampler
        keys = torch.randn(shape)
        mask = torch.tensor([[1, 0, 0, 1], [1, 1, 0, 0]])
        c = grown.sample(shape, cond, uncond, sampling, streams(), False, given=(keys, mask))
        m = mask.bool()
        assert torch.equal(c.transpose(1, 2)[m], keys.transpose(1, 2)[m]), sampler
    with pytest.raises(ValueError, match="not trained for frame prompts"):
        plain.sample(shape, cond, uncond, {"steps": 1}, streams(), False, given=(keys, mask))


# ----------------------------------------------------------------------------- through the cascade

@pytest.fixture(scope="module")
def cascade_dir(full, tmp_path_factory):  # noqa: F811
    from cascade.config import load_config
    from cascade.models.dit import VideoDiT
    from cascade.pipeline import stage_folder
    from tests.test_pipeline import export_random
    from tests.test_stages_cascade import randomize_zero_init
    root = tmp_path_factory.mktemp("cond")
    for name in ("vae", "interp", "sr"):
        (root / name).symlink_to(stage_folder(full, name))
    cfg = load_config(stage_folder(full, "base") / "config.yaml", COND + ["cond.k_max=2"])
    torch.manual_seed(3)
    net = VideoDiT(cfg.dit)
    randomize_zero_init(net)
    export_random(cfg, net, root / "base")
    return root


from tests.test_pipeline import full, stages  # noqa: E402,F401  (module fixtures)

PROMPT = "a red circle moving left on a blue background"
SAMPLERS = ["ddim", "dpmpp_2m", "euler_ancestral"]


def image(seed=0, size=(3, 24, 40)):
    return torch.rand(size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_given_frames_survive_every_stage_and_sampler(cascade_dir, sampler):
    """i2v with first and last images, and a frame between keyframes (interp's known frame): each
    given frame is the output's frame, the base keyframe / interp latent is its encoding, exactly."""
    from cascade.conditions import Conditions, fit
    from cascade.pipeline import Pipeline
    pipe = Pipeline(cascade_dir)
    first, last, mid = image(0), image(1), image(2)
    c = Conditions("i2v", {0: first, -1: last, 3: mid}, keep_input=True)  # 3: between keyframes 2, 4
    res = pipe(PROMPT, seed=1, steps=3, sampler=sampler, conditions=c, num_videos=2, progress=False)
    v = res.video
    assert v.shape == (2, 3, 7, 32, 32)
    for f, img in ((0, first), (6, last), (3, mid)):
        torch.testing.assert_close(v[:, :, f], fit(img, 32, 32)[:, 0].expand(2, -1, -1, -1), atol=1e-6, rtol=0)
    g = pipe._given(pipe.plan(c, 1, (8, 8)), 1, 4)
    keys, m = g["keys"]
    assert m.tolist() == [[1, 0, 0, 1]]
    assert torch.equal(res.stages["keyframes_latent"][:, :, [0, 3]], keys[:, :, [0, 3]].expand(2, -1, -1, -1, -1))
    lat, m1 = g["interp"][0]
    assert m1[0].nonzero().flatten().tolist() == [3]
    assert torch.equal(res.stages["interp_latent"][:, :, 3], lat[:, :, 3].expand(2, -1, -1, -1))
    assert not torch.equal(v[0, :, 1], v[1, :, 1])                      # two videos, two samples


def test_given_frames_are_rendered_by_default(cascade_dir):
    """Without keep_input the given frames and the input's other frames are written as the
    cascade renders them: here (no SR) the input's frames are encoded, put around the clip's
    latents (cut as written) and decoded with them as one video (Pipeline.with_input), so the
    causal decoder sees across every join. Frame 0 of the causal decoder sees only itself: the
    given first frame of i2v, and extend's first input frames, are their own round trip."""
    from cascade.conditions import Conditions, fit
    from cascade.pipeline import Pipeline
    pipe = Pipeline(cascade_dir, use_sr=False)
    vae = pipe.vae_stage
    enc = lambda x: vae.encode(x[None])                                  # noqa: E731  (1, Cz, T, h, w)
    kw = dict(seed=1, steps=2, progress=False)
    first = fit(image(0), 16, 16)
    v = pipe(PROMPT, conditions=Conditions.image_to_video(image(0)), **kw).video[0]
    torch.testing.assert_close(v[:, 0], vae.decode(enc(first))[0, :, 0], atol=1e-5, rtol=0)
    assert not torch.equal(v[:, 0], first[:, 0])                         # rendered, not pasted
    clip = image(5, (3, 9, 16, 16))
    n_rest = 9 - len(pipe.plan(Conditions.extend(clip, 6), 1, (8, 8)).given)  # not given to the base
    for back in (False, True):
        res = pipe(PROMPT, conditions=Conditions.extend(clip, 6, backward=back), **kw)
        keep = pipe(PROMPT, conditions=Conditions.extend(clip, 6, backward=back, keep_input=True), **kw)
        z = res.stages["interp_latent"]                                  # the clip's latents
        assert torch.equal(z, keep.stages["interp_latent"])              # the same made frames
        cut = 9 - n_rest + 6
        parts = [enc(clip[:, :n_rest]), z[:, :, :cut]] if not back else [z[:, :, -cut:], enc(clip[:, -n_rest:])]
        torch.testing.assert_close(res.video[0], vae.decode(torch.cat(parts, 2))[0], atol=1e-5, rtol=0)
        if not back:
            torch.testing.assert_close(res.video[0, :, :n_rest], vae.decode(parts[0])[0], atol=1e-5, rtol=0)
        assert torch.equal(keep.video[0, :, :9] if not back else keep.video[0, :, -9:], clip)
    a, b = image(6, (3, 5, 16, 16)), image(7, (3, 4, 16, 16))
    res = pipe(PROMPT, conditions=Conditions.connect(a, b), **kw)
    assert res.video.shape[2] == 4 + 7 + 3
    whole = torch.cat([enc(a[:, :-1]), res.stages["interp_latent"], enc(b[:, 1:])], 2)
    torch.testing.assert_close(res.video[0], vae.decode(whole)[0], atol=1e-5, rtol=0)


def test_extend_connect_loop_and_edit_write_one_video(cascade_dir):
    from cascade.conditions import Conditions, fit
    from cascade.pipeline import Pipeline
    pipe = Pipeline(cascade_dir)
    clip = image(5, (3, 9, 32, 32))
    kw = dict(seed=2, steps=2, progress=False)
    fwd = pipe(PROMPT, conditions=Conditions.extend(clip, 6, keep_input=True), **kw).video
    assert fwd.shape[2] == 15 and torch.allclose(fwd[0, :, :9], clip, atol=1e-6)
    back = pipe(PROMPT, conditions=Conditions.extend(clip, 6, backward=True, keep_input=True), **kw).video
    assert back.shape[2] == 15 and torch.allclose(back[0, :, 6:], clip, atol=1e-6)
    a, b = image(6, (3, 5, 32, 32)), image(7, (3, 4, 32, 32))
    joined = pipe(PROMPT, conditions=Conditions.connect(a, b, keep_input=True), **kw).video
    assert joined.shape[2] == 4 + 7 + 3
    assert torch.allclose(joined[0, :, :5], a, atol=1e-6) and torch.allclose(joined[0, :, -4:], b, atol=1e-6)
    loop = pipe(PROMPT, conditions=Conditions.loop(), **kw)
    assert loop.video.shape[2] == 6                                      # the repeated last frame dropped
    keys = loop.stages["keyframes_latent"]
    assert torch.equal(keys[:, :, -1], keys[:, :, 0])
    src = image(8, (3, 7, 32, 32))
    near, far = (pipe(PROMPT, conditions=Conditions.edit(src, s), **kw).video for s in (0.1, 1.0))
    assert (near - src).abs().mean() < (far - src).abs().mean()
    with pytest.raises(ValueError, match="extend: the input video has 2 frame"):
        pipe(PROMPT, conditions=Conditions.extend(clip[:, :2], 3), **kw)
    with pytest.raises(ValueError, match="outside"):
        pipe(PROMPT, conditions=Conditions("i2v", {9: image()}), **kw)


def test_a_task_adapter_is_used_for_its_task_alone(cascade_dir, tmp_path, capsys):
    """base/tasks/loop (a LoRA, here a one-shot `cascade tune` of the random base): a loop samples
    its base with the adapter folded in; a text-only video is the base's without it, before and
    after a loop; a tasks/ folder named after no task is one line."""
    import shutil

    from cascade.cli import main
    from cascade.conditions import Conditions
    from cascade.evaluate_tasks import truth
    from cascade.pipeline import Pipeline
    from cascade.video_io import write_mp4
    clip = tmp_path / "clip.mp4"
    write_mp4(truth(PROMPT, 13, 32, 32, 2.0, 0, 0), clip, fps=16)
    adapter = tmp_path / "adapter"
    assert main(["tune", str(clip), PROMPT, "--out", str(adapter), "--stages", str(cascade_dir),
                 "--steps", "3", "--rank", "2", "--lr", "0.05", "--no-progress"]) == 0, capsys.readouterr().err
    root = tmp_path / "stages"
    (root / "base" / "tasks").mkdir(parents=True)
    for f in (cascade_dir / "base").iterdir():
        (root / "base" / f.name).symlink_to(f.resolve())
    for name in ("vae", "interp", "sr"):
        (root / name).symlink_to((cascade_dir / name).resolve())
    shutil.copytree(adapter, root / "base" / "tasks" / "loop")
    plain, tasked = Pipeline(cascade_dir), Pipeline(root)
    kw = dict(seed=1, steps=2, progress=False)
    a, b = plain(PROMPT, **kw), tasked(PROMPT, **kw)
    assert torch.equal(a.video, b.video)                                 # text only: no adapter
    a, b = (p(PROMPT, conditions=Conditions.loop(), **kw) for p in (plain, tasked))
    assert (a.video - b.video).abs().max() > 1e-3                        # the loop: its adapter
    for k, v in plain.base.net.state_dict().items():                     # the base put back after
        assert torch.equal(v, tasked.base.net.state_dict()[k]), k
    assert torch.equal(plain(PROMPT, **kw).video, tasked(PROMPT, **kw).video)
    (root / "base" / "tasks" / "loops").mkdir()
    with pytest.raises(ConfigError, match="tasks/loops: not a task"):
        Pipeline(root)


def test_long_video_windows_join_without_a_seam():
    """A known answer: a base whose network continues a straight line (x0 of every keyframe is the
    linear extrapolation of the window's first two given keyframes, or k * delta with nothing
    given). Windows of 4 keyframes with 2 of context, 11 keyframes: the result is the line itself
    at every keyframe, to float rounding, so each window took its context from the right place."""
    from cascade.config import load_config
    from cascade.diffusion import Diffusion
    from cascade.stages import BaseStage
    delta = torch.arange(1.0, 5.0).view(4, 1, 1, 1)                       # per channel

    class Line(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(()))
            self.calls = 0

        def forward(self, x, t, cond):
            self.calls += 1
            B, C, W, h, w = x.shape
            m = cond["frame_mask"][:, 0, :, 0, 0]                         # (B, W)
            k = torch.arange(W, dtype=x.dtype)
            x0 = []
            for i in range(B):
                on = m[i].nonzero().flatten()
                if len(on) >= 2:
                    a, b = cond["frames"][i, :, on[0]], cond["frames"][i, :, on[1]]
                    x0.append(a[:, None] + (b - a)[:, None] * ((k - on[0]) / (on[1] - on[0])).view(1, W, 1, 1))
                else:
                    x0.append((delta * k.view(1, W, 1, 1)).expand(C, W, h, w))
            return torch.stack(x0)                                        # an x0 prediction

    cfg = load_config(None, ["stage=base", "dit.cond_frames=true", "dit.frames=4", "dit.in_channels=4",
                             "cond.k_max=2", "cond.aug_sample=0.0", "diffusion.prediction=x0"])
    stage = BaseStage.__new__(BaseStage)
    stage.cfg, stage.net, stage.diffusion = cfg, Line(), Diffusion(cfg.diffusion)
    stage.frame_prompts = True
    from cascade.seeding import RowGenerators
    text = {"x": torch.zeros(1, 1)}
    chain = {"steps": 3, "sampler": "ddim", "guidance": 1.0, "long": "chain"}
    out = stage.sample((1, 4, 11, 2, 2), text, text, chain, RowGenerators([0]), False)
    line = delta * torch.arange(11.0).view(1, 11, 1, 1)                # (4, 11, 1, 1)
    torch.testing.assert_close(out[0], line.expand(4, 11, 2, 2), atol=1e-4, rtol=1e-5)
    # window_steps: the windows after the first take that many steps, on the same line
    from cascade.stages.base import window_schedule
    n = len(window_schedule([False] * 11, 4, 2))
    stage.net.calls = 0
    stage.sample((1, 4, 11, 2, 2), text, text, chain, RowGenerators([0]), False)
    every = stage.net.calls
    stage.net.calls = 0
    fewer = stage.sample((1, 4, 11, 2, 2), text, text, {**chain, "window_steps": 1}, RowGenerators([0]), False)
    assert n > 1 and stage.net.calls * 3 * n == every * (3 + n - 1)
    torch.testing.assert_close(fewer[0], line.expand(4, 11, 2, 2), atol=1e-4, rtol=1e-5)
    # plan: the first window's 4 keyframes spread over 13 (0, 4, 8, 12) make the line at a quarter
    # of the slope, and the windows of each finer lattice (every 2nd keyframe, then every one)
    # fill between them on that line
    plan = stage.sample((1, 4, 13, 2, 2), text, text, {**chain, "long": "plan"}, RowGenerators([0]), False)
    quarter = delta / 4 * torch.arange(13.0).view(1, 13, 1, 1)
    torch.testing.assert_close(plan[0], quarter.expand(4, 13, 2, 2), atol=1e-4, rtol=1e-5)
    # frame prompts chain whatever `long` says: the same windows, the same keyframes
    head = (torch.zeros(1, 4, 11, 2, 2).index_copy(2, torch.tensor([0, 1]), line[None, :, :2].expand(1, 4, 2, 2, 2)),
            torch.tensor([[1.0, 1.0] + [0.0] * 7 + [1.0, 1.0]]))         # and zeros at 9, 10 (connect)
    assert torch.equal(stage.sample((1, 4, 11, 2, 2), text, text, {**chain, "long": "plan"}, RowGenerators([0]),
                                    False, given=head),
                       stage.sample((1, 4, 11, 2, 2), text, text, chain, RowGenerators([0]), False, given=head))
    back = stage.sample((1, 4, 11, 2, 2), text, text, chain, RowGenerators([0]), False,
                        given=(torch.zeros(1, 4, 11, 2, 2).index_copy(2, torch.tensor([9, 10]),
                                                                      line[None, :, 9:11].expand(1, 4, 2, 2, 2)),
                               torch.tensor([[0.0] * 9 + [1.0, 1.0]])), backward=True)
    torch.testing.assert_close(back[0, :, :], line.expand(4, 11, 2, 2), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("Kb", [9, 11, 15, 29, 57, 225])
@pytest.mark.parametrize("plan", [False, True])
def test_window_schedule_makes_every_keyframe_once_from_known_context(Kb, plan):
    """Windows of 8 with 4 of context: each keyframe is made once, by a window of 8 distinct
    keyframes that holds it; every window after the first is given a keyframe made before it; the
    chain's windows start at 0, 4, 8, ... as Video LDM's; the plan's first window spans the video,
    and its fill windows make only keyframes before a known one they hold, where one is in reach.
    The number of windows grows linearly with the keyframes (at most 0.3 a keyframe chained, 0.35
    planned: its coarser lattices' windows make 2-3 keyframes each)."""
    from cascade.stages.base import window_joins, window_schedule
    sched = window_schedule([False] * Kb, 8, 4, False, plan)
    known, made_all = [False] * Kb, []
    for n, (win, made) in enumerate(sched):
        assert len(set(win)) == 8 and all(0 <= k < Kb for k in win) and set(made) <= set(win)
        assert not any(known[k] for k in made)
        if n:
            assert any(known[k] for k in win)
        for k in made:
            known[k] = True
        made_all += made
    assert sorted(made_all) == list(range(Kb))
    assert len(sched) <= max(1, (0.35 if plan else 0.3) * Kb)
    if not plan:
        assert [w[0] for w, _ in sched] == list(range(0, Kb - 8, 4))[:len(sched) - 1] + [sched[-1][0][0]]
        assert window_joins(Kb, 8, 4, False) == list(range(8, Kb, 4))
    else:
        assert sched[0][0][0] == 0 and sched[0][0][-1] == Kb - 1
        if Kb == 29:                                                     # stride 4: 3 made between two
            assert [m for _, m in sched[1:]] == [[4 * i + 1, 4 * i + 2, 4 * i + 3] for i in range(7)]
        if Kb == 225:                          # spacing 32, then 16, 4 and 1: the finest divides by 4
            assert sched[1] == (list(range(0, 113, 16)), [16, 48, 80])
            assert all(m == [w[-1] - 3, w[-1] - 2, w[-1] - 1] for w, m in sched[-10:])


# ----------------------------------------------------------------------------- cascade eval --task

def test_task_measures_on_known_clips():
    """seam ~1 on a rendered clip and large across a cut; drift 0 on a rendered clip; an edited
    prompt differs in exactly the attribute asked for."""
    import numpy as np
    from cascade.data.synthetic import parse_caption
    from cascade.evaluate_tasks import drift, edited_prompt, loop_seam, seam_ratio, truth
    v = truth(PROMPT, 29, 32, 32, 4.0, 0, 0)
    assert seam_ratio(v, [14]) < 1.3
    cut = torch.cat([v[:, :14], v[:, 20:]], 1)                           # 6 frames missing at 14
    assert seam_ratio(cut, [14]) > 3
    assert drift(v) == 0.0
    assert loop_seam(v) > 3                                              # the object jumps back
    # a long clip's parts move their share of its (clamped) travel: the scaled threshold reads
    # each part's motion as the prompt's, where the part's own threshold read "standing still"
    from cascade.evaluate import analyse
    from cascade.evaluate_tasks import part_still
    long = truth("a red triangle moving left on a blue background", 113, 32, 32, 4.0, 0, 4)
    first = slice(0, 32)
    assert analyse(long[:, first], 4.0)["motion"] == "standing still"
    assert analyse(long[:, first], 4.0, part_still(long, first, 4.0))["motion"] == "moving left"
    for what, key in (("colour", "colour"), ("shape", "shape"), ("background", "background"),
                      ("direction", "motion")):
        new = parse_caption(edited_prompt(PROMPT, what, np.random.default_rng(0)))
        old = parse_caption(PROMPT)
        assert [k for k in old if old[k] != new[k]] == [key]


@pytest.mark.parametrize("task", ["i2v", "extend", "connect", "loop", "long", "edit", "invert"])
def test_eval_task_runs_every_task(cascade_dir, task, tmp_path, capsys):
    from cascade.cli import main
    out = tmp_path / task
    rc = main(["eval", "--stages", str(cascade_dir), "--task", task, "--num-prompts", "1",
               "--steps", "1", "--out", str(out), "--no-progress"]
              + (["--frames", "13"] if task == "long" else [])
              + (["--tune-steps", "2"] if task == "edit" else []))
    said = capsys.readouterr()
    assert rc == 0, said.err
    assert (out / "task.json").is_file() and "| run |" in said.out
    if task not in ("edit", "invert"):
        assert (out / "samples.png").is_file()


def test_cli_long_videos_plan_or_chain(cascade_dir, tmp_path, capsys):
    """`--long plan|chain` picks how a long video's keyframes are made, from `cascade sample` and
    `cascade eval --task long`; another word is refused by the parser before anything loads.
    `--image-guidance` reaches `cascade eval` too; out of range it is one line, nothing written."""
    from cascade.cli import main
    for mode in ("plan", "chain"):
        assert main(["sample", PROMPT, "--stages", str(cascade_dir), "--frames", "25", "--steps", "1",
                     "--long", mode, "--out", str(tmp_path / mode), "--no-progress"]) == 0
    assert main(["eval", "--stages", str(cascade_dir), "--task", "long", "--frames", "25", "--steps", "2",
                 "--window-steps", "1", "--long", "chain", "--num-prompts", "1", "--out", str(tmp_path / "eval"),
                 "--no-progress"]) == 0
    assert "| long |" in capsys.readouterr().out
    # the image scale of three-way guidance reaches the eval as it reaches sample (shared flags)
    assert main(["eval", "--stages", str(cascade_dir), "--task", "i2v", "--steps", "1",
                 "--image-guidance", "1.5", "--num-prompts", "1", "--out", str(tmp_path / "ig"),
                 "--no-progress"]) == 0
    assert "| i2v |" in capsys.readouterr().out
    assert main(["eval", "--stages", str(cascade_dir), "--task", "i2v", "--image-guidance", "-1",
                 "--num-prompts", "1", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "--image-guidance: must be" in err and not (tmp_path / "bad").exists()
    assert main(["sample", PROMPT, "--stages", str(cascade_dir), "--frames", "25", "--window-steps", "0",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "--window-steps: must be" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    with pytest.raises(SystemExit):
        main(["sample", PROMPT, "--stages", str(cascade_dir), "--frames", "25", "--long", "both"])
    assert "invalid choice: 'both'" in capsys.readouterr().err


def test_cli_frame_prompts_and_their_one_line_errors(cascade_dir, stages, tmp_path, capsys):  # noqa: F811
    from PIL import Image

    from cascade.cli import main
    from cascade.video_io import read_video, write_mp4
    img = tmp_path / "first.png"
    Image.fromarray((torch.rand(20, 30, 4) * 255).byte().numpy(), "RGBA").save(img)   # any size, mode
    clip, small = tmp_path / "clip.mp4", tmp_path / "small.mp4"
    write_mp4(image(1, (3, 9, 32, 32)), clip, fps=16)                    # resampled to 16 fps output
    write_mp4(image(2, (3, 9, 16, 16)), small, fps=16)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    base = ["sample", PROMPT, "--stages", str(cascade_dir), "--out", str(out), "--steps", "1",
            "--no-progress"]
    assert main(base + ["--image", str(img), "--last-image", str(img)]) == 0
    frames, fps = read_video(next(out.glob("000_*.mp4")))
    assert frames.shape[0] == 7 and fps == pytest.approx(16)
    assert main(base + ["--video", str(clip), "--extend", "4"]) == 0
    assert main(base + ["--video", str(clip), "--extend", "4", "--keep-input"]) == 0
    capsys.readouterr()
    bad = {"--image nope.png": "image not found",
           f"--image {clip}": "cannot read image",
           f"--video {clip} --strength 1.5": "--strength: must be in (0, 1]",
           f"--video {clip} --connect {small}": "connect clips of one size",
           f"--video {clip}": "say what to do with it",
           f"--video {clip} --extend 3 --loop": "choose one task",
           "--backward": "goes with --video",
           f"--video {tmp_path / 'missing.mp4'} --extend 2": "video not found"}
    for flags, msg in bad.items():
        assert main(base + flags.split()) == 2, flags
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], (flags, err)
    plain = ["sample", PROMPT, "--stages", str(stages), "--out", str(out), "--steps", "1", "--no-progress"]
    assert main(plain + ["--image", str(img)]) == 2
    assert "not trained for frame prompts" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"                        # nothing lost


def test_render_input_pads_a_temporally_compressing_vae():
    """A VAE that codes s = 2 frames in one latent frame takes 1 + 2k frames: `render_input` puts
    the first frame in front of an even-length input and cuts it after, so every input frame
    comes back, each its round trip through the VAE (no SR here)."""
    from pathlib import Path
    from types import SimpleNamespace

    from cascade.config import load_config
    from cascade.pipeline import Pipeline
    from cascade.stages import VAEStage
    torch.manual_seed(0)
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs/tiny/vae.yaml",
                      ["vae.channels=8", "vae.channel_mults=[1,2]", "vae.temporal_down=[true]",
                       "vae.groups=4", "vae.frame_encoder=false"])
    stage = VAEStage(cfg)
    stage.net.eval()
    assert stage.net.temporal_factor == 2
    pipe = SimpleNamespace(vae=stage.net, vae_stage=stage, sr=None, device="cpu",
                           base=SimpleNamespace(text_key="t"), lowres_of=lambda v: v)
    conds = {"t": ({"text": torch.zeros(2, 3, 4)}, {})}                  # 2 videos
    for T in (5, 6):
        clip = image(T, (3, T, 16, 16))
        out = Pipeline.render_input(pipe, clip, conds, None, None, False)
        pad = torch.cat([clip[:, :1].expand(-1, int(T % 2 == 0), -1, -1), clip], 1)[None]
        assert out.shape == (2, 3, T, 16, 16)
        torch.testing.assert_close(out[1], stage.decode(stage.encode(pad))[0, :, -T:], atol=1e-5, rtol=0)
