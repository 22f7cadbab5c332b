"""GroupNorm + SiLU. (Reference-only placeholder; the public signature is the contract.)"""
import torch.nn.functional as F

from kernels.dispatch import use_triton


def group_norm_silu_ref(x, num_groups, weight=None, bias=None, eps=1e-5, silu=True, upcast=False):
    """x: (B, C, *spatial) -> same shape; SiLU(GroupNorm(x)) (or GroupNorm alone with silu=False)."""
    dtype = x.dtype
    if upcast:
        x = x.float()
        weight = None if weight is None else weight.float()
        bias = None if bias is None else bias.float()
    y = F.group_norm(x, num_groups, weight, bias, eps)
    return (F.silu(y) if silu else y).to(dtype)


def group_norm_silu(x, num_groups, weight=None, bias=None, eps=1e-5, silu=True, backend=None):
    if use_triton(backend, x):
        raise NotImplementedError("Triton GroupNorm+SiLU is not written yet")
    return group_norm_silu_ref(x, num_groups, weight, bias, eps, silu)
