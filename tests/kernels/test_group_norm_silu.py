"""Fused GroupNorm + SiLU against group_norm_silu_ref: output, dx, dweight and dbias within twice
PyTorch's own same-precision error plus a small floor, in the interpreter on CPU."""
import pytest
import torch

from kernels.group_norm_silu import group_norm_silu, group_norm_silu_ref

from kernel_tolerance import assert_within, forward_backward


def layout(t, how):
    """A fresh leaf holding t's values in the asked layout."""
    if how == "channels_last":
        t = t.to(memory_format=torch.channels_last_3d)
    elif how == "permuted":  # (b, c, w, h, t) strides: the spatial dims do not merge
        t = t.permute(0, 1, 4, 3, 2).contiguous().permute(0, 1, 4, 3, 2)
    elif how == "sliced":
        t = torch.cat([t, torch.zeros_like(t[:, :2])], 1)[:, :t.shape[1]]
    return t.detach().requires_grad_()


def check(shape, groups, weight=True, bias=True, silu=True, dtype=torch.float32, how="contiguous",
          offset=0.0, per_frame=False, device="cpu"):
    torch.manual_seed(0)
    C = shape[1]
    x = (torch.randn(shape, device=device) * 2 + offset).to(dtype)
    w = torch.randn(C, device=device) if weight else None  # fp32 affine, as nn.GroupNorm under autocast
    b = torch.randn(C, device=device) if bias else None
    gy = torch.randn(shape, device=device)
    fn = lambda x, w, b: group_norm_silu(x, groups, w, b, silu=silu, backend="triton",  # noqa: E731
                                         per_frame=per_frame)
    ref = lambda x, w, b: group_norm_silu_ref(x, groups, w, b, silu=silu,  # noqa: E731
                                              per_frame=per_frame)

    def leaves(cast):
        return [None if t is None else cast(t).requires_grad_() for t in (x, w, b)]

    got = forward_backward(fn, [layout(x, how), *leaves(lambda t: t.clone())[1:]], gy)
    same = forward_backward(ref, leaves(lambda t: t.clone()), gy)
    golden = forward_backward(ref, leaves(lambda t: t.float()), gy)
    assert got[0].dtype == dtype
    if how == "channels_last":
        assert got[0].is_contiguous(memory_format=torch.channels_last_3d)
        assert got[1].is_contiguous(memory_format=torch.channels_last_3d)
    names = ["y", "dx"] + (["dweight"] if weight else []) + (["dbias"] if bias else [])
    assert_within(names, got, golden, same, dtype)


F32, F16 = torch.float32, torch.float16
CASES = {  # shape, groups, weight, bias, silu, dtype, layout, offset, per_frame
    "video-odd": ((2, 20, 5, 13, 13), 4, True, True, True, F32, "contiguous", 0.0, False),
    "channels-last-3d": ((2, 20, 5, 13, 13), 5, True, True, True, F32, "channels_last", 0.0, False),
    "fp16-image": ((3, 20, 7, 9), 4, True, True, True, F16, "contiguous", 0.0, False),
    "fp16-permuted": ((1, 12, 5, 6, 7), 3, True, True, True, F16, "permuted", 0.0, False),
    "no-affine-no-silu-offset": ((2, 20, 5, 13, 13), 5, False, False, False, F32, "contiguous", 100.0,
                                 False),
    "weight-only-sliced": ((2, 20, 3, 7, 5), 10, True, False, True, F32, "sliced", 0.0, False),
    "bias-only-one-group-sequence": ((2, 3, 37), 1, False, True, True, F32, "contiguous", 3.0, False),
    "per-frame-video": ((2, 20, 5, 13, 13), 4, True, True, True, F32, "contiguous", 0.0, True),
    "per-frame-fp16-channels-last-3d": ((1, 20, 3, 9, 11), 5, True, True, True, F16, "channels_last",
                                        0.0, True),
    "per-frame-no-affine-one-frame": ((2, 12, 1, 7, 7), 3, False, False, True, F32, "contiguous", 2.0,
                                      True),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_group_norm_silu_matches_reference(case):
    shape, groups, weight, bias, silu, dtype, how, offset, per_frame = CASES[case]
    check(shape, groups, weight, bias, silu, dtype, how, offset, per_frame)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_group_norm_silu_gpu(dtype):
    check((2, 20, 5, 13, 13), 4, dtype=dtype, device="cuda")
    check((1, 128, 17, 64, 64), 32, dtype=dtype, how="channels_last", device="cuda")
    check((1, 128, 17, 64, 64), 32, dtype=dtype, per_frame=True, device="cuda")


def test_dispatch_and_errors():
    x = torch.randn(2, 6, 5)
    assert torch.equal(group_norm_silu(x, 3), group_norm_silu_ref(x, 3))  # CPU: reference
    with pytest.raises(ValueError, match="divisible into 4 groups"):
        group_norm_silu(x, 4, backend="triton")
    with pytest.raises(ValueError, match=r"\(B, C, T"):
        group_norm_silu(torch.randn(2, 6), 3, backend="triton", per_frame=True)


def test_per_frame_is_the_folded_group_norm():
    """per_frame equals GroupNorm on the frames folded into the batch, "(b t) c h w"."""
    x, w, b = torch.randn(2, 6, 4, 5, 3), torch.randn(6), torch.randn(6)
    folded = group_norm_silu_ref(x.transpose(1, 2).reshape(8, 6, 5, 3), 3, w, b)
    folded = folded.reshape(2, 4, 6, 5, 3).transpose(1, 2)
    got = group_norm_silu(x, 3, w, b, per_frame=True, backend="triton")
    assert torch.allclose(got, folded, atol=1e-5)
