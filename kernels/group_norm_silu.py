"""GroupNorm + SiLU, forward and backward, fused.

What is fused, and why
    Every res-block of the VAE and of the SR U-Net opens with SiLU(GroupNorm(x)) (Wu & He 2018,
    "Group Normalization", Eq. 1-2 with the per-channel affine of Eq. 3; SiLU of Elfwing et al.
    2018). Unfused, PyTorch reads x twice for the statistics and the normalisation, writes y,
    then SiLU reads y and writes again; the backward stores the GroupNorm output for SiLU and reads
    and writes three more full tensors. Here:
      forward   pass 1 reads x once for the statistics, pass 2 reads x once and writes
                SiLU(xhat * w + b) once: 2 reads + 1 write of x's size.
      backward  pass 1 reads x and dy, recomputes u = xhat * w + b and dz = dy * SiLU'(u), and sums
                the group's dxhat and dxhat * xhat (dxhat = dz * w) and the per-channel dw, db
                partials; pass 2 reads x and dy again and writes dx: 4 reads + 1 write, nothing
                saved from the forward but the (samples, G) mean and 1/std.
    The group's elements (Cg channels x S positions) are cut into chunks along S so that small
    batches with few groups still fill a GPU: each chunk keeps (count, mean, M2) and chunks are
    merged with Chan et al.'s parallel variance formula (no sum-of-squares cancellation).

Contract
    x (B, C, *spatial) with C divisible by num_groups, fp16 / bf16 / fp32; weight, bias (C,) or
    None, any float dtype; statistics and arithmetic in fp32; output in x's dtype and memory
    format (channels_last / channels_last_3d kept). silu=False gives GroupNorm alone.
    per_frame=True takes x (B, C, T, *spatial) and normalises every frame on its own (statistics
    per (b, t, group)), as GroupNorm on the frames folded into the batch, "(b t) c h w", the
    causal VAE's and the SR U-Net's norm: the kernels read the frames in place, so the fold's
    two transposed copies (in and out) are not needed.
    x is viewed as (samples, C, S) with samples = B (or B*T per frame) and S the merged spatial
    positions, read through its strides when those dims merge into one stride (contiguous,
    channels_last(_3d)); other layouts are copied first.

Known limits
    One fixed tile configuration (no autotuning). Compiled for sm_90 with ptxas
    (tests/kernels/test_gpu_compile.py: 128 to 8192 channels, one channel per group, one position,
    channels-last, per frame with T = 1): no kernel spills registers, shared memory <= 512 bytes.
    dweight and dbias are summed from fp32 partials (samples x chunks x C) by one torch reduction.
    The second pass over x in the forward and backward is served from L2 only when a chunk fits
    there. bf16 runs only on a GPU (the
    interpreter cannot).

Roofline (per call; n = x.numel(), e = bytes per element)
    About 10 FLOP per element forward, 20 backward: bandwidth-bound, reported in GB/s.
    bytes: forward 3*n*e (x twice, y once), backward 5*n*e (x, dy twice each, dx once);
    PyTorch's unfused GroupNorm + SiLU moves about 5*n*e forward and 9*n*e backward.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.dispatch import interpreting, launch, sm_count, use_triton


# ----------------------------------------------------------------------------------------------
# PyTorch reference (the only one: tests and benchmarks import it)
# ----------------------------------------------------------------------------------------------

def group_norm_silu_ref(x, num_groups, weight=None, bias=None, eps=1e-5, silu=True, upcast=False,
                        per_frame=False):
    """x: (B, C, *spatial) -> same shape; SiLU(GroupNorm(x)) (or GroupNorm alone with silu=False).
    per_frame: x (B, C, T, *spatial), each frame normalised on its own (frames folded into B)."""
    dtype = x.dtype
    if upcast:
        x = x.float()
        weight = None if weight is None else weight.float()
        bias = None if bias is None else bias.float()
    if per_frame:
        B, C, T = x.shape[:3]
        frames = x.movedim(2, 1).reshape(B * T, C, *x.shape[3:])  # (B*T, C, *spatial)
        y = group_norm_silu_ref(frames, num_groups, weight, bias, eps, silu)
        return y.reshape(B, T, C, *x.shape[3:]).movedim(1, 2).to(dtype)
    y = F.group_norm(x, num_groups, weight, bias, eps)
    return (F.silu(y) if silu else y).to(dtype)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
# x is read as (B, C, NT, S) through strides (sb, sc, st, ss): sample n = (b, t) (NT = 1 unless
# per frame), channel c, merged spatial position s. Program (n*G + g, chunk) owns channels
# g*CG .. g*CG+CG-1 of sample n at positions chunk*CHUNK .. chunk*CHUNK+CHUNK-1.
# Per-chunk partials live in fp32 buffers of shape (samples*G, NCHUNK).

@triton.jit
def _tile_ptrs(base, n, g, s0, offs_c, offs_s, NT, CG, S, sb, sc, st, ss):
    """Pointers and mask of the (BLOCK_C, BLOCK_S) tile of sample n, group g, channels offs_c,
    positions s0 + offs_s."""
    n = n.to(tl.int64)
    c = g * CG + offs_c
    s = (s0 + offs_s).to(tl.int64)
    mask = (offs_c < CG)[:, None] & (s < S)[None, :]
    ptrs = base + (n // NT) * sb + (n % NT) * st + c[:, None] * sc + s[None, :] * ss
    return ptrs, mask


@triton.jit
def _group_stats(N_P, MEAN_P, M2_P, ng, NCHUNK, BLOCK_P: tl.constexpr):
    """Merge the group's chunk partials (Chan et al. 1979) -> (count, mean, M2)."""
    offs = tl.arange(0, BLOCK_P)
    ok = offs < NCHUNK
    n = tl.load(N_P + ng * NCHUNK + offs, mask=ok, other=0.0)
    mean = tl.load(MEAN_P + ng * NCHUNK + offs, mask=ok, other=0.0)
    m2 = tl.load(M2_P + ng * NCHUNK + offs, mask=ok, other=0.0)
    count = tl.sum(n, axis=0)
    mu = tl.sum(n * mean, axis=0) / count
    d = mean - mu
    return count, mu, tl.sum(m2 + n * d * d, axis=0)


@triton.jit
def _gn_stats_kernel(
    X, N_P, MEAN_P, M2_P,
    sb, sc, st, ss, NT, G, CG, S, CHUNK, NCHUNK,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """(count, mean, M2) of one chunk of one group, tile by tile with Chan's update."""
    ng = tl.program_id(0)
    chunk = tl.program_id(1)
    n = ng // G
    g = ng % G
    offs_s = tl.arange(0, BLOCK_S)
    count = 0.0
    mean = 0.0
    m2 = 0.0
    s_lo = chunk * CHUNK
    for s0 in range(s_lo, tl.minimum(s_lo + CHUNK, S), BLOCK_S):
        for c0 in range(0, CG, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            ptrs, mask = _tile_ptrs(X, n, g, s0, offs_c, offs_s, NT, CG, S, sb, sc, st, ss)
            x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_C, BLOCK_S)
            n_t = tl.sum(tl.sum(mask.to(tl.float32), axis=1), axis=0)
            mean_t = tl.sum(tl.sum(x, axis=1), axis=0) / n_t
            d = tl.where(mask, x - mean_t, 0.0)
            m2_t = tl.sum(tl.sum(d * d, axis=1), axis=0)
            n_new = count + n_t
            delta = mean_t - mean
            mean += delta * n_t / n_new
            m2 += m2_t + delta * delta * count * n_t / n_new
            count = n_new
    tl.store(N_P + ng * NCHUNK + chunk, count)
    tl.store(MEAN_P + ng * NCHUNK + chunk, mean)
    tl.store(M2_P + ng * NCHUNK + chunk, m2)


@triton.jit
def _gn_fwd_kernel(
    X, Y, Wt, Bias, N_P, MEAN_P, M2_P, MEAN, RSTD,
    sxb, sxc, sxt, sxs, syb, syc, syt, sys_, NT, G, CG, S, CHUNK, NCHUNK, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """y = SiLU((x - mean) * rstd * w + b) over one chunk of one group."""
    ng = tl.program_id(0)
    chunk = tl.program_id(1)
    n = ng // G
    g = ng % G
    count, mean, m2 = _group_stats(N_P, MEAN_P, M2_P, ng, NCHUNK, BLOCK_P)
    rstd = 1.0 / tl.sqrt(m2 / count + eps)
    if chunk == 0:
        tl.store(MEAN + ng, mean)
        tl.store(RSTD + ng, rstd)
    offs_s = tl.arange(0, BLOCK_S)
    s_lo = chunk * CHUNK
    for s0 in range(s_lo, tl.minimum(s_lo + CHUNK, S), BLOCK_S):
        for c0 in range(0, CG, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            c_ok = offs_c < CG
            x_ptrs, mask = _tile_ptrs(X, n, g, s0, offs_c, offs_s, NT, CG, S, sxb, sxc, sxt, sxs)
            y_ptrs, _ = _tile_ptrs(Y, n, g, s0, offs_c, offs_s, NT, CG, S, syb, syc, syt, sys_)
            u = (tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
            if HAS_W:
                u *= tl.load(Wt + g * CG + offs_c, mask=c_ok, other=0.0).to(tl.float32)[:, None]
            if HAS_B:
                u += tl.load(Bias + g * CG + offs_c, mask=c_ok, other=0.0).to(tl.float32)[:, None]
            if SILU:
                u = u * tl.sigmoid(u)
            tl.store(y_ptrs, u.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _gn_bwd_tile(X, DY, Wt, Bias, n, g, s0, offs_c, offs_s, mean, rstd,
                 sxb, sxc, sxt, sxs, sdb, sdc, sdt, sds, NT, CG, S,
                 HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr):
    """Recompute one tile -> (xhat, dz = dL/du with u = xhat*w + b, dxhat = dz*w, mask)."""
    c_ok = offs_c < CG
    x_ptrs, mask = _tile_ptrs(X, n, g, s0, offs_c, offs_s, NT, CG, S, sxb, sxc, sxt, sxs)
    dy_ptrs, _ = _tile_ptrs(DY, n, g, s0, offs_c, offs_s, NT, CG, S, sdb, sdc, sdt, sds)
    xhat = (tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
    xhat = tl.where(mask, xhat, 0.0)  # (BLOCK_C, BLOCK_S)
    dz = tl.load(dy_ptrs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(Wt + g * CG + offs_c, mask=c_ok, other=0.0).to(tl.float32)[:, None] if HAS_W else 1.0
    if SILU:
        u = xhat * w
        if HAS_B:
            u += tl.load(Bias + g * CG + offs_c, mask=c_ok, other=0.0).to(tl.float32)[:, None]
        sig = tl.sigmoid(u)
        dz = dz * sig * (1.0 + u * (1.0 - sig))  # SiLU'(u) = sig(u) (1 + u (1 - sig(u)))
    return xhat, dz, dz * w, mask


@triton.jit
def _gn_bwd_sums_kernel(
    X, DY, Wt, Bias, MEAN, RSTD, S1_P, S2_P, DW_P, DB_P,
    sxb, sxc, sxt, sxs, sdb, sdc, sdt, sds, NT, G, C, CG, S, CHUNK, NCHUNK,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Chunk partials: sum(dxhat), sum(dxhat * xhat) (samples*G, NCHUNK) and per channel
    sum(dz * xhat), sum(dz) (samples, NCHUNK, C)."""
    ng = tl.program_id(0)
    chunk = tl.program_id(1)
    n = ng // G
    g = ng % G
    mean = tl.load(MEAN + ng)
    rstd = tl.load(RSTD + ng)
    offs_s = tl.arange(0, BLOCK_S)
    s1 = 0.0
    s2 = 0.0
    s_lo = chunk * CHUNK
    s_hi = tl.minimum(s_lo + CHUNK, S)
    for c0 in range(0, CG, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        dw = tl.zeros([BLOCK_C], dtype=tl.float32)
        db = tl.zeros([BLOCK_C], dtype=tl.float32)
        for s0 in range(s_lo, s_hi, BLOCK_S):
            xhat, dz, dxhat, mask = _gn_bwd_tile(X, DY, Wt, Bias, n, g, s0, offs_c, offs_s, mean,
                                                 rstd, sxb, sxc, sxt, sxs, sdb, sdc, sdt, sds, NT,
                                                 CG, S, HAS_W, HAS_B, SILU)
            s1 += tl.sum(tl.sum(dxhat, axis=1), axis=0)
            s2 += tl.sum(tl.sum(dxhat * xhat, axis=1), axis=0)
            dw += tl.sum(dz * xhat, axis=1)
            db += tl.sum(dz, axis=1)
        out = (n * NCHUNK + chunk).to(tl.int64) * C + g * CG + offs_c
        tl.store(DW_P + out, dw, mask=offs_c < CG)
        tl.store(DB_P + out, db, mask=offs_c < CG)
    tl.store(S1_P + ng * NCHUNK + chunk, s1)
    tl.store(S2_P + ng * NCHUNK + chunk, s2)


@triton.jit
def _gn_bwd_dx_kernel(
    X, DY, DX, Wt, Bias, MEAN, RSTD, S1_P, S2_P,
    sxb, sxc, sxt, sxs, sdb, sdc, sdt, sds, sob, soc, sot, sos, NT, G, CG, S, CHUNK, NCHUNK,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """dx = rstd * (dxhat - (sum(dxhat) + xhat * sum(dxhat * xhat)) / count) over one chunk."""
    ng = tl.program_id(0)
    chunk = tl.program_id(1)
    n = ng // G
    g = ng % G
    mean = tl.load(MEAN + ng)
    rstd = tl.load(RSTD + ng)
    offs_p = tl.arange(0, BLOCK_P)
    p_ok = offs_p < NCHUNK
    count = CG * 1.0 * S  # fp32; not (CG * S).to(): Triton passes an int argument equal to 1 as a
    # Python int (CG = 1 channel per group and S = 1 position make CG * S a plain int)
    s1 = tl.sum(tl.load(S1_P + ng * NCHUNK + offs_p, mask=p_ok, other=0.0), axis=0) / count
    s2 = tl.sum(tl.load(S2_P + ng * NCHUNK + offs_p, mask=p_ok, other=0.0), axis=0) / count
    offs_s = tl.arange(0, BLOCK_S)
    s_lo = chunk * CHUNK
    for s0 in range(s_lo, tl.minimum(s_lo + CHUNK, S), BLOCK_S):
        for c0 in range(0, CG, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            xhat, dz, dxhat, mask = _gn_bwd_tile(X, DY, Wt, Bias, n, g, s0, offs_c, offs_s, mean,
                                                 rstd, sxb, sxc, sxt, sxs, sdb, sdc, sdt, sds, NT,
                                                 CG, S, HAS_W, HAS_B, SILU)
            dx = rstd * (dxhat - s1 - xhat * s2)
            dx_ptrs, _ = _tile_ptrs(DX, n, g, s0, offs_c, offs_s, NT, CG, S, sob, soc, sot, sos)
            tl.store(dx_ptrs, dx.to(DX.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

def _pow2(n):
    return 1 << max(0, int(n) - 1).bit_length()


def _memory_format(x):
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        return torch.channels_last_3d
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _as_bcts(x, per_frame):
    """x as a (B, C, NT, S) tensor (NT = T per frame, else 1), sharing x's memory when the spatial
    dims merge into one stride (else a copy)."""
    B, C = x.shape[:2]
    return x.reshape(B, C, x.shape[2] if per_frame else 1, -1)


def _plan(samples, G, CG, S, device, channels_last=False):
    """(BLOCK_C, BLOCK_S, CHUNK, NCHUNK, num_warps): tiles of about 4096 elements on a GPU (2048
    when the channels are the contiguous axis: compiled for sm_90, a 4 x 1024 channels-last fp16
    tile spilled 8 bytes per thread at 8 warps, 4 x 512 uses 80 registers), never longer than S,
    chunks along S until samples*G*NCHUNK fills the GPU about four times. The interpreter pays per
    tile step, so it gets two 256-wide tiles per chunk (tests still see several chunks and tiles)."""
    block_c = min(_pow2(CG), 64)
    if interpreting():
        block_s = 256
        chunk = 2 * block_s
    else:
        block_s = min(max(64, (2048 if channels_last else 4096) // block_c), max(16, _pow2(S)))
        sms = sm_count(device)
        nchunk = max(1, min(triton.cdiv(4 * sms, samples * G), triton.cdiv(S, 4 * block_s), 1024))
        chunk = triton.cdiv(triton.cdiv(S, nchunk), block_s) * block_s
    return block_c, block_s, chunk, triton.cdiv(S, chunk), 4 if interpreting() else 8


def _gn_fwd(x, G, weight, bias, eps, silu, per_frame):
    y = torch.empty(x.shape, device=x.device, dtype=x.dtype, memory_format=_memory_format(x))
    x4, y4 = _as_bcts(x, per_frame), _as_bcts(y, per_frame)  # (B, C, NT, S)
    B, C, NT, S = x4.shape
    CG = C // G
    channels_last = x4.stride(1) == 1 and S > 1
    bc, bs, chunk, nchunk, warps = _plan(B * NT, G, CG, S, x.device, channels_last)
    parts = torch.empty((3, B * NT * G, nchunk), device=x.device, dtype=torch.float32)
    mean = torch.empty(B * NT * G, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    grid = (B * NT * G, nchunk)
    launch(_gn_stats_kernel, grid)(x4, parts[0], parts[1], parts[2], *x4.stride(), NT, G, CG, S,
                                   chunk, nchunk, BLOCK_C=bc, BLOCK_S=bs, num_warps=warps)
    launch(_gn_fwd_kernel, grid)(
        x4, y4, weight if weight is not None else x4, bias if bias is not None else x4,
        parts[0], parts[1], parts[2], mean, rstd, *x4.stride(), *y4.stride(),
        NT, G, CG, S, chunk, nchunk, eps, HAS_W=weight is not None, HAS_B=bias is not None,
        SILU=silu, BLOCK_C=bc, BLOCK_S=bs, BLOCK_P=_pow2(nchunk), num_warps=warps)
    return y, mean, rstd  # y like x; mean, rstd (samples*G,) fp32


def _gn_bwd(dy, x, G, weight, bias, mean, rstd, silu, per_frame):
    """-> (dx like x, dweight fp32 (C,), dbias fp32 (C,))."""
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype, memory_format=_memory_format(x))
    x4, dy4, dx4 = (_as_bcts(t, per_frame) for t in (x, dy, dx))  # (B, C, NT, S)
    B, C, NT, S = x4.shape
    CG = C // G
    channels_last = x4.stride(1) == 1 and S > 1
    bc, bs, chunk, nchunk, warps = _plan(B * NT, G, CG, S, x.device, channels_last)
    sums = torch.empty((2, B * NT * G, nchunk), device=x.device, dtype=torch.float32)
    wb = torch.empty((2, B * NT, nchunk, C), device=x.device, dtype=torch.float32)
    grid = (B * NT * G, nchunk)
    w_arg = weight if weight is not None else x4
    b_arg = bias if bias is not None else x4
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, SILU=silu,
                 BLOCK_C=bc, BLOCK_S=bs, num_warps=warps)
    launch(_gn_bwd_sums_kernel, grid)(x4, dy4, w_arg, b_arg, mean, rstd, sums[0], sums[1], wb[0],
                                      wb[1], *x4.stride(), *dy4.stride(), NT, G, C, CG, S, chunk,
                                      nchunk, **flags)
    launch(_gn_bwd_dx_kernel, grid)(x4, dy4, dx4, w_arg, b_arg, mean, rstd, sums[0], sums[1],
                                    *x4.stride(), *dy4.stride(), *dx4.stride(), NT, G, CG, S, chunk,
                                    nchunk, BLOCK_P=_pow2(nchunk), **flags)
    dwb = wb.sum((1, 2))  # (2, C)
    return dx, dwb[0], dwb[1]


# ----------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------

class _GroupNormSiLU(torch.autograd.Function):
    """Saves x (the caller's tensor), weight, bias and the (samples*G,) fp32 mean and 1/std."""

    @staticmethod
    def forward(ctx, x, num_groups, weight, bias, eps, silu, per_frame):
        y, mean, rstd = _gn_fwd(x, num_groups, weight, bias, eps, silu, per_frame)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.num_groups, ctx.silu, ctx.per_frame = num_groups, silu, per_frame
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        dx, dw, db = _gn_bwd(dy, x, ctx.num_groups, weight, bias, mean, rstd, ctx.silu,
                             ctx.per_frame)
        dw = None if weight is None else dw.to(weight.dtype)
        db = None if bias is None else db.to(bias.dtype)
        return dx, None, dw, db, None, None, None


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------

def group_norm_silu(x, num_groups, weight=None, bias=None, eps=1e-5, silu=True, backend=None,
                    per_frame=False):
    """SiLU(GroupNorm(x)) (Wu & He 2018, Eq. 1-3), fused; silu=False: GroupNorm alone.
    x: (B, C, *spatial) -> same shape, dtype and memory format. per_frame: x (B, C, T, *spatial)
    normalised frame by frame (statistics per (b, t, group)), read in place."""
    if not use_triton(backend, x):
        return group_norm_silu_ref(x, num_groups, weight, bias, eps, silu, per_frame=per_frame)
    if x.dim() < (3 if per_frame else 2) or x.shape[1] % num_groups:
        raise ValueError(f"group_norm_silu: x {tuple(x.shape)} must be (B, C{', T' if per_frame else ''}"
                         f", ...) with C divisible into {num_groups} groups")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"group_norm_silu takes fp16, bf16 or fp32 x, got {x.dtype}")
    if x.dim() == 2:
        x = x[:, :, None]  # (B, C) -> (B, C, 1)
        return _GroupNormSiLU.apply(x, num_groups, weight, bias, float(eps), bool(silu), False)[:, :, 0]
    return _GroupNormSiLU.apply(x, num_groups, weight, bias, float(eps), bool(silu), bool(per_frame))
