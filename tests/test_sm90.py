"""The Hopper instruction wrappers (csrc/ptx_sm90.cuh: TMA, mbarrier, wgmma with shared-memory
descriptors, A from shared memory or registers, B K-major or MN-major) in a standalone program,
tests/sm90_check.cu, checked against a float64 product. It is compiled for sm_90a wherever
nvcc is (so CI checks that it builds) and run on a GPU of compute capability 9.0.

Also, wherever nvcc is: ptxas's report on each Hopper forward kernel. ptxas turns a wgmma
pipeline it cannot keep (registers short, accumulators read or written while in flight) into
one product at a time, and says so only as advice (C7510-C7519); the kernels still compute
the right answer, a third slower. Here that advice fails the test, and so does any spill
at head dims up to 128."""

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


@pytest.fixture(scope="module")
def sm90_check(tmp_path_factory):
    if shutil.which("nvcc") is None:
        pytest.skip("needs nvcc")
    exe = tmp_path_factory.mktemp("sm90") / "sm90_check"
    build = subprocess.run(["nvcc", "-std=c++17", "-O2", "-gencode=arch=compute_90a,code=sm_90a",
                            f"-I{ROOT / 'csrc'}", str(ROOT / "tests" / "sm90_check.cu"), "-o", str(exe)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    return exe


def test_sm90_wrappers_build(sm90_check):
    assert sm90_check.exists()


@pytest.mark.skipif(not HOPPER, reason="needs a GPU of compute capability 9.0")
def test_sm90_wrappers_compute_the_products(sm90_check):
    run = subprocess.run([str(sm90_check)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.count("PASS") == 3, run.stdout + run.stderr


NVCC_SM90 = ["nvcc", "-std=c++17", "-O3", "--expt-relaxed-constexpr", "-gencode=arch=compute_90a,code=sm_90a",
             "-Xptxas=-v", f"-I{ROOT / 'csrc'}"]


def setup_variants():
    """setup.py's VARIANTS, {name: (kCausal, kBand, kSoftcap)}, read without running setup.py."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "VARIANTS" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py defines no VARIANTS")


HOPPER_VARIANTS = {name: ", ".join(flags) for name, flags in setup_variants().items()}


@pytest.mark.parametrize("variant", HOPPER_VARIANTS)
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_ptxas_keeps_the_hopper_forward_pipelined(tmp_path, head_dim, variant):
    if shutil.which("nvcc") is None:
        pytest.skip("needs nvcc")
    args = f"Bf16, {head_dim}, {HOPPER_VARIANTS[variant]}"
    source = tmp_path / "fwd_sm90.cu"
    source.write_text('#include "fwd_sm90.cuh"\nnamespace flash {\n'
                      f"template <> void run_fwd_sm90<{args}>(const FwdParams& p, cudaStream_t stream) "
                      f"{{ launch_fwd_sm90<{args}>(p, stream); }}\n}}\n")
    build = subprocess.run(NVCC_SM90 + ["-c", str(source), "-o", str(tmp_path / "fwd_sm90.o")],
                           capture_output=True, text=True)
    report = build.stdout + build.stderr
    assert build.returncode == 0, report
    kernels = re.findall(r"Compiling entry function '(\w*fwd_kernel_sm90\w*)'", report)
    assert len(kernels) == 2, report  # with and without the softmax overlap
    advice = [line for line in report.splitlines() if re.search(r"\(C751\d\)", line)]
    assert not advice, "\n".join(advice)
    if head_dim <= 128:
        spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
        assert spills and all(a == b == "0" for a, b in spills), report


def test_forward_trace_harness(tmp_path):
    """bench/trace_fwd_sm90.cu (the Hopper forward's timeline) builds wherever nvcc is; on a
    Hopper GPU it runs and bench/trace_fwd_sm90.py reads what it wrote."""
    if shutil.which("nvcc") is None:
        pytest.skip("needs nvcc")
    exe = tmp_path / "trace"
    build = subprocess.run(NVCC_SM90 + [str(ROOT / "bench" / "trace_fwd_sm90.cu"), "-o", str(exe)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stdout + build.stderr
    if not HOPPER:
        return
    trace = tmp_path / "trace.bin"
    run = subprocess.run([str(exe), "128", "512", "8", "16", "1", str(trace)], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0 and "TFLOP/s (traced)" in run.stdout, run.stdout + run.stderr
    read = subprocess.run([sys.executable, str(ROOT / "bench" / "trace_fwd_sm90.py"), str(trace)], capture_output=True,
                          text=True, timeout=120)
    assert read.returncode == 0, read.stdout + read.stderr
    assert re.search(r"consumer 1: [1-9]\d* blocks", read.stdout) and "store" in read.stdout, read.stdout
