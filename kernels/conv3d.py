"""3D convolution. (Reference-only placeholder: the Triton implicit-GEMM kernels replace the
dispatch below; the public signature is the contract the models use.)"""
import torch
import torch.nn.functional as F

from kernels.dispatch import use_triton


def _triple(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v, v)


def conv3d_ref(x, weight, bias=None, stride=1, padding=0, causal=False, upcast=False):
    """x: (B, Cin, T, H, W); weight: (Cout, Cin, kt, kh, kw) -> (B, Cout, T', H', W').

    causal: time is padded with kt-1 zero frames before the first frame and none after (the
    temporal entry of `padding` is ignored), so output frame t sees input frames <= t*stride_t."""
    dtype = x.dtype
    if upcast:
        x, weight = x.float(), weight.float()
        bias = None if bias is None else bias.float()
    stride, padding = _triple(stride), _triple(padding)
    if causal:
        x = F.pad(x, (0, 0, 0, 0, weight.shape[2] - 1, 0))
        padding = (0, padding[1], padding[2])
    return F.conv3d(x, weight, bias, stride, padding).to(dtype)


def conv3d(x, weight, bias=None, stride=1, padding=0, causal=False, backend=None):
    if use_triton(backend, x, weight):
        raise NotImplementedError("Triton conv3d is not written yet")
    return conv3d_ref(x, weight, bias, stride, padding, causal)
