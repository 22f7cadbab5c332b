"""Benchmark: the Triton space-time attention kernels against the PyTorch reference (einops + SDPA),
each of SDPA's backends (flash, efficient, math, cuDNN) and xformers when it is importable.

    python -m benchmarks.bench_attention [--dtype bf16] [--B 2 --T 16 --S 1024 --H 16 --D 64]

For each mode (spatial, temporal, full, packed) and pass (forward, backward, both): milliseconds,
TFLOP/s (FLOPs = 4*batch*heads*seq^2*head_dim forward, 2.5x backward; FlashAttention's count),
GB/s (the figure of merit for temporal attention, bandwidth-bound at about T/2 FLOP per byte;
bytes = the minimum traffic: q, k, v read and o written forward, 8 tensors backward) and peak GPU
memory. Every implementation starts from the models' layout: q, k, v as (B, T, S, H, D) views of a
fused (B, T, S, 3, H, D) projection (packed: (total, H, D) views), so the layout work each peer
needs (the transposed copy for temporal attention) is in its time. Results: a markdown table, a CSV
and one PNG per mode in benchmarks/results/.

Without a GPU it prints the notice, times nothing, and checks the kernels' correctness on small
shapes in Triton's interpreter (outputs and dq, dk, dv within 2x PyTorch's own error + a floor).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel is decorated

import argparse  # noqa: E402
import random  # noqa: E402
from pathlib import Path  # noqa: E402

import torch.nn.functional as F  # noqa: E402
from einops import rearrange  # noqa: E402

from benchmarks.common import (NO_GPU_NOTICE, bar_plot, machine_header, markdown_table,  # noqa: E402
                               peak_memory, time_fn, write_csv)
from kernels.attention import (spacetime_attention, spacetime_attention_ref,  # noqa: E402
                               varlen_attention, varlen_attention_ref)

RESULTS = Path(__file__).parent / "results"
MODES = ("spatial", "temporal", "full", "packed")
PASSES = ("forward", "backward", "both")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
FLOOR = {torch.float32: 1e-5, torch.float16: 2e-4, torch.bfloat16: 2e-3}  # as in the tests
LAYOUT = {"spatial": ("b t s h d -> (b t) s h d", "(b t) s h d -> b t s h d"),  # xformers' (batch, seq, H, D)
          "temporal": ("b t s h d -> (b s) t h d", "(b s) t h d -> b t s h d"),
          "full": ("b t s h d -> b (t s) h d", "b (t s) h d -> b t s h d")}


# ---------------------------------------------------------------- problems and their costs

def packed_lengths(total, frame_tokens, seed=0):
    """NaViT-style example lengths (a quarter frame to 4 frames of tokens) filling `total` tokens."""
    rng, lens = random.Random(seed), []
    while sum(lens) < total:
        lens.append(min(rng.randint(frame_tokens // 4, 4 * frame_tokens), total - sum(lens)))
    return lens


def make_inputs(mode, B, T, S, H, D, dtype, device):
    """q, k, v views of one fused projection (requires grad), and the packed example lengths."""
    if mode == "packed":
        lens = packed_lengths(B * T * S, S)
        qkv = torch.randn(B * T * S, 3, H, D, device=device, dtype=dtype, requires_grad=True)
        return qkv.unbind(1), lens  # 3 x (total, H, D)
    qkv = torch.randn(B, T, S, 3, H, D, device=device, dtype=dtype, requires_grad=True)
    return qkv.unbind(3), None  # 3 x (B, T, S, H, D)


def attention_flops(mode, B, T, S, H, D, lens=None):
    """Forward FLOPs: 4 * batch * heads * seq^2 * head_dim (two GEMMs)."""
    if mode == "packed":
        return 4 * H * D * sum(n * n for n in lens)
    batch, seq = {"spatial": (B * T, S), "temporal": (B * S, T), "full": (B, T * S)}[mode]
    return 4 * batch * H * seq * seq * D


def attention_bytes(B, T, S, H, D, element_size, pass_):
    """Minimum traffic: forward reads q, k, v and writes o; backward reads q, k, v, o, dO and writes
    dq, dk, dv."""
    tensors = {"forward": 4, "backward": 8, "both": 12}[pass_]
    return tensors * B * T * S * H * D * element_size


# ---------------------------------------------------------------- implementations

def _sdpa_backends():
    from torch.nn.attention import SDPBackend
    return {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
            "sdpa-math": SDPBackend.MATH, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION}


def _forced(backend, fn):
    """fn run with SDPA restricted to one backend (the backward follows the forward's choice)."""
    from torch.nn.attention import sdpa_kernel

    def run(*args):
        with sdpa_kernel([backend]):
            return fn(*args)
    return run


def implementations(mode, lens, device):
    """name -> fn(q, k, v) -> o, every one starting from the models' layout."""
    if mode == "packed":
        cu = torch.tensor([0] + lens, device=device).cumsum(0).to(torch.int32)
        ref = lambda q, k, v: varlen_attention_ref(q, k, v, cu)  # noqa: E731
        impls = {"triton": lambda q, k, v: varlen_attention(q, k, v, cu, max(lens), backend="triton"),
                 "reference": ref}
        impls.update({name: _forced(b, ref) for name, b in _sdpa_backends().items()})
        impls["sdpa-nested"] = lambda q, k, v: _nested_sdpa(q, k, v, cu)
    else:
        ref = lambda q, k, v: spacetime_attention_ref(q, k, v, mode)  # noqa: E731
        impls = {"triton": lambda q, k, v: spacetime_attention(q, k, v, mode, backend="triton"),
                 "reference": ref}
        impls.update({name: _forced(b, ref) for name, b in _sdpa_backends().items()})
    try:
        import xformers.ops as xops
    except ImportError:
        return impls
    if mode == "packed":
        bias = xops.fmha.attn_bias.BlockDiagonalMask.from_seqlens(lens)
        impls["xformers"] = lambda q, k, v: xops.memory_efficient_attention(
            q[None], k[None], v[None], attn_bias=bias)[0]
    else:
        into, back = LAYOUT[mode]

        def xformers_attention(q, k, v):
            B, T, S = q.shape[:3]
            o = xops.memory_efficient_attention(*(rearrange(x, into) for x in (q, k, v)))
            return rearrange(o, back, b=B, t=T, s=S)
        impls["xformers"] = xformers_attention
    return impls


def _nested_sdpa(q, k, v, cu):
    """SDPA on jagged nested tensors (PyTorch's own varlen path)."""
    offsets = cu.long()
    qn, kn, vn = (torch.nested.nested_tensor_from_jagged(x, offsets).transpose(1, 2) for x in (q, k, v))
    return F.scaled_dot_product_attention(qn, kn, vn).transpose(1, 2).values()


# ---------------------------------------------------------------- measurement

def _runner(fn, q, k, v, pass_):
    """A zero-argument callable for one pass: forward (inference), backward (over a kept graph), both."""
    if pass_ == "forward":
        def run():
            with torch.no_grad():
                return fn(q, k, v)
        return run
    inputs = (q, k, v)
    d_out = torch.randn(q.shape, device=q.device, dtype=q.dtype)
    if pass_ == "backward":
        out = fn(q, k, v)
        return lambda: torch.autograd.grad(out, inputs, d_out, retain_graph=True)
    return lambda: torch.autograd.grad(fn(q, k, v), inputs, d_out)


def benchmark(args, dtype, device="cuda"):
    B, T, S, H, D = args.B, args.T, args.S, args.H, args.D
    rows = []
    for mode in MODES:
        (q, k, v), lens = make_inputs(mode, B, T, S, H, D, dtype, device)
        check = _max_error(mode, (q, k, v), lens)
        print(f"{mode}: Triton forward max |error| vs fp32 reference {check:.3g}")
        for pass_ in PASSES:
            flops = attention_flops(mode, B, T, S, H, D, lens) * {"forward": 1, "backward": 2.5,
                                                                 "both": 3.5}[pass_]
            nbytes = attention_bytes(B, T, S, H, D, q.element_size(), pass_)
            block = []
            for name, fn in implementations(mode, lens, device).items():
                row, run = {"mode": mode, "pass": pass_, "impl": name}, None
                try:
                    run = _runner(fn, q, k, v, pass_)
                    seconds = time_fn(run, warmup=3, reps=10)
                    row.update({"ms": seconds * 1e3, "TFLOP/s": flops / seconds / 1e12,
                                "GB/s": nbytes / seconds / 1e9, "peak MiB": peak_memory(run) / 2**20})
                except torch.cuda.OutOfMemoryError:
                    row.update({"ms": "OOM"})
                except (RuntimeError, NotImplementedError, ValueError, TypeError) as e:
                    note = str(e).splitlines()[0][:60] if str(e) else type(e).__name__
                    row.update({"ms": "n/a", "note": note})
                run = None  # frees a kept graph before the next implementation
                torch.cuda.empty_cache()
                block.append(row)
            ref_ms = next((r["ms"] for r in block if r["impl"] == "reference"), None)
            for r in block:
                ok = isinstance(r["ms"], float) and isinstance(ref_ms, float)
                r["vs reference"] = ref_ms / r["ms"] if ok else ""
            rows += block
        del q, k, v
    keys = ("mode", "pass", "impl", "ms", "TFLOP/s", "GB/s", "peak MiB", "vs reference", "note")
    return [{key: r.get(key, "") for key in keys} for r in rows]


def _max_error(mode, inputs, lens):
    """Max |Triton - fp32 reference| of the forward at the benchmark shape."""
    with torch.no_grad():
        impls = implementations(mode, lens, inputs[0].device)
        out = impls["triton"](*inputs).float()
        ref = impls["reference"](*(x.float() for x in inputs))
    return (out - ref).abs().max().item()


# ---------------------------------------------------------------- correctness (any machine)

CHECKS = [  # (mode, causal, (B, T, S, H, D)): small odd shapes the interpreter can afford
    ("spatial", False, (1, 2, 37, 2, 24)),
    ("temporal", False, (1, 7, 5, 2, 40)),
    ("temporal", True, (1, 7, 5, 2, 40)),
    ("full", True, (1, 3, 13, 2, 24)),
    ("packed", False, (1, 1, 0, 2, 24)),
]


def _check_case(mode, causal, shape, dtype, device):
    """(inputs, Triton fn, reference fn, description) for one correctness check."""
    B, T, S, H, D = shape
    if mode == "packed":
        lens = [5, 17, 1, 33]
        cu = torch.tensor([0] + lens, device=device).cumsum(0).to(torch.int32)
        qkv = torch.randn(sum(lens), 3, H, D, device=device, dtype=dtype, requires_grad=True)
        return (qkv.unbind(1), lambda q, k, v: varlen_attention(q, k, v, cu, max(lens), backend="triton"),
                lambda q, k, v: varlen_attention_ref(q, k, v, cu), f"lens {lens}, H={H}, D={D}")
    qkv = torch.randn(B, T, S, 3, H, D, device=device, dtype=dtype, requires_grad=True)
    return (qkv.unbind(3), lambda q, k, v: spacetime_attention(q, k, v, mode, causal, backend="triton"),
            lambda q, k, v: spacetime_attention_ref(q, k, v, mode, causal), f"B={B} T={T} S={S} H={H} D={D}")


def correctness(dtypes, device):
    """Outputs and gradients of the Triton kernels vs the fp32 reference, against PyTorch's own error."""
    rows = []
    for mode, causal, shape in CHECKS:
        for dtype in dtypes:
            torch.manual_seed(0)
            inputs, kernel, ref, description = _check_case(mode, causal, shape, dtype, device)
            out = kernel(*inputs)
            d_out = torch.randn_like(out)
            got = (out, *torch.autograd.grad(out, inputs, d_out))
            pt = ref(*inputs)
            same = (pt, *torch.autograd.grad(pt, inputs, d_out))
            x32 = [x.detach().float().requires_grad_() for x in inputs]
            r = ref(*x32)
            exact = (r, *torch.autograd.grad(r, x32, d_out.float()))
            row = {"mode": mode + (" causal" if causal else ""), "shape": description,
                   "dtype": str(dtype).removeprefix("torch.")}
            ok = True
            for name, a, b, c in zip(("out", "dq", "dk", "dv"), got, same, exact):
                err, pt_err = ((x.float() - c).abs().max().item() for x in (a, b))
                row[f"{name} err"], row[f"{name} torch err"] = err, pt_err
                ok &= err <= 2 * pt_err + FLOOR[dtype]
            row["ok"] = "yes" if ok else "NO"
            rows.append(row)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    for name, default in (("B", 2), ("T", 16), ("S", 32 * 32), ("H", 16), ("D", 64)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    print(machine_header())
    gpu = torch.cuda.is_available()
    if not gpu:
        print(NO_GPU_NOTICE)
    checks = correctness([torch.float32, torch.float16] + ([torch.bfloat16] if gpu else []),
                         "cuda" if gpu else "cpu")
    print("\n## Correctness (" + ("compiled kernels" if gpu else "Triton interpreter") + ")\n")
    print(markdown_table(checks))
    write_csv(checks, args.out / "attention_correctness.csv")
    print(f"\nwritten to {args.out}/attention_correctness.csv")
    if not all(r["ok"] == "yes" for r in checks):
        raise SystemExit("attention kernels disagree with the reference beyond 2x PyTorch's own error")
    if not gpu:
        return
    dtype = DTYPES[args.dtype]
    print(f"\n## Timings: B={args.B} T={args.T} S={args.S} H={args.H} D={args.D} {args.dtype}, "
          f"inputs = views of a fused qkv\n")
    rows = benchmark(args, dtype)
    table = markdown_table(rows)
    print(table)
    (args.out).mkdir(parents=True, exist_ok=True)
    (args.out / "attention.md").write_text(
        f"{machine_header()}\n\nB={args.B} T={args.T} S={args.S} H={args.H} D={args.D} {args.dtype}\n\n"
        f"{table}\n\n## Correctness\n\n{markdown_table(checks)}\n")
    write_csv(rows, args.out / "attention.csv")
    for mode in MODES:
        value = "GB/s" if mode == "temporal" else "TFLOP/s"
        mode_rows = [dict(r, label=f"{r['pass']} {r['impl']}") for r in rows if r["mode"] == mode]
        bar_plot(mode_rows, "label", value, args.out / f"attention_{mode}.png",
                 title=f"{mode} attention, {value} (B={args.B} T={args.T} S={args.S} H={args.H} "
                       f"D={args.D} {args.dtype})")
    print(f"\nwritten to {args.out}/attention.md, .csv and attention_<mode>.png")

if __name__ == "__main__":
    main()
