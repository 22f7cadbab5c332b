"""Fused LayerNorm + adaLN modulate against layer_norm_modulate_ref: output, dx, dshift and dscale
within twice PyTorch's own same-precision error plus a small floor, in the interpreter on CPU."""
import pytest
import torch

from kernels.layer_norm_modulate import (layer_norm_modulate, layer_norm_modulate_linear,
                                         layer_norm_modulate_ref)

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


@pytest.mark.parametrize("bias,B", [(True, 3), (False, 3), (True, 1)])
def test_modulated_linear_matches_unfused(bias, B):
    """layer_norm_modulate_linear's reference path (the modulation folded into per-sample GEMM
    weights) against F.linear of the reference modulation: output and every gradient, fp32, B=3 and
    B=1 (its own weight-gradient branch), shift and scale as strided chunks of one adaLN
    projection."""
    torch.manual_seed(0)
    x = torch.randn(B, 37, 20) * 3
    mod = torch.randn(B, 60) * 0.5
    lin = torch.nn.Linear(20, 11, bias=bias)
    gy = torch.randn(B, 37, 11)
    leaves = [x, mod, *lin.parameters()]

    def run(fn):
        for t in leaves:
            t.requires_grad_()
        shift, scale, _ = mod.chunk(3, dim=1)
        out = fn(x, shift, scale)
        return [out, *torch.autograd.grad(out, leaves, gy)]

    got = run(lambda x, sh, sc: layer_norm_modulate_linear(x, sh, sc, lin.weight, lin.bias))
    want = run(lambda x, sh, sc: torch.nn.functional.linear(layer_norm_modulate_ref(x, sh, sc),
                                                           lin.weight, lin.bias))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"shift, scale \(B, C\)"):
        layer_norm_modulate_linear(x, mod[:, :3], mod[:, :3], lin.weight)
