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
    torch.testing.assert_close(x["frames"][:, :, 0], x["x0"][:, :, 0], atol=2e-3, rtol=0)  # sigma(0)
    assert (x["frames"][:, :, 1:] == 0).all()
    loss, _ = stage.loss(stage.net, x)
    assert torch.isfinite(loss)


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
