#!/usr/bin/env bash
# The GPU check: on a machine with one CUDA GPU, in under 8 minutes in all, every part under its
# own timeout, tables and logs in benchmarks/results/gpu/ (GPU_CHECK_OUT to change):
#   tests    the GPU-marked tests (pytest -m gpu): compiled kernels against the references,
#            bf16 included, and the models on the GPU
#   kernels  the kernel microbenchmarks: bench_attention, bench_conv3d, bench_conv2plus1d,
#            bench_norms (their default sizes, bf16)
#   e2e      the end-to-end benchmarks, one run_all part at a time (train, sample, peers,
#            utilisation, scaling), at --smoke size by default (GPU_CHECK_E2E_ARGS="" for their
#            full sizes, which do not fit the 8 minutes)
# Usage: benchmarks/gpu_check.sh [tests|kernels|e2e ...]   (no argument: all three, in order)
# Without a GPU it prints a one-line notice and exits 0. Exit status otherwise: 0 when every step
# passed, 1 when one failed or ran out of time (the others still run). $OUT/gpu_check.md lists
# every step with its exit status and seconds; $OUT/<step>.txt holds its output.
set -u
cd "$(dirname "$0")/.."

PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
OUT=${GPU_CHECK_OUT:-benchmarks/results/gpu}
E2E_ARGS=${GPU_CHECK_E2E_ARGS-"--smoke"}
BUDGET=470                                  # seconds for everything asked (8 minutes, less slack)

usage() { echo "usage: $0 [tests|kernels|e2e ...]" >&2; exit 2; }
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(tests kernels e2e)
for p in "${parts[@]}"; do
    case "$p" in tests|kernels|e2e) ;; -h|--help) usage ;; *) echo "unknown part '$p'" >&2; usage ;; esac
done

# GPU_CHECK_FORCE=1 runs the steps without a GPU (to try this script's plumbing on a CPU machine)
if [ "${GPU_CHECK_FORCE:-0}" != 1 ] &&
   ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: no CUDA GPU on this machine (torch.cuda.is_available() is False): nothing run"
    exit 0
fi

mkdir -p "$OUT"
START=$SECONDS
FAILED=0
REPORT="$OUT/gpu_check.md"
{
    echo "# GPU check: $(date -u '+%Y-%m-%d %H:%M UTC'), parts: ${parts[*]}"
    echo
    "$PY" -c 'import torch, triton
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU (GPU_CHECK_FORCE)"
print(gpu, "| torch", torch.__version__, "| triton", triton.__version__)'
    echo
    echo "| step | status | seconds | limit |"
    echo "|---|---|---|---|"
} > "$REPORT"

# step NAME LIMIT CMD...: run CMD under min(LIMIT, what is left of the budget), output to $OUT/NAME.txt
step() {
    local name=$1 limit=$2; shift 2
    local left=$((BUDGET - (SECONDS - START)))
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -lt 5 ]; then
        echo "| $name | skipped (budget spent) | 0 | 0 |" >> "$REPORT"; FAILED=1; return
    fi
    echo "==== $name (limit ${limit} s): $*"
    local t0=$SECONDS rc
    timeout -k 5 "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
    rc=${PIPESTATUS[0]}
    local status="ok"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status="TIMEOUT"; FAILED=1
    elif [ "$rc" -ne 0 ]; then status="FAILED (exit $rc)"; FAILED=1; fi
    echo "| $name | $status | $((SECONDS - t0)) | $limit |" >> "$REPORT"
    echo "==== $name: $status in $((SECONDS - t0)) s"
}

# the kernel benchmarks other than bench_attention write to benchmarks/results/: copy their tables
collect() { for f in benchmarks/results/"$1".*; do [ -e "$f" ] && cp "$f" "$OUT/"; done; return 0; }

for part in "${parts[@]}"; do
    case "$part" in
    tests)
        step tests 150 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests ;;
    kernels)
        step bench_attention 90 "$PY" -m benchmarks.bench_attention --out "$OUT"
        step bench_conv3d 45 "$PY" -m benchmarks.bench_conv3d
        collect conv3d
        step bench_conv2plus1d 35 "$PY" -m benchmarks.bench_conv2plus1d
        collect conv2plus1d
        step bench_norms 35 "$PY" -m benchmarks.bench_norms
        collect norms ;;
    e2e)
        for b in train sample peers utilisation scaling; do
            # shellcheck disable=SC2086  # E2E_ARGS: several words on purpose
            step "e2e_$b" 22 "$PY" -m benchmarks.run_all --only "$b" --out "$OUT" $E2E_ARGS
        done ;;
    esac
done

echo
echo "| total | $([ $FAILED -eq 0 ] && echo ok || echo FAILED) | $((SECONDS - START)) | $BUDGET |" >> "$REPORT"
cat "$REPORT"
exit $FAILED
