"""Every Triton launch the public kernel functions make compiles for sm_90 (H100), on CPU, in CI.

The interpreter tests next to this one check what the kernels compute; they cannot tell whether a
kernel compiles for a GPU at the tiles its launcher picks there, fits in shared memory, or spills
registers (DESIGN.md, "Kernels": the interpreter enforces none of it). tests/kernels/sm90_compile.py
records the launches the public functions make at GPU-realistic shapes with the GPU tile choice
(kernels.dispatch.recording), specialises each as Triton's JIT would on a GPU (integer arguments
equal to 1 become constants, multiples of 16 get the divisibility hint) and compiles it with
triton.compile for GPUTarget("cuda", 90, 32) and ptxas -v; no kernel runs. It runs in a
subprocess because conftest.py switches the interpreter on for this process. Each group is
compiled once per session; Triton's on-disk cache (TRITON_CACHE_DIR) makes a second session fast.

Checks per launch: it compiles; shared memory <= 227 KB (the H100's usable maximum per block); the
grid fits CUDA's limits; register spills within what the kernel's header states (SPILLS below, one
entry per header claim). The table of every specialisation is printed (pytest -s) and written to
$TMPDIR/sm90_compile_<group>.txt.
"""
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from sm90_compile import GROUPS, MAX_GRID, SMEM_PER_BLOCK, format_rows  # noqa: E402

SLOW = {"attention_spatial", "attention_temporal", "attention_other", "conv3d", "conv2plus1d"}  # minutes


def promised_spill(row):
    """Bytes of register spill stores per thread the kernel's header allows for this launch."""
    return SPILLS.get(row["kernel"], lambda r: 0)(row)


def _ieee_fp32(spill):
    """kernels/conv3d.py's header: no spill, but IEEE fp32 (allow_tf32 off) spills `spill` bytes."""
    return lambda r: spill if r["dtype"] == "fp32" and r["tiles"].get("PRECISION") == "ieee" else 0


# The headers' register-spill statements (sm_90, ptxas -v), one entry per kernel that may spill;
# every other kernel promises none.
SPILLS = {
    "_attn_fwd_kernel": lambda r: 4 if r["dtype"] == "fp32" else 0,   # kernels/attention.py
    "_conv3d_bwd_dx_kernel": _ieee_fp32(32),
}

_RESULTS = {}


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def compiled(group):
    """(rows, table) of one group, compiled once per session in a subprocess without the
    interpreter."""
    if group not in _RESULTS:
        with tempfile.TemporaryDirectory() as d:
            out = Path(d) / "rows.json"
            proc = subprocess.run([sys.executable, str(HERE / "sm90_compile.py"), group,
                                   "--json", str(out)], env=_env(), capture_output=True, text=True,
                                  timeout=1200)
            assert proc.returncode == 0, f"sm90_compile.py {group} failed:\n{proc.stderr[-4000:]}"
            rows = json.loads(out.read_text())
        table = format_rows(rows)
        Path(tempfile.gettempdir(), f"sm90_compile_{group}.txt").write_text(table + "\n")
        _RESULTS[group] = rows, table
    return _RESULTS[group]


def problems(rows):
    """One line per launch that breaks a check."""
    bad = []
    for r in rows:
        where = f"{r['kernel']} [{r['case']}, {r['dtype']}]"
        if not r["ok"]:
            bad.append(f"{where}: does not compile: {r['error'].strip().splitlines()[-1]}")
            continue
        if r["shared"] > SMEM_PER_BLOCK:
            bad.append(f"{where}: {r['shared']} bytes of shared memory > {SMEM_PER_BLOCK}")
        allowed = promised_spill(r)
        if r["spill_stores"] > allowed:
            bad.append(f"{where}: {r['spill_stores']} bytes of spill stores (header: "
                       f"{allowed or 'none'}), {r['regs']} registers, tiles {r['tiles']}, "
                       f"{r['num_warps']} warps")
        if any(g > m for g, m in zip(r["grid"], MAX_GRID)) or min(r["grid"]) < 1:
            bad.append(f"{where}: grid {r['grid']} outside CUDA's limits {MAX_GRID}")
    return sorted(set(bad))


@pytest.mark.parametrize("group", [pytest.param(g, marks=pytest.mark.slow) if g in SLOW else g
                                   for g in GROUPS])
def test_compiles_for_sm90(group):
    rows, table = compiled(group)
    print(f"\n{table}")
    assert rows, f"{group}: no launch recorded"
    bad = problems(rows)
    assert not bad, f"{len(bad)} launch(es) of {group} fail on sm_90:\n" + "\n".join(bad)


def test_every_kernel_is_launched_by_some_group():
    """Every @triton.jit *_kernel in kernels/*.py is among the recorded launches (a new kernel, or a
    launcher path no case reaches, fails here)."""
    defined = set()
    for path in (HERE.parents[1] / "kernels").glob("*.py"):
        defined |= set(re.findall(r"@triton\.jit\s*\ndef (\w+_kernel)\(", path.read_text()))
    proc = subprocess.run([sys.executable, str(HERE / "sm90_compile.py"), "--kernels"],
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    launched = set(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert defined and defined <= launched, f"never launched: {sorted(defined - launched)}"


def test_recording_records_launches_without_running_them():
    """kernels.dispatch.recording: the launchers pick the GPU tiles, record, and compute nothing."""
    import torch

    from kernels.dispatch import interpreting, recording, sm_count
    from kernels.layer_norm_modulate import layer_norm_modulate

    was = interpreting()
    x, mod = torch.randn(2, 5, 1152), torch.randn(2, 2 * 1152)
    with recording() as launches:
        assert not interpreting() and sm_count(None) == 132
        layer_norm_modulate(x, mod[:, :1152], mod[:, 1152:], backend="triton")
    assert interpreting() == was
    (launch,) = launches
    assert launch.kernel.__name__ == "_ln_mod_fwd_kernel" and launch.args[0] is x
    assert launch.kwargs["BLOCK_C"] == 2048 and launch.kwargs["num_warps"] == 8  # GPU tiles
