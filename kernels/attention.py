"""Space-time separable attention. (Reference-only placeholder: the Triton kernels replace the
dispatch below; the public signatures are the contract the models use.)"""
import torch
import torch.nn.functional as F
from einops import rearrange

from kernels.dispatch import use_triton


def spacetime_attention_ref(q, k, v, mode="spatial", causal=False, scale=None, upcast=False):
    """q, k, v: (B, T, S, H, D) -> (B, T, S, H, D). mode: spatial | temporal | full."""
    B, T, S, H, D = q.shape
    dtype = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    pattern = {"spatial": "b t s h d -> (b t) h s d", "temporal": "b t s h d -> (b s) h t d",
               "full": "b t s h d -> b h (t s) d"}[mode]
    qq, kk, vv = (rearrange(x, pattern) for x in (q, k, v))
    mask = None
    if causal:
        if mode == "temporal":
            is_causal = True
        elif mode == "full":  # causal over frames: a token sees its own and earlier frames
            frame = torch.arange(T, device=q.device).repeat_interleave(S)
            mask = frame[:, None] >= frame[None, :]
            is_causal = False
        else:
            raise ValueError("causal attention is defined for temporal and full modes")
    else:
        is_causal = False
    o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, is_causal=is_causal and mask is None,
                                       scale=scale)
    inverse = {"spatial": "(b t) h s d -> b t s h d", "temporal": "(b s) h t d -> b t s h d",
               "full": "b h (t s) d -> b t s h d"}[mode]
    return rearrange(o, inverse, b=B, t=T, s=S).to(dtype)


def cross_attention_ref(q, k, v, key_mask=None, scale=None, upcast=False):
    """q: (B, N, H, D); k, v: (B, L, H, D); key_mask: (B, L) bool, True = attend -> (B, N, H, D)."""
    dtype = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    mask = None if key_mask is None else key_mask[:, None, None, :]
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=mask, scale=scale)
    return o.transpose(1, 2).to(dtype)


def spacetime_attention(q, k, v, mode="spatial", causal=False, scale=None, backend=None):
    if use_triton(backend, q, k, v):
        raise NotImplementedError("Triton attention kernels are not written yet")
    return spacetime_attention_ref(q, k, v, mode, causal, scale)


def cross_attention(q, k, v, key_mask=None, scale=None, backend=None):
    if use_triton(backend, q, k, v):
        raise NotImplementedError("Triton attention kernels are not written yet")
    return cross_attention_ref(q, k, v, key_mask, scale)
