"""The kernel tests' error rule (DESIGN.md, "Kernels"; flash-attention's rule): a kernel's error
against the fp32 reference is at most twice PyTorch's own same-precision error, plus a small floor."""
import torch

FLOOR = {torch.float32: 1e-5, torch.float16: 2.5e-4, torch.bfloat16: 2e-3}  # x max(1, |golden|)


def forward_backward(fn, inputs, gy):
    """[output, gradient of every non-None input] for upstream gradient gy."""
    out = fn(*inputs)
    leaves = [t for t in inputs if t is not None]
    return [out, *torch.autograd.grad(out, leaves, gy.to(out.dtype))]


def assert_within(names, got, golden, same, dtype):
    """got: the kernel's tensors; golden: the fp32 reference's; same: the reference run at dtype."""
    for name, a, g, s in zip(names, got, golden, same):
        assert a.shape == g.shape, f"{name}: shape {tuple(a.shape)} != {tuple(g.shape)}"
        floor = FLOOR[dtype] * max(1.0, g.abs().max().item())
        err = (a.float() - g).abs().max().item()
        ref_err = (s.float() - g).abs().max().item()
        assert err <= 2 * ref_err + floor, \
            f"{name}: error {err:.3g} > 2 x PyTorch's {ref_err:.3g} + {floor:.3g}"
