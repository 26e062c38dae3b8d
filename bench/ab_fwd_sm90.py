"""A/B of Hopper forward sources in the trace harness (bench/trace_fwd_sm90.cu built untraced,
-DNO_TRACE, no torch). Each variant is a csrc directory; the variants take turns at every
shape, and the table gives each one's median TFLOP/s, its change against the first variant,
and whether it printed the first's output hash (O and the LSE, bit for bit); where it did
not, the largest difference from the first's O and LSE of the first (batch, head).

  python3 bench/ab_fwd_sm90.py build DIR main=csrc new=/tmp/new/csrc   # wherever nvcc is
  python3 bench/ab_fwd_sm90.py run DIR [--reps 3] [--shape "D N BATCH HEADS CAUSAL" ...]

`run` needs a Hopper GPU. A binary built on the CPU machine runs on the GPU machine (the same
nvcc): build here, keep DIR inside the work tree (untracked), and run there. ptxas's report
for each variant is kept beside its binary (NAME.ptxas.txt), and where a cuobjdump is found
`build` prints each kernel's steady loop in every variant against the first
(bench/sass_loops.py): a variant whose loop changed is one to A/B with care.
"""

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT / "bench" / "trace_fwd_sm90.cu"
NVCC = ["nvcc", "-std=c++17", "-O3", "--expt-relaxed-constexpr", "-gencode=arch=compute_90a,code=sm_90a",
        "-DNO_TRACE", "-Xptxas=-v"]
# head dim, seqlen, batch, heads, causal: 16k tokens and 2048 = heads x head dim, as bench.py;
# N = 1050 ends in a ragged query block.
SHAPES = [f"{d} {n} {16384 // n} {2048 // d} {c}" for d in (64, 128, 256) for n in (512, 2048) for c in (0, 1)]
SHAPES += ["128 8192 2 16 0", "64 1050 4 32 1", "128 1050 4 16 0"]
RESULT = re.compile(r"([\d.]+) TFLOP/s.*?output hash (\w+)", re.S)


def build(out, variants):
    out.mkdir(parents=True, exist_ok=True)

    def one(name, csrc):
        done = subprocess.run(NVCC + [f"-I{Path(csrc).resolve()}", str(HARNESS), "-o", str(out / name)],
                              capture_output=True, text=True)
        (out / f"{name}.ptxas.txt").write_text(done.stdout + done.stderr)
        spills = sorted(set(re.findall(r"\d+ bytes spill stores, \d+ bytes spill loads", done.stderr)))
        return name, done.returncode, spills

    with ThreadPoolExecutor(len(variants)) as pool:
        for name, code, spills in pool.map(lambda v: one(*v), variants):
            print(f"{name}: nvcc exit {code}; {'; '.join(spills)}")
            if code:
                sys.exit(f"{name} did not build: {out / name}.ptxas.txt")
    (out / "variants").write_text("\n".join(name for name, _ in variants) + "\n")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import sass_loops  # noqa: PLC0415 (beside this file)

    if sass_loops.find_cuobjdump() is None:
        print("(no cuobjdump: the steady loops are not compared)")
    else:
        print("\n".join(sass_loops.table([out / name for name, _ in variants])))


def read_sample(path, shape):
    """The harness's O (as float32) and LSE of the first (batch, head), or None."""
    import numpy as np  # noqa: PLC0415 (only where the harness runs)

    d, n = (int(x) for x in shape.split()[:2])
    try:
        raw = Path(path).read_bytes()
    except OSError:
        return None
    if len(raw) != n * d * 2 + n * 4:
        return None
    o = (np.frombuffer(raw[:n * d * 2], dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)  # bf16
    return o, np.frombuffer(raw[n * d * 2:], dtype=np.float32)


def run_once(exe, shape):
    """(TFLOP/s, hash, sample) of one run, or (None, why, None)."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            done = subprocess.run([str(exe), *shape.split(), f"{tmp}/out.bin"], capture_output=True, text=True,
                                  timeout=60)
        except subprocess.TimeoutExpired:
            return None, "timed out", None
        found = RESULT.search(done.stdout)
        if done.returncode or not found:
            lines = (done.stdout + done.stderr).strip().splitlines()
            return None, lines[-1] if lines else f"exit {done.returncode}", None
        return float(found.group(1)), found.group(2), read_sample(f"{tmp}/out.bin", shape)


def difference(sample, base):
    """", max |dO| x, |dLSE| y" between two samples: equal values (-inf LSEs too) differ by 0, an
    infinity against a number by inf, and a NaN in either makes it nan."""
    import numpy as np  # noqa: PLC0415

    if sample is None or base is None:
        return ""
    gaps = []
    for a, b in zip(sample, base):
        if np.isnan(a).any() or np.isnan(b).any():
            gaps.append(float("nan"))
        else:
            with np.errstate(invalid="ignore"):  # -inf - -inf, taken as 0 by the where
                gaps.append(float(np.where(a == b, 0.0, np.abs(a.astype(np.float64) - b)).max()))
    return f", max |dO| {gaps[0]:.1e}, |dLSE| {gaps[1]:.1e}"


def summarise(results, names, shapes, samples=None):
    """Markdown rows: per shape, the first variant's median TFLOP/s, then each other's with its
    change against the first; "hash differs" where a variant's output was not the first's, with
    the largest differences of its sample from the first's where `samples` has both."""
    samples = samples or {}
    rows = ["| d N batch heads causal | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for shape in shapes:
        cells, base, base_hashes = [], None, None
        for name in names:
            runs = results[shape, name]
            if any(t is None for t, _ in runs):
                cells.append("failed: " + next(why for t, why in runs if t is None))
                continue
            median = statistics.median(t for t, _ in runs)
            hashes = {h for _, h in runs}
            if name == names[0]:
                base, base_hashes = median, hashes
                cells.append(f"{median:.0f}")
            elif base is None:  # the baseline failed: nothing to compare with
                cells.append(f"{median:.0f}")
            else:
                cell = f"{median:.0f} ({100 * (median / base - 1):+.1f}%)"
                if hashes != base_hashes:
                    cell += ", hash differs" + difference(samples.get((shape, name)), samples.get((shape, names[0])))
                cells.append(cell)
        rows.append(f"| {shape} | " + " | ".join(cells) + " |")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build one harness binary per NAME=CSRC_DIR")
    b.add_argument("dir", type=Path)
    b.add_argument("variants", nargs="+", help="NAME=CSRC_DIR; the first is the baseline")
    r = sub.add_parser("run", help="run the built variants in turns and print the table")
    r.add_argument("dir", type=Path)
    r.add_argument("--reps", type=int, default=3, help="runs of each variant per shape (default 3)")
    r.add_argument("--shape", action="append", help='"D N BATCH HEADS CAUSAL" (repeatable; default: a fixed set)')
    args = parser.parse_args()
    if args.command == "build":
        variants = [v.split("=", 1) for v in args.variants]
        if any(len(v) != 2 for v in variants):
            parser.error("each variant is NAME=CSRC_DIR")
        return build(args.dir, variants)
    names = (args.dir / "variants").read_text().split()
    shapes = args.shape or SHAPES
    results, samples = {}, {}
    for shape in shapes:
        for _ in range(args.reps):
            for name in names:
                tflops, said, sample = run_once(args.dir / name, shape)
                results.setdefault((shape, name), []).append((tflops, said))
                samples.setdefault((shape, name), sample)
    print("\n".join(summarise(results, names, shapes, samples)))


if __name__ == "__main__":
    main()
