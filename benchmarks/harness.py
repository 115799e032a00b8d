"""Timing, peak-memory and machine-limit measurement shared by every suite."""

from __future__ import annotations

import gc
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch


@dataclass
class Case:
    """One measured thing: ``run(state)`` is timed, ``setup()`` makes fresh inputs (not timed)."""

    suite: str
    method: str
    pass_name: str  # "fw", "bw" or "fw-bw"
    size: str
    dtype: str
    setup: Callable[[], object]
    run: Callable[[object], object]
    flops: float = 0.0  # algorithmic FLOPs of one run (FLOP-bound kernels)
    bytes: float = 0.0  # algorithmic bytes of one run (memory-bound kernels)
    baseline: str = "torch"  # method the ratios are taken against
    result_bytes: float = 0.0  # gradients the run hands back (every method must hold them)


@dataclass
class Result:
    suite: str
    method: str
    pass_name: str
    size: str
    dtype: str
    median_ms: Optional[float]
    peak_extra_mb: Optional[float]
    working_mb: Optional[float]  # peak extra memory minus the gradients handed back
    achieved: Optional[float]  # GB/s or TFLOP/s
    achieved_unit: str
    fraction_of_limit: Optional[float]
    speedup_vs_baseline: Optional[float] = None
    memory_vs_baseline: Optional[float] = None
    baseline: str = "torch"
    error: Optional[str] = None
    device_ms: Optional[float] = None  # CUDA: one run replayed as a CUDA graph (no host overhead)
    device_speedup_vs_baseline: Optional[float] = None
    extra: Dict[str, object] = field(default_factory=dict)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time_ms(case: Case, device: torch.device, reps: int, warmup: int = 1) -> float:
    times: List[float] = []
    for i in range(warmup + reps):
        state = case.setup()
        synchronize(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            case.run(state)
            end.record()
            torch.cuda.synchronize(device)
            elapsed = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            case.run(state)
            elapsed = (time.perf_counter() - t0) * 1e3
        del state
        if i >= warmup:
            times.append(elapsed)
    return statistics.median(times)


GRAPH_BELOW_MS = 20.0


def graph_time_ms(case: Case, device: torch.device, reps: int) -> Optional[float]:
    """Median device time of one run captured in a CUDA graph and replayed: the kernels alone, without the
    Python and launch overhead that ``median_time_ms`` includes. None off CUDA, or when the run cannot be
    captured (a host synchronisation or a CPU-side decision inside it)."""
    if device.type != "cuda":
        return None
    graph = None
    try:
        state = case.setup()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graph asks
            case.run(state)
        torch.cuda.current_stream(device).wait_stream(side)
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            case.run(state)
        graph.replay()
        torch.cuda.synchronize(device)
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        return statistics.median(times)
    except Exception:
        return None
    finally:
        del graph
        try:
            torch.cuda.synchronize(device)
        except Exception:
            pass


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def cpu_peak_tracking_available() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _proc_status_kib("VmHWM")
        return True
    except OSError:
        return False


def peak_extra_mb(case: Case, device: torch.device) -> Optional[float]:
    """Peak memory that one run adds on top of its inputs, in MB (10^6 bytes).

    CUDA: the caching allocator's peak. CPU: the resident-set high-water mark (VmHWM, reset through
    /proc/self/clear_refs); the CLI runs with a fixed malloc mmap threshold so freed buffers leave the
    resident set at once and the mark tracks tensor memory.
    """
    state = case.setup()
    gc.collect()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        case.run(state)
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return (peak - base) / 1e6
    if not cpu_peak_tracking_available():
        return None
    base = _proc_status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    case.run(state)
    peak = _proc_status_kib("VmHWM")
    return max(0, peak - base) * 1024 / 1e6


@dataclass
class MachineLimits:
    copy_gbps: float
    gemm_tflops: float
    gemm_dtype: str


def measure_limits(device: torch.device, reps: int = 5) -> MachineLimits:
    """Copy bandwidth (bytes read + written per second) and GEMM rate, measured now on ``device``."""
    n_bytes = (1 << 30) if device.type == "cuda" else (1 << 28)
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    copy = Case("limits", "copy", "fw", "", "float32", lambda: None, lambda _: dst.copy_(src))
    copy_ms = median_time_ms(copy, device, reps)
    del src, dst
    # large square products: the rate a well-shaped GEMM reaches here (small ones underestimate it)
    if device.type == "cuda":
        n, dtype = 8192, torch.bfloat16
    else:
        n, dtype = 4096, torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    gemm = Case("limits", "gemm", "fw", "", str(dtype), lambda: None, lambda _: torch.mm(a, b))
    gemm_ms = median_time_ms(gemm, device, reps)
    return MachineLimits(
        copy_gbps=2 * n_bytes / (copy_ms * 1e-3) / 1e9,
        gemm_tflops=2 * n**3 / (gemm_ms * 1e-3) / 1e12,
        gemm_dtype=str(dtype).replace("torch.", ""),
    )


def measure(case: Case, device: torch.device, limits: MachineLimits, reps: int) -> Result:
    try:
        ms = median_time_ms(case, device, reps)
        mem = peak_extra_mb(case, device)
        # host overhead is a few tens of microseconds: beyond GRAPH_BELOW_MS it is noise, not worth a capture
        device_ms = graph_time_ms(case, device, reps) if ms < GRAPH_BELOW_MS else None
    except Exception as exc:  # a baseline that fails at a size is reported, not fatal
        return Result(case.suite, case.method, case.pass_name, case.size, case.dtype, None, None, None, None, "",
                      None, baseline=case.baseline, error=f"{type(exc).__name__}: {str(exc)[:200]}")
    rate_ms = device_ms or ms  # kernel quality is judged on device time where there is one
    if case.flops:
        achieved, unit = case.flops / (rate_ms * 1e-3) / 1e12, "TFLOP/s"
        fraction = achieved / limits.gemm_tflops
    elif case.bytes:
        achieved, unit = case.bytes / (rate_ms * 1e-3) / 1e9, "GB/s"
        fraction = achieved / limits.copy_gbps
    else:
        achieved, unit, fraction = None, "", None
    working = None if mem is None else max(0.0, mem - case.result_bytes / 1e6)
    return Result(case.suite, case.method, case.pass_name, case.size, case.dtype, ms, mem, working, achieved, unit,
                  fraction, baseline=case.baseline, device_ms=device_ms)


def attach_ratios(results: List[Result]) -> None:
    """Speedup and memory ratio of each row against its baseline method at the same pass/size/dtype."""
    index = {(r.method, r.pass_name, r.size, r.dtype): r for r in results}
    for r in results:
        base = index.get((r.baseline, r.pass_name, r.size, r.dtype))
        if base is None or base.median_ms is None or r.median_ms is None:
            continue
        r.speedup_vs_baseline = base.median_ms / r.median_ms
        if base.device_ms and r.device_ms:
            r.device_speedup_vs_baseline = base.device_ms / r.device_ms
        if base.working_mb and r.working_mb is not None:
            r.memory_vs_baseline = r.working_mb / base.working_mb


def reexec_with_fixed_mmap_threshold(module: str, argv: List[str]) -> None:
    """Restart ``python -m module argv`` with glibc's mmap threshold fixed, once.

    With the dynamic threshold, freed large buffers can stay resident and hide from the peak-RSS
    measurement; a fixed one returns them to the OS at once.
    """
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None and sys.platform.startswith("linux"):
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
        os.execve(sys.executable, [sys.executable, "-m", module, *argv], env)
