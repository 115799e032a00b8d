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


# Every launcher run on meta tensors of realistic shapes with the launch intercepted: each kernel is then
# compiled exactly as its launcher would have it compiled on a GPU (argument specialisation -- unit
# strides as constexpr 1, 16-divisible pointers and sizes --, num_warps, num_stages, block sizes and
# other options), and ptxas -v, run as Triton runs it, reports registers and spills.
COMPILE_AS_LAUNCHED = r"""
import json, re, subprocess, sys, tempfile
from collections import Counter
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

import prefkern.kernels.linear_logprobs as LL
import prefkern.kernels.logprobs as LP
import prefkern.kernels.sampling as SA

launches = []
label = [None]
JITFunction.run = lambda self, *args, grid, warmup, **kw: launches.append((label[0], self, args, kw))
LL._on_gpu = lambda t: True  # the tile sizes a GPU gets, not the interpreter's
LL._sm_count = lambda device: 132

meta, bf16, f32 = torch.device("meta"), torch.bfloat16, torch.float32
def empty(*shape, dtype=f32):
    return torch.empty(*shape, dtype=dtype, device=meta)

N, V, H, R = 8192, 128256, 4096, 256
K = (128 << 20) // (4 * V)  # rows of the chunked path's default 128 MB fp32 logits buffer on a GPU
labels, g, lse = empty(N, dtype=torch.int64), empty(N), empty(N, 2)
label[0] = "logprobs bf16 [N, V]"
LP.logprobs_forward(empty(N, V, dtype=bf16), labels, -100, 1.0)
LP.logprobs_backward(g, empty(N, V, dtype=bf16), labels, lse, -100, 1.0)
label[0] = "logprobs fp32 chunk, in place"
buf = empty(K, V)
LP.logprobs_forward(buf, labels[:K], -100, 1.0)
LP.logprobs_backward(g[:K], buf, labels[:K], lse[:K], -100, 1.0, out=buf)
label[0] = "linear_logprobs bf16 [N, H] x [V, H]"
hidden, weight = empty(N, H, dtype=bf16), empty(V, H, dtype=bf16)
LL.linear_lse_forward(hidden, weight, None, labels, -100)
LL.linear_lse_backward(g, hidden, weight, None, labels, lse, -100, True, True, False)
label[0] = "sampling bf16 [R, V]"
rows = empty(R, dtype=torch.int64)
SA.sample(empty(R, V, dtype=bf16), rows, empty(R), rows, empty(R), empty(R), rows, rows)
# an odd vocabulary: no row but the first starts on a 16-byte boundary, so only peeled row loops load 16 bytes
V_ODD = 50257
label[0] = "odd V: logprobs bf16 [N, V]"
LP.logprobs_forward(empty(N, V_ODD, dtype=bf16), labels, -100, 1.0)
LP.logprobs_backward(g, empty(N, V_ODD, dtype=bf16), labels, lse, -100, 1.0)
label[0] = "odd V: logprobs fp32 chunk, in place"
buf = empty(K, V_ODD)
LP.logprobs_forward(buf, labels[:K], -100, 1.0)
LP.logprobs_backward(g[:K], buf, labels[:K], lse[:K], -100, 1.0, out=buf)
label[0] = "odd V: sampling bf16 [R, V]"
SA.sample(empty(R, V_ODD, dtype=bf16), rows, empty(R), rows, empty(R), empty(R), rows, rows)

cap = int(sys.argv[1])
target = GPUTarget("cuda", cap, 32)
backend = make_backend(target)
results = []
for what, fn, args, kw in launches:
    entry = {"launch": what, "kernel": fn.__name__}
    try:
        bound, spec, opts = create_function_from_signature(fn.signature, fn.params, backend)(*args, **kw)
        options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound, spec, opts)
        c = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
        with tempfile.TemporaryDirectory() as d:
            with open(f"{d}/k.ptx", "w") as f:
                f.write(c.asm["ptx"])
            fmad = [] if options.enable_fp_fusion else ["--fmad=false"]
            cmd = [get_ptxas(cap).path, "-v", *fmad, "--regAllocOptLevel=2",
                   f"--gpu-name={sm_arch_from_capability(cap)}", f"{d}/k.ptx", "-o", f"{d}/k.o"]
            ptxas = subprocess.run(cmd, capture_output=True, text=True)
        # global memory accesses by width, e.g. {"ld.global.v4.b32": 2, "ld.global.b16": 1}
        access = Counter(re.findall(r"\b((?:ld|st)\.global(?:\.[a-z]+)*?(?:\.v[248])?\.[bfsu]\d+)\b", c.asm["ptx"]))
        entry.update(num_warps=options.num_warps, num_stages=options.num_stages, shared=c.metadata.shared,
                     global_access=dict(access),
                     constexprs={fn.arg_names[k[0]]: v for k, v in constexprs.items()},
                     ptxas_rc=ptxas.returncode, ptxas=ptxas.stderr[-2000:])
    except Exception:
        import traceback
        entry["error"] = traceback.format_exc(limit=4)
    results.append(entry)
print(json.dumps(results))
"""

SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


@pytest.fixture(scope="module")
def launched_compiles():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = {cap: subprocess.Popen([sys.executable, "-c", COMPILE_AS_LAUNCHED, str(cap)], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, env=env) for cap in SHARED_LIMIT}
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
                     "_linear_lse_backward_kernel", "_sample_partial_kernel", "_sample_finish_kernel"}, names
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
          "_sample_partial_kernel": ("ld",)}


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
