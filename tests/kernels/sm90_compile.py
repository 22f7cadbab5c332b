"""Compile every Triton launch the public kernel functions make, for sm_90 (H100), without a GPU.

The public functions run on CPU tensors (uninitialised: nothing is computed) under
kernels.dispatch.recording(), so each launcher picks the tiles, grid and arguments it would pick on
an H100 (132 SMs) and records its launches instead of running them. Each recorded launch is then
specialised exactly as Triton's JIT would specialise it on a GPU (its own binder: integer arguments
equal to 1 become constants, arguments and pointers divisible by 16 get the divisibility attribute,
None becomes a constant) and compiled with triton.compile for GPUTarget("cuda", 90, 32). The PTX is
run through the ptxas Triton ships, with Triton's flags and -v, for registers and spills; shared
memory comes from the compiled kernel's metadata.

Used by tests/kernels/test_gpu_compile.py in a subprocess (the kernels must be JITFunctions, so
TRITON_INTERPRET must be unset). By hand:
    python tests/kernels/sm90_compile.py [GROUP ...] [--json OUT] [--jobs N]
prints one row per distinct compiled specialisation (kernel, case, dtype, tiles, registers,
spills, shared bytes). Groups: see GROUPS. Compiled kernels live in Triton's on-disk cache
(TRITON_CACHE_DIR), the ptxas -v measurements beside it (sm90_ptxas_v/), so a second run is fast.
"""
import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from kernels.dispatch import recording  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
SMEM_PER_BLOCK = 227 * 1024          # H100: 228 KB of shared memory per SM, 227 KB usable per block
MAX_GRID = (2**31 - 1, 65535, 65535)  # CUDA grid limits (x, y, z)
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
ONE_THREAD = dict(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
DTYPES = (F16, BF16, F32)


def _name(dtype):
    return {F16: "fp16", BF16: "bf16", F32: "fp32"}[dtype]


def _leaf(*shape, dtype, **kw):
    return torch.empty(*shape, dtype=dtype, **kw).requires_grad_()


def _backward(out):
    out.backward(torch.empty_like(out))


# ----------------------------------------------------------------------------------------------
# Cases: each runs public functions (forward and backward) at GPU-realistic shapes
# ----------------------------------------------------------------------------------------------

def _attention_cases(modes, dims, dtypes, layout="dit", T=16, S=1024, causal=False, heads=2):
    from kernels.attention import spacetime_attention

    def run(mode, D, dtype):
        if layout == "dit":    # DiT: views of the fused qkv projection (B, T, S, 3, h, d)
            qkv = _leaf(1, T, S, 3, heads, D, dtype=dtype)
            q, k, v = qkv.unbind(3)
        else:                  # VAE / U-Net: the 1x1x1 conv's (B, 3*h*d, T, H, W) output
            qkv = _leaf(1, 3 * heads * D, T, S, dtype=dtype)
            q, k, v = qkv.view(1, 3, heads, D, T, S).permute(1, 0, 4, 5, 2, 3)
        _backward(spacetime_attention(q, k, v, mode=mode, causal=causal, backend="triton"))

    tag = f"{layout}{' causal' if causal else ''} T={T} S={S}"
    return [(f"{mode} {tag} D={D}", dtype, (lambda m=mode, d=D, t=dtype: run(m, d, t)))
            for mode in modes for D in dims for dtype in dtypes]


def _cross_cases(dims, dtypes, N=16 * 1024, L=78, layout="dit", heads=2):
    from kernels.attention import cross_attention

    def run(D, dtype):
        if layout == "dit":    # q (B, N, h, d); k, v views of one (B, L, 2, h, d) projection
            q = _leaf(2, N, heads, D, dtype=dtype)
        else:                  # U-Net: q from the conv's (B, h*d, T*H*W) output
            q = _leaf(2, heads * D, N, dtype=dtype).view(2, heads, D, N).permute(0, 3, 1, 2)
        kv = _leaf(2, L, 2, heads, D, dtype=dtype)
        k, v = kv.unbind(2)
        mask = torch.ones(2, L, dtype=torch.bool)
        _backward(cross_attention(q, k, v, key_mask=mask, backend="triton"))

    return [(f"cross {layout} N={N} L={L} D={D}", dtype, (lambda d=D, t=dtype: run(d, t)))
            for D in dims for dtype in dtypes]


def _varlen_cases(dims, dtypes, lengths=(1024, 700, 300), heads=2):
    from kernels.attention import varlen_attention

    def run(D, dtype):
        total = sum(lengths)
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        q, k, v = (_leaf(total, heads, D, dtype=dtype) for _ in range(3))
        _backward(varlen_attention(q, k, v, cu, max(lengths), backend="triton"))

    return [(f"varlen {'+'.join(map(str, lengths))} D={D}", dtype,
             (lambda d=D, t=dtype: run(d, t))) for D in dims for dtype in dtypes]


def _conv3d_cases(dtypes, cin=128, cout=128, size=(16, 32, 32), k=3, stride=1, causal=True,
                  channels_last=False, tag=""):
    from kernels.conv3d import conv3d

    def run(dtype):
        x = torch.empty(1, cin, *size, dtype=dtype)
        if channels_last:
            x = x.to(memory_format=torch.channels_last_3d)
        x.requires_grad_()
        w, b = _leaf(cout, cin, k, k, k, dtype=dtype), _leaf(cout, dtype=dtype)
        _backward(conv3d(x, w, b, stride=stride, padding=k // 2, causal=causal, backend="triton"))

    name = f"conv3d {cin}->{cout} {k}x{k}x{k} stride {stride} {'x'.join(map(str, size))}{tag}"
    return [(name, dtype, (lambda t=dtype: run(t))) for dtype in dtypes]


def _conv2plus1d_cases(dtypes, cin=64, cmid=64, cout=64, size=(16, 64, 64), causal=False):
    from kernels.conv2plus1d import conv2plus1d

    def run(dtype):
        x = _leaf(1, cin, *size, dtype=dtype)
        ws, bs = _leaf(cmid, cin, 1, 3, 3, dtype=dtype), _leaf(cmid, dtype=dtype)
        wt, bt = _leaf(cout, cmid, 3, 1, 1, dtype=dtype), _leaf(cout, dtype=dtype)
        _backward(conv2plus1d(x, ws, bs, wt, bt, causal=causal, backend="triton"))

    name = f"conv2plus1d {cin}->{cmid}->{cout} {'x'.join(map(str, size))}{' causal' if causal else ''}"
    return [(name, dtype, (lambda t=dtype: run(t))) for dtype in dtypes]


def _group_norm_cases(dtypes, shape, groups, per_frame=False, affine=True, silu=True,
                      channels_last=False):
    from kernels.group_norm_silu import group_norm_silu

    def run(dtype):
        x = torch.empty(*shape, dtype=dtype)
        if channels_last:
            x = x.to(memory_format=torch.channels_last_3d)
        x.requires_grad_()
        C = shape[1]
        w = _leaf(C, dtype=F32) if affine else None
        b = _leaf(C, dtype=F32) if affine else None
        _backward(group_norm_silu(x, groups, w, b, silu=silu, per_frame=per_frame,
                                  backend="triton"))

    name = (f"group_norm {'x'.join(map(str, shape))} G={groups}{' per_frame' if per_frame else ''}"
            f"{'' if affine else ' no affine'}{'' if silu else ' no silu'}"
            f"{' channels_last' if channels_last else ''}")
    return [(name, dtype, (lambda t=dtype: run(t))) for dtype in dtypes]


def _layer_norm_cases(dtypes, B, N, C):
    from kernels.layer_norm_modulate import layer_norm_modulate

    def run(dtype):
        x = _leaf(B, N, C, dtype=dtype)
        mod = _leaf(B, 6 * C, dtype=dtype)       # shift, scale: chunks of one adaLN projection
        shift, scale = mod[:, :C], mod[:, C:2 * C]
        _backward(layer_norm_modulate(x, shift, scale, backend="triton"))

    return [(f"layer_norm_modulate {B}x{N}x{C}", dtype, (lambda t=dtype: run(t)))
            for dtype in dtypes]


def _tf32(cases):
    """The same cases with torch.backends.cuda.matmul.allow_tf32 set (fp32 attention on tf32)."""
    def wrap(fn):
        def run():
            old = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = True
            try:
                fn()
            finally:
                torch.backends.cuda.matmul.allow_tf32 = old
        return run
    return [(f"{name} allow_tf32", dtype, wrap(fn)) for name, dtype, fn in cases]


def _ieee_convs(cases):
    """The same cases with torch.backends.cudnn.allow_tf32 off (fp32 convs in IEEE fp32)."""
    def wrap(fn):
        def run():
            old = torch.backends.cudnn.allow_tf32
            torch.backends.cudnn.allow_tf32 = False
            try:
                fn()
            finally:
                torch.backends.cudnn.allow_tf32 = old
        return run
    return [(f"{name} no tf32", dtype, wrap(fn)) for name, dtype, fn in cases]


def _groups():
    """group -> [(case, dtype, fn)]. The head dims 64 / 72 / 128 in all three dtypes where the
    tiles change with them (spatial and temporal self-attention: BLOCK_D 64 or 128, 4 or 8 warps,
    fp32 halves the tiles); the other modes at the dims and dtypes that give their distinct
    specialisations (flags, layouts, lengths of 1) without recompiling the same tiles."""
    return {
        "attention_spatial": _attention_cases(["spatial"], (64, 72, 128), DTYPES),
        "attention_temporal": _attention_cases(["temporal"], (64, 72, 128), DTYPES),
        "attention_other": (
            _attention_cases(["full"], (64,), (F16, BF16), T=16, S=256)
            + _attention_cases(["full"], (128,), (F32,), T=16, S=256)
            + _attention_cases(["full", "temporal"], (64,), (F16,), T=16, S=256, causal=True)
            + _attention_cases(["temporal"], (64,), (F16,), T=1, S=256, causal=True)       # T = 1
            + _attention_cases(["spatial"], (128,), (F16, F32), layout="conv", T=4, S=1024,
                               heads=1)
            + _attention_cases(["temporal"], (64,), (F16,), layout="conv", T=16, S=1024)
            + _attention_cases(["spatial"], (64,), (F16,), T=16, S=1)                      # S = 1
            + _tf32(_attention_cases(["spatial"], (128,), (F32,)))
            + _cross_cases((64,), (F16, BF16)) + _cross_cases((128,), (F16, F32))
            + _cross_cases((64,), (F16,), layout="conv")
            + _cross_cases((64,), (F16,), N=1)                                             # N = 1
            + _varlen_cases((64,), (F16, BF16)) + _varlen_cases((128,), (F32,))
        ),
        "conv3d": (
            _conv3d_cases(DTYPES)
            + _conv3d_cases((F16,), causal=False, channels_last=True, tag=" channels_last")
            + _conv3d_cases((F16,), stride=2, size=(17, 64, 64))
            + _conv3d_cases((F16, F32), cin=3, cout=128, size=(17, 128, 128))
            + _conv3d_cases((F16,), cin=128, cout=3, size=(17, 128, 128))
            + _conv3d_cases((F16, F32), k=1, size=(16, 32, 32))
            + _conv3d_cases((F16,), cin=512, cout=512, size=(5, 16, 16))
            + _ieee_convs(_conv3d_cases((F32,)))
        ),
        "conv2plus1d": (
            _conv2plus1d_cases(DTYPES)
            + _conv2plus1d_cases((F16,), cin=32, cmid=64, cout=128, causal=True)
            + _conv2plus1d_cases((F16, F32), cin=128, cmid=128, cout=128, size=(16, 32, 32))
        ),
        "norms": (
            _group_norm_cases(DTYPES, (2, 128, 16, 32, 32), 32)
            + _group_norm_cases(DTYPES, (1, 512, 16, 64, 64), 32, per_frame=True)
            + _group_norm_cases((F16,), (1, 8192, 4, 8, 8), 32)
            + _group_norm_cases((F16,), (2, 128, 16, 32, 32), 32, channels_last=True)
            + _group_norm_cases((F16, F32), (2, 64, 1, 1, 1), 64)                  # CG = 1, S = 1
            + _group_norm_cases((F32,), (2, 32, 1, 4, 4), 32, per_frame=True)      # T = 1, CG = 1
            + _group_norm_cases((F16,), (2, 128, 16, 32, 32), 1, affine=False, silu=False)
            + _group_norm_cases((F32,), (4, 128), 32)                              # (B, C): S = 1
            + [c for C in (128, 1152, 4096, 8192) for c in _layer_norm_cases(DTYPES, 2, 4096, C)]
            + _layer_norm_cases((F16, F32), 2, 1, 1152)                            # one token
            + _layer_norm_cases((F32,), 1, 4096, 72)
        ),
    }


GROUPS = tuple(_groups())


# ----------------------------------------------------------------------------------------------
# Specialise, compile, measure
# ----------------------------------------------------------------------------------------------

def specialise(launch, backend):
    """(signature, constexprs, attrs, options) Triton's JIT would build for this launch on a GPU."""
    kernel = launch.kernel
    kwargs = dict(launch.kwargs, debug=False)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, spec, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, options)
    return signature, constexprs, attrs, options.__dict__


def _ptxas_v(ptx):
    """(registers, spill store bytes, spill load bytes, stack bytes) from ptxas -v with Triton's
    flags (backends/nvidia/compiler.py, make_cubin)."""
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        log = subprocess.run([str(PTXAS), "-lineinfo", "-v", "--regAllocOptLevel=2",
                              "--gpu-name=sm_90a", str(src), "-o", str(Path(d) / "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spill = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                      log)
    stack, stores, loads = (int(g) for g in spill.groups()) if spill else (0, 0, 0)
    return regs, stores, loads, stack


def _compile(job):
    """Compile one specialisation -> measurements (in a worker process)."""
    module, name, signature, constexprs, attrs, options = job
    import importlib
    kernel = getattr(importlib.import_module(module), name)
    t0 = time.time()
    try:
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=TARGET,
                                  options=options)
        # ptxas -v once per compiled kernel: its measurements sit beside Triton's on-disk cache
        memo = Path(triton.knobs.cache.dir) / "sm90_ptxas_v" / f"{compiled.hash}.json"
        if memo.exists():
            regs, stores, loads, stack = json.loads(memo.read_text())
        else:
            regs, stores, loads, stack = _ptxas_v(compiled.asm["ptx"])
            memo.parent.mkdir(parents=True, exist_ok=True)
            memo.write_text(json.dumps([regs, stores, loads, stack]))
        return dict(ok=True, shared=compiled.metadata.shared, regs=regs, spill_stores=stores,
                    spill_loads=loads, stack=stack, seconds=round(time.time() - t0, 1))
    except Exception as e:  # noqa: BLE001  (reported per launch; the test fails on it)
        text = f"{type(e).__name__}: {e}"
        return dict(ok=False, error=text[-1500:], seconds=round(time.time() - t0, 1))


_SHOWN = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_C", "BLOCK_S", "BLOCK_D", "BLOCK_N", "POS",
          "PRECISION", "CAUSAL", "HAS_MASK", "VARLEN", "SPLIT")


def record(groups):
    """[(group, case, dtype, Launch)] for the named groups."""
    table = _groups()
    out = []
    for group in groups:
        for case, dtype, fn in table[group]:
            with recording() as launches:
                fn()
            out.extend((group, case, _name(dtype), launch) for launch in launches)
    return out


def run(groups, jobs=2):
    """One row per (case, launch) with its specialisation's measurements; each distinct
    specialisation is compiled once."""
    backend = make_backend(TARGET)
    rows, todo = [], {}
    for group, case, dtype, launch in record(groups):
        kernel = launch.kernel
        signature, constexprs, attrs, options = specialise(launch, backend)
        key = hashlib.sha256(repr((kernel.fn.__module__, kernel.__name__, sorted(signature.items()),
                                   sorted(constexprs.items()), sorted(attrs.items()),
                                   sorted(options.items()))).encode()).hexdigest()[:16]
        todo.setdefault(key, (kernel.fn.__module__, kernel.__name__, signature, constexprs, attrs,
                              options))
        names = kernel.arg_names
        consts = {names[p[0]]: v for p, v in constexprs.items() if len(p) == 1}
        tiles = {k: consts[k] for k in _SHOWN if k in consts}
        rows.append(dict(group=group, case=case, dtype=dtype, kernel=kernel.__name__, key=key,
                         grid=list(launch.grid), tiles=tiles, num_warps=options["num_warps"],
                         num_stages=options["num_stages"],
                         ones=sorted(k for k, v in consts.items() if v == 1 and k not in tiles)))
    keys = list(todo)
    with ProcessPoolExecutor(max_workers=max(1, jobs)) as pool:
        results = dict(zip(keys, pool.map(_compile, [todo[k] for k in keys])))
    for row in rows:
        row.update(results[row["key"]])
    return rows


def format_rows(rows):
    """A plain-text table, one line per distinct (case, kernel) specialisation."""
    lines = [f"{'kernel':<22} {'case':<52} {'dtype':<5} {'tiles':<34} {'w':>2} {'regs':>4} "
             f"{'spill':>6} {'shared':>7}"]
    seen = set()
    for r in rows:
        ident = (r["case"], r["dtype"], r["key"])
        if ident in seen:
            continue
        seen.add(ident)
        tiles = " ".join(f"{k.replace('BLOCK_', '')}{v}" for k, v in r["tiles"].items()
                         if k.startswith("BLOCK_") or k == "POS")
        if r["ok"]:
            tail = f"{r['regs']:>4} {r['spill_stores']:>6} {r['shared']:>7}"
        else:
            tail = "FAILED: " + r["error"].strip().splitlines()[-1][:120]
        lines.append(f"{r['kernel']:<22} {r['case'][:52]:<52} {r['dtype']:<5} {tiles[:34]:<34} "
                     f"{r['num_warps']:>2} {tail}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("groups", nargs="*", default=list(GROUPS), help=", ".join(GROUPS))
    p.add_argument("--json", help="write the rows as JSON here")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--kernels", action="store_true",
                   help="only record: print the names of the kernels the groups launch, as JSON")
    args = p.parse_args(argv)
    unknown = [g for g in args.groups if g not in GROUPS]
    if unknown:
        p.error(f"unknown group(s) {unknown}; choose from {', '.join(GROUPS)}")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        p.error("unset TRITON_INTERPRET: the kernels must be compiled, not interpreted")
    torch.set_num_threads(1)
    if args.kernels:
        print(json.dumps(sorted({launch.kernel.__name__ for *_, launch in record(args.groups)})))
        return
    t0 = time.time()
    rows = run(args.groups, args.jobs)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print(format_rows(rows))
    print(f"{len({r['key'] for r in rows})} specialisations compiled in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
