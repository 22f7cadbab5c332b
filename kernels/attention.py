"""Space-time separable attention, cross attention and packed (varlen) attention, flash-style.

What is fused, and why
    softmax(scale * Q K^T) V in one pass per query tile with the online softmax of FlashAttention
    (Dao et al. 2022, "FlashAttention", Alg. 1; Dao 2023, "FlashAttention-2", Alg. 1-2): no score matrix
    of size seq x seq ever reaches memory; the forward saves only the log-sum-exp per query row. The
    backward recomputes P from Q, K and that log-sum-exp (FA-2 Alg. 2) in two kernels, so no
    half-precision atomics are needed: one program per query tile computes dQ (and, first,
    Delta = rowsum(dO * O)), one program per key tile computes dK and dV.
    One kernel family serves every attention the models use. A problem is a set of independent
    sequences ("batch index" j, head h); the kernel reads token i of sequence j through strides:
      spatial   sequence = the S tokens of one frame,  j = (b, t)   (ViViT factorised attention)
      temporal  sequence = the T frames at one position, j = (b, s) (several positions per program)
      full      sequence = all T*S tokens,            j = b          (i -> (i // S, i % S) if needed)
      cross     queries = N tokens, keys = L text tokens with a (B, L) padding mask
      varlen    NaViT "Patch n' Pack" (Dehghani et al. 2023): examples packed along one token axis,
                sequence j = tokens cu_seqlens[j]:cu_seqlens[j+1], no attention across examples.
    Reading through strides is the point for temporal attention: every peer (SDPA, xformers,
    flash-attn) needs (B*S, H, T, D) contiguous, i.e. a transposed copy of q, k, v, o and of every
    gradient; these kernels read the (B, T, S, H, D) views (even views of a fused qkv projection) as
    they are.

Contract
    spacetime_attention: q, k, v (B, T, S, H, D), any strides -> (B, T, S, H, D) contiguous.
    cross_attention:     q (B, N, H, D), k, v (B, L, H, D), key_mask (B, L) bool (True = attend,
                         at least one True per row) -> (B, N, H, D).
    varlen_attention:    q, k, v (total, H, D), cu_seqlens int32 (n+1,) -> (total, H, D).
    dtypes fp16 / bf16 / fp32 (q, k, v alike), fp32 accumulation and softmax statistics; head_dim
    1..128, padded inside the kernel to a power of two >= 16 with masks; any sequence length (masked
    tails, T = 1 included). causal: temporal -> frame t sees frames <= t; full -> a token sees its own
    and earlier frames. fp32 dots use input_precision "ieee" unless torch allows TF32 matmuls
    (torch.backends.cuda.matmul.allow_tf32), as PyTorch does.

Known limits
    head_dim > 128 is refused (registers); head dims that are not powers of two pay for the padding
    (72, 96 run as 128). Offsets inside one sequence are 32-bit (a sequence of one batch element
    must span < 2**31 elements); batch offsets are 64-bit. bf16 only runs on a GPU (the interpreter
    cannot do bf16 arithmetic). One fixed block configuration per shape class, no autotuning yet
    (the interpreter cannot autotune, and no GPU numbers have chosen the list). Compiled for sm_90
    with ptxas (tests/kernels/test_gpu_compile.py: every mode, head_dim 64 / 72 / 128, S = 1024,
    T = 16 and T = 1, the models' layouts): no launch spills registers except the fp32 forward,
    which spills at most 4 bytes per thread (head_dim 72; ptxas's allocation is not monotonic in
    the tile, see _config); shared memory at most 80 KB per block in 16-bit, 96 KB in fp32. Causal
    full attention masks element-wise on every visited tile (it skips only whole tiles after the
    query's last frame).
    The price of a backward without atomics: K, V are read once per query tile (dQ kernel) and Q, dO
    once per key tile (dK/dV kernel), and S = QK^T is computed in both. varlen's max_seqlen must
    bound the longest example (rows past it are not computed, as in flash-attn); a key_mask row with
    no True key gives the mean of v instead of NaN.

Roofline
    FLOPs: forward 4 * batch * heads * seq^2 * head_dim (two GEMMs), backward 2.5x forward (five GEMMs,
    one of them recomputing S). Bytes (element size e, N = tokens of the whole tensor): forward reads
    q, k, v and writes o: 4 * N * H * D * e; backward reads q, k, v, o, dO and writes dq, dk, dv:
    8 * N * H * D * e (plus 8 bytes per row for log-sum-exp and Delta). Spatial and full attention
    have hundreds of FLOPs per byte and aim at the tensor-core roofline (TFLOP/s); temporal attention
    does about T/2 FLOP per byte (T = 16: 8), far below a GPU's balance point, so it is
    bandwidth-bound and aims at the memory roofline (GB/s): the win is reading the strided layout
    once instead of transposing it.
"""
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from einops import rearrange

from kernels.dispatch import interpreting, launch, sm_count, use_triton


# ----------------------------------------------------------------------------------------------
# PyTorch references (the only ones: tests and benchmarks import these)
# ----------------------------------------------------------------------------------------------

# CPU: when the score matrices of one call fit in this many bytes, softmax(Q K^T) V with two batched
# matmuls beats SDPA's flash kernel for CPU (one thread, fwd+bwd: 16 frames x 2 heads x 256 tokens,
# 8 MiB of scores: 15.9 vs 24.3 ms; 128 x 4 heads x 16 tokens: 1.6 vs 4.0 ms); above it, 16 x 8
# heads x 256 tokens (32 MiB): 157 vs 72 ms, flash wins (a microbenchmark on the 2-core dev machine
# beside other jobs). Never on GPUs, where Triton or SDPA's kernels run.
MATH_SCORES_BYTES = 8 << 20


def _sdpa(q, k, v, attn_mask=None, is_causal=False, scale=None, fast=False):
    """F.scaled_dot_product_attention (q, k, v: (..., L, D)); fast=True on a CPU with small score
    matrices: the same attention as two matmuls around a softmax (MATH_SCORES_BYTES,
    _MathAttention)."""
    Lq, Lk = q.shape[-2], k.shape[-2]
    if not (fast and q.device.type == "cpu" and
            q.numel() // q.shape[-1] * Lk * q.element_size() <= MATH_SCORES_BYTES):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                              scale=scale)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if is_causal:
        attn_mask = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril()
    return _MathAttention.apply(q, k, v, attn_mask, scale)


class _MathAttention(torch.autograd.Function):
    """softmax(q k^T * scale, masked) v by two batched matmuls, q, k, v: (..., L, D) in any layout,
    attn_mask broadcastable to (..., Lq, Lk), True = attend. Against the same ops under autograd:
    a strided v (the temporal mode's view into the fused qkv) is made contiguous once, not again in
    the backward; dq, dk and dv come out contiguous (autograd's matmul leaves dk transposed, and
    RoPE's backward then copies it); the scale multiplies the scores in place (none when 1, as
    when q comes pre-scaled)."""

    @staticmethod
    def forward(ctx, q, k, v, attn_mask, scale):
        *batch, Lq, _ = q.shape
        Lk = k.shape[-2]
        q3, k3, v3 = (x.reshape(-1, x.shape[-2], x.shape[-1]) for x in (q, k, v))  # (n, L, D)
        s = torch.bmm(q3, k3.transpose(1, 2))                           # (n, Lq, Lk)
        if scale != 1.0:
            s.mul_(scale)
        if attn_mask is not None:
            s.view(*batch, Lq, Lk).masked_fill_(~attn_mask, float("-inf"))
        p = torch.softmax(s, -1)
        ctx.save_for_backward(q3, k3, v3, p)
        ctx.scale, ctx.shapes = scale, (q.shape, k.shape, v.shape)
        return torch.bmm(p, v3).view(*batch, Lq, v.shape[-1])

    @staticmethod
    def backward(ctx, do):
        q3, k3, v3, p = ctx.saved_tensors
        do3 = do.reshape(p.shape[0], p.shape[1], do.shape[-1])          # (n, Lq, Dv)
        dv = torch.bmm(p.transpose(1, 2), do3)
        ds = torch._softmax_backward_data(torch.bmm(do3, v3.transpose(1, 2)), p, -1, p.dtype)
        if ctx.scale != 1.0:
            ds.mul_(ctx.scale)
        dq = torch.bmm(ds, k3)
        dk = torch.bmm(ds.transpose(1, 2), q3)
        qs, ks, vs = ctx.shapes
        return dq.view(qs), dk.view(ks), dv.view(vs), None, None


def spacetime_attention_ref(q, k, v, mode="spatial", causal=False, scale=None, upcast=False,
                            fast=False):
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
    o = _sdpa(qq, kk, vv, attn_mask=mask, is_causal=is_causal and mask is None, scale=scale,
              fast=fast)
    inverse = {"spatial": "(b t) h s d -> b t s h d", "temporal": "(b s) h t d -> b t s h d",
               "full": "b h (t s) d -> b t s h d"}[mode]
    return rearrange(o, inverse, b=B, t=T, s=S).to(dtype)


def cross_attention_ref(q, k, v, key_mask=None, scale=None, upcast=False, fast=False):
    """q: (B, N, H, D); k, v: (B, L, H, D); key_mask: (B, L) bool, True = attend -> (B, N, H, D)."""
    dtype = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    mask = None if key_mask is None else key_mask[:, None, None, :]
    o = _sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale,
              fast=fast)
    return o.transpose(1, 2).to(dtype)


def varlen_attention_ref(q, k, v, cu_seqlens, scale=None, upcast=False, fast=False):
    """NaViT packed attention: q, k, v (total, H, D); cu_seqlens (n+1,) -> (total, H, D).

    Example j owns tokens cu_seqlens[j]:cu_seqlens[j+1] and attends only to them. The examples of
    one length are gathered into one batch, one attention call per distinct length (a packed DiT
    has thousands of short examples per call: one per frame, per position or per window)."""
    dtype = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    cu = cu_seqlens.to(device=q.device, dtype=torch.long)
    lens = cu[1:] - cu[:-1]                                             # (n,)
    outs, rows = [], []
    for n in torch.unique(lens[lens > 0]).tolist():
        idx = cu[:-1][lens == n][:, None] + torch.arange(n, device=q.device)  # (m, n) token rows
        qq, kk, vv = (x[idx].transpose(1, 2) for x in (q, k, v))       # (m, H, n, D)
        outs.append(_sdpa(qq, kk, vv, scale=scale, fast=fast).transpose(1, 2).flatten(0, 1))
        rows.append(idx.flatten())
    if not outs:
        return q.new_zeros(q.shape).to(dtype)
    o, rows = torch.cat(outs), torch.cat(rows)                          # (total, H, D) in length order
    return torch.zeros_like(o).index_copy(0, rows, o).to(dtype)         # (total, H, D)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
# A tensor is read as x[j, i, h, d] with six strides (s_bo, s_bi, s_so, s_si, s_h, s_d):
#   batch index j -> (j // NB_INNER) * s_bo + (j % NB_INNER) * s_bi
#   token index i -> (i // L_INNER) * s_so + (i % L_INNER) * s_si   (SPLIT, full mode only)
#                    i * s_si                                        (otherwise)
# Log-sum-exp and Delta live in fp32 buffers at j * s_lb + h * s_lh + start + i (start: the
# example's first token in varlen mode, else 0). Scores are kept in base 2: qk_scale = scale*log2(e).

@triton.jit
def _batch_offset(j, NB_INNER, s_bo, s_bi):
    j = j.to(tl.int64)
    return (j // NB_INNER) * s_bo + (j % NB_INNER) * s_bi


@triton.jit
def _token_offsets(i, L_INNER, s_so, s_si, SPLIT: tl.constexpr):
    if SPLIT:
        return (i // L_INNER) * s_so + (i % L_INNER) * s_si
    else:
        return i * s_si


@triton.jit
def _load_tile(base, i, rows_ok, offs_d, d_ok, L_INNER, s_so, s_si, s_d, SPLIT: tl.constexpr):
    """(len(i), BLOCK_D) tile of rows i of one (sequence, head), zero outside the rows and head dim."""
    ptrs = base + _token_offsets(i, L_INNER, s_so, s_si, SPLIT)[:, None] + offs_d[None, :] * s_d
    return tl.load(ptrs, mask=rows_ok[:, None] & d_ok[None, :], other=0.0)


@triton.jit
def _sequence(CU, j, NB, LQ, LK, VARLEN: tl.constexpr):
    """(first token, query length, key length) of sequence j; lengths 0 when j is past the batch."""
    if VARLEN:
        start = tl.load(CU + j)
        lq = tl.load(CU + j + 1) - start
        lk = lq
    else:
        start = 0
        lq = tl.where(j < NB, LQ, 0)
        lk = tl.where(j < NB, LK, 0)
    return start, lq, lk


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, KMASK, CU,
    sq_bo, sq_bi, sq_so, sq_si, sq_h, sq_d,
    sk_bo, sk_bi, sk_so, sk_si, sk_h, sk_d,
    sv_bo, sv_bi, sv_so, sv_si, sv_h, sv_d,
    so_bo, so_bi, so_so, so_si, so_h, so_d,
    sm_b, sm_l, s_lb, s_lh,
    NB, NB_INNER, H, LQ, LK, L_INNER, D, GROUP, NUM_M, qk_scale,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, VARLEN: tl.constexpr, SPLIT: tl.constexpr,
    POS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """O = softmax(scale Q K^T) V for one query tile of POS sequences (FA-2 forward, Alg. 1)."""
    pid = tl.program_id(0)
    pid_m = pid % NUM_M
    h = (pid // NUM_M) % H
    group = pid // NUM_M // H
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    for p in range(POS):  # several short sequences per program (temporal mode)
        j = group * POS + p
        start, lq, lk = _sequence(CU, j, NB, LQ, LK, VARLEN)
        m_ok = offs_m < lq
        q_base = Q + _batch_offset(j, NB_INNER, sq_bo, sq_bi) + h * sq_h
        k_base = K + _batch_offset(j, NB_INNER, sk_bo, sk_bi) + h * sk_h
        v_base = V + _batch_offset(j, NB_INNER, sv_bo, sv_bi) + h * sv_h
        q = _load_tile(q_base, start + offs_m, m_ok, offs_d, d_ok, L_INNER, sq_so, sq_si, sq_d, SPLIT)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max (base 2)
        l_i = tl.zeros([BLOCK_M], tl.float32)  # running row sum of exp2
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        hi = tl.where(start_m < lq, lk, 0)
        if CAUSAL:  # keys after the tile's last frame are never visible
            frame_m = offs_m // GROUP  # causal granule (frame) of each query row
            last = tl.minimum(start_m + BLOCK_M, lq) - 1
            hi = tl.minimum(hi, (last // GROUP + 1) * GROUP)
        for start_n in range(0, hi, BLOCK_N):
            offs_n = start_n + offs_n0
            n_ok = offs_n < lk
            k = _load_tile(k_base, start + offs_n, n_ok, offs_d, d_ok, L_INNER, sk_so, sk_si, sk_d, SPLIT)
            v = _load_tile(v_base, start + offs_n, n_ok, offs_d, d_ok, L_INNER, sv_so, sv_si, sv_d, SPLIT)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
            keep = n_ok[None, :]
            if HAS_MASK:
                km = tl.load(KMASK + j * sm_b + offs_n * sm_l, mask=n_ok, other=0)
                keep = keep & (km != 0)[None, :]
            if CAUSAL:
                keep = keep & ((offs_n // GROUP)[None, :] <= frame_m[:, None])
            s = tl.where(keep, s, -1.0e30)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p_ij = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p_ij, 1)
            acc = acc * alpha[:, None] + tl.dot(p_ij.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        l_i = tl.where(l_i > 0.0, l_i, 1.0)  # rows past the sequence end: never stored
        o = acc / l_i[:, None]
        o_base = O + _batch_offset(j, NB_INNER, so_bo, so_bi) + h * so_h
        o_ptrs = o_base + _token_offsets(start + offs_m, L_INNER, so_so, so_si, SPLIT)[:, None] \
            + offs_d[None, :] * so_d
        tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
        tl.store(LSE + j * s_lb + h * s_lh + start + offs_m, m_i + tl.log2(l_i), mask=m_ok)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, O, DO, DQ, LSE, DELTA, KMASK, CU,
    sq_bo, sq_bi, sq_so, sq_si, sq_h, sq_d,
    sk_bo, sk_bi, sk_so, sk_si, sk_h, sk_d,
    sv_bo, sv_bi, sv_so, sv_si, sv_h, sv_d,
    so_bo, so_bi, so_so, so_si, so_h, so_d,
    sdo_bo, sdo_bi, sdo_so, sdo_si, sdo_h, sdo_d,
    sdq_bo, sdq_bi, sdq_so, sdq_si, sdq_h, sdq_d,
    sm_b, sm_l, s_lb, s_lh,
    NB, NB_INNER, H, LQ, LK, L_INNER, D, GROUP, NUM_M, qk_scale, sm_scale,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, VARLEN: tl.constexpr, SPLIT: tl.constexpr,
    POS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Delta = rowsum(dO * O), then dQ = scale * (P * (dP - Delta)) K for one query tile (FA-2 Alg. 2)."""
    pid = tl.program_id(0)
    pid_m = pid % NUM_M
    h = (pid // NUM_M) % H
    group = pid // NUM_M // H
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    for p in range(POS):
        j = group * POS + p
        start, lq, lk = _sequence(CU, j, NB, LQ, LK, VARLEN)
        m_ok = offs_m < lq
        q_base = Q + _batch_offset(j, NB_INNER, sq_bo, sq_bi) + h * sq_h
        k_base = K + _batch_offset(j, NB_INNER, sk_bo, sk_bi) + h * sk_h
        v_base = V + _batch_offset(j, NB_INNER, sv_bo, sv_bi) + h * sv_h
        o_base = O + _batch_offset(j, NB_INNER, so_bo, so_bi) + h * so_h
        do_base = DO + _batch_offset(j, NB_INNER, sdo_bo, sdo_bi) + h * sdo_h
        q = _load_tile(q_base, start + offs_m, m_ok, offs_d, d_ok, L_INNER, sq_so, sq_si, sq_d, SPLIT)
        do = _load_tile(do_base, start + offs_m, m_ok, offs_d, d_ok, L_INNER, sdo_so, sdo_si, sdo_d, SPLIT)
        o = _load_tile(o_base, start + offs_m, m_ok, offs_d, d_ok, L_INNER, so_so, so_si, so_d, SPLIT)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # (BLOCK_M,)
        row = j * s_lb + h * s_lh + start + offs_m  # offsets shared by LSE and DELTA
        tl.store(DELTA + row, delta, mask=m_ok)
        lse = tl.load(LSE + row, mask=m_ok, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        hi = tl.where(start_m < lq, lk, 0)
        if CAUSAL:
            frame_m = offs_m // GROUP
            last = tl.minimum(start_m + BLOCK_M, lq) - 1
            hi = tl.minimum(hi, (last // GROUP + 1) * GROUP)
        for start_n in range(0, hi, BLOCK_N):
            offs_n = start_n + offs_n0
            n_ok = offs_n < lk
            k = _load_tile(k_base, start + offs_n, n_ok, offs_d, d_ok, L_INNER, sk_so, sk_si, sk_d, SPLIT)
            v = _load_tile(v_base, start + offs_n, n_ok, offs_d, d_ok, L_INNER, sv_so, sv_si, sv_d, SPLIT)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
            keep = m_ok[:, None] & n_ok[None, :]
            if HAS_MASK:
                km = tl.load(KMASK + j * sm_b + offs_n * sm_l, mask=n_ok, other=0)
                keep = keep & (km != 0)[None, :]
            if CAUSAL:
                keep = keep & ((offs_n // GROUP)[None, :] <= frame_m[:, None])
            p_ij = tl.exp2(tl.where(keep, s, -1.0e30) - lse[:, None])
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # (BLOCK_M, BLOCK_N)
            ds = p_ij * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        dq_base = DQ + _batch_offset(j, NB_INNER, sdq_bo, sdq_bi) + h * sdq_h
        dq_ptrs = dq_base + _token_offsets(start + offs_m, L_INNER, sdq_so, sdq_si, SPLIT)[:, None] \
            + offs_d[None, :] * sdq_d
        tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


@triton.jit
def _attn_bwd_dkv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, KMASK, CU,
    sq_bo, sq_bi, sq_so, sq_si, sq_h, sq_d,
    sk_bo, sk_bi, sk_so, sk_si, sk_h, sk_d,
    sv_bo, sv_bi, sv_so, sv_si, sv_h, sv_d,
    sdo_bo, sdo_bi, sdo_so, sdo_si, sdo_h, sdo_d,
    sdk_bo, sdk_bi, sdk_so, sdk_si, sdk_h, sdk_d,
    sdv_bo, sdv_bi, sdv_so, sdv_si, sdv_h, sdv_d,
    sm_b, sm_l, s_lb, s_lh,
    NB, NB_INNER, H, LQ, LK, L_INNER, D, GROUP, NUM_N, qk_scale, sm_scale,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, VARLEN: tl.constexpr, SPLIT: tl.constexpr,
    POS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dV = P^T dO and dK = scale * (P * (dP - Delta))^T Q for one key tile (FA-2 Alg. 2), in the
    transposed orientation (rows = keys) so that both accumulators stay in registers."""
    pid = tl.program_id(0)
    pid_n = pid % NUM_N
    h = (pid // NUM_N) % H
    group = pid // NUM_N // H
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    for p in range(POS):
        j = group * POS + p
        start, lq, lk = _sequence(CU, j, NB, LQ, LK, VARLEN)
        n_ok = offs_n < lk
        q_base = Q + _batch_offset(j, NB_INNER, sq_bo, sq_bi) + h * sq_h
        k_base = K + _batch_offset(j, NB_INNER, sk_bo, sk_bi) + h * sk_h
        v_base = V + _batch_offset(j, NB_INNER, sv_bo, sv_bi) + h * sv_h
        do_base = DO + _batch_offset(j, NB_INNER, sdo_bo, sdo_bi) + h * sdo_h
        k = _load_tile(k_base, start + offs_n, n_ok, offs_d, d_ok, L_INNER, sk_so, sk_si, sk_d, SPLIT)
        v = _load_tile(v_base, start + offs_n, n_ok, offs_d, d_ok, L_INNER, sv_so, sv_si, sv_d, SPLIT)
        keep_n = n_ok
        if HAS_MASK:
            km = tl.load(KMASK + j * sm_b + offs_n * sm_l, mask=n_ok, other=0)
            keep_n = keep_n & (km != 0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        lo = 0
        if CAUSAL:  # queries before the tile's first frame never see it
            frame_n = offs_n // GROUP
            lo = (start_n // GROUP) * GROUP // BLOCK_M * BLOCK_M
        hi = tl.where(start_n < lk, lq, 0)
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + offs_m0
            m_ok = offs_m < lq
            q = _load_tile(q_base, start + offs_m, m_ok, offs_d, d_ok, L_INNER, sq_so, sq_si, sq_d, SPLIT)
            do = _load_tile(do_base, start + offs_m, m_ok, offs_d, d_ok, L_INNER, sdo_so, sdo_si, sdo_d,
                            SPLIT)
            row = j * s_lb + h * s_lh + start + offs_m
            lse = tl.load(LSE + row, mask=m_ok, other=0.0)
            delta = tl.load(DELTA + row, mask=m_ok, other=0.0)
            s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
            keep = keep_n[:, None] & m_ok[None, :]
            if CAUSAL:
                keep = keep & (frame_n[:, None] <= (offs_m // GROUP)[None, :])
            p_t = tl.exp2(tl.where(keep, s_t, -1.0e30) - lse[None, :])
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # (BLOCK_N, BLOCK_M)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
        mask = n_ok[:, None] & d_ok[None, :]
        dk_base = DK + _batch_offset(j, NB_INNER, sdk_bo, sdk_bi) + h * sdk_h
        dk_ptrs = dk_base + _token_offsets(start + offs_n, L_INNER, sdk_so, sdk_si, SPLIT)[:, None] \
            + offs_d[None, :] * sdk_d
        tl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=mask)
        dv_base = DV + _batch_offset(j, NB_INNER, sdv_bo, sdv_bi) + h * sdv_h
        dv_ptrs = dv_base + _token_offsets(start + offs_n, L_INNER, sdv_so, sdv_si, SPLIT)[:, None] \
            + offs_d[None, :] * sdv_d
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Problem:
    """How the kernels see (sequence j, token i, head h, dim d) in the caller's tensors."""
    kind: str                  # spatial | temporal | full | cross | varlen
    nb: int                    # number of sequences
    nb_inner: int              # j -> (j // nb_inner, j % nb_inner) over two tensor axes
    lq: int                    # query length (varlen: max_seqlen)
    lk: int                    # key length
    l_inner: int               # full mode: tokens per frame, i -> (i // S, i % S)
    split: bool                # full mode with a layout where the (T, S) axes do not merge
    heads: int
    head_dim: int
    scale: float
    group: int                 # causal: key i visible from query i' iff i // group <= i' // group
    causal: bool
    key_mask: torch.Tensor | None = None   # (B, L) uint8 view of the bool mask
    cu_seqlens: torch.Tensor | None = None  # (n+1,) int32
    total: int = 0             # varlen: packed token count (log-sum-exp is stored per token)


def _strides(x, prob):
    """The six strides (s_bo, s_bi, s_so, s_si, s_h, s_d) of x for prob's view of it."""
    if prob.kind in ("spatial", "temporal", "full"):
        sb, st, ss, sh, sd = x.stride()
        return {"spatial": (sb, st, 0, ss, sh, sd), "temporal": (sb, ss, 0, st, sh, sd),
                "full": (sb, 0, st, ss, sh, sd)}[prob.kind]
    if prob.kind == "cross":
        sb, sn, sh, sd = x.stride()
        return (sb, 0, 0, sn, sh, sd)
    sn, sh, sd = x.stride()  # varlen: tokens addressed from the packed start
    return (0, 0, 0, sn, sh, sd)


def _mergeable(x):
    """True when token (t, s) of x sits at (t*S + s) * stride(S), so full mode needs no split."""
    B, T, S, H, D = x.shape
    return T == 1 or x.stride(1) == S * x.stride(2)


def _pow2(n):
    return 1 << max(0, int(n) - 1).bit_length()


def _config(prob, dtype, pass_):
    """(BLOCK_M, BLOCK_N, POS, num_warps, num_stages) for one kernel; BLOCK_M runs over queries.

    The interpreter gets one small fixed tile (32) so tests exercise tails and several tiles. On a
    GPU the tiles follow FA-2 / Triton's fused-attention tutorial: 128 x 64 forward; backward 64
    queries x 32 keys (dQ) and 64 keys x 32 queries (dK, dV); halved where fp32 or head_dim > 64
    would spill registers. fp32 (IEEE dots run on FMA units, their operands in registers) was
    measured with ptxas for sm_90 (tests/kernels/test_gpu_compile.py): the forward at 64 x 64
    spilled 620 bytes per thread at head_dim 64 and 14 KB at 128 (ptxas fell back to 32
    registers), so it runs 64 x 32 on 8 warps (88 / 114 registers, no spill); the dQ pass with
    head_dim > 64 at 32 x 32 spilled 4 bytes on 8 warps (head_dim 72) and 1164 on 4 warps (head_dim
    128 read from the VAE's conv layout), so it runs 32 queries x 16 keys on 8 warps. ptxas does not
    spill monotonically in the tile size: each choice here is a measurement. Temporal mode pads T
    to >= 16 (the smallest dot tile) and gives each program several positions (POS) so that short
    sequences still make a program's worth of work."""
    f32 = dtype == torch.float32
    big = f32 or prob.head_dim > 64
    if interpreting():
        bm = bn = 32
    elif pass_ == "fwd":
        bm, bn = (64, 32) if f32 else ((64 if big else 128), 64)
    elif pass_ == "dq":
        bm, bn = (32 if big else 64), (16 if f32 and prob.head_dim > 64 else 32)
    else:  # dkv: programs over keys, inner loop over queries
        bm, bn = 32, (32 if big else 64)
    if prob.kind == "temporal":
        bm = bn = min(32 if interpreting() else 64, max(16, _pow2(prob.lq)))
        return bm, bn, (4 if interpreting() else max(1, 128 // bm)), 4, 2
    bm = min(bm, max(16, _pow2(prob.lq)))
    bn = min(bn, max(16, _pow2(prob.lk)))
    warps = 8 if prob.head_dim > 64 else 4
    if f32 and pass_ == "fwd":
        warps = 8
    stages = 3 if pass_ == "fwd" and not big else 2
    return bm, bn, 1, warps, stages


def _precision(dtype):
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not interpreting():
        return "tf32"
    return "ieee"


def _lse_strides(prob):
    """(s_lb, s_lh) of the fp32 log-sum-exp / Delta buffers: (nb, H, lq), or (H, total) when packed
    (indexed by the example's first token + i)."""
    return (0, prob.total) if prob.kind == "varlen" else (prob.heads * prob.lq, prob.lq)


def _lse_buffer(prob, device):
    shape = (prob.heads, prob.total) if prob.kind == "varlen" else (prob.nb, prob.heads, prob.lq)
    return torch.empty(shape, device=device, dtype=torch.float32)


def _sizes(prob):
    """(NB, NB_INNER, H, LQ, LK, L_INNER, D, GROUP) as the kernels take them."""
    return (prob.nb, prob.nb_inner, prob.heads, prob.lq, prob.lk, prob.l_inner, prob.head_dim,
            max(prob.group, 1))


def _flags(prob, bm, bn, pos, dtype):
    return dict(CAUSAL=prob.causal, HAS_MASK=prob.key_mask is not None, VARLEN=prob.kind == "varlen",
                SPLIT=prob.split, POS=pos, BLOCK_M=bm, BLOCK_N=bn,
                BLOCK_D=max(16, _pow2(prob.head_dim)), PRECISION=_precision(dtype))


def _attn_fwd(q, k, v, prob):
    """Launch the forward kernel -> (o like q but contiguous, log-sum-exp base 2)."""
    bm, bn, pos, warps, stages = _config(prob, q.dtype, "fwd")
    o = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    lse = _lse_buffer(prob, q.device)
    s_lb, s_lh = _lse_strides(prob)
    sm = prob.key_mask.stride() if prob.key_mask is not None else (0, 0)
    num_m = triton.cdiv(prob.lq, bm)
    grid = (num_m * prob.heads * triton.cdiv(prob.nb, pos),)
    launch(_attn_fwd_kernel, grid)(
        q, k, v, o, lse, prob.key_mask, prob.cu_seqlens,
        *_strides(q, prob), *_strides(k, prob), *_strides(v, prob), *_strides(o, prob),
        *sm, s_lb, s_lh, *_sizes(prob), num_m, prob.scale * math.log2(math.e),
        **_flags(prob, bm, bn, pos, q.dtype), num_warps=warps, num_stages=stages)
    return o, lse


def _attn_bwd(do, q, k, v, o, lse, prob):
    """Launch the dQ kernel (which also writes Delta), then the dK/dV kernel -> (dq, dk, dv)."""
    if prob.kind == "full" and not prob.split and not _mergeable(do):
        prob = replace(prob, split=True)
    dq, dk, dv = (torch.empty(x.shape, device=x.device, dtype=x.dtype) for x in (q, k, v))
    delta = torch.empty_like(lse)
    s_lb, s_lh = _lse_strides(prob)
    sm = prob.key_mask.stride() if prob.key_mask is not None else (0, 0)
    sizes, qk_scale = _sizes(prob), prob.scale * math.log2(math.e)

    bm, bn, pos, warps, stages = _config(prob, q.dtype, "dq")
    num_m = triton.cdiv(prob.lq, bm)
    grid = (num_m * prob.heads * triton.cdiv(prob.nb, pos),)
    launch(_attn_bwd_dq_kernel, grid)(
        q, k, v, o, do, dq, lse, delta, prob.key_mask, prob.cu_seqlens,
        *_strides(q, prob), *_strides(k, prob), *_strides(v, prob), *_strides(o, prob),
        *_strides(do, prob), *_strides(dq, prob),
        *sm, s_lb, s_lh, *sizes, num_m, qk_scale, prob.scale,
        **_flags(prob, bm, bn, pos, q.dtype), num_warps=warps, num_stages=stages)

    bm, bn, pos, warps, stages = _config(prob, q.dtype, "dkv")
    num_n = triton.cdiv(prob.lk, bn)
    grid = (num_n * prob.heads * triton.cdiv(prob.nb, pos),)
    launch(_attn_bwd_dkv_kernel, grid)(
        q, k, v, do, dk, dv, lse, delta, prob.key_mask, prob.cu_seqlens,
        *_strides(q, prob), *_strides(k, prob), *_strides(v, prob), *_strides(do, prob),
        *_strides(dk, prob), *_strides(dv, prob),
        *sm, s_lb, s_lh, *sizes, num_n, qk_scale, prob.scale,
        **_flags(prob, bm, bn, pos, q.dtype), num_warps=warps, num_stages=stages)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------

class _FlashAttention(torch.autograd.Function):
    """Flash attention over any _Problem: saves q, k, v (the caller's views, not copies), o and the
    log-sum-exp; the backward recomputes P tile by tile (Dao 2023, FlashAttention-2, Alg. 2)."""

    @staticmethod
    def forward(ctx, q, k, v, prob):
        o, lse = _attn_fwd(q, k, v, prob)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.prob = prob
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _attn_bwd(do, q, k, v, o, lse, ctx.prob)
        return dq, dk, dv, None


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------

def _check(q, k, v, head_dim):
    if not q.dtype == k.dtype == v.dtype or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"attention kernels take fp16, bf16 or fp32 q, k, v of one dtype, "
                        f"got {q.dtype}, {k.dtype}, {v.dtype}")
    if head_dim > 128:
        raise ValueError(f"attention kernels support head_dim <= 128, got {head_dim}")


def _scale(scale, head_dim):
    return float(scale) if scale is not None else head_dim ** -0.5


def _spacetime_problem(q, k, v, mode, causal, scale):
    if mode not in ("spatial", "temporal", "full"):
        raise ValueError(f"mode must be spatial, temporal or full, got {mode!r}")
    if causal and mode == "spatial":
        raise ValueError("causal attention is defined for temporal and full modes")
    if q.dim() != 5 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must share one (B, T, S, H, D) shape: {q.shape}, {k.shape}, {v.shape}")
    B, T, S, H, D = q.shape
    _check(q, k, v, D)
    nb, nb_inner, seq = {"spatial": (B * T, T, S), "temporal": (B * S, S, T), "full": (B, 1, T * S)}[mode]
    # full mode reads token i at (i // S, i % S) unless q, k, v merge (T, S) into one axis (o, dq, dk,
    # dv are allocated contiguous; the backward re-checks dO)
    split = mode == "full" and not all(_mergeable(x) for x in (q, k, v))
    return _Problem(kind=mode, nb=nb, nb_inner=nb_inner, lq=seq, lk=seq, l_inner=S, split=split,
                    heads=H, head_dim=D, scale=_scale(scale, D), group=1 if mode == "temporal" else S,
                    causal=causal)


def spacetime_attention(q, k, v, mode="spatial", causal=False, scale=None, backend=None):
    """Factorised space-time attention (ViViT model 3 / Imagen Video's separable blocks), or full.

    q, k, v: (B, T, S, H, D), any strides (views of a fused qkv projection are read in place)
    -> (B, T, S, H, D). mode "spatial": within each frame; "temporal": across frames at each
    position (causal: frame t sees frames <= t); "full": all T*S tokens (causal: a token sees its own
    and earlier frames). Flash-style (Dao 2022, 2023) when Triton runs, the reference otherwise."""
    if use_triton(backend, q, k, v):
        return _FlashAttention.apply(q, k, v, _spacetime_problem(q, k, v, mode, causal, scale))
    return spacetime_attention_ref(q, k, v, mode, causal, scale, fast=True)


def cross_attention(q, k, v, key_mask=None, scale=None, backend=None):
    """Attention from N video tokens to L text tokens with a padding mask.

    q: (B, N, H, D); k, v: (B, L, H, D); key_mask: (B, L) bool, True = attend (at least one True per
    row) -> (B, N, H, D)."""
    if use_triton(backend, q, k, v):
        B, N, H, D = q.shape
        L = k.shape[1]
        if k.shape != (B, L, H, D) or v.shape != k.shape:
            raise ValueError(f"q (B, N, H, D), k, v (B, L, H, D) disagree: {q.shape}, {k.shape}, {v.shape}")
        _check(q, k, v, D)
        if key_mask is not None:
            if key_mask.shape != (B, L) or key_mask.dtype != torch.bool:
                raise ValueError(f"key_mask must be a ({B}, {L}) bool tensor, "
                                 f"got {key_mask.dtype} {tuple(key_mask.shape)}")
            key_mask = key_mask.view(torch.uint8)
        prob = _Problem(kind="cross", nb=B, nb_inner=1, lq=N, lk=L, l_inner=1, split=False, heads=H,
                        head_dim=D, scale=_scale(scale, D), group=0, causal=False, key_mask=key_mask)
        return _FlashAttention.apply(q, k, v, prob)
    return cross_attention_ref(q, k, v, key_mask, scale, fast=True)


def varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale=None, backend=None):
    """NaViT "Patch n' Pack" attention (Dehghani et al. 2023): examples of different lengths packed
    along one token axis, each attending only to itself.

    q, k, v: (total, H, D); cu_seqlens: int32 (n+1,) cumulative offsets (cu_seqlens[0] = 0,
    cu_seqlens[-1] = total); max_seqlen: at least the longest example (as in flash-attn's varlen
    API; rows past it are not computed) -> (total, H, D)."""
    if use_triton(backend, q, k, v):
        total, H, D = q.shape
        if k.shape != q.shape or v.shape != q.shape:
            raise ValueError(f"q, k, v must share one (total, H, D) shape: {q.shape}, {k.shape}, {v.shape}")
        _check(q, k, v, D)
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
        prob = _Problem(kind="varlen", nb=cu.numel() - 1, nb_inner=1, lq=int(max_seqlen),
                        lk=int(max_seqlen), l_inner=1, split=False, heads=H, head_dim=D,
                        scale=_scale(scale, D), group=0, causal=False, cu_seqlens=cu, total=total)
        return _FlashAttention.apply(q, k, v, prob)
    return varlen_attention_ref(q, k, v, cu_seqlens, scale, fast=True)
