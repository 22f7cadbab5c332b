"""LayerNorm (no affine) + adaLN modulate (DiT), forward and backward, fused.

What is fused, and why
    Every DiT block normalises its tokens and modulates them with a per-sample shift and scale
    regressed from the conditioning: y = LN(x) * (1 + scale) + shift (Peebles & Xie 2023, "Scalable
    Diffusion Models with Transformers", Sec. 3.2, adaLN; LN of Ba et al. 2016 without its own
    affine). Unfused, PyTorch writes LN(x), reads it for the multiply, writes, reads for the add,
    writes again, and the backward stores and rereads the intermediates. Here one program holds
    whole rows (C channels) in registers:
      forward   reads x once, writes y once, saves only the per-row mean and 1/std (fp32);
      backward  reads x and dy once, writes dx once: dxhat = dy * (1 + scale),
                dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) per row, and the
                per-sample dshift = sum_n dy, dscale = sum_n dy * xhat are accumulated in registers
                over the program's rows and written as fp32 partials (B, programs, C).

Contract
    x (B, N, C), shift and scale (B, C), any strides (shift and scale may be chunks of one adaLN
    projection); fp16 / bf16 / fp32 x, shift and scale of any float dtype; statistics in fp32;
    y (B, N, C) contiguous in x's dtype.

Known limits
    A row is held in registers: C <= 8192 (DiT-XL has 1152; compiled for sm_90 with ptxas,
    tests/kernels/test_gpu_compile.py: no C up to 8192 spills registers, C = 8192 on 16 warps;
    shared memory at most 16 KB per block; larger rows would spill). No autotuning. dshift and dscale are
    summed from fp32 partials by one torch reduction over the program axis. bf16: GPU only.

Roofline (per call; n = B*N*C, e = bytes per element)
    About 8 FLOP per element: bandwidth-bound, reported in GB/s.
    bytes: forward 2*n*e (+ 8 bytes per row of statistics), backward 3*n*e. PyTorch's unfused
    LayerNorm, multiply and add move about 6*n*e forward.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.dispatch import interpreting, launch, sm_count, use_triton


# ----------------------------------------------------------------------------------------------
# PyTorch reference (the only one: tests and benchmarks import it)
# ----------------------------------------------------------------------------------------------

def layer_norm_modulate_ref(x, shift, scale, eps=1e-6, upcast=False):
    """x: (B, N, C); shift, scale: (B, C) -> LayerNorm(x) * (1 + scale) + shift, (B, N, C)."""
    dtype = x.dtype
    if upcast:
        x, shift, scale = x.float(), shift.float(), scale.float()
    y = F.layer_norm(x, x.shape[-1:], eps=eps)
    return torch.addcmul(shift[:, None], y, 1 + scale[:, None]).to(dtype)   # one pass over y


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
# Program (b, p) owns rows p*ROWS .. p*ROWS+ROWS-1 of sample b, BLOCK_N rows at a time.

@triton.jit
def _ln_mod_fwd_kernel(
    X, SHIFT, SCALE, Y, MEAN, RSTD,
    sxb, sxn, sxc, ssh_b, ssh_c, ssc_b, ssc_c, N, C, ROWS, eps,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """y = (x - mean) * rstd * (1 + scale[b]) + shift[b] for one program's rows."""
    b = tl.program_id(0)
    p = tl.program_id(1)
    offs_c = tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    b64 = b.to(tl.int64)
    shift = tl.load(SHIFT + b64 * ssh_b + offs_c * ssh_c, mask=c_ok, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + b64 * ssc_b + offs_c * ssc_c, mask=c_ok, other=0.0).to(tl.float32)
    for n0 in range(p * ROWS, tl.minimum(p * ROWS + ROWS, N), BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        mask = (rows < N)[:, None] & c_ok[None, :]
        x = tl.load(X + b64 * sxb + rows[:, None].to(tl.int64) * sxn + offs_c[None, :] * sxc,
                    mask=mask, other=0.0).to(tl.float32)  # (BLOCK_N, BLOCK_C)
        mean = tl.sum(x, axis=1) / C
        d = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / C + eps)
        y = d * rstd[:, None] * (1.0 + scale[None, :]) + shift[None, :]
        row = b64 * N + rows  # (BLOCK_N,)
        tl.store(Y + row[:, None] * C + offs_c[None, :], y.to(Y.dtype.element_ty), mask=mask)
        tl.store(MEAN + row, mean, mask=rows < N)
        tl.store(RSTD + row, rstd, mask=rows < N)


@triton.jit
def _ln_mod_bwd_kernel(
    X, DY, SCALE, MEAN, RSTD, DX, DSHIFT_P, DSCALE_P,
    sxb, sxn, sxc, sdb, sdn, sdc, ssc_b, ssc_c, N, C, ROWS, NPROG,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dx for the program's rows; partial dshift, dscale (B, NPROG, C) summed over them."""
    b = tl.program_id(0)
    p = tl.program_id(1)
    offs_c = tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    b64 = b.to(tl.int64)
    gain = 1.0 + tl.load(SCALE + b64 * ssc_b + offs_c * ssc_c, mask=c_ok, other=0.0).to(tl.float32)
    dshift = tl.zeros([BLOCK_C], dtype=tl.float32)
    dscale = tl.zeros([BLOCK_C], dtype=tl.float32)
    for n0 in range(p * ROWS, tl.minimum(p * ROWS + ROWS, N), BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        r_ok = rows < N
        mask = r_ok[:, None] & c_ok[None, :]
        r64 = rows[:, None].to(tl.int64)
        x = tl.load(X + b64 * sxb + r64 * sxn + offs_c[None, :] * sxc,
                    mask=mask, other=0.0).to(tl.float32)  # (BLOCK_N, BLOCK_C)
        dy = tl.load(DY + b64 * sdb + r64 * sdn + offs_c[None, :] * sdc,
                     mask=mask, other=0.0).to(tl.float32)
        row = b64 * N + rows
        mean = tl.load(MEAN + row, mask=r_ok, other=0.0)
        rstd = tl.load(RSTD + row, mask=r_ok, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        dshift += tl.sum(dy, axis=0)
        dscale += tl.sum(dy * xhat, axis=0)
        dxhat = dy * gain[None, :]
        m1 = tl.sum(dxhat, axis=1) / C
        m2 = tl.sum(dxhat * xhat, axis=1) / C
        dx = rstd[:, None] * (dxhat - m1[:, None] - xhat * m2[:, None])
        tl.store(DX + row[:, None] * C + offs_c[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    part = (b64 * NPROG + p) * C + offs_c
    tl.store(DSHIFT_P + part, dshift, mask=c_ok)
    tl.store(DSCALE_P + part, dscale, mask=c_ok)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

def _pow2(n):
    return 1 << max(0, int(n) - 1).bit_length()


def _plan(B, N, C, device):
    """(BLOCK_N, BLOCK_C, ROWS, NPROG, num_warps): whole rows in a tile of about 4096 elements on a
    GPU and about 4 programs per SM; the interpreter (per tile-step cost) gets 32-row tiles and
    two tiles per program, so tests still see several programs and several tiles per program."""
    block_c = max(16, _pow2(C))
    if interpreting():
        block_n, warps = 32, 4
        rows = 2 * block_n
    else:
        block_n = max(1, min(16, 4096 // block_c))
        warps = 4 if block_c <= 1024 else 8 if block_c <= 4096 else 16
        sms = sm_count(device)
        nprog = max(1, min(triton.cdiv(4 * sms, B), triton.cdiv(N, block_n)))
        rows = triton.cdiv(triton.cdiv(N, nprog), block_n) * block_n
    return block_n, block_c, rows, triton.cdiv(N, rows), warps


def _ln_mod_fwd(x, shift, scale, eps):
    B, N, C = x.shape
    y = torch.empty((B, N, C), device=x.device, dtype=x.dtype)
    mean = torch.empty((B, N), device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    bn, bc, rows, nprog, warps = _plan(B, N, C, x.device)
    launch(_ln_mod_fwd_kernel, (B, nprog))(
        x, shift, scale, y, mean, rstd, *x.stride(), *shift.stride(), *scale.stride(),
        N, C, rows, eps, BLOCK_N=bn, BLOCK_C=bc, num_warps=warps)
    return y, mean, rstd  # (B, N, C), (B, N) fp32, (B, N) fp32


def _ln_mod_bwd(dy, x, scale, mean, rstd):
    """-> (dx (B, N, C), dshift fp32 (B, C), dscale fp32 (B, C))."""
    B, N, C = x.shape
    dx = torch.empty((B, N, C), device=x.device, dtype=x.dtype)
    bn, bc, rows, nprog, warps = _plan(B, N, C, x.device)
    parts = torch.empty((2, B, nprog, C), device=x.device, dtype=torch.float32)
    launch(_ln_mod_bwd_kernel, (B, nprog))(
        x, dy, scale, mean, rstd, dx, parts[0], parts[1], *x.stride(), *dy.stride(),
        *scale.stride(), N, C, rows, nprog, BLOCK_N=bn, BLOCK_C=bc, num_warps=warps)
    sums = parts.sum(2)  # (2, B, C)
    return dx, sums[0], sums[1]


# ----------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------

class _LayerNormModulate(torch.autograd.Function):
    """Saves x, scale (the caller's tensors) and the (B, N) fp32 mean and 1/std."""

    @staticmethod
    def forward(ctx, x, shift, scale, eps):
        y, mean, rstd = _ln_mod_fwd(x, shift, scale, eps)
        ctx.save_for_backward(x, scale, mean, rstd)
        ctx.shift_dtype = shift.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, scale, mean, rstd = ctx.saved_tensors
        dx, dshift, dscale = _ln_mod_bwd(dy, x, scale, mean, rstd)
        return dx, dshift.to(ctx.shift_dtype), dscale.to(scale.dtype), None


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------

def layer_norm_modulate(x, shift, scale, eps=1e-6, backend=None):
    """adaLN (DiT, Peebles & Xie 2023, Sec. 3.2): LayerNorm(x) * (1 + scale) + shift, fused.
    x: (B, N, C); shift, scale: (B, C) -> (B, N, C)."""
    if not use_triton(backend, x):
        return layer_norm_modulate_ref(x, shift, scale, eps)
    if x.dim() != 3 or shift.shape != (x.shape[0], x.shape[2]) or scale.shape != shift.shape:
        raise ValueError(f"layer_norm_modulate takes x (B, N, C) and shift, scale (B, C), got "
                         f"{tuple(x.shape)}, {tuple(shift.shape)}, {tuple(scale.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"layer_norm_modulate takes fp16, bf16 or fp32 x, got {x.dtype}")
    if x.shape[2] > 8192:
        raise ValueError(f"layer_norm_modulate holds a row in registers: C <= 8192, got {x.shape[2]}")
    return _LayerNormModulate.apply(x, shift, scale, float(eps))


# ----------------------------------------------------------------------------------------------
# Public function: the modulated tokens straight into a projection (DiT's qkv and MLP inputs)
# ----------------------------------------------------------------------------------------------

class _ModulatedLinear(torch.autograd.Function):
    """(xn * (1 + scale) + shift) @ W^T + b with the per-sample modulation folded into the GEMM:
    xn @ (W * (1 + scale))^T + (shift @ W^T + b), per-sample weights (B, C_out, C) by one bmm. The
    modulated tokens are never written; the backward needs no pass over them either (dscale and
    dshift come from the (B, C_out, C) weight gradient and the column sums of dy)."""

    @staticmethod
    def forward(ctx, xn, shift, scale, W, b):                           # (B, N, C), (B, C) x2, (Co, C), (Co,)
        s1 = 1 + scale.to(W.dtype)
        Ws = (W[None] * s1[:, None, :]).to(xn.dtype)                    # (B, Co, C)
        bs = (torch.addmm(b, shift.to(W.dtype), W.t()) if b is not None else shift.to(W.dtype) @ W.t())
        ctx.save_for_backward(xn, shift, s1, W)
        ctx.has_bias, ctx.dtypes = b is not None, (shift.dtype, scale.dtype)
        return torch.baddbmm(bs[:, None].to(xn.dtype), xn, Ws.transpose(1, 2))  # (B, N, Co)

    @staticmethod
    def backward(ctx, dy):                                               # (B, N, Co)
        xn, shift, s1, W = ctx.saved_tensors
        dy = dy.to(xn.dtype)
        B = dy.shape[0]
        dxn = torch.bmm(dy, (W[None] * s1[:, None, :]).to(xn.dtype))   # (B, N, C)
        # the per-sample weight gradient dy^T xn, in W's layout: its passes below run in order and
        # dW needs no transposed copy (with cascade.heap's reuse of freed pages, the transposed
        # product xn^T dy is no faster: qkv's 1536 x 512 backward 40.4 against 40.9 ms, the MLP's
        # 2048 x 512 58.8 against 55.4 ms, 4096 tokens, 1 thread)
        dWs = torch.bmm(dy.transpose(1, 2), xn).to(W.dtype)              # (B, Co, C)
        ysum = dy.sum(1).to(W.dtype)                                     # (B, Co)
        dscale = (dWs * W[None]).sum(1)                                  # (B, C)
        dshift = ysum @ W                                                # (B, C)
        dW = dWs[0].mul_(s1[0]) if B == 1 else (dWs * s1[:, None, :]).sum(0)
        dW.addmm_(ysum.t(), shift.to(W.dtype))                           # (Co, C)
        db = ysum.sum(0) if ctx.has_bias else None
        return dxn, dshift.to(ctx.dtypes[0]), dscale.to(ctx.dtypes[1]), dW, db


def layer_norm_modulate_linear(x, shift, scale, weight, bias=None, eps=1e-6, backend=None):
    """F.linear(layer_norm_modulate(x, shift, scale), weight, bias): x (B, N, C), shift and scale
    (B, C), weight (Co, C), bias (Co,) -> (B, N, Co). With Triton, the fused kernel above then the
    GEMM; on the reference path (CPU) LayerNorm without affine, then the modulation folded into the
    GEMM's per-sample weights (_ModulatedLinear): a width-512 DiT training step on one CPU thread
    skips two passes over the tokens per projection."""
    if use_triton(backend, x):
        return F.linear(layer_norm_modulate(x, shift, scale, eps, backend), weight, bias)
    if x.dim() != 3 or shift.shape != (x.shape[0], x.shape[2]) or scale.shape != shift.shape:
        raise ValueError(f"layer_norm_modulate_linear takes x (B, N, C) and shift, scale (B, C), got "
                         f"{tuple(x.shape)}, {tuple(shift.shape)}, {tuple(scale.shape)}")
    return _ModulatedLinear.apply(F.layer_norm(x, x.shape[-1:], eps=eps), shift, scale, weight, bias)
