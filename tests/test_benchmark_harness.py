"""The benchmark harness: timing, ratios, tables and the summary (CPU), CUDA-graph device time (GPU)."""

import json

import pytest
import torch

from benchmarks import report
from benchmarks.harness import Case, MachineLimits, attach_ratios, graph_time_ms, measure

LIMITS = MachineLimits(copy_gbps=10.0, gemm_tflops=1.0, gemm_dtype="float32")


def _cases(device, n=1 << 16):
    x = torch.randn(n, device=device)
    slow = Case("demo", "torch", "fw", f"n={n}", "float32", lambda: x, lambda s: (s.exp() + 1).log().sum(),
                bytes=4 * n)
    fast = Case("demo", "prefkern-x", "fw", f"n={n}", "float32", lambda: x, lambda s: s.sum(), bytes=4 * n)
    return [slow, fast]


def test_measure_ratios_table_and_summary(tmp_path):
    results = [measure(c, torch.device("cpu"), LIMITS, reps=3) for c in _cases("cpu")]
    attach_ratios(results)
    base, fast = results
    assert base.error is None and fast.error is None
    assert base.median_ms > 0 and base.device_ms is None  # no graphs off CUDA
    assert base.speedup_vs_baseline == pytest.approx(1.0)
    assert fast.speedup_vs_baseline == pytest.approx(base.median_ms / fast.median_ms)
    assert fast.achieved == pytest.approx(4 * (1 << 16) / (fast.median_ms * 1e-3) / 1e9)
    assert fast.fraction_of_limit == pytest.approx(fast.achieved / LIMITS.copy_gbps)
    table = report.markdown_table(results).splitlines()
    assert all(line.count("|") == table[0].count("|") for line in table)
    meta = report.stamp(torch.device("cpu"), LIMITS)
    report.write_outputs("demo", torch.device("cpu"), meta, results, ["a note"], tmp_path, plot=False)
    saved = json.loads((tmp_path / "demo_cpu.json").read_text())
    assert [r["method"] for r in saved["results"]] == ["torch", "prefkern-x"]
    lines = report.summary(tmp_path, ["demo"]).splitlines()
    assert len(lines) == 4 and "prefkern-x" in lines[3] and "| fw |" in lines[3]


def test_failing_case_is_reported_not_raised():
    def boom(_):
        raise RuntimeError("out of memory at this size")

    r = measure(Case("demo", "m", "fw", "big", "float32", lambda: None, boom), torch.device("cpu"), LIMITS, reps=1)
    assert r.median_ms is None and "out of memory" in r.error
    assert "failed: RuntimeError" in report.markdown_table([r])


@pytest.mark.gpu
def test_graph_time_is_device_time_and_refuses_host_syncs():
    device = torch.device("cuda")
    slow, _ = _cases(device, 1 << 24)
    ms = graph_time_ms(slow, device, reps=5)
    assert ms is not None and 0 < ms < 100
    x = torch.randn(1000, device=device)
    syncing = Case("demo", "m", "fw", "s", "float32", lambda: x, lambda s: float(s.sum().item()))
    assert graph_time_ms(syncing, device, reps=2) is None
    assert float(x.sum()) == pytest.approx(float(x.cpu().sum()), rel=1e-4)  # the device still works after


def test_graph_time_is_none_off_cuda():
    slow, _ = _cases("cpu", 16)
    assert graph_time_ms(slow, torch.device("cpu"), reps=1) is None
