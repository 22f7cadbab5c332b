"""conv3d Triton kernels (implicit GEMM) against conv3d_ref: output and every gradient within twice
PyTorch's own same-precision error plus a small floor, in the interpreter on CPU (DESIGN.md)."""
import pytest
import torch

import kernels.conv3d as conv3d_mod
from kernels.conv3d import conv3d, conv3d_ref

from kernel_tolerance import assert_fp32_within_fp64, assert_within, forward_backward, fp64_leaves


def layout(t, how):
    """A fresh leaf holding t's values in the asked layout."""
    if how == "channels_last":
        t = t.to(memory_format=torch.channels_last_3d)
    elif how == "permuted":  # strides in (b, c, w, h, t) order
        t = t.permute(0, 1, 4, 3, 2).contiguous().permute(0, 1, 4, 3, 2)
    elif how == "sliced":  # a window of a wider tensor: gaps between rows
        t = torch.cat([t, torch.zeros_like(t[..., :3])], -1)[..., :t.shape[-1]]
    return t.detach().requires_grad_()


def check(B, cin, cout, T, H, W, k, stride, padding, causal=False, bias=True, dtype=torch.float32,
          how="contiguous", device="cpu", backend="triton"):
    torch.manual_seed(0)
    x = torch.randn(B, cin, T, H, W, device=device).to(dtype)
    w = (torch.randn(cout, cin, *k, device=device) / (cin * k[0] * k[1] * k[2]) ** 0.5).to(dtype)
    b = torch.randn(cout, device=device).to(dtype) if bias else None
    args = dict(stride=stride, padding=padding, causal=causal)
    gy = torch.randn(conv3d_ref(x, w, b, **args).shape, device=device)

    def leaves(cast):
        return [None if t is None else cast(t).detach().requires_grad_() for t in (x, w, b)]

    impl = conv3d_mod.conv3d_folded if backend == "folded" else \
        (lambda x, w, b, **a: conv3d(x, w, b, **a, backend=backend))
    got = forward_backward(lambda x, w, b: impl(x, w, b, **args),
                           [layout(x, how), *leaves(lambda t: t.clone())[1:]], gy)
    same = forward_backward(lambda x, w, b: conv3d_ref(x, w, b, **args), leaves(lambda t: t.clone()), gy)
    golden = forward_backward(lambda x, w, b: conv3d_ref(x, w, b, **args, upcast=True),
                              leaves(lambda t: t.float()), gy)
    assert got[0].dtype == dtype
    if how == "channels_last" and backend == "triton":
        assert got[0].is_contiguous(memory_format=torch.channels_last_3d)
        assert got[1].is_contiguous(memory_format=torch.channels_last_3d)
    assert_within(["y", "dx", "dw", "db"][:len(got)], got, golden, same, dtype)


CASES = {  # B, cin, cout, T, H, W, k, stride, padding, causal, bias, dtype, layout
    "3x3x3-asym-stride-pad": (1, 3, 20, 5, 13, 13, (3, 3, 3), (1, 2, 1), (1, 0, 1), False, True,
                              torch.float32, "contiguous"),
    "causal-stride-t2-w2-two-n-tiles": (1, 20, 40, 5, 9, 11, (3, 1, 3), (2, 1, 2), (0, 1, 2), True,
                                        True, torch.float32, "contiguous"),
    "fp16-channels-last": (2, 20, 3, 5, 9, 9, (3, 3, 3), 1, 1, False, True, torch.float16,
                           "channels_last"),
    "fp16-causal-downsample-permuted": (1, 20, 16, 5, 13, 13, (3, 3, 3), (2, 2, 1), (1, 1, 0), True,
                                        True, torch.float16, "permuted"),
    "fp32-sliced-pad2": (1, 16, 20, 5, 7, 13, (3, 3, 1), (1, 1, 2), (2, 1, 0), False, True,
                         torch.float32, "sliced"),
    "pointwise-stride2-no-bias": (2, 20, 20, 5, 13, 13, (1, 1, 1), 2, 0, False, False,
                                  torch.float32, "contiguous"),
    "even-kernel-2x2x2-stride2": (1, 3, 20, 5, 13, 13, (2, 2, 2), 2, 0, False, True, torch.float32,
                                  "contiguous"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_conv3d_matches_reference(case):
    B, cin, cout, T, H, W, k, stride, padding, causal, bias, dtype, how = CASES[case]
    check(B, cin, cout, T, H, W, k, stride, padding, causal, bias, dtype, how)


FOLDED_CASES = {**{k: v for k, v in CASES.items() if v[11] == torch.float32},
                "time-only-causal": (2, 6, 5, 7, 5, 3, (3, 1, 1), 1, 0, True, True, torch.float32,
                                     "permuted"),
                "time-only-same-stride2": (1, 6, 5, 7, 5, 3, (3, 1, 1), (2, 1, 1), (1, 0, 0), False,
                                           False, torch.float32, "contiguous"),
                "spatial-1x3x3-channels-last": (2, 5, 7, 3, 9, 6, (1, 3, 3), 1, (0, 1, 1), False, True,
                                                torch.float32, "channels_last")}


SPLIT_CASES = {  # one clip, time stride 1: conv3d_split_batch (odd and even output lengths)
    "3x3x3-causal-T5": (1, 6, 7, 5, 9, 6, (3, 3, 3), (1, 2, 1), (0, 1, 1), True, True, torch.float32,
                        "contiguous"),
    "3x3x3-same-T4": (1, 5, 4, 4, 7, 7, (3, 3, 3), 1, 1, False, True, torch.float32, "permuted"),
    "3x1x3-T2-nobias": (1, 3, 4, 2, 5, 6, (3, 1, 3), 1, (1, 0, 1), False, False, torch.float32,
                        "contiguous"),
}


@pytest.mark.parametrize("case", SPLIT_CASES, ids=list(SPLIT_CASES))
def test_cpu_split_batch_path_matches_reference(case, monkeypatch):
    """A single clip's conv3d on CPU as two overlapping time halves in one batch of 2 (oneDNN)."""
    calls = []
    real = conv3d_mod.conv3d_split_batch
    monkeypatch.setattr(conv3d_mod, "conv3d_split_batch", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    B, cin, cout, T, H, W, k, stride, padding, causal, bias, dtype, how = SPLIT_CASES[case]
    check(B, cin, cout, T, H, W, k, stride, padding, causal, bias, dtype, how, backend="torch")
    assert calls


@pytest.mark.parametrize("case", FOLDED_CASES, ids=list(FOLDED_CASES))
def test_cpu_folded_path_matches_reference(case, monkeypatch):
    """conv3d_folded (time taps stacked on channels, one conv2d) against F.conv3d, output and
    gradients, for every kernel; conv3d's CPU path takes it for 1 x k x k and k x 1 x 1 kernels."""
    B, cin, cout, T, H, W, k, stride, padding, causal, bias, dtype, how = FOLDED_CASES[case]
    check(B, cin, cout, T, H, W, k, stride, padding, causal, bias, dtype, how, backend="folded")
    calls = []
    real = conv3d_mod.conv3d_folded
    monkeypatch.setattr(conv3d_mod, "conv3d_folded", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    check(B, cin, cout, T, H, W, k, stride, padding, causal, bias, dtype, how, backend="torch")
    assert bool(calls) == (k[0] == 1 or k[1] == k[2] == 1)


def test_conv3d_dw_split_partials(monkeypatch):
    """The GPU cuts dW's sum over positions into fp32 partials; force that path on CPU."""
    monkeypatch.setattr(conv3d_mod, "_dw_split", lambda device, tiles, P, bk: 3)
    check(1, 3, 16, 5, 13, 13, (3, 3, 3), (1, 1, 2), (1, 1, 0), causal=True)


FP64_CASES = {  # B, cin, cout, T, H, W, k, causal: odd shapes; the last two are long reductions
    "causal-3x3x3-6x9x7": (1, 20, 20, 6, 9, 7, (3, 3, 3), True),
    "causal-two-clips": (2, 16, 24, 7, 13, 11, (3, 3, 3), True),
    "long-6k-positions": (1, 8, 8, 9, 25, 27, (1, 3, 3), False),
    "long-two-clips-time-only": (2, 4, 6, 9, 40, 36, (3, 1, 1), True),
}


@pytest.mark.parametrize("case", FP64_CASES, ids=list(FP64_CASES))
def test_conv3d_fp32_against_fp64(case):
    """fp32 output and gradients against an fp64 reference; dW and db sum over every output
    position (16k of them in the long cases), which the kernel reduces in parts."""
    B, cin, cout, T, H, W, k, causal = FP64_CASES[case]
    torch.manual_seed(0)
    x, w = torch.randn(B, cin, T, H, W), torch.randn(cout, cin, *k) / (cin * k[0] * k[1] * k[2]) ** 0.5
    b = torch.randn(cout)
    gy = torch.randn(conv3d_ref(x, w, b, padding=1, causal=causal).shape)
    f32, f64 = fp64_leaves(x, w, b)
    fn = lambda impl: lambda x, w, b: impl(x, w, b, padding=1, causal=causal)  # noqa: E731
    got = forward_backward(fn(lambda *a, **kw: conv3d(*a, **kw, backend="triton")), f32, gy)
    same = forward_backward(fn(conv3d_ref), fp64_leaves(x, w, b)[0], gy)
    gold = forward_backward(fn(conv3d_ref), f64, gy)
    assert_fp32_within_fp64(["y", "dx", "dw", "db"], got, same, gold)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("how", ["contiguous", "channels_last"])
def test_conv3d_gpu(dtype, how, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # IEEE fp32 on both sides
    check(2, 20, 40, 7, 19, 21, (3, 3, 3), (2, 1, 2), (1, 1, 0), True, True, dtype, how, "cuda")
    check(1, 64, 128, 9, 32, 32, (3, 3, 3), 1, 1, False, True, dtype, how, "cuda")


def test_autocast_casts_like_f_conv3d():
    """Under autocast the models pass fp32 weights with low-precision activations."""
    x, w, b = torch.randn(1, 3, 4, 7, 7), torch.randn(16, 3, 3, 3, 3) / 9, torch.randn(16)
    with torch.autocast("cpu", dtype=torch.float16):
        got = conv3d(x.half(), w, b, padding=1, causal=True, backend="triton")
        ref = conv3d_ref(x.half(), w, b, padding=1, causal=True)
        got32 = conv3d(x, w, b, padding=1, backend="triton")  # computed in fp16, returned in fp32
        ref32 = conv3d_ref(x, w, b, padding=1)
    assert got.dtype == ref.dtype == torch.float16 and got32.dtype == ref32.dtype == torch.float32
    assert torch.allclose(got.float(), ref.float(), atol=2e-2, rtol=2e-3)
    assert torch.allclose(got32, ref32, atol=2e-2, rtol=2e-3)


def test_dispatch_and_errors():
    x, w = torch.randn(1, 3, 4, 5, 5), torch.randn(2, 3, 3, 3, 3)
    torch.testing.assert_close(conv3d(x, w, padding=1), conv3d_ref(x, w, padding=1))  # CPU paths
    torch.testing.assert_close(conv3d(x, w, padding=1, backend="torch"), conv3d_ref(x, w, padding=1))
    with pytest.raises(ValueError, match="channels"):
        conv3d(x, torch.randn(2, 4, 3, 3, 3), backend="triton")
    with pytest.raises(TypeError, match="one dtype"):
        conv3d(x, w.half(), backend="triton")
    with pytest.raises(ValueError, match="smaller than kernel"):
        conv3d(x[:, :, :2], w, backend="triton")
