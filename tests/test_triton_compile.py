"""Every Triton kernel compiles for real GPU targets (sm_80, sm_90) on a machine without a GPU.

The tests run the interpreter (TRITON_INTERPRET=1), under which @triton.jit yields interpreted
functions that cannot be compiled, so compilation happens in a child process without it.
"""

import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton")

COMPILE_ALL = r"""
import importlib, json, pkgutil, sys, traceback
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import prefkern.kernels
results = {}
for info in pkgutil.iter_modules(prefkern.kernels.__path__):
    module = importlib.import_module(f"prefkern.kernels.{info.name}")
    for name, (fn, signature, constexprs) in getattr(module, "TRITON_KERNELS", {}).items():
        while not hasattr(fn, "arg_names"):  # unwrap @triton.heuristics / @triton.autotune
            fn = fn.fn
        for cap in (80, 90):
            key = f"{info.name}.{name}@sm_{cap}"
            try:
                c = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                   target=GPUTarget("cuda", cap, 32))
                results[key] = "ok" if len(c.asm["cubin"]) > 0 else "empty cubin"
            except Exception:
                results[key] = traceback.format_exc(limit=3)
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def compile_results():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", COMPILE_ALL], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_triton_kernel_compiles_for_sm80_and_sm90(compile_results):
    assert any(k.startswith("logprobs.") for k in compile_results), compile_results
    failed = {k: v for k, v in compile_results.items() if v != "ok"}
    assert not failed, "\n".join(f"{k}:\n{v}" for k, v in failed.items())


# Every launcher run on meta tensors of realistic shapes with the launch intercepted (benchmarks/launched.py): each
# kernel is then compiled exactly as its launcher would have it compiled on a GPU (argument specialisation -- unit
# strides as constexpr 1, 16-divisible pointers and sizes --, num_warps, num_stages, block sizes and other
# options), and ptxas -v, run as Triton runs it, reports registers and spills; the PTX gives the global accesses
# by width.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


@pytest.fixture(scope="module")
def launched_compiles():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = {cap: subprocess.Popen([sys.executable, "-m", "benchmarks.launched", str(cap)], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT) for cap in SHARED_LIMIT}
    out = {}
    for cap, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-3000:]
        out[cap] = json.loads(stdout.strip().splitlines()[-1])
    return out


@pytest.mark.parametrize("cap", sorted(SHARED_LIMIT))
def test_kernels_compile_as_launched_without_spills(launched_compiles, cap):
    results = launched_compiles[cap]
    names = {r["kernel"] for r in results}
    assert names == {"_logprobs_forward_kernel", "_logprobs_backward_kernel", "_linear_lse_forward_kernel",
                     "_linear_lse_backward_kernel", "_sample_partial_kernel", "_sample_finish_kernel",
                     "_row_stats_kernel"}, names
    problems = []
    for r in results:
        where = f"{r['launch']}: {r['kernel']} @ sm_{cap}"
        if "error" in r:
            problems.append(f"{where} failed to compile:\n{r['error']}")
            continue
        if r["ptxas_rc"] != 0:
            problems.append(f"{where}: ptxas failed:\n{r['ptxas']}")
            continue
        spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", r["ptxas"])]
        if not spills or any(spills):
            problems.append(f"{where} (num_warps={r['num_warps']}, num_stages={r['num_stages']}, "
                            f"{r['constexprs']}) spills:\n{r['ptxas']}")
        if r["shared"] > SHARED_LIMIT[cap]:
            problems.append(f"{where}: {r['shared']} bytes of shared memory > {SHARED_LIMIT[cap]}")
    assert not problems, "\n\n".join(problems)


def _widest_bytes(access, op):
    """Bytes of the widest global access of kind ``op`` ("ld" or "st") in a {"ld.global.v4.b32": count} map."""
    widths = [0]
    for name in access:
        m = re.fullmatch(rf"{op}\.global[\w.:]*?(?:\.v(\d))?\.[bfsu](\d+)", name)
        if m:
            widths.append(int(m.group(1) or 1) * int(m.group(2)) // 8)
    return max(widths)


# row kernels whose row reads (and, for the backward, writes) must be 16 bytes wide at any vocabulary
PEELED = {"_logprobs_forward_kernel": ("ld",), "_logprobs_backward_kernel": ("ld", "st"),
          "_sample_partial_kernel": ("ld",), "_row_stats_kernel": ("ld",)}


@pytest.mark.parametrize("cap", sorted(SHARED_LIMIT))
def test_odd_vocabulary_rows_load_16_bytes(launched_compiles, cap):
    """V = 50257: rows start on any 2-byte (bf16) or 4-byte (fp32) boundary. The row loops peel each row's
    misaligned head, so the body's loads (and the backward's stores) still compile to 16-byte accesses."""
    odd = [r for r in launched_compiles[cap] if r["launch"].startswith("odd V") and r["kernel"] in PEELED]
    assert {r["kernel"] for r in odd} == set(PEELED)
    narrow = [f"{r['launch']}: {r['kernel']} {op} {r['global_access']}" for r in odd for op in PEELED[r["kernel"]]
              if "error" not in r and _widest_bytes(r["global_access"], op) < 16]
    assert not narrow, "\n".join(narrow)


def test_launchers_pass_their_configs(launched_compiles):
    """The specialisation the compile above used is the one a GPU launch gets: unit strides became
    constexpr 1 and the meta-parameters came from the launchers' pure config functions."""
    import torch

    import prefkern.kernels.linear_logprobs as LL
    import prefkern.kernels.logprobs as LP
    import prefkern.kernels.sampling as SA

    by_kernel = {}
    for r in launched_compiles[90]:
        by_kernel.setdefault(r["kernel"], []).append(r)
    fwd = by_kernel["_logprobs_forward_kernel"][0]
    assert fwd["constexprs"]["BLOCK_V"] == LP.forward_config(128256)["BLOCK_V"]
    assert fwd["num_warps"] == LP.forward_config(128256)["num_warps"]
    tile = LL.launch_config(torch.bfloat16, on_gpu=True)
    for name in ("_linear_lse_forward_kernel", "_linear_lse_backward_kernel"):
        r = by_kernel[name][0]
        assert r["constexprs"]["stride_xh"] == 1 and r["constexprs"]["stride_wh"] == 1
        assert {k: r["constexprs"][k] for k in ("BLOCK_N", "BLOCK_V", "BLOCK_H")} == \
            {k: tile[k] for k in ("BLOCK_N", "BLOCK_V", "BLOCK_H")}
        assert (r["num_warps"], r["num_stages"]) == (tile["num_warps"], tile["num_stages"])
    finish = by_kernel["_sample_finish_kernel"][0]
    assert finish["constexprs"]["BLOCK_V"] == SA.launch_config(128256)["finish"]["BLOCK_V"]
