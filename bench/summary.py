"""Condense a bench.py results JSON into the README's table: flash_ext TFLOP/s per
(head dim, causal, seqlen), with the ratios to SDPA's flash and cuDNN backends.

    python3 bench/summary.py bench/results/bench_h100_fwd_bf16_nvidia-h100-80gb-hbm3.json [--dtype bf16] [--mode fwd]
"""

import argparse
import json
from collections import defaultdict


def ratio(timings, name, ours):
    theirs = timings.get(name, {}).get("median_ms")
    return f"{theirs / ours:.2f}" if theirs else "–"


def table(results, dtype, mode):
    cells = defaultdict(dict)
    seqlens = set()
    for r in results:
        c = r["config"]
        timings = r["timings"].get(mode)
        if c["dtype"] != dtype or not timings:
            continue
        ours = timings["flash_ext"].get("median_ms")
        if not ours:
            continue
        tflops = r["flops"][mode] / ours * 1e-9
        seqlens.add(c["seqlen"])
        cells[(c["hdim"], int(c["causal"]))][c["seqlen"]] = (
            f"{tflops:.0f} ({ratio(timings, 'sdpa_flash', ours)} / {ratio(timings, 'sdpa_cudnn', ours)})")
    seqlens = sorted(seqlens)
    lines = ["| d | causal | " + " | ".join(f"{n // 1024}k" if n >= 1024 else str(n) for n in seqlens) + " |",
             "|---|---|" + "---|" * len(seqlens)]
    for (d, causal), row in sorted(cells.items()):
        lines.append(f"| {d} | {causal} | " + " | ".join(row.get(n, "–") for n in seqlens) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json")
    parser.add_argument("--dtype", help="default: bf16 if the run has it, else its first dtype")
    parser.add_argument("--mode", default="fwd")
    args = parser.parse_args()
    with open(args.json) as f:
        results = json.load(f)["results"]
    if args.dtype is None:
        dtypes = [r["config"]["dtype"] for r in results]
        args.dtype = "bf16" if "bf16" in dtypes or not dtypes else dtypes[0]
    print(f"flash_ext {args.mode} TFLOP/s ({args.dtype}), and in brackets time(SDPA flash) / time(flash_ext) "
          f"and time(SDPA cuDNN) / time(flash_ext):\n")
    print(table(results, args.dtype, args.mode))


if __name__ == "__main__":
    main()
