"""Side-by-side benchmark of flash_ext.attention against torch SDPA.

    python bench/bench.py                      # full sweep: forward, backward, forward+backward
    python bench/bench.py --mode fwd --quick   # small subset, forward only
    python bench/bench.py --memory             # peak memory, flash_ext vs SDPA math (fwd, fwd+bwd)
    python bench/bench.py --profile-one bf16,128,4096,1 --mode bwd   # one config, for ncu

Every configuration is timed for flash_ext and for each SDPA backend pinned in
turn (flash, cuDNN, memory-efficient, math) plus SDPA's own choice, in one
process. Times are CUDA-event medians over calls that rotate among several
input sets (together larger than twice the L2 cache), after a warm-up. The
implementations take turns in rounds (--rounds), so a clock or power change
during the run falls on all of them, not on whichever happened to run then.
Before timing, flash_ext's output is compared against SDPA's default output.

Results go to bench/results/ as JSON (raw numbers and metadata), a markdown
table (also printed) and a PNG of TFLOP/s against sequence length.
Without a GPU, the reference implementation is run at a small size on the CPU
against SDPA's CPU path, so the harness itself can be checked anywhere.
"""

import argparse
import contextlib
import dataclasses
import datetime
import gc
import itertools
import json
import math
import platform
import re
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "bench" / "results"

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}

# Implementation name -> SDPA backend to pin (None: no pinning).
SDPA_BACKENDS = {
    "sdpa_flash": "FLASH_ATTENTION",
    "sdpa_cudnn": "CUDNN_ATTENTION",
    "sdpa_efficient": "EFFICIENT_ATTENTION",
    "sdpa_math": "MATH",
    "sdpa_default": None,
}
GPU_IMPLS = ["flash_ext", *SDPA_BACKENDS]
# Only when --impls names them: flash_ext with deterministic=True; flash_ext with its sm_80
# forward forced where the Hopper forward would run (to compare the two on an H100).
OPTIONAL_IMPLS = ["flash_ext_det", "flash_ext_sm80"]
CPU_IMPLS = ["flash_ext", "sdpa_math", "sdpa_default"]
MEMORY_IMPLS = ["flash_ext", "sdpa_math"]
MODES = ["fwd", "bwd", "fwd_bwd"]
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}

# Sweep defaults: (GPU, CPU). The GPU grid keeps batch·seqlen and heads·head_dim fixed.
GRID = {
    "dtypes": (["bf16", "fp16"], ["fp32"]),
    "hdims": ([64, 128, 256], [64]),
    "seqlens": ([512, 1024, 2048, 4096, 8192, 16384], [128, 256, 512]),
    "tokens": (16384, 128),   # batch = tokens // seqlen (at least 1)
    "hidden": (2048, 128),    # heads = hidden // head_dim
}
QUICK = {"dtypes": (["bf16"], ["fp32"]), "hdims": ([64, 128], [64]), "seqlens": ([1024, 4096], [128, 256])}
MEMORY_GRID = {"dtypes": ["bf16"], "hdims": [64, 128], "seqlens": [4096, 8192, 16384, 32768, 65536]}

# Output max-abs-diff against SDPA above tol · max(1, max|ref|) prints a warning.
CHECK_TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}
L2_FALLBACK_BYTES = 50 * 2**20
GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Config:
    dtype: str
    hdim: int
    seqlen: int
    causal: bool
    batch: int
    heads: int

    @property
    def torch_dtype(self):
        return DTYPES[self.dtype]

    def label(self):
        return (f"{self.dtype} d={self.hdim} N={self.seqlen} {'causal' if self.causal else 'full'} "
                f"b={self.batch} h={self.heads}")


@dataclasses.dataclass
class Inputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    dout: torch.Tensor


# --------------------------------------------------------------------------- helpers

def import_flash_ext():
    """Import flash_ext from this repository (where an in-place build puts _C)."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    import flash_ext
    return flash_ext


def flash_ext_paths(flash_ext, device):
    """Which code flash_ext runs here for fp16/bf16: the compiled kernels or the reference."""
    info = {"extension_built": flash_ext.interface._C is not None, "file": getattr(flash_ext, "__file__", None)}
    info.update(flash_ext.interface.implementation(device))
    return info


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def flops(cfg, mode):
    """FLOPs of one call: forward 4·b·h·nq·nk·d (halved when causal), backward 2.5×, both 3.5×."""
    fwd = 4 * cfg.batch * cfg.heads * cfg.seqlen * cfg.seqlen * cfg.hdim
    if cfg.causal:
        fwd /= 2
    return fwd * FLOP_FACTOR[mode]


def scores_bytes(cfg):
    """Size of one call's N×N float32 score matrix (what SDPA math materialises)."""
    return cfg.batch * cfg.heads * cfg.seqlen * cfg.seqlen * 4


def l2_bytes(device):
    if device.type != "cuda":
        return 0
    return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or L2_FALLBACK_BYTES


def input_set_count(cfg, device):
    """Enough input sets (at least 3) that together they exceed twice the L2 cache."""
    set_bytes = 4 * cfg.batch * cfg.heads * cfg.seqlen * cfg.hdim * cfg.torch_dtype.itemsize
    return max(3, min(64, math.ceil(2 * l2_bytes(device) / set_bytes)))


def make_inputs(cfg, device, n_sets, seed=0):
    """n_sets independent random-normal (q, k, v, dout) sets; q, k, v are leaves requiring grad."""
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (cfg.batch, cfg.heads, cfg.seqlen, cfg.hdim)

    def randn(grad):
        return torch.randn(shape, generator=gen, device=device, dtype=cfg.torch_dtype).requires_grad_(grad)

    return [Inputs(randn(True), randn(True), randn(True), randn(False)) for _ in range(n_sets)]


def attend(impl, flash_ext, q, k, v, causal):
    if impl == "flash_ext_sm80":
        flash_ext.interface._C.set_force_sm80(True)
        try:
            return flash_ext.attention(q, k, v, causal=causal)
        finally:
            flash_ext.interface._C.set_force_sm80(False)
    if impl in ("flash_ext", "flash_ext_det"):
        return flash_ext.attention(q, k, v, causal=causal, deterministic=impl == "flash_ext_det")
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def backend_context(impl):
    """Pin SDPA to impl's backend; flash_ext and sdpa_default run unpinned."""
    name = SDPA_BACKENDS.get(impl)
    if name is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel(getattr(SDPBackend, name))


def build(mode, impl, flash_ext, causal, sets):
    """Return (fn, args): fn(args[i]) is one timed call of `mode`.

    fwd: forward without autograd. fwd_bwd: forward then torch.autograd.grad.
    bwd: the forward runs here once per input set; only the backward is timed.
    """
    def fwd(s):
        return attend(impl, flash_ext, s.q, s.k, s.v, causal)

    if mode == "fwd":
        def fn(s):
            with torch.no_grad():
                return fwd(s)
        return fn, sets
    if mode == "fwd_bwd":
        return (lambda s: torch.autograd.grad(fwd(s), (s.q, s.k, s.v), s.dout)), sets
    outs = [(fwd(s), s) for s in sets]
    return (lambda a: torch.autograd.grad(a[0], (a[1].q, a[1].k, a[1].v), a[1].dout, retain_graph=True)), outs


def time_fn(fn, args, warmup, reps, device):
    """Per-call times in ms: warm-up, then reps calls rotating over args.

    CUDA events around each call on the GPU, perf_counter on the CPU.
    """
    for i in range(warmup):
        fn(args[i % len(args)])
    sync(device)
    if device.type != "cuda":
        times = []
        for i in range(reps):
            t0 = time.perf_counter()
            fn(args[i % len(args)])
            times.append((time.perf_counter() - t0) * 1e3)
        return times
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for i, (start, end) in enumerate(events):
        start.record()
        fn(args[(warmup + i) % len(args)])
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) for start, end in events]


def failure_reason(err, caught):
    """The first line of the error plus the warnings it came with (SDPA says there why a backend cannot run)."""
    lines = [str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__]
    lines += [" ".join(str(w.message).split()) for w in caught]
    return "; ".join(dict.fromkeys(lines))[:600]


def is_fatal(err):
    """True for a CUDA error that left the context unusable (illegal address, ...): stop the run.

    A launch error that the context survives is recorded like any other failure.
    """
    accel = getattr(torch, "AcceleratorError", None)
    if not torch.cuda.is_available() or not ((accel is not None and isinstance(err, accel)) or "CUDA error" in str(err)):
        return False
    try:
        torch.cuda.synchronize()
        torch.ones(1, device="cuda").add_(1).item()
    except Exception:
        return True
    return False


# --------------------------------------------------------------------------- one configuration

def check(cfg, flash_ext, sets, with_grads):
    """max|flash_ext - SDPA default| of the output (and of dq, dk, dv when with_grads)."""
    s = sets[0]
    try:
        results = []
        for impl in ("flash_ext", "sdpa_default"):
            with torch.set_grad_enabled(with_grads):
                out = attend(impl, flash_ext, s.q, s.k, s.v, cfg.causal)
                grads = torch.autograd.grad(out, (s.q, s.k, s.v), s.dout) if with_grads else ()
            results.append((out.detach(), *grads))
        diffs = {}
        for name, a, b in zip(("out", "dq", "dk", "dv"), *results):
            diffs[name] = (a.float() - b.float()).abs().max().item()
            diffs[name + "_ref_absmax"] = b.float().abs().max().item()
        tol = CHECK_TOL.get(cfg.torch_dtype, 1e-2)
        bad = [n for n in ("out", "dq", "dk", "dv")
               if n in diffs and not diffs[n] <= tol * max(1.0, diffs[n + "_ref_absmax"])]
        return {**diffs, "tol": tol, "ok": not bad, "bad": bad}
    except Exception as err:  # a flash_ext that raises is reported, and its timings will say why
        if is_fatal(err):
            raise
        return {"ok": False, "error": failure_reason(err, [])}


def call_plan(impl, mode, cfg, flash_ext, sets, opts, device):
    """(warm-up calls, timed calls) for one (mode, implementation), sized by the cost of one call.

    The first call raises when the backend cannot run this configuration."""
    fn, args = build(mode, impl, flash_ext, cfg.causal, sets)
    fn(args[0])
    est = max(time_fn(fn, args, 0, 1, device)[0], 1e-3)  # a second call, to size the warm-up and repetitions
    reps = int(min(opts.reps, max(opts.min_reps, opts.budget_ms / est)))
    warmup = int(min(opts.warmup, 0.25 * opts.budget_ms / est))
    return warmup, reps


def guarded(impl, what, device):
    """what() under impl's SDPA backend: (its value, None), or (None, a status) when the backend
    cannot run it. Never raises for an unsupported backend."""
    with backend_context(impl), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return what(), None
        except torch.cuda.OutOfMemoryError as err:
            return None, {"status": "OOM", "reason": failure_reason(err, [])}
        except Exception as err:
            if is_fatal(err):
                raise
            return None, {"status": "unavailable", "reason": failure_reason(err, caught)}
        finally:
            free_memory(device)  # the outputs and autograd graphs of the calls are gone by now


def measure(impls, mode, cfg, flash_ext, sets, opts, device, progress):
    """Median time of each implementation on one configuration, timed in rounds: each round runs
    every implementation's share of the calls in turn (after a short warm-up), so a change of
    clock or power state during the measurement falls on all of them alike."""
    results, plans = {}, {}
    for impl in impls:
        progress.status(f"{cfg.label()} {mode} {impl}")
        if impl == "sdpa_math" and scores_bytes(cfg) > opts.math_budget_gib * GiB:
            results[impl] = {"status": "skipped (memory)",
                             "reason": f"N×N float32 scores {scores_bytes(cfg) / GiB:.1f} GiB > budget "
                                       f"{opts.math_budget_gib} GiB"}
            continue
        plan, failure = guarded(impl, lambda: call_plan(impl, mode, cfg, flash_ext, sets, opts, device), device)
        if failure:
            results[impl] = failure
        else:
            plans[impl] = plan
    times = {impl: [] for impl in plans}
    for round_ in range(opts.rounds):
        for impl, (warmup, reps) in list(plans.items()):
            progress.status(f"{cfg.label()} {mode} round {round_ + 1}/{opts.rounds}")

            def timed_round():
                fn, args = build(mode, impl, flash_ext, cfg.causal, sets)
                share = math.ceil(reps / opts.rounds)
                return time_fn(fn, args, math.ceil(warmup / opts.rounds), share, device)

            got, failure = guarded(impl, timed_round, device)
            if failure:
                results[impl] = failure
                del plans[impl]
            else:
                times[impl] += got
    for impl, (warmup, _) in plans.items():
        ts = times[impl]
        ms = statistics.median(ts)
        results[impl] = {"status": "ok", "median_ms": ms, "min_ms": min(ts), "mean_ms": statistics.fmean(ts),
                         "reps": len(ts), "rounds": opts.rounds, "warmup": warmup, "times_ms": ts,
                         "tflops": flops(cfg, mode) / (ms * 1e-3) / 1e12}
    return {impl: results[impl] for impl in impls}


def run_config(cfg, flash_ext, impls, modes, opts, device, progress):
    """Check correctness once, then time every (mode, implementation) of one configuration."""
    n_sets = input_set_count(cfg, device)
    sets = make_inputs(cfg, device, n_sets)
    chk = check(cfg, flash_ext, sets, any(m != "fwd" for m in modes))
    if not chk["ok"]:
        progress.write(f"WARNING {cfg.label()}: flash_ext disagrees with SDPA or failed: "
                       f"{chk.get('error') or {n: chk[n] for n in chk['bad']}}")
    timings = {}
    for mode in modes:
        timings[mode] = measure(impls, mode, cfg, flash_ext, sets, opts, device, progress)
        base = timings[mode].get("flash_ext", {})
        for r in timings[mode].values():
            if r["status"] == "ok" and base.get("status") == "ok":
                r["ratio_vs_flash_ext"] = r["median_ms"] / base["median_ms"]
    del sets
    free_memory(device)
    return {"config": dataclasses.asdict(cfg), "input_sets": n_sets,
            "flops": {m: flops(cfg, m) for m in modes}, "check": chk, "timings": timings}


# --------------------------------------------------------------------------- memory mode

def peak_memory(impl, mode, cfg, flash_ext, device):
    """Peak bytes allocated by one call beyond its inputs, or a status string."""
    need = scores_bytes(cfg) * (2 if mode == "fwd" else 4)  # rough size of SDPA math's N×N buffers
    if impl == "sdpa_math" and need > torch.cuda.mem_get_info(device)[0]:
        return "skipped (memory)"
    try:
        with backend_context(impl):
            sets = make_inputs(cfg, device, 1)
            fn, args = build(mode, impl, flash_ext, cfg.causal, sets)
            free_memory(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            out = fn(args[0])
            sync(device)
            peak = torch.cuda.max_memory_allocated(device) - base
            del out, fn, args, sets
    except torch.cuda.OutOfMemoryError:
        peak = "OOM"
    except Exception as err:
        if is_fatal(err):
            raise
        peak = "unavailable: " + failure_reason(err, [])
    free_memory(device)
    return peak


def run_memory(flash_ext, opts, device):
    """Peak memory over sequence lengths (batch 1), forward and, with --mode fwd_bwd/all, forward+backward."""
    modes = ["fwd"] + (["fwd_bwd"] if opts.mode in ("fwd_bwd", "all") else [])
    pick = lambda key: getattr(opts, key) or MEMORY_GRID[key]
    points = [(Config(dt, d, n, c, 1, opts.mem_heads), mode, impl)
              for dt in pick("dtypes") for d in pick("hdims") for c in opts.causal_list(False) for mode in modes
              for impl in MEMORY_IMPLS for n in sorted(pick("seqlens"))]
    progress = Progress(len(points))
    rows = []
    for cfg, mode, impl in points:
        progress.status(f"{cfg.label()} {mode} {impl}")
        # Once an implementation ran out of memory, longer sequences are not tried.
        series = (impl, mode, dataclasses.replace(cfg, seqlen=0))
        prev = rows[-1]["peak_bytes"] if rows and rows[-1]["series"] == series else None
        if prev in ("OOM", "skipped (after OOM)"):
            peak = "skipped (after OOM)"
        else:
            peak = peak_memory(impl, mode, cfg, flash_ext, device)
        rows.append({"config": dataclasses.asdict(cfg), "mode": mode, "impl": impl, "peak_bytes": peak, "series": series})
        progress.update()
    progress.close()
    return [{k: v for k, v in r.items() if k != "series"} for r in rows]


def memory_markdown(rows, meta):
    seqlens = sorted({r["config"]["seqlen"] for r in rows})
    lines = [f"# flash_ext peak memory ({meta['device']})", "", meta_lines(meta), "",
             "Peak of torch.cuda.max_memory_allocated during one call, minus the inputs (MiB), "
             f"batch 1, {rows[0]['config']['heads'] if rows else '?'} heads.", "",
             "| dtype | d | causal | mode | impl | " + " | ".join(map(str, seqlens)) + " |",
             "|" + "---|" * (5 + len(seqlens))]
    groups = {}
    for r in rows:
        c = r["config"]
        groups.setdefault((c["dtype"], c["hdim"], c["causal"], r["mode"], r["impl"]), {})[c["seqlen"]] = r["peak_bytes"]
    for (dt, d, causal, mode, impl), peaks in groups.items():
        cells = [p if isinstance(p, str) else f"{p / 2**20:.1f}" for p in (peaks.get(n, "") for n in seqlens)]
        lines.append(f"| {dt} | {d} | {int(causal)} | {mode} | {impl} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_memory(rows, path):
    plt = import_pyplot()
    if plt is None:
        return None
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        series = {}
        for r in rows:
            if r["mode"] == mode and not isinstance(r["peak_bytes"], str):
                c = r["config"]
                key = f"{r['impl']} {c['dtype']} d={c['hdim']}{' causal' if c['causal'] else ''}"
                series.setdefault(key, []).append((c["seqlen"], r["peak_bytes"] / 2**20))
        for key, pts in series.items():
            ax.plot(*zip(*sorted(pts)), marker="o", label=key, linestyle="--" if "sdpa" in key else "-")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"peak memory, {mode} (flash_ext linear, SDPA math quadratic)")
        ax.set_xlabel("sequence length")
        ax.set_ylabel("MiB beyond inputs")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(plt, fig, path)


# --------------------------------------------------------------------------- output

def metadata(flash_ext, device, opts, extra=None):
    """Everything needed to tell where and how the numbers were taken."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "device": gpu or f"cpu ({platform.processor() or platform.machine()})",
        "gpu": gpu,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "flash_ext_version": getattr(flash_ext, "__version__", None),
        "flash_ext": flash_ext_paths(flash_ext, device),
        "l2_bytes": l2_bytes(device),
        "options": {k: v for k, v in vars(opts).items() if not callable(v)},
        **(extra or {}),
    }


def meta_lines(meta):
    fe = meta["flash_ext"]
    dims = f", head dims {fe['built_head_dims']}" if fe.get("built_head_dims") is not None else ""
    return (f"{meta['date']} · torch {meta['torch']} · CUDA {meta['cuda']} · cuDNN {meta['cudnn']} · "
            f"flash_ext {meta['flash_ext_version']} (forward: {fe['forward']}{dims}; backward: {fe['backward']})  \n"
            f"`{meta['command']}`")


def cell(r, with_ratio):
    if r["status"] != "ok":
        return r["status"]
    text = f"{r['median_ms']:.3f} ms, {r['tflops']:.3g} TF/s"
    if with_ratio and "ratio_vs_flash_ext" in r:
        text += f", ×{r['ratio_vs_flash_ext']:.2f}"
    return text


def check_cell(chk):
    if "error" in chk:
        return "error ⚠"
    text = f"{chk['out']:.1e}"
    grads = [chk[n] for n in ("dq", "dk", "dv") if n in chk]
    if grads:
        text += f" / {max(grads):.1e}"
    return text + ("" if chk["ok"] else " ⚠")


def markdown_table(results, meta, impls, modes):
    lines = [f"# flash_ext vs SDPA ({meta['device']})", "", meta_lines(meta), "",
             "Cells: median time, TFLOP/s, and ×ratio = time(backend) / time(flash_ext) "
             "(>1: flash_ext is faster). Check: max|flash_ext − SDPA default| of the output "
             "(/ of dq, dk, dv); ⚠ marks a large difference.", ""]
    for mode in modes:
        lines += [f"## {mode}", "",
                  "| dtype | d | N | causal | b×h | check | " + " | ".join(impls) + " |",
                  "|" + "---|" * (6 + len(impls))]
        for res in results:
            c, t = res["config"], res["timings"][mode]
            cells = [cell(t[i], i != "flash_ext") for i in impls]
            lines.append(f"| {c['dtype']} | {c['hdim']} | {c['seqlen']} | {int(c['causal'])} | "
                         f"{c['batch']}×{c['heads']} | {check_cell(res['check'])} | " + " | ".join(cells) + " |")
        lines.append("")
    reasons = {}
    for res in results:
        for mode in modes:
            for impl, r in res["timings"][mode].items():
                if r["status"] != "ok":
                    reasons.setdefault((impl, r["status"], r.get("reason", "")), []).append(res["config"])
    if reasons:
        lines += ["## Not timed", ""]
        lines += [f"- **{impl}** {status} ({len(cfgs)} cases): {reason}" for (impl, status, reason), cfgs in reasons.items()]
    return "\n".join(lines) + "\n"


def write_results(payload, markdown, out_dir, stem):
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(payload, indent=1, default=str))
    md_path.write_text(markdown)
    return [json_path, md_path]


def import_pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not found: no plot written")
        return None
    return plt


def save_figure(plt, fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot(results, impls, mode, path):
    """TFLOP/s against sequence length: one subplot per (dtype, causal) row and head dim column."""
    plt = import_pyplot()
    if plt is None:
        return None
    rows = sorted({(r["config"]["dtype"], r["config"]["causal"]) for r in results})
    cols = sorted({r["config"]["hdim"] for r in results})
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(4.8 * len(cols), 3.4 * len(rows)), squeeze=False)
    for (i, (dt, causal)), (j, d) in itertools.product(enumerate(rows), enumerate(cols)):
        ax = axes[i][j]
        sel = [r for r in results if (r["config"]["dtype"], r["config"]["causal"], r["config"]["hdim"]) == (dt, causal, d)]
        for impl in impls:
            pts = sorted((r["config"]["seqlen"], r["timings"][mode][impl]["tflops"]) for r in sel
                         if r["timings"][mode][impl]["status"] == "ok")
            if pts:
                ax.plot(*zip(*pts), marker="o", label=impl, linewidth=2.5 if impl == "flash_ext" else 1.2)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{mode}: {dt} d={d} {'causal' if causal else 'full'}", fontsize=10)
        ax.set_xlabel("sequence length")
        ax.set_ylabel("TFLOP/s")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(plt, fig, path)


def device_slug(device):
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# --------------------------------------------------------------------------- progress

class Progress:
    """tqdm when importable, else a plain 'i/N' line per step."""

    def __init__(self, total):
        try:
            from tqdm import tqdm
            self.bar = tqdm(total=total, dynamic_ncols=True)
        except ImportError:
            self.bar = None
        self.total, self.done, self.shown = total, 0, -1

    def status(self, text):
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=True)
        elif self.shown != self.done:  # one line per step
            self.shown = self.done
            print(f"[{self.done + 1}/{self.total}] {text}", flush=True)

    def update(self):
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)

    def write(self, text):
        (self.bar.write if self.bar is not None else print)(text)

    def close(self):
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------- CLI

def parse_list(text, conv):
    return [conv(x) for x in text.split(",") if x.strip()]


def parse_seqlen(text):
    text = text.strip().lower()
    return int(float(text[:-1]) * 1024) if text.endswith("k") else int(text)


def parse_dtype(text):
    key = text.strip().lower()
    if key not in DTYPES:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}; use one of {', '.join(DTYPES)}")
    return DTYPE_NAMES[DTYPES[key]]


def parse_profile(text):
    """'dtype,hdim,seqlen,causal', e.g. 'bf16,128,4k,1'."""
    try:
        dt, d, n, c = text.split(",")
        return parse_dtype(dt), int(d), parse_seqlen(n), c.strip().lower() in ("1", "true", "causal")
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected DTYPE,HDIM,SEQLEN,CAUSAL (e.g. bf16,128,4k,1), got {text!r}")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows '(default: X)' only where there is a default worth showing."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Benchmark flash_ext.attention against torch SDPA backends.",
                                formatter_class=HelpFormatter)
    p.add_argument("--mode", choices=MODES + ["all"], default="all", help="what is timed (default: fwd, bwd and fwd_bwd)")
    p.add_argument("--dtypes", type=lambda s: parse_list(s, parse_dtype), help="e.g. bf16,fp16 (default: bf16,fp16; CPU: fp32)")
    p.add_argument("--hdims", type=lambda s: parse_list(s, int), help="head dims, e.g. 64,128,256")
    p.add_argument("--seqlens", type=lambda s: parse_list(s, parse_seqlen), help="e.g. 512,1k,2k,4k,8k,16k")
    p.add_argument("--causal", choices=["0", "1", "both"], help="causal masking (default: both; memory sweep: 0)")
    p.add_argument("--impls", type=lambda s: parse_list(s, str), help=f"subset of {','.join(GPU_IMPLS + OPTIONAL_IMPLS)}")
    p.add_argument("--tokens", type=int, help="batch·seqlen per call (default 16384; CPU: batch 1)")
    p.add_argument("--hidden", type=int, help="heads·head_dim (default 2048; CPU: 128)")
    p.add_argument("--quick", action="store_true", help="a small subset of the grid")
    p.add_argument("--warmup", type=int, default=10, help="warm-up calls (fewer for slow calls)")
    p.add_argument("--reps", type=int, default=100, help="most timed calls per measurement")
    p.add_argument("--min-reps", type=int, default=5, help="fewest timed calls per measurement")
    p.add_argument("--budget-ms", type=float, default=300.0, help="target time spent timing one measurement")
    p.add_argument("--rounds", type=int, default=5,
                   help="rounds per configuration: each runs every implementation's share of the calls in turn")
    p.add_argument("--math-budget-gib", type=float, default=8.0, help="skip SDPA math above this N×N fp32 size")
    p.add_argument("--memory", action="store_true", help="peak-memory sweep (flash_ext vs SDPA math) instead of timing")
    p.add_argument("--mem-heads", type=int, default=8, help="heads in the memory sweep (batch 1)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default: bench/results)")
    p.add_argument("--tag", default=None, help="name in the output files (default: date and time)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--profile-one", metavar="DTYPE,HDIM,SEQLEN,CAUSAL", type=parse_profile,
                   help="run one config a few times, nothing else (for ncu/nsys): flash_ext, or --impls")
    p.add_argument("--profile-iters", type=int, default=3, help="calls per mode under --profile-one")
    opts = p.parse_args(argv)
    choices = {"0": [False], "1": [True], "both": [False, True]}
    opts.causal_list = lambda default_both=True: choices[opts.causal or ("both" if default_both else "0")]
    opts.modes = MODES if opts.mode == "all" else [opts.mode]
    if opts.impls and (bad := set(opts.impls) - set(GPU_IMPLS + OPTIONAL_IMPLS)):
        p.error(f"unknown implementations {sorted(bad)}; choose from {GPU_IMPLS + OPTIONAL_IMPLS}")
    return opts


def make_config(dtype, hdim, seqlen, causal, opts, device):
    """batch = tokens // seqlen and heads = hidden // head_dim (each at least 1)."""
    g = 0 if device.type == "cuda" else 1
    tokens, hidden = opts.tokens or GRID["tokens"][g], opts.hidden or GRID["hidden"][g]
    return Config(dtype, hdim, seqlen, causal, max(1, tokens // seqlen), max(1, hidden // hdim))


def grid(opts, device):
    """The configurations to run; flags override the (quick) defaults."""
    g = 0 if device.type == "cuda" else 1
    pick = lambda key: getattr(opts, key) or (QUICK if opts.quick and key in QUICK else GRID)[key][g]
    return [make_config(dt, d, n, c, opts, device)
            for dt in pick("dtypes") for d in pick("hdims") for c in opts.causal_list() for n in pick("seqlens")]


def profile_one(flash_ext, opts, device):
    """A single config, a few calls, one input set: nothing else runs on the GPU. flash_ext
    alone unless --impls names others (e.g. flash_ext,sdpa_flash, for ncu to compare the two)."""
    cfg = make_config(*opts.profile_one, opts, device)
    sets = make_inputs(cfg, device, 1)
    for impl in opts.impls or ["flash_ext"]:
        for mode in opts.modes:
            with backend_context(impl):
                fn, args = build(mode, impl, flash_ext, cfg.causal, sets)
                for _ in range(opts.profile_iters):
                    fn(args[0])
                sync(device)
            print(f"profiled {impl} {mode} {cfg.label()} × {opts.profile_iters}")


def main(argv=None):
    opts = parse_args(argv)
    flash_ext = import_flash_ext()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if opts.profile_one:
        return profile_one(flash_ext, opts, device)
    paths = flash_ext_paths(flash_ext, device)
    if device.type == "cpu":
        print("No GPU found: this is a CPU run of the flash_ext reference implementation against "
              "SDPA on the CPU, at a small size. It checks the harness, not the kernels.")
    elif paths["forward"] != "kernel":
        print("WARNING: flash_ext has no compiled forward kernel; the GPU numbers below are the "
              "slow PyTorch reference.")
    tag = opts.tag or datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    slug = device_slug(device)

    if opts.memory:
        if device.type != "cuda":
            print("--memory measures CUDA memory and needs a GPU; nothing to do.")
            return 1
        rows = run_memory(flash_ext, opts, device)
        meta = metadata(flash_ext, device, opts, {"impls": MEMORY_IMPLS})
        markdown = memory_markdown(rows, meta)
        stem = f"memory_{tag}_{slug}"
        files = write_results({"meta": meta, "results": rows}, markdown, opts.out, stem)
        files.append(None if opts.no_plot else plot_memory(rows, opts.out / f"{stem}.png"))
    else:
        available = (GPU_IMPLS if device.type == "cuda" else CPU_IMPLS) + OPTIONAL_IMPLS
        impls = [i for i in available if (i in opts.impls if opts.impls else i not in OPTIONAL_IMPLS)]
        if "flash_ext" not in impls:
            impls.insert(0, "flash_ext")
        configs = grid(opts, device)
        progress = Progress(len(configs))
        results = []
        for cfg in configs:
            results.append(run_config(cfg, flash_ext, impls, opts.modes, opts, device, progress))
            progress.update()
        progress.close()
        meta = metadata(flash_ext, device, opts, {"impls": impls, "modes": opts.modes,
                                                  "flop_formula": "fwd 4*b*h*nq*nk*d (/2 causal); bwd 2.5x; fwd_bwd 3.5x"})
        markdown = markdown_table(results, meta, impls, opts.modes)
        stem = f"bench_{tag}_{slug}"
        files = write_results({"meta": meta, "results": results}, markdown, opts.out, stem)
        if not opts.no_plot:
            files += [plot(results, impls, mode, opts.out / f"{stem}_{mode}.png") for mode in opts.modes]
    print()
    print(markdown)
    for f in files:
        if f is not None:
            print(f"wrote {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
