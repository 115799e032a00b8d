"""Native sources checked without a GPU: the shared random-stream header compiled by the host compiler
and held against float64, and every CUDA source compiled by nvcc for sm_80 and sm_90a with no register
spills."""

import math
import os
import re
import shutil
import struct
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"

GUMBEL_PROBE = r"""
#include <cstdio>
#include <cstdlib>
#include "cpu/sampling_rng.h"
int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    long k = std::strtol(argv[i], nullptr, 10);
    float u = static_cast<float>(2 * k + 1) * 5.9604644775390625e-8f;  // as sampling_uniform makes it
    std::printf("%ld %.9e\n", k, prefkern::gumbel_from_uniform(u));
  }
}
"""


def f32_ulp(x):
    bits = struct.unpack("<I", struct.pack("<f", abs(x)))[0]
    lo, hi = struct.unpack("<f", struct.pack("<I", bits))[0], struct.unpack("<f", struct.pack("<I", bits + 1))[0]
    return hi - lo


@pytest.mark.parametrize("flags", [["-O2"], ["-O3", "-march=x86-64-v3", "-ffp-contract=fast"]])
def test_gumbel_noise_is_finite_and_accurate_at_the_extreme_uniforms(tmp_path, flags):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    if "-march=x86-64-v3" in flags and os.uname().machine != "x86_64":
        pytest.skip("x86-64 only")
    src, exe = tmp_path / "probe.cpp", tmp_path / "probe"
    src.write_text(GUMBEL_PROBE)
    subprocess.run([cxx, "-std=c++17", *flags, f"-I{CSRC}", str(src), "-o", str(exe)], check=True)
    top = (1 << 23) - 1  # u = (2k + 1) 2^-24 up to 1 - 2^-24
    ks = list(range(top - 63, top + 1)) + list(range(0, 8)) + list(range(1, top, top // 97))
    out = subprocess.run([str(exe), *map(str, ks)], check=True, capture_output=True, text=True).stdout
    worst = 0.0
    for line in out.split("\n"):
        if not line:
            continue
        k, g = line.split()
        k, g = int(k), float(g)
        u = (2 * k + 1) * 2.0**-24
        ref = -math.log(-math.log(u))
        assert math.isfinite(g), f"u = {u!r}: noise {g}"
        # near u = 1/e the noise crosses 0 and only an absolute bound makes sense
        err = abs(g - ref) / max(f32_ulp(ref), 2.0**-24)
        worst = max(worst, err)
        assert err <= 4, f"u = {u!r}: noise {g!r}, float64 {ref!r}: {err:.1f} ulp"
    assert worst > 0  # the probe really ran on the values above


NOISE_PROBE = r"""
#include <cstdio>
#include <vector>
#include "cpu/sampling_rng.h"
int main(int, char** argv) {  // w = -log(u) and the CPU noise for every u = (2k + 1) 2^-24, float32 binary
  const int n = 1 << 23;
  std::vector<float> w(n), g(n);
  for (int k = 0; k < n; ++k) {
    float u = static_cast<float>(2 * k + 1) * 5.9604644775390625e-8f;
    w[k] = -prefkern::log_positive(u);
    g[k] = prefkern::gumbel_from_uniform(u);
  }
  std::FILE* f = std::fopen(argv[1], "wb");
  std::fwrite(w.data(), 4, n, f);
  std::fwrite(g.data(), 4, n, f);
  std::fclose(f);
}
"""

LG2_APPROX_ABS_ERROR = 2.0**-22  # lg2.approx.f32, in log2 units (PTX ISA); gumbel_fast_from_uniform's outer log


def sampling_constants():
    text = (CSRC / "cuda" / "sampling.cu").read_text()
    out = {}
    for name in ("kGumbelExactMin", "kGumbelExactMax", "kGumbelError", "kGumbelMin", "kGumbelMax"):
        m = re.search(rf"\b{name} = ([-+0-9.e]+)f?[,;]", text)
        assert m, f"{name} not found in sampling.cu"
        out[name] = float(m.group(1))
    return out


@pytest.mark.parametrize("flags", [["-O2"], ["-O3", "-march=x86-64-v3", "-ffp-contract=fast"]])
def test_cuda_gumbel_noise_bounds_hold_for_every_uniform(tmp_path, flags):
    """The CUDA kernels' noise -lg2.approx(w) ln 2 with w = -log_positive(u) (its host twin: w from the shared
    header, the outer log exact plus lg2.approx's documented error, ln 2's float rounding and the product's
    rounding), over all 2^23 uniforms: within kGumbelError of -log(-log u) in float64 and of the CPU noise,
    inside [kGumbelMin, kGumbelMax], and those constants are the exact range widened by the error, rounded
    outwards to float (the tightest floats that hold it). -ffp-contract=fast stands for nvcc's FMA contraction."""
    np = pytest.importorskip("numpy")
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    if "-march=x86-64-v3" in flags and os.uname().machine != "x86_64":
        pytest.skip("x86-64 only")
    src, exe, out = tmp_path / "noise.cpp", tmp_path / "noise", tmp_path / "noise.bin"
    src.write_text(NOISE_PROBE)
    subprocess.run([cxx, "-std=c++17", *flags, f"-I{CSRC}", str(src), "-o", str(exe)], check=True)
    subprocess.run([str(exe), str(out)], check=True)
    n = 1 << 23
    raw = np.fromfile(out, dtype=np.float32)
    w, g_cpu = raw[:n].astype(np.float64), raw[n:].astype(np.float64)
    u = (2 * np.arange(n, dtype=np.float64) + 1) * 2.0**-24
    w_exact = -np.log1p(u - 1)  # u - 1 is exact in float64
    g = -np.log(w_exact)
    assert bool((np.diff(g) > 0).all())  # monotone: the range is [g(first u), g(last u)]

    c = sampling_constants()
    assert c["kGumbelError"] == 2.0**-19
    assert c["kGumbelExactMin"] == pytest.approx(-math.log(24 * math.log(2)), rel=1e-15)
    assert c["kGumbelExactMin"] == pytest.approx(g[0], rel=1e-15)
    assert c["kGumbelExactMax"] == pytest.approx(g[-1], rel=1e-15)

    # inner log: a few ulp of w, at most 2^-21 in log w (the comment in sampling_rng.h)
    assert np.abs(np.log(w) - np.log(w_exact)).max() <= 2.0**-21
    ln2, ln2_f = math.log(2), float(np.float32(math.log(2)))
    twin = -np.log(w)
    half_ulp = 0.5 * np.spacing(np.abs(twin).astype(np.float32)).astype(np.float64)
    outer = ln2 * LG2_APPROX_ABS_ERROR + np.abs(np.log2(w)) * abs(ln2_f - ln2) + half_ulp
    err = np.abs(twin - g) + outer
    assert err.max() <= c["kGumbelError"], f"noise error {err.max():.3g} at g = {g[err.argmax()]:.6f}"
    assert (np.abs(twin - g_cpu) + outer).max() <= c["kGumbelError"]  # CUDA noise vs the CPU's stream

    # draw_pack's second skip: no logs for an element when fl(1 - u) > w_c >= e^-y; its noise must be < y then
    # (the kernel's w_c only errs upwards, which skips less: e^-y itself is the worst case)
    t = (np.float32(1) - (2 * np.arange(n, dtype=np.float32) + 1) * np.float32(2.0**-24)).astype(np.float64)
    assert bool((t[: n // 2] == 1 - u[: n // 2]).all())  # the uniforms are exact in float32
    for y in np.linspace(-4.0, 17.0, 64):
        skipped = t > math.exp(-y)
        if skipped.any():
            assert g[skipped].max() < y and (twin + outer)[skipped].max() < y + c["kGumbelError"], y

    lo, hi = (twin - outer).min(), (twin + outer).max()
    g_min, g_max = np.float32(c["kGumbelMin"]), np.float32(c["kGumbelMax"])  # as the compiler rounds them
    assert float(g_min) <= lo and float(g_max) >= hi
    wide_lo, wide_hi = c["kGumbelExactMin"] - c["kGumbelError"], c["kGumbelExactMax"] + c["kGumbelError"]
    assert float(g_min) <= wide_lo < float(np.nextafter(g_min, np.float32(0)))
    assert float(np.nextafter(g_max, np.float32(0))) < wide_hi <= float(g_max)


ROW_SPLIT_PROBE = r"""
#include <cstdio>
#include <cstdlib>
#include <initializer_list>
#include "cuda/row_loads.cuh"
int main(int, char** argv) {  // address elem_size vocab head packs, for every case asked
  const long max_vocab = std::strtol(argv[1], nullptr, 10);
  for (long es : {1L, 2L, 4L, 8L})
    for (unsigned long address = 4096; address < 4096 + 48; ++address)
      for (long vocab = 0; vocab <= max_vocab; ++vocab) {
        prefkern::cuda::RowSplit s = prefkern::cuda::row_split(address, vocab, es);
        std::printf("%lu %ld %ld %ld %ld\n", address, es, vocab, (long)s.head, (long)s.packs);
      }
}
"""


def test_row_split_peels_the_head_and_covers_the_row_once(tmp_path):
    """csrc/cuda/row_loads.cuh::row_split (compiled by g++ alone) against a Python model, for every
    alignment and small vocab sizes: head scalars up to the first 16-byte boundary, 16-byte packs from an
    aligned address, a tail shorter than a pack, every column read exactly once, vocab smaller than the head
    included; a row not even element-aligned is read all scalar."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    src, exe = tmp_path / "split.cpp", tmp_path / "split"
    src.write_text(ROW_SPLIT_PROBE)
    subprocess.run([cxx, "-std=c++17", "-O1", "-Wall", "-Werror", f"-I{CSRC}", str(src), "-o", str(exe)],
                   check=True)
    max_vocab = 80
    out = subprocess.run([str(exe), str(max_vocab)], check=True, capture_output=True, text=True).stdout
    rows = [tuple(map(int, line.split())) for line in out.split("\n") if line]
    assert len(rows) == 4 * 48 * (max_vocab + 1)
    for address, es, vocab, head, packs in rows:
        vec = 16 // es
        case = f"address {address}, {es}-byte elements, vocab {vocab}: head {head}, packs {packs}"
        if address % es:
            assert (head, packs) == (vocab, 0), case
            continue
        # model: the first column whose address is 16-byte aligned, then as many whole packs as fit
        first = next(i for i in range(vec) if (address + i * es) % 16 == 0)
        want_head = min(first, vocab)
        want_packs = (vocab - want_head) // vec if vocab > first else 0
        assert (head, packs) == (want_head, want_packs), case
        body = range(head, head + packs * vec)
        tail = range(head + packs * vec, vocab)
        assert packs == 0 or (address + head * es) % 16 == 0, case
        assert head < vec and (packs == 0 or len(tail) < vec), case
        assert sorted([*range(head), *body, *tail]) == list(range(vocab)), case


CUDA_SOURCES = sorted((CSRC / "cuda").glob("*.cu"))
NVCC = shutil.which("nvcc")


ARCHS = ("sm_80", "sm_90a")


def compile_cuda(source, out_dir):
    """nvcc as CMakeLists.txt builds the library (-O3, C++17, csrc/ on the include path), for both
    architectures in one run (one host pass), with ptxas -v."""
    gencode = [f"-gencode=arch=compute_{a[3:]},code={a}" for a in ARCHS]
    cmd = [NVCC, "-std=c++17", "-O3", "-lineinfo", *gencode, f"-I{CSRC}", "-Xptxas", "-v", "-c",
           str(source), "-o", str(out_dir / f"{source.stem}.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return source.name, proc.returncode, proc.stdout + proc.stderr


def spills_per_kernel(log):
    """{(entry function, arch): (spill store bytes, spill load bytes)} from ptxas -v output."""
    out, current = {}, None
    for line in log.splitlines():
        entry = re.search(r"Compiling entry function '([^']+)' for '(sm_\w+)'", line)
        if entry:
            current = (entry.group(1), entry.group(2))
            continue
        spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if spill and current is not None:
            out[current] = (int(spill.group(1)), int(spill.group(2)))
            current = None
    return out


@pytest.fixture(scope="module")
def cuda_builds(tmp_path_factory):
    if NVCC is None:
        pytest.skip("nvcc is not on PATH")
    out_dir = tmp_path_factory.mktemp("nvcc")
    with ThreadPoolExecutor(max_workers=max(1, min(3, os.cpu_count() or 1))) as pool:
        return list(pool.map(lambda src: compile_cuda(src, out_dir), CUDA_SOURCES))


def test_every_cuda_source_builds_without_spills(cuda_builds):
    assert {name for name, *_ in cuda_builds} == {p.name for p in CUDA_SOURCES}
    problems = []
    for name, rc, log in cuda_builds:
        if rc != 0:
            problems.append(f"{name}: nvcc failed\n{log[-3000:]}")
            continue
        kernels = spills_per_kernel(log)
        for arch in ARCHS:
            if not any(a == arch for _, a in kernels):
                problems.append(f"{name}: no kernel for {arch} in the ptxas report\n{log[-2000:]}")
        problems += [f"{name} @ {arch}: {k} spills {s} bytes stored, {l} loaded"
                     for (k, arch), (s, l) in kernels.items() if s or l]
    assert not problems, "\n".join(problems)


def test_cuda_sources_build_without_warnings(cuda_builds):
    noisy = [f"{name}:\n{log}" for name, rc, log in cuda_builds
             if rc == 0 and re.search(r"\bwarning\b", log, re.IGNORECASE)]
    assert not noisy, "\n\n".join(noisy)
