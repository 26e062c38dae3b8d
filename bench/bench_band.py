"""Sliding windows and soft-capping, timed side by side in one process: flash_ext's band
kernels against flash_ext without them (the full causal kernels), torch's SDPA with the
window as a boolean mask (what SDPA users write; the flash backend takes no mask), and
torch's FlexAttention (a window mask_mod, a soft-capping score_mod; compiled), for the
forward and forward+backward. TFLOP/s count only the (query, key) pairs a window keeps,
4·D FLOPs per pair forward and 2.5 times that backward, for every implementation alike.
The implementations of a case take turns in rounds, so a change of clock falls on all.

    python3 bench/bench_band.py --out bench/results
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import flash_ext

ROOT = Path(__file__).resolve().parents[1]


def visible_pairs(n, left):
    """Causal pairs of one (batch, head) with query i seeing keys i - left .. i (left None: unbounded)."""
    if left is None or left >= n - 1:
        return n * (n + 1) // 2
    w = left + 1  # keys per full row
    return w * (w + 1) // 2 + (n - w) * w  # rows 0..w-1 see i + 1 keys, the rest w


def window_mask(n, left, device):
    i = torch.arange(n, device=device)
    d = i[:, None] - i[None, :]
    return (d >= 0) & (d <= left)


def impls(case, n, d, device):
    """name -> fn(q, k, v) for the case: (left or None, softcap or None)."""
    left, cap = case
    window = None if left is None else (left, 0)
    out = {"flash_ext": lambda q, k, v: flash_ext.attention(q, k, v, causal=True, window=window, softcap=cap)}
    if cap is None:
        if left is None:
            out["sdpa (flash, causal)"] = lambda q, k, v: _sdpa_flash(q, k, v)
        else:
            mask = window_mask(n, left, device)
            out["sdpa (mask)"] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out["flex"] = flex_fn(left, cap)
    return out


def _sdpa_flash(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def flex_fn(left, cap):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    # A fresh compile per case: past dynamo's recompile limit, flex_attention would run
    # unfused (the whole score matrix in memory), which is not what it is timed for.
    torch._dynamo.reset()
    compiled = torch.compile(flex_attention, dynamic=False)
    masks = {}

    def mask_mod(b, h, qi, ki):
        keep = ki <= qi
        return keep if left is None else keep & (qi - ki <= left)

    def score_mod(score, b, h, qi, ki):
        return cap * torch.tanh(score / cap)

    def fn(q, k, v):
        n = q.shape[2]
        if n not in masks:
            masks[n] = create_block_mask(mask_mod, None, None, n, n, device=q.device)
        return compiled(q, k, v, block_mask=masks[n], score_mod=None if cap is None else score_mod)

    return fn


def times_ms(fn, sets, mode, reps, warmup):
    """CUDA-event times of reps calls after warmup, the input sets rotated."""
    def call(s):
        q, k, v, do = s
        o = fn(q, k, v)
        if mode == "fwd_bwd":
            torch.autograd.grad(o, (q, k, v), do)

    for i in range(warmup):
        call(sets[i % len(sets)])
    times = []
    for r in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call(sets[r % len(sets)])
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hdims", default="64,128")
    p.add_argument("--seqlens", default="4096,16384")
    p.add_argument("--window", type=int, default=1024, help="keys per row: window (window - 1, 0) with causal")
    p.add_argument("--softcap", type=float, default=30.0)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--reps", type=int, default=10, help="timed calls per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--no-flex", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    opts = p.parse_args()
    device = torch.device("cuda")
    dtype = torch.bfloat16
    cases = [(None, None), (opts.window - 1, None), (None, opts.softcap), (opts.window - 1, opts.softcap)]
    rows = []
    for d in (int(x) for x in opts.hdims.split(",")):
        for n in (int(x) for x in opts.seqlens.split(",")):
            b, h = max(1, opts.tokens // n), opts.hidden // d
            gen = torch.Generator(device=device).manual_seed(n + d)
            sets = [[torch.randn(b, h, n, d, device=device, generator=gen, dtype=dtype).requires_grad_(i < 3)
                     for i in range(4)] for _ in range(2)]
            for case in cases:
                pairs = visible_pairs(n, case[0]) * b * h
                fns = {name: fn for name, fn in impls(case, n, d, device).items() if not (name == "flex" and opts.no_flex)}
                for mode in ("fwd", "fwd_bwd"):
                    samples = {name: [] for name in fns}
                    started = time.time()
                    for _ in range(opts.rounds):
                        for name, fn in fns.items():
                            if samples[name] is None:
                                continue
                            try:
                                samples[name] += times_ms(fn, sets, mode, opts.reps, opts.warmup)
                            except Exception as err:  # an implementation that cannot run this case
                                print(f"d={d} n={n} {case} {name} {mode}: {type(err).__name__}: {str(err)[:200]}")
                                samples[name] = None
                    for name, got in samples.items():
                        if not got:
                            continue
                        ms = statistics.median(got)
                        flop = 4 * d * pairs * (1 if mode == "fwd" else 3.5)
                        rows.append(dict(d=d, n=n, window=None if case[0] is None else case[0] + 1, softcap=case[1],
                                         impl=name, mode=mode, ms=ms, tflops=flop / ms / 1e9))
                        print(f"d={d:3d} n={n:5d} window={rows[-1]['window']} softcap={case[1]} {name:22s} {mode:7s} "
                              f"{ms:8.3f} ms {rows[-1]['tflops']:6.1f} TFLOP/s ({time.time() - started:.0f} s)",
                              flush=True)
    opts.out.mkdir(parents=True, exist_ok=True)
    meta = {"gpu": torch.cuda.get_device_name(device), "torch": torch.__version__, "dtype": "bf16",
            "tokens": opts.tokens, "hidden": opts.hidden}
    (opts.out / "bench_band.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# Windows and soft-capping, causal, bf16, {meta['gpu']}, torch {meta['torch']}",
             "", "| d | N | window | softcap | impl | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    keyed = {}
    for r in rows:
        keyed.setdefault((r["d"], r["n"], r["window"], r["softcap"], r["impl"]), {})[r["mode"]] = r
    for (d, n, w, cap, impl), m in keyed.items():
        f, fb = m.get("fwd"), m.get("fwd_bwd")
        cell = lambda r: (f"{r['ms']:.3f}", f"{r['tflops']:.0f}") if r else ("—", "—")
        lines.append(f"| {d} | {n} | {w or '—'} | {cap or '—'} | {impl} | {' | '.join(cell(f))} | {' | '.join(cell(fb))} |")
    (opts.out / "bench_band.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
