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


def fp64_leaves(*tensors):
    """Inputs made in fp32 (so both precisions see the same values) -> (fp32 leaves, fp64 leaves)."""
    make = lambda dt: [None if t is None else t.to(dt).detach().requires_grad_() for t in tensors]  # noqa: E731
    return make(torch.float32), make(torch.float64)


ULPS = 3   # an fp32 result within a few units in the last place of its largest value


def assert_fp32_within_fp64(names, got, same, gold):
    """fp32 tensors against an independent fp64 reference `gold` (DESIGN.md's rule without the
    fp32 reference's own rounding in the golden values): the kernel's error `got - gold` is at
    most twice PyTorch's fp32 error `same - gold` plus one ulp of gold's largest value, and at
    most ULPS ulps of it whatever PyTorch's error is on this CPU (it differs between CPUs: a
    causal 3x3x3 conv's fp32 dW was 5.3e-6 from fp64 on a Xeon, up to 59 ulps here on long
    reductions). One long fp32 chain over every position (the dW pass before it summed in parts)
    was 3.7-3.9 ulps on these shapes."""
    for name, a, s, g in zip(names, got, same, gold):
        assert a.shape == g.shape, f"{name}: shape {tuple(a.shape)} != {tuple(g.shape)}"
        ulp = 2.0 ** -23 * g.abs().max().item()
        err, ref_err = (a.double() - g).abs().max().item(), (s.double() - g).abs().max().item()
        assert err <= 2 * ref_err + ulp, \
            f"{name}: error {err:.3g} > 2 x PyTorch's fp32 error {ref_err:.3g} + one ulp {ulp:.3g}"
        assert err <= ULPS * ulp, f"{name}: error {err:.3g} = {err / ulp:.2f} ulps of its largest value > {ULPS}"
