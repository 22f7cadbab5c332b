"""vae.bottleneck vq / fsq (cascade/models/quantize.py): codes, straight-through gradients,
training with usage logged, exact resume, export with the held-out usage (and the collapse
warning), an export refused under the wrong bottleneck, and the base stage on quantized latents."""
import pytest
import torch

from cascade.config import ConfigError, load_config
from cascade.models.vae import VideoVAE
from tests.test_train import REPO, TINY_VAE, read_log

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


def cfg_for(bottleneck, extra=()):
    return load_config(REPO / "configs/tiny/vae.yaml", [*TINY_VAE, f"vae.bottleneck={bottleneck}",
                                                        "vae.codebook_size=64", *extra])


@pytest.mark.parametrize("bottleneck", ["vq", "fsq"])
def test_codes_are_discrete_and_gradients_pass_straight_through(bottleneck):
    torch.manual_seed(0)
    vae = VideoVAE(cfg_for(bottleneck).vae)
    x = torch.rand(2, 3, 4, 16, 16) * 2 - 1
    vae.eval()                                               # (training also moves the codebook)
    post = vae.encode(x, seed=1)
    z = post.mode()
    assert z.shape == (2, 4, 4, 8, 8)
    if bottleneck == "vq":                                   # every vector is a codebook entry
        book = vae.quantizer.q.codebook                                     # (K, Cz)
        flat = z.permute(0, 2, 3, 4, 1).reshape(-1, 4)
        assert (flat[:, None] - book[None]).norm(dim=-1).min(1).values.max() < 1e-6
    else:                                                    # each channel on its 5 levels
        assert set(torch.round(z * 2).unique().tolist()) <= {-2.0, -1.0, 0.0, 1.0, 2.0}
    vae.train()
    post = vae.encode(x, seed=1)
    assert (post.aux_loss > 0) == (bottleneck == "vq")                     # commitment
    vae.decode(post.reparameterise(None)).square().mean().backward()
    assert vae.encoder.conv_out.weight.grad.abs().sum() > 0                # straight through
    stats = post.stats()
    assert 0 < stats["code_usage"] <= 1 and stats["perplexity"] >= 1


@pytest.mark.parametrize("bottleneck", ["kl", "vq", "fsq"])
def test_train_resume_export(bottleneck, tmp_path, capsys):
    """Each bottleneck trains (usage and perplexity logged for vq / fsq) and exports with the
    held-out usage; vq, whose dead-code restarts draw random numbers, is also stopped at step 3
    and resumed to 6, ending as the uninterrupted run."""
    from safetensors.torch import load_file

    from cascade.train import train
    extra = ["train.ckpt_every=3", "train.schedule=constant", "vae.min_code_usage=1.0"]
    steps = 6 if bottleneck == "vq" else 3
    full = train(cfg_for(bottleneck, [*extra, f"train.steps={steps}", f"train.out_dir={tmp_path / 'a'}"]),
                 progress=False)
    if bottleneck == "vq":
        train(cfg_for(bottleneck, [*extra, "train.steps=3", f"train.out_dir={tmp_path / 'b'}"]), progress=False)
        again = train(cfg_for(bottleneck, [*extra, "train.steps=6", f"train.out_dir={tmp_path / 'b'}"]),
                      progress=False)
        a, b = load_file(str(full / "model.safetensors")), load_file(str(again / "model.safetensors"))
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    from cascade.stages import load_vae
    vae, _ = load_vae(full)                                                # the export loads as a stage
    video = torch.rand(1, 3, 4, 16, 16) * 2 - 1
    assert torch.isfinite(vae(video, sample=False)[0]).all()
    rows = read_log(tmp_path / "a" / "log.csv")
    said = capsys.readouterr().out
    if bottleneck == "kl":
        assert "code_usage" not in rows[0]
    else:
        assert all(0 < r["code_usage"] <= 1 and r["perplexity"] >= 1 for r in rows)
        assert "warning: codebook collapse" in said                          # min_code_usage=1.0
        assert "heldout_code_usage" in (full / "metrics.json").read_text()


def test_a_vq_export_refuses_to_load_as_kl(tmp_path):
    import shutil

    from cascade.checksums import write_checksums
    from cascade.config import save_config
    from cascade.stages import load_export
    from cascade.train import train
    vq = train(cfg_for("vq", ["train.steps=1", f"train.out_dir={tmp_path / 'vq'}"]), progress=False)
    bad = tmp_path / "bad"
    shutil.copytree(vq, bad)
    save_config(cfg_for("kl"), bad / "config.yaml")
    write_checksums(bad)
    with pytest.raises(ConfigError, match="quantizer|does not match"):
        load_export(bad)
    with pytest.raises(ConfigError, match="vae.bottleneck"):
        cfg_for("pq")
