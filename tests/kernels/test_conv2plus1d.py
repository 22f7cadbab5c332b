"""(2+1)D conv (fused forward, conv3d-kernel backward) against conv2plus1d_ref (the unfused pair):
output and every gradient within twice PyTorch's own same-precision error plus a small floor."""
import pytest
import torch

import kernels.conv2plus1d as c21
from kernels.conv2plus1d import conv2plus1d, conv2plus1d_ref

from kernel_tolerance import assert_fp32_within_fp64, assert_within, forward_backward, fp64_leaves
NAMES = ["y", "dx", "dw_spatial", "db_spatial", "dw_temporal", "db_temporal"]


def layout(t, how):
    """A fresh leaf holding t's values in the asked layout."""
    if how == "channels_last":
        t = t.to(memory_format=torch.channels_last_3d)
    elif how == "permuted":  # strides in (b, t, h, w, c)-like order, not a named format
        t = t.permute(0, 2, 1, 3, 4).contiguous().permute(0, 2, 1, 3, 4)
    return t.detach().requires_grad_()


def check(B, cin, cmid, cout, T, H, W, k, kt, causal=False, bias=True, dtype=torch.float32,
          how="contiguous", device="cpu"):
    torch.manual_seed(0)
    x = torch.randn(B, cin, T, H, W, device=device).to(dtype)
    ws = (torch.randn(cmid, cin, 1, k, k, device=device) / (cin * k * k) ** 0.5).to(dtype)
    wt = (torch.randn(cout, cmid, kt, 1, 1, device=device) / (cmid * kt) ** 0.5).to(dtype)
    bs = torch.randn(cmid, device=device).to(dtype) if bias else None
    bt = torch.randn(cout, device=device).to(dtype) if bias else None
    gy = torch.randn(conv2plus1d_ref(x, ws, bs, wt, bt, causal).shape, device=device)

    def leaves(cast):
        return [None if t is None else cast(t).detach().requires_grad_() for t in (x, ws, bs, wt, bt)]

    ins = [layout(x, how), *leaves(lambda t: t.clone())[1:]]
    got = forward_backward(lambda *a: conv2plus1d(*a, causal=causal, backend="triton"), ins, gy)
    ref = lambda *a: conv2plus1d_ref(*a, causal=causal)  # noqa: E731
    same = forward_backward(ref, leaves(lambda t: t.clone()), gy)
    golden = forward_backward(ref, leaves(lambda t: t.float()), gy)
    assert got[0].dtype == dtype
    if how == "channels_last":
        assert got[0].is_contiguous(memory_format=torch.channels_last_3d)
    names = NAMES if bias else [n for n in NAMES if not n.startswith("db")]
    assert_within(names, got, golden, same, dtype)


CASES = {  # B, cin, cmid, cout, T, H, W, k, kt, causal, bias, dtype, layout
    "3x3-kt3": (1, 3, 20, 16, 5, 13, 13, 3, 3, False, True, torch.float32, "contiguous"),
    "3x3-kt3-causal-permuted": (1, 3, 20, 16, 5, 11, 13, 3, 3, True, True, torch.float32, "permuted"),
    "fp16-channels-last-two-n-tiles": (2, 20, 16, 40, 5, 9, 9, 3, 3, True, True, torch.float16,
                                       "channels_last"),
    "fp16-1x1-kt1-no-bias": (1, 20, 20, 3, 5, 13, 13, 1, 1, False, False, torch.float16,
                             "contiguous"),
    "even-kt2": (1, 16, 16, 16, 5, 7, 9, 3, 2, False, True, torch.float32, "contiguous"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_conv2plus1d_matches_reference(case):
    B, cin, cmid, cout, T, H, W, k, kt, causal, bias, dtype, how = CASES[case]
    check(B, cin, cmid, cout, T, H, W, k, kt, causal, bias, dtype, how)


def test_time_chunks_recompute_halo(monkeypatch):
    """On a GPU small videos cut time into chunks with kt-1 halo frames; force that path on CPU."""
    monkeypatch.setattr(c21, "_time_chunks", lambda device, programs, TO: 3)
    check(1, 3, 16, 16, 7, 9, 9, 3, 3, causal=False)
    check(1, 3, 16, 16, 7, 9, 9, 3, 3, causal=True, dtype=torch.float16)


def test_unfused_path(monkeypatch):
    """kt > 3 or wide channels run the two conv3d launches and keep h for the backward."""
    monkeypatch.setattr(c21, "_fusable", lambda cmid, cout, kt, dtype: False)
    check(1, 3, 20, 16, 5, 9, 9, 3, 3, causal=True, how="channels_last")


def test_wide_temporal_kernel_falls_back():
    assert not c21._fusable(16, 16, 5, torch.float32)
    check(1, 3, 16, 16, 6, 5, 5, 3, 5, causal=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_conv2plus1d_gpu(dtype, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # IEEE fp32 on both sides
    check(2, 20, 40, 24, 7, 19, 21, 3, 3, True, True, dtype, "channels_last", "cuda")
    check(1, 64, 128, 128, 9, 32, 32, 3, 3, False, True, dtype, "contiguous", "cuda")
    check(1, 64, 256, 64, 9, 16, 16, 3, 3, False, True, dtype, "contiguous", "cuda")  # unfused


def test_autocast_casts_like_the_pair():
    x = torch.randn(1, 3, 4, 7, 7)
    ws, wt = torch.randn(16, 3, 1, 3, 3) / 5, torch.randn(16, 16, 3, 1, 1) / 7
    with torch.autocast("cpu", dtype=torch.float16):
        got = conv2plus1d(x, ws, None, wt, None, backend="triton")
        ref = conv2plus1d_ref(x, ws, None, wt, None)
    assert got.dtype == ref.dtype == torch.float32  # computed in fp16, returned in x's dtype
    assert torch.allclose(got, ref, atol=2e-2, rtol=2e-3)


def test_dispatch_and_errors():
    x = torch.randn(1, 3, 4, 5, 5)
    ws, wt = torch.randn(4, 3, 1, 3, 3), torch.randn(2, 4, 3, 1, 1)
    torch.testing.assert_close(conv2plus1d(x, ws, None, wt, None), conv2plus1d_ref(x, ws, None, wt, None))
    with pytest.raises(ValueError, match="do not chain"):
        conv2plus1d(x, ws, None, torch.randn(2, 5, 3, 1, 1), None, backend="triton")
    with pytest.raises(ValueError, match=r"\(Cmid, Cin, 1, k, k\)"):
        conv2plus1d(x, torch.randn(4, 3, 3, 3, 3), None, wt, None, backend="triton")


FP64_CASES = {  # B, cin, cmid, cout, T, H, W, k, kt, causal: odd shapes, the last a long reduction
    "causal-6x9x7": (1, 12, 20, 12, 6, 9, 7, 3, 3, True),
    "long-two-clips": (2, 4, 8, 4, 7, 23, 21, 3, 3, False),
}


@pytest.mark.parametrize("case", FP64_CASES, ids=list(FP64_CASES))
def test_conv2plus1d_fp32_against_fp64(case):
    """fp32 output and every gradient against an fp64 reference (the weight gradients sum over
    every position: kernels/conv3d.py's dW pass reduces them in parts)."""
    B, cin, cmid, cout, T, H, W, k, kt, causal = FP64_CASES[case]
    torch.manual_seed(0)
    x = torch.randn(B, cin, T, H, W)
    ws, bs = torch.randn(cmid, cin, 1, k, k) / (cin * k * k) ** 0.5, torch.randn(cmid)
    wt, bt = torch.randn(cout, cmid, kt, 1, 1) / (cmid * kt) ** 0.5, torch.randn(cout)
    gy = torch.randn(B, cout, T, H, W)
    f32, f64 = fp64_leaves(x, ws, bs, wt, bt)
    got = forward_backward(lambda *a: conv2plus1d(*a, causal=causal, backend="triton"), f32, gy)
    ref = lambda *a: conv2plus1d_ref(*a, causal=causal)  # noqa: E731
    same = forward_backward(ref, fp64_leaves(x, ws, bs, wt, bt)[0], gy)
    assert_fp32_within_fp64(NAMES, got, same, forward_backward(ref, f64, gy))
