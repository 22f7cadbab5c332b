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
