"""Flash attention kernels (kernels/attention.py) against the fp32 PyTorch reference.

Rule (DESIGN.md, FlashAttention's tests): the kernel's error against the fp32-upcast reference is at
most twice PyTorch's own error at the same precision, plus a small absolute floor. On CPU the
kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so shapes are small
and odd: S = 37, T = 7 and 1, head_dim 24 / 40 / 72, inputs that are views of a fused qkv tensor.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import kernels.attention as attention
from kernels.attention import (cross_attention, cross_attention_ref, spacetime_attention,
                               spacetime_attention_ref, varlen_attention, varlen_attention_ref)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FLOOR = {torch.float32: 1e-5, torch.float16: 2e-4, torch.bfloat16: 2e-3}
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]


def _assert_within_pytorch_error(kernel_fn, ref_fn, inputs, dtype):
    """Outputs and every gradient of kernel_fn(*inputs) vs ref_fn on fp32 copies, bounded by
    2 x |ref_fn(*inputs) - fp32 ref| + FLOOR[dtype]."""
    torch.manual_seed(1)
    out = kernel_fn(*inputs)
    d_out = torch.randn_like(out)
    got = (out, *torch.autograd.grad(out, inputs, d_out))
    pt = ref_fn(*inputs)
    same_precision = (pt, *torch.autograd.grad(pt, inputs, d_out))
    x32 = [x.detach().float().requires_grad_() for x in inputs]
    ref = ref_fn(*x32)
    exact = (ref, *torch.autograd.grad(ref, x32, d_out.float()))
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), got, same_precision, exact):
        assert a.dtype == dtype and a.shape == c.shape, name
        err = (a.float() - c).abs().max().item()
        pt_err = (b.float() - c).abs().max().item()
        assert err <= 2 * pt_err + FLOOR[dtype], f"{name}: error {err:.3g}, PyTorch's own {pt_err:.3g}"


def _fused_qkv(shape, dtype, axis):
    """q, k, v as strided views of one fused projection, stacked along `axis` (like qkv.unbind)."""
    qkv = torch.randn(*shape[:axis], 3, *shape[axis:], device=DEVICE, dtype=dtype, requires_grad=True)
    return qkv.unbind(axis)


SPACETIME_CASES = [  # (mode, causal, (B, T, S, H, D))
    ("spatial", False, (1, 2, 37, 2, 24)),   # odd S over two 32-tiles, head_dim 24
    ("temporal", False, (1, 7, 5, 2, 40)),   # odd T, head_dim 40, 5 positions over 4-position programs
    ("temporal", True, (2, 7, 3, 1, 24)),    # causal in time
    ("temporal", False, (1, 1, 6, 2, 16)),   # T = 1 (images in joint image+video training)
    ("full", False, (1, 3, 13, 2, 24)),      # 39 tokens over two tiles
    ("full", True, (1, 4, 11, 1, 40)),       # frame-causal, frames straddling tile edges
    ("spatial", False, (1, 1, 20, 1, 72)),   # head_dim 72 padded to 128
    ("full", False, (2, 2, 9, 1, 96)),       # head_dim 96, two videos
    ("temporal", True, (1, 33, 2, 1, 16)),   # T longer than a tile: causal across key tiles
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode,causal,shape", SPACETIME_CASES)
def test_spacetime_attention(mode, causal, shape, dtype):
    torch.manual_seed(0)
    q, k, v = _fused_qkv(shape, dtype, axis=3)  # (B, T, S, H, D) views of (B, T, S, 3, H, D)
    _assert_within_pytorch_error(
        lambda q, k, v: spacetime_attention(q, k, v, mode, causal, backend="triton"),
        lambda q, k, v: spacetime_attention_ref(q, k, v, mode, causal), (q, k, v), dtype)


@pytest.mark.parametrize("mode,causal,shape", SPACETIME_CASES)
def test_cpu_path_matches_reference(mode, causal, shape):
    """The CPU path (backend="torch": softmax(Q K^T) V by matmuls when the scores are small, else
    SDPA) within PyTorch's own fp32 error, for every spacetime case and masked cross-attention."""
    torch.manual_seed(0)
    q, k, v = _fused_qkv(shape, torch.float32, axis=3)
    _assert_within_pytorch_error(
        lambda q, k, v: spacetime_attention(q, k, v, mode, causal, backend="torch"),
        lambda q, k, v: spacetime_attention_ref(q, k, v, mode, causal), (q, k, v), torch.float32)
    B, N, L, H, D = 2, 9, 13, 2, 24
    q = torch.randn(B, N, H, D, requires_grad=True)
    k, v = _fused_qkv((B, L, H, D), torch.float32, axis=2)[:2]
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, 5:] = False
    _assert_within_pytorch_error(lambda q, k, v: cross_attention(q, k, v, mask, backend="torch"),
                                 lambda q, k, v: cross_attention_ref(q, k, v, mask), (q, k, v),
                                 torch.float32)


def test_cpu_path_picks_matmuls_only_for_small_scores(monkeypatch):
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    q = torch.randn(1, 2, 16, 2, 8)
    spacetime_attention(q, q, q, "spatial", backend="torch")
    assert not calls                                                   # 2 x 2 x 16 x 16 scores
    monkeypatch.setattr(attention, "MATH_SCORES_BYTES", 100)
    spacetime_attention(q, q, q, "spatial", backend="torch")
    assert calls


@pytest.mark.parametrize("mode,causal,scale", [("temporal", True, 0.3), ("temporal", False, None),
                                               ("spatial", False, 1.0)])
def test_cpu_math_path_matches_sdpa(mode, causal, scale):
    """The CPU's two-matmul attention (_MathAttention: small score matrices) on strided views of one
    fused (B, T, S, 3, H, D) qkv against SDPA: output and the qkv gradient, fp32."""
    torch.manual_seed(0)
    qkv = torch.randn(2, 5, 6, 3, 2, 8, requires_grad=True)
    g = torch.randn(2, 5, 6, 2, 8)
    got, want = (spacetime_attention_ref(*qkv.unbind(3), mode, causal, scale, fast=fast)
                 for fast in (True, False))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.autograd.grad(got, qkv, g)[0],
                               torch.autograd.grad(want, qkv, g)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["temporal", "full"])
def test_spacetime_odd_layouts(mode):
    """Separately allocated (B, S, T, H, D) tensors seen as (B, T, S, H, D) (time and space do not
    merge into one axis), an explicit scale, and a non-contiguous incoming gradient."""
    torch.manual_seed(0)
    B, T, S, H, D = 1, 3, 7, 2, 24
    q, k, v = (torch.randn(B, S, T, H, D, device=DEVICE).transpose(1, 2).requires_grad_()
               for _ in range(3))
    out = spacetime_attention(q, k, v, mode, causal=True, scale=0.3, backend="triton")
    ref = spacetime_attention_ref(q, k, v, mode, causal=True, scale=0.3)
    d_out = torch.randn(B, S, T, H, D, device=DEVICE).transpose(1, 2)
    for a, b in zip((out, *torch.autograd.grad(out, (q, k, v), d_out)),
                    (ref, *torch.autograd.grad(ref, (q, k, v), d_out))):
        torch.testing.assert_close(a, b, atol=FLOOR[torch.float32], rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masked,N,L", [(True, 37, 13), (False, 37, 13), (True, 5, 70)])
def test_cross_attention(masked, N, L, dtype):
    torch.manual_seed(0)
    B, H, D = 2, 2, 40
    q = torch.randn(B, N, H, D, device=DEVICE, dtype=dtype, requires_grad=True)
    k, v = _fused_qkv((B, L, H, D), dtype, axis=2)[:2]  # views of a fused (B, L, 2, H, D) kv
    mask = None
    if masked:  # padded text: example 0 keeps its first 5 tokens, example 1 drops its first ones
        mask = torch.ones(B, L, dtype=torch.bool, device=DEVICE)
        mask[0, 5:] = False
        mask[1, :40 if L > 64 else 3] = False  # L = 70: a whole first key tile of padding
    _assert_within_pytorch_error(
        lambda q, k, v: cross_attention(q, k, v, mask, backend="triton"),
        lambda q, k, v: cross_attention_ref(q, k, v, mask), (q, k, v), dtype)


LENS = [5, 17, 1, 33]  # a 1-token example and one longer than a 32-tile


def _cu(lens):
    return torch.tensor([0] + lens, device=DEVICE).cumsum(0).to(torch.int32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_varlen_attention(dtype):
    """NaViT packing against the per-example reference (which cannot leak across examples)."""
    torch.manual_seed(0)
    q, k, v = _fused_qkv((sum(LENS), 2, 24), dtype, axis=1)  # (total, H, D) views of (total, 3, H, D)
    cu = _cu(LENS)
    _assert_within_pytorch_error(
        lambda q, k, v: varlen_attention(q, k, v, cu, max(LENS), backend="triton"),
        lambda q, k, v: varlen_attention_ref(q, k, v, cu), (q, k, v), dtype)


def test_varlen_no_leakage():
    """Example 1's output depends on example 1's tokens only, in value and in gradient."""
    torch.manual_seed(0)
    lens, H, D = [9, 20, 6], 1, 16
    cu = _cu(lens)
    q, k, v = (torch.randn(sum(lens), H, D, device=DEVICE, requires_grad=True) for _ in range(3))
    out = varlen_attention(q, k, v, cu, max(lens), backend="triton")
    own = slice(9, 29)
    grads = torch.autograd.grad(out[own].sum(), (q, k, v))
    for g in grads:
        assert g[:9].abs().max() == 0 and g[29:].abs().max() == 0
        assert g[own].abs().max() > 0
    with torch.no_grad():
        k2, v2 = k.clone(), v.clone()
        k2[:9] += 5.0
        v2[29:] -= 5.0
        out2 = varlen_attention(q, k2, v2, cu, max(lens), backend="triton")
    assert torch.equal(out2[own], out[own])


class _KernelRecorder:
    """Stands in for a @triton.jit kernel: records the arguments of each launch, runs nothing."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append(args)


class _OpLog(TorchDispatchMode):
    """Every aten op run inside, with the sizes of the tensors it returns."""

    def __init__(self):
        super().__init__()
        self.ops, self.numels = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append(func.overloadpacket.__name__)
        self.numels += [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


@pytest.mark.parametrize("mode", ["temporal", "spatial", "full"])
def test_kernels_read_the_strided_views_in_place(mode, monkeypatch):
    """Forward and backward hand the kernels the caller's (B, T, S, H, D) views of a fused
    (B, T, S, 3, H, D) qkv (same memory, same strides), copy nothing, and allocate nothing larger
    than one of q, k, v: no transposed copy, whichever axis is the sequence."""
    recorders = {name: _KernelRecorder() for name in
                 ("_attn_fwd_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_dkv_kernel")}
    for name, rec in recorders.items():
        monkeypatch.setattr(attention, name, rec)
    q, k, v = _fused_qkv((2, 5, 6, 2, 24), torch.float32, axis=3)
    d_out = torch.randn(q.shape, device=DEVICE)
    with _OpLog() as log:
        out = spacetime_attention(q, k, v, mode, causal=mode != "spatial", backend="triton")
        torch.autograd.grad(out, (q, k, v), d_out)
    for name, rec in recorders.items():
        assert len(rec.calls) == 1, name
        for got, want in zip(rec.calls[0][:3], (q, k, v)):
            assert got.data_ptr() == want.data_ptr() and got.stride() == want.stride(), name
    copies = {"clone", "copy_", "_to_copy", "contiguous", "as_strided_copy", "permute_copy"}
    assert not copies & set(log.ops), log.ops
    assert max(log.numels) <= q.numel(), (log.ops, log.numels)


def test_contract_errors_and_fallback():
    q = torch.randn(1, 2, 3, 1, 16, device=DEVICE)
    with pytest.raises(ValueError, match="causal"):
        spacetime_attention(q, q, q, "spatial", causal=True, backend="triton")
    with pytest.raises(ValueError, match="head_dim"):
        big = torch.randn(1, 2, 3, 1, 160, device=DEVICE)
        spacetime_attention(big, big, big, "temporal", backend="triton")
    torch.testing.assert_close(spacetime_attention(q, q, q, "temporal", backend="torch"),
                               spacetime_attention_ref(q, q, q, "temporal"))
