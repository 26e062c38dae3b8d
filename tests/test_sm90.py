"""The Hopper instruction wrappers (csrc/ptx_sm90.cuh: TMA, mbarrier, wgmma with shared-memory
descriptors, A from shared memory or registers, B K-major or MN-major) in a standalone program,
tests/sm90_check.cu, checked against a float64 product. It is compiled for sm_90a wherever
nvcc is (so CI checks that it builds) and run on a GPU of compute capability 9.0."""

import shutil
import subprocess
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
