"""LayerNorm (no affine) + adaLN modulate (DiT). (Reference-only placeholder; the public signature
is the contract.)"""
import torch.nn.functional as F

from kernels.dispatch import use_triton


def layer_norm_modulate_ref(x, shift, scale, eps=1e-6, upcast=False):
    """x: (B, N, C); shift, scale: (B, C) -> LayerNorm(x) * (1 + scale) + shift, (B, N, C)."""
    dtype = x.dtype
    if upcast:
        x, shift, scale = x.float(), shift.float(), scale.float()
    y = F.layer_norm(x, x.shape[-1:], eps=eps)
    return (y * (1 + scale[:, None]) + shift[:, None]).to(dtype)


def layer_norm_modulate(x, shift, scale, eps=1e-6, backend=None):
    if use_triton(backend, x):
        raise NotImplementedError("Triton LayerNorm+modulate is not written yet")
    return layer_norm_modulate_ref(x, shift, scale, eps)
