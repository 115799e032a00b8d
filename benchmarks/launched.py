"""Triton kernels compiled for a GPU exactly as their launchers would launch them, on a machine without one.

Every launcher runs on meta tensors of realistic shapes with ``JITFunction.run`` intercepted, so each kernel
is compiled with the launcher's own specialisation (unit strides as constexpr 1, 16-divisible pointers and
sizes), block sizes, ``num_warps``, ``num_stages`` and options. Used by ``tests/test_triton_compile.py``
(registers, spills, shared memory, vector widths) and ``benchmarks.sass`` (static instruction counts).
Must run without ``TRITON_INTERPRET`` (the interpreter's @triton.jit functions cannot be compiled).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch

# (label, function of no arguments that calls launchers on meta tensors); each kernel a launcher starts is
# recorded under the label
N, V, H, R = 8192, 128256, 4096, 256
V_ODD = 50257  # GPT-2's vocabulary: rows start at every 2-byte offset


@dataclass
class Launch:
    label: str
    kernel: str
    fn: object
    args: tuple
    kwargs: dict


@dataclass
class Compiled:
    label: str
    kernel: str
    num_warps: int
    num_stages: int
    shared: int
    constexprs: dict
    ptx: str
    cubin: bytes
    ptxas_rc: int = 0
    ptxas: str = ""
    extra: dict = field(default_factory=dict)


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


def realistic_launches() -> list[tuple[str, Callable[[], None]]]:
    """The launches the compile checks and the SASS counts cover, each as (label, thunk)."""
    import prefkern.kernels.linear_logprobs as LL
    import prefkern.kernels.logprobs as LP
    import prefkern.kernels.row_stats as RS
    import prefkern.kernels.sampling as SA

    bf16, i64 = torch.bfloat16, torch.int64
    k_rows = (128 << 20) // (4 * V)  # rows of the chunked path's default 128 MB fp32 logits buffer on a GPU
    labels, g, lse = _meta(N, dtype=i64), _meta(N), _meta(N, 2)
    rows = _meta(R, dtype=i64)

    def logprobs(v, dtype, n=N, in_place=False):
        def run():
            x = _meta(n, v, dtype=dtype)
            LP.logprobs_forward(x, labels[:n], -100, 1.0)
            LP.logprobs_backward(g[:n], x, labels[:n], lse[:n], -100, 1.0, out=x if in_place else None)
        return run

    def row_stats(v):
        def run():
            RS.row_stats(_meta(k_rows, v), lse[:k_rows], labels[:k_rows], 1.0, -100, _meta(k_rows, 4))
        return run

    def linear():
        hidden, weight = _meta(N, H, dtype=bf16), _meta(V, H, dtype=bf16)
        LL.linear_lse_forward(hidden, weight, None, labels, -100)
        LL.linear_lse_backward(g, hidden, weight, None, labels, lse, -100, True, True, False)

    def sampling(v):
        def run():
            SA.sample(_meta(R, v, dtype=bf16), rows, _meta(R), rows, _meta(R), _meta(R), rows, rows)
        return run

    return [
        ("logprobs bf16 [N, V]", logprobs(V, bf16)),
        ("logprobs fp32 chunk, in place", logprobs(V, torch.float32, n=k_rows, in_place=True)),
        ("row_stats fp32 chunk", row_stats(V)),
        ("linear_logprobs bf16 [N, H] x [V, H]", linear),
        ("sampling bf16 [R, V]", sampling(V)),
        # an odd vocabulary: no row but the first starts on a 16-byte boundary, so only peeled row loops load
        # 16 bytes
        (f"odd V: logprobs bf16 [N, {V_ODD}]", logprobs(V_ODD, bf16)),
        (f"odd V: logprobs fp32 chunk [K, {V_ODD}], in place", logprobs(V_ODD, torch.float32, n=k_rows,
                                                                          in_place=True)),
        (f"odd V: row_stats fp32 chunk [K, {V_ODD}]", row_stats(V_ODD)),
        (f"odd V: sampling bf16 [R, {V_ODD}]", sampling(V_ODD)),
    ]


def capture_launches(launches: list[tuple[str, Callable[[], None]]]) -> list[Launch]:
    """Runs each thunk with Triton's launch intercepted; returns what would have been launched."""
    import prefkern.kernels.linear_logprobs as LL
    from triton.runtime.jit import JITFunction

    captured: list[Launch] = []
    label = [""]
    saved = JITFunction.run, LL._on_gpu, LL._sm_count
    JITFunction.run = lambda self, *args, grid, warmup, **kw: captured.append(
        Launch(label[0], self.__name__, self, args, kw))
    LL._on_gpu = lambda t: True  # the tile sizes a GPU gets, not the interpreter's
    LL._sm_count = lambda device: 132
    try:
        for label[0], thunk in launches:
            thunk()
    finally:
        JITFunction.run, LL._on_gpu, LL._sm_count = saved
    return captured


def compile_launch(launch: Launch, cap: int) -> Compiled:
    """Compiles one captured launch for compute capability ``cap`` (80, 90) and runs ``ptxas -v`` on its PTX
    the way Triton runs it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.fn
    target = GPUTarget("cuda", cap, 32)
    backend = make_backend(target)
    bound, spec, opts = create_function_from_signature(fn.signature, fn.params, backend)(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, launch.kwargs, bound, spec, opts)
    c = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    out = Compiled(launch.label, launch.kernel, options.num_warps, options.num_stages, c.metadata.shared,
                   {fn.arg_names[k[0]]: v for k, v in constexprs.items()}, c.asm["ptx"], c.asm["cubin"])
    with tempfile.TemporaryDirectory() as d:
        with open(f"{d}/k.ptx", "w") as f:
            f.write(out.ptx)
        fmad = [] if options.enable_fp_fusion else ["--fmad=false"]
        cmd = [get_ptxas(cap).path, "-v", *fmad, "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(cap)}",
               f"{d}/k.ptx", "-o", f"{d}/k.o"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    out.ptxas_rc, out.ptxas = proc.returncode, proc.stderr[-2000:]
    return out


def nvdisasm_path() -> str:
    """Triton's bundled nvdisasm (the CUDA toolkit here may not ship one)."""
    from triton.backends.nvidia.compiler import get_ptxas

    return os.path.join(os.path.dirname(get_ptxas(90).path), "nvdisasm")


def global_access(ptx: str) -> dict:
    """{PTX global access: count}, e.g. {"ld.global.v4.b32": 2, "ld.global.b16": 1}."""
    return dict(Counter(re.findall(r"\b((?:ld|st)\.global(?:\.[a-z]+)*?(?:\.v[248])?\.[bfsu]\d+)\b", ptx)))


def main(argv: list[str]) -> None:
    """``python -m benchmarks.launched CAP``: the realistic launches compiled for CAP, as JSON on the last line
    (the compile test runs this in a child process, without TRITON_INTERPRET)."""
    cap = int(argv[0])
    results = []
    for launch in capture_launches(realistic_launches()):
        entry = {"launch": launch.label, "kernel": launch.kernel}
        try:
            c = compile_launch(launch, cap)
            entry.update(num_warps=c.num_warps, num_stages=c.num_stages, shared=c.shared, constexprs=c.constexprs,
                         ptxas_rc=c.ptxas_rc, ptxas=c.ptxas, global_access=global_access(c.ptx))
        except Exception:
            import traceback
            entry["error"] = traceback.format_exc(limit=4)
        results.append(entry)
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:])
