"""The end-to-end benchmark scripts still run (their --smoke configurations, seconds). No timing is
checked here: speed lives in the benchmarks, measured on a quiet machine."""
import csv

import pytest
import torch

from benchmarks import run_all
from benchmarks.common import count_flops, optional_import

HAVE_DIFFUSERS = optional_import("diffusers") is not None


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Every benchmark once, at its smallest configuration, as run_all runs them."""
    out = tmp_path_factory.mktemp("bench")
    run_all.main(["--smoke", "--out", str(out)])
    return out


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("name", ["train", "sample", "long", "lora", "peers", "utilisation", "scaling_attention",
                                  "scaling_cascade"])
def test_each_benchmark_writes_table_csv_and_plot(smoke, name):
    for ext in ("md", "csv", "png"):
        assert (smoke / f"{name}.{ext}").stat().st_size > 0, f"{name}.{ext}"
    text = (smoke / f"{name}.md").read_text()
    assert "machine:" in text and "torch" in text and "|---|" in text
    assert rows(smoke / f"{name}.csv")
    assert "bench_" + name.split("_")[0] in (smoke / "summary.md").read_text()


def test_train_and_sample_cover_every_stage(smoke):
    assert {r["stage"] for r in rows(smoke / "train.csv")} == {"vae", "base", "interp", "sr"}
    assert {r["stage"] for r in rows(smoke / "sample.csv")} == {"base", "interp", "vae", "sr", "cascade"}


def test_peers_rows_or_notice(smoke):
    models = {(r["case"], r["model"]) for r in rows(smoke / "peers.csv")}
    assert {("dit", "ours"), ("sr", "ours"), ("vae", "ours"), ("vae_frame", "ours")} <= models
    if HAVE_DIFFUSERS:
        assert {("dit", "Latte"), ("dit", "CogVideoX"), ("sr", "UNet3D"),
                ("vae", "CogVideoX-VAE"), ("vae_frame", "SVD-VAE")} <= models
    else:
        assert "not installed" in (smoke / "peers.md").read_text()
        assert all(r["model"] == "ours" for r in rows(smoke / "peers.csv"))


def test_peers_skipped_with_a_notice_without_diffusers(monkeypatch, tmp_path, capsys):
    from benchmarks import bench_peers, bench_utilisation
    for mod in (bench_peers, bench_utilisation):
        monkeypatch.setattr(mod, "optional_import", lambda name: None)
    bench_peers.main(["--smoke", "--out", str(tmp_path), "--only", "dit"])
    bench_utilisation.main(["--smoke", "--out", str(tmp_path)])
    assert "diffusers is not installed" in capsys.readouterr().out
    assert {r["model"] for r in rows(tmp_path / "peers.csv")} == {"ours"}
    assert {r["model"] for r in rows(tmp_path / "utilisation.csv")} == {"torch.mm", "ours"}


def test_scaling_compares_the_same_final_video(smoke):
    table = rows(smoke / "scaling_cascade.csv")
    totals = [r for r in table if r["stage"] == "total" and r["route"] in ("cascade", "direct")]
    assert len(totals) == 2 and totals[0]["output (C, T, H, W)"] == totals[1]["output (C, T, H, W)"]
    assert {r["route"] for r in table} == {"cascade", "direct", "direct / cascade"}


def test_flop_counter_counts_cpu_attention():
    """PyTorch's FlopCounterMode has no formula for the CPU's fused attention; ours adds it."""
    q = torch.randn(1, 2, 64, 16, requires_grad=True)

    def attend():
        torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().backward()

    assert count_flops(attend) == 4 * 2 * 64 * 64 * 16 * 3.5     # forward + 2.5x backward


def test_bench_vae_pca_code_known_answers():
    """bench_vae's linear patch code: every component gives the clip back; one component gives
    each patch its mean colour pattern (a constant clip stays constant)."""
    from benchmarks.bench_vae import pca_code
    g = torch.Generator().manual_seed(0)
    train = torch.rand(3, 3, 4, 16, 16, generator=g) * 2 - 1               # 192 patches of 48 values
    x = torch.rand(2, 3, 3, 8, 12, generator=g) * 2 - 1
    torch.testing.assert_close(pca_code(train, 4, 48)(x), x, atol=1e-4, rtol=0)
    assert pca_code(train, 4, 8)(x).shape == x.shape


@pytest.mark.skipif(not HAVE_DIFFUSERS, reason="diffusers is an optional extra (.[bench])")
def test_bench_vae_peers_match_our_compression_and_size():
    """Each diffusers peer is built at the config's spatial factor and latent channels, at the width
    whose parameter count is nearest ours (the natural config: a patchified VAE)."""
    from benchmarks.bench_vae import build_peer, n_params, peer_forward
    from cascade.config import load_config
    from cascade.models.vae import VideoVAE
    from pathlib import Path
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs/tiny/vae_natural.yaml")
    ours = n_params(VideoVAE(cfg.vae))
    x = torch.zeros(1, 3, 2, 16, 16)
    for kind in ("cogvideox", "ltx"):
        model, note = build_peer(kind, cfg.vae, ours)
        assert abs(n_params(model) - ours) < 0.1 * ours, note
        y, post = peer_forward(kind, model.eval(), x, sample=False)
        assert y.shape == x.shape and post.mean.shape[1] == cfg.vae.latent_channels
        assert post.mean.shape[-1] == 16 // cfg.vae.spatial_factor()
