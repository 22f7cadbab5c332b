"""Layers the networks share (so no network imports another): the diffusion timestep embedding
and 1D sin-cos positions (DDPM / Transformer), conv parameters initialised as nn.Conv3d's and the
space-time separable (2+1)D conv (Imagen Video), and adaLN-Zero's modulated and gated linears
(DiT, Peebles & Xie 2023, Sec. 3.2) with the modulation folded into the GEMMs."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.conv2plus1d import conv2plus1d
from kernels.layer_norm_modulate import layer_norm_modulate_linear


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of continuous t in [0, 1] (scaled to [0, 1000] as in DDPM)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]                   # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)       # (B, dim)


def sincos_1d(pos: torch.Tensor, dim: int) -> torch.Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, device=pos.device) / (dim // 2))
    out = pos.float()[:, None] * omega[None]                            # (N, dim/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=-1)         # (N, dim)


def conv_params(cout: int, cin: int, kt: int, kh: int, kw: int, zero: bool = False):
    """Weight (Cout, Cin, kt, kh, kw) and bias (Cout,) initialised as nn.Conv3d's (or zeros)."""
    w, b = nn.Parameter(torch.empty(cout, cin, kt, kh, kw)), nn.Parameter(torch.empty(cout))
    nn.init.kaiming_uniform_(w, a=math.sqrt(5))
    nn.init.uniform_(b, -1 / math.sqrt(cin * kt * kh * kw), 1 / math.sqrt(cin * kt * kh * kw))
    if zero:
        nn.init.zeros_(w)
        nn.init.zeros_(b)
    return w, b


class Conv2plus1d(nn.Module):
    """Space-time separable conv (Imagen Video): k x k per frame to Cout, then temporal kt
    ('same' in time, or causal: past frames only, for the VAE's decoder)."""

    def __init__(self, cin: int, cout: int, k: int = 3, kt: int = 3, zero=False, causal=False):
        super().__init__()
        self.causal = causal
        self.ws, self.bs = conv_params(cout, cin, 1, k, k)               # (Cout, Cin, 1, k, k)
        self.wt, self.bt = conv_params(cout, cout, kt, 1, 1, zero)       # (Cout, Cout, kt, 1, 1)

    def forward(self, x):                                                # (B, Cin, T, H, W)
        return conv2plus1d(x, self.ws, self.bs, self.wt, self.bt, causal=self.causal)


class GatedLinear(torch.autograd.Function):
    """adaLN-Zero's gated residual around a block's output projection, x + g * (o @ W^T + b), as one
    GEMM: the per-sample gate is folded into the weights (W * g: C x C_in per sample) and the
    residual and the gated bias into the GEMM's accumulator (baddbmm with beta 1). Against
    linear + addcmul this skips writing the projection's output, one elementwise pass forward and
    two backward (grad * g, and grad * f for dg), and does not save the projection's output.
    x: (B, N, C), g: (B, C), o: (B, N, C_in), W: (C, C_in), b: (C,) -> (B, N, C) in x's dtype."""

    @staticmethod
    def forward(ctx, x, g, o, W, b):
        Wg = (W * g[:, :, None]).to(o.dtype)                             # (B, C, C_in)
        out = x + (b * g)[:, None].to(x.dtype)                           # (B, N, C)
        if o.dtype == x.dtype:
            out.baddbmm_(o, Wg.transpose(1, 2))
        else:                                                            # autocast: o in bf16/fp16
            out += torch.bmm(o, Wg.transpose(1, 2)).to(x.dtype)
        ctx.save_for_backward(g, o, W, b)
        return out

    @staticmethod
    def backward(ctx, grad):                                             # (B, N, C)
        g, o, W, b = ctx.saved_tensors
        gc = grad.to(o.dtype)
        do = torch.bmm(gc, (W * g[:, :, None]).to(o.dtype))              # (B, N, C_in)
        dWg = torch.bmm(gc.transpose(1, 2), o).to(W.dtype)               # (B, C, C_in) per sample
        gsum = grad.sum(1).to(W.dtype)                                   # (B, C)
        dg = ((dWg * W).sum(2) + gsum * b).to(g.dtype)
        dW = (dWg * g[:, :, None].to(W.dtype)).sum(0)
        db = (gsum * g.to(W.dtype)).sum(0)
        return grad, dg, do, dW, db


def weight_and_bias(linear: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The (weight, bias) a linear layer applies, for the fused ops that read them directly: a
    plain nn.Linear's own, or, for a PEFT LoRA layer (cascade/adapters.py; Hu et al. 2021, eq. 3),
    W + sum over its active adapters of scaling * B A (differentiable in A and B, so the adapters
    train through the fused kernels). Dropout on the adapters' input is not applied here."""
    base = getattr(linear, "base_layer", None)
    if base is None:
        return linear.weight, linear.bias
    w = base.weight
    if not getattr(linear, "merged", False) and not getattr(linear, "disable_adapters", False):
        for name in linear.active_adapters:
            if name in linear.lora_A:
                w = w + linear.scaling[name] * (linear.lora_B[name].weight @ linear.lora_A[name].weight)
    return w, base.bias


def gated_linear(x, g, o, linear: nn.Linear):
    """x + g * linear(o) (GatedLinear) for x (B, ..., C), g (B, C), o (B, ..., C_in)."""
    B, C = x.shape[0], x.shape[-1]
    out = GatedLinear.apply(x.reshape(B, -1, C), g, o.reshape(B, -1, o.shape[-1]),
                            *weight_and_bias(linear))
    return out.view(x.shape)


def modulated_linear(x, shift, scale, linear: nn.Linear, layout=None):
    """linear(LN(x) * (1 + scale) + shift) for x (B, N, C), shift and scale (B, C) (the fused
    kernel path); packed (layout given): x (1, total, C) with a shift and scale per token (total, C)."""
    if layout is None:
        return layer_norm_modulate_linear(x, shift, scale, *weight_and_bias(linear))
    return linear(F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale) + shift)


def gated(x, g, o, linear: nn.Linear, layout=None):
    """x + g * linear(o) (adaLN-Zero's gated residual); packed: g per token (total, C)."""
    if layout is None:
        return gated_linear(x, g, o, linear)
    return x + g * linear(o)
