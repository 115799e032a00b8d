"""``python -m benchmarks [SUITE ...]``: run suites, print progress and a table, write results."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

import torch

from . import report
from .harness import attach_ratios, measure, measure_limits, reexec_with_fixed_mmap_threshold
from .suites import SUITES

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RESULTS = Path(__file__).resolve().parent / "results"


def parse(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("suites", nargs="*", help=f"suites to run (default: all of {', '.join(SUITES)})")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default=None, help="comma-separated dtypes (default: each suite's own: float32 (+ bfloat16 for logprobs) on CPU, bfloat16 on GPU)")
    p.add_argument("--quick", action="store_true", help="one small size per suite (smoke run)")
    p.add_argument("--reps", type=int, default=None,
                   help="timed repetitions per row, median reported (default: the suite's REPS, else 5)")
    p.add_argument("--out", type=Path, default=RESULTS, help="where JSON, markdown and PNG go")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--list", action="store_true", help="list the suites and exit")
    p.add_argument("--summary", action="store_true",
                   help="print a short table of the results already in --out (fw-bw rows) and exit")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.list:
        for name, module in SUITES.items():
            print(f"{name}: {(module.__doc__ or '').strip().splitlines()[0]}")
        return 0
    if args.summary:
        print(report.summary(args.out, args.suites or list(SUITES), args.device))
        return 0
    unknown = [s for s in args.suites if s not in SUITES]
    if unknown:
        print(f"unknown suite(s) {unknown}; choose from {list(SUITES)}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is visible", file=sys.stderr)
        return 2
    if device.type == "cpu":
        reexec_with_fixed_mmap_threshold("benchmarks", argv)
    try:
        dtypes = [DTYPES[d.strip()] for d in args.dtype.split(",")] if args.dtype else None
    except KeyError as exc:
        print(f"--dtype: unknown dtype {exc}; choose from {list(DTYPES)}", file=sys.stderr)
        return 2

    print(f"device: {report.device_name(device)}; measuring copy bandwidth and GEMM rate ...", flush=True)
    limits = measure_limits(device)
    meta = report.stamp(device, limits)
    print(f"limits: copy {limits.copy_gbps:.1f} GB/s, GEMM {limits.gemm_tflops:.3f} TFLOP/s ({limits.gemm_dtype})", flush=True)
    for suite in args.suites or list(SUITES):
        module = SUITES[suite]
        cases, notes = module.cases(device, dtypes or module.DEFAULT_DTYPES[device.type], args.quick)
        results = []
        for i, case in enumerate(cases, 1):
            r = measure(case, device, limits, args.reps or getattr(module, "REPS", {}).get(device.type, 5))
            results.append(r)
            shown = r.error or f"{r.median_ms:9.2f} ms  {r.peak_extra_mb if r.peak_extra_mb is not None else float('nan'):9.1f} MB"
            print(f"[{suite} {i:3d}/{len(cases)}] {case.method:<16} {case.pass_name:<6} {case.size:<20} {case.dtype:<9} {shown}", flush=True)
        attach_ratios(results)
        paths = report.write_outputs(suite, device, meta, results, notes, args.out, plot=not args.no_plot)
        print()
        print(report.header(suite, meta, notes) + report.markdown_table(results))
        print("\nwrote " + ", ".join(str(p) for p in paths))
    return 0
