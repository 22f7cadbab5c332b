"""VAE loss (L1 + LPIPS + KL, LDM) and PSNR."""
import math
import socket

import pytest
import torch

from cascade.config import VAEConfig
from cascade.losses import VAELoss, build_lpips, psnr, temporal_error
from cascade.models.vae import DiagonalGaussian


def test_psnr_identical_is_inf_and_known_noise():
    a = torch.rand(2, 3, 4, 8, 8) * 2 - 1
    assert torch.isinf(psnr(a, a)).all()
    a = torch.zeros(2, 3, 4, 8, 8)
    b = a.clone()
    b[0] += 0.2                                # 0.1 in [0, 1]: mse 1e-2 -> 20 dB
    b[1] -= 0.1                                # 0.05: mse 2.5e-3 -> 26.02 dB
    torch.testing.assert_close(psnr(a, b), torch.tensor([20.0, 10 * math.log10(400)]))
    g = torch.Generator().manual_seed(0)       # Gaussian noise of std 0.02 in [0, 1]: ~33.98 dB
    noisy = a + 0.04 * torch.randn(a.shape, generator=g)
    assert psnr(a, noisy).mean().item() == pytest.approx(20 * math.log10(1 / 0.02), abs=0.3)


def test_temporal_error_counts_flicker_not_constant_error():
    x = torch.rand(2, 3, 5, 8, 8) * 1.6 - 0.8
    assert temporal_error(x, x + 0.1).abs().max() < 1e-4                  # constant error: no flicker
    flicker = x.clone()
    flicker[:, :, 1::2] += 0.2                                             # odd frames brighter
    torch.testing.assert_close(temporal_error(x, flicker), torch.full((2,), 0.2 * 127.5))


def test_loss_terms_and_weights():
    cfg = VAEConfig(lpips_weight=0.0, kl_weight=0.5)
    x = torch.zeros(2, 3, 3, 8, 8)
    post = DiagonalGaussian(torch.cat([torch.ones(2, 4, 2, 2, 2), torch.zeros(2, 4, 2, 2, 2)], 1))
    loss, logs = VAELoss(cfg)(x, x + 0.25, post)
    assert logs["l1"].item() == pytest.approx(0.25) and logs["l2"].item() == pytest.approx(0.0625)
    assert logs["kl"].item() == pytest.approx(0.5 * 32)                    # per-sample sum
    # LDM's weighting: KL sum against the pixel sum, i.e. divided by the pixels per sample here
    assert loss.item() == pytest.approx(0.25 + 1.0 * 0.0625 + 0.5 * 16 / x[0].numel())
    cfg.l2_weight = 10.0                                                   # vae.l2_weight
    loss, _ = VAELoss(cfg)(x, x + 0.25, post)
    assert loss.item() == pytest.approx(0.25 + 10.0 * 0.0625 + 0.5 * 16 / x[0].numel())


def test_random_lpips_needs_no_network(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("network access")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    net = build_lpips(pretrained=False)
    assert not any(p.requires_grad for p in net.parameters())
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert net(x, x).abs().max() == 0 and net(x, x.flip(0)).min() > 0


def test_pretrained_lpips_missing_weights_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(FileNotFoundError) as e:
        VAELoss(VAEConfig(lpips_pretrained=True, lpips_weight=0.1))
    assert "vae.lpips_pretrained=false" in str(e.value) and "\n" not in str(e.value)
    VAELoss(VAEConfig(lpips_pretrained=True, lpips_weight=0.0))          # no LPIPS, no weights needed
