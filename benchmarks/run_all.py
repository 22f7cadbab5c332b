"""Run every end-to-end benchmark in one process and print every table.

    python -m benchmarks.run_all [--smoke] [--threads 2] [--out benchmarks/results] [--only peers,...]

In order: bench_train, bench_sample, bench_long (long videos), bench_lora (LoRA against full fine-tuning), bench_peers, bench_utilisation (which times each training
step in turn with the matmul it is divided by), bench_scaling. Each writes its .md, .csv and .png
to --out; this script also writes <out>/summary.md with every table and the seconds each benchmark
took. Designed to finish in under 10 minutes on 2 CPU cores (the kernel microbenchmarks,
bench_attention / bench_conv3d / bench_conv2plus1d / bench_norms, are separate: without a GPU they
only check correctness).
"""
from __future__ import annotations

import importlib
import time
from pathlib import Path

from benchmarks.common import bench_args, machine_header, parse_args

BENCHMARKS = ("train", "sample", "long", "lora", "peers", "utilisation", "scaling")


def main(argv=None):
    p = bench_args(__doc__.splitlines()[0])
    p.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated subset")
    args = parse_args(p, argv)
    common = (["--smoke"] if args.smoke else []) + ["--out", str(args.out), "--heap", args.heap]
    if args.threads:
        common += ["--threads", str(args.threads)]
    print(machine_header())
    seconds, texts = {}, []
    start = time.perf_counter()
    for name in args.only.split(","):
        if name not in BENCHMARKS:
            raise SystemExit(f"--only: '{name}' is not one of {', '.join(BENCHMARKS)}")
        print(f"\n==== bench_{name} " + "=" * 60, flush=True)
        mod = importlib.import_module(f"benchmarks.bench_{name}")
        tic = time.perf_counter()
        mod.main(common)
        seconds[name] = time.perf_counter() - tic
        for md in sorted(Path(args.out).glob(f"{'scaling_' if name == 'scaling' else name}*.md")):
            texts.append(md.read_text())
    total = time.perf_counter() - start
    timing = "\n".join(f"| bench_{k} | {v:.0f} |" for k, v in seconds.items())
    summary = (f"# End-to-end benchmarks\n\n`python -m benchmarks.run_all{' ' + ' '.join(argv) if argv else ''}`"
               f"\n\n{machine_header()}\n\n| benchmark | seconds |\n|---|---|\n{timing}\n"
               f"| total | {total:.0f} |\n\n" + "\n".join(t.replace("\n# ", "\n## ").replace("# ", "## ", 1)
                                                 for t in texts))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(summary)
    print(f"\nall benchmarks: {total:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in seconds.items())})")
    print(f"wrote {out / 'summary.md'}")
    return seconds


if __name__ == "__main__":
    import sys
    main(sys.argv[1:])
