"""Stamps, tables and plots for benchmark results (JSON + markdown + PNG under benchmarks/results/)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional

import torch

from .harness import MachineLimits, Result


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def git_commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def versions() -> Dict[str, str]:
    import prefkern

    out = {"prefkern": prefkern.__version__, "torch": torch.__version__, "python": platform.python_version()}
    for name in ("triton", "liger_kernel", "cut_cross_entropy", "flashinfer"):
        try:
            module = __import__(name)
            out[name] = getattr(module, "__version__", "installed")
        except Exception:
            pass
    return out


def stamp(device: torch.device, limits: MachineLimits) -> Dict[str, object]:
    return {
        "device": device_name(device),
        "device_type": device.type,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
        "versions": versions(),
        "threads": torch.get_num_threads(),
        "limits": {"copy_GBps": round(limits.copy_gbps, 2), "gemm_TFLOPs": round(limits.gemm_tflops, 4),
                   "gemm_dtype": limits.gemm_dtype},
    }


def _fmt(x: Optional[float], spec: str) -> str:
    return "-" if x is None else format(x, spec)


def markdown_table(results: List[Result]) -> str:
    graphs = any(r.device_ms is not None for r in results)
    head = "| method | pass | size | dtype | median ms | " + ("device ms | " if graphs else "") + (
        "peak extra MB | working MB | achieved | % of limit | speedup vs base | "
        + ("device speedup | " if graphs else "") + "memory vs base |")
    cols = 13 if graphs else 11
    lines = [head, "|" + "---|" * cols]
    for r in results:
        if r.error:
            lines.append(f"| {r.method} | {r.pass_name} | {r.size} | {r.dtype} | failed: {r.error} |" + "  |" * (cols - 5))
            continue
        achieved = "-" if r.achieved is None else f"{r.achieved:.3g} {r.achieved_unit}"
        dev = f"| {_fmt(r.device_ms, '.3f')} " if graphs else ""
        dev_speed = f"| {_fmt(r.device_speedup_vs_baseline, '.2f')}x " if graphs else ""
        lines.append(
            f"| {r.method} | {r.pass_name} | {r.size} | {r.dtype} | {_fmt(r.median_ms, '.2f')} {dev}"
            f"| {_fmt(r.peak_extra_mb, '.1f')} | {_fmt(r.working_mb, '.1f')} | {achieved} | {_fmt(None if r.fraction_of_limit is None else 100 * r.fraction_of_limit, '.1f')} "
            f"| {_fmt(r.speedup_vs_baseline, '.2f')}x {dev_speed}| {_fmt(r.memory_vs_baseline, '.2f')}x |"
        )
    return "\n".join(lines)


def header(suite: str, meta: Dict[str, object], notes: List[str]) -> str:
    lim = meta["limits"]
    vers = ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
    text = [
        f"# Benchmark `{suite}` on {meta['device']}",
        "",
        f"{meta['date']}, commit `{meta['commit']}`, {vers}, {meta['threads']} torch threads.",
        f"Limits measured in the same run: copy {lim['copy_GBps']} GB/s (read + write), "
        f"GEMM {lim['gemm_TFLOPs']} TFLOP/s ({lim['gemm_dtype']}).",
        "Achieved rates count each kernel's algorithmic bytes or FLOPs (the same for every method), so "
        "'% of limit' compares methods on the work that must be done; ratios are against the baseline "
        "method at the same pass, size and dtype (speedup > 1 is faster, memory < 1 is leaner).",
        "On CUDA, 'median ms' is one call as a user makes it (Python, launches and kernels, CUDA events "
        "around it) and 'device ms' the same run captured in a CUDA graph and replayed (the kernels alone; "
        "'-' where the run cannot be captured, e.g. a host sync inside it, or takes over 20 ms, where launch "
        "overhead is noise); achieved rates and '% of limit' use device ms where there is one.",
        "Peak extra memory is the high-water mark of one run above what existed before it; working MB "
        "subtracts the gradients the run hands back (every method must produce them), and the memory "
        "ratio compares working MB.",
    ]
    text += [f"- {n}" for n in notes]
    return "\n".join(text) + "\n\n"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:40]


def write_outputs(suite: str, device: torch.device, meta: Dict[str, object], results: List[Result],
                  notes: List[str], out_dir: Path, plot: bool = True) -> List[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    base = out_dir / f"{suite}_{device.type}"
    written = []
    payload = {"suite": suite, **meta, "notes": notes, "results": [asdict(r) for r in results]}
    base.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    written.append(base.with_suffix(".json"))
    base.with_suffix(".md").write_text(header(suite, meta, notes) + markdown_table(results) + "\n")
    written.append(base.with_suffix(".md"))
    if plot:
        png = plot_results(suite, meta, results, base.with_suffix(".png"))
        if png:
            written.append(png)
    return written


def plot_results(suite: str, meta: Dict[str, object], results: List[Result], path: Path) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  (matplotlib is not installed: no PNG plot; pip install matplotlib)")
        return None
    rows = [r for r in results if r.median_ms is not None]
    passes = sorted({r.pass_name for r in rows}, key=["fw", "bw", "fw-bw"].index)
    groups = list(dict.fromkeys((r.size, r.dtype) for r in rows))
    methods = sorted({r.method for r in rows})
    fig, axes = plt.subplots(2, len(passes), figsize=(5 * len(passes), 7), squeeze=False)
    width = 0.8 / max(1, len(methods))
    for col, pass_name in enumerate(passes):
        for row_i, (metric, label) in enumerate((("median_ms", "median time (ms)"), ("working_mb", "working memory (MB)"))):
            ax = axes[row_i][col]
            for m_i, method in enumerate(methods):
                ys = []
                for g in groups:
                    match = [r for r in rows if r.method == method and r.pass_name == pass_name and (r.size, r.dtype) == g]
                    # log axes: a row that needs (almost) no memory is drawn at the 0.1 MB floor
                    ys.append(max(0.1, getattr(match[0], metric) or 0) if match else 0)
                ax.bar([i + m_i * width for i in range(len(groups))], ys, width, label=method)
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))])
            ax.set_xticklabels([f"{s}\n{d}".replace(" ", "\n") for s, d in groups], fontsize=6)
            ax.set_title(f"{pass_name}: {label}", fontsize=9)
            ax.set_yscale("log")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"prefkern {suite} on {meta['device']} ({meta['date']}, {meta['commit']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# the pass whose rows carry a suite's targets (default: fw-bw where the suite has one, else fw)
SUMMARY_PASSES = {"ensemble": "fw"}


def summary(out_dir: Path, suites: List[str], device: str = "auto") -> str:
    """One line per row of the pass that carries each suite's targets, from the saved JSON results."""
    lines = ["| suite | device | method | pass | size | dtype | ms | device ms | working MB | % of limit | speedup |",
             "|" + "---|" * 11]
    for suite in suites:
        for path in sorted(out_dir.glob(f"{suite}_*.json")):
            data = json.loads(path.read_text())
            if device != "auto" and data.get("device_type") != device:
                continue
            rows = data["results"]
            wanted = SUMMARY_PASSES.get(suite) or ("fw-bw" if any(r["pass_name"] == "fw-bw" for r in rows) else "fw")
            for r in rows:
                if r["pass_name"] != wanted or r["median_ms"] is None:
                    continue
                frac = "-" if r["fraction_of_limit"] is None else f"{100 * r['fraction_of_limit']:.1f}"
                speed = "-" if r["speedup_vs_baseline"] is None else f"{r['speedup_vs_baseline']:.2f}x"
                lines.append(f"| {suite} | {data['device']} | {r['method']} | {wanted} | {r['size']} | {r['dtype']} | "
                             f"{r['median_ms']:.2f} | {_fmt(r.get('device_ms'), '.3f')} | "
                             f"{_fmt(r.get('working_mb'), '.1f')} | {frac} | {speed} |")
    return "\n".join(lines)
