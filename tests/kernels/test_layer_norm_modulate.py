"""Fused LayerNorm + adaLN modulate against layer_norm_modulate_ref: output, dx, dshift and dscale
within twice PyTorch's own same-precision error plus a small floor, in the interpreter on CPU."""
import pytest
import torch

from kernels.layer_norm_modulate import layer_norm_modulate, layer_norm_modulate_ref

from kernel_tolerance import assert_within


def forward_backward(fn, x, mod, gy):
    """shift and scale are chunks of one adaLN projection output, as in the DiT blocks."""
    shift, scale, _ = mod.chunk(3, dim=1)  # (B, C) views with row stride 3C
    out = fn(x, shift, scale)
    return [out, *torch.autograd.grad(out, (x, mod), gy.to(out.dtype))]


def check(B, N, C, dtype=torch.float32, how="contiguous", offset=0.0, device="cpu"):
    torch.manual_seed(0)
    x = (torch.randn(B, N, C, device=device) * 3 + offset).to(dtype)
    mod = (torch.randn(B, 3 * C, device=device) * 0.5).to(dtype)
    gy = torch.randn(B, N, C, device=device)
    xt = x.transpose(1, 2).contiguous().transpose(1, 2) if how == "transposed" else x.clone()
    got = forward_backward(lambda *a: layer_norm_modulate(*a, backend="triton"),
                           xt.requires_grad_(), mod.clone().requires_grad_(), gy)
    same = forward_backward(layer_norm_modulate_ref, x.clone().requires_grad_(),
                            mod.clone().requires_grad_(), gy)
    golden = forward_backward(lambda *a: layer_norm_modulate_ref(*a, upcast=True),
                              x.float().requires_grad_(), mod.float().requires_grad_(), gy)
    assert got[0].dtype == dtype
    assert_within(["y", "dx", "dshift|dscale"], got, golden, same, dtype)


CASES = {  # B, N, C, dtype, layout, offset
    "odd": (2, 37, 20, torch.float32, "contiguous", 0.0),
    "fp16-odd": (2, 37, 24, torch.float16, "contiguous", 0.0),
    "many-rows-transposed": (3, 150, 48, torch.float32, "transposed", 0.0),
    "fp16-transposed": (1, 70, 20, torch.float16, "transposed", 0.0),
    "large-mean-tiny-c": (2, 5, 3, torch.float32, "contiguous", 50.0),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_layer_norm_modulate_matches_reference(case):
    B, N, C, dtype, how, offset = CASES[case]
    check(B, N, C, dtype, how, offset)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_layer_norm_modulate_gpu(dtype):
    check(2, 37, 20, dtype, device="cuda")
    check(4, 1024, 1152, dtype, "transposed", device="cuda")  # DiT-XL width


def test_dispatch_and_errors():
    x, s = torch.randn(2, 3, 4), torch.randn(2, 4)
    assert torch.equal(layer_norm_modulate(x, s, s), layer_norm_modulate_ref(x, s, s))  # CPU: reference
    with pytest.raises(ValueError, match=r"shift, scale \(B, C\)"):
        layer_norm_modulate(x, s[:, :3], s[:, :3], backend="triton")
