"""The steady loop of each Hopper forward kernel in the machine code (SASS), read with cuobjdump.

A kernel's steady loop is the smallest loop (a backward branch and the instructions it jumps
over) that holds wgmma instructions (HGMMA): one key tile, S = Q Kᵀ and O += P V. Its
instruction count, its moves from ordinary to uniform registers (R2UR: wgmma takes its
shared-memory descriptors from uniform registers, and a loop whose descriptors ptxas computed
in ordinary ones moves four before every HGMMA) and its local-memory loads and stores
(spills) say whether a change kept the loop that earlier builds had; the loop's schedule can
move 2-3% at head dim 256 with its instructions unchanged (bench/PERFORMANCE.md, H6), so two
builds are also compared opcode by opcode.

  python3 bench/sass_loops.py BINARY [BINARY ...] [--kernel SUBSTRING]

Each BINARY is an executable, object file or cubin holding sm_90a code (bench/ab_fwd_sm90.py
builds, nvcc -c outputs). With two or more, each row gives the later ones against the first.
cuobjdump comes from PATH, CUDA_HOME or Triton's package (which carries one).
"""

import argparse
import difflib
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);")
BACKWARD_TARGET = re.compile(r"\bBRA\b.*?0x([0-9a-f]+)")


def find_cuobjdump():
    """The path of a cuobjdump, or None."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    if (Path(home) / "bin" / "cuobjdump").exists():
        return str(Path(home) / "bin" / "cuobjdump")
    try:
        import triton  # noqa: PLC0415 (optional: Triton's wheel carries the CUDA binary tools)
    except ImportError:
        return None
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else None


@dataclass
class Loop:
    opcodes: list  # in address order, predicates dropped: "HGMMA.64x128x16.F32.BF16", "R2UR", ...

    def count(self, prefix):
        return sum(op.startswith(prefix) for op in self.opcodes)

    @property
    def local(self):
        return self.count("LDL") + self.count("STL")


def functions(sass):
    """{kernel name: its SASS text} from cuobjdump -sass output."""
    parts = re.split(r"\n\s*Function : ", "\n" + sass)[1:]
    return {part.split("\n", 1)[0].strip(): part for part in parts}


def steady_loop(function_sass):
    """The smallest loop holding HGMMA in one function's SASS, or None."""
    instructions = [(int(address, 16), text.strip()) for address, text in INSTRUCTION.findall(function_sass)]
    position = {address: i for i, (address, _) in enumerate(instructions)}
    best = None
    for i, (address, text) in enumerate(instructions):
        found = BACKWARD_TARGET.search(text)
        target = int(found.group(1), 16) if found else None
        if target is None or target >= address or target not in position:
            continue
        body = [re.sub(r"^@!?U?P\w+\s+", "", t).split()[0] for _, t in instructions[position[target]:i + 1]]
        if any(op.startswith("HGMMA") for op in body) and (best is None or len(body) < len(best.opcodes)):
            best = Loop(body)
    return best


def steady_loops(binary, cuobjdump=None, kernel="fwd_kernel_sm90"):
    """{kernel name: Loop or None} for the kernels of `binary` whose names contain `kernel`."""
    cuobjdump = cuobjdump or find_cuobjdump()
    if cuobjdump is None:
        raise RuntimeError("no cuobjdump: put the CUDA toolkit's bin on PATH or install triton")
    done = subprocess.run([cuobjdump, "-sass", str(binary)], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"cuobjdump -sass {binary}: {done.stderr.strip()}")
    return {name: steady_loop(text) for name, text in functions(done.stdout).items() if kernel in name}


def short_name(name):
    """The template arguments of a Hopper forward kernel's mangled name, readably."""
    found = re.search(r"FwdTileSm90ILi(\d+)ELi(\d+)ELi(\d+)ELi(\d+)ELi(\d+)EEELb(\d)ELb(\d)ELb(\d)ELb(\d)E", name)
    if not found:
        return name
    d, bn, stages, consumers, _, causal, band, softcap, overlap = found.groups()
    dtype = "bf16" if "bfloat16" in name else "fp16"
    flags = [f for f, on in (("causal", causal), ("band", band), ("softcap", softcap), ("overlap", overlap)) if on == "1"]
    return " ".join([f"{dtype} d={d} BN={bn} x{consumers}"] + flags)


def describe(loop):
    if loop is None:
        return "no loop with HGMMA"
    return f"{len(loop.opcodes)} instr, {loop.count('HGMMA')} HGMMA, {loop.count('R2UR')} R2UR, {loop.local} local"


def compare(base, other):
    """How `other`'s loop differs from `base`'s: instruction count and the share in the same order."""
    if base is None or other is None:
        return describe(other)
    same = difflib.SequenceMatcher(a=base.opcodes, b=other.opcodes, autojunk=False)
    in_order = sum(block.size for block in same.get_matching_blocks()) / max(len(base.opcodes), len(other.opcodes))
    return f"{describe(other)} ({len(other.opcodes) - len(base.opcodes):+d}, {100 * in_order:.0f}% in order)"


def table(binaries, kernel="fwd_kernel_sm90"):
    """Markdown rows: per kernel of the first binary, its steady loop in each binary."""
    loops = [steady_loops(b, kernel=kernel) for b in binaries]
    rows = ["| kernel | " + " | ".join(Path(b).name for b in binaries) + " |", "|---" * (len(binaries) + 1) + "|"]
    for name, base in loops[0].items():
        cells = [describe(base)] + [compare(base, other.get(name)) if name in other else "absent" for other in loops[1:]]
        rows.append(f"| {short_name(name)} | " + " | ".join(cells) + " |")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("binaries", nargs="+")
    parser.add_argument("--kernel", default="fwd_kernel_sm90", help="only kernels whose names contain this")
    args = parser.parse_args()
    try:
        print("\n".join(table(args.binaries, args.kernel)))
    except RuntimeError as error:
        sys.exit(str(error))


if __name__ == "__main__":
    main()
