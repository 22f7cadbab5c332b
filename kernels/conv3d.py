"""3D convolution as implicit GEMM, forward and backward, with causal time padding (video VAE).

What is fused, and why
    No im2col buffer is ever built: each program gathers its (positions x input channels) tile of
    the virtual im2col matrix straight from x, one kernel tap (dt, dh, dw) at a time, masking the
    zero padding, and multiplies it by the matching (Cin x Cout) slice of the weight
    (implicit GEMM, as cuDNN's IMPLICIT_GEMM algorithm). Bias is added in the epilogue, in fp32.
      forward  Y[m, co]   = sum_{tap, ci} X[shift_tap(m), ci] W[co, ci, tap]      M = B*T'*H'*W'
      dX       dX[p, ci]  = sum_{tap, co} dY[(p + pad - tap) / stride, co] W[co, ci, tap]
               computed per stride phase (p mod stride): only the taps that land on an output
               position are visited, so a stride-2 conv3d visits 1/8 of the taps per program, and
               every dX element is written once (no atomics, no zero-filled dilation of dY).
      dW, db   dW[co, ci, tap] = sum_m dY[m, co] X[shift_tap(m), ci]; db[co] = sum_m dY[m, co],
               fused into the same pass (the tap-0 programs also sum dY); the sum over m is split
               into SPLIT chunks written to fp32 partials (more programs on a GPU, deterministic),
               summed pairwise; inside a program it runs in groups of DW_GROUP dot steps, each
               summed into a zeroed tile before joining the total. One long fp32 chain over every
               position made the fp32 dW 1.6-1.9x over the accuracy rule against an fp64
               reference (tests/kernels/test_conv3d.py, long reductions).

Contract
    x (B, Cin, T, H, W), weight (Cout, Cin, kt, kh, kw), bias (Cout,) or None, one dtype among
    fp16 / bf16 / fp32 (bias may be fp32); fp32 accumulation. Any kernel size (1 and 3 are the ones
    the models use), stride and padding each an int or a per-axis 3-tuple (t, h, w), zero padding,
    groups = 1, no dilation. causal=True pads time with kt-1 zero frames in front and none behind
    (the temporal padding entry is ignored), so output frame t sees input frames <= t*stride_t.
    x, weight and the gradient are read through their strides (channels-first, channels_last_3d,
    slices); the output (and dx) comes back channels_last_3d when x is, else contiguous.
    fp32 dots use TF32 when torch.backends.cudnn.allow_tf32 is set (PyTorch's default for convs),
    else IEEE fp32. Under torch.autocast the operands are cast to its dtype first, as F.conv3d's,
    and the output comes back in x's dtype, as conv3d_ref's.

Known limits
    One fixed tile configuration per pass and dtype (no autotuning: the interpreter cannot autotune
    and no GPU measurement has chosen a list yet; the tiles were picked by compiling for sm_90 with
    ptxas, not by timing). Compiled for sm_90 (tests/kernels/test_gpu_compile.py, every launch at
    the shapes the models use, ptxas -v): no pass spills registers in fp16, bf16 or fp32 on TF32
    (PyTorch's default for convs); with torch.backends.cudnn.allow_tf32 off, the IEEE fp32 dx
    pass spills 32 bytes per thread (the dW pass runs 64-row tiles there and spills none);
    shared memory at most 64 KB per block.
    Offsets inside one batch element are 32-bit (a batch element must span < 2**31 elements);
    batch offsets are 64-bit. Channel tails are masked inside tiles of at least 16 (Cin = 3 runs a
    16-wide K tile, 13/16 of it zeros). The dW pass rereads x and dy once per kernel tap (27x for
    3x3x3, mostly from L2). The weight tiles are gathered element by element (their strides are not
    unit along either tile axis). bf16 runs only on a GPU (the interpreter cannot do bf16).

Roofline (per call; P = B*T'*H'*W' output positions, K = Cin*kt*kh*kw, e = bytes per element)
    forward FLOPs 2*P*Cout*K; backward 2x that (dX and dW GEMMs), db is free.
    bytes, forward: x + weight + y = (B*Cin*T*H*W + Cout*K + P*Cout) * e (each read once if L2
    holds the taps' overlap); backward: reads dy, x, weight and writes dx, dw (+ fp32 partials).
    A 3x3x3 conv with Cin = Cout = 128 does about 2*27*128 / (2*2) = 1700 FLOP per byte in fp16:
    compute-bound on every GPU, so it aims at the tensor-core roofline (TFLOP/s).
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.dispatch import interpreting, launch, sm_count, use_triton


def _triple(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v, v)


# ----------------------------------------------------------------------------------------------
# PyTorch reference (the only one: tests and benchmarks import it)
# ----------------------------------------------------------------------------------------------

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


def conv3d_folded(x, weight, bias=None, stride=1, padding=0, causal=False):
    """The CPU path of conv3d: the same convolution as conv3d_ref, computed as ONE 2D convolution,
    because F.conv3d on CPU runs far below F.conv2d (measured at 16 channels, 64x64: a 1x3x3
    conv3d at 23 GFLOP/s, the same work as conv2d at 113). Time taps are stacked onto the input
    channels (im2col along time only): x -> (B*T', Cin*kt, H, W), weight -> (Cout, Cin*kt, kh, kw).
    A pure time conv (kt x 1 x 1) is a 2D conv over (T, H*W) with no copy at all. conv3d takes
    this path for 1 x kh x kw and kt x 1 x 1 kernels only: for kt x 3 x 3 the stacked copy costs
    more than it saves (tiny VAE fwd+bwd: 985 ms folded vs 623 ms F.conv3d, 1 thread)."""
    stride, padding = _triple(stride), _triple(padding)
    dtype = x.dtype                                   # returned as conv3d_ref does (autocast)
    B, C, T, H, W = x.shape
    O, _, kt, kh, kw = weight.shape
    st, sh, sw = stride
    pt = (kt - 1, 0) if causal else (padding[0], padding[0])
    if kh == kw == 1 and sh == sw == 1 and padding[1] == padding[2] == 0:   # time only (or 1x1x1)
        x2 = x.reshape(B, C, T, H * W)
        if causal:
            x2 = F.pad(x2, (0, 0, kt - 1, 0))
        y = F.conv2d(x2, weight.reshape(O, C, kt, 1), bias, (st, 1), (0 if causal else pt[0], 0))
        return y.view(B, O, y.shape[2], H, W).to(dtype)
    xp = F.pad(x, (0, 0, 0, 0, *pt)) if pt != (0, 0) else x
    To = (xp.shape[2] - kt) // st + 1
    if To <= 0:
        raise ValueError(f"conv3d: {T} frames (padded {xp.shape[2]}) are fewer than the kernel's {kt}")
    span = st * (To - 1) + 1
    taps = torch.stack([xp[:, :, i:i + span:st] for i in range(kt)], 2)      # (B, C, kt, T', H, W)
    cols = taps.permute(0, 3, 1, 2, 4, 5).reshape(B * To, C * kt, H, W)
    y = F.conv2d(cols, weight.reshape(O, C * kt, kh, kw), bias, (sh, sw), padding[1:])
    return y.view(B, To, O, *y.shape[2:]).transpose(1, 2).to(dtype)         # (B, Cout, T', H', W')


def conv3d_split_batch(x, weight, bias=None, stride=1, padding=0, causal=False):
    """The CPU path of conv3d for ONE clip (B = 1) and a time stride of 1: the same convolution as
    conv3d_ref, with the clip cut in time into two overlapping halves run as a batch of 2. PyTorch
    sends a batch-1 conv3d on CPU to its slow im2col kernel and a batch of 2 to oneDNN (measured,
    1 thread, 32 -> 32 channels, 10 x 64 x 64, 3x3x3, fwd+bwd: 270 ms at batch 1, 35 ms per clip at
    batch 2). The halves overlap by kt - 1 input frames, so every output frame sees what it would."""
    stride, padding = _triple(stride), _triple(padding)
    kt = weight.shape[2]
    pt = (kt - 1, 0) if causal else (padding[0], padding[0])
    xp = F.pad(x, (0, 0, 0, 0, *pt)) if pt != (0, 0) else x                  # (1, C, Tp, H, W)
    To = xp.shape[2] - kt + 1
    h = (To + 1) // 2                                                         # output frames per half
    halves = torch.cat([xp[:, :, :h + kt - 1], xp[:, :, To - h:]], 0)        # (2, C, h + kt - 1, H, W)
    y = F.conv3d(halves, weight, bias, (1, *stride[1:]), (0, *padding[1:]))  # (2, Cout, h, H', W')
    return torch.cat([y[:1], y[1:, :, 2 * h - To:]], 2).to(x.dtype)         # (1, Cout, To, H', W')


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
# A program works inside one batch element b: positions are flattened in (t, h, w) order, offsets
# inside a batch element are 32-bit and the batch base is one 64-bit scalar. Every tensor is
# addressed through its five strides. PT, PH, PW are the front paddings (PT = kt-1 when causal);
# the back padding only enters T', H', W'.

@triton.jit
def _unflatten(offs, H, W):
    """Flat position index (t, h, w) -> its three coordinates."""
    w = offs % W
    r = offs // W
    return r // H, r % H, w


@triton.jit
def _conv3d_fwd_kernel(
    X, Wt, Bias, Y,
    sxb, sxc, sxt, sxh, sxw,
    swo, swi, swt, swh, sww,
    syb, syc, syt, syh, syw,
    CIN, T, H, W, COUT, TO, HO, WO, NUM_M,
    ST, SH, SW, PT, PH, PW,
    KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """Y[m, co] = sum_{tap, ci} X[shift_tap(m), ci] W[co, ci, tap] (+ bias) for one (M, N) tile of
    output positions m of batch element b. Grid: (B * NUM_M, cdiv(Cout, BLOCK_N))."""
    pid = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = (pid // NUM_M).to(tl.int64)
    offs_m = (pid % NUM_M) * BLOCK_M + tl.arange(0, BLOCK_M)  # output positions
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output channels
    offs_k = tl.arange(0, BLOCK_K)  # input channels
    m_ok = offs_m < TO * HO * WO
    n_ok = offs_n < COUT
    to, ho, wo = _unflatten(offs_m, HO, WO)
    t0 = to * ST - PT  # input coordinates of tap (0, 0, 0), (BLOCK_M,)
    h0 = ho * SH - PH
    w0 = wo * SW - PW
    X += b * sxb
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for tap in range(KT * KH * KW):
        dt = tap // (KH * KW)
        dh = (tap // KW) % KH
        dw = tap % KW
        ti = t0 + dt
        hi = h0 + dh
        wi = w0 + dw
        ok = m_ok & (ti >= 0) & (ti < T) & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
        x_off = ti * sxt + hi * sxh + wi * sxw  # (BLOCK_M,)
        w_tap = Wt + dt * swt + dh * swh + dw * sww
        for c0 in range(0, CIN, BLOCK_K):
            c = c0 + offs_k
            c_ok = c < CIN
            a = tl.load(X + x_off[:, None] + c[None, :] * sxc,
                        mask=ok[:, None] & c_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
            w = tl.load(w_tap + c[:, None] * swi + offs_n[None, :] * swo,
                        mask=c_ok[:, None] & n_ok[None, :], other=0.0)  # (BLOCK_K, BLOCK_N)
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(Bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = Y + b * syb + offs_n[None, :] * syc + (to * syt + ho * syh + wo * syw)[:, None]
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _conv3d_bwd_dx_kernel(
    DY, Wt, DX,
    sdyb, sdyc, sdyt, sdyh, sdyw,
    swo, swi, swt, swh, sww,
    sdxb, sdxc, sdxt, sdxh, sdxw,
    CIN, T, H, W, COUT, TO, HO, WO,
    ST, SH, SW, PT, PH, PW,
    TP, HP, WP, NUM_M,
    KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """dX[p, ci] = sum_{tap, co} dY[(p + pad - tap) / stride, co] W[co, ci, tap] for one tile of
    input positions p of batch element b that share a stride phase q = p mod stride: exactly the
    taps with (p + pad - tap) divisible by the stride are visited. TP, HP, WP: positions per phase
    and axis (ceil(T / ST), ...); NUM_M = cdiv(TP*HP*WP, BLOCK_M).
    Grid: (B * ST*SH*SW * NUM_M, cdiv(Cin, BLOCK_N))."""
    pid = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_m = pid % NUM_M
    phase = (pid // NUM_M) % (ST * SH * SW)
    b = (pid // NUM_M // (ST * SH * SW)).to(tl.int64)
    qt = phase // (SH * SW)  # the phase: t = qt + ST * i
    qh = (phase // SW) % SH
    qw = phase % SW
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # input channels
    offs_k = tl.arange(0, BLOCK_K)  # output channels
    it, ih, iw = _unflatten(offs_m, HP, WP)
    t = qt + ST * it
    h = qh + SH * ih
    w = qw + SW * iw
    m_ok = (offs_m < TP * HP * WP) & (t < T) & (h < H) & (w < W)
    n_ok = offs_n < CIN
    DY += b * sdyb
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # (q + pad - tap) % stride == 0  <=>  tap = (q + pad) % stride + stride * j
    for dt in range((qt + PT) % ST, KT, ST):
        to = it + (qt + PT - dt) // ST  # exact division (may be negative: masked)
        for dh in range((qh + PH) % SH, KH, SH):
            ho = ih + (qh + PH - dh) // SH
            for dw in range((qw + PW) % SW, KW, SW):
                wo = iw + (qw + PW - dw) // SW
                ok = m_ok & (to >= 0) & (to < TO) & (ho >= 0) & (ho < HO) & (wo >= 0) & (wo < WO)
                dy_off = to * sdyt + ho * sdyh + wo * sdyw  # (BLOCK_M,)
                w_tap = Wt + dt * swt + dh * swh + dw * sww
                for c0 in range(0, COUT, BLOCK_K):
                    c = c0 + offs_k
                    c_ok = c < COUT
                    g = tl.load(DY + dy_off[:, None] + c[None, :] * sdyc,
                                mask=ok[:, None] & c_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
                    wk = tl.load(w_tap + c[:, None] * swo + offs_n[None, :] * swi,
                                 mask=c_ok[:, None] & n_ok[None, :], other=0.0)  # (BLOCK_K, BLOCK_N)
                    acc = tl.dot(g, wk, acc, input_precision=PRECISION)
    dx_ptrs = DX + b * sdxb + offs_n[None, :] * sdxc + (t * sdxt + h * sdxh + w * sdxw)[:, None]
    tl.store(dx_ptrs, acc.to(DX.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _conv3d_bwd_dw_kernel(
    DY, X, DWP, DBP,
    sdyb, sdyc, sdyt, sdyh, sdyw,
    sxb, sxc, sxt, sxh, sxw,
    B, CIN, T, H, W, COUT, TO, HO, WO, CHUNK,
    ST, SH, SW, PT, PH, PW,
    KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    GROUP: tl.constexpr,
):
    """Partial dW[split, co, ci, tap] = sum_b sum_{p in chunk} dY[b, p, co] X[b, shift_tap(p), ci]
    and, in the tap-0 / first-ci-tile programs, partial db[split, co] = sum dY[b, p, co]; chunk
    `split` covers output positions split*CHUNK .. split*CHUNK+CHUNK-1 of every batch element.
    The sum runs in parts: GROUP dot steps (GROUP * BLOCK_K positions) into a zeroed tile, which
    is then added to the program's total, so no fp32 chain is longer than GROUP + the number of
    groups (`pairwise_sum` then sums the programs' partials pairwise).
    Grid: (taps * SPLIT, cdiv(Cout, BLOCK_M), cdiv(Cin, BLOCK_N)); partials are fp32, contiguous."""
    pid = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2)
    taps = KT * KH * KW
    tap = pid % taps
    split = pid // taps
    dt = tap // (KH * KW)
    dh = (tap // KW) % KH
    dw = tap % KW
    offs_co = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_ci = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok = offs_co < COUT
    ci_ok = offs_ci < CIN
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_M], dtype=tl.float32)
    p_lo = split * CHUNK
    p_hi = tl.minimum(p_lo + CHUNK, TO * HO * WO)
    for b in range(B):
        b64 = tl.cast(b, tl.int64)
        dy_b = DY + b64 * sdyb
        x_b = X + b64 * sxb
        for q0 in range(p_lo, p_hi, BLOCK_K * GROUP):  # a group of GROUP steps summed on its own
            part = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            part_db = tl.zeros([BLOCK_M], dtype=tl.float32)
            for p0 in range(q0, tl.minimum(q0 + BLOCK_K * GROUP, p_hi), BLOCK_K):
                offs_p = p0 + tl.arange(0, BLOCK_K)  # output positions
                p_ok = offs_p < p_hi
                to, ho, wo = _unflatten(offs_p, HO, WO)
                g = tl.load(dy_b + offs_co[:, None] * sdyc + (to * sdyt + ho * sdyh + wo * sdyw)[None, :],
                            mask=co_ok[:, None] & p_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
                ti = to * ST - PT + dt
                hi = ho * SH - PH + dh
                wi = wo * SW - PW + dw
                ok = p_ok & (ti >= 0) & (ti < T) & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
                a = tl.load(x_b + offs_ci[None, :] * sxc + (ti * sxt + hi * sxh + wi * sxw)[:, None],
                            mask=ok[:, None] & ci_ok[None, :], other=0.0)  # (BLOCK_K, BLOCK_N)
                part = tl.dot(g, a, part, input_precision=PRECISION)
                if HAS_BIAS:
                    part_db += tl.sum(g.to(tl.float32), axis=1)
            acc += part
            db += part_db
    # partial dW laid out (SPLIT, COUT, CIN, taps)
    dw_ptrs = (DWP + split.to(tl.int64) * COUT * CIN * taps
               + (offs_co[:, None] * CIN + offs_ci[None, :]) * taps + tap)
    tl.store(dw_ptrs, acc, mask=co_ok[:, None] & ci_ok[None, :])
    if HAS_BIAS:
        tl.store(DBP + split * COUT + offs_co, db, mask=co_ok & (tap == 0) & (pid_n == 0))


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

class _Geometry:
    """Strides, front paddings and output sizes of one conv3d call."""

    def __init__(self, x, weight, stride, padding, causal):
        B, cin, T, H, W = x_shape = x.shape
        cout, cin_w, kt, kh, kw = w_shape = weight.shape
        if cin != cin_w:
            raise ValueError(f"conv3d: x has {cin} channels but weight expects {cin_w} (groups=1)")
        self.stride = tuple(int(s) for s in _triple(stride))
        pad = tuple(int(p) for p in _triple(padding))
        if min(self.stride) < 1 or min(pad) < 0:
            raise ValueError(f"conv3d: stride {stride} must be >= 1 and padding {padding} >= 0")
        front, back = list(pad), list(pad)
        if causal:
            front[0], back[0] = kt - 1, 0
        self.front = tuple(front)
        out = [(n + f + bk - k) // s + 1
               for n, f, bk, k, s in zip((T, H, W), front, back, (kt, kh, kw), self.stride)]
        if min(out) < 1:
            raise ValueError(f"conv3d: input {tuple(x_shape)} is smaller than kernel "
                             f"{(kt, kh, kw)} after padding")
        self.x_shape, self.w_shape = tuple(x_shape), tuple(w_shape)
        self.out_shape = (B, cout, *out)
        self.x_format = _memory_format(x)


def _pow2(n):
    return 1 << max(0, int(n) - 1).bit_length()


def _precision(dtype):
    if dtype == torch.float32 and torch.backends.cudnn.allow_tf32 and not interpreting():
        return "tf32"
    return "ieee"


def _tile(n, cap):
    """A dot dimension covering n channels: a power of two in [16, cap]."""
    return max(16, min(cap, _pow2(n)))


def _config(pass_, n, k, dtype):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of one pass ("fwd", "dx", "dw"): BLOCK_M
    runs over positions (fwd, dx) or output channels (dw), BLOCK_N over the n output columns,
    BLOCK_K over the k channels of one tap (fwd, dx) or over positions (dw).
    The interpreter pays about 8 ms per tile step whatever the tile's size, so it gets long tiles
    over positions (64 in dW: one numpy dot sums its positions in one fp32 chain, 256 lost
    accuracy); channel tiles stay <= 32 so tests with 40 channels run two of them.
    GPU tiles were chosen by compiling for sm_90 with ptxas (no GPU at hand to time them): the
    largest tiles that keep register spills near zero (dx carries more live index vectors and
    gets 64 x 64); tuning them on an H100 is open."""
    if interpreting():
        if pass_ == "dw":
            return _tile(n, 32), _tile(k, 32), 64, 4, 1  # (cout, cin, positions)
        return 256, _tile(n, 32), _tile(k, 32), 4, 1
    stages = 2 if dtype == torch.float32 else 3
    if pass_ == "dx":
        return 64, _tile(n, 64), _tile(k, 32), 4, 3
    if pass_ == "dw":                          # two fp32 tiles live (the total and the group's)
        cap = 64 if _precision(dtype) == "ieee" and dtype == torch.float32 else 128
        return _tile(n, cap), _tile(k, 128), 32, 8, stages  # (cout, cin, positions)
    return 128, _tile(n, 128), _tile(k, 32), 8, stages


def _memory_format(x):
    """channels_last_3d when x is laid out so (and not also plainly contiguous), else contiguous."""
    if x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


def _conv3d_fwd(x, weight, bias, g):
    B, cin, T, H, W = g.x_shape
    cout, _, kt, kh, kw = g.w_shape
    _, _, TO, HO, WO = g.out_shape
    y = torch.empty(g.out_shape, device=x.device, dtype=x.dtype, memory_format=g.x_format)
    bm, bn, bk, warps, stages = _config("fwd", cout, cin, x.dtype)
    num_m = triton.cdiv(TO * HO * WO, bm)
    launch(_conv3d_fwd_kernel, (B * num_m, triton.cdiv(cout, bn)))(
        x, weight, bias if bias is not None else weight, y,
        *x.stride(), *weight.stride(), *y.stride(),
        cin, T, H, W, cout, TO, HO, WO, num_m, *g.stride, *g.front,
        KT=kt, KH=kh, KW=kw, HAS_BIAS=bias is not None,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PRECISION=_precision(x.dtype),
        num_warps=warps, num_stages=stages)
    return y  # (B, Cout, T', H', W')


def _conv3d_bwd_dx(dy, weight, g):
    B, cin, T, H, W = g.x_shape
    cout, _, kt, kh, kw = g.w_shape
    _, _, TO, HO, WO = g.out_shape
    st, sh, sw = g.stride
    TP, HP, WP = triton.cdiv(T, st), triton.cdiv(H, sh), triton.cdiv(W, sw)  # positions per phase
    dx = torch.empty(g.x_shape, device=dy.device, dtype=weight.dtype, memory_format=g.x_format)
    bm, bn, bk, warps, stages = _config("dx", cin, cout, weight.dtype)
    num_m = triton.cdiv(TP * HP * WP, bm)
    launch(_conv3d_bwd_dx_kernel, (B * st * sh * sw * num_m, triton.cdiv(cin, bn)))(
        dy, weight, dx, *dy.stride(), *weight.stride(), *dx.stride(),
        cin, T, H, W, cout, TO, HO, WO, *g.stride, *g.front, TP, HP, WP, num_m,
        KT=kt, KH=kh, KW=kw, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        PRECISION=_precision(weight.dtype), num_warps=warps, num_stages=stages)
    return dx  # (B, Cin, T, H, W)


DW_GROUP = 8    # dot steps summed on their own before joining a dW program's total


def _dw_split(device, tiles, P, bk):
    """How many chunks the dW pass cuts the output positions into: on a GPU enough programs to fill
    it about four times over, each chunk >= 8 steps; in the interpreter one chunk per DW_GROUP
    steps (so the pairwise sum of partials runs in the tests), at most 64."""
    if interpreting():
        return max(1, min(64, P // (DW_GROUP * bk)))
    sms = sm_count(device)
    return max(1, min(triton.cdiv(4 * sms, tiles), P // (8 * bk)))


def pairwise_sum(parts: torch.Tensor) -> torch.Tensor:
    """parts (n, ...) -> their sum over dim 0 as a balanced tree of additions (pairwise
    summation: rounding error grows with log2(n), not n)."""
    while parts.shape[0] > 1:
        n = parts.shape[0]
        head = parts[:n // 2 * 2].unflatten(0, (n // 2, 2))
        summed = head[:, 0] + head[:, 1]                                   # (n // 2, ...)
        parts = torch.cat([summed, parts[n // 2 * 2:]]) if n % 2 else summed
    return parts[0]


def _conv3d_bwd_dw(dy, x, g, has_bias):
    """-> (dW fp32 (Cout, Cin, kt, kh, kw), db fp32 (Cout,) or None)."""
    B, cin, T, H, W = g.x_shape
    cout, _, kt, kh, kw = g.w_shape
    _, _, TO, HO, WO = g.out_shape
    P, taps = TO * HO * WO, kt * kh * kw
    bm, bn, bk, warps, stages = _config("dw", cout, cin, x.dtype)
    split = _dw_split(x.device, taps * triton.cdiv(cout, bm) * triton.cdiv(cin, bn), P, bk)
    chunk = triton.cdiv(triton.cdiv(P, split), bk) * bk
    split = triton.cdiv(P, chunk)
    dwp = torch.empty((split, cout, cin, kt, kh, kw), device=x.device, dtype=torch.float32)
    dbp = torch.empty((split, cout), device=x.device, dtype=torch.float32) if has_bias else dwp
    grid = (taps * split, triton.cdiv(cout, bm), triton.cdiv(cin, bn))
    launch(_conv3d_bwd_dw_kernel, grid)(
        dy, x, dwp, dbp, *dy.stride(), *x.stride(),
        B, cin, T, H, W, cout, TO, HO, WO, chunk, *g.stride, *g.front,
        KT=kt, KH=kh, KW=kw, HAS_BIAS=has_bias, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        PRECISION=_precision(x.dtype), GROUP=DW_GROUP, num_warps=warps, num_stages=stages)
    return pairwise_sum(dwp), pairwise_sum(dbp) if has_bias else None


# ----------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------

class _Conv3d(torch.autograd.Function):
    """Implicit-GEMM conv3d: saves x and weight (the caller's tensors, no copies)."""

    @staticmethod
    def forward(ctx, x, weight, bias, g):
        ctx.save_for_backward(x, weight)
        ctx.g, ctx.has_bias = g, bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        return _conv3d_fwd(x, weight, bias, g)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = _conv3d_bwd_dx(dy, weight, ctx.g)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            dw, db = _conv3d_bwd_dw(dy, x, ctx.g, ctx.has_bias)
            dw = dw.to(weight.dtype)
            db = None if db is None else db.to(ctx.bias_dtype)
        return dx, dw, db, None


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------

def _check(x, weight, bias):
    if x.dim() != 5 or weight.dim() != 5:
        raise ValueError(f"conv3d takes x (B, Cin, T, H, W) and weight (Cout, Cin, kt, kh, kw), "
                         f"got {tuple(x.shape)} and {tuple(weight.shape)}")
    if x.dtype != weight.dtype or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"conv3d takes fp16, bf16 or fp32 x and weight of one dtype, "
                        f"got {x.dtype} and {weight.dtype}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"conv3d: bias of shape {tuple(bias.shape)} for {weight.shape[0]} channels")


def _autocast(x, *tensors):
    """Under torch.autocast, cast the operands to its dtype as F.conv3d does (convs run in the
    lower precision); elsewhere return them unchanged."""
    if not torch.is_autocast_enabled(x.device.type):
        return (x, *tensors)
    dtype = torch.get_autocast_dtype(x.device.type)
    return tuple(None if t is None else t.to(dtype) for t in (x, *tensors))


def conv3d(x, weight, bias=None, stride=1, padding=0, causal=False, backend=None):
    """3D convolution (B, Cin, T, H, W) -> (B, Cout, T', H', W'); causal pads time in front only
    (the causal 3D conv of video autoencoders, e.g. MAGVIT-v2). Implicit-GEMM Triton kernels on
    GPU tensors or when asked; conv3d_ref elsewhere."""
    if not use_triton(backend, x, weight):
        if x.device.type == "cpu" and x.dim() == 5 and weight.dim() == 5:
            if weight.shape[2] == 1 or weight.shape[3] == weight.shape[4] == 1:
                return conv3d_folded(x, weight, bias, stride, padding, causal)
            if x.shape[0] == 1 and _triple(stride)[0] == 1 and x.shape[2] >= 2:
                return conv3d_split_batch(x, weight, bias, stride, padding, causal)
        return conv3d_ref(x, weight, bias, stride, padding, causal)
    dtype = x.dtype
    x, weight, bias = _autocast(x, weight, bias)
    _check(x, weight, bias)
    g = _Geometry(x, weight, stride, padding, causal)
    return _Conv3d.apply(x, weight, bias, g).to(dtype)  # x's dtype, as conv3d_ref
