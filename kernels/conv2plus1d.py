"""(2+1)D convolution (Imagen Video): a spatial k x k conv per frame, then a temporal kt conv.

What is fused, and why
    The space-time separable block of Imagen Video (Ho et al. 2022, Sec. 2.3; the factorisation of
    Tran et al. 2018, "R(2+1)D") runs two convolutions, and unfused the intermediate h (B, Cmid, T,
    H, W) is written by the first and read back by the second, then kept alive for the backward.
    The forward kernel keeps h on chip: a program owns a tile of BLOCK_M pixels, walks the frames of
    its time chunk in order, computes h_f = conv_kxk(x[:, :, f]) + b_s for one frame at a time
    (implicit GEMM, K = Cin*k*k) and keeps the last kt of them in registers (a ring of kt <= 3
    tiles); as soon as frame f is done the output frame f + pad - (kt-1) is complete:
    y_o = sum_j h_{o - pad + j} W_t[:, :, j] + b_t (K = Cmid*kt). h never reaches memory, and the
    backward recomputes it (one spatial forward) instead of storing it: an activation the size of
    the block's hidden width is neither written, read back, nor kept for the backward.
    The backward runs the conv3d implicit-GEMM kernels: recompute h, then dh and dW_t, db_t from the
    temporal conv, then dx and dW_s, db_s from the spatial conv, all read through strides, no copies.

Contract
    x (B, Cin, T, H, W); w_spatial (Cmid, Cin, 1, k, k), b_spatial (Cmid,) or None; w_temporal
    (Cout, Cmid, kt, 1, 1), b_temporal (Cout,) or None; one dtype (fp16 / bf16 / fp32), fp32
    accumulation, h rounded to x's dtype as the unfused pair does (under torch.autocast all are
    cast to its dtype first, as F.conv3d's operands, and y comes back in x's dtype). 'same'
    padding: k // 2 in space, kt // 2 in time (causal: kt-1 frames in front, none behind, as the
    causal VAE convs). Channels-first and channels_last_3d x (and any strides); output in x's
    memory format.

Known limits
    The fused forward needs kt <= 3 (the ring is three named registers). On a GPU it runs where it
    pays and fits: 16-bit, Cmid <= 64, Cout <= 128 (the bandwidth-bound widths, see the roofline;
    its tiles, compiled for sm_90 with ptxas (tests/kernels/test_gpu_compile.py), spill no
    registers and use at most 96 KB of shared memory per block there). Elsewhere
    the forward runs the two conv3d launches and saves h for the backward. The interpreter fuses
    every width up to Cmid = 128 so tests cover the kernel (there each Cout tile recomputes h).
    Time chunks recompute kt-1 halo frames of h each (chunks are only cut on a GPU, to give small
    videos enough programs). One fixed tile configuration, no autotuning, no GPU timing yet.
    bf16: GPU only.

Roofline (per call; P = B*T*H*W positions, e = bytes per element)
    FLOPs: 2*P*(Cmid*Cin*k*k + Cout*Cmid*kt); the backward is about 2x that plus one spatial forward
    (the recompute of h).
    bytes, forward: fused (Cin + Cout)*P*e (+ weights); unfused (Cin + 2*Cmid + Cout)*P*e. With
    Cin = Cmid = Cout = C, k = kt = 3 in fp16 that is 6*C FLOP per byte fused, 3*C unfused: at
    C <= 64 (the SR U-Net's high-resolution levels) the unfused pair sits below an H100's balance
    point (about 300 FLOP/byte) and the fusion's byte saving is its speed-up; at C >= 128 both are
    compute-bound and the fusion would only save the memory of h.
"""
from functools import partial

import torch
import triton
import triton.language as tl

from kernels.conv3d import (_autocast, _conv3d_bwd_dw, _conv3d_bwd_dx, _conv3d_fwd, _Geometry,
                            _memory_format, _precision, _tile, conv3d, conv3d_ref)
from kernels.dispatch import interpreting, launch, sm_count, use_triton


# ----------------------------------------------------------------------------------------------
# PyTorch reference (the only one: tests and benchmarks import it)
# ----------------------------------------------------------------------------------------------

def conv2plus1d_ref(x, w_spatial, b_spatial, w_temporal, b_temporal, causal=False):
    """x: (B, Cin, T, H, W); w_spatial: (Cmid, Cin, 1, k, k); w_temporal: (Cout, Cmid, kt, 1, 1).
    'same' padding in space and time (causal: past frames only) -> (B, Cout, T, H, W)."""
    return _separable(conv3d_ref, x, w_spatial, b_spatial, w_temporal, b_temporal, causal)


def _separable(conv, x, w_spatial, b_spatial, w_temporal, b_temporal, causal):
    """The (2+1)D conv as two calls of a 3D conv `conv`: spatial 'same', then temporal."""
    k, kt = w_spatial.shape[-1], w_temporal.shape[2]
    h = conv(x, w_spatial, b_spatial, padding=(0, k // 2, k // 2))
    return conv(h, w_temporal, b_temporal, padding=(kt // 2, 0, 0), causal=causal)


# ----------------------------------------------------------------------------------------------
# Triton kernel (forward; the backward reuses the conv3d kernels)
# ----------------------------------------------------------------------------------------------

@triton.jit
def _conv2plus1d_fwd_kernel(
    X, WS, BS, WT, BT, Y,
    sxb, sxc, sxt, sxh, sxw,
    swso, swsi, swsh, swsw,
    swto, swti, swtt,
    syb, syc, syt, syh, syw,
    CIN, CMID, COUT, T, H, W, TO, HO, WO, PAD_S, PAD_T, T_CHUNK, NUM_S, NUM_TC,
    KS: tl.constexpr, KT: tl.constexpr, HAS_BS: tl.constexpr, HAS_BT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """y[:, :, o] for o in one time chunk, BLOCK_M pixels and BLOCK_N output channels; h frames are
    computed once each (plus kt-1 halo frames per chunk) and kept in a ring r0 (newest), r1, r2."""
    pid = tl.program_id(0)
    pid_n = tl.program_id(1)
    tc = pid % NUM_TC
    pid_s = (pid // NUM_TC) % NUM_S
    b = (pid // NUM_TC // NUM_S).to(tl.int64)
    offs_m = pid_s * BLOCK_M + tl.arange(0, BLOCK_M)  # output pixels of one frame
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output channels
    offs_c = tl.arange(0, BLOCK_C)  # hidden channels (all of them: the K of the temporal dot)
    offs_k = tl.arange(0, BLOCK_K)  # input channels
    m_ok = offs_m < HO * WO
    n_ok = offs_n < COUT
    c_ok = offs_c < CMID
    ho = offs_m // WO
    wo = offs_m % WO
    x_b = X + b * sxb
    if HAS_BS:
        bs = tl.load(BS + offs_c, mask=c_ok, other=0.0).to(tl.float32)  # (BLOCK_C,)
    dtype = X.dtype.element_ty
    r0 = tl.zeros([BLOCK_M, BLOCK_C], dtype=dtype)  # h_f
    if KT >= 2:
        r1 = tl.zeros([BLOCK_M, BLOCK_C], dtype=dtype)  # h_{f-1}
    if KT >= 3:
        r2 = tl.zeros([BLOCK_M, BLOCK_C], dtype=dtype)  # h_{f-2}
    # the temporal weights stay in registers: tap j multiplies frame o - PAD_T + j
    wt_ptrs = WT + offs_c[:, None] * swti + offs_n[None, :] * swto
    wt_ok = c_ok[:, None] & n_ok[None, :]
    wt0 = tl.load(wt_ptrs + (KT - 1) * swtt, mask=wt_ok, other=0.0)  # (BLOCK_C, BLOCK_N), for r0
    if KT >= 2:
        wt1 = tl.load(wt_ptrs + (KT - 2) * swtt, mask=wt_ok, other=0.0)  # for r1
    if KT >= 3:
        wt2 = tl.load(wt_ptrs + (KT - 3) * swtt, mask=wt_ok, other=0.0)  # for r2
    if HAS_BT:
        bt = tl.load(BT + offs_n, mask=n_ok, other=0.0).to(tl.float32)  # (BLOCK_N,)
    t_lo = tc * T_CHUNK
    t_hi = tl.minimum(t_lo + T_CHUNK, TO)
    # output o reads h frames o - PAD_T .. o - PAD_T + KT - 1, so frame f completes output
    # o = f + PAD_T - KT + 1 (the first KT - 1 frames of a chunk only fill the ring)
    for f in range(t_lo - PAD_T, t_hi - PAD_T + KT - 1):
        if KT >= 3:
            r2 = r1
        if KT >= 2:
            r1 = r0
        acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
        if (f >= 0) & (f < T):  # outside: h is zero padding (no bias), as in the unfused pair
            for tap in range(KS * KS):
                dh = tap // KS
                dw = tap % KS
                hi = ho - PAD_S + dh
                wi = wo - PAD_S + dw
                ok = m_ok & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
                x_ptrs = x_b + f * sxt + hi * sxh + wi * sxw  # (BLOCK_M,)
                w_ptrs = WS + dh * swsh + dw * swsw + offs_c * swso  # (BLOCK_C,)
                for k0 in range(0, CIN, BLOCK_K):
                    k = k0 + offs_k
                    k_ok = k < CIN
                    a = tl.load(x_ptrs[:, None] + k[None, :] * sxc,
                                mask=ok[:, None] & k_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
                    ws = tl.load(w_ptrs[None, :] + k[:, None] * swsi,
                                 mask=k_ok[:, None] & c_ok[None, :], other=0.0)  # (BLOCK_K, BLOCK_C)
                    acc = tl.dot(a, ws, acc, input_precision=PRECISION)
            if HAS_BS:
                acc += bs[None, :]
        r0 = acc.to(dtype)
        o = f + PAD_T - KT + 1
        out = tl.dot(r0, wt0, input_precision=PRECISION)  # (BLOCK_M, BLOCK_N)
        if KT >= 2:
            out = tl.dot(r1, wt1, out, input_precision=PRECISION)
        if KT >= 3:
            out = tl.dot(r2, wt2, out, input_precision=PRECISION)
        if HAS_BT:
            out += bt[None, :]
        y_ptrs = Y + b * syb + o * syt + offs_n[None, :] * syc + (ho * syh + wo * syw)[:, None]
        tl.store(y_ptrs, out.to(dtype), mask=m_ok[:, None] & n_ok[None, :] & (o >= t_lo))


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

def _spatial_geometry(x, w_spatial):
    k = w_spatial.shape[-1]
    return _Geometry(x, w_spatial, 1, (0, k // 2, k // 2), False)  # 'same' k x k per frame


def _temporal_geometry(h, w_temporal, causal):
    return _Geometry(h, w_temporal, 1, (w_temporal.shape[2] // 2, 0, 0), causal)  # 'same' / causal kt


def _fusable(cmid, cout, kt, dtype):
    """The fused forward where it pays: the bandwidth-bound widths (Cmid <= 64: at 3*C FLOP per
    byte the unfused pair sits below an H100's balance point), in 16-bit, where its tiles fit in
    registers; on a GPU. Every width up to 128 in the interpreter (tests)."""
    if interpreting():
        return kt <= 3 and cmid <= 128
    return kt <= 3 and cmid <= 64 and cout <= 128 and dtype != torch.float32


def _time_chunks(device, programs, TO):
    """How many time chunks the fused forward cuts T' into: on a GPU, chunks of >= 4 frames until
    there are two waves of programs; one in the interpreter (tests patch this)."""
    if interpreting():
        return 1
    sms = sm_count(device)
    return max(1, min(triton.cdiv(2 * sms, programs), TO // 4))


def _conv2plus1d_fwd_fused(x, ws, bs, wt, bt, causal):
    B, cin, T, H, W = x.shape
    cmid, k, cout, kt = ws.shape[0], ws.shape[-1], wt.shape[0], wt.shape[2]
    pad_s, pad_t = k // 2, (kt - 1 if causal else kt // 2)
    HO, WO = H + 2 * pad_s - k + 1, W + 2 * pad_s - k + 1
    TO = T + pad_t + (0 if causal else kt // 2) - kt + 1
    y = torch.empty((B, cout, TO, HO, WO), device=x.device, dtype=x.dtype,
                    memory_format=_memory_format(x))
    if interpreting():
        bm, bn, bk, bc, warps = 256, _tile(cout, 32), _tile(cin, 32), _tile(cmid, 128), 4
    else:  # compiled for sm_90 with ptxas: no register spills up to Cmid 64, Cout 128
        bm, bn, bk, bc, warps = 64, _tile(cout, 128), _tile(cin, 32), _tile(cmid, 64), 8
    num_s, num_n = triton.cdiv(HO * WO, bm), triton.cdiv(cout, bn)
    t_chunk = triton.cdiv(TO, _time_chunks(x.device, B * num_s * num_n, TO))
    num_tc = triton.cdiv(TO, t_chunk)
    grid = (B * num_s * num_tc, num_n)
    launch(_conv2plus1d_fwd_kernel, grid)(
        x, ws, bs if bs is not None else ws, wt, bt if bt is not None else wt, y,
        *x.stride(), ws.stride(0), ws.stride(1), ws.stride(3), ws.stride(4),
        wt.stride(0), wt.stride(1), wt.stride(2), *y.stride(),
        cin, cmid, cout, T, H, W, TO, HO, WO, pad_s, pad_t, t_chunk, num_s, num_tc,
        KS=k, KT=kt, HAS_BS=bs is not None, HAS_BT=bt is not None,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_C=bc, PRECISION=_precision(x.dtype),
        num_warps=warps, num_stages=2)
    return y  # (B, Cout, T', H', W')


# ----------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------

class _Conv2plus1d(torch.autograd.Function):
    """Fused (2+1)D forward (h stays on chip) or two conv3d launches; the backward recomputes h
    when the forward did not keep it, then runs the conv3d backward kernels of both convs."""

    @staticmethod
    def forward(ctx, x, ws, bs, wt, bt, causal, fused):
        if fused:
            y, h = _conv2plus1d_fwd_fused(x, ws, bs, wt, bt, causal), None
        else:
            h = _conv3d_fwd(x, ws, bs, _spatial_geometry(x, ws))  # (B, Cmid, T, H', W')
            y = _conv3d_fwd(h, wt, bt, _temporal_geometry(h, wt, causal))
        ctx.save_for_backward(x, ws, bs, wt, h)
        ctx.causal = causal
        ctx.has_bias = bs is not None, bt is not None
        ctx.bias_dtypes = (None if bs is None else bs.dtype), (None if bt is None else bt.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, ws, bs, wt, h = ctx.saved_tensors
        gs = _spatial_geometry(x, ws)
        if h is None:
            h = _conv3d_fwd(x, ws, bs, gs)  # recompute (B, Cmid, T, H', W')
        gt = _temporal_geometry(h, wt, ctx.causal)
        need = ctx.needs_input_grad
        dx = dws = dbs = dwt = dbt = None
        if need[3] or need[4]:
            dwt, dbt = _conv3d_bwd_dw(dy, h, gt, ctx.has_bias[1])
            dwt = dwt.to(wt.dtype)
            dbt = None if dbt is None else dbt.to(ctx.bias_dtypes[1])
        if need[0] or need[1] or need[2]:
            dh = _conv3d_bwd_dx(dy, wt, gt)  # (B, Cmid, T, H', W')
            if need[0]:
                dx = _conv3d_bwd_dx(dh, ws, gs)
            if need[1] or need[2]:
                dws, dbs = _conv3d_bwd_dw(dh, x, gs, ctx.has_bias[0])
                dws = dws.to(ws.dtype)
                dbs = None if dbs is None else dbs.to(ctx.bias_dtypes[0])
        return dx, dws, dbs, dwt, dbt, None, None


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------

def _check(x, w_spatial, w_temporal):
    if x.dim() != 5 or w_spatial.dim() != 5 or w_temporal.dim() != 5:
        raise ValueError("conv2plus1d takes 5-D x, w_spatial and w_temporal")
    cmid, cin, one, kh, kw = w_spatial.shape
    cout, cmid_t, kt, one_h, one_w = w_temporal.shape
    if one != 1 or kh != kw or (one_h, one_w) != (1, 1):
        raise ValueError(f"conv2plus1d: w_spatial must be (Cmid, Cin, 1, k, k) and w_temporal "
                         f"(Cout, Cmid, kt, 1, 1), got {tuple(w_spatial.shape)} and "
                         f"{tuple(w_temporal.shape)}")
    if cin != x.shape[1] or cmid_t != cmid:
        raise ValueError(f"conv2plus1d: channels do not chain: x {tuple(x.shape)}, w_spatial "
                         f"{tuple(w_spatial.shape)}, w_temporal {tuple(w_temporal.shape)}")
    if not (x.dtype == w_spatial.dtype == w_temporal.dtype):
        raise TypeError(f"conv2plus1d: x, w_spatial and w_temporal must share a dtype, got "
                        f"{x.dtype}, {w_spatial.dtype}, {w_temporal.dtype}")


def conv2plus1d(x, w_spatial, b_spatial, w_temporal, b_temporal, causal=False, backend=None):
    """Space-time separable conv (Imagen Video, Ho et al. 2022, Sec. 2.3): spatial k x k per
    frame, then temporal kt, 'same' padding (causal: past frames only) -> (B, Cout, T, H, W)."""
    if not use_triton(backend, x):                    # two convs through conv3d's CPU path
        return _separable(partial(conv3d, backend="torch"), x, w_spatial, b_spatial, w_temporal,
                          b_temporal, causal)
    dtype = x.dtype
    x, w_spatial, b_spatial, w_temporal, b_temporal = _autocast(x, w_spatial, b_spatial,
                                                                w_temporal, b_temporal)
    _check(x, w_spatial, w_temporal)
    fused = _fusable(w_spatial.shape[0], w_temporal.shape[0], w_temporal.shape[2], x.dtype)
    y = _Conv2plus1d.apply(x, w_spatial, b_spatial, w_temporal, b_temporal, causal, fused)
    return y.to(dtype)  # x's dtype, as conv2plus1d_ref
