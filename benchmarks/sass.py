"""Static SASS counts of the row kernels' hot loops, and the bandwidth their instruction stream allows.

    python -m benchmarks.sass [--arch 90] [--save]

No GPU needed. Each Triton kernel is compiled as its launcher would launch it (``benchmarks.launched``), each
CUDA source with nvcc as the build compiles it; both are disassembled with nvdisasm. For every innermost loop
that reads global memory the table gives its instructions, MUFU (exp2/log2/rcp), SHFL and BAR counts, the
bytes it loads per thread, and so instructions per element. From those, two ceilings for an H100/H200 SM:
issue (4 warp instructions per clock) and MUFU (16 lanes per clock), as GB/s of the row's dtype over all SMs,
next to HBM bandwidth. These are static counts over the loop body (both sides of a branch counted), not a
measurement: latency, dual issue and divergence are ignored. Not measured on a GPU.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Hopper datasheet figures: 132 SMs at a 1.98 GHz boost clock (H100 SXM and H200); HBM3 / HBM3e bandwidth.
SMS, CLOCK_HZ = 132, 1.98e9
ISSUE_LANES_PER_CLOCK = 4 * 32  # four schedulers, one warp instruction each
MUFU_LANES_PER_CLOCK = 16
HBM_GBS = {"H100 SXM": 3350, "H200": 4800}

_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_TARGET = re.compile(r"`\((\.L_x_\d+)\)")
_FUNC = re.compile(r"^\.text\.(\S+):")
_LINE = re.compile(r'//## File "([^"]+)", line (\d+)')
MIN_LOOP_INSTRUCTIONS = 64
_LDG_BYTES = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}


@dataclass
class Instr:
    addr: int
    opcode: str
    operands: str
    source: tuple = ("", 0)  # (file, line) of the line-table entry in force (nvdisasm -g)


@dataclass
class LoopCounts:
    function: str
    start: int
    end: int
    instructions: int
    mufu: int
    shfl: int
    bar: int
    load_bytes: int
    where: str = ""  # source lines of the loop body in the kernel's own file, e.g. "sampling.py:212-240"

    def per_element(self, elem_bytes: int) -> tuple[float, float]:
        """(instructions, MUFU) per element of ``elem_bytes`` loaded in this loop."""
        elements = self.load_bytes / elem_bytes
        return self.instructions / elements, self.mufu / elements


def parse_functions(sass: str) -> dict[str, tuple[list[Instr], dict[str, int]]]:
    """{function: (instructions, {label: address})} from ``nvdisasm -c -g`` output."""
    functions: dict = {}
    current = None
    pending_labels: list[str] = []
    source = ("", 0)
    for line in sass.splitlines():
        stripped = line.strip()
        func = _FUNC.match(stripped)
        if func:
            current = functions.setdefault(func.group(1), ([], {}))
            continue
        loc = _LINE.search(stripped)
        if loc:
            source = (loc.group(1), int(loc.group(2)))
            continue
        label = _LABEL.match(stripped)
        if label:
            pending_labels.append(label.group(1))
            continue
        instr = _INSTR.search(line)
        if instr and current is not None:
            addr = int(instr.group(1), 16)
            for name in pending_labels:
                current[1][name] = addr
            pending_labels = []
            current[0].append(Instr(addr, instr.group(2), instr.group(3), source))
    return functions


def _load_bytes(instr: Instr) -> int:
    if not instr.opcode.startswith("LDG"):
        return 0
    for part in instr.opcode.split(".")[1:]:
        if part in _LDG_BYTES:
            return _LDG_BYTES[part]
    return 4


def _counts(name: str, body: list[Instr]) -> LoopCounts:
    def count(prefix):
        return sum(i.opcode.startswith(prefix) for i in body)
    return LoopCounts(name, body[0].addr, body[-1].addr, len(body), count("MUFU"), count("SHFL"), count("BAR"),
                      sum(_load_bytes(i) for i in body), _source_span(body))


def _source_span(body: list[Instr]) -> str:
    """Where the loop reads its row: ``file:line`` of its first global load when that lies in a kernel source
    (.py, .cu), else the span of lines of the loop's most frequent kernel source (the CUDA row reader's loads sit
    in a shared header)."""
    kernel_file = re.compile(r"\.(py|cu)$")
    for i in body:
        if i.opcode.startswith("LDG") and kernel_file.search(i.source[0]):
            return f"{os.path.basename(i.source[0])}:{i.source[1]}"
    files = Counter(i.source[0] for i in body if kernel_file.search(i.source[0]))
    if not files:
        return ""
    main = files.most_common(1)[0][0]
    lines = [i.source[1] for i in body if i.source[0] == main]
    return f"{os.path.basename(main)}:{min(lines)}-{max(lines)}"


def innermost_loops(name: str, instrs: list[Instr], labels: dict[str, int],
                    min_instructions: int = MIN_LOOP_INSTRUCTIONS) -> list[LoopCounts]:
    """Loops are backward branches; innermost ones contain no other loop. Returned: the innermost loops that
    load global memory, but for short ones (scalar head and tail loops of the CUDA row reader)."""
    loops = set()
    for ins in instrs:
        if ins.opcode.startswith("BRA"):
            target = _TARGET.search(ins.operands)
            if target and labels.get(target.group(1), ins.addr + 1) <= ins.addr:
                loops.add((labels[target.group(1)], ins.addr))
    inner = [(s, e) for s, e in loops if not any((s2, e2) != (s, e) and s <= s2 and e2 <= e for s2, e2 in loops)]
    out = []
    for s, e in sorted(inner):
        counts = _counts(name, [i for i in instrs if s <= i.addr <= e])
        if counts.load_bytes:
            out.append(counts)
    if not out and instrs:  # a kernel without a row loop (one tile per program): the whole kernel
        whole = _counts(name, instrs)
        return [whole] if whole.load_bytes else []
    return [c for c in out if c.instructions >= min_instructions]


def nvdisasm(cubin: bytes) -> str:
    from benchmarks.launched import nvdisasm_path

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([nvdisasm_path(), "-c", "-g", path], check=True, capture_output=True, text=True).stdout


def triton_loops(cap: int) -> list[tuple[str, LoopCounts, int]]:
    """Innermost loading loops of every realistic Triton row-kernel launch: (label, counts, element bytes)."""
    from benchmarks.launched import capture_launches, compile_launch, realistic_launches

    out = []
    for launch in capture_launches(realistic_launches()):
        if "linear" in launch.label:  # tile GEMMs: their loops are MMA loops, not row reads
            continue
        elem = 2 if "bf16" in launch.label else 4
        compiled = compile_launch(launch, cap)
        for name, (instrs, labels) in parse_functions(nvdisasm(compiled.cubin)).items():
            out += [(f"triton {launch.label}", loop, elem) for loop in innermost_loops(name, instrs, labels)]
    return out


def _demangle(name: str) -> str:
    cxxfilt = shutil.which("c++filt")
    if cxxfilt:
        name = subprocess.run([cxxfilt, name], capture_output=True, text=True).stdout.strip() or name
    name = re.sub(r"prefkern::cuda::\(anonymous namespace\)::", "", name)
    return re.sub(r"\(.*\)$", "", name)


def cuda_loops(cap: int) -> list[tuple[str, LoopCounts, int]]:
    """Innermost loading loops of the bf16 instantiations in every CUDA source."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return []
    arch = f"sm_{cap}a" if cap >= 90 else f"sm_{cap}"
    out = []
    with tempfile.TemporaryDirectory() as d:
        for source in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
            cubin = os.path.join(d, source.stem + ".cubin")
            subprocess.run([nvcc, "-std=c++17", "-O3", f"-gencode=arch=compute_{arch[3:]},code={arch}",
                            "-lineinfo", f"-I{ROOT / 'csrc'}", "-cubin", str(source), "-o", cubin], check=True)
            with open(cubin, "rb") as f:
                functions = parse_functions(nvdisasm(f.read()))
            for name, (instrs, labels) in functions.items():
                pretty = _demangle(name)
                if "bfloat16" in pretty:
                    out += [(f"cuda {source.name}", loop, 2) for loop in innermost_loops(pretty, instrs, labels)]
    return out


def ceilings(instr_per_element: float, mufu_per_element: float, elem_bytes: int) -> tuple[float, float]:
    """(issue-bound GB/s, MUFU-bound GB/s) over all SMs for a loop with these per-element counts."""
    issue = SMS * CLOCK_HZ * ISSUE_LANES_PER_CLOCK / instr_per_element * elem_bytes / 1e9
    if not mufu_per_element:
        return issue, float("inf")
    return issue, SMS * CLOCK_HZ * MUFU_LANES_PER_CLOCK / mufu_per_element * elem_bytes / 1e9


def table(rows: list[tuple[str, LoopCounts, int]]) -> str:
    hbm = ", ".join(f"{k} {v} GB/s" for k, v in HBM_GBS.items())
    lines = [f"Static SASS counts, innermost loops that load the row (per element of the row's dtype); ceilings "
             f"over {SMS} SMs at {CLOCK_HZ / 1e9:.2f} GHz; HBM: {hbm}. Not measured on a GPU.", "",
             "| launch | kernel | loop (source lines) | instr | MUFU | SHFL | BAR | B loaded/thread | instr/elem "
             "| MUFU/elem | issue-bound GB/s | MUFU-bound GB/s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for where, loop, elem_bytes in rows:
        ipe, mpe = loop.per_element(elem_bytes)
        issue, mufu = ceilings(ipe, mpe, elem_bytes)
        kernel = loop.function if len(loop.function) < 60 else loop.function[:57] + "..."
        span = loop.where or f"{loop.start:#06x}-{loop.end:#06x}"
        lines.append(f"| {where} | `{kernel}` | {span} | {loop.instructions} | "
                     f"{loop.mufu} | {loop.shfl} | {loop.bar} | {loop.load_bytes} | {ipe:.1f} | {mpe:.2f} | "
                     f"{issue:.0f} | {'-' if mufu == float('inf') else f'{mufu:.0f}'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sass", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability (80 or 90)")
    parser.add_argument("--save", action="store_true", help="write benchmarks/results/sass_sm<arch>.md")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    text = table(triton_loops(args.arch) + cuda_loops(args.arch))
    print(text)
    if args.save:
        import datetime

        import triton

        from benchmarks.report import git_commit

        date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        nvcc = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
        path = ROOT / "benchmarks" / "results" / f"sass_sm{args.arch}.md"
        command = f"python -m benchmarks.sass --arch {args.arch} --save"
        stamp = f"{date}, commit `{git_commit()}`, triton {triton.__version__}, {nvcc}."
        path.write_text(f"# Static SASS counts, sm_{args.arch} (`{command}`)\n\n{stamp}\n\n{text}\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
